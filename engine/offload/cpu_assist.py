"""CPU-assisted execution (SMoE Algorithm 2): split missing experts between PCIe and the CPU.

Pure planning: the scores of the experts still missing after substitution and the rolling costs
of one copy (``C_load``) and one CPU expert computation (``C_cpu``) go in; which experts are
copied into the cache and which are computed on the CPU from their host copy come out. The
mechanism (``engine.offload.experts``) measures the costs and feeds :class:`RollingCost`.

The walk: sort by score, descending; the next highest-score expert goes to PCIe while that keeps
the PCIe finish time no later than the CPU's would be with the lowest-score expert, otherwise the
lowest-score one goes to the CPU. Comparing the finish times *after* the assignment (the paper
writes ``T_load <= T_cpu``, which with both clocks at zero would always copy the first expert
even when the CPU is ten times faster) makes each step pick the machine that ends first, which
for equal-cost jobs on two machines minimises ``max(n_load*C_load, n_cpu*C_cpu)``. Ties go to
PCIe: a copied expert stays cached and can serve the next token.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_COST_WINDOW = 10


@dataclass(frozen=True)
class CpuAssistPlan:
    """Which missing experts to copy and which to compute on the CPU."""

    load: tuple[int, ...]  # expert ids, highest score first
    cpu: tuple[int, ...]  # expert ids, lowest score first
    load_time: float  # predicted seconds on PCIe
    cpu_time: float  # predicted seconds on the CPU

    @property
    def makespan(self) -> float:
        return max(self.load_time, self.cpu_time)


def plan(
    experts: Sequence[int], scores: Sequence[float], cost_load: float, cost_cpu: float
) -> CpuAssistPlan:
    """Algorithm 2 over the missing ``experts`` with their router ``scores``."""
    if len(experts) != len(scores):
        raise ValueError(f"{len(experts)} experts but {len(scores)} scores")
    if cost_load <= 0 or cost_cpu <= 0:
        raise ValueError(f"costs must be positive; got load {cost_load}, cpu {cost_cpu}")
    ranked = [e for _, e in sorted(zip(scores, experts, strict=True), key=lambda p: -p[0])]
    head, tail = 0, len(ranked) - 1
    load_time = cpu_time = 0.0
    load: list[int] = []
    cpu: list[int] = []
    while head <= tail:
        if load_time + cost_load <= cpu_time + cost_cpu:
            load.append(ranked[head])
            load_time += cost_load
            head += 1
        else:
            cpu.append(ranked[tail])
            cpu_time += cost_cpu
            tail -= 1
    return CpuAssistPlan(tuple(load), tuple(cpu), load_time, cpu_time)


class RollingCost:
    """Mean of the last ``window`` measured costs (seconds), with a prior until the first."""

    def __init__(self, prior: float, window: int = DEFAULT_COST_WINDOW) -> None:
        if prior <= 0:
            raise ValueError(f"the prior cost must be positive; got {prior}")
        if window < 1:
            raise ValueError(f"the window must be at least 1; got {window}")
        self._prior = prior
        self._samples: deque[float] = deque(maxlen=window)

    def add(self, seconds: float, count: int = 1) -> None:
        """Record that ``count`` experts took ``seconds`` together (one sample per expert)."""
        if count < 1 or seconds < 0:
            raise ValueError(f"bad measurement: {seconds} s for {count} experts")
        self._samples.append(seconds / count)

    @property
    def mean(self) -> float:
        if not self._samples:
            return self._prior
        return max(sum(self._samples) / len(self._samples), 1e-9)

    @property
    def samples(self) -> int:
        return len(self._samples)
