"""The slider's Measure button: runs the engine's benchmark for one model in a child process.

``python -m engine bench`` (or ``understudy --engine bench`` in the frozen bundle) measures
substitution + prefetch at the headline cache size for four slider alphas (0, 0.2, 0.4, 0.6: the
slider interpolates between them) on a short text, and writes the curve where ``app.curves``
reads it. Only what the curve holds is measured: the teacher-forced pass (fidelity, bytes, and
decode speed); no cloze items and no timed chat generations, which took nine tenths of the
time and feed nothing the slider shows (a default Measure of the SmolLM2 MoE took 374 s on 2
shared Xeon cores at load average 9-10, 2026-11-29; before, over 20 minutes).
It runs in a separate process, off the UI thread, so the window stays responsive; its own
fresh copy of the model is loaded there. The benchmark's lines become ``MeasureProgress``:
rows done, elapsed, and the time left at the pace of the rows since the reference pass (the
reference is cheaper than a row, so counting it would make the first estimate too short).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from engine.paths import resources_dir

SLIDER_ALPHAS = "0,0.2,0.4,0.6"
MAX_TOKENS = "128"
TEXT_NAME = "heldout_sample.txt"
ROW_LINE = re.compile(r"\balpha \d")
REFERENCE_LINE = re.compile(r"^bench: reference pass done")
Runner = Callable[[list[str]], subprocess.CompletedProcess[str]]


@dataclass(frozen=True)
class MeasureProgress:
    """How far a measurement is: rows measured of all, seconds so far, seconds left (or None)."""

    done: int
    total: int
    elapsed_s: float
    rows_started_s: float | None = None  # when the reference pass ended (rows began)

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0

    @property
    def remaining_s(self) -> float | None:
        """Time left at the pace of the rows so far; None before the first row."""
        if self.done == 0:
            return None
        rows_s = self.elapsed_s - (self.rows_started_s or 0.0)
        return max(0.0, rows_s / self.done * (self.total - self.done))


def minutes(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 60}:{whole % 60:02d}"


def describe_progress(progress: MeasureProgress) -> str:
    """The slider's line while measuring."""
    left = progress.remaining_s
    pace = (
        f"about {minutes(left)} left"
        if left is not None
        else "time left known after the first point"
    )
    return (
        f"Measuring point {min(progress.done + 1, progress.total)} of {progress.total} "
        f"in a separate process: {pace} ({minutes(progress.elapsed_s)} so far)"
    )


class MeasureError(RuntimeError):
    """The benchmark could not run or failed; the message is for the user."""


class MeasureCancelled(MeasureError):
    """The user cancelled the measurement."""


def engine_command() -> list[str]:
    """How to start the engine CLI: the bundle's ``--engine`` door, or ``python -m engine``."""
    if getattr(sys, "frozen", False):
        return [sys.executable, "--engine"]
    return [sys.executable, "-m", "engine"]


def evaluation_text() -> Path:
    """The held-out text the benchmark scores (shipped in resources, or in a source tree)."""
    candidates = (
        resources_dir() / "benchmarks" / TEXT_NAME,
        Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / TEXT_NAME,
    )
    for path in candidates:
        if path.is_file():
            return path
    raise MeasureError(f"No evaluation text is installed (looked for {TEXT_NAME}).")


def bench_threads(cores: int | None = None) -> int:
    """Torch threads for the benchmark: half the cores, at least one.

    The app (and its loaded model) keeps the other half. On a busy machine more threads than
    free cores make every op wait for a descheduled sibling thread: on 2 shared cores at load
    average 9 (2026-11-29) two threads had not finished the 128-token reference pass after 8
    minutes; one thread finished it in 73 s.
    """
    return max(1, (cores if cores is not None else os.cpu_count() or 1) // 2)


def bench_command(model_dir: Path, out_dir: Path, text: Path) -> list[str]:
    return [
        *engine_command(),
        "bench",
        "--model",
        str(model_dir),
        "--policies",
        "+prefetch",  # device-independent bytes (CPU assist's follow timing on a CPU device)
        "--cache-fractions",
        "0.5",
        "--alphas",
        SLIDER_ALPHAS,
        "--timing-runs",
        "0",  # the curve's speed is the teacher-forced decode's; chat timings cost minutes
        "--max-tokens",
        MAX_TOKENS,
        "--cloze-items",
        "0",  # cloze accuracy is not on the curve, and cost four fifths of the time
        "--no-traces",
        "--text-file",
        str(text),
        "--out",
        str(out_dir),
        "--markdown",
        str(out_dir / "BENCHMARKS.md"),
        "--threads",
        str(bench_threads()),
    ]


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


class BenchMeasurer:
    """``await measurer(model_dir)`` runs the benchmark; raises ``MeasureError`` on failure.

    ``run`` is injectable for tests; the default starts the child process and remembers it so
    ``cancel`` can end it.
    """

    def __init__(self, out_root: Path, run: Runner | None = None) -> None:
        self.out_root = out_root
        self.run = run or self._run_process
        self.process: subprocess.Popen[str] | None = None
        self.cancelled = False
        self.on_progress: Callable[[MeasureProgress], None] | None = None  # on the UI loop
        self.total = len(SLIDER_ALPHAS.split(","))
        self._done, self._started = 0, 0.0
        self._rows_started: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _run_process(self, command: list[str]) -> subprocess.CompletedProcess[str]:
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, bufsize=1
        )
        assert self.process.stderr is not None, "stderr is a pipe"
        lines = []
        for line in self.process.stderr:
            lines.append(line)
            self.line_received(line)
        self.process.wait()
        return subprocess.CompletedProcess(command, self.process.returncode, "", "".join(lines))

    def line_received(self, line: str) -> None:
        """A line of the benchmark's output (any thread): a measured row moves the progress."""
        if ROW_LINE.search(line):
            self._done += 1
            self._report()
        elif REFERENCE_LINE.search(line):
            self._rows_started = time.monotonic() - self._started

    def progress(self) -> MeasureProgress:
        elapsed = time.monotonic() - self._started
        return MeasureProgress(self._done, self.total, elapsed, self._rows_started)

    def _report(self) -> None:
        if self.on_progress is not None and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the UI loop is gone: nobody listens
                self._loop.call_soon_threadsafe(self.on_progress, self.progress())

    def cancel(self) -> None:
        self.cancelled = True
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    async def __call__(self, model_dir: Path) -> None:
        command = bench_command(model_dir, self.out_root / model_dir.name, evaluation_text())
        self.cancelled = False
        self._done, self._started, self._rows_started = 0, time.monotonic(), None
        loop = self._loop = asyncio.get_running_loop()
        self._report()
        with ThreadPoolExecutor(1, thread_name_prefix="measure") as pool:
            try:
                result = await loop.run_in_executor(pool, self.run, command)
            except asyncio.CancelledError:  # the window closed: end the child, then unwind
                self.cancel()
                raise
        if self.cancelled:
            raise MeasureCancelled("measuring was cancelled")
        if result.returncode != 0:
            raise MeasureError(f"the benchmark failed: {last_line(result.stderr or result.stdout)}")
