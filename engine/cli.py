"""The headless front door: ``python -m engine inspect | generate | score``.

Each command is a ``Command`` (name, help, how it adds its arguments, how it runs) listed in
``COMMANDS``; later commands (``fidelity``, ``bench``) add themselves there and reuse
``add_model_options`` and ``engine_options`` for the model, device, cache and policy flags.
Runs are synchronous on a ``ModelSession``. Engine errors print one line to stderr and exit
with 2 (bad input), 3 (memory) or 1 (anything else), never with a traceback.

Defaults match the app (``engine.options``: ``smoe`` at the model's curve alpha) and ``--help``
shows them; an option that would do nothing is an error, as is a number that is not finite.
Input files are read up to a size bound; load progress is drawn only on a terminal.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers.utils import logging as hf_logging

from engine.atomic import write_with
from engine.config import (
    DEVICES,
    DTYPES,
    EVICTIONS,
    EXPERT_QUANTS,
    EXPERTS_IMPLEMENTATIONS,
    POLICIES,
    PREFETCH_SOURCES,
    GenerateRequest,
    SamplingConfig,
)
from engine.errors import (
    CacheBudgetError,
    EngineError,
    EngineOutOfMemoryError,
    InsufficientMemoryError,
    InvalidRequestError,
    ModelLoadError,
    SubstitutionUnsupportedError,
)
from engine.eval import eval_cli, hotpath
from engine.eval.opcount import OpCounter, PerToken, TokenSpan
from engine.events import (
    FLUSH_TOKEN_ID,
    GenerationFinished,
    MemoryEstimate,
    ModelInfo,
    StatsSnapshot,
    TokenReceived,
)
from engine.options import (
    DEFAULT_POLICY,
    EngineOptions,
    build_load_config,
    build_request,
    build_sampling,
    resolve_model_dir,
    unused_options,
)
from engine.runtime.generation import ScoreResult
from engine.runtime.prompts import MAX_CHARS_PER_TOKEN
from engine.runtime.session import ModelSession, estimate_for
from engine.runtime.worker import translate_error
from engine.server import serve_cli

EXIT_OTHER, EXIT_BAD_INPUT, EXIT_MEMORY = 1, 2, 3
BAD_INPUT = (InvalidRequestError, ModelLoadError, CacheBudgetError, SubstitutionUnsupportedError)
MEMORY = (InsufficientMemoryError, EngineOutOfMemoryError)
DEFAULT_CONTEXT = 2048  # capped at the model's own maximum (inspect: the maximum itself)
MAX_INPUT_BYTES = 64 << 20  # prompt and text files: more is refused before reading
MAX_TEMPLATE_BYTES = 1 << 20  # a chat template is a few KB


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` shows each option's default (not for flags, or ones without a value)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or not action.option_strings or default in (None, [], ()):
            return text
        if isinstance(default, bool) or default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)".strip()


def finite_float(text: str) -> float:
    """An argparse type: a float that is neither NaN nor infinite."""
    try:
        value = float(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from error
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, help line, argument setup and runner (returns the exit code)."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------- shared options


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--model`` plus the device, dtype, context, cache and method options of every command."""
    group = parser.add_argument_group("model and memory")
    group.add_argument(
        "--model", type=Path, help="model folder or .gguf file (default: the built-in model)"
    )
    group.add_argument("--device", choices=DEVICES, default="auto", help="where the trunk runs")
    group.add_argument("--dtype", choices=DTYPES, default="auto", help="weight precision")
    add_context_option(group)
    budget = group.add_mutually_exclusive_group()
    budget.add_argument(
        "--cache-gb", type=finite_float, metavar="G", help="expert cache budget in GB"
    )
    budget.add_argument(
        "--cache-fraction",
        type=finite_float,
        metavar="F",
        help="expert cache as a fraction of experts (default: 0.5 unless --cache-gb)",
    )
    group.add_argument("--force", action="store_true", help="load even if the estimate refuses")
    group.add_argument(
        "--experts",
        choices=EXPERTS_IMPLEMENTATIONS,
        default="auto",
        help="expert compute: eager loop, grouped or batched matmuls (fewer ops); "
        "auto: grouped on CUDA 8.0+, batched on older cards, eager on the CPU",
    )
    group.add_argument(
        "--expert-quant",
        choices=EXPERT_QUANTS,
        default="none",
        help="keep a safetensors model's experts as int8 (Q8_0) or int4 (Q4_1) blocks",
    )
    group.add_argument(
        "--mmap-experts",
        action="store_true",
        help="read experts from the memory-mapped model file (page cache) instead of RAM; "
        "with --expert-quant, from the quantized-experts cache file",
    )
    group.add_argument(
        "--cpu-assist-int4",
        choices=("auto", "on", "off"),
        default="auto",
        help="CPU assist computes 4-bit experts (Q4_0/Q4_1/Q4_K, --expert-quant int4) with "
        "torch's int4 kernel in bf16: faster, 4-bit in RAM, not bit-exact; auto: on CUDA only",
    )
    add_threads_option(group)
    method = parser.add_argument_group("method")
    method.add_argument(
        "--policy", choices=POLICIES, default=DEFAULT_POLICY, help="expert cache policy, as the app"
    )
    method.add_argument(
        "--alpha",
        type=finite_float,
        metavar="A",
        help="importance band of smoe (default: the alpha the model's benchmark curve chose, "
        "as in the app; 0 = exact without a curve)",
    )
    method.add_argument("--eviction", choices=EVICTIONS, help="default: from the policy")
    method.add_argument(
        "--no-substitution", dest="substitution", action="store_false", help="smoe only"
    )
    method.add_argument("--no-prefetch", dest="prefetch", action="store_false", help="smoe only")
    method.add_argument(
        "--prefetch-from",
        choices=PREFETCH_SOURCES,
        default="attention",
        help="smoe's prefetch predictor input: the MoE layer's post-attention state (one host "
        "read per layer) or the layer's output (the released code's; better recall, a second "
        "read) (default: %(default)s)",
    )
    method.add_argument(
        "--no-cpu-assist", dest="cpu_assist", action="store_false", help="smoe only"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def add_context_option(group: Any) -> None:
    group.add_argument(
        "--context-length",
        type=int,
        metavar="N",
        help=f"tokens of context (default: the model's maximum, at most {DEFAULT_CONTEXT}; "
        "inspect: the model's maximum)",
    )


def add_threads_option(group: Any) -> None:
    group.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")


def apply_threads(threads: int | None) -> None:
    """``--threads``: set torch's intra-op threads (at least 1)."""
    if threads is None:
        return
    if threads < 1:
        raise InvalidRequestError(f"--threads must be at least 1; got {threads}")
    torch.set_num_threads(threads)


def context_length(args: argparse.Namespace, for_inspect: bool = False) -> int:
    """The context in force: the one given (at most the model's maximum), else the default."""
    from engine.runtime.loading import inspect_model

    maximum = inspect_model(resolve_model_dir(args.model)).max_context
    given = args.context_length
    if given is None:
        if not maximum:
            return DEFAULT_CONTEXT
        return maximum if for_inspect else min(DEFAULT_CONTEXT, maximum)
    if maximum and given > maximum:
        raise InvalidRequestError(
            f"--context-length {given} is more than this model's maximum of {maximum} tokens"
        )
    return int(given)


def engine_options(args: argparse.Namespace, for_inspect: bool = False) -> EngineOptions:
    """The parsed model/device/cache/method flags as ``EngineOptions``; refuses unused ones."""
    options = EngineOptions(
        model_dir=args.model,
        device=args.device,
        dtype=args.dtype,
        cache_gb=args.cache_gb,
        cache_fraction=args.cache_fraction,
        context_length=context_length(args, for_inspect),
        force=args.force,
        expert_quant=args.expert_quant,
        mmap_experts=args.mmap_experts,
        cpu_assist_int4=args.cpu_assist_int4,
        policy=args.policy,
        alpha=args.alpha,
        eviction=args.eviction,
        substitution=args.substitution,
        prefetch=args.prefetch,
        cpu_assist=args.cpu_assist,
        prefetch_from=getattr(args, "prefetch_from", "attention"),
        experts=getattr(args, "experts", "auto"),
    )
    problems = unused_options(options)
    if problems:
        raise InvalidRequestError("; ".join(problems))
    return options


def open_session(args: argparse.Namespace, options: EngineOptions | None = None) -> ModelSession:
    """Build the load config from the flags, check memory and load (progress to stderr)."""
    config = build_load_config(options or engine_options(args))
    draw = not args.json and sys.stderr.isatty()  # no carriage-return frames in logs or pipes

    def progress(fraction: float, message: str) -> None:
        if draw:
            print(f"\r[{fraction:4.0%}] {message:<60}", end="", file=sys.stderr, flush=True)

    try:
        return ModelSession.open(config, progress)
    finally:
        if draw:
            print(file=sys.stderr)


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, ensure_ascii=False)
    print()


def estimate_dict(estimate: MemoryEstimate) -> dict[str, Any]:
    return {**asdict(estimate), "device_bytes": estimate.device_bytes, "fits": estimate.fits}


def stats_line(stats: StatsSnapshot, finished: GenerationFinished | None = None) -> str:
    """One line of counters; after a generation, its prompt and generated tokens apart."""
    if finished is None:
        counted = f"{stats.tokens} tokens"
    else:
        counted = f"{finished.prompt_tokens} prompt tokens, {len(finished.token_ids)} generated"
    return (
        f"{counted}, {stats.tokens_per_second:.1f} tok/s (generation), "
        f"first token {stats.time_to_first_token_s:.2f} s, hit rate {stats.hit_rate:.3f}, "
        f"{stats.bytes_per_token / 1e6:.3f} MB moved per token"
    )


# ---------------------------------------------------------------- inspect


def configure_inspect(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)


def _gb(value: int | None) -> str:
    """Bytes in the largest unit that keeps the number at least 1 (decimal units)."""
    if value is None:
        return "unknown"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value} B"


def describe(info: ModelInfo, estimate: MemoryEstimate, context: int) -> str:
    """Human-readable inspect output."""
    return "\n".join(
        [
            f"{info.name}: {info.architecture} ({info.model_type}), router {info.router_family}"
            + (f", experts kept as {info.expert_quant}" if info.expert_quant else ""),
            f"layers {info.num_layers} ({info.moe_layers} MoE), experts per layer "
            f"{info.experts_per_layer}, top-{info.top_k}",
            f"bytes per expert {info.bytes_per_expert}, trunk {_gb(info.trunk_bytes)}, "
            f"all experts {_gb(info.total_expert_bytes)}, maximum context {info.max_context}",
            f"estimate at context {context} on {estimate.device}: device "
            f"{_gb(estimate.device_bytes)} (trunk "
            f"{_gb(estimate.trunk_bytes)}, KV {_gb(estimate.kv_cache_bytes)}, expert cache "
            f"{_gb(estimate.expert_cache_bytes)}) of {_gb(estimate.device_free_bytes)} free; "
            f"host {_gb(estimate.host_expert_bytes)} of {_gb(estimate.host_free_bytes)} free",
            f"fits: {'yes' if estimate.fits else 'no'}",
        ]
    )


def run_inspect(args: argparse.Namespace) -> int:
    config = build_load_config(engine_options(args, for_inspect=True))
    info, estimate = estimate_for(config)
    if args.json:
        estimated = {**estimate_dict(estimate), "context_length": config.context_length}
        print_json({"model": asdict(info), "estimate": estimated})
    else:
        print(describe(info, estimate, config.context_length))
    return 0


# ---------------------------------------------------------------- generate


def configure_generate(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt (the user message with --chat)")
    source.add_argument(
        "--prompt-file",
        type=Path,
        metavar="F",
        help=f"read the prompt from a UTF-8 file (at most {MAX_INPUT_BYTES >> 20} MB)",
    )
    parser.add_argument("--chat", action="store_true", help="apply the model's chat template")
    parser.add_argument("--system", help="system message (with --chat)")
    parser.add_argument("--chat-template", type=Path, metavar="FILE", help="override template")
    sampling = parser.add_argument_group("sampling")
    d = SamplingConfig()
    sampling.add_argument(
        "--max-new-tokens",
        type=int,
        metavar="N",
        help=f"default {d.max_new_tokens}, at most half the context",
    )
    sampling.add_argument("--greedy", action="store_true", help="always the most likely token")
    sampling.add_argument(
        "--temperature", type=finite_float, metavar="T", help=f"default {d.temperature}"
    )
    sampling.add_argument("--top-p", type=finite_float, metavar="P", help=f"default {d.top_p}")
    sampling.add_argument("--top-k", type=int, metavar="K", help=f"default {d.top_k}, 0: off")
    sampling.add_argument(
        "--repetition-penalty",
        type=finite_float,
        metavar="R",
        help=f"default {d.repetition_penalty} (1.0 with --greedy)",
    )
    sampling.add_argument(
        "--stop", action="extend", nargs="+", default=[], metavar="S", help="stop strings"
    )
    sampling.add_argument("--seed", type=int, metavar="N", help="for reproducible sampling")
    parser.add_argument(
        "--count-ops",
        action="store_true",
        help="count torch ops and host syncs per decoded token (slower; for regressions)",
    )
    add_model_options(parser)


def _sampling(args: argparse.Namespace, context: int) -> SamplingConfig:
    """The sampling flags; without ``--max-new-tokens``, the default fits half the context."""
    sampled = (args.temperature, args.top_p, args.top_k, args.seed)
    if args.greedy and any(v is not None for v in sampled):
        raise InvalidRequestError(
            "--greedy takes no --temperature, --top-p, --top-k or --seed (they do nothing)"
        )
    return build_sampling(
        greedy=args.greedy,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        max_new_tokens=min(SamplingConfig().max_new_tokens, context // 2)
        if args.max_new_tokens is None
        else args.max_new_tokens,
        stop=args.stop,
        seed=args.seed,
    )


def read_bounded(path: Path, what: str, limit: int | None = None) -> str:
    """A UTF-8 file of at most ``limit`` bytes (default ``MAX_INPUT_BYTES``), else bad input."""
    limit = MAX_INPUT_BYTES if limit is None else limit
    try:
        size = path.stat().st_size
        if size > limit:
            raise InvalidRequestError(
                f"the {what} {path} is {size / 1e6:.1f} MB; the limit is {limit / 1e6:.1f} MB"
            )
        with open(path, "rb") as handle:  # the file may grow after stat: read no more
            data = handle.read(limit + 1)
        if len(data) > limit:
            raise InvalidRequestError(f"the {what} {path} is over {limit / 1e6:.1f} MB")
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidRequestError(f"cannot read the {what} {path}: {error}") from error


def generate_request(args: argparse.Namespace, context: int) -> GenerateRequest:
    if not args.chat and (args.chat_template or args.system):
        raise InvalidRequestError("--system and --chat-template do nothing without --chat")
    template = None
    if args.chat_template:
        template = read_bounded(args.chat_template, "chat template", MAX_TEMPLATE_BYTES)
    prompt = args.prompt
    if prompt is None:
        prompt = read_bounded(args.prompt_file, "prompt file")
    return build_request(prompt, _sampling(args, context), args.chat, args.system, template)


def run_generate(args: argparse.Namespace) -> int:
    options = engine_options(args)
    request = generate_request(args, options.context_length)
    session = open_session(args, options)
    session.reset_stats()
    counter = OpCounter(str(session.loaded.device)) if args.count_ops else None
    with counter if counter is not None else nullcontext():
        finished, counts = _consume(session.generate_stream(request), counter, args.json)
    if args.json:
        print_json(generation_dict(finished) | _counts_dict(counts, args.count_ops))
    else:
        print()
        line = stats_line(finished.stats, finished)
        print(f"[{finished.reason}] {line}", file=sys.stderr)
        if args.count_ops:
            print(ops_line(counts), file=sys.stderr)
    return 0


def _consume(
    events: Iterable[Any], counter: OpCounter | None, quiet: bool
) -> tuple[GenerationFinished, PerToken | None]:
    """Print tokens as they come; the finish event and, when counting, per-token counts."""
    span = TokenSpan(counter) if counter is not None else None
    finished: GenerationFinished | None = None
    for event in events:
        if isinstance(event, TokenReceived):
            if span is not None:
                span.observe(event.token_id != FLUSH_TOKEN_ID)
            if not quiet:
                print(event.text, end="", flush=True)
        finished = event if isinstance(event, GenerationFinished) else finished
    assert finished is not None, "the stream ends with GenerationFinished"
    return finished, span.result() if span is not None else None


def _counts_dict(counts: PerToken | None, asked: bool) -> dict[str, Any]:
    if not asked:
        return {}
    return {"op_counts": counts.to_dict() if counts is not None else None}


def ops_line(counts: PerToken | None) -> str:
    """One line of per-decoded-token op and sync counts."""
    if counts is None:
        return "op counts: fewer than two tokens were generated, nothing to count"
    kinds = ", ".join(f"{k} {v:.1f}" for k, v in counts.sync_kinds.items()) or "none"
    return (
        f"per decoded token ({counts.tokens} tokens): {counts.ops:.0f} torch ops, "
        f"{counts.syncs:.1f} host syncs ({kinds})"
    )


def generation_dict(finished: GenerationFinished) -> dict[str, Any]:
    return {
        "text": finished.text,
        "token_ids": list(finished.token_ids),
        "reason": finished.reason,
        "prompt_tokens": finished.prompt_tokens,
        "generated_tokens": len(finished.token_ids),
        "dropped_messages": finished.dropped_messages,
        "stats": finished.stats.to_dict(),
    }


# ---------------------------------------------------------------- score


def configure_score(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text-file", type=Path, required=True, metavar="F")
    parser.add_argument("--max-tokens", type=int, metavar="N", help="score at most N tokens")
    parser.add_argument("--dump-logits", type=Path, metavar="OUT", help="write a .safetensors")
    add_model_options(parser)


def score_ids(session: ModelSession, text: str, max_tokens: int | None) -> tuple[list[int], bool]:
    """Token ids to score: at most ``max_tokens`` and the context length; and if cut."""
    if max_tokens is not None and max_tokens < 2:
        raise InvalidRequestError(f"--max-tokens must be at least 2; got {max_tokens}")
    limit = min(max_tokens or session.config.context_length, session.config.context_length)
    read = limit * MAX_CHARS_PER_TOKEN  # no more text than ``limit`` tokens can hold
    ids = session.encode(text[:read])
    return ids[:limit], len(ids) > limit or len(text) > read


def dump_logits(path: Path, result: ScoreResult) -> None:
    """fp32 logits ``[T, V]`` under ``logits`` and the scored ids ``[T]`` under ``input_ids``."""
    assert result.logits is not None, "logits were kept for the dump"
    tensors = {
        "logits": result.logits.float().contiguous(),
        "input_ids": torch.tensor(result.input_ids, dtype=torch.long),
    }
    try:
        write_with(path, lambda temp: save_file(tensors, str(temp)))
    except OSError as error:
        raise InvalidRequestError(f"cannot write {path}: {error}") from error


def run_score(args: argparse.Namespace) -> int:
    text = read_bounded(args.text_file, "text file")
    session = open_session(args)
    ids, truncated = score_ids(session, text, args.max_tokens)
    session.reset_stats()
    result = session.score(ids, keep_logits=args.dump_logits is not None)
    if args.dump_logits is not None:
        dump_logits(args.dump_logits, result)
    report = {
        "tokens": len(ids),
        "scored_tokens": len(ids) - 1,
        "truncated": truncated,
        "mean_nll": result.mean_nll,
        "perplexity": result.perplexity,
        "stats": session.stats().to_dict(),
    }
    if args.json:
        print_json(report)
    else:
        print(
            f"{len(ids)} tokens: mean NLL {result.mean_nll:.4f}, perplexity {result.perplexity:.3f}"
        )
        print(stats_line(session.stats()), file=sys.stderr)
    return 0


# ---------------------------------------------------------------- main

COMMANDS: list[Command] = [
    Command(
        "inspect", "describe a model folder and estimate memory", configure_inspect, run_inspect
    ),
    Command("generate", "generate text from a prompt", configure_generate, run_generate),
    Command("score", "teacher-forced NLL/perplexity of a text", configure_score, run_score),
    Command(
        "fidelity",
        "compare configurations with the unmodified model on a text, teacher-forced",
        eval_cli.configure_fidelity,
        eval_cli.run_fidelity_command,
    ),
    Command(
        "bench",
        "policies side by side (transfers, speed, fidelity); writes docs/BENCHMARKS.md",
        eval_cli.configure_bench,
        eval_cli.run_bench_command,
    ),
    Command(
        "serve",
        "serve the model over an OpenAI-compatible HTTP API (loopback only by default)",
        serve_cli.configure_serve,
        serve_cli.run_serve,
    ),
    Command(
        "hotpath",
        "decode ops, host syncs and tok/s of plain transformers, LRU and smoe side by side",
        hotpath.configure,
        hotpath.run,
    ),
]


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine", description="Understudy engine: offloaded MoE inference."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in commands:
        sub = subparsers.add_parser(
            command.name,
            help=command.help,
            description=command.help,
            formatter_class=DefaultsHelpFormatter,
        )
        command.configure(sub)
        sub.set_defaults(run=command.run)
    return parser


def exit_code(error: EngineError) -> int:
    if isinstance(error, BAD_INPUT):
        return EXIT_BAD_INPUT
    if isinstance(error, MEMORY):
        return EXIT_MEMORY
    return EXIT_OTHER


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run, and turn engine errors into one stderr line and an exit code."""
    args = build_parser().parse_args(argv)
    hf_logging.disable_progress_bar()  # the engine reports its own load progress
    try:
        try:
            apply_threads(getattr(args, "threads", None))
            code: int = args.run(args)
        except (torch.OutOfMemoryError, MemoryError) as raw:
            raise translate_error(raw, f"running {args.command}") from raw
    except EngineError as error:
        print(f"error: {error}", file=sys.stderr)
        return exit_code(error)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return code
