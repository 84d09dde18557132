"""Where ``scripts/build-llamacpp.sh`` builds llama.cpp, for the slow tests that compare with it.

``UNDERSTUDY_LLAMACPP_CACHE`` overrides the cache folder (default
``~/.cache/understudy/llama.cpp``); ``SOURCE`` is the vendored llama.cpp tree of the
llama-cpp-python source distribution, ``BIN`` its build output.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE = Path(
    os.environ.get("UNDERSTUDY_LLAMACPP_CACHE", Path.home() / ".cache/understudy/llama.cpp")
)
SOURCE = CACHE / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
BIN = SOURCE / "build" / "bin"
