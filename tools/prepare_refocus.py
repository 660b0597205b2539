"""Convert downloaded ReFocus data into our grounded JSONL (docs/spec.md §2).

    python tools/prepare_refocus.py --out DIR [--fraction 0.25] [--seed 0] FILE.parquet [FILE.parquet ...]

Recipe (paper): a 25 % random subset of ReFocus, first focus box only.

Assumed input: the parquet shards of the HF dataset `ReFocus/ReFocus_Data`
(`data/train-0000k-of-00003.parquet`, also `val-*`, `test-*`), one row per
question with at least these columns:

* `id`: str, `question`: str, `answer`: str (numbers are converted with str());
* `image`: the chart/table image as an HF image struct {"bytes": PNG/JPEG, "path": str|null}
  (plain binary bytes are accepted too);
* `focus_areas_bbox`: list of {"x1", "y1", "x2", "y2"} int structs in pixels of
  `image` (plain [x1, y1, x2, y2] lists are accepted too); may be empty.

Other columns (thoughts, edited_image, source, split, x_values, ...) are ignored.

Selection: rows with at least one focus box are the candidates; they are sorted
by id and `round(fraction * n)` of them are drawn with random.Random(seed), so
the subset does not depend on shard order. Output: DIR/data.jsonl and
DIR/images/<id>.<png|jpg> (the original bytes). Every output row goes through
the shared row validator; rows that fail are dropped and reported.
"""

from __future__ import annotations

import argparse
import logging
import random
import re
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from megatron_sayo.data.grounded import write_jsonl

log = logging.getLogger("prepare_refocus")


def first_box(focus: Any) -> list[float] | None:
    """The first focus box as [x1, y1, x2, y2], from struct or list form; None if there is none."""
    if not focus:
        return None
    box = focus[0]
    if isinstance(box, dict):
        box = [box.get(k) for k in ("x1", "y1", "x2", "y2")]
    if box is None or len(box) != 4 or any(v is None for v in box):
        return None
    return [float(v) for v in box]


def image_bytes(value: Any) -> bytes | None:
    """Encoded image bytes from an HF image struct or plain bytes."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return value if isinstance(value, (bytes, bytearray)) and value else None


def image_suffix(data: bytes) -> str:
    """'.png' or '.jpg' from the file signature (anything else keeps '.img' and fails validation)."""
    if data.startswith(b"\x89PNG"):
        return ".png"
    return ".jpg" if data.startswith(b"\xff\xd8") else ".img"


def safe_name(sample_id: str) -> str:
    """A file name made from an id (characters outside [A-Za-z0-9._-] become '_')."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", sample_id)


def choose_ids(files: list[Path], fraction: float, seed: int) -> set[str]:
    """Ids of the random subset, drawn from rows that have a focus box (reads only id and box columns)."""
    candidates = set()
    for path in files:
        for row in pq.read_table(path, columns=["id", "focus_areas_bbox"]).to_pylist():
            if first_box(row["focus_areas_bbox"]) is not None:
                candidates.add(str(row["id"]))
    ordered = sorted(candidates)
    return set(random.Random(seed).sample(ordered, round(fraction * len(ordered))))


def convert(files: list[Path], out_dir: Path, fraction: float = 0.25, seed: int = 0) -> tuple[int, int]:
    """Write the subset to out_dir; return (rows written, rows dropped by validation)."""
    chosen = choose_ids(files, fraction, seed)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rows, done = [], set()
    for path in files:
        table = pq.read_table(path, columns=["id", "question", "answer", "image", "focus_areas_bbox"])
        for row in table.to_pylist():
            sid = str(row["id"])
            if sid not in chosen or sid in done:
                continue
            done.add(sid)
            data = image_bytes(row["image"])
            rel = f"images/{safe_name(sid)}{image_suffix(data or b'')}"
            (out_dir / rel).write_bytes(data or b"")
            rows.append({"id": sid, "image": rel, "question": row["question"],
                         "answer": None if row["answer"] is None else str(row["answer"]),
                         "boxes": [first_box(row["focus_areas_bbox"])]})
    errors = write_jsonl(rows, out_dir / "data.jsonl")
    for err in errors:
        log.warning("dropped: %s", err)
        (out_dir / rows[err.line - 1]["image"]).unlink(missing_ok=True)
    return len(rows) - len(errors), len(errors)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description="ReFocus parquet -> grounded JSONL (first box, random subset)")
    parser.add_argument("files", nargs="+", type=Path, help="ReFocus_Data parquet shards")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--fraction", type=float, default=0.25, help="share of boxed rows to keep (paper: 0.25)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    written, dropped = convert(args.files, args.out, args.fraction, args.seed)
    print(f"{args.out / 'data.jsonl'}: {written} row(s) written, {dropped} dropped by validation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
