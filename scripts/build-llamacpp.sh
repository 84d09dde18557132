#!/usr/bin/env bash
# Build llama.cpp's llama-perplexity, llama-tokenize, llama-quantize and llama-imatrix once, into a cache
# folder outside the repo, from the llama-cpp-python source distribution on PyPI (llama.cpp's
# source ships inside it). About 16 minutes on 2 cores. The slow test tests/engine/test_llamacpp_reference.py uses
# the result and skips, saying so, when it is absent. See docs/QUANTIZED_EXPERTS.md.
set -euo pipefail
VERSION=0.3.36
CACHE="${UNDERSTUDY_LLAMACPP_CACHE:-$HOME/.cache/understudy/llama.cpp}"
PYTHON="${PYTHON:-python3}"
SOURCE="$CACHE/llama_cpp_python-$VERSION/vendor/llama.cpp"
mkdir -p "$CACHE"
if [ ! -d "$SOURCE" ]; then
    "$PYTHON" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE"
    tar xzf "$CACHE/llama_cpp_python-$VERSION.tar.gz" -C "$CACHE"
fi
cmake -S "$SOURCE" -B "$SOURCE/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
nice cmake --build "$SOURCE/build" -j"$(nproc)" --target llama-perplexity llama-tokenize \
    llama-quantize llama-imatrix
echo "built: $SOURCE/build/bin"
