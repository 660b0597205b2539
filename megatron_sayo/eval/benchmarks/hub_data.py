"""Rows of a hub dataset kept in a local directory (parquet shards, a JSON array or JSON lines), without network.

Files are found by glob patterns relative to the dataset's directory, in sorted order (the hub's shard order).
Image cells come in the hub's encodings: the `datasets` Image feature stored as a {bytes, path} struct, raw bytes,
or a file path relative to the dataset directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class DatasetError(ValueError):
    """A local benchmark dataset that is missing or not in its published schema (the message names file and field)."""


@dataclass(frozen=True)
class ImageRef:
    """Where a sample's image is: a file (`path`) or encoded bytes (`data`); `where` names it in errors."""

    where: str
    path: Path | None = None
    data: bytes | None = None


def find_files(root: Path, patterns: tuple[str, ...], what: str) -> list[Path]:
    """The files matching the first pattern that matches anything under root (sorted), or DatasetError."""
    if not root.is_dir():
        raise DatasetError(f"{root}: no such directory (expected {what})")
    for pattern in patterns:
        found = sorted(p for p in root.glob(pattern) if p.is_file())
        if found:
            return found
    raise DatasetError(f"{root}: no file matching {' or '.join(patterns)} (expected {what})")


def read_rows(path: Path) -> list[dict]:
    """All rows of one parquet, JSON (array of objects) or JSON-lines file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:   # pyarrow raises several types for a damaged file
            raise DatasetError(f"{path}: not a readable parquet file ({exc})") from None
    text = path.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON or JSON lines ({exc})") from None
    if not all(isinstance(r, dict) for r in rows):
        raise DatasetError(f"{path}: expected JSON objects, one per sample")
    return rows


def field(row: dict, name: str, source: str, kind: type | tuple = str):
    """row[name] checked to be of `kind`; DatasetError naming the source, the field and what was expected."""
    if name not in row:
        raise DatasetError(f"{source}: missing field {name!r} (fields present: {sorted(row)})")
    value = row[name]
    if not isinstance(value, kind):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DatasetError(f"{source}: field {name!r} must be {want}, got {type(value).__name__}")
    return value


def image_ref(value, base_dir: Path, source: str, name: str) -> ImageRef:
    """An image cell ({bytes, path} struct, bytes, or a path relative to base_dir) as an ImageRef."""
    where = f"{source} field {name!r}"
    if isinstance(value, dict) and value.get("bytes"):
        return ImageRef(where, data=bytes(value["bytes"]))
    if isinstance(value, (bytes, bytearray)) and value:
        return ImageRef(where, data=bytes(value))
    if isinstance(value, dict) and value.get("path"):
        value = value["path"]
    if isinstance(value, str) and value:
        path = (base_dir / value).resolve()
        if not path.is_file():
            raise DatasetError(f"{where}: image file {path} does not exist")
        return ImageRef(where, path=path)
    raise DatasetError(f"{where}: expected an image (bytes, a {{bytes, path}} struct or a file path), "
                       f"got {type(value).__name__}")
