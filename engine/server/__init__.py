"""An OpenAI-compatible HTTP server over the engine (``python -m engine serve``).

Built on Starlette and uvicorn, with pydantic request models. It talks to the engine only
through ``engine.protocol.EngineAPI`` (no torch here), so the app can serve its own loaded
engine and the tests can serve a scripted one. Loopback only unless told otherwise; see
``docs/SERVER.md``.
"""

from engine.server.config import ServedModel, ServerConfig
from engine.server.http_app import create_app
from engine.server.runner import ServerHandle

__all__ = ["ServedModel", "ServerConfig", "ServerHandle", "create_app"]
