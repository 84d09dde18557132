"""Streaming text out of streaming token ids: incremental decoding and stop strings.

``IncrementalDecoder`` releases text only once the bytes of a character are complete (byte-level
tokenizers split multi-byte characters across tokens) and keeps tokenizers' leading-space rules
right by always decoding from a recent prefix. ``StopStringFilter`` holds back text that might be
the start of a stop string, so the released text never contains one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

INCOMPLETE = "\ufffd"


class IncrementalDecoder:
    """Decodes a growing list of ids, returning only the newly completed text each time."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # decoding starts here (context for spacing rules)
        self.read_offset = 0  # text of ids before this was already released

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (may be empty mid-character)."""
        self.ids.append(token_id)
        released = self._decode(self.ids[self.prefix_offset : self.read_offset])
        current = self._decode(self.ids[self.prefix_offset :])
        if len(current) <= len(released) or current.endswith(INCOMPLETE):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return current[len(released) :]

    def flush(self) -> str:
        """Whatever is still unreleased (an incomplete character decodes as U+FFFD)."""
        released = self._decode(self.ids[self.prefix_offset : self.read_offset])
        current = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return current[len(released) :]


def held_suffix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is a proper start of some stop string."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest


class StopStringFilter:
    """Releases text up to, never including, the first stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.released = 0

    def _first_stop(self) -> int | None:
        longest = max((len(s) for s in self.stops), default=0)
        start = max(0, self.released - longest)
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add decoded text; return what may be shown now and whether a stop string appeared."""
        self.text += delta
        stop_at = self._first_stop()
        if stop_at is not None:
            self.text = self.text[:stop_at]
            return self._release(len(self.text)), True
        safe = len(self.text) - held_suffix_length(self.text, self.stops)
        return self._release(max(safe, self.released)), False

    def flush(self) -> str:
        """Release the held-back text (the generation ended without completing a stop string)."""
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        out = self.text[self.released : end]
        self.released = end
        return out
