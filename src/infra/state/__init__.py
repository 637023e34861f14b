"""Durable state: the SQLite store of runs, instances and events."""

from infra.state.store import (
    Event,
    InstancePhase,
    InstanceRecord,
    RunRecord,
    RunState,
    Store,
    new_run_id,
)

__all__ = [
    "Event",
    "InstancePhase",
    "InstanceRecord",
    "RunRecord",
    "RunState",
    "Store",
    "new_run_id",
]
