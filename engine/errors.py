"""Typed errors raised at the engine's public boundary.

Every message is written for the person using the app: what went wrong and what to change.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine reports on purpose."""


class ModelLoadError(EngineError):
    """The model folder is missing, incomplete, corrupt or unreadable."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint's architecture is not one the engine can offload."""

    def __init__(self, architecture: str, reason: str) -> None:
        super().__init__(f"Unsupported model architecture {architecture!r}: {reason}")
        self.architecture = architecture


class InsufficientMemoryError(EngineError):
    """The memory estimate says the model will not fit; loading was refused (not forced)."""

    def __init__(self, message: str, needed_bytes: int = 0, available_bytes: int = 0) -> None:
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes


class EngineOutOfMemoryError(EngineError):
    """Memory ran out while loading or generating; the message says what to change."""


class CacheBudgetError(EngineError):
    """The expert cache budget is below one layer's working set."""

    def __init__(self, message: str, minimum_slots: int, minimum_bytes: int) -> None:
        super().__init__(message)
        self.minimum_slots = minimum_slots
        self.minimum_bytes = minimum_bytes


class CancelledError(EngineError):
    """A load was cancelled by the caller; the engine is unchanged and usable."""


class InvalidRequestError(EngineError):
    """The request itself is malformed (empty prompt, no model loaded, bad option)."""


class SubstitutionUnsupportedError(EngineError):
    """Substitution was asked for a router family the engine does not substitute on."""
