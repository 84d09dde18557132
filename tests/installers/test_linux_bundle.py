"""The Linux installer end to end (slow: builds the real PyInstaller bundle, several minutes).

``installers/linux/build_linux.sh`` builds the bundle, the ``.deb`` and the tarball into a
temporary folder; the ``.deb`` is unpacked into a temporary root with ``dpkg -x``; the
installed ``.desktop`` file is validated with ``desktop-file-validate``; the installed app is
launched headless (offscreen Qt, a fresh temporary HOME and XDG folders, no network namespace
where ``unshare`` allows it) with ``--smoke-test --require-model`` and must report the
built-in model loaded and exit 0, then once more in a real X11 window under Xvfb (the xcb
plugin and the system libraries it needs); the installed engine CLI must chat with the
built-in model.

Run it with ``python -m pytest -m slow tests/installers/test_linux_bundle.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "installers" / "linux" / "build_linux.sh"
BUILTIN_MODEL = ROOT / "resources" / "models" / "understudy-mini-moe"
BUILD_TIMEOUT_S = 3600
LAUNCH_TIMEOUT_S = 600
ICON_SIZES = (16, 22, 24, 32, 48, 64, 128, 256, 512)
XCB_PLUGIN = "opt/understudy/_internal/PySide6/Qt/plugins/platforms/libqxcb.so"
XCB_APT_PACKAGES = "xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-cursor0 libxkbcommon-x11-0"


def missing_prerequisite() -> str | None:
    """Why the bundle cannot be built and launched here, or None."""
    if not sys.platform.startswith("linux"):
        return "the Linux bundle is built on Linux only"
    for tool in ("dpkg-deb", "dpkg", "desktop-file-validate"):
        if shutil.which(tool) is None:
            return f"{tool} missing: apt-get install -y dpkg desktop-file-utils"
    for entry in ("app/__main__.py", "engine/__main__.py"):
        if not (ROOT / entry).is_file():
            return f"{entry} is not in the repository yet"
    if not (BUILTIN_MODEL / "config.json").is_file():
        return f"the built-in model is not in {BUILTIN_MODEL.relative_to(ROOT)} yet"
    return None


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Run the one-command build into a temporary folder; yield the output folder."""
    reason = missing_prerequisite()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("linux-build")
    out, work = base / "dist", base / "work"
    env = {**os.environ, "PYTHON": sys.executable, "COMPRESS_LEVEL": "1"}  # fast packaging
    env.setdefault("UNDERSTUDY_BUNDLE_MODEL", "none")  # no 98 MB fetch: the small model loads
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--out", str(out), "--work", str(work)],
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    print("".join(line + "\n" for line in result.stdout.splitlines() if "[build_linux]" in line))
    shutil.rmtree(work, ignore_errors=True)  # PyInstaller's scratch files are not needed now
    yield out
    shutil.rmtree(base, ignore_errors=True)  # about 2 GB: do not leave it in the temp folder


@pytest.fixture(scope="module")
def deb(built: Path) -> Path:
    (package,) = built.glob("understudy_*.deb")
    return package


@pytest.fixture(scope="module")
def installed(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The ``.deb`` unpacked into a temporary root with ``dpkg -x``."""
    root = tmp_path_factory.mktemp("root")
    subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def deb_field(deb: Path, name: str) -> str:
    result = subprocess.run(
        ["dpkg-deb", "--field", str(deb), name], capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def offline_home_env(home: Path) -> dict[str, str]:
    """A first-start environment: empty HOME and XDG folders, offscreen Qt, offline hub."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UNDERSTUDY_", "XDG_", "HF_"))}
    runtime = home / "runtime"
    for sub in ("data", "config", "cache", "runtime"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    runtime.chmod(0o700)
    env.update(
        HOME=str(home),
        XDG_DATA_HOME=str(home / "data"),
        XDG_CONFIG_HOME=str(home / "config"),
        XDG_CACHE_HOME=str(home / "cache"),
        XDG_RUNTIME_DIR=str(runtime),
        QT_QPA_PLATFORM="offscreen",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONPATH="",
    )
    return env


def unresolved_libraries(library: Path) -> list[str]:
    """Shared libraries ``library`` needs that the loader cannot find (bundle first)."""
    internal = library.parents[4]  # .../_internal (PySide6/Qt/plugins/platforms/lib.so)
    paths = [str(internal), str(internal / "PySide6" / "Qt" / "lib")]
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(paths)}
    result = subprocess.run(
        ["ldd", str(library)], env=env, capture_output=True, text=True, check=False
    )
    return sorted({line.split()[0] for line in result.stdout.splitlines() if "not found" in line})


def without_network(command: list[str]) -> list[str]:
    """Run ``command`` in a new network namespace (no network at all) when possible."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-rn", "true"], check=False).returncode == 0:
        return [unshare, "-rn", *command]
    return command


def run_installed(
    root: Path, home: Path, args: list[str], wrapper: tuple[str, ...] = (), qpa: str = "offscreen"
) -> subprocess.CompletedProcess[str]:
    """Run the installed executable offline in a fresh HOME (``wrapper``: e.g. xvfb-run)."""
    exe = root / "opt" / "understudy" / "understudy"
    return subprocess.run(
        without_network([*wrapper, str(exe), *args]),
        env={**offline_home_env(home), "QT_QPA_PLATFORM": qpa},
        cwd=home,
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
        check=False,
    )


def test_build_writes_bundle_deb_and_tarball(built: Path, deb: Path) -> None:
    assert os.access(built / "understudy" / "understudy", os.X_OK)
    info = json.loads((built / "understudy" / "_internal" / "understudy_build.json").read_text())
    assert info["variant"] in ("cpu", "cuda")
    assert deb_field(deb, "Package") == "understudy"
    assert deb_field(deb, "Version").endswith("+" + info["variant"])
    assert "libxcb-cursor0" in deb_field(deb, "Depends")
    (tarball,) = built.glob("understudy-*-linux-*.tar.gz")
    listing = subprocess.run(
        ["tar", "-tzf", str(tarball)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "understudy/understudy" in listing and "understudy/understudy.desktop" in listing


def test_deb_installs_launcher_menu_entry_and_icons(installed: Path) -> None:
    assert os.access(installed / "opt/understudy/understudy", os.X_OK)
    launcher = installed / "usr/bin/understudy"
    assert launcher.is_symlink() and os.readlink(launcher) == "/opt/understudy/understudy"
    assert (
        "/opt/understudy/understudy --engine"
        in (installed / "usr/bin/understudy-engine").read_text()
    )
    for size in ICON_SIZES:
        assert (installed / f"usr/share/icons/hicolor/{size}x{size}/apps/understudy.png").is_file()
    assert (installed / "usr/share/icons/hicolor/scalable/apps/understudy.svg").is_file()
    model = installed / "opt/understudy/_internal/resources/models/understudy-mini-moe"
    assert (model / "config.json").is_file()
    unreadable = [
        p for p in (installed / "opt/understudy").rglob("*") if p.stat().st_mode & 0o444 != 0o444
    ]
    assert unreadable == [], f"not readable by every user: {unreadable[:5]}"


def test_installed_desktop_file_validates(installed: Path) -> None:
    desktop = installed / "usr/share/applications/understudy.desktop"
    result = subprocess.run(
        ["desktop-file-validate", str(desktop)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = desktop.read_text()
    assert "\nExec=understudy\n" in text and "\nIcon=understudy\n" in text


def test_packaged_postrm_keeps_user_data(deb: Path, tmp_path: Path) -> None:
    control = tmp_path / "control"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], check=True)
    home = tmp_path / "home"
    chats = home / ".local/share/Understudy/chats.sqlite3"
    chats.parent.mkdir(parents=True)
    chats.write_text("my chats")
    env = {"HOME": str(home), "PATH": str(tmp_path)}  # no cache tools: still succeeds
    result = subprocess.run(["/bin/sh", str(control / "postrm"), "purge"], env=env, check=False)
    assert result.returncode == 0
    assert chats.read_text() == "my chats"


def test_installed_app_starts_offline_with_the_builtin_model(
    installed: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    result = run_installed(installed, home, ["--smoke-test", "--require-model", "--timeout", "400"])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "SMOKE OK: loaded" in result.stdout, output[-6000:]
    data = home / "data" / "Understudy"
    assert data.is_dir(), "the app did not use the XDG data folder"


def test_installed_engine_chats_with_the_builtin_model(installed: Path, tmp_path: Path) -> None:
    args = ["--engine", "generate", "--chat", "--prompt", "Hello!", "--max-new-tokens", "8"]
    result = run_installed(installed, tmp_path / "home", [*args, "--greedy", "--json"])
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    reply = json.loads(result.stdout)
    assert isinstance(reply["text"], str)
    assert 1 <= len(reply["token_ids"]) <= 8


def test_installed_app_opens_a_real_x11_window(installed: Path, tmp_path: Path) -> None:
    xvfb_run = shutil.which("xvfb-run")
    if xvfb_run is None:
        pytest.skip("xvfb-run missing: apt-get install -y xvfb xauth")
    missing = unresolved_libraries(installed / XCB_PLUGIN)
    if missing:
        pytest.skip(f"the xcb plugin needs {missing}: apt-get install -y {XCB_APT_PACKAGES}")
    args = ["--smoke-test", "--require-model", "--timeout", "400"]
    result = run_installed(installed, tmp_path / "home", args, (xvfb_run, "-a"), qpa="xcb")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "SMOKE OK: loaded" in result.stdout, output[-6000:]
