"""End to end through the REAL engine: the window loads a model and chats.

``test_builtin_model_chat`` uses the shipped built-in model and skips cleanly until both
``engine.runtime.engine`` and ``resources/models/understudy-mini-moe`` exist. The tiny-checkpoint
test runs the same path today on a 2-layer MoE built inside the test.
"""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path
from typing import Any

import pytest

from app.bridge import EngineBridge, make_engine
from app.chat_store import ChatStore
from app.main_window import MainWindow
from app.settings import ModelSettings, SettingsStore
from app.telemetry import GpuTelemetry
from engine.events import GenerationFinished
from engine.paths import fallback_model_dir

REAL_ENGINE = importlib.util.find_spec("engine.runtime.engine") is not None
BUILTIN_MODEL = fallback_model_dir()  # the small shipped model: the fast tests' fixture
needs_engine = pytest.mark.skipif(not REAL_ENGINE, reason="engine.runtime.engine not built yet")


def chat_once(qtbot: Any, loop: asyncio.AbstractEventLoop, root: Path, model: Path) -> None:
    config = root / "config"
    SettingsStore(config).save_model(model, ModelSettings(device="cpu", max_new_tokens=12))
    engine = make_engine()
    chats = ChatStore(root / "data" / "chats.sqlite3")
    window = MainWindow(EngineBridge(engine, loop), SettingsStore(config), chats, GpuTelemetry())
    qtbot.addWidget(window)
    finished: list[GenerationFinished | None] = []
    window.controller.generation_finished.connect(finished.append)
    try:
        window.show()
        window.start(None)
        qtbot.waitUntil(
            lambda: window.controller.ready or window.ready_status != "", timeout=120_000
        )
        assert window.controller.ready, f"the real engine did not load: {window.banner.text}"
        window.slider.slider.setValue(2)  # alpha 0.1, applied live to the real engine
        window.composer.text.setPlainText("Hello, how are you?")
        window.composer.submit()
        qtbot.waitUntil(lambda: bool(finished), timeout=120_000)
        result = finished[0]
        assert result is not None, f"generation failed: {window.banner.text}"
        assert result.reason in ("stop", "length") and result.prompt_tokens > 0
        reply = window.controller.conversation.active_path()[-1]  # type: ignore[union-attr]
        assert reply.role == "assistant" and reply.finished and reply.content == result.text
        assert "Generation failed" not in reply.note
    finally:
        window.close()
        engine.shutdown()
        chats.close()


@needs_engine
def test_chat_through_the_real_engine_on_a_tiny_checkpoint(
    qtbot: Any, aloop: asyncio.AbstractEventLoop, user_dirs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.helpers.tiny_models import save_tiny_checkpoint

    model = user_dirs / "tiny-moe"
    save_tiny_checkpoint(model)
    monkeypatch.setenv("UNDERSTUDY_BUILTIN_MODEL", str(model))
    chat_once(qtbot, aloop, user_dirs, model)


@needs_engine
@pytest.mark.skipif(
    not (BUILTIN_MODEL / "config.json").is_file(), reason="built-in model not trained yet"
)
def test_builtin_model_chat(
    qtbot: Any, aloop: asyncio.AbstractEventLoop, user_dirs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UNDERSTUDY_BUILTIN_MODEL", str(BUILTIN_MODEL))
    chat_once(qtbot, aloop, user_dirs, BUILTIN_MODEL)
