"""Measurements behind the method's open decisions: substitute weight, eviction window/scale.

Each study loads the model fresh per configuration, feeds the same text token by token
(teacher-forced, ``engine.eval.forcing``) and compares the logits with the unmodified model
(the engine at alpha 0 is bit-identical to it), next to the transfer counters:

- ``weight_mode_rows``: the substitute's mixing weight (own gate score, renormalised or not,
  or the replaced expert's weight) at several alphas;
- ``eviction_rows``: score-eviction window ``n`` and the global-pool scale against LRU;
- ``prefetch_rows``: how many predicted experts to copy per layer;
- prefetch precision/recall/used come with every row of the full method.

``python -m engine.eval.method_study MODEL_DIR TEXT_FILE`` prints the tables (markdown).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from engine.config import CacheConfig, LiveOptions, LoadConfig
from engine.eval.forcing import teacher_forced_logits
from engine.eval.metrics import compare
from engine.offload.score_eviction import SCORE_SCALES, ScoreEviction
from engine.offload.substitution import WEIGHT_MODES
from engine.runtime.loading import load_model

WINDOW = 64  # tokens per teacher-forcing window (a fresh KV cache each)


@dataclass(frozen=True)
class StudyRow:
    """One configuration's fidelity and transfer counts on the study text."""

    name: str
    top1: float
    kl: float
    ppl_delta: float
    hit_rate: float  # substitutions counted as hits
    substitutions_per_token: float
    bytes_per_token: float
    prefetch_precision: float  # predicted top-score experts that were top-score
    prefetch_recall: float
    prefetch_used: float  # issued copies the layer then computed


def _run(
    model_dir: Path, token_ids: torch.Tensor, fraction: float, live: LiveOptions, **method: Any
) -> tuple[torch.Tensor, Any, Any]:
    """Teacher-forced logits, the stats and the prefetch account of one configuration."""
    config = LoadConfig(model_dir, device="cpu", cache=CacheConfig(fraction=fraction), live=live)
    loaded = load_model(config)
    try:
        for name, value in method.items():
            if name == "eviction":
                loaded.offload.cache.set_policy(value)
            else:
                setattr(loaded.offload.method, name, value)

        def hook(tokens: int, seconds: float) -> None:
            loaded.offload.end_step(tokens)

        logits, _ = teacher_forced_logits(loaded.model, token_ids, WINDOW, hook)
        return logits, loaded.offload.stats(), loaded.offload.method.prefetch_account
    finally:
        loaded.offload.close()


def _row(name: str, reference: torch.Tensor, targets: torch.Tensor, run: tuple) -> StudyRow:
    logits, stats, account = run
    result = compare(reference, logits, targets)
    return StudyRow(
        name=name,
        top1=result.top1_agreement,
        kl=result.kl,
        ppl_delta=result.ppl_delta,
        hit_rate=stats.hit_rate,
        substitutions_per_token=stats.substitutions_per_token,
        bytes_per_token=stats.bytes_per_token,
        prefetch_precision=account.precision,
        prefetch_recall=account.recall,
        prefetch_used=account.used_fraction,
    )


def _reference(model_dir: Path, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    config = LoadConfig(model_dir, device="cpu", cache=CacheConfig(fraction=1.0))
    loaded = load_model(config)
    try:
        return teacher_forced_logits(loaded.model, token_ids, WINDOW)
    finally:
        loaded.offload.close()


def weight_mode_rows(
    model_dir: Path,
    token_ids: torch.Tensor,
    alphas: Sequence[float] = (0.2, 0.3, 0.4),
    fraction: float = 0.5,
) -> list[StudyRow]:
    """Substitution alone (score eviction, no prefetch/CPU) per weight mode and alpha."""
    reference, targets = _reference(model_dir, token_ids)
    rows = []
    for alpha in alphas:
        live = LiveOptions(policy="smoe", alpha=alpha, prefetch=False, cpu_assist=False)
        for mode in WEIGHT_MODES:
            run = _run(model_dir, token_ids, fraction, live, weight_mode=mode)
            rows.append(_row(f"alpha {alpha} {mode}", reference, targets, run))
    return rows


def eviction_rows(
    model_dir: Path,
    token_ids: torch.Tensor,
    windows: Sequence[int] = (2, 4, 8, 16),
    fraction: float = 0.5,
) -> list[StudyRow]:
    """LRU, LFU and score eviction per window and global-pool scale (no other policy)."""
    reference, targets = _reference(model_dir, token_ids)
    rows = []
    for policy in ("lru", "lfu"):
        run = _run(model_dir, token_ids, fraction, LiveOptions(policy=policy))  # type: ignore[arg-type]
        rows.append(_row(policy, reference, targets, run))
    base = LiveOptions(policy="smoe", substitution=False, prefetch=False, cpu_assist=False)
    for scale in SCORE_SCALES:
        for n in windows:
            evict = ScoreEviction(window=n, scale=scale)  # type: ignore[arg-type]
            live = replace(base, score_window=n)
            run = _run(model_dir, token_ids, fraction, live, eviction=evict)
            rows.append(_row(f"score n={n} {scale}", reference, targets, run))
    return rows


def full_method_rows(
    model_dir: Path, token_ids: torch.Tensor, alpha: float, fraction: float = 0.5
) -> list[StudyRow]:
    """The cumulative ablation at one alpha, with prefetch precision/recall."""
    reference, targets = _reference(model_dir, token_ids)
    steps = {
        "lru": LiveOptions(policy="lru"),
        "score": LiveOptions(policy="smoe", substitution=False, prefetch=False, cpu_assist=False),
        "+substitution": LiveOptions(policy="smoe", alpha=alpha, prefetch=False, cpu_assist=False),
        "+prefetch": LiveOptions(policy="smoe", alpha=alpha, cpu_assist=False),
        "+cpu": LiveOptions(policy="smoe", alpha=alpha),
    }
    return [
        _row(name, reference, targets, _run(model_dir, token_ids, fraction, live))
        for name, live in steps.items()
    ]


def prefetch_rows(
    model_dir: Path,
    token_ids: torch.Tensor,
    alpha: float,
    limits: Sequence[int | None] = (None, 1, 2),
    fraction: float = 0.5,
) -> list[StudyRow]:
    """Substitution + prefetch (no CPU assist) per cap on prefetched experts per layer."""
    reference, targets = _reference(model_dir, token_ids)
    live = LiveOptions(policy="smoe", alpha=alpha, cpu_assist=False)
    rows = []
    for limit in limits:
        run = _run(model_dir, token_ids, fraction, live, prefetch_limit=limit)
        rows.append(_row(f"prefetch limit {limit or 'none'}", reference, targets, run))
    return rows


def markdown(rows: Sequence[StudyRow]) -> str:
    """A markdown table of study rows."""
    head = (
        "| config | top-1 | KL | ppl delta | hit rate | subs/tok | bytes/tok "
        "| pf precision | pf recall | pf used |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r.name} | {r.top1:.4f} | {r.kl:.5f} | {r.ppl_delta:+.4f} | {r.hit_rate:.3f} "
        f"| {r.substitutions_per_token:.2f} | {r.bytes_per_token:.0f} "
        f"| {r.prefetch_precision:.3f} | {r.prefetch_recall:.3f} | {r.prefetch_used:.3f} |\n"
        for r in rows
    )
    return head + body


def _token_ids(model_dir: Path, text_file: Path, limit: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(text_file.read_text(encoding="utf-8"))["input_ids"][:limit]
    return torch.tensor(ids, dtype=torch.long)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("text_file", type=Path)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--alpha", type=float, default=0.3)
    args = parser.parse_args(argv)
    ids = _token_ids(args.model_dir, args.text_file, args.tokens)
    print(f"## Substitute weight ({len(ids)} tokens, cache {args.fraction:.0%})\n")
    print(markdown(weight_mode_rows(args.model_dir, ids, fraction=args.fraction)))
    print(f"## Eviction window and scale (cache {args.fraction:.0%})\n")
    print(markdown(eviction_rows(args.model_dir, ids, fraction=args.fraction)))
    print(f"## Prefetch cap per layer at alpha {args.alpha}\n")
    print(markdown(prefetch_rows(args.model_dir, ids, args.alpha, fraction=args.fraction)))
    print(f"## Cumulative method at alpha {args.alpha}\n")
    print(markdown(full_method_rows(args.model_dir, ids, args.alpha, args.fraction)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
