"""Server requests take turns on the one engine, and each turn's events reach asyncio.

``EngineGate`` lets one server generation at a time reach the engine and counts who waits
(the visible queue); the app's own chat, which submits to the same engine thread, runs between
two server turns. ``Generation`` wraps one engine job: events from the engine thread are handed
to the server's loop with ``call_soon_threadsafe``; ``cancel`` sets the job's flag, which the
engine checks between tokens. Tokens are counted as they leave the engine, so the tokens made
after the server saw a client go (the aim: at most one) are counted too and shown in the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from typing import Any

from engine.config import GenerateRequest
from engine.events import FLUSH_TOKEN_ID, Event, GenerationFinished, StatsSnapshot, TokenReceived
from engine.protocol import EngineAPI, Job

_DONE = object()
COUNTERS = ("tokens", "hits", "misses", "substitutions", "cpu_computed", "transfers")


@dataclass(frozen=True)
class QueueState:
    running: int
    waiting: int
    served: int
    cancelled: int
    after_cancel_total: int  # tokens made after a cancel was asked, over all cancels
    after_cancel_max: int  # the most after any one cancel (the aim: at most one)


class EngineGate:
    """One server generation on the engine at a time, in arrival order."""

    def __init__(self, engine: EngineAPI) -> None:
        self.engine = engine
        self._lock = asyncio.Lock()
        self._counts = dict.fromkeys(
            ("running", "waiting", "served", "cancelled", "after_cancel_total", "after_cancel_max"),
            0,
        )
        self._guard = threading.Lock()  # the app reads the counts from the UI thread

    def _add(self, name: str, step: int) -> None:
        with self._guard:
            self._counts[name] += step

    def state(self) -> QueueState:
        with self._guard:
            return QueueState(**self._counts)

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Wait for the engine, then hold it for one generation."""
        self._add("waiting", 1)
        try:
            await self._lock.acquire()
        finally:
            self._add("waiting", -1)
        self._add("running", 1)
        try:
            yield
        finally:
            self._add("running", -1)
            self._add("served", 1)
            self._lock.release()

    def count_cancel(self, made_after: int) -> None:
        """A cancelled generation has ended, ``made_after`` tokens after its cancel."""
        with self._guard:
            self._counts["cancelled"] += 1
            self._counts["after_cancel_total"] += made_after
            self._counts["after_cancel_max"] = max(self._counts["after_cancel_max"], made_after)


class Generation:
    """One engine job's events as an async iterator; the job's error is raised at the end."""

    def __init__(self, engine: EngineAPI, request: GenerateRequest) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.before = engine.stats()
        self.made = 0  # tokens out of the engine so far, counted on the engine thread
        self.made_at_cancel: int | None = None
        self.job: Job[GenerationFinished] = engine.generate(request, self._post)
        self.job.future.add_done_callback(lambda _future: self._post(_DONE))

    def _post(self, item: object) -> None:
        if isinstance(item, TokenReceived) and item.token_id != FLUSH_TOKEN_ID:
            self.made += 1
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody listens any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def events(self) -> AsyncIterator[Event]:
        while (item := await self.queue.get()) is not _DONE:
            yield item
        self.job.future.result()  # settled by now: raises the engine's error, if any

    def cancel(self) -> None:
        self.made_at_cancel = self.made
        self.job.cancel()

    @property
    def made_after_cancel(self) -> int:
        """Tokens the engine made after ``cancel`` (0 when not cancelled)."""
        return 0 if self.made_at_cancel is None else self.made - self.made_at_cancel


def stats_delta(before: StatsSnapshot, after: StatsSnapshot) -> StatsSnapshot:
    """The counters one request added (``after`` alone when the counters were reset meanwhile)."""
    if after.tokens < before.tokens:
        return after
    values = {name: getattr(after, name) - getattr(before, name) for name in COUNTERS}
    values["bytes_moved"] = after.bytes_moved - before.bytes_moved
    kept = {f.name for f in fields(StatsSnapshot)} - set(values) - {"per_layer"}
    return StatsSnapshot(**values, **{name: getattr(after, name) for name in kept})
