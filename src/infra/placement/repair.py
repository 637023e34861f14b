"""The bounded repair step: after the greedy pass, make room for instances it left unplaced.

For each unplaced instance (in decision order), cheapest first:

0. a node where it fits now (an earlier repair may have made room);
1. one move: a node where it would fit once one placed instance leaves, that instance
   going to another node where it passes every check;
2. two moves: two instances leaving the node, or a chain (the displaced instance itself
   makes room on its new node by moving one more instance on);
3. when a whole pass places nothing, a trade: leave one placed instance out (largest
   first) when that lets two or more unplaced ones (smallest first, each as in 0-2) be
   placed: one more instance placed in all. Passes repeat while they place something.

Moves alone cannot do what an optimum often does in an overfull cluster (run two small
instances instead of a large one); trades can, and ``RepairLimits(trades=False)`` turns
them off. An instance left out keeps its reason in ``Plan.left_out``.
Every step is judged by the planner's own checks (``first_rejection`` with the plan's
checks) on the state as it is at that step, so a repaired plan passes every hard check.
Only unpinned instances of this plan move: pins, forced pins and system-job copies are
pinned, and ``occupied``/``peers`` work (stored runs, running instances) is not placed by
the plan at all. Decisions of the greedy pass are untouched unless something was unplaced.
The work is capped (node checks per instance and per plan, candidates per node) and every
loop runs in a fixed order, so the same inputs still give the same plan.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from infra.config.model import Cluster, ExperimentSpec, NodeConfig, Strategy
from infra.placement.allocation import Allocation
from infra.placement.checks import Check, first_rejection
from infra.placement.engine import Occupied, Placement, Plan, starting_snapshot
from infra.placement.fast import LiveSnapshot
from infra.placement.scoring import STRATEGIES, ScorePart, Scorer
from infra.placement.snapshot import NodeCondition, NodeLoad, demand_on
from infra.probe.facts import NodeFacts

__all__ = ["STATIC_CHECKS", "RepairLimits", "RepairStats", "repair_plan"]

# Checks that read only what the node is (not what sits on it): a node failing one of them
# for an instance can never be made to take it by moving work off.
STATIC_CHECKS = frozenset({"enabled", "eligible", "healthy", "gpu", "constraints",
                           "runtime_driver", "volumes"})


@dataclass(frozen=True)
class RepairLimits:
    """How much work the repair may do (node checks: one ``first_rejection`` call each)."""

    checks_per_instance: int = 1_500
    checks: int = 12_000  # for the whole plan
    candidates_per_node: int = 6  # movable instances tried per node, smallest first
    trades: bool = True  # last resort: leave one placed instance out to place two or more
    trade_candidates: int = 12  # placed instances tried as the one left out, largest first


LIMITS = RepairLimits()


@dataclass
class RepairStats:
    """What one repair did: node checks spent, instances placed, instances moved."""

    checks: int = 0
    placed: int = 0
    moved: int = 0
    exhausted: bool = False  # the plan-wide cap was reached


class _Spent(Exception):
    """The check budget for this instance (or the plan) ran out."""


_MISSING: Any = object()


class _Board:
    """The plan's state, changed in place; every change is journaled so a try can be undone."""

    def __init__(self, live: LiveSnapshot) -> None:
        self.live = live
        self.snap = live.snap  # its maps are live's dicts: checks see every change
        self.journal: list[tuple[dict[Any, Any], Any, Any]] = []

    def _set(self, table: dict[Any, Any], key: Any, value: Any) -> None:
        self.journal.append((table, key, table.get(key, _MISSING)))
        if value is _MISSING:
            table.pop(key, None)
        else:
            table[key] = value

    def mark(self) -> int:
        return len(self.journal)

    def undo(self, mark: int) -> None:
        """Put back every change made since ``mark``."""
        while len(self.journal) > mark:
            table, key, old = self.journal.pop()
            if old is _MISSING:
                table.pop(key, None)
            else:
                table[key] = old

    def add(self, spec: ExperimentSpec, node: NodeConfig, alloc: Allocation) -> None:
        """Place ``spec`` on ``node`` as ``Snapshot.with_placement`` would."""
        live = self.live
        self._set(live.loads, node.name, live.loads[node.name].add(demand_on(node, spec)))
        self._set(live.placed, spec.experiment_id, node.name)
        holder = alloc.holder
        if alloc.device_ids:
            mine = dict(live.devices.get(node.name, {}))
            mine.update(dict.fromkeys(alloc.device_ids, holder))
            self._set(live.devices, node.name, MappingProxyType(mine))
        if alloc.ports:
            held = dict(live.ports.get(node.name, {}))
            for _label, port in alloc.ports:
                held.setdefault(port, holder)
            self._set(live.ports, node.name, MappingProxyType(held))
        self._set(live.allocations, spec.experiment_id, alloc)

    def remove(self, instance_id: str) -> None:
        """Take an instance off its node: its load, devices and ports are freed."""
        live = self.live
        name = live.placed[instance_id]
        load = NodeLoad()
        for d in live.loads[name].instances:
            if d.instance_id != instance_id:
                load = load.add(d)
        self._set(live.loads, name, load)
        for table in (live.devices, live.ports):
            held = table.get(name)
            if held and any(h.instance_id == instance_id for h in held.values()):
                self._set(table, name, MappingProxyType(
                    {k: h for k, h in held.items() if h.instance_id != instance_id}))
        self._set(live.placed, instance_id, _MISSING)
        self._set(live.allocations, instance_id, _MISSING)


@dataclass(frozen=True)
class _Step:
    """One placement made during a try: the instance, its node, score parts, allocation."""

    spec: ExperimentSpec
    node: NodeConfig
    parts: tuple[ScorePart, ...]
    alloc: Allocation


# a fix: the unplaced instance's step, and each moved instance's step with its old node
_Fix = tuple[_Step, list[tuple[_Step, str]]]


def _moved(moves: list[tuple[_Step, str]]) -> str:
    """'e5 to n4 and e3 to n1': what the moves did."""
    return " and ".join(f"{m.spec.experiment_id} to {m.node.name}" for m, _o in moves)


class _Repair:
    """State of one repair: the board, the placements, what may move, the budget."""

    def __init__(self, board: _Board, result: Plan, specs: Mapping[str, ExperimentSpec],
                 checks: tuple[tuple[str, Check], ...], scorers: tuple[Scorer, ...],
                 limits: RepairLimits) -> None:
        self.board = board
        self.snap = board.snap
        self.nodes = board.snap.nodes
        self.specs = specs
        self.checks = checks
        self.static = tuple(c for c in checks if c[0] in STATIC_CHECKS)
        self.scorers = scorers
        self.limits = limits
        self.placements = {p.instance_id: p for p in result.placements}
        self.order = [p.instance_id for p in result.placements]
        self.movable = {p.instance_id for p in result.placements if not p.pinned}
        self.stats = RepairStats()
        self.left = 0  # checks left for the current instance
        self.dropped: dict[str, str] = {}  # instance traded out -> why

    # ---- judging ----------------------------------------------------------------

    def fits(self, node: NodeConfig, spec: ExperimentSpec) -> bool:
        """Every hard check of the plan, on the board as it is now (costs one check)."""
        self.spend()
        return first_rejection(self.snap, node, spec, self.checks) is None

    def spend(self) -> None:
        """Count one check; stop the try when this instance's or the plan's cap is reached."""
        if self.left <= 0 or self.stats.checks >= self.limits.checks:
            self.stats.exhausted = self.stats.checks >= self.limits.checks
            raise _Spent
        self.left -= 1
        self.stats.checks += 1

    def could_fit(self, node: NodeConfig, spec: ExperimentSpec) -> bool:
        """The static checks only: False means no move can ever make room here (costs one
        check too: cheap, but a big cluster has many nodes)."""
        self.spend()
        return first_rejection(self.snap, node, spec, self.static) is None

    def place(self, spec: ExperimentSpec, node: NodeConfig) -> _Step:
        """Put ``spec`` on ``node`` (already judged feasible); scores as of now."""
        parts = tuple(score(self.snap, node, spec) for score in self.scorers)
        alloc, _short = self.snap.allocate(node, spec)
        self.board.add(spec, node, alloc)
        return _Step(spec, node, parts, alloc)

    def home(self, spec: ExperimentSpec, avoid: Iterable[str]) -> _Step | None:
        """Place ``spec`` on its best feasible node outside ``avoid`` (the planner's rule:
        highest total, first node in order on ties), or None when there is none."""
        skip = set(avoid)
        best: tuple[NodeConfig, float] | None = None
        for node in self.nodes:
            if node.name in skip or not self.fits(node, spec):
                continue
            total = sum(score(self.snap, node, spec).points for score in self.scorers)
            if best is None or total > best[1] + 1e-9:
                best = (node, total)
        return None if best is None else self.place(spec, best[0])

    def where(self, instance_id: str) -> str:
        """The node an instance is on now."""
        return self.board.live.placed[instance_id]

    def movers(self, node: str, exclude: Iterable[str] = ()) -> list[ExperimentSpec]:
        """Movable instances on ``node``, smallest demand first, at most the cap."""
        gone = set(exclude)
        here = sorted((iid for iid in self.board.live.loads[node].instance_ids
                       if iid in self.movable and iid not in gone),
                      key=lambda iid: (self.specs[iid].ram_gb, self.specs[iid].cpu_cores, iid))
        return [self.specs[iid] for iid in here[: self.limits.candidates_per_node]]

    # ---- the search -------------------------------------------------------------

    def run(self, unplaced: tuple[str, ...]) -> list[str]:
        """Try every unplaced instance until a pass places none, then trades; returns the
        instances still left out (in decision order, those traded out last)."""
        left = list(unplaced)
        while left and self.stats.checks < self.limits.checks:
            if self.moves_pass(left):
                continue
            if not self.limits.trades or not self.trade(left):
                break
        return left

    def moves_pass(self, left: list[str]) -> bool:
        """One try per instance in ``left`` (removed from it when placed); True on progress."""
        progress = False
        for iid in list(left):
            if self.stats.checks >= self.limits.checks:
                break
            if self.attempt(functools.partial(self.fix, self.specs[iid])):
                left.remove(iid)
                progress = True
        return progress

    def attempt(self, action: Callable[[], bool]) -> bool:
        """Run one try with a fresh per-instance budget; undo it all if the budget runs out."""
        self.left = self.limits.checks_per_instance
        mark = self.board.mark()
        try:
            return action()
        except _Spent:
            self.board.undo(mark)
            return False

    def trade(self, left: list[str]) -> bool:
        """Leave one placed instance out when that lets two or more of ``left`` be placed
        where they now fit (one more instance placed in all). Largest candidates first."""
        ranked = sorted(self.movable, key=lambda iid: (-self.specs[iid].ram_gb,
                                                       -self.specs[iid].cpu_cores, iid))
        for victim in ranked[: self.limits.trade_candidates]:
            if self.stats.checks >= self.limits.checks:
                return False
            if self.attempt(functools.partial(self.trade_one, victim, left)):
                return True
        return False

    def fix(self, spec: ExperimentSpec) -> bool:
        """Place ``spec`` (with moves if need be) and record it."""
        found = self.make_room(spec)
        if found is None:
            return False
        self.commit(*found)
        return True

    def trade_one(self, victim: str, left: list[str]) -> bool:
        """``victim`` leaves; each of ``left``, smallest first (the most instances), is
        placed as a move-free, one- or two-move fix would; kept when two or more get a node."""
        mark = self.board.mark()
        origin = self.where(victim)
        self.board.remove(victim)
        small_first = sorted(left, key=lambda iid: (self.specs[iid].ram_gb,
                                                   self.specs[iid].cpu_cores, iid))
        fixes = [fix for iid in small_first
                 if (fix := self.make_room(self.specs[iid])) is not None]
        if len(fixes) < 2:
            self.board.undo(mark)
            return False
        names = " and ".join(step.spec.experiment_id for step, _moves in fixes)
        self.dropped[victim] = (f"left out by the repair: without it on {origin}, {names} "
                                "could be placed (one more instance in all)")
        del self.placements[victim]
        self.order.remove(victim)
        self.movable.discard(victim)
        for step, moves in fixes:
            self.commit(step, moves, note=f"placed by the repair in place of {victim}"
                        + (f" (after moving {_moved(moves)})" if moves else ""))
            left.remove(step.spec.experiment_id)
        left.append(victim)
        return True

    def make_room(self, spec: ExperimentSpec) -> _Fix | None:
        """Cheapest first: fits as is, one move, two off one node, a chain of two. The
        board holds the result; nothing is recorded yet."""
        direct = self.home(spec, ())
        if direct is not None:
            return direct, []
        targets = [n for n in self.nodes if self.could_fit(n, spec)]
        loose: list[tuple[NodeConfig, ExperimentSpec]] = []
        for target in targets:
            for mover in self.movers(target.name):
                if (found := self.one_move(spec, target, mover, loose)) is not None:
                    return found
        for target in targets:
            movers = self.movers(target.name)
            for a, b in itertools.combinations(movers, 2):
                if (found := self.two_off(spec, target, a, b)) is not None:
                    return found
        for target, mover in loose:
            if (found := self.chain(spec, target, mover)) is not None:
                return found
        return None

    def one_move(self, spec: ExperimentSpec, target: NodeConfig, mover: ExperimentSpec,
                 loose: list[tuple[NodeConfig, ExperimentSpec]]) -> _Fix | None:
        """``mover`` leaves ``target`` for another node, ``spec`` takes its place."""
        mark = self.board.mark()
        self.board.remove(mover.experiment_id)
        if self.fits(target, spec):
            step = self.place(spec, target)
            moved = self.home(mover, (target.name,))
            if moved is not None:
                return step, [(moved, target.name)]
            loose.append((target, mover))  # room enough, but no home: try a chain later
        self.board.undo(mark)
        return None

    def two_off(self, spec: ExperimentSpec, target: NodeConfig, a: ExperimentSpec,
                b: ExperimentSpec) -> _Fix | None:
        """Both ``a`` and ``b`` leave ``target`` for other nodes, ``spec`` takes it."""
        mark = self.board.mark()
        self.board.remove(a.experiment_id)
        self.board.remove(b.experiment_id)
        if self.fits(target, spec):
            step = self.place(spec, target)
            first = self.home(a, (target.name,))
            second = self.home(b, (target.name,)) if first is not None else None
            if first is not None and second is not None:
                return step, [(first, target.name), (second, target.name)]
        self.board.undo(mark)
        return None

    def chain(self, spec: ExperimentSpec, target: NodeConfig, mover: ExperimentSpec
              ) -> _Fix | None:
        """``mover`` leaves ``target`` for a node where a second instance makes room for it
        by moving on to a third node."""
        for via in self.nodes:
            if via.name == target.name or not self.could_fit(via, mover):
                continue
            for second in self.movers(via.name, exclude=(mover.experiment_id,)):
                mark = self.board.mark()
                self.board.remove(mover.experiment_id)
                self.board.remove(second.experiment_id)
                if self.fits(target, spec):
                    step = self.place(spec, target)
                    if self.fits(via, mover):
                        first = self.place(mover, via)
                        last = self.home(second, (via.name,))
                        if last is not None:
                            return step, [(first, target.name), (last, via.name)]
                self.board.undo(mark)
        return None

    # ---- results ----------------------------------------------------------------

    def commit(self, step: _Step, moves: list[tuple[_Step, str]], note: str = "") -> None:
        """Record a successful try: the moved instances' new placements and the new one."""
        iid = step.spec.experiment_id
        self.dropped.pop(iid, None)  # traded out earlier, placed again now
        for moved, origin in moves:
            mid = moved.spec.experiment_id
            old = self.placements[mid]
            why = (f"moved by the repair from {origin} to {moved.node.name} "
                   f"to make room for {iid}")
            self.placements[mid] = replace(
                old, node=moved.node.name, parts=moved.parts,
                score=sum(p.points for p in moved.parts), allocation=moved.alloc,
                repair=f"{old.repair}; {why}" if old.repair else why)
        self.placements[iid] = Placement(
            iid, step.node.name, sum(p.points for p in step.parts), step.parts,
            allocation=step.alloc,
            repair=note or (f"placed by the repair after moving {_moved(moves)}" if moves
                            else "placed by the repair (room made by an earlier repair)"))
        self.order.append(iid)
        self.movable.add(iid)
        self.stats.placed += 1
        self.stats.moved += len(moves)


def repair_plan(result: Plan, cluster: Cluster, specs: Iterable[ExperimentSpec], *,
                conditions: Mapping[str, NodeCondition] | None,
                facts: Mapping[str, NodeFacts] | None,
                occupied: Iterable[Occupied], peers: Iterable[Occupied],
                checks: tuple[tuple[str, Check], ...], strategy: Strategy,
                limits: RepairLimits = LIMITS,
                stats: RepairStats | None = None) -> Plan:
    """``result`` with as many of its unplaced instances placed as bounded moves allow.

    The greedy placements are replayed onto the plan's starting snapshot (the same one
    ``plan`` built from these arguments), so the repair sees exactly the greedy end state.
    ``stats``, when given, is filled in (checks spent, placed, moved).
    """
    spec_list = sorted(specs, key=lambda s: s.experiment_id)
    if not result.unplaced or all(p.pinned for p in result.placements):
        return result  # nothing may move, so nothing new can fit
    start = starting_snapshot(cluster, spec_list, conditions, facts, occupied, peers)
    board = _Board(LiveSnapshot(start))
    by_id = {s.experiment_id: s for s in spec_list}
    by_node = {n.name: n for n in start.nodes}
    for p in result.placements:
        alloc = p.allocation if p.allocation is not None else \
            board.snap.allocate(by_node[p.node], by_id[p.instance_id])[0]
        board.live.place(by_id[p.instance_id], by_node[p.node], alloc)
    work = _Repair(board, result, by_id, checks, STRATEGIES[strategy], limits)
    left = work.run(result.unplaced)
    if stats is not None:
        stats.checks, stats.placed = work.stats.checks, work.stats.placed
        stats.moved, stats.exhausted = work.stats.moved, work.stats.exhausted
    if len(left) == len(result.unplaced):
        return result
    return replace(result, placements=tuple(work.placements[i] for i in work.order),
                   unplaced=tuple(left), left_out=MappingProxyType(dict(work.dropped)))
