"""The memory estimate of a Qwen3-30B-A3B-geometry Q4_K_M file, from metadata only.

The file is synthetic: llama.cpp's tensor table for that model (48 layers, 128 experts of
768, top-8, hidden 2048) with Q4_K_M's block types, and a sparse hole where the 17 GB of data
would be. The estimate must count the experts as quantized bytes: it fits a 32 GB RAM + 8 GB
VRAM machine with the expert cache at half the VRAM, and says what does not fit when the cache
is half of all experts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from engine.config import CacheConfig, LoadConfig
from engine.runtime import memory
from engine.runtime.loading import inspect_model
from engine.runtime.memory import describe_shortfall, estimate_memory
from tests.helpers.gguf_models import save_metadata_only_gguf

GB = 1e9
LAYERS, HIDDEN, EXPERTS, EXPERT_FF, HEADS, KV_HEADS, HEAD_DIM, VOCAB = (
    48, 2048, 128, 768, 32, 4, 128, 151936,
)  # fmt: skip


def _more_bits(layer: int) -> bool:
    return layer < LAYERS // 8 or layer >= 7 * LAYERS // 8 or (layer - LAYERS // 8) % 3 == 2


def _tensors() -> dict[str, tuple[tuple[int, ...], int]]:
    tensors = {
        "token_embd.weight": ((VOCAB, HIDDEN), Q.Q4_K),
        "output_norm.weight": ((HIDDEN,), Q.F32),
        "output.weight": ((VOCAB, HIDDEN), Q.Q6_K),
    }
    for i in range(LAYERS):
        wide = Q.Q6_K if _more_bits(i) else Q.Q4_K
        tensors |= {
            f"blk.{i}.attn_norm.weight": ((HIDDEN,), Q.F32),
            f"blk.{i}.ffn_norm.weight": ((HIDDEN,), Q.F32),
            f"blk.{i}.attn_q.weight": ((HEADS * HEAD_DIM, HIDDEN), Q.Q4_K),
            f"blk.{i}.attn_k.weight": ((KV_HEADS * HEAD_DIM, HIDDEN), Q.Q4_K),
            f"blk.{i}.attn_v.weight": ((KV_HEADS * HEAD_DIM, HIDDEN), wide),
            f"blk.{i}.attn_output.weight": ((HIDDEN, HEADS * HEAD_DIM), Q.Q4_K),
            f"blk.{i}.attn_q_norm.weight": ((HEAD_DIM,), Q.F32),
            f"blk.{i}.attn_k_norm.weight": ((HEAD_DIM,), Q.F32),
            f"blk.{i}.ffn_gate_inp.weight": ((EXPERTS, HIDDEN), Q.F32),
            f"blk.{i}.ffn_gate_exps.weight": ((EXPERTS, EXPERT_FF, HIDDEN), Q.Q4_K),
            f"blk.{i}.ffn_up_exps.weight": ((EXPERTS, EXPERT_FF, HIDDEN), Q.Q4_K),
            f"blk.{i}.ffn_down_exps.weight": ((EXPERTS, HIDDEN, EXPERT_FF), wide),
        }
    return tensors


METADATA: dict[str, int | float] = {
    "block_count": LAYERS, "context_length": 40960, "embedding_length": HIDDEN,
    "feed_forward_length": 6144, "attention.head_count": HEADS,
    "attention.head_count_kv": KV_HEADS, "attention.key_length": HEAD_DIM,
    "attention.value_length": HEAD_DIM, "expert_count": EXPERTS, "expert_used_count": 8,
    "expert_feed_forward_length": EXPERT_FF, "vocab_size": VOCAB,
    "rope.freq_base": 1000000.0, "attention.layer_norm_rms_epsilon": 1e-6,
}  # fmt: skip


@pytest.fixture(scope="module")
def qwen3_30b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("qwen3-30b") / "Qwen3-30B-A3B-Q4_K_M.gguf"
    return save_metadata_only_gguf(path, _tensors(), METADATA, "qwen3moe")


@pytest.fixture
def gaming_pc(monkeypatch: pytest.MonkeyPatch) -> None:
    """An 8 GB GPU in a 32 GB machine, as the estimate sees it."""
    monkeypatch.setattr(memory, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(memory, "device_available_bytes", lambda device: int(8 * GB))
    monkeypatch.setattr(memory, "host_available_bytes", lambda: int(32 * GB))


def test_file_size_and_inspect_are_metadata_only(qwen3_30b: Path) -> None:
    assert 16 * GB < qwen3_30b.stat().st_size < 20 * GB  # llama.cpp's file is 18.6 GB
    info = inspect_model(qwen3_30b)
    assert (info.moe_layers, info.experts_per_layer, info.top_k) == (48, 128, 8)
    assert info.expert_quant == "Q4_K, Q6_K"
    assert 15 * GB < info.total_expert_bytes < 19 * GB  # vs ~58 GB of bf16 experts


@pytest.mark.usefixtures("gaming_pc")
def test_fits_32_gb_ram_and_8_gb_vram_with_half_the_vram_as_cache(qwen3_30b: Path) -> None:
    config = LoadConfig(qwen3_30b, dtype="bfloat16", cache=CacheConfig(budget_gb=4.0))
    estimate = estimate_memory(inspect_model(qwen3_30b), config)
    assert estimate.fits, describe_shortfall(estimate)
    assert estimate.device_bytes < 8 * GB and estimate.host_expert_bytes < 32 * GB
    assert 3.5 * GB < estimate.expert_cache_bytes <= 4 * GB


@pytest.mark.usefixtures("gaming_pc")
def test_half_of_all_experts_as_cache_does_not_fit_8_gb_and_says_so(qwen3_30b: Path) -> None:
    config = LoadConfig(qwen3_30b, dtype="bfloat16", cache=CacheConfig(fraction=0.5))
    estimate = estimate_memory(inspect_model(qwen3_30b), config)
    message = describe_shortfall(estimate)
    assert message is not None and "Lower the expert cache budget" in message
