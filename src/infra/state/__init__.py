"""Durable state: the SQLite store of runs, instances and events."""

from infra.state.store import (
    Event,
    InstanceRecord,
    InstanceState,
    RunRecord,
    RunState,
    Store,
    new_run_id,
)

__all__ = ["Event", "InstanceRecord", "InstanceState", "RunRecord", "RunState", "Store",
           "new_run_id"]
