"""The repair step after the greedy pass (``infra.placement.repair``).

Table-driven cases where the greedy pass leaves an instance unplaced and the repair places
it (one move, two moves off one node, a chain, a trade), cases where it must not move
anything (pins, forced pins, system-job copies, running work, anti-affinity), and
properties on random tight inputs: every placement of a repaired plan passes every hard
check against all the others (re-checked from scratch), the repair never places fewer,
and no single move could place an instance it left unplaced.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infra.config.model import Cluster, ExperimentSpec
from infra.config.specs import check_spec_set, parse_spec
from infra.config.topology import parse_cluster
from infra.placement import Plan, expand_system_jobs, plan, why_not
from infra.placement.checks import DEFAULT_CHECKS, first_rejection
from infra.placement.engine import normalize_occupied, starting_snapshot
from infra.placement.snapshot import Snapshot
from tests.builders import run_cli

CONFIG_PATH = Path("/tmp/placement-repair/cluster_config.yaml")
SPEC_DIR = Path("/tmp/placement-repair/experiments")


def node(name: str, ram: float, **kw: Any) -> dict[str, Any]:
    """A node with ``ram`` GB usable (nothing reserved), 8 cores, 4 slots unless told."""
    return {"name": name, "host": f"127.0.0.{21 + int(name[-1])}", "ram_gb": ram,
            "reserved_ram_gb": 0.0, "cpu_cores": 8, "max_instances": 4, **kw}


def build(nodes: list[dict[str, Any]], docs: list[dict[str, Any]]
          ) -> tuple[Cluster, tuple[ExperimentSpec, ...]]:
    """A cluster and spec set through the real parsers."""
    cluster = parse_cluster({"nodes": nodes}, CONFIG_PATH)
    specs = check_spec_set(
        parse_spec({"command": "true", **d}, SPEC_DIR / f"{d['experiment_id']}.json", cluster)
        for d in docs)
    return cluster, specs


# ---- cases where greedy fails and the repair places the instance -----------------

def one_move() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """small (1 GB, prefers a) lands on a first; big (7.5 GB) waits for it (affinity) and
    then fits nowhere. Moving small to b makes room on a."""
    return ([node("n1", 8), node("n2", 2)],
            [{"experiment_id": "small", "ram_gb": 1, "preferred_node": "n1"},
             {"experiment_id": "big", "ram_gb": 7.5, "affinity": ["small"]}])


def two_off() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Two small instances on n1 (their preferred node); big needs both gone."""
    return ([node("n1", 8), node("n2", 1, max_instances=1), node("n3", 1, max_instances=1)],
            [{"experiment_id": "s1", "ram_gb": 1, "preferred_node": "n1"},
             {"experiment_id": "s2", "ram_gb": 1, "preferred_node": "n1"},
             {"experiment_id": "big", "ram_gb": 7.5, "affinity": ["s1", "s2"]}])


def chain() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """mid must leave n1 for n2, which holds one instance at most: tiny moves on to n3."""
    return ([node("n1", 8), node("n2", 4, max_instances=1), node("n3", 2, max_instances=1)],
            [{"experiment_id": "mid", "ram_gb": 3, "preferred_node": "n1"},
             {"experiment_id": "tiny", "ram_gb": 1, "preferred_node": "n2"},
             {"experiment_id": "big", "ram_gb": 7, "affinity": ["mid", "tiny"]}])


def trade() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One node of 4 GB: big (3 GB) goes first; without it both 2 GB instances fit."""
    return ([node("n1", 4)],
            [{"experiment_id": "big", "ram_gb": 3},
             {"experiment_id": "s1", "ram_gb": 2},
             {"experiment_id": "s2", "ram_gb": 2}])


@dataclass(frozen=True)
class Fixable:
    """A case greedy leaves short, and what the repaired plan must say."""

    name: str
    make: Callable[[], tuple[list[dict[str, Any]], list[dict[str, Any]]]]
    greedy_unplaced: tuple[str, ...]
    placements: dict[str, str]
    notes: dict[str, str]  # instance -> start of its repair note
    left_out: tuple[str, ...] = ()


FIXABLE = (
    Fixable("one move", one_move, ("big",), {"small": "n2", "big": "n1"},
            {"small": "moved by the repair from n1 to n2 to make room for big",
             "big": "placed by the repair after moving small to n2"}),
    Fixable("two off one node", two_off, ("big",), {"s1": "n2", "s2": "n3", "big": "n1"},
            {"s1": "moved by the repair from n1 to n2 to make room for big",
             "s2": "moved by the repair from n1 to n3 to make room for big",
             "big": "placed by the repair after moving s1 to n2 and s2 to n3"}),
    Fixable("chain of two", chain, ("big",), {"mid": "n2", "tiny": "n3", "big": "n1"},
            {"mid": "moved by the repair from n1 to n2 to make room for big",
             "tiny": "moved by the repair from n2 to n3 to make room for big",
             "big": "placed by the repair after moving mid to n2 and tiny to n3"}),
    Fixable("trade", trade, ("s1", "s2"), {"s1": "n1", "s2": "n1"},
            {"s1": "placed by the repair in place of big",
             "s2": "placed by the repair in place of big"}, left_out=("big",)),
)


@pytest.mark.parametrize("case", FIXABLE, ids=lambda c: c.name)
def test_repair_places_what_greedy_left_out(case: Fixable) -> None:
    cluster, specs = build(*case.make())
    greedy = plan(cluster, specs, repair=False)
    assert greedy.unplaced == case.greedy_unplaced
    result = plan(cluster, specs)
    assert result.as_dict() == case.placements
    assert {p.instance_id: p.repair for p in result.placements if p.repair} == case.notes
    assert result.unplaced == case.left_out
    assert result.ok == (not case.left_out)
    for iid in case.left_out:
        assert why_not(result, iid).startswith("left out by the repair: without it on n1, ")
    # the fast path and the reference loop repair alike
    reference = plan(cluster, specs, reference=True)
    assert reference.placements == result.placements
    assert reference.unplaced == result.unplaced
    assert dict(reference.left_out) == dict(result.left_out)
    assert_consistent(cluster, specs, result)


def test_moved_instances_get_their_new_node_score_and_allocation() -> None:
    """The moved instance's score and allocation are those of its new node; the rest of the
    plan (order included) is the greedy one, the repaired instance comes last."""
    cluster, specs = build([node("n1", 8), node("n2", 2)],
                           [{"experiment_id": "small", "ram_gb": 1, "preferred_node": "n1",
                             "resources": {"ports": [{"label": "api", "port": 18090}]}},
                            {"experiment_id": "big", "ram_gb": 7.5, "affinity": ["small"],
                             "resources": {"ports": [{"label": "api", "port": 18090}]}}])
    greedy = plan(cluster, specs, repair=False)
    result = plan(cluster, specs)
    assert [p.instance_id for p in result.placements] == ["small", "big"]
    small = result.placements[0]
    assert small.node == "n2" and small.allocation is not None
    assert small.allocation.node == "n2" and small.allocation.ports == (("api", 18090),)
    assert small.score == sum(part.points for part in small.parts)
    parts = {part.name: part for part in small.parts}  # judged on n2 (alone there)
    assert parts["preferred_node"].points == 0.0 and parts["ram_efficiency"].points == 30.0
    assert parts["ram_efficiency"].detail.startswith("1/2 GB")
    assert small.parts != greedy.placements[0].parts
    big = result.placements[1]
    assert big.node == "n1" and big.allocation is not None and big.allocation.node == "n1"
    assert_consistent(cluster, specs, result)


# ---- cases where the repair must not move anything ------------------------------

@dataclass(frozen=True)
class Stuck:
    """A one-move case with something that forbids the move, and what would happen without it."""

    name: str
    nodes: list[dict[str, Any]]
    docs: list[dict[str, Any]]
    kwargs: dict[str, Any] = field(default_factory=dict)
    control: dict[str, Any] | None = None  # the same case, the obstacle removed: repaired


SMALL = {"experiment_id": "small", "ram_gb": 1, "preferred_node": "n1"}
BIG = {"experiment_id": "big", "ram_gb": 7.5, "affinity": ["small"]}
TWO = [node("n1", 8, max_instances=1), node("n2", 2)]

STUCK = (
    Stuck("pinned", TWO, [SMALL, BIG], {"pins": {"small": "n1"}}, control={}),
    Stuck("forced pin", [node("n1", 8, max_instances=1), node("n2", 2)], [SMALL, BIG],
          {"pins": {"small": "n1"}, "force": True}, control={}),
    Stuck("anti-affinity (the other side names it)", TWO,
          [SMALL, BIG, {"experiment_id": "x", "ram_gb": 0.5, "preferred_node": "n2",
                        "anti_affinity": ["small"]}],
          control={"x": {"experiment_id": "x", "ram_gb": 0.5, "preferred_node": "n2"}}),
    Stuck("anti-affinity (it names the other)", TWO,
          [{**SMALL, "anti_affinity": ["x"]}, BIG,
           {"experiment_id": "x", "ram_gb": 0.5, "preferred_node": "n2"}],
          control={"small": SMALL}),
    Stuck("distinct_hosts", TWO,
          [{**SMALL, "constraints": [{"operator": "distinct_hosts"}]}, BIG,
           {"experiment_id": "x", "ram_gb": 0.5, "preferred_node": "n2",
            "constraints": [{"operator": "distinct_hosts"}]}],
          control={"small": SMALL}),
    Stuck("ports", TWO,
          [{**SMALL, "resources": {"ports": [{"label": "api", "port": 18091}]}}, BIG,
           {"experiment_id": "x", "ram_gb": 0.5, "preferred_node": "n2",
            "resources": {"ports": [{"label": "api", "port": 18091}]}}],
          control={"small": SMALL}),
)


def _docs(case: Stuck, swap: Mapping[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [swap.get(d["experiment_id"], d) for d in case.docs]


@pytest.mark.parametrize("case", STUCK, ids=lambda c: c.name)
def test_repair_never_breaks_a_pin_or_a_check(case: Stuck) -> None:
    cluster, specs = build(case.nodes, case.docs)
    greedy = plan(cluster, specs, repair=False, **case.kwargs)
    result = plan(cluster, specs, **case.kwargs)
    assert "big" in greedy.unplaced
    assert result.placements == greedy.placements and result.unplaced == greedy.unplaced
    assert result.as_dict()["small"] == "n1"
    assert_consistent(cluster, specs, result)
    # control: without the obstacle the same case is repaired (the test can fail)
    assert case.control is not None
    cluster, specs = build(case.nodes, _docs(case, case.control))
    kwargs = {k: v for k, v in case.kwargs.items() if k not in ("pins", "force")}
    fixed = plan(cluster, specs, **kwargs)
    assert fixed.as_dict()["big"] == "n1" and fixed.as_dict()["small"] == "n2"


def test_running_work_and_run_mates_never_move() -> None:
    """Work of stored runs (``occupied``) and a moved instance's run-mates (``peers``) hold
    their nodes: the runner's one-spec re-placements cannot be repaired by moving them."""
    cluster, specs = build(*one_move())
    small, big = (next(s for s in specs if s.experiment_id == i) for i in ("small", "big"))
    for kwargs in ({"occupied": [(small, "n1")]}, {"peers": [(small, "n1")]},
                   {"occupied": iter([(small, "n1")])}):  # any iterable, read once
        result = plan(cluster, [big], **kwargs)
        assert result.unplaced == ("big",) and not result.placements
        assert "not enough RAM" in why_not(result, "big")
    assert plan(cluster, [big, small]).as_dict() == {"small": "n2", "big": "n1"}  # control


def test_system_job_copies_never_move() -> None:
    """A system job's copy on n1 is pinned there: big stays unplaced (control: a batch job
    in its place is moved)."""
    nodes = [node("n1", 8), node("n2", 2)]
    for job_type, repaired in (("system", False), ("batch", True)):
        docs = [{"experiment_id": "agent", "ram_gb": 1, "job_type": job_type,
                 "preferred_node": "n1"},
                {"experiment_id": "big", "ram_gb": 7.5, "affinity": ["agent"]}]
        if job_type == "system":
            docs[0]["constraints"] = [{"attribute": "name", "value": "n1"}]
        cluster, specs = build(nodes, docs)
        expansion = expand_system_jobs(cluster, specs)
        result = plan(cluster, expansion.specs, pins=expansion.pins)
        assert ("big" in result.as_dict()) is repaired, job_type


def test_everything_placed_means_nothing_changes() -> None:
    """When greedy places everything the repair does not run: same plan, same object kinds."""
    cluster, specs = build([node("n1", 8), node("n2", 8)],
                           [{"experiment_id": f"e{i}", "ram_gb": 2} for i in range(4)])
    greedy = plan(cluster, specs, repair=False)
    result = plan(cluster, specs)
    assert result.ok and result.placements == greedy.placements
    assert not any(p.repair for p in result.placements)
    assert result.evaluations == greedy.evaluations


# ---- properties on random tight inputs ------------------------------------------

def assert_consistent(cluster: Cluster, specs: tuple[ExperimentSpec, ...], result: Plan,
                      occupied: list[tuple[ExperimentSpec, str]] | None = None) -> None:
    """Re-check every placement from scratch: against all the other placements (and the
    running work), every hard check passes; devices and ports are never handed out twice;
    each allocation names its placement's node."""
    busy = occupied or []
    by_id = {s.experiment_id: s for s in specs}
    start = starting_snapshot(cluster, list(specs), None, None, busy)
    nodes = {n.name: n for n in start.nodes}
    for p in result.placements:
        assert p.allocation is not None and p.allocation.node == p.node, p
        if p.forced:
            continue
        snap = start
        for other in result.placements:
            if other.instance_id != p.instance_id:
                snap = snap.with_placement(by_id[other.instance_id], nodes[other.node],
                                           other.allocation)
        why = first_rejection(snap, nodes[p.node], by_id[p.instance_id], DEFAULT_CHECKS)
        assert why is None, (p.instance_id, p.node, why)
    held: set[tuple[str, str]] = set()
    ports: set[tuple[str, int]] = set()
    for _spec, n, alloc in normalize_occupied(busy):
        held.update((n, d) for d in (alloc.device_ids if alloc else ()))
    for p in result.placements:
        assert p.allocation is not None
        for d in p.allocation.device_ids:
            assert (p.node, d) not in held, (p.instance_id, d)
            held.add((p.node, d))
        for _label, port in p.allocation.ports:
            assert (p.node, port) not in ports, (p.instance_id, port)
            ports.add((p.node, port))


def one_move_would_place(cluster: Cluster, specs: tuple[ExperimentSpec, ...], result: Plan,
                         occupied: list[tuple[ExperimentSpec, str]]) -> str | None:
    """Brute force: an unplaced instance that fits somewhere as is, or after one unpinned
    placed instance moves to another node (both judged by the planner's checks)."""
    by_id = {s.experiment_id: s for s in specs}
    start = starting_snapshot(cluster, list(specs), None, None, occupied)
    nodes = start.nodes

    def state(skip: str | None) -> Snapshot:
        snap = start
        for p in result.placements:
            if p.instance_id != skip:
                snap = snap.with_placement(by_id[p.instance_id],
                                           next(n for n in nodes if n.name == p.node),
                                           p.allocation)
        return snap

    def fits(snap: Snapshot, spec: ExperimentSpec) -> list[Any]:
        return [n for n in nodes if first_rejection(snap, n, spec, DEFAULT_CHECKS) is None]

    for uid in result.unplaced:
        u = by_id[uid]
        if fits(state(None), u):
            return f"{uid} fits as is"
        for p in result.placements:
            if p.pinned:
                continue
            snap = state(p.instance_id)
            for target in fits(snap, u):
                after = snap.with_placement(u, target)
                homes = [n for n in fits(after, by_id[p.instance_id]) if n.name != p.node]
                if homes:
                    return f"{uid} on {target.name} after {p.instance_id} -> {homes[0].name}"
    return None


PROPS = settings(max_examples=150, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@dataclass(frozen=True)
class Case:
    """A random tight planning problem."""

    cluster: Cluster
    specs: tuple[ExperimentSpec, ...]
    pins: dict[str, str]
    occupied: list[tuple[ExperimentSpec, str]]


@st.composite
def tight_cases(draw: st.DrawFn) -> Case:
    """2-5 small nodes, 3-10 instances that rarely all fit: GPUs, cores, anti-affinity,
    distinct_hosts, ports, devices, preferred nodes, some pins and some running work."""
    count = draw(st.integers(2, 5))
    nodes = []
    for i in range(count):
        doc = node(f"n{i}", draw(st.sampled_from([2.0, 3.0, 4.0, 6.0, 8.0])),
                   cpu_cores=draw(st.sampled_from([2, 4, 8])),
                   max_instances=draw(st.integers(1, 4)))
        if draw(st.integers(0, 2)) == 0:
            doc.update(gpu=True, gpu_memory_gb=draw(st.sampled_from([2.0, 4.0])),
                       devices=[{"id": "gpu0", "kind": "gpu", "index": 0}])
        if draw(st.integers(0, 9)) == 0:
            doc["enabled"] = False
        nodes.append(doc)
    names = [d["name"] for d in nodes]
    n_specs = draw(st.integers(3, 10))
    ids = [f"e{i}" for i in range(n_specs)]
    docs = []
    for eid in ids:
        others = [x for x in ids if x != eid]
        doc: dict[str, Any] = {"experiment_id": eid,
                               "ram_gb": draw(st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0, 4.0])),
                               "cpu_cores": draw(st.sampled_from([0, 0, 1, 2]))}
        if draw(st.integers(0, 4)) == 0:
            doc.update(gpu_required=True, gpu_memory_gb=draw(st.sampled_from([0.0, 1.0])))
        if draw(st.integers(0, 3)) == 0:
            doc["preferred_node"] = draw(st.sampled_from(names))
        if draw(st.integers(0, 2)) == 0:
            doc["anti_affinity"] = draw(st.lists(st.sampled_from(others), max_size=2,
                                                 unique=True))
        if draw(st.integers(0, 3)) == 0:
            doc["affinity"] = draw(st.lists(st.sampled_from(others), max_size=1))
        if draw(st.integers(0, 5)) == 0:
            doc["constraints"] = [{"operator": "distinct_hosts"}]
        if draw(st.integers(0, 6)) == 0:
            doc["resources"] = {"ports": [{"label": "api", "port": 18092}]}
        elif draw(st.integers(0, 6)) == 0:
            doc["resources"] = {"devices": [{"kind": "gpu", "count": 1}]}
        docs.append(doc)
    cluster, specs = build(nodes, docs)
    pins = {s.experiment_id: draw(st.sampled_from(names))
            for s in specs if draw(st.integers(0, 5)) == 0}
    occupied = [(s, draw(st.sampled_from(names))) for s in specs
                if s.experiment_id not in pins and draw(st.integers(0, 7)) == 0]
    busy = {s.experiment_id for s, _ in occupied}
    return Case(cluster, tuple(s for s in specs if s.experiment_id not in busy), pins,
                occupied)


@PROPS
@given(case=tight_cases())
def test_repaired_plans_pass_every_check_place_no_fewer_and_leave_no_single_move(
        case: Case) -> None:
    """Every placement re-checked from scratch; never fewer placed than greedy; pins,
    running work and untouched placements as greedy had them; no single move left."""
    kwargs: dict[str, Any] = {"pins": case.pins, "occupied": case.occupied}
    greedy = plan(case.cluster, case.specs, repair=False, **kwargs)
    result = plan(case.cluster, case.specs, **kwargs)
    assert len(result.placements) >= len(greedy.placements)
    assert_consistent(case.cluster, case.specs, result, case.occupied)
    before = {p.instance_id: p for p in greedy.placements}
    for p in result.placements:  # pins stay; untouched placements are exactly greedy's
        if p.pinned or not p.repair:
            assert before[p.instance_id] == p
    running = {s.experiment_id for s, _ in case.occupied}
    assert not running & set(result.as_dict())
    assert set(result.left_out) <= set(result.unplaced)
    assert set(result.pin_errors) == set(greedy.pin_errors)
    assert {*result.as_dict(), *result.unplaced, *result.pin_errors} == \
        {s.experiment_id for s in case.specs}
    if not greedy.unplaced:
        assert result.placements == greedy.placements
    # local optimality: no unplaced instance fits as is or after one unpinned instance
    # moves (brute force over every placed instance and node)
    assert one_move_would_place(case.cluster, case.specs, result, case.occupied) is None


# ---- what the CLI shows ---------------------------------------------------------

def test_dry_run_shows_what_the_repair_did(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The plan table, --explain and --json say which instance the repair moved and why."""
    nodes, docs = one_move()
    for n in nodes:
        n.update(host="localhost", remote_work_dir=".")
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump({"nodes": nodes,
                                      "logging": {"log_dir": str(tmp_path / "logs")}}))
    args = ["--cluster-config", str(config), "--auto-place", "--dry-run"]
    for d in docs:
        path = tmp_path / f"{d['experiment_id']}.json"
        path.write_text(json.dumps({"command": "true", **d}))
        args += ["--config", str(path)]
    code, out, err = run_cli(capsys, *args, "--explain")
    assert code == 0, err
    text = " ".join(out.split())  # rich wraps long cells
    assert "moved by the repair from n1 to n2 to make room for big" in text
    assert "big -> n1 (placed by the repair after moving small to n2; the table shows the " \
           "greedy pass's view)" in text
    code, out, err = run_cli(capsys, *args, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["placements"] == {"small": "n2", "big": "n1"} and doc["ok"]
    assert doc["instances"]["small"]["repair"] == \
        "moved by the repair from n1 to n2 to make room for big"
    assert doc["order"] == ["small", "big"]
