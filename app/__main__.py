"""Start the desktop app: ``python -m app`` (or the ``understudy`` command).

Options:
  --demo            use the scripted demo engine instead of the real one (no model runs)
  --smoke-test      start, show the window, wait until the model is loaded or an error is
                    shown, print one line saying which, and exit (for headless launch checks)
  --require-model   with --smoke-test: exit 1 unless the model actually loaded
  --timeout S       with --smoke-test: give up after S seconds (exit 2; default 180)

One app runs per profile (``app.instance``): a second start brings the first one's window to
the front, says so and exits with 3.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication, QMessageBox, QWidget

from app.application import (
    close_on_terminate,
    create_application,
    create_loop,
    finish_pending_tasks,
)
from app.bridge import EngineBridge, make_engine, real_engine_available
from app.chat_store import ChatStore
from app.crash_guard import CrashGuard
from app.error_reporting import ErrorReporter, setup_logging
from app.instance import SingleInstance, already_running_message
from app.main_window import MainWindow
from app.measure import BenchMeasurer
from app.settings import SettingsStore
from app.telemetry import GpuTelemetry
from app.unavailable_engine import UnavailableEngine
from engine.paths import user_config_dir, user_data_dir
from engine.protocol import EngineAPI


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="understudy", description="Understudy desktop chat")
    parser.add_argument("--demo", action="store_true", help="scripted demo engine, no model")
    parser.add_argument("--smoke-test", action="store_true", help="start, wait until ready, exit")
    parser.add_argument("--require-model", action="store_true", help="smoke test needs a model")
    parser.add_argument("--timeout", type=float, default=180.0, help="smoke test time limit (s)")
    return parser.parse_args(list(argv))


def build_engine(demo: bool) -> EngineAPI:
    if demo:
        from app.demo_engine import DemoEngine

        return DemoEngine()
    if not real_engine_available():
        return UnavailableEngine("the engine package (engine.runtime.engine) is not installed")
    try:
        return make_engine()
    except Exception as error:
        return UnavailableEngine(f"{type(error).__name__}: {error}")


class SmokeTest:
    """Ends the app once the window reports ready; remembers the exit code."""

    def __init__(self, window: MainWindow, require_model: bool, timeout_s: float) -> None:
        self.code = 2
        self.require_model = require_model
        window.ready.connect(self.finish)
        QTimer.singleShot(int(timeout_s * 1000), self.timed_out)
        self.window = window

    def finish(self, status: str) -> None:
        loaded = status == "loaded"
        self.code = 0 if loaded or not self.require_model else 1
        line = " ".join(status.split())
        print(f"SMOKE {'OK' if self.code == 0 else 'FAILED'}: {line}", flush=True)
        self.window.close()

    def timed_out(self) -> None:
        print("SMOKE FAILED: not ready before the time limit", flush=True)
        self.code = 2
        self.window.close()


EXIT_ALREADY_RUNNING = 3


def refuse_second(instance: SingleInstance, quiet: bool) -> int:
    """Another app holds this profile: bring it forward and say so (a box unless ``quiet``)."""
    message = already_running_message(instance.data_dir, instance.activate_first())
    print(message, file=sys.stderr, flush=True)
    if not quiet:
        QMessageBox.information(None, "Understudy is already running", message)
    return EXIT_ALREADY_RUNNING


def bring_to_front(window: QWidget) -> None:
    window.showNormal()
    window.raise_()
    window.activateWindow()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    app = create_application([sys.argv[0]])
    instance = SingleInstance(user_data_dir())
    if not instance.acquire():
        return refuse_second(instance, quiet=args.smoke_test)
    try:
        return run(app, args, instance)
    finally:
        instance.release()


def run(app: QApplication, args: argparse.Namespace, instance: SingleInstance) -> int:
    """The app's life on a profile this process holds."""
    setup_logging()
    loop = create_loop(app)
    engine = build_engine(args.demo)
    settings_store = SettingsStore(user_config_dir())
    chat_store = ChatStore(user_data_dir() / "chats.sqlite3")
    measure = None if args.demo else BenchMeasurer(user_data_dir() / "benchmarks")
    window = MainWindow(
        EngineBridge(engine, loop), settings_store, chat_store, GpuTelemetry(), measure
    )
    ErrorReporter(window).install(loop)
    smoke = SmokeTest(window, args.require_model, args.timeout) if args.smoke_test else None
    guard = CrashGuard(user_config_dir())
    screen = app.primaryScreen()
    if screen is not None:
        window.fit_to_screen(screen.availableGeometry())
    window.show()
    close_on_terminate(window)
    instance.listen(lambda: bring_to_front(window))
    loop.call_soon(window.start, guard, args.smoke_test)
    with loop:
        loop.run_forever()
        finish_pending_tasks(loop)
    guard.stop()
    engine.shutdown()
    chat_store.close()
    window.panel.telemetry.close()
    return smoke.code if smoke is not None else 0


if __name__ == "__main__":
    sys.exit(main())
