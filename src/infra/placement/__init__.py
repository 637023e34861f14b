"""Placement engine: a pure pipeline of feasibility checks and scorers over a snapshot."""

from infra.placement.allocation import Allocation, Holder, VolumeAllocation, allocation_env
from infra.placement.engine import (
    NodeEvaluation,
    Occupied,
    Placement,
    Plan,
    placement_order,
    plan,
    why_not,
)
from infra.placement.inventory import NodeInventory, node_inventory
from infra.placement.jobs import SystemExpansion, expand_system_jobs
from infra.placement.scoring import ScorePart
from infra.placement.snapshot import Condition, NodeCondition, Snapshot

__all__ = [
    "Allocation",
    "Condition",
    "Holder",
    "NodeCondition",
    "NodeEvaluation",
    "NodeInventory",
    "Occupied",
    "Placement",
    "Plan",
    "ScorePart",
    "Snapshot",
    "SystemExpansion",
    "VolumeAllocation",
    "allocation_env",
    "expand_system_jobs",
    "node_inventory",
    "placement_order",
    "plan",
    "why_not",
]
