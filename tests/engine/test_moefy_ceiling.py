"""``moefy ceiling``: the oracle cut keeps exactly the experts of largest true output, keeps
the dense model when every expert is kept, and refuses cuts that do not tile the FFN."""

from __future__ import annotations

import pytest
import torch

from engine.errors import InvalidRequestError
from engine.training.moefy import __main__ as moefy_cli
from engine.training.moefy.ceiling import Cut, ceiling, markdown, oracle_cut, oracle_output
from tests.engine.test_moefy import LAYERS, NEURONS, tiny_llama

GEN = torch.Generator().manual_seed(0)
H, N = 6, 12


def brute_force(h: torch.Tensor, down: torch.Tensor, order: torch.Tensor, cut: Cut) -> torch.Tensor:
    """One token at a time: every routed expert's output, the largest ``top_k`` by norm kept."""
    rows = []
    for a in h:
        a, w = a[order], down[:, order]
        out = w[:, : cut.shared] @ a[: cut.shared]
        parts = [
            w[:, j : j + cut.expert_size] @ a[j : j + cut.expert_size]
            for j in range(cut.shared, N, cut.expert_size)
        ]
        best = sorted(range(len(parts)), key=lambda e: -float(parts[e].norm()))[: cut.top_k]
        rows.append(out + sum(parts[e] for e in best))
    return torch.stack(rows)


@pytest.mark.parametrize("cut", [Cut(4, 2, 1), Cut(0, 3, 2), Cut(2, 1, 3), Cut(6, 6, 1)])
def test_the_oracle_keeps_the_experts_of_largest_output(cut: Cut) -> None:
    h = torch.randn(5, N, generator=GEN)
    down = torch.randn(H, N, generator=GEN)
    order = torch.randperm(N, generator=GEN)
    got = oracle_output(h, down, order, cut)
    assert torch.allclose(got, brute_force(h, down, order, cut), atol=1e-5)


def test_keeping_every_expert_is_the_dense_ffn() -> None:
    h = torch.randn(2, 3, N, generator=GEN)
    down = torch.randn(H, N, generator=GEN)
    order = torch.randperm(N, generator=GEN)
    for cut in (Cut(4, 4, 2), Cut(0, 1, N)):
        assert torch.allclose(oracle_output(h, down, order, cut), h @ down.T, atol=1e-5)


def test_the_ceiling_of_a_full_cut_is_one_and_a_sparse_cut_costs_perplexity() -> None:
    dense = tiny_llama(3)
    orders = torch.stack([torch.randperm(NEURONS, generator=GEN) for _ in range(LAYERS)])
    streams = {"a": torch.randint(0, 120, (40,), generator=GEN), "b": torch.randint(0, 120, (30,))}
    ids = streams["a"].unsqueeze(0)
    with torch.no_grad():
        before = dense(input_ids=ids).logits
    rows = ceiling(dense, orders, [Cut(16, 8, 4), Cut(16, 8, 1), Cut(0, 1, 6)], streams)
    with torch.no_grad():
        assert torch.equal(dense(input_ids=ids).logits, before)  # the MLPs are restored
    assert rows[0]["mean_ppl_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert rows[0]["active_fraction"] == 1.0 and rows[1]["active_fraction"] == 0.5
    assert set(rows[1]["ppl_ratio_by_kind"]) == {"a", "b"}
    assert rows[2]["mean_ppl_ratio"] != pytest.approx(1.0, abs=1e-4)
    table = markdown(rows)
    assert "| 16 | 4 x 8 | 1 | 50% |" in table and "neurons" in table


def test_the_context_manager_restores_the_mlps_after_an_error() -> None:
    dense = tiny_llama(4)
    mlps = [layer.mlp for layer in dense.model.layers]
    orders = torch.stack([torch.arange(NEURONS)] * LAYERS)
    with pytest.raises(RuntimeError), oracle_cut(dense, orders, Cut(16, 8, 2)):
        raise RuntimeError("interrupted")
    assert [layer.mlp for layer in dense.model.layers] == mlps


@pytest.mark.parametrize("cut", [Cut(10, 7, 1), Cut(16, 8, 5), Cut(48, 1, 1), Cut(0, 0, 1)])
def test_a_cut_that_does_not_tile_the_ffn_is_refused(cut: Cut) -> None:
    dense = tiny_llama(5)
    orders = torch.stack([torch.arange(NEURONS)] * LAYERS)
    with pytest.raises(InvalidRequestError, match="cut"):
        ceiling(dense, orders, [cut], {"a": torch.arange(10)})


def test_the_cli_refuses_too_few_tokens_before_loading(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        moefy_cli.parse_args(["ceiling", "--eval-tokens", "1", "--out", "x.json"])
    assert "--eval-tokens" in capsys.readouterr().err


@pytest.mark.parametrize("k", ["0", "33"])
def test_build_refuses_a_top_k_the_recipe_cannot_cut(k: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        moefy_cli.parse_args(["build", "--top-k", k])
    assert "--top-k" in capsys.readouterr().err


def test_build_takes_the_top_k_into_the_recipe_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake_recipe(out: object, cache: object, spec: object) -> None:
        seen["spec"] = spec
        raise InvalidRequestError("stop here")

    monkeypatch.setattr("engine.training.moefy.recipe.run_recipe", fake_recipe)
    assert moefy_cli.main(["build", "--top-k", "20", "--out", "unused"]) == 1
    assert seen["spec"].shape.top_k == 20 and seen["spec"].shape.experts == 32
