"""The contract between the engine facade and its callers (the app, tests, fakes).

``EngineAPI`` is what ``engine.runtime.engine.Engine`` implements on its own long-lived
thread, and what the app's fake engine implements for UI tests. Calls never block the
caller: each returns a ``Job`` whose events arrive through ``on_event`` *on the engine
thread* (callers marshal them to their own thread) and whose result is a future.
No torch here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from engine.config import GenerateRequest, LiveOptions, LoadConfig
from engine.events import Event, GenerationFinished, MemoryEstimate, ModelInfo, StatsSnapshot

ResultT = TypeVar("ResultT")
EventSink = Callable[[Event], None]


class Job(Generic[ResultT]):
    """A piece of engine work: a future for the result plus a cooperative cancel flag."""

    def __init__(self) -> None:
        self.future: Future[ResultT] = Future()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Ask the work to stop at its next check (between tokens, between tensors)."""
        self._cancelled.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancelled.is_set()

    def result(self, timeout: float | None = None) -> ResultT:
        return self.future.result(timeout)

    def done(self) -> bool:
        return self.future.done()


class EngineAPI(Protocol):
    """What the app may ask of an engine."""

    def inspect(self, model_dir: Path) -> Job[ModelInfo]: ...

    def estimate(self, config: LoadConfig) -> Job[MemoryEstimate]: ...

    def load(self, config: LoadConfig, on_event: EventSink) -> Job[ModelInfo]:
        """Emit ``LoadProgressed`` then ``LoadFinished``; cancel raises ``CancelledError``."""
        ...

    def generate(self, request: GenerateRequest, on_event: EventSink) -> Job[GenerationFinished]:
        """Emit ``TokenReceived`` per token then ``GenerationFinished``; cancel stops early."""
        ...

    def set_live_options(self, live: LiveOptions) -> None:
        """Change alpha/policy; applied before the next token, no reload."""
        ...

    def stats(self) -> StatsSnapshot:
        """Thread-safe snapshot of the counters (cheap, callable from any thread)."""
        ...

    def reset_stats(self) -> None: ...

    def render_chat(self, request: GenerateRequest) -> Job[str]:
        """Render the chat template to text (for the settings dialog's template preview)."""
        ...

    def unload(self) -> Job[None]: ...

    def shutdown(self) -> None: ...


def run_job(job: Job[Any], work: Callable[[], Any]) -> None:
    """Run ``work`` and settle ``job`` with its result or exception (used by engine threads)."""
    try:
        job.future.set_result(work())
    except BaseException as error:  # settled into the future; the thread lives on
        job.future.set_exception(error)
