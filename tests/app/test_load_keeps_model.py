"""Loading another model never strands the user: a broken folder is caught before the working
model is unloaded, a failure after that loads the working model again, and the title, header,
panel and banner always describe the model actually loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt

from app.main_window import MainWindow
from engine.errors import EngineOutOfMemoryError
from tests.app.conftest import write_model_folder
from tests.app.fake_engine import FakeEngine


def send(qtbot: Any, window: MainWindow, text: str) -> None:
    window.composer.text.setPlainText(text)
    window.composer.submit()
    qtbot.waitUntil(lambda: not window.controller.generating, timeout=5000)


def test_a_broken_model_folder_keeps_the_working_model_loaded(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine, user_dirs: Path
) -> None:
    broken = write_model_folder(user_dirs / "models" / "broken-moe")
    fake_engine.broken[broken] = "config.json is not a JSON object"
    loads = len(fake_engine.calls.loads)
    window.switch_model(str(broken))
    qtbot.waitUntil(lambda: not window.loader.busy, timeout=5000)
    assert len(fake_engine.calls.loads) == loads, "nothing was unloaded or loaded"
    assert fake_engine.loaded is not None and fake_engine.loaded.name == "understudy-mini-moe"
    assert window.controller.ready
    assert "understudy-mini-moe" in window.windowTitle()
    assert window.model_picker.currentText() == "understudy-mini-moe"
    assert "broken-moe was not loaded" in window.banner.text
    assert "config.json is not a JSON object" in window.banner.text
    assert "understudy-mini-moe is still loaded" in window.banner.text
    assert window.model_dir.name == "understudy-mini-moe", "Settings edit the loaded model"
    assert not window.load_dialog.isVisible()
    send(qtbot, window, "still there?")
    assert "wait for loading" not in window.banner.text
    assert window.controller.conversation.active_path()[-1].content  # type: ignore[union-attr]


def test_a_failure_after_unloading_loads_the_working_model_again(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine, user_dirs: Path
) -> None:
    other = write_model_folder(user_dirs / "models" / "too-big-moe")
    fake_engine.fail_load = EngineOutOfMemoryError("CUDA ran out of memory")

    def heal(*_args: object) -> None:
        fake_engine.fail_load = None  # the retry of the old model works

    window.loader.failed.connect(heal)
    window.switch_model(str(other))
    qtbot.waitUntil(lambda: window.controller.ready and not window.loader.busy, timeout=5000)
    assert fake_engine.loaded is not None and fake_engine.loaded.name == "understudy-mini-moe"
    assert [c.model_dir.name for c in fake_engine.calls.loads][-2:] == [
        "too-big-moe",
        "understudy-mini-moe",
    ]
    assert "understudy-mini-moe" in window.windowTitle()
    assert "too-big-moe could not be loaded" in window.banner.text
    assert "CUDA ran out of memory" in window.banner.text


def test_without_a_model_send_says_why_not_wait(
    qtbot: Any, make_window: Any, fake_engine: FakeEngine
) -> None:
    fake_engine.fail_load = EngineOutOfMemoryError("CUDA ran out of memory")
    window = make_window(start=False)
    window.start(None)
    qtbot.waitUntil(lambda: not window.loader.busy and bool(window.banner.text), timeout=5000)
    assert window.windowTitle().endswith("no model")
    window.composer.text.setPlainText("hello")
    window.composer.submit()
    assert "wait for loading" not in window.banner.text
    assert "No model is loaded" in window.banner.text and "Model > Models" in window.banner.text
    assert window.composer.text.toPlainText() == "hello", "the text is kept"


def test_closing_the_does_not_fit_window_keeps_the_working_model(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine, user_dirs: Path
) -> None:
    other = write_model_folder(user_dirs / "models" / "huge-moe")
    fake_engine.device_free_bytes = 100_000_000
    window.switch_model(str(other))
    dialog = window.load_dialog
    qtbot.waitUntil(lambda: dialog.anyway_button.isVisibleTo(dialog), timeout=5000)
    qtbot.mouseClick(dialog.cancel_button, Qt.MouseButton.LeftButton)
    assert window.controller.ready and window.model_dir.name == "understudy-mini-moe"
    assert "huge-moe was not loaded" in window.banner.text
