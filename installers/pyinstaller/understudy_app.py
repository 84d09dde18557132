"""Frozen entry point of the desktop app: what ``python -m app`` runs, for PyInstaller.

PyInstaller needs a script, not a package's ``__main__``; this one only hands over to
``app.__main__.main`` and passes its exit code on.
"""

from __future__ import annotations

import multiprocessing
import sys

from app.__main__ import main

if __name__ == "__main__":
    multiprocessing.freeze_support()  # a no-op unless a frozen child process starts here
    sys.exit(main())
