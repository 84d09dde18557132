"""Dead ends left by the round-5 walk of the real app: a first token that takes a minute (the
reply counts the seconds), the slider showing the previous model's curve while another model
loads, the expert-cache line ignoring Quantize experts, and a "Loading X again/instead" banner
that stayed after X had loaded (the built-in fall-back: tests/app/test_gguf_walk.py)."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt

from app.chat_view import WAIT_TICK_MS
from app.main_window import MainWindow
from app.settings import ModelSettings
from app.settings_dialog import SettingsDialog, estimated_fit
from engine.events import MemoryEstimate
from tests.app.conftest import write_model_folder
from tests.app.fake_engine import FakeEngine
from tests.app.test_cancel_slow_load import start_slow_switch


def test_a_slow_first_token_shows_the_seconds_waited_and_stop_still_works(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine
) -> None:
    fake_engine.hold_tokens = True
    fake_engine.release.clear()  # the prompt is still being read: no token yet
    view = window.chat_view
    window.composer.text.setPlainText("a long question")
    window.composer.submit()
    qtbot.waitUntil(lambda: "Reading your message… 0 s" in view.toPlainText(), timeout=5000)
    view.stream_started -= 12  # as if twelve seconds had passed: the timer shows it, unasked
    counted = re.compile(r"Reading your message… 1[2-4] s")
    qtbot.waitUntil(lambda: bool(counted.search(view.toPlainText())), timeout=2 * WAIT_TICK_MS)
    assert window.composer.stop_button.isEnabled()
    qtbot.mouseClick(window.composer.stop_button, Qt.MouseButton.LeftButton)
    stopping = re.compile(r"Stopping once your message is read… 1[2-4] s")  # still counting
    assert stopping.search(view.toPlainText()), view.toPlainText()
    fake_engine.release.set()
    qtbot.waitUntil(lambda: not window.controller.generating, timeout=5000)
    assert "Stopping" not in view.toPlainText() and "Reading" not in view.toPlainText()


def test_the_count_gives_way_to_the_reply_and_stops_ticking(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine
) -> None:
    fake_engine.hold_tokens = True
    fake_engine.release.clear()
    view = window.chat_view
    window.composer.text.setPlainText("hello")
    window.composer.submit()
    qtbot.waitUntil(lambda: "Reading your message" in view.toPlainText(), timeout=5000)
    fake_engine.release.set()
    qtbot.waitUntil(lambda: not window.controller.generating, timeout=5000)
    assert "Hello there!" in view.toPlainText() and "Reading" not in view.toPlainText()
    assert not view._wait_timer.isActive()
    renders = view.render_count
    qtbot.wait(WAIT_TICK_MS + 200)
    assert view.render_count == renders, "no repaint each second once the reply is done"


def _ship_curve(window: MainWindow) -> str:
    """Give the loaded built-in model a shipped curve; returns what the slider says of it."""
    point = {"alpha": 0.0, "top1_agreement": 1.0, "kl": 0.0, "bytes_per_token": 23.6e6}
    (window.model_dir / "understudy_curve.json").write_text(json.dumps({"points": [point]}))
    window.slider.reload_curve()
    shown = window.slider.curve_label.text()
    assert "moved" in shown, shown
    return shown


def test_the_slider_shows_no_figures_while_another_model_loads(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine, user_dirs: Path
) -> None:
    slider = window.slider
    shipped = _ship_curve(window)
    big = write_model_folder(user_dirs / "models" / "big-moe")
    gate = start_slow_switch(qtbot, window, fake_engine, big)
    assert slider.curve is None and slider.curve_label.text().startswith("loading big-moe")
    assert shipped not in slider.curve_label.text() and slider.measure_button.isHidden()
    gate.set()
    qtbot.waitUntil(lambda: window.controller.ready, timeout=5000)
    assert slider.model_name == "big-moe" and slider.curve_label.text() == "not measured yet"


def test_a_load_that_keeps_the_working_model_shows_its_curve_again(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine, user_dirs: Path
) -> None:
    shipped = _ship_curve(window)
    broken = write_model_folder(user_dirs / "models" / "broken-moe")
    fake_engine.broken[broken] = "config.json is not a JSON object"
    window.switch_model(str(broken))
    assert window.slider.curve_label.text().startswith("loading broken-moe")
    qtbot.waitUntil(lambda: not window.loader.busy, timeout=5000)
    assert "understudy-mini-moe is still loaded" in window.banner.text
    assert window.slider.curve_label.text() == shipped


def _estimate(slots: int, total: int) -> MemoryEstimate:
    return MemoryEstimate("cuda", 1, 1, 1, 1, None, None, expert_slots=slots, total_experts=total)


class EstimatingBridge:
    """A bridge whose estimate gives more slots when experts are quantized, as the engine's."""

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self.configs: list[Any] = []

    async def estimate(self, config: Any) -> MemoryEstimate:
        self.configs.append(config)
        return _estimate({"none": 20, "int8": 38, "int4": 64}[config.expert_quant], 64)


def test_the_cache_line_counts_the_experts_the_estimate_says_fit(
    qtbot: Any, aloop: Any, user_dirs: Path
) -> None:
    folder = write_model_folder(user_dirs / "models" / "plain-moe")
    bridge = EstimatingBridge(aloop)
    dialog = SettingsDialog(ModelSettings(cache_budget_gb=0.96), folder, None, bridge)  # type: ignore[arg-type]
    qtbot.addWidget(dialog)
    dialog.update_fit()
    qtbot.waitUntil(lambda: "holds 20 of 64" in dialog.fit_label.text(), timeout=5000)
    dialog.expert_quant.setCurrentText("int8")
    qtbot.waitUntil(lambda: "holds 38 of 64 experts (59%)" in dialog.fit_label.text(), timeout=5000)
    assert bridge.configs[-1].expert_quant == "int8" and bridge.configs[-1].cache.budget_gb == 0.96


def test_the_cache_line_falls_back_to_the_checkpoint_guess_without_a_count() -> None:
    from app.demo_engine import demo_info

    info = demo_info(Path("mini"))
    old_engine = MemoryEstimate("cuda", 1, 1, 1, 1, None, None)  # e.g. a server without slots
    assert estimated_fit(old_engine, info, 0.96) == estimated_fit(_estimate(0, 0), info, 0.96)
    assert "holds 20 of 64" in estimated_fit(old_engine, info, 0.96)
    assert estimated_fit(old_engine, None, 0.96) == ""
    assert estimated_fit(_estimate(7, 64), info, 0.96).startswith("The expert cache holds 7 of 64")


def test_a_cancelled_switch_says_the_previous_model_was_loaded_again(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine, user_dirs: Path
) -> None:
    big = write_model_folder(user_dirs / "models" / "big-moe")
    gate: threading.Event = start_slow_switch(qtbot, window, fake_engine, big)
    window.loader.cancel()
    assert "Loading understudy-mini-moe again." in window.banner.text
    gate.set()
    qtbot.waitUntil(lambda: window.controller.ready and not window.loader.busy, timeout=5000)
    assert window.banner.text == "Loading was cancelled.\nunderstudy-mini-moe was loaded again."


def test_a_banner_replaced_meanwhile_is_left_alone(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine, user_dirs: Path
) -> None:
    big = write_model_folder(user_dirs / "models" / "big-moe")
    gate = start_slow_switch(qtbot, window, fake_engine, big)
    window.loader.cancel()
    window.banner.show_message("Could not save the chat.", "error")  # something newer
    gate.set()
    qtbot.waitUntil(lambda: window.controller.ready and not window.loader.busy, timeout=5000)
    assert window.banner.text == "Could not save the chat."
