"""ReFocus (HF dataset `ReFocus/ReFocus_Data`) as published -> grounded rows (docs/data.md, docs/spec.md §2).

The parquet shards (`data/train-0000k-of-00003.parquet`, `val-*`, `test-*`) hold one question per row:
`id`, `question`, `answer` (strings), `image` as the HF image struct `{bytes, path}`, and `focus_areas_bbox` as
HF-datasets stores a sequence of boxes: a struct of lists `{"x1": [...], "y1": [...], "x2": [...], "y2": [...]}`
(all four empty when a row has no box); other columns are ignored.

Recipes:

* `sayo`: the SAYO authors' subset (Cratileo/Sayo, utils/pre_processor_data.py): the `train` split as
  `datasets.load_dataset` assembles it (the train-* shards in file-name order), then
  `train_test_split(test_size=0.25, seed=42)["test"]`, i.e. the rows `np.random.default_rng(42)
  .permutation(n)[:ceil(0.25 n)]` in that order; rows whose box list is empty are dropped; only the first box is
  the region. Their script re-encodes each image as PNG; the original bytes are kept here (same pixels).
* `fraction`: this project's earlier recipe: `round(fraction * n)` of the rows with a box, drawn by id with
  random.Random(seed), first box.
"""

from __future__ import annotations

import logging
import math
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

BOX_KEYS = ("x1", "y1", "x2", "y2")
COLUMNS = ["id", "question", "answer", "image", "focus_areas_bbox"]
SAYO_TEST_SIZE, SAYO_SEED = 0.25, 42
RECIPES = ("sayo", "fraction")


class RefocusError(ValueError):
    """Input shards that are not the ReFocus layout; the message names the file and the column."""


def focus_boxes(value: Any) -> list[list[float]]:
    """Every box of a `focus_areas_bbox` value, [x1, y1, x2, y2] each (struct of lists; a list of boxes too)."""
    if not value:
        return []
    if isinstance(value, dict):
        columns = [value.get(k) or [] for k in BOX_KEYS]
        if len({len(c) for c in columns}) != 1:
            raise ValueError(f"x1/y1/x2/y2 lists of different lengths {[len(c) for c in columns]}")
        return [[float(c[i]) for c in columns] for i in range(len(columns[0]))]
    return [[float(b[k]) for k in BOX_KEYS] if isinstance(b, dict) else [float(v) for v in b] for b in value]


def sayo_subset(n_rows: int, test_size: float = SAYO_TEST_SIZE, seed: int = SAYO_SEED) -> list[int]:
    """Row indices of `datasets`' train_test_split(test_size, seed)["test"] of n_rows rows, in its order."""
    return np.random.default_rng(seed).permutation(n_rows)[:math.ceil(test_size * n_rows)].tolist()


def train_shards(files: list[Path]) -> list[Path]:
    """The train-* shards in the order `datasets.load_dataset(..., split="train")` concatenates them."""
    wrong = [str(f) for f in files if not Path(f).name.startswith("train-")]
    if wrong:
        raise RefocusError(f"--recipe sayo reads the train split: pass only the train-*.parquet shards, not {wrong}")
    return sorted(files, key=lambda f: Path(f).name)


def _check_columns(path: Path) -> None:
    import pyarrow.parquet as pq

    names = set(pq.ParquetFile(path).schema_arrow.names)
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise RefocusError(f"{path}: missing column(s) {missing}; expected the ReFocus_Data columns {COLUMNS}")


def iter_rows(files: list[Path], columns: list[str] = COLUMNS) -> Iterator[tuple[int, dict]]:
    """(index over all shards, row) in shard order, one record batch in memory at a time."""
    import pyarrow.parquet as pq

    index = 0
    for path in files:
        _check_columns(path)
        for batch in pq.ParquetFile(path).iter_batches(batch_size=64, columns=columns):
            for row in batch.to_pylist():
                yield index, row
                index += 1


def image_bytes(value: Any) -> bytes | None:
    """Encoded image bytes from an HF image struct {bytes, path} or plain bytes."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return bytes(value) if isinstance(value, (bytes, bytearray)) and value else None


def image_suffix(data: bytes) -> str:
    """'.png' or '.jpg' from the file signature (anything else keeps '.img' and fails validation)."""
    if data.startswith(b"\x89PNG"):
        return ".png"
    return ".jpg" if data.startswith(b"\xff\xd8") else ".img"


def safe_name(sample_id: str) -> str:
    """A file name made from an id (characters outside [A-Za-z0-9._-] become '_')."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", sample_id)


def to_row(row: dict, out_dir: Path, box: list[float]) -> dict:
    """Our grounded row for a ReFocus row; its image bytes written to out_dir/images/."""
    sid = str(row["id"])
    data = image_bytes(row["image"]) or b""
    rel = f"images/{safe_name(sid)}{image_suffix(data)}"
    (out_dir / rel).write_bytes(data)
    answer = row["answer"]
    return {"id": sid, "image": rel, "question": row["question"], "answer": None if answer is None else str(answer),
            "boxes": [box]}


def _first_box(row: dict, where: str) -> list[float] | None:
    try:
        boxes = focus_boxes(row["focus_areas_bbox"])
    except (TypeError, ValueError, KeyError) as exc:
        log.warning("%s (id %r): field 'focus_areas_bbox': %s; row dropped", where, row.get("id"), exc)
        return None
    return boxes[0] if boxes else None


def sayo_rows(files: list[Path], out_dir: Path) -> tuple[list[dict], int]:
    """The authors' subset as rows in their order, and how many subset rows had no box (dropped)."""
    import pyarrow.parquet as pq

    shards = train_shards(files)
    n = sum(pq.ParquetFile(f).metadata.num_rows for f in shards)
    order = {index: k for k, index in enumerate(sayo_subset(n))}
    picked: dict[int, dict] = {}
    no_box = 0
    for index, row in iter_rows(shards):
        if index not in order:
            continue
        box = _first_box(row, f"train row {index}")
        if box is None:
            no_box += 1
            continue
        picked[order[index]] = to_row(row, out_dir, box)
    return [picked[k] for k in sorted(picked)], no_box


def fraction_rows(files: list[Path], out_dir: Path, fraction: float = 0.25, seed: int = 0) -> tuple[list[dict], int]:
    """This project's earlier recipe: a seeded `fraction` of the boxed rows (by id), first box."""
    if not 0 < fraction <= 1:
        raise RefocusError(f"--fraction must be in (0, 1], got {fraction}")
    files = sorted(files, key=lambda f: Path(f).name)
    boxed, no_box = set(), 0
    for index, row in iter_rows(files, ["id", "focus_areas_bbox"]):
        if _first_box(row, f"row {index}") is None:
            no_box += 1
        else:
            boxed.add(str(row["id"]))
    ordered = sorted(boxed)
    chosen = set(random.Random(seed).sample(ordered, round(fraction * len(ordered))))
    rows, done = [], set()
    for index, row in iter_rows(files):
        sid = str(row["id"])
        if sid in chosen and sid not in done:
            done.add(sid)
            rows.append(to_row(row, out_dir, _first_box(row, f"row {index}")))
    return rows, no_box


def prepare(files: list[Path], out: Path, recipe: str = "sayo", fraction: float = 0.25, seed: int = 0) -> dict:
    """Write the recipe's rows to out/data.jsonl and out/images/ (a new folder, published atomically)."""
    from megatron_sayo.data.output_dir import new_dataset_dir, write_rows

    if recipe not in RECIPES:
        raise RefocusError(f"--recipe must be one of {RECIPES}, got {recipe!r}")
    with new_dataset_dir(out) as tmp:
        (tmp / "images").mkdir()
        rows, no_box = sayo_rows(files, tmp) if recipe == "sayo" else fraction_rows(files, tmp, fraction, seed)
        written, dropped = write_rows(rows, tmp, out)
    return {"written": written, "dropped": dropped, "no_box": no_box}
