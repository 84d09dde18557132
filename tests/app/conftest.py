"""Fixtures for the app's UI tests: offscreen Qt, a qasync loop, temp user folders, the fake
engine and a ready main window. Qt warnings fail the test that caused them."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest
import qasync
from PySide6.QtCore import QtMsgType
from PySide6.QtWidgets import QApplication

from app.bridge import EngineBridge
from app.chat_store import ChatStore
from app.main_window import MainWindow
from app.settings import SettingsStore
from app.telemetry import GpuTelemetry
from tests.app.fake_engine import FakeEngine

# Warnings of the offscreen platform itself, not of the app.
IGNORED_QT_WARNINGS = ("propagateSizeHints",)


def write_model_folder(path: Path, architecture: str = "MixtralForCausalLM") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(f'{{"architectures": ["{architecture}"]}}')
    (path / "model.safetensors").write_bytes(b"\0" * 1000)
    return path


@pytest.fixture(autouse=True)
def user_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every user folder (and the HF cache and built-in model) into tmp_path."""
    monkeypatch.setenv("UNDERSTUDY_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("UNDERSTUDY_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    builtin = write_model_folder(tmp_path / "builtin" / "understudy-mini-moe")
    monkeypatch.setenv("UNDERSTUDY_BUILTIN_MODEL", str(builtin))
    return tmp_path


@pytest.fixture(autouse=True)
def fail_on_qt_warnings(request: pytest.FixtureRequest) -> Iterator[None]:
    qtlog = request.getfixturevalue("qtlog")
    yield
    bad = [
        r.message
        for r in qtlog.records
        if r.type in (QtMsgType.QtWarningMsg, QtMsgType.QtCriticalMsg, QtMsgType.QtFatalMsg)
        and not any(part in r.message for part in IGNORED_QT_WARNINGS)
    ]
    assert bad == [], f"Qt warnings during the test: {bad}"


@pytest.fixture(scope="session")
def aloop(qapp: QApplication) -> asyncio.AbstractEventLoop:
    """A qasync loop marked running, so tasks advance whenever Qt processes events."""
    loop = qasync.QEventLoop(qapp, already_running=True)
    asyncio.set_event_loop(loop)
    return loop


@pytest.fixture
def fake_engine() -> Iterator[FakeEngine]:
    engine = FakeEngine()
    yield engine
    engine.shutdown()


class WindowFactory:
    """Builds main windows over one fake engine, the way ``app.__main__`` does."""

    def __init__(self, qtbot: Any, loop: asyncio.AbstractEventLoop, engine: FakeEngine, root: Path):
        self.qtbot, self.loop, self.engine, self.root = qtbot, loop, engine, root
        self.stores: list[ChatStore] = []

    def __call__(self, start: bool = True, telemetry: GpuTelemetry | None = None) -> MainWindow:
        chats = ChatStore(self.root / "data" / "chats.sqlite3")
        self.stores.append(chats)
        window = MainWindow(
            EngineBridge(self.engine, self.loop),
            SettingsStore(self.root / "config"),
            chats,
            telemetry or GpuTelemetry(nvml=NoNvml()),
            hf_cache=self.root / "hf-cache",
        )
        self.qtbot.addWidget(window)
        window.show()
        if start:
            window.start(None)
            self.qtbot.waitUntil(lambda: window.controller.ready, timeout=5000)
        window.activateWindow()  # offscreen has no window manager to give focus back
        self.qtbot.waitUntil(window.isActiveWindow, timeout=2000)
        return window


class NoNvml:
    """An NVML module whose library is missing (as on a machine without NVIDIA drivers)."""

    class NVMLError(Exception):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    def nvmlInit(self) -> None:
        raise self.NVMLError_LibraryNotFound("libnvidia-ml.so.1 not found")


@pytest.fixture
def make_window(
    qtbot: Any, aloop: asyncio.AbstractEventLoop, fake_engine: FakeEngine, user_dirs: Path
) -> Iterator[Callable[..., MainWindow]]:
    factory = WindowFactory(qtbot, aloop, fake_engine, user_dirs)
    yield factory
    for store in factory.stores:
        store.close()


@pytest.fixture
def window(make_window: Callable[..., MainWindow]) -> MainWindow:
    return make_window()
