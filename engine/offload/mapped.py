"""Experts read from memory-mapped model files: byte ranges, read-ahead, page dropping.

With ``--mmap-experts`` the host tier is the model file itself (GGUF or safetensors): the OS
page cache holds the experts that were read lately and the disk the rest. This module is the
mechanism under both mapped stores:

- ``MappedRange``: where one expert part's bytes lie in its file (from a numpy view into an
  ``np.memmap``, so the GGUF reader's tensors and the safetensors mapping work alike).
- ``will_need``: ``madvise(MADV_WILLNEED)`` over the pages of the ranges, which makes the kernel
  start reading them from disk and returns at once; the reads then overlap each other and the
  compute until the expert's row is assembled (the store's ``read_ahead``).
- ``drop``: ``madvise(MADV_DONTNEED)`` on this process's mapping, then
  ``posix_fadvise(POSIX_FADV_DONTNEED)`` on the file, so the page cache forgets the pages and the
  next read goes to the disk. Only measurements use it (``engine.eval.mmap_study`` emulates a
  small page cache with it); the engine itself never drops pages.
- ``MappedExpertStore``: a ``HostExpertStore`` that owns no host memory; subclasses say where
  each expert's parts lie and build its row on demand.

What it does not do: decide which experts to read ahead (the cache passes its misses and its
prefetch choice) or keep anything resident itself.
"""

from __future__ import annotations

import json
import mmap
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.errors import ModelLoadError
from engine.offload.store import (
    AnyExpertShape,
    ExpertPart,
    ExpertShape,
    HostExpertStore,
    SlotKey,
)

PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class MappedRange:
    """``nbytes`` bytes at ``start`` of the file mapped by ``mapping`` (``filename`` on disk)."""

    mapping: mmap.mmap
    filename: str
    start: int
    nbytes: int

    def pages(self) -> tuple[int, int]:
        """The page-aligned (start, length) covering the range, inside the mapping."""
        first = self.start // PAGE * PAGE
        end = min(len(self.mapping), -(-(self.start + self.nbytes) // PAGE) * PAGE)
        return first, end - first


def mapped_range(view: np.ndarray) -> MappedRange:
    """The file range behind ``view``, a contiguous slice of an ``np.memmap``."""
    mapping = getattr(view, "_mmap", None)
    filename = getattr(view, "filename", None)
    assert isinstance(mapping, mmap.mmap) and filename, "views of an np.memmap carry their mmap"
    assert view.flags.c_contiguous, "an expert part is a contiguous byte range"
    base = np.frombuffer(mapping, dtype=np.uint8).ctypes.data
    return MappedRange(mapping, str(filename), int(view.ctypes.data - base), int(view.nbytes))


def mapped_tensor(view: np.ndarray) -> torch.Tensor:
    """A uint8 tensor over ``view``'s mapped bytes, without copying them (read it, never write).

    torch warns that the buffer is read-only; the stores only copy out of it.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(view.reshape(-1))


def will_need(ranges: Iterable[MappedRange]) -> int:
    """Ask the kernel to start reading ``ranges`` now; returns the bytes asked for."""
    asked = 0
    for item in ranges:
        start, length = item.pages()
        if length > 0:
            item.mapping.madvise(mmap.MADV_WILLNEED, start, length)
            asked += length
    return asked


def drop(ranges: Iterable[MappedRange]) -> None:
    """Unmap the ranges' pages from this process and let the page cache forget them."""
    by_file: dict[str, list[tuple[int, int]]] = {}
    for item in ranges:
        start, length = item.pages()
        if length > 0:
            item.mapping.madvise(mmap.MADV_DONTNEED, start, length)
            by_file.setdefault(item.filename, []).append((start, length))
    for filename, spans in by_file.items():
        fd = os.open(filename, os.O_RDONLY)
        try:
            for start, length in spans:
                os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class MappedExpertStore(HostExpertStore):
    """Experts read from mapped files when the cache takes them in; no host buffers.

    ``ranges(key)`` (subclasses) says where an expert's bytes lie; ``read_ahead`` starts the
    disk reads of experts about to be read (``read_ahead_on`` turns it off, for measuring).
    ``nbytes`` is 0: the page cache, not the store, holds the experts.
    """

    def __init__(
        self,
        shape: AnyExpertShape,
        layers: Sequence[int],
        num_experts: int,
        layer_shapes: Mapping[int, AnyExpertShape] | None = None,
        *,
        read_ahead: bool = True,
    ) -> None:
        super().__init__(shape, [], num_experts, False, layer_shapes)
        self._mapped_layers = list(layers)
        self.read_ahead_on = read_ahead
        self.layer_ahead = True  # read the next layer's predicted experts while this one runs
        self.read_ahead_bytes = 0  # page bytes asked for by read_ahead so far

    @property
    def layers(self) -> list[int]:
        return list(self._mapped_layers)

    def ranges(self, key: SlotKey) -> list[MappedRange]:
        raise NotImplementedError

    def read_ahead(self, keys: Sequence[SlotKey]) -> None:
        if self.read_ahead_on and keys:
            self.read_ahead_bytes += will_need(r for key in keys for r in self.ranges(key))

    @property
    def reads_ahead_early(self) -> bool:
        return self.read_ahead_on and self.layer_ahead

    def to_planar_q8_0(self) -> bool:
        """A mapped file is read-only: its blocks stay as GGML wrote them."""
        return False

    def drop(self, keys: Sequence[SlotKey]) -> None:
        """Make the next read of ``keys`` go to the disk (page-cache measurements only)."""
        drop(r for key in keys for r in self.ranges(key))

    def row(self, key: SlotKey) -> torch.Tensor:
        row = torch.empty(self.shape.numel, dtype=self.shape.dtype)
        self._fill(key, row)
        self._check_first_use(key, row)
        return row

    def row_into(self, key: SlotKey, out: torch.Tensor) -> torch.Tensor | None:
        """A slot in host memory (CPU device) is filled straight from the mapping: one copy."""
        if out.device.type != "cpu" or out.shape != (self.shape.numel,):
            return self.row(key)
        if out.dtype != self.shape.dtype:
            return self.row(key)
        self._fill(key, out)
        self._check_first_use(key, out)
        return None

    def _row(self, key: SlotKey) -> torch.Tensor:
        return self.row(key)

    def _fill(self, key: SlotKey, row: torch.Tensor) -> None:
        """Copy expert ``key`` out of the mapping into ``row`` (laid out by ``shape``)."""
        raise NotImplementedError


# ---------------------------------------------------------------- safetensors files

_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class _Tensor:
    dtype: torch.dtype
    shape: tuple[int, ...]
    data: np.ndarray  # raw bytes, uint8, memory-mapped


def _safetensors_table(
    file: Path, dtypes: Mapping[str, torch.dtype] = _TORCH_DTYPES
) -> dict[str, _Tensor]:
    """Every tensor of ``dtypes`` in a safetensors file as a mapped byte view (header parsed,
    no data read)."""
    try:
        with file.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        mapped = np.memmap(file, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot map {file.name}: {error}") from error
    table: dict[str, _Tensor] = {}
    for key, entry in header.items():
        if key == "__metadata__" or entry.get("dtype") not in dtypes:
            continue
        start, end = (8 + size + int(offset) for offset in entry["data_offsets"])
        if end > len(mapped):
            raise ModelLoadError(f"{file.name} is truncated: tensor {key!r} ends past the file")
        table[key] = _Tensor(dtypes[entry["dtype"]], tuple(entry["shape"]), mapped[start:end])
    return table


def _expert_view(table: Mapping[str, _Tensor], part: ExpertPart, expected: tuple[int, ...]) -> Any:
    """(dtype, mapped bytes) of one expert part, checked against the shape the engine expects."""
    tensor = table.get(part.key)
    if tensor is None:
        raise ModelLoadError(
            f"tensor {part.key!r} in {part.file.name} cannot be memory-mapped (it is missing or "
            "its dtype is not F32, F16 or BF16)"
        )
    if part.index is None:
        ok, data = tensor.shape == expected, tensor.data
    else:
        ok = tensor.shape[1:] == expected and part.index < tensor.shape[0]
        data = tensor.data.reshape(max(1, tensor.shape[0]), -1)[part.index] if ok else tensor.data
    if not ok:
        raise ModelLoadError(
            f"tensor {part.key!r} in {part.file.name} has shape {list(tensor.shape)}, "
            f"expected {list(expected)} from config.json"
        )
    return tensor.dtype, data


class MappedSafetensorsStore(MappedExpertStore):
    """A safetensors model's experts read from its memory-mapped files on demand.

    ``row`` assembles an expert's float row (cast to the compute dtype) from its parts' mapped
    bytes when the cache takes it in; nothing is read at load beyond the file headers.
    """

    def __init__(
        self,
        shape: ExpertShape,
        layers: Sequence[int],
        num_experts: int,
        parts: Mapping[SlotKey, Sequence[ExpertPart]],
        *,
        read_ahead: bool = True,
    ) -> None:
        super().__init__(shape, layers, num_experts, read_ahead=read_ahead)
        tables = {
            file: _safetensors_table(file) for file in {p.file for ps in parts.values() for p in ps}
        }
        probe = torch.empty(shape.numel, dtype=shape.dtype)
        self._views = {
            key: [
                (
                    part.part,
                    *_expert_view(
                        tables[part.file], part, tuple(shape.part_view(probe, part.part).shape)
                    ),
                )
                for part in key_parts
            ]
            for key, key_parts in parts.items()
        }
        self._parts.update(parts)

    def ranges(self, key: SlotKey) -> list[MappedRange]:
        return [mapped_range(data) for _, _, data in self._views[key]]

    def _fill(self, key: SlotKey, row: torch.Tensor) -> None:
        shape = self.shape
        for part, dtype, data in self._views[key]:
            target = shape.part_view(row, part)
            target.copy_(mapped_tensor(data).view(dtype).view(target.shape))  # one copy, cast

    def close(self) -> None:
        self._views.clear()
        super().close()


class MappedRowsStore(MappedExpertStore):
    """Expert rows stored whole in a safetensors file, one ``[E, numel]`` tensor per layer.

    The quantized-experts cache file (``engine.runtime.expert_quant``) is laid out this way: each
    row is already the store's row (GGML blocks of gate, up and down), so taking an expert in is
    one copy out of the mapping. ``names[layer]`` is the layer's tensor name.
    """

    def __init__(
        self,
        file: Path,
        shape: AnyExpertShape,
        layers: Sequence[int],
        num_experts: int,
        names: Mapping[int, str],
        *,
        read_ahead: bool = True,
    ) -> None:
        super().__init__(shape, layers, num_experts, read_ahead=read_ahead)
        table = _safetensors_table(file, {"U8": torch.uint8})  # rows of GGML bytes
        expected = (num_experts, shape.numel)
        self._rows: dict[int, np.ndarray] = {}
        for layer in layers:
            tensor = table.get(names[layer])
            if tensor is None or tensor.dtype != shape.dtype or tensor.shape != expected:
                raise ModelLoadError(
                    f"{file.name} holds no {list(expected)} {shape.dtype} tensor {names[layer]!r}"
                )
            self._rows[layer] = tensor.data.reshape(expected)  # [E, numel bytes], mapped

    def ranges(self, key: SlotKey) -> list[MappedRange]:
        layer, expert = key
        return [mapped_range(self._rows[layer][expert])]

    def _fill(self, key: SlotKey, row: torch.Tensor) -> None:
        layer, expert = key
        row.copy_(mapped_tensor(self._rows[layer][expert]))

    def close(self) -> None:
        self._rows.clear()
        super().close()
