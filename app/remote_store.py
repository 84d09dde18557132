"""Saved remote engines and their API keys.

A ``RemoteEntry`` (name, base URL, model) is saved in ``remotes.json`` under the config folder
(atomic writes). Its API key never goes there, nor into the chat database or the log: it is
kept in the OS keyring through the ``keyring`` package. Where no keyring backend is available
the key is kept in memory for this session only, and the caller is told so. No Qt here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keyring
import keyring.backend
import keyring.backends.fail

from app.remote_engine import normalize_base_url
from app.settings import write_json_atomic

log = logging.getLogger(__name__)
KEYRING_SERVICE = "Understudy remote engines"
SESSION_ONLY = (
    "No system keyring is available, so the API key is kept for this session only: you will "
    "be asked for it again after a restart."
)


@dataclass(frozen=True)
class RemoteEntry:
    """A server the user added: a display name, where it is, and the model to ask for."""

    name: str
    base_url: str
    model: str
    has_key: bool = False

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ValueError("Give the remote engine a name")
        object.__setattr__(self, "base_url", normalize_base_url(self.base_url))
        if not self.model.strip():
            raise ValueError("Give the model name the server knows (see its /v1/models)")

    @property
    def key_id(self) -> str:
        return f"{self.name}@{self.base_url}"


def _entry(data: Any) -> RemoteEntry | None:
    try:
        return RemoteEntry(
            str(data["name"]), str(data["base_url"]), str(data["model"]), bool(data.get("has_key"))
        )
    except (KeyError, TypeError, ValueError):
        return None


class RemoteStore:
    """``remotes.json``: the saved remote engines, by name."""

    def __init__(self, config_dir: Path) -> None:
        self.path = config_dir / "remotes.json"

    def load(self) -> list[RemoteEntry]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as error:
            log.warning("ignoring unreadable %s: %s", self.path, error)
            return []
        items = data.get("remotes") if isinstance(data, dict) else None
        entries = [_entry(item) for item in items] if isinstance(items, list) else []
        return [e for e in entries if e is not None]

    def get(self, name: str) -> RemoteEntry | None:
        return next((e for e in self.load() if e.name == name), None)

    def save(self, entry: RemoteEntry) -> None:
        """Add or replace (by name); raises ``SettingsSaveError`` when it cannot be written."""
        entries = [e for e in self.load() if e.name != entry.name] + [entry]
        write_json_atomic(self.path, {"remotes": [asdict(e) for e in entries]})

    def remove(self, name: str) -> None:
        entries = [e for e in self.load() if e.name != name]
        write_json_atomic(self.path, {"remotes": [asdict(e) for e in entries]})


def usable(backend: keyring.backend.KeyringBackend) -> bool:
    """False for keyring's fail backend (nothing to store keys in)."""
    return not isinstance(backend, keyring.backends.fail.Keyring)


class KeyStore:
    """API keys in the OS keyring, or in memory for the session when there is none."""

    def __init__(self, backend: keyring.backend.KeyringBackend | None = None) -> None:
        self._backend = backend  # found on first use: nothing is asked of the OS before
        self._session: dict[str, str] = {}

    @property
    def backend(self) -> keyring.backend.KeyringBackend:
        if self._backend is None:
            self._backend = keyring.get_keyring()
        return self._backend

    @property
    def persistent(self) -> bool:
        return usable(self.backend)

    def store(self, key_id: str, key: str) -> str | None:
        """Keep ``key``; returns a message for the user when it is kept for this session only."""
        self._session[key_id] = key
        if not self.persistent:
            return SESSION_ONLY
        try:
            self.backend.set_password(KEYRING_SERVICE, key_id, key)
        except Exception as error:  # any backend failure: keep the key for the session
            log.warning("the keyring refused to store a key: %s", type(error).__name__)
            return f"The system keyring refused the key ({type(error).__name__}). {SESSION_ONLY}"
        return None

    def get(self, key_id: str) -> str | None:
        if key_id in self._session:
            return self._session[key_id]
        if not self.persistent:
            return None
        try:
            key = self.backend.get_password(KEYRING_SERVICE, key_id)
        except Exception as error:
            log.warning("the keyring could not be read: %s", type(error).__name__)
            return None
        if key is not None:
            self._session[key_id] = key
        return key

    def delete(self, key_id: str) -> None:
        self._session.pop(key_id, None)
        if self.persistent:
            try:
                self.backend.delete_password(KEYRING_SERVICE, key_id)
            except Exception as error:
                log.info("no key removed from the keyring: %s", type(error).__name__)
