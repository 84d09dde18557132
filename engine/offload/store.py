"""Routed experts in host memory: lazy safetensors reads into engine-owned buffers.

Each MoE layer gets one host buffer ``[E, numel]`` (pinned when the compute device is CUDA, so
copies to the device can overlap compute); expert ``e`` of the layer is the row ``[numel]``,
holding the fused ``gate_up`` ``[2I, H]`` then ``down`` ``[H, I]`` - exactly the per-expert
slices of transformers' fused ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``, so one copy
moves one expert. Both parts start on an ``ALIGN_ELEMENTS`` boundary so views of the buffer (and
of the device slots, which use the same layout) are as aligned as the fused parameters.

Reads go through ``safe_open``: per-expert checkpoint keys are read whole, fused ``[E, ...]`` keys
through ``get_slice(key)[e]``, which touches only expert ``e``'s pages. The data is copied (and
cast to the compute dtype) into the buffer; the mmap view is dropped at once and each file is
closed after its tensors are read, so no second full copy of the experts ever exists. Pages of
the mapping stay resident (and count in the process RSS) while the file is open, so a file is
re-opened every ``REMAP_BYTES`` read: the mapped pages in RSS stay under that bound.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open

from engine.errors import ModelLoadError
from engine.offload.finite import check_finite

ALIGN_ELEMENTS = 128
REMAP_BYTES = 32 * 2**20  # reopen a file after this much was read: mapped pages count as RSS
Part = Literal["gate", "up", "down", "gate_up"]
SlotKey = tuple[int, int]


def _align(numel: int) -> int:
    return -(-numel // ALIGN_ELEMENTS) * ALIGN_ELEMENTS


@dataclass(frozen=True)
class ExpertShape:
    """Layout of one expert's weights in a flat buffer row."""

    hidden: int
    intermediate: int
    dtype: torch.dtype

    @property
    def gate_up_numel(self) -> int:
        return 2 * self.intermediate * self.hidden

    @property
    def down_numel(self) -> int:
        return self.hidden * self.intermediate

    @property
    def down_offset(self) -> int:
        return _align(self.gate_up_numel)

    @property
    def numel(self) -> int:
        return self.down_offset + _align(self.down_numel)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def gate_up(self, row: torch.Tensor) -> torch.Tensor:
        return row[: self.gate_up_numel].view(2 * self.intermediate, self.hidden)  # [2I, H]

    def down(self, row: torch.Tensor) -> torch.Tensor:
        end = self.down_offset + self.down_numel
        return row[self.down_offset : end].view(self.hidden, self.intermediate)  # [H, I]

    def part_view(self, row: torch.Tensor, part: Part) -> torch.Tensor:
        if part == "down":
            return self.down(row)
        gate_up = self.gate_up(row)
        if part == "gate":
            return gate_up[: self.intermediate]  # [I, H]
        if part == "up":
            return gate_up[self.intermediate :]  # [I, H]
        return gate_up


@dataclass(frozen=True)
class ExpertPart:
    """Where one part of one expert lives in the checkpoint."""

    file: Path
    key: str
    part: Part
    index: int | None = None  # row of a fused [E, ...] checkpoint tensor; None: per-expert key


class HostExpertStore:
    """All routed experts of a model, one host buffer per MoE layer."""

    def __init__(
        self, shape: ExpertShape, layers: Sequence[int], num_experts: int, pin: bool
    ) -> None:
        self.shape = shape
        self.num_experts = num_experts
        self.pinned = pin
        self._buffers = {
            layer: torch.zeros(num_experts, shape.numel, dtype=shape.dtype, pin_memory=pin)
            for layer in layers
        }  # each [E, numel]
        self._parts: dict[SlotKey, Sequence[ExpertPart]] = {}
        self._checked: set[SlotKey] = set()  # experts found finite on their first use

    @property
    def layers(self) -> list[int]:
        return list(self._buffers)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def buffers(self) -> list[torch.Tensor]:
        return list(self._buffers.values())

    def row(self, key: SlotKey) -> torch.Tensor:
        """Expert ``key``'s flat host row [numel]; checked for NaN/inf the first time it is used."""
        row = self._row(key)
        if key not in self._checked:
            parts = self._parts.get(key, ())
            check_finite(((p.key, self.shape.part_view(row, p.part)) for p in parts), "expert")
            self._checked.add(key)
        return row

    def _row(self, key: SlotKey) -> torch.Tensor:
        layer, expert = key
        return self._buffers[layer][expert]

    def fill(
        self, parts: Mapping[SlotKey, Sequence[ExpertPart]], on_tensor: Callable[[int, int], None]
    ) -> None:
        """Read every part into its buffer; ``on_tensor(done, total)`` after each tensor."""
        by_file: dict[Path, list[tuple[SlotKey, ExpertPart]]] = defaultdict(list)
        self._parts.update(parts)
        for key, key_parts in parts.items():
            for part in key_parts:
                by_file[part.file].append((key, part))
        total = sum(len(items) for items in by_file.values())
        done = 0
        for file, items in by_file.items():
            for window in self._windows(items):
                with _open(file) as handle:
                    for key, part in window:
                        self._read_part(handle, key, part)
                        done += 1
                        on_tensor(done, total)

    def _windows(
        self, items: list[tuple[SlotKey, ExpertPart]]
    ) -> list[list[tuple[SlotKey, ExpertPart]]]:
        """Split one file's reads so each mapping touches at most ``REMAP_BYTES``."""
        windows: list[list[tuple[SlotKey, ExpertPart]]] = [[]]
        size = 0
        for item in items:
            part_bytes = self.shape.part_view(self._row(item[0]), item[1].part).nbytes
            if windows[-1] and size + part_bytes > REMAP_BYTES:
                windows.append([])
                size = 0
            windows[-1].append(item)
            size += part_bytes
        return windows

    def _read_part(self, handle: object, key: SlotKey, part: ExpertPart) -> None:
        target = self.shape.part_view(self._row(key), part.part)
        try:
            source = handle.get_slice(part.key)  # type: ignore[attr-defined]
            tensor = _checked_read(source, part, tuple(target.shape))
        except ModelLoadError:
            raise
        except Exception as error:  # safetensors raises its own error types
            raise ModelLoadError(
                f"cannot read {part.key!r} from {part.file.name}: {error}"
            ) from error
        target.copy_(tensor)  # copies out of the mmap and casts to the compute dtype

    def close(self) -> None:
        """Drop the host buffers (the caller drops its references to the store too)."""
        self._buffers.clear()


def _open(file: Path):  # type: ignore[no-untyped-def]
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except FileNotFoundError as error:
        raise ModelLoadError(f"model file {file} disappeared while loading") from error
    except Exception as error:
        raise ModelLoadError(f"cannot open {file.name}: {error}") from error


def _checked_read(source: object, part: ExpertPart, expected: tuple[int, ...]) -> torch.Tensor:
    shape = tuple(source.get_shape())  # type: ignore[attr-defined]
    if part.index is None:
        if shape != expected:
            raise _shape_error(part, shape, expected)
        return source[:]  # type: ignore[index]
    if shape[1:] != expected or part.index >= shape[0]:
        raise _shape_error(part, shape, (f"> {part.index}", *expected))
    return source[part.index]  # type: ignore[index]


def _shape_error(
    part: ExpertPart, shape: tuple[int, ...], expected: tuple[object, ...]
) -> Exception:
    return ModelLoadError(
        f"tensor {part.key!r} in {part.file.name} has shape {list(shape)}, "
        f"expected {list(expected)} from config.json"
    )
