"""Lower bound on time per decoded token - an UPPER bound on tokens/s - for real geometries.

Measured fractions in (hit rate ``h``, substituted fraction ``s`` of the misses, CPU-computed
fraction ``c`` of the rest), projected seconds out - labelled as projections, never as
measurements (``docs/ANCHORS.md``). Batch 1, with L MoE layers, k experts per token, S bytes
per expert, and the engine's measured host work per layer (``HostCost``: torch ops and host
syncs per layer from ``--count-ops``, seconds per op measured by ``measure_seconds_per_op``):

    T_pcie = (1-h)(1-s)(1-c) * k*L*S / B_pcie
    T_cpu  = (1-h)(1-s) c    * k*L*S / B_dram
    T_gpu  = (non-expert bytes + k*L*S) / B_vram
    T_host = L * (ops_per_layer * seconds_per_op + syncs_per_layer * sync_seconds)
    T_token >= max(T_gpu, T_pcie, T_cpu, T_host) with perfect overlap; their sum with none.

So ``1 / T_token`` is an upper bound on decode tokens/s (``tokens_per_s_upper_bound``): every
term is a floor on time that the real run can only exceed. ``UPPER_BOUND_LABEL`` is the label
reports print, kept next to the formula (a test checks both).

Pure functions; the geometry numbers are constants derived below from each model's published
``config.json`` (hidden size, expert intermediate size, layers, experts, k, attention shapes,
vocabulary), and checked against the published total parameter counts.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

BF16_BYTES = 2
UPPER_BOUND_LABEL = "upper bound on tokens/s (projection: max of link, DRAM, VRAM and host time)"


@dataclass(frozen=True)
class Geometry:
    """The shape of a real MoE model, as far as the projection needs it."""

    name: str
    moe_layers: int
    top_k: int
    experts_per_layer: int
    hidden: int
    expert_intermediate: int
    non_expert_params: int  # embeddings, attention, norms, routers, shared/dense MLPs, LM head
    source: str

    def bytes_per_expert(self, bits: float = 16.0) -> float:
        """SwiGLU expert: gate, up and down projections, 3 x hidden x intermediate weights."""
        return 3 * self.hidden * self.expert_intermediate * bits / 8

    def expert_bytes_per_token(self, bits: float = 16.0) -> float:
        return self.top_k * self.moe_layers * self.bytes_per_expert(bits)

    @property
    def non_expert_bytes(self) -> int:
        return self.non_expert_params * BF16_BYTES


# Non-expert parameters, from each config.json (untied embeddings in all four):
# Mixtral-8x7B (mistralai/Mixtral-8x7B-v0.1): vocab 32000 x 4096 x 2 = 262.1M; attention per
#   layer q,o 4096^2 + k,v 4096x1024 = 41.9M x 32 = 1342.2M; routers 8x4096x32 = 1.0M; norms
#   0.3M -> 1605.6M (+ 45.10B expert = 46.7B published).
# Qwen1.5-MoE-A2.7B (Qwen/Qwen1.5-MoE-A2.7B): vocab 151936 x 2048 x 2 = 622.3M; attention
#   4 x 2048^2 (+ qkv bias) x 24 = 402.8M; shared expert 3 x 2048 x 5632 x 24 = 830.5M; routers
#   60 x 2048 x 24 = 2.9M; norms and shared-expert gates 0.2M -> 1858.7M (+ 12.46B = 14.3B).
# DeepSeek-V2-Lite (deepseek-ai/DeepSeek-V2-Lite): vocab 102400 x 2048 x 2 = 419.4M; MLA per
#   layer q 2048x3072 + kv_a 2048x576 + kv_b 512x4096 + o 2048x2048 = 13.76M x 27 = 371.6M;
#   dense layer 0 MLP 3 x 2048 x 10944 = 67.2M; 2 shared experts 3 x 2048 x 2816 x 26 = 449.8M;
#   routers 64 x 2048 x 26 = 3.4M; norms 0.1M -> 1311.5M (+ 14.39B = 15.7B published).
# Qwen3-30B-A3B (Qwen/Qwen3-30B-A3B): vocab 151936 x 2048 x 2 = 622.3M; attention q,o
#   2048x4096 + k,v 2048x512 = 18.9M x 48 = 906.0M; routers 128 x 2048 x 48 = 12.6M; norms 0.2M
#   -> 1541.1M (+ 28.99B = 30.5B published).
MIXTRAL_8X7B = Geometry(
    "Mixtral-8x7B", 32, 2, 8, 4096, 14336, 1_605_600_000, "mistralai/Mixtral-8x7B-v0.1"
)
QWEN15_MOE_A27B = Geometry(
    "Qwen1.5-MoE-A2.7B", 24, 4, 60, 2048, 1408, 1_858_700_000, "Qwen/Qwen1.5-MoE-A2.7B"
)
DEEPSEEK_V2_LITE = Geometry(
    "DeepSeek-V2-Lite", 26, 6, 64, 2048, 1408, 1_311_500_000, "deepseek-ai/DeepSeek-V2-Lite"
)
QWEN3_30B_A3B = Geometry(
    "Qwen3-30B-A3B", 48, 8, 128, 2048, 768, 1_541_100_000, "Qwen/Qwen3-30B-A3B"
)
GEOMETRIES: tuple[Geometry, ...] = (QWEN15_MOE_A27B, DEEPSEEK_V2_LITE, QWEN3_30B_A3B, MIXTRAL_8X7B)


@dataclass(frozen=True)
class Link:
    """A host-to-device link with its effective pinned bandwidth (ANCHORS.md)."""

    name: str
    bandwidth: float  # bytes per second


LINKS: tuple[Link, ...] = (
    Link("PCIe 3.0 x8", 6.2e9),
    Link("PCIe 4.0 x16", 25e9),
    Link("PCIe 5.0 x16", 56e9),
)


@dataclass(frozen=True)
class Host:
    """The rest of the machine the bound assumes (stated assumptions, not measurements).

    DRAM: dual-channel DDR5, ~65 GB/s (ANCHORS.md). VRAM: 504 GB/s, an RTX 4070 Ti class card
    (vendor specification). Host work: ``HostCost``.
    """

    dram_bandwidth: float = 65e9
    vram_bandwidth: float = 504e9
    host: HostCost | None = None  # None: load_host_cost() (the measured host_cost.json)


@dataclass(frozen=True)
class HostCost:
    """The engine's host time per decoder layer and decoded token.

    ``ops_per_layer`` and ``syncs_per_layer`` are counted (``python -m engine hotpath``: ops
    and syncs per decoded token divided by the model's layers); ``seconds_per_op`` is the
    host time of one tiny eager op (``measure_seconds_per_op``: dispatch only, no kernel
    launch, so on a GPU the real cost is higher and the bound stays a bound). ``sync_seconds``
    is the stated cost of one device round trip.
    """

    ops_per_layer: float
    syncs_per_layer: float
    seconds_per_op: float
    sync_seconds: float = 10e-6

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value < 0:
                raise ValueError(f"{name} must be non-negative; got {value}")

    def seconds(self, layers: int) -> float:
        return layers * (
            self.ops_per_layer * self.seconds_per_op + self.syncs_per_layer * self.sync_seconds
        )

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> HostCost:
        """The cost recorded in a ``host_cost.json`` (``host_cost_document``)."""
        fields = ("ops_per_layer", "syncs_per_layer", "seconds_per_op", "sync_seconds")
        missing = [name for name in fields[:3] if name not in document]
        if missing:
            raise ValueError(f"a host cost document needs {', '.join(missing)}")
        return cls(**{name: float(document[name]) for name in fields if name in document})


# The measurement the projection charges when no ``host_cost.json`` is given: written by
# `python -m engine hotpath --threads 1 --host-cost docs/benchmarks/host_cost.json` (ops and
# syncs of `smoe <f> a<alpha> grouped` per MoE layer, seconds per op measured on the same
# device by `measure_seconds_per_op`); `scripts/gpu-check.sh` writes the CUDA one.
HOST_COST_FILE = Path(__file__).resolve().parents[2] / "docs" / "benchmarks" / "host_cost.json"
# Used only when that file is absent (an installed engine without the repository's docs):
# the 2026-11-28 measurement, built-in 5-layer model, x86_64 VM with 2 shared cores.
FALLBACK_HOST_COST = HostCost(ops_per_layer=643 / 5, syncs_per_layer=10 / 5, seconds_per_op=13e-6)


def load_host_cost(path: Path | None = None) -> HostCost:
    """The host cost in ``path`` (default ``HOST_COST_FILE``), else ``FALLBACK_HOST_COST``."""
    return read_host_cost(path)[0]


def read_host_cost(path: Path | None = None) -> tuple[HostCost, str]:
    """The host cost in ``path`` (default ``HOST_COST_FILE``) and where it was measured, in
    words for a report; ``FALLBACK_HOST_COST`` and its origin when the file is absent.

    Raises ``ValueError`` for a file that is not a host cost document (bad JSON included).
    """
    path = HOST_COST_FILE if path is None else path
    if not path.is_file():
        return FALLBACK_HOST_COST, FALLBACK_ORIGIN
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON: {error}") from error
    if not isinstance(document, dict):
        raise ValueError(f"{path} is not a host cost document (a JSON object)")
    return HostCost.from_document(document), _origin(path, document)


FALLBACK_ORIGIN = "the stated fallback (no host_cost.json): 2026-11-28, built-in 5-layer model, CPU"


def _origin(path: Path, document: dict[str, Any]) -> str:
    """``path`` and the run the document names (command, configuration, device, date)."""
    keys = ("configuration", "device", "machine", "date")
    run = ", ".join(str(document[key]) for key in keys if document.get(key))
    command = f" by `{document['command']}`" if document.get("command") else ""
    return f"`{path.name}`" + (f", measured{command} ({run})" if run or command else "")


def host_cost_document(
    ops_per_token: float,
    syncs_per_token: float,
    moe_layers: int,
    seconds_per_op: float,
    source: dict[str, Any],
) -> dict[str, Any]:
    """What ``host_cost.json`` records: per-layer counts, the per-op time, and where from."""
    if moe_layers < 1:
        raise ValueError(f"moe_layers must be at least 1; got {moe_layers}")
    return {
        "ops_per_layer": ops_per_token / moe_layers,
        "syncs_per_layer": syncs_per_token / moe_layers,
        "seconds_per_op": seconds_per_op,
        **source,
    }


def measure_seconds_per_op(repeats: int = 5000, device: str = "cpu") -> float:
    """Host seconds of one eager torch op on a one-element tensor (best of three runs).

    On a CUDA device each op is also a kernel launch, and the device is synchronised at the
    end of each run, so the figure is what a decode step's ops cost the host there.
    """
    x = torch.zeros(1, device=device)
    best = float("inf")
    for _ in range(3):
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            x.add_(1.0)
        _synchronize(device)
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Fractions:
    """Measured routing outcome: hit rate, substituted share of misses, CPU share of the rest."""

    hit: float
    substituted: float = 0.0
    cpu: float = 0.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} fraction must be in [0, 1]; got {value}")

    @property
    def copied(self) -> float:
        """Share of all expert uses that cross the link."""
        return (1 - self.hit) * (1 - self.substituted) * (1 - self.cpu)

    @property
    def cpu_computed(self) -> float:
        """Share of all expert uses computed on the CPU."""
        return (1 - self.hit) * (1 - self.substituted) * self.cpu


def fractions_from_counts(
    hits: int, substitutions: int, loads: int, cpu_computed: int
) -> Fractions:
    """Fractions from counts of expert uses: cache hits, substitutions, copies, CPU runs."""
    counts = (hits, substitutions, loads, cpu_computed)
    if min(counts) < 0:
        raise ValueError(f"counts must be non-negative; got {counts}")
    total = sum(counts)
    if total == 0:
        raise ValueError("no expert uses were counted")
    misses = substitutions + loads + cpu_computed
    rest = loads + cpu_computed
    return Fractions(
        hit=hits / total,
        substituted=substitutions / misses if misses else 0.0,
        cpu=cpu_computed / rest if rest else 0.0,
    )


@dataclass(frozen=True)
class Projection:
    """Projected seconds per decoded token: a floor on time, so 1/time bounds tokens/s above."""

    geometry: str
    link: str
    pcie_s: float
    cpu_s: float
    gpu_s: float
    host_s: float = 0.0

    @property
    def overlapped_s(self) -> float:
        return max(self.pcie_s, self.cpu_s, self.gpu_s, self.host_s)

    @property
    def serial_s(self) -> float:
        return self.pcie_s + self.cpu_s + self.gpu_s + self.host_s

    @property
    def tokens_per_s_upper_bound(self) -> float:
        """``UPPER_BOUND_LABEL``: no run of this geometry decodes faster than this."""
        return 1.0 / self.overlapped_s


def project(
    geometry: Geometry,
    link: Link,
    fractions: Fractions,
    host: Host | None = None,
    bits: float = 16.0,
) -> Projection:
    """The floor on time per token for one geometry over one link (see the module formula)."""
    host = host or Host()
    expert_bytes = geometry.expert_bytes_per_token(bits)  # k * L * S
    gpu = (geometry.non_expert_bytes + expert_bytes) / host.vram_bandwidth
    cost = host.host if host.host is not None else load_host_cost()
    return Projection(
        geometry=geometry.name,
        link=link.name,
        pcie_s=fractions.copied * expert_bytes / link.bandwidth,
        cpu_s=fractions.cpu_computed * expert_bytes / host.dram_bandwidth,
        gpu_s=gpu,
        host_s=cost.seconds(geometry.moe_layers),
    )


def project_all(
    fractions: Fractions,
    geometries: tuple[Geometry, ...] = GEOMETRIES,
    links: tuple[Link, ...] = LINKS,
    host: Host | None = None,
) -> list[Projection]:
    """One projection per geometry and link, in table order."""
    return [project(g, link, fractions, host) for g in geometries for link in links]


def render(projections: list[Projection], cost: HostCost) -> str:
    """A markdown table of the tok/s bound per geometry and link, and the host cost used."""
    lines = [
        f"{UPPER_BOUND_LABEL[:1].upper()}{UPPER_BOUND_LABEL[1:]}; host cost "
        f"{cost.ops_per_layer:.1f} ops and {cost.syncs_per_layer:.1f} syncs per MoE layer at "
        f"{cost.seconds_per_op * 1e6:.1f} us per op.",
        "",
        "| geometry | link | tok/s upper bound | host ms/token | link ms/token |",
        "|---|---|---:|---:|---:|",
    ]
    for p in projections:
        lines.append(
            f"| {p.geometry} | {p.link} | {p.tokens_per_s_upper_bound:.1f} "
            f"| {p.host_s * 1e3:.2f} | {p.pcie_s * 1e3:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m engine.eval.projection``: the bound re-rendered from a measured host cost."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m engine.eval.projection", description=main.__doc__
    )
    parser.add_argument("--host-cost", type=Path, help=f"host_cost.json (default {HOST_COST_FILE})")
    parser.add_argument("--hit", type=float, default=0.5, help="cache hit fraction of expert uses")
    parser.add_argument(
        "--substituted", type=float, default=0.0, help="substituted share of misses"
    )
    parser.add_argument("--cpu", type=float, default=0.0, help="CPU-computed share of the rest")
    args = parser.parse_args(argv)
    if args.host_cost is not None and not args.host_cost.is_file():
        parser.error(f"no host cost file at {args.host_cost}")
    try:
        fractions = Fractions(args.hit, args.substituted, args.cpu)
    except ValueError as error:
        parser.error(str(error))
    cost = load_host_cost(args.host_cost)
    print(render(project_all(fractions, host=Host(host=cost)), cost))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
