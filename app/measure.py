"""The slider's Measure button: runs the engine's benchmark for one model in a child process.

``python -m engine bench`` (or ``understudy --engine bench`` in the frozen bundle) measures the
full method at the headline cache size for each slider alpha and writes the curve where
``app.curves`` reads it. It runs in a separate process, off the UI thread, so the window stays
responsive; its own fresh copy of the model is loaded there.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from engine.paths import resources_dir

SLIDER_ALPHAS = "0,0.1,0.2,0.3,0.4,0.5,0.6"
TEXT_NAME = "heldout_sample.txt"
Runner = Callable[[list[str]], subprocess.CompletedProcess[str]]


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
        "1",
        "--max-tokens",
        "256",
        "--cloze-items",
        "4",
        "--gen-tokens",
        "16",
        "--no-traces",
        "--text-file",
        str(text),
        "--out",
        str(out_dir),
        "--markdown",
        str(out_dir / "BENCHMARKS.md"),
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

    def _run_process(self, command: list[str]) -> subprocess.CompletedProcess[str]:
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        stdout, stderr = self.process.communicate()
        return subprocess.CompletedProcess(command, self.process.returncode, stdout, stderr)

    def cancel(self) -> None:
        self.cancelled = True
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    async def __call__(self, model_dir: Path) -> None:
        command = bench_command(model_dir, self.out_root / model_dir.name, evaluation_text())
        self.cancelled = False
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1, thread_name_prefix="measure") as pool:
            result = await loop.run_in_executor(pool, self.run, command)
        if self.cancelled:
            raise MeasureCancelled("measuring was cancelled")
        if result.returncode != 0:
            raise MeasureError(f"the benchmark failed: {last_line(result.stderr or result.stdout)}")
