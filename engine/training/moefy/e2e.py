"""End-to-end distillation of the MoE against the dense model's logits (``distill-e2e``).

The student is the dense model with each FFN replaced by ``RoutedFfn``: the MoE's exact
computation (shared neurons always on, the router's top-k experts weighted as Qwen2-MoE
weights them) written over the dense neuron order, with a trainable router and trainable
low-rank deltas on the dense gate, up and down matrices (``lowrank``). Attention, norms and
embeddings stay frozen. The loss is KL(dense || student) on the next-token distributions of
windows of the training split; a small held-out slice is watched during training and the
learned parts are checkpointed (atomically) every few minutes, so a run that must stop still
leaves something to measure.

What this module does not do: choose neurons (``partition``), fetch or write the recipe
(``recipe.run_distill_e2e``). Legend: ``T`` tokens, ``H`` hidden, ``I`` FFN neurons, ``E``
experts, ``r`` rank, ``L`` layers.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.training.moefy.convert import MoeShape
from engine.training.moefy.distill import kl_loss, kl_step
from engine.training.moefy.learned import Learned
from engine.training.moefy.lowrank import NAMES, effective_ffn
from engine.training.train import cosine_floor


@dataclass(frozen=True)
class E2eSpec:
    """Rank of the deltas, tokens and window, learning rates, time and checkpoint budget."""

    rank: int = 32
    tokens: int = 100_000
    window: int = 256
    lr: float = 1e-3
    lr_router: float = 1e-3
    warmup: int = 10
    max_seconds: float = 3600.0
    eval_every: int = 25
    checkpoint_seconds: float = 300.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1 or self.window < 8 or self.tokens < 0 or 0 < self.tokens < self.window:
            raise ValueError(
                f"distill-e2e needs rank >= 1, window >= 8 and tokens 0 or >= window: {self}"
            )
        if self.lr <= 0 or self.lr_router < 0 or self.max_seconds <= 0:
            raise ValueError(f"distill-e2e needs positive learning rates and time: {self}")

    @property
    def steps(self) -> int:
        """Optimizer steps: one window per step."""
        return self.tokens // self.window


def neuron_coefficients(
    x: torch.Tensor, router: torch.Tensor, expert_of: torch.Tensor, shape: MoeShape
) -> torch.Tensor:
    """Per token and neuron (dense order) the factor the MoE applies to its activation: 1 for
    shared neurons (``expert_of`` -1), ``top_k * w_e`` for a chosen expert ``e``, else 0."""
    probs = torch.softmax(x.float() @ router.float().T, dim=-1)  # [T, E]
    top, idx = probs.topk(shape.top_k, dim=-1)  # [T, k]
    weights = top / top.sum(dim=-1, keepdim=True) * shape.top_k
    per_expert = torch.zeros_like(probs).scatter(1, idx, weights)  # [T, E]
    padded = torch.cat([torch.ones(len(x), 1), per_expert], dim=1)  # [T, 1 + E]
    return padded[:, expert_of + 1]  # [T, I]


def expert_of_neuron(order: torch.Tensor, shape: MoeShape) -> torch.Tensor:
    """[I] the expert of each dense neuron (-1: shared) for a recipe ``order``."""
    owner = torch.cat(
        [
            torch.full((shape.shared,), -1, dtype=torch.long),
            torch.arange(shape.experts).repeat_interleave(shape.expert_size),
        ]
    )
    return torch.empty_like(owner).index_copy_(0, order, owner)


class RoutedFfn(nn.Module):
    """One MoE FFN over dense-order weights: frozen base + trainable low-rank deltas, router."""

    expert_of: torch.Tensor  # [I] buffer: expert of each dense neuron, -1 for shared

    def __init__(
        self,
        base: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        router: torch.Tensor,
        expert_of: torch.Tensor,
        shape: MoeShape,
        rank: int,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        self.shape = shape
        for name, w in zip(NAMES, base, strict=True):
            self.register_buffer(f"base_{name}", w.detach().float().clone())
            self.register_parameter(f"{name}_a", nn.Parameter(torch.zeros(w.shape[0], rank)))
            b = torch.randn(rank, w.shape[1], generator=generator) / math.sqrt(w.shape[1])
            self.register_parameter(f"{name}_b", nn.Parameter(b))
        self.router = nn.Parameter(router.detach().float().clone())
        self.register_buffer("expert_of", expert_of.clone())

    def weight(self, name: str) -> torch.Tensor:
        """The effective dense-order matrix ``name``: base + a @ b."""
        a, b = getattr(self, f"{name}_a"), getattr(self, f"{name}_b")
        return getattr(self, f"base_{name}") + a @ b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [T, H]
        coef = neuron_coefficients(flat, self.router, self.expert_of, self.shape)  # [T, I]
        h = F.silu(flat @ self.weight("gate").T) * (flat @ self.weight("up").T) * coef
        return (h @ self.weight("down").T).view_as(x)


def build_student(dense: Any, learned: Learned, rank: int, seed: int = 0) -> Any:
    """A copy of ``dense`` whose FFNs are ``RoutedFfn`` cut by ``learned`` (its deltas start
    from ``learned.lora`` when present, with its rank, else at zero); only routers and deltas
    train."""
    if learned.lora:
        rank = learned.lora["gate.a"].shape[2]
    student = copy.deepcopy(dense)
    for p in student.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    state = dense.state_dict()
    for i, layer in enumerate(student.model.layers):
        pre = f"model.layers.{i}.mlp."
        weights = tuple(
            learned.ffn[n][i].float() if n in learned.ffn else state[pre + f"{n}_proj.weight"]
            for n in NAMES
        )
        shared = learned.orders[i][: learned.shape.shared]
        shared_down = None if "down" in learned.ffn else learned.shared_downs[i].float()
        base = effective_ffn(weights, shared, shared_down, {}, i)  # type: ignore[arg-type]
        expert_of = expert_of_neuron(learned.orders[i], learned.shape)
        ffn = RoutedFfn(base, learned.routers[i], expert_of, learned.shape, rank, gen)
        for n in NAMES:
            if f"{n}.a" in learned.lora:
                with torch.no_grad():
                    getattr(ffn, f"{n}_a").copy_(learned.lora[f"{n}.a"][i].float())
                    getattr(ffn, f"{n}_b").copy_(learned.lora[f"{n}.b"][i].float())
        layer.mlp = ffn
    return student.eval()


def trained_parts(student: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(routers [L, E, H], low-rank deltas {"gate.a": [L, out, r], ...}) of a student."""
    ffns = [layer.mlp for layer in student.model.layers]
    routers = torch.stack([f.router.detach() for f in ffns])
    lora = {
        f"{n}.{part}": torch.stack([getattr(f, f"{n}_{part}").detach() for f in ffns])
        for n in NAMES
        for part in ("a", "b")
    }
    return routers, lora


def _optimizer(student: Any, spec: E2eSpec) -> torch.optim.Optimizer:
    ffns = [layer.mlp for layer in student.model.layers]
    deltas = [getattr(f, f"{n}_{p}") for f in ffns for n in NAMES for p in ("a", "b")]
    routers = [f.router for f in ffns]
    for p in deltas + routers:
        p.requires_grad_(True)
    return torch.optim.AdamW(
        [
            {"params": deltas, "lr": spec.lr, "weight_decay": 0.0},
            {"params": routers, "lr": spec.lr_router, "weight_decay": 0.0},
        ]
    )


def lr_factor(step: int, progress: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to a tenth as ``progress``
    (the share of the step or time budget spent, whichever is larger) goes from 0 to 1."""
    if step < warmup:
        return (step + 1) / warmup
    return cosine_floor(progress, 0.1)


def _set_lr(opt: torch.optim.Optimizer, spec: E2eSpec, step: int, elapsed: float) -> None:
    progress = max(step / spec.steps, elapsed / spec.max_seconds)
    factor = lr_factor(step, progress, spec.warmup)
    for group, base in zip(opt.param_groups, (spec.lr, spec.lr_router), strict=True):
        group["lr"] = base * factor


@dataclass
class HeldOut:
    """A small held-out slice with the dense model's logits, watched during training."""

    windows: list[torch.Tensor]
    teacher: list[torch.Tensor]

    @classmethod
    @torch.no_grad()
    def of(cls, dense: Any, windows: list[torch.Tensor]) -> HeldOut:
        return cls(windows, [dense(input_ids=w.unsqueeze(0)).logits[0] for w in windows])

    @torch.no_grad()
    def score(self, model: Any) -> dict[str, float]:
        """Mean KL to the dense model and perplexities of both on the slice."""
        kl = nll_s = nll_t = 0.0
        count = 0
        for w, t in zip(self.windows, self.teacher, strict=True):
            s = model(input_ids=w.unsqueeze(0)).logits[0]
            kl += float(kl_loss(t, s)) * len(w)
            nll_s += float(F.cross_entropy(s[:-1].float(), w[1:], reduction="sum"))
            nll_t += float(F.cross_entropy(t[:-1].float(), w[1:], reduction="sum"))
            count += len(w) - 1
        total = sum(len(w) for w in self.windows)
        return {
            "kl": kl / total,
            "ppl": math.exp(nll_s / count),
            "ppl_dense": math.exp(nll_t / count),
        }


def _window(train: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    start = int(torch.randint(0, len(train) - size, (1,), generator=gen))
    return train[start : start + size].unsqueeze(0)


def train_e2e(
    dense: Any,
    student: Any,
    train: torch.Tensor,
    held: HeldOut,
    spec: E2eSpec,
    checkpoint: Callable[[int], None] = lambda _step: None,
) -> dict[str, Any]:
    """Train ``student`` in place on ``train`` [N] tokens; returns the loss and held-out log.

    Stops after ``spec.steps`` or ``spec.max_seconds``; calls ``checkpoint(step)`` every
    ``spec.checkpoint_seconds`` and at the end."""
    opt = _optimizer(student, spec)
    gen = torch.Generator().manual_seed(spec.seed)
    log: dict[str, Any] = {"losses": [], "held_out": [{"step": 0, **held.score(student)}]}
    t0 = last_save = time.perf_counter()
    step = 0
    while step < spec.steps and time.perf_counter() - t0 < spec.max_seconds:
        _set_lr(opt, spec, step, time.perf_counter() - t0)
        log["losses"].append(kl_step(dense, student, _window(train, spec.window, gen), opt))
        step += 1
        _report(step, spec, log, held, student, t0)
        if time.perf_counter() - last_save > spec.checkpoint_seconds:
            checkpoint(step)
            last_save = time.perf_counter()
    for p in student.parameters():
        p.requires_grad_(False)
    if step % spec.eval_every:
        log["held_out"].append({"step": step, **held.score(student)})
    checkpoint(step)
    log.update(steps=step, tokens=step * spec.window, seconds=round(time.perf_counter() - t0, 1))
    return log


def _report(
    step: int, spec: E2eSpec, log: dict[str, Any], held: HeldOut, student: Any, t0: float
) -> None:
    """Print the recent training KL; every ``eval_every`` steps score the held-out slice."""
    if step % 10 and step % spec.eval_every:
        return
    recent = log["losses"][-10:]
    line = f"e2e step {step}/{spec.steps}: KL {sum(recent) / len(recent):.4f}"
    if step % spec.eval_every == 0:
        with torch.no_grad():
            scored = held.score(student)
        log["held_out"].append({"step": step, **scored})
        line += f"; held-out KL {scored['kl']:.4f}, ppl {scored['ppl']:.2f}"
        line += f" (dense {scored['ppl_dense']:.2f})"
    print(f"{line}, {time.perf_counter() - t0:.0f} s", flush=True)
