"""CPU assist from 4-bit experts without decoding them: torch's int4 kernel on repacked blocks.

An expert kept as Q4_0, Q4_1 or Q4_K blocks is converted once (when CPU assist first computes
it) into torch's CPU int4 layout (``engine.quant.int4pack``) and kept in a byte-bounded LRU;
its rows are then computed by ``_weight_int4pack_mm_for_cpu`` from 5 bits per weight (bf16
scales and zeros) instead of a bf16 copy (16 bits) decoded into ``HostExpertStore.host_weights``'
LRU. Only in bfloat16: torch's fp32 path of the kernel is 8-14x slower than an fp32 matmul of
the decoded expert. The results equal the decoded expert's within bf16 rounding, not bit for
bit, so ``LoadConfig.cpu_assist_int4`` turns it on by default only on CUDA, where a
CPU-computed expert is not bit-exact anyway; on the CPU device alpha 0 with CPU assist stays
exact. The measurement behind it is ``python -m engine.eval.cpu_assist_study``.

What it does not do: decide which experts the CPU computes (``engine.offload.cpu_assist``) or
pack anything that is not a 4-bit row of whole groups of 32 (``packable`` says).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.offload.store import BytesLRU, QuantizedExpertShape, SlotKey
from engine.quant.int4pack import PackedInt4, can_pack, pack

PACKED_BYTES = 1 << 30  # packed experts kept for CPU assist, as the decoded LRU's bound
# compute dtypes the kernel is fast in: its fp32 path was 8-14x slower than an fp32 matmul
# of the decoded expert (docs/QUANTIZED_EXPERTS.md, "CPU assist from 4-bit blocks")
KERNEL_DTYPES = frozenset({torch.bfloat16})


def packable(shape: QuantizedExpertShape) -> bool:
    """Every part of the expert converts to torch's int4 layout."""
    h, i = shape.hidden, shape.intermediate
    return (
        can_pack(shape.gate_type, (i, h))
        and can_pack(shape.up_type, (i, h))
        and can_pack(shape.down_type, (h, i))
    )


@dataclass(frozen=True)
class PackedExpert:
    """One expert in torch's int4 layout: ``gate [I, H]``, ``up [I, H]``, ``down [H, I]``."""

    gate: PackedInt4
    up: PackedInt4
    down: PackedInt4

    @property
    def nbytes(self) -> int:
        return self.gate.nbytes + self.up.nbytes + self.down.nbytes

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype the activations must have (the scales')."""
        return self.gate.scales_zeros.dtype

    def rows(self, x: torch.Tensor, act_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The expert's output ``[T, H]`` for ``x [T, H]`` (the eager expert's arithmetic)."""
        return self.down.matmul(act_fn(self.gate.matmul(x)) * self.up.matmul(x))


def pack_expert(shape: QuantizedExpertShape, row: torch.Tensor, dtype: torch.dtype) -> PackedExpert:
    """Convert the GGML row of one expert (CPU uint8) into torch's int4 layout."""
    h, i = shape.hidden, shape.intermediate
    return PackedExpert(
        pack(shape.part_view(row, "gate"), shape.gate_type, (i, h), dtype),
        pack(shape.part_view(row, "up"), shape.up_type, (i, h), dtype),
        pack(shape.part_view(row, "down"), shape.down_type, (h, i), dtype),
    )


class PackedExperts:
    """Experts converted on first use, least recently used dropped past ``max_bytes``."""

    def __init__(self, max_bytes: int = PACKED_BYTES) -> None:
        self._experts: BytesLRU[PackedExpert] = BytesLRU(max_bytes, lambda e: e.nbytes)
        self.max_bytes = max_bytes
        self.conversions = 0  # experts converted so far (a miss of this LRU)

    @property
    def nbytes(self) -> int:
        """Bytes of the experts held now."""
        return self._experts.nbytes

    def get(
        self, key: SlotKey, shape: QuantizedExpertShape, row: Callable[[], torch.Tensor]
    ) -> PackedExpert | None:
        """Expert ``key`` converted from ``row()`` the first time (and after it was dropped);
        None when its blocks do not convert or its compute dtype is not ``KERNEL_DTYPES``'."""
        held = self._experts.get(key)
        if held is not None:
            return held
        if shape.compute_dtype not in KERNEL_DTYPES or not packable(shape):
            return None
        self.conversions += 1
        return self._experts.put(key, pack_expert(shape, row(), shape.compute_dtype))

    def __len__(self) -> int:
        return len(self._experts)

    def clear(self) -> None:
        self._experts.clear()
