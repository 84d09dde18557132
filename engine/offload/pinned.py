"""Host memory for the expert store: one exact-size allocation, page-locked in place.

PyTorch's ``pin_memory=True`` goes through its caching host allocator, which rounds every
block up to a power of two: Qwen1.5-MoE's ~1.04 GB per layer becomes 2 GB (~48 GB of host RAM
instead of ~25). ``HostArena`` instead allocates the store's exact byte count once (an ordinary
``torch.empty``, so nothing is rounded) and asks the driver to page-lock that range in place
(``cudaHostRegister``). When registering fails (the OS refuses to lock that much), the arena
stays pageable and says what that costs: copies go through a staging buffer at roughly half
the bandwidth and cannot overlap compute.

The registrar is injectable so the sizing, the fallback and the unregister-before-free order
are tested on machines without a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

LOG = logging.getLogger(__name__)
PAGEABLE_WARNING = (
    "Could not page-lock {size:.1f} GB of host memory for the experts ({reason}); they stay in "
    "ordinary memory. Copies to the GPU then go through a staging buffer at about half the "
    "bandwidth and cannot overlap compute, so decoding with cache misses is slower. Lower the "
    "number of experts kept in RAM (a smaller model or dtype) or raise the locked-memory limit."
)


@dataclass(frozen=True)
class Registrar:
    """Page-locks and unlocks host ranges: ``register(ptr, nbytes) -> error or None``."""

    register: Callable[[int, int], str | None]
    unregister: Callable[[int], None]


def _cuda_register(ptr: int, nbytes: int) -> str | None:
    cudart = torch.cuda.cudart()
    status = cudart.cudaHostRegister(ptr, nbytes, 0)
    code = int(status.value if hasattr(status, "value") else status)
    return None if code == 0 else f"cudaHostRegister returned error {code}"


def _cuda_unregister(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


CUDA_REGISTRAR = Registrar(_cuda_register, _cuda_unregister)


class HostArena:
    """``numel`` elements of ``dtype`` in one allocation, page-locked when asked and possible."""

    def __init__(
        self,
        numel: int,
        dtype: torch.dtype,
        pin: bool,
        registrar: Registrar | None = None,
    ) -> None:
        self.buffer = torch.zeros(numel, dtype=dtype)  # exact size; pages committed now
        self.nbytes = numel * dtype.itemsize
        self.pinned = False
        self.warning: str | None = None
        self._registrar = registrar or CUDA_REGISTRAR
        if pin and self.nbytes > 0:
            self._pin()

    def _pin(self) -> None:
        try:
            error = self._registrar.register(self.buffer.data_ptr(), self.nbytes)
        except (RuntimeError, OSError, AttributeError) as raised:
            error = str(raised)
        if error is None:
            self.pinned = True
            return
        self.warning = PAGEABLE_WARNING.format(size=self.nbytes / 1e9, reason=error)
        LOG.warning(self.warning)

    def view(self, offset: int, rows: int, row_numel: int) -> torch.Tensor:
        """Rows ``[rows, row_numel]`` starting ``offset`` elements into the arena."""
        return self.buffer[offset : offset + rows * row_numel].view(rows, row_numel)

    def close(self) -> None:
        """Unlock (if locked), then drop the memory. Copies must be finished (cache.close)."""
        if self.pinned:
            self._registrar.unregister(self.buffer.data_ptr())
            self.pinned = False
        self.buffer = torch.empty(0, dtype=self.buffer.dtype)
        self.nbytes = 0
