"""Run llama.cpp's own ``convert_hf_to_gguf.py`` (from the built llama.cpp source tree) on a
tiny checkpoint, in a subprocess.

The converter refuses BPE tokenizers whose pre-tokenizer hash it does not list, which includes
the tests' tiny tokenizer; the runner forces the pre-tokenizer name to ``gpt-2`` (the tiny
tokenizer's ByteLevel split, the name ``engine.gguf.writer`` writes). Nothing else is changed:
tensors and metadata are the converter's.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

RUNNER = """
import runpy, sys
root = sys.argv[1]
sys.path[:0] = [root, root + "/gguf-py"]
import conversion.base as base
for cls in vars(base).values():
    if isinstance(cls, type) and "get_vocab_base_pre" in vars(cls):
        cls.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(root + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def llamacpp_convert(source_tree: Path, model_dir: Path, output: Path) -> Path:
    """``model_dir`` written as an F32 GGUF at ``output`` by llama.cpp's converter."""
    args = [str(source_tree), str(model_dir), "--outfile", str(output), "--outtype", "f32"]
    done = subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True,
                          text=True, timeout=600, check=False)  # fmt: skip
    if done.returncode != 0 or not output.is_file():
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{done.stderr[-3000:]}")
    return output
