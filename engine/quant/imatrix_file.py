"""llama.cpp's importance-matrix files, read and written: the GGUF format and the legacy ``.dat``.

An importance matrix holds, per weight matrix of a model (GGUF tensor name), the sum of the
squares of the inputs each input column saw over a calibration text and how many input rows
(tokens) that was; routed-expert tensors have one row of sums and one count per expert. This
llama.cpp's ``llama-imatrix`` writes it as GGUF (``general.type = imatrix``, keys
``imatrix.datasets``, ``imatrix.chunk_count``, ``imatrix.chunk_size``; tensors
``NAME.in_sum2`` [n_mat, cols] and ``NAME.counts`` [n_mat, 1], both F32) and ``llama-quantize
--imatrix`` reads that or the older ``.dat`` (per entry: name, calls, values already divided by
the count and multiplied by the calls). :meth:`ImportanceMatrix.importance` is what
``llama-quantize`` quantizes with: sums / counts, and ones for an expert that saw no token.
"""

from __future__ import annotations

import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

from engine.errors import EngineError

SUMS, COUNTS = ".in_sum2", ".counts"


class ImatrixError(EngineError):
    """An importance-matrix file that cannot be read or does not fit the model."""


@dataclass(frozen=True)
class ImportanceMatrix:
    """Per tensor: summed squared inputs ``[n_mat, cols]`` and the rows counted ``[n_mat]``."""

    sums: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    chunk_count: int = 0
    chunk_size: int = 0
    datasets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.sums.keys() != self.counts.keys():
            raise ImatrixError("an importance matrix needs sums and counts for the same tensors")
        for name, sums in self.sums.items():
            if sums.ndim != 2 or self.counts[name].shape != (sums.shape[0],):
                raise ImatrixError(
                    f"{name}: sums {sums.shape} and counts {self.counts[name].shape} do not match"
                )

    def importance(self) -> dict[str, np.ndarray]:
        """``llama-quantize``'s weights: mean squared input per column, [cols] for a plain
        tensor and [n_experts, cols] for routed experts; ones where nothing was counted."""
        means = {}
        for name, sums in self.sums.items():
            counts = self.counts[name].astype(np.float32)[:, None]
            with np.errstate(divide="ignore", invalid="ignore"):
                mean = np.where(counts > 0, sums.astype(np.float32) / counts, np.float32(1))
            means[name] = mean[0] if mean.shape[0] == 1 else mean
        return means


def _field_value(reader: GGUFReader, key: str) -> object:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _read_gguf(path: Path) -> ImportanceMatrix:
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, IndexError) as error:
        raise ImatrixError(f"{path.name}: not a readable imatrix GGUF file ({error})") from error
    tensors = {t.name: t for t in reader.tensors}
    names = sorted(n.removesuffix(SUMS) for n in tensors if n.endswith(SUMS))
    if not names:
        raise ImatrixError(f"{path.name}: a GGUF file with no importance-matrix tensors")
    sums, counts = {}, {}
    for name in names:
        total, count = tensors[name + SUMS], tensors.get(name + COUNTS)
        if count is None:
            raise ImatrixError(f"{path.name}: {name} has sums but no counts")
        if {total.tensor_type, count.tensor_type} != {GGMLQuantizationType.F32}:
            raise ImatrixError(f"{path.name}: sums and counts of {name} must be F32")
        sums[name] = np.array(total.data, dtype=np.float32).reshape(-1, int(total.shape[0]))
        counts[name] = np.rint(np.array(count.data, dtype=np.float64).reshape(-1)).astype(np.int64)
    datasets: Any = _field_value(reader, "imatrix.datasets") or []
    chunk_count: Any = _field_value(reader, "imatrix.chunk_count") or 0
    chunk_size: Any = _field_value(reader, "imatrix.chunk_size") or 0
    return ImportanceMatrix(
        sums, counts, int(chunk_count), int(chunk_size), tuple(str(d) for d in datasets)
    )


class _Cursor:
    """Little-endian reads from a ``.dat`` file's bytes that fail with the file's name."""

    def __init__(self, data: bytes, name: str) -> None:
        self.data, self.at, self.name = data, 0, name

    def take(self, fmt: str, count: int = 1) -> tuple[object, ...]:
        size = struct.calcsize(f"<{count}{fmt}")
        if self.at + size > len(self.data):
            raise ImatrixError(f"{self.name}: truncated imatrix file (ends at byte {self.at})")
        values = struct.unpack_from(f"<{count}{fmt}", self.data, self.at)
        self.at += size
        return values

    def int32(self) -> int:
        return int(self.take("i")[0])  # type: ignore[call-overload]


def _read_legacy(path: Path) -> ImportanceMatrix:
    """The ``.dat`` format: values are ``sum / count * calls``; counts become ``calls``."""
    cursor = _Cursor(path.read_bytes(), path.name)
    entries = cursor.int32()
    if entries < 1 or entries > 1_000_000:
        raise ImatrixError(f"{path.name}: not an imatrix file ({entries} entries)")
    sums, counts = {}, {}
    for _ in range(entries):
        length = cursor.int32()
        if not 0 < length < 4096:
            raise ImatrixError(f"{path.name}: a tensor name of {length} bytes")
        name = bytes(cursor.take("s", length)[0]).decode("utf-8", errors="replace")  # type: ignore[call-overload]
        calls, values = cursor.int32(), cursor.int32()
        if values < 1:
            raise ImatrixError(f"{path.name}: {name} has {values} values")
        sums[name] = np.array(cursor.take("f", values), dtype=np.float32)[None]
        counts[name] = np.array([calls], dtype=np.int64)
    chunks = cursor.int32() if cursor.at < len(cursor.data) else 0
    return ImportanceMatrix(sums, counts, chunks)


def read_imatrix(path: Path) -> ImportanceMatrix:
    """An importance matrix from a GGUF (``llama-imatrix``'s default) or legacy ``.dat`` file."""
    if not path.is_file():
        raise ImatrixError(f"no importance-matrix file at {path}")
    with path.open("rb") as handle:
        magic = handle.read(4)
    return _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)


def write_imatrix(path: Path, matrix: ImportanceMatrix) -> Path:
    """Write ``matrix`` in llama-imatrix's GGUF format at ``path`` (atomically)."""
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".imatrix-") as scratch:
        staged = Path(scratch) / path.name
        writer = GGUFWriter(staged, arch="")
        writer.kv_data[0].pop("general.architecture", None)
        writer.add_type("imatrix")
        writer.add_array("imatrix.datasets", list(matrix.datasets))
        writer.add_uint32("imatrix.chunk_count", matrix.chunk_count)
        writer.add_uint32("imatrix.chunk_size", matrix.chunk_size)
        for name in sorted(matrix.sums):
            writer.add_tensor(name + SUMS, np.ascontiguousarray(matrix.sums[name], np.float32))
            count = matrix.counts[name].astype(np.float32)[:, None]
            writer.add_tensor(name + COUNTS, count)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(staged, path)
    return path
