"""Convert a Hugging Face MoE folder (Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V2) to GGUF.

Written with ``gguf``'s ``GGUFWriter`` under llama.cpp's names and metadata keys, so llama.cpp and
``engine.gguf`` read the result alike. Tensor names come from ``gguf``'s own HF -> GGUF name map;
fused experts ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]`` become ``ffn_gate_exps``,
``ffn_up_exps`` and ``ffn_down_exps``. Mixtral is written as llama.cpp writes it: architecture
``llama`` with experts, Q/K rows permuted. DeepSeek-V2 is written as llama.cpp's converter
writes it (``engine.gguf.deepseek2``): ``kv_b_proj`` split into ``attn_k_b``/``attn_v_b`` (the
converter since 2025), or kept whole as ``attn_kv_b`` with ``mla_split=False`` (older files).

File types follow llama.cpp's choices where they matter for size and fidelity: 1-D tensors and
routers stay F32; ``Q4_K_M``/``Q5_K_M`` keep ``attn_v`` and ``ffn_down`` of the "more bits"
layers and ``output`` in Q6_K; a row that cannot hold whole K blocks falls back to the legacy type
llama.cpp picks (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), and one that cannot hold 32-wide
blocks to F16. ``expert_type`` forces the routed experts (``ffn_*_exps``) to one block type, as
``llama-quantize --tensor-type ffn_gate_exps=q4_0`` does. ``imatrix`` (an importance matrix,
``engine.quant.imatrix``) quantizes as ``llama-quantize --imatrix`` does. The whole model is read
into memory: this is a tool for small models and fixtures, not for 30B checkpoints (those come as
GGUF).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import (
    MODEL_ARCH,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
    TokenType,
    get_tensor_name_map,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.errors import ModelLoadError
from engine.gguf import deepseek2
from engine.quant.ggml_encode import encode
from engine.quant.imatrix_file import ImatrixError, ImportanceMatrix

Q = GGMLQuantizationType
ARCHITECTURES = {
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "mixtral": "llama",
    "olmoe": "olmoe",
    "deepseek_v2": "deepseek2",
}
FILE_TYPES = {
    "F32": LlamaFileType.ALL_F32,
    "F16": LlamaFileType.MOSTLY_F16,
    "Q8_0": LlamaFileType.MOSTLY_Q8_0,
    "Q4_0": LlamaFileType.MOSTLY_Q4_0,
    "Q6_K": LlamaFileType.MOSTLY_Q6_K,
    "Q5_K_M": LlamaFileType.MOSTLY_Q5_K_M,
    "Q4_K_M": LlamaFileType.MOSTLY_Q4_K_M,
}
EXPERT_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "Q6_K", "Q5_K", "Q4_K")
_BASE_TYPE = {"F32": Q.F32, "F16": Q.F16, "Q8_0": Q.Q8_0, "Q4_0": Q.Q4_0, "Q6_K": Q.Q6_K}
_K_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
ARCH_ENUMS = {
    "qwen2moe": MODEL_ARCH.QWEN2MOE,
    "qwen3moe": MODEL_ARCH.QWEN3MOE,
    "llama": MODEL_ARCH.LLAMA,
    "olmoe": MODEL_ARCH.OLMOE,
    "deepseek2": MODEL_ARCH.DEEPSEEK2,
}


def _more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: first and last eighth, and every third layer between."""
    eighth = layers // 8
    return layer < eighth or layer >= 7 * layers // 8 or (layer - eighth) % 3 == 2


def _wanted_type(name: str, file_type: str, layers: int, weighted: bool) -> int:
    if weighted and file_type == "Q4_0" and ".ffn_down" in name:
        # llama.cpp's guard "against craziness in the first few ffn_down layers", imatrix only
        return Q.Q4_1 if int(name.split(".")[1]) < layers // 8 else Q.Q4_0
    if name == "output.weight" and file_type not in ("F32", "F16", "Q8_0"):
        return Q.Q6_K  # llama.cpp's output rule, for every quantized file type but Q8_0
    if file_type in _BASE_TYPE:
        return _BASE_TYPE[file_type]
    base = Q.Q4_K if file_type == "Q4_K_M" else Q.Q5_K
    if ".attn_v." in name or ".attn_kv_b." in name or ".ffn_down" in name:
        layer = int(name.split(".")[1])
        return Q.Q6_K if _more_bits(layer, layers) else base
    return base


def tensor_type(
    name: str,
    shape: tuple[int, ...],
    file_type: str,
    layers: int,
    expert_type: str | None = None,
    weighted: bool = False,
) -> int:
    """The block type ``name`` (HF row-major ``shape``) gets in a ``file_type`` file
    (``weighted``: quantized with an importance matrix)."""
    if len(shape) < 2 or "ffn_gate_inp" in name or file_type == "F32":
        return Q.F32
    qtype = _wanted_type(name, file_type, layers, weighted)
    if expert_type is not None and "_exps." in name:
        qtype = Q.__members__[expert_type]
    cols = shape[-1]
    if qtype in _K_FALLBACK and cols % 256:
        qtype = _K_FALLBACK[Q(qtype)]
    if qtype not in (Q.F32, Q.F16) and cols % 32:
        qtype = Q.F16
    return qtype


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order for the ``llama`` architecture."""
    rows = weights.shape[0]
    grouped = weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weights.shape)


def _tensors(model: Any, arch: str, mla_split: bool = True) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, fp32 array) for every weight of ``model``."""
    config = model.config
    names = get_tensor_name_map(ARCH_ENUMS[arch], config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        array = tensor.detach().float().numpy()
        base, _, suffix = hf_name.rpartition(".")
        if base.endswith(".experts"):
            yield from _expert_tensors(hf_name, array)
            continue
        gguf_name = names.get_name(base)
        if gguf_name is None:
            raise ModelLoadError(f"no GGUF name for the tensor {hf_name!r}")
        if arch == "llama" and gguf_name.endswith((".attn_q", ".attn_k")):
            heads = config.num_attention_heads
            heads = heads if gguf_name.endswith(".attn_q") else config.num_key_value_heads
            array = _permute(array, heads)
        if gguf_name.endswith("ffn_gate_inp_shexp"):
            array = array.reshape(-1)
        if gguf_name.endswith(".attn_kv_b") and mla_split:
            k_b, v_b = deepseek2.split_kv_b(array, config.num_attention_heads,
                                            config.qk_nope_head_dim)  # fmt: skip
            yield f"{gguf_name[: -len('kv_b')]}k_b.{suffix}", k_b
            yield f"{gguf_name[: -len('kv_b')]}v_b.{suffix}", v_b
            continue
        yield f"{gguf_name}.{suffix}", array


def _expert_tensors(hf_name: str, array: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    layer = int(hf_name.split(".layers.")[1].split(".")[0])
    if hf_name.endswith("gate_up_proj"):  # [E, 2I, H]
        half = array.shape[1] // 2
        yield f"blk.{layer}.ffn_gate_exps.weight", array[:, :half]
        yield f"blk.{layer}.ffn_up_exps.weight", array[:, half:]
    else:  # down_proj [E, H, I]
        yield f"blk.{layer}.ffn_down_exps.weight", array


def _add_hparams(writer: GGUFWriter, config: Any, arch: str, mla_split: bool) -> None:
    if arch == "deepseek2":
        deepseek2.add_hparams(writer, config, mla_split)
        return
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if arch == "llama":
        writer.add_expert_count(config.num_local_experts)
    elif arch == "olmoe":
        writer.add_expert_count(config.num_experts)
        writer.add_expert_feed_forward_length(config.intermediate_size)
        writer.add_expert_weights_norm(bool(getattr(config, "norm_topk_prob", False)))
    else:
        writer.add_expert_count(config.num_experts)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
        writer.add_expert_weights_norm(bool(getattr(config, "norm_topk_prob", False)))
    writer.add_expert_used_count(config.num_experts_per_tok)
    shared = getattr(config, "shared_expert_intermediate_size", None)
    if shared:
        writer.add_expert_shared_feed_forward_length(shared)


def _add_tokenizer(writer: GGUFWriter, model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    raw = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    if raw.get("model", {}).get("type") != "BPE":
        raise ModelLoadError("only byte-level BPE tokenizers are written to GGUF")
    vocab = tokenizer.get_vocab()
    tokens = [""] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    special = {t["id"] for t in raw.get("added_tokens", []) if t.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # llama.cpp's name for the GPT-2 split regex (ByteLevel's)
    writer.add_add_bos_token(False)
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.CONTROL if i in special else TokenType.NORMAL
                            for i in range(len(tokens))])  # fmt: skip
    writer.add_token_merges(merges)
    for name, add in (("eos", writer.add_eos_token_id), ("pad", writer.add_pad_token_id),
                      ("bos", writer.add_bos_token_id)):  # fmt: skip
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            add(int(token_id))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _write(writer: GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def row_importance(
    importance: dict[str, np.ndarray], name: str, shape: tuple[int, ...]
) -> np.ndarray | None:
    """``name``'s importance weights per row of its ``[-1, cols]`` view (``None``: no entry, as
    for the embedding); refused, as llama-quantize refuses it, when the sizes disagree."""
    weights = importance.get(name)
    if weights is None:
        return None
    if not np.isfinite(weights).all():
        raise ImatrixError(f"the importance matrix has non-finite values for {name}")
    matrices = shape[0] if len(shape) == 3 else 1
    if weights.size != matrices * shape[-1]:
        raise ImatrixError(
            f"the importance matrix has {weights.size} values for {name}, which needs "
            f"{matrices * shape[-1]}: it was computed for another model"
        )
    if matrices == 1:
        return weights.reshape(-1)
    return np.repeat(weights.reshape(matrices, shape[-1]), shape[1], axis=0)


def convert(
    model_dir: Path,
    output: Path,
    file_type: str = "Q4_K_M",
    split_max_tensors: int = 0,
    expert_type: str | None = None,
    imatrix: ImportanceMatrix | None = None,
    mla_split: bool = True,
) -> list[Path]:
    """Write ``model_dir`` as GGUF at ``output`` (split when ``split_max_tensors``); the paths.

    ``imatrix`` quantizes with llama.cpp's weighted searches, as ``llama-quantize --imatrix``
    does (same bytes); tensors it has no entry for are quantized without. ``mla_split``:
    DeepSeek-V2's ``kv_b_proj`` as ``attn_k_b``/``attn_v_b`` (else ``attn_kv_b``)."""
    if file_type not in FILE_TYPES:
        raise ValueError(f"file type must be one of {', '.join(FILE_TYPES)}; got {file_type!r}")
    if expert_type is not None and expert_type not in EXPERT_TYPES:
        raise ValueError(
            f"expert type must be one of {', '.join(EXPERT_TYPES)}; got {expert_type!r}"
        )
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    arch = ARCHITECTURES.get(model.config.model_type)
    if arch is None:
        raise ModelLoadError(f"cannot write a {model.config.model_type} model as GGUF")
    if arch == "deepseek2":
        deepseek2.check_writable(model.config)
    layers = model.config.num_hidden_layers
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".gguf-") as scratch:
        staged = Path(scratch) / output.name
        writer = GGUFWriter(staged, arch, split_max_tensors=split_max_tensors)
        writer.add_name(model_dir.name)
        writer.add_file_type(FILE_TYPES[file_type])
        _add_hparams(writer, model.config, arch, mla_split)
        _add_tokenizer(writer, model_dir)
        importance = imatrix.importance() if imatrix is not None else {}
        for name, array in _tensors(model, arch, mla_split):
            qtype = tensor_type(name, array.shape, file_type, layers, expert_type, bool(importance))
            weights = row_importance(importance, name, array.shape)
            packed = encode(array.reshape(-1, array.shape[-1]), qtype, weights)
            writer.add_tensor(name, packed.reshape(*array.shape[:-1], -1), raw_dtype=Q(qtype))
        _write(writer)
        written = sorted(Path(scratch).iterdir())
        targets = [output.parent / path.name for path in written]
        for source, target in zip(written, targets, strict=True):
            os.replace(source, target)
    shutil.rmtree(scratch, ignore_errors=True)
    return targets
