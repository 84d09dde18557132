"""Saved remote engines and their keys: keys live in the keyring (or the session), never on
disk next to the entries."""

from __future__ import annotations

import json

import keyring.backend
import keyring.backends.fail
import keyring.errors
import pytest

from app.remote_store import KEYRING_SERVICE, KeyStore, RemoteEntry, RemoteStore


class MemoryKeyring(keyring.backend.KeyringBackend):
    priority = 1  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.passwords: dict[tuple[str, str], str] = {}

    def set_password(self, service: str, username: str, password: str) -> None:
        self.passwords[(service, username)] = password

    def get_password(self, service: str, username: str) -> str | None:
        return self.passwords.get((service, username))

    def delete_password(self, service: str, username: str) -> None:
        self.passwords.pop((service, username), None)


class LockedKeyring(MemoryKeyring):
    def set_password(self, service: str, username: str, password: str) -> None:
        raise keyring.errors.PasswordSetError("locked")


def test_entries_round_trip_and_replace_by_name(tmp_path):
    store = RemoteStore(tmp_path)
    store.save(RemoteEntry("box", "http://box:8000", "llama", has_key=True))
    store.save(RemoteEntry("lab", "https://lab/v1/", "qwen"))
    store.save(RemoteEntry("box", "http://box:9000", "mixtral"))
    entries = {e.name: e for e in store.load()}
    assert entries["box"].base_url == "http://box:9000/v1" and entries["box"].model == "mixtral"
    assert entries["lab"].base_url == "https://lab/v1"
    store.remove("lab")
    assert [e.name for e in store.load()] == ["box"]


def test_unreadable_or_odd_file_gives_no_entries(tmp_path):
    (tmp_path / "remotes.json").write_text("{broken")
    assert RemoteStore(tmp_path).load() == []
    (tmp_path / "remotes.json").write_text(json.dumps({"remotes": [{"name": "x"}, 5]}))
    assert RemoteStore(tmp_path).load() == []


@pytest.mark.parametrize(
    ("name", "url", "model", "message"),
    [("", "http://a", "m", "name"), ("a", "a:1", "m", "http"), ("a", "http://a", "", "model")],
)
def test_bad_entries_are_refused_with_a_reason(name, url, model, message):
    with pytest.raises(ValueError, match=message):
        RemoteEntry(name, url, model)


def test_key_goes_to_the_keyring_not_the_file(tmp_path):
    backend = MemoryKeyring()
    entry = RemoteEntry("box", "http://box:8000", "llama", has_key=True)
    RemoteStore(tmp_path).save(entry)
    assert KeyStore(backend).store(entry.key_id, "sk-secret") is None
    assert backend.passwords[(KEYRING_SERVICE, entry.key_id)] == "sk-secret"
    assert "sk-secret" not in (tmp_path / "remotes.json").read_text()
    assert KeyStore(backend).get(entry.key_id) == "sk-secret", "a new session reads it back"
    KeyStore(backend).delete(entry.key_id)
    assert KeyStore(backend).get(entry.key_id) is None


def test_without_a_keyring_the_key_is_kept_for_the_session_and_the_user_told():
    keys = KeyStore(keyring.backends.fail.Keyring())
    assert not keys.persistent
    message = keys.store("box", "sk-secret")
    assert message is not None and "this session only" in message
    assert keys.get("box") == "sk-secret"
    assert KeyStore(keyring.backends.fail.Keyring()).get("box") is None


def test_a_keyring_that_refuses_keeps_the_key_for_the_session():
    keys = KeyStore(LockedKeyring())
    message = keys.store("box", "sk-secret")
    assert message is not None and "refused" in message
    assert keys.get("box") == "sk-secret"
