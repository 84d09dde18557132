"""The checks every request passes before a route sees it (pure ASGI middleware).

In order: the ``Host`` header names this machine when serving on loopback (so a web page cannot
reach the server by DNS rebinding); a browser ``Origin`` must be one the config allows (CORS
is closed by default); the API key, when one is set, must match (compared in constant time);
a declared body must fit the size limit. A refusal is an OpenAI-style error JSON.
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from engine.server.config import ServerConfig, is_loopback
from engine.server.errors import ApiError, error_response


def host_name(host_header: str) -> str:
    """``127.0.0.1:8080`` -> ``127.0.0.1``; ``[::1]:8080`` -> ``::1``."""
    if host_header.startswith("["):
        return host_header[1 : host_header.find("]")]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def key_matches(header: str | None, api_key: str) -> bool:
    """``Authorization: Bearer <key>`` against the key, in constant time."""
    scheme, _, given = (header or "").partition(" ")
    expected = api_key.encode()
    return hmac.compare_digest(given.strip().encode(), expected) and scheme.lower() == "bearer"


def refusal(config: ServerConfig, headers: Headers, method: str) -> ApiError | None:
    """Why a request is refused before routing, or None."""
    if config.loopback and not is_loopback(host_name(headers.get("host", ""))):
        return ApiError(403, "This server answers only requests addressed to this machine.")
    origin = headers.get("origin")
    if origin is not None and origin not in config.cors_origins:
        return ApiError(403, f"Requests from web pages ({origin}) are not allowed.")
    if config.api_key is not None and not key_matches(headers.get("authorization"), config.api_key):
        return ApiError(401, "Invalid or missing API key.", code="invalid_api_key")
    length = headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > config.max_body_bytes):
        return ApiError(413, f"The request body is larger than {config.max_body_bytes} bytes.")
    return None


class Guard:
    """ASGI middleware applying ``refusal`` to every HTTP request."""

    def __init__(self, app: ASGIApp, config: ServerConfig) -> None:
        self.app, self.config = app, config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refused = refusal(self.config, Headers(scope=scope), scope["method"])
            if refused is not None:
                await error_response(refused)(scope, receive, send)
                return
        await self.app(scope, receive, send)
