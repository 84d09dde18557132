"""Non-finite weights: the first tensor holding NaN or infinity, named in a load error.

Used by the loader over the trunk at load (``engine.runtime.validation``) and by the host
expert store over each expert the first time it is used. A damaged checkpoint otherwise
loads and generates empty or random text with no error.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from engine.errors import ModelLoadError


class NonFiniteWeightError(ModelLoadError):
    """A weight holds NaN or infinity: the checkpoint is damaged."""


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], where: str) -> None:
    """Raise ``NonFiniteWeightError`` naming the first tensor with NaN or infinite values."""
    for name, tensor in tensors:
        if tensor.is_meta or not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        finite = torch.isfinite(tensor)
        if bool(finite.all()):
            continue
        bad = int(finite.numel() - int(finite.sum()))
        raise NonFiniteWeightError(
            f"the weight {name!r} ({where}) holds {bad:,} NaN or infinite values of "
            f"{tensor.numel():,}; the checkpoint is damaged, so it is not used (download or "
            "convert the model again)"
        )
