"""The coordinator's task queue, as pure functions over task views (no I/O).

A campaign task is an ordinary instance; ``TaskView`` is the slice of it the queue needs.
``order`` says which queued task goes first, ``dependencies`` which may go at all (``after``
/ ``after_any``, Slurm's ``afterok`` / ``afterany``), ``budget`` how many more a campaign may
start under its ``max_parallel``, and ``fail_fast_victims`` what a ``fail_fast`` campaign
cancels after its first failure.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from infra.state.store import InstancePhase

__all__ = [
    "DepDecision",
    "DepKind",
    "TaskView",
    "budget",
    "dependencies",
    "fail_fast_victims",
    "in_flight",
    "order",
    "order_key",
]

P = InstancePhase

# Not started yet: a task in one of these phases that a failed dependency blocks is skipped.
_NOT_STARTED = frozenset({P.PLANNED, P.QUEUED})
# Holds a slot now, or will take one on its node without asking the coordinator again.
_IN_FLIGHT = frozenset({P.PLANNED, P.DISPATCHED, P.DEPLOYING, P.STARTING, P.RUNNING,
                        P.RESTARTING, P.MOVING})
# Ended without success, as a dependency sees it (the words go into skip reasons).
_NOT_OK_WORDS: Mapping[InstancePhase, str] = {
    P.FAILED: "failed",
    P.STOPPED: "was stopped",
    P.LOST: "was lost",
    P.CANCELLED: "was cancelled",
    P.SKIPPED: "was skipped",
}
# Over for good: fail_fast leaves these alone.
_TERMINAL = frozenset({P.EXITED, *_NOT_OK_WORDS})
# A failure that trips fail_fast (a stop on request, a cancel or a skip does not).
_FAIL_FAST_TRIGGERS = frozenset({P.FAILED, P.LOST})


@dataclass(frozen=True)
class TaskView:
    """What the queue knows of one task (an instance of a run, usually of a campaign).

    ``(run_id, instance_id)`` identifies it. ``ended_ok`` may veto an ``exited`` phase
    (False: counts as failed, e.g. its required results are missing); otherwise the phase
    alone decides. ``reason`` is the task's own last reason (queued/failed/skipped why).
    """

    instance_id: str
    run_id: str
    run_seq: int
    template_id: str | None
    task_index: int | None
    priority: int
    phase: InstancePhase
    after: tuple[str, ...] = ()
    after_any: tuple[str, ...] = ()
    ended_ok: bool | None = None
    reason: str = ""


class DepKind(str, enum.Enum):
    """Whether a task's dependencies let it go now."""

    READY = "ready"   # every dependency satisfied (or none)
    WAIT = "wait"     # some dependency has not ended (as needed) yet
    SKIP = "skip"     # an ``after`` dependency ended without success: never runs


@dataclass(frozen=True)
class DepDecision:
    """The verdict for one task: ``on`` is the dependency name that decided it (WAIT/SKIP)."""

    kind: DepKind
    reason: str = ""
    on: str | None = None

    @property
    def ready(self) -> bool:
        return self.kind is DepKind.READY


READY = DepDecision(DepKind.READY)


def order_key(task: TaskView) -> tuple[int, int, bool, int, str, str]:
    """Sort key: priority desc, then run_seq (first come first served), task_index, id."""
    index = task.task_index
    return (-task.priority, task.run_seq, index is None, index if index is not None else 0,
            task.instance_id, task.run_id)


def order(tasks: Iterable[TaskView]) -> tuple[TaskView, ...]:
    """The dispatch order of ``tasks``: a total order, the same whatever order they came in."""
    return tuple(sorted(tasks, key=order_key))


def in_flight(tasks: Iterable[TaskView]) -> int:
    """How many of ``tasks`` hold a slot now or will take one without the coordinator."""
    return sum(1 for t in tasks if t.phase in _IN_FLIGHT)


def budget(tasks: Sequence[TaskView], max_parallel: int | None) -> int:
    """How many more of one campaign's queued ``tasks`` may be started or dispatched now.

    Dispatched tasks count against ``max_parallel`` like running ones: a node's pool starts
    them without asking again, so the cap must already hold when they are handed out.
    """
    queued = sum(1 for t in tasks if t.phase is P.QUEUED)
    if max_parallel is None:
        return queued
    return max(0, min(queued, max_parallel - in_flight(tasks)))


def fail_fast_victims(tasks: Sequence[TaskView]) -> tuple[TaskView, ...]:
    """The tasks a fail_fast campaign cancels: every unfinished one, once one task failed.

    A failure here is a task that exhausted its attempts (``failed``, ``lost``, or
    ``exited`` vetoed by ``ended_ok=False``); stopped, cancelled and skipped tasks do not
    trip it. Queued and dispatched victims are dropped, started ones stopped (their phase
    says which). Empty when nothing failed.
    """
    if not any(_tripped(t) for t in tasks):
        return ()
    return order(t for t in tasks if t.phase not in _TERMINAL)


def _tripped(task: TaskView) -> bool:
    return task.phase in _FAIL_FAST_TRIGGERS or (task.phase is P.EXITED
                                                 and task.ended_ok is False)


# --------------------------------------------------------------------------- dependencies

class _Outcome(enum.Enum):
    OK = "ok"
    NOT_OK = "not ok"
    PENDING = "pending"


@dataclass(frozen=True)
class _TaskState:
    """A task as its dependents see it; for NOT_OK, ``root`` and ``word`` say why."""

    decision: DepDecision
    outcome: _Outcome
    root: str = ""     # the instance whose failure is the cause (itself unless skipped)
    word: str = ""     # what happened to root: "failed", "was stopped", ...


@dataclass(frozen=True)
class _NameState:
    """A dependency name (an instance id or a template id) summarised over its tasks."""

    members: int
    pending: int
    failed: _TaskState | None = None  # the first member that ended without success
    failed_id: str = ""
    cycle: bool = False


_CYCLE = _NameState(members=1, pending=1, cycle=True)  # a name still on the walk's path
_TaskNode = tuple[bool, str]  # (False, instance id) or (True, dependency name)


def dependencies(tasks: Sequence[TaskView]) -> dict[str, DepDecision]:
    """READY / WAIT / SKIP for every task of one run, keyed by instance id.

    ``after`` needs every named instance ended ok (a name that is a template id means all
    its tasks); ``after_any`` needs them ended at all. A task an ``after`` dependency blocks
    for good is SKIP, and counts as ended without success for its own dependents, so a skip
    propagates along chains in one call. A cycle (refused at submit) leaves its tasks
    waiting; the walk is iterative with a visited set and never recurses or hangs.
    """
    by_id: dict[str, TaskView] = {}
    for task in tasks:
        if task.instance_id in by_id:
            raise ValueError(f"dependencies() takes one run's tasks: {task.instance_id} twice")
        by_id[task.instance_id] = task
    members = _members(order(by_id.values()))
    done_tasks: dict[str, _TaskState] = {}
    done_names: dict[str, _NameState] = {}
    for start in order(by_id.values()):
        _walk(start.instance_id, by_id, members, done_tasks, done_names)
    return {tid: state.decision for tid, state in done_tasks.items()}


def _members(ordered: Sequence[TaskView]) -> dict[str, tuple[str, ...]]:
    """Name → the instance ids it stands for: the instance itself and/or a template's tasks."""
    out: dict[str, list[str]] = {}
    for task in ordered:
        out.setdefault(task.instance_id, []).append(task.instance_id)
        if task.template_id is not None and task.template_id != task.instance_id:
            out.setdefault(task.template_id, []).append(task.instance_id)
    return {name: tuple(ids) for name, ids in out.items()}


def _children(node: _TaskNode, by_id: Mapping[str, TaskView],
              members: Mapping[str, tuple[str, ...]]) -> tuple[_TaskNode, ...]:
    is_name, key = node
    if is_name:
        return tuple((False, m) for m in members.get(key, ()))
    task = by_id[key]
    return tuple((True, name) for name in (*task.after, *task.after_any))


def _walk(start: str, by_id: Mapping[str, TaskView], members: Mapping[str, tuple[str, ...]],
          done_tasks: dict[str, _TaskState], done_names: dict[str, _NameState]) -> None:
    """Post-order evaluation from one task, without recursion; gray nodes mark a cycle."""
    def is_done(node: _TaskNode) -> bool:
        return node[1] in (done_names if node[0] else done_tasks)

    gray: set[_TaskNode] = set()
    stack: list[_TaskNode] = [(False, start)]
    while stack:
        node = stack[-1]
        if is_done(node):
            stack.pop()
            continue
        if node not in gray:
            gray.add(node)
            todo = [c for c in _children(node, by_id, members)
                    if not is_done(c) and c not in gray]
            if todo:
                stack.extend(reversed(todo))
                continue
        is_name, key = node
        if is_name:
            done_names[key] = _name_state(members.get(key, ()), by_id, done_tasks)
        else:
            done_tasks[key] = _task_state(by_id[key], done_names)
        gray.discard(node)
        stack.pop()


def _name_state(ids: Sequence[str], by_id: Mapping[str, TaskView],
                done_tasks: Mapping[str, _TaskState]) -> _NameState:
    """Summarise a name's tasks; one not evaluated yet sits on a cycle (its phase may still
    tell how it ended)."""
    pending = 0
    cycle = False
    failed: _TaskState | None = None
    failed_id = ""
    for tid in ids:
        state = done_tasks.get(tid) or _phase_state(by_id[tid], READY)
        if state is None:
            cycle = True
            pending += 1
        elif state.outcome is _Outcome.PENDING:
            pending += 1
        elif state.outcome is _Outcome.NOT_OK and failed is None:
            failed, failed_id = state, tid
    return _NameState(members=len(ids), pending=pending, failed=failed, failed_id=failed_id,
                      cycle=cycle)


def _task_state(task: TaskView, names: Mapping[str, _NameState]) -> _TaskState:
    """Decide one task from its dependencies' states, then how its dependents see it."""
    decision = _decide(task, names)
    skipped_now = task.phase in _NOT_STARTED and decision.kind is DepKind.SKIP
    if task.phase is P.SKIPPED or skipped_now:
        root = names.get(decision.on or "") if decision.kind is DepKind.SKIP else None
        if root is not None and root.failed is not None:
            return _TaskState(decision, _Outcome.NOT_OK, root.failed.root, root.failed.word)
        return _TaskState(decision, _Outcome.NOT_OK, task.instance_id, "was skipped")
    state = _phase_state(task, decision)
    return state if state is not None else _TaskState(decision, _Outcome.PENDING)


def _phase_state(task: TaskView, decision: DepDecision) -> _TaskState | None:
    """How a task ended, when its phase alone says so; None while that rests on its decision
    (queued or planned) or it has not ended."""
    if task.phase is P.EXITED and task.ended_ok is not False:
        return _TaskState(decision, _Outcome.OK)
    if task.phase is P.EXITED:
        return _TaskState(decision, _Outcome.NOT_OK, task.instance_id, "failed")
    word = _NOT_OK_WORDS.get(task.phase)
    if word is not None:
        return _TaskState(decision, _Outcome.NOT_OK, task.instance_id, word)
    if task.phase in _NOT_STARTED:
        return None
    return _TaskState(decision, _Outcome.PENDING)


def _decide(task: TaskView, names: Mapping[str, _NameState]) -> DepDecision:
    """SKIP on the first failed ``after`` name, else WAIT on the first pending one, else READY."""
    for name in task.after:
        state = names.get(name, _CYCLE)
        if state.failed is not None:
            via = state.failed_id if state.failed_id != state.failed.root else ""
            reason = f"dependency {state.failed.root} {state.failed.word}"
            return DepDecision(DepKind.SKIP, reason + (f" (via {via})" if via else ""), name)
    for name in (*task.after, *task.after_any):
        state = names.get(name, _CYCLE)
        if state.members == 0:
            return DepDecision(DepKind.WAIT, f"waiting for {name} (no such task)", name)
        if state.cycle:
            return DepDecision(DepKind.WAIT, f"waiting for {name} (dependency cycle)", name)
        if state.pending:
            left = f" ({state.pending} of {state.members} tasks)" if state.members > 1 else ""
            return DepDecision(DepKind.WAIT, f"waiting for {name}{left}", name)
    return READY
