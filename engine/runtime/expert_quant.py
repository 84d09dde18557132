"""``--expert-quant``: a safetensors model's routed experts quantized at load, cached on disk.

The schemes are GGML block formats, so quantized experts share everything with GGUF files:
``QuantizedExpertShape`` rows, device decoding (``engine.quant.ggml_blocks``), byte counts.
``int8`` is Q8_0 (groups of 32 along the input dimension, one fp16 scale, symmetric, written
by ``gguf``'s encoder exactly as llama.cpp writes it) and ``int4`` is Q4_1 (groups of 32, fp16
scale and minimum: asymmetric round-to-nearest). Both take any row length that is a multiple of
32. Why these and not other group sizes: ``docs/QUANTIZED_EXPERTS.md`` has the measurement.

Quantizing reads one layer's experts at full precision at a time (one layer of float experts in
RAM at most), encodes each expert's ``gate_up`` and ``down`` and fills the quantized store. The
result is written once to ``<user data>/quantized-experts/<key>.safetensors`` (atomic), keyed by
the checkpoint files (path, size, mtime), the scheme and the layout, so the next load reads the
blocks back instead of quantizing again. A cache file that does not match is ignored and
rewritten. The file is written layer by layer (``write_rows``: header first, then each layer as
it comes), so with ``--mmap-experts`` the experts are quantized straight into it and the mapped
file becomes the host tier (``mapped_quantized_store``): no quantized experts in RAM at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType
from safetensors import safe_open

from engine.atomic import atomic_path
from engine.errors import ModelLoadError
from engine.offload.mapped import MappedRowsStore
from engine.offload.store import ExpertPart, ExpertShape, HostExpertStore, QuantizedExpertShape
from engine.paths import user_data_dir
from engine.quant.ggml_blocks import block_geometry
from engine.quant.ggml_encode import encode

SCHEMES: dict[str, int] = {"int8": GGMLQuantizationType.Q8_0, "int4": GGMLQuantizationType.Q4_1}
CACHE_FORMAT = "understudy-expert-quant-1"
SlotKey = tuple[int, int]


def quantized_shape(
    hidden: int, intermediate: int, dtype: torch.dtype, scheme: str
) -> QuantizedExpertShape:
    """The row layout of one expert in ``scheme``; ``ValueError`` when a row is not 32-wide."""
    qtype = SCHEMES[scheme]
    return QuantizedExpertShape(hidden, intermediate, dtype, qtype, qtype, qtype)


def quantized_bytes(float_numel: int, scheme: str) -> int:
    """Bytes ``float_numel`` expert weights take in ``scheme`` (before row alignment)."""
    block, size = block_geometry(SCHEMES[scheme])
    return -(-float_numel // block) * size


def cache_dir() -> Path:
    return user_data_dir() / "quantized-experts"


def cache_key(files: Sequence[Path], scheme: str, shape: QuantizedExpertShape, layers: int) -> str:
    """Changes whenever a checkpoint file, the scheme or the layout changes."""
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(files)]
    layout = [CACHE_FORMAT, scheme, shape.hidden, shape.intermediate, shape.numel, layers]
    digest = hashlib.sha256(json.dumps([stats, layout]).encode("utf-8")).hexdigest()
    return digest[:24]


def _read_cache(path: Path, store: HostExpertStore, key: str) -> bool:
    """Fill ``store`` from a cache file, one layer in RAM at a time; False when it does not
    match or cannot be read (the caller then quantizes every layer again)."""
    buffers = dict(zip(store.layers, store.buffers(), strict=True))  # each [E, numel]
    expected = [store.num_experts, store.shape.numel]
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            if (handle.metadata() or {}).get("key") != key:
                return False
            if any(handle.get_slice(_name(la)).get_shape() != expected for la in buffers):
                return False
            for layer, buffer in buffers.items():
                buffer.copy_(handle.get_tensor(_name(layer)))
    except Exception:  # a damaged or foreign cache file is only a cache miss
        return False
    return True


def _name(layer: int) -> str:
    return f"layer.{layer}"


def _header(key: str, layers: Sequence[int], rows: tuple[int, int]) -> bytes:
    """A safetensors header for one ``rows`` uint8 tensor per layer, in ``layers``' order."""
    size = rows[0] * rows[1]
    entries: dict[str, object] = {"__metadata__": {"key": key, "format": CACHE_FORMAT}}
    for i, layer in enumerate(layers):
        entries[_name(layer)] = {
            "dtype": "U8", "shape": list(rows), "data_offsets": [i * size, (i + 1) * size],
        }  # fmt: skip
    text = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text


def write_rows(
    path: Path, key: str, layers: Sequence[int], rows: tuple[int, int],
    layer_rows: Callable[[int], torch.Tensor],
) -> None:  # fmt: skip
    """Write the cache file layer by layer (atomic): ``layer_rows(layer)`` gives one layer's
    ``rows`` uint8 tensor only when it is written, so one layer is in RAM at a time."""
    with atomic_path(path) as staged, staged.open("wb") as handle:
        handle.write(_header(key, layers, rows))
        for layer in layers:
            data = layer_rows(layer)
            assert data.shape == rows and data.dtype == torch.uint8, "a layer's rows, as bytes"
            handle.write(data.contiguous().numpy().data)


def _write_cache(path: Path, store: HostExpertStore, key: str) -> None:
    buffers = dict(zip(store.layers, store.buffers(), strict=True))  # each [E, numel]
    rows = (store.num_experts, store.shape.numel)
    with contextlib.suppress(OSError):  # a full disk costs the cache, not the load
        write_rows(path, key, store.layers, rows, buffers.__getitem__)


def _quantize_layer(
    layer: int,
    parts: Mapping[SlotKey, Sequence[ExpertPart]],
    store: HostExpertStore,
) -> None:
    shape = store.shape
    assert isinstance(shape, QuantizedExpertShape), "a quantized store holds quantized rows"
    floats = ExpertShape(shape.hidden, shape.intermediate, torch.float32)
    scratch = HostExpertStore(floats, [layer], store.num_experts, pin=False)
    scratch.fill({k: v for k, v in parts.items() if k[0] == layer}, lambda done, total: None)
    for expert in range(store.num_experts):
        source, target = scratch.row((layer, expert)), store.row((layer, expert))
        for part, weights in (("gate_up", floats.gate_up(source)), ("down", floats.down(source))):
            qtype = shape.gate_type if part == "gate_up" else shape.down_type
            packed = encode(weights.numpy(), qtype).reshape(-1)
            shape.part_view(target, part).copy_(torch.from_numpy(np.ascontiguousarray(packed)))  # type: ignore[arg-type]
    scratch.close()


def fill_quantized_store(
    parts: Mapping[SlotKey, Sequence[ExpertPart]],
    files: Sequence[Path],
    store: HostExpertStore,
    scheme: str,
    on_layer: Callable[[int, int, bool], None],
) -> bool:
    """Fill ``store`` with quantized experts, from the cache when it matches; True on a hit.

    ``on_layer(done, total, from_cache)`` is called after each layer (cancellation hook).
    """
    shape = store.shape
    assert isinstance(shape, QuantizedExpertShape), "a quantized store holds quantized rows"
    key = cache_key(files, scheme, shape, len(store.layers))
    path = cache_dir() / f"{key}.safetensors"
    if path.is_file() and _read_cache(path, store, key):
        on_layer(len(store.layers), len(store.layers), True)
        return True
    for done, layer in enumerate(store.layers, start=1):
        _quantize_layer(layer, parts, store)
        on_layer(done, len(store.layers), False)
    _write_cache(path, store, key)
    return False


def _quantized_layer(
    layer: int,
    parts: Mapping[SlotKey, Sequence[ExpertPart]],
    shape: QuantizedExpertShape,
    num_experts: int,
) -> torch.Tensor:
    """One layer's experts quantized, ``[E, numel]`` uint8 (the only quantized layer in RAM)."""
    store = HostExpertStore(shape, [layer], num_experts, pin=False)
    _quantize_layer(layer, parts, store)
    rows = store.buffers()[0].clone()
    store.close()
    return rows


def _map_cache(
    path: Path, key: str, shape: QuantizedExpertShape, layers: Sequence[int], num_experts: int
) -> MappedRowsStore | None:
    """The cache file mapped as the host tier; None when it is missing, foreign or damaged."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            if (handle.metadata() or {}).get("key") != key:
                return None
        return MappedRowsStore(path, shape, layers, num_experts, {la: _name(la) for la in layers})
    except Exception:  # a damaged or foreign cache file is only a cache miss
        return None


def mapped_quantized_store(
    parts: Mapping[SlotKey, Sequence[ExpertPart]],
    files: Sequence[Path],
    shape: QuantizedExpertShape,
    layers: Sequence[int],
    num_experts: int,
    scheme: str,
    on_layer: Callable[[int, int, bool], None],
) -> MappedRowsStore:
    """``--mmap-experts`` with ``--expert-quant``: the cache file, mapped, is the host tier.

    On a miss the experts are quantized layer by layer straight into the cache file (one float
    layer and one quantized layer in RAM at a time), which is then mapped. A file that cannot be
    written is an error here (there is nothing else to map), with the path in the message.
    """
    key = cache_key(files, scheme, shape, len(layers))
    path = cache_dir() / f"{key}.safetensors"
    store = _map_cache(path, key, shape, layers, num_experts)
    if store is not None:
        on_layer(len(layers), len(layers), True)
        return store
    done = 0

    def layer_rows(layer: int) -> torch.Tensor:
        nonlocal done
        rows = _quantized_layer(layer, parts, shape, num_experts)
        done += 1
        on_layer(done, len(layers), False)
        return rows

    try:
        write_rows(path, key, layers, (num_experts, shape.numel), layer_rows)
    except OSError as error:
        raise ModelLoadError(
            f"cannot write the quantized experts to {path}: {error}. Free disk space there, or "
            "load without --mmap-experts (the quantized experts then stay in RAM)"
        ) from error
    store = _map_cache(path, key, shape, layers, num_experts)
    if store is None:
        raise ModelLoadError(f"the quantized experts written to {path} cannot be read back")
    return store
