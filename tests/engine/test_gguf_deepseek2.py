"""DeepSeek-V2 GGUF files (``deepseek2``) load, compute exactly, and bad metadata is refused.

A tiny random ``DeepseekV2`` (config in ``tests/helpers/gguf_models.py``: latent attention, one
leading dense layer, a shared expert, routed scaling 1.5) is converted by the writer in both of
llama.cpp's attention layouts (``attn_k_b``/``attn_v_b``, and the older ``attn_kv_b``) and both
query forms (V2's low-rank ``q_a``/``q_b``, V2-Lite's ``q_proj``). An F32 file must give the
original model's logits exactly; a quantized file offloaded at the smallest cache, alpha 0,
exactly those of the same file with every expert decoded up front. Engine vs llama.cpp is in
``test_llamacpp_reference.py`` (slow).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers import AutoModelForCausalLM

from engine.config import CacheConfig, LiveOptions, LoadConfig
from engine.errors import ModelLoadError, UnsupportedModelError
from engine.gguf.config import build_config
from engine.gguf.deepseek2 import merge_kv_b, merge_split_tensors, split_kv_b
from engine.gguf.reader import open_gguf
from engine.gguf.writer import convert
from engine.runtime.gguf_loading import load_gguf_reference
from engine.runtime.loading import inspect_model, load_model, minimum_slots
from engine.runtime.memory import estimate_memory
from tests.helpers.gguf_models import save_deepseek2, save_gguf_deepseek2, save_metadata_only_gguf
from tests.helpers.moe_families import prefill_and_decode


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("deepseek2")


def _smallest(path: Path, alpha: float = 0.0, quantized_slots: bool | None = True) -> LoadConfig:
    """The smallest cache; quantized slots (the CUDA layout) unless told otherwise."""
    info = inspect_model(path)
    fraction = minimum_slots(info) / (info.experts_per_layer * info.moe_layers)
    live = LiveOptions(policy="lru" if alpha == 0 else "smoe", alpha=alpha)
    cache = CacheConfig(fraction=fraction)
    return LoadConfig(
        path, dtype="float32", cache=cache, live=live, quantized_slots=quantized_slots
    )


def _prompt() -> tuple[torch.Tensor, list[int]]:
    generator = torch.Generator().manual_seed(3)
    return torch.randint(0, 300, (1, 11), generator=generator), [5, 77, 123]


def _assert_same(expected: list[torch.Tensor], got: list[torch.Tensor], what: str) -> None:
    for step, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert torch.equal(want, have), f"{what}: step {step} differs"


@pytest.mark.parametrize(
    ("mla_split", "q_lora", "yarn"),
    [(True, True, False), (True, False, False), (False, True, False), (False, False, False),
     (True, False, True)],
    ids=["k_b-v_b", "k_b-v_b-q_proj", "kv_b", "kv_b-q_proj", "k_b-v_b-q_proj-yarn"],
)  # fmt: skip
def test_f32_file_equals_the_original_model(
    root: Path, mla_split: bool, q_lora: bool, yarn: bool
) -> None:
    path = save_gguf_deepseek2(root, "F32", mla_split=mla_split, q_lora=q_lora, yarn=yarn)
    source = root / f"{path.name.rsplit('-', 2)[0]}-hf"
    original = AutoModelForCausalLM.from_pretrained(
        source, dtype=torch.float32, experts_implementation="eager"
    ).eval()
    prompt, steps = _prompt()
    loaded = load_model(_smallest(path))
    assert loaded.info.architecture == "deepseek2" and loaded.info.moe_layers == 2
    rope = loaded.model.config.rope_parameters
    assert rope["rope_type"] == ("yarn" if yarn else "default")
    want = original.config.rope_parameters
    for key in ("rope_theta", "factor", "original_max_position_embeddings", "mscale"):
        if key in want:
            assert rope.get(key) == pytest.approx(want[key], rel=1e-6), key  # float32 in GGUF
    got = prefill_and_decode(loaded.model, prompt, steps)
    _assert_same(prefill_and_decode(original, prompt, steps), got, path.name)
    assert loaded.offload.stats().misses > 0, "the experts were really offloaded"
    loaded.offload.close()


@pytest.mark.parametrize("file_type", ["Q8_0", "Q4_K_M"])
@pytest.mark.parametrize("mla_split", [True, False], ids=["k_b-v_b", "kv_b"])
def test_offloaded_quantized_equals_decoded_up_front(
    root: Path, mla_split: bool, file_type: str
) -> None:
    path = save_gguf_deepseek2(root, file_type, mla_split=mla_split)
    reference = load_gguf_reference(path)
    prompt, steps = _prompt()
    expected = prefill_and_decode(reference, prompt, steps)
    loaded = load_model(_smallest(path))
    assert loaded.offload.store.shape.dtype == torch.uint8, "experts stay as raw blocks"
    _assert_same(expected, prefill_and_decode(loaded.model, prompt, steps), path.name)
    stats = loaded.offload.stats()
    assert stats.misses > 0 and stats.transfers > loaded.offload.cache.num_slots
    loaded.offload.close()


def test_experts_read_from_the_mapped_file_compute_the_same(root: Path) -> None:
    """``--mmap-experts``: the file itself as the host tier, same logits as in RAM."""
    path = save_gguf_deepseek2(root, "Q4_K_M")
    prompt, steps = _prompt()
    expected = prefill_and_decode(load_gguf_reference(path), prompt, steps)
    mapped = load_model(dataclasses.replace(_smallest(path), mmap_experts=True))
    _assert_same(expected, prefill_and_decode(mapped.model, prompt, steps), "mapped")
    mapped.offload.close()


def test_quantized_file_stays_close_to_the_original(root: Path) -> None:
    """Q8_0 decodes to weights near the original ones: logits agree to the format's error."""
    path = save_gguf_deepseek2(root, "Q8_0")
    original = AutoModelForCausalLM.from_pretrained(
        root / "deepseek2-q_lora-hf", dtype=torch.float32
    ).eval()
    prompt, _ = _prompt()
    with torch.no_grad():
        want = original(prompt).logits
        have = load_gguf_reference(path)(prompt).logits
    assert not torch.equal(want, have), "Q8_0 really quantized something"
    similarity = torch.nn.functional.cosine_similarity(want.flatten(), have.flatten(), dim=0)
    assert similarity > 0.98, f"cosine {similarity:.4f} (the wide-weight model amplifies errors)"
    assert torch.equal(want.argmax(-1), have.argmax(-1)), "the same top token everywhere"


def test_substitution_runs_on_a_deepseek2_file(root: Path) -> None:
    path = save_gguf_deepseek2(root, "Q8_0")
    loaded = load_model(_smallest(path, alpha=0.5, quantized_slots=None))  # CPU default
    assert loaded.info.substitution_supported
    prompt, steps = _prompt()
    logits = prefill_and_decode(loaded.model, prompt, steps)
    assert all(torch.isfinite(step).all() for step in logits)
    assert loaded.offload.stats().substitutions > 0, "alpha 0.5 substitutes some experts"
    loaded.offload.close()


def test_split_and_merge_are_llama_cpps_and_inverse() -> None:
    """``split_kv_b`` is the converter's torch code (view, split, transpose k_b), to the byte."""
    heads, nope, value, rank = 3, 4, 5, 6
    kv_b = np.random.default_rng(0).standard_normal((heads * (nope + value), rank))
    k_b, v_b = split_kv_b(kv_b.astype(np.float32), heads, nope)
    grouped = torch.from_numpy(kv_b.astype(np.float32)).view(heads, nope + value, rank)
    want_k, want_v = torch.split(grouped, [nope, value], dim=1)
    assert np.array_equal(k_b, want_k.transpose(1, 2).numpy()) and k_b.shape == (3, 6, 4)
    assert np.array_equal(v_b, want_v.numpy()) and v_b.shape == (3, 5, 6)
    assert np.array_equal(merge_kv_b(k_b, v_b), kv_b.astype(np.float32))
    with pytest.raises(ModelLoadError, match="kv_lora_rank"):
        merge_kv_b(k_b, v_b[:, :, :5])


def test_half_of_a_split_pair_is_refused() -> None:
    arrays = [("blk.0.attn_k_b.weight", np.zeros((2, 4, 3), np.float32))]
    with pytest.raises(ModelLoadError, match="attn_v_b is missing"):
        list(merge_split_tensors(iter(arrays)))


def test_writer_refuses_grouped_routing_it_cannot_write(root: Path) -> None:
    source = save_deepseek2(
        root / "grouped-hf", topk_method="group_limited_greedy", n_group=4, topk_group=2
    )
    with pytest.raises(ModelLoadError, match="greedy"):
        convert(source, root / "grouped.gguf", "F32")
    assert not (root / "grouped.gguf").exists()


# ---------------------------------------------------------------- metadata: real geometry, refusals


LITE: dict[str, Any] = {  # DeepSeek-V2-Lite's metadata as llama.cpp's converter writes it
    "block_count": 27, "leading_dense_block_count": 1, "embedding_length": 2048,
    "feed_forward_length": 10944, "expert_feed_forward_length": 1408, "expert_count": 64,
    "expert_used_count": 6, "expert_shared_count": 2, "attention.head_count": 16,
    "attention.head_count_kv": 1, "attention.kv_lora_rank": 512, "attention.key_length": 576,
    "attention.value_length": 512, "attention.key_length_mla": 192,
    "attention.value_length_mla": 128, "rope.dimension_count": 64, "context_length": 163840,
    "vocab_size": 102400, "expert_weights_scale": 1.0, "rope.freq_base": 10000.0,
    "attention.layer_norm_rms_epsilon": 1e-6, "rope.scaling.type": "yarn",
    "rope.scaling.factor": 40.0, "rope.scaling.original_context_length": 4096,
    "rope.scaling.yarn_log_multiplier": 0.0707,
}  # fmt: skip


def _lite_tensors(layers: int = 27) -> dict[str, tuple[tuple[int, ...], int]]:
    """V2-Lite's tensor table (a Q4_K_M-like mix; rows of 1408 fall back to Q8_0)."""
    tensors = {"token_embd.weight": ((102400, 2048), Q.Q4_K),
               "output_norm.weight": ((2048,), Q.F32),
               "output.weight": ((102400, 2048), Q.Q6_K)}  # fmt: skip
    for i in range(layers):
        block = {"attn_norm": ((2048,), Q.F32), "attn_q": ((3072, 2048), Q.Q4_K),
                 "attn_kv_a_mqa": ((576, 2048), Q.Q4_K), "attn_kv_a_norm": ((512,), Q.F32),
                 "attn_k_b": ((16, 512, 128), Q.Q8_0), "attn_v_b": ((16, 128, 512), Q.Q8_0),
                 "attn_output": ((2048, 2048), Q.Q4_K), "ffn_norm": ((2048,), Q.F32)}  # fmt: skip
        if i == 0:
            block.update(ffn_gate=((10944, 2048), Q.Q4_K), ffn_up=((10944, 2048), Q.Q4_K),
                         ffn_down=((2048, 10944), Q.Q8_0))  # fmt: skip
        else:
            block.update(ffn_gate_inp=((64, 2048), Q.F32),
                         ffn_gate_exps=((64, 1408, 2048), Q.Q4_K),
                         ffn_up_exps=((64, 1408, 2048), Q.Q4_K),
                         ffn_down_exps=((64, 2048, 1408), Q.Q8_0),
                         ffn_gate_shexp=((2816, 2048), Q.Q4_K),
                         ffn_up_shexp=((2816, 2048), Q.Q4_K),
                         ffn_down_shexp=((2048, 2816), Q.Q6_K))  # fmt: skip
        tensors.update({f"blk.{i}.{name}.weight": spec for name, spec in block.items()})
    return tensors


def _lite(tmp_path: Path, layers: int = 27, **changes: Any) -> Path:
    metadata = {**LITE, "block_count": layers, **changes}
    metadata = {key: value for key, value in metadata.items() if value is not None}
    return save_metadata_only_gguf(tmp_path / "lite.gguf", _lite_tensors(layers), metadata,
                                   "deepseek2")  # fmt: skip


def test_deepseek_v2_lite_geometry_maps(tmp_path: Path) -> None:
    """A V2-Lite-shaped file (metadata only): config, YaRN and the expert count as stored."""
    path = _lite(tmp_path)
    config = build_config(open_gguf(path))
    assert (config.q_lora_rank, config.kv_lora_rank) == (None, 512)
    assert (config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim) == (128, 64, 128)
    assert (config.num_attention_heads, config.num_key_value_heads) == (16, 16)
    assert (config.first_k_dense_replace, config.n_shared_experts) == (1, 2)
    rope = config.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] == 40.0
    assert rope["original_max_position_embeddings"] == 4096
    assert rope["mscale"] == rope["mscale_all_dim"] == pytest.approx(0.707, rel=1e-6)
    info = inspect_model(path)
    assert (info.num_layers, info.moe_layers, info.experts_per_layer, info.top_k) == (27, 26, 64, 6)
    gate_up = 2 * 1408 * 2048 // 256 * 144  # Q4_K: 144 bytes per 256 weights
    down = 2048 * 1408 // 32 * 34  # Q8_0: 34 bytes per 32
    assert info.bytes_per_expert == gate_up + down
    assert info.expert_quant == "Q4_K, Q8_0"
    estimate = estimate_memory(info, LoadConfig(path, dtype="float32", context_length=2048))
    assert estimate.kv_cache_bytes == 27 * (512 + 64) * 2048 * 4, "MLA caches the latent"


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"attention.kv_lora_rank": 1 << 30}, ModelLoadError, "kv_lora_rank"),
        ({"attention.kv_lora_rank": None}, ModelLoadError, "kv_lora_rank"),
        ({"leading_dense_block_count": 27}, ModelLoadError, "none of"),
        ({"attention.key_length_mla": 64}, ModelLoadError, "head sizes"),
        ({"rope.dimension_count": 63}, ModelLoadError, "odd rotary"),
        ({"expert_used_count": 65}, ModelLoadError, "experts per token"),
        ({"expert_gating_func": 2}, UnsupportedModelError, "sigmoid"),
        ({"expert_weights_norm": True}, UnsupportedModelError, "renormalises"),
        ({"expert_group_count": 8}, UnsupportedModelError, "groups"),
        ({"expert_shared_count": 0}, UnsupportedModelError, "shared expert"),
        ({"rope.scaling.type": "longrope"}, UnsupportedModelError, "longrope"),
        ({"rope.scaling.factor": float("nan")}, ModelLoadError, "YaRN"),
        ({"rope.scaling.factor": -4.0}, ModelLoadError, "YaRN"),
    ],
)
def test_bad_or_unmappable_metadata_is_refused(
    tmp_path: Path, changes: dict[str, Any], error: type[Exception], match: str
) -> None:
    path = _lite(tmp_path, layers=27, **changes)
    with pytest.raises(error, match=match) as raised:
        inspect_model(path)
    assert "deepseek2" in str(raised.value) or "lite.gguf" in str(raised.value)


def test_q4_k_m_gives_kv_b_the_attn_v_rule(root: Path) -> None:
    """llama-quantize counts ``attn_kv_b`` as attention-V: Q6_K in its "more bits" layers (here
    layer 2 of 3; 32-wide rows fall back to Q8_0), Q4_K (-> Q5_0) elsewhere. The writer's files
    equal llama-quantize's byte for byte (checked with scripts/gguf_compare.py)."""
    model = open_gguf(save_gguf_deepseek2(root, "Q4_K_M", mla_split=False))
    types = [model.tensors[f"blk.{i}.attn_kv_b.weight"].qtype for i in range(3)]
    assert types == [Q.Q5_0, Q.Q5_0, Q.Q8_0]
