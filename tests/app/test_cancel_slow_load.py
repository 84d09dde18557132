"""Cancel during a load the engine cannot interrupt (a transformers trunk load): the window
answers at once, says what is loaded, and the abandoned load's model never lingers."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt

from app.main_window import MainWindow
from tests.app.conftest import write_model_folder
from tests.app.fake_engine import FakeEngine


def start_slow_switch(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine, folder: Path
) -> threading.Event:
    """Switch to ``folder`` with a trunk load that waits; returns once the load is under way."""
    gate = threading.Event()
    fake_engine.trunk_gate = gate
    window.switch_model(str(folder))
    qtbot.waitUntil(lambda: fake_engine.loaded is None, timeout=5000)  # old model unloaded
    qtbot.waitUntil(lambda: "Reading the trunk" in window.load_dialog.status.text(), timeout=5000)
    return gate


def test_cancel_answers_at_once_and_the_previous_model_comes_back(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine, user_dirs: Path
) -> None:
    big = write_model_folder(user_dirs / "models" / "big-moe")
    gate = start_slow_switch(qtbot, window, fake_engine, big)
    qtbot.mouseClick(window.load_dialog.cancel_button, Qt.MouseButton.LeftButton)
    # no waiting: the click itself brought the window back
    assert "Loading was cancelled" in window.banner.text
    assert "understudy-mini-moe" in window.banner.text, "the banner says what will be loaded"
    assert window.model_dir.name == "understudy-mini-moe"
    assert not window.controller.ready, "nothing is loaded until the old model is back"
    gate.set()  # the engine finishes the trunk, sees the cancel, then reloads the old model
    qtbot.waitUntil(lambda: window.controller.ready and not window.loader.busy, timeout=5000)
    assert fake_engine.loaded is not None and fake_engine.loaded.name == "understudy-mini-moe"
    assert "understudy-mini-moe" in window.windowTitle()
    assert window.model_picker.currentText() == "understudy-mini-moe"


def test_a_load_that_completes_after_cancel_is_replaced_by_the_previous_model(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine, user_dirs: Path
) -> None:
    big = write_model_folder(user_dirs / "models" / "big-moe")
    gate = start_slow_switch(qtbot, window, fake_engine, big)
    fake_engine.finish_despite_cancel = True
    window.loader.cancel()
    gate.set()
    qtbot.waitUntil(lambda: window.controller.ready and not window.loader.busy, timeout=5000)
    assert fake_engine.loaded is not None and fake_engine.loaded.name == "understudy-mini-moe"
    assert window.model_info is not None and window.model_info.name == "understudy-mini-moe"
    assert "big-moe" not in window.windowTitle(), "the abandoned load reported nothing"


def test_without_a_previous_model_a_late_completed_load_is_unloaded(
    qtbot: Any, make_window: Any, fake_engine: FakeEngine
) -> None:
    gate = threading.Event()
    fake_engine.trunk_gate = gate
    fake_engine.finish_despite_cancel = True
    window = make_window(start=False)
    window.start(None)
    qtbot.waitUntil(lambda: "Reading the trunk" in window.load_dialog.status.text(), timeout=5000)
    window.loader.cancel()
    assert not window.load_dialog.isVisible() and "cancelled" in window.banner.text
    assert window.windowTitle().endswith("no model")
    gate.set()
    qtbot.waitUntil(
        lambda: fake_engine.loaded is None and fake_engine.config is not None, timeout=5000
    )
    qtbot.wait(200)
    assert fake_engine.loaded is None, "the model nobody waits for is freed"
    assert not window.controller.ready and window.windowTitle().endswith("no model")


def test_cancel_while_inspecting_keeps_the_loaded_model(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine, user_dirs: Path
) -> None:
    other = write_model_folder(user_dirs / "models" / "other-moe")
    fake_engine.release.clear()
    original = fake_engine.inspect

    def slow_inspect(model_dir: Path) -> Any:
        fake_engine._submit(lambda job: fake_engine.release.wait(10))
        return original(model_dir)

    fake_engine.inspect = slow_inspect  # type: ignore[method-assign]
    loads = len(fake_engine.calls.loads)
    window.switch_model(str(other))
    window.loader.cancel()
    assert window.controller.ready, "the working model was never unloaded"
    assert "understudy-mini-moe is still loaded" in window.banner.text
    fake_engine.release.set()
    qtbot.wait(300)
    assert len(fake_engine.calls.loads) == loads, "the cancelled run never asked for a load"
    assert fake_engine.loaded is not None and fake_engine.loaded.name == "understudy-mini-moe"


def test_cancelling_the_reload_of_the_previous_model_says_no_model_is_loaded(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine, user_dirs: Path
) -> None:
    """A failed load had unloaded the working model and its reload was cancelled while being
    inspected: the window asserted that the working model was still loaded."""
    from engine.errors import EngineOutOfMemoryError

    other = write_model_folder(user_dirs / "models" / "too-big-moe")
    fake_engine.fail_load = EngineOutOfMemoryError("CUDA ran out of memory")
    window.loader.failed.connect(lambda _message: window.loader.cancel())  # after the reload
    window.switch_model(str(other))
    qtbot.waitUntil(
        lambda: not window.loader.busy and "cancelled" in window.banner.text, timeout=5000
    )
    assert window.model_info is None and not window.controller.ready
    assert window.windowTitle().endswith("no model")
