"""Compare two GGUF files tensor by tensor: same names, same block types, same bytes.

``python scripts/gguf_compare.py OURS.gguf THEIRS.gguf`` prints every tensor whose block type
or bytes differ (with how many blocks differ) and a count per outcome and type; exit status 1
when anything differs. Used to check ``engine/gguf/writer.py``'s files against
``llama-quantize``'s from the same F32 file (docs/QUANTIZED_EXPERTS.md).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

import numpy as np
from gguf import GGUFReader
from gguf.constants import GGML_QUANT_SIZES


def _bytes(tensor: object) -> np.ndarray:
    return np.asarray(tensor.data).view(np.uint8).ravel()  # type: ignore[attr-defined]


def compare(ours: GGUFReader, theirs: GGUFReader) -> Counter[tuple[str, ...]]:
    """Print the differing tensors; return a count per (outcome, type[, their type])."""
    mine = {tensor.name: tensor for tensor in ours.tensors}
    other = {tensor.name: tensor for tensor in theirs.tensors}
    outcomes: Counter[tuple[str, ...]] = Counter()
    for name in sorted(mine.keys() ^ other.keys()):
        print(f"only in {'the first' if name in mine else 'the second'}: {name}")
        outcomes[("missing",)] += 1
    for name in mine.keys() & other.keys():
        a, b = mine[name], other[name]
        kind = a.tensor_type.name
        if a.tensor_type != b.tensor_type:
            print(f"type differs: {name} {kind} vs {b.tensor_type.name}")
            outcomes[("type differs", kind, b.tensor_type.name)] += 1
            continue
        x, y = _bytes(a), _bytes(b)
        if x.size == y.size and np.array_equal(x, y):
            outcomes[("equal", kind)] += 1
            continue
        size = GGML_QUANT_SIZES[a.tensor_type][1]
        differing = int((x.reshape(-1, size) != y.reshape(-1, size)).any(axis=1).sum())
        print(f"bytes differ: {name} {kind} {differing}/{x.size // size} blocks")
        outcomes[("bytes differ", kind)] += 1
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ours")
    parser.add_argument("theirs")
    args = parser.parse_args()
    outcomes = compare(GGUFReader(args.ours), GGUFReader(args.theirs))
    for key, count in sorted(outcomes.items()):
        print(" ".join(key), count)
    sys.exit(0 if set(outcomes) <= {key for key in outcomes if key[0] == "equal"} else 1)


if __name__ == "__main__":
    main()
