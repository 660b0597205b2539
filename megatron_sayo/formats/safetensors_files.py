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

from megatron_sayo.formats.torch_format import DTYPES

BY_CODE = {d.safetensors: name for name, d in DTYPES.items()}
MAX_HEADER = 100 << 20          # safetensors' own limit
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
        if n > min(MAX_HEADER, size - 8):
            raise ValueError(f"header length {n} exceeds the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    header.pop("__metadata__", None)
    data_size, entries = size - 8 - n, {}
    for name, info in header.items():
        try:
            dtype, shape, (start, stop) = BY_CODE[info["dtype"]], tuple(int(d) for d in info["shape"]), \
                info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor '{name}': bad header entry {info} (dtypes {sorted(BY_CODE)})") from None
        if stop - start != math.prod(shape) * DTYPES[dtype].itemsize or start < 0:
            raise ValueError(f"tensor '{name}': data_offsets {[start, stop]} do not hold {list(shape)} {dtype}")
        if stop > data_size:
            raise ValueError(f"tensor '{name}' ends at byte {stop} of {data_size} data bytes (truncated file)")
        entries[name] = Entry(dtype, shape, 8 + n + start, stop - start)
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
