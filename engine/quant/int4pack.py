"""4-bit GGML blocks repacked for torch's CPU int4 matmul (``_weight_int4pack_mm_for_cpu``).

torch's CPU kernel computes ``x @ W.T`` from 4-bit weights packed two per byte with one scale
and one zero per group of ``group`` inputs, where ``w = (q - 8) * scale + zero`` (``q`` in
0..15; the formula of ``torch.testing._internal.common_quantization._group_quantize_tensor``).
Q4_0, Q4_1 and Q4_K are each exactly that with groups of 32:

- Q4_0: ``w = d * (q - 8)``            -> scale ``d``, zero ``0``
- Q4_1: ``w = d * q + m``              -> scale ``d``, zero ``m + 8d``
- Q4_K: ``w = d*sc * q - dmin*mn``     -> scale ``d*sc``, zero ``8*d*sc - dmin*mn`` (per 32)

so the quants are kept as they are and only rearranged; the weights the kernel sees equal the
GGML decoder's up to the rounding of ``zero`` (computed in fp32) and of the kernel's own sums.
Scales and zeros must have the activations' dtype on the CPU (fp32 for fp32 compute): 8 bytes
per 32 weights, so a packed matrix keeps 6 bits per weight (Q4_1 in GGML: 5).

Legend: ``N`` output features (rows), ``K`` inputs (columns), ``G = K / 32`` groups per row.
This module converts and multiplies; which experts are packed, and when, is the caller's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.quant.ggml_blocks import Q, _f16, _k_affine, _nibbles, type_name

GROUP = 32
ROW_TILE = 16  # _convert_weight_to_int4pack_for_cpu: "expect N to be dividable by 16"
PACKABLE = frozenset({Q.Q4_0, Q.Q4_1, Q.Q4_K})


def can_pack(qtype: int, shape: tuple[int, int]) -> bool:
    """Whether an ``[N, K]`` weight in ``qtype`` converts to torch's int4 layout (the kernel
    wants ``N`` a multiple of 16 and ``K`` of the group)."""
    rows, columns = shape
    return qtype in PACKABLE and rows % ROW_TILE == 0 and columns % GROUP == 0


@dataclass(frozen=True)
class PackedInt4:
    """One ``[N, K]`` weight in torch's CPU int4 layout."""

    weight: torch.Tensor  # [N, K/2] uint8
    scales_zeros: torch.Tensor  # [G, N, 2], the compute dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scales_zeros))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, K] @ W.T`` -> ``[T, N]`` in ``x``'s dtype (which must be the scales')."""
        return torch._weight_int4pack_mm_for_cpu(x, self.weight, GROUP, self.scales_zeros)


def _quants_scales_zeros(
    raw: torch.Tensor, qtype: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw blocks -> quants ``[n32, 32]`` uint8 and ``[n32, 1]`` fp32 scales and zeros."""
    if qtype == Q.Q4_0:
        blocks = raw.reshape(-1, 18)
        d = _f16(blocks[:, :2])
        return _nibbles(blocks[:, 2:], 16).reshape(-1, GROUP), d, torch.zeros_like(d)
    if qtype == Q.Q4_1:
        blocks = raw.reshape(-1, 20)
        d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
        return _nibbles(blocks[:, 4:], 16).reshape(-1, GROUP), d, m + 8 * d
    if qtype == Q.Q4_K:
        blocks = raw.reshape(-1, 144)
        d, dm = _k_affine(blocks)  # [n, 8, 1] each: the 8 sub-blocks of 32
        quants = _nibbles(blocks[:, 16:], 32).reshape(-1, GROUP)
        return quants, d.reshape(-1, 1), (8 * d - dm).reshape(-1, 1)
    raise ValueError(f"{type_name(qtype)} blocks have no int4 layout (Q4_0, Q4_1, Q4_K have)")


def pack(raw: torch.Tensor, qtype: int, shape: tuple[int, int], dtype: torch.dtype) -> PackedInt4:
    """GGML bytes of an ``[N, K]`` weight (CPU uint8) -> torch's int4 layout, ``dtype`` scales."""
    n, k = shape
    if not can_pack(qtype, shape):
        raise ValueError(
            f"a {type_name(qtype)} [{n}, {k}] weight cannot be packed as int4 (Q4_0/Q4_1/Q4_K, "
            f"rows a multiple of {ROW_TILE}, row length a multiple of {GROUP})"
        )
    quants, scales, zeros = _quants_scales_zeros(raw, qtype)
    weight = torch._convert_weight_to_int4pack_for_cpu(quants.reshape(n, k).to(torch.int32), 1)
    pairs = torch.cat([scales, zeros], dim=-1).reshape(n, k // GROUP, 2)  # [N, G, 2]
    return PackedInt4(weight, pairs.transpose(0, 1).contiguous().to(dtype))  # [G, N, 2]
