"""safetensors headers: our reader accepts exactly the files the `safetensors` library accepts (same crafted
files, both verdicts compared), and places each tensor's bytes where the library reads them."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from megatron_sayo.formats.safetensors_files import read_header

F32 = np.arange(4, dtype=np.float32).tobytes()     # 16 bytes


def craft(path, header: dict, data: bytes, lead: bytes = b"") -> None:
    raw = lead + json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def t(offsets, shape=(4,), dtype="F32") -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": offsets}


CASES = {
    "valid": ({"a": t([0, 16]), "b": t([16, 32])}, F32 * 2),
    "listed_out_of_order": ({"b": t([16, 32]), "a": t([0, 16])}, F32 * 2),
    "empty_tensor": ({"e": t([0, 0], (0,)), "a": t([0, 16])}, F32),
    "metadata": ({"__metadata__": {"format": "pt"}, "a": t([0, 16])}, F32),
    "overlapping": ({"a": t([0, 16]), "b": t([8, 24])}, F32 + F32[:8]),
    "same_bytes_twice": ({"a": t([0, 16]), "b": t([0, 16])}, F32),
    "shifted": ({"a": t([4, 20])}, F32 + F32[:4]),
    "gap": ({"a": t([0, 16]), "b": t([20, 36])}, F32 * 2 + F32[:4]),
    "string_offsets": ({"a": t(["0", "16"])}, F32),
    "float_offsets": ({"a": t([0.0, 16.0])}, F32),
    "bool_offsets": ({"a": t([False, 16])}, F32),
    "negative_offset": ({"a": t([-16, 0])}, F32),
    "three_offsets": ({"a": t([0, 16, 32])}, F32),
    "past_the_end": ({"a": t([0, 32], (8,))}, F32),
    "size_not_elements_x_dtype": ({"a": t([0, 12])}, F32[:12]),
    "reversed": ({"a": t([16, 0])}, F32),
    "trailing_bytes": ({"a": t([0, 16])}, F32 + b"\0" * 8),
    "string_shape": ({"a": t([0, 16], ("4",))}, F32),
    "negative_shape": ({"a": t([0, 16], (-4,))}, F32),
    "unknown_dtype": ({"a": t([0, 16], dtype="F31")}, F32),
    "metadata_not_strings": ({"__metadata__": {"n": 1}, "a": t([0, 16])}, F32),
    "not_an_object": ([1, 2], b""),
}


def library_accepts(path) -> bool:
    try:
        with safe_open(path, "np") as f:
            for k in f.keys():
                f.get_tensor(k)
        return True
    except Exception:
        return False


def ours_accepts(path) -> bool:
    try:
        read_header(path)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("n,accepted", [(100_000_000, True), (100_000_001, False)], ids=["at-limit", "one-over"])
def test_header_size_limit_equals_the_safetensors_library(tmp_path, n, accepted):
    """A valid header padded to exactly the library's 100,000,000-byte limit is read by both; one byte more is
    refused by both, ours saying it is the limit (not the file's size) that the header exceeds."""
    raw = json.dumps({"a": t([0, 16])}).encode()
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", n) + raw + b" " * (n - len(raw)) + F32)
    assert library_accepts(path) is accepted
    assert ours_accepts(path) is accepted
    if not accepted:
        with pytest.raises(ValueError, match=f"header length {n} bytes exceeds the safetensors limit of 100,000,000"):
            read_header(path)
    path.unlink()


@pytest.mark.parametrize("case", sorted(CASES))
def test_header_verdict_equals_the_safetensors_library(tmp_path, case):
    header, data = CASES[case]
    path = tmp_path / "x.safetensors"
    craft(path, header, data)
    assert ours_accepts(path) == library_accepts(path), case


def test_header_not_starting_with_a_brace(tmp_path):
    path = tmp_path / "x.safetensors"
    craft(path, {"a": t([0, 16])}, F32, lead=b" ")
    assert ours_accepts(path) == library_accepts(path)


def test_expected_verdicts_and_messages(tmp_path):
    """The lying headers of the probe (overlap, shift, string offsets) are refused with a clear reason."""
    for case, match in (("overlapping", "sorted, contiguous and not overlap"), ("shifted", "do not start where"),
                        ("string_offsets", "are not two non-negative integers"),
                        ("trailing_bytes", "file has 24 data bytes")):
        path = tmp_path / f"{case}.safetensors"
        craft(path, *CASES[case])
        with pytest.raises(ValueError, match=match):
            read_header(path)


def test_entries_locate_the_bytes_the_library_reads(tmp_path):
    arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.arange(5, dtype=np.int64),
              "z": np.zeros((0, 3), np.float16)}
    path = tmp_path / "x.safetensors"
    save_file(arrays, path)
    raw = path.read_bytes()
    entries = read_header(path)
    with safe_open(path, "np") as f:
        for name, e in entries.items():
            ref = f.get_tensor(name)
            assert e.shape == ref.shape and e.nbytes == ref.nbytes
            assert raw[e.offset:e.offset + e.nbytes] == ref.tobytes()
