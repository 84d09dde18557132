"""GGUF metadata -> a transformers config for the MoE architectures the engine runs.

transformers' own table (``GGUF_CONFIG_MAPPING``) renames the common llama.cpp keys; this module
adds what it lacks for MoE files: the expert sizes of Qwen2/Qwen3-MoE, Mixtral written as
``llama`` with ``expert_count``, the top-k renormalisation llama.cpp applies
(``expert_weights_norm`` when the file says, else llama.cpp's default per architecture: off for
``qwen2moe``, on for ``qwen3moe`` and Mixtral), and DeepSeek-V2's whole key set
(``engine.gguf.deepseek2``). Every other architecture is refused by name, and
a file without expert tensors is refused as dense. Sizes are checked for sanity before a model
is built from them.
"""

from __future__ import annotations

import re
from typing import Any

from transformers import AutoConfig
from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

from engine.errors import ModelLoadError, UnsupportedModelError
from engine.gguf import deepseek2
from engine.gguf.reader import GgufModel

OLD_EXPERT_LAYOUT = re.compile(r"\.ffn_(gate|up|down)\.\d+\.weight$")
SUPPORTED = {
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "llama": "mixtral",
    "olmoe": "olmoe",
    "deepseek2": "deepseek_v2",
}
MAY_BE_NONE = {"q_lora_rank"}  # DeepSeek-V2-Lite: no low-rank query
LIMITS = {
    "block_count": 4096,
    "embedding_length": 1 << 17,
    "feed_forward_length": 1 << 20,
    "expert_feed_forward_length": 1 << 20,
    "expert_count": 1 << 14,
    "expert_used_count": 1 << 10,
    "attention.head_count": 1 << 12,
    "attention.head_count_kv": 1 << 12,
    "context_length": 1 << 24,
}


def has_experts(model: GgufModel) -> bool:
    return any("_exps." in name for name in model.tensors)


def _check_sizes(model: GgufModel) -> None:
    for key, limit in LIMITS.items():
        value = model.arch_value(key)
        if value is None:
            continue
        if not isinstance(value, int) or not 0 < value <= limit:
            raise ModelLoadError(
                f"{model.path.name} has an impossible {model.architecture}.{key} = {value!r} "
                f"(expected 1 to {limit}): the metadata is corrupt"
            )


def check_supported(model: GgufModel) -> str:
    """The transformers model type for this file, or a typed refusal."""
    arch = model.architecture
    if any(OLD_EXPERT_LAYOUT.search(name) for name in model.tensors):
        raise UnsupportedModelError(
            arch,
            f"{model.path.name} stores each expert as its own tensor (the GGUF layout before "
            "April 2024); download or convert a newer GGUF of this model",
        )
    if not has_experts(model):
        raise UnsupportedModelError(
            arch,
            f"{model.path.name} is a dense model (no expert tensors); Understudy runs "
            "mixture-of-experts models",
        )
    if arch not in SUPPORTED:
        raise UnsupportedModelError(
            arch,
            f"GGUF MoE files of architecture {arch!r} are not supported yet (supported: "
            f"{', '.join(sorted(SUPPORTED))} with experts)",
        )
    _check_sizes(model)
    return SUPPORTED[arch]


def _mapped(model: GgufModel, mapping_arch: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    mapping: dict[str, Any] = dict(GGUF_CONFIG_MAPPING[mapping_arch])  # type: ignore[call-overload]
    for key, name in mapping.items():
        value = model.arch_value(key)
        if name is not None and name != -1 and value is not None:
            values[name] = value
    return values


def _renormalise(model: GgufModel, default: bool) -> bool:
    return bool(model.arch_value("expert_weights_norm", default))


def _qwen_moe(model: GgufModel, model_type: str) -> dict[str, Any]:
    values = _mapped(model, model_type)
    values["moe_intermediate_size"] = model.arch_value("expert_feed_forward_length")
    shared = model.arch_value("expert_shared_feed_forward_length")
    if shared:
        values["shared_expert_intermediate_size"] = shared
    values["norm_topk_prob"] = _renormalise(model, default=model_type == "qwen3_moe")
    if model_type == "qwen2_moe":
        values["qkv_bias"] = "blk.0.attn_q.bias" in model.tensors
    return values


def _olmoe(model: GgufModel) -> dict[str, Any]:
    values = _mapped(model, "llama")  # llama.cpp writes OLMoE with the llama key set
    values["num_experts"] = model.arch_value("expert_count")
    values["num_experts_per_tok"] = model.arch_value("expert_used_count")
    expert_size = model.arch_value("expert_feed_forward_length")
    if expert_size:
        values["intermediate_size"] = expert_size
    values["norm_topk_prob"] = _renormalise(model, default=False)
    return values


def _mixtral(model: GgufModel) -> dict[str, Any]:
    values = _mapped(model, "llama")
    values["num_local_experts"] = model.arch_value("expert_count")
    values["num_experts_per_tok"] = model.arch_value("expert_used_count")
    expert_size = model.arch_value("expert_feed_forward_length")
    if expert_size:
        values["intermediate_size"] = expert_size
    return values


def _token_ids(model: GgufModel) -> dict[str, Any]:
    ids: dict[str, Any] = {}
    pairs = (("eos", "eos_token_id"), ("bos", "bos_token_id"), ("padding", "pad_token_id"))
    for key, name in pairs:
        value = model.metadata.get(f"tokenizer.ggml.{key}_token_id")
        if value is not None:
            ids[name] = value
    return ids


def build_config(model: GgufModel) -> Any:
    """The transformers config of a supported GGUF MoE file (float32, nothing executed)."""
    model_type = check_supported(model)
    builders = {"mixtral": _mixtral, "olmoe": _olmoe, "deepseek_v2": deepseek2.config_values}
    builder = builders.get(model_type)
    values = builder(model) if builder else _qwen_moe(model, model_type)
    if "vocab_size" not in values:
        tokens = model.metadata.get("tokenizer.ggml.tokens")
        values["vocab_size"] = getattr(tokens, "count", None) or len(tokens or [])
    values["tie_word_embeddings"] = "output.weight" not in model.tensors
    values.update(_token_ids(model))
    values["dtype"] = "float32"
    missing = [key for key, value in values.items() if value is None and key not in MAY_BE_NONE]
    if missing:
        raise ModelLoadError(f"{model.path.name} lacks the metadata for {', '.join(missing)}")
    try:
        return AutoConfig.for_model(model_type, **values)
    except (ValueError, TypeError) as error:
        raise ModelLoadError(
            f"{model.path.name}: its metadata makes no valid model: {error}"
        ) from error
