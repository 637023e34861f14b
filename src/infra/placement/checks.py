"""Feasibility checks: each returns None when the node may take the instance, else a reason.

They run in order and the first reason is reported, so cheap, obvious reasons come first.
"""

from __future__ import annotations

from collections.abc import Callable

from infra.config.model import ExperimentSpec, NodeConfig, Operator
from infra.placement.allocation import choose_devices
from infra.placement.constraints import rejection
from infra.placement.snapshot import Snapshot, demand_on

Check = Callable[[Snapshot, NodeConfig, ExperimentSpec], "str | None"]


def _gb(value: float) -> str:
    return f"{value:.4g} GB"


def node_enabled(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> str | None:
    return None if node.enabled else "disabled in the cluster config"


def node_eligible(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> str | None:
    """``scheduling_eligible: false`` keeps new work off a node (cordon)."""
    return None if node.scheduling_eligible else "not eligible for scheduling " \
        "(scheduling_eligible: false)"


def node_healthy(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> str | None:
    """Only HEALTHY (or not probed) nodes take work: "draining: GPU driver update"."""
    cond = snap.conditions[node.name]
    if cond.condition.schedulable:
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


def disk_fits(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> str | None:
    """Requested disk against the node's declared (or probed free) disk; unknown: no check."""
    need = spec.resources.disk_gb
    if need <= 0:
        return None
    free = snap.free_disk_gb(node)
    if free is None or need <= free + 1e-9:
        return None
    total = snap.inventory(node).disk_gb or 0.0
    return f"not enough disk: needs {_gb(need)}, {_gb(max(free, 0.0))} free of {_gb(total)}"


def constraints_met(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> str | None:
    """Global (``placement.constraints``) then the spec's own; tags by the subset rule."""
    if not snap.constraints and not spec.constraints:
        return None
    attrs = snap.inventory(node).attributes
    for c in snap.constraints:
        why = rejection(c, attrs, scope="placement ")
        if why is not None:
            return why
    for c in spec.constraints:
        why = rejection(c, attrs)
        if why is not None:
            return why
    return None


def _distinct(snap: Snapshot, spec: ExperimentSpec) -> bool:
    """Whether distinct_hosts applies to ``spec``: its own setting, else the global one."""
    for source in (spec.constraints, snap.constraints):
        for c in source:
            if c.operator is Operator.DISTINCT_HOSTS:
                return c.value in (None, "true")
    return False


def distinct_hosts(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> str | None:
    """Instances under distinct_hosts never share a node with each other (this plan only)."""
    if (not snap.constraints and not spec.constraints) or not _distinct(snap, spec):
        return None
    for peer_id in sorted(snap.load(node.name).instance_ids - snap.occupied_ids):
        peer = snap.specs.get(peer_id)
        if peer is not None and peer_id != spec.experiment_id and _distinct(snap, peer):
            return f"distinct_hosts: {peer_id} is already there"
    return None


def runtime_driver_available(snap: Snapshot, node: NodeConfig,
                             spec: ExperimentSpec) -> str | None:
    driver = spec.resources.runtime_driver
    if driver is None:
        return None
    have = snap.inventory(node).runtime_drivers
    if driver in have:
        return None
    return (f"runtime driver {driver} not available "
            f"(has {', '.join(sorted(have)) if have else 'none'})")


def volumes_available(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> str | None:
    """Each volume's source must be an advertised host path of the node (or beneath one)."""
    inv = snap.inventory(node)
    for v in spec.resources.volumes:
        if not inv.has_path(v.source):
            have = ", ".join(inv.host_paths) if inv.host_paths else "none"
            return f"volume {v.name}: no host path {v.source} (advertises {have})"
    return None


def devices_available(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> str | None:
    """Requested devices matched by id, none held by another instance (or run)."""
    if not spec.resources.devices:
        return None
    _chosen, reason = choose_devices(snap.inventory(node).devices, spec.resources.devices,
                                     snap.devices_held_on(node.name))
    return reason


def ports_free(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> str | None:
    """Explicit ports: not held on the node, and not its SSH or monitor port."""
    held = snap.ports_held_on(node.name)
    for p in spec.resources.ports:
        holder = held.get(p.port)
        if holder is not None and holder.instance_id != spec.experiment_id:
            return f"port {p.port} held by {holder.describe()}"
        if p.port == node.monitor_port:
            return f"port {p.port} is the node's monitor_port"
        if p.port == node.ssh_port and not node.is_local:
            return f"port {p.port} is the node's SSH port"
    return None


def anti_affinity(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec) -> str | None:
    """Symmetric: A anti B keeps B away from A's node as well as A away from B's."""
    here = snap.load(node.name).instance_ids
    for peer in spec.anti_affinity:
        if peer in here:
            return f"anti-affinity: {peer} is already there"
    against = snap.anti_of.get(spec.experiment_id)
    if against:
        for peer_id in sorted(here & against):
            return f"anti-affinity: {peer_id} (already there) must not share a node with it"
    return None


# Static properties of the node first (they explain the most), then capacity, then
# conflicts with what is already placed.
DEFAULT_CHECKS: tuple[tuple[str, Check], ...] = (
    ("enabled", node_enabled),
    ("eligible", node_eligible),
    ("healthy", node_healthy),
    ("gpu", gpu_present),
    ("constraints", constraints_met),
    ("runtime_driver", runtime_driver_available),
    ("volumes", volumes_available),
    ("max_instances", below_max_instances),
    ("ram", ram_fits),
    ("gpu_memory", gpu_memory_fits),
    ("cpu", cpu_fits),
    ("disk", disk_fits),
    ("devices", devices_available),
    ("ports", ports_free),
    ("anti_affinity", anti_affinity),
    ("distinct_hosts", distinct_hosts),
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
