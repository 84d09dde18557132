"""Shared test helpers: tiny tokenizers and models built inside tests (nothing downloaded)."""
