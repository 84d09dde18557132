"""The live panel: GPU memory and PCIe traffic (NVML), host RAM, expert-cache counters and
speed, with small time plots updated while a reply is generated.

Readings come from injected sources (engine stats, the reply's timing, NVML), so the panel
can be tested with fakes. Without NVML it says so and shows what it can.

The panel's width does not follow its readings: each reading's label asks for the width of the
widest text it shows (``WIDEST``, measured in its current font), and the GPU name wraps, so
loading a model or starting a reply does not shift the chat beside it.
"""

from __future__ import annotations

from collections.abc import Callable

from PySide6.QtCore import QSize, QTimer
from PySide6.QtWidgets import QFormLayout, QGroupBox, QLabel, QVBoxLayout, QWidget

from app.chat_controller import StreamTiming
from app.model_library import human_bytes
from app.sparkline import Sparkline
from app.telemetry import GpuSample, GpuTelemetry, HostSample, host_sample
from engine.events import StatsSnapshot

BUSY_INTERVAL_MS = 250
IDLE_INTERVAL_MS = 2000
# the widest texts each reading usually shows, reserved from the start ("not available
# remotely", shown only with a remote engine, may still widen it)
WIDEST = {
    "VRAM": ("99.9 GB / 99.9 GB",),
    "allocator": ("not reported", "999.9 GB"),
    "PCIe TX": ("not supported", "999.9 GB/s"),
    "PCIe RX": ("not supported", "999.9 GB/s"),
    "RAM": ("99.9 GB / 99.9 GB",),
    "pinned": ("not reported", "999.9 GB"),
    "hit rate": ("no model loaded", "100.0%"),
    "substitutions/token": ("no model loaded", "99.99"),
    "moved/token": ("no model loaded", "999.9 MB"),
    "misses/token": ("no model loaded", "99.99"),
    "cache": ("999 slots, 999.9 MB", "99 slots, 99.9 GB"),
    "tok/s": ("9999.9",),
    "first token": ("99999 ms",),
}


def rate(value: float | None) -> str:
    return "not supported" if value is None else f"{human_bytes(value)}/s"


class ReadingLabel(QLabel):
    """A reading that asks for the width of its widest text from the start (none: it wraps)."""

    def __init__(self, widest: tuple[str, ...]) -> None:
        super().__init__("–")
        self.widest = widest
        self.setWordWrap(not widest)

    def _reserved(self, hint: QSize) -> QSize:
        if not self.widest:
            return hint
        metrics, margins = self.fontMetrics(), self.contentsMargins()
        text = max(metrics.horizontalAdvance(t) for t in self.widest)
        width = text + margins.left() + margins.right() + 2 * self.margin()
        return QSize(max(hint.width(), width), hint.height())

    def minimumSizeHint(self) -> QSize:
        return self._reserved(super().minimumSizeHint())

    def sizeHint(self) -> QSize:
        return self._reserved(super().sizeHint())


class LivePanel(QWidget):
    def __init__(
        self,
        telemetry: GpuTelemetry,
        stats: Callable[[], StatsSnapshot | None],
        timing: Callable[[], StreamTiming],
        host: Callable[[], HostSample] = host_sample,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.telemetry, self.stats_source, self.timing_source, self.host = (
            telemetry,
            stats,
            timing,
            host,
        )
        self.generating = False
        self.engine_note: str | None = None  # shown instead of the cache counters (remote)
        self.labels: dict[str, QLabel] = {}
        self.plots = {
            "tok/s": Sparkline("#2e9d5b"),
            "hit rate": Sparkline("#3d8bfd"),
            "moved/token": Sparkline("#d9822b"),
            "PCIe": Sparkline("#b04fd1"),
        }
        self.gpu_note = QLabel()
        self.gpu_note.setWordWrap(True)
        self._build()
        self.timer = QTimer(self)
        self.timer.timeout.connect(self.update_readings)
        self.timer.start(IDLE_INTERVAL_MS)

    def _group(self, title: str, names: tuple[str, ...]) -> QGroupBox:
        box = QGroupBox(title)
        form = QFormLayout(box)
        for name in names:
            self.labels[name] = ReadingLabel(WIDEST.get(name, ()))
            form.addRow(name, self.labels[name])
        return box

    def _build(self) -> None:
        layout = QVBoxLayout(self)
        layout.addWidget(self._group("GPU", ("GPU", "VRAM", "allocator", "PCIe TX", "PCIe RX")))
        layout.addWidget(self.gpu_note)
        layout.addWidget(self._group("Host", ("RAM", "pinned")))
        cache = ("hit rate", "substitutions/token", "moved/token", "misses/token", "cache")
        layout.addWidget(self._group("Expert cache", cache))
        layout.addWidget(self._group("Speed", ("tok/s", "first token")))
        plots = QGroupBox("While generating")
        form = QFormLayout(plots)
        for name, plot in self.plots.items():
            form.addRow(name, plot)
        layout.addWidget(plots)
        layout.addStretch(1)

    def set_generating(self, generating: bool) -> None:
        self.generating = generating
        self.timer.start(BUSY_INTERVAL_MS if generating else IDLE_INTERVAL_MS)
        if generating:
            for plot in self.plots.values():
                plot.clear()
        self.update_readings()

    def update_readings(self) -> None:
        self._show_gpu(self.telemetry.sample())
        self._show_host(self.host())
        stats = self.stats_source()
        self._show_engine(stats)
        self._show_speed(stats, self.timing_source())

    def _set(self, name: str, text: str) -> None:
        self.labels[name].setText(text)
        self.labels[name].setToolTip(text)

    def _show_gpu(self, gpu: GpuSample | None) -> None:
        if gpu is None:
            self.gpu_note.setText(self.telemetry.reason)
            for name in ("GPU", "VRAM", "PCIe TX", "PCIe RX"):
                self._set(name, "n/a")
            return
        self.gpu_note.setText(self.telemetry.pcie_note)
        self._set("GPU", gpu.name)
        self._set(
            "VRAM", f"{human_bytes(gpu.vram_used_bytes)} / {human_bytes(gpu.vram_total_bytes)}"
        )
        self._set("PCIe TX", rate(gpu.pcie_tx_bytes_per_s))
        self._set("PCIe RX", rate(gpu.pcie_rx_bytes_per_s))
        if self.generating and gpu.pcie_tx_bytes_per_s is not None:
            self.plots["PCIe"].add(gpu.pcie_tx_bytes_per_s + (gpu.pcie_rx_bytes_per_s or 0.0))

    def _show_host(self, host: HostSample) -> None:
        if host.ram_total_bytes is None:
            self._set("RAM", "not available on this system")
        else:
            used, total = human_bytes(host.ram_used_bytes), human_bytes(host.ram_total_bytes)
            self._set("RAM", f"{used} / {total}")

    def _show_engine(self, stats: StatsSnapshot | None) -> None:
        if stats is None or self.engine_note is not None:
            names = ("hit rate", "substitutions/token", "moved/token", "misses/token")
            for name in names + (("cache",) if stats is None else ()):  # no stale slot count
                self._set(name, "no model loaded" if stats is None else "not available remotely")
            self.gpu_note.setText(self.engine_note or self.gpu_note.text())
            return
        allocated, pinned = stats.device_allocated_bytes, stats.pinned_host_bytes
        self._set("allocator", "not reported" if allocated is None else human_bytes(allocated))
        self._set("pinned", "not reported" if pinned is None else human_bytes(pinned))
        self._set("hit rate", f"{stats.hit_rate * 100:.1f}%")
        self._set("substitutions/token", f"{stats.substitutions_per_token:.2f}")
        self._set("moved/token", f"{human_bytes(stats.bytes_per_token)}")
        self._set("misses/token", f"{stats.misses_per_token:.2f}")
        self._set("cache", f"{stats.cache_slots} slots, {human_bytes(stats.cache_bytes)}")
        if self.generating and stats.tokens:
            self.plots["hit rate"].add(stats.hit_rate * 100)
            self.plots["moved/token"].add(stats.bytes_per_token)

    def _show_speed(self, stats: StatsSnapshot | None, timing: StreamTiming) -> None:
        live = timing.tokens_per_second if self.generating else 0.0
        speed = live or (stats.tokens_per_second if stats is not None else 0.0)
        first = timing.time_to_first_token or (stats.time_to_first_token_s if stats else 0.0)
        self._set("tok/s", f"{speed:.1f}")
        self._set("first token", f"{first * 1000:.0f} ms" if first else "–")
        if self.generating and live:
            self.plots["tok/s"].add(live)
