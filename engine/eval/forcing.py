"""Teacher-forced runs of a causal LM, one decode step per token, with a KV cache.

Fidelity must be measured where the method acts: in decode, one token at a time, with the
expert cache and substitution in play. So the text is fed token by token (never as one long
prefill), in windows of ``window`` tokens that each start a fresh KV cache; the logits of each
step predict the next true token. A ``StepHook`` is told after every forward how many tokens it
processed (the engine's offload controller counts decode steps this way) and how long it
took. Works on any transformers causal LM; nothing here knows about offloading.
Legend: ``N`` text tokens, ``W`` window, ``V`` vocabulary, ``C`` continuation tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from engine.errors import InvalidRequestError

StepHook = Callable[[int, float], None]  # (tokens processed, seconds taken)


@dataclass
class StepTimes:
    """Wall time of every decode step of a run, grouped by window (a "run" for medians)."""

    windows: list[list[float]] = field(default_factory=list)

    def hook(self, tokens: int, seconds: float) -> None:
        if tokens == 1 and self.windows:
            self.windows[-1].append(seconds)

    def new_window(self) -> None:
        self.windows.append([])

    @property
    def steps(self) -> list[float]:
        return [t for window in self.windows for t in window]


def _device_of(model: torch.nn.Module) -> torch.device:
    for parameter in model.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


def _step(
    model: torch.nn.Module, ids: torch.Tensor, cache: object, hook: StepHook | None
) -> tuple[torch.Tensor, object]:
    """One forward of ``ids`` ``[1, t]``; returns the last position's logits ``[V]`` and cache."""
    start = time.perf_counter()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    logits = out.logits[0, -1].float().cpu()  # [V]
    if hook is not None:
        hook(int(ids.shape[1]), time.perf_counter() - start)
    return logits, out.past_key_values


def check_token_ids(token_ids: torch.Tensor, minimum: int = 2) -> torch.Tensor:
    """Validated 1-D long tensor of at least ``minimum`` ids."""
    if token_ids.dim() != 1:
        raise InvalidRequestError(f"token ids must be 1-D; got shape {tuple(token_ids.shape)}")
    if token_ids.shape[0] < minimum:
        raise InvalidRequestError(
            f"the text is too short: {token_ids.shape[0]} tokens, need at least {minimum}"
        )
    return token_ids.long()


def window_starts(num_tokens: int, window: int) -> list[int]:
    """Starts of windows covering every target once: each window predicts ``window - 1``."""
    if window < 2:
        raise InvalidRequestError(f"the window must be at least 2 tokens; got {window}")
    return list(range(0, num_tokens - 1, window - 1))


@torch.inference_mode()
def stream_window_logits(
    model: torch.nn.Module,
    token_ids: torch.Tensor,
    window: int,
    hook: StepHook | None = None,
    on_window: Callable[[], None] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per window, ``(logits [w-1, V] fp32 on CPU, targets [w-1])``, decoding token by token."""
    token_ids = check_token_ids(token_ids)
    device = _device_of(model)
    for start in window_starts(int(token_ids.shape[0]), window):
        chunk = token_ids[start : start + window]  # [w]
        if on_window is not None:
            on_window()
        cache: object = None
        rows = []
        for position in range(chunk.shape[0] - 1):
            ids = chunk[position : position + 1].view(1, 1).to(device)
            logits, cache = _step(model, ids, cache, hook)
            rows.append(logits)
        yield torch.stack(rows), chunk[1:].clone()  # [w-1, V], [w-1]


def teacher_forced_logits(
    model: torch.nn.Module, token_ids: torch.Tensor, window: int, hook: StepHook | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """All of ``stream_window_logits`` concatenated: ``[N-1, V]`` logits and ``[N-1]`` targets."""
    parts = list(stream_window_logits(model, token_ids, window, hook))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


@torch.inference_mode()
def continuation_logits(
    model: torch.nn.Module,
    context_ids: torch.Tensor,
    continuation_ids: torch.Tensor,
    hook: StepHook | None = None,
) -> torch.Tensor:
    """Logits ``[C, V]`` predicting each continuation token: context prefilled, rest decoded."""
    context_ids = check_token_ids(context_ids, minimum=1)
    continuation_ids = check_token_ids(continuation_ids, minimum=1)
    device = _device_of(model)
    logits, cache = _step(model, context_ids.view(1, -1).to(device), None, hook)
    rows = [logits]
    for token in continuation_ids[:-1]:
        logits, cache = _step(model, token.view(1, 1).to(device), cache, hook)
        rows.append(logits)
    return torch.stack(rows)  # [C, V]
