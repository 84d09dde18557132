"""Model folder -> trunk on the device, routed experts in host buffers, routers wrapped.

Nothing from the folder is executed: configs go through ``AutoConfig`` without remote code and
weights are read only from safetensors (pickle checkpoints are refused).

How the trunk is loaded without reading the experts: every experts class decorated with
``@use_experts_implementation`` in the model's modeling module is swapped, for the duration of
``from_pretrained``, for a weightless stand-in (``experts.placeholder_class``). transformers
then loads, renames, casts, ties and places everything else exactly as it always does, and the
expert keys become "unexpected" without being read. The experts are then read lazily by
``offload.store`` using the mapping transformers itself would apply (``conversion_mapping``,
``rename_source_key``) to find, for each checkpoint key, its (layer, expert, part).

``inspect_model`` does the same planning on the meta device from ``config.json`` and the
safetensors headers only, without reading any weight.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    Concatenate,
    MergeModulelist,
    WeightConverter,
    WeightRenaming,
    rename_source_key,
)
from transformers.utils import logging as hf_logging

from engine.config import CacheConfig, LoadConfig
from engine.errors import (
    CacheBudgetError,
    CancelledError,
    EngineOutOfMemoryError,
    ModelLoadError,
    UnsupportedModelError,
)
from engine.events import ModelInfo
from engine.offload import OffloadController
from engine.offload.cache import ExpertCache
from engine.offload.eviction import make_policy
from engine.offload.experts import (
    ExpertsPath,
    OffloadedExperts,
    is_experts_class,
    is_standard_eager,
    placeholder_class,
)
from engine.offload.families import ROUTER_ATTRIBUTES, RouterFamily, router_family
from engine.offload.method import SmoeMethod
from engine.offload.routing import RoutingWrapper
from engine.offload.stats import OffloadStats
from engine.offload.store import (
    DecodedStore,
    ExpertPart,
    ExpertShape,
    HostExpertStore,
    Part,
    SlotKey,
    decodes_on_copy,
    slot_bytes,
)
from engine.runtime.memory import resolve_device, resolve_dtype
from engine.runtime.validation import (
    check_config_sizes,
    check_side_files,
    check_trunk_finite,
    read_config_object,
)

GB = 1e9
_SWAP_LOCK = threading.Lock()  # experts classes are swapped module-wide during from_pretrained
_SAFETENSORS_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_NOISY_LOGGERS = ("transformers.modeling_utils", "transformers.distributed.tensor_parallel")
_HOST_OOM = re.compile(r"can't allocate memory|out of memory|Cannot allocate memory", re.IGNORECASE)
_SHAPE_ERROR = re.compile(r"size mismatch|shape", re.IGNORECASE)


@dataclass
class LoadedModel:
    """A loaded model ready for ``model(...)``: trunk on ``device``, experts offloaded."""

    model: Any  # transformers PreTrainedModel, eval mode
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    info: ModelInfo
    offload: OffloadController
    device: torch.device
    dtype: torch.dtype


@dataclass(frozen=True)
class _Tensor:
    file: Path
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class _MoeLayer:
    layer: int
    experts_path: str  # e.g. "model.layers.3.mlp.experts"
    router_path: str  # e.g. "model.layers.3.mlp.gate"
    experts_class: type
    top_k: int


@dataclass
class _Plan:
    """Everything decided from config.json and the headers, before any weight is read."""

    model_dir: Path
    config: Any
    architecture: str
    family: RouterFamily
    moe: list[_MoeLayer]
    num_experts: int
    hidden: int
    intermediate: int
    parts: dict[SlotKey, list[ExpertPart]]
    trunk_bytes: int
    checkpoint_expert_bytes: int  # one expert as stored


# ---------------------------------------------------------------- folder, config, headers


def _no_progress(fraction: float, message: str) -> None:
    return None


def _never() -> bool:
    return False


def _architecture_name(model_dir: Path) -> str:
    try:
        raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "unknown"
    names = raw.get("architectures") or [raw.get("model_type", "unknown")]
    return str(names[0])


def _unknown_reason(model_dir: Path) -> str:
    try:
        raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raw = {}
    if raw.get("auto_map"):
        return "it needs custom code from the model folder, which is never run"
    return f"transformers does not know the model type {raw.get('model_type')!r}"


def _read_config(model_dir: Path) -> Any:
    if not model_dir.is_dir():
        raise ModelLoadError(f"model folder {model_dir} does not exist or is not a folder")
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(
            f"{model_dir} has no config.json; is this a Hugging Face model folder?"
        )
    check_config_sizes(read_config_object(model_dir))  # before transformers builds anything
    check_side_files(model_dir)
    architecture = _architecture_name(model_dir)
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=False, local_files_only=True)
    except ValueError as error:
        if re.search(r"trust_remote_code|recogni[sz]e", str(error)):
            raise UnsupportedModelError(architecture, _unknown_reason(model_dir)) from error
        raise ModelLoadError(f"cannot read config.json in {model_dir}: {error}") from error
    except Exception as error:  # OSError, or a field that fails transformers' validation
        raise ModelLoadError(f"cannot read config.json in {model_dir}: {error}") from error


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as error:
            raise ModelLoadError(f"cannot read {index.name}: {error}") from error
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")) or any(model_dir.glob("*.pth")):
        raise ModelLoadError(
            f"{model_dir} holds only pickle weights (.bin/.pt), which are never loaded because "
            "they can run code; convert the model to safetensors first"
        )
    raise ModelLoadError(f"{model_dir} has no model.safetensors or model.safetensors.index.json")


def _read_headers(files: list[Path]) -> dict[str, _Tensor]:
    """Name -> (file, shape, dtype) for every tensor, from the headers only."""
    tensors: dict[str, _Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    view = handle.get_slice(key)
                    tensors[key] = _Tensor(file, tuple(view.get_shape()), str(view.get_dtype()))
        except FileNotFoundError as error:
            raise ModelLoadError(f"model file {file.name} is missing from {file.parent}") from error
        except Exception as error:  # safetensors raises SafetensorError for bad files
            raise ModelLoadError(
                f"{file.name} is not a valid safetensors file (truncated or corrupt?): {error}"
            ) from error
    return tensors


# ---------------------------------------------------------------- architecture checks


def _meta_model(config: Any, architecture: str) -> nn.Module:
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except ValueError as error:
        raise UnsupportedModelError(architecture, "it is not a causal language model") from error
    except Exception as error:  # a config transformers cannot build a model from
        raise ModelLoadError(
            f"config.json describes a {architecture} that cannot be built: {error}"
        ) from error


def _layer_index(path: str) -> int:
    found = re.findall(r"\.(\d+)\.", f".{path}.")
    if not found:
        raise ValueError(f"no layer index in module path {path!r}")
    return int(found[-1])


def _router_of(model: nn.Module, experts_path: str) -> tuple[str, nn.Module] | None:
    parent_path = experts_path.rpartition(".")[0]
    parent = model.get_submodule(parent_path)
    for name in ROUTER_ATTRIBUTES:
        child = getattr(parent, name, None)
        if isinstance(child, nn.Module) and not is_experts_class(type(child)):
            return f"{parent_path}.{name}", child
    return None


def _moe_layer(model: nn.Module, path: str, module: nn.Module, architecture: str) -> _MoeLayer:
    if not is_standard_eager(type(module)):
        raise UnsupportedModelError(
            architecture,
            f"its experts ({type(module).__name__}) do not use the standard fused eager layout "
            "the engine reproduces exactly",
        )
    router = _router_of(model, path)
    if router is None:
        raise UnsupportedModelError(architecture, f"no router module found next to {path}")
    config: Any = model.config
    top_k: Any = getattr(router[1], "top_k", None) or getattr(config, "num_experts_per_tok", 0)
    return _MoeLayer(_layer_index(path), path, router[0], type(module), int(top_k))


def _find_moe(model: nn.Module, architecture: str) -> list[_MoeLayer]:
    layers = [
        _moe_layer(model, path, module, architecture)
        for path, module in model.named_modules()
        if is_experts_class(type(module))
    ]
    if not layers:
        raise UnsupportedModelError(
            architecture,
            "it has no routed experts the engine can offload (not a mixture-of-experts model, "
            "or an MoE without transformers' common experts interface)",
        )
    return layers


def _expert_dims(model: nn.Module, moe: list[_MoeLayer], architecture: str) -> tuple[int, int, int]:
    modules: list[Any] = [model.get_submodule(m.experts_path) for m in moe]
    shapes = {tuple(module.gate_up_proj.shape) for module in modules}  # [E, 2I, H]
    downs = {tuple(module.down_proj.shape) for module in modules}  # [E, H, I]
    if len(shapes) != 1 or len(downs) != 1:
        raise UnsupportedModelError(architecture, "its MoE layers have experts of different sizes")
    num_experts, two_i, hidden = shapes.pop()
    return int(num_experts), int(hidden), int(two_i) // 2


# ---------------------------------------------------------------- checkpoint key mapping


def _glob_regex(pattern: str) -> re.Pattern[str]:
    return re.compile(re.escape(pattern).replace(r"\*", r"(\d+)"))


def _converter_part(converter: WeightConverter, source_pattern: str, target: str) -> Part | None:
    """Which part a source pattern of a fused-experts converter fills, None when unknown."""
    operations: list[Any] = list(converter.operations)
    ops = [type(op) for op in operations]
    sources = list(converter.source_patterns)
    merge = bool(ops) and ops[0] is MergeModulelist and operations[0].dim == 0
    if target.endswith(".down_proj") and ops == [MergeModulelist] and merge and len(sources) == 1:
        return "down"
    concat = len(ops) == 2 and ops[1] is Concatenate and operations[1].dim == 1
    if target.endswith(".gate_up_proj") and merge and concat and len(sources) == 2:
        return "gate" if sources.index(source_pattern) == 0 else "up"
    return None


class _KeyMapper:
    """Checkpoint key -> model parameter name, with transformers' own conversion rules."""

    def __init__(self, model: Any) -> None:
        transforms = get_model_conversion_mapping(model)
        self.renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self.converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self.by_pattern = {p: c for c in self.converters for p in c.source_patterns}
        self.meta_state = model.state_dict()
        self.prefix = getattr(model, "base_model_prefix", None)

    def rename(self, key: str) -> tuple[str, str | None]:
        renamed, pattern = rename_source_key(
            key, self.renamings, self.converters, self.prefix, self.meta_state
        )
        if renamed not in self.meta_state and key in self.meta_state:
            return key, None
        return renamed, pattern


def _expert_parts(
    key: str, tensor: _Tensor, mapper: _KeyMapper, targets: dict[str, int], num_experts: int
) -> list[tuple[SlotKey, ExpertPart]] | None:
    """The (layer, expert) parts a checkpoint key holds; None when it is a trunk tensor."""
    renamed, pattern = mapper.rename(key)
    layer = targets.get(renamed)
    if layer is None:
        return None
    if pattern is None:  # already fused in the checkpoint: [E, ...]
        part: Part = "down" if renamed.endswith(".down_proj") else "gate_up"
        return [((layer, e), ExpertPart(tensor.file, key, part, e)) for e in range(num_experts)]
    found = _glob_regex(pattern).search(key)
    converted = _converter_part(mapper.by_pattern[pattern], pattern, renamed)
    if found is None or converted is None:
        raise UnsupportedModelError(
            _architecture_name(tensor.file.parent), f"unknown expert layout of key {key!r}"
        )
    return [((layer, int(found.group(1))), ExpertPart(tensor.file, key, converted, None))]


def _check_complete(
    parts: dict[SlotKey, list[ExpertPart]], moe: list[_MoeLayer], experts: int
) -> None:
    for layer in moe:
        for expert in range(experts):
            names = {p.part for p in parts.get((layer.layer, expert), [])}
            if names not in ({"gate", "up", "down"}, {"gate_up", "down"}):
                raise ModelLoadError(
                    f"the checkpoint lacks weights of expert {expert} in layer {layer.layer} "
                    f"(found parts: {sorted(names) or 'none'})"
                )


def _split_checkpoint(
    headers: dict[str, _Tensor], model: nn.Module, moe: list[_MoeLayer], experts: int
) -> tuple[dict[SlotKey, list[ExpertPart]], int]:
    """Expert parts per (layer, expert), and the bytes of everything else (the trunk)."""
    mapper = _KeyMapper(model)
    targets = {f"{m.experts_path}.{n}": m.layer for m in moe for n in ("gate_up_proj", "down_proj")}
    parts: dict[SlotKey, list[ExpertPart]] = {}
    trunk_bytes = 0
    for key, tensor in headers.items():
        found = _expert_parts(key, tensor, mapper, targets, experts)
        if found is None:
            trunk_bytes += _nbytes(tensor)
            continue
        for slot_key, part in found:
            parts.setdefault(slot_key, []).append(part)
    _check_complete(parts, moe, experts)
    return parts, trunk_bytes


def _nbytes(tensor: _Tensor) -> int:
    count = 1
    for size in tensor.shape:
        count *= size
    return count * _SAFETENSORS_DTYPES.get(tensor.dtype, 2)


# ---------------------------------------------------------------- plan and inspect


def _plan(model_dir: Path) -> _Plan:
    model_dir = Path(model_dir)
    config = _read_config(model_dir)
    architecture = _architecture_name(model_dir)
    headers = _read_headers(_checkpoint_files(model_dir))
    meta = _meta_model(config, architecture)
    moe = _find_moe(meta, architecture)
    num_experts, hidden, intermediate = _expert_dims(meta, moe, architecture)
    parts, trunk_bytes = _split_checkpoint(headers, meta, moe, num_experts)
    first = next(iter(parts.values()))
    itemsize = _SAFETENSORS_DTYPES.get(headers[first[0].key].dtype, 2)
    family = router_family(meta.config)
    return _Plan(
        model_dir, config, architecture, family, moe, num_experts, hidden, intermediate,
        parts, trunk_bytes, 3 * hidden * intermediate * itemsize,
    )  # fmt: skip


def _info(plan: _Plan) -> ModelInfo:
    config = plan.config.get_text_config()
    return ModelInfo(
        path=str(plan.model_dir),
        name=plan.model_dir.name,
        architecture=plan.architecture,
        model_type=str(config.model_type),
        num_layers=int(config.num_hidden_layers),
        moe_layers=len(plan.moe),
        experts_per_layer=plan.num_experts,
        top_k=plan.moe[0].top_k,
        bytes_per_expert=plan.checkpoint_expert_bytes,
        trunk_bytes=plan.trunk_bytes,
        total_expert_bytes=plan.checkpoint_expert_bytes * plan.num_experts * len(plan.moe),
        vocab_size=int(config.vocab_size),
        max_context=int(getattr(config, "max_position_embeddings", 0) or 0),
        router_family=plan.family.name,
        substitution_supported=plan.family.substitution_supported,
        expert_weights=3 * plan.hidden * plan.intermediate,
    )


def inspect_model(model_dir: Path) -> ModelInfo:
    """Facts about a model folder (or GGUF file) from its metadata; no weight is read."""
    from engine.gguf.reader import is_gguf

    if is_gguf(Path(model_dir)):
        from engine.runtime.gguf_loading import inspect_gguf

        return inspect_gguf(Path(model_dir))
    return _info(_plan(Path(model_dir)))


# ---------------------------------------------------------------- cache budget


def minimum_slots(info: ModelInfo) -> int:
    """One decode step's working set: a token's top-k experts of one layer."""
    return max(1, min(info.experts_per_layer, info.top_k))


def cache_slots(cache: CacheConfig, info: ModelInfo, slot_bytes: int) -> int:
    """Slots the budget buys, refused below one layer's working set."""
    total = info.experts_per_layer * info.moe_layers
    slots = cache.slots_for(total, slot_bytes)
    needed = minimum_slots(info)
    if slots < needed:
        raise CacheBudgetError(
            f"The expert cache budget buys {slots} expert slot(s), but one layer needs at least "
            f"{needed} ({needed * slot_bytes / GB:.4g} GB, a fraction of {needed / total:.4g}); "
            "raise the cache budget.",
            minimum_slots=needed,
            minimum_bytes=needed * slot_bytes,
        )
    return slots


# ---------------------------------------------------------------- loading


@contextmanager
def _experts_swapped(classes: set[type]) -> Iterator[None]:
    """Replace the experts classes in their modeling modules by weightless stand-ins."""
    originals: list[tuple[ModuleType, str, type]] = []
    with _SWAP_LOCK:
        try:
            for cls in classes:
                module = sys.modules[cls.__module__]
                for name, value in list(vars(module).items()):
                    if value is cls:
                        originals.append((module, name, value))
                        setattr(module, name, placeholder_class(cls))
            yield
        finally:
            for module, name, value in originals:
                setattr(module, name, value)


@contextmanager
def _quiet_load_report() -> Iterator[None]:
    """Silence transformers' load report and progress bar: the engine reports its own progress,
    and expert keys are unexpected there by design."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    bars_were_on = hf_logging.is_progress_bar_enabled()
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _load_tokenizer(model_dir: Path, vocab_size: int) -> Any:
    if not any((model_dir / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelLoadError(
            f"{model_dir} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); copy the "
            "tokenizer files of the model into the folder"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_dir, trust_remote_code=False, local_files_only=True
        )
    except Exception as error:  # transformers raises OSError, ValueError, TypeError here
        raise ModelLoadError(f"cannot load the tokenizer of {model_dir}: {error}") from error
    if len(tokenizer) < 2:
        raise ModelLoadError(
            f"the tokenizer in {model_dir} has {len(tokenizer)} token(s) for a model with a "
            f"vocabulary of {vocab_size}; its files are missing or broken"
        )
    return tokenizer


def _load_trunk(plan: _Plan, dtype: torch.dtype, device: torch.device) -> nn.Module:
    placement = {"device_map": str(device)} if device.type == "cuda" else {}
    with _experts_swapped({m.experts_class for m in plan.moe}), _quiet_load_report():
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            plan.model_dir,
            config=plan.config,
            dtype=dtype,
            trust_remote_code=False,
            local_files_only=True,
            use_safetensors=True,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported by _check_loading as a typed error
            **placement,
        )
    model, loading = loaded
    _check_loading(loading)
    return model.eval()


def _check_loading(loading: dict[str, Any]) -> None:
    missing = sorted(loading.get("missing_keys", []))
    mismatched = list(loading.get("mismatched_keys", []))
    if missing:
        raise ModelLoadError(f"the checkpoint lacks weights: {', '.join(missing[:5])}")
    if mismatched:
        raise ModelLoadError(f"tensors with the wrong shape for config.json: {mismatched[:5]}")


def _bind_offload(
    model: nn.Module, plan: _Plan, store: HostExpertStore, num_slots: int, config: LoadConfig
) -> OffloadController:
    device = next(model.parameters()).device
    if config.int4_assist_on(device.type):
        from engine.offload.packed import PackedExperts

        getattr(store, "inner", store).packed = PackedExperts()  # the quantized rows' store
    policy = make_policy(config.live.effective_eviction, config.live.score_window)
    stats = OffloadStats([m.layer for m in plan.moe], num_slots, num_slots * store.shape.nbytes)
    cache = ExpertCache(store, num_slots, device, policy, stats)
    experts: dict[int, OffloadedExperts] = {}
    routers: dict[int, RoutingWrapper] = {}
    for m in plan.moe:
        module = model.get_submodule(m.experts_path)
        if not isinstance(module, OffloadedExperts):
            raise ModelLoadError(f"{m.experts_path} was not replaced by an offloaded module")
        experts[m.layer] = module
        routers[m.layer] = RoutingWrapper(m.layer, model.get_submodule(m.router_path), plan.family)
    controller = OffloadController(model, store, cache, stats, routers, experts, config.live)
    controller.method = SmoeMethod(controller, model, plan.family, plan.moe[0].top_k)
    controller.set_experts_path(experts_path(config.experts, device, store))
    return controller


def experts_path(choice: str, device: torch.device, store: HostExpertStore) -> ExpertsPath:
    """The expert compute path for ``--experts``.

    ``auto``: grouped on a CUDA card with ``grouped_mm`` kernels (compute capability 8.0+),
    batched on an older card (a fixed few kernels per layer without them), the eager loop on
    the CPU (fastest there: it reads each expert's weights once, the others copy them).
    Quantized slots (GGUF blocks, which may differ per layer) are decoded one expert at a
    time by the eager path; the grouped and batched paths read the pool as one float tensor.
    """
    if not isinstance(store.shape, ExpertShape):
        return "eager"
    if choice == "auto":
        if device.type != "cuda":
            return "eager"
        return "grouped" if torch.cuda.get_device_capability(device) >= (8, 0) else "batched"
    assert choice in ("eager", "grouped", "batched"), f"unchecked experts choice {choice!r}"
    return choice  # type: ignore[return-value]


def _fill_store(
    plan: _Plan,
    store: HostExpertStore,
    progress: Callable[[float, str], None],
    cancelled: Callable[[], bool],
) -> None:
    def on_tensor(done: int, total: int) -> None:
        _check_cancelled(cancelled)
        if done == total or done % 16 == 0:
            progress(0.3 + 0.65 * done / total, f"Reading experts ({done}/{total} tensors)")

    store.fill(plan.parts, on_tensor)


def _expert_shape(plan: _Plan, dtype: torch.dtype, scheme: str) -> ExpertShape | Any:
    if scheme == "none":
        return ExpertShape(plan.hidden, plan.intermediate, dtype)
    from engine.runtime.expert_quant import quantized_shape

    try:
        return quantized_shape(plan.hidden, plan.intermediate, dtype, scheme)
    except ValueError as error:
        raise ModelLoadError(f"the experts cannot be quantized to {scheme}: {error}") from error


def _fill_quantized(
    plan: _Plan,
    store: HostExpertStore,
    scheme: str,
    progress: Callable[[float, str], None],
    cancelled: Callable[[], bool],
) -> None:
    from engine.runtime.expert_quant import fill_quantized_store

    on_layer = _quantize_progress("Read quantized experts", scheme, progress, cancelled)
    fill_quantized_store(plan.parts, _expert_files(plan), store, scheme, on_layer)


def _mapped_quantized(
    plan: _Plan,
    shape: Any,
    scheme: str,
    progress: Callable[[float, str], None],
    cancelled: Callable[[], bool],
) -> HostExpertStore:
    """``--mmap-experts --expert-quant``: the quantized-experts cache file, mapped."""
    from engine.runtime.expert_quant import mapped_quantized_store

    on_layer = _quantize_progress("Mapped quantized experts", scheme, progress, cancelled)
    progress(0.3, "Mapping quantized experts")
    layers = [m.layer for m in plan.moe]
    return mapped_quantized_store(
        plan.parts, _expert_files(plan), shape, layers, plan.num_experts, scheme, on_layer
    )


def _quantize_progress(
    cached: str,
    scheme: str,
    progress: Callable[[float, str], None],
    cancelled: Callable[[], bool],
) -> Callable[[int, int, bool], None]:
    """The per-layer callback of an ``--expert-quant`` load: a cancel point, and progress saying
    ``cached`` (the layer came from the cache file) or that it is being quantized."""

    def on_layer(done: int, total: int, from_cache: bool) -> None:
        _check_cancelled(cancelled)
        verb = cached if from_cache else f"Quantizing experts to {scheme}"
        progress(0.3 + 0.65 * done / total, f"{verb} (layer {done}/{total})")

    return on_layer


def _expert_files(plan: _Plan) -> list[Path]:
    """The checkpoint files that hold routed experts, in a stable order (the cache key)."""
    return sorted({p.file for parts in plan.parts.values() for p in parts})


def _check_cancelled(cancelled: Callable[[], bool]) -> None:
    if cancelled():
        raise CancelledError("loading was cancelled")


def _load(
    config: LoadConfig, progress: Callable[[float, str], None], cancelled: Callable[[], bool]
) -> LoadedModel:
    from engine.gguf.reader import is_gguf

    if is_gguf(config.model_dir):
        from engine.runtime.gguf_loading import load_gguf

        return load_gguf(config, progress, cancelled)
    progress(0.0, "Reading the model folder")
    plan = _plan(config.model_dir)
    info = _info(plan)
    tokenizer = _load_tokenizer(plan.model_dir, info.vocab_size)
    device = resolve_device(config.device)  # refuses CUDA without a GPU
    dtype = resolve_dtype(config.dtype, device)
    shape = _expert_shape(plan, dtype, config.expert_quant)
    num_slots = cache_slots(
        config.cache, info, slot_bytes(shape, device, dtype, config.quantized_slots)
    )
    _check_cancelled(cancelled)
    progress(0.05, "Loading the trunk")
    model = _load_trunk(plan, dtype, device)
    check_trunk_finite(model)
    _check_cancelled(cancelled)
    store = _experts(plan, shape, device, config, progress, cancelled)
    if decodes_on_copy(
        store.shape, device, config.quantized_slots
    ):  # slots are host memory too: decode once, on copy-in
        store = DecodedStore(store, dtype)
    offload = _bind_offload(model, plan, store, num_slots, config)
    progress(1.0, "Loaded")
    return LoadedModel(model, tokenizer, info, offload, device, dtype)


def _experts(
    plan: _Plan,
    shape: ExpertShape | Any,
    device: torch.device,
    config: LoadConfig,
    progress: Callable[[float, str], None],
    cancelled: Callable[[], bool],
) -> HostExpertStore:
    """The host tier: every expert read into RAM, or (``mmap_experts``) the mapped files."""
    layers = [m.layer for m in plan.moe]
    if config.mmap_experts and config.expert_quant != "none":
        return _mapped_quantized(plan, shape, config.expert_quant, progress, cancelled)
    if config.mmap_experts:
        from engine.offload.mapped import MappedSafetensorsStore

        return MappedSafetensorsStore(shape, layers, plan.num_experts, plan.parts)
    progress(0.3, "Reading experts")
    store = HostExpertStore(shape, layers, plan.num_experts, device.type == "cuda")  # pinned
    if store.warning:
        progress(0.3, store.warning)  # pinning refused: pageable memory, slower copies
    if config.expert_quant == "none":
        _fill_store(plan, store, progress, cancelled)
    else:
        _fill_quantized(plan, store, config.expert_quant, progress, cancelled)
    return store


def load_model(
    config: LoadConfig,
    progress: Callable[[float, str], None] = _no_progress,
    cancelled: Callable[[], bool] = _never,
) -> LoadedModel:
    """Load ``config.model_dir`` with experts offloaded; typed errors for every bad input."""
    try:
        return _load(config, progress, cancelled)
    except torch.OutOfMemoryError as error:
        raise EngineOutOfMemoryError(
            "Out of memory while loading the model: lower the expert cache budget, the context "
            "length, or use a smaller dtype (bfloat16)."
        ) from error
    except (ModelLoadError, CacheBudgetError, CancelledError):
        raise
    except (OSError, ValueError) as error:
        if not Path(config.model_dir).exists():
            raise ModelLoadError(
                f"the model folder {config.model_dir} disappeared while loading"
            ) from error
        raise ModelLoadError(f"cannot read the model folder {config.model_dir}: {error}") from error
    except RuntimeError as error:
        if _HOST_OOM.search(str(error)):
            raise EngineOutOfMemoryError(
                "Host memory ran out while loading the model: the experts live in RAM, so close "
                "other programs or choose a smaller model (or a smaller dtype such as bfloat16)."
            ) from error
        if _SHAPE_ERROR.search(str(error)):
            raise ModelLoadError(
                f"tensors with the wrong shape for config.json: {error}"
            ) from error
        raise
