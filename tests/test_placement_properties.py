"""Property tests for the placement engine: hard constraints, determinism and explanations.

Clusters and spec sets are random but built through the real parsers (``parse_cluster`` /
``parse_spec`` / ``check_spec_set``), so every generated input is one a user could write.
Resource sizes are multiples of 0.25 so sums are exact in binary floating point.
The capacity oracle here is written independently of ``infra.placement.snapshot``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infra.config.model import Cluster, ExperimentSpec, NodeConfig
from infra.config.specs import check_spec_set, parse_spec
from infra.config.topology import parse_cluster
from infra.placement import Condition, NodeCondition, Plan, plan, why_not
from infra.placement.engine import base_key

CONFIG_PATH = Path("/tmp/placement-props/cluster_config.yaml")
SPEC_DIR = Path("/tmp/placement-props/experiments")
EPS = 1e-9
SCORE_PARTS = ("ram_efficiency", "load_balance", "gpu_match", "affinity", "preferred_node")

PROPS = settings(max_examples=120, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def quarters(lo: float, hi: float) -> st.SearchStrategy[float]:
    """Multiples of 0.25 in [lo, hi]: exact sums, and plenty of ties and exact fits."""
    return st.integers(int(lo * 4), int(hi * 4)).map(lambda q: q / 4)


@st.composite
def node_docs(draw: st.DrawFn, index: int) -> dict[str, Any]:
    """One node mapping as a user would write it in cluster_config.yaml."""
    ram = draw(quarters(1.0, 48.0))
    doc: dict[str, Any] = {
        "name": f"n{index}",
        "host": f"127.0.0.{20 + index}",
        "ram_gb": ram,
        "reserved_ram_gb": draw(quarters(0.0, min(ram - 0.25, 4.0))),
        "cpu_cores": draw(st.integers(1, 16)),
        "max_instances": draw(st.integers(1, 4)),
        "enabled": draw(st.sampled_from([True, True, True, True, False])),
        "type": draw(st.sampled_from(["generic", "host", "jetson_orin", "raspberry_pi"])),
    }
    gpu = draw(st.booleans())
    doc["gpu"] = gpu
    unified = doc["type"] == "jetson_orin"  # the parser's default for the type
    if draw(st.booleans()):
        unified = doc["unified_memory"] = draw(st.booleans())
    if gpu and not unified:
        doc["gpu_memory_gb"] = draw(quarters(0.25, 24.0))
    elif gpu and draw(st.booleans()):
        doc["gpu_memory_gb"] = draw(quarters(0.0, 24.0))  # declared but pooled on unified nodes
    return doc


@st.composite
def clusters(draw: st.DrawFn) -> Cluster:
    """1-8 nodes, sometimes with a placement.preferences order."""
    count = draw(st.integers(1, 8))
    docs = [draw(node_docs(i)) for i in range(count)]
    data: dict[str, Any] = {"nodes": docs}
    if draw(st.booleans()):
        names = [d["name"] for d in docs]
        data["placement"] = {"preferences": draw(st.permutations(names))[: draw(
            st.integers(0, count))]}
    return parse_cluster(data, CONFIG_PATH)


@st.composite
def spec_sets(draw: st.DrawFn, cluster: Cluster) -> tuple[ExperimentSpec, ...]:
    """1-12 specs with resources, preferred nodes and (anti-)affinity to each other."""
    count = draw(st.integers(1, 12))
    ids = [f"e{i:02d}" for i in range(count)]
    specs = []
    for eid in ids:
        others = [x for x in ids if x != eid]
        gpu = draw(st.booleans())
        doc: dict[str, Any] = {
            "experiment_id": eid,
            "command": ["python3", "run.py", eid],
            "ram_gb": draw(st.sampled_from([1.0, 2.0, 4.0]) | quarters(0.25, 4.0)
                          | quarters(0.25, 16.0)),  # many equal sizes: order ties
            "gpu_required": gpu,
            "cpu_cores": draw(st.sampled_from([0, 0, 0.5, 1, 2, 4, 8])),
        }
        if gpu:
            doc["gpu_memory_gb"] = draw(quarters(0.0, 8.0))
        preferred = draw(st.none() | st.sampled_from(cluster.node_names))
        if preferred is not None:
            doc["preferred_node"] = preferred
        if others:
            doc["affinity"] = draw(st.lists(st.sampled_from(others), max_size=3, unique=True))
            doc["anti_affinity"] = draw(st.lists(st.sampled_from(others), max_size=3,
                                                 unique=True))
        specs.append(parse_spec(doc, SPEC_DIR / f"{eid}.json", cluster))
    return check_spec_set(specs)


@dataclass(frozen=True)
class Case:
    """One generated planning problem."""

    cluster: Cluster
    specs: tuple[ExperimentSpec, ...]
    conditions: Mapping[str, NodeCondition]
    pins: Mapping[str, str]


@st.composite
def cases(draw: st.DrawFn, with_conditions: bool = True, with_pins: bool = False) -> Case:
    """A cluster, specs, random node conditions and (optionally) random pins."""
    cluster = draw(clusters())
    specs = draw(spec_sets(cluster))
    conditions: dict[str, NodeCondition] = {}
    if with_conditions:
        for name in cluster.node_names:
            cond = draw(st.sampled_from([None, None, None, None, *Condition]))
            if cond is not None:
                conditions[name] = NodeCondition(cond, "" if cond is Condition.HEALTHY
                                                 else "generated")
    pins: dict[str, str] = {}
    if with_pins:
        for spec in specs:
            if draw(st.integers(0, 3)) == 0:
                pins[spec.experiment_id] = draw(st.sampled_from(cluster.node_names))
    return Case(cluster, specs, conditions, pins)


def run(case: Case, specs: Iterable[ExperimentSpec] | None = None,
        force: bool = False) -> Plan:
    """Plan the case with its pins and conditions (optionally other specs or force)."""
    return plan(case.cluster, case.specs if specs is None else specs, pins=case.pins,
                conditions=case.conditions, force=force)


# ---- independent oracle ------------------------------------------------------------

def usable(node: NodeConfig, conditions: Mapping[str, NodeCondition]) -> bool:
    """Enabled, and HEALTHY or not probed (UNKNOWN)."""
    cond = conditions.get(node.name, NodeCondition(Condition.UNKNOWN)).condition
    return node.enabled and cond in (Condition.HEALTHY, Condition.UNKNOWN)


def pool_ram(node: NodeConfig, spec: ExperimentSpec) -> float:
    """RAM the instance takes on this node; a unified pool also pays for GPU memory."""
    if node.unified_memory and spec.gpu_required:
        return spec.ram_gb + spec.gpu_memory_gb
    return spec.ram_gb


def fits(node: NodeConfig, spec: ExperimentSpec, here: Sequence[ExperimentSpec],
         conditions: Mapping[str, NodeCondition]) -> bool:
    """Would ``spec`` be allowed on ``node`` that already holds ``here``?"""
    if not usable(node, conditions) or len(here) + 1 > node.max_instances:
        return False
    if spec.gpu_required and not node.gpu:
        return False
    if sum(pool_ram(node, s) for s in (*here, spec)) > node.available_ram_gb + EPS:
        return False
    if spec.gpu_required and not node.unified_memory:
        gpu_mem = sum(s.gpu_memory_gb for s in (*here, spec) if s.gpu_required)
        if gpu_mem > node.gpu_memory_gb + EPS:
            return False
    if spec.cpu_cores > 0 and sum(s.cpu_cores for s in (*here, spec)) > node.cpu_cores + EPS:
        return False
    return not any(s.experiment_id in spec.anti_affinity
                   or spec.experiment_id in s.anti_affinity for s in here)


def residents(result: Plan, specs: Sequence[ExperimentSpec]) -> dict[str, list[ExperimentSpec]]:
    """Node name -> the specs the plan put there."""
    by_id = {s.experiment_id: s for s in specs}
    out: dict[str, list[ExperimentSpec]] = {}
    for p in result.placements:
        out.setdefault(p.node, []).append(by_id[p.instance_id])
    return out


def plan_signature(result: Plan) -> tuple[object, ...]:
    """Everything a plan says, in comparable form."""
    return (result.placements, result.unplaced, dict(result.pin_errors),
            {k: v for k, v in result.evaluations.items()})


# ---- properties ---------------------------------------------------------------------

@PROPS
@given(data=st.data(), case=cases(with_pins=True))
def test_order_of_specs_never_changes_the_plan(data: st.DataObject, case: Case) -> None:
    """(a) The same specs in any order give the same placements, scores and explanations."""
    reference = run(case)
    shuffled = data.draw(st.permutations(case.specs))
    again = run(case, iter(shuffled))  # any iterable, consumed once
    assert plan_signature(run(case, case.specs[::-1])) == plan_signature(reference)
    assert again.as_dict() == reference.as_dict()
    assert {p.instance_id: (p.score, p.parts) for p in again.placements} == \
        {p.instance_id: (p.score, p.parts) for p in reference.placements}
    assert plan_signature(again) == plan_signature(reference)


@PROPS
@given(case=cases(with_pins=True))
def test_anti_affinity_holds_both_ways(case: Case) -> None:
    """(b) No two placed instances share a node when either names the other."""
    result = run(case)
    where = result.as_dict()
    for spec in case.specs:
        for peer in spec.anti_affinity:
            if spec.experiment_id in where and peer in where:
                assert where[spec.experiment_id] != where[peer], (spec.experiment_id, peer)


@PROPS
@given(case=cases(with_pins=True))
def test_no_node_is_overcommitted(case: Case) -> None:
    """(c) Instance count, RAM (unified pools: RAM + GPU), GPU memory and CPU all hold."""
    result = run(case)
    for name, here in residents(result, case.specs).items():
        node = case.cluster.node(name)
        assert len(here) <= node.max_instances
        assert all(node.gpu for s in here if s.gpu_required)
        assert sum(pool_ram(node, s) for s in here) <= node.available_ram_gb + EPS
        if not node.unified_memory:
            assert sum(s.gpu_memory_gb for s in here if s.gpu_required) \
                <= node.gpu_memory_gb + EPS
        if any(s.cpu_cores > 0 for s in here):
            assert sum(s.cpu_cores for s in here) <= node.cpu_cores + EPS


@PROPS
@given(case=cases(with_pins=True))
def test_disabled_and_unhealthy_nodes_get_nothing(case: Case) -> None:
    """(d) Disabled, UNAVAILABLE and DEGRADED nodes never receive an instance."""
    result = run(case)
    for p in result.placements:
        assert usable(case.cluster.node(p.node), case.conditions), p


@PROPS
@given(case=cases(with_pins=True))
def test_every_unplaced_instance_is_explained_and_truly_unplaceable(case: Case) -> None:
    """(e) Each unplaced instance has a reason from every node, and no node could take it.

    Every constraint only tightens as instances are added, so a node that refused at
    decision time must still refuse against the final placement. The repair only moves
    instances and places more, and it tries every instance still unplaced once more on the
    final state, so that holds after it too; an instance it left out (a trade) fitted at
    decision time, so its reason is the repair's note, and no node can take it now either.
    """
    result = run(case)
    by_node = residents(result, case.specs)
    by_id = {s.experiment_id: s for s in case.specs}
    placed = set(result.as_dict())
    for spec in case.specs:
        sid = spec.experiment_id
        assert (sid in placed) + (sid in result.unplaced) + (sid in result.pin_errors) == 1, sid
    for eid in result.unplaced:
        evals = result.evaluations[eid]
        assert sorted(e.node for e in evals) == sorted(case.cluster.node_names)
        for ev in evals:
            if eid in result.left_out:
                assert why_not(result, eid).startswith("left out by the repair"), eid
            else:
                assert ev.rejection, (eid, ev)
            node = case.cluster.node(ev.node)
            assert not fits(node, by_id[eid], by_node.get(ev.node, []), case.conditions), \
                (eid, ev)


@PROPS
@given(case=cases(with_pins=True))
def test_scores_are_the_sum_of_their_parts_and_within_0_100(case: Case) -> None:
    """(f) Every placement's score is the sum of its named parts and lies in [0, 100]."""
    result = run(case)
    for p in result.placements:
        assert tuple(part.name for part in p.parts) == SCORE_PARTS
        assert p.score == pytest.approx(sum(part.points for part in p.parts), abs=1e-9)
        assert -EPS <= p.score <= 100 + EPS, p
    for evals in result.evaluations.values():
        for ev in evals:
            if ev.feasible:
                assert -EPS <= ev.total <= 100 + EPS, ev


@PROPS
@given(case=cases(with_pins=True))
def test_each_instance_goes_to_the_best_scoring_feasible_node(case: Case) -> None:
    """Every node is judged; the pick is the highest total, first node in order on ties."""
    result = run(case)
    node_order = [n.name for n in case.cluster.nodes]
    prefs = list(case.cluster.placement.preferences)
    node_order = prefs + [n for n in node_order if n not in prefs]
    for p in result.placements:
        evals = result.evaluations[p.instance_id]
        assert [e.node for e in evals] == node_order
        if p.pinned or p.repair:  # the repair's moves and placements: see test_placement_repair
            continue
        feasible = [e for e in evals if e.feasible]
        top = max(e.total for e in feasible)
        first_top = next(e for e in feasible if e.total >= top - 1e-9)
        assert (p.node, p.score, p.parts) == (first_top.node, first_top.total, first_top.parts)


def pins_in_engine_order(case: Case) -> list[ExperimentSpec]:
    """Pinned instances in the documented order: GPU first, larger RAM first, then id."""
    return sorted((s for s in case.specs if s.experiment_id in case.pins), key=base_key)


@PROPS
@given(case=cases(with_pins=True))
def test_pins_are_honoured_when_feasible_and_refused_otherwise(case: Case) -> None:
    """(g) Without force, a pin is kept iff its node can take it after the earlier pins."""
    result = run(case)
    honoured: dict[str, list[ExperimentSpec]] = {}
    by_placement = {p.instance_id: p for p in result.placements}
    for spec in pins_in_engine_order(case):
        eid, target = spec.experiment_id, case.pins[spec.experiment_id]
        node = case.cluster.node(target)
        if fits(node, spec, honoured.get(target, []), case.conditions):
            assert eid not in result.pin_errors, (eid, result.pin_errors[eid])
            assert by_placement[eid].node == target
            assert by_placement[eid].pinned and by_placement[eid].forced == ()
            honoured.setdefault(target, []).append(spec)
        else:
            assert eid in result.pin_errors and eid not in by_placement
            assert result.pin_errors[eid].startswith(target + " ")
            assert eid not in result.unplaced
    for p in result.placements:
        assert p.pinned == (p.instance_id in case.pins)


@PROPS
@given(case=cases(with_pins=True))
def test_forced_pins_always_land_and_name_what_they_override(case: Case) -> None:
    """(g) With force a pin lands on its node unless the node is disabled in the topology or
    cannot be reached (force never uses either); ``forced`` is non-empty iff it broke a rule."""
    result = run(case, force=True)
    landed: dict[str, list[ExperimentSpec]] = {}
    by_placement = {p.instance_id: p for p in result.placements}
    for p in result.placements:
        assert case.cluster.node(p.node).enabled, p
    for spec in pins_in_engine_order(case):
        eid, target = spec.experiment_id, case.pins[spec.experiment_id]
        cond = case.conditions.get(target, NodeCondition(Condition.UNKNOWN)).condition
        if not case.cluster.node(target).enabled or cond.unreachable:
            assert eid in result.pin_errors and eid not in by_placement
            continue
        assert eid not in result.pin_errors
        p = by_placement[eid]
        assert p.node == target and p.pinned
        ok = fits(case.cluster.node(target), spec, landed.get(target, []), case.conditions)
        assert (p.forced == ()) == ok, (eid, p.forced)
        landed.setdefault(target, []).append(spec)


def test_forced_pins_onto_a_full_node_keep_the_score_in_range() -> None:
    """Four forced pins onto a max_instances=1 node: every score must stay within [0, 100]."""
    cluster = parse_cluster({"nodes": [{"name": "solo", "host": "127.0.0.21", "ram_gb": 8,
                                        "max_instances": 1}]}, CONFIG_PATH)
    ids = ("a", "b", "c", "d")
    specs = check_spec_set(parse_spec({"experiment_id": eid, "command": "true", "ram_gb": 1},
                                      SPEC_DIR / f"{eid}.json", cluster) for eid in ids)
    result = plan(cluster, specs, pins=dict.fromkeys(ids, "solo"), force=True)
    assert [p.node for p in result.placements] == ["solo"] * 4
    assert all(p.forced for p in result.placements[1:])
    assert all(0 <= p.score <= 100 for p in result.placements), \
        [(p.instance_id, p.score) for p in result.placements]
