"""The planner's fast path: the same decisions as the reference loop in ``engine.plan``.

Three ideas, after Nomad's scheduler:

* **Node classes.** Nodes with identical static attributes (capacity, flags, condition,
  inventory) and identical load state (count, RAM, GPU memory, cores, disk, held devices and
  ports) are judged once per instance; a node changes class when something is placed on it.
  Nodes where the instance's affinity/anti-affinity peers or ``distinct_hosts`` peers sit,
  and its preferred node, are judged one by one.
* **Lazy explanations.** Nodes are judged with points-only scorers and the first failing
  check's *name*; ``Plan.evaluations`` (every node's reason or score parts, with detail
  text) is rebuilt on demand by replaying the decisions, only for the instances asked about.
  ``Plan.rejections`` keeps counts per check per instance.
* **Incremental bookkeeping.** One snapshot whose maps are updated in place instead of a new
  snapshot per placement.
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from infra.config.model import Cluster, ExperimentSpec, NodeConfig, Strategy
from infra.placement.allocation import Allocation, Holder
from infra.placement.checks import DEFAULT_CHECKS, Check, _distinct, all_rejections
from infra.placement.constraints import attribute_name
from infra.placement.engine import (
    NodeEvaluation,
    Occupied,
    Placement,
    Plan,
    base_key,
    evaluate,
    placement_order,
    starting_snapshot,
)
from infra.placement.scoring import POINTS, STRATEGIES, Points, ScorePart, Scorer
from infra.placement.snapshot import NodeCondition, NodeLoad, Snapshot, demand_on
from infra.probe.facts import NodeFacts

__all__ = ["LiveSnapshot", "fast_plan", "supports"]

# attributes unique to a node: left out of its class unless some constraint names them
_UNIQUE_ATTRS = frozenset({"name", "host", "hostname"})


def supports(checks: tuple[tuple[str, Check], ...], scorers: tuple[Scorer, ...]) -> bool:
    """The fast path knows what the default checks and the built-in scorers read."""
    return checks == DEFAULT_CHECKS and all(s in POINTS for s in scorers)


class LiveSnapshot:
    """A snapshot whose maps this object updates in place (``with_placement`` copies them)."""

    def __init__(self, snap: Snapshot) -> None:
        self.loads: dict[str, NodeLoad] = dict(snap.loads)
        self.placed: dict[str, str] = dict(snap.placed)
        self.devices: dict[str, Mapping[str, Holder]] = dict(snap.devices_held)
        self.ports: dict[str, Mapping[int, Holder]] = dict(snap.ports_held)
        self.allocations: dict[str, Allocation] = dict(snap.allocations)
        self.snap = replace(snap, loads=self.loads, placed=self.placed,
                            devices_held=self.devices, ports_held=self.ports,
                            allocations=self.allocations)

    def place(self, spec: ExperimentSpec, node: NodeConfig, allocation: Allocation) -> None:
        """Put ``spec`` on ``node`` exactly as ``Snapshot.with_placement`` would."""
        self.loads[node.name] = self.loads[node.name].add(demand_on(node, spec))
        self.placed[spec.experiment_id] = node.name
        holder = allocation.holder
        if allocation.device_ids:
            mine = dict(self.devices.get(node.name, {}))
            mine.update(dict.fromkeys(allocation.device_ids, holder))
            self.devices[node.name] = MappingProxyType(mine)
        if allocation.ports:
            held = dict(self.ports.get(node.name, {}))
            for _label, port in allocation.ports:
                held.setdefault(port, holder)
            self.ports[node.name] = MappingProxyType(held)
        self.allocations[spec.experiment_id] = allocation


def _named_attributes(snap: Snapshot, specs: Iterable[ExperimentSpec]) -> frozenset[str]:
    """Every attribute some constraint of this plan names (short forms)."""
    names = {attribute_name(c.attribute) for c in snap.constraints}
    for s in specs:
        names.update(attribute_name(c.attribute) for c in s.constraints)
    return frozenset(names)


def _static_key(snap: Snapshot, node: NodeConfig, named: frozenset[str]) -> Hashable:
    """What the checks and scorers read of a node that does not change during a plan."""
    inv = snap.inventory(node)
    attrs = tuple(sorted(((k, v) for k, v in inv.attributes.items()
                          if k not in _UNIQUE_ATTRS or k in named), key=lambda kv: kv[0]))
    return (node.enabled, node.scheduling_eligible, node.gpu, node.max_instances,
            node.unified_memory, node.ram_gb, node.reserved_ram_gb, node.gpu_memory_gb,
            node.cpu_cores, node.monitor_port, node.ssh_port, node.is_local,
            snap.conditions[node.name], inv.devices, inv.host_paths, inv.runtime_drivers,
            inv.disk_gb, attrs)


@dataclass
class _Classes:
    """Nodes grouped by (static class, load state); each group's indices in topology order."""

    live: LiveSnapshot
    static: list[int]
    keys: list[Hashable] = field(default_factory=list)
    groups: dict[Hashable, list[int]] = field(default_factory=dict)

    def state_key(self, i: int) -> Hashable:
        """The node's class now. A node no instance can get (switched off, cordoned, not
        schedulable, full) is refused by checks that read only static facts before any load
        fact, so its load no longer splits it from its static class."""
        node = self.live.snap.nodes[i]
        name = node.name
        load = self.live.loads[name]
        if (not node.enabled or not node.scheduling_eligible
                or not self.live.snap.conditions[name].condition.schedulable
                or load.count >= node.max_instances):
            return (self.static[i], "dead")
        devices = self.live.devices.get(name)
        ports = self.live.ports.get(name)
        return (self.static[i], load.count, load.ram_gb, load.gpu_memory_gb, load.cpu_cores,
                load.disk_gb, frozenset(devices.items()) if devices else None,
                frozenset(ports.items()) if ports else None)

    def build(self) -> None:
        for i in range(len(self.static)):
            key = self.state_key(i)
            self.keys.append(key)
            self.groups.setdefault(key, []).append(i)

    def moved(self, i: int) -> Hashable | None:
        """Node ``i``'s load changed: move it to the group of its new state. Returns the
        old class's key when no node is left in it."""
        old = self.keys[i]
        members = self.groups[old]
        members.remove(i)
        key = self.state_key(i)
        self.keys[i] = key
        bisect.insort(self.groups.setdefault(key, []), i)
        if not members and old != key:
            del self.groups[old]
            return old
        return None


def _judge(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec,
           checks: tuple[tuple[str, Check], ...], points: tuple[Points, ...]
           ) -> tuple[str | None, float]:
    """(name of the first failing check, 0) or (None, total points)."""
    for name, check in checks:
        if check(snap, node, spec) is not None:
            return name, 0.0
    return None, sum(p(snap, node, spec) for p in points)


WINDOW = 1e-6  # totals this close to the maximum are scanned in topology order


def _first_best(feasible: list[tuple[int, float]]) -> int | None:
    """What the reference scan (topology order, replace only when better by > 1e-9) picks.

    Only totals within WINDOW of the maximum can win, provided none lies just below the
    window (within 1e-9 of its edge, where the scan could chain); otherwise scan them all.
    """
    if not feasible:
        return None
    top = max(t for _i, t in feasible)
    edge = top - WINDOW
    if any(edge - 1e-9 <= t < edge for _i, t in feasible):
        near = feasible
    else:
        near = [c for c in feasible if c[1] >= edge]
    near.sort(key=lambda c: c[0])
    best, best_total = near[0]
    for i, total in near[1:]:
        if total > best_total + 1e-9:
            best, best_total = i, total
    return best


class _Planner:
    """State of one fast plan: the live snapshot, node classes, distinct-hosts nodes."""

    def __init__(self, snap: Snapshot, checks: tuple[tuple[str, Check], ...],
                 scorers: tuple[Scorer, ...], specs: list[ExperimentSpec]) -> None:
        self.live = LiveSnapshot(snap)
        self.checks = checks
        self.scorers = scorers
        self.points = tuple(POINTS[s] for s in scorers)
        self.nodes = snap.nodes
        self.index = {n.name: i for i, n in enumerate(snap.nodes)}
        named = _named_attributes(snap, [*specs, *snap.specs.values()])
        statics: dict[Hashable, int] = {}
        static = [statics.setdefault(_static_key(snap, n, named), len(statics))
                  for n in snap.nodes]
        self.classes = _Classes(self.live, static)
        self.classes.build()
        self.distinct_nodes: set[int] = set()
        # class key -> instance shape -> verdict; a class's entry goes when it empties
        self.memo: dict[Hashable, dict[Hashable, tuple[str | None, float]]] = {}
        for name, load in snap.loads.items():
            for iid in load.instance_ids - snap.occupied_ids:
                peer = snap.specs.get(iid)
                if peer is not None and _distinct(snap, peer):
                    self.distinct_nodes.add(self.index[name])

    def special(self, spec: ExperimentSpec) -> set[int]:
        """Nodes whose verdict for ``spec`` depends on which instances sit there."""
        snap = self.live.snap
        out: set[int] = set()
        ids = [*spec.affinity, *spec.anti_affinity, *snap.anti_of.get(spec.experiment_id, ())]
        for iid in ids:
            where = self.live.placed.get(iid)
            if where is not None:
                out.add(self.index[where])
        if spec.preferred_node is not None and spec.preferred_node in self.index:
            out.add(self.index[spec.preferred_node])
        if self.distinct_nodes and _distinct(snap, spec):
            out |= self.distinct_nodes
        return out

    @staticmethod
    def shape(spec: ExperimentSpec) -> Hashable:
        """What decides an instance's verdict on a node that holds none of its peers and is
        not its preferred node: its demands and requests (its id only for port holders)."""
        res = spec.resources
        return (spec.ram_gb, spec.gpu_required, spec.gpu_memory_gb, spec.cpu_cores, res,
                spec.constraints, spec.experiment_id if res.ports else None)

    def best(self, spec: ExperimentSpec) -> tuple[int | None, dict[str, int]]:
        """The node the reference loop would pick (or None), and rejection counts."""
        snap = self.live.snap
        special = self.special(spec)
        shape = self.shape(spec)
        memo = self.memo
        counts: dict[str, int] = {}
        feasible: list[tuple[int, float]] = []
        for key, members in self.classes.groups.items():
            rep = members[0]
            if special:
                rest = [i for i in members if i not in special]
                if not rest:
                    continue
                rep = rest[0]
                weight = len(rest)
            else:
                weight = len(members)
            known = memo.get(key)
            if known is None:
                known = memo[key] = {}
            verdict = known.get(shape)
            if verdict is None:
                verdict = known[shape] = _judge(snap, self.nodes[rep], spec, self.checks,
                                                self.points)
            why = verdict[0]
            if why is None:
                feasible.append((rep, verdict[1]))
            else:
                counts[why] = counts.get(why, 0) + weight
        for i in special:
            why, total = _judge(snap, self.nodes[i], spec, self.checks, self.points)
            if why is None:
                feasible.append((i, total))
            else:
                counts[why] = counts.get(why, 0) + 1
        return _first_best(feasible), counts

    def place(self, spec: ExperimentSpec, node: NodeConfig, alloc: Allocation) -> None:
        self.live.place(spec, node, alloc)
        i = self.index[node.name]
        gone = self.classes.moved(i)
        if gone is not None:
            self.memo.pop(gone, None)
        if _distinct(self.live.snap, spec):
            self.distinct_nodes.add(i)


class LazyEvaluations(Mapping[str, tuple[NodeEvaluation, ...]]):
    """Every node's verdict per instance, rebuilt on demand by replaying the plan's steps.

    ``steps`` says, per instance in decision order, how many placements preceded its
    decision; replaying that many placements onto the starting snapshot gives exactly the
    snapshot the reference loop judged it on.
    """

    def __init__(self, start: Snapshot, placed: list[tuple[ExperimentSpec, NodeConfig,
                                                            Allocation]],
                 steps: dict[str, tuple[ExperimentSpec, int]],
                 checks: tuple[tuple[str, Check], ...], scorers: tuple[Scorer, ...]) -> None:
        self._start = start
        self._placed = placed
        self._steps = steps
        self._checks = checks
        self._scorers = scorers
        self._cache: dict[str, tuple[NodeEvaluation, ...]] = {}

    def _fill(self, ids: Iterable[str]) -> None:
        """Judge every node for each of ``ids`` on the snapshot of its decision."""
        want = sorted((self._steps[i][1], i) for i in ids if i not in self._cache)
        if not want:
            return
        live = LiveSnapshot(self._start)
        done = 0
        for k, iid in want:
            while done < k:
                spec, node, alloc = self._placed[done]
                live.place(spec, node, alloc)
                done += 1
            spec = self._steps[iid][0]
            self._cache[iid] = tuple(evaluate(live.snap, n, spec, self._checks, self._scorers)
                                     for n in live.snap.nodes)

    @property
    def explained(self) -> frozenset[str]:
        """Instances whose explanations have been built so far."""
        return frozenset(self._cache)

    def __getitem__(self, key: str) -> tuple[NodeEvaluation, ...]:
        if key not in self._steps:
            raise KeyError(key)
        self._fill([key])
        return self._cache[key]

    def __iter__(self) -> Iterator[str]:
        self._fill(self._steps)  # iterating means explaining all: one replay for them all
        return iter(self._steps)

    def __len__(self) -> int:
        return len(self._steps)

    def __contains__(self, key: object) -> bool:
        return key in self._steps


def fast_plan(cluster: Cluster, specs: Iterable[ExperimentSpec], *,
              pins: Mapping[str, str] | None, conditions: Mapping[str, NodeCondition] | None,
              force: bool, strategy: Strategy, occupied: Iterable[Occupied],
              checks: tuple[tuple[str, Check], ...], facts: Mapping[str, NodeFacts] | None,
              peers: Iterable[Occupied]) -> Plan:
    """``engine.plan``'s decisions, with node classes and lazy explanations."""
    spec_list = sorted(specs, key=lambda s: s.experiment_id)
    pins = dict(pins or {})
    scorers = STRATEGIES[strategy]
    start = starting_snapshot(cluster, spec_list, conditions, facts, occupied, peers)
    planner = _Planner(start, checks, scorers, spec_list)
    snap = planner.live.snap
    node_by_name = {n.name: n for n in start.nodes}

    placements: list[Placement] = []
    placed: list[tuple[ExperimentSpec, NodeConfig, Allocation]] = []
    steps: dict[str, tuple[ExperimentSpec, int]] = {}
    rejections: dict[str, Mapping[str, int]] = {}
    unplaced: list[str] = []
    pin_errors: dict[str, str] = {}

    def commit(spec: ExperimentSpec, node: NodeConfig, pinned: bool,
               forced: tuple[str, ...]) -> None:
        parts: tuple[ScorePart, ...] = tuple(score(snap, node, spec) for score in scorers)
        alloc, _short = snap.allocate(node, spec)
        placements.append(Placement(spec.experiment_id, node.name,
                                    sum(p.points for p in parts), parts, pinned=pinned,
                                    forced=forced, allocation=alloc))
        placed.append((spec, node, alloc))
        planner.place(spec, node, alloc)

    for spec in (s for s in sorted(spec_list, key=base_key) if s.experiment_id in pins):
        node = node_by_name[pins[spec.experiment_id]]
        steps[spec.experiment_id] = (spec, len(placed))
        violations = all_rejections(snap, node, spec, checks)
        if violations and (not force or not node.enabled
                           or snap.conditions[node.name].condition.unreachable):
            pin_errors[spec.experiment_id] = f"{node.name} {violations[0]}"
            continue
        commit(spec, node, True, violations)

    for spec in placement_order(s for s in spec_list if s.experiment_id not in pins):
        steps[spec.experiment_id] = (spec, len(placed))
        best, counts = planner.best(spec)
        if counts:
            rejections[spec.experiment_id] = counts
        if best is None:
            unplaced.append(spec.experiment_id)
            continue
        node = planner.nodes[best]
        commit(spec, node, False, ())

    return Plan(placements=tuple(placements),
                evaluations=LazyEvaluations(start, placed, steps, checks, scorers),
                unplaced=tuple(unplaced), pin_errors=pin_errors, strategy=strategy,
                rejections=rejections)
