"""Tensors stored in files, copied file to file without torch.

A destination matrix is written from pieces of source matrices (and zero rows). Whole rows of the same dtype
move in-kernel with os.copy_file_range (no user-space copy, as `cp` does); column slices and dtype casts go
through numpy, a bounded band of rows at a time, from a read-only mapping of just those rows. Memory never
holds more than one band, whatever the tensor size.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import queue
import threading
from dataclasses import dataclass

import numpy as np

from megatron_sayo.formats.dtypes import DTYPES, FLOAT_DTYPES

CAST_DTYPES = FLOAT_DTYPES     # what cast() converts between
BAND_BYTES = 64 << 20          # the most a strided or casting copy holds in memory at once
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


@dataclass(frozen=True)
class StoredMatrix:
    """A row-major tensor at byte `offset` of open file `fd`, seen as rows x cols (trailing dims flattened)."""

    fd: int
    offset: int
    rows: int
    cols: int
    dtype: str

    @property
    def row_bytes(self) -> int:
        return self.cols * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class Piece:
    """rows x cols of `src` from (src_row, src_col) go to (dst_row, dst_col) of the destination; src None: zeros."""

    src: StoredMatrix | None
    src_row: int
    src_col: int
    dst_row: int
    dst_col: int
    rows: int
    cols: int


def as_matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, cols) of a tensor shape: dim 0 by the product of the rest (a vector is one column)."""
    return (shape[0], math.prod(shape[1:])) if shape else (1, 1)


def write_matrix(dst: StoredMatrix, pieces: list[Piece]) -> None:
    """Fill every row of `dst` from `pieces`; raises ValueError when they leave a gap or overlap."""
    for rows, band in _bands(pieces):
        start, stop = rows
        if sum(p.cols for p in band) != dst.cols or any(
                a.dst_col + a.cols != b.dst_col for a, b in zip(band, band[1:])) or band[0].dst_col != 0:
            raise ValueError(f"rows {start}:{stop} are not tiled by the pieces' columns "
                             f"{[(p.dst_col, p.cols) for p in band]} (want 0:{dst.cols})")
        if len(band) == 1 and _whole_rows(band[0], dst):
            p = band[0]
            copy_bytes(p.src.fd, p.src.offset + p.src_row * p.src.row_bytes,
                       dst.fd, dst.offset + start * dst.row_bytes, (stop - start) * dst.row_bytes)
        else:
            _gather(dst, start, stop, band)
    covered = sorted((p.dst_row, p.dst_row + p.rows) for p in pieces)
    if _row_cover(covered) != dst.rows:
        raise ValueError(f"pieces cover {_row_cover(covered)} of {dst.rows} rows")


def _whole_rows(p: Piece, dst: StoredMatrix) -> bool:
    return p.src is not None and p.src.dtype == dst.dtype and p.cols == dst.cols == p.src.cols


def _row_cover(intervals: list[tuple[int, int]]) -> int:
    total, end = 0, 0
    for a, b in intervals:
        total += max(0, b - max(a, end))
        end = max(end, b)
    return total


def _bands(pieces: list[Piece]):
    """((start, stop), pieces cut to those rows, by column) over the destination rows pieces change at."""
    cuts = sorted({p.dst_row for p in pieces} | {p.dst_row + p.rows for p in pieces})
    for start, stop in zip(cuts, cuts[1:]):
        band = [Piece(p.src, p.src_row + start - p.dst_row, p.src_col, start, p.dst_col, stop - start, p.cols)
                for p in pieces if p.dst_row <= start and stop <= p.dst_row + p.rows]
        if band:
            yield (start, stop), sorted(band, key=lambda p: p.dst_col)


def _gather(dst: StoredMatrix, start: int, stop: int, band: list[Piece]) -> None:
    """Rows start:stop of dst assembled in a numpy buffer a band at a time (column slices, casts, zeros)."""
    step = max(1, BAND_BYTES // max(1, max([dst.row_bytes] + [p.src.row_bytes for p in band if p.src])))
    esize = DTYPES[dst.dtype].itemsize
    for r in range(start, stop, step):
        n = min(step, stop - r)
        buf = _buffer(n * dst.row_bytes).reshape(n, dst.row_bytes)
        for p in band:
            out = buf[:, p.dst_col * esize:(p.dst_col + p.cols) * esize]
            if p.src is None:
                out[...] = 0
            else:
                _read_into(out, p.src, p.src_row + r - start, p.src_col, dst.dtype)
        pwrite_all(dst.fd, buf, dst.offset + r * dst.row_bytes)


_scratch = np.empty(0, np.uint8)


def _buffer(nbytes: int) -> np.ndarray:
    """A reused scratch buffer (its pages stay faulted in across calls)."""
    global _scratch
    if _scratch.size < nbytes:
        _scratch = np.empty(nbytes, np.uint8)
    return _scratch[:nbytes]


def _read_into(out: np.ndarray, src: StoredMatrix, row: int, col: int, dtype: str) -> None:
    """out (rows x cols*itemsize of `dtype`) = src's block at (row, col), through a mapping of just its rows."""
    rows, cols = out.shape[0], out.shape[1] // DTYPES[dtype].itemsize
    start = src.offset + row * src.row_bytes
    aligned = start - start % mmap.ALLOCATIONGRANULARITY
    m = mmap.mmap(src.fd, start - aligned + rows * src.row_bytes, offset=aligned, access=mmap.ACCESS_READ)
    try:
        esize = DTYPES[src.dtype].itemsize
        block = np.frombuffer(m, np.uint8, rows * src.row_bytes, start - aligned).reshape(rows, src.row_bytes)
        part = block[:, col * esize:(col + cols) * esize]
        out[...] = part if src.dtype == dtype else cast(part, src.dtype, dtype)
        del block, part
    finally:
        m.close()


def cast(raw: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Bytes (rows x cols*itemsize) of dtype src as a new array of bytes of dtype dst (torch's rounding)."""
    if src == dst:
        return np.array(raw)
    values = np.ascontiguousarray(raw).view(_UINT[DTYPES[src].itemsize])
    return _from_float32(_to_float32(values, src), dst).view(np.uint8)


def _to_float32(bits: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (bits.astype(np.uint32) << 16).view(np.float32)
    if dtype == "float16":
        return bits.view(np.float16).astype(np.float32)
    if dtype == "float32":
        return bits.view(np.float32)
    raise ValueError(f"cannot cast from {dtype} (float32, bfloat16, float16 only)")


def _from_float32(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return x
    if dtype == "float16":
        with np.errstate(over="ignore"):            # beyond the float16 range is inf, as in torch
            return x.astype(np.float16)
    if dtype == "bfloat16":
        u = x.view(np.uint32)
        out = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)   # round to nearest, ties to even
        nan = np.isnan(x)
        out[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)               # NaN stays NaN, payload kept
        return out
    raise ValueError(f"cannot cast to {dtype} (float32, bfloat16, float16 only)")


def copy_bytes(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, n: int) -> None:
    """n bytes file to file in the kernel (copy_file_range), else through a buffer."""
    while n > 0:
        try:
            done = os.copy_file_range(src_fd, dst_fd, min(n, 1 << 30), src_offset, dst_offset)
        except OSError:          # EXDEV on old kernels, ENOSYS, or a file system without it
            done = os.pwrite(dst_fd, os.pread(src_fd, min(n, BAND_BYTES), src_offset), dst_offset)
        if done == 0:
            raise ValueError(f"source ends {n} bytes early (truncated file?)")
        src_offset, dst_offset, n = src_offset + done, dst_offset + done, n - done


def pwrite_all(fd: int, data, offset: int) -> None:
    """All of `data` (bytes or a contiguous array) at `offset` of fd."""
    view = memoryview(data).cast("B")
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


class Writeback:
    """Starts the kernel's writeback of what was just written (sync_file_range, from a helper thread so the
    copy never waits on a congested disk queue), so the final fsync before publishing waits for the tail only
    instead of the whole output. A no-op where libc lacks it. Call drain() before fsyncing or closing."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue()
        try:
            self._sfr = ctypes.CDLL(None, use_errno=True).sync_file_range
            self._sfr.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
        except (OSError, AttributeError):
            self._sfr = None
            return
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            fd, offset, length = self._queue.get()
            try:
                self._sfr(fd, offset, length, 2)      # SYNC_FILE_RANGE_WRITE: start, do not wait (GIL released)
            finally:
                self._queue.task_done()

    def start(self, fd: int, offset: int, length: int) -> None:
        if self._sfr is not None:
            self._queue.put((fd, offset, length))

    def drain(self) -> None:
        """Wait until every requested range has been handed to the kernel."""
        if self._sfr is not None:
            self._queue.join()
