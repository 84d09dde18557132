"""Write ggml's own encodings of small test arrays, for tests/data/ggml_reference_blocks.npz.

``python scripts/ggml_reference_blocks.py --lib DIR/libggml-base.so --out FILE.npz`` calls
``ggml_quantize_chunk`` (the function ``llama-quantize`` calls for every tensor; without an
importance matrix it runs the ``quantize_row_*_ref`` reference quantizers) through ctypes on a
fixed set of float rows and saves, per block type, the input rows and ggml's bytes: once
without an importance matrix (``TYPE``) and once with the fixed importance row of
:func:`sample_importance` (``TYPE_imatrix``: the ``quantize_row_*_impl`` searches that
``llama-quantize --imatrix`` runs). The library
comes from ``scripts/build-llamacpp.sh`` (``build/bin/libggml-base.so``). The fast test
``tests/engine/test_ggml_reference.py`` checks that ``engine.quant.ggml_encode`` writes the
same bytes, so it needs no llama.cpp build; this script is how the fixture was made.
"""

from __future__ import annotations

import argparse
import ctypes
import os
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q

TYPES = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K)
COLS = 512


def sample_rows(seed: int = 0) -> np.ndarray:
    """fp32 [rows, 512]: Gaussian rows at several scales, plus the cases quantizers branch on."""
    generator = np.random.default_rng(seed)
    gaussian = generator.standard_normal((12, COLS)).astype(np.float32)
    spreads = [1e-3, 1e-2, 0.05, 0.1, 1, 30, 1, 1, 0.02, 1, 5, 1]
    gaussian *= np.float32(spreads)[:, None]
    edges = np.zeros((8, COLS), dtype=np.float32)
    edges[1] = 0.25  # constant positive: min clamps to 0
    edges[2] = -0.5  # constant negative: max == min
    edges[3] = np.abs(generator.standard_normal(COLS)) + 0.1  # all positive
    edges[4] = -np.abs(generator.standard_normal(COLS))  # all non-positive
    edges[5] = generator.standard_normal(COLS) * 0.01
    edges[5, ::37] = 3.0  # outliers
    edges[6] = generator.standard_normal(COLS)
    edges[6, :16] = 1e-20  # a sub-block far below the others' scale
    edges[6, 256:288] = 0.0  # a zero sub-block inside a non-zero super-block
    edges[7] = np.round(generator.standard_normal(COLS) * 4) / 8  # ties in rounding
    heavy = (generator.standard_t(3, (4, COLS)) * 0.05).astype(np.float32)
    return np.concatenate([gaussian, edges, heavy])


def sample_importance(seed: int = 0) -> np.ndarray:
    """fp32 [512] importance weights: log-normal like real mean squared activations, with a
    32-wide run of near-zero weights, exact zeros, and a few dominant columns."""
    generator = np.random.default_rng(seed + 1000)
    importance = np.exp(generator.standard_normal(COLS) * 1.5).astype(np.float32)
    importance[96:128] = 1e-12
    importance[::53] = 0.0
    importance[7::101] *= 1e3
    return importance


def ggml_encode(
    lib: ctypes.CDLL, rows: np.ndarray, qtype: int, row_bytes: int,
    importance: np.ndarray | None = None,
) -> np.ndarray:  # fmt: skip
    """ggml's bytes [rows, row_bytes] for fp32 ``rows`` (with ``importance`` [cols] if given)."""
    source = np.ascontiguousarray(rows, dtype=np.float32)
    weights = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    out = np.zeros((rows.shape[0], row_bytes), dtype=np.uint8)
    lib.ggml_quantize_chunk(
        ctypes.c_int(int(qtype)), source.ctypes.data_as(ctypes.c_void_p),
        out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(0),
        ctypes.c_int64(rows.shape[0]), ctypes.c_int64(rows.shape[1]),
        None if weights is None else weights.ctypes.data_as(ctypes.c_void_p),
    )  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", type=Path, required=True, help="path of libggml-base.so")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    lib = ctypes.CDLL(str(args.lib))
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    rows = sample_rows()
    importance = sample_importance()
    arrays: dict[str, np.ndarray] = {"rows": rows, "importance": importance}
    for qtype in TYPES:
        row_bytes = lib.ggml_row_size(ctypes.c_int(int(qtype)), ctypes.c_int64(COLS))
        arrays[qtype.name] = ggml_encode(lib, rows, qtype, row_bytes)
        weighted = ggml_encode(lib, rows, qtype, row_bytes, importance)
        arrays[f"{qtype.name}_imatrix"] = weighted
    staged = args.out.with_name(f".{args.out.name}.tmp.npz")
    np.savez_compressed(staged, **arrays)  # type: ignore[arg-type]
    os.replace(staged, args.out)
    print(f"wrote {args.out}: {rows.shape[0]} rows x {COLS} for {', '.join(t.name for t in TYPES)}")


if __name__ == "__main__":
    main()
