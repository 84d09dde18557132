"""Layout dead ends: the memory estimate fits its dialog, the slider's end labels keep apart,
the Models window marks the loaded model, reads whole and can remove an added folder, the chat
list follows the chat shown, the focus stays in the message box after a banner, the theme menu
is checked, the app is not called ``__main__.py``, export suggests a real folder and name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QApplication, QFileDialog, QLabel

from app.application import qt_arguments
from app.export import default_export_path, file_name_for
from app.library_dialog import EXPERTS, MAX_COLUMN_WIDTH, TOP_K, LibraryDialog
from app.main_window import MainWindow
from app.settings_dialog import SettingsDialog
from tests.app.conftest import write_model_folder
from tests.app.fake_engine import FakeEngine


def send(qtbot: Any, window: MainWindow, text: str) -> None:
    window.composer.text.setPlainText(text)
    window.composer.submit()
    qtbot.waitUntil(lambda: not window.controller.generating, timeout=5000)


def shows_whole_text(label: QLabel) -> bool:
    if label.wordWrap():
        return label.heightForWidth(label.contentsRect().width()) <= label.contentsRect().height()
    return label.contentsRect().width() >= label.minimumSizeHint().width()


def test_the_memory_estimate_is_not_clipped_at_the_default_size(
    qtbot: Any, window: MainWindow
) -> None:
    window.show_settings()
    dialog = window.dialogs["settings"]
    assert isinstance(dialog, SettingsDialog)
    qtbot.waitUntil(lambda: "memory: needs" in dialog.fit_label.text(), timeout=5000)
    qtbot.wait(50)  # the layout settles after the text grows
    assert shows_whole_text(dialog.fit_label), dialog.fit_label.text()


def test_slider_end_labels_do_not_touch(qtbot: Any, window: MainWindow) -> None:
    window.resize(1280, 800)
    qtbot.wait(50)
    slider = window.slider
    left, right = slider.left_end.geometry(), slider.right_end.geometry()
    assert right.left() - left.right() >= 12, (left, right)
    assert shows_whole_text(slider.left_end) and shows_whole_text(slider.right_end)


def open_library(window: MainWindow) -> LibraryDialog:
    window.show_library()
    dialog = window.dialogs["library"]
    assert isinstance(dialog, LibraryDialog)
    return dialog


def test_models_window_marks_the_loaded_model_and_shows_whole_cells(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine
) -> None:
    dialog = open_library(window)
    qtbot.waitUntil(lambda: dialog.table.item(0, TOP_K).text() == "2", timeout=5000)
    first = dialog.table.item(0, 0)
    assert first.text() == "● understudy-mini-moe (loaded)" and first.font().bold()
    metrics = dialog.table.fontMetrics()
    for column in range(dialog.table.columnCount() - 1):  # the last one stretches
        text = dialog.table.item(0, column).text()
        width = metrics.horizontalAdvance(text)
        assert dialog.table.columnWidth(column) >= width, f"column {column} cuts {text!r}"


def test_an_added_folder_can_be_removed_and_the_builtin_cannot(
    qtbot: Any, window: MainWindow, user_dirs: Path
) -> None:
    dialog = open_library(window)
    folder = write_model_folder(user_dirs / "mine" / "olmoe")
    assert dialog.add_folder(folder)
    dialog.table.selectRow(0)
    assert not dialog.remove_button.isEnabled(), "the built-in model stays"
    names = [dialog.table.item(r, 0).text() for r in range(dialog.table.rowCount())]
    dialog.table.selectRow(names.index("olmoe"))
    assert dialog.remove_button.isEnabled()
    qtbot.mouseClick(dialog.remove_button, Qt.MouseButton.LeftButton)
    assert str(folder) not in window.prefs.model_folders
    assert folder.is_dir(), "nothing on disk is deleted"
    names = [dialog.table.item(r, 0).text() for r in range(dialog.table.rowCount())]
    assert "olmoe" not in names and "files are kept" in dialog.message.text()


def test_unreadable_rows_disable_load_and_long_errors_are_elided(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine, user_dirs: Path
) -> None:
    broken = write_model_folder(user_dirs / "mine" / "broken-moe")
    error = "config.json: " + "the value of num_local_experts is absurd; " * 20
    fake_engine.broken[broken] = error
    dialog = open_library(window)
    assert dialog.add_folder(broken)
    names = [dialog.table.item(r, 0).text() for r in range(dialog.table.rowCount())]
    row = names.index("broken-moe")
    qtbot.waitUntil(lambda: "cannot read" in dialog.table.item(row, EXPERTS).text(), timeout=5000)
    dialog.table.selectRow(0)
    assert dialog.load_button.isEnabled(), "the readable built-in model can be loaded"
    dialog.table.selectRow(row)
    assert not dialog.load_button.isEnabled(), "Load is off on an unreadable row"
    assert error.strip() in dialog.load_button.toolTip(), "the reason is the tooltip"
    item = dialog.table.item(row, EXPERTS)
    assert item.toolTip() == f"cannot read: {error}", "the whole message in the cell's tooltip"
    assert dialog.table.columnWidth(EXPERTS) <= MAX_COLUMN_WIDTH, "the column is not widened"
    assert dialog.table.textElideMode() == Qt.TextElideMode.ElideRight
    loads = len(fake_engine.calls.loads)
    dialog._load_selected()  # what a double-click on the row does
    assert len(fake_engine.calls.loads) == loads and "cannot be loaded" in dialog.message.text()


def test_the_live_panel_keeps_its_width_when_a_model_loads(qtbot: Any, make_window: Any) -> None:
    window = make_window(start=False)
    QApplication.processEvents()
    before = window.panel.width()
    window.start(None)
    qtbot.waitUntil(lambda: window.controller.ready, timeout=5000)
    window.panel.update_readings()
    QApplication.processEvents()
    assert window.panel.width() == before, "loading a model shifted the panel"
    name = "NVIDIA GeForce RTX 4090 Laptop GPU with a very long board name"
    window.panel._set("GPU", name)
    QApplication.processEvents()
    assert window.panel.width() == before, "a long reading wraps instead of widening"
    assert window.panel.labels["GPU"].toolTip() == name
    window.panel._set("cache", "480 slots, 106.2 MB")  # the SmolLM2 MoE's cache on a CPU
    QApplication.processEvents()
    assert window.panel.width() == before, "the built-in model's cache reading fits"


def test_the_chat_list_selects_the_chat_shown_after_a_search_is_cleared(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine
) -> None:
    fake_engine.replies = iter(["bananas", "the sky", "more"])
    send(qtbot, window, "fruit")
    fruit = window.controller.conversation.id  # type: ignore[union-attr]
    window.new_chat()
    send(qtbot, window, "weather")
    window.open_conversation(fruit)
    window.sidebar.search.setText("weather")
    window.sidebar.search.clear()
    current = window.sidebar.items.currentItem()
    assert current is not None and current.isSelected()
    assert current.data(Qt.ItemDataRole.UserRole) == fruit == window.controller.conversation.id  # type: ignore[union-attr]


def test_dismissing_a_banner_returns_the_focus_to_the_message_box(
    qtbot: Any, window: MainWindow
) -> None:
    window.banner.show_message("Something to read", "info")
    window.banner.close_button.setFocus()
    qtbot.waitUntil(window.banner.close_button.hasFocus, timeout=2000)
    qtbot.mouseClick(window.banner.close_button, Qt.MouseButton.LeftButton)
    assert not window.system_prompt.hasFocus()
    assert window.composer.text.hasFocus()


def test_the_theme_menu_checks_the_theme_in_use(window: MainWindow) -> None:
    actions = window.theme_actions
    assert all(a.isCheckable() for a in actions.values())
    assert [t for t, a in actions.items() if a.isChecked()] == [window.prefs.theme]
    actions["dark"].trigger()
    assert [t for t, a in actions.items() if a.isChecked()] == ["dark"]
    assert window.prefs.theme == "dark"
    actions["light"].trigger()


def test_the_program_is_named_understudy_not_main_py() -> None:
    assert qt_arguments(["/src/app/__main__.py", "--demo"]) == ["understudy", "--demo"]


def test_export_names_the_file_after_the_chat(tmp_path: Path) -> None:
    assert file_name_for('What is 2/3? "quick" test') == "What is 2 3 quick test.md"
    assert file_name_for("...") == "chat.md"
    assert default_export_path("Notes", tmp_path) == tmp_path / "Notes.md"


def test_export_suggests_the_documents_folder_and_the_title(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    send(qtbot, window, "Plan a trip to Lyon")
    suggested: list[str] = []

    def fake_dialog(parent: object, title: str, path: str, filters: str) -> tuple[str, str]:
        suggested.append(path)
        return "", ""

    monkeypatch.setattr(QFileDialog, "getSaveFileName", fake_dialog)
    window.export_current()
    path = Path(suggested[0])
    assert path.name == "Plan a trip to Lyon.md"
    assert path.parent.is_absolute() and path.parent != Path.cwd()


def test_the_message_box_grows_with_its_text_up_to_a_limit(window: MainWindow) -> None:
    box = window.composer.text
    empty = box.height()
    box.setPlainText("one\ntwo\nthree\nfour\nfive")
    assert box.height() > empty and window.composer.lines_shown() == 5
    box.setPlainText("\n".join(str(i) for i in range(40)))
    assert window.composer.lines_shown() == 8, "then it scrolls"
    box.clear()
    assert box.height() == empty


def test_the_header_model_picker_shows_and_switches_the_model(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine, user_dirs: Path
) -> None:
    picker = window.model_picker
    assert picker.currentText() == "understudy-mini-moe"
    folder = write_model_folder(user_dirs / "mine" / "olmoe")
    window._folder_added(str(folder))
    index = picker.findText("olmoe")
    assert index >= 0 and picker.findText("Other models…") == picker.count() - 1
    picker.setCurrentIndex(index)
    picker.activated.emit(index)
    qtbot.waitUntil(lambda: fake_engine.calls.loads[-1].model_dir == folder, timeout=5000)
    qtbot.waitUntil(lambda: window.controller.ready, timeout=5000)
    assert picker.currentText() == "olmoe"


def test_the_transcript_keeps_a_readable_line_length(qtbot: Any, window: MainWindow) -> None:
    from app.chat_view import MAX_LINE_PX

    window.resize(2400, 900)
    qtbot.wait(50)
    view = window.chat_view
    column = view.viewport().width() - 2 * view.side_margin()
    assert column <= MAX_LINE_PX + 1 and view.side_margin() > 16


def test_an_opened_chat_shows_its_latest_message_even_after_a_banner(
    qtbot: Any, make_window: Any, fake_engine: FakeEngine
) -> None:
    window = make_window()
    fake_engine.token_delay = 0.0  # long replies, quickly (the test is about scrolling)
    fake_engine.replies = iter([" ".join(["line"] * 150)] * 6)
    for number in range(3):
        window.composer.text.setPlainText(f"question {number}")
        window.composer.submit()
        qtbot.waitUntil(lambda: not window.controller.generating, timeout=30_000)
    chat = window.controller.conversation.id  # type: ignore[union-attr]
    window.new_chat()
    window.open_conversation(chat)
    window.banner.show_message("A banner that takes room above the chat", "info")
    bar = window.chat_view.verticalScrollBar()
    qtbot.wait(50)
    assert bar.maximum() > 0 and bar.value() == bar.maximum()


def test_the_model_picker_is_filled_before_any_model_loads(make_window: Any) -> None:
    window = make_window(start=False)
    assert window.model_picker.currentText() == "No model loaded"
    assert window.model_picker.findText("understudy-mini-moe") >= 0


def clipped_texts(root: Any) -> list[str]:
    """Visible labels and buttons narrower (or, wrapped, shorter) than their text needs."""
    from PySide6.QtWidgets import QAbstractButton

    found = []
    for label in root.findChildren(QLabel):
        if label.isVisible() and label.text() and not shows_whole_text(label):
            found.append(f"label {label.text()!r}")
    for button in root.findChildren(QAbstractButton):
        if button.isVisible() and button.text() and button.width() < button.sizeHint().width():
            found.append(f"button {button.text()!r}")
    return found


@pytest.mark.parametrize("size", [(1280, 800), (1920, 1080)])
def test_no_text_is_clipped_in_the_main_window_and_dialogs(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine, size: tuple[int, int]
) -> None:
    send(qtbot, window, "hello")
    window.banner.show_message("Adjusted so replies can be generated: " + "x " * 60, "info")
    window.resize(*size)
    qtbot.wait(100)
    assert clipped_texts(window) == []
    window.show_settings()
    dialog = window.dialogs["settings"]
    qtbot.waitUntil(lambda: "memory: needs" in dialog.fit_label.text(), timeout=5000)  # type: ignore[attr-defined]
    qtbot.wait(100)
    assert clipped_texts(dialog) == []
    library = open_library(window)
    qtbot.wait(100)
    assert clipped_texts(library) == []


def test_the_system_theme_is_followed_when_the_os_switches(
    window: MainWindow, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.application as application
    from app import markdown_render

    window.set_theme("system")
    monkeypatch.setattr(application, "system_prefers_dark", lambda _app: True)
    window._system_theme_changed()  # what the OS's colour-scheme signal calls
    assert window.chat_view.palette_html is markdown_render.DARK
    window.set_theme("light")
    window._system_theme_changed()
    assert window.chat_view.palette_html is markdown_render.LIGHT, "an explicit theme stays"


def test_moving_the_slider_does_not_move_the_chat(qtbot: Any, window: MainWindow) -> None:
    """The value label changed width with its text ("α = 0 (exact)" / "α = 0.40"), the
    caption beside it wrapped to another number of lines, and the transcript jumped up and
    down while the user dragged the slider."""
    window.resize(1280, 800)
    qtbot.wait(50)
    slider = window.slider
    tops, widths = set(), set()
    for alpha in (0.0, 0.2, 0.4, 0.6):
        slider.set_alpha(alpha)
        qtbot.wait(30)
        tops.add(window.chat_view.mapTo(window, window.chat_view.rect().topLeft()).y())
        widths.add(slider.value_label.width())
    assert len(widths) == 1, f"the value label changes width: {widths}"
    assert len(tops) == 1, f"the transcript moves while the slider moves: {tops}"


def test_the_alpha_value_fits_after_the_font_grows(qtbot: Any, window: MainWindow) -> None:
    from PySide6.QtGui import QFont
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance()
    assert isinstance(app, QApplication)
    before = QFont(app.font())
    try:
        bigger = QFont(before)
        bigger.setPointSize(before.pointSize() + 6)
        app.setFont(bigger)
        qtbot.wait(50)
        label = window.slider.value_label
        for alpha in (0.0, 0.55):
            window.slider.set_alpha(alpha)
            assert shows_whole_text(label), (label.text(), label.width())
    finally:
        app.setFont(before)


def test_measure_progress_neither_squeezes_the_window_nor_wraps_into_a_column(
    qtbot: Any, window: MainWindow, tmp_path: Path
) -> None:
    """The progress line sat in a narrow column beside the slider (nine lines tall) and its
    minimum width took the chat list's: the search field and chat titles were cut off."""
    import asyncio

    from app.measure import MeasureProgress

    class WaitingMeasurer:
        def __init__(self) -> None:
            self.stop = asyncio.Event()

        async def __call__(self, model_dir: Path) -> None:
            await self.stop.wait()

        def cancel(self) -> None:
            self.stop.set()

    window.resize(1280, 800)
    qtbot.wait(50)
    sidebar_width, slider_height = window.sidebar.width(), window.slider.height()
    measurer = WaitingMeasurer()
    window.slider.measure = measurer
    window.slider.start_measure()
    window.slider.show_progress(MeasureProgress(1, 4, 70.0, 20.0))
    qtbot.wait(100)
    line = window.slider.curve_label.fontMetrics().lineSpacing()
    try:
        assert window.sidebar.width() == sidebar_width, "the chat list lost width"
        assert window.slider.height() <= slider_height + line, "the slider row grew lines"
        assert clipped_texts(window) == []
    finally:
        measurer.cancel()
        qtbot.waitUntil(lambda: window.slider.task is None, timeout=5000)


def test_the_model_pickers_open_beside_the_last_model_or_in_downloads(
    tmp_path: Path, qtbot: Any, window: MainWindow, monkeypatch: pytest.MonkeyPatch
) -> None:
    """They opened in the folder the app was started from (a checkout, or /)."""
    from app.library_dialog import browse_start

    home = tmp_path / "home"
    (home / "Downloads").mkdir(parents=True)
    assert browse_start((), home) == home / "Downloads"
    models = tmp_path / "models"
    (models / "a-moe").mkdir(parents=True)
    assert browse_start((str(models / "a-moe"),), home) == models
    assert browse_start((), tmp_path / "nobody") == tmp_path / "nobody"
    monkeypatch.setenv("HOME", str(home))
    opened: list[str] = []

    def fake_open(parent: Any, title: str, start: str = "", filters: str = "") -> tuple[str, str]:
        opened.append(start)
        return "", ""

    monkeypatch.setattr(QFileDialog, "getOpenFileName", fake_open)
    monkeypatch.setattr(
        QFileDialog, "getExistingDirectory", lambda parent, title, start="": opened.append(start)
    )
    dialog = open_library(window)
    dialog.choose_file()
    dialog.choose_folder()
    assert opened == [str(home / "Downloads")] * 2


def test_an_open_models_window_moves_its_loaded_mark_to_the_model_just_loaded(
    qtbot: Any, window: MainWindow, user_dirs: Path
) -> None:
    other = write_model_folder(user_dirs / "models" / "other-moe")
    window._folder_added(str(other))
    library = open_library(window)
    names = [library.table.item(r, 0).text() for r in range(library.table.rowCount())]  # type: ignore[union-attr]
    assert any("understudy-mini-moe (loaded)" in n for n in names), names
    window.switch_model(str(other))
    qtbot.waitUntil(lambda: window.controller.ready and not window.loader.busy, timeout=5000)
    names = [library.table.item(r, 0).text() for r in range(library.table.rowCount())]  # type: ignore[union-attr]
    assert [n for n in names if "(loaded)" in n] == ["● other-moe (loaded)"], names


def test_the_remote_engine_dialog_shows_its_whole_key_hint(qtbot: Any) -> None:
    from app.remote_dialog import RemoteDialog

    dialog = RemoteDialog()
    qtbot.addWidget(dialog)
    dialog.show()
    qtbot.wait(50)
    key = dialog.key
    margins = key.textMargins().left() + key.textMargins().right() + 12  # frame and padding
    needed = key.fontMetrics().horizontalAdvance(key.placeholderText()) + margins
    assert key.width() >= needed, f"'{key.placeholderText()}' is cut: {key.width()} < {needed}"


def test_switching_the_server_off_takes_back_the_serving_line(window: MainWindow) -> None:
    """ "Serving … on http://127.0.0.1:8080/v1" stayed in the banner after the switch went off."""
    switch = window.remote.server
    switch.port = 0
    window.remote.server_action.setChecked(True)
    assert window.banner.text.startswith("Serving ")
    window.remote.server_action.setChecked(False)
    assert not switch.on
    assert "Serving" not in window.banner.text
    window.banner.show_message("Something else to say.", "info")
    window.remote.server_action.setChecked(True)
    window.banner.show_message("Something else to say.", "info")
    window.remote.server_action.setChecked(False)
    assert window.banner.text == "Something else to say.", "another message is left alone"


def test_the_window_starts_within_a_small_screen(qtbot: Any, window: MainWindow) -> None:
    """At 150% scaling a 1280x800 screen is 853x533 logical pixels: the 1280x800 window ran
    off the screen, the panel and the right edge out of reach."""
    from PySide6.QtCore import QRect

    window.fit_to_screen(QRect(0, 0, 853, 533))
    qtbot.wait(50)
    assert window.width() <= 853 and window.height() <= 533
    assert not window.panel.isVisible(), "the panel makes way where everything cannot fit"
    assert window.chat_view.width() > 300, "the chat keeps a usable width"
    window.panel.setVisible(True)
    window.fit_to_screen(QRect(0, 0, 1920, 1040))
    assert (window.width(), window.height()) == (1280, 800)
    assert window.panel.isVisible(), "a large screen keeps the panel"


def test_loading_does_not_squeeze_the_system_prompt(
    qtbot: Any, make_window: Any, fake_engine: FakeEngine
) -> None:
    """ "Loading understudy-smollm2-moe…" sat beside the picker and cut the system prompt field
    down to "are a helpful assistant." at 1280x800."""
    fake_engine.load_steps, fake_engine.load_delay = 100, 0.02
    window = make_window(start=False)
    window.resize(1280, 800)
    qtbot.wait(50)
    idle = window.system_prompt.width()
    window.start(None)
    qtbot.waitUntil(lambda: window.loader.busy, timeout=5000)
    qtbot.wait(50)
    assert window.model_picker.currentText() == "Loading understudy-mini-moe…"
    assert window.system_prompt.width() == idle, "the field lost width while loading"
    qtbot.waitUntil(lambda: window.controller.ready, timeout=10_000)
    assert window.model_picker.currentText() == "understudy-mini-moe"
    assert not any(
        "Loading" in window.model_picker.itemText(i) for i in range(window.model_picker.count())
    )


def test_the_loading_window_grows_with_the_estimate(qtbot: Any, window: MainWindow) -> None:
    """The estimate (four lines) arrives after the window is shown with one line; it was cut
    off at the top and the bottom."""
    from engine.events import MemoryEstimate

    dialog = window.load_dialog
    dialog.begin("understudy-smollm2-moe")
    qtbot.wait(50)
    estimate = MemoryEstimate(
        device="cpu",
        trunk_bytes=328_000_000,
        kv_cache_bytes=94_400_000,
        expert_cache_bytes=106_200_000,
        host_expert_bytes=212_300_000,
        device_free_bytes=12_200_000_000,
        host_free_bytes=11_700_000_000,
    )
    window.loader.estimated.emit(estimate)
    qtbot.wait(50)
    assert "It fits." in dialog.estimate_label.text()
    assert shows_whole_text(dialog.estimate_label), dialog.estimate_label.geometry()
    dialog.hide()


def test_the_live_panel_drops_the_cache_figure_when_no_model_is_loaded(
    qtbot: Any, make_window: Any
) -> None:
    """While another model loads the engine reports no stats: the previous model's slot count
    must not stay on show next to "no model loaded"."""
    window = make_window(start=False)
    window.start(None)
    qtbot.waitUntil(lambda: window.controller.ready, timeout=5000)
    window.panel.update_readings()
    assert "slots" in window.panel.labels["cache"].text(), "a loaded model shows its cache"
    window.panel.stats_source = lambda: None  # what the engine says during a load
    window.panel.update_readings()
    assert window.panel.labels["cache"].text() == "no model loaded"
    assert window.panel.labels["hit rate"].text() == "no model loaded"
