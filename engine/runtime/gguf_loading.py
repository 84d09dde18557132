"""GGUF MoE file -> trunk on the device, experts as raw GGML blocks in host buffers.

The GGUF counterpart of ``loading``'s safetensors path, sharing its planning and binding:

- **Config, tokenizer, chat template** from the metadata (``engine.gguf.config``; transformers'
  GGUF tokenizer support). Nothing from the file is executed.
- **Trunk**: every non-expert tensor is decoded (``engine.quant``) to the compute dtype, renamed
  with transformers' own GGUF -> HF name map and tensor processors (Q/K un-permutation for
  ``llama``), and handed to ``from_pretrained(state_dict=...)`` with the experts classes swapped
  for weightless stand-ins, so transformers builds, ties and places the trunk as usual.
- **Experts** stay in their block format: ``ffn_{gate,up,down}_exps`` bytes are copied per
  expert into ``HostExpertStore`` rows laid out by ``QuantizedExpertShape``. Files that mix
  block types across layers (``Q4_K_M`` keeps some ``ffn_down`` in Q6_K) get one shape per layer
  (``layer_shapes``); rows and slots are sized for the largest, so the byte counts are the slot
  bytes actually copied.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast
from transformers.modeling_gguf_pytorch_utils import (
    TENSOR_PROCESSORS,
    TensorProcessor,
    get_gguf_hf_weights_map,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from engine.config import LoadConfig
from engine.errors import ModelLoadError
from engine.events import ModelInfo
from engine.gguf import deepseek2
from engine.gguf.config import build_config
from engine.gguf.reader import GgufModel, GgufTensor, describe_types, open_gguf
from engine.offload.families import RouterFamily, router_family
from engine.offload.mapped import MappedExpertStore, MappedRange, mapped_range, mapped_tensor
from engine.offload.store import (
    DecodedStore,
    HostExpertStore,
    QuantizedExpertShape,
    decodes_on_copy,
    slot_bytes,
)
from engine.quant.ggml_blocks import dequantize, is_supported, type_name
from engine.runtime import loading
from engine.runtime.memory import resolve_device, resolve_dtype

PARTS = ("gate", "up", "down")


@dataclass
class GgufPlan:
    """Everything decided from the GGUF metadata and tensor table, before any weight is read."""

    source: GgufModel
    config: Any
    architecture: str  # the GGUF architecture, e.g. "qwen2moe"
    family: RouterFamily
    moe: list[Any]  # loading._MoeLayer
    num_experts: int
    hidden: int
    intermediate: int
    expert_types: dict[int, tuple[int, int, int]]  # layer -> (gate, up, down) block types
    trunk_numel: int

    def layer_shapes(self, dtype: torch.dtype) -> dict[int, QuantizedExpertShape]:
        return {
            layer: QuantizedExpertShape(self.hidden, self.intermediate, dtype, *types)
            for layer, types in self.expert_types.items()
        }

    def slot_shape(self, dtype: torch.dtype) -> QuantizedExpertShape:
        """The layer shape with the largest row: the size of every row and slot."""
        return max(self.layer_shapes(dtype).values(), key=lambda shape: shape.nbytes)


def _expert_tensor(source: GgufModel, layer: int, part: str) -> GgufTensor:
    name = f"blk.{layer}.ffn_{part}_exps.weight"
    tensor = source.tensors.get(name)
    if tensor is None:
        raise ModelLoadError(f"{source.path.name} lacks the expert tensor {name}")
    if not is_supported(tensor.qtype):
        raise ModelLoadError(
            f"{source.path.name}: expert tensor {name} uses the block type "
            f"{type_name(tensor.qtype)}, which the engine cannot decode (supported: F32, F16, "
            "BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K)"
        )
    return tensor


def _layer_types(source: GgufModel, layer: int, dims: tuple[int, int, int]) -> tuple[int, int, int]:
    experts, hidden, inter = dims
    expected = {"gate": (experts, inter, hidden), "up": (experts, inter, hidden),
                "down": (experts, hidden, inter)}  # fmt: skip
    types = []
    for part in PARTS:
        tensor = _expert_tensor(source, layer, part)
        if tensor.shape != expected[part]:
            raise ModelLoadError(
                f"{source.path.name}: blk.{layer}.ffn_{part}_exps has shape {list(tensor.shape)}, "
                f"expected {list(expected[part])} from the metadata"
            )
        types.append(tensor.qtype)
    return types[0], types[1], types[2]


def _trunk_tensors(source: GgufModel) -> list[GgufTensor]:
    return [t for name, t in source.tensors.items() if "_exps." not in name]


def plan_gguf(path: Path) -> GgufPlan:
    """Plan a GGUF load from metadata and the tensor table; no weight is read."""
    source = open_gguf(path)
    config = build_config(source)
    architecture = source.architecture
    meta = loading._meta_model(config, architecture)
    moe = loading._find_moe(meta, architecture)
    dims = loading._expert_dims(meta, moe, architecture)
    expert_types = {m.layer: _layer_types(source, m.layer, dims) for m in moe}
    for tensor in _trunk_tensors(source):
        if not is_supported(tensor.qtype):
            raise ModelLoadError(
                f"{source.path.name}: tensor {tensor.name} uses the block type "
                f"{type_name(tensor.qtype)}, which the engine cannot decode"
            )
    trunk_numel = sum(t.numel for t in _trunk_tensors(source))
    return GgufPlan(
        source, config, architecture, router_family(meta.config), moe, dims[0], dims[1],
        dims[2], expert_types, trunk_numel,
    )  # fmt: skip


def gguf_info(plan: GgufPlan) -> ModelInfo:
    """``ModelInfo`` with quantized expert bytes (one slot row) and an fp32 trunk."""
    config = plan.config.get_text_config()
    row_bytes = plan.slot_shape(torch.float32).nbytes
    experts = [t for n, t in plan.source.tensors.items() if "_exps." in n]
    return ModelInfo(
        path=str(plan.source.path),
        name=plan.source.path.stem,
        architecture=plan.architecture,
        model_type=str(config.model_type),
        num_layers=int(config.num_hidden_layers),
        moe_layers=len(plan.moe),
        experts_per_layer=plan.num_experts,
        top_k=plan.moe[0].top_k,
        bytes_per_expert=row_bytes,
        trunk_bytes=plan.trunk_numel * 4,
        total_expert_bytes=row_bytes * plan.num_experts * len(plan.moe),
        vocab_size=int(config.vocab_size),
        max_context=int(getattr(config, "max_position_embeddings", 0) or 0),
        router_family=plan.family.name,
        substitution_supported=plan.family.substitution_supported,
        expert_quant=describe_types(experts),
        expert_weights=3 * plan.hidden * plan.intermediate,
    )


def inspect_gguf(path: Path) -> ModelInfo:
    return gguf_info(plan_gguf(path))


# ---------------------------------------------------------------- tokenizer and trunk


def load_gguf_tokenizer(source: GgufModel) -> Any:
    """transformers' GGUF tokenizer, built from its fast metadata reader (``AutoTokenizer``
    would parse the whole file with ``GGUFReader`` first, minutes for a 150k vocabulary)."""
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    try:
        architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(source.path))
        backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
        return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)
    except Exception as error:  # transformers raises ValueError, KeyError, TypeError here
        raise ModelLoadError(
            f"cannot build the tokenizer from {source.path.name}'s metadata: {error}"
        ) from error


def _name_map(plan: GgufPlan, meta: Any) -> tuple[dict[str, str], TensorProcessor]:
    processor_config = plan.config.to_dict()
    processor = TENSOR_PROCESSORS.get(plan.architecture, TensorProcessor)(config=processor_config)
    names = get_gguf_hf_weights_map(meta, processor, model_type=plan.architecture)
    return names, processor


def _decoded(tensor: GgufTensor) -> np.ndarray:
    raw = torch.from_numpy(np.array(tensor.data, copy=True))
    return dequantize(raw, tensor.qtype, tensor.shape, torch.float32).numpy()


def _trunk_arrays(plan: GgufPlan) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, fp32 array) of every trunk tensor, one at a time; DeepSeek-V2's split
    ``attn_k_b``/``attn_v_b`` come back merged as the ``attn_kv_b`` transformers maps."""
    decoded = ((t.name, _decoded(t)) for t in _trunk_tensors(plan.source))
    if plan.architecture == "deepseek2":
        return deepseek2.merge_split_tensors(decoded)
    return decoded


def _trunk_state(plan: GgufPlan, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    meta = loading._meta_model(plan.config, plan.architecture)
    shapes = {name: tuple(p.shape) for name, p in meta.state_dict().items()}
    names, processor = _name_map(plan, meta)
    state: dict[str, torch.Tensor] = {}
    for name, weights in _trunk_arrays(plan):
        result = processor.process(weights=weights, name=name, tensor_key_mapping=names,
                                   parsed_parameters={"tensors": {}})  # fmt: skip
        hf_name = names.get(result.name or "")
        if hf_name is None:
            raise ModelLoadError(f"{plan.source.path.name}: no model weight for {name}")
        value = torch.from_numpy(np.ascontiguousarray(result.weights)).to(dtype)
        state[hf_name] = value.reshape(shapes.get(hf_name, tuple(value.shape)))
    return state


def load_gguf_trunk(plan: GgufPlan, dtype: torch.dtype, device: torch.device) -> Any:
    state = _trunk_state(plan, dtype)
    placement = {"device_map": str(device)} if device.type == "cuda" else {}
    swapped = {m.experts_class for m in plan.moe}
    with loading._experts_swapped(swapped), loading._quiet_load_report():
        model_class: Any = MODEL_FOR_CAUSAL_LM_MAPPING[type(plan.config)]
        loaded: Any = model_class.from_pretrained(
            None, config=plan.config, state_dict=state, dtype=dtype, output_loading_info=True,
            ignore_mismatched_sizes=True, **placement,
        )  # fmt: skip
    model, info = loaded
    loading._check_loading(info)
    return model.eval()


# ---------------------------------------------------------------- experts


def fill_gguf_store(
    plan: GgufPlan, store: HostExpertStore, on_layer: Callable[[int, int], None]
) -> None:
    """Copy every expert's raw blocks into its row; ``on_layer(done, total)`` per layer."""
    for done, layer in enumerate(store.layers, start=1):
        shape = store.layer_shape(layer)
        assert isinstance(shape, QuantizedExpertShape), "a GGUF store holds quantized shapes"
        for part in PARTS:
            data = _expert_tensor(plan.source, layer, part).data  # [E, rows, bytes] memmap
            for expert in range(plan.num_experts):
                target = shape.part_view(store.row((layer, expert)), part)  # type: ignore[arg-type]
                target.copy_(torch.from_numpy(np.array(data[expert], copy=True).reshape(-1)))
        on_layer(done, len(store.layers))


def new_gguf_store(plan: GgufPlan, dtype: torch.dtype, pin: bool) -> HostExpertStore:
    layers = [m.layer for m in plan.moe]
    shapes = plan.layer_shapes(dtype)
    return HostExpertStore(plan.slot_shape(dtype), layers, plan.num_experts, pin, shapes)


def _experts(
    plan: GgufPlan,
    dtype: torch.dtype,
    device: torch.device,
    mapped: bool,
    progress: Callable[[float, str], None],
    cancelled: Callable[[], bool],
) -> HostExpertStore:
    if mapped:
        return MappedGgufStore(plan, dtype)
    progress(0.3, "Reading experts")
    store = new_gguf_store(plan, dtype, pin=device.type == "cuda")

    def on_layer(done: int, total: int) -> None:
        loading._check_cancelled(cancelled)
        progress(0.3 + 0.65 * done / total, f"Reading experts (layer {done}/{total})")

    fill_gguf_store(plan, store, on_layer)
    return store


def load_gguf(
    config: LoadConfig,
    progress: Callable[[float, str], None],
    cancelled: Callable[[], bool],
) -> loading.LoadedModel:
    """The GGUF branch of ``loading.load_model`` (errors are mapped there)."""
    progress(0.0, "Reading the GGUF file")
    plan = plan_gguf(config.model_dir)
    info = gguf_info(plan)
    tokenizer = load_gguf_tokenizer(plan.source)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    store_shape = plan.slot_shape(dtype)
    slot = slot_bytes(store_shape, device, dtype, config.quantized_slots)
    num_slots = loading.cache_slots(config.cache, info, slot)
    loading._check_cancelled(cancelled)
    progress(0.05, "Decoding the trunk")
    model = load_gguf_trunk(plan, dtype, device)
    loading._check_cancelled(cancelled)
    store = _experts(plan, dtype, device, config.mmap_experts, progress, cancelled)
    if decodes_on_copy(
        store.shape, device, config.quantized_slots
    ):  # slots are host memory too: decode once, on copy-in
        store = DecodedStore(store, dtype)
    offload = loading._bind_offload(model, plan, store, num_slots, config)  # type: ignore[arg-type]
    progress(1.0, "Loaded")
    return loading.LoadedModel(model, tokenizer, info, offload, device, dtype)


# ---------------------------------------------------------------- reference without offloading


def _dense_experts(plan: GgufPlan, layer: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One layer's experts decoded up front: ``gate_up_proj [E, 2I, H]``, ``down_proj``."""
    decoded = {}
    for part in PARTS:
        tensor = _expert_tensor(plan.source, layer, part)
        raw = torch.from_numpy(np.array(tensor.data, copy=True))
        decoded[part] = dequantize(raw, tensor.qtype, tensor.shape, dtype)
    return {
        "gate_up_proj": torch.cat([decoded["gate"], decoded["up"]], dim=1),
        "down_proj": decoded["down"],
    }


def load_gguf_reference(path: Path, dtype: torch.dtype = torch.float32) -> Any:
    """The whole GGUF model on the CPU with every expert decoded up front and eager experts:
    the same quantized model computed without offloading (exactness and fidelity reference)."""
    plan = plan_gguf(path)
    state = _trunk_state(plan, dtype)
    for m in plan.moe:
        for name, value in _dense_experts(plan, m.layer, dtype).items():
            state[f"{m.experts_path}.{name}"] = value
    model_class: Any = MODEL_FOR_CAUSAL_LM_MAPPING[type(plan.config)]
    with loading._quiet_load_report():
        model = model_class.from_pretrained(None, config=plan.config, state_dict=state, dtype=dtype)
    model.set_experts_implementation("eager")
    return model.eval()


# ---------------------------------------------------------------- the file as the host tier


class MappedGgufStore(MappedExpertStore):
    """Experts read from the memory-mapped GGUF file on demand instead of copied into RAM.

    The OS page cache is then the host tier and the disk the last one: nothing is allocated up
    front, ``row`` assembles an expert's row from the three mapped tensors when the cache
    copies it in (or the CPU computes it), and pages the OS drops are read again from disk;
    ``read_ahead`` starts those reads early (``engine.offload.mapped``).
    """

    def __init__(self, plan: GgufPlan, dtype: torch.dtype, read_ahead: bool = True) -> None:
        layers = [m.layer for m in plan.moe]
        super().__init__(
            plan.slot_shape(dtype), layers, plan.num_experts, plan.layer_shapes(dtype),
            read_ahead=read_ahead,
        )  # fmt: skip
        self._tensors = {
            (layer, part): _expert_tensor(plan.source, layer, part).data
            for layer in layers
            for part in PARTS
        }

    def ranges(self, key: tuple[int, int]) -> list[MappedRange]:
        layer, expert = key
        return [mapped_range(self._tensors[(layer, part)][expert]) for part in PARTS]

    def _fill(self, key: tuple[int, int], row: torch.Tensor) -> None:
        layer, expert = key
        shape = self.layer_shape(layer)
        assert isinstance(shape, QuantizedExpertShape), "a GGUF store holds quantized shapes"
        for part in PARTS:
            source = mapped_tensor(self._tensors[(layer, part)][expert])
            shape.part_view(row, part).copy_(source)  # type: ignore[arg-type]

    def close(self) -> None:
        self._tensors.clear()
        super().close()
