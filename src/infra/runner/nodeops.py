"""Operator actions on one node: drain, reconcile, and the admin conditions placement sees.

Reference semantics (cluster guide): a draining node takes no new work; cluster-recoverable
services move at once; batch work may finish until the deadline, then moves only if it is
cluster-recoverable; system/sysbatch work is left alone; what cannot move is paused with the
reason (stopped gracefully, never force-killed first); a blocked move keeps the node draining
so a later pass retries; a finished drain leaves the node in maintenance. Drain moves do not
count as failure moves.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from infra.config.model import Cluster, RecoverPolicy
from infra.errors import InfraError
from infra.placement import Condition, NodeCondition
from infra.runner.lifecycle import RunSession
from infra.state import InstancePhase, InstanceRecord, Store
from infra.state.store import AdminState, NodeAdmin

SYSTEM_JOB_TYPES = ("system", "sysbatch")


def _condition(value: str, fallback: Condition = Condition.UNAVAILABLE) -> Condition:
    try:
        return Condition(value)
    except ValueError:
        return fallback


def admin_conditions(cluster: Cluster, store: Store) -> dict[str, NodeCondition]:
    """Operator states as placement conditions; they override whatever the probe says."""
    out: dict[str, NodeCondition] = {}
    for name, admin in store.node_admins().items():
        if name not in cluster.node_names:
            continue
        if admin.admin is not AdminState.NONE:
            out[name] = NodeCondition(_condition(admin.admin.value), admin.reason)
        elif not admin.eligible:
            out[name] = NodeCondition(_condition("ineligible", Condition.UNAVAILABLE),
                                      f"not eligible ({admin.reason})" if admin.reason
                                      else "not eligible")
    return out


def merge_conditions(health: dict[str, NodeCondition],
                     admin: dict[str, NodeCondition]) -> dict[str, NodeCondition]:
    """Admin states win over health: a good probe never clears maintenance or draining."""
    merged = dict(health)
    merged.update(admin)
    return merged


class ActionKind(str, enum.Enum):
    MOVE = "move"          # moved (or would move) to another node now
    WAIT = "wait"          # batch work allowed to finish before the deadline
    PAUSE = "pause"        # cannot move: stopped gracefully and paused with the reason
    SKIP = "skip"          # system / sysbatch: left alone
    BLOCKED = "blocked"    # should move, but no node can take it: retried later


@dataclass(frozen=True)
class DrainAction:
    run_id: str
    instance_id: str
    kind: ActionKind
    detail: str


@dataclass
class DrainReport:
    node: str
    actions: list[DrainAction] = field(default_factory=list)
    done: bool = False

    def counts(self) -> dict[str, int]:
        out = {k.value: 0 for k in ActionKind}
        for a in self.actions:
            out[a.kind.value] += 1
        return out


def drain_decision(rec: InstanceRecord, now: float, deadline: float | None) -> ActionKind:
    """What a drain does with one instance (pure)."""
    job = rec.spec.job_type.value
    recover = rec.spec.recover
    if job in SYSTEM_JOB_TYPES:
        return ActionKind.SKIP
    if job == "service":
        return ActionKind.MOVE if recover is RecoverPolicy.CLUSTER else ActionKind.PAUSE
    if deadline is None or now < deadline:
        return ActionKind.WAIT
    return ActionKind.MOVE if recover is RecoverPolicy.CLUSTER else ActionKind.PAUSE


async def refresh_node(session: RunSession, node: str) -> None:
    """Sweep every run with active work on ``node`` so finished instances are recorded."""
    for run_id in sorted({r.run_id for r in session.store.instances_on(node)}):
        await session.sweep(run_id)


async def drain_pass(session: RunSession, node: str, conditions: dict[str, NodeCondition],
                     *, dry_run: bool, grace: float = 10.0) -> DrainReport:
    """One pass over the node's active work; completes the drain when nothing is left."""
    admin = session.store.node_admin(node)
    reason = admin.reason or "drain"
    report = DrainReport(node)
    if not dry_run:
        await refresh_node(session, node)
    now = time.time()
    for rec in session.store.instances_on(node):
        kind = drain_decision(rec, now, admin.deadline)
        why = f"drain of {node}: {reason}"
        if kind is ActionKind.MOVE and not dry_run:
            moved = await session.move_instance(rec.run_id, rec, conditions, why, count=False,
                                                keep_if_blocked=True, stop_old=True)
            if not moved:
                kind = ActionKind.BLOCKED
        elif kind is ActionKind.PAUSE and not dry_run:
            try:
                await session.stop(rec.run_id, rec.instance_id, grace)
            except InfraError as exc:
                report.actions.append(DrainAction(rec.run_id, rec.instance_id,
                                                  ActionKind.BLOCKED, exc.one_line()))
                continue
            session.mark(rec.run_id, rec, InstancePhase.PAUSED,
                         f"{why}; cannot move (recover: {rec.spec.recover.value}, "
                         f"job_type: {rec.spec.job_type.value})")
        detail = {ActionKind.MOVE: "moved to another node" if not dry_run else "would move",
                  ActionKind.WAIT: "batch: allowed to finish before the deadline",
                  ActionKind.PAUSE: "cannot move: paused",
                  ActionKind.SKIP: f"{rec.spec.job_type.value}: left alone",
                  ActionKind.BLOCKED: "no node can take it now: retried later"}[kind]
        report.actions.append(DrainAction(rec.run_id, rec.instance_id, kind, detail))
    pending = [a for a in report.actions
               if a.kind in (ActionKind.WAIT, ActionKind.BLOCKED)
               or (dry_run and a.kind in (ActionKind.MOVE, ActionKind.PAUSE))]
    report.done = not pending and not dry_run
    if report.done:
        session.store.set_node_admin(node, AdminState.MAINTENANCE, eligible=False,
                                     reason=f"drained: {reason}")
        session.event(None, "node", node, f"drain complete: now in maintenance ({reason})")
    return report


@dataclass
class ReconcileReport:
    node: str
    checked: int = 0
    recovered: int = 0
    paused: int = 0
    blocked: int = 0
    skipped: int = 0
    failed: int = 0
    details: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        return {"node": self.node, "checked": self.checked, "recovered": self.recovered,
                "paused": self.paused, "blocked": self.blocked, "skipped": self.skipped,
                "failed": self.failed, "details": self.details}


async def reconcile_node(session: RunSession, node: str, reachable: bool,
                         conditions: dict[str, NodeCondition], *,
                         dry_run: bool) -> ReconcileReport:
    """Check the work placed on a node; if the node is gone, recover it by policy."""
    report = ReconcileReport(node)
    records = session.store.instances_on(node)
    if reachable:
        if not dry_run:
            try:
                await refresh_node(session, node)
            except InfraError as exc:
                report.failed += len(records)
                report.details.append(f"status failed: {exc.one_line()}")
                return report
        report.checked = len(records)
        return report
    for rec in records:
        report.checked += 1
        job = rec.spec.job_type.value
        policy = rec.spec.recover
        name = f"{rec.run_id}/{rec.instance_id}"
        if job in SYSTEM_JOB_TYPES:
            report.skipped += 1
            report.details.append(f"{name}: {job}: left alone")
            continue
        why = f"reconcile: node {node} unreachable"
        if policy is RecoverPolicy.CLUSTER:
            if dry_run:
                report.recovered += 1
                report.details.append(f"{name}: would move")
                continue
            try:
                moved = await session.move_instance(rec.run_id, rec, conditions, why,
                                                    keep_if_blocked=True)
            except InfraError as exc:
                report.failed += 1
                report.details.append(f"{name}: {exc.one_line()}")
                continue
            if moved:
                report.recovered += 1
                report.details.append(f"{name}: moved")
            else:
                report.blocked += 1
                report.details.append(f"{name}: no node can take it")
        else:
            report.paused += 1
            report.details.append(f"{name}: {'would pause' if dry_run else 'paused'} "
                                  f"(recover: {policy.value})")
            if not dry_run:
                session.mark(rec.run_id, rec, InstancePhase.PAUSED,
                             f"{why}; recover: {policy.value}")
    return report


def admin_summary(admin: NodeAdmin) -> str:
    if admin.admin is AdminState.NONE:
        return "eligible" if admin.eligible else "ineligible"
    return str(admin.admin.value)
