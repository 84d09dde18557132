"""Frozen server settings, validated when built: where to listen, who may call, how much.

A non-loopback address needs ``allow_remote`` and an API key; these rules live here so the CLI,
the app and the tests all get the same refusal.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from engine.config import LiveOptions
from engine.errors import InvalidRequestError

LOOPBACK_NAMES = ("localhost",)
DEFAULT_PORT = 8080
DEFAULT_MAX_BODY_BYTES = 1_000_000


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerConfig:
    """How the server listens and what it accepts."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_key: str | None = None
    allow_remote: bool = False  # must be set to bind anything but loopback
    cors_origins: tuple[str, ...] = ()  # browser origins allowed; none by default
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    default_max_tokens: int = 512

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise InvalidRequestError(f"The port must be in 0..65535; got {self.port}.")
        if self.api_key is not None and not self.api_key.strip():
            raise InvalidRequestError("The API key is empty: give one or leave it out.")
        if not is_loopback(self.host) and not self.allow_remote:
            raise InvalidRequestError(
                f"{self.host} is not a loopback address: the server listens on 127.0.0.1 "
                "unless --allow-remote is given (and then an API key is required)."
            )
        if not is_loopback(self.host) and self.api_key is None:
            raise InvalidRequestError(
                f"Listening on {self.host} opens the model to the network: set an API key "
                "(--api-key, or the UNDERSTUDY_API_KEY environment variable)."
            )
        if self.max_body_bytes < 1024:
            raise InvalidRequestError("The body size limit must be at least 1024 bytes.")
        if self.default_max_tokens < 1:
            raise InvalidRequestError("The default max_tokens must be at least 1.")

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


@dataclass(frozen=True)
class ServedModel:
    """The one model the server offers: its id, context length and whether it substitutes."""

    model_id: str
    context_length: int
    substitution_supported: bool = True
    live: LiveOptions = field(
        default_factory=LiveOptions
    )  # the engine's options when the server started
    created: int = 0  # unix time shown by /v1/models
