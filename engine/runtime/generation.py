"""The prefill/decode loop as a generator of events, and the teacher-forced scoring pass.

``stream_generation`` prefills the prompt into a transformers ``DynamicCache``, then picks one
token at a time, yielding ``TokenReceived`` per token and ``GenerationFinished`` at the end. It
stops on EOS, ``max_new_tokens``, a stop string (never part of the text) or the cancel flag
(checked between tokens). After every forward it tells the offload controller how many tokens
the step processed (``end_step``). It knows nothing about threads or the UI.

Legend: ``T`` tokens in a forward, ``V`` vocabulary size.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import torch
from transformers import DynamicCache

from engine.config import GenerateRequest
from engine.errors import CancelledError, InvalidRequestError
from engine.events import (
    FLUSH_TOKEN_ID,
    Event,
    GenerationFinished,
    StatsSnapshot,
    TokenReceived,
)
from engine.runtime.detokenize import IncrementalDecoder, StopStringFilter
from engine.runtime.prompts import PreparedPrompt, prepare_prompt
from engine.runtime.sampling import Sampler

Reason = Literal["stop", "length", "cancelled", "stop_string"]
SCORE_CHUNK = 512


class OffloadLike(Protocol):
    def stats(self) -> StatsSnapshot: ...

    def end_step(self, num_tokens: int) -> None: ...


class LoadedLike(Protocol):
    """What the loop needs of ``engine.runtime.loading.LoadedModel``."""

    model: Any
    tokenizer: Any
    offload: Any
    device: torch.device


def _never() -> bool:
    return False


def _nothing() -> None:
    return None


def eos_token_ids(loaded: LoadedLike) -> frozenset[int]:
    """End-of-sequence ids from the tokenizer and the model's generation config."""
    ids: set[int] = set()
    for value in (
        loaded.tokenizer.eos_token_id,
        getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def forward(
    loaded: LoadedLike, ids: Sequence[int], cache: DynamicCache | None, last_only: bool
) -> torch.Tensor:
    """Run the model on ``ids`` after ``cache``; fp32 logits ``[T, V]`` (one row if last_only)."""
    input_ids = torch.tensor([list(ids)], dtype=torch.long, device=loaded.device)  # [1, T]
    extra = {"logits_to_keep": 1} if last_only else {}
    with torch.inference_mode():
        output = loaded.model(
            input_ids=input_ids, past_key_values=cache, use_cache=cache is not None, **extra
        )
    loaded.offload.end_step(len(ids))
    return output.logits[0].float()  # [T, V]


@dataclass
class Clock:
    """Time to first token and decode speed of one generation."""

    start: float = field(default_factory=time.perf_counter)
    first: float | None = None
    last: float = 0.0
    tokens: int = 0

    def tick(self) -> None:
        now = time.perf_counter()
        self.first = now if self.first is None else self.first
        self.last = now
        self.tokens += 1

    @property
    def time_to_first_token(self) -> float:
        return 0.0 if self.first is None else self.first - self.start

    @property
    def tokens_per_second(self) -> float:
        if self.first is None:
            return 0.0
        if self.tokens >= 2 and self.last > self.first:
            return (self.tokens - 1) / (self.last - self.first)
        return self.tokens / max(self.last - self.start, 1e-9)

    def stamp(self, stats: StatsSnapshot) -> StatsSnapshot:
        return replace(
            stats,
            tokens_per_second=self.tokens_per_second,
            time_to_first_token_s=self.time_to_first_token,
        )


class TextAssembler:
    """Token ids in, releasable text out: incremental decoding followed by the stop filter."""

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        self.decoder = IncrementalDecoder(tokenizer)
        self.filter = StopStringFilter(stops)
        self.text = ""

    def push(self, token_id: int) -> tuple[str, bool]:
        out, stopped = self.filter.feed(self.decoder.push(token_id))
        self.text += out
        return out, stopped

    def finish(self) -> str:
        out, _stopped = self.filter.feed(self.decoder.flush())
        out += self.filter.flush()
        self.text += out
        return out


@dataclass
class Run:
    """Mutable state of one generation."""

    prompt: PreparedPrompt
    sampler: Sampler
    text: TextAssembler
    eos: frozenset[int]
    clock: Clock
    generated: list[int] = field(default_factory=list)
    reason: Reason = "length"


def _start_run(loaded: LoadedLike, request: GenerateRequest, context_length: int) -> Run:
    clock = Clock()
    prompt = prepare_prompt(loaded.tokenizer, request, context_length)
    return Run(
        prompt=prompt,
        sampler=Sampler(request.sampling),
        text=TextAssembler(loaded.tokenizer, request.sampling.stop),
        eos=eos_token_ids(loaded),
        clock=clock,
    )


def _decode_tokens(
    loaded: LoadedLike,
    run: Run,
    max_new_tokens: int,
    cancelled: Callable[[], bool],
    between_tokens: Callable[[], None],
) -> Iterator[TokenReceived]:
    """The token loop; sets ``run.reason`` when it ends."""
    cache = DynamicCache(config=loaded.model.config)
    logits = forward(loaded, run.prompt.ids, cache, last_only=True)[-1]  # [V]
    while True:
        if cancelled():
            run.reason = "cancelled"
            return
        token = run.sampler.pick(logits, run.prompt.ids + tuple(run.generated))
        run.clock.tick()
        if token in run.eos:
            run.reason = "stop"
            return
        run.generated.append(token)
        text, stopped = run.text.push(token)
        yield TokenReceived(text, token)
        if stopped or len(run.generated) >= max_new_tokens:
            run.reason = "stop_string" if stopped else "length"
            return
        between_tokens()
        logits = forward(loaded, [token], cache, last_only=True)[-1]  # [V]


def stream_generation(
    loaded: LoadedLike,
    request: GenerateRequest,
    context_length: int,
    cancelled: Callable[[], bool] = _never,
    between_tokens: Callable[[], None] = _nothing,
) -> Iterator[Event]:
    """Yield ``TokenReceived`` per token, then one ``GenerationFinished``."""
    run = _start_run(loaded, request, context_length)
    if cancelled():
        run.reason = "cancelled"
    else:
        max_new = request.sampling.max_new_tokens
        yield from _decode_tokens(loaded, run, max_new, cancelled, between_tokens)
    tail = run.text.finish() if run.reason != "stop_string" else ""
    if tail:
        yield TokenReceived(tail, FLUSH_TOKEN_ID)
    yield GenerationFinished(
        text=run.text.text,
        token_ids=tuple(run.generated),
        reason=run.reason,
        stats=run.clock.stamp(loaded.offload.stats()),
        prompt_tokens=len(run.prompt.ids),
        dropped_messages=run.prompt.dropped_messages,
    )


@dataclass(frozen=True)
class ScoreResult:
    """Teacher-forced pass: ``nll[t]`` is -log p(ids[t+1] | ids[:t+1]); logits ``[T, V]`` fp32."""

    input_ids: tuple[int, ...]
    nll: torch.Tensor  # [T-1] fp32
    logits: torch.Tensor | None  # [T, V] fp32 on the CPU, when asked for

    @property
    def mean_nll(self) -> float:
        return float(self.nll.mean()) if self.nll.numel() else 0.0

    @property
    def perplexity(self) -> float:
        return float(torch.exp(torch.tensor(self.mean_nll)))


def _chunk_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL of ``targets [t]`` under the first ``t`` rows of ``logits [T, V]``."""
    log_probs = torch.log_softmax(logits[: targets.numel()], dim=-1)  # [t, V]
    return -log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)  # [t]


def score_tokens(
    loaded: LoadedLike,
    ids: Sequence[int],
    keep_logits: bool = False,
    chunk_size: int = SCORE_CHUNK,
    cancelled: Callable[[], bool] = _never,
) -> ScoreResult:
    """Teacher-forced forward over ``ids`` in chunks (KV cache between them)."""
    if len(ids) < 2:
        raise InvalidRequestError("scoring needs at least two tokens of text")
    all_ids = torch.tensor(list(ids), dtype=torch.long)  # [T]
    cache = DynamicCache(config=loaded.model.config)
    nll: list[torch.Tensor] = []
    kept: list[torch.Tensor] = []
    for start in range(0, len(ids), chunk_size):
        if cancelled():
            raise CancelledError("scoring was cancelled")
        chunk = list(ids[start : start + chunk_size])
        logits = forward(loaded, chunk, cache, last_only=False)  # [t, V]
        targets = all_ids[start + 1 : start + 1 + len(chunk)].to(logits.device)  # [<=t]
        nll.append(_chunk_nll(logits, targets).cpu())
        if keep_logits:
            kept.append(logits.cpu())
    return ScoreResult(tuple(ids), torch.cat(nll), torch.cat(kept) if keep_logits else None)
