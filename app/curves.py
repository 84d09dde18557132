"""Benchmark curves: measured speed and fidelity per alpha, read by the importance slider.

File format (``<user_data_dir>/curves/<model-name>.json``)::

    {"model": "understudy-mini-moe", "device": "cuda", "measured_at": "2026-11-24T09:00:00",
     "machine": "NVIDIA GeForce RTX 4070", "policy": "+cpu",
     "points": [{"alpha": 0.0, "tokens_per_second": 41.2, "bytes_per_token": 1.2e8,
                 "top1_agreement": 1.0, "ppl_delta": 0.0}, ...]}

Every point needs ``alpha``; the other fields are optional (``null`` or absent when not
measured); unknown fields are ignored. ``ppl_delta`` is relative (0.01: perplexity 1% above
the unmodified model). ``engine.eval.bench`` writes this file; a curve shipped next to the
built-in model (``understudy_curve.json``) is used until the user measures their own.

The slider's words come from here: ``describe`` gives a point's figures (its speed only from a
GPU curve: on a CPU-only machine alpha trades bytes copied, not speed), ``curve_source`` says
which machine and date the figures were measured on (they are not live), ``axis_labels`` names
what the slider trades on the curve's device. No Qt.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from app.model_library import human_bytes
from engine.atomic import write_text_atomic
from engine.paths import user_data_dir

MATCH_TOLERANCE = 0.026  # half a slider step: a point this close counts as measured here


class CurveError(ValueError):
    """A curve file exists but cannot be used."""


@dataclass(frozen=True)
class CurvePoint:
    alpha: float
    tokens_per_second: float | None = None
    bytes_per_token: float | None = None
    top1_agreement: float | None = None
    ppl_delta: float | None = None


@dataclass(frozen=True)
class Curve:
    model: str
    points: tuple[CurvePoint, ...]
    device: str = ""
    measured_at: str = ""
    default_alpha: float | None = None  # the benchmark's pick from this curve, if it made one
    machine: str = ""  # what it was measured on (GPU name, or CPU and cores)
    policy: str = ""  # the bench policy of the points (``+cpu`` only from a GPU run)

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"

    def at(self, alpha: float) -> CurvePoint | None:
        """The point measured at this alpha (within half a slider step), else None."""
        best = min(self.points, key=lambda p: abs(p.alpha - alpha), default=None)
        if best is None or abs(best.alpha - alpha) > MATCH_TOLERANCE:
            return None
        return best

    def between(self, alpha: float) -> CurvePoint | None:
        """Linear interpolation between the measured points around ``alpha`` (None outside)."""
        lower = [p for p in self.points if p.alpha <= alpha]
        upper = [p for p in self.points if p.alpha >= alpha]
        if not lower or not upper:
            return None
        a, b = lower[-1], upper[0]
        if a.alpha == b.alpha:
            return a
        t = (alpha - a.alpha) / (b.alpha - a.alpha)
        return CurvePoint(alpha, *(_mix(getattr(a, f), getattr(b, f), t) for f in FIGURES))


FIGURES = ("tokens_per_second", "bytes_per_token", "top1_agreement", "ppl_delta")


def _mix(low: float | None, high: float | None, t: float) -> float | None:
    return None if low is None or high is None else low + (high - low) * t


def curve_path(model_name: str, data_dir: Path | None = None) -> Path:
    return (data_dir or user_data_dir()) / "curves" / f"{model_name}.json"


def _number(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CurveError(f"{name} must be a number, got {value!r}")
    return float(value)


def _point(data: Any) -> CurvePoint:
    if not isinstance(data, dict) or "alpha" not in data:
        raise CurveError("every point needs an alpha")
    values = {name: _number(data.get(name), name) for name in FIGURES}
    alpha = _number(data["alpha"], "alpha")
    return CurvePoint(alpha=alpha or 0.0, **values)


def parse_curve(data: Any) -> Curve:
    if not isinstance(data, dict) or not isinstance(data.get("points"), list):
        raise CurveError("a curve is a JSON object with a 'points' list")
    points = tuple(sorted((_point(p) for p in data["points"]), key=lambda p: p.alpha))
    return Curve(
        str(data.get("model", "")),
        points,
        str(data.get("device", "")),
        str(data.get("measured_at", "")),
        _number(data.get("default_alpha"), "default_alpha"),
        str(data.get("machine", "")),
        str(data.get("policy", "")),
    )


SHIPPED_CURVE = "understudy_curve.json"  # written next to the built-in model by the benchmark


def read_curve(path: Path) -> Curve | None:
    """The curve in ``path``, or None when there is none. Raises CurveError if unusable."""
    if not path.exists():
        return None
    try:
        return parse_curve(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError) as error:
        raise CurveError(f"cannot read {path}: {error}") from error


def load_curve(
    model_name: str, data_dir: Path | None = None, model_dir: Path | None = None
) -> Curve | None:
    """The user's measured curve for a model, else the one shipped in its folder, else None."""
    curve = read_curve(curve_path(model_name, data_dir))
    if curve is None and model_dir is not None:
        curve = read_curve(model_dir / SHIPPED_CURVE)
    return curve


def save_curve(curve: Curve, data_dir: Path | None = None) -> Path:
    path = curve_path(curve.model, data_dir)
    data = {
        "model": curve.model,
        "device": curve.device,
        "measured_at": curve.measured_at,
        "default_alpha": curve.default_alpha,
        "machine": curve.machine,
        "policy": curve.policy,
        "points": [asdict(p) for p in curve.points],
    }
    return write_text_atomic(path, json.dumps(data, indent=2))


def describe(point: CurvePoint | None, curve: Curve | None = None) -> str:
    """One line for the slider: the measured figures at this position.

    With the ``curve`` it came from, speed is shown only for a GPU curve (on a CPU-only run,
    fewer copies are not faster: copying and computing read the same RAM).
    """
    if point is None:
        return "not measured yet"
    parts = []
    if point.tokens_per_second is not None and (curve is None or curve.on_gpu):
        parts.append(f"{point.tokens_per_second:.1f} tok/s")
    if point.bytes_per_token is not None:
        parts.append(f"{human_bytes(point.bytes_per_token)}/token moved")
    if point.top1_agreement is not None:
        parts.append(f"top-1 agreement {point.top1_agreement * 100:.1f}%")
    if point.ppl_delta is not None:
        percent = round(point.ppl_delta * 100, 1) + 0.0  # + 0.0: no "-0.0%"
        parts.append(f"perplexity {percent:+.1f}%")
    return ", ".join(parts) if parts else "measured, no figures recorded"


def curve_source(curve: Curve) -> str:
    """Where the slider's figures come from: the benchmark, which machine, which day."""
    where = curve.machine or (f"device {curve.device}" if curve.device else "")
    when = curve.measured_at[:10]
    details = ", ".join(part for part in (where, when) if part)
    return f"benchmark curve ({details})" if details else "benchmark curve"


def axis_labels(curve: Curve | None) -> tuple[str, str]:
    """The slider's two ends: what moving it trades on the curve's device."""
    if curve is not None and curve.on_gpu:
        return "exact", "faster, approximate"
    return "exact", "fewer copies, approximate"
