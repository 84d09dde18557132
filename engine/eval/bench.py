"""The benchmark: policies side by side in one run, on the same text and cache budgets.

Policies, cumulative in the paper's ablation order: ``lru`` (the mixtral-offloading
baseline), ``lfu``, ``score`` (score-aware eviction alone), ``+substitution``, ``+prefetch``
and ``+cpu`` (the whole method, ``--policy smoe``). Each runs at every cache fraction and, when
it substitutes, at every alpha; configurations that are the same run (``+substitution`` at
alpha 0 is ``score``) are measured once and reported under both names. Every configuration is
loaded fresh and goes through the fidelity harness (teacher-forced against the unmodified
model, with its transfer counters), then through timed greedy generations of the prompts
(decode tokens/s and time to first token, median of the runs). Counts are turned into
projected time per token for real model geometries (``engine.eval.projection``): labelled
projections, never measurements. The default alpha is picked by a stated rule
(``choose_default_alpha``) from the device-independent rows (``+prefetch``: on a CPU-only
device "copy" and "compute on the CPU" read the same RAM, so the ``+cpu`` split, and its
bytes, follow timing noise; its bytes are headline figures only from a GPU run, see
``headline_policy``). The curve is written, atomically, where the app's slider reads it
(``app.curves`` format). Reporting (tables, plot, ``BENCHMARKS.md``) lives in
``engine.eval.bench_report``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from statistics import median
from typing import Any

from engine.atomic import write_text_atomic
from engine.config import LiveOptions, SamplingConfig
from engine.errors import InvalidRequestError
from engine.eval import projection
from engine.eval.fidelity import (
    REFERENCE_LIVE,
    FidelityRow,
    Loader,
    PreparedText,
    Reference,
    RunConfig,
    Runner,
    evaluate,
    run_reference,
)
from engine.events import GenerationFinished

POLICIES: tuple[str, ...] = ("lru", "lfu", "score", "+substitution", "+prefetch", "+cpu")
SUBSTITUTING = frozenset({"+substitution", "+prefetch", "+cpu"})
FULL_METHOD = "+cpu"
DEVICE_INDEPENDENT = "+prefetch"  # the whole method but CPU assist: bytes do not follow timing
GPU_DEVICES = frozenset({"cuda"})
CACHE_FRACTIONS: tuple[float, ...] = (0.25, 0.5, 0.75)
ALPHAS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4)
DEFAULT_PROMPTS: tuple[str, ...] = (
    "Tell me about the weather in the country in spring.",
    "How do I read a file line by line in Python?",
)
MIN_AGREEMENT = 0.97  # default-alpha rule: top-1 agreement at least this ...
MAX_PPL_DELTA = 0.02  # ... and perplexity at most 2% above the unmodified model
HEADLINE_CACHE = 0.5


def live_options(policy: str, alpha: float) -> LiveOptions:
    """The engine switches for one named policy of the cumulative ablation."""
    if policy in ("lru", "lfu"):
        return LiveOptions(policy=policy)  # type: ignore[arg-type]
    if policy not in POLICIES:
        raise InvalidRequestError(f"unknown bench policy {policy!r}; choose from {POLICIES}")
    rank = POLICIES.index(policy)
    return LiveOptions(
        policy="smoe",
        alpha=alpha if policy in SUBSTITUTING else 0.0,
        substitution=rank >= POLICIES.index("+substitution"),
        prefetch=rank >= POLICIES.index("+prefetch"),
        cpu_assist=rank >= POLICIES.index("+cpu"),
    )


@dataclass(frozen=True)
class BenchPlan:
    """What to measure; ``quick`` shrinks everything for a smoke run."""

    policies: tuple[str, ...] = POLICIES
    cache_fractions: tuple[float, ...] = CACHE_FRACTIONS
    alphas: tuple[float, ...] = ALPHAS
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    gen_tokens: int = 32
    timing_runs: int = 3
    count_ops: bool = False  # one more generation per row, counted (``engine.eval.opcount``)

    def __post_init__(self) -> None:
        unknown = [p for p in self.policies if p not in POLICIES]
        if unknown:
            raise InvalidRequestError(f"unknown bench policies {unknown}; choose from {POLICIES}")
        if not self.cache_fractions or not self.alphas or not self.policies:
            raise InvalidRequestError("the bench needs at least one policy, cache size and alpha")

    def configs(self) -> list[RunConfig]:
        """Every (cache, policy, alpha) row; alpha varies only for substituting policies."""
        rows = []
        for fraction in self.cache_fractions:
            for policy in self.policies:
                alphas = self.alphas if policy in SUBSTITUTING else (0.0,)
                for alpha in alphas:
                    rows.append(RunConfig(fraction, live_options(policy, alpha), policy))
        return rows


def run_key(config: RunConfig) -> tuple[Any, ...]:
    """Configurations with equal keys behave identically and are measured once."""
    live = config.live
    alpha = live.alpha if live.substitution_on else 0.0
    return (
        config.cache_fraction,
        live.effective_eviction,
        alpha,
        live.substitution_on,
        live.prefetch_on,
        live.cpu_assist_on,
    )


@dataclass(frozen=True)
class GenerationTiming:
    """Greedy generations of the prompts: decode speed and time to first token, medians."""

    tokens_per_second: float
    time_to_first_token_s: float
    runs: int
    tokens: int


def time_generation(
    session: Any, prompts: Sequence[str], tokens: int, runs: int
) -> GenerationTiming:
    """``runs`` passes over ``prompts`` (greedy, ``tokens`` new tokens); medians over them all."""
    from engine.options import build_request  # runtime helpers, only needed with a session

    sampling = SamplingConfig(greedy=True, max_new_tokens=tokens, repetition_penalty=1.0)
    speeds, firsts, produced = [], [], 0
    for _ in range(runs):
        for prompt in prompts:
            request = build_request(prompt, sampling, chat=True)
            for event in session.generate_stream(request):
                if isinstance(event, GenerationFinished):
                    speeds.append(event.stats.tokens_per_second)
                    firsts.append(event.stats.time_to_first_token_s)
                    produced += len(event.token_ids)
    if not speeds:
        return GenerationTiming(0.0, 0.0, 0, 0)
    return GenerationTiming(median(speeds), median(firsts), runs, produced)


def _projection_inputs(counts: dict[str, Any]) -> projection.Fractions | None:
    """Fractions of expert uses: copies (prefetch included, so waste costs), subs, CPU runs."""
    subs, copies, cpu = counts["substitutions"], counts["transfers"], counts["cpu_computed"]
    uses = counts["hits"] + counts["misses"] + subs
    if uses == 0:
        return None
    hits = max(0, uses - subs - copies - cpu)
    return projection.fractions_from_counts(hits, subs, copies, cpu)


def projections_of(
    counts: dict[str, Any], cost: projection.HostCost | None = None
) -> dict[str, float]:
    """Projected floor on ms/token (1/x: an upper bound on tok/s) per geometry and link,
    charging ``cost`` as the host time (default: the measured ``host_cost.json``)."""
    fractions = _projection_inputs(counts)
    if fractions is None:
        return {}
    host = projection.Host(host=cost)
    return {
        f"proj_ms:{p.geometry}:{p.link}": p.overlapped_s * 1e3
        for p in projection.project_all(fractions, host=host)
    }


@dataclass
class BenchResult:
    """Everything one bench run measured, ready for the report."""

    rows: list[dict[str, Any]]
    default_alpha: float
    model_name: str
    info: dict[str, Any]
    settings: dict[str, Any]
    replay: list[dict[str, Any]] = field(default_factory=list)
    started: str = ""
    seconds: float = 0.0


def _row_dict(row: FidelityRow, timing: GenerationTiming) -> dict[str, Any]:
    data = row.to_dict()
    data.update(
        gen_tokens_per_second=timing.tokens_per_second,
        gen_time_to_first_token_s=timing.time_to_first_token_s,
        gen_runs=timing.runs,
        gen_tokens=timing.tokens,
        same_run_as=None,
    )
    return data


def measure_config(
    runner: Runner,
    config: RunConfig,
    text: PreparedText,
    reference: Reference,
    plan: BenchPlan,
) -> dict[str, Any]:
    """Fidelity + counters over the text, then timed generations (engine sessions only)."""
    row = evaluate(runner, config, text, reference)
    session = getattr(runner, "session", None)
    timing = GenerationTiming(0.0, 0.0, 0, 0)
    if session is not None and plan.prompts and plan.timing_runs > 0:
        timing = time_generation(session, plan.prompts, plan.gen_tokens, plan.timing_runs)
    data = _row_dict(row, timing)
    if session is not None and plan.prompts and plan.count_ops:
        data.update(count_generation_ops(session, plan.prompts[0], plan.gen_tokens))
    return data


def count_generation_ops(session: Any, prompt: str, tokens: int) -> dict[str, Any]:
    """Ops and host syncs per decoded token of one greedy generation, counted untimed."""
    from engine.eval.opcount import OpCounter, TokenSpan
    from engine.events import FLUSH_TOKEN_ID, TokenReceived
    from engine.options import build_request

    sampling = SamplingConfig(greedy=True, max_new_tokens=tokens, repetition_penalty=1.0)
    counter = OpCounter(str(session.loaded.device))
    span = TokenSpan(counter)
    with counter:
        for event in session.generate_stream(build_request(prompt, sampling, chat=True)):
            if isinstance(event, TokenReceived):
                span.observe(event.token_id != FLUSH_TOKEN_ID)
    counts = span.result()
    if counts is None:
        return {"ops_per_token": None, "syncs_per_token": None}
    return {"ops_per_token": counts.ops, "syncs_per_token": counts.syncs}


def run_bench(
    loader: Loader,
    plan: BenchPlan,
    text: PreparedText,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    on_reference: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """The reference, then every planned configuration (duplicates measured once).

    ``on_reference`` is told when the reference pass is done (progress: the rows that follow
    all cost about the same, the reference does not).
    """
    reference_runner = loader(RunConfig(1.0, REFERENCE_LIVE, "reference"))
    try:
        reference = run_reference(reference_runner, text)
    finally:
        reference_runner.close()
    if on_reference is not None:
        on_reference()
    measured: dict[tuple[Any, ...], dict[str, Any]] = {}
    rows = []
    for config in plan.configs():
        key = run_key(config)
        if key in measured:
            row = dict(
                measured[key],
                policy=config.name,
                alpha=config.live.alpha,
                same_run_as=measured[key]["policy"],
            )
        else:
            runner = loader(config)
            try:
                row = measure_config(runner, config, text, reference, plan)
            finally:
                runner.close()
            measured[key] = row
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def headline_policy(device: str) -> str:
    """The policy whose bytes a run on ``device`` may headline.

    CPU assist trades a copy for a CPU computation by measured cost; on a CPU-only device
    both read the same RAM, so which one runs (and the bytes counted) follows timing noise.
    Only a GPU run reports the whole method (``+cpu``); elsewhere substitution and prefetch
    (``+prefetch``), whose counts do not depend on the device.
    """
    return FULL_METHOD if device in GPU_DEVICES else DEVICE_INDEPENDENT


def measured_policy(rows: Sequence[dict[str, Any]], preferred: str) -> str:
    """``preferred`` if the run measured it, else the first measured substituting policy
    (a partial run, e.g. the app's Measure, may hold only one)."""
    measured = {r["policy"] for r in rows}
    order = (preferred, DEVICE_INDEPENDENT, FULL_METHOD, "+substitution")
    return next((p for p in order if p in measured), preferred)


def choose_default_alpha(
    rows: Sequence[dict[str, Any]],
    policy: str | None = None,
    cache_fraction: float = HEADLINE_CACHE,
    min_agreement: float = MIN_AGREEMENT,
    max_ppl_delta: float = MAX_PPL_DELTA,
) -> float:
    """The measured alpha moving the fewest bytes while fidelity stays within both bounds.

    The paper's equation 5 is not available to us; this rule is stated instead: among the
    rows of ``policy`` (by default the device-independent ``+prefetch``, so the choice does
    not follow timing noise) at ``cache_fraction`` (the nearest measured one), keep the alphas from
    0 upwards while top-1 agreement >= ``min_agreement`` and perplexity <= (1 +
    ``max_ppl_delta``) x the unmodified model's (the first failure ends the admissible range:
    fidelity must not be bought back by luck at a larger alpha); of those, take the one that
    moves the fewest bytes per token (the smaller alpha on a tie).
    """
    admissible = []
    policy = measured_policy(rows, policy or DEVICE_INDEPENDENT)
    for row in curve_rows(rows, policy, cache_fraction):
        if row["top1_agreement"] < min_agreement or row["ppl_delta"] > max_ppl_delta:
            break
        admissible.append(row)
    if not admissible:
        return 0.0
    fastest = min(admissible, key=lambda r: (r.get("bytes_per_token", 0.0), r["alpha"]))
    return float(fastest["alpha"])


def curve_rows(
    rows: Sequence[dict[str, Any]],
    policy: str = FULL_METHOD,
    cache_fraction: float = HEADLINE_CACHE,
) -> list[dict[str, Any]]:
    """The rows of one policy at the measured cache fraction nearest ``cache_fraction``."""
    candidates = [r for r in rows if r["policy"] == policy]
    if not candidates:
        return []
    nearest = min({r["cache_fraction"] for r in candidates}, key=lambda f: abs(f - cache_fraction))
    return sorted(
        (r for r in candidates if r["cache_fraction"] == nearest), key=lambda r: r["alpha"]
    )


def machine_label(machine: dict[str, Any]) -> str:
    """A short name of what a run was measured on: the GPU, else the CPU and its cores."""
    if machine.get("gpu"):
        return str(machine["gpu"])
    cores = machine.get("cores")
    cpu = str(machine.get("cpu") or "unknown CPU")
    return f"{cpu}, {cores} cores" if cores else cpu


def curve_document(result: BenchResult, device: str) -> dict[str, Any]:
    """The slider's curve (``app.curves`` format): the headline policy at the headline cache."""
    policy = measured_policy(result.rows, headline_policy(device))
    points = [
        {
            "alpha": r["alpha"],
            "bytes_per_token": r["bytes_per_token"],
            "tokens_per_second": r["gen_tokens_per_second"] or r["tokens_per_second"],
            "top1_agreement": r["top1_agreement"],
            "ppl_delta": r["ppl_delta"],
            "kl": r["kl"],
            "hit_rate": r["hit_rate"],
        }
        for r in curve_rows(result.rows, policy)
    ]
    return {
        "model": result.model_name,
        "device": device,
        "machine": machine_label(result.settings.get("machine", {})),
        "measured_at": result.started,
        "policy": policy,
        "default_alpha": result.default_alpha,
        "rule": f"fewest bytes per token among the alphas with top-1 agreement >= "
        f"{MIN_AGREEMENT} and perplexity delta <= {MAX_PPL_DELTA:.0%} "
        f"(policy {measured_policy(result.rows, DEVICE_INDEPENDENT)}, "
        f"cache {HEADLINE_CACHE:.0%})",
        "ppl_delta_unit": "relative (0.01 = 1% higher perplexity than the unmodified model)",
        "points": points,
    }


def write_curve(document: dict[str, Any], paths: Sequence[Path]) -> list[Path]:
    """Write the curve JSON atomically to every writable path; returns those written."""
    text = json.dumps(document, indent=2)
    written = []
    for path in paths:
        try:
            write_text_atomic(path, text + "\n")
        except OSError as error:  # e.g. a read-only install folder: the others still count
            print(f"warning: could not write the curve to {path}: {error}", file=sys.stderr)
            continue
        written.append(path)
    return written


def now_utc() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
