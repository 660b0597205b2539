"""tools/prepare_refocus.py and tools/prepare_gqa.py on small fixtures shaped like the real files."""

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megatron_sayo.data.grounded import check_file

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


refocus = _load_tool("prepare_refocus")
gqa = _load_tool("prepare_gqa")


def _encoded(size, fmt, shade):
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), shade, np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


# ---------------------------------------------------------------- ReFocus

def _bbox(x1, y1, x2, y2):
    return {"x1": x1, "y1": y1, "x2": x2, "y2": y2}


REFOCUS_ROWS = [  # id, focus boxes, image format
    ("rf-0", [_bbox(10, 10, 40, 30), _bbox(50, 5, 70, 20)], "PNG"),   # two boxes: first one only
    ("rf-1", [_bbox(0, 0, 20, 20)], "JPEG"),
    ("rf-2", [], "PNG"),                                               # no focus box: never chosen
    ("rf-3", [_bbox(5, 5, 15, 15)], "PNG"),
    ("rf-4", [_bbox(100, 100, 120, 120)], "PNG"),                      # outside the 80x60 image
    ("rf-5", [_bbox(1, 2, 3, 4)], "PNG"),
    ("rf-6", [], "PNG"),
    ("rf-7", [_bbox(60, 40, 80, 60)], "PNG"),
]


def _refocus_shard(path, rows):
    table = pa.table({
        "id": [r[0] for r in rows],
        "question": [f"What is shown in {r[0]}?" for r in rows],
        "answer": [f"ans-{r[0]}" for r in rows],
        "image": [{"bytes": _encoded((80, 60), r[2], 40 + i), "path": None} for i, r in enumerate(rows)],
        "thoughts": [["look"] for _ in rows],
        "focus_areas_bbox": pa.array([r[1] for r in rows], type=pa.list_(pa.struct(
            [(k, pa.int32()) for k in ("x1", "y1", "x2", "y2")]))),
        "source": ["chartqa"] * len(rows),
    })
    pq.write_table(table, path)
    return path


@pytest.fixture
def refocus_shards(tmp_path):
    return [_refocus_shard(tmp_path / "train-00000-of-00002.parquet", REFOCUS_ROWS[:4]),
            _refocus_shard(tmp_path / "train-00001-of-00002.parquet", REFOCUS_ROWS[4:])]


def _rows(jsonl):
    return [json.loads(line) for line in Path(jsonl).read_text().splitlines()]


def test_refocus_all_rows_first_box_and_validation(refocus_shards, tmp_path):
    written, dropped = refocus.convert(refocus_shards, tmp_path / "out", fraction=1.0, seed=0)
    assert (written, dropped) == (5, 1)                     # rf-4 (box outside) dropped; rf-2, rf-6 have no box
    rows = {r["id"]: r for r in _rows(tmp_path / "out" / "data.jsonl")}
    assert sorted(rows) == ["rf-0", "rf-1", "rf-3", "rf-5", "rf-7"]
    assert rows["rf-0"]["boxes"] == [[10, 10, 40, 30]]
    assert rows["rf-3"]["answer"] == "ans-rf-3" and rows["rf-3"]["question"] == "What is shown in rf-3?"
    assert rows["rf-1"]["image"] == "images/rf-1.jpg" and rows["rf-0"]["image"] == "images/rf-0.png"
    assert (tmp_path / "out" / "images" / "rf-1.jpg").read_bytes() == _encoded((80, 60), "JPEG", 41)
    assert not (tmp_path / "out" / "images" / "rf-4.png").exists()
    good, errors = check_file(tmp_path / "out" / "data.jsonl")
    assert errors == [] and len(good) == 5


def test_refocus_subset_size_seeded_and_shard_order_free(refocus_shards, tmp_path):
    ids = lambda d: sorted(r["id"] for r in _rows(d / "data.jsonl"))  # noqa: E731
    refocus.convert(refocus_shards, tmp_path / "a", fraction=0.5, seed=3)
    refocus.convert(list(reversed(refocus_shards)), tmp_path / "b", fraction=0.5, seed=3)
    chosen = refocus.choose_ids(refocus_shards, 0.5, 3)
    assert len(chosen) == 3                                  # round(0.5 * 6 boxed rows)
    assert chosen <= {"rf-0", "rf-1", "rf-3", "rf-4", "rf-5", "rf-7"}
    assert ids(tmp_path / "a") == ids(tmp_path / "b") == sorted(chosen - {"rf-4"})
    seeds = {frozenset(refocus.choose_ids(refocus_shards, 0.5, s)) for s in range(10)}
    assert len(seeds) > 1                                    # the seed matters


def test_refocus_cli(refocus_shards, tmp_path):
    proc = subprocess.run([sys.executable, str(TOOLS / "prepare_refocus.py"), "--out", str(tmp_path / "o"),
                           "--fraction", "1.0", *map(str, refocus_shards)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "5 row(s) written, 1 dropped" in proc.stdout and "rf-4" in proc.stderr


# ---------------------------------------------------------------- GQA

SCENE_GRAPHS = {
    "img1": {"width": 100, "height": 80, "objects": {
        "101": {"name": "cup", "x": 10, "y": 20, "w": 30, "h": 15, "attributes": ["red"], "relations": []},
        "102": {"name": "table", "x": 0, "y": 30, "w": 100, "h": 50, "attributes": [], "relations": []},
        "103": {"name": "line", "x": 50, "y": 5, "w": 0, "h": 10, "attributes": [], "relations": []},
    }},
    "img2": {"width": 100, "height": 80, "objects": {
        "201": {"name": "dog", "x": 60, "y": 40, "w": 30, "h": 30, "attributes": [], "relations": []},
        "202": {"name": "cat", "x": 5, "y": 5, "w": 20, "h": 20, "attributes": [], "relations": []},
    }},
}


def _q(image, question, answer, annotations=None, semantic=None):
    return {"imageId": image, "question": question, "answer": answer, "fullAnswer": f"It is {answer}.",
            "isBalanced": True, "types": {"structural": "query"},
            "annotations": annotations or {"answer": {}, "question": {}, "fullAnswer": {}},
            "semantic": semantic or []}


QUESTIONS = {
    "q1": _q("img1", "What is on the table?", "cup",      # answer object wins over question object
             {"answer": {"0": "101"}, "question": {"4": "102"}, "fullAnswer": {"1": "101"}}),
    "q2": _q("img1", "What colour is the table?", "brown", {"answer": {}, "question": {"4": "102"}, "fullAnswer": {}}),
    "q3": _q("img2", "Is the animal a dog?", "yes", semantic=[
        {"operation": "select", "dependencies": [], "argument": "cat (202)"},
        {"operation": "relate", "dependencies": [0], "argument": "animal,to the right of,s (201)"},
        {"operation": "verify name", "dependencies": [1], "argument": "dog"}]),
    "q4": _q("img2", "Are these animals?", "yes", {"answer": {}, "question": {"2:4": "201,202"}, "fullAnswer": {}}),
    "q5": _q("img1", "What is this?", "ghost", {"answer": {"0": "999"}, "question": {}, "fullAnswer": {}}),
    "q6": _q("img3", "What is this?", "cup", {"answer": {"0": "101"}, "question": {}, "fullAnswer": {}}),
    "q7": _q("img1", "Is the line thin?", "yes", {"answer": {}, "question": {"2": "103"}, "fullAnswer": {}}),
    "q8": _q("img1", "Is it sunny?", "yes"),
}

# Hand-written expectations: boxes are [x, y, x + w, y + h] of the referred objects.
EXPECTED_GQA = {
    "gqa-q1": [[10, 20, 40, 35]],
    "gqa-q2": [[0, 30, 100, 80]],
    "gqa-q3": [[60, 40, 90, 70]],
    "gqa-q4": [[60, 40, 90, 70], [5, 5, 25, 25]],
}


@pytest.fixture
def gqa_files(tmp_path):
    images = tmp_path / "gqa" / "images"
    images.mkdir(parents=True)
    for name in ("img1", "img2"):
        (images / f"{name}.jpg").write_bytes(_encoded((100, 80), "JPEG", 90))
    (tmp_path / "gqa" / "q.json").write_text(json.dumps(QUESTIONS))
    (tmp_path / "gqa" / "sg.json").write_text(json.dumps(SCENE_GRAPHS))
    return tmp_path / "gqa"


def test_gqa_referred_objects_and_boxes(gqa_files, tmp_path):
    read, written, dropped = gqa.convert(gqa_files / "q.json", gqa_files / "sg.json", gqa_files / "images",
                                         tmp_path / "out")
    assert (read, written, dropped) == (8, 4, 1)            # q5, q6, q8 unusable; q7 (zero-width box) dropped
    rows = {r["id"]: r for r in _rows(tmp_path / "out" / "data.jsonl")}
    assert {k: r["boxes"] for k, r in rows.items()} == EXPECTED_GQA
    assert rows["gqa-q1"]["image"] == "../gqa/images/img1.jpg"
    assert rows["gqa-q3"]["question"] == "Is the animal a dog?" and rows["gqa-q3"]["answer"] == "yes"
    good, errors = check_file(tmp_path / "out" / "data.jsonl")
    assert errors == [] and len(good) == 4


def test_gqa_max_rows_is_seeded(gqa_files, tmp_path):
    questions, graphs = json.loads((gqa_files / "q.json").read_text()), SCENE_GRAPHS
    a = gqa.build_rows(questions, graphs, gqa_files / "images", tmp_path, max_rows=2, seed=1)
    b = gqa.build_rows(dict(reversed(list(questions.items()))), graphs, gqa_files / "images", tmp_path,
                       max_rows=2, seed=1)
    assert len(a) == 2 and [r["id"] for r in a] == [r["id"] for r in b]


def test_gqa_cli(gqa_files, tmp_path):
    proc = subprocess.run([sys.executable, str(TOOLS / "prepare_gqa.py"), "--questions", str(gqa_files / "q.json"),
                           "--scene-graphs", str(gqa_files / "sg.json"), "--images", str(gqa_files / "images"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "8 question(s) read, 4 row(s) written, 1 dropped" in proc.stdout
