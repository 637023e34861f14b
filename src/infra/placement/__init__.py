"""Placement engine: a pure pipeline of feasibility checks and scorers over a snapshot."""

from infra.placement.engine import NodeEvaluation, Placement, Plan, placement_order, plan, why_not
from infra.placement.scoring import ScorePart
from infra.placement.snapshot import Condition, NodeCondition, Snapshot

__all__ = [
    "Condition",
    "NodeCondition",
    "NodeEvaluation",
    "Placement",
    "Plan",
    "ScorePart",
    "Snapshot",
    "placement_order",
    "plan",
    "why_not",
]
