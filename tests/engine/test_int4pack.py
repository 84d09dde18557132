"""CPU assist from 4-bit blocks: torch's int4 kernel on repacked Q4_0/Q4_1/Q4_K blocks.

The packed weight must compute what the GGML decoder's weights compute (within float rounding),
per format and dtype; anything else is refused by name; the packed experts' LRU counts its bytes
and keeps its bound; and a model loaded with ``cpu_assist_int4`` computes its CPU-assisted experts
from the packed blocks (counted), close to the decoded path, while the default stays exact.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engine.config import CacheConfig, LiveOptions, LoadConfig
from engine.errors import InvalidRequestError
from engine.offload.cpu_assist import RollingCost
from engine.offload.packed import PackedExperts, packable
from engine.offload.store import QuantizedExpertShape
from engine.options import EngineOptions, build_load_config, unused_options
from engine.quant.ggml_blocks import Q, dequantize
from engine.quant.ggml_encode import encode
from engine.quant.int4pack import pack
from engine.runtime.loading import inspect_model, load_model, minimum_slots
from tests.helpers.moe_families import prefill_and_decode
from tests.helpers.tiny_models import save_tiny_checkpoint

WIDE = {"hidden_size": 64, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # relative to the output's largest value


def _raw(weights: np.ndarray, qtype: int) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(encode(weights, qtype)).reshape(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("qtype", "shape"),
    [(Q.Q4_0, (48, 96)), (Q.Q4_1, (48, 96)), (Q.Q4_1, (576, 32)), (Q.Q4_K, (48, 512))],
)
def test_packed_weights_compute_like_the_decoded_blocks(
    qtype: int, shape: tuple[int, int], dtype: torch.dtype
) -> None:
    rng = np.random.default_rng(1)
    weights = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    weights[0] += 0.3  # an all-positive-ish row: a non-zero minimum (Q4_1/Q4_K zero term)
    raw = _raw(weights, qtype)
    reference = dequantize(raw, qtype, shape, torch.float64)
    packed = pack(raw, qtype, shape, dtype)
    for tokens in (1, 3):
        x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(tokens))
        want = x.double() @ reference.T
        have = packed.matmul(x.to(dtype)).double()
        error = (have - want).abs().max() / want.abs().max()
        assert error < TOLERANCE[dtype], f"{Q(qtype).name} {dtype} T={tokens}: {error:.2e}"
    n, k = shape
    itemsize = torch.empty((), dtype=dtype).element_size()
    assert packed.nbytes == n * k // 2 + (k // 32) * n * 2 * itemsize, "4 bits + scale and zero"


@pytest.mark.parametrize(
    ("qtype", "shape"),
    [(Q.Q8_0, (16, 64)), (Q.Q5_0, (16, 64)), (Q.Q4_0, (16, 48)), (Q.Q4_0, (8, 64))],
)
def test_other_blocks_and_shapes_are_refused_by_name(qtype: int, shape: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match=rf"a {Q(qtype).name} \[{shape[0]}, {shape[1]}\] weight"):
        pack(torch.zeros(4096, dtype=torch.uint8), qtype, shape, torch.float32)


def _expert_row(shape: QuantizedExpertShape, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    row = torch.zeros(shape.numel, dtype=torch.uint8)
    h, i = shape.hidden, shape.intermediate
    for part, dims, qtype in (
        ("gate", (i, h), shape.gate_type), ("up", (i, h), shape.up_type),
        ("down", (h, i), shape.down_type),
    ):  # fmt: skip
        shape.part_view(row, part).copy_(_raw(rng.standard_normal(dims).astype(np.float32), qtype))
    return row


def test_packed_experts_count_their_bytes_and_keep_their_bound() -> None:
    shape = QuantizedExpertShape(64, 32, torch.bfloat16, Q.Q4_1, Q.Q4_1, Q.Q4_1)
    rows = {e: _expert_row(shape, e) for e in range(4)}
    per_expert = 3 * (32 * 64 // 2 + 2 * 32 * 2 * 2)  # three [32x64] parts, bf16 scales
    cache = PackedExperts(max_bytes=int(2.5 * per_expert))
    for e in range(4):
        expert = cache.get((0, e), shape, lambda e=e: rows[e])
        assert expert is not None and expert.nbytes == per_expert
    assert len(cache) == 2 and cache.nbytes == 2 * per_expert <= cache.max_bytes
    assert cache.conversions == 4
    cache.get((0, 3), shape, lambda: pytest.fail("a held expert is not converted again"))
    assert cache.conversions == 4
    assert cache.get((0, 0), shape, lambda: rows[0]) is not None and cache.conversions == 5
    fp32 = dataclasses.replace(shape, compute_dtype=torch.float32)
    assert cache.get((1, 0), fp32, lambda: rows[0]) is None, "fp32: the decoded path is faster"
    q8 = QuantizedExpertShape(64, 32, torch.bfloat16, Q.Q8_0, Q.Q8_0, Q.Q8_0)
    assert not packable(q8) and cache.get((1, 1), q8, lambda: rows[0]) is None


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("int4-assist") / "tiny"
    save_tiny_checkpoint(path, **WIDE)
    return path


def _load(path: Path, int4: bool) -> Any:
    info = inspect_model(path)
    fraction = minimum_slots(info) / (info.experts_per_layer * info.moe_layers)
    config = LoadConfig(
        path, dtype="bfloat16", cache=CacheConfig(fraction=fraction), expert_quant="int4",
        live=LiveOptions(policy="smoe", alpha=0.0), cpu_assist_int4=int4,
    )  # fmt: skip
    loaded: Any = load_model(config)
    method = loaded.offload.method  # every miss goes to the CPU
    method.cost_load, method.cost_cpu = RollingCost(prior=1.0), RollingCost(prior=1e-9)
    method.cost_load.add = lambda seconds, count=1: None
    return loaded


def test_cpu_assist_computes_4_bit_experts_from_packed_blocks(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UNDERSTUDY_DATA_DIR", str(tmp_path / "data"))
    generator = torch.Generator().manual_seed(2)
    vocab = inspect_model(checkpoint).vocab_size
    prompt = torch.randint(0, vocab, (1, 9), generator=generator)
    steps = torch.randint(0, vocab, (4,), generator=generator).tolist()
    decoded, packed = _load(checkpoint, int4=False), _load(checkpoint, int4=True)
    want = prefill_and_decode(decoded.model, prompt, steps)
    have = prefill_and_decode(packed.model, prompt, steps)
    cache = packed.offload.store.inner.packed
    assert packed.offload.stats().cpu_computed > 0 and cache.conversions > 0
    assert decoded.offload.store.inner.packed is None, "off by default"
    for step, (a, b) in enumerate(zip(want, have, strict=True)):
        error = (a.float() - b.float()).abs().max() / a.float().abs().max()
        assert error < 0.05, f"step {step}: packed CPU assist off by {error:.3f}"
    assert cache.nbytes == sum(e.nbytes for e in cache._experts.values()) > 0


def test_the_option_is_refused_where_it_does_nothing() -> None:
    assert unused_options(EngineOptions(cpu_assist_int4="on", policy="smoe")) == []
    assert unused_options(EngineOptions(cpu_assist_int4="auto", policy="lru")) == []
    for options in (
        EngineOptions(cpu_assist_int4="on", policy="lru"),
        EngineOptions(cpu_assist_int4="on", policy="smoe", cpu_assist=False),
        EngineOptions(cpu_assist_int4="on", policy="smoe", dtype="float32"),
    ):
        (problem,) = unused_options(options)
        assert "--cpu-assist-int4 on does nothing" in problem, problem


def test_auto_packs_only_where_cpu_assist_is_not_bit_exact_anyway(tmp_path: Path) -> None:
    auto = LoadConfig(tmp_path)
    assert auto.int4_assist_on("cuda") and not auto.int4_assist_on("cpu")
    assert LoadConfig(tmp_path, cpu_assist_int4=True).int4_assist_on("cpu")
    assert not LoadConfig(tmp_path, cpu_assist_int4=False).int4_assist_on("cuda")
    with pytest.raises(InvalidRequestError, match="auto, on, off"):
        build_load_config(EngineOptions(model_dir=tmp_path, cpu_assist_int4="yes"))
