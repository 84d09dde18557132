"""The engine runtime: loading, the memory estimate, generation, the session and the thread."""
