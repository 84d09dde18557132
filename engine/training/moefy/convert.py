"""Dense Llama-style SwiGLU model + learned parts -> a Qwen2-MoE config and state dict.

Attention, norms and embeddings carry over unchanged (Qwen2-MoE with ``qkv_bias=False`` is
Llama attention). Each layer's FFN neurons are cut by ``order`` (a permutation of the
neurons): the first ``shared`` become the shared expert, the rest ``experts`` blocks of
``expert_size``. The shared expert's gate weight is zero, so its sigmoid gate is exactly 0.5
and its down-projection is doubled to compensate. Routed down-projections are multiplied by
``top_k``: the router's renormalised weights average ``1/top_k``, so a chosen expert counts
about once, as in the dense sum; the trained router learns the deviations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from engine.errors import InvalidRequestError
from engine.training.moefy.lowrank import effective_ffn

SHARED_GATE_COMPENSATION = 2.0  # 1 / sigmoid(0)


@dataclass(frozen=True)
class MoeShape:
    """How each FFN is cut: routed experts, their size, shared neurons, experts per token."""

    experts: int = 32
    expert_size: int = 40
    shared: int = 256
    top_k: int = 12

    def __post_init__(self) -> None:
        if min(self.experts, self.expert_size, self.top_k) < 1 or self.shared < 0:
            raise InvalidRequestError(f"MoE shape needs positive sizes, got {self}")
        if self.top_k > self.experts:
            raise InvalidRequestError(f"top_k {self.top_k} exceeds {self.experts} experts")

    @property
    def neurons(self) -> int:
        """FFN neurons the shape covers (must equal the dense intermediate size)."""
        return self.shared + self.experts * self.expert_size

    def active_fraction(self) -> float:
        """Share of FFN parameters that one token uses."""
        return (self.shared + self.top_k * self.expert_size) / self.neurons

    def to_json(self) -> dict[str, int]:
        return asdict(self)


def moe_config(dense: Any, shape: MoeShape) -> Any:
    """The Qwen2-MoE config that hosts ``dense`` (a LlamaConfig) cut by ``shape``."""
    from transformers import Qwen2MoeConfig

    if shape.neurons != dense.intermediate_size:
        raise InvalidRequestError(
            f"shape covers {shape.neurons} neurons, the model has {dense.intermediate_size}"
        )
    return Qwen2MoeConfig(
        vocab_size=dense.vocab_size,
        hidden_size=dense.hidden_size,
        intermediate_size=dense.intermediate_size,
        num_hidden_layers=dense.num_hidden_layers,
        num_attention_heads=dense.num_attention_heads,
        num_key_value_heads=dense.num_key_value_heads,
        hidden_act=dense.hidden_act,
        max_position_embeddings=dense.max_position_embeddings,
        rms_norm_eps=dense.rms_norm_eps,
        tie_word_embeddings=dense.tie_word_embeddings,
        rope_parameters=dict(dense.rope_parameters),
        use_sliding_window=False,
        qkv_bias=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        moe_intermediate_size=shape.expert_size,
        shared_expert_intermediate_size=shape.shared,
        num_experts=shape.experts,
        num_experts_per_tok=shape.top_k,
        norm_topk_prob=True,
        output_router_logits=False,
        bos_token_id=dense.bos_token_id,
        eos_token_id=dense.eos_token_id,
        pad_token_id=dense.pad_token_id,
    )


def check_dense(config: Any) -> None:
    """Refuse what this conversion would get wrong (not Llama-style, biases, no SwiGLU)."""
    problems = []
    if config.model_type != "llama":
        problems.append(f"model_type {config.model_type!r} (needs 'llama')")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("attention or MLP biases")
    if config.hidden_act != "silu":
        problems.append(f"activation {config.hidden_act!r} (needs silu)")
    if config.hidden_size // config.num_attention_heads != getattr(
        config, "head_dim", config.hidden_size // config.num_attention_heads
    ):
        problems.append("a head_dim other than hidden_size / heads")
    if problems:
        raise InvalidRequestError("cannot MoEfy this model: " + "; ".join(problems))


def split_ffn(
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    order: torch.Tensor,
    shape: MoeShape,
    shared_down: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One layer's FFN weights ([I, H], [I, H], [H, I]) cut into shared and routed experts.

    ``shared_down`` [H, S], when given, replaces the shared neurons' dense down-projection
    (the recipe refits it).
    """
    if sorted(order.tolist()) != list(range(shape.neurons)):
        raise InvalidRequestError("neuron order is not a permutation of the FFN neurons")
    s, e, m = shape.shared, shape.experts, shape.expert_size
    shared_idx, routed_idx = order[:s], order[s:].view(e, m)  # [S], [E, m]
    hidden = gate.shape[1]
    gate_up = torch.cat([gate[routed_idx], up[routed_idx]], dim=1)  # [E, 2m, H]
    routed_down = down[:, routed_idx].permute(1, 0, 2)  # [E, H, m]
    if shared_down is None:
        shared_down = down[:, shared_idx]
    return {
        "experts.gate_up_proj": gate_up.contiguous(),
        "experts.down_proj": (routed_down * float(shape.top_k)).contiguous(),
        "shared_expert.gate_proj.weight": gate[shared_idx].contiguous(),
        "shared_expert.up_proj.weight": up[shared_idx].contiguous(),
        "shared_expert.down_proj.weight": (
            shared_down.to(down.dtype) * SHARED_GATE_COMPENSATION
        ).contiguous(),
        "shared_expert_gate.weight": torch.zeros(1, hidden, dtype=gate.dtype),
    }


def moe_state(
    dense_state: dict[str, torch.Tensor],
    orders: torch.Tensor,
    routers: torch.Tensor,
    shape: MoeShape,
    shared_downs: torch.Tensor | None = None,
    ffn: dict[str, torch.Tensor] | None = None,
    lora: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The Qwen2-MoE state dict: ``orders`` [L, I] neuron permutations, ``routers`` [L, E, H],
    ``shared_downs`` [L, H, S] refitted shared down-projections (optional), ``ffn`` refitted
    FFN weights in the dense neuron order (optional; ``gate``/``up`` [L, I, H], ``down``
    [L, H, I]), which replace the dense ones before the cut (and ``shared_downs``), and
    ``lora`` low-rank deltas (``lowrank``) added on top of all that."""
    ffn = ffn or {}
    if "down" in ffn:
        shared_downs = None
    state: dict[str, torch.Tensor] = {}
    for name, tensor in dense_state.items():
        if ".mlp." not in name and name != "lm_head.weight":
            state[name] = tensor
    for layer in range(orders.shape[0]):
        pre = f"model.layers.{layer}.mlp."
        dtype = dense_state[pre + "gate_proj.weight"].dtype
        gate, up, down = effective_ffn(
            tuple(  # type: ignore[arg-type]
                ffn[n][layer].to(dtype) if n in ffn else dense_state[pre + f"{n}_proj.weight"]
                for n in ("gate", "up", "down")
            ),
            orders[layer][: shape.shared],
            None if shared_downs is None else shared_downs[layer],
            lora or {},
            layer,
        )
        parts = split_ffn(gate, up, down, orders[layer], shape)
        state.update({pre + k: v for k, v in parts.items()})
        state[pre + "gate.weight"] = routers[layer].to(dense_state[pre + "gate_proj.weight"].dtype)
    return state


def build_moe(
    dense: Any,
    orders: torch.Tensor,
    routers: torch.Tensor,
    shape: MoeShape,
    shared_downs: torch.Tensor | None = None,
    ffn: dict[str, torch.Tensor] | None = None,
    lora: dict[str, torch.Tensor] | None = None,
) -> Any:
    """A Qwen2MoeForCausalLM (eval) holding ``dense``'s weights cut by the learned parts."""
    from transformers import Qwen2MoeForCausalLM

    check_dense(dense.config)
    config = moe_config(dense.config, shape)
    model = Qwen2MoeForCausalLM(config)
    state = moe_state(dense.state_dict(), orders, routers, shape, shared_downs, ffn, lora)
    result = model.load_state_dict(state, strict=False)
    missing = [n for n in result.missing_keys if n != "lm_head.weight"]
    if missing or result.unexpected_keys:
        raise InvalidRequestError(
            f"conversion mismatch: {missing[:4]} {result.unexpected_keys[:4]}"
        )
    model.tie_weights()
    model.generation_config = dense.generation_config
    return model.eval()
