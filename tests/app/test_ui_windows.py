"""Models window, About, error reporting, theme and font size, the message box keys."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QApplication

from app.about_dialog import AboutDialog, versions
from app.error_reporting import ErrorReporter, log_path, setup_logging
from app.library_dialog import LibraryDialog
from app.main_window import MainWindow
from app.settings import SettingsStore
from tests.app.conftest import write_model_folder
from tests.app.fake_engine import FakeEngine
from tests.app.test_model_library import fake_hf_repo


def open_library(window: MainWindow) -> LibraryDialog:
    window.show_library()
    dialog = window.dialogs["library"]
    assert isinstance(dialog, LibraryDialog)
    return dialog


def cell(dialog: LibraryDialog, row: int, column: int) -> str:
    item = dialog.table.item(row, column)
    return item.text() if item is not None else ""


def test_models_window_lists_builtin_and_hf_cache_with_engine_details(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine, user_dirs: Path
) -> None:
    snapshot = fake_hf_repo(user_dirs / "hf-cache", "mistralai/Mixtral-8x7B", "r1", 100)
    dialog = open_library(window)
    qtbot.waitUntil(lambda: cell(dialog, 1, 6) == "2", timeout=5000)
    assert [cell(dialog, r, 0) for r in range(2)] == [
        "● understudy-mini-moe (loaded)",
        "mistralai/Mixtral-8x7B",
    ]
    assert cell(dialog, 1, 1) == "Hugging Face cache"
    assert cell(dialog, 1, 5) == "8 × 8 layers", "experts per layer from EngineAPI.inspect"
    assert snapshot in fake_engine.calls.inspected


def test_add_folder_checks_it_remembers_it_and_loads_it(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine, user_dirs: Path
) -> None:
    dialog = open_library(window)
    assert not dialog.add_folder(user_dirs / "empty-folder")
    assert "is not a folder" in dialog.message.text()
    folder = write_model_folder(user_dirs / "my-models" / "olmoe")
    assert dialog.add_folder(folder)
    assert str(folder) in window.prefs.model_folders
    prefs = SettingsStore(Path(os.environ["UNDERSTUDY_CONFIG_DIR"])).load_prefs()
    assert str(folder) in prefs.model_folders, "remembered across restarts"
    row = [cell(dialog, r, 0) for r in range(dialog.table.rowCount())].index("olmoe")
    dialog.table.selectRow(row)
    dialog._load_selected()
    qtbot.waitUntil(lambda: fake_engine.calls.loads[-1].model_dir == folder, timeout=5000)
    qtbot.waitUntil(lambda: window.controller.ready, timeout=5000)
    assert window.model_picker.currentText() == "olmoe" and window.model_label.text() == ""
    assert window.prefs.last_model == str(folder)


def test_about_shows_app_qt_python_and_engine_versions(qtbot: Any) -> None:
    found = versions()
    assert {"Understudy app", "Qt", "Python", "torch", "transformers"} <= set(found)
    dialog = AboutDialog()
    qtbot.addWidget(dialog)
    text = dialog.label.text()
    assert f"<td>Qt</td><td>&nbsp;{found['Qt']}</td>" in text
    assert found["torch"] in text and "no network connection" in text


def test_unexpected_errors_go_to_a_dialog_and_the_log_file(qtbot: Any, aloop: Any) -> None:
    path = setup_logging()
    reporter = ErrorReporter()
    old_hook = sys.excepthook
    try:
        reporter.install(aloop)
        try:
            raise RuntimeError("something broke")
        except RuntimeError:
            sys.excepthook(*sys.exc_info())  # type: ignore[arg-type]
    finally:
        sys.excepthook = old_hook
        aloop.set_exception_handler(None)
    assert reporter.shown == ["RuntimeError: something broke"]
    assert reporter.dialog is not None and reporter.dialog.isVisible()
    assert not reporter.dialog.isModal(), "never blocks the app"
    qtbot.addWidget(reporter.dialog)
    for handler in logging.getLogger().handlers:
        handler.flush()
    assert path == log_path() and "something broke" in path.read_text()
    for handler in list(logging.getLogger().handlers):
        if getattr(handler, "baseFilename", "") == str(path):
            logging.getLogger().removeHandler(handler)
            handler.close()


def test_theme_and_font_size_apply_and_persist(
    qtbot: Any, make_window: Any, fake_engine: FakeEngine
) -> None:
    window = make_window()
    window.set_theme("dark")
    window.change_font(3)
    qtbot.waitUntil(lambda: window.palette().window().color().name() == "#26292e", timeout=2000)
    assert QApplication.font().pointSize() == 14
    again = make_window()
    assert (again.prefs.theme, again.prefs.font_size) == ("dark", 14)
    again.set_theme("light")
    again.change_font(-3)


def test_enter_sends_and_shift_enter_adds_a_line(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine
) -> None:
    box = window.composer.text
    qtbot.keyClicks(box, "line one")
    qtbot.keyClick(box, Qt.Key.Key_Return, Qt.KeyboardModifier.ShiftModifier)
    qtbot.keyClicks(box, "line two")
    assert box.toPlainText() == "line one\nline two"
    qtbot.keyClick(box, Qt.Key.Key_Return)
    qtbot.waitUntil(lambda: not window.controller.generating, timeout=5000)
    assert fake_engine.calls.requests[-1].messages[-1].content == "line one\nline two"


def test_sending_before_the_model_is_ready_keeps_the_text(
    qtbot: Any, make_window: Any, fake_engine: FakeEngine
) -> None:
    fake_engine.load_steps, fake_engine.load_delay = 100, 0.02
    window = make_window(start=False)
    window.start(None)
    window.composer.text.setPlainText("too early")
    window.composer.submit()
    assert "No model is loaded yet" in window.banner.text
    assert window.composer.text.toPlainText() == "too early"
    assert fake_engine.calls.requests == []
    window.loader.cancel()
    qtbot.waitUntil(lambda: not window.loader.busy, timeout=5000)


def test_ctrl_comma_opens_the_settings(qtbot: Any, window: MainWindow) -> None:
    qtbot.keyClick(window, Qt.Key.Key_Comma, Qt.KeyboardModifier.ControlModifier)
    assert "settings" in window.dialogs and window.dialogs["settings"].isVisible()


def test_a_whole_session_makes_no_network_call(
    qtbot: Any, make_window: Any, fake_engine: FakeEngine, monkeypatch: Any
) -> None:
    import socket

    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    window = make_window()
    window.composer.text.setPlainText("offline?")
    window.composer.submit()
    qtbot.waitUntil(lambda: not window.controller.generating, timeout=5000)
    window.show_library()
    window.show_about()
    window.panel.update_readings()
    assert attempts == []


def test_chat_template_override_reaches_the_request(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine
) -> None:
    from dataclasses import replace

    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    window.apply_model_settings(replace(window.model_settings, chat_template=template))
    window.composer.text.setPlainText("hi")
    window.composer.submit()
    qtbot.waitUntil(lambda: not window.controller.generating, timeout=5000)
    assert fake_engine.calls.requests[-1].chat_template == template


def test_models_window_shows_gguf_quant_and_marks_dense_files(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine, user_dirs: Path
) -> None:
    from tests.app.test_model_library import write_gguf

    models = user_dirs / "data" / "models"
    write_gguf(models / "Qwen3-30B-A3B-Q4_K_M.gguf")
    write_gguf(models / "SmolLM2-Q8_0.gguf", moe=False, file_type=7, arch="llama")
    dialog = open_library(window)
    names = [cell(dialog, r, 0) for r in range(dialog.table.rowCount())]
    moe, dense = names.index("Qwen3-30B-A3B-Q4_K_M"), names.index("SmolLM2-Q8_0")
    assert (cell(dialog, moe, 3), cell(dialog, dense, 3)) == ("Q4_K_M", "Q8_0")
    assert cell(dialog, dense, 5) == "dense (not MoE)"
    qtbot.waitUntil(lambda: cell(dialog, moe, 6) == "2", timeout=5000)  # inspected
    assert models / "SmolLM2-Q8_0.gguf" not in fake_engine.calls.inspected
    assert not dialog.add_folder(models / "SmolLM2-Q8_0.gguf")
    assert "dense model" in dialog.message.text()
