"""Open a GGUF model (one file, a folder holding one, or a split set) and check it before use.

``gguf``'s ``GGUFReader`` parses the header, metadata and tensor table and memory-maps the data;
nothing in the file is executed. Around it this module adds what a desktop app needs from files
found on disk: a fast check of the magic and of header counts (so a damaged or hostile file is
refused with a sentence, not an exception from deep inside numpy), a check that every tensor's
bytes lie inside its file, and discovery of split sets (``name-00001-of-00003.gguf``), refusing a
set with a part missing.

Shapes are given row-major as torch uses them (GGUF stores ``ne`` fastest-first): an expert
tensor ``ffn_gate_exps`` is ``(E, I, H)``; ``data`` is its raw bytes, ``uint8 [E, I, bytes]``.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType

from engine.errors import ModelLoadError
from engine.quant.ggml_blocks import type_name

MAGIC = b"GGUF"
HEADER_BYTES = 24  # magic, version u32, tensor count u64, metadata count u64
MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # empty name, one dim, type, offset
MIN_KV_BYTES = 8 + 1 + 4 + 1
SPLIT = re.compile(r"^(?P<stem>.*)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class GgufTensor:
    name: str
    qtype: int
    shape: tuple[int, ...]  # row-major, as torch: (E, I, H) for ffn_gate_exps
    data: np.ndarray  # raw bytes, uint8, memory-mapped
    file: Path

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))


@dataclass
class GgufModel:
    path: Path  # the first (or only) file
    files: list[Path]
    metadata: dict[str, Any]
    tensors: dict[str, GgufTensor]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def arch_value(self, key: str, default: Any = None) -> Any:
        """``{architecture}.{key}`` from the metadata."""
        return self.metadata.get(f"{self.architecture}.{key}", default)


def gguf_files_in(path: Path) -> list[Path]:
    """The GGUF file(s) ``path`` names: itself, or the one model in a folder (first split part)."""
    if path.is_file():
        return [path]
    candidates = sorted(p for p in path.glob("*.gguf") if p.is_file())
    firsts = [p for p in candidates if (m := SPLIT.match(p.name)) is None or int(m["part"]) == 1]
    return firsts


def is_gguf(path: Path) -> bool:
    """A ``.gguf`` file, or a folder with a GGUF model and no ``config.json``."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        return True
    return path.is_dir() and not (path / "config.json").exists() and bool(gguf_files_in(path))


def split_parts(first: Path) -> list[Path]:
    """All parts of the split set ``first`` begins (just ``first`` when it is not split)."""
    match = SPLIT.match(first.name)
    if match is None:
        return [first]
    count = int(match["count"])
    names = [f"{match['stem']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]
    parts = [first.with_name(name) for name in names]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise ModelLoadError(
            f"{first.name} is part of a split GGUF set of {count} files but "
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing from "
            f"{first.parent}; download the missing part(s) into the same folder"
        )
    return parts


def _check_header(file: Path) -> None:
    size = file.stat().st_size
    with file.open("rb") as handle:
        head = handle.read(HEADER_BYTES)
    if head[:4] != MAGIC:
        raise ModelLoadError(
            f"{file.name} is not a GGUF file (it starts with {head[:4]!r}, not b'GGUF')"
        )
    if len(head) < HEADER_BYTES:
        raise ModelLoadError(f"{file.name} is truncated: it ends inside the GGUF header")
    version, tensors, entries = struct.unpack("<IQQ", head[4:])
    if version not in (2, 3):
        raise ModelLoadError(f"{file.name} is GGUF version {version}; versions 2 and 3 are read")
    if tensors * MIN_TENSOR_INFO_BYTES + entries * MIN_KV_BYTES > size:
        raise ModelLoadError(
            f"{file.name} declares {tensors} tensors and {entries} metadata entries, more than "
            f"a file of {size} bytes can hold: the header is corrupt"
        )


def _read(file: Path) -> GGUFReader:
    _check_header(file)
    try:
        return GGUFReader(file)
    except (ValueError, IndexError, struct.error, OverflowError, MemoryError) as error:
        if "GGMLQuantizationType" in str(error):
            raise ModelLoadError(
                f"{file.name} has a tensor of an unknown block type ({error}); it may need a "
                "newer Understudy, or the file is corrupt"
            ) from error
        raise ModelLoadError(
            f"{file.name} is truncated or corrupt: its metadata or a tensor's data lies past "
            f"the end of the file ({error})"
        ) from error


def _field_value(field: Any) -> Any:
    types = list(field.types)
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY:
        if len(types) > 1 and types[1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    value = field.parts[field.data[0]]
    if types[0] == GGUFValueType.STRING:
        return bytes(value).decode("utf-8", "replace")
    return value.tolist()[0]


def _tensors(reader: GGUFReader, file: Path) -> dict[str, GgufTensor]:
    size = file.stat().st_size
    found: dict[str, GgufTensor] = {}
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size or tensor.data.nbytes != int(tensor.n_bytes):
            raise ModelLoadError(
                f"{file.name} is truncated or corrupt: tensor {tensor.name!r} ends at byte {end} "
                f"of a {size}-byte file"
            )
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        data = tensor.data.view(np.uint8).reshape(*shape[:-1], -1) if shape else tensor.data
        found[tensor.name] = GgufTensor(tensor.name, int(tensor.tensor_type), shape, data, file)
    return found


def open_gguf(path: Path) -> GgufModel:
    """Read and check the GGUF model at ``path`` (file or folder); typed errors for bad files."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path} does not exist")
    firsts = gguf_files_in(path)
    if not firsts:
        raise ModelLoadError(f"{path} holds no .gguf file")
    if len(firsts) > 1:
        names = ", ".join(p.name for p in firsts[:4])
        raise ModelLoadError(f"{path} holds several GGUF models ({names}); choose one file")
    files = split_parts(firsts[0])
    metadata: dict[str, Any] = {}
    tensors: dict[str, GgufTensor] = {}
    for file in files:
        reader = _read(file)
        if file == files[0]:
            metadata = {name: _field_value(field) for name, field in reader.fields.items()}
        tensors.update(_tensors(reader, file))
    return GgufModel(files[0], files, metadata, tensors)


def describe_types(tensors: list[GgufTensor]) -> str:
    """``Q4_K, Q6_K``: the distinct block types of some tensors, most bytes first."""
    weight: dict[int, int] = {}
    for tensor in tensors:
        weight[tensor.qtype] = weight.get(tensor.qtype, 0) + tensor.nbytes
    return ", ".join(type_name(t) for t in sorted(weight, key=lambda t: -weight[t]))
