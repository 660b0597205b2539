"""tensor_copy: casts equal torch's, and write_matrix equals the same assembly done with torch indexing."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from megatron_sayo.formats import tensor_copy
from megatron_sayo.formats.tensor_copy import Piece, StoredMatrix, cast, write_matrix

TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def raw(t: torch.Tensor) -> np.ndarray:
    """A 2-D tensor's bytes as rows x (cols * itemsize) uint8."""
    return t.contiguous().view(torch.uint8).numpy().reshape(t.shape[0], -1)


def special_values() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4000, generator=g) * 3, torch.randn(1000, generator=g) * 1e-40,
                   torch.randn(1000, generator=g) * 1e38,
                   torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 3.3895e38, 65504.0, 65520.0,
                                 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 6e-8, 1e-45])])
    return x.reshape(-1, 4)


@pytest.mark.parametrize("src", list(TORCH))
@pytest.mark.parametrize("dst", list(TORCH))
def test_cast_equals_torch(src, dst):
    x = special_values().to(TORCH[src])
    ours = cast(raw(x), src, dst)
    want = raw(x.to(TORCH[dst]))
    assert ours.shape == want.shape
    # torch's own NaN bits differ by path (f32->bf16 0xFFFF, f16->bf16 0x7FC0): NaN must stay NaN, the rest match
    nan = torch.isnan(x).numpy().repeat(want.shape[1] // x.shape[1], axis=1)
    assert np.array_equal(ours[~nan], want[~nan]), (src, dst)
    back = torch.from_numpy(ours.copy()).view(TORCH[dst]).reshape(x.shape)
    assert torch.equal(torch.isnan(back), torch.isnan(x))


def test_bfloat16_nan_survives_a_float32_round_trip():
    bits = np.array([[0x7FC0, 0xFFC1, 0x7F81, 0x3F80]], np.uint16)
    there = cast(bits.view(np.uint8), "bfloat16", "float32")
    assert np.array_equal(cast(there, "float32", "bfloat16").view(np.uint16), bits | np.uint16(0x40) * (bits > 0x7F80))


def _file(tmp_path, name: str, t: torch.Tensor, dtype: str, pad: int = 13) -> tuple[StoredMatrix, int]:
    """t written at a byte offset `pad` of a new file; (its StoredMatrix, fd)."""
    fd = os.open(tmp_path / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    os.pwrite(fd, b"x" * pad + t.contiguous().view(torch.uint8).numpy().tobytes(), 0)
    return StoredMatrix(fd, pad, t.shape[0], t.shape[1], dtype), fd


@pytest.mark.parametrize("band_bytes", [1 << 20, 40])
@pytest.mark.parametrize("dst_dtype", ["bfloat16", "float32"])
def test_write_matrix_assembles_rows_columns_zeros_and_casts(tmp_path, monkeypatch, band_bytes, dst_dtype):
    """A 20 x 12 destination from: whole rows of a bf16 source (in-kernel path when dtypes match), two column
    halves of a float32 source (strided + cast), and zero rows; band_bytes=40 forces many small bands."""
    monkeypatch.setattr(tensor_copy, "BAND_BYTES", band_bytes)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(9, 12, generator=g).to(torch.bfloat16)
    b = torch.randn(16, 24, generator=g)
    sa, fa = _file(tmp_path, "a", a, "bfloat16")
    sb, fb = _file(tmp_path, "b", b, "float32", pad=5)
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    dst = StoredMatrix(fd, 7, 20, 12, dst_dtype)
    pieces = [Piece(sa, 2, 0, 0, 0, 6, 12),                     # a[2:8] -> rows 0:6
              Piece(sb, 3, 18, 6, 0, 10, 6),                    # b[3:13, 18:24] -> rows 6:16, cols 0:6
              Piece(sb, 0, 0, 6, 6, 10, 6),                     # b[0:10, 0:6] -> rows 6:16, cols 6:12
              Piece(None, 0, 0, 16, 0, 4, 12)]                  # zeros -> rows 16:20
    write_matrix(dst, pieces)
    want = torch.cat([a[2:8].float(), torch.cat([b[3:13, 18:24], b[0:10, 0:6]], dim=1),
                      torch.zeros(4, 12)]).to(TORCH[dst_dtype])
    got = np.frombuffer(os.pread(fd, 20 * dst.row_bytes, 7), np.uint8).reshape(20, -1)
    assert np.array_equal(got, raw(want))
    for f in (fa, fb, fd):
        os.close(f)


def test_write_matrix_refuses_gaps_and_overlaps(tmp_path):
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    src, fs = _file(tmp_path, "s", t, "float32")
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    dst = StoredMatrix(fd, 0, 4, 6, "float32")
    with pytest.raises(ValueError, match="not tiled"):
        write_matrix(dst, [Piece(src, 0, 0, 0, 0, 4, 3)])                          # columns 3:6 missing
    with pytest.raises(ValueError, match="not tiled"):
        write_matrix(dst, [Piece(src, 0, 0, 0, 0, 4, 4), Piece(src, 0, 2, 0, 2, 4, 4)])  # overlap
    with pytest.raises(ValueError, match="cover 3 of 4 rows"):
        write_matrix(dst, [Piece(src, 0, 0, 0, 0, 3, 6)])                          # row 3 missing
    os.close(fs)
    os.close(fd)


def test_copy_bytes_reports_a_truncated_source(tmp_path):
    (tmp_path / "s").write_bytes(b"abc")
    src, dst = os.open(tmp_path / "s", os.O_RDONLY), os.open(tmp_path / "d", os.O_RDWR | os.O_CREAT)
    with pytest.raises(ValueError, match="truncated"):
        tensor_copy.copy_bytes(src, 0, dst, 0, 10)
    os.close(src)
    os.close(dst)
