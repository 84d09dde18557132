"""A tiny time plot drawn with QPainter: the last N values of one reading."""

from __future__ import annotations

from collections import deque

from PySide6.QtCore import QPointF, QSize
from PySide6.QtGui import QColor, QPainter, QPaintEvent, QPen, QPolygonF
from PySide6.QtWidgets import QSizePolicy, QWidget


class Sparkline(QWidget):
    def __init__(self, color: str = "#3d8bfd", length: int = 120, parent: QWidget | None = None):
        super().__init__(parent)
        self.values: deque[float] = deque(maxlen=length)
        self.color = QColor(color)
        self.setMinimumHeight(28)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def sizeHint(self) -> QSize:
        return QSize(160, 28)

    def add(self, value: float) -> None:
        self.values.append(float(value))
        self.update()

    def clear(self) -> None:
        self.values.clear()
        self.update()

    def points(self, width: float, height: float) -> list[QPointF]:
        """Plot coordinates: oldest value at the left, the range scaled to the height."""
        if not self.values:
            return []
        low = min(0.0, min(self.values))
        top = max(self.values) * 1.15 if max(self.values) > 0 else max(self.values)
        span = (top - low) or 1.0
        step = width / max(1, len(self.values) - 1)
        return [
            QPointF(i * step, height - 2 - (v - low) / span * (height - 4))
            for i, v in enumerate(self.values)
        ]

    def paintEvent(self, event: QPaintEvent) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        painter.setPen(QPen(self.palette().mid().color(), 1))
        painter.drawRect(self.rect().adjusted(0, 0, -1, -1))
        points = self.points(float(self.width()), float(self.height()))
        if len(points) > 1:
            painter.setPen(QPen(self.color, 1.5))
            painter.drawPolyline(QPolygonF(points))
        painter.end()
