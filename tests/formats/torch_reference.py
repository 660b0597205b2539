"""torch's own bytes and tensors, the reference the formats tests hold our torch.save records and DCP metadata to."""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from torch.utils.serialization import config

from megatron_sayo.formats.torch_save_reader import read_tensor_record

SHAPES = [(2, 3), (5,), (1, 4, 8), (0, 3), ()]


def torch_save(obj, crc: bool = False) -> bytes:
    with config.patch({"save.compute_crc32": crc}):
        buf = io.BytesIO()
        torch.save(obj, buf)
    return buf.getvalue()


def raw(t: torch.Tensor) -> bytes:
    """A tensor's elements as little-endian bytes."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def sample(dtype: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 4).to(getattr(torch, dtype))


def load_bytes(b: bytes):
    return torch.load(io.BytesIO(b), weights_only=True)


def check_record(path: Path, offset: int, length: int, t: torch.Tensor) -> None:
    """The record at [offset, offset+length) of `path` holds tensor `t`: its dtype, its shape, and its bytes where
    read_tensor_record says they are."""
    fd = os.open(path, os.O_RDONLY)
    try:
        r = read_tensor_record(fd, offset, length)
        assert (r.dtype, r.shape, r.nbytes) == (str(t.dtype).removeprefix("torch."), tuple(t.shape),
                                                t.numel() * t.element_size())
        assert 0 <= r.data_offset and r.data_offset + r.nbytes <= length
        assert os.pread(fd, r.nbytes, offset + r.data_offset) == raw(t)
    finally:
        os.close(fd)

