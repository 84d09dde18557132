"""Tiny GGUF MoE files for tests, converted from tiny random checkpoints inside the test.

``save_gguf_family`` writes a tiny transformers checkpoint (``moe_families``) and converts it
with ``engine.gguf.writer``; ``save_wide_qwen2_moe`` uses hidden and expert sizes of 256 so the
K-quants (256-weight super-blocks) are really used instead of their fallbacks;
``save_gguf_deepseek2`` writes a tiny DeepSeek-V2 (latent attention, a leading dense layer, a
shared expert, scaled weights) in either of llama.cpp's two attention layouts. Nothing is
downloaded and no fixture file is committed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, DeepseekV2Config

from engine.gguf.writer import convert
from tests.helpers.moe_families import save_family
from tests.helpers.tiny_models import build_tiny_tokenizer, save_tiny_checkpoint

WIDE = {
    "hidden_size": 256,
    "intermediate_size": 256,
    "moe_intermediate_size": 256,
    "shared_expert_intermediate_size": 256,
    "num_attention_heads": 4,
}


def save_gguf_family(name: str, root: Path, file_type: str, seed: int = 0) -> Path:
    """A GGUF file of the tiny ``name`` family (``mixtral``, ``qwen2_moe``, ``qwen3_moe``)."""
    source = root / f"{name}-hf"
    if not source.exists():
        save_family(name, source, seed=seed)
    return convert(source, root / f"{name}-{file_type}.gguf", file_type)[0]


def deepseek2_config(vocab: int, q_lora: bool = True, **overrides: Any) -> DeepseekV2Config:
    """A tiny DeepSeek-V2 whose rows are whole 32-weight blocks (so Q8_0 really quantizes).
    ``q_lora``: the full V2's low-rank query (``q_a_proj``...), else V2-Lite's ``q_proj``.
    Weights drawn 10x wider than transformers' default (std 0.2): the predictions are then far
    from uniform, so a perplexity comparison notices attention and rope (YaRN on or off moves
    it by 4%; at std 0.02 every tiny model scores ~302 on a 300-token vocabulary)."""
    values: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=2, first_k_dense_replace=1,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=3, topk_method="greedy",
        n_group=1, topk_group=1, routed_scaling_factor=1.5, kv_lora_rank=32,
        q_lora_rank=32 if q_lora else None, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, max_position_embeddings=256, tie_word_embeddings=False,
        initializer_range=0.2,
    )  # fmt: skip
    values.update(overrides)
    return DeepseekV2Config(**values)


def save_deepseek2(directory: Path, seed: int = 0, **config: Any) -> Path:
    """A random tiny DeepSeek-V2 checkpoint (fp32) with the tiny tokenizer in ``directory``."""
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(deepseek2_config(len(tokenizer), **config)).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


YARN = {  # DeepSeek-V2(-Lite)'s YaRN settings, at a tiny model's lengths
    "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
    "original_max_position_embeddings": 64, "mscale": 0.707, "mscale_all_dim": 0.707,
    "beta_fast": 32.0, "beta_slow": 1.0,
}  # fmt: skip


def save_gguf_deepseek2(
    root: Path, file_type: str, mla_split: bool = True, q_lora: bool = True, yarn: bool = False
) -> Path:
    """A tiny DeepSeek-V2 as GGUF: ``attn_k_b``/``attn_v_b`` (``mla_split``) or ``attn_kv_b``;
    ``yarn``: with V2's YaRN rope scaling."""
    name = f"deepseek2-{'q_lora' if q_lora else 'q_proj'}{'-yarn' if yarn else ''}"
    source = root / f"{name}-hf"
    if not source.exists():
        rope: dict[str, Any] = {"rope_parameters": YARN} if yarn else {}
        save_deepseek2(source, q_lora=q_lora, **rope)
    form = "kb_vb" if mla_split else "kv_b"
    target = root / f"{name}-{form}-{file_type}.gguf"
    return convert(source, target, file_type, mla_split=mla_split)[0]


def save_wide_qwen2_moe(root: Path, file_type: str, split_max_tensors: int = 0) -> list[Path]:
    """A Qwen2-MoE with 256-wide rows, so Q4_K/Q6_K blocks are used, as GGUF file(s)."""
    source = root / "wide-hf"
    if not source.exists():
        save_tiny_checkpoint(source, **WIDE)
    suffix = "-split" if split_max_tensors else ""
    target = root / f"wide-{file_type}{suffix}.gguf"
    return convert(source, target, file_type, split_max_tensors=split_max_tensors)


def save_metadata_only_gguf(
    path: Path,
    tensors: dict[str, tuple[tuple[int, ...], int]],
    metadata: dict[str, int | float | str | bool],
    arch: str,
) -> Path:
    """A GGUF whose tensor table describes ``tensors`` (name -> (row-major shape, block type))
    and whose data is a sparse hole: a real file layout for estimates, with no bytes written."""
    import os

    from gguf import GGUFWriter

    from engine.quant.ggml_blocks import packed_nbytes

    writer = GGUFWriter(path, arch)
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(f"{arch}.{key}", value)
        elif isinstance(value, str):
            writer.add_string(f"{arch}.{key}", value)
        elif isinstance(value, float):
            writer.add_float32(f"{arch}.{key}", value)
        else:
            writer.add_uint32(f"{arch}.{key}", value)
    total = 0
    for name, (shape, qtype) in tensors.items():
        nbytes = packed_nbytes(qtype, int(np.prod(shape)))
        byte_shape = (*shape[:-1], nbytes // int(np.prod(shape[:-1])))
        writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
        total += -(-nbytes // writer.data_alignment) * writer.data_alignment
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    assert writer.fout is not None
    header_end = writer.fout[0].tell()
    writer.close()
    data_start = -(-header_end // writer.data_alignment) * writer.data_alignment
    os.truncate(path, data_start + total)
    return path
