"""The node-loss state machine of the live health loop (pure: time is passed in).

A failed probe or sweep moves a node to RECONNECTING, retried with exponential backoff;
after ``reconnect_attempts`` failures it is DISCONNECTED for a grace window, then OFFLINE
(its work is recovered by policy). Any success brings it straight back. A node that answers
with a malformed document is BROKEN (shown with the reason, given no new work, not moved).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from infra.config.model import HealthCheckSection
from infra.monitor.snapshot import NodeState

BACKOFF_BASE_SECONDS = 1.0


@dataclass(frozen=True)
class Tracker:
    """What the loop knows of one node between ticks."""

    node: str
    state: NodeState = NodeState.UNKNOWN
    reason: str = ""
    failures: int = 0
    next_probe_at: float = 0.0
    disconnected_at: float | None = None


@dataclass(frozen=True)
class Transition:
    node: str
    old: NodeState
    new: NodeState
    reason: str


def backoff(failures: int, cfg: HealthCheckSection) -> float:
    """Seconds before the next reconnect attempt: 1, 2, 4, ... capped at the interval."""
    return float(min(BACKOFF_BASE_SECONDS * (2 ** max(failures - 1, 0)), cfg.interval_seconds))


def on_success(t: Tracker, now: float, degraded_reason: str | None,
               cfg: HealthCheckSection) -> tuple[Tracker, Transition | None]:
    """A probe (or sweep) answered: HEALTHY, or DEGRADED with the reason."""
    new = NodeState.DEGRADED if degraded_reason else NodeState.HEALTHY
    reason = degraded_reason or ""
    nt = replace(t, state=new, reason=reason, failures=0, disconnected_at=None,
                 next_probe_at=now + cfg.interval_seconds)
    if new is t.state and reason == t.reason:
        return nt, None
    return nt, Transition(t.node, t.state, new, reason or "probe answered")


def on_broken(t: Tracker, reason: str) -> tuple[Tracker, Transition | None]:
    """The node answered with a malformed document: BROKEN with the reason.

    Not a step towards OFFLINE (the node is reachable, its work is not moved); the next
    sweep that reads cleanly, or a probe, brings it back.
    """
    nt = replace(t, state=NodeState.BROKEN, reason=reason, failures=0, disconnected_at=None)
    if t.state is NodeState.BROKEN and t.reason == reason:
        return nt, None
    return nt, Transition(t.node, t.state, NodeState.BROKEN, reason)


def on_failure(t: Tracker, now: float, reason: str,
               cfg: HealthCheckSection) -> tuple[Tracker, Transition | None]:
    """A probe (or sweep) failed: walk RECONNECTING -> DISCONNECTED -> OFFLINE."""
    failures = t.failures + 1
    if t.state is NodeState.OFFLINE:
        nt = replace(t, failures=failures, reason=reason,
                     next_probe_at=now + cfg.interval_seconds)
        return nt, None
    if failures <= cfg.reconnect_attempts:
        new = NodeState.RECONNECTING
        nt = replace(t, state=new, reason=reason, failures=failures,
                     next_probe_at=now + backoff(failures, cfg))
        why = f"{reason} (reconnect attempt {failures}/{cfg.reconnect_attempts})"
        return nt, (Transition(t.node, t.state, new, why) if t.state is not new else None)
    since = t.disconnected_at if t.disconnected_at is not None else now
    if now - since >= cfg.disconnected_grace_seconds:
        nt = replace(t, state=NodeState.OFFLINE, reason=reason, failures=failures,
                     disconnected_at=since, next_probe_at=now + cfg.interval_seconds)
        return nt, Transition(t.node, t.state, NodeState.OFFLINE,
                              f"{reason} (unreachable for {now - since:.0f} s after "
                              f"{cfg.reconnect_attempts} reconnect attempts)")
    nt = replace(t, state=NodeState.DISCONNECTED, reason=reason, failures=failures,
                 disconnected_at=since,
                 next_probe_at=now + min(backoff(failures, cfg),
                                         max(0.5, since + cfg.disconnected_grace_seconds - now)))
    if t.state is NodeState.DISCONNECTED:
        return nt, None
    return nt, Transition(t.node, t.state, NodeState.DISCONNECTED,
                          f"{reason} (grace {cfg.disconnected_grace_seconds:g} s before offline)")
