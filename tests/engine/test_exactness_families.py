"""Offloaded logits equal transformers' eager experts bit for bit, per architecture.

For each family a tiny random checkpoint is saved, loaded once as the reference
(``experts_implementation="eager"``) and once by the engine at three cache budgets (one layer's
working set, halfway, every expert), in fp32 and bf16. Prefill and three KV-cached decode steps
must give ``torch.equal`` logits; at the smallest budget the prefill streams experts through the
cache in chunks, so the test also proves streaming changes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.config import CacheConfig, LiveOptions, LoadConfig
from engine.runtime.loading import LoadedModel, inspect_model, load_model, minimum_slots
from tests.helpers.moe_families import (
    EXTRA_FAMILIES,
    FAMILIES,
    prefill_and_decode,
    save_family,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PROMPT_TOKENS = 9
DECODE_STEPS = 3


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    for index, name in enumerate({**FAMILIES, **EXTRA_FAMILIES}):
        save_family(name, root / name, seed=index)
    return {name: root / name for name in {**FAMILIES, **EXTRA_FAMILIES}}


def _reference(directory: Path, dtype: str) -> Any:
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=DTYPES[dtype], experts_implementation="eager"
    )
    return model.eval()


def _budgets(directory: Path) -> list[int]:
    info = inspect_model(directory)
    total = info.experts_per_layer * info.moe_layers
    low = minimum_slots(info)
    return [low, (low + total) // 2, total]


def _load(directory: Path, dtype: str, slots: int, policy: str = "lru") -> LoadedModel:
    info = inspect_model(directory)
    cache = CacheConfig(fraction=slots / (info.experts_per_layer * info.moe_layers))
    live = LiveOptions(policy=policy)  # type: ignore[arg-type]
    return load_model(LoadConfig(directory, dtype=dtype, cache=cache, live=live))  # type: ignore[arg-type]


def _assert_exact(name: str, directory: Path, dtype: str, policy: str = "lru") -> None:
    reference = _reference(directory, dtype)
    generator = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, reference.config.vocab_size, (1, PROMPT_TOKENS), generator=generator)
    steps = torch.randint(0, reference.config.vocab_size, (DECODE_STEPS,), generator=generator)
    expected = prefill_and_decode(reference, prompt, steps.tolist())
    for slots in _budgets(directory):
        loaded = _load(directory, dtype, slots, policy)
        assert loaded.offload.cache.num_slots == slots
        got = prefill_and_decode(loaded.model, prompt, steps.tolist())
        for step, (want, have) in enumerate(zip(expected, got, strict=True)):
            assert have.dtype == want.dtype
            assert torch.equal(want, have), f"{name} {dtype} slots={slots} step={step}"
        stats = loaded.offload.stats()
        assert stats.hits + stats.misses > 0
        loaded.offload.close()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(FAMILIES))
def test_offloaded_logits_equal_eager(checkpoints: dict[str, Path], name: str, dtype: str) -> None:
    _assert_exact(name, checkpoints[name], dtype)


@pytest.mark.parametrize("name", list(EXTRA_FAMILIES))
def test_offloaded_logits_equal_eager_sigmoid_router(
    checkpoints: dict[str, Path], name: str
) -> None:
    _assert_exact(name, checkpoints[name], "bfloat16")


def test_lfu_policy_is_exact_too(checkpoints: dict[str, Path]) -> None:
    _assert_exact("qwen2_moe", checkpoints["qwen2_moe"], "float32", policy="lfu")


def test_batched_prefill_streams_exactly(checkpoints: dict[str, Path]) -> None:
    """Two sequences at the smallest budget: every expert is needed, far more than the slots."""
    directory = checkpoints["olmoe"]
    reference = _reference(directory, "float32")
    prompt = torch.randint(0, reference.config.vocab_size, (2, 12), generator=torch.Generator())
    loaded = _load(directory, "float32", minimum_slots(inspect_model(directory)))
    with torch.no_grad():
        want = reference(prompt).logits
        have = loaded.model(prompt).logits
    assert torch.equal(want, have)
    stats = loaded.offload.stats()
    assert stats.transfers > loaded.offload.cache.num_slots  # slots were reused in place
