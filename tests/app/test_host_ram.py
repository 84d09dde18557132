"""The panel's host RAM: page cache the kernel can drop does not count as used."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.telemetry import host_sample, meminfo_available

MEMINFO = """MemTotal:       24000000 kB
MemFree:          500000 kB
MemAvailable:   16000000 kB
Buffers:          100000 kB
Cached:         15000000 kB
"""


def test_used_ram_is_total_minus_available_not_minus_free(tmp_path: Path) -> None:
    info = tmp_path / "meminfo"
    info.write_text(MEMINFO)
    assert meminfo_available(str(info)) == 16000000 * 1024
    sample = host_sample(str(info))
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert sample.ram_total_bytes == total
    assert sample.ram_used_bytes == total - min(16000000 * 1024, total)


@pytest.mark.parametrize("text", ["MemTotal: 1 kB\n", "MemAvailable: lots kB\n", None])
def test_a_missing_or_odd_meminfo_falls_back_to_free_pages(
    tmp_path: Path, text: str | None
) -> None:
    info = tmp_path / "meminfo"
    if text is not None:
        info.write_text(text)
    assert meminfo_available(str(info)) is None
    sample = host_sample(str(info))
    assert sample.ram_total_bytes is not None and sample.ram_used_bytes is not None
    assert 0 <= sample.ram_used_bytes <= sample.ram_total_bytes


def test_the_real_reading_is_within_the_machine(tmp_path: Path) -> None:
    sample = host_sample()
    assert sample.ram_total_bytes and sample.ram_used_bytes is not None
    assert 0 <= sample.ram_used_bytes <= sample.ram_total_bytes
