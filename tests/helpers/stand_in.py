"""A stand-in for ``engine.runtime.loading.LoadedModel`` around a plain transformers model.

Generation tests use it to test the loop against the unmodified model ("mock the model, not
the engine"): the offload controller only records the calls the loop makes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from engine.config import LiveOptions
from engine.events import ModelInfo, StatsSnapshot


@dataclass
class RecordingOffload:
    """Counts tokens per step like the real controller; remembers live options and close."""

    steps: list[int] = field(default_factory=list)
    live: LiveOptions | None = None
    live_changes: list[tuple[int, LiveOptions]] = field(default_factory=list)  # (step, options)
    closed: bool = False

    def stats(self) -> StatsSnapshot:
        return StatsSnapshot(tokens=sum(self.steps))

    def reset_stats(self) -> None:
        self.steps.clear()

    def end_step(self, num_tokens: int) -> None:
        self.steps.append(num_tokens)

    def set_live_options(self, live: LiveOptions) -> None:
        self.live = live
        self.live_changes.append((len(self.steps), live))

    def close(self) -> None:
        self.closed = True


@dataclass
class StandInLoaded:
    model: Any
    tokenizer: Any
    info: ModelInfo
    offload: RecordingOffload
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32


def info_for(model: Any, path: str = "tiny") -> ModelInfo:
    """A ``ModelInfo`` with the tiny model's real shapes (bytes counted in fp32)."""
    config = model.config
    expert_params = 3 * config.moe_intermediate_size * config.hidden_size
    total_params = sum(p.numel() for p in model.parameters())
    experts = config.num_hidden_layers * config.num_experts
    return ModelInfo(
        path=path,
        name="tiny",
        architecture=type(model).__name__,
        model_type=config.model_type,
        num_layers=config.num_hidden_layers,
        moe_layers=config.num_hidden_layers,
        experts_per_layer=config.num_experts,
        top_k=config.num_experts_per_tok,
        bytes_per_expert=4 * expert_params,
        trunk_bytes=4 * (total_params - experts * expert_params),
        total_expert_bytes=4 * experts * expert_params,
        vocab_size=config.vocab_size,
        max_context=config.max_position_embeddings,
        router_family="softmax",
        substitution_supported=True,
    )


def stand_in(model: Any, tokenizer: Any) -> StandInLoaded:
    return StandInLoaded(model, tokenizer, info_for(model), RecordingOffload())
