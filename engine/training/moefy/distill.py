"""Short distillation of what the recipe learned against the dense model's logits.

Only the learned parts train: each layer's router and shared down-projection (everything
else is the dense model's and stays frozen, so the shipped files stay small). The loss is
the KL divergence from the dense model's next-token distribution to the MoE's, on windows
of the calibration text. Before and after, the same held-out windows give the MoE's
perplexity against the dense model's, so a run that does not pay is visible.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from engine.training.moefy.convert import SHARED_GATE_COMPENSATION


@dataclass(frozen=True)
class DistillSpec:
    """Steps, window length, learning rates, seed."""

    steps: int = 120
    window: int = 256
    lr_router: float = 1e-3
    lr_shared: float = 5e-5
    seed: int = 0


def trainable(moe: Any) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """Freeze everything but routers and shared down-projections; return (routers, downs)."""
    for p in moe.parameters():
        p.requires_grad_(False)
    routers = [layer.mlp.gate.weight for layer in moe.model.layers]
    downs = [layer.mlp.shared_expert.down_proj.weight for layer in moe.model.layers]
    for p in routers + downs:
        p.requires_grad_(True)
    return routers, downs


def kl_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean per-position KL(teacher || student)."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def kl_step(dense: Any, student: Any, ids: torch.Tensor, opt: torch.optim.Optimizer) -> float:
    """One optimizer step on KL(dense || student) over the window ``ids`` [1, T]; its loss."""
    with torch.no_grad():
        teacher = dense(input_ids=ids).logits[0]
    loss = kl_loss(teacher, student(input_ids=ids).logits[0])
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


@torch.no_grad()
def perplexity(model: Any, windows: list[torch.Tensor]) -> float:
    """Perplexity of ``model`` over token ``windows``."""
    nll, count = 0.0, 0
    for w in windows:
        logits = model(input_ids=w.unsqueeze(0)).logits[0, :-1]
        nll += float(F.cross_entropy(logits.float(), w[1:], reduction="sum"))
        count += len(w) - 1
    return math.exp(nll / count)


def distill(dense: Any, moe: Any, train: torch.Tensor, spec: DistillSpec) -> list[float]:
    """Train ``moe``'s routers and shared downs in place on ``train`` [N]; returns the losses."""
    routers, downs = trainable(moe)
    opt = torch.optim.Adam(
        [{"params": routers, "lr": spec.lr_router}, {"params": downs, "lr": spec.lr_shared}]
    )
    gen = torch.Generator().manual_seed(spec.seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(spec.steps):
        start = int(torch.randint(0, len(train) - spec.window, (1,), generator=gen))
        ids = train[start : start + spec.window].unsqueeze(0)
        losses.append(kl_step(dense, moe, ids, opt))
        if step % 10 == 0 or step == spec.steps - 1:
            recent = sum(losses[-10:]) / len(losses[-10:])
            print(
                f"distill step {step}: KL {recent:.4f}, {time.perf_counter() - t0:.0f} s",
                flush=True,
            )
    for p in moe.parameters():
        p.requires_grad_(False)
    return losses


def learned_tensors(moe: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(routers [L, E, H], shared downs [L, H, S]) read back from a (distilled) MoE."""
    layers = moe.model.layers
    routers = torch.stack([layer.mlp.gate.weight.detach() for layer in layers])
    downs = torch.stack(
        [
            layer.mlp.shared_expert.down_proj.weight.detach() / SHARED_GATE_COMPENSATION
            for layer in layers
        ]
    )
    return routers, downs
