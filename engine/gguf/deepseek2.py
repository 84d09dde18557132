"""DeepSeek-V2 (GGUF architecture ``deepseek2``) <-> transformers' ``DeepseekV2`` family.

transformers 5.23 has the model but its GGUF support has no ``deepseek2`` entry; this module is
that entry, read off llama.cpp's converter (``conversion/deepseek.py``) and its graph
(``src/models/deepseek2.cpp``):

- **Config** from the ``deepseek2.*`` keys. Multi-head latent attention: ``kv_lora_rank``,
  ``q_lora_rank`` (absent in V2-Lite: a plain ``attn_q``), ``rope.dimension_count`` is the
  rotary part of a head. Newer files (``attn_k_b``/``attn_v_b``) write the decompressed head
  sizes as ``key_length_mla``/``value_length_mla`` (``key_length`` is then ``kv_lora_rank +
  rope``); older ones (``attn_kv_b``) as ``key_length``/``value_length``. Leading dense
  layers, shared experts, ``expert_weights_scale`` (routed scaling factor) and YaRN (``rope.
  scaling.*``; the file stores ``0.1 * mscale_all_dim`` as ``yarn_log_multiplier`` and llama.cpp
  uses it for ``mscale`` too) map one to one.
- **Routing** as llama.cpp runs a ``deepseek2`` file: softmax over all experts, greedy top-k,
  no renormalisation, times the scaling factor; that is ``DeepseekV2``'s greedy router. Files
  whose routing ``DeepseekV2`` cannot compute are refused by name: sigmoid gating or a score
  bias (DeepSeek-V3/R1-style files), renormalised top-k, grouped routing (llama.cpp groups by
  the sum of the top two scores, ``DeepseekV2`` by the maximum).
- **Tensors**: the names are ``gguf``'s own map; ``attn_k_b [H, R, nope]`` and ``attn_v_b
  [H, v, R]`` are the converter's split of ``kv_b_proj [H*(nope+v), R]`` (with ``k_b``
  transposed) and are merged back (``merge_kv_b``); ``split_kv_b`` is the converter's split,
  for the writer. No Q/K permutation: llama.cpp's ``deepseek2`` rope is the "normal" one on
  consecutive pairs, as ``DeepseekV2``'s complex rotation is.

Not handled by either program: ``DeepseekV2``'s ``q_a_layernorm``/``kv_a_layernorm`` use eps
1e-6 whatever ``rms_norm_eps`` says, llama.cpp uses the file's eps for them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from engine.errors import ModelLoadError, UnsupportedModelError
from engine.gguf.reader import GgufModel

SOFTMAX_GATING = 1  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX
KV_B = re.compile(r"^blk\.(\d+)\.attn_(k|v)_b\.weight$")
# key -> (smallest, largest) allowed; absent keys are checked where they are required
RANGES = {
    "block_count": (1, 4096),
    "leading_dense_block_count": (0, 4095),
    "attention.kv_lora_rank": (1, 1 << 16),
    "attention.q_lora_rank": (0, 1 << 16),
    "attention.key_length_mla": (2, 1 << 14),
    "attention.value_length_mla": (1, 1 << 14),
    "rope.dimension_count": (2, 1 << 14),
    "expert_shared_count": (0, 1 << 10),
}


def _required(model: GgufModel, key: str) -> Any:
    value = model.arch_value(key)
    if value is None:
        raise ModelLoadError(f"{model.path.name} lacks the metadata deepseek2.{key}")
    return value


def _check_ranges(model: GgufModel) -> None:
    for key, (low, high) in RANGES.items():
        value = model.arch_value(key)
        if value is None:
            continue
        if not isinstance(value, int) or not low <= value <= high:
            raise ModelLoadError(
                f"{model.path.name} has an impossible deepseek2.{key} = {value!r} (expected "
                f"{low} to {high}): the metadata is corrupt"
            )


def _refuse_routing(model: GgufModel) -> None:
    """Routing that ``DeepseekV2``'s router cannot compute is refused, saying what it is."""
    why = None
    gating = model.arch_value("expert_gating_func", SOFTMAX_GATING)
    if gating != SOFTMAX_GATING:
        why = f"its experts are gated by function {gating!r} (sigmoid: DeepSeek-V3/R1-style)"
    elif any(name.endswith("exp_probs_b.bias") for name in model.tensors):
        why = "its router has a score-correction bias (DeepSeek-V3/R1-style)"
    elif model.arch_value("expert_weights_norm", False):
        why = "it renormalises the top-k weights, which DeepseekV2's router never does"
    elif (model.arch_value("expert_group_count") or 1) > 1:
        why = "it routes within expert groups by llama.cpp's top-2 sum, DeepseekV2 by maximum"
    if why:
        raise UnsupportedModelError(
            "deepseek2", f"{model.path.name} is a deepseek2 file the engine cannot map: {why}"
        )


def _head_sizes(model: GgufModel, rope: int) -> tuple[int, int]:
    """(qk_nope_head_dim, v_head_dim) from the MLA keys (new files) or the plain ones (old)."""
    if model.arch_value("attention.key_length_mla") is not None:
        key, value = (
            model.arch_value("attention.key_length_mla"),
            model.arch_value("attention.value_length_mla"),
        )
    else:
        key, value = (
            model.arch_value("attention.key_length"),
            model.arch_value("attention.value_length"),
        )
    if not isinstance(key, int) or not isinstance(value, int) or key <= rope or value < 1:
        raise ModelLoadError(
            f"{model.path.name}: deepseek2 head sizes key {key!r} / value {value!r} do not fit "
            f"a rotary part of {rope}: the metadata is corrupt"
        )
    return key - rope, value


def _rope_parameters(model: GgufModel) -> dict[str, Any]:
    theta = float(model.arch_value("rope.freq_base", 10000.0))
    kind = model.arch_value("rope.scaling.type", "none")
    if kind in ("none", None):
        return {"rope_type": "default", "rope_theta": theta}
    if kind != "yarn":
        raise UnsupportedModelError("deepseek2", f"rope scaling {kind!r} is not mapped")
    factor = float(_required(model, "rope.scaling.factor"))
    original = int(_required(model, "rope.scaling.original_context_length"))
    mscale = float(model.arch_value("rope.scaling.yarn_log_multiplier", 0.0)) / 0.1
    if not (math.isfinite(factor) and 1 <= factor <= 1e4 and math.isfinite(mscale)) or original < 1:
        raise ModelLoadError(
            f"{model.path.name} has impossible YaRN settings (factor {factor}, original "
            f"context {original}, mscale {mscale}): the metadata is corrupt"
        )
    parameters = {"rope_type": "yarn", "rope_theta": theta, "factor": factor,
                  "original_max_position_embeddings": original}  # fmt: skip
    if mscale:  # llama.cpp: mscale = mscale_all_dim for deepseek2
        parameters.update(mscale=mscale, mscale_all_dim=mscale)
    for key in ("beta_fast", "beta_slow"):
        value = model.arch_value(f"rope.scaling.yarn_{key}")
        if value is not None:
            parameters[key] = float(value)
    return parameters


def _sizes(model: GgufModel) -> dict[str, Any]:
    layers = int(_required(model, "block_count"))
    dense = int(model.arch_value("leading_dense_block_count", 0))
    if dense >= layers:
        raise ModelLoadError(
            f"{model.path.name}: deepseek2.leading_dense_block_count = {dense} leaves none of "
            f"its {layers} layers a mixture of experts"
        )
    rope = int(_required(model, "rope.dimension_count"))
    if rope % 2:
        raise ModelLoadError(f"{model.path.name}: an odd rotary dimension ({rope}) is corrupt")
    nope, value = _head_sizes(model, rope)
    q_rank = model.arch_value("attention.q_lora_rank") or None
    shared = int(_required(model, "expert_shared_count"))
    if shared < 1:
        raise UnsupportedModelError("deepseek2", "it has no shared expert (DeepseekV2 has one)")
    heads = _required(model, "attention.head_count")
    return {
        "num_hidden_layers": layers, "first_k_dense_replace": dense,
        "kv_lora_rank": int(_required(model, "attention.kv_lora_rank")),
        "q_lora_rank": q_rank, "qk_rope_head_dim": rope, "qk_nope_head_dim": nope,
        "v_head_dim": value, "head_dim": rope, "num_attention_heads": heads,
        "num_key_value_heads": heads,  # MLA: every head has its own key and value
        "n_shared_experts": shared,
    }  # fmt: skip


def config_values(model: GgufModel) -> dict[str, Any]:
    """``DeepseekV2Config`` keyword arguments from a ``deepseek2`` file's metadata."""
    _check_ranges(model)
    _refuse_routing(model)
    values = _sizes(model)
    values.update(
        hidden_size=model.arch_value("embedding_length"),
        intermediate_size=model.arch_value("feed_forward_length"),
        moe_intermediate_size=model.arch_value("expert_feed_forward_length"),
        n_routed_experts=model.arch_value("expert_count"),
        num_experts_per_tok=model.arch_value("expert_used_count"),
        max_position_embeddings=model.arch_value("context_length"),
        rms_norm_eps=float(model.arch_value("attention.layer_norm_rms_epsilon", 1e-6)),
        routed_scaling_factor=float(model.arch_value("expert_weights_scale", 1.0)),
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        norm_topk_prob=False,
        rope_parameters=_rope_parameters(model),
    )
    vocab = model.arch_value("vocab_size")
    if vocab is not None:
        values["vocab_size"] = vocab
    used, experts = values["num_experts_per_tok"], values["n_routed_experts"]
    if used and experts and used > experts:
        raise ModelLoadError(
            f"{model.path.name} uses {used} experts per token of {experts}: the metadata is corrupt"
        )
    return values


# ---------------------------------------------------------------- kv_b_proj <-> attn_k_b/v_b


def split_kv_b(kv_b: np.ndarray, heads: int, nope: int) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's converter: ``kv_b [H*(nope+v), R]`` -> ``k_b [H, R, nope]``, ``v_b [H, v, R]``
    (``H`` heads, ``R`` kv_lora_rank)."""
    grouped = kv_b.reshape(heads, -1, kv_b.shape[-1])  # [H, nope+v, R]
    return np.ascontiguousarray(grouped[:, :nope].transpose(0, 2, 1)), grouped[:, nope:].copy()


def merge_kv_b(k_b: np.ndarray, v_b: np.ndarray) -> np.ndarray:
    """The inverse of ``split_kv_b``: ``kv_b_proj``'s weight ``[H*(nope+v), R]``."""
    if k_b.ndim != 3 or v_b.ndim != 3 or k_b.shape[0] != v_b.shape[0]:
        raise ModelLoadError(
            f"attn_k_b {list(k_b.shape)} and attn_v_b {list(v_b.shape)} are not one layer's split"
        )
    if k_b.shape[1] != v_b.shape[2]:
        raise ModelLoadError(
            f"attn_k_b {list(k_b.shape)} and attn_v_b {list(v_b.shape)} disagree on kv_lora_rank"
        )
    merged = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1)  # [H, nope+v, R]
    return merged.reshape(-1, merged.shape[-1])


def merge_split_tensors(
    arrays: Iterable[tuple[str, np.ndarray]],
) -> Iterator[tuple[str, np.ndarray]]:
    """``arrays`` (GGUF name, float array) with each layer's ``attn_k_b``/``attn_v_b`` pair
    replaced by the ``attn_kv_b`` it was split from (only the halves wait for their other
    half); a half pair is refused."""
    halves: dict[str, dict[str, np.ndarray]] = {}
    for name, array in arrays:
        found = KV_B.match(name)
        if found is None:
            yield name, array
            continue
        pair = halves.setdefault(found[1], {})
        pair[found[2]] = array
        if len(pair) == 2:
            yield f"blk.{found[1]}.attn_kv_b.weight", merge_kv_b(pair["k"], pair["v"])
            del halves[found[1]]
    for layer, pair in halves.items():
        missing = "attn_v_b" if "k" in pair else "attn_k_b"
        raise ModelLoadError(f"layer {layer} has half of the MLA split: {missing} is missing")


# ---------------------------------------------------------------- the writer's side


def check_writable(config: Any) -> None:
    """Refuse what a ``deepseek2`` file cannot say (llama.cpp would drop it silently)."""
    if (config.n_group or 1) > 1:
        raise ModelLoadError(
            "llama.cpp's deepseek2 graph groups experts by the top-2 sum, DeepseekV2 by the "
            "maximum: write DeepSeek-V2 with one group and topk_method 'greedy' (as V2-Lite is)"
        )
    if config.n_shared_experts < 1:
        raise ModelLoadError("deepseek2 files need at least one shared expert")


def add_hparams(writer: Any, config: Any, split: bool) -> None:
    """The metadata llama.cpp's converter writes for ``DeepseekV2ForCausalLM``."""
    rope = config.qk_rope_head_dim
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_leading_dense_block_count(config.first_k_dense_replace)
    writer.add_vocab_size(config.vocab_size)
    if config.q_lora_rank:
        writer.add_q_lora_rank(config.q_lora_rank)
    writer.add_kv_lora_rank(config.kv_lora_rank)
    if split:  # MLA absorbed: MQA over the latent (the converter since 2025)
        writer.add_head_count_kv(1)
        writer.add_key_length(config.kv_lora_rank + rope)
        writer.add_value_length(config.kv_lora_rank)
        writer.add_key_length_mla(config.qk_nope_head_dim + rope)
        writer.add_value_length_mla(config.v_head_dim)
    else:  # the older converter: attn_kv_b, plain key/value lengths
        writer.add_head_count_kv(config.num_attention_heads)
        writer.add_key_length(config.qk_nope_head_dim + rope)
        writer.add_value_length(config.v_head_dim)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    writer.add_expert_count(config.n_routed_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_shared_count(config.n_shared_experts)
    if config.n_group:  # the converter writes the groups whatever topk_method says
        writer.add_expert_group_count(config.n_group)
        writer.add_expert_group_used_count(config.topk_group or 1)
    writer.add_expert_weights_scale(float(config.routed_scaling_factor))
    writer.add_rope_dimension_count(rope)
    _add_yarn(writer, config.rope_parameters)


def _add_yarn(writer: Any, rope: dict[str, Any]) -> None:
    from gguf import RopeScalingType

    if rope.get("rope_type", "default") != "yarn":
        return
    writer.add_rope_scaling_type(RopeScalingType.YARN)
    writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    if "beta_fast" in rope:
        writer.add_rope_scaling_yarn_beta_fast(float(rope["beta_fast"]))
    if "beta_slow" in rope:
        writer.add_rope_scaling_yarn_beta_slow(float(rope["beta_slow"]))
    if rope.get("mscale_all_dim"):
        writer.add_rope_scaling_yarn_log_mul(0.1 * float(rope["mscale_all_dim"]))
