"""Fast checks of the installer recipes that run everywhere (no bundle is built).

The Linux ``.desktop`` file validates; the Inno Setup script preprocesses and parses for both
variants with a per-user install, shortcuts and an opt-in user-data deletion; the shell
scripts parse; the PyInstaller spec compiles, names existing paths and its helper functions
do what the bundle relies on; the icons have the sizes the installers use; the Debian
maintainer scripts leave user data alone.
"""

from __future__ import annotations

import ast
import configparser
import importlib.util
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
INSTALLERS = ROOT / "installers"
DESKTOP = INSTALLERS / "linux" / "understudy.desktop"
ISS = INSTALLERS / "windows" / "understudy.iss"
SPEC = INSTALLERS / "pyinstaller" / "understudy.spec"
ICONS = ROOT / "resources" / "icons"
PNG_SIZES = (16, 22, 24, 32, 48, 64, 128, 256, 512)
SPEC_PATH_CONSTANTS = ("ENTRY", "RESOURCES", "ICON_ICO", "ICON_ICNS")


def load_tool(name: str) -> ModuleType:
    """Import ``installers/tools/<name>.py`` (the tools folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, INSTALLERS / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


iss_check = load_tool("iss_check")


# --- Linux .desktop --------------------------------------------------------------------------


def desktop_validate(path: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("desktop-file-validate")
    if tool is None:
        pytest.skip("desktop-file-validate missing: apt-get install desktop-file-utils")
    return subprocess.run([tool, str(path)], capture_output=True, text=True, check=False)


def test_desktop_file_validates() -> None:
    result = desktop_validate(DESKTOP)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "error" not in result.stdout.lower()


def test_desktop_validator_rejects_a_broken_entry(tmp_path: Path) -> None:
    broken = tmp_path / "broken.desktop"
    broken.write_text(DESKTOP.read_text().replace("Type=Application\n", ""))
    assert desktop_validate(broken).returncode != 0


def test_desktop_file_launches_the_installed_command() -> None:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DESKTOP)
    entry = parser["Desktop Entry"]
    assert entry["Type"] == "Application"
    assert entry["Exec"] == "understudy"
    assert entry["Icon"] == "understudy"
    assert entry["Terminal"] == "false"
    assert (ICONS / "understudy.svg").is_file()


# --- Debian maintainer scripts ---------------------------------------------------------------


def make_user_data(home: Path) -> list[Path]:
    files = [
        home / ".local/share/Understudy/chats.sqlite3",
        home / ".config/Understudy/settings.json",
        home / ".local/share/Understudy/models/mine/config.json",
    ]
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("user data")
    return files


@pytest.mark.parametrize("action", ["remove", "purge"])
def test_postrm_keeps_user_data(tmp_path: Path, action: str) -> None:
    sh = shutil.which("sh")
    assert sh is not None
    home = tmp_path / "home"
    files = make_user_data(home)
    empty_path = tmp_path / "bin"
    empty_path.mkdir()  # no cache tools on PATH: the script must still succeed
    env = {"HOME": str(home), "PATH": str(empty_path), "XDG_DATA_HOME": str(home / ".local/share")}
    script = INSTALLERS / "linux" / "debian" / "postrm"
    result = subprocess.run([sh, str(script), action], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert all(path.read_text() == "user data" for path in files)


def test_maintainer_scripts_parse_and_are_executable() -> None:
    for name in ("postinst", "postrm"):
        script = INSTALLERS / "linux" / "debian" / name
        assert os.access(script, os.X_OK), f"{name} is not executable"
        assert subprocess.run(["sh", "-n", str(script)], check=False).returncode == 0


def test_control_template_has_the_required_fields() -> None:
    text = (INSTALLERS / "linux" / "debian" / "control.in").read_text()
    fields = dict(
        line.split(":", 1) for line in text.splitlines() if line and not line[0].isspace()
    )
    for key in ("Package", "Version", "Architecture", "Maintainer", "Depends", "Description"):
        assert key in fields, key
    depends = fields["Depends"]
    for lib in ("libxcb-cursor0", "libxkbcommon-x11-0", "libfontconfig1", "libegl1"):
        assert lib in depends


# --- Shell scripts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "script", ["linux/build_linux.sh", "macos/build_macos.sh"], ids=["linux", "macos"]
)
def test_build_scripts_parse(script: str) -> None:
    result = subprocess.run(
        ["bash", "-n", str(INSTALLERS / script)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert os.access(INSTALLERS / script, os.X_OK)


def test_macos_script_builds_mps_app_and_dmg() -> None:
    text = (INSTALLERS / "macos" / "build_macos.sh").read_text()
    assert "UNDERSTUDY_VARIANT=mps" in text
    assert "hdiutil create" in text
    assert "installers/pyinstaller/understudy.spec" in text


def test_linux_script_rejects_unknown_options() -> None:
    result = subprocess.run(
        ["bash", str(INSTALLERS / "linux" / "build_linux.sh"), "--bogus"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "unknown option '--bogus'" in result.stderr


def test_windows_build_script_is_balanced_and_builds_both_variants() -> None:
    text = (INSTALLERS / "windows" / "build_windows.ps1").read_text()
    for open_, close in ("{}", "()", "[]"):
        assert text.count(open_) == text.count(close), f"unbalanced {open_}{close}"
    assert "[ValidateSet('cuda', 'cpu')]" in text
    assert '"/DVariant=$Variant"' in text
    assert "installers\\pyinstaller\\understudy.spec" in text


# --- Inno Setup ------------------------------------------------------------------------------


def iss(variant: str) -> Any:
    return iss_check.check_file(ISS, {"Variant": variant})


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_iss_parses_cleanly(variant: str) -> None:
    script = iss(variant)
    assert script.problems == []
    assert script.setup["PrivilegesRequired"] == "lowest"
    assert script.setup["DefaultDirName"].startswith("{autopf}")
    assert script.setup.get("Uninstallable", "yes") != "no"
    assert variant in script.setup["OutputBaseFilename"]
    (files,) = script.entries["Files"]
    assert f"dist\\windows\\{variant}\\understudy\\*" in files["Source"]


def test_iss_variants_differ_only_where_they_should() -> None:
    cpu, cuda = iss("cpu"), iss("cuda")
    assert cpu.setup["AppId"] == cuda.setup["AppId"]  # one replaces the other
    assert cpu.setup["OutputBaseFilename"] != cuda.setup["OutputBaseFilename"]
    assert "nvcuda.dll" in cuda.code and "CudaDriverPresent()" in cuda.code
    assert "if not CudaDriverPresent()" not in cpu.code


def test_iss_has_start_menu_and_desktop_shortcuts() -> None:
    icons = {entry["Name"].split("\\")[0]: entry for entry in iss("cpu").entries["Icons"]}
    assert icons["{autoprograms}"]["Filename"] == "{app}\\understudy.exe"
    assert icons["{autodesktop}"]["Tasks"] == "desktopicon"
    tasks = [t["Name"] for t in iss("cpu").entries["Tasks"]]
    assert tasks == ["desktopicon"]


def test_iss_keeps_user_data_unless_asked() -> None:
    script = iss("cpu")
    for entry in script.entries.get("UninstallDelete", []):
        assert "{localappdata}" not in entry["Name"] and "{userappdata}" not in entry["Name"]
    assert "MB_DEFBUTTON2" in script.code  # "No" is the default answer
    assert "{param:DELETEUSERDATA|no}" in script.code  # silent uninstall keeps data
    assert "DelTree(ExpandConstant('{localappdata}\\Understudy')" in script.code


def test_iss_rejects_an_unknown_variant() -> None:
    with pytest.raises(iss_check.IssError, match="Variant must be cpu or cuda"):
        iss("rocm")


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (("PrivilegesRequired=lowest", "PrivilegesRequird=lowest"), "unknown or malformed"),
        (('Source: "{#BundleDir}\\*"; ', ""), "entry without Source"),
        (('{app}\\{#AppExe}"; Description', '{app\\{#AppExe}"; Description'), "unclosed"),
        (("  Result := True;\n", "  Result := True;\n  begin\n"), "begin/case/try"),
        (("Flags: nowait postinstall", "Flags: nowait postinstal"), "unknown flags"),
        (("understudy.ico", "missing.ico"), "does not exist"),
    ],
    ids=["setup-key", "files-source", "brace", "begin-end", "flag", "icon-file"],
)
def test_iss_checker_finds_mistakes(tmp_path: Path, edit: tuple[str, str], problem: str) -> None:
    text = ISS.read_text()
    assert edit[0] in text
    broken = tmp_path / "installers" / "windows" / "broken.iss"
    broken.parent.mkdir(parents=True)
    broken.write_text(text.replace(edit[0], edit[1], 1))
    shutil.copytree(ROOT / "resources" / "icons", tmp_path / "resources" / "icons")
    broken_script = iss_check.check_file(broken, {"Variant": "cpu"})
    assert any(problem in p for p in broken_script.problems), broken_script.problems


def test_iss_checker_command_line() -> None:
    ok = subprocess.run(
        [sys.executable, str(INSTALLERS / "tools" / "iss_check.py"), str(ISS), "Variant=cuda"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr


# --- PyInstaller spec ------------------------------------------------------------------------


def spec_constants() -> dict[str, Any]:
    tree = ast.parse(SPEC.read_text(), filename=str(SPEC))
    values: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return values


def spec_functions() -> dict[str, Any]:
    """The spec's imports, literal constants and function definitions, executed alone."""
    tree = ast.parse(SPEC.read_text(), filename=str(SPEC))
    keep: list[ast.stmt] = [
        n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom | ast.FunctionDef)
    ]
    keep += [
        n
        for n in tree.body
        if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name)
        if n.targets[0].id in spec_constants() or n.targets[0].id == "ROOT"
    ]
    namespace: dict[str, Any] = {"SPECPATH": str(SPEC.parent)}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(SPEC), "exec"), namespace)
    return namespace


def test_spec_compiles_and_names_existing_paths() -> None:
    compile(SPEC.read_text(), str(SPEC), "exec")
    constants = spec_constants()
    for name in SPEC_PATH_CONSTANTS:
        assert (ROOT / constants[name]).exists(), f"{name} = {constants[name]} is missing"
    for package in constants["PACKAGES"]:
        assert (ROOT / package / "__init__.py").is_file()


def test_spec_bundles_the_moe_families_and_tokenizers() -> None:
    modules = set(spec_functions()["transformers_modules"]())
    for family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2"):
        assert f"transformers.models.{family}.modeling_{family}" in modules
        assert f"transformers.models.{family}.configuration_{family}" in modules
    assert "transformers.models.llama.tokenization_llama" in modules
    assert "transformers.models.bert.modeling_bert" not in modules  # dense families stay lazy
    for name in sorted(modules)[:50]:
        assert importlib.util.find_spec(name.rpartition(".")[0] or name) is not None


def test_spec_lists_project_modules_without_importing_them() -> None:
    modules = spec_functions()["package_modules"]("engine")
    assert "engine" in modules and "engine.paths" in modules
    assert not any(m.endswith("__init__") or "__pycache__" in m for m in modules)


@pytest.mark.parametrize(
    ("dest", "kept"),
    [
        ("torch/lib/libtorch_cpu.so", True),
        ("nvidia/cuda_runtime/lib/libcudart.so.12", True),
        ("resources/models/understudy-mini-moe/model.safetensors", True),
        ("torch/bin/torch_shm_manager", True),
        ("torch/bin/test_api", False),
        ("torch/test/test_api", False),
        ("torch/include/ATen/ATen.h", False),
        ("torch/lib/libtorchbind_test.so", False),
        ("libcudart.so", False),
        ("PySide6/Qt/qml/QtQuick/qmldir", False),
    ],
)
def test_spec_drops_only_unused_files(dest: str, kept: bool) -> None:
    assert spec_functions()["keep"]((dest, "/src", "DATA")) is kept


def test_spec_refuses_a_variant_the_torch_build_does_not_match(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    functions = spec_functions()
    monkeypatch.setitem(functions, "torch_build", lambda: ("2.13.0+cpu", None))
    assert functions["check_variant"]("cpu")["variant"] == "cpu"
    with pytest.raises(SystemExit, match="needs a CUDA build"):
        functions["check_variant"]("cuda")
    monkeypatch.setenv("UNDERSTUDY_VARIANT", "rocm")
    with pytest.raises(SystemExit, match="choose one of"):
        functions["requested_variant"]()


# --- Icons -----------------------------------------------------------------------------------


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_icon_renders_have_every_size() -> None:
    for size in PNG_SIZES:
        assert png_size(ICONS / "png" / f"understudy-{size}.png") == (size, size)


def test_windows_and_macos_icons_are_well_formed() -> None:
    ico = (ICONS / "understudy.ico").read_bytes()
    reserved, kind, count = struct.unpack("<HHH", ico[:6])
    assert (reserved, kind) == (0, 1) and count >= 6
    icns = (ICONS / "understudy.icns").read_bytes()
    assert icns[:4] == b"icns"
    assert struct.unpack(">I", icns[4:8])[0] == len(icns)


def test_readme_documents_every_recipe() -> None:
    text = (INSTALLERS / "README.md").read_text()
    for name in ("build_linux.sh", "build_windows.ps1", "build_macos.sh", "understudy.iss"):
        assert name in text
    assert "NVIDIA driver" in text


# --- Frozen entry point ----------------------------------------------------------------------


def load_entry() -> ModuleType:
    path = INSTALLERS / "pyinstaller" / "understudy_entry.py"
    spec = importlib.util.spec_from_file_location("understudy_entry", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_entry_dispatches_engine_flag_to_the_engine_cli() -> None:
    engine_main = pytest.importorskip("engine.__main__").main
    entry = load_entry()
    main, argv = entry.pick_main(["/opt/understudy/understudy", "--engine", "inspect", "--json"])
    assert main is engine_main
    assert argv == ["/opt/understudy/understudy", "inspect", "--json"]


def test_entry_starts_the_app_by_default() -> None:
    app_main = pytest.importorskip("app.__main__").main
    main, argv = load_entry().pick_main(["understudy", "--smoke-test"])
    assert main is app_main and argv == ["understudy", "--smoke-test"]


@pytest.mark.parametrize(("returned", "code"), [(None, 0), (0, 0), (3, 3)])
def test_entry_passes_the_exit_code_on(
    monkeypatch: pytest.MonkeyPatch, returned: int | None, code: int
) -> None:
    entry = load_entry()
    seen: list[list[str]] = []

    def fake_main() -> int | None:
        seen.append(list(sys.argv))
        return returned

    monkeypatch.setattr(entry, "pick_main", lambda argv: (fake_main, [argv[0], "x"]))
    monkeypatch.setattr(sys, "argv", ["before"])
    assert entry.run(["understudy", "--engine", "x"]) == code
    assert seen == [["understudy", "x"]]


def test_spec_bundles_the_assembled_builtin_model_or_says_how_to_skip_it() -> None:
    functions = spec_functions()
    assemble = functions["assembled_model"]
    assert assemble("none") is None
    assert assemble("/built/model") == "/built/model"
    calls: list[list[str]] = []

    class FailingRun:
        @staticmethod
        def run(command: list[str], **_: Any) -> Any:
            calls.append(command)
            return type("Done", (), {"returncode": 1})()

    assemble.__globals__["subprocess"] = FailingRun
    with pytest.raises(SystemExit, match="UNDERSTUDY_BUNDLE_MODEL=none"):
        assemble("")
    assert calls and calls[0][1:4] == ["-m", "engine.training.moefy", "assemble"]
    keep = functions["keep"]
    assert keep(("resources/models/understudy-smollm2-moe/model.safetensors", "/src", "DATA"))
