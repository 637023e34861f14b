"""What the dashboard shows, as plain immutable values (no I/O, no rich).

The monitor builds a ``RunSnapshot`` from the store and the last probe of each node; the
dashboard renders it with a pure function, so rendering is tested on fixed snapshots.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class NodeState(str, enum.Enum):
    """A node's state as the live health loop sees it (reference runtime's path on loss)."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    RECONNECTING = "reconnecting"   # probe failed: retrying with exponential backoff
    DISCONNECTED = "disconnected"   # retries exhausted: grace window before offline
    OFFLINE = "offline"             # lost: its work is recovered by policy
    BROKEN = "broken"               # answers, but with malformed documents: no new work
    UNKNOWN = "unknown"             # not probed yet
    DISABLED = "disabled"           # enabled: false in the topology
    MAINTENANCE = "maintenance"     # operator: no new work (scheduler issue)
    DRAINING = "draining"           # operator: work being moved off (scheduler issue)

    @property
    def usable(self) -> bool:
        """May receive new work."""
        return self in (NodeState.HEALTHY, NodeState.UNKNOWN)

    @property
    def lost(self) -> bool:
        return self is NodeState.OFFLINE


@dataclass(frozen=True)
class GpuView:
    name: str
    utilization_pct: float | None = None
    memory_used_mb: float | None = None
    memory_total_mb: float | None = None
    temperature_c: float | None = None


@dataclass(frozen=True)
class NodeView:
    """One row of the nodes panel."""

    name: str
    state: NodeState
    reason: str = ""
    load1: float | None = None
    cpu_count: int | None = None
    mem_used_gb: float | None = None
    mem_total_gb: float | None = None
    gpus: tuple[GpuView, ...] = ()
    power_mw: int | None = None          # Jetson module power when known
    temperature_c: float | None = None   # hottest sensor
    instances: int = 0
    max_instances: int = 0
    stale_seconds: float | None = None   # the values are this old: the node is not answering


@dataclass(frozen=True)
class InstanceView:
    """One row of the instances panel."""

    instance_id: str
    node: str
    state: str                 # infra.state.InstancePhase value
    uptime_seconds: float | None = None
    restarts: int = 0
    moves: int = 0
    exit_code: int | None = None
    signal: str | None = None
    reason: str = ""
    last_line: str = ""
    stale_seconds: float | None = None   # its node is not answering: last known, this old
    telemetry: TelemetryView | None = None  # the newest sample while it runs (None: none yet)


@dataclass(frozen=True)
class TelemetryView:
    """What an instance used in its newest telemetry sample, and how old that sample is."""

    age_seconds: float
    stale: bool = False                  # older than a few intervals, or its node is silent
    cpu_percent: float | None = None     # its process tree, % of one core
    rss_bytes: float | None = None
    gpu_util_percent: float | None = None
    gpu_mem_mb: float | None = None
    sampled_at: float | None = None      # the sample's time (epoch seconds, node clock)


@dataclass(frozen=True)
class EventView:
    at: float
    kind: str
    subject: str
    message: str


@dataclass(frozen=True)
class RunSnapshot:
    """Everything one dashboard frame shows."""

    run_id: str
    run_state: str
    taken_at: float
    nodes: tuple[NodeView, ...]
    instances: tuple[InstanceView, ...]
    events: tuple[EventView, ...] = ()
    watcher: str = ""          # who holds the run's lease ("" = this process)
    notice: str = ""           # one line shown under the title (e.g. "detached: Ctrl-C")
    footer: str = ""           # one line at the bottom: the keys ("Ctrl-C detaches ...")
    progress: tuple[str, ...] = ()  # one line per campaign: bar, counts, rate, ETA
    progress_plain: tuple[str, ...] = ()  # the same without rate/ETA (plain line mode)
