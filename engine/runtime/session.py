"""One loaded model and everything done with it, synchronously.

``ModelSession.open`` inspects the folder, estimates memory, refuses what does not fit (unless
forced) and loads. The session then generates (a stream of events), scores text, renders chat
templates and reports stats. It has no thread of its own: the engine thread and the CLI drive it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from engine.config import GenerateRequest, LiveOptions, LoadConfig
from engine.errors import InvalidRequestError
from engine.events import Event, GenerationFinished, MemoryEstimate, ModelInfo, StatsSnapshot
from engine.runtime import loading
from engine.runtime.generation import ScoreResult, score_tokens, stream_generation
from engine.runtime.memory import check_fits, estimate_memory
from engine.runtime.prompts import render_chat

Progress = Callable[[float, str], None]
Loader = Callable[[LoadConfig, Progress, Callable[[], bool]], Any]


def _never() -> bool:
    return False


def _nothing() -> None:
    return None


def _no_progress(fraction: float, message: str) -> None:
    return None


def estimate_for(config: LoadConfig) -> tuple[ModelInfo, MemoryEstimate]:
    """Inspect the folder and estimate the load ``config`` describes (reads no weight)."""
    info = loading.inspect_model(config.model_dir)
    return info, estimate_memory(info, config)


class ModelSession:
    """A loaded model (``loading.LoadedModel``) with its load config and memory estimate."""

    def __init__(self, loaded: Any, config: LoadConfig, estimate: MemoryEstimate) -> None:
        self.loaded = loaded
        self.config = config
        self.estimate = estimate
        self._speed = StatsSnapshot()

    @classmethod
    def open(
        cls,
        config: LoadConfig,
        progress: Progress = _no_progress,
        cancelled: Callable[[], bool] = _never,
        loader: Loader | None = None,
    ) -> ModelSession:
        """Inspect, estimate, check the estimate fits (unless ``config.force``), then load."""
        _info, estimate = estimate_for(config)
        check_fits(estimate, config.force)
        loaded = (loader or loading.load_model)(config, progress, cancelled)
        return cls(loaded, config, estimate)

    @property
    def info(self) -> ModelInfo:
        info: ModelInfo = self.loaded.info
        return info

    def generate_stream(
        self,
        request: GenerateRequest,
        cancelled: Callable[[], bool] = _never,
        between_tokens: Callable[[], None] = _nothing,
    ) -> Iterator[Event]:
        """``TokenReceived`` per token, then ``GenerationFinished`` (its speed is remembered)."""
        length = self.config.context_length
        for event in stream_generation(self.loaded, request, length, cancelled, between_tokens):
            if isinstance(event, GenerationFinished):
                self._speed = event.stats
            yield event

    def render_chat(self, request: GenerateRequest) -> str:
        """The prompt text a chat request becomes (raw prompts come back unchanged)."""
        if request.prompt is not None:
            return request.prompt
        return render_chat(self.loaded.tokenizer, request.messages, request.chat_template)

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text as the model would read it (with its usual BOS)."""
        if not text.strip():
            raise InvalidRequestError("the text to score is empty")
        return list(self.loaded.tokenizer(text)["input_ids"])

    def score(
        self, ids: Sequence[int], keep_logits: bool = False, cancelled: Callable[[], bool] = _never
    ) -> ScoreResult:
        """Teacher-forced pass over ``ids`` (at most the context length)."""
        if len(ids) > self.config.context_length:
            raise InvalidRequestError(
                f"{len(ids)} tokens exceed the context length {self.config.context_length}"
            )
        return score_tokens(self.loaded, ids, keep_logits=keep_logits, cancelled=cancelled)

    def stats(self) -> StatsSnapshot:
        """The offload counters plus the speed of the last generation."""
        return replace(
            self.loaded.offload.stats(),
            tokens_per_second=self._speed.tokens_per_second,
            time_to_first_token_s=self._speed.time_to_first_token_s,
        )

    def reset_stats(self) -> None:
        self.loaded.offload.reset_stats()
        self._speed = StatsSnapshot()

    def set_live_options(self, live: LiveOptions) -> None:
        """Switch policy/alpha for the next token; the load config remembers it."""
        self.loaded.offload.set_live_options(live)
        self.config = self.config.with_live(live)

    def close(self) -> None:
        """Release the offload machinery and drop the model."""
        self.loaded.offload.close()
        self.loaded = None
