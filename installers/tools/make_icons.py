"""Render the app icon from ``resources/icons/understudy.svg`` to PNG, ICO and ICNS.

PNGs (16 to 512 px) are drawn with Qt's SVG renderer offscreen; the Windows ``.ico`` and the
macOS ``.icns`` are assembled from those PNGs with Pillow. Nothing is downloaded. The outputs
are committed; run this again after editing the SVG:

    QT_QPA_PLATFORM=offscreen .venv/bin/python installers/tools/make_icons.py
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from PIL import Image
from PySide6.QtCore import QRectF, Qt
from PySide6.QtGui import QGuiApplication, QImage, QPainter
from PySide6.QtSvg import QSvgRenderer

ROOT = Path(__file__).resolve().parents[2]
ICON_DIR = ROOT / "resources" / "icons"
SVG_NAME = "understudy.svg"
PNG_SIZES = (16, 22, 24, 32, 48, 64, 128, 256, 512)
ICO_SIZES = (16, 24, 32, 48, 64, 128, 256)
ICNS_SIZES = (16, 32, 64, 128, 256, 512)


class IconError(RuntimeError):
    """The SVG could not be read or rendered."""


def load_svg(path: Path) -> QSvgRenderer:
    """Parse the SVG; raise ``IconError`` when Qt cannot read it."""
    renderer = QSvgRenderer(str(path))
    if not renderer.isValid():
        raise IconError(f"{path}: not a valid SVG")
    return renderer


def render_png(renderer: QSvgRenderer, size: int, out: Path) -> Path:
    """Draw the SVG into a transparent ``size`` x ``size`` image and save it as PNG."""
    image = QImage(size, size, QImage.Format.Format_ARGB32_Premultiplied)
    image.fill(Qt.GlobalColor.transparent)
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform)
    renderer.render(painter, QRectF(0, 0, size, size))
    painter.end()
    if not image.save(str(out), b"PNG"):
        raise IconError(f"could not write {out}")
    return out


def png_path(icon_dir: Path, size: int) -> Path:
    """Where the ``size`` px render lives: ``png/understudy-<size>.png``."""
    return icon_dir / "png" / f"understudy-{size}.png"


def write_ico(icon_dir: Path) -> Path:
    """Windows icon with every size in ``ICO_SIZES``, from the largest PNG render."""
    out = icon_dir / "understudy.ico"
    base = Image.open(png_path(icon_dir, 256)).convert("RGBA")
    base.save(out, format="ICO", sizes=[(s, s) for s in ICO_SIZES])
    return out


def write_icns(icon_dir: Path) -> Path:
    """macOS icon from the PNG renders (Pillow picks each size from the appended images)."""
    out = icon_dir / "understudy.icns"
    images = [Image.open(png_path(icon_dir, s)).convert("RGBA") for s in ICNS_SIZES]
    images[-1].save(out, format="ICNS", append_images=images[:-1])
    return out


def make_icons(icon_dir: Path = ICON_DIR) -> list[Path]:
    """Render every PNG size, then the ICO and ICNS; return the files written."""
    renderer = load_svg(icon_dir / SVG_NAME)
    (icon_dir / "png").mkdir(parents=True, exist_ok=True)
    written = [render_png(renderer, s, png_path(icon_dir, s)) for s in PNG_SIZES]
    return [*written, write_ico(icon_dir), write_icns(icon_dir)]


def main(argv: list[str] | None = None) -> int:
    """Command line: ``make_icons.py [--icon-dir DIR]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--icon-dir", type=Path, default=ICON_DIR)
    args = parser.parse_args(argv)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    app = QGuiApplication.instance() or QGuiApplication(sys.argv[:1])
    try:
        for path in make_icons(args.icon_dir):
            print(path.relative_to(args.icon_dir))
    except IconError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    del app
    return 0


if __name__ == "__main__":
    sys.exit(main())
