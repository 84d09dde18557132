"""Write ``README.md`` (the model card) into a trained model folder from the run summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SOURCES = (
    (
        "austen",
        "Jane Austen, six novels",
        "Debian `r-cran-janeaustenr`",
        "public-domain text (MIT package)",
    ),
    ("bible", "King James Bible", "Debian `bible-kjv` + `bible-kjv-text`", "public domain"),
    (
        "python_docs",
        "Python 3.11 documentation (reST sources)",
        "Debian `python3.11-doc`",
        "PSF License",
    ),
    (
        "chat",
        "chatterbot conversations + Python FAQ Q/A as chats",
        "PyPI `chatterbot-corpus`, Debian `python3.11-doc`",
        "BSD-3-Clause / PSF License",
    ),
)
HELDOUT = {
    "austen": "the whole novel *Persuasion*",
    "bible": "the books Ruth, Jonah, Mark, James, Philemon",
    "python_docs": "doc pages with crc32(path) % 20 == 0",
    "chat": "chats whose first user message has crc32 % 20 == 0",
}


def _data_table(summary: dict[str, Any]) -> list[str]:
    chars, tokens = summary["corpus_chars"], summary.get("train_stream_tokens", {})
    rows = [
        "| domain | source | package | licence | train chars | train tokens | held out |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, what, package, licence in SOURCES:
        rows.append(
            f"| {key} | {what} | {package} | {licence} | {chars['train'].get(key, 0):,} "
            f"| {tokens.get(key, 0):,} | {HELDOUT[key]} ({chars['heldout'].get(key, 0):,} chars) |"
        )
    return rows


def _eval_table(ev: dict[str, Any]) -> list[str]:
    rows = [
        "| domain | held-out tokens | perplexity | router entropy / uniform |",
        "|---|---|---|---|",
    ]
    for domain, d in ev["domains"].items():
        ratio = d["router_entropy"] / ev["uniform_entropy"]
        rows.append(f"| {domain} | {d['tokens']:,} | {d['perplexity']:.2f} | {ratio:.3f} |")
    return rows


def _model_lines(summary: dict[str, Any]) -> list[str]:
    m, r = summary["model_spec"], summary["result"]
    return [
        f"- Architecture: `Qwen2MoeForCausalLM` (transformers), {r['parameters']:,} parameters, "
        "fp32, tied embeddings.",
        f"- {m['num_layers']} layers, hidden {m['hidden_size']}, {m['num_heads']} attention heads "
        f"({m['num_kv_heads']} KV heads), context {m['context']} tokens.",
        f"- Every layer sparse: {m['num_experts']} routed experts (intermediate "
        f"{m['expert_intermediate']}), top-{m['top_k']}, `norm_topk_prob={m['norm_topk_prob']}`, "
        f"plus one gated shared expert (intermediate {m['shared_intermediate']}).",
        f"- Load-balancing loss during training (`output_router_logits=True`, "
        f"`router_aux_loss_coef={m['aux_loss_coef']}`); the saved config turns router logits off "
        f"for inference.",
        "- Tokenizer: byte-level BPE trained on the training split, ChatML chat template "
        "(`<|im_start|>role\\n...<|im_end|>`), `<|im_end|>` is the end-of-sequence token.",
    ]


def _training_lines(summary: dict[str, Any]) -> list[str]:
    t, r, mach = summary["train_spec"], summary["result"], summary["machine"]
    weights = ", ".join(f"{d} {w:.0%}" for d, w in t["domain_weights"])
    return [
        f"- Tokens seen: {r['tokens_seen']:,} ({r['steps']} steps of {t['batch_size']} sequences), "
        f"domain mix by sequence: {weights}.",
        f"- AdamW (lr {t['lr']}, betas 0.9/0.95, weight decay {t['weight_decay']}), warm-up "
        f"{t['warmup_fraction']:.0%} then cosine to {t['min_lr_ratio']:.0%}, grad clip "
        f"{t['grad_clip']}, seed {t['seed']}.",
        f"- Training time: {r['seconds'] / 60:.1f} min, {r['tokens_per_second']:.0f} tokens/s, "
        f"final training loss {r['final_loss']:.3f}.",
        *_tune_lines(summary),
        f"- Machine: {mach['platform']}, {mach['processor']}, {mach['cpu_count']} CPUs "
        f"(shared with other jobs), {mach['torch_threads']} torch thread(s), "
        f"torch {mach['torch']}.",
    ]


def _tune_lines(summary: dict[str, Any]) -> list[str]:
    if "tune" not in summary:
        return []
    t, r = summary["tune"]["train_spec"], summary["tune"]["result"]
    weights = ", ".join(f"{d} {w:.0%}" for d, w in t["domain_weights"])
    total = summary["result"]["tokens_seen"] + r["tokens_seen"]
    return [
        f"- Stage 2 (chat-heavier continuation): {r['tokens_seen']:,} more tokens "
        f"({r['steps']} steps), mix {weights}, lr {t['lr']} warm-up then cosine, "
        f"{r['seconds'] / 60:.1f} min at {r['tokens_per_second']:.0f} tokens/s, final loss "
        f"{r['final_loss']:.3f}. Total tokens seen: {total:,}.",
        f"- Stage 2 command: `{summary['tune']['command']}`",
        f"- Both stages in one command: `python -m engine.training --out DIR --tokens "
        f"{summary['result']['tokens_seen']} --tune-tokens {r['tokens_seen']}`",
    ]


def _sample_lines(ev: dict[str, Any]) -> list[str]:
    lines = []
    for sample in ev["samples"]:
        reply = sample["reply"].replace("\n", " ") or "(empty)"
        lines += [f"- **User:** {sample['prompt']}", f"  **Model:** {reply}", ""]
    return lines


def render_card(summary: dict[str, Any]) -> str:
    """The model card text."""
    ev = summary["eval"]
    lines = [
        "# understudy-mini-moe",
        "",
        "A small fine-grained Mixture-of-Experts chat model trained from scratch on CPU by "
        "`python -m engine.training`, so Understudy can chat offline right after install and "
        "so expert substitution can be measured on really learned routing. It is a toy: "
        "expect fluent-ish text and loosely on-topic replies, not facts.",
        "",
        "## Model",
        *_model_lines(summary),
        "",
        "## Data and licences",
        *_data_table(summary),
        "",
        "## Training",
        *_training_lines(summary),
        f"- Re-run: `{summary['command']}`",
        *[f"- Note: {note}" for note in summary.get("notes", [])],
        "",
        "## Held-out evaluation",
        *_eval_table(ev),
        "",
        f"Uniform router entropy is ln {len(ev['domains']['austen']['usage'][0])} = "
        f"{ev['uniform_entropy']:.3f} nats. Expert specialisation (Jensen-Shannon divergence "
        f"between the domains' expert-usage distributions, mean over layers): "
        f"{ev['specialisation_bits']:.3f} bits.",
        "",
        "## Sample chat replies (greedy, `apply_chat_template` + `generate`)",
        *_sample_lines(ev),
    ]
    return "\n".join(lines)


def write_card(model_dir: Path, summary: dict[str, Any]) -> Path:
    """Write ``model_dir/README.md``; returns its path."""
    path = model_dir / "README.md"
    path.write_text(render_card(summary), encoding="utf-8")
    return path
