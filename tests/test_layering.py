"""The layering contract: ``engine/`` knows nothing of Qt or the app; ``app/`` never imports torch.

Checked on the source with ``ast`` so it holds whatever is installed, and so it fails the moment
someone adds a forbidden import at any depth of either package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "engine": ("app", "PySide6", "qasync", "shiboken6"),
    "app": ("torch", "transformers", "safetensors"),
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def violations(package: str) -> list[str]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in imported_modules(path):
            top = name.split(".")[0]
            if top in FORBIDDEN[package]:
                found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_respects_layering(package: str) -> None:
    assert (ROOT / package).is_dir(), f"{package}/ is missing"
    assert violations(package) == [], f"forbidden imports in {package}/"


def test_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import os\nfrom torch import nn\nimport PySide6.QtCore as qc\n")
    assert imported_modules(sample) >= {"torch", "PySide6.QtCore", "os"}
