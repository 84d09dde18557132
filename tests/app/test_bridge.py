"""The bridge turns engine-thread callbacks and job futures into asyncio on the UI loop."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from app.bridge import EngineBridge, JobEvents, engine_versions
from engine.errors import EngineOutOfMemoryError
from engine.events import LoadProgressed
from engine.protocol import Job


def test_events_from_another_thread_arrive_in_order_then_the_error(
    qtbot: Any, aloop: asyncio.AbstractEventLoop
) -> None:
    events = JobEvents(aloop)
    job: Job[None] = Job()
    events.attach(job)
    seen: list[Any] = []

    def engine_thread() -> None:
        for step in range(5):
            events.sink(LoadProgressed(step / 5, f"step {step}"))
        job.future.set_exception(EngineOutOfMemoryError("out of memory"))

    async def consume() -> None:
        with pytest.raises(EngineOutOfMemoryError):
            async for event in events:
                assert isinstance(event, LoadProgressed)
                seen.append((event.message, threading.current_thread().name))

    task = aloop.create_task(consume())
    threading.Thread(target=engine_thread).start()
    qtbot.waitUntil(task.done, timeout=3000)
    task.result()
    assert [s[0] for s in seen] == [f"step {i}" for i in range(5)]
    assert {s[1] for s in seen} == {threading.main_thread().name}, "consumed on the UI thread"


def test_wait_turns_a_job_future_into_an_awaitable(
    qtbot: Any, aloop: asyncio.AbstractEventLoop, fake_engine: Any, tmp_path: Any
) -> None:
    bridge = EngineBridge(fake_engine, aloop)
    task = aloop.create_task(bridge.inspect(tmp_path))
    qtbot.waitUntil(task.done, timeout=3000)
    assert task.result().top_k == 2


def test_engine_versions_come_from_metadata_without_importing_torch() -> None:
    import sys

    had_torch = "torch" in sys.modules
    versions = engine_versions()
    assert set(versions) >= {"torch", "transformers", "Understudy engine", "Python"}
    assert ("torch" in sys.modules) == had_torch
