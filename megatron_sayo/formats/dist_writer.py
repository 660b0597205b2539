"""Writes a megatron torch_dist checkpoint from one process, one chunk at a time (no torch, no process group).

The files are what `dist_checkpointing.save` produces: per-rank `__<rank>_0.distcp` data files holding each
chunk as a torch.save record, a pickled torch.distributed.checkpoint `Metadata` in `.metadata` (global shapes,
chunks, byte ranges), megatron's `metadata.json` and an empty common state `common.pt`. The record framing
comes from torch_save_writer.py and dcp_metadata.py; the chunk's bytes are written straight into place by a
caller's fill function (tensor_copy.py), so memory never holds a chunk.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Callable
from pathlib import Path

from megatron_sayo.formats.dcp_metadata import DcpMetadata, DcpTensor, StoredChunk, dump_dcp_metadata
from megatron_sayo.formats.tensor_copy import StoredMatrix, Writeback, pwrite_all
from megatron_sayo.formats.torch_save_writer import object_record, tensor_record

MEGATRON_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                     "common_backend_version": 1}


class TorchDistWriter:
    """add_chunk / add_object as many times as needed, then finish(); every global tensor must be tiled."""

    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fds: dict[int, int] = {}
        self._ends: dict[int, int] = {}
        self._md = DcpMetadata(tensors={}, objects={})
        self._writeback = Writeback()
        self.bytes_written = 0

    def _file(self, rank: int) -> tuple[str, int, int]:
        name = f"__{rank}_0.distcp"
        if rank not in self._fds:
            self._fds[rank] = os.open(self.dir / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._ends[rank] = 0
        return name, self._fds[rank], self._ends[rank]

    def _appended(self, rank: int, start: int, length: int) -> None:
        self._ends[rank] = start + length
        self.bytes_written += length
        self._writeback.start(self._fds[rank], start, length)

    def add_chunk(self, key: str, global_shape: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...],
                  dtype: str, matrix: tuple[int, int], fill: Callable[[StoredMatrix], None], rank: int = 0) -> None:
        """Store the chunk of global tensor `key` at `offsets` (`sizes` elements per dim, of `dtype`);
        `fill` writes its bytes into the StoredMatrix it is given, the chunk seen as `matrix` (rows, cols)."""
        meta = self._md.tensors.setdefault(key, DcpTensor(dtype, tuple(global_shape), []))
        if meta.dtype != dtype or meta.shape != tuple(global_shape):
            raise ValueError(f"{key}: chunk of {dtype} for global {list(global_shape)} does not match earlier "
                             f"chunks ({meta.dtype}, {list(meta.shape)})")
        if len(offsets) != len(global_shape) or len(sizes) != len(global_shape) or any(
                o < 0 or o + s > g for o, s, g in zip(offsets, sizes, global_shape)):
            raise ValueError(f"{key}: chunk {list(sizes)} at {list(offsets)} exceeds {list(global_shape)}")
        name, fd, start = self._file(rank)
        head, tail = tensor_record(dtype, tuple(sizes))
        rows, cols = matrix
        if rows * cols != math.prod(sizes):
            raise ValueError(f"{key}: chunk {list(sizes)} seen as {rows} x {cols}")
        pwrite_all(fd, head, start)
        dst = StoredMatrix(fd, start + len(head), rows, cols, dtype)
        fill(dst)
        data_end = dst.offset + dst.rows * dst.row_bytes
        pwrite_all(fd, tail, data_end)
        length = data_end + len(tail) - start
        meta.chunks.append(StoredChunk(tuple(offsets), tuple(sizes), name, start, length))
        self._appended(rank, start, length)

    def add_object(self, key: str, obj, rank: int = 0) -> None:
        """Store a pickled object (megatron's ShardedObject) under `key`."""
        name, fd, start = self._file(rank)
        record = object_record(obj)
        pwrite_all(fd, record, start)
        self._md.objects[key] = (name, start, len(record))
        self._appended(rank, start, len(record))

    def check_tiled(self) -> None:
        """Every global tensor's chunks add up to its size (no gap, assuming no overlap)."""
        for key, meta in self._md.tensors.items():
            stored = sum(math.prod(c.sizes) for c in meta.chunks)
            if stored != math.prod(meta.shape):
                raise ValueError(f"{key}: chunks hold {stored} of {math.prod(meta.shape)} elements")

    def finish(self) -> None:
        """fsync and close the data files, then write .metadata, metadata.json and common.pt (fsynced)."""
        self.check_tiled()
        self._writeback.drain()
        for fd in self._fds.values():
            os.fsync(fd)
        self.close()
        _write_synced(self.dir / ".metadata", dump_dcp_metadata(self._md, str(self.dir), str(uuid.uuid4())))
        _write_synced(self.dir / "common.pt", object_record({}))
        _write_synced(self.dir / "metadata.json", json.dumps(MEGATRON_METADATA).encode())

    def close(self) -> None:
        """Close the data files (after finish, or for an aborted conversion)."""
        self._writeback.drain()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
