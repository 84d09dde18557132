"""The engine's one long-lived thread: runs submitted work in order and settles each ``Job``.

Errors never escape the thread: each is translated (torch's out-of-memory becomes
``EngineOutOfMemoryError`` saying what to change), handed to the task's error callback (the
facade turns it into an ``EngineFailed`` event) and set on the job's future. The thread then
takes the next task. What the work does is the facade's business (``engine.py``).
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from engine.errors import EngineOutOfMemoryError
from engine.protocol import Job

ResultT = TypeVar("ResultT")
log = logging.getLogger(__name__)

OOM_ADVICE = (
    "Out of memory while {action}: lower the expert cache budget or the context length, "
    "pick a smaller dtype (bfloat16 or float16), or run on the CPU."
)


def _free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def translate_error(error: BaseException, action: str) -> BaseException:
    """Torch/host out-of-memory becomes ``EngineOutOfMemoryError``; others pass unchanged."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        _free_device_memory()
        translated = EngineOutOfMemoryError(OOM_ADVICE.format(action=action))
        translated.__cause__ = error
        return translated
    return error


@dataclass
class Task:
    job: Job[Any]
    work: Callable[[], Any]
    action: str  # what the work does, for messages ("generating", "loading the model")
    on_error: Callable[[BaseException], None] | None = None


class EngineThread:
    """A daemon thread with a FIFO of tasks; ``current`` is the job running now."""

    def __init__(self, name: str = "understudy-engine") -> None:
        self._tasks: queue.Queue[Task | None] = queue.Queue()
        self.current: Job[Any] | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def ident(self) -> int | None:
        return self._thread.ident

    def submit(
        self,
        work: Callable[[], ResultT],
        action: str,
        on_error: Callable[[BaseException], None] | None = None,
        job: Job[ResultT] | None = None,
    ) -> Job[ResultT]:
        """Queue ``work``; its result or error settles the returned job."""
        job = job if job is not None else Job()
        self._tasks.put(Task(job, work, action, on_error))
        return job

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running job, finish the queue's end marker and join the thread."""
        if self.current is not None:
            self.current.cancel()
        self._tasks.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        while (task := self._tasks.get()) is not None:
            self.current = task.job
            try:
                self._execute(task)
            finally:
                self.current = None
                del task  # while waiting for the next, keep nothing of the last (its sink)

    def _execute(self, task: Task) -> None:
        try:
            result = task.work()
        except BaseException as raw:  # the boundary: nothing escapes, the thread lives on
            self._fail(task, translate_error(raw, task.action))
        else:
            task.job.future.set_result(result)

    def _fail(self, task: Task, error: BaseException) -> None:
        if task.on_error is not None:
            try:
                task.on_error(error)
            except Exception:
                log.exception("error callback failed")
        task.job.future.set_exception(error)
