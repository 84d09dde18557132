"""What a measurement states about where it ran: machine, cores, load average and date."""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpu_name() -> str:
    """The CPU's model name where the OS tells it (``/proc/cpuinfo``), else the platform's."""
    try:
        for line in CPUINFO.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_text(load: tuple[float, float, float]) -> str:
    return "/".join(f"{value:.2f}" for value in load)


def machine_facts(load_before: tuple[float, float, float]) -> dict[str, str]:
    """Machine, core count, the load average before and now (1/5/15 min), and the date."""
    return {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()}",
        "load_before": load_text(load_before),
        "load_after": load_text(os.getloadavg()),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
