"""The repo's GGML encoders write the bytes ggml's reference quantizers write, block for block.

``tests/data/ggml/reference_blocks.npz`` holds fixed float rows (Gaussian at several scales,
constant, all-positive, all-negative, outliers, a zero and a near-zero sub-block, rounding ties) and
the blocks ggml's ``ggml_quantize_chunk`` made of them (what ``llama-quantize`` calls), without an
importance matrix (``TYPE``) and with a fixed importance row (``TYPE_imatrix``), written by
``scripts/ggml_reference_blocks.py`` from llama-cpp-python 0.3.36's llama.cpp on x86-64. The fast
tests need no llama.cpp build; the slow one re-checks fresh rows against the library when
``scripts/build-llamacpp.sh`` has built it.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from engine.quant.ggml_encode import encode
from engine.quant.ggml_kquant import seq_sum
from tests.helpers.llamacpp_build import BIN

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = np.load(ROOT / "tests" / "data" / "ggml" / "reference_blocks.npz")
TYPES = [name for name in FIXTURE.files if name not in ("rows", "importance")]
PLAIN = [name for name in TYPES if not name.endswith("_imatrix")]
LIB = BIN / "libggml-base.so"


def _first_difference(ours: np.ndarray, theirs: np.ndarray) -> str:
    rows = np.nonzero((ours != theirs).any(axis=1))[0]
    if not rows.size:
        return "none"
    column = int(np.nonzero(ours[rows[0]] != theirs[rows[0]])[0][0])
    return f"{rows.size} rows differ; first: row {rows[0]}, byte {column}"


def _encode(rows: np.ndarray, name: str, importance: np.ndarray) -> np.ndarray:
    """Our bytes for a fixture entry: ``TYPE`` plain, ``TYPE_imatrix`` with ``importance``."""
    qtype, weighted = Q[name.removesuffix("_imatrix")], name.endswith("_imatrix")
    return encode(rows, qtype, importance if weighted else None).reshape(rows.shape[0], -1)


def test_fixture_covers_every_type_the_writer_uses() -> None:
    types = {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"}
    assert set(TYPES) >= types | {f"{name}_imatrix" for name in types}


@pytest.mark.parametrize("name", TYPES)
def test_encoder_equals_ggml_bit_for_bit(name: str) -> None:
    rows = FIXTURE["rows"]
    ours = _encode(rows, name, FIXTURE["importance"])
    theirs = FIXTURE[name]
    assert ours.shape == theirs.shape, f"{name}: row bytes {ours.shape} vs ggml {theirs.shape}"
    assert np.array_equal(ours, theirs), f"{name}: {_first_difference(ours, theirs)}"


def _relative_error(rows: np.ndarray, qtype: Q) -> float:
    decoded = dequantize(encode(rows, qtype), qtype).reshape(rows.shape)
    return float(np.mean((decoded - rows) ** 2 / np.var(rows, axis=1, keepdims=True)))


@pytest.mark.parametrize(("k_quant", "legacy"), [("Q4_K", "Q4_1"), ("Q5_K", "Q5_0")])
def test_k_quant_search_beats_the_legacy_type(k_quant: str, legacy: str) -> None:
    """ggml's scale search makes the K-quant more exact than the legacy type with more bits."""
    rows = FIXTURE["rows"][:12]  # the Gaussian rows
    ours, theirs = _relative_error(rows, Q[k_quant]), _relative_error(rows, Q[legacy])
    assert ours < theirs, f"{k_quant} error {ours:.2e} is not below {legacy}'s {theirs:.2e}"


@pytest.mark.parametrize("name", [n for n in PLAIN if n != "Q8_0"])
def test_importance_changes_the_blocks_and_lowers_the_weighted_error(name: str) -> None:
    """The weighted search trades error on unimportant columns for error on important ones."""
    rows, importance = FIXTURE["rows"][:12], FIXTURE["importance"]
    assert not np.array_equal(FIXTURE[name][:12], FIXTURE[f"{name}_imatrix"][:12])
    errors = []
    for weighted in (False, True):
        packed = encode(rows, Q[name], importance if weighted else None)
        decoded = dequantize(packed, Q[name]).reshape(rows.shape)
        errors.append(float(np.sum(importance * (decoded - rows) ** 2)))
    assert errors[1] < errors[0], f"{name}: weighted error {errors[1]:.3e} >= {errors[0]:.3e}"


def test_q8_0_ignores_the_importance_as_ggml_does() -> None:
    assert np.array_equal(FIXTURE["Q8_0"], FIXTURE["Q8_0_imatrix"])


@pytest.mark.parametrize("shape", [(7,), (2, 512), (24, 256)])
def test_importance_of_the_wrong_shape_is_refused(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="importance of shape"):
        encode(FIXTURE["rows"], Q.Q4_K, np.ones(shape, dtype=np.float32))


def test_per_row_importance_equals_one_row_at_a_time() -> None:
    """[rows, cols] importance (one expert's row per expert) equals encoding row by row."""
    rows = FIXTURE["rows"][:4]
    per_row = np.stack([FIXTURE["importance"] * (i + 1) for i in range(4)])
    together = encode(rows, Q.Q5_0, per_row)
    apart = np.concatenate([encode(rows[i : i + 1], Q.Q5_0, per_row[i]) for i in range(4)])
    assert np.array_equal(together, apart)


def test_seq_sum_adds_left_to_right_in_float32() -> None:
    values = np.float32([[1e8, 1, -1e8, 1]])
    assert seq_sum(values)[0] == np.float32(1), "1e8 + 1 rounds to 1e8 first, as in C"


def _ggml_script() -> object:
    spec = importlib.util.spec_from_file_location(
        "ggml_ref", ROOT / "scripts/ggml_reference_blocks.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(
    not LIB.is_file(),
    reason=f"no llama.cpp build at {LIB}: run scripts/build-llamacpp.sh (downloads "
    "llama-cpp-python's source from PyPI)",
)
@pytest.mark.parametrize("name", TYPES)
def test_fresh_rows_equal_the_library(name: str) -> None:
    script = _ggml_script()
    lib = ctypes.CDLL(str(LIB))
    lib.ggml_row_size.restype = ctypes.c_size_t
    rows = script.sample_rows(seed=7)  # type: ignore[attr-defined]
    qtype = Q[name.removesuffix("_imatrix")]
    importance = script.sample_importance(seed=7)  # type: ignore[attr-defined]
    given = importance if name.endswith("_imatrix") else None
    row_bytes = lib.ggml_row_size(ctypes.c_int(int(qtype)), ctypes.c_int64(rows.shape[1]))
    theirs = script.ggml_encode(lib, rows, qtype, row_bytes, given)  # type: ignore[attr-defined]
    ours = _encode(rows, name, importance)
    assert np.array_equal(ours, theirs), f"{name}: {_first_difference(ours, theirs)}"
