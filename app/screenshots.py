"""Render screenshots offscreen with the DEMO engine: ``python -m app.screenshots [OUT_DIR]``.

Writes ``main-window.png``, ``main-window-generating.png``, ``main-window-dark.png``,
``panel-generating.png``, ``settings-dialog.png``, ``settings-template-error.png`` and
``load-dialog.png`` (default ``docs/screenshots``). The demo
engine runs no model: the replies and cache counters in these pictures are scripted, the GPU
readings are this machine's own (NVML, or "no NVIDIA GPU"). User data goes to a temp folder.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtWidgets import QWidget

from app.application import create_application, create_loop
from app.bridge import EngineBridge
from app.chat_store import ChatStore
from app.demo_engine import DEMO_REPLY, DemoEngine
from app.main_window import MainWindow
from app.settings import SettingsStore
from app.settings_dialog import SettingsDialog
from app.telemetry import GpuTelemetry

QUESTION = "How does the importance slider make generation faster?"
CODE_QUESTION = "Show me how experts are picked, in Python."
EXPLANATION = (
    "When an expert the router picked is **not in the GPU cache**, the engine has two "
    "choices: copy it over PCIe (slow), or use a *similar expert that is already there*.\n\n"
    "- At α = 0 nothing is substituted: output is exact.\n"
    "- Higher α lets low-importance experts be replaced, so fewer bytes move per token.\n\n"
    "The live panel on the right shows the hit rate and bytes moved per token."
)


async def until(condition: object, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("the demo window did not reach the expected state")
        await asyncio.sleep(0.02)


def save(widget: QWidget, path: Path) -> None:
    if not widget.grab().save(str(path)):
        raise OSError(f"could not write {path}")
    print(f"wrote {path}")


async def chat(window: MainWindow, text: str) -> None:
    window.composer.text.setPlainText(text)
    window.composer.submit()
    await until(lambda: window.controller.generating)


async def shoot(window: MainWindow, engine: DemoEngine, out: Path) -> None:
    await until(lambda: window.controller.ready)
    engine.replies = itertools.cycle([EXPLANATION, DEMO_REPLY])
    await chat(window, QUESTION)
    await until(lambda: not window.controller.generating)
    window.slider.slider.setValue(6)
    engine.token_delay = 0.1
    await chat(window, CODE_QUESTION)
    await until(lambda: window.controller.timing.tokens > 12)
    window.panel.update_readings()
    await asyncio.sleep(2.0)
    assert window.controller.generating, "the panel picture must be taken mid-reply"
    save(window.panel, out / "panel-generating.png")
    save(window, out / "main-window-generating.png")
    await until(lambda: not window.controller.generating, 60)
    window.chat_view.render_now()
    save(window, out / "main-window.png")
    await shoot_dialogs(window, engine, out)


async def shoot_dialogs(window: MainWindow, engine: DemoEngine, out: Path) -> None:
    window.show_settings()
    dialog = window.dialogs["settings"]
    assert isinstance(dialog, SettingsDialog), "show_settings opens the settings dialog"
    dialog.budget.setValue(1.5)
    dialog.update_fit()
    await until(lambda: "memory: needs" in dialog.fit_label.text())
    dialog.adjustSize()
    save(dialog, out / "settings-dialog.png")
    dialog.tabs.setCurrentIndex(2)
    dialog.template.setPlainText("{% for m in messages %}{{ m.content }")
    dialog.start_preview()
    await until(lambda: "Template error" in dialog.template_status.text())
    save(dialog, out / "settings-template-error.png")
    dialog.close()
    window.set_theme("dark")
    await asyncio.sleep(0.2)  # the palette change is delivered through the event loop
    save(window, out / "main-window-dark.png")
    window.set_theme("light")
    engine.device_free_bytes = 1_000_000_000
    window.load_model()
    await until(lambda: window.load_dialog.anyway_button.isVisibleTo(window.load_dialog))
    window.load_dialog.adjustSize()
    save(window.load_dialog, out / "load-dialog.png")


def demo_model(root: Path) -> Path:
    folder = root / "models" / "understudy-mini-moe"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"architectures": ["MixtralForCausalLM"]}')
    return folder


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "docs/screenshots").resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        os.environ.update(
            UNDERSTUDY_DATA_DIR=str(root / "data"),
            UNDERSTUDY_CONFIG_DIR=str(root / "config"),
            UNDERSTUDY_BUILTIN_MODEL=str(demo_model(root)),
        )
        app = create_application(["understudy-screenshots"])
        loop = create_loop(app)
        engine = DemoEngine(token_delay=0.01)
        chats = ChatStore(root / "data" / "chats.sqlite3")
        window = MainWindow(
            EngineBridge(engine, loop), SettingsStore(root / "config"), chats, GpuTelemetry()
        )
        window.resize(1400, 860)
        window.show()
        window.start(None)
        with loop:
            loop.run_until_complete(shoot(window, engine, out))
        window.close()
        engine.shutdown()
        chats.close()
        window.deleteLater()
        app.processEvents()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
