"""The demo and remote engines' shared stats holder: changes from threads are never lost."""

from __future__ import annotations

import threading
from dataclasses import replace

from app.stats_box import StatsBox
from engine.events import StatsSnapshot


def test_concurrent_changes_all_count() -> None:
    box = StatsBox()

    def count() -> None:
        for _ in range(2000):
            box.change(lambda s: replace(s, tokens=s.tokens + 1))

    threads = [threading.Thread(target=count) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert box.get().tokens == 8000
    box.put(StatsSnapshot())
    assert box.get() == StatsSnapshot()
