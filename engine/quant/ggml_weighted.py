"""GGML blocks quantized with an importance matrix, as ``llama-quantize --imatrix`` writes them.

With importance weights ``qw`` (one per input column: the mean squared activation that column
sees, ``engine.quant.imatrix``), ggml's ``quantize_q*`` call the ``quantize_row_*_impl``
functions of ggml-quants.c instead of the reference ones, and every type but Q8_0 changes:

- Q4_0 / Q5_0: ``make_qx_quants`` per 32 weights with weights ``qw * sqrt(sigma2 + x^2)``
  (``sigma2``: the row's mean square);
- Q4_1 / Q5_1: ``make_qkx3_quants`` (the affine search, 37 steps of 0.05) with those weights;
- Q4_K / Q5_K: the same affine search per 32 weights (``sigma2`` twice the super-block's mean
  square), then the eight sub-block scales and minimums to 6 bits by ``make_qp_quants``
  weighted by each sub-block's summed weights;
- Q6_K: ``make_qx_quants`` per 16 weights weighted by ``qw`` itself.

The arithmetic is ``engine.quant.ggml_kquant``'s float32 ports; bytes equal ggml's
(``tests/engine/test_ggml_reference.py``). Legend: ``N`` blocks, ``n`` super-blocks.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from engine.quant.ggml_kquant import (
    F32,
    half_round,
    make_qkx2_quants,
    make_qp_quants,
    make_qx_quants,
    seq_sum,
)

Q = GGMLQuantizationType
QK = 32
QK_K = 256


def _legacy_weights(rows: np.ndarray, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(blocks [N, 32], weights [N, 32]) of ``rows`` [R, C] with importance ``qw`` [R, C]."""
    sigma2 = seq_sum(rows * rows) / F32(rows.shape[1])  # [R]
    weights = qw * np.sqrt(sigma2[:, None] + rows * rows)
    return rows.reshape(-1, QK), weights.reshape(-1, QK)


def _halves(blocks: np.ndarray) -> np.ndarray:
    """[N, 32] 4-bit levels -> 16 bytes: weight j in the low nibble, j + 16 in the high."""
    return (blocks[:, :16] & 0x0F) | ((blocks[:, 16:] & 0x0F) << 4)


def _fifth_bits(levels: np.ndarray) -> np.ndarray:
    """The 5th bit of each of 32 levels as a little-endian uint32: [N, 4] bytes."""
    bits = ((levels.astype(np.uint32) >> 4) & 1) << np.arange(32, dtype=np.uint32)
    return np.bitwise_or.reduce(bits, axis=1).astype("<u4").view(np.uint8).reshape(-1, 4)


def _symmetric(rows: np.ndarray, qw: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    blocks, weights = _legacy_weights(rows, qw)
    scale, levels = make_qx_quants(blocks, nmax, weights)
    return half_round(scale)[0], levels


def _affine(rows: np.ndarray, qw: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    blocks, weights = _legacy_weights(rows, qw)
    scale, the_min, levels = make_qkx2_quants(blocks, weights, nmax, -0.9, 0.05, 36)
    header = np.concatenate([half_round(scale)[0], half_round(-the_min)[0]], axis=-1)
    return header, levels


def legacy(rows: np.ndarray, qw: np.ndarray, qtype: int) -> np.ndarray:
    """Q4_0 / Q4_1 / Q5_0 / Q5_1 blocks of ``rows`` [R, C] with importance ``qw`` [R, C]."""
    five_bits = qtype in (Q.Q5_0, Q.Q5_1)
    nmax = 16 if five_bits else 8
    if qtype in (Q.Q4_0, Q.Q5_0):
        header, levels = _symmetric(rows, qw, nmax)
    else:
        header, levels = _affine(rows, qw, 2 * nmax - 1)
    high = [_fifth_bits(levels)] if five_bits else []
    return np.concatenate([header, *high, _halves(levels)], axis=-1)


def _pack_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """quantize_row_q{4,5}_K_impl's packing of 8 scales and mins [n, 8] (uint8 arithmetic)."""
    ls, lm = ls.astype(np.int64), lm.astype(np.int64)
    low = (ls[:, :4] | ((ls[:, 4:] >> 4) << 6)) & 0xFF
    mid = (lm[:, :4] | ((lm[:, 4:] >> 4) << 6)) & 0xFF
    high = ((ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)) & 0xFF
    return np.concatenate([low, mid, high], axis=-1).astype(np.uint8)


def _unpack_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's ``get_scale_min_k4`` for j = 0..7: (scales, mins) [n, 8] as float32."""
    q = packed.astype(np.int64)
    sc = np.concatenate([q[:, :4] & 63, (q[:, 8:] & 0x0F) | ((q[:, :4] >> 6) << 4)], axis=1)
    mn = np.concatenate([q[:, 4:8] & 63, (q[:, 8:] >> 4) | ((q[:, 4:8] >> 6) << 4)], axis=1)
    return sc.astype(F32), mn.astype(F32)


def _k_weighted(x: np.ndarray, qw: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``quantize_row_q{4,5}_K_impl`` on super-blocks x [n, 256]: (header [n, 16], levels)."""
    sigma2 = F32(2) * seq_sum(x * x) / F32(QK_K)  # [n]
    weights = qw * np.sqrt(sigma2[:, None] + x * x)
    sub, sub_w = x.reshape(-1, QK), weights.reshape(-1, QK)
    scale, the_min, levels = make_qkx2_quants(sub, sub_w, nmax, -0.9, 0.05, 36)
    sw = seq_sum(sub_w).reshape(-1, 8)
    d_block, ls = make_qp_quants(scale.reshape(-1, 8), 63, sw)
    m_block, lm = make_qp_quants(the_min.reshape(-1, 8), 63, sw)
    if nmax == 31:
        ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
    packed = _pack_scales(ls, lm)
    (d_bytes, d), (m_bytes, dmin) = half_round(d_block), half_round(m_block)
    sc, mn = _unpack_scales(packed)
    step = (d[:, None] * sc)[..., None]  # [n, 8, 1]
    offset = (dmin[:, None] * mn)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        fresh = np.clip(np.rint((x.reshape(-1, 8, QK) + offset) / step), 0, nmax)
    levels = np.where(step == 0, levels.reshape(-1, 8, QK), fresh).astype(np.uint8)
    return np.concatenate([d_bytes, m_bytes, packed], axis=-1), levels


def q6_k_levels(x: np.ndarray, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``make_qx_quants(16, 32, x, L, 1, qw)`` per 16 weights: (scales [n, 16], levels)."""
    scale, levels = make_qx_quants(x.reshape(-1, 16), 32, qw.reshape(-1, 16))
    return scale.reshape(-1, 16), levels


def k_quant(x: np.ndarray, qw: np.ndarray, qtype: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K header and levels of super-blocks ``x`` [n, 256] with importance ``qw``."""
    return _k_weighted(x, qw, 15 if qtype == Q.Q4_K else 31)


LEGACY = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)
