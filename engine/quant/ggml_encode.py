"""Writing GGML blocks: float weights in, raw GGUF bytes out (numpy).

``gguf.quants.quantize`` already writes F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 exactly as
llama.cpp does; this module adds plain round-to-nearest encoders for the K-quants the common
``Q4_K_M``/``Q5_K_M``/``Q6_K`` files use (Q4_K, Q5_K, Q6_K). They produce valid blocks that
llama.cpp and ``engine.quant.ggml_blocks`` decode identically; they do not search scales the way
llama.cpp's ``make_qkx2_quants`` does, so their error is somewhat larger than llama.cpp's.

Used to convert models to GGUF (``engine.gguf.writer``) and to build test fixtures. Legend:
``n`` super-blocks of ``K`` = 256 weights.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize

QK_K = 256
Q = GGMLQuantizationType


def _half(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fp32 [n] -> (fp16 bytes [n, 2], the fp32 value of the stored half [n, 1])."""
    halves = values.astype(np.float16)
    return halves.view(np.uint8).reshape(-1, 2), halves.astype(np.float32).reshape(-1, 1)


def _safe_inverse(values: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(values == 0, 0, 1 / np.where(values == 0, 1, values)).astype(np.float32)


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins [n, 8] -> the 12-byte packing of Q4_K/Q5_K."""
    low = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    mid = (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6)
    high = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return np.concatenate([low, mid, high], axis=-1).astype(np.uint8)


def _k_affine(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: (header bytes [n, 16], per-32 scales [n, 8, 1], per-32 mins [n, 8, 1])."""
    sub = x.reshape(-1, 8, 32)
    low = np.minimum(sub.min(axis=-1), 0)  # [n, 8]
    scale = (sub.max(axis=-1) - low) / levels
    d_bytes, d = _half(scale.max(axis=-1) / 63)
    m_bytes, dmin = _half((-low).max(axis=-1) / 63)
    sc = np.clip(np.rint(scale * _safe_inverse(d)), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(-low * _safe_inverse(dmin)), 0, 63).astype(np.uint8)
    header = np.concatenate([d_bytes, m_bytes, _pack_k_scales(sc, mn)], axis=-1)
    return header, (d * sc)[..., None], (dmin * mn)[..., None]


def _k_quants(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    header, scale, low = _k_affine(x, levels)
    q = np.rint((x.reshape(-1, 8, 32) + low) * _safe_inverse(scale))
    return header, np.clip(q, 0, levels).astype(np.uint8)  # [n, 8, 32]


def _nibble_pack(q: np.ndarray) -> np.ndarray:
    """[n, 8, 32] 4-bit values -> 128 bytes: sub-block 2i in low nibbles, 2i+1 in high."""
    pairs = (q & 0x0F).reshape(-1, 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)


def encode_q4_k(x: np.ndarray) -> np.ndarray:
    header, q = _k_quants(x, 15)
    return np.concatenate([header, _nibble_pack(q)], axis=-1)


def encode_q5_k(x: np.ndarray) -> np.ndarray:
    header, q = _k_quants(x, 31)
    bits = ((q >> 4) & 1).astype(np.uint8)  # [n, 8, 32]: bit j of byte c is sub-block j
    qh = np.zeros((q.shape[0], 32), dtype=np.uint8)
    for j in range(8):
        qh |= bits[:, j] << j
    return np.concatenate([header, qh, _nibble_pack(q)], axis=-1)


def encode_q6_k(x: np.ndarray) -> np.ndarray:
    sub = x.reshape(-1, 16, 16)
    scale = np.abs(sub).max(axis=-1) / 31  # [n, 16]
    d_bytes, d = _half(np.abs(scale).max(axis=-1) / 127)
    sc = np.clip(np.rint(scale * _safe_inverse(d)), -128, 127).astype(np.int8)
    step = d * sc.astype(np.float32)  # [n, 16]
    q = np.clip(np.rint(sub * _safe_inverse(step)[..., None]), -32, 31).astype(np.int16) + 32
    q = q.astype(np.uint8).reshape(-1, 2, 2, 64)  # halves of 128, two 64-wide nibble groups
    ql = ((q[:, :, 0] & 0x0F) | ((q[:, :, 1] & 0x0F) << 4)).reshape(-1, 128)
    high = (q.reshape(-1, 2, 4, 32) >> 4) & 0x03
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return np.concatenate([ql, qh.reshape(-1, 64), sc.view(np.uint8), d_bytes], axis=-1)


_K_ENCODERS = {Q.Q4_K: encode_q4_k, Q.Q5_K: encode_q5_k, Q.Q6_K: encode_q6_k}


def encode(weights: np.ndarray, qtype: int) -> np.ndarray:
    """fp32 ``[rows, cols]`` -> GGUF bytes ``[rows, bytes per row]`` (F32/F16 keep their dtype)."""
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    encoder = _K_ENCODERS.get(Q(qtype))
    if encoder is None:
        return gguf_quantize(weights, Q(qtype))
    rows, cols = weights.shape
    if cols % QK_K:
        raise ValueError(f"rows of {cols} weights do not fill whole {Q(qtype).name} blocks")
    return encoder(weights.reshape(-1, QK_K)).reshape(rows, -1)
