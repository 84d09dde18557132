"""``--mmap-experts`` with ``--expert-quant``: the quantized-experts cache file is the host tier.

Mapped quantized experts must compute exactly what the same quantization computes in RAM (alpha
0, CPU assist on), hold no host expert bytes, be quantized layer by layer straight into the
cache file on the first load (never every layer in RAM), be mapped without quantizing on the
next, treat a damaged cache file as a miss, and fail with a clear message when the file cannot
be written.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.config import CacheConfig, LiveOptions, LoadConfig
from engine.errors import ModelLoadError
from engine.offload.cpu_assist import RollingCost
from engine.offload.mapped import MappedRowsStore
from engine.runtime import expert_quant
from engine.runtime.loading import inspect_model, load_model, minimum_slots
from engine.runtime.memory import estimate_memory
from tests.helpers.moe_families import prefill_and_decode

pytestmark = pytest.mark.usefixtures("data_dir")  # each test its own quantized-experts cache
SMOE_EXACT = LiveOptions(policy="smoe", alpha=0.0)  # prefetch and CPU assist on, no substitution


def _config(path: Path, scheme: str, **changes: Any) -> LoadConfig:
    info = inspect_model(path)
    fraction = minimum_slots(info) / (info.experts_per_layer * info.moe_layers)
    config = LoadConfig(
        path, dtype="float32", cache=CacheConfig(fraction=fraction), live=SMOE_EXACT,
        expert_quant=scheme,  # type: ignore[arg-type]
    )  # fmt: skip
    return dataclasses.replace(config, **changes)


def _decode(loaded: Any) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    vocab = loaded.info.vocab_size
    prompt = torch.randint(0, vocab, (1, 9), generator=generator)
    steps = torch.randint(0, vocab, (4,), generator=generator).tolist()
    return prefill_and_decode(loaded.model, prompt, steps)


@pytest.mark.parametrize("slots", [None, True])  # CPU default (decoded slots), quantized slots
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_mapped_quantized_experts_compute_like_the_same_quantization_in_ram(
    quant_tiny: Path, scheme: str, slots: bool | None
) -> None:
    in_ram = load_model(_config(quant_tiny, scheme, quantized_slots=slots))
    mapped = load_model(_config(quant_tiny, scheme, quantized_slots=slots, mmap_experts=True))
    assert mapped.offload.store.nbytes == 0 and in_ram.offload.store.nbytes > 0
    for loaded in (in_ram, mapped):  # half the misses computed from the host copy
        method = loaded.offload.method
        method.cost_load, method.cost_cpu = RollingCost(prior=1.0), RollingCost(prior=1.0)
        method.cost_load.add = method.cost_cpu.add = lambda seconds, count=1: None
    for step, (a, b) in enumerate(zip(_decode(in_ram), _decode(mapped), strict=True)):
        assert torch.equal(a, b), f"{scheme} mapped differs from in RAM at step {step}"
    stats = mapped.offload.stats()
    assert stats.misses > stats.cpu_computed > 0, "copies and CPU assist both ran"


def test_first_load_quantizes_layer_by_layer_into_the_file_then_maps_it(
    quant_tiny: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stores: list[int] = []
    original = expert_quant.HostExpertStore

    def counting(shape: Any, layers: Any, *args: Any, **kwargs: Any) -> Any:
        stores.append(len(layers))
        return original(shape, layers, *args, **kwargs)

    monkeypatch.setattr(expert_quant, "HostExpertStore", counting)
    first = load_model(_config(quant_tiny, "int4", mmap_experts=True))
    layers = len(first.offload.store.layers)
    assert stores and max(stores) == 1, f"stores of {stores} layers: all experts were in RAM"
    assert len(stores) == 2 * layers, "one float and one quantized layer store per layer"
    inner = getattr(first.offload.store, "inner", first.offload.store)
    assert isinstance(inner, MappedRowsStore)
    files = list((data_dir / "quantized-experts").glob("*.safetensors"))
    assert len(files) == 1
    stores.clear()
    second = load_model(_config(quant_tiny, "int4", mmap_experts=True))
    assert stores == [], "the second load maps the file without quantizing"
    in_ram = load_model(_config(quant_tiny, "int4"))
    assert stores == [], "the in-RAM load reads the same cache file"
    for a, b in zip(_decode(second), _decode(in_ram), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_cache_file_is_a_miss(quant_tiny: Path, data_dir: Path, damage: str) -> None:
    reference = _decode(load_model(_config(quant_tiny, "int8", mmap_experts=True)))
    (file,) = (data_dir / "quantized-experts").glob("*.safetensors")
    data = file.read_bytes()
    file.write_bytes(b"not safetensors" if damage == "garbage" else data[: len(data) // 2])
    again = load_model(_config(quant_tiny, "int8", mmap_experts=True))
    assert file.stat().st_size == len(data), "the damaged file was rewritten whole"
    for a, b in zip(reference, _decode(again), strict=True):
        assert torch.equal(a, b)


def test_an_unwritable_cache_folder_is_a_clear_error(quant_tiny: Path, data_dir: Path) -> None:
    data_dir.mkdir(parents=True)
    (data_dir / "quantized-experts").write_text("a file where the folder should be")
    with pytest.raises(ModelLoadError, match=r"cannot write the quantized experts.*--mmap-experts"):
        load_model(_config(quant_tiny, "int4", mmap_experts=True))
    assert load_model(_config(quant_tiny, "int4")).offload.store.nbytes > 0, "engine usable after"


def test_estimate_counts_no_host_experts_and_quantized_slots(quant_tiny: Path) -> None:
    info = inspect_model(quant_tiny)
    for scheme in ("int8", "int4"):
        in_ram = estimate_memory(info, _config(quant_tiny, scheme, quantized_slots=True))
        mapped = estimate_memory(
            info, _config(quant_tiny, scheme, quantized_slots=True, mmap_experts=True)
        )
        assert mapped.host_expert_bytes == 0 < in_ram.host_expert_bytes
        assert mapped.expert_cache_bytes == in_ram.expert_cache_bytes
        plain = estimate_memory(info, _config(quant_tiny, "none", mmap_experts=True))
        assert mapped.expert_cache_bytes < 0.4 * plain.expert_cache_bytes, scheme
