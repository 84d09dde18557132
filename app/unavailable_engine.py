"""An engine stand-in used when the real engine cannot start: every job fails with a clear
``ModelLoadError`` so the window opens and shows why, instead of crashing at launch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.config import GenerateRequest, LiveOptions, LoadConfig
from engine.errors import ModelLoadError
from engine.events import GenerationFinished, MemoryEstimate, ModelInfo, StatsSnapshot
from engine.protocol import EventSink, Job


class UnavailableEngine:
    def __init__(self, reason: str) -> None:
        self.reason = reason

    def _failed(self) -> Job[Any]:
        job: Job[Any] = Job()
        job.future.set_exception(
            ModelLoadError(f"The Understudy engine could not be started: {self.reason}.")
        )
        return job

    def inspect(self, model_dir: Path) -> Job[ModelInfo]:
        return self._failed()

    def estimate(self, config: LoadConfig) -> Job[MemoryEstimate]:
        return self._failed()

    def load(self, config: LoadConfig, on_event: EventSink) -> Job[ModelInfo]:
        return self._failed()

    def generate(self, request: GenerateRequest, on_event: EventSink) -> Job[GenerationFinished]:
        return self._failed()

    def set_live_options(self, live: LiveOptions) -> None:
        return None

    def stats(self) -> StatsSnapshot:
        return StatsSnapshot()

    def reset_stats(self) -> None:
        return None

    def render_chat(self, request: GenerateRequest) -> Job[str]:
        return self._failed()

    def unload(self) -> Job[None]:
        return self._failed()

    def shutdown(self) -> None:
        return None
