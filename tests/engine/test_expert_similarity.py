"""The swap study: expert outputs are the block's own, and identical experts swap for free."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.errors import InvalidRequestError
from engine.eval import expert_similarity as sim
from tests.helpers.tiny_models import build_tiny_moe, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return build_tiny_tokenizer()


def _model(tokenizer, identical: bool = False):  # type: ignore[no-untyped-def]
    model = build_tiny_moe(tokenizer, num_experts=8, num_experts_per_tok=2)
    if identical:
        with torch.no_grad():
            for block in sim.moe_blocks(model):
                block.experts.gate_up_proj.copy_(
                    block.experts.gate_up_proj[:1].expand_as(block.experts.gate_up_proj)
                )
                block.experts.down_proj.copy_(
                    block.experts.down_proj[:1].expand_as(block.experts.down_proj)
                )
    return model


def _ids(tokenizer) -> torch.Tensor:  # type: ignore[no-untyped-def]
    text = "The quick brown fox jumps over the lazy dog. Python is a programming language."
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def test_expert_outputs_rebuild_the_blocks_routed_output(tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = _model(tokenizer)
    block = sim.moe_blocks(model)[0]
    x = sim.block_inputs(model, _ids(tokenizer))[0]
    with torch.no_grad():
        y = sim.expert_outputs(block, x)  # [T, E, H]
        _, weights, idx = block.gate(x)
        routed = (
            weights.unsqueeze(-1) * y.gather(1, idx.unsqueeze(-1).expand(-1, -1, y.shape[-1]))
        ).sum(1)
        expected = block.experts(x, idx, weights)
    assert torch.allclose(routed, expected, atol=1e-5), "per-expert outputs must be the block's"


def test_identical_experts_are_perfect_understudies(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = _ids(tokenizer)
    same = sim.study(_model(tokenizer, identical=True), ids, alpha=0.5, k=2)
    assert same.swaps > 0, "a wide band must swap something"
    assert same.cos_band == pytest.approx(1.0, abs=1e-4)
    assert same.err_band < same.err_drop, "an identical substitute beats dropping the expert"
    mixed = sim.study(_model(tokenizer), ids, alpha=0.5, k=2)
    assert mixed.cos_best_any >= mixed.cos_best_in_band >= mixed.cos_band - 1e-6
    assert mixed.cos_band < 0.999, "random experts are not copies of each other"
    assert "| 0.5 |" in sim.markdown([mixed])


def test_bad_alpha_and_folder_are_clear_errors(tokenizer, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidRequestError, match="alpha"):
        sim.study(_model(tokenizer), _ids(tokenizer), alpha=0.0, k=2)
    text = tmp_path / "t.txt"
    text.write_text("hello", encoding="utf-8")
    code = sim.main(["--model", str(tmp_path), "--text-file", str(text)])
    assert code == 2 and "no config.json" in capsys.readouterr().err
