"""Frozen entry point of the headless engine CLI: what ``python -m engine`` runs, for PyInstaller.

Shipped next to the app in the same folder so an installed copy can be checked (and scripted)
without a display: ``understudy-engine inspect``, ``generate``, ``score``.
"""

from __future__ import annotations

import multiprocessing
import sys

from engine.__main__ import main

if __name__ == "__main__":
    multiprocessing.freeze_support()  # a no-op unless a frozen child process starts here
    sys.exit(main())
