"""OpenAI response bodies and stream chunks, built from the engine's events.

Plain dicts ready for JSON. Understudy's own facts ride under an ``understudy`` key that
OpenAI clients ignore: the alpha and policy in force and the offload counters of the request.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from engine.config import LiveOptions
from engine.events import GenerationFinished, StatsSnapshot

Kind = Literal["chat", "text"]
FINISH_REASONS = {"stop": "stop", "stop_string": "stop", "length": "length", "cancelled": "stop"}


@dataclass(frozen=True)
class Reply:
    """Identity shared by every chunk of one response."""

    kind: Kind
    model: str
    live: LiveOptions
    id: str = field(default="")
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            prefix = "chatcmpl" if self.kind == "chat" else "cmpl"
            object.__setattr__(self, "id", f"{prefix}-{uuid.uuid4().hex}")

    @property
    def object_name(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"

    def head(self, chunk: bool = False) -> dict[str, Any]:
        name = "chat.completion.chunk" if chunk and self.kind == "chat" else self.object_name
        return {"id": self.id, "object": name, "created": self.created, "model": self.model}


def usage(finished: GenerationFinished) -> dict[str, int]:
    completion = len(finished.token_ids)
    return {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": finished.prompt_tokens + completion,
    }


def offload_stats(stats: StatsSnapshot) -> dict[str, Any]:
    """The counters a client may want per request (the full set is at /v1/understudy/stats)."""
    return {
        "tokens": stats.tokens,
        "hit_rate": stats.hit_rate,
        "bytes_per_token": stats.bytes_per_token,
        "bytes_moved": stats.bytes_moved,
        "hits": stats.hits,
        "misses": stats.misses,
        "substitutions": stats.substitutions,
        "tokens_per_second": stats.tokens_per_second,
        "time_to_first_token_s": stats.time_to_first_token_s,
    }


def extras(reply: Reply, stats: StatsSnapshot, dropped_messages: int = 0) -> dict[str, Any]:
    return {
        "alpha": reply.live.alpha,
        "policy": reply.live.policy,
        "dropped_messages": dropped_messages,
        "stats": offload_stats(stats),
    }


def _choice(reply: Reply, text: str, finish_reason: str | None, delta: bool) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
    if reply.kind == "text":
        choice.update(text=text, logprobs=None)
    elif delta:
        choice["delta"] = {"content": text} if text or finish_reason is None else {}
    else:
        choice.update(message={"role": "assistant", "content": text}, logprobs=None)
    return choice


def full_response(
    reply: Reply, finished: GenerationFinished, stats: StatsSnapshot
) -> dict[str, Any]:
    """The non-streaming body."""
    reason = FINISH_REASONS[finished.reason]
    return {
        **reply.head(),
        "choices": [_choice(reply, finished.text, reason, delta=False)],
        "usage": usage(finished),
        "understudy": extras(reply, stats, finished.dropped_messages),
    }


def role_chunk(reply: Reply) -> dict[str, Any]:
    """The first chat chunk: the assistant role and empty content, as OpenAI sends it."""
    choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    return {**reply.head(chunk=True), "choices": [choice]}


def text_chunk(reply: Reply, text: str) -> dict[str, Any]:
    return {**reply.head(chunk=True), "choices": [_choice(reply, text, None, delta=True)]}


def final_chunk(reply: Reply, finished: GenerationFinished, stats: StatsSnapshot) -> dict[str, Any]:
    reason = FINISH_REASONS[finished.reason]
    return {
        **reply.head(chunk=True),
        "choices": [_choice(reply, "", reason, delta=True)],
        "understudy": extras(reply, stats, finished.dropped_messages),
    }


def usage_chunk(reply: Reply, finished: GenerationFinished) -> dict[str, Any]:
    return {**reply.head(chunk=True), "choices": [], "usage": usage(finished)}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event; ``[DONE]`` ends the stream."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()
