"""torch.distributed.checkpoint `.metadata` without torch: written with torch's DCP classes named (every `make compat`
cell loads it with its torch), parsed by an unpickler that turns every global into an inert stand-in."""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass

from megatron_sayo.formats import dtypes
from megatron_sayo.formats.pickle_writer import Global, NewObj, Pickler, Reduce
from megatron_sayo.formats.unpickling import load_restricted


@dataclass(frozen=True)
class StoredChunk:
    """One chunk of a DCP tensor and the byte range of its torch.save record."""

    offsets: tuple[int, ...]   # chunk offset in the global tensor
    sizes: tuple[int, ...]
    file: str                  # relative path, e.g. "__0_0.distcp"
    offset: int                # byte range of its torch.save record in that file
    length: int


@dataclass
class DcpTensor:
    """A global tensor of a DCP checkpoint."""

    dtype: str
    shape: tuple[int, ...]
    chunks: list[StoredChunk]


@dataclass
class DcpMetadata:
    """What a `.metadata` file says: tensors with their chunks, and objects stored as torch.save records."""

    tensors: dict[str, DcpTensor]
    objects: dict[str, tuple[str, int, int]]     # BytesStorageMetadata entries: key -> (file, offset, length)


_MD = "torch.distributed.checkpoint.metadata"
_FS = "torch.distributed.checkpoint.filesystem"
_SIZE = Global("torch", "Size")


def _torch_size(shape: tuple[int, ...]) -> Reduce:
    return Reduce(_SIZE, (tuple(shape),))


def _tensor_properties(dtype: str) -> NewObj:
    """TensorProperties(dtype) pickled through its __getstate__ tuple."""
    layout = Reduce(Global("torch.serialization", "_get_layout"), ("torch.strided",))
    contiguous = Reduce(Global(_MD, "_MEM_FORMAT_ENCODING"), (0,))
    return NewObj(Global(_MD, "TensorProperties"), (Global("torch", dtypes.dtype(dtype).name), layout, False,
                                                      contiguous, False))


def _storage_info(file: str, offset: int, length: int) -> NewObj:
    return NewObj(Global(_FS, "_StorageInfo"), {"relative_path": file, "offset": offset, "length": length})


def dump_dcp_metadata(md: DcpMetadata, checkpoint_id: str, save_id: str) -> bytes:
    """The pickle torch.distributed.checkpoint writes as `.metadata` (a Metadata with TensorStorageMetadata /
    BytesStorageMetadata, MetadataIndex -> _StorageInfo, version 1.0.0, StorageMeta), made without torch."""
    state: dict = {}
    storage: dict = {}
    for key, t in md.tensors.items():
        chunks = []
        for c in t.chunks:
            if len(c.offsets) != len(t.shape) or len(c.sizes) != len(t.shape):
                raise ValueError(f"{key}: chunk {list(c.sizes)} at {list(c.offsets)} does not match shape "
                                 f"{list(t.shape)}")
            chunks.append(NewObj(Global(_MD, "ChunkStorageMetadata"),
                                  {"offsets": _torch_size(c.offsets), "sizes": _torch_size(c.sizes)}))
            index = NewObj(Global(_MD, "MetadataIndex"),
                            {"fqn": key, "index": None, "offset": _torch_size(c.offsets)})
            storage[index] = _storage_info(c.file, c.offset, c.length)
        state[key] = NewObj(Global(_MD, "TensorStorageMetadata"), {
            "properties": _tensor_properties(t.dtype), "size": _torch_size(t.shape), "chunks": chunks})
    for key, (file, offset, length) in md.objects.items():
        if key in md.tensors:
            raise ValueError(f"{key} is both a tensor and an object")
        state[key] = NewObj(Global(_MD, "BytesStorageMetadata"))
        storage[NewObj(Global(_MD, "MetadataIndex"), {"fqn": key, "index": None})] = \
            _storage_info(file, offset, length)
    storage_meta = NewObj(Global(_MD, "StorageMeta"), {
        "checkpoint_id": checkpoint_id, "save_id": save_id, "load_id": None, "modules": []})
    metadata = NewObj(Global(_MD, "Metadata"), {
        "state_dict_metadata": state, "planner_data": None, "storage_data": storage,
        "storage_meta": storage_meta, "version": "1.0.0"})
    return Pickler(4).dumps(metadata)


class StandIn:
    """Instance of a class a pickle names: keeps call arguments, state and items; runs nothing."""

    _module = ""
    _name = ""

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self._args, self._kwargs, self._state, self._items = args, kwargs, None, []
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self._state = state

    def __setitem__(self, key, value):
        self._items.append((key, value))

    def append(self, value):
        self._items.append(value)

    def extend(self, values):
        self._items.extend(values)

    def __repr__(self) -> str:
        return f"<{self._module}.{self._name}>"


class StandInUnpickler(pickle.Unpickler):
    """Every global becomes a StandIn subclass named after it; nothing is imported or called."""

    def __init__(self, file):
        super().__init__(file)
        self.classes: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str):
        key = (module, name)
        if key not in self.classes:
            self.classes[key] = type(name.split(".")[-1], (StandIn,), {"_module": module, "_name": name})
        return self.classes[key]

    def persistent_load(self, pid):
        raise ValueError(f"DCP metadata has a persistent id {pid!r}")


def is_stand_in_class(obj) -> bool:
    """Whether obj is the stand-in class of a global (what StandInUnpickler.find_class returns)."""
    return isinstance(obj, type) and issubclass(obj, StandIn)


def _is(obj, module: str, name: str) -> bool:
    """Whether obj is (an instance of) the stand-in for module.name."""
    cls = obj if isinstance(obj, type) else type(obj)
    return issubclass(cls, StandIn) and cls._module == module and cls._name == name


def _fields(obj, what: str) -> dict:
    """The attribute dict a pickled dataclass was rebuilt with (BUILD state, or its (dict, slots) pair)."""
    state = obj._state if isinstance(obj, StandIn) else None
    if isinstance(state, tuple) and len(state) == 2 and all(isinstance(s, (dict, type(None))) for s in state):
        state = {**(state[0] or {}), **(state[1] or {})}
    if not isinstance(state, dict):
        raise ValueError(f"{what} is not a pickled dataclass: {obj!r}")
    return state


def _ints(obj, what: str) -> tuple[int, ...]:
    """A torch.Size (or plain tuple/list) of ints."""
    if _is(obj, "torch", "Size") and len(obj._args) == 1:
        obj = obj._args[0]
    if not isinstance(obj, (tuple, list)) or not all(isinstance(i, int) for i in obj):
        raise ValueError(f"{what} is not a torch.Size: {obj!r}")
    return tuple(obj)


def _dtype_name(props, key: str) -> str:
    """The dtype of a TensorProperties stand-in (state tuple from __getstate__, or a plain dict)."""
    state = props._state if isinstance(props, StandIn) else None
    dtype = state[0] if isinstance(state, tuple) and state else state.get("dtype") if isinstance(state, dict) \
        else None
    if not (isinstance(dtype, type) and issubclass(dtype, StandIn) and dtype._module == "torch"):
        raise ValueError(f"{key}: properties carry no torch dtype: {state!r}")
    return dtype._name


def _storage_location(info, what: str) -> tuple[str, int, int]:
    f = _fields(info, what)
    file, offset, length = f.get("relative_path"), f.get("offset"), f.get("length")
    if not (isinstance(file, str) and isinstance(offset, int) and isinstance(length, int)):
        raise ValueError(f"{what}: storage info lacks relative_path/offset/length: {f!r}")
    if f.get("transform_descriptors"):
        raise ValueError(f"{what}: stored through transforms {list(f['transform_descriptors'])} (a DCP "
                         f"extension such as compression); only plain torch_dist checkpoints are supported: "
                         f"save without transforms")
    return file, offset, length


def _storage_index(storage_data) -> dict[tuple[str, tuple[int, ...] | None], tuple[str, int, int]]:
    """storage_data as {(fqn, chunk offsets or None): (file, offset, length)}."""
    if not isinstance(storage_data, dict):
        raise ValueError(f"storage_data is a {type(storage_data).__name__}, not a dict")
    out = {}
    for index, info in storage_data.items():
        f = _fields(index, "storage_data key")
        fqn, offset = f.get("fqn"), f.get("offset")
        if not isinstance(fqn, str):
            raise ValueError(f"MetadataIndex without fqn: {f!r}")
        out[(fqn, None if offset is None else _ints(offset, f"{fqn} offset"))] = _storage_location(info, fqn)
    return out


def _dcp_tensor(key: str, meta, where: dict) -> DcpTensor:
    f = _fields(meta, key)
    shape = _ints(f.get("size"), f"{key} size")
    chunks = []
    if not isinstance(f.get("chunks"), list):
        raise ValueError(f"{key}: chunks is not a list")
    for c in f["chunks"]:
        cf = _fields(c, f"{key} chunk")
        offsets, sizes = _ints(cf.get("offsets"), f"{key} chunk offsets"), _ints(cf.get("sizes"), f"{key} sizes")
        if (key, offsets) not in where:
            raise ValueError(f"{key}: chunk at {list(offsets)} has no storage_data entry")
        chunks.append(StoredChunk(offsets, sizes, *where[(key, offsets)]))
    return DcpTensor(_dtype_name(f.get("properties"), key), shape, chunks)


def load_dcp_metadata(data: bytes) -> DcpMetadata:
    """Parse a `.metadata` pickle without importing torch (restricted unpickler: every global becomes a stand-in;
    nothing is imported or called). Raises ValueError for anything that is not DCP metadata."""
    root = load_restricted(StandInUnpickler(io.BytesIO(data)), "not a pickle")
    if not _is(root, _MD, "Metadata"):
        raise ValueError(f"pickle holds {root!r:.100}, not torch.distributed.checkpoint Metadata")
    f = _fields(root, "Metadata")
    state_dict = f.get("state_dict_metadata")
    if not isinstance(state_dict, dict):
        raise ValueError("Metadata has no state_dict_metadata dict")
    where = _storage_index(f.get("storage_data"))
    md = DcpMetadata({}, {})
    for key, meta in state_dict.items():
        if _is(meta, _MD, "BytesStorageMetadata"):
            if (key, None) not in where:
                raise ValueError(f"{key}: object has no storage_data entry")
            md.objects[key] = where[(key, None)]
        elif _is(meta, _MD, "TensorStorageMetadata"):
            md.tensors[key] = _dcp_tensor(key, meta, where)
        else:
            raise ValueError(f"{key}: unknown storage metadata {meta!r}")
    return md
