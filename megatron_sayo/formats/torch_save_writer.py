"""torch.save records written without torch: a tensor's record as the bytes around its raw elements, or a plain
object's record, in torch's own zip framing (zeros for the telemetry-only serialization id). Standard library only."""

from __future__ import annotations

import functools
import math
import pickle
import pickletools
import struct

from megatron_sayo.formats import dtypes
from megatron_sayo.formats.pickle_writer import Global, PersistentId, Pickler, Reduce

# A local file header's signature and fixed size (torch_save_reader finds a member's data after them).
LOCAL_HEADER = b"PK\x03\x04"
LOCAL_HEADER_SIZE = 30
_CENTRAL = b"PK\x01\x02"
_DESCRIPTOR = b"PK\x07\x08"
_ZIP64_END = b"PK\x06\x06"
_ZIP64_LOCATOR = b"PK\x06\x07"
_END = b"PK\x05\x06"
_UTF8 = 0x0800                  # general purpose flag: names are UTF-8
_DESCRIBED = 0x0008             # general purpose flag: sizes follow the data in a data descriptor
_U32 = 0xFFFFFFFF
_ALIGNMENT = 64                 # torch.utils.serialization.config.save.storage_alignment default
_CENTRAL_SIZE, _END_SIZE, _LOCATOR_SIZE, _ZIP64_END_SIZE = 46, 22, 20, 56

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
        start = self.pos + LOCAL_HEADER_SIZE + len(full) + len(zip64) + 4
        pad = -start % _ALIGNMENT
        extra = zip64 + b"FB" + struct.pack("<H", pad) + b"Z" * pad
        self.entries.append((name, self.pos, size))
        self.write(LOCAL_HEADER + struct.pack("<HHHHHIIIHH", 0, _flags(size), 0, 0, 0, 0, 0, 0, len(full), len(extra))
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


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides of `shape`, as torch gives a contiguous tensor (a 0-length dim counts as 1 in them)."""
    strides, step = [], 1
    for s in reversed(shape):
        strides.append(step)
        step *= max(s, 1)
    return tuple(reversed(strides))


def _tensor_pickle(dt: dtypes.DType, shape: tuple[int, ...]) -> bytes:
    """data.pkl of a contiguous CPU tensor stored alone in storage "0" (as torch's Tensor.__reduce_ex__)."""
    v3 = dt.storage == "UntypedStorage"
    storage = Global("torch.storage" if v3 else "torch", dt.storage)
    numel = math.prod(shape)
    pid = PersistentId(("storage", storage, "0", "cpu", numel * dt.itemsize if v3 else numel))
    args = (pid, 0, shape, contiguous_strides(shape), False, Reduce(Global("collections", "OrderedDict"), ()))
    if v3:
        args += (Global("torch", dt.name),)
    rebuild = Global("torch._utils", "_rebuild_tensor_v3" if v3 else "_rebuild_tensor_v2")
    return Pickler(2).dumps(Reduce(rebuild, args))


def _check_shape(shape) -> tuple[int, ...]:
    shape = tuple(shape)
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ValueError(f"shape {list(shape)} is not a tuple of non-negative ints")
    return shape


@functools.lru_cache(maxsize=4096)    # a checkpoint repeats a few shapes per layer
def tensor_record(dtype: str, shape: tuple[int, ...], *, archive: str = "archive") -> tuple[bytes, bytes]:
    """(head, tail): torch.save of a contiguous CPU tensor of this dtype and shape is exactly head + the tensor's
    raw little-endian bytes (numel * itemsize) + tail (with compute_crc32 off; `archive` is the name prefix)."""
    dt, shape = dtypes.dtype(dtype), _check_shape(shape)
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
