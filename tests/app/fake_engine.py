"""A fake engine for UI tests: scripted token streams, delays, cancel, OOM injection, load
progress, and a record of every call the app made. Built on the app's demo engine (its own
thread, ``EngineAPI``), with knobs the tests turn."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from app.demo_engine import DemoEngine
from engine.config import GenerateRequest, LiveOptions, LoadConfig
from engine.errors import CancelledError, ModelLoadError, SubstitutionUnsupportedError
from engine.events import ModelInfo
from engine.protocol import EventSink, Job


@dataclass
class Calls:
    live: list[LiveOptions] = field(default_factory=list)
    loads: list[LoadConfig] = field(default_factory=list)
    requests: list[GenerateRequest] = field(default_factory=list)
    inspected: list[Path] = field(default_factory=list)


class FakeEngine(DemoEngine):
    def __init__(self, replies: tuple[str, ...] = ("Hello there!",), **kwargs: Any) -> None:
        kwargs.setdefault("token_delay", 0.005)
        kwargs.setdefault("load_delay", 0.005)
        super().__init__(replies, **kwargs)
        self.calls = Calls()
        self.fail_load: BaseException | None = None  # raised after the first progress event
        self.fail_generate: BaseException | None = None
        self.dropped: int | None = None  # forced GenerationFinished.dropped_messages
        self.release = threading.Event()  # with hold_tokens: tokens wait for this
        self.hold_tokens = False
        self.substitution_supported = True
        self.max_context = 4096
        self.broken: dict[Path, str] = {}  # folder -> the error its inspect raises
        # a slow trunk load: the old model is unloaded, then the load waits for this gate
        # without looking at its cancel flag (as transformers' from_pretrained does)
        self.trunk_gate: threading.Event | None = None
        self.finish_despite_cancel = False  # the gate opened after the last cancel check
        self.release.set()

    def load(self, config: LoadConfig, on_event: EventSink) -> Job[ModelInfo]:
        self.calls.loads.append(config)
        if self.trunk_gate is not None:
            return self._submit(lambda job: self._slow_trunk_load(job, config, on_event))
        if self.fail_load is None:
            return super().load(config, on_event)
        error = self.fail_load

        def failing(job: Job[Any]) -> None:
            self._unload()  # like the real engine: the old model goes first
            on_event_progress(on_event)
            raise error

        return self._submit(failing)

    def _slow_trunk_load(self, job: Job[Any], config: LoadConfig, on_event: EventSink) -> Any:
        gate = self.trunk_gate
        assert gate is not None, "set before the load was submitted"
        self.trunk_gate = None  # one slow load; the next (a reload) is quick
        self._unload()
        on_event_progress(on_event)
        gate.wait(10)
        if job.cancel_requested and not self.finish_despite_cancel:
            raise CancelledError("loading was cancelled")
        return self._load(Job(), config, on_event)

    def inspect(self, model_dir: Path) -> Job[ModelInfo]:
        self.calls.inspected.append(Path(model_dir))
        problem = self.broken.get(Path(model_dir))
        if problem is not None:

            def failing(job: Job[Any]) -> None:
                raise ModelLoadError(problem)

            return self._submit(failing)
        return super().inspect(model_dir)

    def generate(self, request: GenerateRequest, on_event: EventSink) -> Job[Any]:
        self.calls.requests.append(request)
        if self.fail_generate is not None:
            error = self.fail_generate

            def failing(job: Job[Any]) -> None:
                raise error

            return self._submit(failing)
        return super().generate(request, on_event)

    def next_reply(self, request: GenerateRequest) -> str:
        if self.hold_tokens:
            self.release.wait(10)
        return super().next_reply(request)

    def dropped_for(self, request: GenerateRequest) -> int:
        return self.dropped if self.dropped is not None else super().dropped_for(request)

    def set_live_options(self, live: LiveOptions) -> None:
        self.calls.live.append(live)
        if live.substitution_on and not self.substitution_supported:
            raise SubstitutionUnsupportedError("This router family cannot substitute; use alpha 0.")
        super().set_live_options(live)

    def model_info(self, path: Path) -> ModelInfo:
        info = super().model_info(path)
        return replace(
            info, substitution_supported=self.substitution_supported, max_context=self.max_context
        )


def on_event_progress(on_event: EventSink) -> None:
    from engine.events import LoadProgressed

    on_event(LoadProgressed(0.1, "Reading the trunk"))
