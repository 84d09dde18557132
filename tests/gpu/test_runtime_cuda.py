"""The runtime on a real GPU: generation, the memory estimate and a real out-of-memory."""

from __future__ import annotations

import pytest
import torch

from engine.config import CacheConfig, GenerateRequest, LoadConfig, SamplingConfig
from engine.errors import EngineOutOfMemoryError
from engine.events import GenerationFinished
from engine.runtime import generation
from engine.runtime.engine import Engine
from engine.runtime.loading import inspect_model
from engine.runtime.memory import estimate_memory
from engine.runtime.session import ModelSession
from tests.helpers.tiny_models import save_tiny_checkpoint

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]
GREEDY = SamplingConfig(greedy=True, repetition_penalty=1.0, max_new_tokens=8)


def cuda_config(path, **kwargs) -> LoadConfig:
    return LoadConfig(
        path, device="cuda", dtype="float32", cache=CacheConfig(fraction=0.5), **kwargs
    )


def test_greedy_generation_on_cuda_matches_the_reference(tmp_path):
    model, tokenizer = save_tiny_checkpoint(tmp_path)
    session = ModelSession.open(cuda_config(tmp_path))
    done = list(session.generate_stream(GenerateRequest(prompt="The quick", sampling=GREEDY)))[-1]
    assert isinstance(done, GenerationFinished) and done.token_ids
    model = model.to("cuda")
    ids = list(tokenizer("The quick")["input_ids"])
    with torch.no_grad():
        for step, token in enumerate(done.token_ids):
            context = torch.tensor([ids + list(done.token_ids[:step])], device="cuda")
            assert token == int(model(input_ids=context).logits[0, -1].argmax()), f"step {step}"
    assert session.stats().bytes_moved > 0, "experts were copied to the device"
    session.close()


def test_estimate_on_cuda_sees_free_device_memory(tmp_path):
    save_tiny_checkpoint(tmp_path)
    estimate = estimate_memory(inspect_model(tmp_path), cuda_config(tmp_path))
    _free, total = torch.cuda.mem_get_info()
    assert estimate.device.startswith("cuda")
    assert estimate.device_free_bytes is not None and 0 < estimate.device_free_bytes <= total
    assert estimate.fits


def test_real_out_of_memory_is_translated_and_the_engine_recovers(tmp_path, monkeypatch):
    save_tiny_checkpoint(tmp_path)
    engine = Engine()
    try:
        engine.load(cuda_config(tmp_path), lambda e: None).result(120)
        real_forward = generation.forward

        def greedy_allocation(*args, **kwargs):
            torch.empty(1 << 46, dtype=torch.uint8, device="cuda")  # 64 TiB
            return real_forward(*args, **kwargs)

        monkeypatch.setattr("engine.runtime.generation.forward", greedy_allocation)
        with pytest.raises(EngineOutOfMemoryError, match="cache budget"):
            engine.generate(GenerateRequest(prompt="hi", sampling=GREEDY), lambda e: None).result(
                120
            )
        monkeypatch.undo()
        done = engine.generate(
            GenerateRequest(prompt="hi", sampling=GREEDY), lambda e: None
        ).result(120)
        assert done.token_ids
    finally:
        engine.shutdown()
