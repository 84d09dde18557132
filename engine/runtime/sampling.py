"""Turning one step's logits into the next token: penalty, temperature, top-k, top-p, draw.

Pure tensor functions plus a small ``Sampler`` that holds the seeded generator. Greedy picks the
arg-max after the repetition penalty (temperature, top-k and top-p do not apply to it). Nothing
here knows about models, caches or events.

Legend: ``V`` vocabulary size, ``N`` previous tokens.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from engine.config import SamplingConfig


def apply_repetition_penalty(
    logits: torch.Tensor, previous_ids: Sequence[int], penalty: float
) -> torch.Tensor:
    """Penalise tokens seen before (CTRL rule, as transformers does): positive / p, negative * p."""
    if penalty == 1.0 or not previous_ids:
        return logits
    ids = torch.tensor(sorted(set(previous_ids)), dtype=torch.long, device=logits.device)  # [N]
    seen = logits[ids]  # [N]
    penalised = torch.where(seen > 0, seen / penalty, seen * penalty)  # [N]
    out = logits.clone()  # [V]
    out[ids] = penalised
    return out


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits (ties at the threshold kept), the rest to -inf. 0 disables."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    threshold = torch.topk(logits, k).values[-1]  # scalar
    return logits.masked_fill(logits < threshold, float("-inf"))  # [V]


def top_p_mask(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``p`` (nucleus)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)  # [V], [V]
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)  # [V]
    drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= p  # mass before token >= p
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)  # [V]
    return logits.masked_fill(drop, float("-inf"))


def sampling_logits(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p, on fp32 logits ``[V]`` (penalty already applied)."""
    scaled = logits / config.temperature  # [V]
    return top_p_mask(top_k_mask(scaled, config.top_k), config.top_p)


class Sampler:
    """Picks tokens for one generation; the same seed gives the same tokens for the same logits."""

    def __init__(self, config: SamplingConfig) -> None:
        self.config = config
        seed = config.seed if config.seed is not None else random.randrange(2**63)
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    @property
    def is_greedy(self) -> bool:
        return self.config.greedy or self.config.temperature == 0.0

    def pick(self, logits: torch.Tensor, previous_ids: Sequence[int]) -> int:
        """Next token from one position's logits ``[V]`` given the ids seen so far."""
        scores = logits.detach().float()  # [V], on the model's device
        scores = apply_repetition_penalty(scores, previous_ids, self.config.repetition_penalty)
        if self.is_greedy:
            return int(torch.argmax(scores))
        probs = torch.softmax(sampling_logits(scores, self.config), dim=-1).cpu()  # [V]
        return int(torch.multinomial(probs, 1, generator=self.generator))
