#!/usr/bin/env bash
# Build Understudy for macOS: Understudy.app from the shared PyInstaller spec, then a .dmg
# with hdiutil. CPU/MPS torch only (Apple GPUs through MPS; no CUDA on macOS).
#
#   bash installers/macos/build_macos.sh            # -> dist/macos/Understudy.app
#                                                    #    dist/Understudy-<version>-macos-<arch>.dmg
# Options: --skip-venv  use PYTHON (default .venv-macos/bin/python) as it is
#          --skip-smoke do not launch the bundle before packaging it
# Needs: macOS 12.3+ on Apple silicon or Intel, Xcode command line tools (codesign),
# Python 3.11 (python.org or Homebrew) as python3.11. Packages are downloaded from PyPI while
# building only; the .dmg that comes out downloads nothing. The bundle is signed ad hoc; a
# release needs a Developer ID signature and notarization (see installers/README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="$PWD"
VENV="$ROOT/.venv-macos"
PY="${PYTHON:-$VENV/bin/python}"
TORCH_VERSION="2.13.0"
PYINSTALLER_VERSION="6.22.3"
HOOKS_CONTRIB_VERSION="2026.9"
SKIP_VENV=0
SKIP_SMOKE=0

log() { echo "[build_macos] $*"; }
die() { echo "[build_macos] error: $*" >&2; exit 1; }

parse_args() {
    for arg in "$@"; do
        case "$arg" in
            --skip-venv) SKIP_VENV=1 ;;
            --skip-smoke) SKIP_SMOKE=1 ;;
            -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
            *) die "unknown option '$arg' (see --help)" ;;
        esac
    done
}

check_platform() {
    [ "$(uname -s)" = "Darwin" ] || die "build the macOS app on macOS (this is $(uname -s))"
    for tool in hdiutil codesign ditto; do
        command -v "$tool" >/dev/null || die "'$tool' is missing (xcode-select --install)"
    done
}

make_venv() {
    # PyPI's macOS torch wheels are the CPU/MPS build; never the +cpu/+cu local versions.
    [ -x "$PY" ] || python3.11 -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q "torch==$TORCH_VERSION"
    local pin
    pin="$(mktemp)"
    echo "torch==$TORCH_VERSION" > "$pin"
    "$PY" -m pip install -q -c "$pin" -e "$ROOT" "pyinstaller==$PYINSTALLER_VERSION" \
        "pyinstaller-hooks-contrib==$HOOKS_CONTRIB_VERSION"
    rm -f "$pin"
}

project_version() {
    "$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])'
}

build_app() {
    log "PyInstaller: dist/macos/Understudy.app"
    UNDERSTUDY_VARIANT=mps "$PY" -m PyInstaller --noconfirm --log-level WARN \
        --distpath dist/macos --workpath build/pyinstaller-macos installers/pyinstaller/understudy.spec
    [ -d dist/macos/Understudy.app ] || die "PyInstaller did not produce dist/macos/Understudy.app"
    codesign --force --deep --sign - dist/macos/Understudy.app
}

smoke_test() {
    local exe=dist/macos/Understudy.app/Contents/MacOS
    log "smoke test: the engine finds the built-in model, the app starts and exits"
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$exe/understudy" --engine inspect --json >/dev/null
    QT_QPA_PLATFORM=offscreen HF_HUB_OFFLINE=1 "$exe/understudy" --smoke-test --require-model
}

build_dmg() {
    local out="dist/Understudy-$VERSION-macos-$(uname -m).dmg" stage="build/dmg-root"
    rm -rf "$stage" "$out" && mkdir -p "$stage"
    ditto dist/macos/Understudy.app "$stage/Understudy.app"
    ln -s /Applications "$stage/Applications"
    hdiutil create -volname "Understudy" -srcfolder "$stage" -fs HFS+ -format UDZO -ov "$out"
    rm -rf "$stage"
    log "wrote $out ($(du -h "$out" | cut -f1))"
}

main() {
    parse_args "$@"
    check_platform
    [ "$SKIP_VENV" = 1 ] || make_venv
    VERSION="$(project_version)"
    build_app
    [ "$SKIP_SMOKE" = 1 ] || smoke_test
    build_dmg
}

main "$@"
