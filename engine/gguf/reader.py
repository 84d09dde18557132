"""Open a GGUF model (one file, a folder holding one, or a split set) and check it before use.

``engine.gguf.header`` parses the header, metadata and tensor table (fast: vocabulary arrays are
counted, not built) and the data is memory-mapped with numpy; nothing in the file is executed.
Around it this module adds what a desktop app needs from files found on disk: typed errors with
a sentence for a damaged or hostile file, a check that every tensor's bytes lie inside its file
and are whole blocks of a known type, and discovery of split sets
(``name-00001-of-00003.gguf``), refusing a set with a part missing.

Shapes are given row-major as torch uses them (GGUF stores ``ne`` fastest-first): an expert
tensor ``ffn_gate_exps`` is ``(E, I, H)``; ``data`` is its raw bytes, ``uint8 [E, I, bytes]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import ModelLoadError
from engine.gguf.header import GgufHeader, GgufHeaderError, read_header
from engine.quant.ggml_blocks import block_geometry, is_known, type_name

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


def _read(file: Path) -> GgufHeader:
    try:
        return read_header(file)
    except GgufHeaderError as error:
        raise ModelLoadError(f"{file.name} is not a usable GGUF file: {error}") from error


def _tensors(header: GgufHeader, file: Path) -> dict[str, GgufTensor]:
    mapped = np.memmap(file, dtype=np.uint8, mode="r")
    found: dict[str, GgufTensor] = {}
    for info in header.tensors:
        if not is_known(info.qtype):
            raise ModelLoadError(
                f"{file.name}: tensor {info.name!r} has the unknown block type {info.qtype}; it "
                "may need a newer Understudy, or the file is corrupt"
            )
        shape = tuple(reversed(info.dims))  # row-major, as torch
        numel = int(np.prod(shape)) if shape else 1
        block, size = block_geometry(info.qtype)
        if numel % block or (shape and shape[-1] % block):
            raise ModelLoadError(
                f"{file.name}: tensor {info.name!r} of shape {list(shape)} is not whole "
                f"{type_name(info.qtype)} blocks: the file is corrupt"
            )
        start = header.data_start + info.offset
        end = start + numel // block * size
        if end > header.file_size:
            raise ModelLoadError(
                f"{file.name} is truncated or corrupt: tensor {info.name!r} ends at byte {end} "
                f"of a {header.file_size}-byte file"
            )
        data = mapped[start:end].reshape(*shape[:-1], -1) if shape else mapped[start:end]
        found[info.name] = GgufTensor(info.name, info.qtype, shape, data, file)
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
        header = _read(file)
        if file == files[0]:
            metadata = header.metadata
        tensors.update(_tensors(header, file))
    return GgufModel(files[0], files, metadata, tensors)


def describe_types(tensors: list[GgufTensor]) -> str:
    """``Q4_K, Q6_K``: the distinct block types of some tensors, most bytes first."""
    weight: dict[int, int] = {}
    for tensor in tensors:
        weight[tensor.qtype] = weight.get(tensor.qtype, 0) + tensor.nbytes
    return ", ".join(type_name(t) for t in sorted(weight, key=lambda t: -weight[t]))
