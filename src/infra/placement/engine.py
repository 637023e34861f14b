"""``plan()``: order the instances, then for each run every node through the checks and
scorers and take the best. Pure: no I/O, the result depends only on its inputs.

Order: pinned instances first, then GPU-required first, larger RAM first, then id; an
instance waits for the peers it names in ``affinity`` (cycles broken by that base order).
Ties go to the node listed first in the topology (or in ``placement.preferences``).
Every placement records its ``Allocation`` (device ids, ports, volumes, driver, amounts);
devices and ports held by this plan or by ``occupied`` work are never handed out twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from infra.config.model import Cluster, ExperimentSpec, NodeConfig, Strategy
from infra.placement.allocation import Allocation
from infra.placement.checks import DEFAULT_CHECKS, Check, all_rejections, first_rejection
from infra.placement.scoring import STRATEGIES, ScorePart, Scorer
from infra.placement.snapshot import NodeCondition, Snapshot
from infra.probe.facts import NodeFacts

__all__ = ["STRATEGIES", "NodeEvaluation", "Occupied", "Placement", "Plan", "base_key",
           "evaluate", "normalize_occupied", "placement_order", "plan", "starting_snapshot",
           "why_not"]

# Work already running: (spec, node) or (spec, node, allocation-or-None).
Occupied = tuple[ExperimentSpec, str] | tuple[ExperimentSpec, str, Allocation | None]


@dataclass(frozen=True)
class NodeEvaluation:
    """One node judged for one instance: a rejection reason, or score parts."""

    node: str
    rejection: str | None
    parts: tuple[ScorePart, ...] = ()

    @property
    def feasible(self) -> bool:
        return self.rejection is None

    @property
    def total(self) -> float:
        return sum(p.points for p in self.parts)


@dataclass(frozen=True)
class Placement:
    """Where one instance goes and why."""

    instance_id: str
    node: str
    score: float
    parts: tuple[ScorePart, ...]
    pinned: bool = False
    forced: tuple[str, ...] = ()  # hard constraints a --force pin overrode
    allocation: Allocation | None = None  # always set by plan()
    repair: str = ""  # set when the repair step moved or placed it: what it did and why


@dataclass(frozen=True)
class Plan:
    """The outcome: placements in decision order, per-instance node evaluations, failures."""

    placements: tuple[Placement, ...]
    evaluations: Mapping[str, tuple[NodeEvaluation, ...]]
    unplaced: tuple[str, ...] = ()
    pin_errors: Mapping[str, str] = field(default_factory=dict)
    strategy: Strategy = Strategy.SCORE
    # instance -> check name -> how many nodes that check refused it on (cheap "why not")
    rejections: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    # unplaced instance -> why the repair left it out (it fitted, others fit in its stead)
    left_out: Mapping[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.unplaced and not self.pin_errors

    def node_of(self, instance_id: str) -> str | None:
        for p in self.placements:
            if p.instance_id == instance_id:
                return p.node
        return None

    def as_dict(self) -> dict[str, str]:
        return {p.instance_id: p.node for p in self.placements}

    def allocation_of(self, instance_id: str) -> Allocation | None:
        for p in self.placements:
            if p.instance_id == instance_id:
                return p.allocation
        return None


def base_key(spec: ExperimentSpec) -> tuple[bool, float, str]:
    """GPU-required first, then larger RAM first, then id."""
    return (not spec.gpu_required, -spec.ram_gb, spec.experiment_id)


def placement_order(specs: Iterable[ExperimentSpec]) -> list[ExperimentSpec]:
    """Base order, except that an instance comes after the affinity peers it names."""
    remaining = sorted(specs, key=base_key)
    ids = {s.experiment_id for s in remaining}
    done: set[str] = set()
    order: list[ExperimentSpec] = []
    while remaining:
        pick = next((s for s in remaining
                     if all(p in done or p not in ids for p in s.affinity)), remaining[0])
        remaining.remove(pick)
        done.add(pick.experiment_id)
        order.append(pick)
    return order


def evaluate(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec,
             checks: tuple[tuple[str, Check], ...], scorers: tuple[Scorer, ...]
             ) -> NodeEvaluation:
    reason = first_rejection(snap, node, spec, checks)
    if reason is not None:
        return NodeEvaluation(node.name, reason)
    return NodeEvaluation(node.name, None, tuple(score(snap, node, spec) for score in scorers))


def starting_snapshot(cluster: Cluster, specs: list[ExperimentSpec],
                      conditions: Mapping[str, NodeCondition] | None,
                      facts: Mapping[str, NodeFacts] | None,
                      occupied: Iterable[Occupied],
                      peers: Iterable[Occupied] = ()) -> Snapshot:
    """The snapshot a plan starts from: the cluster with the ``occupied`` work already on it.

    ``peers`` are placed work of the same plan (a moved instance's run-mates): they hold
    capacity like occupied work and also count for ``distinct_hosts``.
    """
    busy = normalize_occupied(occupied)
    mates = normalize_occupied(peers)
    snap = Snapshot.build(cluster, [*specs, *(s for s, _, _ in busy + mates)], conditions,
                          cluster.placement.preferences, facts)
    by_name = {n.name: n for n in snap.nodes}
    for spec, node_name, alloc in busy:
        if node_name in by_name:
            snap = snap.with_placement(spec, by_name[node_name], alloc, occupied=True)
    for spec, node_name, alloc in mates:
        if node_name in by_name:
            snap = snap.with_placement(spec, by_name[node_name], alloc)
    return snap


def normalize_occupied(items: Iterable[Occupied]
                       ) -> list[tuple[ExperimentSpec, str, Allocation | None]]:
    """Normalize (spec, node) and (spec, node, allocation) items to triples."""
    out: list[tuple[ExperimentSpec, str, Allocation | None]] = []
    for item in items:
        if len(item) == 2:
            out.append((item[0], item[1], None))
        else:
            out.append((item[0], item[1], item[2]))
    return out


def plan(cluster: Cluster, specs: Iterable[ExperimentSpec], *,
         pins: Mapping[str, str] | None = None,
         conditions: Mapping[str, NodeCondition] | None = None,
         force: bool = False,
         strategy: Strategy | None = None,
         occupied: Iterable[Occupied] = (),
         checks: tuple[tuple[str, Check], ...] = DEFAULT_CHECKS,
         facts: Mapping[str, NodeFacts] | None = None,
         peers: Iterable[Occupied] = (),
         reference: bool = False,
         repair: bool = True) -> Plan:
    """Place every spec. Pins are checked against the hard constraints unless ``force``.

    ``occupied`` is work already running, as (spec, node) or (spec, node, allocation): it
    uses capacity, holds its devices and ports (the allocation's, else what the spec asks
    for) and counts for affinity and anti-affinity, but is not placed again. ``facts``
    (probe results by node) refine node inventories: GPU ids, memory, capabilities, arch.
    ``strategy`` overrides the config's ``placement.strategy``. ``peers`` are already placed
    instances of the same plan (a moved instance's run-mates): every check that relates
    instances of one plan (``distinct_hosts``, anti-affinity) applies to them as well.

    ``reference=True`` runs the original, slow decision path (every node judged for every
    instance, every evaluation kept); the default path makes the same decisions with node
    classes and lazy explanations (see ``infra.placement.fast``).

    When the greedy pass leaves instances unplaced, a bounded repair step moves one or two
    unpinned instances to make room, or leaves one out when two or more then fit
    (``infra.placement.repair``); ``repair=False`` gives the greedy pass alone.
    """
    specs, occupied, peers = tuple(specs), tuple(occupied), tuple(peers)  # read twice
    if repair:
        greedy = plan(cluster, specs, pins=pins, conditions=conditions, force=force,
                      strategy=strategy, occupied=occupied, checks=checks, facts=facts,
                      peers=peers, reference=reference, repair=False)
        if not greedy.unplaced:
            return greedy
        from infra.placement.repair import repair_plan
        return repair_plan(greedy, cluster, specs, conditions=conditions, facts=facts,
                           occupied=occupied, peers=peers, checks=checks,
                           strategy=greedy.strategy)
    if not reference:
        from infra.placement.fast import fast_plan, supports
        chosen = strategy or cluster.placement.strategy
        if supports(checks, STRATEGIES[chosen]):
            return fast_plan(cluster, specs, pins=pins, conditions=conditions, force=force,
                             strategy=chosen, occupied=occupied, checks=checks, facts=facts,
                             peers=peers)
    spec_list = sorted(specs, key=lambda s: s.experiment_id)
    pins = dict(pins or {})
    chosen_strategy = strategy or cluster.placement.strategy
    scorers = STRATEGIES[chosen_strategy]
    snap = starting_snapshot(cluster, spec_list, conditions, facts, occupied, peers)
    node_by_name = {n.name: n for n in snap.nodes}

    placements: list[Placement] = []
    evaluations: dict[str, tuple[NodeEvaluation, ...]] = {}
    unplaced: list[str] = []
    pin_errors: dict[str, str] = {}

    pinned = [s for s in sorted(spec_list, key=base_key) if s.experiment_id in pins]
    for spec in pinned:
        node = node_by_name[pins[spec.experiment_id]]
        evaluations[spec.experiment_id] = tuple(
            evaluate(snap, n, spec, checks, scorers) for n in snap.nodes)
        violations = all_rejections(snap, node, spec, checks)
        if violations and (not force or not node.enabled
                           or snap.conditions[node.name].condition.unreachable):
            # --force overrides capacity and constraints, never a node switched off in the
            # topology ("disabled nodes are never used") nor one that cannot be reached (the
            # instance could only fail there)
            pin_errors[spec.experiment_id] = f"{node.name} {violations[0]}"
            continue
        parts = tuple(score(snap, node, spec) for score in scorers)
        alloc, _short = snap.allocate(node, spec)
        placements.append(Placement(spec.experiment_id, node.name, sum(p.points for p in parts),
                                    parts, pinned=True, forced=violations, allocation=alloc))
        snap = snap.with_placement(spec, node, alloc)

    for spec in placement_order(s for s in spec_list if s.experiment_id not in pins):
        evals = tuple(evaluate(snap, n, spec, checks, scorers) for n in snap.nodes)
        evaluations[spec.experiment_id] = evals
        best: NodeEvaluation | None = None
        for ev in evals:  # strict '>' keeps the first-listed node on ties
            if ev.feasible and (best is None or ev.total > best.total + 1e-9):
                best = ev
        if best is None:
            unplaced.append(spec.experiment_id)
            continue
        node = node_by_name[best.node]
        alloc, _short = snap.allocate(node, spec)
        placements.append(Placement(spec.experiment_id, best.node, best.total, best.parts,
                                    allocation=alloc))
        snap = snap.with_placement(spec, node, alloc)

    return Plan(placements=tuple(placements), evaluations=evaluations,
                unplaced=tuple(unplaced), pin_errors=pin_errors, strategy=chosen_strategy)


def why_not(plan_: Plan, instance_id: str) -> str:
    """One line: every node's reason for refusing the instance (or why the repair left it
    out: then it fitted when the greedy pass judged it)."""
    if instance_id in plan_.left_out:
        return plan_.left_out[instance_id]
    evals = plan_.evaluations.get(instance_id, ())
    reasons = [f"{e.node}: {e.rejection}" for e in evals if not e.feasible]
    return "; ".join(reasons) if reasons else "no nodes"
