"""The Measure button's default: the engine benchmark in a child process."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import Qt

from app.curves import Curve, CurvePoint, save_curve
from app.measure import BenchMeasurer, MeasureCancelled, MeasureError, bench_command, engine_command


def test_bench_command_is_short_by_default(tmp_path: Path) -> None:
    command = bench_command(tmp_path / "m", tmp_path / "out", tmp_path / "t.txt")
    assert command[:3] == [sys.executable, "-m", "engine"] and command[3] == "bench"
    assert command[command.index("--alphas") + 1] == "0,0.2,0.4,0.6", "four points, not seven"
    assert command[command.index("--max-tokens") + 1] == "128"
    assert command[command.index("--model") + 1] == str(tmp_path / "m")


def test_the_frozen_bundle_uses_its_engine_door(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    assert engine_command() == [sys.executable, "--engine"]


def test_measurer_runs_off_the_ui_thread_and_reports_failures(
    qtbot: Any, aloop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    seen: list[list[str]] = []

    def succeed(command: list[str]) -> subprocess.CompletedProcess[str]:
        seen.append(command)
        save_curve(Curve("m", (CurvePoint(0.0, 5.0),)))
        return subprocess.CompletedProcess(command, 0, "", "")

    task = aloop.create_task(BenchMeasurer(tmp_path, succeed)(tmp_path / "m"))
    qtbot.waitUntil(task.done, timeout=5000)
    task.result()
    assert seen and "--text-file" in seen[0]

    def fail(command: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(command, 2, "", "loading\nModel folder is broken\n")

    task = aloop.create_task(BenchMeasurer(tmp_path, fail)(tmp_path / "m"))
    qtbot.waitUntil(task.done, timeout=5000)
    with pytest.raises(MeasureError, match="the benchmark failed: Model folder is broken"):
        task.result()


def test_cancel_ends_the_benchmark_process(
    qtbot: Any, aloop: asyncio.AbstractEventLoop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.measure as measure

    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    monkeypatch.setattr(measure, "bench_command", lambda *args: sleeper)
    measurer = BenchMeasurer(tmp_path)
    task = aloop.create_task(measurer(tmp_path / "m"))
    qtbot.waitUntil(lambda: measurer.process is not None, timeout=5000)
    measurer.cancel()
    qtbot.waitUntil(task.done, timeout=10_000)
    with pytest.raises(MeasureError, match="cancelled"):
        task.result()
    assert measurer.process is not None and measurer.process.returncode is not None


def test_slider_measure_button_turns_into_cancel(
    qtbot: Any, aloop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    from app.slider import ImportanceSlider

    class SlowMeasurer:
        def __init__(self) -> None:
            self.stop = asyncio.Event()

        async def __call__(self, model_dir: Path) -> None:
            await self.stop.wait()
            raise MeasureCancelled("measuring was cancelled")

        def cancel(self) -> None:
            self.stop.set()

    slider = ImportanceSlider(SlowMeasurer())
    qtbot.addWidget(slider)
    slider.set_model(tmp_path, "never-measured")
    slider.start_measure()
    assert slider.measure_button.text() == "Cancel" and slider.measure_button.isEnabled()
    qtbot.mouseClick(slider.measure_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: slider.task is None, timeout=5000)
    assert slider.measure_button.text() == "Measure"
    assert slider.curve_label.text() == "measurement cancelled"


def test_progress_counts_rows_and_estimates_the_time_left() -> None:
    from app.measure import MeasureProgress, describe_progress

    first = MeasureProgress(0, 4, 30.0)
    assert first.remaining_s is None and "after the first point" in describe_progress(first)
    half = MeasureProgress(2, 4, 120.0)
    assert half.fraction == 0.5 and half.remaining_s == 120.0
    assert describe_progress(half) == (
        "Measuring point 3 of 4 in a separate process: about 2:00 left (2:00 so far)"
    )


def test_the_slider_shows_progress_from_the_benchmark_output(
    qtbot: Any, aloop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    from app.slider import ImportanceSlider

    release = asyncio.Event()
    measurer = BenchMeasurer(tmp_path)

    def two_rows(command: list[str]) -> subprocess.CompletedProcess[str]:
        measurer.line_received("bench: 4 rows on 128 tokens\n")
        measurer.line_received("  +cpu cache 0.50 alpha 0.00: top-1 1.0000, hits 0.5\n")
        measurer.line_received("  +cpu cache 0.50 alpha 0.20: top-1 0.9000, hits 0.6\n")
        asyncio.run_coroutine_threadsafe(release.wait(), aloop).result(10)
        save_curve(Curve("slow-model", (CurvePoint(0.0, 5.0),)))
        return subprocess.CompletedProcess(command, 0, "", "")

    measurer.run = two_rows
    slider = ImportanceSlider(measurer)
    qtbot.addWidget(slider)
    slider.set_model(tmp_path / "slow-model", "slow-model")
    slider.start_measure()
    qtbot.waitUntil(lambda: "point 3 of 4" in slider.curve_label.text(), timeout=5000)
    assert slider.progress.isVisibleTo(slider) and slider.progress.value() == 500
    assert "left" in slider.curve_label.text()
    release.set()
    qtbot.waitUntil(lambda: slider.task is None, timeout=5000)
    assert not slider.progress.isVisibleTo(slider)


def test_bench_command_measures_only_what_the_curve_holds(tmp_path: Path) -> None:
    """No cloze items and no timed chat generations: they were nine tenths of the time."""
    command = bench_command(tmp_path / "m", tmp_path / "out", tmp_path / "t.txt")
    assert command[command.index("--cloze-items") + 1] == "0"
    assert command[command.index("--timing-runs") + 1] == "0"
    assert "--gen-tokens" not in command, "no timed generation, so no tokens for one"


def test_time_left_follows_the_rows_after_the_cheaper_reference_pass() -> None:
    from app.measure import MeasureProgress

    # reference pass 14 s, then one row of 36 s: three rows of 36 s are left
    progress = MeasureProgress(1, 4, elapsed_s=50.0, rows_started_s=14.0)
    assert progress.remaining_s == pytest.approx(108.0)
    counted_from_start = MeasureProgress(1, 4, elapsed_s=50.0)
    assert counted_from_start.remaining_s == pytest.approx(150.0), "the old, too long estimate"


def test_the_reference_line_starts_the_row_clock(tmp_path: Path) -> None:
    measurer = BenchMeasurer(tmp_path)
    measurer.line_received("bench: 4 rows on 128 tokens\n")
    assert measurer.progress().rows_started_s is None
    measurer.line_received("bench: reference pass done\n")
    started = measurer.progress().rows_started_s
    assert started is not None and started >= 0.0
    measurer.line_received("  +prefetch cache 0.50 alpha 0.00: top-1 1.0000, hits 0.5\n")
    assert measurer.progress().done == 1


def test_closing_the_window_while_measuring_ends_the_benchmark_process(
    qtbot: Any,
    aloop: asyncio.AbstractEventLoop,
    make_window: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import time

    import app.measure as measure

    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    monkeypatch.setattr(measure, "bench_command", lambda *args: sleeper)
    window = make_window()
    measurer = BenchMeasurer(tmp_path)
    window.slider.measure = measurer
    window.slider.model_dir = tmp_path / "m"
    window.slider.start_measure()
    qtbot.waitUntil(lambda: measurer.process is not None, timeout=5000)
    process = measurer.process
    assert process is not None
    started = time.monotonic()
    window.close()
    qtbot.waitUntil(lambda: process.poll() is not None, timeout=3000)
    assert time.monotonic() - started < 3.0, "the child must not outlive the window by minutes"
    qtbot.waitUntil(lambda: window.slider.task is None, timeout=5000)
