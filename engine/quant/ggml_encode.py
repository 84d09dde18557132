"""Writing GGML blocks: float weights in, raw GGUF bytes out (numpy).

``gguf.quants.quantize`` already writes F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 exactly as
llama.cpp does; this module adds the K-quants the common ``Q4_K_M``/``Q5_K_M``/``Q6_K`` files use
(Q4_K, Q5_K, Q6_K), with ggml's reference scale searches (``engine.quant.ggml_kquant``), so every
block type it writes has the bytes ``llama-quantize`` writes without an importance matrix, and
with one (``importance``: ``engine.quant.ggml_weighted``'s ports of the ``*_impl`` searches)
the bytes ``llama-quantize --imatrix`` writes (tested against blocks ggml wrote:
``tests/engine/test_ggml_reference.py``).

Used to convert models to GGUF (``engine.gguf.writer``) and to build test fixtures. Legend:
``n`` super-blocks of ``K`` = 256 weights.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize

from engine.quant import ggml_weighted
from engine.quant.ggml_kquant import (
    F32,
    GROUP_MAX_EPS,
    half_round,
    make_qkx2_quants,
    make_qx_quants,
    seq_sum,
)

QK_K = 256
Q = GGMLQuantizationType


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins [n, 8] -> the 12-byte packing of Q4_K/Q5_K."""
    low = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    mid = (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6)
    high = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return np.concatenate([low, mid, high], axis=-1).astype(np.uint8)


def _six_bits(values: np.ndarray, top: np.ndarray) -> np.ndarray:
    """``MIN(63, (uint8_t)nearest_int(63 / top * values))`` per super-block: [n, 8] uint8."""
    with np.errstate(divide="ignore"):
        inverse = np.where(top > 0, F32(63) / top, F32(0))  # [n]
    return np.minimum(np.rint(inverse[:, None] * values).astype(np.int64) & 0xFF, 63)


def _k_quants(x: np.ndarray, nmax: int, rmin: float, nstep: int) -> tuple[np.ndarray, np.ndarray]:
    """``quantize_row_q{4,5}_K_ref``: (header bytes [n, 16], levels [n, 8, 32] uint8)."""
    sub = x.reshape(-1, 32)  # [8n, 32]
    spread = np.sqrt(seq_sum(sub * sub) / F32(32))
    weights = spread[:, None] + np.abs(sub)
    scale, the_min, levels = make_qkx2_quants(sub, weights, nmax, rmin, 0.1, nstep)
    scale, the_min = scale.reshape(-1, 8), the_min.reshape(-1, 8)
    top_scale, top_min = np.maximum(scale.max(axis=1), 0), np.maximum(the_min.max(axis=1), 0)
    sc, mn = _six_bits(scale, top_scale), _six_bits(the_min, top_min)
    d_bytes, d = half_round(top_scale / F32(63))
    m_bytes, dmin = half_round(top_min / F32(63))
    step = d[:, None] * sc.astype(F32)  # [n, 8]
    offset = (dmin[:, None] * mn.astype(F32))[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        fresh = np.clip(np.rint((x.reshape(-1, 8, 32) + offset) / step[..., None]), 0, nmax)
    levels = np.where(step[..., None] == 0, levels.reshape(-1, 8, 32), fresh).astype(np.uint8)
    header = np.concatenate([d_bytes, m_bytes, _pack_k_scales(sc, mn)], axis=-1)
    return header, levels


def _nibble_pack(q: np.ndarray) -> np.ndarray:
    """[n, 8, 32] 4-bit values -> 128 bytes: sub-block 2i in low nibbles, 2i+1 in high."""
    pairs = (q & 0x0F).reshape(-1, 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)


def _k_levels(x: np.ndarray, qw: np.ndarray | None, qtype: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K (header, levels): the reference search, or the weighted one given ``qw``."""
    if qw is not None:
        return ggml_weighted.k_quant(x, qw, qtype)
    return _k_quants(x, 15, -1.0, 20) if qtype == Q.Q4_K else _k_quants(x, 31, -0.5, 15)


def encode_q4_k(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    header, q = _k_levels(x, qw, Q.Q4_K)
    return np.concatenate([header, _nibble_pack(q)], axis=-1)


def encode_q5_k(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    header, q = _k_levels(x, qw, Q.Q5_K)
    bits = ((q >> 4) & 1).astype(np.uint8)  # [n, 8, 32]: bit j of byte c is sub-block j
    qh = np.zeros((q.shape[0], 32), dtype=np.uint8)
    for j in range(8):
        qh |= bits[:, j] << j
    return np.concatenate([header, qh, _nibble_pack(q)], axis=-1)


def _q6_k_levels(x: np.ndarray, qw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``quantize_row_q6_K_ref`` (``_impl`` given ``qw``): (d bytes [n, 2], int8 scales [n, 16],
    levels [n, 16, 16])."""
    if qw is None:
        scale, levels = make_qx_quants(x.reshape(-1, 16), 32)
        scale = scale.reshape(-1, 16)
    else:
        scale, levels = ggml_weighted.q6_k_levels(x, qw)
    peak = scale[np.arange(scale.shape[0]), np.abs(scale).argmax(axis=1)]  # first largest |s|
    zero = np.abs(peak) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(-128) / np.where(zero, F32(1), peak)
        d_bytes, d = half_round(F32(1) / iscale)
        sc = np.minimum(np.rint(iscale[:, None] * scale), 127).astype(np.int8)
        step = (d[:, None] * sc.astype(F32))[..., None]  # [n, 16, 1]
        fresh = np.clip(np.rint(x.reshape(-1, 16, 16) / step), -32, 31) + 32
    levels = np.where(step == 0, levels.reshape(-1, 16, 16), fresh).astype(np.uint8)
    d_bytes[zero], sc[zero], levels[zero] = 0, 0, 0
    return d_bytes, sc, levels


def encode_q6_k(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    d_bytes, sc, levels = _q6_k_levels(x, qw)
    q = levels.reshape(-1, 2, 2, 64)  # halves of 128, two 64-wide nibble groups
    ql = ((q[:, :, 0] & 0x0F) | ((q[:, :, 1] & 0x0F) << 4)).reshape(-1, 128)
    high = (q.reshape(-1, 2, 4, 32) >> 4) & 0x03
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return np.concatenate([ql, qh.reshape(-1, 64), sc.view(np.uint8), d_bytes], axis=-1)


_K_ENCODERS = {Q.Q4_K: encode_q4_k, Q.Q5_K: encode_q5_k, Q.Q6_K: encode_q6_k}


def _importance(importance: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """``importance`` ([cols] for every row, or [rows, cols]) as float32 [rows, cols]."""
    qw = np.asarray(importance, dtype=np.float32)
    if qw.shape not in ((cols,), (rows, cols)):
        raise ValueError(f"importance of shape {qw.shape} does not fit rows of {cols} weights")
    return np.broadcast_to(qw, (rows, cols))


def encode(weights: np.ndarray, qtype: int, importance: np.ndarray | None = None) -> np.ndarray:
    """fp32 ``[rows, cols]`` -> GGUF bytes ``[rows, bytes per row]`` (F32/F16 keep their dtype).

    ``importance`` (an importance-matrix row, ``[cols]`` or per row ``[rows, cols]``) switches
    every type but F32, F16, BF16 and Q8_0 (which ignore it in ggml too) to ggml's weighted
    searches, as ``llama-quantize --imatrix`` does."""
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    rows, cols = weights.shape
    qw = None if importance is None else _importance(importance, rows, cols)
    encoder = _K_ENCODERS.get(Q(qtype))
    if encoder is None:
        if qw is None or Q(qtype) not in ggml_weighted.LEGACY:
            return gguf_quantize(weights, Q(qtype))
        if cols % 32:
            raise ValueError(f"rows of {cols} weights do not fill whole {Q(qtype).name} blocks")
        return ggml_weighted.legacy(weights, qw, qtype).reshape(rows, -1)
    if cols % QK_K:
        raise ValueError(f"rows of {cols} weights do not fill whole {Q(qtype).name} blocks")
    flat_qw = None if qw is None else qw.reshape(-1, QK_K)
    return encoder(weights.reshape(-1, QK_K), flat_qw).reshape(rows, -1)
