"""Real text in, each layer's FFN input out: what partitioning and router training learn from.

Text comes from the project's corpus split (``engine.training.corpus``): a fixed number of
tokens per domain, taken from the start of each domain's rows (chats through the chat
template). The dense model runs over windows of it; a forward pre-hook on every layer's MLP
keeps its input (the post-attention RMSNorm output) as float16.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from engine.training.corpus import DOMAINS, read_jsonl

WINDOW = 512


def domain_tokens(path: Path, tokenizer: Any, budget: int) -> torch.Tensor:
    """The first ``budget`` tokens of one split file, items separated by the pad token."""
    ids: list[int] = []
    for row in read_jsonl(path):
        if "messages" in row:
            text = str(tokenizer.apply_chat_template(row["messages"], tokenize=False))
        else:
            text = str(row["text"])
        ids.extend(tokenizer(text[: budget * 8])["input_ids"])
        ids.append(tokenizer.pad_token_id)
        if len(ids) >= budget:
            break
    return torch.tensor(ids[:budget], dtype=torch.long)  # [<= budget]


def calibration_streams(folder: Path, tokenizer: Any, per_domain: int) -> dict[str, torch.Tensor]:
    """Token streams per domain of a split folder, ``per_domain`` tokens each at most."""
    return {d: domain_tokens(folder / f"{d}.jsonl", tokenizer, per_domain) for d in DOMAINS}


def windows(stream: torch.Tensor, size: int = WINDOW) -> list[torch.Tensor]:
    """``stream`` cut into consecutive windows of at most ``size`` tokens (none shorter than 2)."""
    return [stream[i : i + size] for i in range(0, len(stream), size) if len(stream[i:]) >= 2]


@torch.no_grad()
def ffn_inputs(model: Any, streams: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, the FFN inputs ([N, H] float16) of the dense model over all ``streams``."""
    layers = model.model.layers
    kept: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [
        layer.mlp.register_forward_pre_hook(
            lambda _m, args, i=i: kept[i].append(args[0][0].to(torch.float16))
        )
        for i, layer in enumerate(layers)
    ]
    try:
        for stream in streams.values():
            for window in windows(stream):
                model(input_ids=window.unsqueeze(0))
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(chunks) for chunks in kept]
