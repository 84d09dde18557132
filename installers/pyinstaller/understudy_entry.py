"""Frozen entry point of the bundle: the desktop app, or the engine CLI after ``--engine``.

PyInstaller needs a script, not a package's ``__main__``. One executable serves both front
doors so the bundle carries its Python archive once:

    understudy [app options]          what ``python -m app`` runs (double-click)
    understudy --engine inspect ...   what ``python -m engine`` runs (headless checks, scripts)
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable

ENGINE_FLAG = "--engine"


def attach_console() -> None:
    """Give a windowed Windows executable the parent console's streams (for ``--engine``)."""
    if sys.platform != "win32" or sys.stdout is not None:
        return
    import ctypes

    if ctypes.windll.kernel32.AttachConsole(-1):  # type: ignore[attr-defined]
        sys.stdout = open("CONOUT$", "w", encoding="utf-8")  # noqa: SIM115 - lives until exit
        sys.stderr = sys.stdout
    else:
        sys.stdout = sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115


def pick_main(argv: list[str]) -> tuple[Callable[..., object], list[str]]:
    """The ``main`` to run and the argv it should see (program name first)."""
    if len(argv) > 1 and argv[1] == ENGINE_FLAG:
        attach_console()
        from engine.__main__ import main as engine_main

        return engine_main, [argv[0], *argv[2:]]
    from app.__main__ import main as app_main

    return app_main, argv


def run(argv: list[str]) -> int:
    """Run the chosen front door with ``sys.argv`` set as it would be under ``python -m``."""
    main, sys.argv = pick_main(argv)
    code = main()
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    multiprocessing.freeze_support()  # a no-op unless a frozen child process starts here
    sys.exit(run(sys.argv))
