"""Suite prompts, references and images on fixture rows in each benchmark's published schema, checked against the
SAYO authors' loaders (Cratileo/Sayo eval/utils/data_loaders.py, processing.py) re-derived here from their rules."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import pytest
from PIL import Image
from suite_fixtures import AUTHORS_SYSTEM_PROMPT, authors_item, write_suite

from megatron_sayo.eval.benchmarks import prepare, suite
from megatron_sayo.eval.benchmarks.hub_data import DatasetError


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite_data")
    return root, write_suite(root)


def test_nine_benchmarks_in_the_papers_order():
    assert [b.title for b in suite.BENCHMARKS] == ["MME-RealWorld", "M3CoT", "V*", "MMStar", "MathVision",
                                                   "We-Math", "ChartQA", "AI2D", "CharXiv"]
    assert [b.split for b in suite.BENCHMARKS] == ["train", "test", "test", "val", "test", "testmini", "test",
                                                   "test", "validation"]


@pytest.mark.parametrize("name", [b.name for b in suite.BENCHMARKS])
def test_prompts_and_references_match_the_authors(fixture_root, name):
    root, raw = fixture_root
    samples = suite.BY_NAME[name].samples(root)
    assert len(samples) == len(raw[name])            # the evaluated split only (train/test/testmini files ignored)
    for sample, row in zip(samples, raw[name]):
        question, answer = authors_item(name, row)
        assert sample.question == question
        assert sample.answer == answer


def test_prompt_details():
    """Spot checks of the construction rules themselves (independent of the fixture rows)."""
    assert suite.question_with_choices("Q?", suite.lettered_choices(["x", "y"])) == "Question:Q?\nChoices:A: x\nB: y\n"
    assert suite.mme_realworld_prompt("Q", ["(A) 1", "(B) 2"]) == "Question:Q\nChoices:['(A) 1', '(B) 2']"
    assert suite.mathvision_prompt("Q", []) == "Q"
    assert suite.wemath_prompt("Q", "A. 1; B. 2").endswith("\n\nOptions: A. 1; B. 2\nYour final answer must be one "
                                                          "of A, B, C, or D.")
    assert suite.ai2d_answer("2") == suite.ai2d_answer(2) == "C"


def test_limit_and_ids(fixture_root):
    root, raw = fixture_root
    assert [s.id for s in suite.BY_NAME["wemath"].samples(root, limit=1)] == ["1@2steps_1"]
    assert [s.id for s in suite.BY_NAME["chartqa"].samples(root)] == ["chartqa-0", "chartqa-1"]   # no id column
    assert [s.id for s in suite.BY_NAME["mme-realworld"].samples(root)] == [r["Question_id"]
                                                                            for r in raw["mme-realworld"]]


def authors_image(source, from_file: bool, min_pixels: int, max_pixels: int) -> Image.Image:
    """Their load_image: open (RGB when read from a path), shrink past max_pixels, then grow below min_pixels."""
    image = Image.open(source)
    if from_file:
        image = image.convert("RGB")
    if image.width * image.height > max_pixels:
        r = math.sqrt(max_pixels / (image.width * image.height))
        image = image.resize((int(image.width * r), int(image.height * r)))
    if image.width * image.height < min_pixels:
        r = math.sqrt(min_pixels / (image.width * image.height))
        image = image.resize((int(image.width * r), int(image.height * r)))
    return image


@pytest.mark.parametrize("name", ["mme-realworld", "vstar", "mmstar", "mathvision"])
@pytest.mark.parametrize("bounds", [(262144, 5000000), (100, 400), (100, 10**7)], ids=["up", "down", "kept"])
def test_images_are_sent_as_the_authors_send_them(fixture_root, tmp_path, name, bounds):
    """The pixels the server decodes (it converts to RGB, as the authors' vLLM server did) equal those of the
    authors' rescaled PNG; an image the rescale leaves alone is sent as published (its file hard-linked)."""
    root, _ = fixture_root
    samples = suite.BY_NAME[name].samples(root)
    rows = prepare.byob_rows(samples, tmp_path / "img", *bounds)
    for sample, row in zip(samples, rows):
        src = sample.image.path if sample.image.path else io.BytesIO(sample.image.data)
        ref = authors_image(src, name in ("mme-realworld", "vstar"), *bounds)
        png = io.BytesIO()
        ref.save(png, format="PNG")
        with Image.open(png) as sent, Image.open(row["image_url"]) as ours:
            assert ours.size == sent.size
            assert ours.convert("RGB").tobytes() == sent.convert("RGB").tobytes()
        assert Path(row["image_url"]).parent == (tmp_path / "img").resolve()   # the server's one media folder
        if bounds == (100, 10**7) and sample.image.path:
            assert os.path.samefile(row["image_url"], sample.image.path)       # hard link, no second copy
        assert row["question"] == sample.question and row["answer"] == sample.answer


def test_bad_datasets_name_file_and_field(fixture_root, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, raw = fixture_root
    with pytest.raises(DatasetError, match=r"ChartQA: no such directory \(expected ChartQA test split of lmms-lab"):
        suite.BY_NAME["chartqa"].samples(tmp_path)
    bad = tmp_path / "ChartQA" / "data" / "test-00000-of-00001.parquet"
    bad.parent.mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"no file matching data/test-\*\.parquet"):
        suite.BY_NAME["chartqa"].samples(tmp_path)
    pq.write_table(pa.Table.from_pylist([{"query": "q", "label": ["1"], "image": None}]), bad)
    with pytest.raises(DatasetError, match=r"test-00000-of-00001\.parquet row 0: missing field 'question'"):
        suite.BY_NAME["chartqa"].samples(tmp_path)
    (root / "vstar_bench" / raw["vstar"][1]["image"]).rename(tmp_path / "moved.jpg")
    try:
        with pytest.raises(DatasetError, match=r"test_questions\.jsonl row 1 field 'image': image file .* does not"):
            suite.BY_NAME["vstar"].samples(root)
    finally:
        (tmp_path / "moved.jpg").rename(root / "vstar_bench" / raw["vstar"][1]["image"])


def test_system_prompt_renders_to_the_authors():
    """BYOB renders the system prompt with str.format: braces in \\boxed{} must survive it."""
    pytest.importorskip("nemo_evaluator")
    from nemo_evaluator.contrib.byob.eval_logic import render_prompt

    from megatron_sayo.config import SuiteConfig
    from megatron_sayo.eval.benchmarks.byob_suite import template

    row = {"image_url": "/x.png", "question": "Q {0}", "answer": "A", "id": "1"}
    assert render_prompt(template(SuiteConfig().system_prompt), row) == AUTHORS_SYSTEM_PROMPT


def test_select():
    assert [b.name for b in suite.select("sayo-suite")] == [b.name for b in suite.BENCHMARKS]
    assert [b.name for b in suite.select("sayo-ai2d")] == ["ai2d"]
    with pytest.raises(ValueError, match="sayo-mme-realworld"):
        suite.select("sayo-nope")
