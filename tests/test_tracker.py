"""The node-loss state machine of the live loop (pure: time is passed in)."""

from __future__ import annotations

from infra.config.model import HealthCheckSection
from infra.monitor import tracker as trk
from infra.monitor.snapshot import NodeState


def test_tracker_broken_is_not_a_step_to_offline() -> None:
    """A broken answer marks the node broken once (one transition), never walks it towards
    offline (its work is not moved), and a later success brings it back."""
    cfg = HealthCheckSection()
    t = trk.Tracker("n1", NodeState.HEALTHY)
    t, change = trk.on_broken(t, "n1: malformed supervisor document: instances: ...")
    assert t.state is NodeState.BROKEN and change is not None
    for _ in range(10):
        t, change = trk.on_broken(t, "n1: malformed supervisor document: instances: ...")
        assert t.state is NodeState.BROKEN and change is None and t.failures == 0
    t, change = trk.on_success(t, 100.0, None, cfg)
    assert t.state is NodeState.HEALTHY and change is not None
