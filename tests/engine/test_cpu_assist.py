"""Algorithm 2 against brute force, and the rolling cost estimate."""

from __future__ import annotations

import random

import pytest

from engine.offload.cpu_assist import RollingCost, plan


def _best_makespan(n: int, cost_load: float, cost_cpu: float) -> float:
    return min(max(m * cost_load, (n - m) * cost_cpu) for m in range(n + 1))


@pytest.mark.parametrize("seed", range(30))
def test_plan_minimises_makespan_like_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(0, 12)
    experts = rng.sample(range(64), n)
    scores = [rng.random() for _ in range(n)]
    cost_load, cost_cpu = rng.uniform(0.1, 5.0), rng.uniform(0.1, 5.0)
    result = plan(experts, scores, cost_load, cost_cpu)
    assert result.makespan == pytest.approx(_best_makespan(n, cost_load, cost_cpu))
    assert sorted(result.load + result.cpu) == sorted(experts), "an expert was lost or doubled"
    by_score = dict(zip(experts, scores, strict=True))
    if result.load and result.cpu:
        assert min(by_score[e] for e in result.load) >= max(by_score[e] for e in result.cpu)


def test_cheap_cpu_takes_the_single_expert() -> None:
    result = plan([7], [0.3], cost_load=10.0, cost_cpu=1.0)
    assert result.cpu == (7,) and result.load == ()


def test_highest_scores_are_copied_lowest_computed() -> None:
    result = plan([1, 2, 3, 4], [0.1, 0.4, 0.3, 0.2], cost_load=1.0, cost_cpu=1.0)
    assert result.load == (2, 3) and result.cpu == (1, 4)
    assert result.makespan == pytest.approx(2.0)


def test_ties_go_to_pcie() -> None:
    assert plan([5], [0.9], cost_load=2.0, cost_cpu=2.0).load == (5,)


def test_plan_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="scores"):
        plan([1, 2], [0.1], 1.0, 1.0)
    with pytest.raises(ValueError, match="positive"):
        plan([1], [0.1], 0.0, 1.0)


def test_rolling_cost_uses_prior_then_the_last_window() -> None:
    cost = RollingCost(prior=0.5, window=3)
    assert cost.mean == 0.5 and cost.samples == 0
    for seconds in (1.0, 2.0, 3.0, 4.0):
        cost.add(seconds)
    assert cost.mean == pytest.approx(3.0), "only the last three samples count"
    cost.add(10.0, count=5)  # five experts in one batch: 2 s each
    assert cost.mean == pytest.approx((3.0 + 4.0 + 2.0) / 3)
    with pytest.raises(ValueError):
        cost.add(1.0, count=0)
    with pytest.raises(ValueError):
        RollingCost(prior=0.0)
