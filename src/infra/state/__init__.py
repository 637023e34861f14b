"""Durable state: the SQLite store of runs, instances and events."""

from infra.state.store import (
    Event,
    FailureClass,
    InstancePhase,
    InstanceRecord,
    PoolRecord,
    ResultIssue,
    RunRecord,
    RunState,
    SlurmJobRecord,
    Store,
    issues_json,
    new_run_id,
)

__all__ = [
    "Event",
    "FailureClass",
    "InstancePhase",
    "InstanceRecord",
    "PoolRecord",
    "ResultIssue",
    "RunRecord",
    "RunState",
    "SlurmJobRecord",
    "Store",
    "issues_json",
    "new_run_id",
]
