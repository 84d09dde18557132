"""The SMoE method on a real GPU: prefetch on the copy stream, CPU assist across devices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from engine.config import CacheConfig, LiveOptions, LoadConfig
from engine.offload.cpu_assist import RollingCost
from engine.runtime.loading import load_model
from tests.helpers.moe_families import save_family

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


def _run(model: Any, prompt: torch.Tensor, steps: list[int], offload: Any = None) -> list:
    cache = DynamicCache(config=model.config)
    logits = []
    with torch.no_grad():
        for ids in [prompt, *(torch.tensor([[t]], device="cuda") for t in steps)]:
            logits.append(model(ids, past_key_values=cache, use_cache=True).logits)
            if offload is not None:
                offload.end_step(ids.shape[1])
    return logits


def _setup(tmp_path: Path) -> tuple[list, torch.Tensor, list[int]]:
    save_family("qwen2_moe", tmp_path, seed=3)
    reference: Any = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="eager")
    reference = reference.cuda().eval()
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 200, (1, 6), generator=generator).cuda()
    steps = torch.randint(0, 200, (12,), generator=generator).tolist()
    return _run(reference, prompt, steps), prompt, steps


def _load(path: Path, live: LiveOptions) -> Any:
    cache = CacheConfig(fraction=0.5)
    config = LoadConfig(
        path, device="cuda", dtype="float32", cache=cache, live=live, experts="eager"
    )  # compared with transformers' eager experts
    return load_model(config)


def test_prefetch_on_the_copy_stream_keeps_alpha_zero_exact(tmp_path: Path) -> None:
    expected, prompt, steps = _setup(tmp_path)
    loaded = _load(tmp_path, LiveOptions(policy="smoe", cpu_assist=False))
    got = _run(loaded.model, prompt, steps, loaded.offload)
    assert all(torch.equal(w, h) for w, h in zip(expected, got, strict=True))
    assert loaded.offload.stats().prefetch_issued > 0
    loaded.offload.close()


def test_cpu_assist_on_cuda_is_close_and_caches_nothing_new(tmp_path: Path) -> None:
    expected, prompt, steps = _setup(tmp_path)
    loaded = _load(tmp_path, LiveOptions(policy="smoe", prefetch=False))
    method = loaded.offload.method
    method.cost_load, method.cost_cpu = RollingCost(prior=1.0), RollingCost(prior=1e-9)
    method.cost_load.add = method.cost_cpu.add = lambda seconds, count=1: None
    got = _run(loaded.model, prompt, steps, loaded.offload)
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-4)
    assert loaded.offload.stats().cpu_computed > 0
    loaded.offload.close()
