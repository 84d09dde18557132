"""How far routing alone can go: the dense model with oracle-picked experts, per cut.

Every FFN of the dense model is cut into a shared expert (the first ``shared`` neurons of the
recipe's order) and routed experts of ``expert_size`` consecutive neurons of the rest of the
order; per token and layer the ``top_k`` routed experts whose true outputs are largest are
kept (an oracle: no trained router can pick better by that measure) and the rest dropped.
Held-out perplexity of that model over the dense one's is the best any router can reach with
that cut and no retraining. ``expert_size`` 1 is per-neuron selection (``|a| * ||down col||``,
the same ranking as the output norm), the bound of dynamic activation sparsity.

Legend: ``T`` tokens, ``H`` hidden, ``I`` FFN neurons, ``E`` routed experts, ``s`` expert size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import InvalidRequestError
from engine.training.moefy.collect import windows


@dataclass(frozen=True)
class Cut:
    """Shared neurons, routed expert size and experts kept per token."""

    shared: int
    expert_size: int
    top_k: int

    def check(self, neurons: int) -> None:
        """Refuse a cut that does not tile ``neurons`` or keeps more experts than it has."""
        routed = neurons - self.shared
        if min(self.expert_size, self.top_k) < 1 or self.shared < 0 or routed < 1:
            raise InvalidRequestError(f"cut needs positive sizes and routed neurons: {self}")
        if routed % self.expert_size or self.top_k > routed // self.expert_size:
            raise InvalidRequestError(
                f"cut {self} does not tile {routed} routed neurons with {self.top_k} kept"
            )

    def active_fraction(self, neurons: int) -> float:
        """Share of the FFN's neurons (and parameters) one token uses."""
        return (self.shared + self.top_k * self.expert_size) / neurons


def oracle_output(
    h: torch.Tensor, down: torch.Tensor, order: torch.Tensor, cut: Cut
) -> torch.Tensor:
    """FFN output [..., H] from activations ``h`` [..., I] keeping the shared neurons and the
    ``top_k`` routed experts of largest output norm; ``down`` [H, I], ``order`` [I]."""
    h, w = h[..., order], down[:, order]
    s = cut.shared
    out = h[..., :s] @ w[:, :s].T
    routed, w_routed = h[..., s:], w[:, s:]
    if cut.expert_size == 1:
        score = routed.abs() * w_routed.norm(dim=0)
        keep = torch.zeros_like(routed).scatter_(-1, score.topk(cut.top_k, dim=-1).indices, 1.0)
        return out + (routed * keep) @ w_routed.T
    experts = routed.shape[-1] // cut.expert_size
    parts = routed.unflatten(-1, (experts, cut.expert_size))  # [..., E, s]
    w_parts = w_routed.unflatten(-1, (experts, cut.expert_size))  # [H, E, s]
    outs = torch.einsum("...es,hes->...eh", parts, w_parts)  # [..., E, H]
    best = outs.norm(dim=-1).topk(cut.top_k, dim=-1).indices
    keep = torch.zeros(outs.shape[:-1], dtype=outs.dtype).scatter_(-1, best, 1.0)
    return out + (outs * keep.unsqueeze(-1)).sum(dim=-2)


class OracleFFN(nn.Module):
    """A dense SwiGLU MLP computed through ``oracle_output`` (or unchanged for ``cut=None``)."""

    def __init__(self, mlp: Any, order: torch.Tensor, cut: Cut | None) -> None:
        super().__init__()
        self.mlp, self.order, self.cut = mlp, order, cut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mlp
        if self.cut is None:
            return m(x)  # type: ignore[no-any-return]
        h = F.silu(m.gate_proj(x)) * m.up_proj(x)
        return oracle_output(h, m.down_proj.weight, self.order, self.cut)


@contextmanager
def oracle_cut(dense: Any, orders: torch.Tensor, cut: Cut | None) -> Iterator[Any]:
    """``dense`` with every MLP computed through the oracle for ``cut``; restored after."""
    layers = dense.model.layers
    saved = [layer.mlp for layer in layers]
    for layer, mlp, order in zip(layers, saved, orders, strict=True):
        layer.mlp = OracleFFN(mlp, order.long(), cut)
    try:
        yield dense
    finally:
        for layer, mlp in zip(layers, saved, strict=True):
            layer.mlp = mlp


@torch.no_grad()
def mean_nll(model: Any, stream: torch.Tensor) -> float:
    """Mean next-token negative log-likelihood over the windows of ``stream``."""
    total, count = 0.0, 0
    for window in windows(stream):
        logits = model(input_ids=window.unsqueeze(0)).logits[0, :-1].float()
        total += float(F.cross_entropy(logits, window[1:], reduction="sum"))
        count += len(window) - 1
    return total / count


def _ratios(model: Any, streams: dict[str, torch.Tensor], base: dict[str, float]) -> dict:
    return {kind: math.exp(mean_nll(model, s) - base[kind]) for kind, s in streams.items()}


def ceiling(
    dense: Any, orders: torch.Tensor, cuts: Sequence[Cut], streams: dict[str, torch.Tensor]
) -> list[dict[str, Any]]:
    """Per cut: active fraction, perplexity ratio (oracle cut over dense) per text kind and
    their mean (the measure ``distill-e2e`` keeps a result by)."""
    neurons = int(orders.shape[1])
    for cut in cuts:
        cut.check(neurons)
    base = {kind: mean_nll(dense, s) for kind, s in streams.items()}
    rows = []
    for cut in cuts:
        with oracle_cut(dense, orders, cut) as model:
            ratios = _ratios(model, streams, base)
        row = {
            **asdict(cut),
            "experts": (neurons - cut.shared) // cut.expert_size,
            "active_fraction": round(cut.active_fraction(neurons), 4),
            "ppl_ratio_by_kind": ratios,
            "mean_ppl_ratio": sum(ratios.values()) / len(ratios),
        }
        rows.append(row)
        print(f"ceiling {cut}: mean perplexity ratio {row['mean_ppl_ratio']:.3f}", flush=True)
    return rows


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| shared | routed experts x size | kept per token | active | perplexity / dense (mean) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        size = "neurons" if r["expert_size"] == 1 else f"x {r['expert_size']}"
        lines.append(
            f"| {r['shared']} | {r['experts']} {size} | {r['top_k']} | "
            f"{r['active_fraction']:.0%} | {r['mean_ppl_ratio']:.3f} |"
        )
    return "\n".join(lines) + "\n"


DEFAULT_CUTS = (
    *(Cut(512, 32, k) for k in (8, 12, 16, 20, 24)),
    Cut(512, 16, 16),
    Cut(512, 8, 32),
    Cut(512, 4, 64),
    Cut(512, 1, 256),
    Cut(0, 32, 24),
    Cut(0, 16, 48),
    Cut(0, 1, 768),
)
