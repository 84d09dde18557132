"""Dead ends found walking the real app with GGUF files (round 5): what the Models window says
about a dense, unreadable or split GGUF, where a loaded file is listed, its width; reading
experts from the model file when they do not fit in RAM (the setting, the estimate, the offer
in the loading window and its layout); a broken last model at start; a GGUF model's settings;
the slider's curve with experts quantized at load."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt

from app.library_dialog import EXPERTS
from app.load_dialog import LoadDialog
from app.main_window import MainWindow
from app.settings import ModelSettings, SettingsStore, to_load_config
from app.settings_dialog import SettingsDialog
from tests.app.fake_engine import FakeEngine
from tests.app.test_layout_dead_ends import shows_whole_text
from tests.app.test_model_library import write_gguf
from tests.app.test_ui_windows import cell, open_library


def _short_of_memory(qtbot: Any, make_window: Any) -> tuple[MainWindow, LoadDialog]:
    """Start a window whose first load's estimate does not fit; wait for the choice."""
    window = make_window(start=False)
    window.start(None)
    qtbot.waitUntil(lambda: window.load_dialog.awaiting_choice, timeout=5000)
    return window, window.load_dialog


def _row(dialog: Any, name: str) -> int:
    names = [cell(dialog, r, 0) for r in range(dialog.table.rowCount())]
    return names.index(name)


def test_dense_and_unreadable_gguf_rows_say_why_once(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine, user_dirs: Path
) -> None:
    models = user_dirs / "data" / "models"
    write_gguf(models / "SmolLM2-Q8_0.gguf", moe=False, file_type=7, arch="llama")
    (models / "wrong-magic.gguf").write_bytes(b"GGML" + b"\0" * 64)
    dialog = open_library(window)
    dense, broken = _row(dialog, "SmolLM2-Q8_0"), _row(dialog, "wrong-magic")
    assert cell(dialog, dense, EXPERTS) == "dense (not MoE)"
    dialog.table.selectRow(dense)
    dialog._load_selected()  # a double-click
    message = dialog.message.text()
    assert message.startswith("SmolLM2-Q8_0 cannot be loaded: it is a dense llama model")
    assert message.count("cannot be loaded") == 1, message
    assert "Mixture-of-Experts" in dialog.load_button.toolTip()
    dialog.table.selectRow(broken)
    dialog._load_selected()
    assert "wrong-magic cannot be loaded: it cannot be read as GGUF: it starts with" in (
        dialog.message.text()
    )
    assert fake_engine.calls.loads[1:] == [], "nothing but the start-up load"


def test_split_sets_are_named_once_and_rows_show_where_the_file_is(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine, user_dirs: Path
) -> None:
    models = user_dirs / "data" / "models"
    for part in (1, 2):
        write_gguf(models / f"Mixtral-Q4_K_M-0000{part}-of-00002.gguf")
    dialog = open_library(window)
    row = _row(dialog, "Mixtral-Q4_K_M (2 parts)")
    item = dialog.table.item(row, 0)
    assert item is not None and str(models / "Mixtral-Q4_K_M-00001-of-00002.gguf") in (
        item.toolTip()
    )


def test_a_loaded_gguf_stays_listed_where_it_is_not_as_added(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine, user_dirs: Path
) -> None:
    gguf = write_gguf(user_dirs / "data" / "models" / "Qwen3-Q4_K_M.gguf")
    window.switch_model(str(gguf))
    qtbot.waitUntil(lambda: window.controller.ready and window.model_dir == gguf, timeout=5000)
    assert str(gguf) in window.prefs.model_folders, "remembered, as every loaded model is"
    dialog = open_library(window)
    row = _row(dialog, "● Qwen3-Q4_K_M (loaded)")
    assert cell(dialog, row, 1) == "models folder"
    dialog.table.selectRow(row)
    assert not dialog.remove_button.isEnabled(), "nothing to remove: it is in a scanned folder"


def test_loading_from_the_models_window_replaces_an_old_message(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine, user_dirs: Path
) -> None:
    models = user_dirs / "data" / "models"
    write_gguf(models / "SmolLM2-Q8_0.gguf", moe=False, file_type=7, arch="llama")
    write_gguf(models / "Qwen3-Q4_K_M.gguf")
    dialog = open_library(window)
    dialog.table.selectRow(_row(dialog, "SmolLM2-Q8_0"))
    dialog._load_selected()
    dialog.table.selectRow(_row(dialog, "Qwen3-Q4_K_M"))
    dialog._load_selected()
    assert dialog.message.text().startswith("Loading Qwen3-Q4_K_M"), dialog.message.text()
    qtbot.waitUntil(lambda: window.controller.ready, timeout=5000)
    assert fake_engine.calls.loads[-1].model_dir == models / "Qwen3-Q4_K_M.gguf"


def test_memory_mapped_experts_is_a_reload_setting_that_reaches_the_engine(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine, user_dirs: Path
) -> None:
    window.show_settings()
    dialog = window.dialogs["settings"]
    assert isinstance(dialog, SettingsDialog)
    assert not dialog.mmap_experts.isChecked(), "off by default"
    dialog.mmap_experts.setChecked(True)
    qtbot.waitUntil(
        lambda: "Host RAM for the experts: 0 B" in dialog.fit_label.text(), timeout=5000
    )
    loads = len(fake_engine.calls.loads)
    dialog.accept()
    qtbot.waitUntil(lambda: len(fake_engine.calls.loads) > loads, timeout=5000)
    assert fake_engine.calls.loads[-1].mmap_experts, "saving it reloads with mapped experts"
    stored = SettingsStore(user_dirs / "config").load_model(window.model_dir)
    assert stored.mmap_experts
    assert to_load_config(window.model_dir, ModelSettings()).mmap_experts is False


def test_experts_too_big_for_ram_are_offered_from_the_model_file(
    qtbot: Any, make_window: Any, fake_engine: FakeEngine
) -> None:
    fake_engine.host_free_bytes = 1_000  # the experts need more RAM than is free
    window, dialog = _short_of_memory(qtbot, make_window)
    assert dialog.mmap_button.isVisibleTo(dialog)
    status = dialog.status.text()
    assert "of RAM but only" in status and "from the model file" in status, status
    assert fake_engine.calls.loads == [], "nothing loads before the user chooses"
    qtbot.mouseClick(dialog.mmap_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: window.controller.ready, timeout=5000)
    call = fake_engine.calls.loads[-1]
    assert call.mmap_experts and not call.force, "mapped experts fit: no forced load"
    assert window.model_settings.mmap_experts, "and the choice is kept for this model"


def test_a_device_shortfall_does_not_offer_mapped_experts(
    qtbot: Any, make_window: Any, fake_engine: FakeEngine
) -> None:
    fake_engine.device_free_bytes = 100_000_000
    _window, dialog = _short_of_memory(qtbot, make_window)
    assert not dialog.mmap_button.isVisibleTo(dialog), "mapping experts frees RAM, not VRAM"
    assert "expert-cache budget" in dialog.status.text(), dialog.status.text()


def test_on_the_cpu_both_shortfalls_are_named_and_mapping_is_offered(
    qtbot: Any, make_window: Any, fake_engine: FakeEngine
) -> None:
    fake_engine.device_free_bytes, fake_engine.host_free_bytes = 100_000_000, 0
    _window, dialog = _short_of_memory(qtbot, make_window)
    status = dialog.status.text()
    assert "lower the expert-cache budget" in status and "of RAM but only 0 B" in status, status
    assert dialog.mmap_button.isVisibleTo(dialog)
    qtbot.waitUntil(lambda: shows_whole_text(dialog.status), timeout=2000)  # not clipped
    qtbot.waitUntil(lambda: shows_whole_text(dialog.estimate_label), timeout=2000)
    button = dialog.mmap_button
    assert button.width() >= button.sizeHint().width(), "the button's text is not cut"


def test_settings_file_with_a_bad_mmap_value_is_set_aside(user_dirs: Path) -> None:
    store = SettingsStore(user_dirs / "config")
    model = user_dirs / "some-model"
    store.save_model(model, replace(ModelSettings(), mmap_experts=True))
    assert store.load_model(model).mmap_experts
    path = next((user_dirs / "config" / "models").glob("*.json"))
    path.write_text(path.read_text().replace('"mmap_experts": true', '"mmap_experts": "yes"'))
    assert store.load_model(model) == ModelSettings()
    assert "mmap_experts must be true or false" in store.warnings[-1]


def test_a_gguf_models_settings_show_its_expert_format_not_none(
    qtbot: Any, user_dirs: Path
) -> None:
    from app.demo_engine import demo_info

    gguf = write_gguf(user_dirs / "data" / "models" / "Qwen3-Q4_K_M.gguf")
    info = replace(demo_info(gguf), expert_quant="Q4_K, Q6_K")
    dialog = SettingsDialog(ModelSettings(), gguf, info, None)
    qtbot.addWidget(dialog)
    assert not dialog.expert_quant.isEnabled()
    assert dialog.expert_quant.currentText() == "Q4_K, Q6_K, as stored in the file"
    assert dialog.current().expert_quant == "none", "the setting itself is left as it was"
    plain = SettingsDialog(ModelSettings(expert_quant="int4"), gguf, demo_info(gguf), None)
    qtbot.addWidget(plain)
    assert plain.expert_quant.isEnabled() and plain.current().expert_quant == "int4"


def test_a_broken_last_model_at_start_falls_back_to_the_builtin(
    qtbot: Any, make_window: Any, fake_engine: FakeEngine, user_dirs: Path
) -> None:
    broken = write_gguf(user_dirs / "data" / "models" / "truncated-Q4_K_M.gguf")
    fake_engine.broken[broken] = "truncated-Q4_K_M.gguf is truncated or corrupt: tensor 'x'"
    SettingsStore(user_dirs / "config").remember_model(broken)
    window = make_window(start=False)
    window.start(None)
    qtbot.waitUntil(lambda: window.controller.ready, timeout=5000)
    builtin = user_dirs / "builtin" / "understudy-mini-moe"
    assert [c.model_dir for c in fake_engine.calls.loads] == [builtin], "the working model"
    text = window.banner.text
    assert "truncated-Q4_K_M.gguf could not be loaded: truncated-Q4_K_M.gguf is truncated" in text
    assert "understudy-mini-moe was loaded instead." in text and "model folder" not in text, text
    assert "Loading" not in text, "it has loaded: the banner no longer says it is loading"
    assert window.load_dialog.estimate_label.text() != "Estimating memory…"


def test_a_broken_builtin_model_is_not_retried_forever(
    qtbot: Any, make_window: Any, fake_engine: FakeEngine, user_dirs: Path
) -> None:
    builtin = user_dirs / "builtin" / "understudy-mini-moe"
    fake_engine.broken[builtin] = "config.json is damaged"
    window = make_window(start=False)
    window.start(None)
    qtbot.waitUntil(lambda: "config.json is damaged" in window.banner.text, timeout=5000)
    assert not window.controller.ready and fake_engine.calls.loads == []
    assert "Model > Models…" in window.banner.text
    assert fake_engine.calls.inspected.count(builtin) == 1


def test_the_slider_marks_a_float_curve_shown_for_quantized_experts(
    qtbot: Any, user_dirs: Path
) -> None:
    import json

    from app.slider import ImportanceSlider

    model_dir = user_dirs / "builtin" / "understudy-mini-moe"
    point = {"alpha": 0.0, "top1_agreement": 1.0, "kl": 0.0, "bytes_per_token": 23.6e6}
    (model_dir / "understudy_curve.json").write_text(json.dumps({"points": [point]}))
    slider = ImportanceSlider()
    qtbot.addWidget(slider)
    slider.set_model(model_dir, model_dir.name, True, "int8")
    assert "moved" in slider.curve_label.text(), "the shipped curve is shown"
    assert "measured without int8 experts" in slider.curve_label.text()
    slider.set_model(model_dir, model_dir.name)
    assert "measured without" not in slider.curve_label.text(), "as stored: no note"


def test_loading_with_quantized_experts_reaches_the_slider(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine
) -> None:
    window.apply_model_settings(replace(window.model_settings, expert_quant="int4"))
    qtbot.waitUntil(lambda: fake_engine.calls.loads[-1].expert_quant == "int4", timeout=5000)
    qtbot.waitUntil(lambda: window.controller.ready, timeout=5000)
    assert window.slider.expert_quant == "int4"


def test_the_models_window_grows_to_show_every_column(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine, user_dirs: Path
) -> None:
    write_gguf(user_dirs / "data" / "models" / "Qwen3-30B-A3B-Instruct-2507-Q4_K_M.gguf")
    dialog = open_library(window)
    qtbot.waitUntil(lambda: "…" not in cell(dialog, dialog.table.rowCount() - 1, 6), timeout=5000)
    dialog.resize(500, dialog.height())  # a window narrower than its columns
    dialog._fit_columns()  # what a rescan or an inspected row does
    screen = dialog.screen().availableGeometry().width()
    header = dialog.table.horizontalHeader().length()
    assert dialog.width() > 500, "it grew"
    shown = dialog.table.viewport().width()
    assert shown >= header or dialog.width() >= screen - 40, (shown, header, dialog.width())
