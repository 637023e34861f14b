"""The reference points system: five named scorers, each returning a ``ScorePart``.

RAM efficiency 30/20/10, load balance 0..20, GPU match 15/5/0, affinity 0..25 and
preferred node 10 -- exactly as reference 003 defines them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from infra.config.model import ExperimentSpec, NodeConfig
from infra.placement.snapshot import Snapshot, demand_on


@dataclass(frozen=True)
class ScorePart:
    """One named contribution to a node's score, with a human-readable why."""

    name: str
    points: float
    detail: str


Scorer = Callable[[Snapshot, NodeConfig, ExperimentSpec], ScorePart]


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
    """20 * (1 - current/max_instances)."""
    count = snap.load(node.name).count
    points = 20.0 * (1.0 - count / node.max_instances)
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
