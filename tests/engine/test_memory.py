"""The memory estimate before loading, and the refusal unless forced."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV2Config, DynamicCache

from engine.config import CacheConfig, LoadConfig
from engine.errors import InsufficientMemoryError
from engine.runtime import memory
from engine.runtime.loading import inspect_model
from engine.runtime.memory import check_fits, estimate_memory, kv_elements_per_token
from engine.runtime.session import ModelSession

MB = 1 << 20


def tiny_estimate(tiny_checkpoint, **kwargs):
    config = LoadConfig(tiny_checkpoint.path, **kwargs)
    return estimate_memory(inspect_model(tiny_checkpoint.path), config)


def test_kv_elements_follow_the_attention_geometry(tiny_checkpoint):
    config = tiny_checkpoint.model.config  # 2 layers, 2 KV heads of 32/4 = 8 dims
    assert kv_elements_per_token(config) == 2 * 2 * 2 * 8


def test_kv_elements_of_multi_head_latent_attention():
    """DeepSeek's MLA caches the kv_lora_rank latent plus the shared rotary key per layer (not
    full heads): the count equals what a real ``DynamicCache`` holds after a prefill."""
    config = DeepseekV2Config(
        vocab_size=50, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
        num_hidden_layers=3, num_attention_heads=4, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=12, kv_lora_rank=32, q_lora_rank=None, n_routed_experts=4,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
    )  # fmt: skip
    assert kv_elements_per_token(config) == 3 * (32 + 8)
    model = AutoModelForCausalLM.from_config(config).eval()
    cache = DynamicCache(config=config)
    with torch.no_grad():
        model(torch.arange(10)[None], past_key_values=cache, use_cache=True)
    held = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers)
    assert held == 10 * kv_elements_per_token(config)


def test_estimate_adds_trunk_kv_and_expert_cache(tiny_checkpoint):
    info = inspect_model(tiny_checkpoint.path)
    estimate = tiny_estimate(tiny_checkpoint, context_length=100, cache=CacheConfig(fraction=0.5))
    assert estimate.device == "cpu"
    assert estimate.trunk_bytes == info.trunk_bytes
    assert estimate.kv_cache_bytes == 64 * 100 * 4, "fp32 KV for 100 tokens"
    assert estimate.expert_cache_bytes == 4 * info.bytes_per_expert, "half of 2 x 4 experts"
    assert estimate.host_expert_bytes == info.total_expert_bytes
    assert (
        estimate.device_bytes
        == estimate.trunk_bytes + estimate.kv_cache_bytes + estimate.expert_cache_bytes
    )


def test_smaller_dtype_halves_the_estimate(tiny_checkpoint):
    full = tiny_estimate(tiny_checkpoint, dtype="float32")
    half = tiny_estimate(tiny_checkpoint, dtype="bfloat16")
    assert half.device_bytes * 2 == full.device_bytes
    assert half.host_expert_bytes * 2 == full.host_expert_bytes


def test_cpu_device_and_host_share_available_memory(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 100 * MB)
    estimate = tiny_estimate(tiny_checkpoint)
    assert estimate.device_free_bytes == 100 * MB
    assert estimate.host_free_bytes == 100 * MB - estimate.device_bytes


def test_refuses_when_host_memory_is_short_unless_forced(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 1000)
    estimate = tiny_estimate(tiny_checkpoint)
    assert not estimate.fits
    with pytest.raises(InsufficientMemoryError, match="context length") as caught:
        check_fits(estimate, force=False)
    assert (
        caught.value.needed_bytes == estimate.device_bytes and caught.value.available_bytes == 1000
    )
    check_fits(estimate, force=True)


def test_refuses_on_cuda_when_the_device_is_short(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10_000, 80_000_000_000))
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 64 * 1024 * MB)
    estimate = tiny_estimate(tiny_checkpoint, device="cuda", dtype="float16")
    assert estimate.device.startswith("cuda") and estimate.device_free_bytes == 10_000
    with pytest.raises(InsufficientMemoryError, match="expert cache budget"):
        check_fits(estimate, force=False)


def test_refuses_when_experts_do_not_fit_host(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    monkeypatch.setattr(
        torch.cuda, "mem_get_info", lambda device=None: (80_000_000_000, 80_000_000_000)
    )
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 100)
    estimate = tiny_estimate(tiny_checkpoint, device="cuda", dtype="float16")
    with pytest.raises(InsufficientMemoryError, match="host memory"):
        check_fits(estimate, force=False)


def test_session_open_refuses_before_loading_unless_forced(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 1000)
    loads: list[LoadConfig] = []

    def loader(config, progress, cancelled):
        loads.append(config)
        raise RuntimeError("stop here")

    with pytest.raises(InsufficientMemoryError):
        ModelSession.open(LoadConfig(tiny_checkpoint.path), loader=loader)
    assert loads == [], "nothing is read when the estimate refuses"
    with pytest.raises(RuntimeError, match="stop here"):
        ModelSession.open(LoadConfig(tiny_checkpoint.path, force=True), loader=loader)


def test_estimate_counts_the_slots_a_budget_buys_as_loaded(tiny_checkpoint):
    """The count the settings window shows: quantized slots hold more experts for the same GB;
    where the CPU cache decodes them, a slot holds a float expert and the count stays."""
    info = inspect_model(tiny_checkpoint.path)
    total = info.moe_layers * info.experts_per_layer
    cache = CacheConfig(budget_gb=3 * info.bytes_per_expert / 1e9)
    plain = tiny_estimate(tiny_checkpoint, cache=cache)
    quantized = tiny_estimate(
        tiny_checkpoint, cache=cache, expert_quant="int8", quantized_slots=True
    )
    decoded = tiny_estimate(tiny_checkpoint, cache=cache, expert_quant="int8")
    assert (plain.expert_slots, plain.total_experts) == (3, total)
    assert quantized.expert_slots > plain.expert_slots and quantized.total_experts == total
    assert decoded.expert_slots == plain.expert_slots, "CPU slots hold decoded experts"
    assert plain.expert_cache_bytes == 3 * info.bytes_per_expert
