#!/usr/bin/env bash
# Build Understudy for Linux in one command: the PyInstaller one-folder bundle, a .deb made
# with dpkg-deb, and a .tar.gz of the folder. Everything lands under dist/:
#
#   dist/understudy/                                   the bundle (run ./understudy)
#   dist/understudy_<version>+<variant>_<arch>.deb     installs to /opt/understudy
#   dist/understudy-<version>-linux-<machine>-<variant>.tar.gz
#
# Usage: bash installers/linux/build_linux.sh [--skip-bundle] [--out DIR] [--work DIR] [--help]
#   --skip-bundle   reuse DIR/understudy/ from an earlier run (only re-package)
#   --out DIR       where the outputs go (default dist/)
#   --work DIR      PyInstaller's and the packaging's scratch folder (default build/)
# Environment:
#   PYTHON              interpreter with the project installed (default .venv/bin/python)
#   UNDERSTUDY_VARIANT  cpu or cuda (default: what the installed torch is built for)
#   DEB_COMPRESSION     dpkg-deb compressor: gzip (default, fast), xz or zstd
#   COMPRESS_LEVEL      1 (fastest) to 9 (smallest) for the .deb and the .tar.gz (default 6)
# Needs: the project's venv (scripts/setup.sh), dpkg-deb, tar, gzip; desktop-file-validate
# (Debian package desktop-file-utils) is used when present. Installs PyInstaller 6.22.3 into
# the venv when it is missing (pip, pinned); nothing else is downloaded.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="$PWD"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
PYINSTALLER_VERSION="6.22.3"
HOOKS_CONTRIB_VERSION="2026.9"
DESKTOP="installers/linux/understudy.desktop"
ICON_SIZES="16 22 24 32 48 64 128 256 512"
SKIP_BUNDLE=0
DIST="dist"
WORK="build"

log() { echo "[build_linux] $*"; }
die() { echo "[build_linux] error: $*" >&2; exit 1; }

parse_args() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --skip-bundle) SKIP_BUNDLE=1 ;;
            --out) [ $# -ge 2 ] || die "--out needs a folder"; DIST="$2"; shift ;;
            --work) [ $# -ge 2 ] || die "--work needs a folder"; WORK="$2"; shift ;;
            -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
            *) die "unknown option '$1' (see --help)" ;;
        esac
        shift
    done
    mkdir -p "$DIST" "$WORK"
    DIST="$(cd "$DIST" && pwd)"
    WORK="$(cd "$WORK" && pwd)"
}

check_tools() {
    [ -x "$PY" ] || die "no Python at $PY: run 'bash scripts/setup.sh' first or set PYTHON"
    for tool in dpkg-deb tar gzip; do
        command -v "$tool" >/dev/null || die "'$tool' is missing (apt-get install dpkg tar gzip)"
    done
}

ensure_pyinstaller() {
    local have
    have="$("$PY" -c 'import PyInstaller; print(PyInstaller.__version__)' 2>/dev/null || true)"
    [ "$have" = "$PYINSTALLER_VERSION" ] && return 0
    log "installing PyInstaller $PYINSTALLER_VERSION into the venv (found '${have:-none}')"
    local torch_pin
    torch_pin="$(mktemp)"
    "$PY" -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' > "$torch_pin"
    "$PY" -m pip install -q -c "$torch_pin" "pyinstaller==$PYINSTALLER_VERSION" \
        "pyinstaller-hooks-contrib==$HOOKS_CONTRIB_VERSION"
    rm -f "$torch_pin"
}

detect_variant() {
    if [ -n "${UNDERSTUDY_VARIANT:-}" ]; then
        echo "$UNDERSTUDY_VARIANT"
    else
        "$PY" -c 'import torch; print("cuda" if torch.version.cuda else "cpu")'
    fi
}

project_version() {
    "$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])'
}

validate_desktop_file() {
    if command -v desktop-file-validate >/dev/null; then
        desktop-file-validate "$1" || die "$1 does not validate"
        log "desktop-file-validate: $1 ok"
    else
        log "desktop-file-validate not found (apt-get install desktop-file-utils): not validated"
    fi
}

build_bundle() {
    log "PyInstaller bundle, variant $VARIANT (this takes several minutes)"
    local start=$SECONDS
    UNDERSTUDY_VARIANT="$VARIANT" "$PY" -m PyInstaller --noconfirm --log-level WARN \
        --distpath "$DIST" --workpath "$WORK/pyinstaller-linux" installers/pyinstaller/understudy.spec
    log "bundle built in $((SECONDS - start)) s: $(du -sh "$DIST/understudy" | cut -f1)"
}

stage_icons() {
    local share="$1"
    for size in $ICON_SIZES; do
        install -D -m 0644 "resources/icons/png/understudy-$size.png" \
            "$share/icons/hicolor/${size}x${size}/apps/understudy.png"
    done
    install -D -m 0644 resources/icons/understudy.svg "$share/icons/hicolor/scalable/apps/understudy.svg"
}

host_glibc() {
    # PyInstaller copies the build host's shared libraries into the bundle, so the package
    # needs at least the build host's glibc (Debian 12: 2.36).
    getconf GNU_LIBC_VERSION | awk '{print $2}'
}

write_control() {
    local root="$1" size
    size="$(du -sk --exclude=DEBIAN "$root" | cut -f1)"
    mkdir -p "$root/DEBIAN"
    sed -e "s/@VERSION@/$DEB_VERSION/" -e "s/@ARCH@/$ARCH/" -e "s/@SIZE@/$size/" \
        -e "s/@VARIANT@/$VARIANT/" -e "s/@GLIBC@/$(host_glibc)/" \
        installers/linux/debian/control.in > "$root/DEBIAN/control"
    install -m 0755 installers/linux/debian/postinst installers/linux/debian/postrm "$root/DEBIAN/"
}

stage_deb() {
    local root="$1"
    rm -rf "$root"
    mkdir -p "$root/opt" "$root/usr/bin" "$root/usr/share/applications"
    cp -a "$DIST/understudy" "$root/opt/understudy"
    chmod -R u+rwX,go+rX,go-w "$root/opt/understudy"
    ln -s /opt/understudy/understudy "$root/usr/bin/understudy"
    printf '#!/bin/sh\n# The headless engine CLI of the installed bundle.\nexec /opt/understudy/understudy --engine "$@"\n' \
        > "$root/usr/bin/understudy-engine"
    chmod 0755 "$root/usr/bin/understudy-engine"
    install -m 0644 "$DESKTOP" "$root/usr/share/applications/understudy.desktop"
    stage_icons "$root/usr/share"
    install -D -m 0644 installers/linux/debian/copyright "$root/usr/share/doc/understudy/copyright"
    write_control "$root"
}

build_deb() {
    local root="$WORK/deb-root" out="$DIST/understudy_${DEB_VERSION}_${ARCH}.deb"
    log "staging the .deb in $root"
    stage_deb "$root"
    validate_desktop_file "$root/usr/share/applications/understudy.desktop"
    dpkg-deb --root-owner-group -Z"${DEB_COMPRESSION:-gzip}" -z"${COMPRESS_LEVEL:-6}" \
        --build "$root" "$out" >/dev/null
    log "wrote $out ($(du -h "$out" | cut -f1))"
}

build_tarball() {
    local name="understudy-$VERSION-linux-$(uname -m)-$VARIANT" stage="$WORK/tar-root"
    rm -rf "$stage" && mkdir -p "$stage"
    cp -a "$DIST/understudy" "$stage/understudy"
    chmod -R u+rwX,go+rX,go-w "$stage/understudy"
    install -m 0644 "$DESKTOP" "$stage/understudy/understudy.desktop"
    install -m 0644 resources/icons/png/understudy-256.png "$stage/understudy/understudy.png"
    tar -C "$stage" -cf - understudy | gzip -"${COMPRESS_LEVEL:-6}" > "$DIST/$name.tar.gz"
    rm -rf "$stage"
    log "wrote $DIST/$name.tar.gz ($(du -h "$DIST/$name.tar.gz" | cut -f1))"
}

main() {
    parse_args "$@"
    check_tools
    validate_desktop_file "$DESKTOP"
    VARIANT="$(detect_variant)"
    case "$VARIANT" in cpu|cuda) ;; *) die "UNDERSTUDY_VARIANT must be cpu or cuda, not '$VARIANT'" ;; esac
    VERSION="$(project_version)"
    DEB_VERSION="$VERSION+$VARIANT"
    ARCH="$(dpkg --print-architecture)"
    if [ "$SKIP_BUNDLE" = 1 ]; then
        [ -x "$DIST/understudy/understudy" ] || die "--skip-bundle: $DIST/understudy/ has no bundle"
    else
        ensure_pyinstaller
        build_bundle
    fi
    build_deb
    build_tarball
}

main "$@"
