"""Hostile model folders: config shapes and sizes checked up front, non-finite weights named.

``read_config_object`` reads ``config.json`` (size-bounded) and insists on a JSON object;
``check_config_sizes`` refuses sizes that would make building even the weightless model run
for minutes and take gigabytes, before anything is allocated. ``check_trunk_finite`` names the
first trunk tensor holding NaN or infinity at load; the host expert store checks each expert
the first time it is used (``engine.offload.finite``). Every refusal is a
``ModelLoadError`` that says which field or tensor, and why.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from engine.errors import ModelLoadError
from engine.offload.finite import NonFiniteWeightError, check_finite

__all__ = [
    "NonFiniteWeightError",
    "check_config_sizes",
    "check_side_files",
    "check_trunk_finite",
    "read_config_object",
]

MAX_CONFIG_BYTES = 4 << 20  # real configs are a few KB (the largest known: ~200 KB)
# Side files that are parsed whole into memory (weights are mapped, never parsed like this).
SIDE_FILE_LIMITS: dict[str, int] = {
    "tokenizer.json": 256 << 20,  # the largest real ones are ~35 MB
    "tokenizer_config.json": 32 << 20,  # may embed chat templates
    "chat_template.jinja": 1 << 20,
    "chat_template.json": 1 << 20,
    "generation_config.json": 1 << 20,
    "special_tokens_map.json": 1 << 20,
    "model.safetensors.index.json": 64 << 20,
}

# Upper bounds well above any released model (DeepSeek-V3: hidden 7168, 61 layers, 256
# experts; Llama-4: vocab 202k; Gemma: vocab 262k), far below what exhausts a desktop.
SIZE_LIMITS: dict[str, int] = {
    "hidden_size": 65_536,
    "intermediate_size": 1_048_576,
    "moe_intermediate_size": 1_048_576,
    "shared_expert_intermediate_size": 1_048_576,
    "num_hidden_layers": 1_024,
    "num_attention_heads": 1_024,
    "num_key_value_heads": 1_024,
    "head_dim": 4_096,
    "vocab_size": 4_194_304,
    "max_position_embeddings": 16_777_216,
    "num_experts": 8_192,
    "num_local_experts": 8_192,
    "n_routed_experts": 8_192,
    "num_experts_per_tok": 1_024,
}
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
MAX_LAYER_EXPERTS = 262_144  # layers x experts: one module each when the model is built
MAX_EMBEDDING_ELEMENTS = 4_000_000_000  # vocab x hidden: 8 GB of bf16 for one matrix


def read_config_object(model_dir: Path) -> dict[str, Any]:
    """``config.json`` as a dict; a clear ``ModelLoadError`` for anything else."""
    path = Path(model_dir) / "config.json"
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ModelLoadError(
                f"config.json in {model_dir} is {size / 1e6:.1f} MB; a model config is a few "
                f"KB (the limit is {MAX_CONFIG_BYTES / 1e6:.0f} MB)"
            )
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        if isinstance(error, ModelLoadError):
            raise
        raise ModelLoadError(f"cannot read config.json in {model_dir}: {error}") from error
    if not isinstance(data, dict):
        raise ModelLoadError(
            f"config.json in {model_dir} is a JSON {type(data).__name__}, not an object"
        )
    return data


def check_side_files(model_dir: Path) -> None:
    """Refuse side files (tokenizer, templates, index) far larger than any real model's."""
    for name, limit in SIDE_FILE_LIMITS.items():
        path = Path(model_dir) / name
        try:
            size = path.stat().st_size
        except OSError:
            continue  # absent: whoever needs it says so
        if size > limit:
            raise ModelLoadError(
                f"{name} in {model_dir} is {size / 1e6:.0f} MB, more than any real model's "
                f"(limit {limit / 1e6:.0f} MB); it is not read"
            )


def _sections(config: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """The config and its nested text config (multimodal models keep sizes there)."""
    sections: list[tuple[str, Mapping[str, Any]]] = [("", config)]
    nested = config.get("text_config")
    if nested is not None:
        if not isinstance(nested, dict):
            raise ModelLoadError("config.json: text_config must be an object")
        sections.append(("text_config.", nested))
    return sections


def _size(prefix: str, key: str, value: Any, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelLoadError(f"config.json: {prefix}{key} must be a whole number, got {value!r}")
    if not 0 < value <= limit:
        raise ModelLoadError(
            f"config.json: {prefix}{key} = {value} is out of range (1 to {limit:,})"
        )
    return value


def _check_names(config: Mapping[str, Any]) -> None:
    names = config.get("architectures")
    if names is not None and (
        not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names)
    ):
        raise ModelLoadError(f"config.json: architectures must be a list of names, got {names!r}")
    if not isinstance(config.get("model_type", ""), str):
        raise ModelLoadError("config.json: model_type must be a name (a string)")


def check_config_sizes(config: Mapping[str, Any]) -> None:
    """Refuse wrong types and absurd sizes before any model is built (reads only the mapping)."""
    _check_names(config)
    for prefix, section in _sections(config):
        sizes = {
            key: _size(prefix, key, section[key], limit)
            for key, limit in SIZE_LIMITS.items()
            if section.get(key) is not None
        }
        _check_products(prefix, sizes)


def _check_products(prefix: str, sizes: Mapping[str, int]) -> None:
    experts = max((sizes[k] for k in EXPERT_COUNT_KEYS if k in sizes), default=0)
    layers = sizes.get("num_hidden_layers", 0)
    if experts * layers > MAX_LAYER_EXPERTS:
        raise ModelLoadError(
            f"config.json: {prefix}num_hidden_layers x experts = {layers * experts:,} expert "
            f"modules is more than any real model has (limit {MAX_LAYER_EXPERTS:,})"
        )
    top_k = sizes.get("num_experts_per_tok", 0)
    if experts and top_k > experts:
        raise ModelLoadError(
            f"config.json: {prefix}num_experts_per_tok = {top_k} is more than the {experts} "
            "experts per layer"
        )
    embedding = sizes.get("vocab_size", 0) * sizes.get("hidden_size", 0)
    if embedding > MAX_EMBEDDING_ELEMENTS:
        raise ModelLoadError(
            f"config.json: {prefix}vocab_size x hidden_size = {embedding:,} embedding values "
            f"is more than any real model has (limit {MAX_EMBEDDING_ELEMENTS:,})"
        )


def check_trunk_finite(model: nn.Module) -> None:
    """Every weight the checkpoint gave the trunk (parameters and saved buffers) is finite.

    The offloaded experts are placeholders here; the host store checks each expert the first
    time it is used (``engine.offload.finite``).
    """
    check_finite(model.state_dict().items(), "trunk")
