"""Pickle opcodes for plain values and the globals, reductions and persistent ids torch's pickles name, written
without the objects they stand for and memoized the way Python's pickler does it. Standard library only."""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Global:
    """A module-level name, pickled as GLOBAL (protocol 2) or STACK_GLOBAL (protocol 4)."""

    module: str
    name: str


@dataclass(frozen=True, eq=False)
class Reduce:
    """func(*args) at load time (REDUCE)."""

    func: Global
    args: tuple


@dataclass(frozen=True, eq=False)
class NewObj:
    """cls.__new__(cls) then BUILD with state, as copyreg.__newobj__ pickles a dataclass."""

    cls: Global
    state: Any = None


@dataclass(frozen=True, eq=False)
class PersistentId:
    """A persistent id (BINPERSID): torch.save's reference to a storage."""

    pid: tuple


class Pickler:
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
        elif isinstance(obj, Global):
            self.save_global(obj)
        elif isinstance(obj, Reduce):
            self.save_global(obj.func)
            self.save_tuple(obj.args)
            self.out += pickle.REDUCE
            self.put()
        elif isinstance(obj, NewObj):
            self.save_global(obj.cls)
            self.out += pickle.EMPTY_TUPLE + pickle.NEWOBJ
            self.put()
            if obj.state is not None:
                self.save(obj.state)
                self.out += pickle.BUILD
        elif isinstance(obj, PersistentId):
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

    def save_global(self, g: Global) -> None:
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
