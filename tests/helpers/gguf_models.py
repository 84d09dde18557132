"""Tiny GGUF MoE files for tests, converted from tiny random checkpoints inside the test.

``save_gguf_family`` writes a tiny transformers checkpoint (``moe_families``) and converts it
with ``engine.gguf.writer``; ``save_wide_qwen2_moe`` uses hidden and expert sizes of 256 so the
K-quants (256-weight super-blocks) are really used instead of their fallbacks. Nothing is
downloaded and no fixture file is committed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.gguf.writer import convert
from tests.helpers.moe_families import save_family
from tests.helpers.tiny_models import save_tiny_checkpoint

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
    metadata: dict[str, int | float],
    arch: str,
) -> Path:
    """A GGUF whose tensor table describes ``tensors`` (name -> (row-major shape, block type))
    and whose data is a sparse hole: a real file layout for estimates, with no bytes written."""
    import os

    from gguf import GGUFWriter

    from engine.quant.ggml_blocks import packed_nbytes

    writer = GGUFWriter(path, arch)
    for key, value in metadata.items():
        if isinstance(value, float):
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
