"""``python -m engine hotpath``: the decode hot path measured side by side in one run.

Configurations (each loaded once): plain transformers with its eager experts (what the
engine's op and sync counts are compared with), the engine with every expert resident (LRU,
cache 1.0), LRU and the whole method (``smoe``) at a cache fraction, each with the eager, the
grouped and the batched expert path. For each:

- **op counts**: torch ops and host syncs per decoded token (``engine.eval.opcount``), one
  greedy generation counted on this thread;
- **speed**: decode tokens/s of greedy generations in interleaved rounds (round r runs every
  configuration once, in a rotated order), the median per configuration, and ratios against
  the named baselines. Run it with ``--threads 1`` so the configurations share one core alike.

Counts are stable; speeds are ratios from one run, never thresholds.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import torch

from engine.config import LiveOptions, SamplingConfig
from engine.eval.opcount import OpCounter, PerToken, TokenSpan
from engine.events import FLUSH_TOKEN_ID, GenerationFinished, StatsSnapshot, TokenReceived
from engine.options import build_request
from engine.runtime.generation import stream_generation

PROMPT = "Tell me about the weather in the country in spring."
PLAIN = "transformers eager"


@dataclass(frozen=True)
class HotpathConfig:
    """One configuration to measure: a name and how to load it."""

    name: str
    cache_fraction: float | None = None  # None: plain transformers
    live: LiveOptions = field(default_factory=LiveOptions)
    experts: str = "eager"


EXPERT_PATHS = ("eager", "grouped", "batched")


def default_configs(fraction: float, alpha: float) -> list[HotpathConfig]:
    """Plain transformers, all-resident LRU, LRU and smoe at ``fraction``, each expert path."""
    smoe = LiveOptions(policy="smoe", alpha=alpha)
    configs = [HotpathConfig(PLAIN)]
    for experts in EXPERT_PATHS:
        configs += [
            HotpathConfig(f"lru all-resident {experts}", 1.0, LiveOptions(), experts),
            HotpathConfig(f"lru {fraction:g} {experts}", fraction, LiveOptions(), experts),
            HotpathConfig(f"smoe {fraction:g} a{alpha:g} {experts}", fraction, smoe, experts),
        ]
    return configs


class _PlainOffload:
    """The offload interface the generation loop needs, for a model with no offloading."""

    def end_step(self, num_tokens: int) -> None:
        return None

    def stats(self) -> StatsSnapshot:
        return StatsSnapshot()


@dataclass
class PlainLoaded:
    """A plain transformers model in the shape ``stream_generation`` takes."""

    model: Any
    tokenizer: Any
    device: torch.device
    offload: Any = field(default_factory=_PlainOffload)


def load_plain(
    model_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> PlainLoaded:
    """The model fully on ``device``, with transformers' eager experts loop."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model: Any = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, experts_implementation="eager", local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return PlainLoaded(model.to(device).eval(), tokenizer, torch.device(device))


def _request(tokens: int) -> Any:
    sampling = SamplingConfig(greedy=True, max_new_tokens=tokens, repetition_penalty=1.0)
    return build_request(PROMPT, sampling, chat=False)


def _events(runner: Any, tokens: int) -> Any:
    if isinstance(runner, PlainLoaded):
        return stream_generation(runner, _request(tokens), 4096)
    return runner.generate_stream(_request(tokens))


def count_decode(runner: Any, tokens: int) -> PerToken | None:
    """Ops and syncs per decoded token of one greedy generation (a session or plain model)."""
    counter = OpCounter(str(runner.loaded.device if hasattr(runner, "loaded") else runner.device))
    span = TokenSpan(counter)
    with counter:
        for event in _events(runner, tokens):
            if isinstance(event, TokenReceived):
                span.observe(event.token_id != FLUSH_TOKEN_ID)
    return span.result()


@dataclass(frozen=True)
class Speed:
    """One generation's decode speed: per wall second and per CPU second of this thread.

    The CPU-time figure (``time.thread_time`` between the first and the last token) leaves out
    time other processes take from a shared machine; with one torch thread all the work runs
    on this thread, so it is the steadier figure for ratios.
    """

    wall: float
    cpu: float


def decode_speed(runner: Any, tokens: int) -> Speed:
    """Decode speed of one greedy generation."""
    marks: list[float] = []
    wall = 0.0
    for event in _events(runner, tokens):
        if isinstance(event, TokenReceived) and event.token_id != FLUSH_TOKEN_ID:
            marks.append(time.thread_time())
        if isinstance(event, GenerationFinished):
            wall = event.stats.tokens_per_second
    spent = marks[-1] - marks[0] if len(marks) > 1 else 0.0
    return Speed(wall, (len(marks) - 1) / spent if spent > 0 else 0.0)


def interleaved_speeds(runners: dict[str, Any], tokens: int, rounds: int) -> dict[str, list[Speed]]:
    """``rounds`` rounds, each running every configuration once in a rotated order."""
    names = list(runners)
    speeds: dict[str, list[Speed]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            speeds[name].append(decode_speed(runners[name], tokens))
    return speeds


RATIOS: tuple[tuple[str, str, str], ...] = (
    ("smoe vs lru (eager)", "smoe {f} a{a} eager", "lru {f} eager"),
    ("smoe vs lru (grouped)", "smoe {f} a{a} grouped", "lru {f} grouped"),
    ("smoe vs lru (batched)", "smoe {f} a{a} batched", "lru {f} batched"),
    ("lru all-resident vs plain (eager)", "lru all-resident eager", PLAIN),
    ("lru all-resident vs plain (grouped)", "lru all-resident grouped", PLAIN),
    ("lru all-resident vs plain (batched)", "lru all-resident batched", PLAIN),
)


def ratios(rows: dict[str, Any], fraction: float, alpha: float) -> dict[str, float | None]:
    """The aims as CPU-time speed ratios of two configurations measured in the same run."""
    out: dict[str, float | None] = {}
    for label, top, bottom in RATIOS:
        a, b = (rows.get(n.format(f=f"{fraction:g}", a=f"{alpha:g}"), {}) for n in (top, bottom))
        x, y = a.get("tokens_per_cpu_second"), b.get("tokens_per_cpu_second")
        out[label] = x / y if x and y else None
    return out


def round_ratio_spreads(
    speeds: Mapping[str, Sequence[Speed]], fraction: float, alpha: float
) -> dict[str, tuple[float, float] | None]:
    """Per aim, the lowest and highest ratio of one round's two runs (CPU-time speeds)."""
    out: dict[str, tuple[float, float] | None] = {}
    for label, top, bottom in RATIOS:
        a, b = (speeds.get(n.format(f=f"{fraction:g}", a=f"{alpha:g}"), []) for n in (top, bottom))
        per_round = [x.cpu / y.cpu for x, y in zip(a, b, strict=False) if x.cpu and y.cpu]
        out[label] = (min(per_round), max(per_round)) if per_round else None
    return out


def summarize(
    counts: dict[str, PerToken | None], speeds: Mapping[str, Sequence[Speed]]
) -> dict[str, Any]:
    """Per configuration: ops, syncs, median tok/s (wall and CPU time); ops vs plain."""
    plain = counts.get(PLAIN)
    rows = {}
    for name, count in counts.items():
        runs = speeds.get(name) or []
        row: dict[str, Any] = {
            "tokens_per_second": median(s.wall for s in runs) if runs else None,
            "tokens_per_cpu_second": median(s.cpu for s in runs) if runs else None,
            "tokens_per_cpu_second_range": [min(s.cpu for s in runs), max(s.cpu for s in runs)]
            if runs
            else None,
        }
        if count is not None:
            row.update(count.to_dict())
            if plain is not None:
                row["ops_vs_plain"] = count.ops / plain.ops
        rows[name] = row
    return rows


# ---------------------------------------------------------------- command


def configure(parser: Any) -> None:
    """``python -m engine hotpath`` arguments."""
    parser.add_argument("--model", type=Path, help="model folder (default: the built-in model)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--cache-fraction", type=float, default=0.5, metavar="F")
    parser.add_argument("--alpha", type=float, default=0.4, metavar="A")
    parser.add_argument("--tokens", type=int, default=24, metavar="N", help="new tokens per run")
    parser.add_argument("--rounds", type=int, default=3, metavar="N", help="interleaved rounds")
    parser.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (use 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--markdown", type=Path, metavar="FILE", help="write the table into FILE's hotpath section"
    )
    parser.add_argument(
        "--host-cost",
        type=Path,
        metavar="FILE",
        help="write the measured host cost per MoE layer (the projection's input) to FILE",
    )


def _load(config: HotpathConfig, model_dir: Path, device: str) -> Any:
    from engine.options import EngineOptions, build_load_config
    from engine.runtime.session import ModelSession

    if config.cache_fraction is None:
        return load_plain(model_dir, device=device)
    live = config.live
    options = EngineOptions(
        model_dir=model_dir,
        device=device,
        dtype="float32",
        cache_fraction=config.cache_fraction,
        policy=live.policy,
        alpha=live.alpha,
        eviction=live.eviction,
        substitution=live.substitution,
        prefetch=live.prefetch,
        cpu_assist=live.cpu_assist,
        prefetch_from=live.prefetch_from,
        experts=config.experts,
    )
    return ModelSession.open(build_load_config(options))


def run(args: Any) -> int:
    """Load every configuration, count, time in interleaved rounds, print the table."""
    import json
    import sys
    from datetime import UTC, datetime

    from engine.errors import InvalidRequestError
    from engine.options import resolve_model_dir

    if args.tokens < 2 or args.rounds < 1:
        raise InvalidRequestError("--tokens must be at least 2 and --rounds at least 1")
    if args.threads is not None:
        if args.threads < 1:
            raise InvalidRequestError(f"--threads must be at least 1; got {args.threads}")
        torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(args.model)
    configs = default_configs(args.cache_fraction, args.alpha)
    runners = {c.name: _load(c, model_dir, args.device) for c in configs}
    counts = {name: count_decode(runner, args.tokens) for name, runner in runners.items()}
    speeds = interleaved_speeds(runners, args.tokens, args.rounds)
    rows = summarize(counts, speeds)
    result = {
        "command": "python -m engine hotpath",
        "model": str(model_dir.name),
        "device": args.device,
        "threads": torch.get_num_threads(),
        "machine": _machine(args.device),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "rows": rows,
        "ratios": ratios(rows, args.cache_fraction, args.alpha),
        "ratio_ranges": round_ratio_spreads(speeds, args.cache_fraction, args.alpha),
    }
    result["host_cost"] = host_cost(runners, counts, args, result)
    print(json.dumps(result, indent=2) if args.json else render(result))
    if args.markdown is not None:
        argv = "python -m engine " + " ".join(sys.argv[1:] or ["hotpath"])
        write_section(args.markdown, section(result, argv))
    if args.host_cost is not None and result["host_cost"] is not None:
        write_atomic(args.host_cost, json.dumps(result["host_cost"], indent=2) + "\n")
    return 0


HOST_COST_CONFIG = "smoe {f:g} a{a:g} grouped"  # the GPU default path: what projections charge


def host_cost(
    runners: dict[str, Any], counts: dict[str, PerToken | None], args: Any, result: dict[str, Any]
) -> dict[str, Any] | None:
    """The projection's host cost: the grouped smoe counts per MoE layer, and the time of one
    op measured on this device now (``projection.measure_seconds_per_op``)."""
    from engine.eval.projection import host_cost_document, measure_seconds_per_op

    name = HOST_COST_CONFIG.format(f=args.cache_fraction, a=args.alpha)
    count, runner = counts.get(name), runners.get(name)
    if count is None or runner is None:
        return None
    layers = len(runner.loaded.offload.moe_layers)
    source = {k: result[k] for k in ("command", "model", "device", "machine", "date")}
    source["configuration"] = name
    seconds = measure_seconds_per_op(device=args.device)
    return host_cost_document(count.ops, count.syncs, layers, seconds, source)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)


def _machine(device: str) -> str:
    from engine.eval.bench_report import machine_info

    info = machine_info(device)
    gpu = f", {info['gpu']}" if "gpu" in info else ""
    return f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}{gpu}"


def render(result: dict[str, Any]) -> str:
    """A markdown table of one hotpath result."""
    lines = [
        f"{result['model']} on {result['device']}, {result['threads']} thread(s), "
        f"{result['machine']}, {result['date']}",
        "",
        "| configuration | ops/token | ops vs plain | syncs/token | tok/s wall | tok/s CPU "
        "| CPU min-max |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in result["rows"].items():
        ops = row.get("ops_per_token")
        rel = row.get("ops_vs_plain")
        syncs = row.get("syncs_per_token")
        wall, cpu = row.get("tokens_per_second"), row.get("tokens_per_cpu_second")
        lines.append(
            f"| {name} | {_fmt(ops, '.0f')} | {_fmt(rel, '.2f')} | {_fmt(syncs, '.1f')} "
            f"| {_fmt(wall, '.1f')} | {_fmt(cpu, '.1f')} | {_span(row.get(SPAN), '.1f')} |"
        )
    lines += [
        "",
        "Speed ratios (tokens per CPU second, same run; medians, then the lowest and highest "
        "ratio within one round):",
        "",
    ]
    spans = result.get("ratio_ranges") or {}
    lines += [
        f"- {label}: {_fmt(value, '.2f')} (rounds {_span(spans.get(label), '.2f')})"
        for label, value in result["ratios"].items()
    ]
    cost = result.get("host_cost")
    if cost:
        lines += [
            "",
            f"Host cost the projections charge ({cost['configuration']}): "
            f"{cost['ops_per_layer']:.1f} ops and {cost['syncs_per_layer']:.1f} syncs per MoE "
            f"layer, {cost['seconds_per_op'] * 1e6:.1f} us per op on {cost['device']}.",
        ]
    return "\n".join(lines)


SPAN = "tokens_per_cpu_second_range"


def _span(pair: Sequence[float] | None, spec: str) -> str:
    return "-" if not pair else f"{format(pair[0], spec)}-{format(pair[1], spec)}"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# ---------------------------------------------------------------- report section

SECTION_BEGIN = "<!-- hotpath: generated by `python -m engine hotpath --markdown`; do not edit -->"
SECTION_END = "<!-- /hotpath -->"


def section(result: dict[str, Any], argv: str) -> str:
    """The marked ``BENCHMARKS.md`` section of one hotpath result."""
    return "\n".join(
        [
            SECTION_BEGIN,
            "## Decode hot path: ops, host syncs and speed side by side (issue 9)",
            "",
            "Measured by the command below in one run: op and sync counts of one greedy "
            "generation per configuration (stable), then decode speed in interleaved rounds "
            "(medians; 'tok/s CPU' divides by this thread's CPU time, which other processes "
            "on a shared machine do not inflate). CPU figures only: GPU figures come from "
            "`scripts/gpu-check.sh` on a GPU and are not measured yet.",
            "",
            f"```\n{argv}\n```",
            "",
            render(result),
            SECTION_END,
        ]
    )


def replace_section(text: str, new: str) -> str:
    """``text`` with its marked hotpath section replaced by ``new`` (appended if absent)."""
    start, end = text.find(SECTION_BEGIN), text.find(SECTION_END)
    if start == -1 or end == -1 or end < start:
        return text.rstrip("\n") + "\n\n" + new + "\n"
    return text[:start] + new + text[end + len(SECTION_END) :]


def kept_section(old: str) -> str | None:
    """The marked hotpath section of an existing report, to carry into a regenerated one."""
    start, end = old.find(SECTION_BEGIN), old.find(SECTION_END)
    if start == -1 or end == -1 or end < start:
        return None
    return old[start : end + len(SECTION_END)]


def write_section(path: Path, new: str) -> None:
    """Replace the section in ``path`` atomically (temp file + rename)."""
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    write_atomic(path, replace_section(text, new))
