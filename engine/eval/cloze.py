"""Cloze items from a plain text: which of four sentences really comes next?

An item is a context (the sentences just before position ``i``), the true sentence ``i`` and
three distractors drawn from elsewhere in the same text (at least ``min_distance`` sentences
away, and of similar length so that a sum of log-probabilities does not simply favour the
shortest). The choices are shuffled; everything is deterministic for a given seed. A model
answers by the log-likelihood of each continuation given the context (the fidelity harness
subtracts its likelihood after a neutral context, so sentences that are easy on their own do
not win); this module only builds items and grades answers, it never runs a model.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from engine.errors import InvalidRequestError

NUM_CHOICES = 4
_ABBREVIATIONS = (
    r"(?<!\bMr\.)(?<!\bMrs\.)(?<!\bMs\.)(?<!\bDr\.)(?<!\bSt\.)(?<!\be\.g\.)(?<!\bi\.e\.)"
)
_SENTENCE_END = re.compile(_ABBREVIATIONS + r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?![a-z])")


@dataclass(frozen=True)
class ClozeItem:
    context: str
    choices: tuple[str, ...]
    answer: int  # index of the true continuation in ``choices``


@dataclass(frozen=True)
class ClozeSettings:
    """How items are drawn: sentence length bounds, context size, spacing, count, seed."""

    num_items: int = 40
    context_sentences: int = 2
    min_words: int = 4
    max_words: int = 40
    min_distance: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_items < 1:
            raise ValueError(f"num_items must be at least 1; got {self.num_items}")
        if self.context_sentences < 1:
            raise ValueError(f"context_sentences must be >= 1; got {self.context_sentences}")
        if not 1 <= self.min_words <= self.max_words:
            raise ValueError(
                f"need 1 <= min_words <= max_words; got {self.min_words}, {self.max_words}"
            )


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` with whitespace (line breaks included) collapsed to single spaces."""
    flat = " ".join(text.split())
    return [part.strip() for part in _SENTENCE_END.split(flat) if part.strip()]


def _usable(sentence: str, settings: ClozeSettings) -> bool:
    return settings.min_words <= len(sentence.split()) <= settings.max_words


def _distractors(
    sentences: Sequence[str], index: int, settings: ClozeSettings, rng: random.Random
) -> list[str] | None:
    """Three usable sentences far from ``index``, chosen among the closest in length."""
    target = len(sentences[index])
    pool = [
        s
        for j, s in enumerate(sentences)
        if abs(j - index) >= settings.min_distance
        and _usable(s, settings)
        and s != sentences[index]
    ]
    pool = sorted(set(pool), key=lambda s: (abs(len(s) - target), s))[: 4 * NUM_CHOICES]
    if len(pool) < NUM_CHOICES - 1:
        return None
    return rng.sample(pool, NUM_CHOICES - 1)


def _item_at(
    sentences: Sequence[str], index: int, settings: ClozeSettings, rng: random.Random
) -> ClozeItem | None:
    distractors = _distractors(sentences, index, settings, rng)
    if distractors is None:
        return None
    choices = [sentences[index], *distractors]
    rng.shuffle(choices)
    context = " ".join(sentences[index - settings.context_sentences : index])
    return ClozeItem(context, tuple(choices), choices.index(sentences[index]))


def build_items(text: str, settings: ClozeSettings | None = None) -> list[ClozeItem]:
    """Up to ``settings.num_items`` items from ``text``, spread over it, reproducible by seed."""
    settings = settings or ClozeSettings()
    sentences = split_sentences(text)
    candidates = [
        i
        for i in range(settings.context_sentences, len(sentences))
        if _usable(sentences[i], settings)
    ]
    if not candidates:
        raise InvalidRequestError(
            f"the text has too few usable sentences for a cloze ({len(sentences)} sentences; "
            f"need {settings.context_sentences + 1}+ with {settings.min_words}-"
            f"{settings.max_words} words)"
        )
    rng = random.Random(settings.seed)
    picked = sorted(rng.sample(candidates, min(len(candidates), settings.num_items)))
    items = [_item_at(sentences, i, settings, rng) for i in picked]
    found = [item for item in items if item is not None]
    if not found:
        raise InvalidRequestError(
            "the text is too short for a cloze: no sentence has three distractors "
            f"at least {settings.min_distance} sentences away"
        )
    return found


def continuation_logprob(logits: torch.Tensor, continuation_ids: torch.Tensor) -> float:
    """Sum of log P(continuation token) given the logits that predict each of them.

    ``logits`` ``[C, V]``: row ``j`` predicts ``continuation_ids[j]`` (``[C]``).
    """
    if logits.dim() != 2 or logits.shape[0] != continuation_ids.shape[0]:
        raise InvalidRequestError(
            f"need one logits row per continuation token; got {tuple(logits.shape)} "
            f"for {continuation_ids.shape[0]} tokens"
        )
    logp = torch.log_softmax(logits.float(), dim=-1)  # [C, V]
    return float(logp.gather(-1, continuation_ids.long().unsqueeze(-1)).sum())


def pick(scores: Sequence[float]) -> int:
    """Index of the best-scoring choice (the first one on a tie)."""
    if not scores:
        raise InvalidRequestError("no choice scores to pick from")
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def accuracy(items: Sequence[ClozeItem], scorer: Callable[[ClozeItem], Sequence[float]]) -> float:
    """Share of items whose true continuation gets the highest score from ``scorer``."""
    if not items:
        raise InvalidRequestError("no cloze items to grade")
    return sum(pick(scorer(item)) == item.answer for item in items) / len(items)
