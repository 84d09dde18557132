"""The importance slider: alpha from 0 (exact) to 0.6, applied live between tokens.

At each position it shows the speed and fidelity measured for the loaded model (from its
benchmark curve, see ``app.curves``) or "not measured yet" with a Measure button. The
measurement itself is an injected coroutine function, so the fidelity harness can be plugged
in without this widget knowing it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from PySide6.QtCore import QEvent, Qt, Signal
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSlider,
    QVBoxLayout,
    QWidget,
)

from app.curves import Curve, CurveError, axis_labels, curve_source, describe, load_curve
from app.measure import MeasureCancelled, MeasureProgress, describe_progress
from app.tasks import start_task
from engine.config import ALPHA_MAX

STEP = 0.05
Measurer = Callable[[Path], Awaitable[None]]  # model folder -> writes the curve file


UNSUPPORTED = "this model's router family does not support substitution: exact only"


AXIS_GAP = 24  # px between the two end labels at the slider's narrowest


def alpha_label(alpha: float) -> str:
    return "α = 0 (exact)" if alpha == 0 else f"α = {alpha:.2f}"


class ImportanceSlider(QWidget):
    alpha_changed = Signal(float)

    def __init__(self, measure: Measurer | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.measure = measure
        self.curve: Curve | None = None
        self.curve_error = ""
        self.supported = True
        self.model_dir: Path | None = None
        self.model_name = ""
        self.expert_quant = "none"  # quantized at load: the curve's figures are not for it
        self.loading = ""  # a model being loaded: no figures until its info is known
        self.task: asyncio.Task[None] | None = None
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setRange(0, round(ALPHA_MAX / STEP))
        self.slider.setTickPosition(QSlider.TickPosition.TicksBelow)
        self.slider.setTickInterval(2)
        self.value_label = QLabel(alpha_label(0.0))
        self.curve_label = QLabel("no model loaded")
        self.curve_label.setWordWrap(True)
        self.measure_button = QPushButton("Measure")
        self.measure_button.setToolTip(
            "Measure speed and fidelity at four α in a separate process (a few minutes on a "
            "CPU): progress and time left are shown, Cancel stops it."
        )
        self.measure_button.clicked.connect(self.start_measure)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setTextVisible(False)
        self.progress.setMaximumWidth(120)
        self.progress.setVisible(False)
        self.slider.valueChanged.connect(self._moved)
        self._layout()
        self._refresh()

    def _layout(self) -> None:
        left, right = axis_labels(None)  # the words follow the curve's device (reload_curve)
        self.left_end, self.right_end = QLabel(left), QLabel(right)
        ends = QHBoxLayout()
        ends.setSpacing(AXIS_GAP)
        ends.addWidget(self.left_end)
        ends.addStretch(1)
        ends.addWidget(self.right_end)
        column = QVBoxLayout()
        column.setContentsMargins(0, 0, 0, 0)
        column.setSpacing(0)
        column.addWidget(self.slider)
        column.addLayout(ends)
        self._fit_value_label()
        title = QLabel("<b>Importance</b>")
        title.setToolTip("How freely experts that miss the GPU cache may be substituted.")
        row = QHBoxLayout()
        row.addWidget(title)
        row.addLayout(column, 1)
        row.addWidget(self.value_label)
        row.addWidget(self.progress)
        row.addWidget(self.measure_button)
        # the caption gets a line of its own: beside the slider it was squeezed into a column
        # (nine lines while measuring) and its minimum width took the chat list's
        rows = QVBoxLayout(self)
        rows.setContentsMargins(4, 2, 4, 2)
        rows.setSpacing(2)
        rows.addLayout(row)
        rows.addWidget(self.curve_label)

    def _fit_value_label(self) -> None:
        """One width for every value (for the current font): a label that followed its text
        made the caption beside it re-wrap, and the chat below jump, while dragging."""
        texts = [alpha_label(alpha) for alpha in (0.0, 0.55, ALPHA_MAX)]
        widest = max(self.fontMetrics().horizontalAdvance(t) for t in texts)  # the label's font
        self.value_label.setFixedWidth(widest + 2 * self.value_label.margin() + 4)

    def changeEvent(self, event: QEvent) -> None:
        if event.type() == QEvent.Type.FontChange:  # Settings changed the font size
            self._fit_value_label()
        super().changeEvent(event)

    @property
    def alpha(self) -> float:
        return round(self.slider.value() * STEP, 4)

    def set_alpha(self, alpha: float) -> None:
        """Show ``alpha`` without emitting ``alpha_changed`` (e.g. after loading settings)."""
        self.slider.blockSignals(True)
        self.slider.setValue(round(alpha / STEP))
        self.slider.blockSignals(False)
        self._refresh()

    def set_model(
        self, model_dir: Path | None, name: str, supported: bool = True, expert_quant: str = "none"
    ) -> None:
        """Show the curve of this model; a model that cannot substitute stays at exact.

        ``expert_quant``: the scheme its experts were quantized with at load. Curves are
        measured on the checkpoint as stored, so their figures are marked as such then.
        """
        self.model_dir, self.model_name, self.supported = model_dir, name, supported
        self.expert_quant, self.loading = expert_quant, ""
        self.slider.setEnabled(supported)
        self.slider.setToolTip("" if supported else UNSUPPORTED)
        self.reload_curve()

    def set_loading(self, name: str) -> None:
        """A model is loading: the figures shown so far were the previous model's, so clear
        them until ``set_model`` says which model is loaded."""
        self.model_dir, self.model_name, self.expert_quant = None, "", "none"
        self.loading = name
        self.reload_curve()

    def reload_curve(self) -> None:
        self.curve, self.curve_error = None, ""
        if self.model_name:
            try:
                self.curve = load_curve(self.model_name, model_dir=self.model_dir)
            except CurveError as error:
                self.curve_error = f"benchmark curve unreadable: {error}"
        self.right_end.setText(axis_labels(self.curve)[1])
        self._refresh()

    def _moved(self, _value: int) -> None:
        self._refresh()
        self.alpha_changed.emit(self.alpha)

    def _refresh(self) -> None:
        self.value_label.setText(alpha_label(self.alpha))
        point = self.curve.at(self.alpha) if self.curve is not None else None
        between = self.curve.between(self.alpha) if self.curve and point is None else None
        if self.loading:
            text = f"loading {self.loading}: its speed and fidelity show once it is loaded"
        elif not self.model_name:
            text = "no model loaded"
        elif not self.supported:
            text = UNSUPPORTED
        elif self.curve_error:
            text = self.curve_error
        elif between is not None and self.curve is not None:
            text = f"≈ {describe(between, self.curve)} (between measured points; "
            text += f"{curve_source(self.curve)})"
        elif point is not None and self.curve is not None:
            text = f"{describe(point, self.curve)} ({curve_source(self.curve)})"
        else:
            text = describe(None)
        measured = point is not None or between is not None
        if measured and self.supported and self.expert_quant != "none":
            text += f"; measured without {self.expert_quant} experts, which move fewer bytes"
        self.curve_label.setText(text)
        self.measure_button.setVisible(bool(self.model_name) and self.supported and not measured)
        self.measure_button.setEnabled(self.measure is not None)
        if self.measure is None:
            self.measure_button.setToolTip("No measurement tool is available in this build.")

    def start_measure(self) -> None:
        if self.measure is None or self.model_dir is None:
            return
        if self.task is not None:
            self.cancel_measure()
            return
        if hasattr(self.measure, "on_progress"):
            self.measure.on_progress = self.show_progress  # type: ignore[attr-defined]
        self.curve_label.setText("Measuring in a separate process…")
        self.measure_button.setText("Cancel")
        self.progress.setValue(0)
        self.progress.setVisible(True)
        self.task = start_task(self, self._measure(self.model_dir))

    def show_progress(self, progress: MeasureProgress) -> None:
        if self.task is None:
            return  # a late report after the measurement ended
        self.progress.setValue(round(progress.fraction * 1000))
        self.curve_label.setText(describe_progress(progress))

    def cancel_measure(self) -> None:
        """Stop the measurement: through the measurer's own ``cancel`` when it has one."""
        cancel = getattr(self.measure, "cancel", None)
        if callable(cancel):
            cancel()
        elif self.task is not None:
            self.task.cancel()  # the widget may be going away: no UI work in the task
            self._measured("measurement cancelled")

    async def _measure(self, model_dir: Path) -> None:
        assert self.measure is not None, "checked in start_measure"
        try:
            await self.measure(model_dir)
        except MeasureCancelled:
            self._measured("measurement cancelled")
            return
        except Exception as error:
            self._measured(f"measurement failed: {error}")
            return
        self._measured("")

    def _measured(self, problem: str) -> None:
        self.task = None
        self.progress.setVisible(False)
        self.measure_button.setText("Measure")
        self.reload_curve()
        if problem:
            self.curve_label.setText(problem)
