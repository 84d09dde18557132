"""A minimal reader for R lazy-load databases (``Rdata.rdx`` / ``Rdata.rdb``) without R.

The index (``.rdx``) is a gzip- or zlib-compressed R serialisation of a list with a
``variables`` entry mapping object names to ``(offset, length)`` in the ``.rdb`` file. Each
record there is a 4-byte big-endian uncompressed length followed by zlib data holding one
XDR-serialised R object. Only what plain data packages use is decoded: vectors, lists,
pairlists, symbols, attributes and the compact integer sequences of R >= 3.5.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_NIL, _SYM, _LIST, _LANG, _CHAR = 0, 1, 2, 6, 9
_LGL, _INT, _REAL, _STR, _VEC, _EXPR = 10, 13, 14, 16, 19, 20
_ALTREP, _EMPTYENV, _BASEENV, _GLOBALENV = 238, 242, 241, 253
_REF, _NILVALUE, _MISSING = 255, 254, 251


class RDataError(ValueError):
    """The file is not an R serialisation this reader understands."""


@dataclass
class RObject:
    """An R value with its attributes (names, class, ...)."""

    value: Any
    attributes: dict[str, Any] = field(default_factory=dict)


class _Reader:
    """Cursor over one XDR serialisation."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []

    def i32(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return int(value)

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def header(self) -> None:
        if self.take(2) != b"X\n":
            raise RDataError("only XDR (binary 'X') R serialisations are supported")
        version = self.i32()
        self.i32()  # writer version
        self.i32()  # minimal reader version
        if version == 3:
            self.take(self.i32())  # native encoding name

    def item(self) -> Any:
        flags = self.i32()
        kind = flags & 0xFF
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind in (_NILVALUE, _EMPTYENV, _BASEENV, _GLOBALENV, _MISSING):
            return None
        if kind == _REF:
            return self.refs[(flags >> 8) - 1]
        if kind == _SYM:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == _CHAR:
            length = self.i32()
            return None if length == -1 else self.take(length).decode("utf-8", "replace")
        if kind in (_LIST, _LANG):
            return self._pairlist(has_attr, has_tag)
        if kind == _ALTREP:
            return self._altrep()
        return self._vector(kind, has_attr)

    def _pairlist(self, has_attr: bool, has_tag: bool) -> dict[str, Any]:
        if has_attr:
            self.item()
        tag = self.item() if has_tag else None
        head = {str(tag): self.item()}
        tail = self.item()
        if isinstance(tail, dict):
            head.update(tail)
        return head

    def _altrep(self) -> Any:
        info = self.item()
        state = self.item()
        self.item()  # attributes
        kind = next(iter(info)) if isinstance(info, dict) else ""
        if kind == "compact_intseq":
            n, start, step = (int(x) for x in state.value)
            return RObject(list(range(start, start + n * step, step)))
        return state

    def _vector(self, kind: int, has_attr: bool) -> RObject:
        length = self.i32()
        if length == -1:
            length = (self.i32() << 32) + self.i32()
        if kind == _STR:
            value: Any = [self.item() for _ in range(length)]
        elif kind in (_VEC, _EXPR):
            value = [self.item() for _ in range(length)]
        elif kind in (_INT, _LGL):
            value = list(struct.unpack_from(f">{length}i", self.take(4 * length)))
        elif kind == _REAL:
            value = list(struct.unpack_from(f">{length}d", self.take(8 * length)))
        else:
            raise RDataError(f"unsupported R type {kind}")
        attributes = self.item() if has_attr else {}
        return RObject(value, attributes if isinstance(attributes, dict) else {})


def unserialize(data: bytes) -> Any:
    """Decode one XDR R serialisation (after decompression)."""
    reader = _Reader(data)
    reader.header()
    return reader.item()


def _decompress(raw: bytes) -> bytes:
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else zlib.decompress(raw[4:])


def read_lazyload_db(rdx: Path) -> dict[str, Any]:
    """Every object of the lazy-load database whose index is ``rdx`` (``.rdb`` beside it)."""
    index = unserialize(_decompress(rdx.read_bytes()))
    names = index.value[0]
    rdb = rdx.with_suffix(".rdb").read_bytes()
    objects: dict[str, Any] = {}
    for name, where in zip(names.attributes["names"].value, names.value, strict=True):
        offset, length = (int(x) for x in where.value)
        objects[name] = unserialize(zlib.decompress(rdb[offset + 4 : offset + length]))
    return objects
