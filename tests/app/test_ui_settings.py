"""The settings dialog: saved per model, survives a restart, live vs reload, template errors,
what fits; the importance slider moving alpha live; the live panel."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from app.curves import Curve, CurvePoint, save_curve
from app.main_window import MainWindow
from app.settings import SettingsStore
from app.settings_dialog import SettingsDialog
from app.telemetry import GpuTelemetry
from tests.app.fake_engine import FakeEngine


def open_settings(window: MainWindow) -> SettingsDialog:
    window.show_settings()
    dialog = window.dialogs["settings"]
    assert isinstance(dialog, SettingsDialog)
    return dialog


def test_settings_are_saved_per_model_and_survive_a_restart(
    qtbot: Any, make_window: Any, fake_engine: FakeEngine
) -> None:
    window = make_window()
    dialog = open_settings(window)
    dialog.temperature.setValue(0.25)
    dialog.max_tokens.setValue(77)
    dialog.system_prompt.setPlainText("Be terse.")
    dialog.accept()
    window.close()
    again = make_window()
    assert again.model_settings.temperature == 0.25
    assert again.model_settings.system_prompt == "Be terse."
    assert open_settings(again).max_tokens.value() == 77
    other = SettingsStore(Path(os.environ["UNDERSTUDY_CONFIG_DIR"])).load_model("/elsewhere")
    assert other.temperature == 0.7, "another model keeps its own settings"


def test_sampling_settings_reach_the_next_request(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine
) -> None:
    dialog = open_settings(window)
    dialog.top_k.setValue(5)
    dialog.accept()
    window.composer.text.setPlainText("hi")
    window.composer.submit()
    qtbot.waitUntil(lambda: not window.controller.generating, timeout=5000)
    assert fake_engine.calls.requests[-1].sampling.top_k == 5


def test_reload_settings_reload_and_live_settings_do_not(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine
) -> None:
    loads = len(fake_engine.calls.loads)
    dialog = open_settings(window)
    dialog.policy.setCurrentText("lru")
    dialog.accept()
    assert len(fake_engine.calls.loads) == loads, "a live setting needs no reload"
    assert fake_engine.calls.live[-1].policy == "lru"
    dialog = open_settings(window)
    assert "⟳" in "".join(label.text() for label in dialog.findChildren(type(dialog.fit_label)))
    dialog.context.setValue(4096)
    dialog.accept()
    qtbot.waitUntil(lambda: len(fake_engine.calls.loads) == loads + 1, timeout=5000)
    qtbot.waitUntil(lambda: window.controller.ready, timeout=5000)
    assert fake_engine.calls.loads[-1].context_length == 4096


def test_template_errors_are_shown_and_a_good_template_renders(
    qtbot: Any, window: MainWindow
) -> None:
    dialog = open_settings(window)
    dialog.template.setPlainText("{% for m in messages %}{{ m.content }")
    dialog.start_preview()
    qtbot.waitUntil(lambda: "Template error" in dialog.template_status.text(), timeout=5000)
    dialog.template.setPlainText("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}")
    dialog.start_preview()
    qtbot.waitUntil(lambda: dialog.template_status.text() == "The template renders.", timeout=5000)
    assert dialog.preview.toPlainText() == "[system]You are helpful.[user]Hello!"


def test_what_fits_is_shown_for_the_budget(qtbot: Any, window: MainWindow) -> None:
    dialog = open_settings(window)
    dialog.budget.setValue(0.96)  # 20 experts of 48 MB
    dialog.update_fit()
    qtbot.waitUntil(lambda: "CUDA memory: needs" in dialog.fit_label.text(), timeout=5000)
    assert "holds 20 of 64 experts" in dialog.fit_label.text()
    assert "It fits." in dialog.fit_label.text()


def test_invalid_values_are_refused_in_the_dialog(window: MainWindow) -> None:
    dialog = open_settings(window)
    dialog.policy.addItem("bogus")
    dialog.policy.setCurrentText("bogus")
    dialog.accept()
    assert "Policy must be one of" in dialog.error_label.text()


def test_full_disk_on_save_is_shown_and_the_old_file_kept(
    window: MainWindow, monkeypatch: pytest.MonkeyPatch
) -> None:
    dialog = open_settings(window)
    dialog.temperature.setValue(0.4)
    dialog.accept()
    (saved,) = (Path(os.environ["UNDERSTUDY_CONFIG_DIR"]) / "models").glob("*.json")
    before = saved.read_text()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    dialog = open_settings(window)
    dialog.temperature.setValue(0.9)
    dialog.accept()
    assert "the disk is full" in window.banner.text
    assert saved.read_text() == before


def test_slider_moves_alpha_live_and_remembers_it(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine
) -> None:
    assert "exact" in window.slider.value_label.text()
    window.slider.slider.setValue(6)  # 0.30
    assert fake_engine.calls.live[-1].alpha == pytest.approx(0.3)
    assert fake_engine.live.alpha == pytest.approx(0.3)
    assert window.slider.value_label.text() == "α = 0.30"
    store = SettingsStore(Path(os.environ["UNDERSTUDY_CONFIG_DIR"]))
    assert store.load_model(window.model_dir).alpha == pytest.approx(0.3)


def test_slider_changes_alpha_between_tokens_of_one_reply(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine
) -> None:
    fake_engine.replies = iter([" ".join(["x"] * 200)])
    fake_engine.token_delay = 0.01
    window.composer.text.setPlainText("go")
    window.composer.submit()
    qtbot.waitUntil(lambda: window.controller.timing.tokens >= 5, timeout=5000)
    window.slider.slider.setValue(12)
    qtbot.waitUntil(lambda: fake_engine.stats().substitutions > 0, timeout=5000)
    window.controller.stop()
    qtbot.waitUntil(lambda: not window.controller.generating, timeout=5000)
    assert fake_engine.stats().substitutions > 0, "the running reply used the new alpha"


def test_slider_shows_the_measured_curve_or_offers_to_measure(
    qtbot: Any, aloop: Any, window: MainWindow, user_dirs: Path
) -> None:
    slider = window.slider
    assert slider.curve_label.text() == "not measured yet"
    assert slider.measure_button.isVisibleTo(slider) and not slider.measure_button.isEnabled()
    measured: list[Path] = []

    async def measure(model_dir: Path) -> None:
        measured.append(model_dir)
        points = (CurvePoint(0.0, 10.0, None, 1.0, 0.0), CurvePoint(0.3, 13.0, None, 0.98, 0.01))
        save_curve(Curve(slider.model_name, points, "cuda", "2026-11-28T10:00Z", None, "GPU X"))

    slider.measure = measure
    slider.reload_curve()
    slider.start_measure()
    qtbot.waitUntil(lambda: slider.task is None, timeout=5000)
    assert measured == [window.model_dir]
    source = "(benchmark curve (GPU X, 2026-11-28))"  # where the figures come from: not live
    assert slider.curve_label.text() == (
        f"10.0 tok/s, top-1 agreement 100.0%, perplexity +0.0% {source}"
    )
    assert slider.right_end.text() == "faster, approximate"  # a GPU curve trades speed
    slider.slider.setValue(6)
    assert (
        slider.curve_label.text() == f"13.0 tok/s, top-1 agreement 98.0%, perplexity +1.0% {source}"
    )
    assert not slider.measure_button.isVisibleTo(slider)
    slider.slider.setValue(3)  # 0.15: between the points measured at 0 and 0.3
    assert slider.curve_label.text().startswith("≈ 11.5 tok/s, top-1 agreement 99.0%")
    assert slider.curve_label.text().endswith(
        "(between measured points; benchmark curve (GPU X, 2026-11-28))"
    )
    slider.slider.setValue(8)  # 0.40: beyond the measured range
    assert slider.curve_label.text() == "not measured yet"
    assert slider.measure_button.isVisibleTo(slider)


def test_panel_without_nvml_says_so_and_shows_engine_counters(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine
) -> None:
    window.composer.text.setPlainText("hi")
    window.composer.submit()
    qtbot.waitUntil(lambda: not window.controller.generating, timeout=5000)
    window.panel.update_readings()
    labels = window.panel.labels
    assert "No NVIDIA GPU found" in window.panel.gpu_note.text()
    assert labels["VRAM"].text() == "n/a"
    assert labels["hit rate"].text().endswith("%") and labels["hit rate"].text() != "0.0%"
    assert "MB" in labels["moved/token"].text()
    assert " / " in labels["RAM"].text()
    assert float(labels["tok/s"].text()) > 0


class FakeNvml(dict):  # type: ignore[type-arg]
    """NVML with one GPU whose PCIe counters are unsupported."""

    class NVMLError(Exception):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    NVML_PCIE_UTIL_TX_BYTES, NVML_PCIE_UTIL_RX_BYTES = 0, 1

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return "gpu0"

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> Any:
        return type("Memory", (), {"used": 3_000_000_000, "total": 24_000_000_000})()

    def nvmlDeviceGetName(self, handle: str) -> bytes:
        return b"NVIDIA Test GPU"

    def nvmlDeviceGetPcieThroughput(self, handle: str, counter: int) -> int:
        raise self.NVMLError_NotSupported()

    def nvmlShutdown(self) -> None:
        pass


def test_panel_with_nvml_shows_vram_and_says_pcie_is_unsupported(
    qtbot: Any, make_window: Any
) -> None:
    window = make_window(telemetry=GpuTelemetry(nvml=FakeNvml()))
    window.panel.update_readings()
    assert window.panel.labels["GPU"].text() == "NVIDIA Test GPU"
    assert window.panel.labels["VRAM"].text() == "3.0 GB / 24.0 GB"
    assert window.panel.labels["PCIe TX"].text() == "not supported"
    assert "PCIe throughput is not supported" in window.panel.gpu_note.text()


def test_panel_plots_fill_while_generating(
    qtbot: Any, window: MainWindow, fake_engine: FakeEngine
) -> None:
    fake_engine.replies = iter([" ".join(["y"] * 150)])
    fake_engine.token_delay = 0.01
    window.composer.text.setPlainText("go")
    window.composer.submit()
    qtbot.waitUntil(lambda: window.controller.timing.tokens > 20, timeout=5000)
    window.panel.update_readings()
    window.panel.update_readings()
    window.controller.stop()
    qtbot.waitUntil(lambda: not window.controller.generating, timeout=5000)
    assert len(window.panel.plots["tok/s"].values) >= 1
    assert len(window.panel.plots["hit rate"].values) >= 2


def test_panel_shows_allocator_and_pinned_memory_when_the_engine_reports_them(
    window: MainWindow, fake_engine: FakeEngine
) -> None:
    from dataclasses import replace as with_fields

    fake_engine._stats.change(
        lambda s: with_fields(
            s, device_allocated_bytes=2_500_000_000, pinned_host_bytes=4_000_000_000
        )
    )
    window.panel.update_readings()
    assert window.panel.labels["allocator"].text() == "2.5 GB"
    assert window.panel.labels["pinned"].text() == "4.0 GB"


def test_a_model_that_cannot_substitute_keeps_the_slider_at_exact(
    qtbot: Any, make_window: Any, fake_engine: FakeEngine
) -> None:
    fake_engine.substitution_supported = False
    window = make_window()
    assert not window.slider.slider.isEnabled()
    assert "does not support substitution" in window.slider.curve_label.text()
    window.slider.slider.setValue(4)  # e.g. from the keyboard; the engine refuses
    assert "cannot substitute" in window.banner.text
    assert window.slider.alpha == 0.0 and window.model_settings.alpha == 0.0
    assert fake_engine.live.alpha == 0.0


def test_mapped_and_quantized_experts_are_chosen_together_in_the_dialog(
    window: MainWindow,
) -> None:
    dialog = open_settings(window)
    dialog.expert_quant.setCurrentText("int8")
    dialog.mmap_experts.setChecked(True)
    assert dialog.check(), dialog.error_label.text()
    shown = dialog.current()
    assert (shown.expert_quant, shown.mmap_experts) == ("int8", True)
