"""Per-layer gradient fine-tuning of every expert's weights on the layer's own output error.

With the router fixed, the routing coefficients ``c`` [T, I] of the calibration tokens are
fixed too (``refit.routing_coefficients``), and the MoE block computes
``down (silu(gate x) * (up x) * c)`` (all neurons in recipe order, unchosen ones times 0).
This module trains ``gate``, ``up`` and ``down`` [I, H], [I, H], [H, I] of one layer by Adam on
the relative squared error against the dense FFN's output on the same inputs, starting from
the dense weights: the neurons of each expert learn to carry, when their expert is chosen,
what the unchosen ones would have added. Held-back tokens report the error before and after;
the tuned weights are kept only when the held-back error falls.

Legend: ``T`` tokens, ``H`` hidden, ``I`` FFN neurons.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TuneSpec:
    """Epochs, batch, learning rate, held-back tokens, seed."""

    epochs: int = 4
    batch: int = 512
    lr: float = 3e-4
    check_tokens: int = 2000
    tune_gate: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.epochs, self.batch, self.check_tokens) < 1 or self.lr <= 0:
            raise ValueError(f"tuning needs positive epochs, batch, lr and check tokens: {self}")


@dataclass(frozen=True)
class LayerWeights:
    """One layer's FFN weights in recipe order: gate, up [I, H] and down [H, I]."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    def output(self, x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """The MoE block's output [T, H] for inputs ``x`` [T, H] and coefficients [T, I]."""
        return (F.silu(x @ self.gate.T) * (x @ self.up.T) * coef) @ self.down.T


def relative_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``||pred - target|| / ||target||`` over all rows (0-dim tensor)."""
    return (pred - target).pow(2).sum().div(target.pow(2).sum().clamp_min(1e-12)).sqrt()


def tune_layer(
    weights: LayerWeights,
    x: torch.Tensor,
    coef: torch.Tensor,
    target: torch.Tensor,
    spec: TuneSpec,
) -> tuple[LayerWeights, dict[str, float]]:
    """Tuned weights of one layer (or the given ones, when tuning does not pay) and errors.

    ``x`` [T, H] FFN inputs, ``coef`` [T, I] routing coefficients, ``target`` [T, H] the dense
    FFN's outputs; the first ``spec.check_tokens`` rows are held back.
    """
    gen = torch.Generator().manual_seed(spec.seed)
    k = spec.check_tokens
    params = [t.detach().clone().float() for t in (weights.gate, weights.up, weights.down)]
    trained = params if spec.tune_gate else params[1:]
    for p in trained:
        p.requires_grad_(True)
    tuned = LayerWeights(*params)
    opt = torch.optim.Adam(trained, lr=spec.lr)
    train = torch.arange(k, len(x))
    steps = spec.epochs * ((len(train) + spec.batch - 1) // spec.batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(spec.epochs):
        for idx in train[torch.randperm(len(train), generator=gen)].split(spec.batch):
            loss = relative_error(tuned.output(x[idx], coef[idx]), target[idx]).pow(2)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        before = float(relative_error(weights.output(x[:k], coef[:k]), target[:k]))
        after = float(relative_error(tuned.output(x[:k], coef[:k]), target[:k]))
    done = LayerWeights(*(p.detach() for p in params))
    return (done if after < before else weights), {"before": before, "after": after}
