"""safetensors files read and written by header alone (no torch): where each tensor's bytes lie, and the header
that places tensors in a new file. The bytes themselves are moved by tensor_copy.py.

A file is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}} padded
with spaces, then the data; offsets are relative to the end of the header.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from megatron_sayo.formats.dtypes import DTYPES

BY_CODE = {d.safetensors: name for name, d in DTYPES.items()}
MAX_HEADER = 100_000_000        # the safetensors library's limit (MAX_HEADER_SIZE), in bytes
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: dtype name, shape and the absolute byte offset of its data."""

    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_header(path: str | Path) -> dict[str, Entry]:
    """{name: Entry} of a safetensors file; ValueError (naming what is wrong) for a corrupt or truncated one."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            raise ValueError(f"header length {n} bytes exceeds the safetensors limit of {MAX_HEADER:,} bytes")
        if n > size - 8:
            raise ValueError(f"header length {n} exceeds the file ({size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"header is not JSON ({exc})") from None
    return check_header(header, size - 8 - n, 8 + n)


def _is_count(x) -> bool:
    """A JSON non-negative integer (not a bool, float or string)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def check_header(header, data_size: int, data_start: int = 0) -> dict[str, Entry]:
    """The tensors of a parsed header, checked as the safetensors library checks them: known dtype, integer
    shape and offsets, tensors sorted by offset tile the data exactly (from 0, contiguous, no overlap, to its
    end), and each one's size is elements x dtype size. `data_start` is added to make offsets absolute."""
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError("__metadata__ is not a JSON object of strings")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or info.get("dtype") not in BY_CODE:
            raise ValueError(f"tensor '{name}': bad header entry {info!r:.200} (dtypes {sorted(BY_CODE)})")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
            raise ValueError(f"tensor '{name}': shape {shape!r:.100} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise ValueError(f"tensor '{name}': data_offsets {offsets!r:.100} are not two non-negative integers")
        spans.append((offsets[0], offsets[1], name, BY_CODE[info["dtype"]], tuple(shape)))
    entries, pos = {}, 0
    for start, stop, name, dtype, shape in sorted(spans):
        if start != pos or stop < start:
            raise ValueError(f"tensor '{name}': data_offsets {[start, stop]} do not start where the previous "
                             f"tensor ends (byte {pos}): offsets must be sorted, contiguous and not overlap")
        if stop - start != math.prod(shape) * DTYPES[dtype].itemsize:
            raise ValueError(f"tensor '{name}': data_offsets {[start, stop]} do not hold {list(shape)} {dtype}")
        if stop > data_size:
            raise ValueError(f"tensor '{name}' ends at byte {stop} of {data_size} data bytes (truncated file)")
        entries[name] = Entry(dtype, shape, data_start + start, stop - start)
        pos = stop
    if pos != data_size:
        raise ValueError(f"tensors hold {pos} bytes but the file has {data_size} data bytes after the header")
    return entries


def header_bytes(tensors: list[tuple[str, str, tuple[int, ...]]]) -> tuple[bytes, list[int]]:
    """(the 8-byte length + JSON header of a file holding (name, dtype, shape) tensors in order, each tensor's
    data offset in the file)."""
    header, offset, starts = {"__metadata__": {"format": "pt"}}, 0, []
    for name, dtype, shape in tensors:
        n = math.prod(shape) * DTYPES[dtype].itemsize
        header[name] = {"dtype": DTYPES[dtype].safetensors, "shape": list(shape), "data_offsets": [offset, offset + n]}
        starts.append(offset)
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, [8 + len(raw) + s for s in starts]


def weight_files(hf_dir: str | Path) -> dict[str, str]:
    """{tensor name as stored: file} of an HF checkpoint dir (sharded with an index, or one model.safetensors).
    FileNotFoundError when there are no weights, ValueError for an unreadable index or file."""
    hf_dir = Path(hf_dir)
    index = hf_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{index}: not a safetensors index with a weight_map ({exc!r})") from None
        return dict(weight_map)
    if (hf_dir / SINGLE_FILE).is_file():
        try:
            return {k: SINGLE_FILE for k in read_header(hf_dir / SINGLE_FILE)}
        except ValueError as exc:
            raise ValueError(f"{hf_dir / SINGLE_FILE}: corrupt safetensors file ({exc})") from None
    raise FileNotFoundError(f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE}")
