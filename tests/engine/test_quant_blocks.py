"""Torch decoding of every GGML block type equals ``gguf``'s numpy reference, bit for bit.

Blocks are random bytes with their fp16 scale fields replaced by finite halves, so every bit
pattern of the quants is exercised; the reference is ``gguf.quants.dequantize``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as reference

from engine.quant.ggml_blocks import (
    DECODERS,
    block_geometry,
    dequantize,
    dequantize_into,
    packed_nbytes,
    q8_0_to_planar,
)
from engine.quant.ggml_encode import encode

# byte offsets of the fp16 scale fields in one block, per type
HALF_FIELDS = {
    Q.Q8_0: (0,),
    Q.Q4_0: (0,),
    Q.Q4_1: (0, 2),
    Q.Q5_0: (0,),
    Q.Q5_1: (0, 2),
    Q.Q2_K: (80, 82),
    Q.Q3_K: (108,),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
}
ROWS = 3


def _random_bytes(qtype: Q, blocks_per_row: int, seed: int) -> np.ndarray:
    generator = np.random.default_rng(seed)
    block, size = block_geometry(qtype)
    if qtype in (Q.F32, Q.F16, Q.BF16):
        values = generator.standard_normal((ROWS, blocks_per_row * block), dtype=np.float32)
        if qtype == Q.F32:
            return values.view(np.uint8)
        if qtype == Q.F16:
            return values.astype(np.float16).view(np.uint8)
        return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    raw = generator.integers(0, 256, (ROWS, blocks_per_row, size), dtype=np.uint8)
    for offset in HALF_FIELDS[qtype]:
        halves = (generator.standard_normal((ROWS, blocks_per_row)) * 0.05).astype(np.float16)
        raw[:, :, offset : offset + 2] = halves.view(np.uint8).reshape(ROWS, blocks_per_row, 2)
    return raw.reshape(ROWS, blocks_per_row * size)


@pytest.mark.parametrize("qtype", sorted(DECODERS), ids=lambda q: Q(q).name)
def test_decoding_matches_gguf_bit_for_bit(qtype: int) -> None:
    block, _size = block_geometry(qtype)
    blocks_per_row = max(1, 512 // block)
    raw = _random_bytes(Q(qtype), blocks_per_row, seed=qtype)
    expected = reference(raw, Q(qtype))  # [ROWS, weights per row] fp32
    got = dequantize(torch.from_numpy(raw.copy()), qtype, expected.shape, torch.float32)
    assert got.shape == expected.shape
    assert torch.equal(got, torch.from_numpy(expected)), f"{Q(qtype).name} differs from gguf"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qtype", sorted(DECODERS), ids=lambda q: Q(q).name)
def test_decoding_into_a_tensor_gives_the_same_bits(qtype: int, dtype: torch.dtype) -> None:
    """``dequantize_into`` (Q8_0's numpy one-pass path included) writes what ``dequantize``
    returns, into a view of a bigger buffer (a slot), leaving the rest of it alone."""
    block, _size = block_geometry(qtype)
    raw = torch.from_numpy(_random_bytes(Q(qtype), max(1, 512 // block), seed=qtype + 1).copy())
    expected = dequantize(raw, qtype, (ROWS, max(1, 512 // block) * block), dtype)
    slot = torch.full((expected.numel() + 64,), 7.0, dtype=dtype)
    out = slot[32 : 32 + expected.numel()].view(expected.shape)
    dequantize_into(raw.reshape(-1), qtype, out)
    assert torch.equal(out, expected), f"{Q(qtype).name} into {dtype} differs"
    assert bool((slot[:32] == 7).all() and (slot[-32:] == 7).all()), "wrote outside out"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_planar_q8_0_decodes_to_the_same_bits(dtype: torch.dtype) -> None:
    """The CPU's planar Q8_0 layout (quants, then scales) keeps every byte and decodes to what
    the GGML blocks decode to, rows rewritten inside a bigger buffer (a layer's [E, numel])."""
    raw = torch.from_numpy(_random_bytes(Q.Q8_0, 16, seed=3).copy())  # [ROWS, 16 * 34]
    expected = dequantize(raw, Q.Q8_0, (ROWS, 16 * 32), dtype)
    buffer = torch.full((ROWS, raw.shape[1] + 8), 9, dtype=torch.uint8)
    buffer[:, 4:-4] = raw
    q8_0_to_planar(buffer[:, 4:-4])
    assert bool((buffer[:, :4] == 9).all() and (buffer[:, -4:] == 9).all()), "wrote outside"
    assert not torch.equal(buffer[:, 4:-4], raw), "the layout changed"
    for row in range(ROWS):
        out = torch.empty(16 * 32, dtype=dtype)
        dequantize_into(buffer[row, 4:-4].contiguous(), Q.Q8_0, out, planar=True)
        assert torch.equal(out, expected[row]), f"row {row} differs in {dtype}"


def test_bfloat16_target_is_the_rounded_fp32_result() -> None:
    raw = _random_bytes(Q.Q4_K, 2, seed=1)
    expected = torch.from_numpy(reference(raw, Q.Q4_K)).to(torch.bfloat16)
    got = dequantize(torch.from_numpy(raw.copy()), Q.Q4_K, tuple(expected.shape), torch.bfloat16)
    assert torch.equal(got, expected)


def test_unsupported_type_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="IQ2_XXS"):
        dequantize(torch.zeros(66, dtype=torch.uint8), Q.IQ2_XXS, (256,), torch.float32)


def test_packed_size_needs_whole_blocks() -> None:
    assert packed_nbytes(Q.Q4_K, 512) == 2 * 144
    with pytest.raises(ValueError, match="whole Q4_K blocks"):
        packed_nbytes(Q.Q4_K, 100)


@pytest.mark.parametrize(
    ("qtype", "tolerance"),
    [(Q.Q8_0, 0.01), (Q.Q6_K, 0.03), (Q.Q5_K, 0.06), (Q.Q4_K, 0.12), (Q.Q4_0, 0.15)],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_encoders_round_trip_within_their_precision(qtype: Q, tolerance: float) -> None:
    weights = np.random.default_rng(3).standard_normal((4, 512), dtype=np.float32)
    packed = encode(weights, qtype)
    assert packed.shape == (4, packed_nbytes(qtype, 512))
    decoded = reference(packed, qtype)  # llama.cpp's decoding, as gguf ports it
    error = np.abs(decoded - weights).mean() / np.abs(weights).mean()
    assert error < tolerance, f"{qtype.name}: relative error {error:.4f}"
    assert torch.equal(
        dequantize(torch.from_numpy(packed), qtype, (4, 512), torch.float32),
        torch.from_numpy(decoded),
    )
