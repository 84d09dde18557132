"""The MoEfy recipe on a tiny random Llama: exact conversion, partition, routers, refit."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine.errors import InvalidRequestError
from engine.training.moefy.convert import MoeShape, build_moe, check_dense, moe_config, split_ffn
from engine.training.moefy.partition import (
    activations,
    balanced_assign,
    balanced_kmeans,
    contributions,
    neuron_order,
)
from engine.training.moefy.router import (
    LayerExperts,
    RouterSpec,
    layer_errors,
    refit_shared_down,
    routed_mix,
    train_router,
)

HIDDEN, NEURONS, LAYERS = 32, 48, 2


def tiny_llama(seed: int = 0, **overrides: object) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=120, hidden_size=HIDDEN, intermediate_size=NEURONS, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True, rope_parameters={"rope_theta": 50000.0, "rope_type": "default"},
        rms_norm_eps=1e-5, **overrides,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def random_parts(shape: MoeShape, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    orders = torch.stack([torch.randperm(NEURONS, generator=gen) for _ in range(LAYERS)])
    routers = torch.randn(LAYERS, shape.experts, HIDDEN, generator=gen)
    return orders, routers


def layer_weights(model: LlamaForCausalLM, layer: int) -> tuple[torch.Tensor, ...]:
    mlp = model.model.layers[layer].mlp
    return mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach()


def test_all_experts_active_reproduces_the_dense_model() -> None:
    dense = tiny_llama()
    shape = MoeShape(experts=4, expert_size=8, shared=16, top_k=4)
    orders, _ = random_parts(shape)
    moe = build_moe(dense, orders, torch.zeros(LAYERS, 4, HIDDEN), shape)
    ids = torch.randint(0, 120, (2, 12))
    with torch.no_grad():
        want, got = dense(ids).logits, moe(ids).logits
    assert torch.allclose(want, got, atol=1e-4), float((want - got).abs().max())
    assert moe.config.tie_word_embeddings and moe.lm_head.weight is moe.model.embed_tokens.weight
    assert moe.config.rope_parameters["rope_theta"] == 50000.0
    assert moe.config.rms_norm_eps == dense.config.rms_norm_eps


def test_moe_block_computes_what_the_recipe_trains_against() -> None:
    dense = tiny_llama(1)
    shape = MoeShape(experts=8, expert_size=4, shared=16, top_k=3)
    orders, routers = random_parts(shape, 1)
    downs = torch.randn(LAYERS, HIDDEN, shape.shared) * 0.1
    moe = build_moe(dense, orders, routers, shape, downs)
    x = torch.randn(5, HIDDEN)
    experts = LayerExperts.cut(*layer_weights(dense, 1), orders[1], shape).with_shared_down(
        downs[1]
    )
    want = experts.shared_output(x) + routed_mix(x @ routers[1].T, experts.outputs(x), 3)
    with torch.no_grad():
        got = moe.model.layers[1].mlp(x.unsqueeze(0))[0]
    assert torch.allclose(want, got, atol=1e-5)


def test_shape_and_conversion_refuse_bad_input() -> None:
    with pytest.raises(InvalidRequestError, match="top_k"):
        MoeShape(experts=4, expert_size=8, shared=0, top_k=5)
    with pytest.raises(InvalidRequestError, match="positive"):
        MoeShape(experts=0, expert_size=8, shared=0, top_k=1)
    dense = tiny_llama()
    with pytest.raises(InvalidRequestError, match="covers 40 neurons"):
        moe_config(dense.config, MoeShape(experts=4, expert_size=10, shared=0, top_k=2))
    shape = MoeShape(experts=4, expert_size=8, shared=16, top_k=2)
    gate, up, down = layer_weights(dense, 0)
    with pytest.raises(InvalidRequestError, match="permutation"):
        split_ffn(gate, up, down, torch.zeros(NEURONS, dtype=torch.long), shape)
    with pytest.raises(InvalidRequestError, match="biases"):
        check_dense(tiny_llama(attention_bias=True).config)


def test_balanced_kmeans_recovers_planted_groups_with_equal_sizes() -> None:
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 64, generator=gen) * 3
    truth = torch.arange(4).repeat_interleave(10)[torch.randperm(40, generator=gen)]
    profiles = centers[truth] + 0.3 * torch.randn(40, 64, generator=gen)
    owner = balanced_kmeans(profiles, 4, seed=0)
    assert torch.bincount(owner, minlength=4).tolist() == [10, 10, 10, 10]
    for group in range(4):  # every planted group lands in one cluster
        assert len(set(owner[truth == group].tolist())) == 1


def test_balanced_assign_respects_capacity() -> None:
    sim = torch.zeros(6, 2)
    sim[:, 0] = 1.0  # everyone prefers cluster 0
    owner = balanced_assign(sim, capacity=3)
    assert torch.bincount(owner).tolist() == [3, 3]


def test_neuron_order_puts_the_most_used_neurons_in_the_shared_expert() -> None:
    gen = torch.Generator().manual_seed(0)
    contrib = torch.rand(200, NEURONS, generator=gen)
    contrib[:, [3, 7, 11, 40]] += 5.0
    shape = MoeShape(experts=4, expert_size=11, shared=4, top_k=2)
    order = neuron_order(contrib, shape, seed=0)
    assert sorted(order.tolist()) == list(range(NEURONS))
    assert sorted(order[:4].tolist()) == [3, 7, 11, 40]


def test_router_training_beats_an_untrained_router_and_refit_helps() -> None:
    dense = tiny_llama(2)
    shape = MoeShape(experts=8, expert_size=4, shared=16, top_k=2)
    gate, up, down = layer_weights(dense, 0)
    x = torch.randn(1200, HIDDEN)
    order = neuron_order(contributions(activations(x, gate, up), down), shape, seed=0)
    experts = LayerExperts.cut(gate, up, down, order, shape)
    trained = train_router(x[:1000], experts, shape, RouterSpec(epochs=4, batch=100, lr=1e-2))
    untrained = torch.zeros(shape.experts, HIDDEN)
    check = x[1000:]
    err_trained = layer_errors(check, experts, trained, shape)["router"]
    assert err_trained < layer_errors(check, experts, untrained, shape)["router"]
    down_new = refit_shared_down(x[:1000], experts, trained, shape, ridge=1e-3)
    refit = layer_errors(check, experts.with_shared_down(down_new), trained, shape)["router"]
    assert refit < err_trained


def test_distillation_trains_only_the_learned_parts_and_lowers_kl() -> None:
    from engine.training.moefy.distill import DistillSpec, distill, kl_loss, learned_tensors

    dense = tiny_llama(3)
    shape = MoeShape(experts=8, expert_size=4, shared=16, top_k=2)
    orders, routers = random_parts(shape, 3)
    moe = build_moe(dense, orders, routers * 0.1, shape)
    experts_before = moe.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    tokens = torch.randint(0, 120, (400,), generator=torch.Generator().manual_seed(0))
    probe = tokens[:32].unsqueeze(0)
    with torch.no_grad():
        kl_before = float(kl_loss(dense(probe).logits[0], moe(probe).logits[0]))
    spec = DistillSpec(steps=40, window=32, lr_router=1e-2, lr_shared=1e-2)
    distill(dense, moe, tokens, spec)
    with torch.no_grad():
        kl_after = float(kl_loss(dense(probe).logits[0], moe(probe).logits[0]))
    assert kl_after < kl_before
    assert torch.equal(moe.model.layers[0].mlp.experts.gate_up_proj, experts_before)
    rebuilt = build_moe(dense, orders, *learned_tensors(moe)[:1], shape, learned_tensors(moe)[1])
    with torch.no_grad():
        assert torch.allclose(rebuilt(probe).logits, moe(probe).logits, atol=1e-5)
