"""GGUF MoE files load with experts kept as GGML blocks, and compute exactly.

For each architecture (Qwen2-MoE, Qwen3-MoE, Mixtral written as ``llama``) and file type (F32,
Q8_0, Q4_K_M) a tiny checkpoint is converted to GGUF in the test. The offloaded model at alpha 0
(LRU, the smallest cache: prefill streams through it) must give ``torch.equal`` logits to the
same GGUF computed without offloading (every expert decoded up front, eager experts), prefill
and KV-cached decode steps. An F32 file must equal the original transformers model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.config import CacheConfig, LiveOptions, LoadConfig
from engine.runtime.gguf_loading import load_gguf_reference
from engine.runtime.loading import inspect_model, load_model, minimum_slots
from engine.runtime.memory import estimate_memory
from tests.helpers.gguf_models import save_gguf_family, save_wide_qwen2_moe
from tests.helpers.moe_families import prefill_and_decode
from tests.helpers.tiny_models import CHAT_TEMPLATE

ARCHITECTURES = ("qwen2_moe", "qwen3_moe", "mixtral", "olmoe")
FILE_TYPES = ("F32", "Q8_0", "Q4_K_M")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf")


def _smallest(
    path: Path, policy: str = "lru", alpha: float = 0.0, quantized_slots: bool = True
) -> LoadConfig:
    """The smallest cache; quantized slots (the CUDA layout) unless told otherwise."""
    info = inspect_model(path)
    fraction = minimum_slots(info) / (info.experts_per_layer * info.moe_layers)
    live = LiveOptions(policy=policy, alpha=alpha)  # type: ignore[arg-type]
    cache = CacheConfig(fraction=fraction)
    return LoadConfig(
        path, dtype="float32", cache=cache, live=live, quantized_slots=quantized_slots
    )


def _prompt(vocab: int) -> tuple[torch.Tensor, list[int]]:
    generator = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, vocab, (1, 9), generator=generator)
    return prompt, torch.randint(0, vocab, (3,), generator=generator).tolist()


def _assert_same(expected: list[torch.Tensor], got: list[torch.Tensor], what: str) -> None:
    for step, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert torch.equal(want, have), f"{what}: step {step} differs"


@pytest.mark.parametrize("file_type", FILE_TYPES)
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_offloaded_quantized_equals_decoded_up_front(root: Path, name: str, file_type: str) -> None:
    path = save_gguf_family(name, root, file_type)
    reference = load_gguf_reference(path)
    prompt, steps = _prompt(reference.config.vocab_size)
    expected = prefill_and_decode(reference, prompt, steps)
    loaded = load_model(_smallest(path))
    assert loaded.offload.store.shape.dtype == torch.uint8, "experts must stay as raw blocks"
    assert loaded.offload.cache.shape.dtype == torch.uint8, "slots hold raw blocks too"
    _assert_same(expected, prefill_and_decode(loaded.model, prompt, steps), f"{name} {file_type}")
    stats = loaded.offload.stats()
    assert stats.misses > 0 and stats.transfers > loaded.offload.cache.num_slots
    loaded.offload.close()


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_f32_file_equals_the_original_model(root: Path, name: str) -> None:
    path = save_gguf_family(name, root, "F32")
    original = AutoModelForCausalLM.from_pretrained(
        root / f"{name}-hf", dtype=torch.float32, experts_implementation="eager"
    ).eval()
    prompt, steps = _prompt(original.config.vocab_size)
    expected = prefill_and_decode(original, prompt, steps)
    loaded = load_model(_smallest(path))
    _assert_same(expected, prefill_and_decode(loaded.model, prompt, steps), name)


def test_k_quants_stay_packed_and_move_fewer_bytes(root: Path) -> None:
    """Q4_K_M rows hold Q4_K/Q6_K blocks; the same cache fraction moves far fewer bytes."""
    moved = {}
    for file_type in ("F32", "Q8_0", "Q4_K_M"):
        path = save_wide_qwen2_moe(root, file_type)[0]
        info = inspect_model(path)
        loaded = load_model(_smallest(path))
        prompt, steps = _prompt(info.vocab_size)
        prefill_and_decode(loaded.model, prompt, steps)
        moved[file_type] = loaded.offload.stats().bytes_moved
        if file_type == "Q4_K_M":
            assert info.expert_quant == "Q4_K, Q6_K"
            reference = load_gguf_reference(path)
            _assert_same(
                prefill_and_decode(reference, prompt, steps),
                prefill_and_decode(loaded.model, prompt, steps),
                "Q4_K_M wide",
            )
    # gate/up Q4_K (4.5 bits), down Q6_K in the "more bits" layer (6.56 bits), vs 32 bits
    assert moved["Q4_K_M"] / moved["F32"] < 0.18, moved
    assert moved["Q8_0"] / moved["F32"] < 0.28, moved


def test_a_copy_moves_its_layers_own_bytes_not_the_slot_size(root: Path) -> None:
    """Q4_K_M keeps ``ffn_down`` in Q6_K in one layer: the other layer's rows are shorter, and
    copying and counting them moves exactly their bytes (slots are sized for the longest)."""
    path = save_wide_qwen2_moe(root, "Q4_K_M")[0]
    loaded = load_model(_smallest(path))
    prompt, steps = _prompt(loaded.info.vocab_size)
    prefill_and_decode(loaded.model, prompt, steps)
    store = loaded.offload.store
    sizes = {layer: store.layer_shape(layer).nbytes for layer in store.layers}
    assert len(set(sizes.values())) == 2 and max(sizes.values()) == store.shape.nbytes, sizes
    for layer in loaded.offload.stats().per_layer:
        assert layer.transfers > 0, f"layer {layer.layer} never copied"
        assert layer.bytes_moved == layer.transfers * sizes[layer.layer], (layer, sizes)


@pytest.mark.parametrize("file_type", ["Q8_0", "Q4_K_M"])
def test_cpu_default_decodes_once_on_copy_and_is_exact(root: Path, file_type: str) -> None:
    """On the CPU the slots hold decoded experts; the store keeps them quantized in RAM."""
    path = save_wide_qwen2_moe(root, file_type)[0]
    reference = load_gguf_reference(path)
    prompt, steps = _prompt(reference.config.vocab_size)
    loaded = load_model(dataclasses.replace(_smallest(path), quantized_slots=None))
    assert loaded.offload.cache.shape.dtype == torch.float32
    assert loaded.offload.store.inner.shape.dtype == torch.uint8  # type: ignore[attr-defined]
    assert loaded.offload.store.nbytes < inspect_model(path).total_expert_bytes * 1.01
    # Q8_0 rows in RAM are rewritten in the planar layout the CPU decodes faster
    assert loaded.offload.store.planar == (file_type == "Q8_0")  # type: ignore[attr-defined]
    _assert_same(
        prefill_and_decode(reference, prompt, steps),
        prefill_and_decode(loaded.model, prompt, steps),
        f"decoded slots {file_type}",
    )
    inner = loaded.offload.store.inner  # type: ignore[attr-defined]
    for layer in loaded.offload.stats().per_layer:  # a transfer moves the quantized expert
        assert layer.transfers > 0
        assert layer.bytes_moved == layer.transfers * inner.layer_shape(layer.layer).nbytes


@pytest.mark.parametrize("quantized_slots", [None, True])
def test_estimate_counts_the_cache_slots_as_loaded(
    root: Path, quantized_slots: bool | None
) -> None:
    """CPU slots hold decoded experts (4-8x a quantized one): the estimate says so, and buys
    the same number of slots from a GB budget as the loader."""
    path = save_wide_qwen2_moe(root, "Q4_K_M")[0]
    info = inspect_model(path)
    budget = CacheConfig(budget_gb=6 * info.expert_weights * 4 / 1e9)  # six decoded experts
    config = dataclasses.replace(_smallest(path), cache=budget, quantized_slots=quantized_slots)
    estimate = estimate_memory(info, config)
    loaded = load_model(config)
    cache = loaded.offload.stats()
    loaded.offload.close()
    assert estimate.expert_cache_bytes == pytest.approx(cache.cache_bytes, rel=0.02)
    decoded = quantized_slots is None
    assert (cache.cache_slots == 6) == decoded, "decoded slots: the budget buys six"


def test_cpu_default_on_a_mapped_q8_0_file_reads_ggml_blocks(root: Path) -> None:
    """A mapped file is read-only: its Q8_0 blocks are decoded as written, to the same bits."""
    path = save_wide_qwen2_moe(root, "Q8_0")[0]
    prompt, steps = _prompt(inspect_model(path).vocab_size)
    config = dataclasses.replace(_smallest(path), quantized_slots=None)
    in_ram, mapped = load_model(config), load_model(dataclasses.replace(config, mmap_experts=True))
    assert in_ram.offload.store.planar and not mapped.offload.store.planar  # type: ignore[attr-defined]
    _assert_same(
        prefill_and_decode(in_ram.model, prompt, steps),
        prefill_and_decode(mapped.model, prompt, steps),
        "mapped Q8_0, decoded slots",
    )


def test_whole_method_runs_on_quantized_experts(root: Path) -> None:
    path = save_gguf_family("qwen2_moe", root, "Q4_K_M")
    loaded = load_model(_smallest(path, policy="smoe", alpha=0.3))
    prompt, steps = _prompt(loaded.info.vocab_size)
    logits = prefill_and_decode(loaded.model, prompt, steps * 3)
    assert all(torch.isfinite(step).all() for step in logits)
    stats = loaded.offload.stats()
    assert stats.hits + stats.misses + stats.substitutions + stats.cpu_computed > 0


def test_tokenizer_and_template_come_from_the_metadata(root: Path) -> None:
    path = save_gguf_family("qwen3_moe", root, "Q8_0")
    loaded = load_model(_smallest(path))
    assert loaded.tokenizer.chat_template == CHAT_TEMPLATE
    assert loaded.tokenizer.eos_token == "<|end|>"
    assert loaded.tokenizer.eos_token_id == loaded.model.config.eos_token_id
    assert loaded.tokenizer("<|user|>hi").input_ids[0] == loaded.tokenizer.convert_tokens_to_ids(
        "<|user|>"
    ), "special tokens stay whole"
    text = "Hello, how are you today?"
    assert loaded.tokenizer.decode(loaded.tokenizer(text).input_ids) == text


def test_split_set_loads_like_the_single_file(root: Path) -> None:
    single = save_wide_qwen2_moe(root, "Q8_0")[0]
    parts = save_wide_qwen2_moe(root, "Q8_0", split_max_tensors=12)
    assert len(parts) > 1 and parts[0].name.endswith(f"-00001-of-{len(parts):05d}.gguf")
    prompt, steps = _prompt(inspect_model(single).vocab_size)
    want = prefill_and_decode(load_model(_smallest(single)).model, prompt, steps)
    have = prefill_and_decode(load_model(_smallest(parts[0])).model, prompt, steps)
    _assert_same(want, have, "split set")


def test_estimate_counts_quantized_expert_bytes(root: Path) -> None:
    f32 = save_wide_qwen2_moe(root, "F32")[0]
    q4 = save_wide_qwen2_moe(root, "Q4_K_M")[0]
    small = {p: estimate_memory(inspect_model(p), _smallest(p)) for p in (f32, q4)}
    assert small[q4].host_expert_bytes < 0.2 * small[f32].host_expert_bytes
    assert small[q4].trunk_bytes == small[f32].trunk_bytes  # the trunk is decoded to fp32


def test_memory_mapped_experts_compute_the_same_and_own_no_ram(root: Path) -> None:
    path = save_wide_qwen2_moe(root, "Q4_K_M")[0]
    prompt, steps = _prompt(inspect_model(path).vocab_size)
    in_ram = load_model(_smallest(path))
    mapped = load_model(dataclasses.replace(_smallest(path), mmap_experts=True))
    assert mapped.offload.store.nbytes == 0 and in_ram.offload.store.nbytes > 0
    _assert_same(
        prefill_and_decode(in_ram.model, prompt, steps),
        prefill_and_decode(mapped.model, prompt, steps),
        "mapped experts",
    )
    estimate = estimate_memory(
        inspect_model(path), dataclasses.replace(_smallest(path), mmap_experts=True)
    )
    assert estimate.host_expert_bytes == 0


@pytest.mark.parametrize("quantized_slots", [True, None])
def test_cpu_assist_decodes_a_quantized_expert_once(
    root: Path, monkeypatch: pytest.MonkeyPatch, quantized_slots: bool | None
) -> None:
    """Also on the CPU device, whose store decodes into its float slots (``DecodedStore``)."""
    from engine.offload import store as store_module

    path = save_wide_qwen2_moe(root, "Q4_K_M")[0]
    expert_bytes = 3 * 256 * 256 * 4
    monkeypatch.setattr(store_module, "HOST_DECODED_BYTES", 3 * expert_bytes)
    config = dataclasses.replace(_smallest(path), quantized_slots=quantized_slots)
    store = load_model(config).offload.store
    assert isinstance(store, store_module.DecodedStore) == (quantized_slots is None)
    first = store.host_weights((0, 1))
    if quantized_slots is None:
        decoded = store.inner.host_weights((0, 1))  # type: ignore[attr-defined]
        assert torch.equal(first[0], decoded[0]) and torch.equal(first[1], decoded[1])
    again = store.host_weights((0, 1))
    assert first[0] is again[0] and first[1] is again[1], "decoded once, then reused"
    assert first[0].dtype == torch.float32 and first[0].shape == (2 * 256, 256)
    for expert in range(store.num_experts):
        store.host_weights((1, expert))
    assert len(store._decoded) == 3, "bounded by bytes: three decoded experts fit"


def test_mapped_read_ahead_a_layer_ahead_is_issued_and_changes_nothing(root: Path) -> None:
    """Policy smoe on a mapped file: the next layer's predicted experts are read ahead at this
    layer's routing (more read-ahead calls than at copy time alone), and the logits stay the
    same as with per-layer read-ahead and as in RAM."""
    path = save_wide_qwen2_moe(root, "Q4_K_M")[0]
    prompt, steps = _prompt(inspect_model(path).vocab_size)
    config = _smallest(path, policy="smoe", alpha=0.0)
    in_ram = prefill_and_decode(load_model(config).model, prompt, steps)
    calls = {}
    for layer_ahead in (False, True):
        loaded = load_model(dataclasses.replace(config, mmap_experts=True))
        store = loaded.offload.store
        store.layer_ahead = layer_ahead  # type: ignore[attr-defined]
        counted: list[int] = []
        store.read_ahead = _counting(store.read_ahead, counted)  # type: ignore[method-assign]
        _assert_same(in_ram, prefill_and_decode(loaded.model, prompt, steps), f"{layer_ahead}")
        calls[layer_ahead] = len(counted)
    assert calls[True] > calls[False], f"no read-ahead a layer ahead: {calls}"


def _counting(read_ahead: Any, counted: list[int]) -> Any:
    def wrapped(keys: Any) -> None:
        counted.append(len(keys))
        read_ahead(keys)

    return wrapped
