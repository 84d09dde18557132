"""Low-rank deltas on the dense FFN matrices: what end-to-end distillation learns and ships.

Each layer's delta on a dense matrix ``W`` [out, in] is ``a @ b`` with ``a`` [out, r] and
``b`` [r, in], stored per name (``gate``, ``up`` [I, H]; ``down`` [H, I]) as ``a`` [L, out, r]
and ``b`` [L, r, in] in the dense neuron order. Experts are neuron slices of the dense FFN, so
a delta on the dense matrix maps exactly onto the shared and routed experts when ``convert``
cuts it. Pure tensor code (no model, no files).
"""

from __future__ import annotations

import torch

NAMES = ("gate", "up", "down")


def lowrank_fits(lora: dict[str, torch.Tensor], layers: int, neurons: int, hidden: int) -> bool:
    """Whether ``lora`` ("gate.a", "gate.b", ...) has one consistent rank and these sizes."""
    if not lora:
        return True
    want_out = {"gate": neurons, "up": neurons, "down": hidden}
    want_in = {"gate": hidden, "up": hidden, "down": neurons}
    ranks = set()
    for name in NAMES:
        a, b = lora.get(f"{name}.a"), lora.get(f"{name}.b")
        if a is None or b is None or a.dim() != 3 or b.dim() != 3:
            return False
        if len(a) != layers or len(b) != layers or a.shape[1] != want_out[name]:
            return False
        if b.shape[2] != want_in[name] or a.shape[2] != b.shape[1]:
            return False
        ranks.add(a.shape[2])
    return len(ranks) == 1 and len(lora) == 2 * len(NAMES)


def delta(lora: dict[str, torch.Tensor], name: str, layer: int) -> torch.Tensor:
    """The dense-order delta [out, in] of ``name`` in ``layer`` (float32)."""
    return lora[f"{name}.a"][layer].float() @ lora[f"{name}.b"][layer].float()


def effective_ffn(
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    shared: torch.Tensor,
    shared_down: torch.Tensor | None,
    lora: dict[str, torch.Tensor],
    layer: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate, up, down) of one layer in dense order with the shared neurons' refitted
    down-projection (``shared_down`` [H, S] for the neuron ids ``shared`` [S]) written in and
    the low-rank deltas added; the base dtype is kept."""
    gate, up, down = weights
    if shared_down is not None:
        down = down.clone()
        down[:, shared] = shared_down.to(down.dtype)
    if not lora:
        return gate, up, down
    return tuple(  # type: ignore[return-value]
        (w.float() + delta(lora, n, layer)).to(w.dtype)
        for w, n in zip((gate, up, down), NAMES, strict=True)
    )
