"""``python -m engine fidelity`` and ``python -m engine bench``: argument setup and runners.

Registered in ``engine.cli.COMMANDS``; the shared model/cache/method flags come from
``engine.cli`` (imported lazily here, since ``engine.cli`` imports this module). ``fidelity``
takes ``--alpha`` as a comma-separated list and ``--json`` with an optional output path.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from engine.atomic import write_text_atomic
from engine.config import DEFAULT_CACHE_FRACTION, DEVICES, DTYPES, CacheConfig
from engine.errors import InvalidRequestError, ModelLoadError
from engine.eval import bench, bench_curve, bench_report, hotpath, projection
from engine.eval.cloze import ClozeSettings
from engine.eval.fidelity import (
    DEFAULT_WINDOW,
    FidelityRow,
    PreparedText,
    RunConfig,
    format_table,
    prepare_text,
    quantization_row,
    run_fidelity,
    session_loader,
)
from engine.options import (
    EngineOptions,
    build_live_options,
    build_load_config,
    resolved_alpha,
)
from engine.paths import assembled_model_dir, builtin_model_dir, builtin_recipe_dir, user_data_dir

DEFAULT_OUT = Path("docs/benchmarks")
DEFAULT_TRACES = Path("../shared/traces")
CURVE_FILE = "understudy_curve.json"
SAMPLE_FILE = "heldout_sample.txt"
REPO_ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- shared pieces


def parse_alphas(text: str) -> tuple[float, ...]:
    """``"0,0.1,0.2"`` -> ``(0.0, 0.1, 0.2)``; a clear error for anything else."""
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"alphas must be numbers separated by commas: {text!r}"
        ) from error
    if not values:
        raise argparse.ArgumentTypeError("give at least one alpha")
    if not all(math.isfinite(value) for value in values):
        raise argparse.ArgumentTypeError(f"numbers must be finite: {text!r}")
    return values


def parse_fractions(text: str) -> tuple[float, ...]:
    return parse_alphas(text)


def read_text_file(path: Path) -> str:
    """Plain text, or the ``text`` fields of a ``.jsonl`` file joined by blank lines."""
    from engine.cli import read_bounded

    raw = read_bounded(path, "text file")
    if path.suffix != ".jsonl":
        return raw
    try:
        records = [json.loads(line) for line in raw.splitlines() if line.strip()]
        return "\n\n".join(str(record["text"]) for record in records)
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise InvalidRequestError(
            f"{path} is not JSON lines with a 'text' field: {error}"
        ) from error


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    from engine.gguf.reader import is_gguf

    if is_gguf(model_dir):
        from engine.gguf.reader import open_gguf
        from engine.runtime.gguf_loading import load_gguf_tokenizer

        return load_gguf_tokenizer(open_gguf(model_dir))
    try:
        return AutoTokenizer.from_pretrained(
            model_dir, local_files_only=True, trust_remote_code=False
        )
    except Exception as error:  # transformers raises OSError, ValueError, TypeError here
        raise ModelLoadError(f"cannot load the tokenizer of {model_dir}: {error}") from error


def _add_text_options(parser: argparse.ArgumentParser, max_tokens: int, cloze_items: int) -> None:
    group = parser.add_argument_group("text")
    group.add_argument(
        "--max-tokens",
        type=int,
        default=max_tokens,
        metavar="N",
        help=f"teacher-force at most N tokens of the text (default {max_tokens})",
    )
    group.add_argument(
        "--window",
        type=int,
        default=DEFAULT_WINDOW,
        metavar="W",
        help="tokens per KV-cache window of the teacher-forced pass",
    )
    group.add_argument(
        "--cloze-items",
        type=int,
        default=cloze_items,
        metavar="N",
        help="cloze items drawn from the text (0: none)",
    )
    group.add_argument("--seed", type=int, default=0, help="seed of the cloze items")


def _prepare(args: argparse.Namespace, tokenizer: Any, path: Path) -> PreparedText:
    if args.max_tokens < 2:
        raise InvalidRequestError(f"--max-tokens must be at least 2; got {args.max_tokens}")
    settings = (
        ClozeSettings(num_items=args.cloze_items, seed=args.seed) if args.cloze_items > 0 else None
    )
    text = read_text_file(path)
    return prepare_text(tokenizer, text, args.max_tokens, args.window, settings)


def _progress(row: FidelityRow | dict[str, Any]) -> None:
    data = row.to_dict() if isinstance(row, FidelityRow) else row
    print(
        f"  {data['policy']:>14} cache {data['cache_fraction']:.2f} alpha {data['alpha']:g}: "
        f"top-1 {data['top1_agreement']:.4f}, hits {data['hit_rate']:.3f}, "
        f"{data['bytes_per_token'] / 1e6:.3f} MB/token",
        file=sys.stderr,
        flush=True,
    )


def _reference_done() -> None:
    print("bench: reference pass done", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- fidelity


def configure_fidelity(parser: argparse.ArgumentParser) -> None:
    from engine import cli

    cli.add_model_options(parser)
    group = parser.add_argument_group("fidelity", conflict_handler="resolve")  # new --alpha, --json
    group.add_argument(
        "--alpha",
        type=parse_alphas,
        metavar="A1,A2,...",
        help="importance thresholds, one configuration each (default: the model's curve "
        "alpha for smoe, as in the app; 0 without a curve)",
    )
    group.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="OUT",
        help="write the rows as JSON to OUT, or to stdout with no OUT",
    )
    group.add_argument(
        "--text-file",
        type=Path,
        required=True,
        metavar="F",
        help="plain text, or .jsonl with a 'text' field",
    )
    _add_text_options(parser, max_tokens=2048, cloze_items=20)


def _cache_fraction(options: EngineOptions, model_dir: Path) -> float:
    if options.cache_fraction is not None:
        return options.cache_fraction
    if options.cache_gb is None:
        return DEFAULT_CACHE_FRACTION
    from engine.runtime.loading import inspect_model

    info = inspect_model(model_dir)
    total = info.experts_per_layer * info.moe_layers
    return CacheConfig(budget_gb=options.cache_gb).slots_for(total, info.bytes_per_expert) / total


def fidelity_configs(args: argparse.Namespace) -> tuple[Any, list[RunConfig]]:
    """The base load config and one ``RunConfig`` per alpha for the given policy/cache."""
    from engine import cli

    first = args.alpha[0] if args.alpha else None  # the unused-option check sees a given alpha
    options = cli.engine_options(argparse.Namespace(**{**vars(args), "alpha": first}))
    base = build_load_config(options)
    fraction = _cache_fraction(options, base.model_dir)
    alphas = args.alpha or (resolved_alpha(options),)
    configs = [
        RunConfig(fraction, build_live_options(replace(options, alpha=alpha)), args.policy)
        for alpha in alphas
    ]
    return base, configs


def _emit_json(rows: list[dict[str, Any]], target: str) -> None:
    text = json.dumps(rows, indent=2)
    if target == "-":
        print(text)
        return
    path = Path(target)
    try:
        write_text_atomic(path, text + "\n")
    except OSError as error:
        raise InvalidRequestError(f"cannot write {path}: {error}") from error
    print(f"wrote {path}", file=sys.stderr)


def run_fidelity_command(args: argparse.Namespace) -> int:
    base, configs = fidelity_configs(args)
    prepared = _prepare(args, load_tokenizer(base.model_dir), args.text_file)
    print(
        f"{prepared.token_ids.shape[0]} tokens, {len(prepared.cloze_items)} cloze items; "
        "reference: no substitution, every expert resident",
        file=sys.stderr,
    )
    rows = run_fidelity(session_loader(base), configs, prepared, on_row=_progress)
    if base.expert_quant != "none":  # the quantization's own cost, apart from substitution's
        unquantized = session_loader(replace(base, expert_quant="none"))
        rows.insert(0, quantization_row(unquantized, session_loader(base), prepared, base))
        _progress(rows[0])
    if args.json != "-":
        print(format_table(rows))
    if args.json:
        _emit_json([row.to_dict() for row in rows], args.json)
    return 0


# ---------------------------------------------------------------- bench


def configure_bench(parser: argparse.ArgumentParser) -> None:
    from engine import cli

    group = parser.add_argument_group("model")
    group.add_argument("--model", type=Path, help="model folder (default: the built-in model)")
    group.add_argument("--device", choices=DEVICES, default="auto", help="where the trunk runs")
    group.add_argument("--dtype", choices=DTYPES, default="auto", help="weight precision")
    group.add_argument("--context-length", type=int, default=2048, metavar="N", help="tokens")
    group.add_argument("--force", action="store_true", help="load even if the estimate refuses")
    parser.add_argument(
        "--text-file",
        type=Path,
        metavar="F",
        help="text for the teacher-forced pass and cloze (default: the "
        "held-out sample in docs/benchmarks/)",
    )
    parser.add_argument("--prompts", nargs="+", metavar="P", help="chat prompts for timing")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for JSON and plot")
    parser.add_argument("--markdown", type=Path, help="report path (default docs/BENCHMARKS.md)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny everything")
    parser.add_argument("--policies", type=lambda s: tuple(s.split(",")), metavar="P1,P2")
    parser.add_argument("--cache-fractions", type=parse_fractions, metavar="F1,F2")
    parser.add_argument("--alphas", type=parse_alphas, metavar="A1,A2")
    parser.add_argument("--timing-runs", type=int, default=3, metavar="N", help="timed passes")
    parser.add_argument(
        "--gen-tokens", type=int, default=32, metavar="N", help="tokens per timed generation"
    )
    parser.add_argument(
        "--count-ops",
        action="store_true",
        help="also count torch ops and host syncs per decoded token (one extra generation)",
    )
    parser.add_argument("--traces", type=Path, metavar="DIR", help="routing traces to replay")
    parser.add_argument("--no-traces", action="store_true", help="skip the trace replay")
    parser.add_argument("--no-curve", action="store_true", help="do not write the slider curve")
    parser.add_argument(
        "--rerender", action="store_true", help="rebuild plot and report from <out>/bench.json"
    )
    parser.add_argument(
        "--host-cost",
        type=Path,
        metavar="FILE",
        help="host cost the report's projections charge (default docs/benchmarks/host_cost.json,"
        " written by `hotpath --host-cost`; scripts/gpu-check.sh writes a CUDA one)",
    )
    _add_text_options(parser, max_tokens=1024, cloze_items=16)
    cli.add_threads_option(parser)


def bench_plan(args: argparse.Namespace) -> bench.BenchPlan:
    """The plan from the flags; ``--quick`` shrinks the defaults (flags still win)."""
    quick = args.quick
    return bench.BenchPlan(
        policies=args.policies or bench.POLICIES,
        cache_fractions=args.cache_fractions or ((0.5,) if quick else bench.CACHE_FRACTIONS),
        alphas=args.alphas or ((0.0, 0.3) if quick else bench.ALPHAS),
        prompts=tuple(args.prompts)
        if args.prompts
        else bench.DEFAULT_PROMPTS[: 1 if quick else None],
        gen_tokens=2 if quick else args.gen_tokens,
        timing_runs=1 if quick else args.timing_runs,
        count_ops=args.count_ops,
    )


def _quick_text_args(args: argparse.Namespace) -> argparse.Namespace:
    if not args.quick:
        return args
    return argparse.Namespace(
        **{
            **vars(args),
            "max_tokens": min(args.max_tokens, 40),
            "window": min(args.window, 20),
            "cloze_items": min(args.cloze_items, 1),
        }
    )


def _default_text(args: argparse.Namespace) -> Path:
    if args.text_file is not None:
        return Path(args.text_file)
    for sample in (DEFAULT_OUT / SAMPLE_FILE, REPO_ROOT / DEFAULT_OUT / SAMPLE_FILE):
        if sample.is_file():
            return sample
    raise InvalidRequestError(f"no --text-file given and no {DEFAULT_OUT / SAMPLE_FILE}; pass one")


def _replay(args: argparse.Namespace) -> list[dict[str, Any]]:
    folder = args.traces or DEFAULT_TRACES
    if args.no_traces or not folder.is_dir():
        if args.traces is not None and not folder.is_dir():
            raise InvalidRequestError(f"the trace folder {folder} does not exist")
        return []
    from engine.eval import traces

    fractions = (0.5,) if args.quick else bench.CACHE_FRACTIONS
    rows = traces.replay_folder(folder, fractions=fractions, pools=("layer",))
    return [{**vars(r), "hit_rate": r.hit_rate} for r in rows]


def ships_curve(quick: bool, rows: list[dict[str, Any]]) -> bool:
    """A run whose curve may ship with the built-in model: not a smoke run, and every policy
    measured at the headline cache (fewer alphas or cache sizes are fine; the app's Measure,
    one policy, writes only the user's curve)."""
    at_headline = {r["policy"] for r in rows if r["cache_fraction"] == bench.HEADLINE_CACHE}
    return not quick and at_headline >= set(bench.POLICIES)


def _curve_paths(
    args: argparse.Namespace, rows: list[dict[str, Any]], model_dir: Path, name: str
) -> list[Path]:
    """The user's curve; plus the shipped one in the built-in model's folder after a run that
    measured the curve in full (``ships_curve``)."""
    return _curve_targets(ships_curve(args.quick, rows), model_dir, name)


def _curve_targets(full_run: bool, model_dir: Path, name: str) -> list[Path]:
    paths = [user_data_dir() / "curves" / f"{name}.json"]
    if full_run and model_dir.resolve() == builtin_model_dir().resolve():
        paths.append(model_dir / CURVE_FILE)
        if model_dir.resolve() == assembled_model_dir().resolve():
            paths.append(builtin_recipe_dir() / CURVE_FILE)  # ships with the recipe
    return paths


def _command_line() -> str:
    arguments = [a for a in sys.argv[1:] if a]
    if not arguments:
        return "python -m engine bench"
    return "python -m engine " + " ".join(shlex.quote(a) for a in arguments)


def _report(args: argparse.Namespace, result: bench.BenchResult) -> list[Path]:
    """JSON, plot and markdown of one bench result.

    A re-render rewrites the JSON too: the same measurements, with the default alpha of the
    rule in force (the only field derived from them).
    """
    out: Path = args.out
    json_path = out / "bench.json"
    bench_report.write_json(result, json_path)
    rows = bench_report.reported_rows(result.rows, bench_report.result_device(result))
    plot_path = bench_report.plot(rows, out / "speed_vs_fidelity.png")
    markdown = args.markdown or (
        Path("docs/BENCHMARKS.md") if out == DEFAULT_OUT else out / "BENCHMARKS.md"
    )
    settings = result.settings
    text = bench_report.render_markdown(
        result,
        settings["machine"],
        settings["command"],
        _relative(plot_path, markdown.parent),
        _relative(json_path, markdown.parent),
        args.host_cost,
    )
    markdown.parent.mkdir(parents=True, exist_ok=True)
    kept = (
        hotpath.kept_section(markdown.read_text(encoding="utf-8")) if markdown.is_file() else None
    )
    if kept is not None:  # the hotpath command's own section survives a bench rerun
        text = hotpath.replace_section(text, kept)
    write_text_atomic(markdown, text)
    written = [json_path, plot_path, markdown]
    if args.markdown is None and out == DEFAULT_OUT:  # the project's own report
        readme = update_readme(Path("README.md"), result)
        written += [readme] if readme else []
    return written


def update_readme(readme: Path, result: bench.BenchResult) -> Path | None:
    """Rewrite the README's generated bench block (between its markers) from ``result``;
    a README without the markers is left alone (None)."""
    try:
        text = readme.read_text(encoding="utf-8")
    except OSError:
        return None
    new = bench_curve.replace_block(text, bench_report.readme_block(result))
    if new is None:
        return None
    write_text_atomic(readme, new)
    return readme


def _rerender(args: argparse.Namespace) -> int:
    """Rebuild the plot and markdown from ``<out>/bench.json`` without measuring anything."""
    path = args.out / "bench.json"
    try:
        result = bench_report.read_result(path)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InvalidRequestError(f"cannot re-render from {path}: {error}") from error
    missing = [key for key in ("machine", "command") if key not in result.settings]
    if missing:
        raise InvalidRequestError(f"{path} does not record its {' and '.join(missing)}")
    written = _report(args, result)
    if not args.no_curve:
        device = result.settings["machine"].get("device", "cpu")
        # The model and run kind the JSON records, not this command's defaults.
        model_dir = Path(result.info["path"])
        full_run = ships_curve(result.settings.get("quick", True), result.rows)
        paths = _curve_targets(full_run, model_dir, result.model_name)
        written += bench.write_curve(bench.curve_document(result, device), paths)
    print(
        f"default alpha {result.default_alpha:g}; re-rendered " + ", ".join(map(str, written[1:])),
        file=sys.stderr,
    )
    return 0


def _relative(path: Path, start: Path) -> str:
    try:
        return str(path.resolve().relative_to(start.resolve()))
    except ValueError:
        return str(path)


def _check_host_cost(path: Path | None) -> None:
    """Refuse a ``--host-cost`` that is missing or not a host cost document, before any work."""
    if path is None:
        return
    if not path.is_file():
        raise InvalidRequestError(f"no host cost file at {path} (see `hotpath --host-cost`)")
    try:
        projection.read_host_cost(path)
    except (ValueError, TypeError) as error:  # TypeError: a field that is not a number
        raise InvalidRequestError(f"cannot use {path} as the host cost: {error}") from error


def run_bench_command(args: argparse.Namespace) -> int:
    from engine.runtime.loading import inspect_model

    _check_host_cost(args.host_cost)
    if args.rerender:
        return _rerender(args)
    args = _quick_text_args(args)
    plan = bench_plan(args)
    options = EngineOptions(
        model_dir=args.model,
        device=args.device,
        dtype=args.dtype,
        context_length=args.context_length,
        force=args.force,
    )
    base = build_load_config(options)
    info = inspect_model(base.model_dir)
    text_path = _default_text(args)
    prepared = _prepare(args, load_tokenizer(base.model_dir), text_path)
    started, clock = bench.now_utc(), time.perf_counter()
    print(
        f"bench: {len(plan.configs())} rows on {prepared.token_ids.shape[0]} tokens",
        file=sys.stderr,
    )
    rows = bench.run_bench(
        session_loader(base), plan, prepared, on_row=_progress, on_reference=_reference_done
    )
    auto_cuda = args.device == "auto" and torch.cuda.is_available()
    device = "cuda" if args.device == "cuda" or auto_cuda else "cpu"
    settings = {
        "command": _command_line(),
        "machine": bench_report.machine_info(device),
        "text_file": str(text_path),
        "tokens": int(prepared.token_ids.shape[0]),
        "window": prepared.window,
        "cloze_items": len(prepared.cloze_items),
        "prompts": list(plan.prompts),
        "gen_tokens": plan.gen_tokens,
        "timing_runs": plan.timing_runs,
        "quick": args.quick,
    }
    result = bench.BenchResult(
        rows,
        bench.choose_default_alpha(rows),
        info.name,
        asdict(info),
        settings,
        _replay(args),
        started,
        time.perf_counter() - clock,
    )
    written = _report(args, result)
    if not args.no_curve:
        written += bench.write_curve(
            bench.curve_document(result, device),
            _curve_paths(args, rows, base.model_dir, info.name),
        )
    print(
        f"default alpha {result.default_alpha:g}; wrote " + ", ".join(map(str, written)),
        file=sys.stderr,
    )
    return 0
