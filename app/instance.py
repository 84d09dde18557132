"""One app per profile: a lock file in the data folder and a local socket to the first app.

Two apps on one profile would write one chat database and one set of settings files at once.
The first app holds ``QLockFile`` (stale locks of a dead process are taken over) and listens
on a local socket named after the profile; a second app finds the lock taken, asks the first
to bring its window to the front, says so and exits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import QLockFile
from PySide6.QtNetwork import QLocalServer, QLocalSocket

LOCK_NAME = "understudy.lock"
ACTIVATE = b"activate\n"
CONNECT_TIMEOUT_MS = 1000


def server_name(data_dir: Path) -> str:
    """The local socket name of one profile (short, so it fits every platform's limit)."""
    digest = hashlib.sha1(str(data_dir.resolve()).encode()).hexdigest()[:16]
    return f"understudy-{digest}"


class SingleInstance:
    """The profile lock of this process, and the socket other starts of the app call."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.lock: QLockFile | None = None
        self.server: QLocalServer | None = None

    def acquire(self) -> bool:
        """False only when another live app holds the profile (else the lock is held now).

        A folder where no lock can be written (read-only) counts as free: nothing there can be
        written by two apps, and the chat store opens read-only and says so.
        """
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError:
            return True
        lock = QLockFile(str(self.data_dir / LOCK_NAME))
        lock.setStaleLockTime(0)  # only a dead process's lock is stale, however old
        if lock.tryLock(100):
            self.lock = lock
            return True
        return lock.error() != QLockFile.LockError.LockFailedError

    def listen(self, on_activate: Callable[[], None]) -> bool:
        """Call ``on_activate`` whenever a second app asks; False if the socket failed."""
        name = server_name(self.data_dir)
        QLocalServer.removeServer(name)  # a socket file left by a crash
        server = QLocalServer()
        if not server.listen(name):
            return False
        server.newConnection.connect(lambda: self._answer(server, on_activate))
        self.server = server
        return True

    @staticmethod
    def _answer(server: QLocalServer, on_activate: Callable[[], None]) -> None:
        while server.hasPendingConnections():
            connection = server.nextPendingConnection()
            connection.disconnected.connect(connection.deleteLater)
            connection.close()
            on_activate()

    def activate_first(self) -> bool:
        """Ask the app holding the lock to show its window; True if it was reached."""
        socket = QLocalSocket()
        socket.connectToServer(server_name(self.data_dir))
        if not socket.waitForConnected(CONNECT_TIMEOUT_MS):
            return False
        socket.write(ACTIVATE)
        socket.waitForBytesWritten(CONNECT_TIMEOUT_MS)
        socket.disconnectFromServer()
        return True

    def release(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.lock is not None:
            self.lock.unlock()
            self.lock = None


def already_running_message(data_dir: Path, reached: bool) -> str:
    """What the second app says before it exits."""
    front = (
        "Its window was brought to the front."
        if reached
        else "It did not answer; if it is frozen, close it and start Understudy again."
    )
    return (
        f"Understudy is already running with this profile ({data_dir}). Two copies would "
        f"write the same chats and settings, so this one closes. {front}"
    )
