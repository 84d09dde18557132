"""GPU and host readings for the live panel: NVML (via pynvml) and the host's RAM.

Without the NVIDIA library or a GPU, ``GpuTelemetry.available`` is False and ``reason`` says
why; PCIe counters a GPU does not support are reported as such, not as zero. No Qt here.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

try:
    import pynvml
except ImportError:  # nvidia-ml-py missing: treated like a machine without NVML
    pynvml = None


@dataclass(frozen=True)
class GpuSample:
    name: str
    vram_used_bytes: int
    vram_total_bytes: int
    pcie_tx_bytes_per_s: float | None  # None: not supported by this GPU/driver
    pcie_rx_bytes_per_s: float | None


@dataclass(frozen=True)
class HostSample:
    ram_used_bytes: int | None
    ram_total_bytes: int | None


class GpuTelemetry:
    """One NVML session for GPU ``index``. Never raises: failures become ``reason``."""

    def __init__(self, index: int = 0, nvml: Any = None) -> None:
        self.nvml = nvml if nvml is not None else pynvml
        self.handle: Any = None
        self.reason = ""
        self.pcie_note = ""
        self._open(index)

    @property
    def available(self) -> bool:
        return self.handle is not None

    def _open(self, index: int) -> None:
        if self.nvml is None:
            self.reason = "No NVIDIA GPU readings: the NVML Python package is not installed."
            return
        try:
            self.nvml.nvmlInit()
            self.handle = self.nvml.nvmlDeviceGetHandleByIndex(index)
        except self.nvml.NVMLError_LibraryNotFound:
            self.reason = "No NVIDIA GPU found (the NVIDIA driver library is not installed)."
        except self.nvml.NVMLError as error:
            self.reason = f"No NVIDIA GPU readings: {error}."

    def sample(self) -> GpuSample | None:
        if self.handle is None:
            return None
        nvml = self.nvml
        try:
            memory = nvml.nvmlDeviceGetMemoryInfo(self.handle)
            name = nvml.nvmlDeviceGetName(self.handle)
        except nvml.NVMLError as error:
            self.reason = f"GPU readings stopped: {error}."
            self.handle = None
            return None
        tx = self._pcie(nvml.NVML_PCIE_UTIL_TX_BYTES)
        rx = self._pcie(nvml.NVML_PCIE_UTIL_RX_BYTES)
        name = name.decode() if isinstance(name, bytes) else str(name)
        return GpuSample(name, int(memory.used), int(memory.total), tx, rx)

    def _pcie(self, counter: int) -> float | None:
        try:
            kilobytes = self.nvml.nvmlDeviceGetPcieThroughput(self.handle, counter)
        except self.nvml.NVMLError_NotSupported:
            self.pcie_note = "PCIe throughput is not supported by this GPU or driver."
            return None
        except self.nvml.NVMLError as error:
            self.pcie_note = f"PCIe throughput unavailable: {error}."
            return None
        return float(kilobytes) * 1024.0  # NVML reports KB/s over a 20 ms window

    def close(self) -> None:
        if self.handle is not None:
            with contextlib.suppress(self.nvml.NVMLError):
                self.nvml.nvmlShutdown()
            self.handle = None


MEMINFO = "/proc/meminfo"


def meminfo_available(path: str = MEMINFO) -> int | None:
    """``MemAvailable`` of Linux's meminfo in bytes: free RAM plus the page cache the kernel can
    drop (memory-mapped model files live there); None where the file or the line is missing."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def host_sample(meminfo: str = MEMINFO) -> HostSample:
    """Used and total RAM (Linux, macOS); None where it is not offered. Used is total minus
    what programs can still get: on Linux ``MemAvailable``, so page cache does not count as
    used; elsewhere ``sysconf``'s free pages."""
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
        available = meminfo_available(meminfo)
        if available is None:
            available = os.sysconf("SC_AVPHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):
        return HostSample(None, None)
    return HostSample(total - min(available, total), total)
