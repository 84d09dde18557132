"""The fidelity harness: each configuration against the unmodified model on the same text.

The reference is the model with no substitution and every expert resident (cache fraction
1.0, policy ``lru``, alpha 0). Every configuration (a cache size, a policy and an alpha) is
loaded fresh, so no cache state leaks from one to the next, and run teacher-forced on the
same tokens, token by token (``engine.eval.forcing``). Its logits are compared with the
reference's (``engine.eval.metrics``), its answers to the cloze items graded
(``engine.eval.cloze``), and its transfer counters read from the offload controller. One
``FidelityRow`` per configuration. The command line lives in ``engine.eval.fidelity_cli``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from statistics import median
from typing import Any, Protocol

import torch

from engine.config import CacheConfig, LiveOptions, LoadConfig
from engine.errors import InvalidRequestError
from engine.eval import cloze
from engine.eval.forcing import StepTimes, continuation_logits, stream_window_logits
from engine.eval.metrics import ComparisonAccumulator, perplexity
from engine.events import StatsSnapshot

DEFAULT_WINDOW = 256
NEUTRAL_CONTEXT = "\n"  # what a cloze choice is conditioned on for its baseline likelihood
REFERENCE_LIVE = LiveOptions(policy="lru", alpha=0.0)


class Runner(Protocol):
    """A loaded model the harness drives: the module and its offload accounting."""

    @property
    def model(self) -> torch.nn.Module: ...

    def end_step(self, tokens: int) -> None: ...

    def stats(self) -> StatsSnapshot: ...

    def reset_stats(self) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class RunConfig:
    """One configuration: what to load (cache fraction) and how to run it (live options)."""

    cache_fraction: float
    live: LiveOptions
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or self.live.policy


Loader = Callable[[RunConfig], Runner]


class PlainRunner:
    """A plain transformers model (no offloading): counts tokens, reports no transfers."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._model = model
        self._tokens = 0

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    def end_step(self, tokens: int) -> None:
        self._tokens += tokens

    def stats(self) -> StatsSnapshot:
        return StatsSnapshot(tokens=self._tokens)

    def reset_stats(self) -> None:
        self._tokens = 0

    def close(self) -> None:
        return None


class SessionRunner:
    """An engine ``ModelSession``: the offloaded model and its controller's counters."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self._offload = session.loaded.offload

    @property
    def model(self) -> torch.nn.Module:
        model: torch.nn.Module = self._session.loaded.model
        return model

    @property
    def session(self) -> Any:
        return self._session

    def end_step(self, tokens: int) -> None:
        self._offload.end_step(tokens)

    def stats(self) -> StatsSnapshot:
        snapshot: StatsSnapshot = self._offload.stats()
        return snapshot

    def reset_stats(self) -> None:
        self._offload.reset_stats()

    def close(self) -> None:
        self._session.close()


def session_loader(base: LoadConfig) -> Loader:
    """Load each configuration as an engine session: ``base`` with its cache and options."""
    from engine.runtime.session import ModelSession  # the runtime is needed only here

    def load(config: RunConfig) -> Runner:
        cache = CacheConfig(fraction=config.cache_fraction)
        return SessionRunner(ModelSession.open(replace(base, cache=cache, live=config.live)))

    return load


@dataclass(frozen=True)
class ClozeTokens:
    """A cloze item tokenized: context ids, one id tensor per choice, a neutral context.

    A choice scores ``log P(choice | context) - log P_ref(choice | neutral)``: how much the
    context raises its likelihood (lm-eval's ``acc_mutual_info``). The baseline term is the
    reference model's, computed once and shared by every configuration (it only calibrates
    how easy each sentence is on its own, and halves the cost). A plain sum measured mostly
    that ease: formulaic verses beat the true Austen sentence, and the reference model scored
    below chance.
    """

    context: torch.Tensor  # [Tc]
    choices: tuple[torch.Tensor, ...]  # each [C]
    answer: int
    neutral: torch.Tensor | None = None  # [Tn]; None scores by the plain sum


@dataclass(frozen=True)
class PreparedText:
    """The text as tokens, and its cloze items as tokens, shared by every configuration."""

    token_ids: torch.Tensor  # [N]
    cloze_items: tuple[ClozeTokens, ...]
    window: int = DEFAULT_WINDOW


def _encode(tokenizer: Any, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)  # [n]


def prepare_text(
    tokenizer: Any,
    text: str,
    max_tokens: int | None = None,
    window: int = DEFAULT_WINDOW,
    cloze_settings: cloze.ClozeSettings | None = None,
) -> PreparedText:
    """Tokenize ``text`` (cut to ``max_tokens``) and build cloze items from the same text."""
    if not text.strip():
        raise InvalidRequestError("the text file is empty")
    token_ids = _encode(tokenizer, text)
    if max_tokens is not None:
        token_ids = token_ids[:max_tokens]
    if token_ids.shape[0] < 2:
        raise InvalidRequestError(f"the text is too short: {token_ids.shape[0]} tokens")
    items: tuple[ClozeTokens, ...] = ()
    if cloze_settings is not None:
        built = cloze.build_items(text, cloze_settings)
        neutral = _encode(tokenizer, NEUTRAL_CONTEXT)
        items = tuple(
            ClozeTokens(
                _encode(tokenizer, item.context),
                tuple(_encode(tokenizer, " " + choice) for choice in item.choices),
                item.answer,
                neutral,
            )
            for item in built
        )
    return PreparedText(token_ids, items, window)


@dataclass(frozen=True)
class Reference:
    """What the unmodified model said: per-window logits and cloze choice scores."""

    windows: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # ([w-1, V] logits, [w-1] targets)
    cloze_scores: Scores  # context gain: conditional minus baseline
    cloze_baseline: Scores = ()  # log P(choice | neutral context), reused by every configuration


@dataclass(frozen=True)
class FidelityRow:
    """One configuration's fidelity against the reference plus its transfer statistics."""

    policy: str
    alpha: float
    cache_fraction: float
    top1_agreement: float
    kl: float
    nll: float
    nll_ref: float
    ppl: float
    ppl_ref: float
    ppl_delta: float
    cloze_acc: float | None
    cloze_acc_ref: float | None
    cloze_items: int
    positions: int
    hit_rate: float
    plain_hit_rate: float
    misses_per_token: float
    bytes_per_token: float
    substitutions_per_token: float
    cpu_computed_per_token: float
    prefetch_precision: float
    prefetch_recall: float
    time_per_token_s: float
    tokens_per_second: float
    step_time_p50_s: float
    step_time_p90_s: float
    eviction: str
    substitution: bool
    prefetch: bool
    cpu_assist: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(data.pop("extra"))
        return data


def _hooked(runner: Runner, times: StepTimes | None = None) -> Callable[[int, float], None]:
    def hook(tokens: int, seconds: float) -> None:
        runner.end_step(tokens)
        if times is not None:
            times.hook(tokens, seconds)

    return hook


Scores = tuple[tuple[float, ...], ...]  # per item, per choice


def _cloze_logprobs(runner: Runner, items: Sequence[ClozeTokens], neutral: bool = False) -> Scores:
    """log P(choice | context) per item and choice; ``neutral``: given the neutral context."""
    hook = _hooked(runner)
    scores = []
    for item in items:
        context = item.neutral if neutral and item.neutral is not None else item.context
        row = []
        for choice in item.choices:
            logits = continuation_logits(runner.model, context, choice, hook)  # [C, V]
            row.append(cloze.continuation_logprob(logits, choice))
        scores.append(tuple(row))
    return tuple(scores)


def _minus(scores: Scores, baseline: Scores) -> Scores:
    return tuple(
        tuple(a - b for a, b in zip(row, base, strict=True))
        for row, base in zip(scores, baseline, strict=True)
    )


def _cloze_accuracy(
    items: Sequence[ClozeTokens], scores: Sequence[Sequence[float]]
) -> float | None:
    if not items:
        return None
    return sum(cloze.pick(s) == item.answer for item, s in zip(items, scores, strict=True)) / len(
        items
    )


def run_reference(runner: Runner, text: PreparedText) -> Reference:
    """Run the unmodified model over the text and the cloze items, keeping its logits."""
    windows = tuple(
        stream_window_logits(runner.model, text.token_ids, text.window, _hooked(runner))
    )
    items = text.cloze_items
    baseline = (
        _cloze_logprobs(runner, items, neutral=True)
        if items and items[0].neutral is not None
        else ()
    )
    conditional = _cloze_logprobs(runner, items)
    scores = _minus(conditional, baseline) if baseline else conditional
    return Reference(windows, scores, baseline)


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _timing(times: StepTimes) -> dict[str, Any]:
    """Median over windows of the mean step time (each window is one timed run), p50/p90."""
    per_window = [sum(w) / len(w) for w in times.windows if w]
    per_token = median(per_window) if per_window else 0.0
    return {
        "time_per_token_s": per_token,
        "tokens_per_second": 1.0 / per_token if per_token > 0 else 0.0,
        "step_time_p50_s": _percentile(times.steps, 0.5),
        "step_time_p90_s": _percentile(times.steps, 0.9),
    }


def _stream_compare(
    runner: Runner, text: PreparedText, reference: Reference, times: StepTimes
) -> ComparisonAccumulator:
    accumulator = ComparisonAccumulator()
    stream = stream_window_logits(
        runner.model, text.token_ids, text.window, _hooked(runner, times), times.new_window
    )
    for (ref_logits, targets), (logits, test_targets) in zip(
        reference.windows, stream, strict=True
    ):
        assert torch.equal(targets, test_targets), "reference and test ran on different tokens"
        accumulator.add(ref_logits, logits, targets)
    return accumulator


def _stats_fields(stats: StatsSnapshot) -> dict[str, Any]:
    tokens = max(1, stats.tokens)
    return {
        "hit_rate": stats.hit_rate,
        "plain_hit_rate": stats.plain_hit_rate,
        "misses_per_token": stats.misses_per_token,
        "bytes_per_token": stats.bytes_per_token,
        "substitutions_per_token": stats.substitutions_per_token,
        "cpu_computed_per_token": stats.cpu_computed / tokens,
        "prefetch_precision": stats.prefetch_precision,
        "prefetch_recall": stats.prefetch_recall,
    }


def _counts(stats: StatsSnapshot) -> dict[str, Any]:
    """The raw counters of the text pass (projections are computed from them)."""
    names = ("tokens", "hits", "misses", "substitutions", "cpu_computed", "transfers")
    counts: dict[str, Any] = {name: getattr(stats, name) for name in names}
    counts["bytes_moved"] = stats.bytes_moved
    counts["cache_slots"] = stats.cache_slots
    return counts


def evaluate(
    runner: Runner, config: RunConfig, text: PreparedText, reference: Reference
) -> FidelityRow:
    """Run one loaded configuration over the text and compare it with the reference."""
    runner.reset_stats()
    times = StepTimes()
    comparison = _stream_compare(runner, text, reference, times).result()
    stats = runner.stats()  # decode over the text only; the cloze below is not counted
    scores = _cloze_logprobs(runner, text.cloze_items)
    if reference.cloze_baseline:
        scores = _minus(scores, reference.cloze_baseline)
    live = config.live
    return FidelityRow(
        policy=config.name,
        alpha=live.alpha,
        cache_fraction=config.cache_fraction,
        top1_agreement=comparison.top1_agreement,
        kl=comparison.kl,
        nll=comparison.nll,
        nll_ref=comparison.nll_ref,
        ppl=comparison.ppl,
        ppl_ref=perplexity(comparison.nll_ref),
        ppl_delta=comparison.ppl_delta,
        cloze_acc=_cloze_accuracy(text.cloze_items, scores),
        cloze_acc_ref=_cloze_accuracy(text.cloze_items, reference.cloze_scores),
        cloze_items=len(text.cloze_items),
        positions=comparison.positions,
        eviction=live.effective_eviction,
        substitution=live.substitution_on,
        prefetch=live.prefetch_on,
        cpu_assist=live.cpu_assist_on,
        **_stats_fields(stats),
        **_timing(times),
        extra=_counts(stats),
    )


def quantization_row(
    unquantized: Loader, quantized: Loader, text: PreparedText, base: LoadConfig
) -> FidelityRow:
    """The cost of ``--expert-quant`` itself: the quantized model against the unquantized one,
    both with every expert resident and no substitution (the other rows compare configurations
    with the quantized reference, so they measure substitution alone)."""
    reference_runner = unquantized(RunConfig(1.0, REFERENCE_LIVE, "unquantized"))
    try:
        reference = run_reference(reference_runner, text)
    finally:
        reference_runner.close()
    config = RunConfig(1.0, REFERENCE_LIVE, f"experts {base.expert_quant} (quantization only)")
    runner = quantized(config)
    try:
        return evaluate(runner, config, text, reference)
    finally:
        runner.close()


def run_fidelity(
    loader: Loader,
    configs: Sequence[RunConfig],
    text: PreparedText,
    on_row: Callable[[FidelityRow], None] | None = None,
) -> list[FidelityRow]:
    """The reference once, then every configuration loaded fresh and compared with it."""
    if not configs:
        raise InvalidRequestError("no configuration to evaluate")
    reference_runner = loader(RunConfig(1.0, REFERENCE_LIVE, "reference"))
    try:
        reference = run_reference(reference_runner, text)
    finally:
        reference_runner.close()
    rows = []
    for config in configs:
        runner = loader(config)
        try:
            row = evaluate(runner, config, text, reference)
        finally:
            runner.close()
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


TABLE_COLUMNS = (
    ("policy", "policy", "{}"),
    ("alpha", "alpha", "{:.2f}"),
    ("cache_fraction", "cache", "{:.2f}"),
    ("top1_agreement", "top1", "{:.4f}"),
    ("kl", "KL", "{:.5f}"),
    ("ppl", "ppl", "{:.3f}"),
    ("ppl_delta", "dppl", "{:+.2%}"),
    ("cloze_acc", "cloze", "{:.3f}"),
    ("hit_rate", "hits", "{:.3f}"),
    ("bytes_per_token", "bytes/tok", "{:,.0f}"),
    ("substitutions_per_token", "subs/tok", "{:.2f}"),
)


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def format_table(rows: Sequence[FidelityRow]) -> str:
    """A fixed-width text table of the main columns, one line per row."""
    header = [title for _, title, _ in TABLE_COLUMNS]
    lines = [[_cell(getattr(row, key), fmt) for key, _, fmt in TABLE_COLUMNS] for row in rows]
    widths = [max(len(c) for c in column) for column in zip(header, *lines, strict=False)]
    return "\n".join(
        "  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True))
        for line in [header, *lines]
    )
