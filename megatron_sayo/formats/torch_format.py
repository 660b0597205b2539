"""torch.save records and torch.distributed.checkpoint `.metadata` pickles, written and read without torch.

A checkpoint converter must start in a tenth of a second (importing torch takes 1.3 s) and copies tensor bytes
in-kernel, so it needs each record's framing (zip headers, data.pkl) apart from the tensor's raw bytes.
Records are read with the standard library's zipfile; they are written here (torch's framing, with zeros for
the telemetry-only serialization id). The `.metadata` emitter writes torch's DCP classes by name: it is proven
(tests/formats/test_torch_format.py: torch unpickles it, DCP and megatron load the result) in every cell of
`make compat` (torch 2.13 and 2.14, docs/compat.md), the range pyproject allows. Standard library only: this
module never imports torch.
"""

from __future__ import annotations

import collections
import functools
import io
import math
import os
import pickle
import pickletools
import struct
import zipfile
from dataclasses import dataclass
from typing import Any

from megatron_sayo.formats.dtypes import DTYPES, DType, dtype

_BY_STORAGE = {d.storage: d for d in DTYPES.values() if d.storage != "UntypedStorage"}
_dtype = dtype


# ----------------------------------------------------------------------------------------------------------
# Pickle opcodes, memoized the way Python's pickler does it
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Global:
    """A module-level name, pickled as GLOBAL (protocol 2) or STACK_GLOBAL (protocol 4)."""

    module: str
    name: str


@dataclass(frozen=True, eq=False)
class _Reduce:
    """func(*args) at load time (REDUCE)."""

    func: _Global
    args: tuple


@dataclass(frozen=True, eq=False)
class _NewObj:
    """cls.__new__(cls) then BUILD with state, as copyreg.__newobj__ pickles a dataclass."""

    cls: _Global
    state: Any = None


@dataclass(frozen=True, eq=False)
class _PersistentId:
    """A persistent id (BINPERSID): torch.save's reference to a storage."""

    pid: tuple


class _Pickler:
    """Writes opcodes for None/bool/int/str/tuple/list/dict and the markers above; strings and globals are
    memoized by value, every other object like Python's pickler does (so a big pickle stays compact)."""

    def __init__(self, protocol: int):
        self.protocol = protocol
        self.out = bytearray(pickle.PROTO + bytes([protocol]))
        self.memo: dict[tuple, int] = {}
        self.memo_len = 0

    def dumps(self, obj) -> bytes:
        self.save(obj)
        self.out += pickle.STOP
        return bytes(self.out)

    def put(self, key: tuple | None = None) -> None:
        """Memoize the object on top of the stack (under `key` to reuse it by value)."""
        if key is not None:
            self.memo[key] = self.memo_len
        if self.protocol >= 4:
            self.out += pickle.MEMOIZE
        elif self.memo_len < 256:
            self.out += pickle.BINPUT + bytes([self.memo_len])
        else:
            self.out += pickle.LONG_BINPUT + struct.pack("<I", self.memo_len)
        self.memo_len += 1

    def get(self, key: tuple) -> bool:
        """Push a memoized object; False when `key` is not memoized yet."""
        i = self.memo.get(key)
        if i is None:
            return False
        self.out += pickle.BINGET + bytes([i]) if i < 256 else pickle.LONG_BINGET + struct.pack("<I", i)
        return True

    def save(self, obj) -> None:
        if obj is None:
            self.out += pickle.NONE
        elif isinstance(obj, bool):
            self.out += pickle.NEWTRUE if obj else pickle.NEWFALSE
        elif isinstance(obj, int):
            self.save_int(obj)
        elif isinstance(obj, str):
            self.save_str(obj)
        elif isinstance(obj, tuple):
            self.save_tuple(obj)
        elif isinstance(obj, list):
            self.save_list(obj)
        elif isinstance(obj, dict):
            self.save_dict(obj)
        elif isinstance(obj, _Global):
            self.save_global(obj)
        elif isinstance(obj, _Reduce):
            self.save_global(obj.func)
            self.save_tuple(obj.args)
            self.out += pickle.REDUCE
            self.put()
        elif isinstance(obj, _NewObj):
            self.save_global(obj.cls)
            self.out += pickle.EMPTY_TUPLE + pickle.NEWOBJ
            self.put()
            if obj.state is not None:
                self.save(obj.state)
                self.out += pickle.BUILD
        elif isinstance(obj, _PersistentId):
            self.save_tuple(obj.pid)
            self.out += pickle.BINPERSID
        else:
            raise ValueError(f"cannot pickle {type(obj).__name__} without torch")

    def save_int(self, n: int) -> None:
        if 0 <= n < 0x100:
            self.out += pickle.BININT1 + bytes([n])
        elif 0 <= n < 0x10000:
            self.out += pickle.BININT2 + struct.pack("<H", n)
        elif -0x80000000 <= n <= 0x7FFFFFFF:
            self.out += pickle.BININT + struct.pack("<i", n)
        else:
            raw = n.to_bytes((n.bit_length() >> 3) + 1, "little", signed=True)
            self.out += pickle.LONG1 + bytes([len(raw)]) + raw

    def save_str(self, s: str) -> None:
        if self.get(("str", s)):
            return
        raw = s.encode("utf-8")
        if self.protocol >= 4 and len(raw) < 256:
            self.out += pickle.SHORT_BINUNICODE + bytes([len(raw)]) + raw
        else:
            self.out += pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw
        self.put(("str", s))

    def save_tuple(self, t: tuple) -> None:
        if not t:
            self.out += pickle.EMPTY_TUPLE
            return
        if len(t) > 3:
            self.out += pickle.MARK
        for x in t:
            self.save(x)
        self.out += (pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3)[len(t) - 1] if len(t) <= 3 else pickle.TUPLE
        self.put()

    def save_list(self, items: list) -> None:
        self.out += pickle.EMPTY_LIST
        self.put()
        if items:
            self.out += pickle.MARK
            for x in items:
                self.save(x)
            self.out += pickle.APPENDS

    def save_dict(self, d: dict) -> None:
        self.out += pickle.EMPTY_DICT
        self.put()
        if d:
            self.out += pickle.MARK
            for k, v in d.items():
                self.save(k)
                self.save(v)
            self.out += pickle.SETITEMS

    def save_global(self, g: _Global) -> None:
        key = ("global", g.module, g.name)
        if self.get(key):
            return
        if self.protocol >= 4:
            self.save_str(g.module)
            self.save_str(g.name)
            self.out += pickle.STACK_GLOBAL
        else:
            self.out += pickle.GLOBAL + f"{g.module}\n{g.name}\n".encode()
        self.put(key)


# ----------------------------------------------------------------------------------------------------------
# torch.save's zip container (what miniz writes for PyTorchStreamWriter)
# ----------------------------------------------------------------------------------------------------------

_LOCAL = b"PK\x03\x04"
_CENTRAL = b"PK\x01\x02"
_DESCRIPTOR = b"PK\x07\x08"
_ZIP64_END = b"PK\x06\x06"
_ZIP64_LOCATOR = b"PK\x06\x07"
_END = b"PK\x05\x06"
_UTF8 = 0x0800                  # general purpose flag: names are UTF-8
_DESCRIBED = 0x0008             # general purpose flag: sizes follow the data in a data descriptor
_U32 = 0xFFFFFFFF
_ALIGNMENT = 64                 # torch.utils.serialization.config.save.storage_alignment default
_LOCAL_SIZE, _CENTRAL_SIZE, _END_SIZE, _LOCATOR_SIZE, _ZIP64_END_SIZE = 30, 46, 22, 20, 56

# torch writes a 40-digit `.data/serialization_id` (a hash of the record names and CRCs, used for telemetry
# only; torch.load ignores it). We write zeros: the framing stays torch's, the id is not reproduced.
_SERIALIZATION_ID = b"0" * 40


def _zip64_extra(size: int | None, offset: int | None, local: bool = False) -> bytes:
    """Zip64 extended information field with the values that do not fit 32 bits: uncompressed and compressed
    size (miniz leaves the compressed one 0 in a local header), then the local header offset."""
    body = b""
    if size is not None:
        body += struct.pack("<QQ", size, 0 if local else size)
    if offset is not None:
        body += struct.pack("<Q", offset)
    return struct.pack("<HH", 1, len(body)) + body if body else b""


def _big(n: int) -> int | None:
    return n if n >= _U32 else None


def _flags(size: int) -> int:
    """miniz writes an empty entry's (zero) sizes in its local header, any other entry's in a data descriptor."""
    return _UTF8 | _DESCRIBED if size else _UTF8


class _ZipWriter:
    """Lays out a stored (uncompressed) zip exactly as torch.save does; data may live outside the bytes."""

    def __init__(self, archive: str):
        self.prefix = archive + "/"
        self.out = bytearray()
        self.pos = 0                # archive offset of the end of self.out plus any external data
        self.entries: list[tuple[str, int, int]] = []

    def header(self, name: str, size: int) -> None:
        """Local header of `name`, padded with an "FB" extra field so its data starts 64-byte aligned."""
        full = (self.prefix + name).encode()
        zip64 = _zip64_extra(_big(size), _big(self.pos), local=True)
        start = self.pos + _LOCAL_SIZE + len(full) + len(zip64) + 4
        pad = -start % _ALIGNMENT
        extra = zip64 + b"FB" + struct.pack("<H", pad) + b"Z" * pad
        self.entries.append((name, self.pos, size))
        self.write(_LOCAL + struct.pack("<HHHHHIIIHH", 0, _flags(size), 0, 0, 0, 0, 0, 0, len(full), len(extra))
                   + full + extra)

    def descriptor(self) -> None:
        """Data descriptor after the last entry's data (CRC32 left 0, as with compute_crc32 off); none if empty."""
        _, offset, size = self.entries[-1]
        if not size:
            return
        if _big(size) is not None or _big(offset) is not None:
            self.write(_DESCRIPTOR + struct.pack("<IQQ", 0, size, size))
        else:
            self.write(_DESCRIPTOR + struct.pack("<III", 0, size, size))

    def record(self, name: str, data: bytes) -> None:
        self.header(name, len(data))
        self.write(data)
        self.descriptor()

    def write(self, data: bytes) -> None:
        self.out += data
        self.pos += len(data)

    def finish(self) -> None:
        """serialization_id, central directory, zip64 end record and locator, end record."""
        self.record(".data/serialization_id", _SERIALIZATION_ID)
        cd_offset = self.pos
        for name, offset, size in self.entries:
            full = (self.prefix + name).encode()
            extra = _zip64_extra(_big(size), _big(offset))
            size32 = _U32 if _big(size) is not None else size
            self.write(_CENTRAL + struct.pack("<HHHHHHIIIHHHHHII", 0, 0, _flags(size), 0, 0, 0, 0, size32, size32,
                                              len(full), len(extra), 0, 0, 0, 0, min(offset, _U32))
                       + full + extra)
        cd_size, n = self.pos - cd_offset, len(self.entries)
        zip64_end = self.pos
        self.write(_ZIP64_END + struct.pack("<QHHIIQQQQ", _ZIP64_END_SIZE - 12, 0x031E, 45, 0, 0, n, n, cd_size,
                                            cd_offset))
        self.write(_ZIP64_LOCATOR + struct.pack("<IQI", 0, zip64_end, 1))
        self.write(_END + struct.pack("<HHHHIIH", 0, 0, min(n, 0xFFFF), min(n, 0xFFFF), min(cd_size, _U32),
                                      min(cd_offset, _U32), 0))


def _prologue(zw: _ZipWriter, pkl: bytes) -> None:
    """The records torch.save writes before any storage."""
    zw.record("data.pkl", pkl)
    zw.record(".format_version", b"1")
    zw.record(".storage_alignment", str(_ALIGNMENT).encode())
    zw.record("byteorder", b"little")


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for s in reversed(shape):
        strides.append(step)
        step *= max(s, 1)
    return tuple(reversed(strides))


def _tensor_pickle(dt: DType, shape: tuple[int, ...]) -> bytes:
    """data.pkl of a contiguous CPU tensor stored alone in storage "0" (as torch's Tensor.__reduce_ex__)."""
    v3 = dt.storage == "UntypedStorage"
    storage = _Global("torch.storage" if v3 else "torch", dt.storage)
    numel = math.prod(shape)
    pid = _PersistentId(("storage", storage, "0", "cpu", numel * dt.itemsize if v3 else numel))
    args = (pid, 0, shape, _contiguous_strides(shape), False, _Reduce(_Global("collections", "OrderedDict"), ()))
    if v3:
        args += (_Global("torch", dt.name),)
    rebuild = _Global("torch._utils", "_rebuild_tensor_v3" if v3 else "_rebuild_tensor_v2")
    return _Pickler(2).dumps(_Reduce(rebuild, args))


def _check_shape(shape) -> tuple[int, ...]:
    shape = tuple(shape)
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ValueError(f"shape {list(shape)} is not a tuple of non-negative ints")
    return shape


@functools.lru_cache(maxsize=4096)    # a checkpoint repeats a few shapes per layer
def tensor_record(dtype: str, shape: tuple[int, ...], *, archive: str = "archive") -> tuple[bytes, bytes]:
    """(head, tail): torch.save of a contiguous CPU tensor of this dtype and shape is exactly head + the tensor's
    raw little-endian bytes (numel * itemsize) + tail (with compute_crc32 off; `archive` is the name prefix)."""
    dt, shape = _dtype(dtype), _check_shape(shape)
    zw = _ZipWriter(archive)
    _prologue(zw, _tensor_pickle(dt, shape))
    zw.header("data/0", math.prod(shape) * dt.itemsize)
    head = bytes(zw.out)
    zw.out = bytearray()
    zw.pos += math.prod(shape) * dt.itemsize
    zw.descriptor()
    zw.record("version", b"3\n")
    zw.finish()
    return head, bytes(zw.out)


def object_record(obj, *, archive: str = "archive") -> bytes:
    """torch.save(obj) for a plain Python object with no torch types in it (e.g. [None])."""
    pkl = pickle.dumps(obj, protocol=2)
    for op, arg, _ in pickletools.genops(pkl):
        if op.name == "GLOBAL" and str(arg).split(" ")[0].split(".")[0] == "torch":
            raise ValueError(f"object holds torch type {arg}; only plain Python objects can be written")
    zw = _ZipWriter(archive)
    _prologue(zw, pkl)
    zw.record("version", b"3\n")
    zw.finish()
    return bytes(zw.out)


# ----------------------------------------------------------------------------------------------------------
# Reading a torch.save record by byte range
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorRecord:
    """Where a torch.save'd tensor's elements are, relative to the record's first byte."""

    dtype: str
    shape: tuple[int, ...]
    data_offset: int    # offset of the tensor's first element from the start of the record
    nbytes: int


class RecordFile(io.RawIOBase):
    """A read-only, seekable view of bytes [offset, offset+length) of open file descriptor `fd`, so the
    standard library's zipfile reads one torch.save record stored inside a bigger file (a `.distcp`). The
    record's first and last 4 KB (local headers and data.pkl; the central directory) are read once, so
    zipfile's many small reads cost no system call."""

    BLOCK = 4096

    def __init__(self, fd: int, offset: int, length: int):
        if offset < 0 or length < 0:
            raise ValueError(f"byte range {offset}+{length} is negative")
        self.fd, self.offset, self.length, self.pos = fd, offset, length, 0
        self.head = self._pread(0, min(length, self.BLOCK))
        self.tail_start = max(0, length - self.BLOCK)
        self.tail = self.head if self.tail_start == 0 else self._pread(self.tail_start, length - self.tail_start)

    def _pread(self, pos: int, n: int) -> bytes:
        data = os.pread(self.fd, n, self.offset + pos)
        if len(data) != n:
            raise ValueError(f"record at {self.offset} of {self.length} bytes runs past the end of the file")
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = max(0, (pos, self.pos + pos, self.length + pos)[whence])
        return self.pos

    def readinto(self, buf) -> int:
        n = max(0, min(len(buf), self.length - self.pos))
        end = self.pos + n
        if end <= len(self.head):
            data = self.head[self.pos:end]
        elif self.pos >= self.tail_start:
            data = self.tail[self.pos - self.tail_start:end - self.tail_start]
        else:
            data = os.pread(self.fd, n, self.offset + self.pos)
        buf[:len(data)] = data
        self.pos += len(data)
        return len(data)


def open_record(fd: int, offset: int, length: int) -> tuple[zipfile.ZipFile, RecordFile]:
    """The torch.save record at [offset, offset+length) of `fd` as a ZipFile (ValueError when it is not one)."""
    view = RecordFile(fd, offset, length)
    try:
        return zipfile.ZipFile(view), view
    except (zipfile.BadZipFile, OSError, EOFError, struct.error) as exc:
        raise ValueError(f"not a torch.save record: no readable zip directory ({exc})") from None


def member_start(z: zipfile.ZipFile, view: RecordFile, name: str) -> int:
    """Offset in the record of member `name`'s data: after its local header, name and extra field (torch's
    "FB" alignment padding). Refuses compressed members: torch.save stores them as they are."""
    info = z.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{name} is compressed (method {info.compress_type}); torch.save stores records "
                         f"uncompressed")
    view.seek(info.header_offset)
    hdr = view.read(_LOCAL_SIZE)
    if len(hdr) != _LOCAL_SIZE or hdr[:4] != _LOCAL:
        raise ValueError(f"no local header for {name} at {info.header_offset}")
    name_len, extra_len = struct.unpack_from("<HH", hdr, 26)
    start = info.header_offset + _LOCAL_SIZE + name_len + extra_len
    if start + info.file_size > view.length:
        raise ValueError(f"{name} ({info.file_size} bytes at {start}) runs past the {view.length}-byte record")
    return start


def read_member(z: zipfile.ZipFile, view: RecordFile, name: str, limit: int = 1 << 20) -> bytes:
    """Member `name`'s bytes (at most `limit`). Its CRC32 is checked unless it is 0: torch writes 0 with
    compute_crc32 off, as our own writer does."""
    info = z.getinfo(name)
    if info.file_size > limit:
        raise ValueError(f"{name} of {info.file_size} bytes is bigger than the {limit} a record needs")
    start = member_start(z, view, name)
    view.seek(start)
    data = view.read(info.file_size)
    if info.CRC and zipfile.crc32(data) != info.CRC:
        raise ValueError(f"{name} fails its CRC-32 check (corrupt record)")
    return data


def data_pickle(z: zipfile.ZipFile) -> str:
    """The name of the record's one `<archive>/data.pkl`."""
    names = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(names) != 1:
        raise ValueError(f"no single <archive>/data.pkl among {sorted(z.namelist())[:10]}")
    return names[0]


@dataclass(frozen=True)
class _StorageRef:
    storage: str        # storage class name
    key: str
    location: str
    numel: int          # elements (typed storages) or bytes (UntypedStorage)


@dataclass(frozen=True)
class _Rebuilt:
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str | None   # _rebuild_tensor_v3's explicit dtype


def _rebuild_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None) -> _Rebuilt:
    return _Rebuilt(storage, offset, size, stride, None)


def _rebuild_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None) -> _Rebuilt:
    if not isinstance(dtype, DType):
        raise ValueError(f"_rebuild_tensor_v3 dtype {dtype!r} is not a torch dtype")
    return _Rebuilt(storage, offset, size, stride, dtype.name)


@dataclass(frozen=True)
class _StorageClass:
    name: str


class _TensorUnpickler(pickle.Unpickler):
    """Unpickles a torch.save data.pkl holding one tensor into a _Rebuilt; nothing is imported or run."""

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_v2
        if module == "torch._utils" and name == "_rebuild_tensor_v3":
            return _rebuild_v3
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if (module, name) in (("torch", "UntypedStorage"), ("torch.storage", "UntypedStorage")) \
                or (module == "torch" and name in _BY_STORAGE):
            return _StorageClass(name)
        if module == "torch" and name in DTYPES:
            return DTYPES[name]
        raise ValueError(f"data.pkl uses {module}.{name}, which a plain tensor record does not")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageClass) and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise ValueError(f"data.pkl has an unexpected persistent id {pid!r}")
        return _StorageRef(pid[1].name, pid[2], str(pid[3]), pid[4])


def _unpickle_tensor(pkl: bytes) -> _Rebuilt:
    try:
        t = _TensorUnpickler(io.BytesIO(pkl)).load()
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"data.pkl does not unpickle: {type(e).__name__}: {e}") from None
    if not isinstance(t, _Rebuilt):
        raise ValueError(f"record holds a {type(t).__name__}, not a tensor")
    if not isinstance(t.storage, _StorageRef) or not isinstance(t.offset, int) \
            or not all(isinstance(x, tuple) and all(isinstance(i, int) for i in x) for x in (t.shape, t.stride)) \
            or len(t.shape) != len(t.stride):
        raise ValueError(f"tensor arguments in data.pkl are malformed: {t!r}")
    return t


def _is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """torch's rule: strides of dims longer than 1 are row-major; anything goes for an empty tensor."""
    if math.prod(shape) == 0:
        return True
    return all(st == want for s, st, want in zip(shape, stride, _contiguous_strides(shape)) if s != 1)


def _record_dtype(t: _Rebuilt) -> tuple[DType, int]:
    """(dtype, storage size in bytes) of a rebuilt tensor."""
    if t.storage.storage == "UntypedStorage":
        if t.dtype is None:
            raise ValueError("UntypedStorage without a dtype (_rebuild_tensor_v2)")
        return DTYPES[t.dtype], t.storage.numel
    dt = _BY_STORAGE[t.storage.storage]
    if t.dtype is not None and t.dtype != dt.name:
        raise ValueError(f"dtype {t.dtype} disagrees with storage {t.storage.storage}")
    return dt, t.storage.numel * dt.itemsize


def read_tensor_record(fd: int, offset: int, length: int) -> TensorRecord:
    """Parse the torch.save record stored at [offset, offset+length) of open file `fd` (zipfile over a view of
    that range: the central directory, the local headers and data.pkl are read; never the tensor data)."""
    z, view = open_record(fd, offset, length)
    with z:
        pkl = data_pickle(z)
        prefix = pkl[:-len("data.pkl")]
        t = _unpickle_tensor(read_member(z, view, pkl))
        names = set(z.namelist())
        if prefix + "byteorder" in names and read_member(z, view, prefix + "byteorder", 16) != b"little":
            raise ValueError("record is big-endian")
        dt, storage_nbytes = _record_dtype(t)
        data = f"{prefix}data/{t.storage.key}"
        if data not in names:
            raise ValueError(f"storage {t.storage.key!r} has no {data} entry")
        size = z.getinfo(data).file_size
        if size != storage_nbytes:
            raise ValueError(f"storage {t.storage.key!r} holds {size} bytes, data.pkl says {storage_nbytes}")
        if not _is_contiguous(t.shape, t.stride):
            raise ValueError(f"tensor of shape {list(t.shape)} has non-contiguous strides {list(t.stride)}")
        nbytes = math.prod(t.shape) * dt.itemsize
        if t.offset < 0 or t.offset * dt.itemsize + nbytes > storage_nbytes:
            raise ValueError(f"tensor at element {t.offset} of {nbytes} bytes exceeds its {storage_nbytes}-byte "
                             f"storage")
        return TensorRecord(dt.name, t.shape, member_start(z, view, data) + t.offset * dt.itemsize, nbytes)


# ----------------------------------------------------------------------------------------------------------
# torch.distributed.checkpoint .metadata
# ----------------------------------------------------------------------------------------------------------

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
_SIZE = _Global("torch", "Size")


def _torch_size(shape: tuple[int, ...]) -> _Reduce:
    return _Reduce(_SIZE, (tuple(shape),))


def _tensor_properties(dtype: str) -> _NewObj:
    """TensorProperties(dtype) pickled through its __getstate__ tuple."""
    layout = _Reduce(_Global("torch.serialization", "_get_layout"), ("torch.strided",))
    contiguous = _Reduce(_Global(_MD, "_MEM_FORMAT_ENCODING"), (0,))
    return _NewObj(_Global(_MD, "TensorProperties"), (_Global("torch", _dtype(dtype).name), layout, False,
                                                      contiguous, False))


def _storage_info(file: str, offset: int, length: int) -> _NewObj:
    return _NewObj(_Global(_FS, "_StorageInfo"), {"relative_path": file, "offset": offset, "length": length})


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
            chunks.append(_NewObj(_Global(_MD, "ChunkStorageMetadata"),
                                  {"offsets": _torch_size(c.offsets), "sizes": _torch_size(c.sizes)}))
            index = _NewObj(_Global(_MD, "MetadataIndex"),
                            {"fqn": key, "index": None, "offset": _torch_size(c.offsets)})
            storage[index] = _storage_info(c.file, c.offset, c.length)
        state[key] = _NewObj(_Global(_MD, "TensorStorageMetadata"), {
            "properties": _tensor_properties(t.dtype), "size": _torch_size(t.shape), "chunks": chunks})
    for key, (file, offset, length) in md.objects.items():
        if key in md.tensors:
            raise ValueError(f"{key} is both a tensor and an object")
        state[key] = _NewObj(_Global(_MD, "BytesStorageMetadata"))
        storage[_NewObj(_Global(_MD, "MetadataIndex"), {"fqn": key, "index": None})] = \
            _storage_info(file, offset, length)
    storage_meta = _NewObj(_Global(_MD, "StorageMeta"), {
        "checkpoint_id": checkpoint_id, "save_id": save_id, "load_id": None, "modules": []})
    metadata = _NewObj(_Global(_MD, "Metadata"), {
        "state_dict_metadata": state, "planner_data": None, "storage_data": storage,
        "storage_meta": storage_meta, "version": "1.0.0"})
    return _Pickler(4).dumps(metadata)


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
    try:
        root = StandInUnpickler(io.BytesIO(data)).load()
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"not a pickle: {type(e).__name__}: {e}") from None
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
