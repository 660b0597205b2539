"""Writes a megatron torch_dist checkpoint from one process, one chunk at a time (no model, no process group).

The files are what `dist_checkpointing.save` produces: per-rank `__<rank>_0.distcp` data files holding each
chunk as a torch.save record, a pickled torch.distributed.checkpoint `Metadata` in `.metadata` (global shapes,
chunks, byte ranges), megatron's `metadata.json` and an empty common state `common.pt`. Memory holds only the
chunk being written, so a converter can stream a checkpoint far larger than RAM.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import uuid
from pathlib import Path

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, StorageMeta, TensorProperties,
                                                   TensorStorageMetadata)

MEGATRON_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                     "common_backend_version": 1}
DCP_VERSION = "1.0.0"


def _save_without_crc(tensor: torch.Tensor, f) -> None:
    """torch.save without the zip CRC32: twice as fast, and torch.load (so DCP's reader) never checks it."""
    from torch.utils.serialization import config

    saved = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        torch.save(tensor, f)
    finally:
        config.save.compute_crc32 = saved


class TorchDistWriter:
    """add_chunk / add_object as many times as needed, then finish(); every global tensor must be tiled."""

    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._files: dict[int, io.BufferedWriter] = {}
        self._meta: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
        self._storage: dict[MetadataIndex, _StorageInfo] = {}
        self.bytes_written = 0

    def _append(self, rank: int, write) -> _StorageInfo:
        name = f"__{rank}_0.distcp"
        if rank not in self._files:
            self._files[rank] = open(self.dir / name, "wb")
        f = self._files[rank]
        start = f.tell()
        write(f)
        self.bytes_written += f.tell() - start
        return _StorageInfo(relative_path=name, offset=start, length=f.tell() - start)

    def add_chunk(self, key: str, global_shape: tuple[int, ...], offsets: tuple[int, ...], tensor: torch.Tensor,
                  rank: int = 0) -> None:
        """Store `tensor` as the chunk of global tensor `key` that starts at `offsets`."""
        meta = self._meta.setdefault(key, TensorStorageMetadata(
            properties=TensorProperties(dtype=tensor.dtype), size=torch.Size(global_shape), chunks=[]))
        if not isinstance(meta, TensorStorageMetadata) or meta.properties.dtype != tensor.dtype \
                or tuple(meta.size) != tuple(global_shape):
            raise ValueError(f"{key}: chunk of {tensor.dtype} for global {list(global_shape)} does not match "
                             f"earlier chunks")
        if any(o + s > g for o, s, g in zip(offsets, tensor.shape, global_shape)) or len(offsets) != len(global_shape):
            raise ValueError(f"{key}: chunk {list(tensor.shape)} at {list(offsets)} exceeds {list(global_shape)}")
        tensor = tensor.detach().contiguous()
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()     # torch.save writes the whole storage of a view
        info = self._append(rank, lambda f: _save_without_crc(tensor, f))
        meta.chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=tensor.shape))
        self._storage[MetadataIndex(fqn=key, offset=torch.Size(offsets))] = info

    def add_object(self, key: str, obj, rank: int = 0) -> None:
        """Store a pickled object (megatron's ShardedObject) under `key`."""
        buf = io.BytesIO()
        torch.save(obj, buf)
        info = self._append(rank, lambda f: f.write(buf.getbuffer()))
        self._meta[key] = BytesStorageMetadata()
        self._storage[MetadataIndex(fqn=key)] = info

    def check_tiled(self) -> None:
        """Every global tensor's chunks add up to its size (no gap, assuming no overlap)."""
        for key, meta in self._meta.items():
            if isinstance(meta, TensorStorageMetadata):
                stored = sum(torch.Size(c.sizes).numel() for c in meta.chunks)
                if stored != meta.size.numel():
                    raise ValueError(f"{key}: chunks hold {stored} of {meta.size.numel()} elements")

    def finish(self) -> None:
        """Close the data files and write .metadata, metadata.json and common.pt (fsynced)."""
        self.check_tiled()
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        metadata = Metadata(state_dict_metadata=self._meta, storage_data=self._storage, version=DCP_VERSION,
                            storage_meta=StorageMeta(checkpoint_id=str(self.dir), save_id=str(uuid.uuid4())))
        with open(self.dir / ".metadata", "wb") as f:
            pickle.dump(metadata, f)
            f.flush()
            os.fsync(f.fileno())
        torch.save({}, self.dir / "common.pt")
        (self.dir / "metadata.json").write_text(json.dumps(MEGATRON_METADATA))

    def close(self) -> None:
        """Close the data files without finishing (an aborted conversion)."""
        for f in self._files.values():
            f.close()
