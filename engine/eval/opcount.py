"""Counting torch ops and host syncs per decoded token, from outside the engine.

``OpCounter`` is a context manager that stacks a ``TorchDispatchMode`` (every ATen op that
reaches the dispatcher is one op) and a ``TorchFunctionMode`` (the Python-level calls that read a
tensor's values on the host) on the *current thread*: torch keeps mode stacks per thread, so
enter it on the thread that runs the model (the engine thread; the CLI's main thread).

A **host sync** is a call that makes the host wait for a tensor's values, which on a GPU means
waiting for every kernel queued before it:

- Python-level reads: ``.tolist()``, ``.numpy()``, ``.item()``, ``bool(t)``, ``int(t)``,
  ``float(t)``, ``t.__index__()`` (counted once, the ops they run inside are not syncs again);
- data-dependent ops: ``nonzero``, one-argument ``torch.where``, ``masked_select``, ``unique``,
  ``repeat_interleave`` without ``output_size``, ``equal``, ``_local_scalar_dense``;
- device-to-host copies (``to``/``_to_copy``/``copy_`` from a non-CPU tensor to the CPU).

The counter is told the run's device. On a CUDA run, Python-level reads count for CUDA tensors
(reading a host tensor that a counted copy brought over is free); on a CPU run they count for
CPU tensors, so a CPU run gives the count a GPU run would pay: the *decision* to read values on
the host is what costs. Either way one layer's ``scores.cpu().numpy()`` is one sync.

``per_token(counts)`` turns counts between the first and the last token of a generation into
per-decoded-token figures (one decode forward plus one sampling step each).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

HOST_READS = frozenset({"tolist", "numpy", "item", "__bool__", "__int__", "__float__", "__index__"})
SYNC_OPS = frozenset(
    {
        "aten::nonzero",
        "aten::masked_select",
        "aten::_unique",
        "aten::_unique2",
        "aten::unique_dim",
        "aten::unique_consecutive",
        "aten::equal",
        "aten::_local_scalar_dense",
        "aten::is_nonzero",
    }
)
COPY_OPS = frozenset({"aten::_to_copy", "aten::to", "aten::copy_"})


@dataclass(frozen=True)
class OpCounts:
    """Ops and host syncs counted over some span, with the names of the syncs."""

    ops: int
    syncs: int
    sync_kinds: dict[str, int]

    def minus(self, earlier: OpCounts) -> OpCounts:
        kinds = Counter(self.sync_kinds)
        kinds.subtract(earlier.sync_kinds)
        return OpCounts(
            self.ops - earlier.ops,
            self.syncs - earlier.syncs,
            {k: v for k, v in kinds.items() if v},
        )


def _is_sync_op(name: str, overload: str, args: tuple[Any, ...]) -> bool:
    if name in SYNC_OPS:
        return True
    if name == "aten::where" and overload == "default" and len(args) == 1:
        return True
    if name == "aten::repeat_interleave" and overload == "Tensor":
        return True
    return name in COPY_OPS and _device_to_host(name, args)


def _device_to_host(name: str, args: tuple[Any, ...]) -> bool:
    if name == "aten::copy_":
        dst, src = args[0], args[1]
        return (
            isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst.device.type == "cpu"
        )
    return False  # _to_copy/to: checked by the caller with the output's device


class _Dispatch(TorchDispatchMode):
    def __init__(self, owner: OpCounter) -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        self.owner.record_op(func, args, out)
        return out


class _Function(TorchFunctionMode):
    def __init__(self, owner: OpCounter) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        name = getattr(func, "__name__", "")
        if name not in HOST_READS or self.owner.reading or not self.owner.counts_read(args):
            return func(*args, **(kwargs or {}))
        self.owner.record_sync(name)
        self.owner.reading = True
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.owner.reading = False


class OpCounter:
    """Counts torch ops and host syncs on the thread that enters it."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = torch.device(device).type
        self.ops = 0
        self.sync_kinds: Counter[str] = Counter()
        self.reading = False  # inside a Python-level host read: its inner ops are not syncs
        self._modes: tuple[_Dispatch, _Function] | None = None

    @property
    def syncs(self) -> int:
        return sum(self.sync_kinds.values())

    def counts(self) -> OpCounts:
        return OpCounts(self.ops, self.syncs, dict(self.sync_kinds))

    def counts_read(self, args: tuple[Any, ...]) -> bool:
        """A Python-level read is a sync when its tensor is on the run's device."""
        tensor = args[0] if args else None
        return isinstance(tensor, torch.Tensor) and tensor.device.type == self.device

    def record_sync(self, kind: str) -> None:
        self.sync_kinds[kind] += 1

    def record_op(self, func: Any, args: tuple[Any, ...], out: Any) -> None:
        self.ops += 1
        if self.reading:
            return
        name, overload = func._schema.name, func._overloadname
        if _is_sync_op(name, overload, args) or _copied_to_host(name, args, out):
            self.record_sync(f"{name.removeprefix('aten::')}")

    def __enter__(self) -> OpCounter:
        if self._modes is not None:
            raise RuntimeError("an OpCounter cannot be entered twice at once")
        self._modes = (_Dispatch(self), _Function(self))
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        assert self._modes is not None, "exit without enter"
        dispatch, function = self._modes
        self._modes = None
        function.__exit__(kind, error, trace)
        dispatch.__exit__(kind, error, trace)


def _copied_to_host(name: str, args: tuple[Any, ...], out: Any) -> bool:
    if name not in ("aten::_to_copy", "aten::to") or not args:
        return False
    src = args[0]
    return (
        isinstance(src, torch.Tensor)
        and isinstance(out, torch.Tensor)
        and src.device.type != "cpu"
        and out.device.type == "cpu"
    )


@dataclass(frozen=True)
class PerToken:
    """Ops and host syncs per decoded token (a decode forward plus its sampling step)."""

    tokens: int
    ops: float
    syncs: float
    sync_kinds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "decoded_tokens": self.tokens,
            "ops_per_token": self.ops,
            "syncs_per_token": self.syncs,
            "sync_kinds_per_token": self.sync_kinds,
        }


def per_token(span: OpCounts, tokens: int) -> PerToken:
    """Counts over ``tokens`` decode steps, per step."""
    if tokens < 1:
        raise ValueError(f"per-token counts need at least one decoded token; got {tokens}")
    kinds = {k: v / tokens for k, v in sorted(span.sync_kinds.items())}
    return PerToken(tokens, span.ops / tokens, span.syncs / tokens, kinds)


class TokenSpan:
    """Counts between a generation's first and last token event: one decode step per token.

    Feed it every event of a stream run inside ``counter``; the prefill forward and the first
    sampling step happen before the first token event and are left out.
    """

    def __init__(self, counter: OpCounter) -> None:
        self.counter = counter
        self._first: OpCounts | None = None
        self._last: OpCounts | None = None
        self._tokens = 0

    def observe(self, token_event: bool) -> None:
        """Call with ``True`` at each (non-flush) token event."""
        if not token_event:
            return
        now = self.counter.counts()
        if self._first is None:
            self._first = now
        else:
            self._last = now
            self._tokens += 1

    def result(self) -> PerToken | None:
        """Per decoded token; ``None`` when fewer than two tokens came."""
        if self._first is None or self._last is None:
            return None
        return per_token(self._last.minus(self._first), self._tokens)
