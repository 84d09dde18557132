"""Pure arithmetic of the overhead measurement: timestamped traces in, figures out.

A ``Trace`` is one generation seen from one side: when it was asked for and when each piece of
text arrived there. The engine side stamps each text-bearing token as it leaves the engine
thread; the client side stamps the same token when its SSE chunk is read. All stamps come from
one monotonic clock shared by the processes of one machine (``time.perf_counter``), so the two
sides of one generation can be compared token by token, free of the round-to-round noise that
swamps two separately timed runs on a busy machine. No I/O, no torch: tested on tables.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Trace:
    """One generation from one side: ``asked`` when requested, ``stamps`` per text piece."""

    asked: float
    stamps: tuple[float, ...]
    tokens: int = 0  # tokens generated, as counted by that side (0: unknown)
    cpu_s: float = 0.0  # CPU time of the stamping thread from the first to the last stamp

    @property
    def first_s(self) -> float:
        """Request to first piece of text."""
        return self.stamps[0] - self.asked if self.stamps else 0.0

    @property
    def span_s(self) -> float:
        """First to last piece of text: the decode phase."""
        return self.stamps[-1] - self.stamps[0] if len(self.stamps) > 1 else 0.0

    @property
    def decode_per_s(self) -> float:
        """Pieces after the first per second of the decode phase."""
        return (len(self.stamps) - 1) / self.span_s if self.span_s > 0 else 0.0

    @property
    def cpu_per_piece_ms(self) -> float:
        """CPU time of the stamping thread per piece after the first (the decode phase)."""
        return self.cpu_s * 1000 / (len(self.stamps) - 1) if len(self.stamps) > 1 else 0.0


@dataclass(frozen=True)
class Delivery:
    """The same generation at the engine and at the client: what the server added."""

    first_token_delta_ms: float  # client received the first token - engine released it
    lag_median_ms: float  # per token: client received - engine released
    lag_max_ms: float
    speed_ratio: float  # client-observed decode speed / engine decode speed
    whole_ratio: float  # client (request sent -> last token) / engine (asked -> last token)
    before_engine_ms: float  # request sent -> the engine was asked (HTTP, parsing, queue)


def delivery(engine: Trace, client: Trace) -> Delivery:
    """Compare one generation's two traces token by token (they must hold the same tokens)."""
    if len(engine.stamps) != len(client.stamps) or not engine.stamps:
        raise ValueError(
            f"the traces do not match: {len(engine.stamps)} tokens left the engine, "
            f"{len(client.stamps)} reached the client"
        )
    lags = [(c - e) * 1000 for e, c in zip(engine.stamps, client.stamps, strict=True)]
    engine_whole = engine.stamps[-1] - engine.asked
    client_whole = client.stamps[-1] - client.asked
    return Delivery(
        first_token_delta_ms=lags[0],
        lag_median_ms=statistics.median(lags),
        lag_max_ms=max(lags),
        speed_ratio=engine.span_s / client.span_s if client.span_s > 0 else 0.0,
        whole_ratio=client_whole / engine_whole if engine_whole > 0 else 0.0,
        before_engine_ms=(engine.asked - client.asked) * 1000,
    )


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and range of a sample (all zero when it is empty)."""
    if not values:
        return {"median": 0.0, "q1": 0.0, "q3": 0.0, "min": 0.0, "max": 0.0, "n": 0}
    ordered = sorted(values)
    q1, _, q3 = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else ordered * 3
    return {
        "median": statistics.median(ordered),
        "q1": q1,
        "q3": q3,
        "min": ordered[0],
        "max": ordered[-1],
        "n": len(ordered),
    }


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Pairwise ratios, skipping pairs with a zero denominator."""
    return [a / b for a, b in zip(numerators, denominators, strict=True) if b]


def best_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """Best of one side over best of the other: noise from other jobs only ever slows a run,
    so the fastest rounds are the closest to each path's own cost."""
    if not numerators or not denominators or max(denominators) == 0:
        return 0.0
    return max(numerators) / max(denominators)
