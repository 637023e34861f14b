"""Feasibility checks: each returns None when the node may take the instance, else a reason.

They run in order and the first reason is reported, so cheap, obvious reasons come first.
"""

from __future__ import annotations

from collections.abc import Callable

from infra.config.model import ExperimentSpec, NodeConfig
from infra.placement.snapshot import Condition, Snapshot, demand_on

Check = Callable[[Snapshot, NodeConfig, ExperimentSpec], "str | None"]


def _gb(value: float) -> str:
    return f"{value:.4g} GB"


def node_enabled(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> str | None:
    return None if node.enabled else "disabled in the cluster config"


def node_healthy(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> str | None:
    cond = snap.conditions[node.name]
    if cond.condition in (Condition.HEALTHY, Condition.UNKNOWN):
        return None
    return f"{cond.condition.value}" + (f": {cond.reason}" if cond.reason else "")


def below_max_instances(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> str | None:
    count = snap.load(node.name).count
    if count < node.max_instances:
        return None
    return f"full ({count}/{node.max_instances} instances)"


def gpu_present(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> str | None:
    if spec.gpu_required and not node.gpu:
        return "has no GPU"
    return None


def ram_fits(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> str | None:
    need = demand_on(node, spec).ram_gb
    free = snap.free_ram_gb(node)
    if need <= free + 1e-9:
        return None
    what = "memory (RAM + GPU, unified)" if node.unified_memory and spec.gpu_required else "RAM"
    return (f"not enough {what}: needs {_gb(need)}, {_gb(max(free, 0.0))} free "
            f"of {_gb(node.available_ram_gb)}")


def gpu_memory_fits(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> str | None:
    if not spec.gpu_required or not node.gpu or node.unified_memory:
        return None  # no GPU: gpu_present says so; unified: ram_fits checked the one pool
    free = snap.free_gpu_memory_gb(node)
    if spec.gpu_memory_gb <= free + 1e-9:
        return None
    return (f"not enough GPU memory: needs {_gb(spec.gpu_memory_gb)}, "
            f"{_gb(max(free, 0.0))} free of {_gb(node.gpu_memory_gb)}")


def cpu_fits(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> str | None:
    if spec.cpu_cores <= 0:
        return None
    free = node.cpu_cores - snap.load(node.name).cpu_cores
    if spec.cpu_cores <= free + 1e-9:
        return None
    return (f"not enough CPU cores: needs {spec.cpu_cores:g}, {max(free, 0.0):g} free "
            f"of {node.cpu_cores}")


def anti_affinity(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> str | None:
    """Symmetric: A anti B keeps B away from A's node as well as A away from B's."""
    here = snap.load(node.name).instance_ids
    for peer in spec.anti_affinity:
        if peer in here:
            return f"anti-affinity: {peer} is already there"
    for peer_id in sorted(here):
        other = snap.specs.get(peer_id)
        if other is not None and spec.experiment_id in other.anti_affinity:
            return f"anti-affinity: {peer_id} (already there) must not share a node with it"
    return None


DEFAULT_CHECKS: tuple[tuple[str, Check], ...] = (
    ("enabled", node_enabled),
    ("healthy", node_healthy),
    ("max_instances", below_max_instances),
    ("gpu", gpu_present),
    ("ram", ram_fits),
    ("gpu_memory", gpu_memory_fits),
    ("cpu", cpu_fits),
    ("anti_affinity", anti_affinity),
)


def first_rejection(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec,
                    checks: tuple[tuple[str, Check], ...] = DEFAULT_CHECKS) -> str | None:
    for _name, check in checks:
        reason = check(snap, node, spec)
        if reason is not None:
            return reason
    return None


def all_rejections(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec,
                   checks: tuple[tuple[str, Check], ...] = DEFAULT_CHECKS) -> tuple[str, ...]:
    """Every failing check (used to warn about forced pins)."""
    return tuple(r for _n, c in checks if (r := c(snap, node, spec)) is not None)
