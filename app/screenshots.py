"""Render the app's screenshots with the REAL engine on the built-in model.

``python -m app.screenshots [OUT_DIR]`` (default ``docs/screenshots``) starts the window
offscreen, loads the built-in model (``engine.paths.builtin_model_dir()``: the assembled
SmolLM2 MoE, else the small ``understudy-mini-moe``) through the real engine (on the GPU when
there is one, else the CPU), asks it two questions and saves:

- ``main-window-{light,dark}-{1280x800,1920x1080}.png``: the chat at two sizes and both themes
- ``main-window-generating.png``: mid-reply (the README's picture), ``panel-generating.png``
- ``settings-dialog.png`` (with its memory estimate), ``settings-template-error.png``

Everything in them is what the model and this machine produced: the replies are the built-in
model's own (a small model: expect short, simple answers), the speed and cache counters are
measured, the GPU readings are NVML's (or "no NVIDIA GPU"). User data goes to a temp folder.
Set ``QT_SCALE_FACTOR=1.5`` to check the layout at 150 % scaling.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtWidgets import QWidget

from app.application import create_application, create_loop, finish_pending_tasks
from app.bridge import EngineBridge, make_engine
from app.chat_store import ChatStore
from app.main_window import MainWindow
from app.settings import SettingsStore
from app.settings_dialog import SettingsDialog
from app.telemetry import GpuTelemetry
from engine.paths import builtin_model_dir

QUESTIONS = ("What is a mixture of experts?", "Write a short poem about the sea.")
SIZES = ((1280, 800), (1920, 1080))
TIMEOUT_S = 300.0


async def until(condition: Callable[[], bool], timeout: float = TIMEOUT_S) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("the window did not reach the expected state in time")
        await asyncio.sleep(0.02)


def save(widget: QWidget, path: Path) -> None:
    if not widget.grab().save(str(path)):
        raise OSError(f"could not write {path}")
    print(f"wrote {path}", flush=True)


async def ask(window: MainWindow, text: str) -> None:
    window.composer.text.setPlainText(text)
    window.composer.submit()
    await until(lambda: window.controller.generating)


async def settle(window: MainWindow) -> None:
    """Let layout and palette changes (delivered through the event loop) land."""
    await asyncio.sleep(0.3)
    window.chat_view.render_now()
    await asyncio.sleep(0.1)


async def shoot(window: MainWindow, out: Path) -> None:
    await until(lambda: window.controller.ready or window.ready_status not in ("", "loaded"))
    if not window.controller.ready:
        raise RuntimeError(f"the built-in model did not load: {window.ready_status}")
    window.banner.dismiss()
    await ask(window, QUESTIONS[0])
    await until(lambda: not window.controller.generating)
    await ask(window, QUESTIONS[1])
    await until(lambda: window.chat_view.streaming_id is not None)  # this reply's timing
    await until(lambda: window.controller.timing.tokens >= 4 or not window.controller.generating)
    window.chat_view.render_now()
    window.panel.update_readings()
    save(window.panel, out / "panel-generating.png")
    save(window, out / "main-window-generating.png")
    await until(lambda: not window.controller.generating)
    window.banner.dismiss()
    for theme in ("light", "dark"):
        window.set_theme(theme)
        for width, height in SIZES:
            window.resize(width, height)
            await settle(window)
            save(window, out / f"main-window-{theme}-{width}x{height}.png")
    window.set_theme("light")
    window.resize(*SIZES[0])
    await shoot_settings(window, out)


async def shoot_settings(window: MainWindow, out: Path) -> None:
    window.show_settings()
    dialog = window.dialogs["settings"]
    assert isinstance(dialog, SettingsDialog), "show_settings opens the settings dialog"
    await until(lambda: "memory: needs" in dialog.fit_label.text())
    await asyncio.sleep(0.2)
    save(dialog, out / "settings-dialog.png")
    dialog.tabs.setCurrentIndex(2)
    dialog.template.setPlainText("{% for m in messages %}{{ m.content }")
    dialog.start_preview()
    await until(lambda: "Template error" in dialog.template_status.text())
    save(dialog, out / "settings-template-error.png")
    dialog.close()


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "docs/screenshots").resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = builtin_model_dir()
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        os.environ.update(
            UNDERSTUDY_DATA_DIR=str(root / "data"),
            UNDERSTUDY_CONFIG_DIR=str(root / "config"),
            UNDERSTUDY_BUILTIN_MODEL=str(model),
        )
        app = create_application(["understudy-screenshots"])
        loop = create_loop(app)
        engine = make_engine()
        chats = ChatStore(root / "data" / "chats.sqlite3")
        window = MainWindow(
            EngineBridge(engine, loop), SettingsStore(root / "config"), chats, GpuTelemetry()
        )
        window.resize(*SIZES[0])
        window.show()
        window.start(None)
        try:
            with loop:
                try:
                    loop.run_until_complete(shoot(window, out))
                finally:
                    window.close()
                    finish_pending_tasks(loop)  # before the loop closes (see app.application)
        finally:
            engine.shutdown()
            chats.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
