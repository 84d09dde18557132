"""Train one layer's router against the dense layer itself.

Inputs are the layer's FFN inputs ``x`` [N, H]; from the dense weights and the neuron order
come each routed expert's exact output ``y_e(x)`` and the routed sum ``T = sum_e y_e`` (the
dense FFN minus the shared expert). The router (a bias-free linear map, as in Qwen2-MoE)
is trained with two losses:

* ranking: cross-entropy between the router's softmax and each expert's share of the output
  norm, ``||y_e|| / sum ||y_e||`` (so the experts that matter for this token rank first);
* fit: the relative squared error of what the MoE block computes, ``sum over the top-k of
  k * w_e * y_e`` (``w`` renormalised softmax weights, ``k * down`` as in ``convert``),
  against ``T``; this teaches the weights, not only the choice.

Afterwards :func:`refit_shared_down` re-solves the shared expert's down-projection by ridge
least squares so that it also predicts what the unchosen experts would have added.

Evaluation reports the relative error of the whole FFN output for the trained router, and
for an oracle that picks the top-k by true norm with weight 1.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from engine.training.moefy.convert import MoeShape
from engine.training.moefy.partition import activations


@dataclass(frozen=True)
class RouterSpec:
    """Router training budget: epochs, batch, learning rate, fit-loss weight, seed."""

    epochs: int = 6
    batch: int = 256
    lr: float = 3e-3
    fit_weight: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class LayerExperts:
    """One layer's routed experts as tensors: gate/up rows [E, m, H], down [E, H, m]."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    shared_gate: torch.Tensor  # [S, H]
    shared_up: torch.Tensor
    shared_down: torch.Tensor  # [H, S]

    @classmethod
    def cut(
        cls,
        gate: torch.Tensor,
        up: torch.Tensor,
        down: torch.Tensor,
        order: torch.Tensor,
        shape: MoeShape,
    ) -> LayerExperts:
        s, e, m = shape.shared, shape.experts, shape.expert_size
        routed = order[s:].view(e, m)
        return cls(
            gate[routed], up[routed], down[:, routed].permute(1, 0, 2),
            gate[order[:s]], up[order[:s]], down[:, order[:s]],
        )  # fmt: skip

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every routed expert's output [B, E, H] for inputs [B, H]."""
        x = x.float()
        h = F.silu(torch.einsum("bh,emh->bem", x, self.gate)) * torch.einsum(
            "bh,emh->bem", x, self.up
        )
        return torch.einsum("bem,ehm->beh", h, self.down)

    def shared_output(self, x: torch.Tensor) -> torch.Tensor:
        """The shared expert's output [B, H] (its gate and 2x compensation cancel)."""
        return activations(x, self.shared_gate, self.shared_up) @ self.shared_down.T

    def with_shared_down(self, down: torch.Tensor) -> LayerExperts:
        """The same experts with another shared down-projection [H, S]."""
        return replace(self, shared_down=down)


def routed_mix(logits: torch.Tensor, outs: torch.Tensor, top_k: int) -> torch.Tensor:
    """What the MoE block computes from router ``logits`` [B, E] and expert ``outs`` [B, E, H]."""
    probs = torch.softmax(logits.float(), dim=-1)
    top, idx = probs.topk(top_k, dim=-1)  # [B, k]
    weights = top / top.sum(dim=-1, keepdim=True) * top_k
    chosen = outs.gather(1, idx.unsqueeze(-1).expand(-1, -1, outs.shape[-1]))  # [B, k, H]
    return (weights.unsqueeze(-1) * chosen).sum(dim=1)


def oracle_mix(outs: torch.Tensor, top_k: int) -> torch.Tensor:
    """The top-k experts by true output norm, each with weight 1."""
    idx = outs.norm(dim=-1).topk(top_k, dim=-1).indices
    return outs.gather(1, idx.unsqueeze(-1).expand(-1, -1, outs.shape[-1])).sum(dim=1)


def _losses(
    router: torch.Tensor, x: torch.Tensor, outs: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = x.float() @ router.T  # [B, E]
    share = outs.norm(dim=-1)
    share = share / share.sum(dim=-1, keepdim=True).clamp_min(1e-9)
    rank = -(share * torch.log_softmax(logits, dim=-1)).sum(dim=-1).mean()
    target = outs.sum(dim=1)
    err = (routed_mix(logits, outs, top_k) - target).pow(2).sum(-1)
    fit = (err / target.pow(2).sum(-1).clamp_min(1e-9)).mean()
    return rank, fit


def train_router(
    x: torch.Tensor, experts: LayerExperts, shape: MoeShape, spec: RouterSpec
) -> torch.Tensor:
    """The trained router weight [E, H] of one layer from its FFN inputs ``x`` [N, H]."""
    gen = torch.Generator().manual_seed(spec.seed)
    router = torch.zeros(shape.experts, x.shape[1], requires_grad=True)
    opt = torch.optim.Adam([router], lr=spec.lr)
    steps = spec.epochs * ((len(x) + spec.batch - 1) // spec.batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for epoch in range(spec.epochs):
        for idx in torch.randperm(len(x), generator=gen).split(spec.batch):
            with torch.no_grad():
                outs = experts.outputs(x[idx])
            rank, fit = _losses(router, x[idx], outs, shape.top_k)
            loss = rank + (spec.fit_weight * fit if epoch >= spec.epochs // 3 else 0.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return router.detach()


@torch.no_grad()
def layer_errors(
    x: torch.Tensor, experts: LayerExperts, router: torch.Tensor, shape: MoeShape
) -> dict[str, float]:
    """Relative error of the FFN output with the trained router and with the oracle choice."""
    err_r, err_o, norm = 0.0, 0.0, 0.0
    for chunk in x.split(1024):
        outs = experts.outputs(chunk)
        full = outs.sum(dim=1) + experts.shared_output(chunk)
        base = experts.shared_output(chunk)
        routed = routed_mix(chunk.float() @ router.T, outs, shape.top_k)
        err_r += float((base + routed - full).pow(2).sum())
        err_o += float((base + oracle_mix(outs, shape.top_k) - full).pow(2).sum())
        norm += float(full.pow(2).sum())
    return {"router": (err_r / norm) ** 0.5, "oracle": (err_o / norm) ** 0.5}


@torch.no_grad()
def refit_shared_down(
    x: torch.Tensor, experts: LayerExperts, router: torch.Tensor, shape: MoeShape, ridge: float
) -> torch.Tensor:
    """A new shared down-projection [H, S] that also absorbs what the routed top-k misses.

    Ridge least squares of ``dense FFN - routed mix`` on the shared expert's activations: the
    part of the dropped experts' output that the always-on neurons can predict.
    """
    s = experts.shared_gate.shape[0]
    gram = torch.zeros(s, s, dtype=torch.float64)
    cross = torch.zeros(s, x.shape[1], dtype=torch.float64)
    for chunk in x.split(1024):
        hs = activations(chunk, experts.shared_gate, experts.shared_up)  # [B, S]
        outs = experts.outputs(chunk)
        rest = outs.sum(dim=1) - routed_mix(chunk.float() @ router.T, outs, shape.top_k)
        target = rest + hs @ experts.shared_down.T  # [B, H]
        gram += (hs.T @ hs).double()
        cross += (hs.T @ target).double()
    scale = ridge * float(gram.diagonal().mean())
    solved = torch.linalg.solve(gram + scale * torch.eye(s, dtype=torch.float64), cross)
    return solved.T.float()  # [H, S]
