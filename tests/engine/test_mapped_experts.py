"""``--mmap-experts``: the model file (safetensors or GGUF) as the host tier, with read-ahead.

The mapped store must compute exactly what the in-RAM store computes (same rows, same cache),
own no host memory, start the disk reads of every miss before reading them (``read_ahead``),
and survive its pages being dropped from the page cache (they are read again from disk).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import CacheConfig, LiveOptions, LoadConfig
from engine.events import MemoryEstimate
from engine.offload.mapped import MappedExpertStore
from engine.runtime.loading import inspect_model, load_model, minimum_slots
from engine.runtime.memory import describe_shortfall, estimate_memory
from tests.helpers.gguf_models import save_wide_qwen2_moe
from tests.helpers.moe_families import prefill_and_decode, save_family


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mapped")


def _smallest(path: Path, **changes: object) -> LoadConfig:
    info = inspect_model(path)
    fraction = minimum_slots(info) / (info.experts_per_layer * info.moe_layers)
    config = LoadConfig(
        path, dtype="float32", cache=CacheConfig(fraction=fraction), live=LiveOptions()
    )
    return dataclasses.replace(config, **changes)  # type: ignore[arg-type]


def _prompt(vocab: int) -> tuple[torch.Tensor, list[int]]:
    generator = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, vocab, (1, 9), generator=generator)
    return prompt, torch.randint(0, vocab, (4,), generator=generator).tolist()


def _assert_mapped_equals_ram(path: Path) -> MappedExpertStore:
    prompt, steps = _prompt(inspect_model(path).vocab_size)
    in_ram = load_model(_smallest(path))
    mapped = load_model(_smallest(path, mmap_experts=True))
    store = mapped.offload.store
    assert isinstance(store, MappedExpertStore), f"mmap_experts gave {type(store).__name__}"
    assert store.nbytes == 0 and in_ram.offload.store.nbytes > 0
    want = prefill_and_decode(in_ram.model, prompt, steps)
    have = prefill_and_decode(mapped.model, prompt, steps)
    for step, (a, b) in enumerate(zip(want, have, strict=True)):
        assert torch.equal(a, b), f"mapped experts differ from in-RAM ones at step {step}"
    assert mapped.offload.stats().misses > 0, "the smallest cache must miss"
    in_ram.offload.close()
    return store


@pytest.mark.parametrize("name", ["qwen2_moe", "granitemoe"])  # per-expert keys / fused [E, ...]
def test_mapped_safetensors_compute_like_experts_in_ram(root: Path, name: str) -> None:
    source = root / f"{name}-hf"
    save_family(name, source)
    store = _assert_mapped_equals_ram(source)
    assert store.read_ahead_bytes > 0, "misses must be read ahead"


def test_mapped_bf16_checkpoint_is_cast_like_the_ram_copy(root: Path) -> None:
    source = root / "bf16-hf"
    save_family("qwen2_moe", source)
    for file in source.glob("*.safetensors"):
        tensors = {k: v.to(torch.bfloat16) for k, v in load_file(file).items()}
        save_file(tensors, file, metadata={"format": "pt"})
    _assert_mapped_equals_ram(source)


def test_mapped_gguf_reads_ahead_unless_told_not_to(root: Path) -> None:
    path = save_wide_qwen2_moe(root, "Q4_K_M")[0]
    loaded = load_model(_smallest(path, mmap_experts=True, quantized_slots=True))
    store = loaded.offload.store
    assert isinstance(store, MappedExpertStore)
    prompt, steps = _prompt(loaded.info.vocab_size)
    store.read_ahead_on = False
    first = prefill_and_decode(loaded.model, prompt, steps)
    assert store.read_ahead_bytes == 0
    store.read_ahead_on = True
    loaded.offload.cache.clear()
    store.drop([(layer, e) for layer in store.layers for e in range(store.num_experts)])
    again = prefill_and_decode(loaded.model, prompt, steps)
    assert store.read_ahead_bytes > 0
    for step, (a, b) in enumerate(zip(first, again, strict=True)):
        assert torch.equal(a, b), f"dropped pages read back differently at step {step}"


def test_estimate_offers_the_mapped_file_when_experts_do_not_fit(root: Path) -> None:
    source = root / "estimate-hf"
    save_family("qwen2_moe", source)
    info = inspect_model(source)
    estimate = estimate_memory(info, _smallest(source))
    short = dataclasses.replace(
        estimate, host_free_bytes=estimate.host_expert_bytes // 2, device_free_bytes=None
    )
    message = describe_shortfall(short)
    assert message is not None and "--mmap-experts" in message
    mapped = estimate_memory(info, _smallest(source, mmap_experts=True))
    assert mapped.host_expert_bytes == 0
    fits = MemoryEstimate(**{**dataclasses.asdict(mapped), "host_free_bytes": 0})
    assert fits.fits, describe_shortfall(fits)
