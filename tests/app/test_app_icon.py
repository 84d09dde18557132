"""The window icon comes from the shipped PNG renders, at every size the installers use."""

from __future__ import annotations

from PySide6.QtCore import QSize
from PySide6.QtWidgets import QApplication

from app.application import app_icon


def test_app_icon_has_the_shipped_sizes(qapp: QApplication) -> None:
    icon = app_icon()
    assert not icon.isNull(), "resources/icons/png holds no loadable icon"
    sizes = set(icon.availableSizes())
    assert {QSize(16, 16), QSize(256, 256)} <= sizes, sizes
