"""Tie asyncio tasks to the widgets they update: a deleted widget cancels its task, so a
late engine reply never touches a destroyed C++ object."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from PySide6.QtCore import QObject

T = TypeVar("T")


def start_task(
    owner: QObject, coroutine: Coroutine[Any, Any, T], loop: asyncio.AbstractEventLoop | None = None
) -> asyncio.Task[T]:
    """Schedule ``coroutine`` on the loop; cancel it when ``owner`` is destroyed."""
    task = (loop or asyncio.get_event_loop()).create_task(coroutine)
    owner.destroyed.connect(task.cancel)
    return task
