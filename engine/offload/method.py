"""The SMoE method wired into the offload mechanism: substitution, prefetch and CPU assist.

``SmoeMethod`` attaches to an ``OffloadController`` through the mechanism's own hooks and reads
the controller's live options at every call, so alpha and the switches change between two
tokens without reloading:

- **substitution**: the controller's planner step (``on_routing``) runs Algorithm 1 on the
  layer's one host copy of its routing (``plan.substitute_host``, equal to the tensor reference
  ``substitution.substitute``) against the cache's host residency; the final top-k goes back to
  the device in one small copy. A substitute that no original choice needed is counted as a
  substitution, not as a hit.
- **prefetch**: the next MoE layer's scores are predicted through its post-attention norm and
  router, attention skipped, as the released code does, from this MoE layer's post-attention
  state (the released code uses the layer's output; the routing copy is made before this
  layer's experts run, so the prediction rides in it and a decode step reads the host once per
  MoE layer, not twice); a forward hook on the layer then copies the predicted top-score
  experts that are not resident (``cache.prefetch``: the low-priority copy queue on CUDA).
  After a dense layer the prediction is made from its output, with its own host read.
  The predictor folds the norm into the router (``prefetch.FoldedRouter``): from this layer's
  post-attention *norm output*, the next layer's norm is a ratio of gains, so a prediction is
  one matrix product and a softmax (two ops; checked on a probe at load, else the norm module).
  ``LiveOptions.prefetch_from="output"`` (``--prefetch-from output``) restores the released
  code's predictor from the layer's output everywhere: about twice the prefetch recall on the
  SmolLM2 MoE, at the price of a second host read per MoE layer.
  Precision, recall and used copies are counted when the next layer routes, from the same
  bands substitution used (classified once).
- **CPU assist**: the experts module's ``cpu_split`` hook splits the layer's missing experts
  between copying and computing from the host copy (Algorithm 2, ``cpu_assist.plan``); the
  CPU-assisted ones compute on the assist worker thread next to the copies, on every expert
  path (the eager path joins their rows in ascending id); the
  copy cost is the CUDA copy time measured with events once there is one, else a rolling
  measurement; CPU-computed experts are not inserted into the cache. On the eager path experts
  are still visited in ascending id, so on a CPU device the sums are the eager ones bit for bit.

All three act only on decode-sized forwards (at most ``MAX_DECODE_TOKENS`` tokens); a prompt's
prefill runs the model unchanged (the released code substitutes at decode only). With alpha 0
the router's own tensors are kept, so the model output is unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from engine.offload.cache import ExpertWeights
from engine.offload.cpu_assist import RollingCost, plan
from engine.offload.decode_row import mix_row, ranked_top, row_bands, substitute_row
from engine.offload.families import SIGMOID_GROUPED, SOFTMAX_ALL, SOFTMAX_TOPK, RouterFamily
from engine.offload.plan import (
    HostBands,
    HostRouting,
    HostSubstitution,
    classify_host,
    mix_weights,
    model_top_k_host,
    substitute_host,
    to_device,
    top_score_ranked,
    top_score_set,
)
from engine.offload.prefetch import (
    FoldedRouter,
    PrefetchAccount,
    fold_router,
    fold_router_after,
    predict_scores,
)
from engine.offload.substitution import DEFAULT_WEIGHT_MODE, RouterSpec, WeightMode

if TYPE_CHECKING:
    from engine.offload import OffloadController

MAX_DECODE_TOKENS = 3  # forwards with more tokens are prefill: no policy acts on them
PRIOR_COPY_BANDWIDTH = 10e9  # bytes/s until copies are measured
PRIOR_CPU_BANDWIDTH = 20e9  # bytes/s of a CPU expert GEMV until measured


def spec_for_family(family: RouterFamily, num_experts: int, top_k: int) -> RouterSpec | None:
    """The substitution/prefetch description of a router family; None where undefined."""
    kinds = {SOFTMAX_ALL: "softmax", SOFTMAX_TOPK: "softmax", SIGMOID_GROUPED: "sigmoid"}
    kind = kinds.get(family.name)
    if kind is None:
        return None
    grouped = family.group_limited
    return RouterSpec(
        family=family.model_type,
        kind=kind,  # type: ignore[arg-type]
        num_experts=num_experts,
        top_k=top_k,
        norm_topk_prob=family.renormalize,
        scaling=family.routed_scaling_factor,
        group_score=family.group_score if grouped else None,  # type: ignore[arg-type]
        n_group=int(family.n_group or 1) if grouped else 1,
        topk_group=int(family.topk_group or 1) if grouped else 1,
    )


@dataclass
class _PrefetchState:
    """What the prefetcher did for one layer, kept until that layer routes."""

    issued: set[int]
    predicted_top: set[int]
    resident_before: list[bool]  # [E] the layer's residency when the prefetch was issued


class SmoeMethod:
    """Substitution, top-score prefetch and CPU assist for one loaded model."""

    def __init__(
        self,
        controller: OffloadController,
        model: nn.Module,
        family: RouterFamily,
        top_k: int,
        weight_mode: WeightMode = DEFAULT_WEIGHT_MODE,
        prefetch_limit: int | None = None,
    ) -> None:
        self.controller = controller
        self.cache = controller.cache
        self.spec = spec_for_family(family, controller.store.num_experts, top_k)
        self.weight_mode: WeightMode = weight_mode
        self.prefetch_limit = prefetch_limit
        self.prefetch_account = PrefetchAccount()
        self.row_planner = True  # one token: decode_row on lists; False: the numpy reference
        expert_bytes = self.cache.shape.nbytes
        self.cost_load = RollingCost(prior=expert_bytes / PRIOR_COPY_BANDWIDTH)
        self.cost_cpu = RollingCost(prior=expert_bytes / PRIOR_CPU_BANDWIDTH)
        self._scores: dict[int, np.ndarray] = {}  # layer -> [T, E] its scores this step
        self._bias: dict[int, np.ndarray | None] = {}  # layer -> host correction bias
        self._tokens: dict[int, int] = {}  # layer -> tokens in this forward
        self._prefetched: dict[int, _PrefetchState] = {}
        self._packed: dict[int, int] = {}  # MoE layer -> the MoE layer it predicts
        self._mid: dict[int, torch.Tensor] = {}  # MoE layer -> its post-attention state
        self._predicted: dict[int, np.ndarray] = {}  # layer -> predicted scores, on the host
        self._folded: dict[int, FoldedRouter | None] = {}  # layer -> its folded predictor
        self._folded_after: dict[int, FoldedRouter] = {}  # layer -> predictor from the normed
        self._ranked: dict[int, list[int]] = {}  # layer -> its read-ahead's ranking, for the copy
        self._hooks: list[Any] = []
        self._attach(model)

    # ----------------------------------------------------------------- wiring

    def _attach(self, model: nn.Module) -> None:
        for module in self.controller.experts.values():
            module.source = self._source
            module.cpu_split = self._cpu_experts
            module.on_cpu_time = self.cost_cpu.add
        decoder = _decoder_layers(model)
        layers = self.controller.moe_layers
        if decoder is None or self.spec is None:
            return
        self._norms = {i: getattr(decoder[i], "post_attention_layernorm", None) for i in layers}
        for following in layers[1:]:
            previous = decoder[following - 1]
            norm = getattr(previous, "post_attention_layernorm", None)
            if following - 1 in self.controller.experts and isinstance(norm, nn.Module):
                self._packed[following - 1] = following  # predicted in the routing's copy
                self._hooks += [
                    self._state_hook(following - 1, following, norm),
                    previous.register_forward_hook(self._issue_hook(following)),
                    previous.register_forward_hook(self._prefetch_hook(following, "output")),
                ]
            else:
                self._hooks.append(previous.register_forward_hook(self._prefetch_hook(following)))

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    @property
    def _live(self) -> Any:
        return self.controller.live

    # ----------------------------------------------------------------- substitution

    def on_routing(
        self, layer: int, host: HostRouting, idx: torch.Tensor, weights: torch.Tensor
    ) -> tuple[HostRouting, torch.Tensor, torch.Tensor]:
        """The controller's planner step: substitution and prefetch accounting, on the host."""
        self._tokens[layer] = host.tokens
        if host.extra is not None and layer in self._packed:
            self._predicted[self._packed[layer]] = host.extra
            self._read_ahead(self._packed[layer], host.extra)
        live, spec = self._live, self.spec
        if host.tokens > MAX_DECODE_TOKENS or live.policy != "smoe":
            self._prefetched.pop(layer, None)
            return host, idx, weights
        if live.cpu_assist_on:
            self._scores[layer] = host.scores  # importance: reduced only if a miss needs it
        pending = self._prefetched.pop(layer, None)
        if spec is None or not (live.substitution_on or pending is not None):
            return host, idx, weights
        if self._one_row(layer, host.scores):
            return self._on_routing_row(layer, host, idx, weights, pending)
        bands = self._bands(layer, host.scores, host.idx, live.alpha)
        final = host
        if live.substitution_on and bands is not None:
            final, idx, weights = self._substitute(layer, host, idx, weights, bands)
        if pending is not None:
            actual = (
                top_score_set(bands, host.idx)
                if bands is not None
                else set(host.idx.reshape(-1).tolist())
            )
            self._account_prefetch(layer, pending, actual, final.idx.reshape(-1).tolist())
        return final, idx, weights

    def _one_row(self, layer: int, scores: np.ndarray) -> bool:
        """A decode step the row planner (``decode_row``) decides: one token, no groups, no
        correction bias, a substitutable router."""
        spec = self.spec
        return (
            self.row_planner
            and scores.shape[0] == 1
            and spec is not None
            and spec.substitutable
            and spec.group_score is None
            and self._bias_host(layer) is None
        )

    def _on_routing_row(
        self,
        layer: int,
        host: HostRouting,
        idx: torch.Tensor,
        weights: torch.Tensor,
        pending: _PrefetchState | None,
    ) -> tuple[HostRouting, torch.Tensor, torch.Tensor]:
        """``on_routing`` of one token on Python lists: the bands once, for both uses."""
        live = self._live
        chosen = host.idx[0].tolist()
        bands = row_bands(host.scores[0].tolist(), chosen, live.alpha)
        final = chosen
        if live.substitution_on:
            swap = substitute_row(bands, self.cache.resident_list(layer))
            if swap is not None:
                host, idx, weights = self._apply(layer, host, idx, weights, swap)
                final = swap[0]
        if pending is not None:
            self._account_prefetch(layer, pending, bands.top_set(), final)
        return host, idx, weights

    def _apply(
        self,
        layer: int,
        host: HostRouting,
        idx: torch.Tensor,
        weights: torch.Tensor,
        swap: tuple[list[int], list[bool]],
    ) -> tuple[HostRouting, torch.Tensor, torch.Tensor]:
        """One token's swaps: weights mixed (``mix_row``; the numpy path for ``own_renorm``),
        substitutes counted, the final top-k and weights sent to the device.

        A token's substitutes are distinct unselected experts, one per swap, and its k experts
        always fit the cache (it has at least ``top_k`` slots), so unlike ``_substituted``
        nothing is counted from sets and no chunking check is needed."""
        assert self.spec is not None
        new, swapped = swap
        new_idx = np.array([new], dtype=np.int64)  # [1, k]
        mixed = mix_row(
            host.scores[0], host.idx[0], host.weights[0], swap, self.spec, self.weight_mode
        )
        if mixed is None:
            flags = np.array([swapped], dtype=bool)
            mixed = mix_weights(host, new_idx, flags, self.spec, self.weight_mode)[0]
        return self._send(layer, host, idx, weights, new_idx, mixed[None, :], sum(swapped))

    def _bands(
        self, layer: int, scores: np.ndarray, idx: np.ndarray, alpha: float
    ) -> HostBands | None:
        if self.spec is None or not self.spec.substitutable:
            return None
        return classify_host(scores, idx, self.spec, alpha, self._bias_host(layer))

    def _substitute(
        self,
        layer: int,
        host: HostRouting,
        idx: torch.Tensor,
        weights: torch.Tensor,
        bands: HostBands,
    ) -> tuple[HostRouting, torch.Tensor, torch.Tensor]:
        assert self.spec is not None
        out = substitute_host(
            host,
            self.cache.resident_host(layer),
            self.spec,
            self._live.alpha,
            bias=self._bias_host(layer),
            weight_mode=self.weight_mode,
            bands=bands,
        )
        if out is None:
            return host, idx, weights
        return self._substituted(layer, host, idx, weights, out)

    def _substituted(
        self,
        layer: int,
        host: HostRouting,
        idx: torch.Tensor,
        weights: torch.Tensor,
        out: HostSubstitution,
    ) -> tuple[HostRouting, torch.Tensor, torch.Tensor]:
        """Count the substitutes and send the final top-k and weights to the device."""
        final = set(out.idx.ravel().tolist())
        if len(final) > self.cache.num_slots:
            return host, idx, weights  # streamed in chunks, a substitute could be evicted
        added = len(final - set(host.idx.ravel().tolist()))
        return self._send(layer, host, idx, weights, out.idx, out.weights, added)

    def _send(
        self,
        layer: int,
        host: HostRouting,
        idx: torch.Tensor,
        weights: torch.Tensor,
        new_idx: np.ndarray,
        new_weights: np.ndarray,
        added: int,
    ) -> tuple[HostRouting, torch.Tensor, torch.Tensor]:
        """Count ``added`` substitutes and send the final top-k and weights to the device."""
        # substitutes are resident: the cache will count them as hits; they are substitutions
        self.cache.stats.add(layer, hits=-added, substitutions=added)
        device = idx.device
        return (
            HostRouting(host.scores, new_idx, new_weights),
            _as(to_device(new_idx, device), idx.dtype),
            _as(to_device(new_weights, device), weights.dtype),
        )

    def _bias_host(self, layer: int) -> np.ndarray | None:
        """DeepSeek-V3's correction bias on the host (read once per layer: a parameter)."""
        if layer not in self._bias:
            router = self.controller.routers[layer].router
            bias = getattr(router, "e_score_correction_bias", None)
            host = bias.detach().float().cpu().numpy() if isinstance(bias, torch.Tensor) else None
            self._bias[layer] = host
        return self._bias[layer]

    # ----------------------------------------------------------------- prefetch

    def _prefetch_hook(self, layer: int, only_from: str | None = None) -> Any:
        """Predict ``layer`` from the previous layer's output (its own host read).

        ``only_from="output"``: the hook of a layer whose prediction normally rides in the
        routing copy; it predicts only when the live ``prefetch_from`` asks for the output
        (the paper's and the released code's predictor: better recall, a second read).
        """

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            if not isinstance(hidden, torch.Tensor) or not self._live.prefetch_on:
                return
            if only_from is not None and self._live.prefetch_from != only_from:
                return
            flat = hidden.reshape(-1, hidden.shape[-1])  # [T, H]
            if flat.shape[0] <= MAX_DECODE_TOKENS:
                with torch.no_grad():
                    self._prefetch(layer, flat)

        return hook

    def _state_hook(self, layer: int, following: int, norm: nn.Module) -> Any:
        """Keep ``layer``'s post-attention state for the prediction of ``following``.

        Where both layers' norms are plain RMS norms (``fold_router_after``), the state kept is
        ``layer``'s norm *output* and the prediction is one matrix product and a softmax;
        otherwise it is the norm's input, predicted through ``following``'s norm.
        """
        assert self.spec is not None
        weight, bias = self._router_tensors(following)
        after = None
        if weight is not None:
            after = fold_router_after(norm, self._norms.get(following), weight, self.spec, bias)
        if after is None:
            return norm.register_forward_pre_hook(self._mid_hook(layer))
        self._folded_after[following] = after
        return norm.register_forward_hook(self._normed_hook(layer))

    def _mid_hook(self, layer: int) -> Any:
        """Keep ``layer``'s post-attention state (its norm's input) for the prediction."""

        def hook(module: nn.Module, args: Any) -> None:
            if args and isinstance(args[0], torch.Tensor):
                self._mid[layer] = args[0]

        return hook

    def _normed_hook(self, layer: int) -> Any:
        """Keep ``layer``'s normed post-attention state (its norm's output)."""

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                self._mid[layer] = output

        return hook

    def prediction(self, layer: int) -> torch.Tensor | None:
        """The next MoE layer's predicted scores [T, E], to ride in ``layer``'s routing copy.

        Computed from ``layer``'s post-attention state (the residual stream before its
        experts) through the next layer's norm and router: the routing copy is made before
        this layer's experts run, so their output cannot be in it. One host read per layer
        instead of two; the copies are still started after this layer's experts
        (``_issue_hook``), so they cannot evict what this layer is about to use.
        """
        mid = self._mid.pop(layer, None)
        following = self._packed.get(layer)
        if mid is None or following is None or self.spec is None:
            return None
        live = self._live
        if not live.prefetch_on or live.prefetch_from != "attention":
            return None
        if mid.numel() > MAX_DECODE_TOKENS * mid.shape[-1]:
            return None
        after = self._folded_after.get(following)
        with _no_grad():
            if after is not None:
                return after(mid)  # [..., E]: the routing copy flattens it
            return self._predict(following, mid)

    def _issue_hook(self, layer: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            scores = self._predicted.pop(layer, None)
            if scores is not None and self._live.prefetch_on:
                self._prefetch_host(layer, scores)

        return hook

    def _predict(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """``layer``'s predicted scores [..., E] from a hidden state [..., H] (on the device).

        Through the folded predictor (norm folded into the router: five ops) where the
        layer's norm is a plain RMS norm, else through the norm module and the router.
        """
        if layer not in self._folded:
            self._folded[layer] = self._fold(layer)
        folded = self._folded[layer]
        if folded is not None:
            return folded(hidden)
        return self._predict_unfolded(layer, hidden.reshape(-1, hidden.shape[-1]))

    def _fold(self, layer: int) -> FoldedRouter | None:
        assert self.spec is not None
        weight, bias = self._router_tensors(layer)
        if weight is None:
            return None
        return fold_router(self._norms.get(layer), weight, self.spec, bias)

    def _predict_unfolded(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """``predict_scores`` through the norm module and the router: [T, E]."""
        assert self.spec is not None
        weight, bias = self._router_tensors(layer)
        assert weight is not None, "a router keeps its weight as a tensor"
        norm = self._norms.get(layer)
        return predict_scores(hidden, weight, self.spec, norm=norm, router_bias=bias)  # [T, E]

    def _router_tensors(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``layer``'s router weight and bias, each None where it is not a tensor."""
        router = self.controller.routers[layer].router
        weight, bias = router.weight, getattr(router, "bias", None)
        return (
            weight if isinstance(weight, torch.Tensor) else None,
            bias if isinstance(bias, torch.Tensor) else None,
        )

    def _prefetch(self, layer: int, hidden: torch.Tensor) -> None:
        """Predict from a layer's output and prefetch (non-MoE previous layers: own read)."""
        scores = self._predict(layer, hidden).cpu().numpy()  # the prediction's own host sync
        self._prefetch_host(layer, scores)

    def _read_ahead(self, layer: int, scores: np.ndarray) -> None:
        """A mapped file: start the disk reads of ``layer``'s predicted top-score experts now,
        a layer before their copies (``_issue_hook``), so the reads overlap this layer's
        experts; the ranking is kept for the copies."""
        if not (self._live.prefetch_on and self.cache.store.reads_ahead_early):
            return
        if scores.shape[0] > MAX_DECODE_TOKENS:
            return
        ranked = self._ranked[layer] = self._top_score_ranked(layer, scores)
        resident = self.cache.resident_list(layer)
        issued = [e for e in ranked if not resident[e]][: self.prefetch_limit]
        self.cache.store.read_ahead([(layer, expert) for expert in issued])

    def _prefetch_host(self, layer: int, scores: np.ndarray) -> None:
        """Copy the predicted top-score experts of ``layer`` that are not resident."""
        resident = self.cache.resident_list(layer)
        ranked = self._ranked.pop(layer, None) or self._top_score_ranked(layer, scores)
        issued = [e for e in ranked if not resident[e]]
        if self.prefetch_limit is not None:
            issued = issued[: self.prefetch_limit]
        if issued:
            self.cache.prefetch([(layer, expert) for expert in issued])
            self.cache.stats.add(layer, prefetched=len(issued))
        self._prefetched[layer] = _PrefetchState(set(issued), set(ranked), resident)

    def _top_score_ranked(self, layer: int, scores: np.ndarray) -> list[int]:
        """Predicted top-score experts of ``layer``, best first (all selected for PhiMoE)."""
        assert self.spec is not None
        if self._one_row(layer, scores):
            return ranked_top(scores[0], self.spec.top_k, self._live.alpha)[0]
        bias = self._bias_host(layer)
        choice = scores if bias is None else scores + bias
        top_idx = model_top_k_host(choice, self.spec)
        bands = self._bands(layer, scores, top_idx, self._live.alpha)
        if bands is not None:
            return top_score_ranked(bands, top_idx)
        picked = choice[np.arange(top_idx.shape[0])[:, None], top_idx]
        order = np.argsort(-picked.reshape(-1), kind="stable")
        return list(dict.fromkeys(int(e) for e in top_idx.reshape(-1)[order]))

    def _account_prefetch(
        self,
        layer: int,
        state: _PrefetchState,
        actual: set[int],
        final: Iterable[int],
    ) -> None:
        """Precision, recall and used copies of the prefetch, once ``layer`` has routed
        (``actual``: its top-score experts; ``final``: the experts it computes)."""
        issued, predicted, before = state.issued, state.predicted_top, state.resident_before
        needed = {e for e in actual if not before[e]}
        used = len(issued.intersection(final)) if issued else 0
        hits = len(issued & needed) if issued else 0
        self.cache.stats.add_prefetch(layer, used, len(predicted), len(needed), hits)
        self.prefetch_account.add(
            len(predicted), len(actual), len(predicted & actual), len(issued), used
        )

    # ----------------------------------------------------------------- CPU assist

    def _source(self, layer: int, experts: Sequence[int]) -> Iterator[list[ExpertWeights]]:
        """The eager path's device experts (ascending): the cache's stream, its copies timed
        for Algorithm 2 while CPU assist is on (the CPU-assisted ones go to the worker)."""
        if not self._live.cpu_assist_on:
            yield from self.cache.stream(layer, experts)  # no cost to measure
            return
        yield from self._timed_stream(layer, list(experts))

    def _cpu_experts(self, layer: int, experts: Sequence[int]) -> set[int]:
        """Algorithm 2 over the layer's missing experts (counted as CPU-computed misses)."""
        live = self._live
        if not live.cpu_assist_on or self._tokens.get(layer, 0) > MAX_DECODE_TOKENS:
            return set()
        resident = self.cache.resident_list(layer)
        missing = [e for e in experts if not resident[e]]
        scores = self._scores.get(layer)
        if not missing or scores is None:
            return set()
        importance = scores[0] if scores.shape[0] == 1 else scores.max(axis=0)  # [E]
        measured = self.cache.copy_seconds_per_expert  # CUDA: copy events; None before/on CPU
        cost_load = measured if measured is not None else self.cost_load.mean
        split = plan(missing, importance[missing].tolist(), cost_load, self.cost_cpu.mean)
        if split.cpu:
            self.cache.stats.add(layer, misses=len(split.cpu), cpu_computed=len(split.cpu))
        return set(split.cpu)

    def _timed_stream(self, layer: int, experts: list[int]) -> Iterator[list[ExpertWeights]]:
        """``cache.stream`` with each chunk's copy time fed to the load cost (CPU devices)."""
        stream = self.cache.stream(layer, experts)
        ordered = sorted(experts)
        done = 0
        while True:
            chunk_keys = ordered[done : done + self.cache.num_slots]
            misses = sum(not self.cache.is_resident((layer, e)) for e in chunk_keys)
            start = time.perf_counter()
            chunk = next(stream, None)
            if chunk is None:
                return
            if misses and self.cache.device.type == "cpu":
                self.cost_load.add(time.perf_counter() - start, misses)
            done += len(chunk)
            yield chunk


def _no_grad() -> AbstractContextManager[Any]:
    """``torch.no_grad()``, or nothing where autograd is off already (the engine's forward
    runs in inference mode: entering the context would be a per-layer cost for nothing)."""
    return torch.no_grad() if torch.is_grad_enabled() else nullcontext()


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)`` without dispatching an op when it has that dtype already."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The model's list of decoder layers (the longest ``*.layers`` module list)."""
    found = [
        module
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers"
    ]
    return max(found, key=len) if found else None
