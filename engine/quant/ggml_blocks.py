"""GGML block formats decoded in torch: raw GGUF tensor bytes in, float weights out.

Each block type packs ``block_size`` weights into ``type_size`` bytes (``gguf``'s
``GGML_QUANT_SIZES``). The decoders here are vectorized torch ports of ``gguf.quants``' numpy
``dequantize_blocks`` with the same fp32 operations in the same order, so on the CPU they give
the same bits and on CUDA they run as a fixed, small number of kernels per tensor (no loop over
blocks). Decoding happens on the device the bytes are on; the result is cast to ``dtype`` last.

Legend: ``n`` blocks, ``K`` = ``QK_K`` = 256 weights per super-block of the K-quants.

This module decodes only; writing GGUF blocks is ``engine.quant.ggml_encode``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

QK_K = 256
Q = GGMLQuantizationType
Decoder = Callable[[torch.Tensor], torch.Tensor]  # [n, type_size] uint8 -> [n, block] fp32


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """[n, 2] uint8 -> [n, 1] fp32 (little-endian IEEE half)."""
    return raw.contiguous().view(torch.float16).float()


@functools.lru_cache(maxsize=64)
def _shifts(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Bit shifts as a uint8 tensor on ``device``, made once (no host-to-device copy per use)."""
    return torch.tensor(values, dtype=torch.uint8, device=device)


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """[n, m] packed bytes -> [n, m/group, 2, group]: low nibbles of a group, then high."""
    n = qs.shape[0]
    shift = _shifts((0, 4), qs.device).view(1, 1, 2, 1)
    return (qs.reshape(n, -1, 1, group) >> shift) & 0x0F


def _bits(raw: torch.Tensor) -> torch.Tensor:
    """[n, b] bytes -> [n, 8b] bits, bit ``i`` of the little-endian integer at column ``i``."""
    n = raw.shape[0]
    shift = _shifts(tuple(range(8)), raw.device).view(1, 1, 8)
    return ((raw.reshape(n, -1, 1) >> shift) & 1).reshape(n, -1)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, :2])
    x = blocks[:, 2:].view(torch.int8).float()  # a strided view: no contiguous copy first
    return x * d


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, :2])
    qs = _nibbles(blocks[:, 2:], 16).reshape(blocks.shape[0], -1).to(torch.int8) - 8
    return d * qs.float()


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    qs = _nibbles(blocks[:, 4:], 16).reshape(blocks.shape[0], -1).float()
    return (d * qs) + m


def _five_bit(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1 quants: 4 bytes of high bits and 16 bytes of nibbles -> [n, 32] uint8."""
    ql = _nibbles(qs, 16).reshape(qs.shape[0], -1)
    return ql | (_bits(qh) << 4)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, :2])
    qs = _five_bit(blocks[:, 2:6], blocks[:, 6:]).to(torch.int8) - 16
    return d * qs.float()


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    qs = _five_bit(blocks[:, 4:8], blocks[:, 8:]).float()
    return (d * qs) + m


def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales, qs = blocks[:, :16], blocks[:, 16:80]
    d, dmin = _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
    dl = (d * (scales & 0xF).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    shift = _shifts((0, 2, 4, 6), blocks.device).view(1, 1, 4, 1)
    q = ((qs.reshape(n, -1, 1, 32) >> shift) & 3).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k_scales(scales: torch.Tensor) -> torch.Tensor:
    """12 bytes of packed 6-bit scales -> [n, 16] fp32 (signed, offset 32)."""
    n = scales.shape[0]
    low = scales[:, :8].reshape(n, 1, 8) >> _shifts((0, 4), scales.device).view(1, 2, 1)
    high = scales[:, 8:].reshape(n, 1, 4) >> _shifts((0, 2, 4, 6), scales.device).view(1, 4, 1)
    packed = (low.reshape(n, 16) & 0x0F) | ((high.reshape(n, 16) & 0x03) << 4)
    return (packed.to(torch.int8) - 32).float()


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    hmask, qs, scales = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    d = _f16(blocks[:, 108:110])
    dl = (d * _q3_k_scales(scales)).reshape(n, 16, 1)
    shift4 = _shifts((0, 2, 4, 6), blocks.device).view(1, 1, 4, 1)
    shift8 = _shifts(tuple(range(8)), blocks.device).view(1, 1, 8, 1)
    ql = (qs.reshape(n, -1, 1, 32) >> shift4).reshape(n, 16, 16) & 3
    qh = ((hmask.reshape(n, -1, 1, 32) >> shift8).reshape(n, 16, 16) & 1) ^ 1
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins, [n, 8] uint8 each."""
    n = scales.shape[0]
    d, m, m_d = scales.reshape(n, 3, 4).unbind(dim=1)  # [n, 4] each
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k_affine(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K per-32 scale and min: ([n, 8, 1], [n, 8, 1]) fp32."""
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    sc, mn = _k_scale_min(blocks[:, 4:16])
    return (d * sc.float()).reshape(n, -1, 1), (dmin * mn.float()).reshape(n, -1, 1)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, dm = _k_affine(blocks)
    q = _nibbles(blocks[:, 16:], 32).reshape(n, -1, 32).float()
    return (d * q - dm).reshape(n, QK_K)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, dm = _k_affine(blocks)
    qh, qs = blocks[:, 16:48], blocks[:, 48:]
    ql = _nibbles(qs, 32).reshape(n, -1, 32)
    shift8 = _shifts(tuple(range(8)), blocks.device).view(1, 1, 8, 1)
    high = ((qh.reshape(n, -1, 1, 32) >> shift8) & 1).reshape(n, -1, 32)
    q = (ql | (high << 4)).float()
    return (d * q - dm).reshape(n, QK_K)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    ql, qh, scales = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208]
    d = _f16(blocks[:, 208:210])
    d = (d * scales.contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    low = (ql.reshape(n, -1, 1, 64) >> _shifts((0, 4), blocks.device).view(1, 1, 2, 1)) & 0x0F
    shift4 = _shifts((0, 2, 4, 6), blocks.device).view(1, 1, 4, 1)
    high = (qh.reshape(n, -1, 1, 32) >> shift4) & 0x03
    q = (low.reshape(n, -1, 32) | (high.reshape(n, -1, 32) << 4)).to(torch.int8) - 32
    return (d * q.reshape(n, 16, -1).float()).reshape(n, QK_K)


def _f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float32)


def _f16_plain(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float16).float()


def _bf16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.bfloat16).float()


DECODERS: dict[int, Decoder] = {
    Q.F32: _f32,
    Q.F16: _f16_plain,
    Q.BF16: _bf16,
    Q.Q8_0: _q8_0,
    Q.Q4_0: _q4_0,
    Q.Q4_1: _q4_1,
    Q.Q5_0: _q5_0,
    Q.Q5_1: _q5_1,
    Q.Q2_K: _q2_k,
    Q.Q3_K: _q3_k,
    Q.Q4_K: _q4_k,
    Q.Q5_K: _q5_k,
    Q.Q6_K: _q6_k,
}
"""Block types the engine can keep quantized and decode, by ``GGMLQuantizationType`` value."""


def type_name(qtype: int) -> str:
    """``Q4_K``-style name of a GGML type id, ``type 99`` when unknown."""
    try:
        return Q(qtype).name
    except ValueError:
        return f"type {qtype}"


def is_supported(qtype: int) -> bool:
    """A block type the engine decodes."""
    return qtype in DECODERS


def is_known(qtype: int) -> bool:
    """A block type ``gguf`` knows the geometry of (decodable or not)."""
    try:
        return Q(qtype) in GGML_QUANT_SIZES
    except ValueError:
        return False


@functools.cache
def block_geometry(qtype: int) -> tuple[int, int]:
    """(weights per block, bytes per block) of a GGML type."""
    return GGML_QUANT_SIZES[Q(qtype)]


def packed_nbytes(qtype: int, numel: int) -> int:
    """Bytes ``numel`` weights take in ``qtype`` (``numel`` must fill whole blocks)."""
    block, size = block_geometry(qtype)
    if numel % block:
        raise ValueError(f"{numel} weights do not fill whole {type_name(qtype)} blocks of {block}")
    return numel // block * size


def dequantize(
    data: torch.Tensor, qtype: int, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """Raw bytes of one tensor (uint8, any device) -> ``shape`` weights in ``dtype``."""
    decoder = DECODERS.get(qtype)
    if decoder is None:
        raise ValueError(f"the GGML block type {type_name(qtype)} is not supported")
    _block, size = block_geometry(qtype)
    blocks = data.reshape(-1, size)  # [n, type_size]
    return decoder(blocks).reshape(shape).to(dtype)


def dequantize_into(
    data: torch.Tensor, qtype: int, out: torch.Tensor, planar: bool = False
) -> torch.Tensor:
    """``dequantize`` written into ``out`` (contiguous, on ``data``'s device), the same values.

    Q8_0 into an fp32 CPU tensor decodes in one numpy pass over the blocks seen as records
    (int8 times the block's fp16 scale, in fp32 as ``dequantize`` does, so the same bits): torch's
    CPU kernels are several times slower on the strided 34-byte blocks (measured in
    ``docs/QUANTIZED_EXPERTS.md``). ``planar``: Q8_0 bytes rewritten by ``q8_0_to_planar``,
    decoded by two contiguous torch passes (about twice as fast again). Everything else decodes,
    then copies.
    """
    if planar:
        return _q8_0_planar_into(data, out)
    if qtype == Q.Q8_0 and _numpy_ready(data, out):
        blocks = data.numpy().view(_Q8_0_RECORD)  # [n] records
        scale = blocks["d"].astype(np.float32)[:, None]  # [n, 1]
        target = out.numpy().reshape(blocks.shape[0], -1)  # [n, 32], a view of out
        np.multiply(blocks["q"], scale, out=target, dtype=np.float32)
        return out
    out.copy_(dequantize(data, qtype, tuple(out.shape), out.dtype))
    return out


_Q8_0_RECORD = np.dtype([("d", "<f2"), ("q", "i1", 32)])


def _numpy_ready(data: torch.Tensor, out: torch.Tensor) -> bool:
    """Both on the CPU, contiguous, no autograd; ``out`` fp32."""
    return (
        data.device.type == "cpu" and out.device.type == "cpu" and out.dtype == torch.float32
        and data.is_contiguous() and out.is_contiguous()
        and not (data.requires_grad or out.requires_grad)
    )  # fmt: skip


def q8_0_to_planar(data: torch.Tensor) -> None:
    """Rewrite rows of Q8_0 blocks in place as planar: every int8 quant, then every fp16 scale.

    ``data`` is ``[rows, n * 34]`` uint8 (each row whole blocks); the bytes stay as many, so
    every byte count is unchanged, but only ``dequantize_into(..., planar=True)`` reads them.
    A CPU layout: strided 34-byte records are what makes decoding them slow there.
    """
    rows = data.shape[0]
    blocks = data.view(rows, -1, 34)  # [rows, n, 34]
    n = blocks.shape[1]
    quants, scales = blocks[:, :, 2:].clone(), blocks[:, :, :2].clone()  # [rows, n, 32], [.., 2]
    data[:, : n * 32] = quants.reshape(rows, -1)
    data[:, n * 32 :] = scales.reshape(rows, -1)


def _q8_0_planar_into(data: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Decode planar Q8_0 bytes (``q8_0_to_planar``) into ``out``: the same fp32 products."""
    n = data.numel() // 34
    quants = data[: n * 32].view(torch.int8).view(n, 32)  # [n, 32]
    scales = data[n * 32 :].view(torch.float16).float().view(n, 1)  # [n, 1]
    if out.dtype == torch.float32 and out.is_contiguous():
        target = out.view(n, 32)
        target.copy_(quants)
        target.mul_(scales)
        return out
    out.copy_((quants.float() * scales).view(out.shape))
    return out
