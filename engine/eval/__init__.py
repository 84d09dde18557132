"""Evaluation: fidelity against the unmodified model, benchmarks, trace replay, projections."""
