"""Tiny random checkpoints of several MoE architectures, built from configs inside tests.

Each builder returns a transformers config small enough (hidden 32, 2-3 layers, 4-8 experts)
that loading and a forward take milliseconds. ``save_family`` writes a model folder
(``config.json``, ``model.safetensors``, tokenizer files) exactly as ``save_pretrained`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    DynamicCache,
    GraniteMoeConfig,
    MiniMaxM2Config,
    MixtralConfig,
    OlmoeConfig,
    PhimoeConfig,
    PreTrainedTokenizerFast,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from tests.helpers.tiny_models import build_tiny_tokenizer

_COMMON: dict[str, Any] = {
    "hidden_size": 32,
    "num_attention_heads": 4,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}


def mixtral(vocab: int) -> MixtralConfig:
    return MixtralConfig(
        vocab_size=vocab, intermediate_size=16, num_hidden_layers=2, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, **_COMMON,
    )  # fmt: skip


def qwen2_moe(vocab: int) -> Qwen2MoeConfig:
    return Qwen2MoeConfig(
        vocab_size=vocab, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, num_hidden_layers=2, num_key_value_heads=2,
        num_experts=8, num_experts_per_tok=4, norm_topk_prob=False, **_COMMON,
    )  # fmt: skip


def qwen3_moe(vocab: int) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(  # type: ignore[call-arg]
        vocab_size=vocab, intermediate_size=64, moe_intermediate_size=16, head_dim=8,
        num_hidden_layers=2, num_key_value_heads=2, num_experts=8, num_experts_per_tok=3,
        norm_topk_prob=True, **_COMMON,
    )  # fmt: skip


def olmoe(vocab: int) -> OlmoeConfig:
    return OlmoeConfig(
        vocab_size=vocab, intermediate_size=16, num_hidden_layers=2, num_key_value_heads=4,
        num_experts=8, num_experts_per_tok=3, **_COMMON,
    )  # fmt: skip


def deepseek_v2(vocab: int) -> DeepseekV2Config:
    """Dense first layer, a shared expert, group-limited routing, scaled weights."""
    return DeepseekV2Config(
        vocab_size=vocab, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
        num_key_value_heads=4, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=3, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        routed_scaling_factor=1.5, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, head_dim=8, **_COMMON,
    )  # fmt: skip


def deepseek_v3(vocab: int) -> DeepseekV3Config:
    """Sigmoid router with score-correction bias and groups."""
    return DeepseekV3Config(  # type: ignore[call-arg]
        vocab_size=vocab, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_key_value_heads=4, first_k_dense_replace=0, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=3, n_group=2, topk_group=1, routed_scaling_factor=2.0,
        kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8,
        v_head_dim=8, head_dim=8, **_COMMON,
    )  # fmt: skip


def granitemoe(vocab: int) -> GraniteMoeConfig:
    """Experts stored already fused ``[E, ...]`` in the checkpoint; softmax over the top-k."""
    return GraniteMoeConfig(
        vocab_size=vocab, intermediate_size=16, num_hidden_layers=2, num_key_value_heads=2,
        num_local_experts=6, num_experts_per_tok=3, **_COMMON,
    )  # fmt: skip


def phimoe(vocab: int) -> PhimoeConfig:
    """Sparsemixer router (hard-wired top-2)."""
    return PhimoeConfig(
        vocab_size=vocab, intermediate_size=16, num_hidden_layers=2, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, **_COMMON,
    )  # fmt: skip


def minimax_m2(vocab: int) -> MiniMaxM2Config:
    """A family outside the router tables (sigmoid with bias): runs offloaded, no substitution."""
    return MiniMaxM2Config(
        vocab_size=vocab, intermediate_size=16, num_hidden_layers=2, num_key_value_heads=2,
        head_dim=8, num_local_experts=6, num_experts_per_tok=3, **_COMMON,
    )  # fmt: skip


FAMILIES: dict[str, Callable[[int], Any]] = {
    "mixtral": mixtral,
    "qwen2_moe": qwen2_moe,
    "qwen3_moe": qwen3_moe,
    "olmoe": olmoe,
    "deepseek_v2": deepseek_v2,
}
EXTRA_FAMILIES: dict[str, Callable[[int], Any]] = {"deepseek_v3": deepseek_v3}
OTHER_FAMILIES: dict[str, Callable[[int], Any]] = {
    "granitemoe": granitemoe,
    "phimoe": phimoe,
    "minimax_m2": minimax_m2,
}


def _randomise_biases(model: torch.nn.Module) -> None:
    """Give DeepSeek-V3's zero-initialised correction bias values that change the choice."""
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.copy_(torch.rand_like(buffer) * 0.1)


def save_family(name: str, directory: Path, seed: int = 0) -> tuple[Any, PreTrainedTokenizerFast]:
    """Write a random tiny model of family ``name`` (fp32) to ``directory``."""
    tokenizer = build_tiny_tokenizer()
    config = {**FAMILIES, **EXTRA_FAMILIES, **OTHER_FAMILIES}[name](len(tokenizer))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        _randomise_biases(model)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer


def prefill_and_decode(model: Any, prompt: torch.Tensor, steps: list[int]) -> list[torch.Tensor]:
    """Logits of a prefill of ``prompt``, then of each of ``steps`` fed through the KV cache."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(prompt, past_key_values=cache, use_cache=True)
        logits = [out.logits]
        for token in steps:
            out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            logits.append(out.logits)
    return logits


def align_experts(model: torch.nn.Module) -> torch.nn.Module:
    """Copy the routed experts' parameters out of the checkpoint's mmap into aligned memory.

    ``from_pretrained`` leaves tensors it need not convert as views of the safetensors mmap,
    which are only 8-byte aligned; CPU matmul kernels may round differently on such data (the
    alignment pitfall in ``docs/ENGINE_NOTES.md``). The engine computes experts from aligned
    copies, so the reference must too when a checkpoint stores experts already fused. The trunk
    is left as loaded: the engine loads it with the same ``from_pretrained``, so both share it.
    """
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".experts." in name:
                parameter.data = parameter.data.clone()
    return model
