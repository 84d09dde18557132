"""``--expert-quant``: experts quantized at load are exact against the same quantization
computed without offloading, are cached on disk for the next load, and are counted as
quantized bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize
from transformers import AutoModelForCausalLM

from engine.config import CacheConfig, LoadConfig
from engine.errors import ModelLoadError
from engine.quant.ggml_encode import encode
from engine.runtime import expert_quant
from engine.runtime.expert_quant import SCHEMES
from engine.runtime.loading import inspect_model, load_model, minimum_slots
from engine.runtime.memory import estimate_memory
from tests.helpers.moe_families import prefill_and_decode
from tests.helpers.tiny_models import save_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("data_dir")  # each test its own quantized-experts cache


def _config(path: Path, scheme: str) -> LoadConfig:
    info = inspect_model(path)
    fraction = minimum_slots(info) / (info.experts_per_layer * info.moe_layers)
    cache = CacheConfig(fraction=fraction)
    return LoadConfig(
        path,
        dtype="float32",
        cache=cache,
        expert_quant=scheme,
        quantized_slots=True,  # type: ignore[arg-type]
    )


def _round_trip(weights: torch.Tensor, qtype: int) -> torch.Tensor:
    rows = weights.reshape(-1, weights.shape[-1]).numpy()
    decoded = gguf_dequantize(encode(rows, qtype), qtype)  # llama.cpp's decoding
    return torch.from_numpy(np.ascontiguousarray(decoded)).reshape(weights.shape)


def _reference(path: Path, scheme: str) -> Any:
    """The model with every expert quantized and decoded up front, eager experts, no offload."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.set_experts_implementation("eager")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".experts." in name:
                parameter.copy_(_round_trip(parameter.detach(), SCHEMES[scheme]))
    return model.eval()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_at_load_equals_quantized_up_front(quant_tiny: Path, scheme: str) -> None:
    reference = _reference(quant_tiny, scheme)
    prompt = torch.randint(0, reference.config.vocab_size, (1, 9), generator=torch.Generator())
    expected = prefill_and_decode(reference, prompt, [3, 5, 7])
    loaded = load_model(_config(quant_tiny, scheme))
    assert loaded.offload.store.shape.dtype == torch.uint8
    got = prefill_and_decode(loaded.model, prompt, [3, 5, 7])
    for step, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert torch.equal(want, have), f"{scheme} step {step}"


def test_second_load_reads_the_cache_and_a_changed_checkpoint_requantizes(
    quant_tiny: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[int] = []
    original = expert_quant._quantize_layer

    def counting(*args: Any) -> None:
        calls.append(1)
        original(*args)

    monkeypatch.setattr(expert_quant, "_quantize_layer", counting)
    first = load_model(_config(quant_tiny, "int4"))
    layers = len(first.offload.store.layers)
    assert len(calls) == layers
    cached = list((data_dir / "quantized-experts").glob("*.safetensors"))
    assert len(cached) == 1
    second = load_model(_config(quant_tiny, "int4"))
    assert len(calls) == layers, "the second load quantizes nothing"
    for layer in second.offload.store.layers:
        assert torch.equal(
            first.offload.store.row((layer, 0)), second.offload.store.row((layer, 0))
        )
    cached[0].write_bytes(b"not safetensors")  # a damaged cache is a miss, never an error
    load_model(_config(quant_tiny, "int4"))
    assert len(calls) == 2 * layers


def test_quantized_bytes_are_counted(quant_tiny: Path) -> None:
    plain = estimate_memory(inspect_model(quant_tiny), _config(quant_tiny, "none"))
    int8 = estimate_memory(inspect_model(quant_tiny), _config(quant_tiny, "int8"))
    int4 = estimate_memory(inspect_model(quant_tiny), _config(quant_tiny, "int4"))
    assert int4.host_expert_bytes < int8.host_expert_bytes < 0.4 * plain.host_expert_bytes
    loaded = load_model(_config(quant_tiny, "int4"))
    stats = loaded.offload.stats()
    assert stats.cache_bytes == loaded.offload.cache.num_slots * loaded.offload.store.shape.nbytes


def test_rows_that_are_not_whole_groups_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "odd"
    save_tiny_checkpoint(path)  # moe_intermediate_size 16: down rows of 16 weights
    with pytest.raises(ModelLoadError, match="cannot be quantized to int8"):
        load_model(_config(path, "int8"))


def test_fidelity_reports_the_quantization_cost_apart_from_substitution(
    quant_tiny: Path, tmp_path: Path
) -> None:
    import json

    from engine.cli import main

    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8, encoding="utf-8")
    out = tmp_path / "rows.json"
    args = ["fidelity", "--model", str(quant_tiny), "--text-file", str(text), "--device", "cpu",
            "--expert-quant", "int4", "--alpha", "0", "--cache-fraction", "0.5",
            "--max-tokens", "24", "--window", "12", "--cloze-items", "0",
            "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    quantization, alpha_zero = json.loads(out.read_text(encoding="utf-8"))
    assert quantization["policy"] == "experts int4 (quantization only)"
    assert quantization["kl"] > 0, "int4 experts differ from the unquantized model"
    assert alpha_zero["kl"] == 0.0, "without substitution the quantized model equals itself"
