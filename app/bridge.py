"""The only module that knows both the UI's asyncio loop and the engine.

Engine calls return ``Job`` objects whose events arrive on the engine thread. ``EngineBridge``
turns them into things the UI can ``await`` on the qasync loop: job futures become awaitables
(``asyncio.wrap_future``), and event callbacks are marshalled with
``loop.call_soon_threadsafe`` into an async iterator. The real engine is imported lazily inside
``make_engine`` so the app (and its tests) never import torch at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.metadata
import importlib.util
import platform
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

from engine.config import GenerateRequest, LiveOptions, LoadConfig
from engine.events import Event, MemoryEstimate, ModelInfo, StatsSnapshot
from engine.protocol import EngineAPI, Job

T = TypeVar("T")
REAL_ENGINE_MODULE = "engine.runtime.engine"
_DONE = object()


def real_engine_available() -> bool:
    """True when the real engine's module is installed (without importing it)."""
    try:
        return importlib.util.find_spec(REAL_ENGINE_MODULE) is not None
    except ModuleNotFoundError:
        return False


def make_engine() -> EngineAPI:
    """Build the real engine. Imports torch (in the engine package), so call it lazily."""
    module = importlib.import_module(REAL_ENGINE_MODULE)
    engine: EngineAPI = module.Engine()
    return engine


def package_version(name: str) -> str:
    """Installed version from package metadata; never imports the package."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def engine_versions() -> dict[str, str]:
    """Versions of the engine's stack, read from metadata (torch is not imported)."""
    from engine import __version__ as engine_version

    versions = {"Understudy engine": engine_version, "Python": platform.python_version()}
    for name in ("torch", "transformers", "tokenizers", "safetensors"):
        versions[name] = package_version(name)
    return versions


class JobEvents:
    """The events of one job as an async iterator; raises the job's error at the end."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.job: Job[Any] | None = None

    def sink(self, event: Event) -> None:
        """Called on the engine thread: hand the event to the UI loop."""
        self._post(event)

    def attach(self, job: Job[Any]) -> None:
        self.job = job
        job.future.add_done_callback(lambda _future: self._post(_DONE))

    def _post(self, item: object) -> None:
        # RuntimeError: the UI loop is closed, the app is exiting and nobody listens any more
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            item = await self.queue.get()
            if item is _DONE:
                break
            yield item
        assert self.job is not None, "attach() the job before iterating"
        self.job.future.result()  # re-raise the engine's error, if any


class EngineBridge:
    """Async facade over an ``EngineAPI`` for code running on the qasync loop."""

    def __init__(self, engine: EngineAPI, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.loop = loop

    async def wait(self, job: Job[T]) -> T:
        return await asyncio.wrap_future(job.future, loop=self.loop)

    def _streamed(self, start: Callable[[Callable[[Event], None]], Job[T]]) -> JobEvents:
        events = JobEvents(self.loop)
        events.attach(start(events.sink))
        return events

    def load(self, config: LoadConfig) -> JobEvents:
        return self._streamed(lambda sink: self.engine.load(config, sink))

    def generate(self, request: GenerateRequest) -> JobEvents:
        return self._streamed(lambda sink: self.engine.generate(request, sink))

    async def inspect(self, model_dir: Path) -> ModelInfo:
        return await self.wait(self.engine.inspect(model_dir))

    async def estimate(self, config: LoadConfig) -> MemoryEstimate:
        return await self.wait(self.engine.estimate(config))

    async def render_chat(self, request: GenerateRequest) -> str:
        return await self.wait(self.engine.render_chat(request))

    async def unload(self) -> None:
        await self.wait(self.engine.unload())

    def set_live_options(self, live: LiveOptions) -> None:
        self.engine.set_live_options(live)

    def stats(self) -> StatsSnapshot:
        return self.engine.stats()

    def reset_stats(self) -> None:
        self.engine.reset_stats()

    def shutdown(self) -> None:
        self.engine.shutdown()
