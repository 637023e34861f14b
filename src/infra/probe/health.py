"""Turn probe facts into a node's health: pure rules, readable reasons, capacity mismatches.

Status comes from the health-check thresholds only (memory, disk, temperature, and a Raspberry
Pi that is throttling right now). A declared-vs-detected capacity mismatch is reported beside
the status, never folded into it: it is a topology mistake for the user to fix, not a node
that is unwell.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from infra.config.model import HealthChecks, NodeConfig
from infra.errors import TransportError
from infra.probe.facts import NodeFacts

# Declared and detected sizes within this fraction of each other agree.
CAPACITY_TOLERANCE = 0.10


class NodeStatus(str, enum.Enum):
    """A node's condition as the health check sees it."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNAVAILABLE = "unavailable"
    MAINTENANCE = "maintenance"  # reserved: set by an operator, never by evaluate()


@dataclass(frozen=True)
class CapacityMismatch:
    """A declared capacity the node does not have (``detected`` is None: nothing found)."""

    field: str
    declared: float | bool
    detected: float | bool | None

    def describe(self) -> str:
        """One readable line, e.g. ``ram_gb: declared 64, detected 30.5``."""
        return f"{self.field}: declared {_fmt(self.declared)}, detected {_fmt(self.detected)}"


@dataclass(frozen=True)
class NodeHealth:
    """The health of one node at one moment; ``facts`` is None when it could not be probed."""

    node: str
    status: NodeStatus
    reasons: tuple[str, ...] = ()
    facts: NodeFacts | None = None
    mismatches: tuple[CapacityMismatch, ...] = ()
    error: str | None = None

    @property
    def reachable(self) -> bool:
        return self.status is not NodeStatus.UNAVAILABLE

    def summary(self) -> str:
        """``healthy`` or ``degraded: memory 93% used (> 90%); ...``."""
        if not self.reasons:
            return self.status.value
        return f"{self.status.value}: {'; '.join(self.reasons)}"


def _fmt(value: float | bool | None, digits: int = 1) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.{digits}f}".rstrip("0").rstrip(".")


def _close(declared: float, detected: float) -> bool:
    return abs(declared - detected) <= CAPACITY_TOLERANCE * max(declared, detected)


def degraded_reasons(facts: NodeFacts, checks: HealthChecks) -> tuple[str, ...]:
    """Every threshold the node breaks, as readable reasons (empty: healthy)."""
    reasons = []
    used = facts.mem_used_percent
    if used > checks.memory_percent:
        reasons.append(f"memory {used:.0f}% used (> {checks.memory_percent:g}%)")
    if facts.disk_free_gb is not None and facts.disk_free_gb < checks.disk_free_gb:
        where = f" at {facts.disk_path}" if facts.disk_path else ""
        free = math.floor(facts.disk_free_gb * 100 + 1e-6) / 100  # 0.999 GB is not "1 GB"
        reasons.append(f"disk {_fmt(free, 2)} GB free{where} "
                       f"(< {checks.disk_free_gb:g} GB)")
    hottest = facts.max_temperature
    if hottest is not None and hottest[1] >= checks.temperature_c:
        reasons.append(f"temperature {hottest[1]:.1f} C at {hottest[0]} "
                       f"(>= {checks.temperature_c:g} C)")
    if facts.pi is not None and facts.pi.active_flags:
        value = f" (get_throttled {facts.pi.throttled:#x})" if facts.pi.throttled else ""
        reasons.append(f"raspberry pi {', '.join(facts.pi.active_flags)} now{value}")
    return tuple(reasons)


def capacity_mismatches(node: NodeConfig, facts: NodeFacts) -> tuple[CapacityMismatch, ...]:
    """Declared RAM, GPU, GPU memory and cores that the node does not actually have."""
    out = []
    if node.ram_gb > 0 and not _close(node.ram_gb, facts.mem_total_gb):
        out.append(CapacityMismatch("ram_gb", node.ram_gb, round(facts.mem_total_gb, 1)))
    if node.gpu and not facts.has_gpu:
        out.append(CapacityMismatch("gpu", True, False))
    if node.gpu_memory_gb > 0:
        total = facts.gpu_memory_gb
        largest = facts.largest_gpu_memory_gb
        if total is None:
            if facts.has_gpu or not node.gpu:  # else the "gpu" line above already says it
                out.append(CapacityMismatch("gpu_memory_gb", node.gpu_memory_gb, None))
        elif not any(_close(node.gpu_memory_gb, size)
                     for size in (total, largest) if size is not None):
            out.append(CapacityMismatch("gpu_memory_gb", node.gpu_memory_gb, round(total, 1)))
    if node.cpu_cores > facts.cpu_online:
        out.append(CapacityMismatch("cpu_cores", float(node.cpu_cores), float(facts.cpu_online)))
    return tuple(out)


def evaluate(node: NodeConfig, facts: NodeFacts, checks: HealthChecks) -> NodeHealth:
    """Health of a node that answered the probe: HEALTHY, or DEGRADED with the reasons."""
    reasons = degraded_reasons(facts, checks)
    return NodeHealth(
        node=node.name,
        status=NodeStatus.DEGRADED if reasons else NodeStatus.HEALTHY,
        reasons=reasons,
        facts=facts,
        mismatches=capacity_mismatches(node, facts),
    )


def unavailable(node_name: str, error: TransportError | str) -> NodeHealth:
    """Health of a node that could not be probed; the reason is the transport's."""
    reason = error.reason if isinstance(error, TransportError) else error
    return NodeHealth(node=node_name, status=NodeStatus.UNAVAILABLE, reasons=(reason,),
                      error=reason)
