"""The memory estimate made before anything is loaded, and the refusal when it does not fit.

Device bytes are the trunk, the KV cache for the whole context length and the expert cache;
host bytes are all routed experts (they live in host RAM and are copied in on demand). Both are
compared with what is free now: ``torch.cuda.mem_get_info`` on CUDA, ``MemAvailable`` from
``/proc/meminfo`` for the host. On the CPU the "device" is host RAM too, so the experts only get
what the device part leaves free.

``ModelInfo`` byte counts are taken as stored in the checkpoint and scaled to the dtype the model
will run in. This module reads ``config.json`` (never code) for the KV geometry; it loads nothing.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from engine.config import LoadConfig
from engine.errors import InsufficientMemoryError, ModelLoadError
from engine.events import MemoryEstimate, ModelInfo
from engine.offload.store import decodes_on

GB = 1e9
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when a GPU is usable, else the CPU; CUDA without a GPU is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            "the CUDA device was chosen but no usable NVIDIA GPU was found; choose the CPU "
            "(device cpu) or auto"
        )
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 (or float16 without bf16 support) on CUDA and float32 on the CPU."""
    if name != "auto":
        return _DTYPES[name]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def read_model_config(model_dir: Path) -> Any:
    """The (text) config of a model folder (``config.json``) or GGUF file, without remote code."""
    from engine.gguf.reader import is_gguf

    if is_gguf(Path(model_dir)):
        from engine.gguf.config import build_config
        from engine.gguf.reader import open_gguf

        return build_config(open_gguf(Path(model_dir))).get_text_config()
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read the model config in {model_dir}: {error}") from error
    return config.get_text_config()


def checkpoint_dtype(model_config: Any) -> torch.dtype:
    """The dtype the checkpoint declares (``dtype``/``torch_dtype``), float32 when absent."""
    declared = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    if isinstance(declared, torch.dtype):
        return declared
    return _DTYPES.get(str(declared), torch.float32)


def kv_elements_per_token(model_config: Any) -> int:
    """Key plus value elements one token adds to a transformers ``DynamicCache``, all layers."""
    layers = int(model_config.num_hidden_layers)
    heads = int(model_config.num_attention_heads)
    if getattr(model_config, "kv_lora_rank", None) is not None:  # DeepSeek MLA
        # transformers 5.23 caches the compressed latent and the shared rotary key, one "head"
        return layers * (int(model_config.kv_lora_rank) + int(model_config.qk_rope_head_dim))
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    return layers * 2 * int(kv_heads) * int(head_dim)


def host_available_bytes() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo``; None where that file does not exist."""
    try:
        text = Path("/proc/meminfo").read_text(encoding="ascii")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def device_available_bytes(device: torch.device) -> int | None:
    """Free bytes on a CUDA device; None for the CPU (it shares the host figure)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def estimate_memory(
    info: ModelInfo, config: LoadConfig, model_config: Any = None
) -> MemoryEstimate:
    """Bytes the load described by ``config`` would take, against what is free right now."""
    model_config = model_config if model_config is not None else read_model_config(config.model_dir)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    scale = itemsize / torch.empty((), dtype=checkpoint_dtype(model_config)).element_size()
    expert_scale = 1.0 if info.expert_quant else scale  # quantized experts stay as stored
    expert_bytes = int(info.bytes_per_expert * expert_scale)
    if config.expert_quant != "none" and not info.expert_quant:
        expert_bytes = _quantized_expert_bytes(info, model_config, config.expert_quant)
        expert_scale = expert_bytes / max(1, info.bytes_per_expert)
    total_experts = info.moe_layers * info.experts_per_layer
    slot = _slot_bytes(info, config, device, itemsize, expert_bytes)
    slots = config.cache.slots_for(total_experts, slot)
    estimate = MemoryEstimate(
        device=str(device),
        trunk_bytes=int(info.trunk_bytes * scale),
        kv_cache_bytes=kv_elements_per_token(model_config) * config.context_length * itemsize,
        expert_cache_bytes=slots * slot,
        host_expert_bytes=0 if config.mmap_experts else int(info.total_expert_bytes * expert_scale),
        device_free_bytes=None,
        host_free_bytes=None,
        expert_slots=slots,
        total_experts=total_experts,
    )
    return with_free_memory(estimate, device)


def _slot_bytes(
    info: ModelInfo, config: LoadConfig, device: torch.device, itemsize: int, expert_bytes: int
) -> int:
    """One cache slot's bytes as the loader sizes it: where the cache decodes quantized experts
    into its slots (the CPU, unless ``quantized_slots``), a slot holds a float expert."""
    quantized = bool(info.expert_quant) or config.expert_quant != "none"
    if quantized and info.expert_weights > 0 and decodes_on(device, config.quantized_slots):
        return info.expert_weights * itemsize
    return expert_bytes


def _quantized_expert_bytes(info: ModelInfo, model_config: Any, scheme: str) -> int:
    """One expert's bytes once quantized at load (``--expert-quant``), row alignment included."""
    from engine.runtime.expert_quant import quantized_bytes

    itemsize = torch.empty((), dtype=checkpoint_dtype(model_config)).element_size()
    numel = info.bytes_per_expert // itemsize
    return quantized_bytes(numel * 2 // 3, scheme) + quantized_bytes(numel // 3, scheme) + 256


def with_free_memory(estimate: MemoryEstimate, device: torch.device) -> MemoryEstimate:
    """Fill in free bytes; on the CPU the experts get what the device part leaves of the host."""
    host_free = host_available_bytes()
    if device.type == "cuda":
        device_free = device_available_bytes(device)
    else:
        device_free = host_free
        host_free = None if host_free is None else max(0, host_free - estimate.device_bytes)
    return replace(estimate, device_free_bytes=device_free, host_free_bytes=host_free)


def _gb(value: int) -> str:
    return f"{value / GB:.2f} GB"


def describe_shortfall(estimate: MemoryEstimate) -> str | None:
    """A sentence saying what does not fit and what to change; None when everything fits."""
    if estimate.fits:
        return None
    free_device = estimate.device_free_bytes
    if free_device is not None and estimate.device_bytes > free_device:
        return (
            f"The model needs {_gb(estimate.device_bytes)} on {estimate.device} "
            f"(trunk {_gb(estimate.trunk_bytes)}, KV cache {_gb(estimate.kv_cache_bytes)}, "
            f"expert cache {_gb(estimate.expert_cache_bytes)}) "
            f"but only {_gb(free_device)} is free. "
            "Lower the expert cache budget or the context length, pick a smaller dtype, "
            "or run on the CPU; or force the load anyway."
        )
    return (
        f"The experts need {_gb(estimate.host_expert_bytes)} of host memory but only "
        f"{_gb(estimate.host_free_bytes or 0)} is free. Close other programs, pick a smaller "
        "dtype or a smaller model, or read the experts from the memory-mapped model "
        "file instead (--mmap-experts: the page cache holds the experts used lately and the "
        "disk the rest); "
        "or force the load anyway."
    )


def check_fits(estimate: MemoryEstimate, force: bool) -> None:
    """Raise ``InsufficientMemoryError`` when the estimate does not fit, unless ``force``."""
    message = describe_shortfall(estimate)
    if message is None or force:
        return
    device_short = estimate.device_free_bytes is not None and (
        estimate.device_bytes > estimate.device_free_bytes
    )
    needed = estimate.device_bytes if device_short else estimate.host_expert_bytes
    available = estimate.device_free_bytes if device_short else estimate.host_free_bytes
    raise InsufficientMemoryError(message, needed_bytes=needed, available_bytes=available or 0)
