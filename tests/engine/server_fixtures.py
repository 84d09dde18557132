"""Servers for the server tests: started on a free loopback port, stopped after the test."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from engine.config import LiveOptions
from engine.protocol import EngineAPI
from engine.server import ServedModel, ServerConfig, ServerHandle

MODEL_ID = "echo-model"


@contextmanager
def running_server(
    engine: EngineAPI,
    model_id: str = MODEL_ID,
    context_length: int = 256,
    live: LiveOptions | None = None,
    **config: object,
) -> Iterator[ServerHandle]:
    model = ServedModel(model_id, context_length, True, live or LiveOptions(), created=1)
    handle = ServerHandle(engine, model, ServerConfig(**{"port": 0, **config}))  # type: ignore[arg-type]
    handle.start()
    try:
        yield handle
    finally:
        handle.stop()
