"""The writer's routed-expert override, quant_study's ``--expert-types`` and the comparison's
switch of top-k renormalisation, on tiny models made in the test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

from engine.eval import quant_study
from engine.eval.llamacpp_compare import _estimate, without_topk_norm
from engine.gguf.writer import convert
from tests.helpers.gguf_models import WIDE, save_gguf_family
from tests.helpers.tiny_models import save_tiny_checkpoint


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("expert-type")
    save_tiny_checkpoint(root / "hf", norm_topk_prob=True, **WIDE)
    return root / "hf"


def _types(path: Path) -> dict[str, str]:
    return {tensor.name: tensor.tensor_type.name for tensor in GGUFReader(path).tensors}


def test_expert_type_forces_only_the_routed_experts(source: Path, tmp_path: Path) -> None:
    plain = _types(convert(source, tmp_path / "plain.gguf", "Q4_K_M")[0])
    forced = _types(convert(source, tmp_path / "q4_0.gguf", "Q4_K_M", expert_type="Q4_0")[0])
    experts = [name for name in plain if "_exps." in name]
    assert experts, "the tiny model has routed expert tensors"
    assert {forced[name] for name in experts} == {"Q4_0"}
    assert {plain[name] for name in experts} != {"Q4_0"}, "without the override they differ"
    others = {name: kind for name, kind in plain.items() if name not in experts}
    assert {name: forced[name] for name in others} == others, "the trunk keeps Q4_K_M's types"


def test_unknown_expert_type_is_refused_before_writing(source: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expert type must be one of"):
        convert(source, tmp_path / "bad.gguf", "Q4_K_M", expert_type="IQ2_XXS")
    assert not (tmp_path / "bad.gguf").exists()


def test_quant_study_refuses_an_unknown_expert_type(monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["quant_study", "--out", "x", "--engine-only", "--expert-types", "Q4_0,Q3_X"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stopped:
        quant_study._arguments()
    assert stopped.value.code == 2, "argparse's usage error"


def test_without_topk_norm_switches_the_flag_in_a_copy(source: Path, tmp_path: Path) -> None:
    original = convert(source, tmp_path / "norm.gguf", "Q8_0")[0]
    key = "qwen2moe.expert_weights_norm"
    field = GGUFReader(original).fields[key]
    assert bool(field.parts[field.data[0]][0]) is True, "the source renormalises"
    copy = without_topk_norm(original, tmp_path / "copy.gguf")
    field = GGUFReader(copy).fields[key]
    assert bool(field.parts[field.data[0]][0]) is False
    field = GGUFReader(original).fields[key]
    assert bool(field.parts[field.data[0]][0]) is True, "the source file is left as it was"
    assert _types(copy) == _types(original)
    assert Q.Q8_0.name in _types(copy).values()


def test_without_topk_norm_refuses_a_file_without_the_key(tmp_path: Path) -> None:
    mixtral = save_gguf_family("mixtral", tmp_path, "Q8_0")  # llama arch: no such key
    with pytest.raises(ValueError, match="expert_weights_norm"):
        without_topk_norm(mixtral, tmp_path / "copy.gguf")


def test_llama_perplexity_output_is_read_without_its_final_line() -> None:
    chunks = (
        "perplexity: calculating perplexity over 3 chunks, n_ctx=64\n[1]5.0,[2]4.5,[3]4.2500,\n"
    )
    assert _estimate(chunks + "Final estimate: PPL = 4.2500 +/- 0.1\n") == 4.25
    assert _estimate(chunks) == 4.25, "the last chunk's running value when the log line is lost"
    assert _estimate(chunks.replace("[3]4.2500,", "")) is None, "an unfinished run has none"
