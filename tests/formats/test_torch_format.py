"""megatron_sayo.formats.torch_format against torch itself: torch.save bytes, torch.load of our records, DCP metadata
pickled and parsed both ways, a DCP checkpoint written by hand and loaded by torch, and no torch import."""

from __future__ import annotations

import io
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.utils.serialization import config

from megatron_sayo.formats.dtypes import DTYPES
from megatron_sayo.formats.torch_format import (
    DcpMetadata,
    DcpTensor,
    StoredChunk,
    dump_dcp_metadata,
    load_dcp_metadata,
    object_record,
    read_tensor_record,
    tensor_record,
)

pytestmark = pytest.mark.compat     # in every cell of `make compat` (docs/compat.md)

ROOT = Path(__file__).resolve().parents[2]
SHAPES = [(2, 3), (5,), (1, 4, 8), (0, 3), ()]
SERIALIZATION_ID = re.compile(rb"(serialization_idFB..Z*)(\d{40})", re.S)


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


def mask_id(b: bytes) -> bytes:
    masked, n = SERIALIZATION_ID.subn(lambda m: m.group(1) + b"0" * 40, b)
    assert n == 1
    return masked


def load_bytes(b: bytes):
    return torch.load(io.BytesIO(b), weights_only=True)


# --------------------------------------------------------------------------------------------- writing records

@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_tensor_record_is_torch_save(dtype, shape):
    t = sample(dtype, shape)
    head, tail = tensor_record(dtype, shape)
    ours = head + raw(t) + tail
    assert mask_id(ours) == mask_id(torch_save(t))
    back = load_bytes(ours)
    assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)


@pytest.mark.parametrize("dtype", sorted(set(DTYPES) - {"float32", "bfloat16", "float16"}))
def test_tensor_record_other_dtypes(dtype):
    t = sample(dtype, (3, 5), seed=1)
    head, tail = tensor_record(dtype, (3, 5))
    assert DTYPES[dtype].itemsize == t.element_size()
    assert mask_id(head + raw(t) + tail) == mask_id(torch_save(t))
    back = load_bytes(head + raw(t) + tail)
    assert back.dtype == t.dtype and torch.equal(back.view(torch.uint8), t.view(torch.uint8))


def test_serialization_id_is_zeros_and_torch_loads_it():
    """The telemetry id is not reproduced (zeros); everything else is torch's bytes, and torch loads it."""
    head, tail = tensor_record("float32", (2, 3))
    ours = head + raw(torch.ones(2, 3)) + tail
    assert SERIALIZATION_ID.search(ours).group(2) == b"0" * 40
    assert torch.equal(load_bytes(ours), torch.ones(2, 3))


def test_archive_name_of_a_path(tmp_path):
    t = sample("bfloat16", (4, 2))
    torch.save(t, tmp_path / "foo.pt")
    head, tail = tensor_record("bfloat16", (4, 2), archive="foo")
    with config.patch({"save.compute_crc32": False}):
        torch.save(t, tmp_path / "foo.pt")
    assert mask_id(head + raw(t) + tail) == mask_id((tmp_path / "foo.pt").read_bytes())


@pytest.mark.parametrize("obj", [[None], {"a": 1}, {"iteration": 7, "args": (1, "x", 2.5)}], ids=str)
def test_object_record(obj):
    ours = object_record(obj)
    assert load_bytes(ours) == obj
    assert mask_id(ours) == mask_id(torch_save(obj))


def test_bad_inputs_to_writers():
    with pytest.raises(ValueError, match="dtype 'complex64'"):
        tensor_record("complex64", (2,))
    with pytest.raises(ValueError, match="shape"):
        tensor_record("float32", (2, -1))
    with pytest.raises(ValueError, match="torch"):
        object_record([torch.Size([1])])


# --------------------------------------------------------------------------------------------- reading records

def check_record(path: Path, offset: int, length: int, t: torch.Tensor) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        r = read_tensor_record(fd, offset, length)
        assert (r.dtype, r.shape, r.nbytes) == (str(t.dtype).removeprefix("torch."), tuple(t.shape),
                                                t.numel() * t.element_size())
        assert 0 <= r.data_offset and r.data_offset + r.nbytes <= length
        assert os.pread(fd, r.nbytes, offset + r.data_offset) == raw(t)
    finally:
        os.close(fd)


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


def test_transform_descriptors_are_refused(tmp_path):
    """A DCP checkpoint written through transforms (e.g. compression extensions) is refused by name."""
    md = torch_metadata(sample_metadata(), "/c", "s")
    index = next(iter(md.storage_data))
    md.storage_data[index] = _StorageInfo("__0_0.distcp", 0, 1000, transform_descriptors=["zstd"])
    with pytest.raises(ValueError, match=r"transforms \['zstd'\].*save without transforms"):
        load_dcp_metadata(pickle.dumps(md))


# --------------------------------------------------------------------------------------------- DCP metadata

def sample_metadata() -> DcpMetadata:
    return DcpMetadata(
        tensors={
            "decoder.w": DcpTensor("bfloat16", (4, 6), [
                StoredChunk((0, 0), (2, 6), "__0_0.distcp", 0, 1000),
                StoredChunk((2, 0), (2, 6), "__1_0.distcp", 3_000_000_000, 1000)]),    # offset > 2**31
            "decoder.b": DcpTensor("float32", (6,), [StoredChunk((0,), (6,), "__0_0.distcp", 1000, 900)]),
            "scale": DcpTensor("float16", (), [StoredChunk((), (), "__0_0.distcp", 1900, 800)]),
            "ids": DcpTensor("int64", (70000, 300), [
                StoredChunk((i * 10000, 0), (10000, 300), "__0_0.distcp", 2700 + i * 99, 99) for i in range(7)]),
        },
        objects={"optimizer/state": ("__0_0.distcp", 9000, 1300), "rng": ("__1_0.distcp", 0, 700)})


def torch_metadata(md: DcpMetadata, checkpoint_id: str, save_id: str, **storage_meta) -> Metadata:
    """The same content built with torch's own classes."""
    state, storage = {}, {}
    for key, t in md.tensors.items():
        state[key] = TensorStorageMetadata(TensorProperties(dtype=getattr(torch, t.dtype)), torch.Size(t.shape),
                                           [ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes))
                                            for c in t.chunks])
        for c in t.chunks:
            storage[MetadataIndex(key, torch.Size(c.offsets))] = _StorageInfo(c.file, c.offset, c.length)
    for key, (file, offset, length) in md.objects.items():
        state[key] = BytesStorageMetadata()
        storage[MetadataIndex(key)] = _StorageInfo(file, offset, length)
    return Metadata(state_dict_metadata=state, storage_data=storage, version="1.0.0",
                    storage_meta=StorageMeta(checkpoint_id=checkpoint_id, save_id=save_id, **storage_meta))


def from_torch(m: Metadata) -> DcpMetadata:
    """Our view of a real torch Metadata, extracted with torch's classes."""
    def where(index):
        s = m.storage_data[index]
        return s.relative_path, s.offset, s.length

    md = DcpMetadata({}, {})
    for key, v in m.state_dict_metadata.items():
        if isinstance(v, BytesStorageMetadata):
            md.objects[key] = where(MetadataIndex(key))
        else:
            chunks = [StoredChunk(tuple(c.offsets), tuple(c.sizes), *where(MetadataIndex(key, c.offsets)))
                      for c in v.chunks]
            md.tensors[key] = DcpTensor(str(v.properties.dtype).removeprefix("torch."), tuple(v.size), chunks)
    return md


def test_dump_dcp_metadata_loads_as_torch_metadata():
    md = sample_metadata()
    got = pickle.loads(dump_dcp_metadata(md, "/ckpt/iter_0000010", "b2c4"))
    assert type(got) is Metadata
    assert got == torch_metadata(md, "/ckpt/iter_0000010", "b2c4")
    props = got.state_dict_metadata["decoder.w"].properties
    assert props.memory_format == torch.contiguous_format and props.layout == torch.strided
    assert type(got.state_dict_metadata["decoder.w"].size) is torch.Size
    assert got.storage_data[MetadataIndex("rng")].transform_descriptors is None


def test_dump_dcp_metadata_is_compact():
    """10k chunks: globals, field names and file names are memoized (about as small as torch's own pickle)."""
    chunks = [StoredChunk((i * 4, 0), (4, 64), f"__{i % 8}_0.distcp", i * 700, 700) for i in range(10000)]
    md = DcpMetadata({"emb": DcpTensor("bfloat16", (40000, 64), chunks)}, {})
    ours = dump_dcp_metadata(md, "c", "s")
    ref = pickle.dumps(torch_metadata(md, "c", "s"))
    assert len(ours) < 1.1 * len(ref)
    assert pickle.loads(ours) == torch_metadata(md, "c", "s")


def test_load_dcp_metadata_of_torch_pickle():
    md = sample_metadata()
    m = torch_metadata(md, "/x", "y", modules=["decoder"])
    m.planner_data = {"decoder.w": ("decoder", "w")}
    assert load_dcp_metadata(pickle.dumps(m)) == md == from_torch(m)
    assert load_dcp_metadata(pickle.dumps(m, protocol=2)) == md
    assert load_dcp_metadata(dump_dcp_metadata(md, "/x", "y")) == md


def test_load_dcp_metadata_of_dcp_save(tmp_path):
    state = {"w": sample("bfloat16", (5, 3)), "b": sample("float32", (4,)), "step": 3, "nested": {"x": [1, 2]}}
    dcp.save(state, checkpoint_id=tmp_path, no_dist=True)
    data = (tmp_path / ".metadata").read_bytes()
    md = load_dcp_metadata(data)
    assert md == from_torch(pickle.loads(data))
    assert set(md.tensors) == {"w", "b"} and md.tensors["w"].dtype == "bfloat16"
    assert set(md.objects) >= {"step"}
    for key, t in md.tensors.items():                   # the byte ranges are real torch.save records
        (c,) = t.chunks
        check_record(tmp_path / c.file, c.offset, c.length, state[key])
    file, offset, length = md.objects["step"]
    with open(tmp_path / file, "rb") as f:
        f.seek(offset)
        assert load_bytes(f.read(length)) == 3


def _mcore_save(out_dir: str) -> None:
    """One gloo rank: megatron dist_checkpointing.save (torch_dist) of two ShardedTensors and a ShardedObject."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    from megatron_sayo.distributed import runtime

    runtime.init_distributed(1, 1)
    w, b = sample("bfloat16", (4, 6), 5), sample("float32", (5,), 6)
    sd = {"w": ShardedTensor.from_rank_offsets("layer.w", w, replica_id=0),
          "b": ShardedTensor.from_rank_offsets("layer.b", b, replica_id=0),
          "o": ShardedObject("extra/obj", {"x": 1}, (1,), (0,), replica_id=0)}
    dist_checkpointing.save(sd, out_dir)


@pytest.mark.multiproc
def test_load_dcp_metadata_of_megatron_save(tmp_path):
    from megatron_sayo.distributed.runtime import spawn_local

    spawn_local(_mcore_save, 1, str(tmp_path), timeout_s=120)
    data = (tmp_path / ".metadata").read_bytes()
    md = load_dcp_metadata(data)
    assert md == from_torch(pickle.loads(data))
    assert md.tensors["layer.w"].shape == (4, 6) and md.tensors["layer.w"].dtype == "bfloat16"
    assert md.tensors["layer.b"].dtype == "float32" and "extra/obj/shard_0_1" in md.objects
    for key, t in {"layer.w": sample("bfloat16", (4, 6), 5), "layer.b": sample("float32", (5,), 6)}.items():
        (c,) = md.tensors[key].chunks
        check_record(tmp_path / c.file, c.offset, c.length, t)


def test_load_dcp_metadata_rejects(tmp_path):
    for bad in [b"", b"garbage", pickle.dumps({"a": 1}), pickle.dumps([1, 2]), b"\x80\x04N."]:
        with pytest.raises(ValueError):
            load_dcp_metadata(bad)
    m = torch_metadata(sample_metadata(), "/x", "y")
    del m.storage_data[MetadataIndex("decoder.b", torch.Size([0]))]
    with pytest.raises(ValueError, match="decoder.b"):
        load_dcp_metadata(pickle.dumps(m))
    evil = tmp_path / "pwned"
    payload = b"\x80\x02cos\nsystem\nX" + len(f"touch {evil}").to_bytes(4, "little") + f"touch {evil}".encode() \
        + b"\x85R."
    with pytest.raises(ValueError, match="not torch.distributed.checkpoint Metadata"):
        load_dcp_metadata(payload)
    assert not evil.exists()


# --------------------------------------------------------------------------------------------- DCP round trip

def test_hand_written_checkpoint_loads_with_dcp(tmp_path):
    originals = {"a": sample("bfloat16", (6, 4), 7), "b": sample("float32", (5,), 8),
                 "c": sample("float16", (3, 2, 2), 9)}
    splits = {"a": [(0, 2), (2, 6)], "b": [(0, 5)], "c": [(0, 1), (1, 2), (2, 3)]}     # rows per chunk
    md = DcpMetadata({}, {})
    with open(tmp_path / "__0_0.distcp", "wb") as f:
        for key, t in originals.items():
            dtype = str(t.dtype).removeprefix("torch.")
            chunks = []
            for lo, hi in splits[key]:
                part = t[lo:hi]
                head, tail = tensor_record(dtype, tuple(part.shape))
                start = f.tell()
                f.write(head + raw(part) + tail)
                chunks.append(StoredChunk((lo,) + (0,) * (t.dim() - 1), tuple(part.shape), "__0_0.distcp", start,
                                          f.tell() - start))
            md.tensors[key] = DcpTensor(dtype, tuple(t.shape), chunks)
        start = f.tell()
        f.write(object_record({"iteration": 10}))
        md.objects["meta"] = ("__0_0.distcp", start, f.tell() - start)
    (tmp_path / ".metadata").write_bytes(dump_dcp_metadata(md, str(tmp_path), "hand"))

    state = {k: torch.empty_like(t) for k, t in originals.items()} | {"meta": None}
    dcp.load(state, checkpoint_id=tmp_path, no_dist=True)
    for k, t in originals.items():
        assert state[k].dtype == t.dtype and torch.equal(state[k], t), k
    assert state["meta"] == {"iteration": 10}


# --------------------------------------------------------------------------------------------- no torch

@pytest.mark.multiproc
def test_module_never_imports_torch(tmp_path):
    script = f"""
import os, sys
import megatron_sayo.formats.torch_format as f
head, tail = f.tensor_record("bfloat16", (2, 3))
p = {str(tmp_path / "r.bin")!r}
with open(p, "wb") as out:
    out.write(b"x" * 5 + head + bytes(range(12)) + tail + f.object_record([None]))
fd = os.open(p, os.O_RDONLY)
r = f.read_tensor_record(fd, 5, len(head) + 12 + len(tail))
assert (r.dtype, r.shape, os.pread(fd, r.nbytes, 5 + r.data_offset)) == ("bfloat16", (2, 3), bytes(range(12))), r
md = f.DcpMetadata({{"w": f.DcpTensor("bfloat16", (2, 3), [f.StoredChunk((0, 0), (2, 3), "__0_0.distcp", 5, 9)])}},
                   {{"o": ("__0_0.distcp", 14, 100)}})
assert f.load_dcp_metadata(f.dump_dcp_metadata(md, "c", "s")) == md
assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
