"""The overhead arithmetic on hand-made traces: token-by-token delivery and robust summaries."""

from __future__ import annotations

import pytest

from engine.server.timing import Trace, best_ratio, delivery, ratios, spread


def test_delivery_compares_the_same_tokens_at_both_ends():
    engine = Trace(asked=10.0, stamps=(10.5, 10.6, 10.7, 10.8), tokens=4)
    client = Trace(asked=9.99, stamps=(10.502, 10.604, 10.701, 10.810), tokens=4)
    seen = delivery(engine, client)
    assert seen.first_token_delta_ms == pytest.approx(2.0)
    assert seen.lag_median_ms == pytest.approx(3.0)  # lags 2, 4, 1, 10
    assert seen.lag_max_ms == pytest.approx(10.0)
    assert seen.speed_ratio == pytest.approx(0.3 / 0.308)
    assert seen.whole_ratio == pytest.approx(0.82 / 0.8)
    assert seen.before_engine_ms == pytest.approx(10.0)


def test_traces_of_different_lengths_are_not_compared():
    with pytest.raises(ValueError, match="3 tokens left the engine, 2 reached the client"):
        delivery(Trace(0.0, (1.0, 2.0, 3.0)), Trace(0.0, (1.0, 2.0)))


def test_trace_speed_and_first_token():
    trace = Trace(asked=1.0, stamps=(1.25, 1.5, 1.75, 2.25))
    assert trace.first_s == 0.25 and trace.span_s == 1.0 and trace.decode_per_s == 3.0
    assert Trace(1.0, (1.5,)).decode_per_s == 0.0 and Trace(1.0, ()).first_s == 0.0
    assert Trace(1.0, (1.0, 2.0, 3.0), cpu_s=0.5).cpu_per_piece_ms == 250.0


def test_spread_reports_median_quartiles_and_range():
    seen = spread([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (seen["median"], seen["min"], seen["max"], seen["n"]) == (3.0, 1.0, 5.0, 5)
    assert seen["q1"] <= seen["median"] <= seen["q3"]
    assert spread([])["n"] == 0 and spread([2.0])["q3"] == 2.0


def test_paired_and_best_ratios():
    assert ratios([2.0, 3.0, 4.0], [1.0, 0.0, 2.0]) == [2.0, 2.0]
    assert best_ratio([9.0, 10.0], [8.0, 12.5]) == 0.8
    assert best_ratio([], [1.0]) == 0.0
