"""The SMoE method inside the engine: exact at alpha 0, substituting and saving bytes above.

Tiny random checkpoints of every supported architecture are loaded by the engine with
``--policy smoe`` (score eviction, substitution, prefetch and CPU assist all on) and compared
with transformers' eager experts on a prefill and KV-cached decode steps.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from engine.config import CacheConfig, LiveOptions, LoadConfig
from engine.offload.cpu_assist import RollingCost
from engine.offload.method import spec_for_family
from engine.runtime.loading import LoadedModel, inspect_model, load_model, minimum_slots
from tests.helpers.moe_families import EXTRA_FAMILIES, FAMILIES, save_family

ALL_FAMILIES = [*FAMILIES, *EXTRA_FAMILIES]
PROMPT_TOKENS = 7
DECODE_STEPS = 10


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("method-families")
    for index, name in enumerate(ALL_FAMILIES):
        save_family(name, root / name, seed=10 + index)
    return {name: root / name for name in ALL_FAMILIES}


def _tokens(vocab: int) -> tuple[torch.Tensor, list[int]]:
    generator = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, vocab, (1, PROMPT_TOKENS), generator=generator)
    steps = torch.randint(0, vocab, (DECODE_STEPS,), generator=generator)
    return prompt, steps.tolist()


def _run(
    model: Any, prompt: torch.Tensor, steps: list[int], loaded: Any = None
) -> list[torch.Tensor]:
    cache = DynamicCache(config=model.config)
    logits = []
    with torch.no_grad():
        for ids in [prompt, *(torch.tensor([[t]]) for t in steps)]:
            out = model(ids, past_key_values=cache, use_cache=True)
            logits.append(out.logits)
            if loaded is not None:
                loaded.offload.end_step(ids.shape[1])
    return logits


def _load(directory: Path, fraction: float, live: LiveOptions) -> LoadedModel:
    config = LoadConfig(directory, dtype="float32", cache=CacheConfig(fraction=fraction), live=live)
    return load_model(config)


def _fractions(directory: Path) -> list[float]:
    info = inspect_model(directory)
    total = info.experts_per_layer * info.moe_layers
    return [minimum_slots(info) / total, 0.5]


SMOE = LiveOptions(policy="smoe", alpha=0.0)


def _force_cpu(method: Any) -> None:
    """Make copies look slow and the CPU free, and keep it so: every miss goes to the CPU."""
    method.cost_load, method.cost_cpu = RollingCost(prior=1.0), RollingCost(prior=1e-9)
    method.cost_load.add = method.cost_cpu.add = lambda seconds, count=1: None


@pytest.mark.parametrize("name", ALL_FAMILIES)
@pytest.mark.parametrize("cpu", ["copy", "cpu"])
def test_alpha_zero_smoe_is_bit_identical(
    checkpoints: dict[str, Path], name: str, cpu: str
) -> None:
    """Whatever the cache holds, and whether misses are copied or computed on the host."""
    directory = checkpoints[name]
    reference = AutoModelForCausalLM.from_pretrained(directory, experts_implementation="eager")
    prompt, steps = _tokens(reference.config.vocab_size)
    expected = _run(reference.eval(), prompt, steps)
    for fraction in _fractions(directory):
        loaded = _load(directory, fraction, replace(SMOE, cpu_assist=cpu == "cpu"))
        if cpu == "cpu":
            _force_cpu(loaded.offload.method)
        got = _run(loaded.model, prompt, steps, loaded)
        for step, (want, have) in enumerate(zip(expected, got, strict=True)):
            assert torch.equal(want, have), f"{name} cache={fraction:.2f} step={step}"
        stats = loaded.offload.stats()
        assert stats.substitutions == 0
        if cpu == "cpu":
            assert stats.cpu_computed > 0, "no expert was computed on the host"
        loaded.offload.close()


def _decode_stats(directory: Path, live: LiveOptions) -> Any:
    loaded = _load(directory, 0.5, live)
    prompt, steps = _tokens(loaded.model.config.vocab_size)
    loaded.offload.reset_stats()
    _run(loaded.model, prompt, steps, loaded)
    stats = loaded.offload.stats()
    loaded.offload.close()
    return stats


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_alpha_above_zero_substitutes_and_moves_fewer_bytes(
    checkpoints: dict[str, Path], name: str
) -> None:
    base = LiveOptions(policy="smoe", alpha=0.0, prefetch=False, cpu_assist=False)
    exact = _decode_stats(checkpoints[name], base)
    loose = _decode_stats(
        checkpoints[name], LiveOptions(policy="smoe", alpha=0.5, prefetch=False, cpu_assist=False)
    )
    assert loose.substitutions > 0, f"{name}: nothing substituted at alpha 0.5"
    assert loose.bytes_moved < exact.bytes_moved, f"{name}: substitution saved no transfer"
    total = loose.hits + loose.misses + loose.substitutions
    assert total == exact.hits + exact.misses, "substitutions must replace uses, not add them"


def test_alpha_changes_between_tokens_without_reloading(checkpoints: dict[str, Path]) -> None:
    loaded = _load(checkpoints["qwen2_moe"], 0.5, SMOE)
    model, offload = loaded.model, loaded.offload
    prompt, steps = _tokens(model.config.vocab_size)
    cache = DynamicCache(config=model.config)
    counts = []
    with torch.no_grad():
        model(prompt, past_key_values=cache, use_cache=True)
        for index, token in enumerate(steps):
            alpha = 0.5 if 3 <= index < 7 else 0.0
            offload.set_live_options(LiveOptions(policy="smoe", alpha=alpha, prefetch=False))
            model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            offload.end_step(1)
            counts.append(offload.stats().substitutions)
    assert counts[2] == 0, "substituted before alpha was raised"
    assert counts[6] > 0, "raising alpha between tokens did not substitute"
    assert counts[-1] == counts[6], "substituted after alpha went back to 0"
    offload.close()


def _spy_cpu_split(loaded: Any) -> list[tuple[int, int]]:
    """Record every (layer, expert) the method sends to the CPU-assist worker."""
    seen: list[tuple[int, int]] = []
    for module in loaded.offload.experts.values():
        split = module.cpu_split

        def spy(layer: int, experts: Any, split: Any = split) -> set[int]:
            chosen: set[int] = split(layer, experts)
            seen.extend((layer, e) for e in sorted(chosen))
            return chosen

        module.cpu_split = spy
    return seen


def test_cpu_assist_computes_missing_experts_on_the_host_exactly(
    checkpoints: dict[str, Path],
) -> None:
    directory = checkpoints["mixtral"]
    reference = AutoModelForCausalLM.from_pretrained(directory, experts_implementation="eager")
    prompt, steps = _tokens(reference.config.vocab_size)
    expected = _run(reference.eval(), prompt, steps)
    loaded = _load(directory, 0.5, LiveOptions(policy="smoe", prefetch=False))
    method = loaded.offload.method
    _force_cpu(method)
    computed = _spy_cpu_split(loaded)
    got = _run(loaded.model, prompt, steps, loaded)
    assert all(torch.equal(w, h) for w, h in zip(expected, got, strict=True))
    stats = loaded.offload.stats()
    assert stats.cpu_computed == len(computed) > 0
    lru = _decode_stats(directory, LiveOptions(policy="lru"))
    assert stats.transfers < lru.transfers, "CPU assist did not replace copies"
    loaded.offload.close()


def test_cpu_computed_experts_are_not_inserted(checkpoints: dict[str, Path]) -> None:
    loaded = _load(checkpoints["olmoe"], 0.5, LiveOptions(policy="smoe", prefetch=False))
    method = loaded.offload.method
    _force_cpu(method)
    prompt, steps = _tokens(loaded.model.config.vocab_size)
    _run(loaded.model, prompt, steps[:1])  # prefill fills the cache; one decode step
    before = set(loaded.offload.cache.resident())
    seen = _spy_cpu_split(loaded)
    _run(loaded.model, prompt[:, :1], steps[1:3])
    assert seen, "no expert went to the CPU"
    assert set(loaded.offload.cache.resident()) == before, "a CPU-computed expert was cached"
    assert not set(seen) & before
    loaded.offload.close()


def test_prefetch_accounting_is_consistent(checkpoints: dict[str, Path]) -> None:
    stats = _decode_stats(checkpoints["qwen3_moe"], LiveOptions(policy="smoe", cpu_assist=False))
    assert stats.prefetch_issued > 0
    assert 0 <= stats.prefetch_used <= stats.prefetch_issued
    assert stats.prefetch_top_hits <= min(stats.prefetch_actual_top, stats.prefetch_issued)
    assert 0.0 <= stats.prefetch_recall <= 1.0
    assert stats.transfers >= stats.prefetch_issued


def test_spec_for_family_maps_every_router_kind() -> None:
    from transformers import DeepseekV2Config, DeepseekV3Config, PhimoeConfig

    from engine.offload.families import router_family

    v2 = spec_for_family(router_family(DeepseekV2Config(
        topk_method="group_limited_greedy", n_group=4, topk_group=2,
        routed_scaling_factor=1.5)), 8, 2)  # fmt: skip
    assert v2 is not None and (v2.group_score, v2.scaling, v2.norm_topk_prob) == ("max", 1.5, False)
    v3 = spec_for_family(router_family(DeepseekV3Config()), 256, 8)
    assert v3 is not None and (v3.kind, v3.group_score, v3.n_group) == ("sigmoid", "top2_sum", 8)
    assert spec_for_family(router_family(PhimoeConfig()), 16, 2) is None


@pytest.mark.parametrize("name", ["qwen2_moe", "mixtral", "olmoe"])
@pytest.mark.parametrize("mode", ["own", "own_renorm", "replaced"])
def test_row_planner_decodes_as_the_numpy_planner(
    checkpoints: dict[str, Path], name: str, mode: str
) -> None:
    """The one-token planner (``decode_row``) and the numpy reference (``plan``) are two
    implementations of one planner step: with the whole method on (substitution at an alpha
    where these models swap, prefetch and its accounting, CPU assist), a decode gives the
    same logits and counters through either (CPU assist's costs fixed: measured ones vary)."""
    results = []
    for row_planner in (True, False):
        loaded = _load(checkpoints[name], 0.3, LiveOptions(policy="smoe", alpha=0.1))
        method = loaded.offload.method
        method.weight_mode, method.row_planner = mode, row_planner
        method.cost_load, method.cost_cpu = RollingCost(prior=1.0), RollingCost(prior=1.0)
        method.cost_load.add = method.cost_cpu.add = lambda seconds, count=1: None  # fixed
        prompt, steps = _tokens(loaded.model.config.vocab_size)
        logits = _run(loaded.model, prompt, steps, loaded)
        results.append((logits, loaded.offload.stats(), vars(method.prefetch_account).copy()))
        loaded.offload.close()
    (fast, fast_stats, fast_account), (numpy, numpy_stats, numpy_account) = results
    assert fast_stats.substitutions > 0 and fast_stats.prefetch_issued > 0, "method idle"
    assert fast_stats.cpu_computed > 0, "CPU assist idle"
    assert all(torch.equal(a, b) for a, b in zip(fast, numpy, strict=True)), f"{name} {mode}"
    assert replace(fast_stats, per_layer=(), bytes_per_token_history=()) == replace(
        numpy_stats, per_layer=(), bytes_per_token_history=()
    )
    assert fast_stats.per_layer == numpy_stats.per_layer
    assert fast_account == numpy_account
