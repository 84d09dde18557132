"""Settings never leave the app unable to generate: Save with defaults on a model whose
maximum context is below the default, typed numbers kept whole, the model's maximum shown,
impossible combinations refused with a message."""

from __future__ import annotations

from typing import Any

from app.main_window import MainWindow
from app.settings import ModelSettings
from app.settings_check import fit_to_model, generation_problem
from app.settings_dialog import SettingsDialog
from tests.app.fake_engine import FakeEngine


def open_settings(window: MainWindow) -> SettingsDialog:
    window.show_settings()
    dialog = window.dialogs["settings"]
    assert isinstance(dialog, SettingsDialog)
    return dialog


def send(qtbot: Any, window: MainWindow, text: str) -> None:
    window.composer.text.setPlainText(text)
    window.composer.submit()
    qtbot.waitUntil(lambda: not window.controller.generating, timeout=5000)


def test_fit_to_model_lowers_context_and_reply_and_says_so() -> None:
    fitted, note = fit_to_model(ModelSettings(context_length=2048, max_new_tokens=512), 512)
    assert (fitted.context_length, fitted.max_new_tokens) == (512, 256)
    assert "2048 -> 512" in note and "512 -> 256" in note
    assert generation_problem(fitted, 512) == ""
    same, none = fit_to_model(fitted, 512)
    assert same is fitted and none == ""


def test_generation_problem_names_the_limits() -> None:
    problem = generation_problem(ModelSettings(context_length=512, max_new_tokens=512), 512)
    assert "Max reply tokens (512)" in problem and "at most 496" in problem
    assert "maximum (512" in generation_problem(ModelSettings(context_length=600), 512)
    tiny = ModelSettings(context_length=16, max_new_tokens=8)
    assert generation_problem(tiny, None) == "", "a 16-token context still fits 8 + 8"


def test_a_model_with_a_short_context_loads_with_settings_that_can_generate(
    qtbot: Any, make_window: Any, fake_engine: FakeEngine
) -> None:
    fake_engine.max_context = 512  # like the built-in model; the defaults say 2048 / 512
    window = make_window()
    assert window.model_settings.context_length == 512
    assert window.model_settings.max_new_tokens == 256
    assert "2048 -> 512" in window.banner.text, "the change is said, not silent"
    assert fake_engine.calls.loads[-1].context_length == 512
    send(qtbot, window, "hello")
    reply = window.controller.conversation.active_path()[-1]  # type: ignore[union-attr]
    assert reply.role == "assistant" and reply.content and not reply.note


def test_save_without_edits_keeps_a_state_that_generates(
    qtbot: Any, make_window: Any, fake_engine: FakeEngine
) -> None:
    fake_engine.max_context = 512
    window = make_window()
    dialog = open_settings(window)
    dialog.accept()
    assert dialog.error_label.text() == ""
    assert generation_problem(window.model_settings, 512) == ""
    send(qtbot, window, "hello again")
    assert "Generation failed" not in window.banner.text
    assert window.controller.conversation.active_path()[-1].content  # type: ignore[union-attr]


def test_settings_saved_elsewhere_that_cannot_generate_are_fixed_on_opening(
    make_window: Any, fake_engine: FakeEngine
) -> None:
    fake_engine.max_context = 512
    window = make_window()
    window.model_settings = ModelSettings(context_length=512, max_new_tokens=512)
    dialog = open_settings(window)
    assert dialog.max_tokens.value() == 256
    assert "512 -> 256" in dialog.notice.text() and dialog.notice.isVisibleTo(dialog)


def test_typed_digits_are_kept_and_save_says_what_is_wrong(
    qtbot: Any, make_window: Any, fake_engine: FakeEngine
) -> None:
    fake_engine.max_context = 512
    window = make_window()
    saved: list[ModelSettings] = []
    dialog = open_settings(window)
    dialog.saved.connect(saved.append)
    dialog.tabs.setCurrentIndex(1)
    dialog.max_tokens.selectAll()
    qtbot.keyClicks(dialog.max_tokens, "99999999")
    assert dialog.max_tokens.text() == "99999999", "no digit is dropped while typing"
    dialog.accept()
    assert saved == [], "an impossible combination is not saved"
    assert "Max reply tokens (99999999)" in dialog.error_label.text()
    dialog.tabs.setCurrentIndex(0)
    dialog.context.selectAll()
    qtbot.keyClicks(dialog.context, "99999999")
    assert dialog.context.text() == "99999999"
    assert "maximum (512" in dialog.error_label.text(), "said at once, before Save"


def test_the_model_maximum_context_is_shown(make_window: Any, fake_engine: FakeEngine) -> None:
    fake_engine.max_context = 512
    dialog = open_settings(make_window())
    assert "up to 512" in dialog.context_hint.text()
