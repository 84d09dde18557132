"""Routed experts in host memory: lazy safetensors reads into engine-owned buffers.

Each MoE layer gets one host buffer ``[E, numel]``, a view into one exact-size allocation
(``engine.offload.pinned.HostArena``: page-locked in place when the compute device is CUDA, so
copies can overlap compute, without the power-of-two rounding of torch's pinned allocator);
expert ``e`` of the layer is the row ``[numel]``,
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

Quantized experts (GGUF files) use ``QuantizedExpertShape`` instead: the row holds the raw GGML
blocks of ``gate``, ``up`` and ``down`` (uint8), so host buffers, device slots and every byte
count are quantized bytes, and ``gate_up``/``down`` decode on the row's device right before use.
"""

from __future__ import annotations

import functools
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Generic, Literal, TypeVar

import torch
from safetensors import safe_open
from torch.utils._python_dispatch import _disable_current_modes

from engine.errors import ModelLoadError
from engine.offload.finite import check_finite
from engine.offload.pinned import HostArena, Registrar
from engine.quant.ggml_blocks import (
    Q,
    dequantize,
    dequantize_into,
    packed_nbytes,
    q8_0_to_planar,
    type_name,
)

if TYPE_CHECKING:
    from engine.offload.packed import PackedExpert, PackedExperts

V = TypeVar("V")
ALIGN_ELEMENTS = 128
HOST_DECODED_BYTES = 1 << 30  # decoded quantized experts kept for CPU assist (host_weights)
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

    def expert_weights(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched ``gate_up``/``down`` of rows ``[n, numel]``: views ``[n, 2I, H]``, ``[n, H, I]``.

        The grouped experts path reads every slot through this; a quantized shape returns
        dequantized tensors here instead of views.
        """
        n = rows.shape[0]
        gate_up = rows[:, : self.gate_up_numel].view(n, 2 * self.intermediate, self.hidden)
        end = self.down_offset + self.down_numel
        down = rows[:, self.down_offset : end].view(n, self.hidden, self.intermediate)
        return gate_up, down

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
class QuantizedExpertShape:
    """Layout of one expert kept as GGML blocks: ``gate [I, H]``, ``up [I, H]``, ``down [H, I]``.

    ``dtype`` is the storage type (uint8) that buffers and slots are allocated in; weights come
    out of ``gate_up``/``down`` decoded to ``compute_dtype``. Parts start on ``ALIGN_ELEMENTS``
    byte boundaries.
    """

    hidden: int
    intermediate: int
    compute_dtype: torch.dtype
    gate_type: int
    up_type: int
    down_type: int

    def __post_init__(self) -> None:
        for qtype, cols in ((self.gate_type, self.hidden), (self.down_type, self.intermediate)):
            packed_nbytes(qtype, cols)  # raises when a row is not whole blocks

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    @property
    def gate_nbytes(self) -> int:
        return packed_nbytes(self.gate_type, self.intermediate * self.hidden)

    @property
    def up_nbytes(self) -> int:
        return packed_nbytes(self.up_type, self.intermediate * self.hidden)

    @property
    def down_nbytes(self) -> int:
        return packed_nbytes(self.down_type, self.hidden * self.intermediate)

    @property
    def up_offset(self) -> int:
        if self.up_type == self.gate_type:  # adjacent: gate and up decode as one tensor
            return self.gate_nbytes
        return _align(self.gate_nbytes)

    @property
    def down_offset(self) -> int:
        return _align(self.up_offset + self.up_nbytes)

    @property
    def numel(self) -> int:
        return self.down_offset + _align(self.down_nbytes)

    @property
    def nbytes(self) -> int:
        return self.numel

    @property
    def type_names(self) -> str:
        """``Q4_K/Q4_K/Q6_K``: the block types of gate, up and down."""
        return "/".join(type_name(t) for t in (self.gate_type, self.up_type, self.down_type))

    @functools.cached_property
    def _spans(self) -> dict[str, tuple[int, int]]:
        """(start, size) in bytes of each part: computed once, read at every decode."""
        return {
            "gate": (0, self.gate_nbytes),
            "up": (self.up_offset, self.up_nbytes),
            "down": (self.down_offset, self.down_nbytes),
            "gate_up": (0, self.up_offset + self.up_nbytes),
        }

    def part_view(self, row: torch.Tensor, part: Part) -> torch.Tensor:
        """The raw bytes of one part in a row (``gate_up`` only when gate and up share a type)."""
        start, size = self._spans[part]
        return row[start : start + size]

    def gate_up(self, row: torch.Tensor) -> torch.Tensor:
        """Decoded ``[2I, H]`` in ``compute_dtype`` on the row's device."""
        shape = (2 * self.intermediate, self.hidden)
        if self.up_type == self.gate_type:
            fused = self.part_view(row, "gate_up")
            return dequantize(fused, self.gate_type, shape, self.compute_dtype)
        half = (self.intermediate, self.hidden)
        gate = dequantize(self.part_view(row, "gate"), self.gate_type, half, self.compute_dtype)
        up = dequantize(self.part_view(row, "up"), self.up_type, half, self.compute_dtype)
        return torch.cat([gate, up])

    def down(self, row: torch.Tensor) -> torch.Tensor:
        """Decoded ``[H, I]`` in ``compute_dtype`` on the row's device."""
        shape = (self.hidden, self.intermediate)
        return dequantize(self.part_view(row, "down"), self.down_type, shape, self.compute_dtype)

    @functools.cached_property
    def _parts(self) -> tuple[tuple[Part, int], ...]:
        """(part, block type) of the row's parts: ``gate_up`` when gate and up share a type."""
        if self.up_type == self.gate_type:
            return (("gate_up", self.gate_type), ("down", self.down_type))
        return (("gate", self.gate_type), ("up", self.up_type), ("down", self.down_type))

    def q8_0_spans(self) -> list[tuple[int, int]]:
        """(start, size) in bytes of the row's Q8_0 parts (what ``q8_0_to_planar`` rewrites)."""
        return [self._spans[part] for part, qtype in self._parts if qtype == Q.Q8_0]

    def decode_into(
        self, row: torch.Tensor, float_shape: ExpertShape, out: torch.Tensor, planar: bool = False
    ) -> None:
        """Decode the expert in ``row`` into ``out``, a float row laid out by ``float_shape``.

        ``planar``: the row's Q8_0 parts were rewritten by ``q8_0_to_planar``.
        """
        gate_up, down = float_shape.gate_up(out), float_shape.down(out)  # [2I, H], [H, I]
        targets = {
            "gate_up": gate_up, "down": down,
            "gate": gate_up[: self.intermediate], "up": gate_up[self.intermediate :],
        }  # fmt: skip
        for part, qtype in self._parts:
            source = self.part_view(row, part)
            dequantize_into(source, qtype, targets[part], planar and qtype == Q.Q8_0)


AnyExpertShape = ExpertShape | QuantizedExpertShape


@dataclass(frozen=True)
class ExpertPart:
    """Where one part of one expert lives in the checkpoint."""

    file: Path
    key: str
    part: Part
    index: int | None = None  # row of a fused [E, ...] checkpoint tensor; None: per-expert key


class BytesLRU(Generic[V]):
    """Values by key, the least recently used dropped once they hold more than ``max_bytes``
    (the newest is always kept): CPU assist's decoded and packed experts."""

    def __init__(self, max_bytes: int, size: Callable[[V], int]) -> None:
        if max_bytes < 1:
            raise ValueError(f"the bound must be positive; got {max_bytes}")
        self.max_bytes, self._size = max_bytes, size
        self._values: OrderedDict[SlotKey, V] = OrderedDict()
        self.nbytes = 0  # bytes of the values held now

    def get(self, key: SlotKey) -> V | None:
        value = self._values.get(key)
        if value is not None:
            self._values.move_to_end(key)
        return value

    def put(self, key: SlotKey, value: V) -> V:
        self._values[key] = value
        self.nbytes += self._size(value)
        while len(self._values) > 1 and self.nbytes > self.max_bytes:
            self.nbytes -= self._size(self._values.popitem(last=False)[1])
        return value

    def __len__(self) -> int:
        return len(self._values)

    def values(self) -> list[V]:
        """The values held, least recently used first."""
        return list(self._values.values())

    def clear(self) -> None:
        self._values.clear()
        self.nbytes = 0


def _weights_bytes(weights: tuple[torch.Tensor, torch.Tensor]) -> int:
    return sum(w.numel() * w.element_size() for w in weights)


class HostExpertStore:
    """All routed experts of a model, one host buffer per MoE layer."""

    def __init__(
        self,
        shape: AnyExpertShape,
        layers: Sequence[int],
        num_experts: int,
        pin: bool,
        layer_shapes: Mapping[int, AnyExpertShape] | None = None,
        *,
        registrar: Registrar | None = None,
    ) -> None:
        self.shape = shape  # the row layout buffers and slots are allocated for
        self.num_experts = num_experts
        self._layer_shapes = dict(layer_shapes or {})
        self._decoded: BytesLRU[tuple[torch.Tensor, torch.Tensor]] = BytesLRU(
            HOST_DECODED_BYTES, _weights_bytes
        )
        for layer_shape in self._layer_shapes.values():
            assert layer_shape.numel <= shape.numel, "a layer's row must fit the store's row"
        per_layer = num_experts * shape.numel
        self._arena = HostArena(per_layer * len(layers), shape.dtype, pin, registrar)
        self.pinned = self._arena.pinned
        self.warning = self._arena.warning  # why pinning fell back to pageable memory
        self._buffers = {
            layer: self._arena.view(i * per_layer, num_experts, shape.numel)
            for i, layer in enumerate(layers)
        }  # each [E, numel]
        self._parts: dict[SlotKey, Sequence[ExpertPart]] = {}
        self._checked: set[SlotKey] = set()  # experts found finite on their first use
        self.packed: PackedExperts | None = None  # CPU assist from int4 kernels (packed.py)

    @property
    def layers(self) -> list[int]:
        return list(self._buffers)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def buffers(self) -> list[torch.Tensor]:
        return list(self._buffers.values())

    def host_weights(self, key: SlotKey) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up, down) of an expert in host memory, for the CPU to compute it (CPU assist).

        Full-precision rows give views; quantized rows are decoded once and kept in an LRU of
        at most ``HOST_DECODED_BYTES`` (at least one expert), so an expert the CPU keeps
        computing is not decoded at every token.
        """
        shape, row = self.layer_shape(key[0]), self.row(key)
        if not isinstance(shape, QuantizedExpertShape):
            return shape.gate_up(row), shape.down(row)
        return self._decoded_once(key, lambda: (shape.gate_up(row), shape.down(row)))

    def _decoded_once(
        self, key: SlotKey, decode: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``decode()`` of ``key`` kept in the LRU of at most ``HOST_DECODED_BYTES``."""
        held = self._decoded.get(key)
        return held if held is not None else self._decoded.put(key, decode())

    def packed_expert(self, key: SlotKey) -> PackedExpert | None:
        """Expert ``key`` in torch's int4 layout for CPU assist, when that is on and the
        expert's blocks convert (``engine.offload.packed``); else None (use ``host_weights``)."""
        if self.packed is None:
            return None
        shape = self.layer_shape(key[0])
        if not isinstance(shape, QuantizedExpertShape):
            return None
        return self.packed.get(key, shape, lambda: self.row(key))

    def read_ahead(self, keys: Sequence[SlotKey]) -> None:
        """Start reading ``keys`` ahead of their ``row`` calls; rows in RAM need nothing."""

    @property
    def reads_ahead_early(self) -> bool:
        """Whether a read-ahead a layer before the copy helps (a mapped file's disk reads)."""
        return False

    def to_planar_q8_0(self) -> bool:
        """Rewrite every Q8_0 part of every row in place in the planar layout the CPU decodes
        about twice as fast (``q8_0_to_planar``: same bytes, quants then scales).

        Only for a store whose rows nothing else reads as GGML blocks (``DecodedStore``'s, on
        the CPU, where nothing is copied to a GPU). Returns whether any part was rewritten.
        """
        rewritten = False
        for layer, buffer in self._buffers.items():  # each [E, numel]
            shape = self.layer_shape(layer)
            if not isinstance(shape, QuantizedExpertShape):
                continue
            for start, size in shape.q8_0_spans():
                q8_0_to_planar(buffer[:, start : start + size])
                rewritten = True
        return rewritten

    def row_into(self, key: SlotKey, out: torch.Tensor) -> torch.Tensor | None:
        """The host row to copy into the slot ``out``; ``None`` when this wrote ``out`` itself."""
        return self.row(key)

    def layer_shape(self, layer: int) -> AnyExpertShape:
        """How ``layer``'s rows are laid out (GGUF files may mix block types across layers)."""
        return self._layer_shapes.get(layer, self.shape)

    def source_bytes(self, layer: int) -> int:
        """Bytes one of ``layer``'s experts takes from this store into a cache slot: what a
        transfer moves (quantized bytes for quantized experts, even where the slot decodes)."""
        return self.layer_shape(layer).nbytes

    def row(self, key: SlotKey) -> torch.Tensor:
        """Expert ``key``'s flat host row [numel]; checked for NaN/inf the first time it is used."""
        row = self._row(key)
        self._check_first_use(key, row)
        return row

    def _check_first_use(self, key: SlotKey, row: torch.Tensor) -> None:
        if key in self._checked:
            return
        parts = self._parts.get(key, ())
        # a read of host memory, never a device sync: kept out of torch-function and
        # dispatch modes so the op/sync counter (engine.eval.opcount) does not count it as
        # one on a CPU run, where host and device are the same memory
        with torch._C.DisableTorchFunction(), _disable_current_modes():
            check_finite(((p.key, self.shape.part_view(row, p.part)) for p in parts), "expert")
        self._checked.add(key)

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
        """Unlock and drop the host memory (the cache has waited for its copies first)."""
        self._buffers.clear()
        self._decoded.clear()
        if self.packed is not None:
            self.packed.clear()
        self._arena.close()
        self.pinned = False


class DecodedStore(HostExpertStore):
    """A quantized store seen through float rows: ``row`` decodes the expert on the host.

    For the CPU device, where the "device" cache is host memory too: slots hold decoded float
    experts, so an expert is decoded once when the cache takes it in, not at every use, while
    the store keeps every expert quantized in RAM. ``nbytes`` is the quantized store's.
    """

    def __init__(self, inner: HostExpertStore, dtype: torch.dtype) -> None:
        shape = inner.shape
        super().__init__(
            ExpertShape(shape.hidden, shape.intermediate, dtype), [], inner.num_experts, False
        )
        self.inner = inner
        self.planar = inner.to_planar_q8_0()  # Q8_0 rows in RAM: the faster CPU layout

    @property
    def layers(self) -> list[int]:
        return self.inner.layers

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes

    def source_bytes(self, layer: int) -> int:
        return self.inner.source_bytes(layer)

    def host_weights(self, key: SlotKey) -> tuple[torch.Tensor, torch.Tensor]:
        """CPU assist's float weights, decoded once into the LRU (not at every call)."""
        shape = self.shape
        assert isinstance(shape, ExpertShape), "decoded rows are float rows"

        def decode() -> tuple[torch.Tensor, torch.Tensor]:
            row = self.row(key)
            return shape.gate_up(row), shape.down(row)

        return self._decoded_once(key, decode)

    def row(self, key: SlotKey) -> torch.Tensor:
        row = torch.empty(self.shape.numel, dtype=self.shape.dtype)
        self._decode(key, row)
        return row

    def row_into(self, key: SlotKey, out: torch.Tensor) -> torch.Tensor | None:
        """A slot in host memory is decoded into directly (no float row in between)."""
        if out.device.type != "cpu" or out.numel() != self.shape.numel:
            return self.row(key)
        self._decode(key, out)
        return None

    def _decode(self, key: SlotKey, out: torch.Tensor) -> None:
        shape, quantized = self.shape, self.inner.layer_shape(key[0])
        assert isinstance(shape, ExpertShape), "decoded rows are float rows"
        assert isinstance(quantized, QuantizedExpertShape), "a decoded store wraps quantized rows"
        quantized.decode_into(self.inner.row(key), shape, out, self.planar)

    def packed_expert(self, key: SlotKey) -> PackedExpert | None:
        return self.inner.packed_expert(key)

    def read_ahead(self, keys: Sequence[SlotKey]) -> None:
        self.inner.read_ahead(keys)

    @property
    def reads_ahead_early(self) -> bool:
        return self.inner.reads_ahead_early

    def close(self) -> None:
        self.inner.close()
        super().close()


DECODE_ON_COPY_DEVICES = frozenset({"cpu"})  # slots there hold decoded experts (see DecodedStore)


def decodes_on_copy(
    shape: AnyExpertShape, device: torch.device, quantized_slots: bool | None = None
) -> bool:
    """Whether experts of ``shape`` are decoded as the cache on ``device`` takes them in.

    ``quantized_slots`` overrides the per-device default (quantized slots on CUDA, where bytes
    cross PCIe; decoded slots on the CPU, where decoding at every use would cost compute).
    """
    return isinstance(shape, QuantizedExpertShape) and decodes_on(device, quantized_slots)


def decodes_on(device: torch.device, quantized_slots: bool | None = None) -> bool:
    """Whether a cache on ``device`` decodes quantized experts into its slots (``decodes_on_copy``
    for any quantized shape)."""
    if quantized_slots is not None:
        return not quantized_slots
    return device.type in DECODE_ON_COPY_DEVICES


def slot_bytes(
    shape: AnyExpertShape, device: torch.device, dtype: torch.dtype, quantized_slots: bool | None
) -> int:
    """Bytes of one cache slot for experts of ``shape`` on ``device``."""
    if decodes_on_copy(shape, device, quantized_slots):
        return ExpertShape(shape.hidden, shape.intermediate, dtype).nbytes
    return shape.nbytes


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
