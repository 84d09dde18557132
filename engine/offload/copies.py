"""How expert copies into device slots are issued, ordered and awaited (mechanism only).

The cache hands a list of ``(slot view, host row)`` jobs to a copy engine and gets a ticket
back; computing from those slots must first ``wait`` for the ticket. Three engines:

- ``SyncCopies`` (CPU device): plain ``copy_``, done before ``copy`` returns; no tickets.
- ``CudaCopies``: demand copies on a high-priority stream, prefetches on a low-priority one
  (a demand miss never queues behind a wrong prefetch); each batch starts after the compute
  stream's queued work (a victim slot may still be read by it) and ends with an event that
  the compute stream waits for - the host never blocks. Copy time is measured with event
  pairs, harvested without waiting (``seconds_per_expert`` feeds Algorithm 2).
- ``ThreadedCopies``: a worker thread serving a demand queue before a prefetch queue, with an
  optional delay per job: asynchronous copies on the CPU, used to test ordering, priority,
  close-while-copying and copy failures on machines without a GPU.

A failed copy raises ``ExpertCopyError`` from ``wait`` (the cache then drops the slots it
claimed, so the engine stays usable).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from engine.errors import EngineError

Job = tuple[torch.Tensor, torch.Tensor]  # (destination slot row, source host row)


class ExpertCopyError(EngineError):
    """Copying an expert to the device failed; the generation stops, the engine lives on."""


class CopyEngine(Protocol):
    def copy(self, jobs: Sequence[Job], demand: bool) -> Any:
        """Start the copies; a ticket to ``wait`` on, or ``None`` when already done."""
        ...

    def wait(self, tickets: Sequence[Any]) -> None:
        """Order compute after these copies (raise ``ExpertCopyError`` if one failed)."""
        ...

    def synchronize(self) -> None:
        """Block until every copy issued so far has finished."""
        ...

    @property
    def seconds_per_expert(self) -> float | None: ...


class SyncCopies:
    """Copies done in place, in order, before ``copy`` returns."""

    def copy(self, jobs: Sequence[Job], demand: bool) -> None:
        try:
            for dst, src in jobs:
                dst.copy_(src)
        except RuntimeError as error:
            raise ExpertCopyError(f"copying an expert failed: {error}") from error

    def wait(self, tickets: Sequence[Any]) -> None:
        return None

    def synchronize(self) -> None:
        return None

    @property
    def seconds_per_expert(self) -> float | None:
        return None


class CudaCopies:
    """Two priority streams, events for ordering, event pairs for timing."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.demand = torch.cuda.Stream(device, priority=-1)
        self.prefetch = torch.cuda.Stream(device, priority=0)
        self._timings: deque[tuple[torch.cuda.Event, torch.cuda.Event, int]] = deque()
        self._times: deque[float] = deque(maxlen=32)

    def copy(self, jobs: Sequence[Job], demand: bool) -> torch.cuda.Event:
        stream = self.demand if demand else self.prefetch
        stream.wait_stream(torch.cuda.current_stream(self.device))  # victims may be in use
        start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        try:
            with torch.cuda.stream(stream):
                start.record(stream)
                for dst, src in jobs:
                    dst.copy_(src, non_blocking=True)
                done.record(stream)
        except RuntimeError as error:  # a launch failure; faults inside the copy surface later
            raise ExpertCopyError(f"copying an expert to the GPU failed: {error}") from error
        self._timings.append((start, done, len(jobs)))
        self._harvest()
        return done

    def wait(self, tickets: Sequence[Any]) -> None:
        compute = torch.cuda.current_stream(self.device)
        for event in tickets:
            compute.wait_event(event)

    def synchronize(self) -> None:
        self.demand.synchronize()
        self.prefetch.synchronize()

    def _harvest(self) -> None:
        """Finished copies' event pairs into seconds per expert (never waits)."""
        while self._timings and self._timings[0][1].query():
            start, done, count = self._timings.popleft()
            self._times.append(start.elapsed_time(done) / 1e3 / max(1, count))

    @property
    def seconds_per_expert(self) -> float | None:
        return sum(self._times) / len(self._times) if self._times else None


class _Ticket:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None


class ThreadedCopies:
    """A worker thread copying jobs, demand queue first; ``delay`` seconds per job."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.finished: list[tuple[bool, int]] = []  # (demand, slot address), in order
        self._demand: queue.SimpleQueue[tuple[list[Job], _Ticket]] = queue.SimpleQueue()
        self._prefetch: queue.SimpleQueue[tuple[list[Job], _Ticket]] = queue.SimpleQueue()
        self._work = threading.Semaphore(0)
        self._pending: list[_Ticket] = []
        self._thread = threading.Thread(target=self._run, name="expert-copies", daemon=True)
        self._thread.start()

    def copy(self, jobs: Sequence[Job], demand: bool) -> _Ticket:
        ticket = _Ticket()
        (self._demand if demand else self._prefetch).put((list(jobs), ticket))
        self._pending.append(ticket)
        self._work.release()
        return ticket

    def wait(self, tickets: Sequence[Any]) -> None:
        for ticket in tickets:
            ticket.done.wait()
            if ticket.error is not None:
                raise ExpertCopyError(f"copying an expert failed: {ticket.error}")

    def synchronize(self) -> None:
        for ticket in self._pending:
            ticket.done.wait()
        self._pending.clear()

    @property
    def seconds_per_expert(self) -> float | None:
        return None

    def _run(self) -> None:
        while True:
            self._work.acquire()
            demand = not self._demand.empty()
            jobs, ticket = (self._demand if demand else self._prefetch).get()
            try:
                for dst, src in jobs:
                    time.sleep(self.delay)
                    dst.copy_(src)
                    self.finished.append((demand, dst.data_ptr()))
            except Exception as error:  # handed to the waiting thread
                ticket.error = error
            finally:
                ticket.done.set()


def copies_for(device: torch.device) -> CopyEngine:
    """The copy engine a cache on ``device`` uses by default."""
    return CudaCopies(device) if device.type == "cuda" else SyncCopies()
