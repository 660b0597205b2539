"""megatron_sayo.formats.dcp_metadata against torch itself: `.metadata` pickled and parsed both ways, a DCP checkpoint
written by hand and loaded by torch, and the torch-free modules running without torch."""

from __future__ import annotations

import pickle
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
from torch_reference import check_record, load_bytes, raw, sample

from megatron_sayo.formats.dcp_metadata import (
    DcpMetadata,
    DcpTensor,
    StoredChunk,
    dump_dcp_metadata,
    load_dcp_metadata,
)
from megatron_sayo.formats.torch_save_writer import object_record, tensor_record

pytestmark = pytest.mark.compat     # in every cell of `make compat` (docs/compat.md)

ROOT = Path(__file__).resolve().parents[2]


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


def test_transform_descriptors_are_refused(tmp_path):
    """A DCP checkpoint written through transforms (e.g. compression extensions) is refused by name."""
    md = torch_metadata(sample_metadata(), "/c", "s")
    index = next(iter(md.storage_data))
    md.storage_data[index] = _StorageInfo("__0_0.distcp", 0, 1000, transform_descriptors=["zstd"])
    with pytest.raises(ValueError, match=r"transforms \['zstd'\].*save without transforms"):
        load_dcp_metadata(pickle.dumps(md))


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
def test_modules_never_import_torch(tmp_path):
    script = f"""
import os, sys
from megatron_sayo.formats import dcp_metadata, torch_save_reader, torch_save_writer
head, tail = torch_save_writer.tensor_record("bfloat16", (2, 3))
p = {str(tmp_path / "r.bin")!r}
with open(p, "wb") as out:
    out.write(b"x" * 5 + head + bytes(range(12)) + tail + torch_save_writer.object_record([None]))
fd = os.open(p, os.O_RDONLY)
r = torch_save_reader.read_tensor_record(fd, 5, len(head) + 12 + len(tail))
assert (r.dtype, r.shape, os.pread(fd, r.nbytes, 5 + r.data_offset)) == ("bfloat16", (2, 3), bytes(range(12))), r
chunk = dcp_metadata.StoredChunk((0, 0), (2, 3), "__0_0.distcp", 5, 9)
md = dcp_metadata.DcpMetadata({{"w": dcp_metadata.DcpTensor("bfloat16", (2, 3), [chunk])}},
                              {{"o": ("__0_0.distcp", 14, 100)}})
assert dcp_metadata.load_dcp_metadata(dcp_metadata.dump_dcp_metadata(md, "c", "s")) == md
assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
