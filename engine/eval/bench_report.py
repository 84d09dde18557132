"""Reporting for the benchmark: the machine, the JSON, the plot and ``BENCHMARKS.md``.

Everything here formats numbers that ``engine.eval.bench`` measured; nothing is typed in.
On a run without a GPU the ``+cpu`` rows stay in the JSON but are left out of the tables and
the plot (``reported_rows``): their bytes follow timing noise there. ``readme_table`` renders
the README's headline table, and a test checks the README against ``bench.json``. The plot
(matplotlib, Agg backend, no display needed) shows bytes moved per token against top-1
agreement over alpha, one curve per policy, one panel per cache size.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from engine.atomic import write_text_atomic, write_with
from engine.eval import bench_curve, projection
from engine.eval.bench import (
    DEVICE_INDEPENDENT,
    FULL_METHOD,
    HEADLINE_CACHE,
    MAX_PPL_DELTA,
    MIN_AGREEMENT,
    BenchResult,
    choose_default_alpha,
    curve_rows,
    headline_policy,
    machine_label,
    projections_of,
)

HEADLINE_TARGETS = "bytes/token <= 0.5 x LRU, top-1 >= 0.97, ppl delta <= 2%, hit rate > 0.60"


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict[str, Any]:
    """What the timings were taken on."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "os": platform.platform(),
        "device": device,
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def result_device(result: BenchResult) -> str:
    """The device the run measured on, as its JSON records it (``cpu`` when unrecorded)."""
    return str(result.settings.get("machine", {}).get("device", "cpu"))


def reported_rows(rows: Sequence[dict[str, Any]], device: str) -> list[dict[str, Any]]:
    """The rows a run on ``device`` may report: ``+cpu`` only from a GPU run."""
    if headline_policy(device) == FULL_METHOD:
        return list(rows)
    return [r for r in rows if r["policy"] != FULL_METHOD]


def read_result(path: Path) -> BenchResult:
    """A bench run back from its JSON, with the default alpha of the rule in force.

    Raises ``OSError``, ``ValueError`` (bad JSON) or ``KeyError`` (a field missing).
    """
    data = json.loads(path.read_text(encoding="utf-8"))
    rows = [_without_stored_projections(row) for row in data["rows"]]
    return BenchResult(
        rows,
        choose_default_alpha(rows),  # the rule in force, from the measured rows
        data["model"],
        data["info"],
        data["settings"],
        data.get("trace_replay", []),
        data["started"],
        data["seconds"],
    )


def _without_stored_projections(row: dict[str, Any]) -> dict[str, Any]:
    """A row less the ``proj_ms:*`` figures older runs stored (computed with the host cost
    of their day); the report computes them from the counts and the host cost in force."""
    return {key: value for key, value in row.items() if not key.startswith("proj_ms:")}


def write_json(result: BenchResult, path: Path) -> Path:
    data = {
        "model": result.model_name,
        "info": result.info,
        "settings": result.settings,
        "default_alpha": result.default_alpha,
        "started": result.started,
        "seconds": result.seconds,
        "rows": result.rows,
        "trace_replay": result.replay,
    }
    return write_text_atomic(path, json.dumps(data, indent=1) + "\n")


# ---------------------------------------------------------------- plot


def _policies(rows: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["policy"] for r in rows))


def _curve(rows: Sequence[dict[str, Any]], policy: str, fraction: float) -> list[dict[str, Any]]:
    chosen = (r for r in rows if r["policy"] == policy and r["cache_fraction"] == fraction)
    return sorted(chosen, key=lambda r: r["alpha"])


def _label_alphas(
    axis: Any, curve: Sequence[dict[str, Any]], xs: list[float], ys: list[float]
) -> None:
    if len(curve) < 2:
        return
    for r, x, y in zip(curve, xs, ys, strict=True):
        axis.annotate(
            f"{r['alpha']:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )


def _color(policy: str) -> str:
    from engine.eval.bench import POLICIES

    index = POLICIES.index(policy) if policy in POLICIES else len(POLICIES)
    return f"C{index}"


def _panel(axis: Any, rows: Sequence[dict[str, Any]], fraction: float, x_key: str) -> None:
    """One cache size: KB moved per token against ``x_key``, one line per policy."""
    for policy in _policies(rows):
        curve = _curve(rows, policy, fraction)
        xs = [r[x_key] for r in curve]
        ys = [r["bytes_per_token"] / 1e3 for r in curve]
        if x_key == "alpha" and len(curve) == 1:  # a baseline: the same at every alpha
            axis.axhline(ys[0], linestyle="--", linewidth=1, label=policy, color=_color(policy))
            continue
        axis.plot(xs, ys, marker="o", label=policy, color=_color(policy))
        if x_key != "alpha":
            _label_alphas(axis, curve, xs, ys)
    axis.set_title(f"cache {fraction:.0%} of experts", fontsize=9)
    axis.set_xlabel("teacher-forced top-1 agreement" if x_key != "alpha" else "alpha")
    axis.set_ylabel("KB moved per token")
    axis.grid(alpha=0.3)


def plot(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Top: bytes/token vs top-1 agreement (points labelled by alpha); bottom: vs alpha."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = sorted({r["cache_fraction"] for r in rows})
    size = (4.6 * len(fractions), 7.6)
    figure, axes = plt.subplots(2, len(fractions), figsize=size, squeeze=False)
    for column, fraction in enumerate(fractions):
        _panel(axes[0][column], rows, fraction, "top1_agreement")
        _panel(axes[1][column], rows, fraction, "alpha")
    axes[1][0].legend(fontsize=7)
    figure.suptitle("Bytes moved per token against fidelity (top) and alpha (bottom)", fontsize=10)
    figure.tight_layout()
    try:
        write_with(path, lambda temp: figure.savefig(temp, dpi=100))
    finally:
        plt.close(figure)
    return path


# ---------------------------------------------------------------- markdown


def _table(header: Sequence[str], lines: Iterable[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def _f(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


MAIN_COLUMNS = (
    ("policy", "policy", "{}"),
    ("cache_fraction", "cache", "{:.0%}"),
    ("alpha", "alpha", "{:g}"),
    ("hit_rate", "hit rate (incl. subs)", "{:.3f}"),
    ("plain_hit_rate", "plain hits", "{:.3f}"),
    ("misses_per_token", "misses/tok", "{:.2f}"),
    ("bytes_per_token", "KB/tok", "{:.1f}"),
    ("substitutions_per_token", "subs/tok", "{:.2f}"),
    ("cpu_computed_per_token", "CPU/tok", "{:.2f}"),
    ("prefetch_precision", "prefetch P", "{:.2f}"),
    ("prefetch_recall", "prefetch R", "{:.2f}"),
    ("time_per_token_s", "ms/tok (forced)", "{:.1f}"),
    ("step_time_p90_s", "p90 ms", "{:.1f}"),
    ("gen_tokens_per_second", "gen tok/s", "{:.1f}"),
    ("gen_time_to_first_token_s", "TTFT ms", "{:.0f}"),
    ("top1_agreement", "top-1", "{:.4f}"),
    ("kl", "KL", "{:.5f}"),
    ("ppl_delta", "ppl delta", "{:+.2%}"),
    ("cloze_acc", "cloze", "{:.3f}"),
)


def _main_cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if key == "bytes_per_token":
        value = value / 1e3
    elif key in ("time_per_token_s", "step_time_p90_s", "gen_time_to_first_token_s"):
        value = value * 1e3
    cell = _f(value, fmt)
    if key == "policy" and row.get("same_run_as"):
        cell += f" (= {row['same_run_as']})"
    return cell


def main_table(rows: Sequence[dict[str, Any]]) -> str:
    return _table(
        [title for _, title, _ in MAIN_COLUMNS],
        ([_main_cell(r, key, fmt) for key, _, fmt in MAIN_COLUMNS] for r in rows),
    )


def projection_table(
    rows: Sequence[dict[str, Any]], alpha: float, cost: projection.HostCost | None = None
) -> str:
    """Projected tok/s bound per geometry and link, at the headline cache, each policy once:
    from each row's counted expert uses and the host cost ``cost`` (default: the measured
    ``host_cost.json``), computed now, so a new host cost re-renders it."""
    chosen = [
        r
        for r in rows
        if r["cache_fraction"] == _headline_fraction(rows)
        and (r["alpha"] == alpha or r["policy"] in ("lru", "lfu", "score"))
    ]
    keys = [(g.name, link.name) for g in projection.GEOMETRIES for link in projection.LINKS]
    header = ["policy", "alpha", *[f"{g} / {link}" for g, link in keys]]
    lines = []
    for r in chosen:
        bounds = projections_of(r, cost)
        cells = [
            _f(1e3 / bounds[f"proj_ms:{g}:{link}"] if bounds else None, "{:.1f}")
            for g, link in keys
        ]
        lines.append([r["policy"], bench_curve.alpha_text(r["alpha"]), *cells])
    return _table(header, lines)


def _headline_fraction(rows: Sequence[dict[str, Any]]) -> float:
    return min({r["cache_fraction"] for r in rows}, key=lambda f: abs(f - HEADLINE_CACHE))


def headline(
    rows: Sequence[dict[str, Any]], alpha: float, policy: str = FULL_METHOD
) -> dict[str, Any]:
    """The issue's targets for ``policy`` at the headline cache and ``alpha``, with pass/fail."""
    fraction = _headline_fraction(rows)
    lru = next((r for r in rows if r["policy"] == "lru" and r["cache_fraction"] == fraction), None)
    ours = next((r for r in curve_rows(rows, policy, fraction) if r["alpha"] == alpha), None)
    if lru is None or ours is None:
        return {}
    ratio = ours["bytes_per_token"] / lru["bytes_per_token"] if lru["bytes_per_token"] else None
    return {
        "policy": policy,
        "cache_fraction": fraction,
        "alpha": alpha,
        "bytes_ratio_vs_lru": ratio,
        "bytes_per_token": ours["bytes_per_token"],
        "lru_bytes_per_token": lru["bytes_per_token"],
        "top1_agreement": ours["top1_agreement"],
        "ppl_delta": ours["ppl_delta"],
        "hit_rate": ours["hit_rate"],
        "lru_hit_rate": lru["hit_rate"],
        "lru_top1_agreement": lru["top1_agreement"],
        "lru_ppl_delta": lru["ppl_delta"],
        "pass_bytes": ratio is not None and ratio <= 0.5,
        "pass_top1": ours["top1_agreement"] >= MIN_AGREEMENT,
        "pass_ppl": ours["ppl_delta"] <= MAX_PPL_DELTA,
        "pass_hits": ours["hit_rate"] > 0.6,
    }


def best_within_bounds(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The fewest bytes per token at the headline cache among rows within both bounds."""
    fraction = _headline_fraction(rows)
    fine = [
        r
        for r in rows
        if r["cache_fraction"] == fraction
        and r["top1_agreement"] >= MIN_AGREEMENT
        and r["ppl_delta"] <= MAX_PPL_DELTA
    ]
    return min(fine, key=lambda r: r["bytes_per_token"], default=None)


def best_text(rows: Sequence[dict[str, Any]], head: dict[str, Any]) -> str:
    best = best_within_bounds(rows)
    if best is None or not head or not head["lru_bytes_per_token"]:
        return ""
    ratio = best["bytes_per_token"] / head["lru_bytes_per_token"]
    return (
        f"Fewest bytes among all rows at this cache within both fidelity bounds: "
        f"`{best['policy']}` at alpha {bench_curve.alpha_text(best['alpha'])}, "
        f"{best['bytes_per_token'] / 1e3:.1f} KB/token = {ratio:.2f} x LRU, "
        f"top-1 {best['top1_agreement']:.4f}, perplexity "
        f"{best['ppl_delta']:+.2%}, hit rate {best['hit_rate']:.3f}."
    )


def _mark(ok: bool) -> str:
    return "met" if ok else "**not met**"


SUMMARY_WORDS = {
    "+substitution": "substitution (`+substitution`)",
    DEVICE_INDEPENDENT: "substitution + prefetch (`+prefetch`)",
    FULL_METHOD: "whole method (`+cpu`, `--policy smoe`)",
}
POLICY_WORDS = {
    FULL_METHOD: "the whole method (`+cpu`, i.e. `--policy smoe`)",
    DEVICE_INDEPENDENT: "substitution and prefetch (`+prefetch`: `--policy smoe --no-cpu-assist`)",
}


def headline_text(head: dict[str, Any]) -> str:
    if not head:
        return "The headline needs the `lru` policy and the headline policy at one cache size."
    ratio = head["bytes_ratio_vs_lru"]
    words = POLICY_WORDS.get(head["policy"], f"`{head['policy']}`")
    lines = [
        f"At cache {head['cache_fraction']:.0%} of all experts, {words} at the chosen "
        f"default alpha {bench_curve.alpha_text(head['alpha'])}:",
        "",
        f"- bytes moved per token: {head['bytes_per_token'] / 1e3:.1f} KB vs LRU "
        f"{head['lru_bytes_per_token'] / 1e3:.1f} KB = "
        f"{_f(ratio, '{:.2f}')} x LRU (target <= 0.5): {_mark(head['pass_bytes'])}",
        f"- teacher-forced top-1 agreement: {head['top1_agreement']:.4f} (target >= 0.97): "
        f"{_mark(head['pass_top1'])}",
        f"- perplexity delta: {head['ppl_delta']:+.2%} (target <= 2%): {_mark(head['pass_ppl'])}",
        f"- hit rate incl. substitutions: {head['hit_rate']:.3f} (LRU {head['lru_hit_rate']:.3f}; "
        f"target > 0.60): {_mark(head['pass_hits'])}",
    ]
    return "\n".join(lines)


def _control_of(row: dict[str, Any], replay: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The shuffled twin of a replay row (its trace is named ``<name> (shuffled)``)."""
    name = f"{row['trace']} (shuffled)"
    for other in replay:
        same = all(other[k] == row[k] for k in ("pool", "fraction", "policy"))
        if other["shuffled"] and same and other["trace"] in (name, row["trace"]):
            return other
    return None


def replay_table(replay: Sequence[dict[str, Any]]) -> str:
    header = ["trace", "pool", "cache", "policy", "hit rate", "shuffled control", "gain"]
    lines = []
    for r in (r for r in replay if not r["shuffled"]):
        control = _control_of(r, replay)
        ctrl = control["hit_rate"] if control else None
        gain = r["hit_rate"] - ctrl if ctrl is not None else None
        cells = [r["trace"], r["pool"], f"{r['fraction']:.0%}", r["policy"], f"{r['hit_rate']:.3f}"]
        lines.append([*cells, _f(ctrl, "{:.3f}"), _f(gain, "{:+.3f}")])
    return _table(header, lines)


def _model_lines(result: BenchResult) -> list[str]:
    info = result.info
    keys = (
        "architecture",
        "moe_layers",
        "experts_per_layer",
        "top_k",
        "bytes_per_expert",
        "router_family",
    )
    return [
        f"- model: `{result.model_name}` ("
        + ", ".join(f"{k} {info[k]}" for k in keys if k in info)
        + ")"
    ]


def _settings_lines(result: BenchResult, machine: dict[str, Any]) -> list[str]:
    s = result.settings
    lines = _model_lines(result)
    lines += [
        f"- text: `{s.get('text_file')}`, {s.get('tokens')} tokens teacher-forced one decode "
        f"step at a time in windows of {s.get('window')}; {s.get('cloze_items')} cloze items",
        f"- timing: greedy generation of {len(s.get('prompts', []))} chat prompts x "
        f"{s.get('gen_tokens')} tokens, {s.get('timing_runs')} runs, median tok/s "
        '("gen tok/s", decode only) and time to first token ("TTFT", the chat prompt\'s '
        'prefill); "ms/tok (forced)" is the median over windows of the mean teacher-forced '
        'decode step, "p90 ms" the 90th percentile of those steps. Timings are on a shared, '
        "busy machine: compare rows within one run, not across runs",
        f"- machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), Python {machine['python']}, device "
        f"`{machine['device']}`" + (f" ({machine['gpu']})" if machine.get("gpu") else ""),
        f"- date: {result.started}; the whole run took {result.seconds / 60:.1f} min",
    ]
    return lines


def render_markdown(
    result: BenchResult,
    machine: dict[str, Any],
    command: str,
    plot_path: str | None,
    json_path: str,
    host_cost: Path | None = None,
) -> str:
    """The whole ``BENCHMARKS.md``: generated, never edited by hand. ``host_cost``: the
    projections' host cost file (default ``projection.HOST_COST_FILE``).

    Raises ``ValueError`` when ``host_cost`` is not a host cost document."""
    alpha = result.default_alpha
    device = result_device(result)
    rows = reported_rows(result.rows, device)
    head = headline(rows, alpha, headline_policy(device))
    cost, origin = projection.read_host_cost(host_cost)
    parts = [
        "# Benchmarks",
        "",
        "Generated by `python -m engine bench`; do not edit by hand. Every figure below was "
        "measured by the command shown, except the columns labelled *projection*.",
        "",
        "```",
        command,
        "```",
        "",
        *_settings_lines(result, machine),
        f"- all rows as JSON: `{json_path}`",
        "",
        '## Headline (issue 4, "What to aim for")',
        "",
        device_note(device),
        "",
        readme_table(result),
        "",
        headline_text(head),
        "",
        best_text(rows, head),
        "",
        *curve_section(result),
        "## Default alpha",
        "",
        f"Chosen: **{bench_curve.alpha_text(alpha)}**. Rule (the paper's equation 5 is not "
        "available to us): of "
        f"the alphas for `{DEVICE_INDEPENDENT}` (substitution and prefetch, whose bytes do not "
        f"depend on the device) at cache {HEADLINE_CACHE:.0%} whose top-1 agreement "
        f"is >= {MIN_AGREEMENT} and perplexity at most {MAX_PPL_DELTA:.0%} above the "
        "unmodified model (from 0 up to the first alpha that fails), the one that moves the "
        "fewest bytes per token. The curve is written where the app's slider reads it "
        "(`<user data>/curves/<model>.json`, and `understudy_curve.json` in the built-in "
        "model's folder), with the machine and date it was measured on.",
        "",
        "## All configurations",
        "",
        "Policies are cumulative (the paper's ablation order): `lru` (mixtral-offloading), "
        "`lfu`, `score` (score-aware eviction alone), `+substitution`, `+prefetch`, `+cpu` "
        '(the whole method, `--policy smoe`). "hit rate" counts substitutions as served from '
        'the cache; "plain hits" does not. A policy marked `(= x)` is the same configuration '
        "as `x` (measured once).",
        "",
        main_table(rows),
        "",
    ]
    if plot_path:
        parts += ["## Speed against fidelity", "", f"![speed vs fidelity]({plot_path})", ""]
    parts += [
        f"## Projections (not measurements) at cache {_headline_fraction(rows):.0%}",
        "",
        f"{projection.UPPER_BOUND_LABEL[:1].upper()}{projection.UPPER_BOUND_LABEL[1:]}, with "
        "perfect overlap, for real model geometries over three PCIe links: from this run's "
        "measured fractions of expert uses served by the cache, substituted, copied (prefetch "
        "copies included) and computed on the CPU, plus the engine's measured host time per "
        "layer, with the model of `docs/ANCHORS.md` (bf16 experts; "
        "`engine/eval/projection.py` states the formula and the host assumptions). No run "
        "decodes faster than these figures; real runs are slower.",
        "",
        f"Host cost charged: {cost.ops_per_layer:.1f} ops and {cost.syncs_per_layer:.1f} "
        f"syncs per MoE layer at {cost.seconds_per_op * 1e6:.1f} us per op, from {origin}. "
        "Re-render with another host cost (the CUDA one `scripts/gpu-check.sh` writes): "
        "`python -m engine bench --rerender --host-cost FILE`.",
        "",
        projection_table(rows, alpha, cost),
        "",
    ]
    parts += _replay_section(result)
    return "\n".join(parts) + "\n"


def device_note(device: str) -> str:
    """Why the headline policy is what it is on this run's device."""
    if headline_policy(device) == FULL_METHOD:
        return f"Measured on a GPU (`{device}`): the headline is the whole method."
    return (
        f"Measured without a GPU (device `{device}`). There, copying an expert and computing "
        "it on the CPU read the same RAM, so CPU assist's split (and the bytes it saves) "
        "follows timing noise: the headline is substitution and prefetch, whose bytes do not "
        "depend on the device, and the `+cpu` rows are kept in the JSON but not reported "
        "here. CPU-assist bytes come from a run on a real GPU only."
    )


SUMMARY_POLICIES = ("+substitution", DEVICE_INDEPENDENT, FULL_METHOD)


def _summary_line(name: str, alpha: str, kb: float, ratio: str, row: dict[str, Any]) -> list[str]:
    figures = [f"{row['hit_rate']:.3f}", f"{row['top1_agreement']:.4f}", f"{row['ppl_delta']:+.2%}"]
    return [name, alpha, f"{kb / 1e3:.0f}{ratio}", *figures]


def readme_table(result: BenchResult) -> str:
    """The headline table (README and ``BENCHMARKS.md``): LRU, then the method's reported
    parts at the default alpha and the headline cache (``+cpu`` only from a GPU run)."""
    device = result_device(result)
    rows = reported_rows(result.rows, device)
    alpha = result.default_alpha
    heads = [headline(rows, alpha, policy) for policy in SUMMARY_POLICIES]
    heads = [head for head in heads if head]
    if not heads:
        return ""
    lru = next(
        r
        for r in rows
        if r["policy"] == "lru" and r["cache_fraction"] == heads[0]["cache_fraction"]
    )
    lines = [_summary_line("LRU (mixtral-offloading)", "0", lru["bytes_per_token"], "", lru)]
    for head in heads:
        ours = next(
            r
            for r in curve_rows(rows, head["policy"], head["cache_fraction"])
            if r["alpha"] == alpha
        )
        ratio = f" ({_f(head['bytes_ratio_vs_lru'], '{:.2f}')} x LRU)"
        name = SUMMARY_WORDS.get(head["policy"], f"`{head['policy']}`")
        lines.append(
            _summary_line(
                name,
                f"{bench_curve.alpha_text(alpha)} (auto default)",
                ours["bytes_per_token"],
                ratio,
                ours,
            )
        )
    header = ["policy", "alpha", "KB moved per token", "hit rate (incl. substitutions)",
              "top-1 agreement", "perplexity"]  # fmt: skip
    return _table(header, lines)


def curve_section(result: BenchResult) -> list[str]:
    """Every measured alpha of the substituting policies at the headline cache, all devices'
    rows included (``+cpu`` labelled when its bytes follow timing), and the verdict."""
    rows = result.rows
    fraction = _headline_fraction(rows)
    table = bench_curve.curve_table(rows, fraction)
    if not table:
        return []
    lines = [f"## Substitution curve at cache {fraction:.0%}", "", table, ""]
    if headline_policy(result_device(result)) != FULL_METHOD:
        lines += [
            "The whole method's rows (`+cpu`) come from a run without a GPU: which misses "
            "are copied and which are computed on the CPU follows timing there, so their "
            "bytes are shown for completeness, not as a figure for a GPU.",
            "",
        ]
    return [*lines, bench_curve.verdict(rows, fraction, result.default_alpha), ""]


def readme_block(result: BenchResult) -> str:
    """The README's generated block: the run, the headline table, the curve, the verdict."""
    curve = curve_section(result)
    return "\n".join(
        [
            bench_curve.BLOCK_BEGIN,
            f"From {readme_source(result)} (model `{result.model_name}`):",
            "",
            readme_table(result),
            "",
            *[
                line.replace("## ", "#### ", 1) if line.startswith("## ") else line
                for line in curve
            ],
            bench_curve.BLOCK_END,
        ]
    )


def readme_source(result: BenchResult) -> str:
    """The line under the README table: command, device, machine and date of the run."""
    machine = result.settings.get("machine", {})
    return (
        f"`{result.settings.get('command', 'python -m engine bench')}`, device "
        f"`{result_device(result)}`, {machine_label(machine)}, {result.started[:10]}"
    )


def _replay_section(result: BenchResult) -> list[str]:
    if not result.replay:
        return ["## Real routing traces", "", "Skipped: no trace folder was given or found.", ""]
    return [
        "## Real routing traces (replay)",
        "",
        "Real Mixtral-8x7B and Qwen1.5-MoE routing (`../shared/traces`), replayed through the "
        "policies that run on selected experts alone (substitution needs full score vectors, "
        "which the traces lack). The control shuffles token order within each sequence: a gain "
        "that vanishes against it is not locality.",
        "",
        replay_table(result.replay),
        "",
    ]
