"""Tiny GGUF MoE files for tests, converted from tiny random checkpoints inside the test.

``save_gguf_family`` writes a tiny transformers checkpoint (``moe_families``) and converts it
with ``engine.gguf.writer``; ``save_wide_qwen2_moe`` uses hidden and expert sizes of 256 so the
K-quants (256-weight super-blocks) are really used instead of their fallbacks. Nothing is
downloaded and no fixture file is committed.
"""

from __future__ import annotations

from pathlib import Path

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
