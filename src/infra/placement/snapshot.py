"""Immutable view of the cluster that placement decides over.

A ``Snapshot`` holds the nodes in topology order, what is known of their condition, their
inventories (devices, paths, drivers, attributes), what is already placed on them and which
device ids and ports are held; ``with_placement`` returns a new snapshot, never mutates.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from infra.config.model import Cluster, Constraint, ExperimentSpec, NodeConfig
from infra.placement.allocation import (
    MB_PER_GB,
    Allocation,
    Holder,
    VolumeAllocation,
    choose_devices,
    cuda_ids,
)
from infra.placement.inventory import NodeInventory, node_inventory
from infra.probe.facts import NodeFacts


class Condition(str, enum.Enum):
    """What placement knows of a node. UNKNOWN means "not probed" (dry runs).

    Only HEALTHY and UNKNOWN nodes receive new work; MAINTENANCE, DRAINING, DISCONNECTED,
    OFFLINE and QUARANTINED are the cluster-guide node states that never do.
    """

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNAVAILABLE = "unavailable"
    UNKNOWN = "unknown"
    MAINTENANCE = "maintenance"
    DRAINING = "draining"
    DISCONNECTED = "disconnected"
    OFFLINE = "offline"
    QUARANTINED = "quarantined"

    @property
    def schedulable(self) -> bool:
        """True when the node may receive new placements."""
        return self in (Condition.HEALTHY, Condition.UNKNOWN)

    @property
    def unreachable(self) -> bool:
        """True when nothing can be started there at all (not even a ``--force`` pin)."""
        return self in (Condition.UNAVAILABLE, Condition.DISCONNECTED, Condition.OFFLINE)


@dataclass(frozen=True)
class NodeCondition:
    """A node's condition and the reason behind it (shown in why-not messages)."""

    condition: Condition
    reason: str = ""


@dataclass(frozen=True)
class Demand:
    """What one instance takes from a node once placed there."""

    instance_id: str
    ram_gb: float
    gpu_memory_gb: float
    cpu_cores: float
    disk_gb: float = 0.0


@dataclass(frozen=True)
class NodeLoad:
    """What is already committed on a node; totals are kept as instances are added."""

    instances: tuple[Demand, ...] = ()
    ram_gb: float = 0.0
    gpu_memory_gb: float = 0.0
    cpu_cores: float = 0.0
    disk_gb: float = 0.0
    instance_ids: frozenset[str] = frozenset()

    @property
    def count(self) -> int:
        return len(self.instances)

    def add(self, d: Demand) -> NodeLoad:
        """This load with one more instance (running totals: placement asks for them often)."""
        return NodeLoad(instances=(*self.instances, d), ram_gb=self.ram_gb + d.ram_gb,
                        gpu_memory_gb=self.gpu_memory_gb + d.gpu_memory_gb,
                        cpu_cores=self.cpu_cores + d.cpu_cores, disk_gb=self.disk_gb + d.disk_gb,
                        instance_ids=self.instance_ids | {d.instance_id})


def demand_on(node: NodeConfig, spec: ExperimentSpec) -> Demand:
    """The instance's demand on this node; unified-memory nodes draw RAM and GPU from one pool."""
    gpu_mem = spec.gpu_memory_gb if spec.gpu_required else 0.0
    disk = spec.resources.disk_gb
    if node.unified_memory:
        return Demand(spec.experiment_id, spec.ram_gb + gpu_mem, 0.0, spec.cpu_cores, disk)
    return Demand(spec.experiment_id, spec.ram_gb, gpu_mem, spec.cpu_cores, disk)


def _anti_index(specs: Iterable[ExperimentSpec]) -> Mapping[str, frozenset[str]]:
    index: dict[str, set[str]] = {}
    for s in specs:
        for peer in s.anti_affinity:
            index.setdefault(peer, set()).add(s.experiment_id)
    return MappingProxyType({k: frozenset(v) for k, v in index.items()})


def _empty() -> Mapping[str, Holder]:
    return MappingProxyType({})


@dataclass(frozen=True)
class Snapshot:
    """Nodes (topology order), conditions, inventories, loads, holders, instance -> node."""

    nodes: tuple[NodeConfig, ...]
    conditions: Mapping[str, NodeCondition]
    loads: Mapping[str, NodeLoad]
    placed: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    specs: Mapping[str, ExperimentSpec] = field(default_factory=lambda: MappingProxyType({}))
    inventories: Mapping[str, NodeInventory] = field(
        default_factory=lambda: MappingProxyType({}))
    constraints: tuple[Constraint, ...] = ()  # placement.constraints: apply to every instance
    devices_held: Mapping[str, Mapping[str, Holder]] = field(
        default_factory=lambda: MappingProxyType({}))
    ports_held: Mapping[str, Mapping[int, Holder]] = field(
        default_factory=lambda: MappingProxyType({}))
    allocations: Mapping[str, Allocation] = field(default_factory=lambda: MappingProxyType({}))
    occupied_ids: frozenset[str] = frozenset()  # instances of other runs (not this plan)
    # instance id -> ids of the specs that name it in anti_affinity (the symmetric side)
    anti_of: Mapping[str, frozenset[str]] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def build(cls, cluster: Cluster, specs: Iterable[ExperimentSpec],
              conditions: Mapping[str, NodeCondition] | None = None,
              preferences: tuple[str, ...] = (),
              facts: Mapping[str, NodeFacts] | None = None) -> Snapshot:
        """Start from an empty cluster. ``preferences`` reorders nodes for tie-breaking;
        ``facts`` (probe results by node) refine the inventories."""
        order = {name: i for i, name in enumerate(preferences)}
        # preferred nodes first, the rest in topology order (position, not .index(): that
        # compares whole node configs and made this quadratic)
        ranked = sorted(enumerate(cluster.nodes),
                        key=lambda pn: (order.get(pn[1].name, len(order)), pn[0]))
        nodes = tuple(n for _pos, n in ranked)
        conds = {n.name: (conditions or {}).get(n.name, NodeCondition(Condition.UNKNOWN))
                 for n in nodes}
        probed = facts or {}
        by_id = {s.experiment_id: s for s in specs}
        return cls(nodes=nodes,
                   conditions=MappingProxyType(conds),
                   loads=MappingProxyType({n.name: NodeLoad() for n in nodes}),
                   specs=MappingProxyType(by_id),
                   anti_of=_anti_index(by_id.values()),
                   inventories=MappingProxyType(
                       {n.name: node_inventory(n, probed.get(n.name)) for n in nodes}),
                   constraints=cluster.placement.constraints)

    def load(self, node: str) -> NodeLoad:
        return self.loads[node]

    def inventory(self, node: NodeConfig) -> NodeInventory:
        """The node's inventory (built from its config alone if the snapshot has none)."""
        inv = self.inventories.get(node.name)
        return inv if inv is not None else node_inventory(node)

    def free_ram_gb(self, node: NodeConfig) -> float:
        return node.available_ram_gb - self.loads[node.name].ram_gb

    def free_gpu_memory_gb(self, node: NodeConfig) -> float:
        return node.gpu_memory_gb - self.loads[node.name].gpu_memory_gb

    def free_disk_gb(self, node: NodeConfig) -> float | None:
        """Disk left for new work, or None when the node's disk is unknown."""
        total = self.inventory(node).disk_gb
        return None if total is None else total - self.loads[node.name].disk_gb

    def devices_held_on(self, node: str) -> Mapping[str, Holder]:
        return self.devices_held.get(node, _empty())

    def ports_held_on(self, node: str) -> Mapping[int, Holder]:
        return self.ports_held.get(node, MappingProxyType({}))

    def allocate(self, node: NodeConfig, spec: ExperimentSpec) -> tuple[Allocation, str | None]:
        """The allocation ``spec`` would get on ``node`` now, and why it is short if it is.

        Devices: first free matches in node order; when some cannot be had the allocation
        holds what could be (a forced pin still records its ports, volumes and driver).
        """
        res = spec.resources
        inv = self.inventory(node)
        chosen, reason = choose_devices(inv.devices, res.devices,
                                        self.devices_held_on(node.name))
        alloc = Allocation(
            instance_id=spec.experiment_id,
            node=node.name,
            device_ids=tuple(d.id for d in chosen),
            gpu_ids=cuda_ids(chosen),
            ports=tuple((p.label, p.port) for p in res.ports),
            volumes=tuple(VolumeAllocation(v.name, v.source, v.target, v.mode.value)
                          for v in res.volumes),
            runtime_driver=res.runtime_driver,
            cpu_cores=spec.cpu_cores,
            memory_mb=spec.ram_gb * MB_PER_GB,
            disk_mb=res.disk_gb * MB_PER_GB,
        )
        return alloc, reason

    def with_placement(self, spec: ExperimentSpec, node: NodeConfig,
                       allocation: Allocation | None = None, *,
                       occupied: bool = False) -> Snapshot:
        """A new snapshot with ``spec`` on ``node``; its devices and ports become held.

        ``allocation`` defaults to what ``allocate`` picks; ``occupied`` marks work of
        another run (it holds capacity but is not one of this plan's instances).
        """
        if allocation is None:
            allocation, _ = self.allocate(node, spec)
        loads = dict(self.loads)
        old = loads[node.name]
        loads[node.name] = old.add(demand_on(node, spec))
        placed = dict(self.placed)
        placed[spec.experiment_id] = node.name
        holder = allocation.holder
        devices = dict(self.devices_held)
        if allocation.device_ids:
            mine = dict(devices.get(node.name, {}))
            mine.update(dict.fromkeys(allocation.device_ids, holder))
            devices[node.name] = MappingProxyType(mine)
        ports = dict(self.ports_held)
        if allocation.ports:
            held = dict(ports.get(node.name, {}))
            for _label, port in allocation.ports:
                held.setdefault(port, holder)
            ports[node.name] = MappingProxyType(held)
        allocations = dict(self.allocations)
        allocations[spec.experiment_id] = allocation
        specs = self.specs
        anti_of = self.anti_of
        if spec.experiment_id not in specs:
            specs = MappingProxyType({**specs, spec.experiment_id: spec})
            anti_of = _anti_index(specs.values())
        return replace(self, loads=MappingProxyType(loads), placed=MappingProxyType(placed),
                       devices_held=MappingProxyType(devices),
                       ports_held=MappingProxyType(ports),
                       allocations=MappingProxyType(allocations), specs=specs,
                       anti_of=anti_of,
                       occupied_ids=(self.occupied_ids | {spec.experiment_id}) if occupied
                       else self.occupied_ids)
