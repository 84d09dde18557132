"""OpenAI-style error bodies, and the handlers that make every failure one of them.

Every error the server returns is ``{"error": {"message", "type", "param", "code"}}`` with a
4xx status for the caller's mistakes and 500 (with no traceback or internals) for ours.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

log = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class ApiError(Exception):
    """A request the server refuses, with the status and OpenAI error fields to send."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None, code: str | None) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(
        error_body(error.status, error.message, error.param, error.code), error.status
    )


def validation_error(error: ValidationError) -> ApiError:
    """The first pydantic complaint in words, with the field path as ``param``."""
    first = error.errors()[0]
    param = ".".join(str(part) for part in first.get("loc", ())) or None
    message = f"Invalid value for {param}: {first.get('msg')}" if param else str(first.get("msg"))
    return ApiError(400, message, param, "invalid_value")


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError), "registered for ApiError"
    return error_response(exc)


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException), "registered for HTTPException"
    message = exc.detail if exc.status_code != 404 else f"No route {request.url.path}."
    return error_response(ApiError(exc.status_code, str(message)))


async def internal_error_handler(request: Request, exc: Exception) -> JSONResponse:
    log.error("request to %s failed", request.url.path, exc_info=exc)
    return error_response(ApiError(500, "The server failed on this request; see its log."))
