"""Node probing: what a node has (``NodeFacts``) and how it is doing (``NodeHealth``)."""

from infra.probe.facts import GpuInfo, JetsonInfo, NodeFacts, PiInfo
from infra.probe.health import (
    CapacityMismatch,
    NodeHealth,
    NodeStatus,
    capacity_mismatches,
    degraded_reasons,
    evaluate,
    unavailable,
)
from infra.probe.run import check_health, probe_node, probe_source

__all__ = [
    "CapacityMismatch",
    "GpuInfo",
    "JetsonInfo",
    "NodeFacts",
    "NodeHealth",
    "NodeStatus",
    "PiInfo",
    "capacity_mismatches",
    "check_health",
    "degraded_reasons",
    "evaluate",
    "probe_node",
    "probe_source",
    "unavailable",
]
