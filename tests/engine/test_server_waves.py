"""Waves of 50 concurrent streaming clients leave nothing behind on the server.

Over the scripted engine (no model), five waves of 50 clients streaming at once, each on its own
connection: every client gets exactly its own reply, and after each wave the server holds no
generation, task, connection or queue entry more than before the first; from the second wave on
the objects Python tracks stay level (one leaked per request would add 50 a wave) and its
allocated blocks grow by far less than 5 per request (they settle slowly, as hash tables and
bounded caches reach their size). RSS is measured by ``python -m engine.server.waves``, not
asserted: it is too noisy for a test.
"""

from __future__ import annotations

import gc
import logging
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise

from engine.server.waves import footprint, prompts_for
from engine.server.waves import wave as wave_here
from tests.engine.server_fixtures import MODEL_ID, running_server
from tests.helpers.echo_engine import EchoEngine, EchoRecord

CLIENTS = 50
WAVES = 5


def wave(*args: object) -> list[dict]:
    """A wave from a thread of its own: its ``asyncio.run`` needs a thread with no running loop
    (an earlier Qt test may have left one set on the main thread)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(wave_here, *args).result()  # type: ignore[arg-type]


def test_waves_of_fifty_streaming_clients_leave_nothing_behind(caplog):
    # httpx logs each request at INFO once an earlier test lowered the level, and pytest keeps
    # every record for its report: the test process's objects, not the server's
    caplog.set_level(logging.WARNING, logger="httpx")
    engine = EchoEngine(token_delay=0.0005)
    prints = []
    with running_server(engine, context_length=4096) as handle:
        wave(handle.url, MODEL_ID, ["warm up"], 4)  # first-use caches, not a leak
        engine.record = EchoRecord()
        baseline = footprint(handle)
        for index in range(1, WAVES + 1):
            prompts = prompts_for(CLIENTS, index)
            results = wave(handle.url, MODEL_ID, prompts, 64)
            assert [r["text"] for r in results] == [f"reply {p}" for p in prompts], index
            assert all(r["done"] and r["status"] == 200 for r in results), index
            engine.record = EchoRecord()  # the scripted engine's own notes are not the server's
            prints.append(footprint(handle))
        served = handle.routes.gate.state().served
    engine.shutdown()
    assert served == 1 + CLIENTS * WAVES
    for index, seen in enumerate(prints, 1):
        assert seen.generations == 0, f"wave {index}: a generation is still alive: {seen}"
        assert seen.connections == 0 and seen.running == 0 and seen.waiting == 0, seen
        assert seen.tasks <= baseline.tasks, f"wave {index}: tasks left behind: {seen}"
    # wave by wave from the end of the second, once tables reached their size; a leak adds in
    # every wave, while other threads of the test process may allocate now and then: the
    # smallest growth of three waves is the server's own
    later = prints[1:]
    objects = [b.python_objects - a.python_objects for a, b in pairwise(later)]
    assert min(objects) < CLIENTS, f"Python objects grew by {objects} in waves of {CLIENTS}"
    blocks = [b.python_blocks - a.python_blocks for a, b in pairwise(later)]
    assert min(blocks) < 5 * CLIENTS, f"memory blocks grew by {blocks} in waves of {CLIENTS}"


def test_footprint_counts_a_generation_still_alive():
    from engine.config import GenerateRequest, SamplingConfig
    from engine.server.scheduler import Generation

    engine = EchoEngine(token_delay=0.0)
    with running_server(engine) as handle:
        import asyncio

        async def start() -> Generation:
            request = GenerateRequest(prompt="a b", sampling=SamplingConfig(max_new_tokens=2))
            return Generation(engine, request)

        kept = asyncio.run_coroutine_threadsafe(start(), handle.loop).result(5)
        kept.job.result(5)
        assert footprint(handle, settle_s=0).generations == 1, "it sees a leaked generation"
        del kept
        gc.collect()
        assert footprint(handle).generations == 0
    engine.shutdown()
