"""Understudy engine: offloaded Mixture-of-Experts inference with expert substitution.

Qt-free. The public surface is ``engine.config`` (what callers ask for), ``engine.events``
(what the engine reports), ``engine.errors`` (what can go wrong) and
``engine.runtime.engine.Engine`` (the threaded facade the app talks to).
"""

__version__ = "0.1.0"
