"""The grouped and batched expert paths are exact against transformers' own, per family.

The engine's grouped path (``--experts grouped``) runs the resident experts of a layer as two
grouped matmuls over the slot pool; the batched path (``--experts batched``) gathers each
(token, expert) pair's weights from its slot and runs two ``bmm`` calls. Their references are
transformers running the same model with ``experts_implementation="grouped_mm"`` and
``"batched_mm"``: prefill and KV-cached decode logits must be equal bit for bit at a small and
a full cache, with LRU and with the whole method at alpha 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.config import CacheConfig, LiveOptions, LoadConfig
from engine.eval.opcount import OpCounter
from engine.offload import experts as experts_module
from engine.runtime.loading import inspect_model, load_model, minimum_slots
from tests.helpers.moe_families import EXTRA_FAMILIES, FAMILIES, prefill_and_decode, save_family

ALL = [*FAMILIES, *EXTRA_FAMILIES]
REFERENCE = {"grouped": "grouped_mm", "batched": "batched_mm"}  # engine path -> transformers


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("grouped")
    for index, name in enumerate(ALL):
        save_family(name, root / name, seed=30 + index)
    return {name: root / name for name in ALL}


def _tokens(vocab: int) -> tuple[torch.Tensor, list[int]]:
    generator = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, vocab, (1, 6), generator=generator)
    return prompt, torch.randint(0, vocab, (4,), generator=generator).tolist()


def _load(
    directory: Path,
    fraction: float,
    live: LiveOptions,
    dtype: str = "float32",
    experts: str = "grouped",
) -> Any:
    config = LoadConfig(
        directory, dtype=dtype, cache=CacheConfig(fraction=fraction), live=live, experts=experts
    )  # type: ignore[arg-type]
    return load_model(config)


@pytest.mark.parametrize("path", sorted(REFERENCE))
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pooled_paths_equal_transformers_implementation(
    checkpoints: dict[str, Path], name: str, dtype: str, path: str
) -> None:
    directory = checkpoints[name]
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    reference = AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch_dtype, experts_implementation=REFERENCE[path]
    ).eval()
    prompt, steps = _tokens(reference.config.vocab_size)
    expected = prefill_and_decode(reference, prompt, steps)
    info = inspect_model(directory)
    smallest = minimum_slots(info) / (info.experts_per_layer * info.moe_layers)
    for fraction, live in [
        (smallest, LiveOptions()),
        (1.0, LiveOptions()),
        (0.5, LiveOptions(policy="smoe", alpha=0.0)),
    ]:
        loaded = _load(directory, fraction, live, dtype, path)
        got = prefill_and_decode(loaded.model, prompt, steps)
        for step, (want, have) in enumerate(zip(expected, got, strict=True)):
            assert torch.equal(want, have), f"{path} {name} {dtype} cache={fraction:.2f} {step=}"
        loaded.offload.close()


def test_batched_pair_slices_change_nothing(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With room for two pairs per call (a long prompt's slicing), the logits are the same."""
    directory = checkpoints["qwen3_moe"]
    reference = AutoModelForCausalLM.from_pretrained(
        directory, experts_implementation="batched_mm"
    ).eval()
    prompt, steps = _tokens(reference.config.vocab_size)
    expected = prefill_and_decode(reference, prompt, steps)
    monkeypatch.setattr(experts_module, "BATCHED_BYTES", 1)
    loaded = _load(directory, 1.0, LiveOptions(), experts="batched")
    got = prefill_and_decode(loaded.model, prompt, steps)
    for step, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert torch.equal(want, have), f"{step=}"
    loaded.offload.close()


def _decode_ops(directory: Path, experts: str) -> tuple[int, dict[str, int]]:
    """Ops and syncs of one KV-cached decode step, every expert resident."""
    info = inspect_model(directory)
    loaded = _load(directory, 1.0, LiveOptions(), experts=experts)
    prompt, steps = _tokens(info.vocab_size)
    prefill_and_decode(loaded.model, prompt, steps[:1])
    with OpCounter() as counter:
        prefill_and_decode(loaded.model, torch.tensor([[steps[1]]]), [])
    loaded.offload.close()
    return counter.ops, counter.sync_kinds


def test_batched_decode_ops_do_not_grow_with_k(checkpoints: dict[str, Path]) -> None:
    """The eager loop pays ~8 ops per chosen expert; the batched path a fixed few per layer."""
    directory = checkpoints["olmoe"]  # k = 3
    layers = inspect_model(directory).moe_layers
    eager, eager_syncs = _decode_ops(directory, "eager")
    batched, batched_syncs = _decode_ops(directory, "batched")
    assert batched_syncs == eager_syncs == {"numpy": layers}, batched_syncs
    assert eager - batched >= 4 * layers, (eager, batched)


def test_decode_reads_the_device_once_per_layer(checkpoints: dict[str, Path]) -> None:
    """A decode step syncs once per MoE layer (its routing copy), LRU and grouped or eager."""
    directory = checkpoints["qwen2_moe"]
    info = inspect_model(directory)
    for experts in ("eager", "grouped", "batched"):
        config = LoadConfig(directory, cache=CacheConfig(fraction=0.5), experts=experts)
        loaded = load_model(config)
        prompt, steps = _tokens(info.vocab_size)
        prefill_and_decode(loaded.model, prompt, steps[:1])
        with OpCounter() as counter:
            prefill_and_decode(loaded.model, torch.tensor([[steps[1]]]), [])
        assert counter.sync_kinds == {"numpy": info.moe_layers}, (experts, counter.sync_kinds)
        loaded.offload.close()


@pytest.mark.parametrize("path", ["grouped", "eager"])
def test_cpu_assist_runs_on_the_worker_thread_next_to_the_device_experts(
    checkpoints: dict[str, Path], path: str
) -> None:
    """Every miss computed by the assist worker: close to the reference (the eager path: equal,
    its rows join in ascending id), nothing cached."""
    import threading

    from engine.offload.cpu_assist import RollingCost

    directory = checkpoints["qwen2_moe"]
    reference = AutoModelForCausalLM.from_pretrained(
        directory, experts_implementation={"grouped": "grouped_mm", "eager": "eager"}[path]
    ).eval()
    prompt, steps = _tokens(reference.config.vocab_size)
    expected = prefill_and_decode(reference, prompt, steps)
    loaded: Any = _load(directory, 0.5, LiveOptions(policy="smoe", alpha=0.0), experts=path)
    method = loaded.offload.method
    method.cost_load, method.cost_cpu = RollingCost(prior=1.0), RollingCost(prior=1e-9)
    method.cost_load.add = lambda seconds, count=1: None
    threads: set[str] = set()
    for module in loaded.offload.experts.values():
        module.on_cpu_time = lambda seconds: threads.add(threading.current_thread().name)
    got = prefill_and_decode(loaded.model, prompt, steps)
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-5)
        assert path != "eager" or torch.equal(have, want)
    assert loaded.offload.stats().cpu_computed > 0
    assert threads and all(name.startswith("cpu-assist") for name in threads), threads
    loaded.offload.close()


def test_eager_decode_pays_seven_ops_per_chosen_expert(checkpoints: dict[str, Path]) -> None:
    """One token through the eager loop, every expert resident: the output buffer and one
    ``unbind`` of the router weights per layer, then per chosen expert the five ops of its
    MLP, its weight product and the accumulation (no per-expert weight slice)."""
    directory = checkpoints["olmoe"]  # k = 3
    loaded = _load(directory, 1.0, LiveOptions(), experts="eager")
    prompt, steps = _tokens(inspect_model(directory).vocab_size)
    prefill_and_decode(loaded.model, prompt, steps[:1])
    module = loaded.offload.experts[min(loaded.offload.experts)]
    forward, counts = module.forward, []

    def counted(*args: Any) -> Any:
        with OpCounter() as counter:
            out = forward(*args)
        counts.append(counter.ops)
        return out

    module.forward = counted
    with torch.inference_mode():  # as the engine decodes (linear stays one op)
        prefill_and_decode(loaded.model, torch.tensor([[steps[1]]]), [])
    loaded.offload.close()
    k = loaded.model.config.num_experts_per_tok
    assert counts == [2 + 7 * k], (counts, k)
