"""Neurons -> experts: the most used neurons form the shared expert, the rest are clustered.

A neuron's contribution to a token is ``|silu(g.x) * (u.x)| * ||down column||``: how much it
moves the FFN output. The ``shared`` neurons of largest mean contribution become the shared
expert (always on). The others are grouped by co-activation (MoEfication): each neuron's
contribution profile over the calibration tokens, unit-normalised, is clustered by balanced
spherical k-means into ``experts`` groups of exactly ``expert_size`` neurons, so experts that
fire together sit together and every expert has the same size (what the fused layout needs).
All of it is pure tensor code, deterministic for a seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.training.moefy.convert import MoeShape

KMEANS_ROUNDS = 12
PROFILE_TOKENS = 8192


def activations(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU neuron activations [N, I] of inputs ``x`` [N, H] (float32)."""
    x = x.float()
    return F.silu(x @ gate.T) * (x @ up.T)


def contributions(acts: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Per token and neuron, how far the neuron moves the output: |a| * ||down[:, i]||."""
    return acts.abs() * down.norm(dim=0)  # [N, I]


def balanced_assign(sim: torch.Tensor, capacity: int) -> torch.Tensor:
    """Each row (item) to a column (cluster) by descending similarity, ``capacity`` per column."""
    items, clusters = sim.shape
    assert items == clusters * capacity, "items must fill the clusters exactly"
    order = torch.argsort(sim.flatten(), descending=True).tolist()
    owner = [-1] * items
    room = [capacity] * clusters
    left = items
    for flat in order:
        item, cluster = divmod(flat, clusters)
        if owner[item] < 0 and room[cluster] > 0:
            owner[item], room[cluster], left = cluster, room[cluster] - 1, left - 1
            if left == 0:
                break
    return torch.tensor(owner)


def balanced_kmeans(profiles: torch.Tensor, clusters: int, seed: int) -> torch.Tensor:
    """Cluster of each row of ``profiles`` [n, d]: spherical k-means with equal cluster sizes."""
    unit = F.normalize(profiles, dim=1)
    gen = torch.Generator().manual_seed(seed)
    centroids = unit[torch.randperm(len(unit), generator=gen)[:clusters]]
    owner = torch.zeros(len(unit), dtype=torch.long)
    for _ in range(KMEANS_ROUNDS):
        owner = balanced_assign(unit @ centroids.T, len(unit) // clusters)
        sums = torch.zeros_like(centroids).index_add_(0, owner, unit)
        centroids = F.normalize(sums, dim=1)
    return owner


def neuron_order(contrib: torch.Tensor, shape: MoeShape, seed: int) -> torch.Tensor:
    """The permutation of one layer's neurons: shared first, then expert by expert."""
    mean = contrib.mean(dim=0)  # [I]
    ranked = torch.argsort(mean, descending=True)
    shared, routed = ranked[: shape.shared], ranked[shape.shared :]
    profile = contrib[:PROFILE_TOKENS, routed]  # [n, R]
    profile = profile - profile.mean(dim=0, keepdim=True)
    owner = balanced_kmeans(profile.T, shape.experts, seed)  # [R]
    grouped = [routed[owner == e] for e in range(shape.experts)]
    return torch.cat([torch.sort(shared).values] + [torch.sort(g).values for g in grouped])
