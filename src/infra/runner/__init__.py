"""Runner: start instances on nodes through the node-side supervisor and track them."""

from infra.runner.supervisor_client import (
    AttemptRecord,
    InstanceState,
    InstanceStatus,
    LogChunk,
    RestartPolicy,
    StartRequest,
    SupervisorClient,
)

__all__ = [
    "AttemptRecord",
    "InstanceState",
    "InstanceStatus",
    "LogChunk",
    "RestartPolicy",
    "StartRequest",
    "SupervisorClient",
]
