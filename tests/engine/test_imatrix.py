"""Importance matrices: the arithmetic on a tiny model, llama.cpp's file formats, and the writer.

The arithmetic is checked against a plain re-computation from the same forward (the inputs each
matrix saw, captured by independent hooks, and each routed expert's ``act(gate) * up`` recomputed
by hand); the GGUF format round trip and a hand-written legacy ``.dat`` file; bad files each get a
clear ``ImatrixError``. ``test_imatrix_llamacpp.py`` checks the same against ``llama-imatrix``.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

from engine.eval import quant_study
from engine.gguf.writer import convert, row_importance, tensor_type
from engine.quant.imatrix import compute_imatrix, expert_squares, load_reference
from engine.quant.imatrix_file import ImatrixError, ImportanceMatrix, read_imatrix, write_imatrix
from tests.helpers.moe_families import save_family

CTX = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, list[int]]:
    folder = tmp_path_factory.mktemp("imatrix") / "qwen2_moe-hf"
    save_family("qwen2_moe", folder)
    model, _tokenizer = load_reference(folder)
    ids = torch.randint(3, 200, (3 * CTX + 5,), generator=torch.Generator().manual_seed(0))
    return folder, model, ids.tolist()


def _captured_inputs(model: object, ids: list[int]) -> dict[str, list[torch.Tensor]]:
    """The raw inputs of q_proj and of the experts call of layer 0, chunk by chunk."""
    seen: dict[str, list[torch.Tensor]] = {"q": [], "experts": [], "index": []}
    layer = model.model.layers[0]  # type: ignore[attr-defined]

    def on_q(_module: object, args: tuple[torch.Tensor, ...]) -> None:
        seen["q"].append(args[0].reshape(-1, args[0].shape[-1]))

    def on_experts(_module: object, args: tuple[torch.Tensor, ...]) -> None:
        seen["experts"].append(args[0])
        seen["index"].append(args[1])

    hooks = [
        layer.self_attn.q_proj.register_forward_pre_hook(on_q),
        layer.mlp.experts.register_forward_pre_hook(on_experts),
    ]
    with torch.no_grad():
        for start in range(0, len(ids) // CTX * CTX, CTX):
            model(torch.tensor([ids[start : start + CTX]]), use_cache=False)  # type: ignore[operator]
    for hook in hooks:
        hook.remove()
    return seen


def test_sums_and_counts_follow_llama_imatrix_rules(tiny: tuple[Path, object, list[int]]) -> None:
    _folder, model, ids = tiny
    matrix = compute_imatrix(model, ids, CTX)
    seen = _captured_inputs(model, ids)
    assert matrix.chunk_count == 3 and matrix.chunk_size == CTX, "the partial chunk is left out"
    q = torch.cat(seen["q"]).double()
    assert np.allclose(matrix.sums["blk.0.attn_q.weight"][0], (q * q).sum(0).numpy(), rtol=1e-6)
    assert matrix.counts["blk.0.attn_q.weight"].tolist() == [3 * CTX]
    index = torch.cat(seen["index"])
    counts = np.bincount(index.reshape(-1).numpy(), minlength=model.config.num_experts)  # type: ignore[attr-defined]
    assert matrix.counts["blk.0.ffn_down_exps.weight"].tolist() == counts.tolist()
    gate, up = matrix.sums["blk.0.ffn_gate_exps.weight"], matrix.sums["blk.0.ffn_up_exps.weight"]
    assert np.array_equal(gate, up), "gate and up see the same input"
    assert "token_embd.weight" not in matrix.sums and "output.weight" not in matrix.sums


def test_expert_squares_match_a_loop_over_token_expert_pairs() -> None:
    generator = torch.Generator().manual_seed(1)

    class Experts(torch.nn.Module):
        num_experts = 4
        gate_up_proj = torch.randn(4, 6, 5, generator=generator)
        down_proj = torch.randn(4, 5, 3, generator=generator)
        act_fn = torch.nn.SiLU()

    module = Experts()
    hidden = torch.randn(7, 5, generator=generator)
    index = torch.randint(0, 4, (7, 2), generator=generator)
    parts = {part: (squares, counts) for part, squares, counts in
             expert_squares(module, hidden, index)}  # fmt: skip
    want_in, want_down = (
        torch.zeros(4, 5, dtype=torch.float64),
        torch.zeros(4, 3, dtype=torch.float64),
    )
    for token in range(7):
        for slot in range(2):
            expert = int(index[token, slot])
            x = hidden[token].double()
            want_in[expert] += x * x
            gate, up = (module.gate_up_proj[expert].double() @ x).chunk(2)
            want_down[expert] += (torch.nn.functional.silu(gate) * up) ** 2
    assert torch.allclose(parts["gate"][0], want_in) and torch.allclose(parts["up"][0], want_in)
    assert torch.allclose(parts["down"][0], want_down, rtol=1e-5)
    assert parts["down"][1].tolist() == torch.bincount(index.reshape(-1), minlength=4).tolist()


def _matrix() -> ImportanceMatrix:
    experts = np.float32([[1, 2, 3, 4], [5, 6, 7, 8], [0, 0, 0, 0]])
    sums = {"blk.0.attn_q.weight": np.float32([[4, 8, 0, 2]]), "blk.0.ffn_up_exps.weight": experts}
    counts = {"blk.0.attn_q.weight": np.array([4]), "blk.0.ffn_up_exps.weight": np.array([2, 1, 0])}
    return ImportanceMatrix(sums, counts, 3, 512, ("calibration.txt",))


def test_gguf_format_round_trip_and_llama_quantize_weights(tmp_path: Path) -> None:
    path = write_imatrix(tmp_path / "imatrix.gguf", _matrix())
    reader = GGUFReader(path)
    assert reader.fields["general.type"].contents() == "imatrix"
    assert "general.architecture" not in reader.fields, "written as llama-imatrix writes it"
    assert {t.name: t.shape.tolist() for t in reader.tensors}[
        "blk.0.ffn_up_exps.weight.in_sum2"
    ] == [4, 3]
    back = read_imatrix(path)
    assert (back.chunk_count, back.chunk_size, back.datasets) == (3, 512, ("calibration.txt",))
    weights = back.importance()
    assert weights["blk.0.attn_q.weight"].tolist() == [1, 2, 0, 0.5]
    assert weights["blk.0.ffn_up_exps.weight"].tolist() == [[0.5, 1, 1.5, 2], [5, 6, 7, 8], [1] * 4]


def _legacy_bytes(entries: dict[str, tuple[int, list[float]]], chunks: int) -> bytes:
    out = struct.pack("<i", len(entries))
    for name, (calls, values) in entries.items():
        raw = name.encode()
        out += struct.pack(
            f"<i{len(raw)}sii{len(values)}f", len(raw), raw, calls, len(values), *values
        )
    return out + struct.pack("<i", chunks) + struct.pack("<i4s", 4, b"text")


def test_legacy_dat_is_read_as_llama_quantize_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "imatrix.dat"
    path.write_bytes(_legacy_bytes({"blk.0.attn_q.weight": (10, [20.0, 5.0])}, 10))
    matrix = read_imatrix(path)
    assert matrix.chunk_count == 10
    assert matrix.importance()["blk.0.attn_q.weight"].tolist() == [2.0, 0.5]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "truncated"),
        (b"\x05\x00\x00\x00\x03\x00\x00\x00ab", "truncated"),
        (b"\xff\xff\xff\xff", "not an imatrix file"),
        (b"\x01\x00\x00\x00\x00\x00\x01\x00", "a tensor name of"),
        (b"GGUF\x03\x00\x00\x00", "not a readable imatrix GGUF"),
    ],
)
def test_bad_files_are_refused_clearly(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.imatrix"
    path.write_bytes(content)
    with pytest.raises(ImatrixError, match=message):
        read_imatrix(path)


def test_missing_file_and_model_gguf_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ImatrixError, match="no importance-matrix file"):
        read_imatrix(tmp_path / "absent.gguf")
    path = write_imatrix(tmp_path / "m.gguf", _matrix())
    data = path.read_bytes().replace(b".in_sum2", b".other__")
    path.write_bytes(data)
    with pytest.raises(ImatrixError, match="no importance-matrix tensors"):
        read_imatrix(path)


def test_sums_without_counts_are_refused(tmp_path: Path) -> None:
    path = write_imatrix(tmp_path / "m.gguf", _matrix())
    path.write_bytes(
        path.read_bytes().replace(b"blk.0.attn_q.weight.counts", b"blk.0.attn_q.weight.countX")
    )
    with pytest.raises(ImatrixError, match="has sums but no counts"):
        read_imatrix(path)


def test_an_imatrix_for_another_model_is_refused() -> None:
    weights = {"blk.0.ffn_up_exps.weight": np.ones((3, 4), dtype=np.float32)}
    with pytest.raises(ImatrixError, match="computed for another model"):
        row_importance(weights, "blk.0.ffn_up_exps.weight", (4, 8, 4))
    rows = row_importance(weights, "blk.0.ffn_up_exps.weight", (3, 8, 4))
    assert rows is not None and rows.shape == (24, 4), "one row of weights per expert row"
    assert row_importance(weights, "token_embd.weight", (10, 4)) is None
    weights["blk.0.ffn_up_exps.weight"][1, 2] = np.nan
    with pytest.raises(ImatrixError, match="non-finite"):
        row_importance(weights, "blk.0.ffn_up_exps.weight", (3, 8, 4))


def test_q4_0_files_with_an_imatrix_keep_the_first_ffn_down_layers_in_q4_1() -> None:
    shape = (8, 32, 64)
    assert tensor_type("blk.0.ffn_down_exps.weight", shape, "Q4_0", 24, weighted=True) == Q.Q4_1
    assert tensor_type("blk.3.ffn_down_exps.weight", shape, "Q4_0", 24, weighted=True) == Q.Q4_0
    assert tensor_type("blk.0.ffn_down_exps.weight", shape, "Q4_0", 24) == Q.Q4_0
    assert tensor_type("blk.0.ffn_up_exps.weight", shape, "Q4_0", 24, weighted=True) == Q.Q4_0


def test_convert_with_an_imatrix_changes_exactly_the_weighted_tensors(
    tiny: tuple[Path, object, list[int]], tmp_path: Path
) -> None:
    folder, model, ids = tiny
    matrix = compute_imatrix(model, ids, CTX)
    plain = GGUFReader(convert(folder, tmp_path / "plain.gguf", "Q4_K_M")[0])
    weighted = GGUFReader(convert(folder, tmp_path / "imat.gguf", "Q4_K_M", imatrix=matrix)[0])
    changed = {
        a.name
        for a, b in zip(plain.tensors, weighted.tensors, strict=True)
        if not np.array_equal(np.asarray(a.data), np.asarray(b.data))
    }
    quantized = {t.name for t in plain.tensors if t.tensor_type not in (Q.F32, Q.F16, Q.Q8_0)}
    assert changed and changed <= quantized & set(matrix.sums)
    assert "blk.0.ffn_gate_exps.weight" in changed


def test_quant_study_adds_imatrix_rows_and_picks_rows_in_order(
    tiny: tuple[Path, object, list[int]], tmp_path: Path
) -> None:
    folder, model, ids = tiny
    imatrix = write_imatrix(tmp_path / "imatrix.gguf", compute_imatrix(model, ids, CTX))
    rows = quant_study._variants("Q4_1", imatrix=True)
    assert rows["Q4_K_M, experts Q4_1, imatrix"] == ("Q4_K_M", "Q4_1", True)
    assert "F32, imatrix" not in rows and "Q8_0, imatrix" not in rows, "types that ignore it"
    only = "Q4_K_M, experts Q4_1, imatrix;F32"
    files = quant_study._files(folder, tmp_path, "Q4_1", imatrix, only)
    assert list(files) == ["Q4_K_M, experts Q4_1, imatrix", "F32"]
    types = {t.name: t.tensor_type for t in GGUFReader(files[next(iter(files))]).tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == Q.Q4_1
    with pytest.raises(SystemExit, match="no rows named"):
        quant_study._files(folder, tmp_path, "", None, "Q4_K_M, imatrix")
