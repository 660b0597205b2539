"""Grounded question datasets (docs/spec.md §2): format, row validation, loading, held-out split.

Format (documented in docs/data.md):

* JSONL, one sample per line: {"id": str, "image": path relative to the JSONL
  file, "question": str, "answer": str, "boxes": [[x1, y1, x2, y2], ...]}, boxes
  in pixels of the original image; several boxes form one region (their union).
* Parquet with the same columns; `image` holds the PNG/JPEG bytes (or a
  {"bytes", "path"} struct as written by HF datasets).

One function, `validate_row`, checks a row; the loader and the validator CLI
both use it through `check_file`, so they can never disagree.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from megatron_sayo.data.image_processing import open_upright, upright_size
from megatron_sayo.data.regions import RegionError, boxes_to_cells, image_grid

log = logging.getLogger(__name__)

FIELDS = {"id": str, "image": (str, bytes), "question": str, "answer": str, "boxes": list}
# Optional: the short answer beside a full-sentence `answer` (GQA as the SAYO authors prepare it), and a worked
# reasoning the supervised warm-up writes before the answer (the synthetic tiles task); docs/data.md.
OPTIONAL_FIELDS = {"short_answer": str, "reasoning": str}
ANSWER_FIELDS = ("answer", "short_answer")
PARQUET_SUFFIXES = {".parquet", ".pq"}


@dataclass
class GroundedSample:
    """One validated sample: the image as a path or as encoded bytes, its (W, H), text and boxes."""

    id: str
    question: str
    answer: str
    boxes: list[list[float]]
    image_size: tuple[int, int]
    image_path: Path | None = None
    image_bytes: bytes | None = field(default=None, repr=False)
    short_answer: str | None = None
    reasoning: str | None = None

    def reference(self, answer_field: str = "answer") -> str:
        """The answer the accuracy reward/evaluator matches: `answer`, or `short_answer` where the row has one."""
        if answer_field not in ANSWER_FIELDS:
            raise ValueError(f"answer field must be one of {ANSWER_FIELDS}, got {answer_field!r}")
        return self.short_answer if answer_field == "short_answer" and self.short_answer else self.answer

    def open_image(self) -> Image.Image:
        """The image as an RGB PIL image, upright by its EXIF orientation (as transformers' `load_image`)."""
        src = self.image_path if self.image_path is not None else io.BytesIO(self.image_bytes)
        return open_upright(src).convert("RGB")


class RowError(ValueError):
    """One bad field of one row: which field, what was expected, what was found."""

    def __init__(self, field_name: str, expected: str, got: Any = None):
        self.field, self.expected, self.got = field_name, expected, got
        super().__init__(f"field '{field_name}': expected {expected}" + ("" if got is None else f", got {got!r:.200}"))


class DataError(ValueError):
    """A RowError located in a file: names the file, the line (JSONL) or row (parquet), the field."""

    def __init__(self, path: Path, line: int, error: RowError, sample_id: str | None = None):
        self.path, self.line, self.row_error, self.sample_id = path, line, error, sample_id
        where = "line" if path.suffix not in PARQUET_SUFFIXES else "row"
        sid = f" (id {sample_id!r})" if sample_id else ""
        super().__init__(f"{path}: {where} {line}{sid}: {error}")


# ---------------------------------------------------------------- one row


def _check_fields(row: Any) -> None:
    """Row is an object with every required field of the right type (strings non-empty where it matters)."""
    if not isinstance(row, dict):
        raise RowError("<row>", "a JSON object", type(row).__name__)
    for name, kind in FIELDS.items():
        if name not in row or row[name] is None:
            raise RowError(name, f"required field '{name}'", "missing")
        if isinstance(row[name], dict) and name == "image":
            continue
        if not isinstance(row[name], kind):
            want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise RowError(name, want, type(row[name]).__name__)
    for name in ("id", "image", "question", "answer"):
        if isinstance(row[name], str) and not row[name].strip():
            raise RowError(name, "a non-empty string", row[name])
    for name in OPTIONAL_FIELDS:
        value = row.get(name)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise RowError(name, "a non-empty string or null", value)


def _image_source(value: Any, base_dir: Path) -> Path | bytes:
    """A path (resolved against the data file's folder) or encoded bytes from the `image` field."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if not value.get("path"):
            raise RowError("image", "bytes, a path, or a {'bytes', 'path'} struct", value)
        value = value["path"]
    return value if isinstance(value, bytes) else base_dir / value


def _read_image_size(src: Path | bytes) -> tuple[int, int]:
    """(W, H) of a fully decodable image, upright (EXIF orientation applied: the boxes are drawn on what a
    viewer shows); RowError if it is missing or unreadable."""
    if isinstance(src, Path) and not src.is_file():
        raise RowError("image", "an existing image file", str(src))
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            im.load()
            return upright_size(im)
    except Exception as exc:  # PIL raises many types for corrupt data
        raise RowError("image", "a readable PNG/JPEG image", f"{type(exc).__name__}: {exc}") from None


def _check_boxes(boxes: list, image_size: tuple[int, int]) -> list[list[float]]:
    """Every box is 4 finite numbers with x1 < x2, y1 < y2, and keeps area inside the image after clamping."""
    if not boxes:
        raise RowError("boxes", "at least one box [x1, y1, x2, y2]", boxes)
    out = []
    for i, box in enumerate(boxes):
        name = f"boxes[{i}]"
        if not isinstance(box, (list, tuple)) or len(box) != 4:
            raise RowError(name, "a list of 4 numbers [x1, y1, x2, y2]", box)
        if not all(_is_finite_number(v) for v in box):
            raise RowError(name, "4 finite numbers", box)
        x1, y1, x2, y2 = box
        if not (x1 < x2 and y1 < y2):
            raise RowError(name, "x1 < x2 and y1 < y2", box)
        w, h = image_size
        if min(x2, w) <= max(x1, 0) or min(y2, h) <= max(y1, 0):
            raise RowError(name, f"a box overlapping the {w}x{h} image (non-empty after clamping)", box)
        out.append([float(v) for v in box])
    return out


def _is_finite_number(value: Any) -> bool:
    """A real number that fits a float (a 401-digit JSON integer is not: float() overflows)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_region(boxes: list[list[float]], image_size: tuple[int, int], sample_id: str) -> None:
    """The boxes give region tokens on the default Qwen2.5-VL grid (also rejects unprocessable sizes)."""
    try:
        resized, grid = image_grid(image_size)
        boxes_to_cells(boxes, image_size, resized, grid, sample_id)
    except RegionError as exc:
        raise RowError("boxes", "a non-empty region", str(exc)) from None
    except ValueError as exc:  # smart_resize: aspect ratio, size
        raise RowError("image", "a size the image processor accepts", str(exc)) from None


def validate_row(row: Any, base_dir: Path) -> GroundedSample:
    """Check one parsed row (dict) and return it as a GroundedSample; RowError on the first problem."""
    _check_fields(row)
    src = _image_source(row["image"], base_dir)
    size = _read_image_size(src)
    boxes = _check_boxes(row["boxes"], size)
    _check_region(boxes, size, row["id"])
    return GroundedSample(id=row["id"], question=row["question"], answer=row["answer"], boxes=boxes,
                          image_size=size, image_path=src if isinstance(src, Path) else None,
                          image_bytes=src if isinstance(src, bytes) else None, short_answer=row.get("short_answer"),
                          reasoning=row.get("reasoning"))


# ---------------------------------------------------------------- files


def _parse_line(raw: bytes) -> Any:
    """One JSONL line as a parsed object, or a RowError saying why it is not one (bad UTF-8, bad JSON,
    a number too long for Python's int parser, nesting too deep for the parser)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RowError("<line>", "UTF-8 text", f"byte {raw[exc.start]:#04x} at column {exc.start + 1}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        return RowError("<json>", "one valid JSON object per line", f"{exc.msg} at column {exc.colno}")
    except RecursionError:
        return RowError("<json>", "a JSON object nested less deeply", "nesting too deep to parse")
    except ValueError as exc:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        return RowError("<json>", "one valid JSON object per line", str(exc))


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object or RowError) for each non-blank line; a bad line never stops the file."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            yield lineno, _parse_line(line)


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    """(row number from 1, row dict) for each parquet row."""
    import pyarrow.parquet as pq

    yield from enumerate(pq.read_table(path).to_pylist(), start=1)


def iter_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Raw rows of a JSONL or parquet file with their line/row numbers."""
    path = Path(path)
    return _iter_parquet(path) if path.suffix in PARQUET_SUFFIXES else _iter_jsonl(path)


def check_file(path: str | Path) -> tuple[list[GroundedSample], list[DataError]]:
    """Validate every row of a file: (good samples, one DataError per bad row, in file order)."""
    path = Path(path)
    samples, errors, seen = [], [], {}
    for lineno, row in iter_rows(path):
        sid = row.get("id") if isinstance(row, dict) and isinstance(row.get("id"), str) else None
        try:
            if isinstance(row, RowError):
                raise row
            sample = validate_row(row, path.parent)
            if sample.id in seen:
                raise RowError("id", f"a unique id (already used on line {seen[sample.id]})", sample.id)
        except RowError as exc:
            errors.append(DataError(path, lineno, exc, sid))
            continue
        seen[sample.id] = lineno
        samples.append(sample)
    return samples, errors


class EmptyDataError(ValueError):
    """A data file that is missing, or holds no usable row."""


def require_data_file(path: str | Path | None, key: str = "data file") -> Path:
    """`path` as an existing, non-empty regular file; EmptyDataError naming `key` and the file otherwise."""
    if path is None:
        raise EmptyDataError(f"{key}: no file given (expected a JSONL or parquet grounded data file)")
    path = Path(path)
    if not path.is_file():
        raise EmptyDataError(f"{key}: {path}: no such file (expected a JSONL or parquet grounded data file)")
    if path.stat().st_size == 0:
        raise EmptyDataError(f"{key}: {path}: the file is empty (expected at least one grounded sample)")
    return path


def load_grounded(path: str | Path, on_error: str = "raise") -> list[GroundedSample]:
    """Load a grounded dataset; on_error='raise' stops at the first bad row, 'skip' drops and counts them.

    A missing or empty file, or one with no usable row left, is an EmptyDataError naming the file."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    samples, errors = check_file(require_data_file(path))
    if errors and on_error == "raise":
        raise errors[0]
    for err in errors:
        log.warning("skipping bad row: %s", err)
    if errors:
        log.warning("%s: skipped %d bad row(s), kept %d", path, len(errors), len(samples))
    if not samples:
        raise EmptyDataError(f"{path}: no usable sample ({len(errors)} bad row(s), nothing else)")
    return samples


def decodable_samples(samples: Sequence[GroundedSample], indices: Sequence[int],
                      on_error: str = "raise") -> list[GroundedSample]:
    """samples[i] for each index, each image checked to decode now (files can change after loading).

    on_error='raise': a DataError naming the sample and its image. 'skip': the sample is logged and
    replaced by the next decodable one in dataset order (deterministic on every rank; the batch keeps its
    size); a dataset whose images all fail raises."""
    out, bad = [], set()
    for i in indices:
        for k in range(len(samples)):
            j = (i + k) % len(samples)
            if j in bad:
                continue
            try:
                samples[j].open_image()
            except Exception as exc:  # PIL and the OS raise many types for a vanished or corrupt file
                where = samples[j].image_path or "embedded bytes"
                err = ValueError(f"sample {samples[j].id!r}: image {where}: cannot decode "
                                 f"({type(exc).__name__}: {exc})")
                if on_error != "skip":
                    raise err from None
                log.warning("skipping sample: %s", err)
                bad.add(j)
                continue
            out.append(samples[j])
            break
        else:
            raise ValueError(f"no sample image decodes any more ({len(bad)} tried)")
    return out


def save_parquet(samples: Sequence[GroundedSample], path: str | Path) -> Path:
    """Write samples as parquet with the images embedded as their encoded bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def encoded(s: GroundedSample) -> bytes:
        return s.image_bytes if s.image_bytes is not None else Path(s.image_path).read_bytes()

    table = pa.table({
        "id": [s.id for s in samples],
        "image": pa.array([encoded(s) for s in samples], type=pa.binary()),
        "question": [s.question for s in samples],
        "answer": [s.answer for s in samples],
        "boxes": pa.array([s.boxes for s in samples], type=pa.list_(pa.list_(pa.float64()))),
        "short_answer": pa.array([s.short_answer for s in samples], type=pa.string()),
        "reasoning": pa.array([s.reasoning for s in samples], type=pa.string()),
    })
    pq.write_table(table, path)
    return Path(path)


def write_jsonl(rows: Sequence[dict], path: str | Path) -> list[DataError]:
    """Write rows (image paths relative to `path`'s folder) as JSONL, keeping only rows that validate.

    Returns one DataError per dropped row; its line number is the row's index from 1 in `rows`.
    """
    path = Path(path)
    errors, seen = [], set()
    with open(path, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows, start=1):
            try:
                validate_row(row, path.parent)
                if row["id"] in seen:
                    raise RowError("id", "a unique id", row["id"])
            except RowError as exc:
                errors.append(DataError(path, i, exc, row.get("id") if isinstance(row, dict) else None))
                continue
            seen.add(row["id"])
            kept = {k: row[k] for k in FIELDS} | {k: row[k] for k in OPTIONAL_FIELDS if row.get(k) is not None}
            f.write(json.dumps(kept, ensure_ascii=False) + "\n")
    return errors


# ---------------------------------------------------------------- held-out split


def is_heldout(sample_id: str, fraction: float = 0.01, salt: str = "sayo-heldout") -> bool:
    """Deterministic membership of the held-out set: hash of (salt, id) below `fraction`."""
    digest = hashlib.sha256(f"{salt}\0{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64 < fraction


def split_heldout(samples: Sequence[GroundedSample], fraction: float = 0.01,
                  salt: str = "sayo-heldout") -> tuple[list[GroundedSample], list[GroundedSample]]:
    """(train, held-out) by hash of id: stable across runs, machines and file order."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    train, held = [], []
    for s in samples:
        (held if is_heldout(s.id, fraction, salt) else train).append(s)
    return train, held
