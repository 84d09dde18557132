"""On a real GPU: GGML blocks decode on the device exactly as on the CPU, and a GGUF model with
quantized slots (raw blocks copied over PCIe, decoded on the GPU) matches itself decoded up
front on the same GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers import DynamicCache

from engine.config import CacheConfig, LoadConfig
from engine.quant.ggml_blocks import DECODERS, block_geometry, dequantize
from engine.runtime.gguf_loading import load_gguf_reference
from engine.runtime.loading import inspect_model, load_model, minimum_slots
from tests.helpers.gguf_models import save_wide_qwen2_moe

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


@pytest.mark.parametrize("qtype", sorted(DECODERS), ids=lambda q: Q(q).name)
def test_device_decoding_equals_host_decoding(qtype: int) -> None:
    block, size = block_geometry(qtype)
    raw = np.random.default_rng(qtype).integers(0, 256, (4, 512 // block * size), dtype=np.uint8)
    shape = (4, 512 // block * block)
    host = dequantize(torch.from_numpy(raw), qtype, shape, torch.float32)
    device = dequantize(torch.from_numpy(raw).cuda(), qtype, shape, torch.float32).cpu()
    assert torch.equal(host.nan_to_num(), device.nan_to_num())


def test_gguf_with_quantized_slots_on_the_gpu(tmp_path: Path) -> None:
    path = save_wide_qwen2_moe(tmp_path, "Q4_K_M")[0]
    info = inspect_model(path)
    fraction = minimum_slots(info) / (info.experts_per_layer * info.moe_layers)
    config = LoadConfig(path, device="cuda", dtype="float32", cache=CacheConfig(fraction=fraction))
    loaded = load_model(config)
    assert loaded.offload.cache.shape.dtype == torch.uint8, "raw blocks in the GPU slots"
    reference = load_gguf_reference(path).cuda()
    prompt = torch.randint(0, info.vocab_size, (1, 9), generator=torch.Generator()).cuda()
    want = _run(reference, prompt, [3, 5])
    have = _run(loaded.model, prompt, [3, 5])
    for step, (a, b) in enumerate(zip(want, have, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"step {step}")


def test_cpu_assist_from_int4_blocks_by_default_on_the_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 on CUDA: CPU-assisted Q4_1 experts come from torch's int4 kernel (auto), close to
    the same model with the kernel off."""
    from engine.config import LiveOptions
    from engine.offload.cpu_assist import RollingCost
    from tests.helpers.tiny_models import save_tiny_checkpoint

    monkeypatch.setenv("UNDERSTUDY_DATA_DIR", str(tmp_path / "data"))
    path = tmp_path / "tiny"
    save_tiny_checkpoint(
        path, hidden_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32
    )
    info = inspect_model(path)
    fraction = minimum_slots(info) / (info.experts_per_layer * info.moe_layers)
    prompt = torch.randint(0, info.vocab_size, (1, 9), generator=torch.Generator()).cuda()
    runs = []
    for int4 in (None, False):
        config = LoadConfig(
            path, device="cuda", dtype="bfloat16", cache=CacheConfig(fraction=fraction),
            expert_quant="int4", live=LiveOptions(policy="smoe", alpha=0.0),
            cpu_assist_int4=int4,
        )  # fmt: skip
        loaded: Any = load_model(config)
        method = loaded.offload.method
        method.cost_load, method.cost_cpu = RollingCost(prior=1.0), RollingCost(prior=1e-9)
        method.cost_load.add = method.cost_cpu.add = lambda seconds, count=1: None
        runs.append(_run(loaded.model, prompt, [3, 5]))
        packed = loaded.offload.store.packed
        assert (packed is not None and packed.conversions > 0) == (int4 is None)
        assert loaded.offload.stats().cpu_computed > 0
    for step, (a, b) in enumerate(zip(*runs, strict=True)):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2, msg=f"step {step}")
