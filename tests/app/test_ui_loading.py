"""Loading through the window: estimate + Load anyway, progress and Cancel, OOM messages,
first start on the built-in model, crash recovery with the last working settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt

from app.crash_guard import CrashGuard
from app.main_window import MainWindow
from app.settings import ModelSettings, SettingsStore
from engine.errors import CacheBudgetError, EngineOutOfMemoryError
from tests.app.fake_engine import FakeEngine


def test_first_start_loads_the_builtin_model(
    window: MainWindow, fake_engine: FakeEngine, user_dirs: Path
) -> None:
    assert fake_engine.calls.loads[0].model_dir == user_dirs / "builtin" / "understudy-mini-moe"
    assert window.controller.ready and window.model_picker.currentText() == "understudy-mini-moe"
    assert not window.load_dialog.isVisible()


def test_load_shows_progress_and_can_be_cancelled(
    qtbot: Any, make_window: Any, fake_engine: FakeEngine
) -> None:
    fake_engine.load_steps, fake_engine.load_delay = 200, 0.01
    window = make_window(start=False)
    window.start(None)
    dialog = window.load_dialog
    qtbot.waitUntil(lambda: dialog.progress.value() > 0, timeout=5000)
    assert "Loading layer" in dialog.status.text()
    assert "It fits." in dialog.estimate_label.text()
    qtbot.mouseClick(dialog.cancel_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not window.loader.busy, timeout=5000)
    assert not window.controller.ready
    assert "cancelled" in window.banner.text and not dialog.isVisible()
    assert fake_engine.loaded is None, "the fake stopped before finishing"


def test_estimate_that_does_not_fit_asks_before_loading_anyway(
    qtbot: Any, make_window: Any, fake_engine: FakeEngine
) -> None:
    fake_engine.device_free_bytes = 100_000_000
    window = make_window(start=False)
    window.start(None)
    dialog = window.load_dialog
    qtbot.waitUntil(lambda: dialog.anyway_button.isVisibleTo(dialog), timeout=5000)
    assert "does NOT fit" in dialog.estimate_label.text()
    assert fake_engine.calls.loads == [], "nothing loads before the user agrees"
    qtbot.mouseClick(dialog.anyway_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: window.controller.ready, timeout=5000)
    assert [c.force for c in fake_engine.calls.loads] == [True]


def test_out_of_memory_becomes_a_message_saying_what_to_change(
    qtbot: Any, make_window: Any, fake_engine: FakeEngine
) -> None:
    fake_engine.fail_load = EngineOutOfMemoryError("CUDA ran out of memory after 3.1 GB")
    window = make_window(start=False)
    window.start(None)
    qtbot.waitUntil(lambda: not window.loader.busy and bool(window.banner.text), timeout=5000)
    text = window.banner.text
    assert "Out of memory while loading: CUDA ran out of memory after 3.1 GB" in text
    assert "lower the expert-cache budget" in text and "context length (now 2048" in text
    assert window.load_dialog.status.text() == text, "the loading window says it too"
    assert not window.controller.ready


def test_cache_budget_error_says_the_minimum(
    qtbot: Any, make_window: Any, fake_engine: FakeEngine
) -> None:
    fake_engine.fail_load = CacheBudgetError("Budget below one layer.", 4, 2_000_000_000)
    window = make_window(start=False)
    window.start(None)
    qtbot.waitUntil(lambda: bool(window.banner.text), timeout=5000)
    assert "raise the expert-cache budget to at least 2.0 GB (4 experts)" in window.banner.text


def test_last_working_settings_are_remembered_and_offered_after_a_crash(
    qtbot: Any, make_window: Any, fake_engine: FakeEngine, user_dirs: Path
) -> None:
    config = user_dirs / "config"
    first = make_window()
    first.apply_model_settings(ModelSettings(context_length=1024))
    qtbot.waitUntil(lambda: first.controller.ready, timeout=5000)
    last = SettingsStore(config).load_last_working()
    assert last is not None and last.settings.context_length == 1024
    # a later run saves settings that crash before loading finishes
    SettingsStore(config).save_model(Path(last.model_dir), ModelSettings(context_length=8192))
    CrashGuard(config).start()  # the marker that crashed run left behind
    loads_before = len(fake_engine.calls.loads)
    window = make_window(start=False)
    window.start(CrashGuard(config))
    assert "did not close properly" in window.banner.text
    assert len(fake_engine.calls.loads) == loads_before, "no automatic load after a crash"
    window.composer.text.setPlainText("hello?")
    window.composer.submit()  # Send before choosing: the choice stays on screen
    assert "did not close properly" in window.banner.text
    assert "wait for loading" not in window.banner.text
    offer = next(b for b in window.banner.buttons if b.text() == "Use last working settings")
    qtbot.mouseClick(offer, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: window.controller.ready, timeout=5000)
    assert fake_engine.calls.loads[-1].context_length == 1024
    assert SettingsStore(config).load_model(Path(last.model_dir)).context_length == 1024


def test_corrupt_settings_and_database_are_reported_in_the_window(
    make_window: Any, user_dirs: Path
) -> None:
    (user_dirs / "config").mkdir(parents=True)
    (user_dirs / "config" / "prefs.json").write_text("{broken")
    (user_dirs / "data").mkdir(parents=True)
    (user_dirs / "data" / "chats.sqlite3").write_bytes(b"garbage" * 200)
    window = make_window()
    shown = " ".join(text for _, text in window.banner.history)
    assert "prefs.json was unreadable" in shown and "chat database was damaged" in shown
    assert list((user_dirs / "config").glob("prefs.json.corrupt-*"))
    assert list((user_dirs / "data").glob("chats.sqlite3.corrupt-*"))
    assert window.controller.ready, "the app still starts"


def test_unassembled_builtin_starts_on_the_small_model_and_says_how_to_assemble(
    qtbot: Any, make_window: Any, fake_engine: FakeEngine, user_dirs: Path, monkeypatch: Any
) -> None:
    from tests.app.conftest import write_model_folder

    resources = user_dirs / "resources"
    small = write_model_folder(resources / "models" / "understudy-mini-moe")
    monkeypatch.delenv("UNDERSTUDY_BUILTIN_MODEL")
    monkeypatch.setenv("UNDERSTUDY_RESOURCES", str(resources))
    window = make_window(start=False)
    window.start(None)
    qtbot.waitUntil(lambda: window.controller.ready, timeout=5000)
    assert fake_engine.calls.loads[0].model_dir == small
    notices = [text for kind, text in window.banner.history if kind == "info"]
    assert any("python -m engine.training.moefy assemble" in text for text in notices)


def test_deleted_last_model_falls_back_to_the_builtin_and_names_the_missing_path(
    qtbot: Any, make_window: Any, fake_engine: FakeEngine, user_dirs: Path
) -> None:
    from tests.app.conftest import write_model_folder

    gone = write_model_folder(user_dirs / "my-models" / "olmoe")
    SettingsStore(user_dirs / "config").remember_model(gone)
    for child in gone.iterdir():
        child.unlink()
    gone.rmdir()
    window = make_window()
    builtin = user_dirs / "builtin" / "understudy-mini-moe"
    assert fake_engine.calls.loads[0].model_dir == builtin, "loads the built-in model"
    assert window.controller.ready and window.model_picker.currentText() == builtin.name
    warning = window.banner.text
    assert str(gone) in warning and "not found" in warning, warning
    assert "\n" not in warning, "one line"
    assert window.prefs.last_model == str(builtin), "the next start does not warn again"


def test_a_forgotten_remote_last_used_falls_back_to_the_builtin(
    make_window: Any, fake_engine: FakeEngine, user_dirs: Path
) -> None:
    config = user_dirs / "config"
    SettingsStore(config).remember_model(config / "remotes" / "big_box")  # then forgotten
    window = make_window()
    assert fake_engine.calls.loads[0].model_dir == user_dirs / "builtin" / "understudy-mini-moe"
    assert window.controller.ready
    assert "big_box" in window.banner.text and "no longer saved" in window.banner.text
