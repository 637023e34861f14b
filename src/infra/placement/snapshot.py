"""Immutable view of the cluster that placement decides over.

A ``Snapshot`` holds the nodes in topology order, what is known of their condition, and
what is already placed on them; ``with_placement`` returns a new snapshot, never mutates.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from infra.config.model import Cluster, ExperimentSpec, NodeConfig


class Condition(str, enum.Enum):
    """What placement knows of a node's health. UNKNOWN means "not probed" (dry runs)."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNAVAILABLE = "unavailable"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class NodeCondition:
    condition: Condition
    reason: str = ""


@dataclass(frozen=True)
class Demand:
    """What one instance takes from a node once placed there."""

    instance_id: str
    ram_gb: float
    gpu_memory_gb: float
    cpu_cores: float


@dataclass(frozen=True)
class NodeLoad:
    """What is already committed on a node."""

    instances: tuple[Demand, ...] = ()

    @property
    def count(self) -> int:
        return len(self.instances)

    @property
    def ram_gb(self) -> float:
        return sum(d.ram_gb for d in self.instances)

    @property
    def gpu_memory_gb(self) -> float:
        return sum(d.gpu_memory_gb for d in self.instances)

    @property
    def cpu_cores(self) -> float:
        return sum(d.cpu_cores for d in self.instances)

    @property
    def instance_ids(self) -> frozenset[str]:
        return frozenset(d.instance_id for d in self.instances)


def demand_on(node: NodeConfig, spec: ExperimentSpec) -> Demand:
    """The instance's demand on this node; unified-memory nodes draw RAM and GPU from one pool."""
    gpu_mem = spec.gpu_memory_gb if spec.gpu_required else 0.0
    if node.unified_memory:
        return Demand(spec.experiment_id, spec.ram_gb + gpu_mem, 0.0, spec.cpu_cores)
    return Demand(spec.experiment_id, spec.ram_gb, gpu_mem, spec.cpu_cores)


@dataclass(frozen=True)
class Snapshot:
    """Nodes (topology order), their conditions and loads, and instance -> node so far."""

    nodes: tuple[NodeConfig, ...]
    conditions: Mapping[str, NodeCondition]
    loads: Mapping[str, NodeLoad]
    placed: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    specs: Mapping[str, ExperimentSpec] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def build(cls, cluster: Cluster, specs: Iterable[ExperimentSpec],
              conditions: Mapping[str, NodeCondition] | None = None,
              preferences: tuple[str, ...] = ()) -> Snapshot:
        """Start from an empty cluster. ``preferences`` reorders nodes for tie-breaking."""
        order = {name: i for i, name in enumerate(preferences)}
        nodes = tuple(sorted(cluster.nodes,
                             key=lambda n: (order.get(n.name, len(order)),
                                            cluster.nodes.index(n))))
        conds = {n.name: (conditions or {}).get(n.name, NodeCondition(Condition.UNKNOWN))
                 for n in nodes}
        return cls(nodes=nodes,
                   conditions=MappingProxyType(conds),
                   loads=MappingProxyType({n.name: NodeLoad() for n in nodes}),
                   specs=MappingProxyType({s.experiment_id: s for s in specs}))

    def load(self, node: str) -> NodeLoad:
        return self.loads[node]

    def free_ram_gb(self, node: NodeConfig) -> float:
        return node.available_ram_gb - self.loads[node.name].ram_gb

    def free_gpu_memory_gb(self, node: NodeConfig) -> float:
        return node.gpu_memory_gb - self.loads[node.name].gpu_memory_gb

    def with_placement(self, spec: ExperimentSpec, node: NodeConfig) -> Snapshot:
        loads = dict(self.loads)
        old = loads[node.name]
        loads[node.name] = replace(old, instances=(*old.instances, demand_on(node, spec)))
        placed = dict(self.placed)
        placed[spec.experiment_id] = node.name
        return replace(self, loads=MappingProxyType(loads), placed=MappingProxyType(placed))
