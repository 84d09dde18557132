"""Write the calibration text for importance matrices: docs/benchmarks/calibration_sample.txt.

``python scripts/calibration_sample.py --corpus data/corpus/train --out FILE [--scale N]`` takes
fixed passages from the *training* split that ``engine/training/corpus.py`` writes (never the
held-out split that ``heldout_sample.txt``, the evaluation text, comes from): from every Austen
novel, Bible book, Python doc page and chat, passages at fixed fractions of each source, cut at
paragraph boundaries, interleaved by domain so every chunk of a few hundred tokens mixes them.
Deterministic: the same corpus gives the same file. ``--scale`` multiplies the passages taken
(1: about 60,000 characters, the committed file; 4: the "more calibration text" variant).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

PASSAGE = 1500  # characters per passage, cut back to a paragraph end


def _passage(text: str, fraction: float) -> str:
    start = text.find("\n\n", int(len(text) * fraction))
    start = 0 if start < 0 else start + 2
    piece = text[start : start + PASSAGE]
    end = piece.rfind("\n\n")
    return (piece[:end] if end > PASSAGE // 3 else piece).strip()


def _spread(items: list[str], wanted: int) -> list[str]:
    """``wanted`` passages from ``items``: even fractions of each, items taken in turn."""
    fractions = [i / max(1, wanted // max(1, len(items))) for i in range(wanted)]
    count = len(items)
    return [_passage(items[i % count], fractions[i // count] % 1.0) for i in range(wanted)]


def _chat_text(row: dict[str, object]) -> str:
    messages = row["messages"]
    assert isinstance(messages, list)
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def build(corpus: Path, scale: int) -> str:
    """The calibration text from the training split at ``corpus``."""
    rows = {d: _read(corpus / f"{d}.jsonl") for d in ("austen", "bible", "python_docs", "chat")}
    texts = {d: [str(r["text"]) for r in rows[d]] for d in ("austen", "bible", "python_docs")}
    chats = [_chat_text(r) for r in rows["chat"]]
    step = max(1, len(chats) // (12 * scale))
    chat_blocks = ["\n\n".join(chats[i : i + 4]) for i in range(0, len(chats), step)][: 12 * scale]
    domains = [
        _spread(texts["austen"], 12 * scale),
        _spread(texts["bible"], 10 * scale),
        _spread(texts["python_docs"], 12 * scale),
        chat_blocks,
    ]
    longest = max(len(d) for d in domains)
    parts = [d[i] for i in range(longest) for d in domains if i < len(d) and d[i]]
    return "\n\n".join(parts) + "\n"


def _read(path: Path) -> list[dict[str, object]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, required=True, help="data/corpus/train")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scale", type=int, default=1)
    args = parser.parse_args()
    if "heldout" in args.corpus.parts:
        parser.error("calibrate on the training split, never on the held-out text")
    text = build(args.corpus, args.scale)
    staged = args.out.with_name(f".{args.out.name}.tmp")
    staged.write_text(text, encoding="utf-8")
    os.replace(staged, args.out)
    print(f"wrote {args.out}: {len(text)} characters")


if __name__ == "__main__":
    main()
