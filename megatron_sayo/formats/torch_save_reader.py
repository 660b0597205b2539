"""Reading one torch.save record stored at a byte range of a bigger file (a `.distcp`): its members through zipfile,
and where a tensor's raw elements lie, without reading them or importing torch. Standard library only."""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass

from megatron_sayo.formats.dtypes import DTYPES, DType
from megatron_sayo.formats.torch_save_writer import LOCAL_HEADER, LOCAL_HEADER_SIZE, contiguous_strides
from megatron_sayo.formats.unpickling import load_restricted

_BY_STORAGE = {d.storage: d for d in DTYPES.values() if d.storage != "UntypedStorage"}


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
    hdr = view.read(LOCAL_HEADER_SIZE)
    if len(hdr) != LOCAL_HEADER_SIZE or hdr[:4] != LOCAL_HEADER:
        raise ValueError(f"no local header for {name} at {info.header_offset}")
    name_len, extra_len = struct.unpack_from("<HH", hdr, 26)
    start = info.header_offset + LOCAL_HEADER_SIZE + name_len + extra_len
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
    t = load_restricted(_TensorUnpickler(io.BytesIO(pkl)), "data.pkl does not unpickle")
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
    return all(st == want for s, st, want in zip(shape, stride, contiguous_strides(shape)) if s != 1)


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
