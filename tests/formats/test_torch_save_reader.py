"""megatron_sayo.formats.torch_save_reader on torch.save's own records and ours: where a tensor's bytes lie, and
every malformed, compressed or non-tensor record refused."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
from torch_reference import SHAPES, check_record, raw, sample, torch_save

from megatron_sayo.formats.torch_save_reader import read_tensor_record
from megatron_sayo.formats.torch_save_writer import object_record, tensor_record

pytestmark = pytest.mark.compat     # in every cell of `make compat` (docs/compat.md)


@pytest.mark.parametrize("crc", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float8_e4m3fn"])
@pytest.mark.parametrize("shape", SHAPES + [(3000, 7)], ids=str)
def test_read_torch_save(tmp_path, crc, dtype, shape):
    t = sample(dtype, shape)
    p = tmp_path / "t.pt"
    p.write_bytes(torch_save(t, crc=crc))
    check_record(p, 0, p.stat().st_size, t)


def test_read_saved_to_path(tmp_path):
    """torch.save(t, "foo.pt") names its records foo/..."""
    t = sample("float16", (6, 5))
    torch.save(t, tmp_path / "foo.pt")
    check_record(tmp_path / "foo.pt", 0, (tmp_path / "foo.pt").stat().st_size, t)


def test_read_our_records_inside_a_bigger_file(tmp_path):
    tensors = [sample("bfloat16", (7, 3), 1), sample("float32", (), 2), sample("float16", (0, 4), 3),
               sample("float32", (129,), 4)]
    p, spans = tmp_path / "many.bin", []
    with open(p, "wb") as f:
        f.write(b"junk" * 17)
        for t in tensors:
            head, tail = tensor_record(str(t.dtype).removeprefix("torch."), tuple(t.shape))
            start = f.tell()
            f.write(head + raw(t) + tail)
            spans.append((start, f.tell() - start))
            f.write(torch_save(t)[:50])      # a stray partial record between them
    for t, (start, length) in zip(tensors, spans):
        check_record(p, start, length, t)


def test_read_view_into_bigger_storage(tmp_path):
    big = sample("float32", (10, 4))
    view = big[3:7]
    assert view.storage_offset() == 12
    p = tmp_path / "view.pt"
    p.write_bytes(torch_save(view))
    assert p.stat().st_size > len(torch_save(view.clone()))     # the whole storage is in the record
    check_record(p, 0, p.stat().st_size, view)
    p.write_bytes(torch_save(big.view(-1)[5:6].view(())))
    check_record(p, 0, p.stat().st_size, big.view(-1)[5])


def read_bytes(tmp_path: Path, b: bytes, offset: int = 0, length: int | None = None):
    p = tmp_path / "x.bin"
    p.write_bytes(b)
    fd = os.open(p, os.O_RDONLY)
    try:
        return read_tensor_record(fd, offset, len(b) - offset if length is None else length)
    finally:
        os.close(fd)


def test_read_rejects(tmp_path):
    good = torch_save(sample("float32", (4, 3)))
    with pytest.raises(ValueError, match="non-contiguous"):
        read_bytes(tmp_path, torch_save(sample("float32", (4, 3)).t()))
    with pytest.raises(ValueError, match="no readable zip directory"):
        read_bytes(tmp_path, good[:-7])
    with pytest.raises(ValueError):
        read_bytes(tmp_path, good[: len(good) // 2])
    with pytest.raises(ValueError):
        read_bytes(tmp_path, good, length=len(good) + 10)              # past the end of the file
    with pytest.raises(ValueError):
        read_bytes(tmp_path, os.urandom(3000))
    with pytest.raises(ValueError):
        read_bytes(tmp_path, b"")
    cd = good.rindex(b"PK\x01\x02")
    with pytest.raises(ValueError):
        read_bytes(tmp_path, good[:cd] + b"XX" + good[cd + 2:])        # broken central directory
    with pytest.raises(ValueError, match="not a tensor"):
        read_bytes(tmp_path, object_record({"a": 1}))
    with pytest.raises(ValueError, match="_rebuild_parameter"):
        read_bytes(tmp_path, torch_save(torch.nn.Parameter(torch.ones(2))))
    with pytest.raises(ValueError, match="collections.Counter"):
        read_bytes(tmp_path, object_record(__import__("collections").Counter("ab")))
    crc_saved = torch_save(sample("float32", (4, 3)), crc=True)
    pkl = crc_saved.index(b"data.pkl") + 60                    # a byte inside data.pkl's pickle
    with pytest.raises(ValueError, match="CRC-32"):
        read_bytes(tmp_path, crc_saved[:pkl] + bytes([crc_saved[pkl] ^ 1]) + crc_saved[pkl + 1:])


def test_compressed_record_is_refused_clearly(tmp_path):
    """A record re-zipped with deflate (as a compressing tool would) is refused naming the compression, not
    with a misleading zip error later."""
    import zipfile
    good = torch_save(sample("float32", (64, 8)), crc=True)
    src = zipfile.ZipFile(io.BytesIO(good))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as out:
        for name in src.namelist():
            out.writestr(name, src.read(name))
    with pytest.raises(ValueError, match="compressed"):
        read_bytes(tmp_path, buf.getvalue())

