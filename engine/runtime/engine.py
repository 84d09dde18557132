"""``Engine``: the facade the app talks to, implementing ``engine.protocol.EngineAPI``.

Every call returns at once with a ``Job``; the work runs on the engine's own long-lived thread
(``worker.EngineThread``), which alone touches the model. Events reach ``on_event`` on that
thread. Live options and stats resets requested from other threads wait in ``PendingChanges``
and are applied between two tokens (or before the next job). ``stats()`` returns the last
snapshot the engine thread published, so any thread may call it.

Loading a new model first unloads the current one (its memory is needed); a cancelled or failed
load therefore leaves no model loaded, and the engine ready for the next request.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path

from engine.config import GenerateRequest, LiveOptions, LoadConfig
from engine.errors import CancelledError, InvalidRequestError, SubstitutionUnsupportedError
from engine.events import (
    EngineFailed,
    GenerationFinished,
    LoadFinished,
    LoadProgressed,
    MemoryEstimate,
    ModelInfo,
    StatsSnapshot,
)
from engine.protocol import EventSink, Job
from engine.runtime import loading
from engine.runtime.session import ModelSession, estimate_for
from engine.runtime.worker import EngineThread

SessionOpener = Callable[..., ModelSession]


class PendingChanges:
    """Live options and a stats reset asked for from any thread, taken by the engine thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: LiveOptions | None = None
        self._reset = False

    def set_live(self, live: LiveOptions | None) -> None:
        with self._lock:
            self._live = live

    def request_reset(self) -> None:
        with self._lock:
            self._reset = True

    def take(self) -> tuple[LiveOptions | None, bool]:
        with self._lock:
            taken = (self._live, self._reset)
            self._live, self._reset = None, False
        return taken


class StatsBox:
    """The last published ``StatsSnapshot``, readable from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshot = StatsSnapshot()

    def publish(self, snapshot: StatsSnapshot) -> None:
        with self._lock:
            self._snapshot = snapshot

    def get(self) -> StatsSnapshot:
        with self._lock:
            return self._snapshot


def _failure_reporter(on_event: EventSink) -> Callable[[BaseException], None]:
    def report(error: BaseException) -> None:
        on_event(EngineFailed(type(error).__name__, str(error) or type(error).__name__))

    return report


class Engine:
    """Offloaded MoE inference on one engine thread. See ``engine.protocol.EngineAPI``."""

    def __init__(self, open_session: SessionOpener = ModelSession.open) -> None:
        self._open_session = open_session
        self._session: ModelSession | None = None  # only the engine thread changes it
        self._pending = PendingChanges()
        self._stats = StatsBox()
        self._saved_live: LiveOptions | None = None  # while a request's own live options run
        self._thread = EngineThread()

    # ------------------------------------------------------------ asked from any thread

    def inspect(self, model_dir: Path) -> Job[ModelInfo]:
        return self._thread.submit(lambda: loading.inspect_model(Path(model_dir)), "inspecting")

    def estimate(self, config: LoadConfig) -> Job[MemoryEstimate]:
        return self._thread.submit(lambda: estimate_for(config)[1], "estimating memory")

    def load(self, config: LoadConfig, on_event: EventSink) -> Job[ModelInfo]:
        job: Job[ModelInfo] = Job()
        work = partial(self._load, config, on_event, job)
        return self._thread.submit(work, "loading the model", _failure_reporter(on_event), job)

    def generate(self, request: GenerateRequest, on_event: EventSink) -> Job[GenerationFinished]:
        job: Job[GenerationFinished] = Job()
        work = partial(self._generate, request, on_event, job)
        return self._thread.submit(work, "generating", _failure_reporter(on_event), job)

    def set_live_options(self, live: LiveOptions) -> None:
        """Applied before the next token; refused at once if the model cannot substitute."""
        session = self._session
        if session is not None and live.substitution_on and not session.info.substitution_supported:
            raise SubstitutionUnsupportedError(
                f"{session.info.architecture} routes with {session.info.router_family}, "
                "where the engine does not substitute experts; use alpha 0."
            )
        self._pending.set_live(live)
        self._thread.submit(self._apply_pending, "changing live options")

    def stats(self) -> StatsSnapshot:
        return self._stats.get()

    def reset_stats(self) -> None:
        self._pending.request_reset()
        self._stats.publish(StatsSnapshot())
        self._thread.submit(self._apply_pending, "resetting stats")

    def render_chat(self, request: GenerateRequest) -> Job[str]:
        return self._thread.submit(lambda: self._require().render_chat(request), "rendering")

    def unload(self) -> Job[None]:
        return self._thread.submit(self._close_session, "unloading")

    def shutdown(self) -> None:
        """Cancel what runs, unload, and end the thread (the engine is unusable after)."""
        self._thread.submit(self._close_session, "unloading")
        self._thread.stop()

    @property
    def thread_alive(self) -> bool:
        return self._thread.alive

    # ------------------------------------------------------------ on the engine thread

    def _require(self) -> ModelSession:
        if self._session is None:
            raise InvalidRequestError("No model is loaded: load one first.")
        return self._session

    def _load(self, config: LoadConfig, on_event: EventSink, job: Job[ModelInfo]) -> ModelInfo:
        if job.cancel_requested:  # cancelled while queued: the loaded model stays
            raise CancelledError("loading was cancelled before it started")
        self._close_session()
        self._pending.set_live(None)

        def progress(fraction: float, message: str) -> None:
            on_event(LoadProgressed(fraction, message))

        session = self._open_session(config, progress, lambda: job.cancel_requested)
        self._session = session
        self._publish_stats()
        on_event(LoadFinished(session.info, session.estimate))
        return session.info

    def _generate(
        self, request: GenerateRequest, on_event: EventSink, job: Job[GenerationFinished]
    ) -> GenerationFinished:
        session = self._require()
        self._apply_pending()
        self._override_live(session, request.live)
        finished: GenerationFinished | None = None
        try:
            stream = session.generate_stream(request, lambda: job.cancel_requested, self._between)
            for event in stream:
                on_event(event)
                finished = event if isinstance(event, GenerationFinished) else finished
        finally:
            self._restore_live()
        self._publish_stats()
        assert finished is not None, "a generation stream ends with GenerationFinished"
        return finished

    def _between(self) -> None:
        self._apply_pending()
        self._publish_stats()

    def _override_live(self, session: ModelSession, live: LiveOptions | None) -> None:
        """A request's own live options, the engine's kept to restore after it."""
        if live is None:
            return
        if live.substitution_on and not session.info.substitution_supported:
            raise InvalidRequestError(
                f"{session.info.architecture} does not substitute experts; use alpha 0."
            )
        self._saved_live = session.config.live
        session.set_live_options(live)

    def _restore_live(self) -> None:
        saved, self._saved_live = self._saved_live, None
        if saved is not None and self._session is not None:
            self._session.set_live_options(saved)

    def _apply_pending(self) -> None:
        live, reset = self._pending.take()
        if self._session is None:
            return
        if live is not None and self._saved_live is not None:
            self._saved_live = live  # a request overrides now: the change applies after it
        elif live is not None:
            self._session.set_live_options(live)
        if reset:
            self._session.reset_stats()
            self._publish_stats()

    def _publish_stats(self) -> None:
        if self._session is not None:
            self._stats.publish(self._session.stats())

    def _close_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.close()
        self._stats.publish(StatsSnapshot())
