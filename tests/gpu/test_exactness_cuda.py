"""On a real GPU: pinned host store, copies on side streams, bit-identical to the reference.

The eager path against transformers' eager experts, the grouped path (the CUDA default)
against its ``grouped_mm`` experts; decode syncs once per MoE layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from engine.config import CacheConfig, LoadConfig
from engine.runtime.loading import inspect_model, load_model, minimum_slots
from tests.helpers.moe_families import FAMILIES, save_family

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


def _run(model: Any, prompt: torch.Tensor, steps: list[int]) -> list[torch.Tensor]:
    cache = DynamicCache(config=model.config)
    logits = []
    with torch.no_grad():
        for ids in [prompt, *(torch.tensor([[t]], device="cuda") for t in steps)]:
            logits.append(model(ids, past_key_values=cache, use_cache=True).logits)
    return logits


REFERENCE = {"eager": "eager", "grouped": "grouped_mm", "batched": "batched_mm"}


@pytest.mark.parametrize("experts", list(REFERENCE))
@pytest.mark.parametrize("name", list(FAMILIES))
def test_cuda_offload_is_exact_and_pinned(tmp_path: Path, name: str, experts: str) -> None:
    save_family(name, tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(
        tmp_path,
        dtype=torch.bfloat16,
        device_map="cuda",
        experts_implementation=REFERENCE[experts],
    ).eval()
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 200, (1, 9), generator=generator).cuda()
    steps = torch.randint(0, 200, (4,), generator=generator).tolist()
    want = _run(reference, prompt, steps)
    info = inspect_model(tmp_path)
    total = info.experts_per_layer * info.moe_layers
    for slots in (minimum_slots(info), total):
        cache = CacheConfig(fraction=slots / total)
        config = LoadConfig(tmp_path, device="cuda", dtype="bfloat16", cache=cache, experts=experts)
        loaded = load_model(config)
        assert loaded.offload.store.pinned
        assert all(buffer.is_pinned() for buffer in loaded.offload.store.buffers())
        have = _run(loaded.model, prompt, steps)
        for step, (expected, got) in enumerate(zip(want, have, strict=True)):
            assert torch.equal(expected, got), f"{name} slots={slots} step={step}"
        assert loaded.offload.stats().transfers > 0
        loaded.offload.close()


def test_cuda_decode_syncs_once_per_moe_layer(tmp_path: Path) -> None:
    from engine.eval.opcount import OpCounter

    save_family("qwen2_moe", tmp_path)
    info = inspect_model(tmp_path)
    config = LoadConfig(tmp_path, device="cuda", dtype="bfloat16", cache=CacheConfig(fraction=0.5))
    loaded = load_model(config)
    prompt = torch.randint(0, 200, (1, 5)).cuda()
    _run(loaded.model, prompt, [3])
    cache = DynamicCache(config=loaded.model.config)
    with torch.no_grad():
        loaded.model(prompt, past_key_values=cache, use_cache=True)
        with OpCounter("cuda") as counter:
            loaded.model(torch.tensor([[7]], device="cuda"), past_key_values=cache)
    assert counter.syncs == info.moe_layers, counter.sync_kinds
    loaded.offload.close()
