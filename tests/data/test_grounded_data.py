"""Grounded dataset: validation errors with line numbers, loader modes, parquet, validate CLI, synthetic task."""

import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megatron_sayo.data.grounded import (
    DataError,
    EmptyDataError,
    check_file,
    decodable_samples,
    is_heldout,
    load_grounded,
    save_parquet,
    split_heldout,
)
from megatron_sayo.data.regions import box_to_cells
from megatron_sayo.data.synthetic import COLOURS, TILE, make_synthetic
from megatron_sayo.data.validate import main as validate_main


def _row(i, **over):
    row = {"id": f"r{i}", "image": "img.png", "question": "q?", "answer": "a", "boxes": [[4, 4, 30, 20]]}
    row.update(over)
    return json.dumps(row, allow_nan=True)


# line -> (raw line, field the error must name); None field = a good row
BAD_FILE = [
    (_row(1), None),
    ('{"id": "r2", "image": "img.png",', "<json>"),
    (json.dumps({"id": "r3", "image": "img.png", "question": "q", "boxes": [[0, 0, 5, 5]]}), "answer"),
    (_row(4, question=7), "question"),
    (_row(5, image="missing.png"), "image"),
    (_row(6, image="not_an_image.png"), "image"),
    (_row(7, boxes=[[0, 0, float("nan"), 5]]), "boxes[0]"),
    (_row(8, boxes=[[0, 0, 5]]), "boxes[0]"),
    (_row(9, boxes=[[10, 0, 5, 5]]), "boxes[0]"),
    (_row(10, boxes=[[0, 5, 5, 5]]), "boxes[0]"),
    (_row(11, boxes=[[0, 0, 5, 5], [70, 0, 80, 5]]), "boxes[1]"),   # outside the 64x48 image
    (_row(12, boxes=[]), "boxes"),
    ("", None),                                                       # blank line: ignored
    (_row(1), "id"),                                                  # duplicate id
    ("[1, 2]", "<row>"),
    (_row(16, id=""), "id"),
    (_row(17, boxes=[[-20, -20, 10, 10]]), None),                    # partly outside: clamped, fine
]


@pytest.fixture
def data_dir(tmp_path):
    Image.fromarray(np.full((48, 64, 3), 128, np.uint8)).save(tmp_path / "img.png")
    (tmp_path / "not_an_image.png").write_text("hello")
    (tmp_path / "bad.jsonl").write_text("\n".join(line for line, _ in BAD_FILE) + "\n")
    (tmp_path / "good.jsonl").write_text(_row(1) + "\n" + _row(2, boxes=[[0, 0, 10, 10], [40, 30, 64, 48]]) + "\n")
    return tmp_path


def test_every_bad_row_reported_with_line_and_field(data_dir):
    good, errors = check_file(data_dir / "bad.jsonl")
    expected = [(n, fld) for n, (_, fld) in enumerate(BAD_FILE, start=1) if fld is not None]
    assert [(e.line, e.row_error.field) for e in errors] == expected
    assert [s.id for s in good] == ["r1", "r17"]
    for e in errors:
        assert str(e).startswith(f"{data_dir / 'bad.jsonl'}: line {e.line}")
        assert f"field '{e.row_error.field}': expected" in str(e)


def test_error_messages_say_what_was_expected(data_dir):
    msgs = {e.line: str(e) for e in check_file(data_dir / "bad.jsonl")[1]}
    assert "required field 'answer'" in msgs[3]
    assert "expected str, got 'int'" in msgs[4]
    assert "existing image file" in msgs[5]
    assert "readable PNG/JPEG" in msgs[6]
    assert "4 finite numbers" in msgs[7]
    assert "x1 < x2 and y1 < y2" in msgs[9] and "x1 < x2 and y1 < y2" in msgs[10]
    assert "64x48 image" in msgs[11] and "(id 'r11')" in msgs[11]
    assert "already used on line 1" in msgs[14]


def test_load_raise_names_file_line_field(data_dir):
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: field '<json>': expected one valid JSON object"):
        load_grounded(data_dir / "bad.jsonl")


def test_load_skip_counts_and_logs(data_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="megatron_sayo.data.grounded"):
        samples = load_grounded(data_dir / "bad.jsonl", on_error="skip")
    assert [s.id for s in samples] == ["r1", "r17"]
    assert "skipped 14 bad row(s), kept 2" in caplog.text
    with pytest.raises(ValueError, match="on_error"):
        load_grounded(data_dir / "bad.jsonl", on_error="ignore")


def test_good_sample_fields(data_dir):
    s = load_grounded(data_dir / "good.jsonl")[1]
    assert (s.id, s.question, s.answer, s.image_size) == ("r2", "q?", "a", (64, 48))
    assert s.boxes == [[0.0, 0.0, 10.0, 10.0], [40.0, 30.0, 64.0, 48.0]]
    assert s.image_path == data_dir / "img.png" and s.open_image().size == (64, 48)


def test_parquet_round_trip(data_dir):
    original = load_grounded(data_dir / "good.jsonl")
    path = save_parquet(original, data_dir / "good.parquet")
    back = load_grounded(path)
    assert [(s.id, s.question, s.answer, s.boxes, s.image_size) for s in back] == \
           [(s.id, s.question, s.answer, s.boxes, s.image_size) for s in original]
    assert back[0].image_path is None
    assert np.array_equal(np.asarray(back[0].open_image()), np.asarray(original[0].open_image()))


def test_parquet_bad_rows_are_numbered_and_hf_image_struct_accepted(data_dir):
    png = (data_dir / "img.png").read_bytes()
    table = pa.table({
        "id": ["a", "b", "c"],
        "image": [{"bytes": png, "path": None}, {"bytes": b"junk", "path": None}, {"bytes": png, "path": None}],
        "question": ["q", "q", "q"], "answer": ["x", "y", "z"],
        "boxes": [[[0.0, 0.0, 5.0, 5.0]], [[0.0, 0.0, 5.0, 5.0]], [[5.0, 0.0, 1.0, 5.0]]],
    })
    pq.write_table(table, data_dir / "hf.parquet")
    good, errors = check_file(data_dir / "hf.parquet")
    assert [s.id for s in good] == ["a"]
    assert [(e.line, e.row_error.field) for e in errors] == [(2, "image"), (3, "boxes[0]")]
    assert ": row 2 (id 'b'): field 'image'" in str(errors[0])


def test_validate_cli_reports_all_and_exit_codes(data_dir, capsys):
    assert validate_main([str(data_dir / "good.jsonl")]) == 0
    assert "OK: 2 good row(s), 0 bad row(s)" in capsys.readouterr().out
    assert validate_main([str(data_dir / "good.jsonl"), str(data_dir / "bad.jsonl")]) == 1
    out = capsys.readouterr().out
    for n, (_, fld) in enumerate(BAD_FILE, start=1):
        if fld is not None:
            assert f"bad.jsonl: line {n}" in out
    assert "FAILED: 2 good row(s), 14 bad row(s)" in out
    assert validate_main([str(data_dir / "nope.jsonl")]) == 1


@pytest.mark.multiproc
def test_validate_cli_as_module(data_dir):
    proc = subprocess.run([sys.executable, "-m", "megatron_sayo.data.validate", str(data_dir / "bad.jsonl")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "line 9" in proc.stdout


def test_heldout_split_is_deterministic_and_about_one_percent():
    ids = [f"id-{i}" for i in range(20000)]
    held = [i for i in ids if is_heldout(i)]
    assert 140 <= len(held) <= 260                       # 1 % of 20k = 200
    assert held == [i for i in ids if is_heldout(i)]
    assert not any(is_heldout(i, fraction=0.0) for i in ids[:100])


def test_split_heldout_independent_of_order(data_dir):
    samples = make_synthetic(data_dir / "syn", 50, seed=1)
    rows = load_grounded(samples)
    _, held_a = split_heldout(rows, fraction=0.2)
    _, held_b = split_heldout(list(reversed(rows)), fraction=0.2)
    assert {s.id for s in held_a} == {s.id for s in held_b} and 0 < len(held_a) < 50


def test_synthetic_deterministic_and_valid(tmp_path):
    a = make_synthetic(tmp_path / "a", 16, seed=7)
    b = make_synthetic(tmp_path / "b", 16, seed=7)
    c = make_synthetic(tmp_path / "c", 16, seed=8)
    assert a.read_text() == b.read_text() != c.read_text()
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    for row in rows:
        assert (tmp_path / "a" / row["image"]).read_bytes() == (tmp_path / "b" / row["image"]).read_bytes()
    good, errors = check_file(a)
    assert errors == [] and len(good) == 16


def test_synthetic_answer_lives_in_the_box(tmp_path):
    jsonl = make_synthetic(tmp_path, 32, seed=0, size=(140, 112))
    for s in load_grounded(jsonl):
        assert s.image_size == (140, 112)
        x1, y1, x2, y2 = s.boxes[0]
        centre = np.asarray(s.open_image())[int((y1 + y2) / 2), int((x1 + x2) / 2)]
        colour = s.answer if s.answer in COLOURS else s.question.split()[-1].rstrip("?")
        assert tuple(centre) == COLOURS[colour], s


def _palette_colour(pixels: np.ndarray):
    """The palette colour name every pixel of `pixels` has, else None."""
    for name, rgb in COLOURS.items():
        if (pixels == np.asarray(rgb, dtype=pixels.dtype)).all():
            return name
    return None


@pytest.mark.parametrize("task", ["tiles", "tiles_reasoning"])
def test_tiles_answer_is_one_token_read_from_the_pixels(tmp_path, task):
    """Each tiles question is a lookup inside one visual token: HF's own Qwen2-VL image processor keeps the image
    at its size, the box covers exactly one merged cell, its top half is the question's colour and its bottom
    half the answer, and no other tile has that bottom colour (so no other token answers)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    proc = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=50176)
    jsonl = make_synthetic(tmp_path, 24, seed=3, task=task)
    for s in load_grounded(jsonl):
        image = s.open_image()
        t, h, w = (int(v) for v in proc(images=image)["image_grid_thw"][0])
        assert (w * 14, h * 14) == image.size
        (box,) = s.boxes
        assert len(box_to_cells(box, image.size, image.size, (h // 2, w // 2), s.id)) == 1
        px = np.asarray(image)
        tiles = {}
        for y in range(0, image.size[1], TILE):
            for x in range(0, image.size[0], TILE):
                top, bottom = (_palette_colour(px[y:y + TILE // 2, x:x + TILE]),
                               _palette_colour(px[y + TILE // 2:y + TILE, x:x + TILE]))
                if top and bottom:
                    tiles[(x, y)] = (top, bottom)
        asked = s.question.removeprefix("What is under ").removesuffix("?")
        assert tiles[(box[0], box[1])] == (asked, s.answer), s
        assert [b for xy, (_, b) in tiles.items() if xy != (box[0], box[1])].count(s.answer) == 0, s
        assert len(tiles) == 3 and len({top for top, _ in tiles.values()}) == 3
        if task == "tiles":
            assert s.reasoning is None
        else:  # the reasoning describes one of the tiles on the image, as the pixels show it
            assert s.reasoning in {f"{top} over {bottom}" for top, bottom in tiles.values()}, s


def test_tiles_deterministic_and_size_checked(tmp_path):
    a = make_synthetic(tmp_path / "a", 8, seed=5, task="tiles")
    b = make_synthetic(tmp_path / "b", 8, seed=5, task="tiles")
    assert a.read_text() == b.read_text() and check_file(a)[1] == []
    with pytest.raises(ValueError, match="multiples of 28"):
        make_synthetic(tmp_path / "c", 1, task="tiles", size=(100, 112))
    with pytest.raises(ValueError, match="one of"):
        make_synthetic(tmp_path / "d", 1, task="stripes")


@pytest.mark.multiproc
def test_synthetic_cli(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "megatron_sayo.data.synthetic", "--out", str(tmp_path),
                           "--n", "3", "--seed", "2", "--size", "84x56"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert [s.image_size for s in load_grounded(tmp_path / "data.jsonl")] == [(84, 56)] * 3


# ---------------------------------------------------------------- hostile lines, empty files, images that vanish

HOSTILE_LINES = [  # (raw bytes of the line, field the error names); None = good row
    (_row(1).encode(), None),
    (b'{"id": "r2", "image": "img.png", "question": "caf\xe9?", "answer": "a", "boxes": [[4, 4, 30, 20]]}', "<line>"),
    (_row(3, boxes=[[int("9" * 401), 4, 30, 20]]).encode(), "boxes[0]"),          # overflows float()
    (b'{"id": "r4", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "<json>"),  # nesting beyond the parser
    (b'{"id": "r5", "n": ' + b"7" * 5000 + b"}", "<json>"),                       # past Python's int digit limit
    (_row(6).encode(), None),
]


@pytest.fixture
def hostile_file(data_dir):
    path = data_dir / "hostile.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in HOSTILE_LINES) + b"\n")
    return path


def test_hostile_lines_are_reported_by_number_and_the_file_continues(hostile_file):
    good, errors = check_file(hostile_file)
    assert [s.id for s in good] == ["r1", "r6"]
    expected = [(n, fld) for n, (_, fld) in enumerate(HOSTILE_LINES, start=1) if fld is not None]
    assert [(e.line, e.row_error.field) for e in errors] == expected
    assert "expected UTF-8 text, got 'byte 0xe9" in str(errors[0])


def test_hostile_lines_skip_and_raise(hostile_file):
    assert [s.id for s in load_grounded(hostile_file, on_error="skip")] == ["r1", "r6"]
    with pytest.raises(DataError, match=r"hostile\.jsonl: line 2: field '<line>': expected UTF-8 text"):
        load_grounded(hostile_file)


def test_hostile_lines_in_the_validator(hostile_file, capsys):
    assert validate_main([str(hostile_file)]) == 1
    out = capsys.readouterr().out
    assert all(f"hostile.jsonl: line {n}" in out for n in (2, 3, 4, 5))
    assert "FAILED: 2 good row(s), 4 bad row(s)" in out


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_fails_with_the_file_named(data_dir, capsys, content):
    path = data_dir / "empty.jsonl"
    path.write_text(content)
    assert validate_main([str(path)]) == 1
    assert str(path) in capsys.readouterr().out
    with pytest.raises(EmptyDataError, match=str(path)):
        load_grounded(path)
    with pytest.raises(EmptyDataError, match="no such file"):
        load_grounded(data_dir / "nope.jsonl")


def test_all_rows_skipped_is_an_error(data_dir):
    (data_dir / "allbad.jsonl").write_text(_row(1, boxes=[]) + "\n")
    with pytest.raises(EmptyDataError, match=r"allbad\.jsonl: no usable sample \(1 bad row"):
        load_grounded(data_dir / "allbad.jsonl", on_error="skip")


def test_image_that_stops_decoding_after_loading(data_dir, caplog):
    """on_error=skip replaces a sample whose image no longer decodes by the next good one; raise names it."""
    shutil.copy(data_dir / "img.png", data_dir / "gone.png")
    (data_dir / "three.jsonl").write_text(_row(1) + "\n" + _row(2, image="gone.png") + "\n" + _row(3) + "\n")
    samples = load_grounded(data_dir / "three.jsonl")
    (data_dir / "gone.png").write_bytes(b"truncated")           # corrupted mid-run
    with caplog.at_level(logging.WARNING, logger="megatron_sayo.data.grounded"):
        picked = decodable_samples(samples, [1, 0, 1], on_error="skip")
    assert [s.id for s in picked] == ["r3", "r1", "r3"]
    assert "skipping sample: sample 'r2': image" in caplog.text and "gone.png" in caplog.text
    with pytest.raises(ValueError, match=r"sample 'r2': image .*gone\.png: cannot decode"):
        decodable_samples(samples, [1], on_error="raise")
    (data_dir / "img.png").unlink()
    with pytest.raises(ValueError, match="no sample image decodes"):
        decodable_samples(samples, [0], on_error="skip")


def test_short_answer_is_optional_validated_and_selectable(data_dir):
    path = data_dir / "short.jsonl"
    path.write_text("\n".join([_row(1, answer="It is a cup.", short_answer="cup"), _row(2),
                               _row(3, short_answer=""), _row(4, short_answer=7)]) + "\n")
    good, errors = check_file(path)
    assert [(e.line, e.row_error.field) for e in errors] == [(3, "short_answer"), (4, "short_answer")]
    assert [(s.reference("answer"), s.reference("short_answer")) for s in good] == [("It is a cup.", "cup"),
                                                                                    ("a", "a")]
    with pytest.raises(ValueError, match="answer field must be one of"):
        good[0].reference("fullAnswer")
    back = load_grounded(save_parquet(good, data_dir / "short.parquet"))
    assert [s.short_answer for s in back] == ["cup", None]


def test_reasoning_is_optional_validated_kept_and_written_before_the_answer(data_dir):
    from megatron_sayo.rl.prompts import reference_completion

    path = data_dir / "reasoning.jsonl"
    path.write_text("\n".join([_row(1, reasoning="red over blue"), _row(2), _row(3, reasoning=" "),
                               _row(4, reasoning=["x"])]) + "\n")
    good, errors = check_file(path)
    assert [(e.line, e.row_error.field) for e in errors] == [(3, "reasoning"), (4, "reasoning")]
    assert [reference_completion(s) for s in good] == ["red over blue <answer>a</answer>", "<answer>a</answer>"]
    back = load_grounded(save_parquet(good, data_dir / "reasoning.parquet"))
    assert [s.reasoning for s in back] == ["red over blue", None]
