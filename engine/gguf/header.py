"""A fast, torch-free GGUF header parser: metadata, tensor table, where the data starts.

``gguf``'s ``GGUFReader`` builds a numpy view for every element of every metadata array, which
takes tens of seconds for a 150k-token vocabulary; this parser walks the header of the mapped
file with ``struct.unpack_from`` and keeps large arrays as their count (``SkippedArray``), so a
20 GB model's header parses in a fraction of a second. Every read is bounds-checked: a damaged
file raises ``GgufHeaderError`` with a sentence. ``summarize`` gives the model library its row
(architecture, quant type, MoE or dense); the app imports this module, so it must not import
torch, transformers or numpy.
"""

from __future__ import annotations

import mmap
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAGIC = b"GGUF"
PER_EXPERT = re.compile(r"\.ffn_(gate|up|down)\.\d+\.weight$")  # the pre-2024 MoE layout
DEFAULT_ALIGNMENT = 32
MAX_STRING = 1 << 24  # a metadata string longer than 16 MB means a corrupt file
MAX_DIMS = 8
KEEP_ARRAY = 4096  # scalar arrays up to this length are read; longer ones are counted
# GGUF metadata value types -> struct format of a scalar (8 string, 9 array)
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
           12: "d"}  # fmt: skip
TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 10: "Q2_K",
    11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
    19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 29: "IQ1_M", 30: "BF16",
    34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}  # fmt: skip
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4",
}  # fmt: skip


class GgufHeaderError(ValueError):
    """The header cannot be parsed; the message says why in a sentence."""


@dataclass(frozen=True)
class SkippedArray:
    """A metadata array that was not read (strings, or longer than ``KEEP_ARRAY``)."""

    count: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order (``ne``): fastest-varying first
    qtype: int
    offset: int  # from the start of the data section


@dataclass
class GgufHeader:
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    data_start: int  # absolute offset of the data section
    file_size: int


class _Cursor:
    def __init__(self, buffer: Any) -> None:
        self.buffer = buffer
        self.pos = 0

    def take(self, fmt: str) -> tuple[Any, ...]:
        try:
            values = struct.unpack_from("<" + fmt, self.buffer, self.pos)
        except struct.error as error:
            raise GgufHeaderError("the file ends inside its header (truncated?)") from error
        self.pos += struct.calcsize("<" + fmt)
        return values

    def string(self) -> str:
        (length,) = self.take("Q")
        if length > MAX_STRING or self.pos + length > len(self.buffer):
            raise GgufHeaderError(f"a metadata string claims {length} bytes: the header is corrupt")
        data = bytes(self.buffer[self.pos : self.pos + length])
        self.pos += length
        return data.decode("utf-8", "replace")

    def value(self, kind: int) -> Any:
        if kind == 8:
            return self.string()
        if kind == 9:
            inner, count = self.take("IQ")
            return self.array(inner, count)
        if kind not in SCALARS:
            raise GgufHeaderError(f"unknown metadata value type {kind}: the header is corrupt")
        return self.take(SCALARS[kind])[0]

    def array(self, inner: int, count: int) -> Any:
        if inner in SCALARS:
            size = struct.calcsize("<" + SCALARS[inner])
            if self.pos + size * count > len(self.buffer):
                raise GgufHeaderError(f"a metadata array of {count} values runs past the end")
            if count <= KEEP_ARRAY:
                return list(self.take(SCALARS[inner] * count))
            self.pos += size * count
            return SkippedArray(count)
        if inner == 8:
            self._skip_strings(count)
            return SkippedArray(count)
        for _ in range(count):  # nested arrays: walk them, keep the count
            self.value(inner)
        return SkippedArray(count)

    def _skip_strings(self, count: int) -> None:
        """Step over ``count`` strings without copying them (a vocabulary: 150k of them)."""
        buffer, pos, end, unpack = self.buffer, self.pos, len(self.buffer), struct.Struct("<Q")
        for _ in range(count):
            if pos + 8 > end:
                raise GgufHeaderError("the file ends inside its header (truncated?)")
            pos += 8 + unpack.unpack_from(buffer, pos)[0]
        if pos > end:
            raise GgufHeaderError("the file ends inside its header (truncated?)")
        self.pos = pos


def _tensor_infos(cursor: _Cursor, count: int) -> list[TensorInfo]:
    tensors = []
    for _ in range(count):
        name = cursor.string()
        (dims,) = cursor.take("I")
        if dims > MAX_DIMS:
            raise GgufHeaderError(f"tensor {name!r} has {dims} dimensions: the header is corrupt")
        shape = cursor.take("Q" * dims)
        qtype, offset = cursor.take("IQ")
        tensors.append(TensorInfo(name, tuple(int(d) for d in shape), int(qtype), int(offset)))
    return tensors


def parse(buffer: Any, file_size: int) -> GgufHeader:
    """Parse a mapped GGUF file (any object supporting the buffer protocol)."""
    if bytes(buffer[:4]) != MAGIC:
        raise GgufHeaderError(f"it starts with {bytes(buffer[:4])!r}, not b'GGUF'")
    cursor = _Cursor(buffer)
    cursor.pos = 4
    version, tensor_count, entries = cursor.take("IQQ")
    if version not in (2, 3):
        raise GgufHeaderError(f"GGUF version {version} (versions 2 and 3 are read)")
    if tensor_count * 32 + entries * 13 > file_size:  # each needs at least that many bytes
        raise GgufHeaderError(
            f"it declares {tensor_count} tensors and {entries} metadata entries, more than a "
            f"file of {file_size} bytes can hold: the header is corrupt"
        )
    metadata: dict[str, Any] = {}
    for _ in range(entries):
        key = cursor.string()
        (kind,) = cursor.take("I")
        metadata[key] = cursor.value(kind)
    tensors = _tensor_infos(cursor, tensor_count)
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GgufHeaderError(f"general.alignment is {alignment!r}: the header is corrupt")
    data_start = -(-cursor.pos // alignment) * alignment
    return GgufHeader(version, metadata, tensors, data_start, file_size)


def read_header(path: Path) -> GgufHeader:
    """Parse the header of the GGUF file at ``path`` (``GgufHeaderError``, ``OSError``)."""
    with path.open("rb") as handle:
        size = path.stat().st_size
        if size < 24:
            raise GgufHeaderError("it is truncated: it ends inside the GGUF header")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                return parse(view, size)
            finally:
                view.release()


@dataclass
class GgufSummary:
    architecture: str = ""
    name: str = ""
    file_type: str = ""  # "Q4_K_M", from general.file_type; else the experts' main block type
    expert_count: int = 0
    is_moe: bool = False
    tensor_types: Counter[str] = field(default_factory=Counter)
    problem: str = ""  # why the file could not be read; "" when fine


def summarize(path: Path) -> GgufSummary:
    """Architecture, quant type and MoE-ness of a GGUF file (first part of a split set)."""
    summary = GgufSummary()
    try:
        header = read_header(path)
    except (OSError, ValueError) as error:
        summary.problem = str(error)
        return summary
    for tensor in header.tensors:
        if "_exps." in tensor.name or PER_EXPERT.search(tensor.name):
            summary.is_moe = True
            summary.tensor_types[TYPE_NAMES.get(tensor.qtype, f"type {tensor.qtype}")] += 1
    meta = header.metadata
    summary.architecture = str(meta.get("general.architecture", ""))
    summary.name = str(meta.get("general.name", "") or "")
    file_type = meta.get("general.file_type")
    by_types = ", ".join(t for t, _ in summary.tensor_types.most_common())
    summary.file_type = FILE_TYPES.get(file_type, "") if isinstance(file_type, int) else ""
    summary.file_type = summary.file_type or by_types
    count = meta.get(f"{summary.architecture}.expert_count")
    summary.expert_count = count if isinstance(count, int) else 0
    return summary
