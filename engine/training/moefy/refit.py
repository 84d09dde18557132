"""Sequential joint refit of every expert's down-projection under the router's own routing.

Per layer the MoE computes ``y = W_down (a * c)``: ``a`` [I] are the SwiGLU activations of all
FFN neurons (in the recipe's neuron order), ``c`` the routing coefficient of each neuron (1 for
the shared expert, ``top_k * w_e`` for a neuron of a chosen expert ``e``, 0 for the others).
For a fixed router that is linear in ``W_down`` [H, I], so the down-projections of all experts,
routed and shared together, have a closed-form ridge least-squares solution from the Gram
matrix of ``z = a * c`` [I, I] and its cross-product with the target [I, H].

The refit runs layer by layer: layer ``l``'s inputs come from the MoE whose layers ``0..l-1``
are already refitted, so each layer also learns to correct the drift its predecessors left.
The target blends two things by ``drift``: 0 fits the dense FFN evaluated on the MoE's own
input (a pure split correction); 1 fits the difference between the dense model's residual
stream after the layer and the MoE's residual stream after attention (the FFN then also pulls
the stream back towards the dense one).

What this module does not do: choose neurons or train routers (``partition``, ``router``).
Legend: ``T`` tokens of a window, ``H`` hidden, ``I`` FFN neurons, ``E`` experts, ``m`` neurons
per expert, ``S`` shared neurons, ``L`` layers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from engine.training.moefy.convert import SHARED_GATE_COMPENSATION, MoeShape
from engine.training.moefy.partition import activations
from engine.training.moefy.tune import LayerWeights, TuneSpec, relative_error, tune_layer


@dataclass(frozen=True)
class RefitSpec:
    """Ridge strength (relative to the Gram diagonal), held-back tokens, optional tuning."""

    ridge: float = 1e-1
    check_tokens: int = 2000
    tune: TuneSpec | None = None

    def __post_init__(self) -> None:
        if self.ridge < 0 or self.check_tokens < 1:
            raise ValueError(f"refit needs ridge >= 0 and check_tokens >= 1: {self}")


def routing_coefficients(x: torch.Tensor, router: torch.Tensor, shape: MoeShape) -> torch.Tensor:
    """Per token and neuron (recipe order), the factor the MoE applies to its activation."""
    probs = torch.softmax(x.float() @ router.float().T, dim=-1)  # [T, E]
    top, idx = probs.topk(shape.top_k, dim=-1)  # [T, k]
    weights = top / top.sum(dim=-1, keepdim=True) * shape.top_k
    per_expert = torch.zeros_like(probs).scatter_(1, idx, weights)  # [T, E]
    routed = per_expert.repeat_interleave(shape.expert_size, dim=1)  # [T, E*m]
    return torch.cat([torch.ones(len(x), shape.shared), routed], dim=1)  # [T, I]


def solve_down(
    gram: torch.Tensor, cross: torch.Tensor, prior: torch.Tensor, ridge: float
) -> torch.Tensor:
    """Ridge solution ``W`` [H, I] of ``W z = target`` from ``gram`` [I, I], ``cross`` [I, H].

    The penalty ``ridge * mean(diag gram) * ||W - prior||^2`` pulls towards ``prior`` [H, I]
    (the dense down-projection), not towards zero: a neuron that few tokens route to keeps
    its dense weights instead of fading.
    """
    scale = ridge * float(gram.diagonal().mean())
    eye = torch.eye(len(gram), dtype=gram.dtype)
    rhs = cross + scale * prior.T.to(gram.dtype)
    return torch.linalg.solve(gram + scale * eye, rhs).T.float()


def ordered_weights(layer: Any, shape: MoeShape) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) rows [I, H] of one Qwen2-MoE block in recipe order: shared, then experts."""
    mlp = layer.mlp
    gate_up = mlp.experts.gate_up_proj.detach().float()  # [E, 2m, H]
    m = shape.expert_size
    gate = torch.cat([mlp.shared_expert.gate_proj.weight.float(), gate_up[:, :m].flatten(0, 1)])
    up = torch.cat([mlp.shared_expert.up_proj.weight.float(), gate_up[:, m:].flatten(0, 1)])
    return gate, up


def set_weights(layer: Any, weights: LayerWeights, shape: MoeShape) -> None:
    """Write ``weights`` (recipe order) into one Qwen2-MoE block's shared and routed experts."""
    s, e, m = shape.shared, shape.experts, shape.expert_size
    mlp = layer.mlp
    dtype = mlp.experts.down_proj.dtype
    hidden = weights.down.shape[0]
    gate_up = torch.cat(
        [weights.gate[s:].reshape(e, m, hidden), weights.up[s:].reshape(e, m, hidden)], dim=1
    )  # [E, 2m, H]
    routed = weights.down[:, s:].reshape(hidden, e, m).permute(1, 0, 2)  # [E, H, m]
    with torch.no_grad():
        mlp.experts.gate_up_proj.copy_(gate_up.to(dtype))
        mlp.experts.down_proj.copy_((routed * float(shape.top_k)).to(dtype))
        mlp.shared_expert.gate_proj.weight.copy_(weights.gate[:s].to(dtype))
        mlp.shared_expert.up_proj.weight.copy_(weights.up[:s].to(dtype))
        shared_down = weights.down[:, :s] * SHARED_GATE_COMPENSATION
        mlp.shared_expert.down_proj.weight.copy_(shared_down.to(dtype))


def current_down(layer: Any, shape: MoeShape) -> torch.Tensor:
    """The down-projection [H, I] (recipe order) that one Qwen2-MoE block computes with."""
    mlp = layer.mlp
    routed = mlp.experts.down_proj.detach().float() / float(shape.top_k)  # [E, H, m]
    shared = mlp.shared_expert.down_proj.weight.detach().float() / SHARED_GATE_COMPENSATION
    return torch.cat([shared, routed.permute(1, 0, 2).flatten(1)], dim=1)


@dataclass
class _Stream:
    """Residual streams of dense and MoE over the calibration windows, with rotary tables."""

    dense: list[torch.Tensor]  # [1, T, H] each
    moe: list[torch.Tensor]
    rotary: list[tuple[torch.Tensor, torch.Tensor]]


def _start(dense: Any, windows: list[torch.Tensor]) -> _Stream:
    embeds, rotary = [], []
    for w in windows:
        h = dense.model.embed_tokens(w.unsqueeze(0))
        positions = torch.arange(len(w)).unsqueeze(0)
        embeds.append(h)
        rotary.append(dense.model.rotary_emb(h, positions))
    return _Stream(embeds, [h.clone() for h in embeds], rotary)


def _collect(
    d_layer: Any, m_layer: Any, stream: _Stream
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Advance the dense stream through ``d_layer``; the MoE's post-attention streams and its
    FFN inputs [N, H] at ``m_layer`` (all windows, in order)."""
    mids, xs = [], []
    for i, rotary in enumerate(stream.rotary):
        stream.dense[i] = d_layer(stream.dense[i], position_embeddings=rotary)
        attn, _ = m_layer.self_attn(
            m_layer.input_layernorm(stream.moe[i]), attention_mask=None, position_embeddings=rotary
        )
        mids.append(stream.moe[i] + attn)
        xs.append(m_layer.post_attention_layernorm(mids[-1])[0])
    return mids, torch.cat(xs)


def closed_form_down(
    weights: LayerWeights,
    x: torch.Tensor,
    coef: torch.Tensor,
    target: torch.Tensor,
    ridge: float,
) -> torch.Tensor:
    """The ridge least-squares down-projection [H, I] for fixed gate, up and routing."""
    n = weights.gate.shape[0]
    gram = torch.zeros(n, n, dtype=torch.float64)
    cross = torch.zeros(n, target.shape[1], dtype=torch.float64)
    for rows in torch.arange(len(x)).split(2048):
        z = activations(x[rows], weights.gate, weights.up) * coef[rows]  # [B, I]
        gram += (z.T @ z).double()
        cross += (z.T @ target[rows]).double()
    return solve_down(gram, cross, weights.down, ridge)


def refit_layer(
    index: int, dense: Any, moe: Any, stream: _Stream, shape: MoeShape, spec: RefitSpec
) -> dict[str, float]:
    """Tune and refit layer ``index`` of ``moe`` in place, advance ``stream``; its errors."""
    d_layer, m_layer = dense.model.layers[index], moe.model.layers[index]
    with torch.no_grad():
        mids, x = _collect(d_layer, m_layer, stream)
        target = d_layer.mlp(x)  # [N, H]: the dense FFN on the MoE's own inputs
        coef = routing_coefficients(x, m_layer.mlp.gate.weight.detach(), shape)  # [N, I]
    gate, up = ordered_weights(m_layer, shape)
    start = LayerWeights(gate, up, current_down(m_layer, shape))
    weights, _ = tune_layer(start, x, coef, target, spec.tune) if spec.tune else (start, {})
    k = spec.tune.check_tokens if spec.tune else spec.check_tokens
    with torch.no_grad():
        down = closed_form_down(weights, x[k:], coef[k:], target[k:], spec.ridge)
        refitted = LayerWeights(weights.gate, weights.up, down)
        errors = {
            name: float(relative_error(w.output(x[:k], coef[:k]), target[:k]))
            for name, w in (("before", start), ("tuned", weights), ("after", refitted))
        }
        final = refitted if errors["after"] <= errors["tuned"] else weights
        set_weights(m_layer, final, shape)
        for i, mid in enumerate(mids):
            stream.moe[i] = mid + m_layer.mlp(m_layer.post_attention_layernorm(mid))
    return errors


def refit(
    dense: Any, moe: Any, windows: list[torch.Tensor], shape: MoeShape, spec: RefitSpec
) -> list[dict[str, float]]:
    """Refit every layer of ``moe`` in place, first to last; returns the per-layer errors."""
    with torch.no_grad():
        stream = _start(dense, windows)
    report = []
    for index in range(len(moe.model.layers)):
        t0 = time.perf_counter()
        errors = refit_layer(index, dense, moe, stream, shape, spec)
        report.append(errors)
        print(
            f"layer {index}: held-back relative FFN error {errors['before']:.3f} -> tuned "
            f"{errors['tuned']:.3f}, refitted {errors['after']:.3f}, "
            f"{time.perf_counter() - t0:.1f} s",
            flush=True,
        )
    return report


def weights_in_dense_order(
    moe: Any, orders: torch.Tensor, shape: MoeShape
) -> dict[str, torch.Tensor]:
    """Every layer's FFN weights with neurons back in the dense order: ``gate``, ``up``
    [L, I, H] and ``down`` [L, H, I] (what ``convert`` cuts again with the same orders)."""
    gates, ups, downs = [], [], []
    for layer, order in zip(moe.model.layers, orders, strict=True):
        gate, up = ordered_weights(layer, shape)  # row j is neuron order[j]
        down = current_down(layer, shape)
        gates.append(torch.empty_like(gate).index_copy_(0, order, gate))
        ups.append(torch.empty_like(up).index_copy_(0, order, up))
        downs.append(torch.empty_like(down).index_copy_(1, order, down))
    return {"gate": torch.stack(gates), "up": torch.stack(ups), "down": torch.stack(downs)}
