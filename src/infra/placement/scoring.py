"""Scorers per strategy, each returning a named ``ScorePart``.

``score`` (default) is the reference points system: RAM efficiency 30/20/10, load balance
0..20, GPU match 15/5/0, affinity 0..25 and preferred node 10 -- exactly as reference 003
defines them. ``binpack`` and ``spread`` are Nomad's fit over CPU and memory normalized to the
node, after the instance is added: binpack rewards fuller nodes, spread emptier ones. Each
resource gives 0..32.5 points, plus the same affinity and preferred-node parts: 0..100 in all.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from infra.config.model import ExperimentSpec, NodeConfig, Strategy
from infra.placement.snapshot import Snapshot, demand_on


@dataclass(frozen=True)
class ScorePart:
    """One named contribution to a node's score, with a human-readable why."""

    name: str
    points: float
    detail: str


Scorer = Callable[[Snapshot, NodeConfig, ExperimentSpec], ScorePart]
Points = Callable[[Snapshot, NodeConfig, ExperimentSpec], float]


def ram_efficiency_points(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> float:
    """``ram_efficiency``'s points without its detail text (the planner's fast path)."""
    need = demand_on(node, spec).ram_gb
    free = snap.free_ram_gb(node)
    util = need / free if free > 0 else float("inf")
    return 30.0 if 0.3 <= util <= 0.7 else 20.0 if util < 0.3 else 10.0


def load_balance_points(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> float:
    """``load_balance``'s points without its detail text."""
    return max(0.0, 20.0 * (1.0 - snap.load(node.name).count / node.max_instances))


def gpu_match_points(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> float:
    """``gpu_match``'s points without its detail text."""
    if spec.gpu_required and node.gpu:
        return 15.0
    return 5.0 if not spec.gpu_required and not node.gpu else 0.0


def affinity_points(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> float:
    """``affinity``'s points without its detail text."""
    here = snap.load(node.name).instance_ids
    return min(25.0, 10.0 * sum(1 for p in spec.affinity if p in here))


def preferred_node_points(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> float:
    """``preferred_node``'s points without its detail text."""
    return 10.0 if spec.preferred_node == node.name else 0.0


def ram_efficiency(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> ScorePart:
    """30 when the instance uses 30-70% of the node's free RAM, 20 below, 10 above."""
    need = demand_on(node, spec).ram_gb
    free = snap.free_ram_gb(node)
    util = need / free if free > 0 else float("inf")
    pct = f"{need:.4g}/{free:.4g} GB = {util:.0%}"
    if 0.3 <= util <= 0.7:
        return ScorePart("ram_efficiency", 30.0, f"{pct} (optimal 30-70%)")
    if util < 0.3:
        return ScorePart("ram_efficiency", 20.0, f"{pct} (below 30%: wasteful)")
    return ScorePart("ram_efficiency", 10.0, f"{pct} (above 70%: tight)")


def load_balance(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> ScorePart:
    """20 * (1 - current/max_instances), never below 0 (a forced pin may overfill a node)."""
    count = snap.load(node.name).count
    points = max(0.0, 20.0 * (1.0 - count / node.max_instances))
    return ScorePart("load_balance", points, f"{count}/{node.max_instances} instances")


def gpu_match(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> ScorePart:
    """15 for a GPU job on a GPU node, 5 for a CPU job on a CPU node, else 0."""
    if spec.gpu_required and node.gpu:
        return ScorePart("gpu_match", 15.0, "GPU job on a GPU node")
    if not spec.gpu_required and not node.gpu:
        return ScorePart("gpu_match", 5.0, "CPU job on a CPU node")
    return ScorePart("gpu_match", 0.0, "CPU job on a GPU node")


def affinity(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> ScorePart:
    """min(25, 10 per affinity peer already on the node)."""
    here = snap.load(node.name).instance_ids
    peers = [p for p in spec.affinity if p in here]
    points = min(25.0, 10.0 * len(peers))
    detail = f"peers here: {', '.join(peers)}" if peers else "no affinity peers here"
    return ScorePart("affinity", points, detail)


def preferred_node(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> ScorePart:
    """+10 on the spec's preferred node."""
    if spec.preferred_node == node.name:
        return ScorePart("preferred_node", 10.0, "preferred node")
    return ScorePart("preferred_node", 0.0, "")


REFERENCE_SCORERS: tuple[Scorer, ...] = (
    ram_efficiency, load_balance, gpu_match, affinity, preferred_node,
)


FIT_POINTS = 32.5  # per resource: CPU and memory together 65, + affinity 25 + preferred 10


def _free_fractions(snap: Snapshot, node: NodeConfig,
                    spec: ExperimentSpec) -> tuple[float, str, float, str]:
    """Free CPU and memory fractions of the node once the instance is on it, with details."""
    load = snap.load(node.name)
    cpu_used = load.cpu_cores + spec.cpu_cores
    cpu_free = 1.0 - cpu_used / node.cpu_cores if node.cpu_cores > 0 else 0.0
    mem_used = load.ram_gb + demand_on(node, spec).ram_gb
    cap = node.available_ram_gb
    mem_free = 1.0 - mem_used / cap if cap > 0 else 0.0
    cpu_free = min(1.0, max(0.0, cpu_free))
    mem_free = min(1.0, max(0.0, mem_free))
    cpu_detail = f"{cpu_used:.4g}/{node.cpu_cores} cores used after placement"
    mem_detail = f"{mem_used:.4g}/{cap:.4g} GB used after placement"
    return cpu_free, cpu_detail, mem_free, mem_detail


def _binpack_points(free: float) -> float:
    """Nomad's binpack term: 10 - 10^free, 0 (empty) .. 9 (full), scaled to FIT_POINTS."""
    return (10.0 - math.pow(10.0, free)) / 9.0 * FIT_POINTS


def _spread_points(free: float) -> float:
    """Nomad's spread term: 10^free - 1, 0 (full) .. 9 (empty), scaled to FIT_POINTS."""
    return (math.pow(10.0, free) - 1.0) / 9.0 * FIT_POINTS


def binpack_cpu(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> ScorePart:
    """More points the fuller the node's CPU would be."""
    free, detail, _, _ = _free_fractions(snap, node, spec)
    return ScorePart("binpack_cpu", _binpack_points(free), detail)


def _fit_fractions(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> tuple[float, float]:
    """``_free_fractions`` without the detail text (same arithmetic, same floats)."""
    load = snap.load(node.name)
    cpu_used = load.cpu_cores + spec.cpu_cores
    cpu_free = 1.0 - cpu_used / node.cpu_cores if node.cpu_cores > 0 else 0.0
    mem_used = load.ram_gb + demand_on(node, spec).ram_gb
    cap = node.available_ram_gb
    mem_free = 1.0 - mem_used / cap if cap > 0 else 0.0
    return min(1.0, max(0.0, cpu_free)), min(1.0, max(0.0, mem_free))


def binpack_cpu_points(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> float:
    """``binpack_cpu``'s points without its detail text."""
    return _binpack_points(_fit_fractions(snap, node, spec)[0])


def binpack_memory_points(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> float:
    """``binpack_memory``'s points without its detail text."""
    return _binpack_points(_fit_fractions(snap, node, spec)[1])


def spread_cpu_points(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> float:
    """``spread_cpu``'s points without its detail text."""
    return _spread_points(_fit_fractions(snap, node, spec)[0])


def spread_memory_points(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> float:
    """``spread_memory``'s points without its detail text."""
    return _spread_points(_fit_fractions(snap, node, spec)[1])


def binpack_memory(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> ScorePart:
    """More points the fuller the node's memory would be."""
    _, _, free, detail = _free_fractions(snap, node, spec)
    return ScorePart("binpack_memory", _binpack_points(free), detail)


def spread_cpu(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> ScorePart:
    """More points the emptier the node's CPU would stay."""
    free, detail, _, _ = _free_fractions(snap, node, spec)
    return ScorePart("spread_cpu", _spread_points(free), detail)


def spread_memory(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> ScorePart:
    """More points the emptier the node's memory would stay."""
    _, _, free, detail = _free_fractions(snap, node, spec)
    return ScorePart("spread_memory", _spread_points(free), detail)


BINPACK_SCORERS: tuple[Scorer, ...] = (binpack_cpu, binpack_memory, affinity, preferred_node)
SPREAD_SCORERS: tuple[Scorer, ...] = (spread_cpu, spread_memory, affinity, preferred_node)

STRATEGIES: dict[Strategy, tuple[Scorer, ...]] = {
    Strategy.SCORE: REFERENCE_SCORERS,
    Strategy.BINPACK: BINPACK_SCORERS,
    Strategy.SPREAD: SPREAD_SCORERS,
}

# Each scorer's points-only twin: the planner judges nodes with these and builds the
# ScoreParts (with their detail text) only for the node it picks, or when asked to explain.
POINTS: dict[Scorer, Points] = {
    ram_efficiency: ram_efficiency_points,
    load_balance: load_balance_points,
    gpu_match: gpu_match_points,
    affinity: affinity_points,
    preferred_node: preferred_node_points,
    binpack_cpu: binpack_cpu_points,
    binpack_memory: binpack_memory_points,
    spread_cpu: spread_cpu_points,
    spread_memory: spread_memory_points,
}
