"""Checkpoint layouts and families beyond the main five: sharded, already-fused, other routers.

Each case is loaded by the engine at its smallest cache budget (so prefill streams experts
through the slots) and compared, bit for bit, with transformers' eager experts loaded from the
same folder (same trunk tensors, hence the same trunk alignment; see ``align_experts``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from engine.config import CacheConfig, LoadConfig
from engine.runtime.loading import inspect_model, load_model, minimum_slots
from tests.helpers.moe_families import (
    OTHER_FAMILIES,
    align_experts,
    prefill_and_decode,
    save_family,
)


def _assert_exact_at_minimum(directory: Path, reference: torch.nn.Module) -> None:
    info = inspect_model(directory)
    fraction = minimum_slots(info) / (info.experts_per_layer * info.moe_layers)
    loaded = load_model(LoadConfig(directory, cache=CacheConfig(fraction=fraction)))
    generator = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, info.vocab_size, (1, 10), generator=generator)
    steps = torch.randint(0, info.vocab_size, (3,), generator=generator).tolist()
    want = prefill_and_decode(reference, prompt, steps)
    have = prefill_and_decode(loaded.model, prompt, steps)
    for step, (expected, got) in enumerate(zip(want, have, strict=True)):
        assert torch.equal(expected, got), f"step {step}"
    assert loaded.offload.stats().transfers > 0


def _eager(directory: Path, aligned: bool = False) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(directory, experts_implementation="eager")
    return align_experts(model.eval()) if aligned else model.eval()


def test_sharded_checkpoint(tmp_path: Path) -> None:
    model, tokenizer = save_family("qwen3_moe", tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    tokenizer.save_pretrained(tmp_path / "sharded")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert (
        inspect_model(tmp_path / "sharded").total_expert_bytes
        == inspect_model(tmp_path / "single").total_expert_bytes
    )
    _assert_exact_at_minimum(tmp_path / "sharded", _eager(tmp_path / "sharded"))


def test_checkpoint_with_experts_already_fused(tmp_path: Path) -> None:
    """Keys ``...experts.gate_up_proj [E, 2I, H]``: read through ``get_slice(key)[e]``."""
    model, tokenizer = save_family("olmoe", tmp_path / "per_expert")
    fused = tmp_path / "fused"
    model.config.save_pretrained(fused)
    tokenizer.save_pretrained(fused)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in tensors
    save_file(tensors, fused / "model.safetensors", metadata={"format": "pt"})
    _assert_exact_at_minimum(fused, _eager(fused, aligned=True))


@pytest.mark.parametrize("name", list(OTHER_FAMILIES))
def test_other_families_are_exact(tmp_path: Path, name: str) -> None:
    save_family(name, tmp_path / name)
    _assert_exact_at_minimum(tmp_path / name, _eager(tmp_path / name, aligned=True))


def test_router_families_of_other_models(tmp_path: Path) -> None:
    expected = {"granitemoe": "softmax_topk", "phimoe": "sparsemixer", "minimax_m2": "unknown"}
    for name, family in expected.items():
        save_family(name, tmp_path / name)
        info = inspect_model(tmp_path / name)
        assert info.router_family == family
        assert not info.substitution_supported
