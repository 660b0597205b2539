"""Every pickle in a checkpoint directory checked against an allow-list before torch or megatron unpickles it.

torch's DCP reader unpickles `.metadata` and every stored object with plain pickle, so a crafted checkpoint
could run code. Here each pickle is walked by an unpickler that imports nothing and calls nothing: every
global it names is checked against ALLOWED (the classes and functions our checkpoints are made of) and
replaced by an inert stand-in (dcp_metadata's, which records and runs nothing). Torch-free (standard library
only).
"""

from __future__ import annotations

import _compat_pickle
import io
import os
import zipfile
from pathlib import Path

from megatron_sayo.formats.dcp_metadata import StandInUnpickler, is_stand_in_class, load_dcp_metadata
from megatron_sayo.formats.dtypes import DTYPES
from megatron_sayo.formats.torch_save_reader import data_pickle, open_record, read_member

_MD = "torch.distributed.checkpoint.metadata"
_PLANNER = "torch.distributed.checkpoint.planner"
_NUMPY = ("numpy.core.multiarray", "numpy._core.multiarray")

# (module, name) of every global a checkpoint we write may name: DCP metadata classes, torch tensors and
# storages, the save plans megatron-core keeps in `.metadata`, optimizer/scheduler/RNG state (numpy and
# python), containers. Collected from the training and model checkpoints megatron-core 0.16 writes here.
ALLOWED: frozenset[tuple[str, str]] = frozenset({
    *((_MD, n) for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                         "MetadataIndex", "TensorProperties", "_MEM_FORMAT_ENCODING", "StorageMeta")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *((_PLANNER, n) for n in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData",
                              "LoadPlan", "ReadItem", "LoadItemType")),
    ("torch", "Size"), ("torch", "device"), ("torch.serialization", "_get_layout"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"), ("torch", "UntypedStorage"), ("torch.storage", "UntypedStorage"),
    *(("torch", d) for d in DTYPES),
    *(("torch", d.storage) for d in DTYPES.values() if d.storage != "UntypedStorage"),
    ("collections", "OrderedDict"), ("collections", "defaultdict"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "complex"),
    *((m, "_reconstruct") for m in _NUMPY), *((m, "scalar") for m in _NUMPY),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.dtypes", "UInt32DType"), ("numpy.dtypes", "Float64DType"),
    ("numpy.dtypes", "Int64DType"), ("codecs", "encode"), ("_codecs", "encode"),
})


# Enum classes a checkpoint's pickles hold, with their member names. Early Python 3.11 releases (3.11.2, Debian
# 12's python3, among them) pickle an enum member as getattr(EnumClass, "NAME"); later ones as EnumClass(value).
# So builtins.getattr is accepted only as (one of these classes, one of its members); any other use is refused.
ENUM_MEMBERS: dict[tuple[str, str], frozenset[str]] = {
    (_MD, "_MEM_FORMAT_ENCODING"): frozenset({"TORCH_CONTIGUOUS_FORMAT", "TORCH_CHANNELS_LAST",
                                              "TORCH_PRESERVE_FORMAT"}),
    (_PLANNER, "WriteItemType"): frozenset({"TENSOR", "SHARD", "BYTE_IO"}),
    (_PLANNER, "LoadItemType"): frozenset({"TENSOR", "BYTE_IO"}),
}


class UnsafePickle(ValueError):
    """A pickle names a global outside the allow-list. (A file that is not a pickle or record at all raises a
    plain ValueError: corrupt, not unsafe; either way nothing in it is loaded.)"""


class _CheckingUnpickler(StandInUnpickler):
    """Imports and calls nothing: each allowed global becomes an inert stand-in, any other one is refused."""

    def __init__(self, file, where: str):
        super().__init__(file)
        self.where = where

    def refuse(self, what: str):
        raise UnsafePickle(f"{self.where}: pickle names {what}, which a checkpoint does not need; refusing to "
                           f"load it (a crafted pickle could run code)")

    def find_class(self, module: str, name: str):
        # Protocol 0-2 pickles name Python 2's modules (__builtin__.set); pickle maps them, so must we.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) == ("builtins", "getattr"):
            return self.enum_member
        if (module, name) not in ALLOWED:
            self.refuse(f"the global {module}.{name}")
        return super().find_class(module, name)

    def enum_member(self, *args):
        """getattr as early Python 3.11 releases pickle an enum member: (an allowed enum class, one of its names)."""
        cls, member = (args + (None, None))[:2]
        key = (cls._module, cls._name) if is_stand_in_class(cls) else None
        allowed = ENUM_MEMBERS.get(key, frozenset())
        if len(args) != 2 or not (isinstance(member, str) and member in allowed):
            shown = ".".join(key) if key else type(cls).__name__
            self.refuse(f"the global builtins.getattr on ({shown}, {member!r:.60}), not an enum member")
        return cls(member)

    def persistent_load(self, pid):
        return None              # torch.save's storage references


def check_pickle(data: bytes, where: str) -> None:
    """Walk one pickle; UnsafePickle naming `where` and the global when it names one outside ALLOWED."""
    try:
        _CheckingUnpickler(io.BytesIO(data), where).load()
    except UnsafePickle:
        raise
    except (RecursionError, MemoryError) as exc:
        raise ValueError(f"{where}: pickle too deep or too big to check ({type(exc).__name__})") from None
    except Exception as exc:
        raise ValueError(f"{where}: not a pickle we can check ({type(exc).__name__}: {exc})") from None


def check_torch_save(fd: int, where: str, offset: int = 0, length: int | None = None) -> None:
    """Check the data.pkl of the torch.save record at [offset, offset+length) of open file descriptor `fd`."""
    if length is None:
        length = os.fstat(fd).st_size - offset
    try:
        z, view = open_record(fd, offset, length)
        with z:
            data = read_member(z, view, data_pickle(z), limit=256 << 20)
    except (ValueError, zipfile.BadZipFile, KeyError) as exc:
        raise ValueError(f"{where}: not a torch.save record ({exc})") from None
    check_pickle(data, where)


def check_checkpoint_pickles(ckpt_dir: str | Path) -> int:
    """Check every pickle of a torch_dist checkpoint dir: `.metadata`, each object it stores in the `.distcp`
    files (optimizer, RNG and extra state, megatron's sharded objects) and every `*.pt` file (common.pt).
    Returns how many were checked; raises UnsafePickle naming the file and the global, ValueError naming the
    file for one that cannot be read as a pickle at all."""
    ckpt_dir = Path(ckpt_dir)
    checked = 0
    meta_path = ckpt_dir / ".metadata"
    if meta_path.is_file():
        data = meta_path.read_bytes()
        check_pickle(data, str(meta_path))
        checked += 1
        try:
            md = load_dcp_metadata(data)
        except ValueError as exc:
            raise ValueError(f"{meta_path}: not torch.distributed.checkpoint metadata ({exc})") from None
        by_file: dict[str, list[tuple[str, int, int]]] = {}
        for key, (file, offset, length) in md.objects.items():
            by_file.setdefault(file, []).append((key, offset, length))
        for file, objects in sorted(by_file.items()):
            path = ckpt_dir / file
            if Path(file).is_absolute() or ".." in Path(file).parts:
                raise ValueError(f"{meta_path}: object file {file!r} lies outside the checkpoint")
            if not path.is_file():
                continue         # a missing file is the loader's error to report, not a safety one
            fd = os.open(path, os.O_RDONLY)
            try:
                for key, offset, length in objects:
                    check_torch_save(fd, f"{path} (object '{key}' at byte {offset})", offset, length)
                    checked += 1
            finally:
                os.close(fd)
    for path in sorted(ckpt_dir.rglob("*.pt")):
        fd = os.open(path, os.O_RDONLY)
        try:
            check_torch_save(fd, str(path))
        finally:
            os.close(fd)
        checked += 1
    return checked
