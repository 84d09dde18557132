"""A scripted ``EngineAPI`` for server tests: it answers ``reply <words of the last message>``.

No model runs. Each word is one token, produced on the engine's one thread after
``token_delay`` seconds, with the cancel flag checked between tokens like the real engine.
It records what a test needs to assert: the order generations ran in, tokens produced after a
cancel was requested, and the live options each request carried.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from engine.config import GenerateRequest, LiveOptions
from engine.events import GenerationFinished, StatsSnapshot, TokenReceived
from engine.protocol import EventSink, Job, run_job


def reply_words(request: GenerateRequest) -> list[str]:
    source = request.prompt if request.prompt is not None else request.messages[-1].content
    return ["reply", *source.split()]


@dataclass
class EchoRecord:
    started: list[str] = field(default_factory=list)  # the last message of each generation
    after_cancel: list[int] = field(default_factory=list)  # tokens made once cancel was asked
    live: list[LiveOptions | None] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)  # the finish reasons
    token_times: list[float] = field(default_factory=list)  # time.monotonic() of every token


class EchoEngine:
    """Scripted replies on one thread; see the module docstring."""

    def __init__(self, token_delay: float = 0.0, repeat: int = 1) -> None:
        self.token_delay = token_delay
        self.repeat = repeat  # the reply's words repeated this many times
        self.record = EchoRecord()
        self.live = LiveOptions()
        self._stats = StatsSnapshot()
        self._lock = threading.Lock()
        self._jobs: queue.Queue[tuple[Job[Any], Callable[[], Any]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="echo-engine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            run_job(*item)
            del item  # like the real engine, keep nothing of a finished job while waiting

    def generate(self, request: GenerateRequest, on_event: EventSink) -> Job[GenerationFinished]:
        job: Job[GenerationFinished] = Job()
        self._jobs.put((job, lambda: self._generate(job, request, on_event)))
        return job

    def _generate(
        self, job: Job[Any], request: GenerateRequest, on_event: EventSink
    ) -> GenerationFinished:
        words = reply_words(request) * self.repeat
        words = words[: request.sampling.max_new_tokens]
        self.record.started.append(words[-1] if words else "")
        self.record.live.append(request.live)
        text, ids, after_cancel = "", [], 0
        for index, word in enumerate(words):
            if job.cancel_requested:
                break
            time.sleep(self.token_delay)
            piece = word if index == 0 else f" {word}"
            text += piece
            ids.append(index)
            after_cancel += job.cancel_requested
            self._count()
            self.record.token_times.append(time.monotonic())
            on_event(TokenReceived(piece, index))
        self.record.after_cancel.append(after_cancel)
        reason = self._reason(job, len(ids), request.sampling.max_new_tokens)
        self.record.finished.append(reason)
        finished = GenerationFinished(text, tuple(ids), reason, self.stats(), prompt_tokens=3)
        on_event(finished)
        return finished

    @staticmethod
    def _reason(job: Job[Any], made: int, limit: int) -> Literal["stop", "length", "cancelled"]:
        if job.cancel_requested:
            return "cancelled"
        return "length" if made >= limit else "stop"

    def _count(self) -> None:
        with self._lock:
            s = self._stats
            self._stats = StatsSnapshot(
                tokens=s.tokens + 1,
                hits=s.hits + 3,
                misses=s.misses + 1,
                bytes_moved=s.bytes_moved + 100,
            )

    def stats(self) -> StatsSnapshot:
        with self._lock:
            return self._stats

    def set_live_options(self, live: LiveOptions) -> None:
        self.live = live

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = StatsSnapshot()

    def shutdown(self) -> None:
        self._jobs.put(None)
        self._thread.join(5)
