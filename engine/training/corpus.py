"""The training corpus: real text fetched by package name, parsed, split, written as JSONL.

Sources (see ``shared/docs/ASSETS.md``): Austen's six novels (Debian ``r-cran-janeaustenr``,
an R lazy-load DB), the King James Bible (``bible-kjv`` + ``bible-kjv-text``, dumped with
the package's own ``bible`` binary), the Python docs reST sources (``python3.11-doc``) and
chat data: the chatterbot corpus (PyPI ``chatterbot-corpus``) plus question/answer pairs from
the Python FAQ. Packages are fetched with ``apt-get download`` / ``pip download --no-deps``
into a cache folder and reused. The held-out split is fixed: the novel *Persuasion*, a few
Bible books, and doc pages / chats chosen by a stable hash of their name.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from engine.errors import EngineError
from engine.training.rdata import read_lazyload_db

DEB_PACKAGES = ("r-cran-janeaustenr", "bible-kjv", "bible-kjv-text")
DOC_PACKAGES = ("python3.11-doc", "python3.12-doc", "python3.13-doc")
PIP_PACKAGE = "chatterbot-corpus"
DOMAINS = ("austen", "bible", "python_docs", "chat")
HELDOUT_NOVEL = "persuasion"
HELDOUT_BOOKS = frozenset({"Ruth", "Jonah", "Mark", "Jas", "Phmn"})
HELDOUT_EVERY = 20  # one doc page / chat prompt in 20 is held out, by stable hash
DIALOGUE_FILES = frozenset({"conversations"})  # chatterbot files that are real dialogues

Message = dict[str, str]


class CorpusFetchError(EngineError):
    """A source package could not be fetched or unpacked (no network, no apt, ...)."""


@dataclass(frozen=True)
class Document:
    """One unit of text: a novel, a Bible book, a doc page."""

    doc_id: str
    text: str


@dataclass(frozen=True)
class Chat:
    """One conversation as chat-template messages."""

    chat_id: str
    messages: tuple[Message, ...]


@dataclass(frozen=True)
class Split:
    """Documents per text domain and chats, for one side of the split."""

    texts: dict[str, list[Document]]
    chats: list[Chat]


# ----------------------------------------------------------------------------- fetching


def _run(cmd: list[str], cwd: Path) -> None:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CorpusFetchError(f"{cmd[0]} failed: {exc}") from exc
    if done.returncode != 0:
        raise CorpusFetchError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-400:]}")


def _apt_download(name: str, pkgs: Path) -> Path:
    """``apt-get download NAME`` into ``pkgs`` unless a .deb of it is cached already."""
    cached = sorted(pkgs.glob(f"{name}_*.deb"))
    if cached:
        return cached[-1]
    try:
        _run(["apt-get", "download", name], pkgs)
    except CorpusFetchError:
        _refresh_apt_lists(pkgs)
        _run(["apt-get", "download", name], pkgs)
    return sorted(pkgs.glob(f"{name}_*.deb"))[-1]


def _refresh_apt_lists(cwd: Path) -> None:
    """``apt-get update`` (needs root); a failure is left to the retried download to report."""
    with contextlib.suppress(CorpusFetchError):
        _run(["apt-get", "update"], cwd)


def _doc_download(pkgs: Path) -> Path:
    """The first Python docs package the archive has (Debian and Ubuntu differ)."""
    errors = []
    for name in DOC_PACKAGES:
        try:
            return _apt_download(name, pkgs)
        except CorpusFetchError as exc:
            errors.append(str(exc))
    raise CorpusFetchError("no Python docs package could be fetched: " + "; ".join(errors))


def _pip_download(pkgs: Path) -> Path:
    cached = sorted(pkgs.glob("chatterbot_corpus-*.whl"))
    if not cached:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(pkgs)]
        _run([*pip, PIP_PACKAGE], pkgs)
        cached = sorted(pkgs.glob("chatterbot_corpus-*.whl"))
    return cached[-1]


def fetch_sources(cache: Path) -> Path:
    """Fetch and unpack every source package under ``cache``; returns the unpacked root."""
    cache = cache.resolve()
    pkgs, root = cache / "pkgs", cache / "unpacked"
    pkgs.mkdir(parents=True, exist_ok=True)
    debs = [_apt_download(name, pkgs) for name in DEB_PACKAGES] + [_doc_download(pkgs)]
    wheel = _pip_download(pkgs)
    stamp = root / ".complete"
    wanted = "\n".join(sorted(p.name for p in [*debs, wheel]))
    if stamp.is_file() and stamp.read_text() == wanted:
        return root
    root.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(root)], cache)
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(root / "pip")
    stamp.write_text(wanted)
    return root


# ----------------------------------------------------------------------------- parsing


def unwrap_paragraphs(lines: Iterable[str]) -> str:
    """Join hard-wrapped lines into paragraphs separated by one blank line."""
    paragraphs, current = [], []
    for line in lines:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def read_austen(root: Path) -> dict[str, str]:
    """Novel name -> text, from the janeaustenr lazy-load database."""
    rdx = next(root.glob("usr/lib/R/site-library/janeaustenr/data/Rdata.rdx"))
    objects = read_lazyload_db(rdx)
    return {name: unwrap_paragraphs(o.value) for name, o in objects.items()}


_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def read_bible(root: Path) -> dict[str, str]:
    """Book abbreviation -> text (one verse per line, ``chapter:verse text``)."""
    binary, data_dir = root / "usr/bin/bible", root / "usr/lib"
    cmd = [str(binary), "-p", str(data_dir), "-f", "-l", "0", "gen1:1-rev22:21"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise CorpusFetchError(f"could not dump the Bible with {binary}: {exc}") from exc
    books: dict[str, list[str]] = {}
    for line in out.stdout.splitlines():
        match = _VERSE.match(line)
        if match:
            book, chapter, verse, text = match.groups()
            books.setdefault(book, []).append(f"{chapter}:{verse} {text}")
    return {book: "\n".join(verses) for book, verses in books.items()}


_ROLE = re.compile(r":[a-z:]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]+>`_+")


def clean_rest(text: str) -> str:
    """Light reST clean-up: ``:func:`len``` -> ``len``, ```text <url>`_`` -> ``text``."""
    text = _ROLE.sub(lambda m: f"``{m.group(1).strip()}``", text)
    return _LINK.sub(lambda m: m.group(1), text)


def _docs_sources(root: Path) -> Path:
    found = sorted(root.glob("usr/share/doc/python3.*/html/_sources"))
    if not found:
        raise CorpusFetchError(f"no Python docs sources under {root}")
    return found[0]


def read_python_docs(root: Path) -> dict[str, str]:
    """Page path -> cleaned reST text, without the FAQ (used as chat) and the changelog."""
    sources = _docs_sources(root)
    pages = {}
    for path in sorted(sources.rglob("*.rst.txt")):
        rel = path.relative_to(sources).as_posix()
        if rel.startswith(("faq/", "whatsnew/changelog")):
            continue
        pages[rel] = clean_rest(path.read_text(encoding="utf-8", errors="replace"))
    return pages


_UNDERLINE = re.compile(r"^([-=~^\"'*+#])\1{3,}\s*$")


def faq_pairs(text: str, max_chars: int = 700) -> Iterator[tuple[str, str]]:
    """(question heading, first answer paragraphs) from one FAQ page."""
    lines = clean_rest(text).splitlines()
    heads = [i for i in range(1, len(lines)) if _UNDERLINE.match(lines[i]) and lines[i - 1].strip()]
    for n, i in enumerate(heads):
        if not lines[i - 1].strip().endswith("?"):
            continue
        end = heads[n + 1] - 1 if n + 1 < len(heads) else len(lines)
        answer = _first_paragraphs(lines[i + 1 : end], max_chars)
        if answer:
            yield lines[i - 1].strip(), answer


def _first_paragraphs(lines: list[str], max_chars: int) -> str:
    body = [ln for ln in lines if not ln.startswith(("..", "   :"))]
    paragraphs = [p for p in unwrap_paragraphs(body).split("\n\n") if not _is_markup(p)]
    answer = ""
    for paragraph in paragraphs:
        if answer and len(answer) + len(paragraph) > max_chars:
            break
        answer = f"{answer}\n\n{paragraph}" if answer else paragraph
    return answer[: max_chars * 2]


def _is_markup(paragraph: str) -> bool:
    return bool(_UNDERLINE.match(paragraph)) or paragraph.startswith((".. ", "::"))


def read_faq_chats(root: Path) -> list[Chat]:
    """Python FAQ questions and answers as one-exchange chats."""
    chats = []
    for path in sorted((_docs_sources(root) / "faq").glob("*.rst.txt")):
        for question, answer in faq_pairs(path.read_text(encoding="utf-8", errors="replace")):
            messages = (
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            )
            chats.append(Chat(f"faq/{path.name}:{question}", messages))
    return chats


def chatterbot_chats(name: str, conversations: list[list[str]]) -> list[Chat]:
    """Chatterbot lists as chats: real dialogues alternate; others list alternative answers."""
    chats = []
    for n, conv in enumerate(conversations):
        turns = [str(t).strip() for t in conv if str(t).strip()]
        if len(turns) < 2:
            continue
        if name in DIALOGUE_FILES:
            roles = ("user", "assistant") * len(turns)
            msgs = tuple({"role": r, "content": t} for r, t in zip(roles, turns, strict=False))
            chats.append(Chat(f"chatterbot/{name}/{n}:{turns[0]}", msgs))
            continue
        for k, answer in enumerate(turns[1:]):
            msgs = ({"role": "user", "content": turns[0]}, {"role": "assistant", "content": answer})
            chats.append(Chat(f"chatterbot/{name}/{n}.{k}:{turns[0]}", msgs))
    return chats


def read_chatterbot(root: Path) -> list[Chat]:
    """Every English chatterbot conversation file as chats."""
    chats = []
    for path in sorted((root / "pip").glob("chatterbot_corpus/data/english/*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        chats.extend(chatterbot_chats(path.stem, data.get("conversations") or []))
    return chats


# ----------------------------------------------------------------------------- splitting


def stable_bucket(key: str) -> int:
    """A platform-independent hash bucket in ``[0, HELDOUT_EVERY)``."""
    return zlib.crc32(key.encode("utf-8")) % HELDOUT_EVERY


def chat_prompt_key(chat: Chat) -> str:
    """Chats are split by their first user message, so a prompt never sits on both sides."""
    return chat.messages[0]["content"].strip().lower()


def is_heldout(domain: str, key: str) -> bool:
    """The fixed rule deciding which side of the split an item is on."""
    if domain == "austen":
        return key == HELDOUT_NOVEL
    if domain == "bible":
        return key in HELDOUT_BOOKS
    return stable_bucket(key) == 0


def split_corpus(texts: dict[str, dict[str, str]], chats: list[Chat]) -> tuple[Split, Split]:
    """(train, heldout) by :func:`is_heldout`."""
    train = Split({d: [] for d in texts}, [])
    held = Split({d: [] for d in texts}, [])
    for domain, docs in texts.items():
        for key, text in docs.items():
            side = held if is_heldout(domain, key) else train
            side.texts[domain].append(Document(key, text))
    for chat in chats:
        (held if is_heldout("chat", chat_prompt_key(chat)) else train).chats.append(chat)
    return train, held


def write_split(split: Split, folder: Path) -> dict[str, int]:
    """Write ``<domain>.jsonl`` files; returns characters per domain."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for domain, docs in split.texts.items():
        rows: list[dict[str, Any]] = [{"id": d.doc_id, "text": d.text} for d in docs]
        sizes[domain] = _write_jsonl(folder / f"{domain}.jsonl", rows)
    rows = [{"id": c.chat_id, "messages": list(c.messages)} for c in split.chats]
    sizes["chat"] = _write_jsonl(folder / "chat.jsonl", rows)
    return sizes


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> int:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return sum(len(str(r.get("text", r.get("messages", "")))) for r in rows)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file written by :func:`write_split`."""
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def build_corpus(cache: Path) -> dict[str, dict[str, int]]:
    """Fetch, parse, split and write ``cache/corpus/{train,heldout}``; returns sizes."""
    root = fetch_sources(cache)
    texts = {
        "austen": read_austen(root),
        "bible": read_bible(root),
        "python_docs": read_python_docs(root),
    }
    chats = read_chatterbot(root) + read_faq_chats(root)
    train, held = split_corpus(texts, chats)
    out = cache / "corpus"
    return {
        "train": write_split(train, out / "train"),
        "heldout": write_split(held, out / "heldout"),
    }
