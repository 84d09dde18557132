"""How alike are the experts that substitution swaps? An offline look at one model's layers.

SMoE's substitution assumes that an unselected expert whose gate score is close to the
cut-off can stand in for a selected one (``docs/SMOE.md``: "functionally similar" means only
"gate score within the band"). This study tests that assumption on real text: it runs the
model once (plain transformers, every expert computed), and at every MoE layer and token
applies the band rule at ``alpha`` to all candidates (residency ignored: the most swaps the
rule could make), then compares each swapped pair's outputs:

- ``cos_band``: cosine between the replaced expert's output and its substitute's (the rule
  picks the highest-scoring candidate);
- ``cos_best_in_band``: the same for the most similar candidate in the band (what an output-
  similarity matrix could pick at best);
- ``cos_best_any``: the most similar of all other experts (band ignored);
- ``err_*``: the change of the MoE block's output, relative to its norm, when the replaced
  expert's weighted output is swapped for the band's substitute, for the most similar one, or
  simply dropped.

Experts whose outputs are near orthogonal cannot stand in for each other whatever picks
them. ``python -m engine.eval.expert_similarity --model DIR --text-file F`` prints one line
per alpha. Models in transformers' common experts layout (``gate_up_proj``/``down_proj``)
with a softmax router (``gate.weight``) only.

Legend: T tokens, E experts, H hidden, I expert width, k experts per token.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.errors import InvalidRequestError

METRICS = ("cos_band", "cos_best_in_band", "cos_best_any", "err_band", "err_best", "err_drop")


@dataclass(frozen=True)
class SwapStudy:
    """Means over every swap the band rule would make at ``alpha`` (residency ignored)."""

    alpha: float
    tokens: int
    swaps: int
    cos_band: float
    cos_best_in_band: float
    cos_best_any: float
    err_band: float
    err_best: float
    err_drop: float

    @property
    def swaps_per_token(self) -> float:
        return self.swaps / max(1, self.tokens)


def moe_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The sparse MoE blocks: a softmax router ``gate`` and experts in the common layout."""
    blocks = [
        m
        for m in model.modules()
        if hasattr(getattr(m, "gate", None), "weight")
        and hasattr(getattr(m, "experts", None), "gate_up_proj")
    ]
    if not blocks:
        raise InvalidRequestError(
            "no MoE block with a softmax router and gate_up_proj/down_proj experts was found"
        )
    return blocks


def block_inputs(model: torch.nn.Module, token_ids: torch.Tensor) -> list[torch.Tensor]:
    """Each MoE block's input on one forward over ``token_ids`` ([T, H] per block)."""
    blocks = moe_blocks(model)
    captured: dict[int, torch.Tensor] = {}
    handles = [
        block.register_forward_pre_hook(
            lambda _m, args, i=i: captured.__setitem__(i, args[0].reshape(-1, args[0].shape[-1]))
        )
        for i, block in enumerate(blocks)
    ]
    try:
        with torch.no_grad():
            model(token_ids.unsqueeze(0))
    finally:
        for handle in handles:
            handle.remove()
    return [captured[i].detach().float() for i in range(len(blocks))]


def expert_outputs(block: Any, x: torch.Tensor) -> torch.Tensor:
    """Every expert's unweighted output for every token: ``[T, E, H]``."""
    experts = block.experts
    gate_up = torch.einsum("th,eih->tei", x, experts.gate_up_proj.float())  # [T, E, 2I]
    gate, up = gate_up.chunk(2, dim=-1)
    hidden = experts.act_fn(gate) * up  # [T, E, I]
    return torch.einsum("tei,ehi->teh", hidden, experts.down_proj.float())


def _token_swaps(probs: torch.Tensor, k: int, alpha: float) -> list[tuple[int, int, list[int]]]:
    """(replaced, band substitute, band candidates) for one token: the lowest-scoring
    low-score experts first (they give way first when candidates run short), each with the
    highest-scoring unused candidate."""
    order = probs.argsort(descending=True)
    selected, cut = order[:k].tolist(), float(probs[order[k]])
    low = sorted((e for e in selected if probs[e] <= (1 + alpha) * cut), key=lambda e: probs[e])
    band = [e for e in order[k:].tolist() if probs[e] > (1 - alpha) * cut]
    return [(a, b, band) for a, b in zip(low, band, strict=False)]


def _layer_sums(block: Any, x: torch.Tensor, k: int, alpha: float) -> list[float]:
    """Sums of the METRICS over one layer's swaps, then the swap count."""
    with torch.no_grad():
        probs = torch.softmax(x @ block.gate.weight.float().T, dim=-1)  # [T, E]
        y = expert_outputs(block, x)  # [T, E, H]
        out = block(x.unsqueeze(0))
        out = (out[0] if isinstance(out, tuple) else out).reshape(x.shape).float()  # [T, H]
    top = probs.topk(k, dim=-1).values.sum(-1)  # [T] the model's renormalising denominator
    unit = torch.nn.functional.normalize(y, dim=-1)
    sums, count = [0.0] * len(METRICS), 0
    for t in range(x.shape[0]):
        cos = unit[t] @ unit[t].T  # [E, E]
        norm = float(out[t].norm()) or 1.0
        w = probs[t] / top[t]
        for a, b, band in _token_swaps(probs[t], k, alpha):
            best = max(band, key=lambda c: float(cos[a, c]))
            others = torch.cat([cos[a, :a], cos[a, a + 1 :]])
            values = (
                float(cos[a, b]),
                float(cos[a, best]),
                float(others.max()),
                float((w[a] * y[t, a] - w[b] * y[t, b]).norm()) / norm,
                float((w[a] * y[t, a] - w[best] * y[t, best]).norm()) / norm,
                float((w[a] * y[t, a]).norm()) / norm,
            )
            sums = [s + v for s, v in zip(sums, values, strict=True)]
            count += 1
    return [*sums, float(count)]


def study(model: torch.nn.Module, token_ids: torch.Tensor, alpha: float, k: int) -> SwapStudy:
    """The band rule's swaps at ``alpha`` over all MoE layers of one forward."""
    if not 0 < alpha < 1:
        raise InvalidRequestError(f"alpha must be in (0, 1) for a swap study; got {alpha}")
    blocks = moe_blocks(model)
    totals = [0.0] * (len(METRICS) + 1)
    for block, x in zip(blocks, block_inputs(model, token_ids), strict=True):
        totals = [a + b for a, b in zip(totals, _layer_sums(block, x, k, alpha), strict=True)]
    swaps = int(totals[-1])
    means = [s / swaps if swaps else 0.0 for s in totals[:-1]]
    return SwapStudy(alpha, int(token_ids.shape[0]), swaps, *means)


def markdown(rows: Sequence[SwapStudy]) -> str:
    """One table line per alpha."""
    header = ["alpha", "tokens", "swaps/token", *METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [f"{r.alpha:g}", str(r.tokens), f"{r.swaps_per_token:.1f}"]
        cells += [f"{getattr(r, name):.3f}" for name in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _load(model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise InvalidRequestError(f"{model_dir} is not a model folder (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, local_files_only=True, trust_remote_code=False
    )
    return model.eval(), tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    from engine.paths import builtin_model_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model folder (default: the built-in model)")
    parser.add_argument("--text-file", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=192)
    parser.add_argument("--alphas", default="0.02,0.1", help="comma-separated, each in (0, 1)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
        model, tokenizer = _load(args.model or builtin_model_dir())
        text = args.text_file.read_text(encoding="utf-8")
        ids = torch.tensor(tokenizer(text)["input_ids"][: args.tokens], dtype=torch.long)
        k = int(model.config.num_experts_per_tok)
        print(markdown([study(model, ids, alpha, k) for alpha in alphas]))
    except (InvalidRequestError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
