"""ggml's reference K-quant encoders, ported to numpy so their bytes equal llama-quantize's.

Without an importance matrix ``llama-quantize`` writes Q4_K, Q5_K and Q6_K blocks with
``quantize_row_q{4,5,6}_K_ref`` (ggml-quants.c), whose scale searches are ``make_qkx2_quants``
(Q4_K, Q5_K: an affine grid search per 32 weights) and ``make_qx_quants`` (Q6_K: a symmetric
search per 16 weights). This module runs the same float32 arithmetic in the same order,
vectorized over sub-blocks: every C sum is a left-to-right float32 accumulation
(``np.add.accumulate``, never numpy's pairwise ``sum``), ``nearest_int`` is round-half-even
(``np.rint``) and fp16 conversion rounds to nearest even, as ggml's do. The result equals
ggml's bytes on x86-64 builds, where ggml-base is compiled without fused multiply-adds
(``tests/engine/test_ggml_reference.py`` checks it against blocks ggml wrote). Packing the bytes
into blocks is ``engine.quant.ggml_encode``'s job. Legend: ``N`` sub-blocks, ``n`` weights each.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)


def seq_sum(values: np.ndarray) -> np.ndarray:
    """[N, n] -> [N]: summed left to right in float32, as a C ``for`` loop does."""
    return np.add.accumulate(values.astype(F32, copy=False), axis=-1, dtype=F32)[:, -1]


def half_round(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fp32 -> (fp16 bytes [..., 2], the fp32 value of the stored half)."""
    halves = np.asarray(values, dtype=F32).astype(np.float16)
    return halves.view(np.uint8).reshape(*halves.shape, 2), halves.astype(F32)


def _levels(scaled: np.ndarray, low: int, high: int) -> np.ndarray:
    """``MAX(low, MIN(high, nearest_int(scaled)))`` as float32 levels."""
    return np.clip(np.rint(scaled), low, high).astype(F32)


def _affine_error(x: np.ndarray, w: np.ndarray, levels: np.ndarray, scale: np.ndarray,
                  low: np.ndarray) -> np.ndarray:  # fmt: skip
    diff = (scale[:, None] * levels + low[:, None]) - x  # [N, n]
    return seq_sum(w * (diff * diff))


def make_qkx2_quants(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's ``make_qkx2_quants`` on [N, n]: (scale [N], the_min [N], levels [N, n] uint8)."""
    low = np.minimum(x.min(axis=1), 0)  # [N]
    high = x.max(axis=1)
    flat = high == low
    sum_w, sum_x = seq_sum(w), seq_sum(w * x)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(nmax) / (high - low)
        scale = F32(1) / iscale
        levels = _levels(iscale[:, None] * (x - low[:, None]), 0, nmax)
        best = _affine_error(x, w, levels, scale, low)
        for step in range(nstep + 1):
            iscale = ((F32(rmin) + F32(rdelta) * F32(step)) + F32(nmax)) / (high - low)
            trial = _levels(iscale[:, None] * (x - low[:, None]), 0, nmax)
            sum_l, sum_l2 = seq_sum(w * trial), seq_sum(w * trial * trial)
            sum_xl = seq_sum(w * trial * x)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            clamp = this_min > 0
            this_min = np.where(clamp, F32(0), this_min)
            this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
            error = _affine_error(x, w, trial, this_scale, this_min)
            better = (det > 0) & (error < best) & ~flat
            levels = np.where(better[:, None], trial, levels)
            best = np.where(better, error, best)
            scale = np.where(better, this_scale, scale)
            low = np.where(better, this_min, low)
    levels = np.where(flat[:, None], F32(0), levels)
    return np.where(flat, F32(0), scale), -low, levels.astype(np.uint8)


def _qx_sums(x: np.ndarray, iscale: np.ndarray, nmax: int) -> tuple[np.ndarray, ...]:
    """One trial of ``make_qx_quants`` (rmse_type 1): (levels l [N, n], sum_lx, sum_l2)."""
    trial = _levels(iscale[:, None] * x, -nmax, nmax - 1)
    w = x * x
    return trial, seq_sum(w * x * trial), seq_sum(w * trial * trial)


def make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's ``make_qx_quants(n, nmax, x, L, rmse_type=1, NULL)`` on [N, n]: (scale, L uint8)."""
    peak = x[np.arange(x.shape[0]), np.abs(x).argmax(axis=1)]  # first largest |x|, signed
    zero = np.abs(peak) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        levels, sum_lx, sum_l2 = _qx_sums(x, F32(-nmax) / peak, nmax)
        scale = np.where(sum_l2 != 0, sum_lx / sum_l2, F32(0))
        best = scale * sum_lx
        for step in (*range(-9, 0), *range(1, 10)):
            iscale = -(F32(nmax) + F32(0.1) * F32(step)) / peak
            trial, trial_lx, trial_l2 = _qx_sums(x, iscale, nmax)
            better = (trial_l2 > 0) & (trial_lx * trial_lx > best * trial_l2)
            levels = np.where(better[:, None], trial, levels)
            scale = np.where(better, trial_lx / trial_l2, scale)
            best = np.where(better, scale * trial_lx, best)
    levels = np.where(zero[:, None], F32(0), levels + nmax)
    return np.where(zero, F32(0), scale), levels.astype(np.uint8)
