"""ggml's reference K-quant encoders, ported to numpy so their bytes equal llama-quantize's.

Without an importance matrix ``llama-quantize`` writes Q4_K, Q5_K and Q6_K blocks with
``quantize_row_q{4,5,6}_K_ref`` (ggml-quants.c), whose scale searches are ``make_qkx2_quants``
(Q4_K, Q5_K: an affine grid search per 32 weights) and ``make_qx_quants`` (Q6_K: a symmetric search
per 16 weights). With an importance matrix the ``quantize_row_*_impl`` functions weight the same
searches by it (``make_qkx3_quants`` is ``make_qkx2_quants`` with other steps) and choose the 6-bit
K-quant sub-block scales with ``make_qp_quants`` (``engine.quant.ggml_weighted``). This module runs
the same float32 arithmetic in the same order, vectorized over sub-blocks: every C sum is a
left-to-right float32 accumulation (``np.add.accumulate``, never numpy's pairwise ``sum``; C's
``a*b*c`` is ``(a*b)*c``), ``nearest_int`` is round-half-even (``np.rint``) and fp16 conversion
rounds to nearest even, as ggml's do. The result equals ggml's bytes on x86-64 builds, where
ggml-base is compiled without fused multiply-adds (``tests/engine/test_ggml_reference.py`` checks it
against blocks ggml wrote). Packing the bytes into blocks is ``engine.quant.ggml_encode``'s job.
Legend: ``N`` sub-blocks, ``n`` weights each.
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


def _qx_sums(x: np.ndarray, w: np.ndarray, iscale: np.ndarray, nmax: int) -> tuple[np.ndarray, ...]:
    """One trial of ``make_qx_quants`` (rmse_type 1): (levels l [N, n], sum_lx, sum_l2)."""
    trial = _levels(iscale[:, None] * x, -nmax, nmax - 1)
    return trial, seq_sum(w * x * trial), seq_sum(w * trial * trial)


def make_qx_quants(
    x: np.ndarray, nmax: int, qw: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """ggml's ``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)`` on [N, n]: (scale, L uint8).

    ``qw`` [N, n] are the importance weights (``NULL``: each weight's square)."""
    peak = x[np.arange(x.shape[0]), np.abs(x).argmax(axis=1)]  # first largest |x|, signed
    zero = np.abs(peak) < GROUP_MAX_EPS
    w = x * x if qw is None else qw
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        levels, sum_lx, sum_l2 = _qx_sums(x, w, F32(-nmax) / peak, nmax)
        scale = np.where(sum_l2 != 0, sum_lx / sum_l2, F32(0))
        best = scale * sum_lx
        for step in (*range(-9, 0), *range(1, 10)):
            iscale = -(F32(nmax) + F32(0.1) * F32(step)) / peak
            trial, trial_lx, trial_l2 = _qx_sums(x, w, iscale, nmax)
            better = (trial_l2 > 0) & (trial_lx * trial_lx > best * trial_l2)
            levels = np.where(better[:, None], trial, levels)
            scale = np.where(better, trial_lx / trial_l2, scale)
            best = np.where(better, scale * trial_lx, best)
    levels = np.where(zero[:, None], F32(0), levels + nmax)
    return np.where(zero, F32(0), scale), levels.astype(np.uint8)


def _qp_error(x: np.ndarray, w: np.ndarray, scale: np.ndarray, levels: np.ndarray) -> np.ndarray:
    diff = x - scale[:, None] * levels
    return seq_sum(w * diff * diff)


def _qp_start(x: np.ndarray, w: np.ndarray, top: np.ndarray, nmax: int) -> np.ndarray:
    """The first search of ``make_qp_quants``: the inverse scale of least weighted error."""
    iscale = F32(nmax) / top
    levels = np.rint(iscale[:, None] * x).astype(np.int64) & 0xFF  # stored in uint8 L[]
    best = _qp_error(x, w, F32(1) / iscale, levels.astype(F32))
    for step in (*range(-4, 0), *range(1, 5)):
        trial_iscale = (F32(0.1) * F32(step) + F32(nmax)) / top
        trial = np.minimum(np.rint(trial_iscale[:, None] * x), nmax).astype(F32)
        error = _qp_error(x, w, F32(1) / trial_iscale, trial)
        better = error < best
        best = np.where(better, error, best)
        iscale = np.where(better, trial_iscale, iscale)
    return iscale


def _qp_refine(
    x: np.ndarray, w: np.ndarray, levels: np.ndarray, sums: tuple[np.ndarray, np.ndarray], nmax: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``make_qp_quants``'s coordinate descent: up to 5 passes, one weight at a time."""
    sum_lx, sum_l2 = sums
    for _ in range(5):
        changed = np.zeros(x.shape[0], dtype=bool)
        for i in range(x.shape[1]):
            xi, wi, li = x[:, i], w[:, i], levels[:, i].astype(F32)
            slx, sl2 = sum_lx - wi * xi * li, sum_l2 - wi * li * li
            usable = (slx > 0) & (sl2 > 0)
            new = np.minimum(np.rint(xi * sl2 / np.where(usable, slx, F32(1))), nmax)
            new_f = new.astype(F32)
            slx, sl2 = slx + wi * xi * new_f, sl2 + wi * new_f * new_f
            take = usable & (new != levels[:, i]) & (slx * slx * sum_l2 > sum_lx * sum_lx * sl2)
            levels[:, i] = np.where(take, new.astype(np.int64) & 0xFF, levels[:, i])
            sum_lx, sum_l2 = np.where(take, slx, sum_lx), np.where(take, sl2, sum_l2)
            changed |= take
        if not changed.any():
            break
    return levels, sum_lx, sum_l2


def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's ``make_qp_quants`` on [N, n] (non-negative values, e.g. sub-block scales) with
    importance ``qw`` [N, n]: (scale [N], levels [N, n] as the uint8 C stores)."""
    top = np.maximum(x.max(axis=1), F32(0))
    zero = top < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = _qp_start(x, qw, np.where(zero, F32(1), top), nmax)
        levels = np.minimum(np.rint(iscale[:, None] * x), nmax).astype(np.int64)
        level_f = levels.astype(F32)
        sums = seq_sum(qw * x * level_f), seq_sum(qw * level_f * level_f)
        levels, sum_lx, sum_l2 = _qp_refine(x, qw, levels & 0xFF, sums, nmax)
        scale = np.where(sum_l2 > 0, sum_lx / sum_l2, F32(0))
    levels[zero] = 0
    return np.where(zero, F32(0), scale).astype(F32), levels.astype(np.uint8)
