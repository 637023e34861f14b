"""The fast planner (shape views, static classes, lazy explanations, in-place bookkeeping)
against the reference loop (``plan(..., reference=True)``: every node judged for every
instance), and its parts (``fast_order``, a view's pick) against the reference's.

Clusters are drawn from a few node templates so many nodes are identical (classes collapse),
with pins, forced pins, occupied work, strategies, ``distinct_hosts``, ports and devices:
placements (scores, parts with their detail text, allocations), failures and every node's
explanation must be the same.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infra.config.model import Cluster, ExperimentSpec, Strategy
from infra.config.specs import check_spec_set, parse_spec
from infra.config.topology import parse_cluster
from infra.placement import Condition, NodeCondition, Plan, placement_order, plan
from infra.placement.fast import LazyEvaluations, _choose, _first_best, _View, fast_order

CONFIG_PATH = Path("/tmp/placement-fast/cluster_config.yaml")
SPEC_DIR = Path("/tmp/placement-fast/experiments")

PROPS = settings(max_examples=150, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TEMPLATES: tuple[dict[str, Any], ...] = (
    {"ram_gb": 8, "cpu_cores": 4, "max_instances": 3},
    {"ram_gb": 16, "cpu_cores": 8, "max_instances": 4, "gpu": True, "gpu_memory_gb": 8,
     "devices": [{"id": "gpu0", "kind": "gpu", "index": 0},
                 {"id": "gpu1", "kind": "gpu", "index": 1}]},
    {"ram_gb": 6, "cpu_cores": 4, "max_instances": 2, "type": "jetson_orin", "gpu": True},
    {"ram_gb": 4, "cpu_cores": 2, "max_instances": 2, "tags": ["pi"]},
)


@st.composite
def clusters(draw: st.DrawFn) -> Cluster:
    """2-9 nodes, each a copy of one of a few templates (sometimes disabled)."""
    count = draw(st.integers(2, 9))
    docs = []
    for i in range(count):
        doc = {"name": f"n{i}", "host": f"127.0.0.{20 + i}",
               **draw(st.sampled_from(TEMPLATES))}
        if draw(st.integers(0, 9)) == 0:
            doc["enabled"] = False
        docs.append(doc)
    data: dict[str, Any] = {"nodes": docs}
    if draw(st.booleans()):
        data["placement"] = {"preferences": draw(st.permutations([d["name"] for d in docs]))}
    return parse_cluster(data, CONFIG_PATH)


@st.composite
def spec_sets(draw: st.DrawFn, cluster: Cluster) -> tuple[ExperimentSpec, ...]:
    """1-14 specs: equal sizes, GPUs, ports, devices, (anti-)affinity, distinct_hosts."""
    count = draw(st.integers(1, 14))
    ids = [f"e{i:02d}" for i in range(count)]
    specs = []
    for eid in ids:
        others = [x for x in ids if x != eid]
        doc: dict[str, Any] = {"experiment_id": eid, "command": ["python3", "run.py"],
                               "ram_gb": draw(st.sampled_from([0.5, 1.0, 1.0, 2.0, 3.0])),
                               "cpu_cores": draw(st.sampled_from([0, 0, 1, 2]))}
        if draw(st.integers(0, 3)) == 0:
            doc.update(gpu_required=True, gpu_memory_gb=draw(st.sampled_from([0, 1, 2])))
        if draw(st.integers(0, 5)) == 0:
            doc["preferred_node"] = draw(st.sampled_from(cluster.node_names))
        if others and draw(st.booleans()):
            doc["affinity"] = draw(st.lists(st.sampled_from(others), max_size=2, unique=True))
        if others and draw(st.booleans()):
            doc["anti_affinity"] = draw(st.lists(st.sampled_from(others), max_size=2,
                                                 unique=True))
        if draw(st.integers(0, 4)) == 0:
            doc["constraints"] = [{"operator": "distinct_hosts"}]
        if draw(st.integers(0, 5)) == 0:
            doc["resources"] = {"ports": [{"label": "http", "port": 8080}]}
        elif draw(st.integers(0, 5)) == 0:
            doc["resources"] = {"devices": [{"kind": "gpu", "count": 1}]}
        specs.append(parse_spec(doc, SPEC_DIR / f"{eid}.json", cluster))
    return check_spec_set(specs)


def signature(result: Plan) -> tuple[object, ...]:
    """Everything a plan says, in comparable form (explanations included)."""
    return (result.placements, result.unplaced, dict(result.pin_errors), result.strategy,
            dict(result.evaluations.items()))


def draw_plan_inputs(data: st.DataObject, cluster: Any, specs: list[Any], *, unset: int,
                     pin_one_in: int, occupy_one_in: int) -> tuple[list[Any], dict[str, Any]]:
    """Node conditions (``unset`` in ``unset + len(Condition)`` left unset), pins and occupied
    work (about one spec in ``pin_one_in`` / ``occupy_one_in``), a force flag and a strategy:
    the specs still to place and ``plan``'s keyword arguments, the same for both planners."""
    conditions = {n: NodeCondition(c, "generated") for n in cluster.node_names
                  if (c := data.draw(st.sampled_from([None] * unset + [*Condition])))
                  is not None}
    pins = {s.experiment_id: data.draw(st.sampled_from(cluster.node_names))
            for s in specs if data.draw(st.integers(0, pin_one_in - 1)) == 0}
    occupied = [(s, data.draw(st.sampled_from(cluster.node_names)))
                for s in specs if data.draw(st.integers(0, occupy_one_in - 1)) == 0]
    busy = {s.experiment_id for s, _ in occupied}
    todo = [s for s in specs if s.experiment_id not in busy]
    kwargs: dict[str, Any] = {
        "pins": {k: v for k, v in pins.items() if k not in busy},
        "conditions": conditions, "force": data.draw(st.booleans()),
        "strategy": data.draw(st.sampled_from([None, *Strategy])), "occupied": occupied}
    return todo, kwargs


@PROPS
@given(data=st.data())
def test_fast_plan_equals_the_reference_loop(data: st.DataObject) -> None:
    """Same placements, scores, parts, allocations, failures and explanations."""
    cluster = data.draw(clusters())
    specs = data.draw(spec_sets(cluster))
    todo, kwargs = draw_plan_inputs(data, cluster, specs, unset=3, pin_one_in=5,
                                    occupy_one_in=7)
    fast = plan(cluster, todo, **kwargs)
    slow = plan(cluster, todo, reference=True, **kwargs)
    assert signature(fast) == signature(slow)
    for iid, evals in slow.evaluations.items():  # counts agree with the explanations
        refused = sum(1 for e in evals if not e.feasible)
        if iid not in kwargs["pins"]:
            assert sum(fast.rejections.get(iid, {}).values()) == refused


def test_classes_collapse_identical_nodes_and_explanations_are_lazy() -> None:
    """Twenty identical nodes: every instance lands as the reference says; nothing is
    explained until asked, and asking for one instance explains only that one."""
    cluster = parse_cluster({"nodes": [{"name": f"n{i:02d}", "host": f"127.0.0.{20 + i}",
                                        "ram_gb": 8, "cpu_cores": 4, "max_instances": 4}
                                       for i in range(20)]}, CONFIG_PATH)
    specs = check_spec_set(parse_spec({"experiment_id": f"e{i:02d}", "command": ["true"],
                                       "ram_gb": 1 + i % 3}, SPEC_DIR / f"e{i:02d}.json",
                                      cluster) for i in range(30))
    fast = plan(cluster, specs)
    slow = plan(cluster, specs, reference=True)
    assert fast.placements == slow.placements
    lazy = fast.evaluations
    assert isinstance(lazy, LazyEvaluations)
    assert lazy.explained == frozenset()
    assert lazy["e05"] == slow.evaluations["e05"]
    assert lazy.explained == {"e05"}


def two_twins() -> Cluster:
    """Two identical nodes (4 GB, up to 4 instances each)."""
    return parse_cluster({"nodes": [{"name": n, "host": h, "ram_gb": 4, "cpu_cores": 4,
                                     "max_instances": 4}
                                    for n, h in (("n0", "127.0.0.20"), ("n1", "127.0.0.21"))]},
                         CONFIG_PATH)


def specs_of(cluster: Cluster, *docs: dict[str, Any]) -> tuple[ExperimentSpec, ...]:
    """Parse spec documents (command filled in) through the real parser."""
    return check_spec_set(parse_spec({"command": ["true"], **d},
                                     SPEC_DIR / f"{d['experiment_id']}.json", cluster)
                          for d in docs)


def test_nodes_with_the_same_count_but_different_ram_are_not_one_class() -> None:
    """n0 holds 3 GB, n1 1 GB (one instance each): a 2 GB instance fits n1 only."""
    cluster = two_twins()
    specs = specs_of(cluster, {"experiment_id": "a", "ram_gb": 3},
                     {"experiment_id": "b", "ram_gb": 1}, {"experiment_id": "c", "ram_gb": 2})
    result = plan(cluster, specs, pins={"a": "n0", "b": "n1"})
    assert result.as_dict() == {"a": "n0", "b": "n1", "c": "n1"}
    assert result.placements == plan(cluster, specs, pins={"a": "n0", "b": "n1"},
                                     reference=True).placements


def test_a_distinct_hosts_peer_splits_nodes_with_equal_loads() -> None:
    """n0 and n1 hold the same load, but only n0's instance is under distinct_hosts."""
    cluster = two_twins()
    distinct = [{"operator": "distinct_hosts"}]
    specs = specs_of(cluster, {"experiment_id": "a", "ram_gb": 1, "constraints": distinct},
                     {"experiment_id": "b", "ram_gb": 1},
                     {"experiment_id": "c", "ram_gb": 1, "constraints": distinct})
    result = plan(cluster, specs, pins={"a": "n0", "b": "n1"})
    assert result.as_dict() == {"a": "n0", "b": "n1", "c": "n1"}
    assert result.rejections["c"] == {"distinct_hosts": 1}


def reference_scan(feasible: list[tuple[int, float]]) -> int | None:
    """The reference loop's pick: topology order, replaced only when better by > 1e-9."""
    best: tuple[int, float] | None = None
    for i, total in sorted(feasible):
        if best is None or total > best[1] + 1e-9:
            best = (i, total)
    return None if best is None else best[0]


@PROPS
@given(st.lists(st.tuples(st.integers(0, 30), st.sampled_from(
    [10.0, 10.0 + 0.6e-9, 10.0 + 1.2e-9, 10.0 - 1e-6, 10.0 - 1e-6 - 0.5e-9, 9.5, 45.0])),
    max_size=12, unique_by=lambda c: c[0]))
def test_first_best_is_the_reference_scan_even_with_near_ties(
        feasible: list[tuple[int, float]]) -> None:
    """Only the totals near the maximum are scanned, with the same chained-tie outcome."""
    assert _first_best(list(feasible)) == reference_scan(feasible)


# ---- the shape views: many identical nodes, repeated shapes, ties ---------------------

CROWD_TEMPLATES: tuple[dict[str, Any], ...] = (
    {"ram_gb": 8, "cpu_cores": 4, "max_instances": 3, "disk_gb": 20},
    {"ram_gb": 8, "cpu_cores": 4, "max_instances": 3, "disk_gb": 20},  # twins: ties
    {"ram_gb": 16, "reserved_ram_gb": 1, "cpu_cores": 8, "max_instances": 4, "gpu": True,
     "gpu_memory_gb": 8, "devices": [{"id": "gpu0", "kind": "gpu", "index": 0},
                                     {"id": "gpu1", "kind": "gpu", "index": 1}]},
    {"ram_gb": 12, "cpu_cores": 6, "max_instances": 3, "type": "jetson_orin", "gpu": True},
    {"ram_gb": 6, "cpu_cores": 2, "max_instances": 6, "tags": ["pi"]},
)


@st.composite
def crowds(draw: st.DrawFn) -> Cluster:
    """8-30 nodes from two or three templates: long runs of identical nodes."""
    kinds = draw(st.lists(st.sampled_from(CROWD_TEMPLATES), min_size=1, max_size=3))
    docs = []
    for i in range(draw(st.integers(8, 30))):
        doc = {"name": f"n{i:02d}", "host": f"127.0.1.{20 + i}", **draw(st.sampled_from(kinds))}
        if draw(st.integers(0, 14)) == 0:
            doc[draw(st.sampled_from(["enabled", "scheduling_eligible"]))] = False
        docs.append(doc)
    data: dict[str, Any] = {"nodes": docs}
    if draw(st.integers(0, 3)) == 0:
        data["placement"] = {"preferences": draw(st.permutations([d["name"] for d in docs]))}
    return parse_cluster(data, CONFIG_PATH)


@st.composite
def crowd_specs(draw: st.DrawFn, cluster: Cluster) -> tuple[ExperimentSpec, ...]:
    """15-45 instances drawn from a handful of shapes (so views are reused and refreshed),
    with peers, preferred nodes, distinct_hosts, disk, devices and ports on some."""
    shapes = draw(st.lists(st.fixed_dictionaries({
        "ram_gb": st.sampled_from([0.5, 1.0, 2.0, 3.0, 5.0]),
        "cpu_cores": st.sampled_from([0, 0, 1, 2.5]),
        "gpu": st.sampled_from([False, False, True]),
        "gpu_memory_gb": st.sampled_from([0, 1, 3]),
        "disk": st.sampled_from([0, 0, 4, 9])}), min_size=1, max_size=4))
    ids = [f"e{i:02d}" for i in range(draw(st.integers(15, 45)))]
    specs = []
    for eid in ids:
        shape = draw(st.sampled_from(shapes))
        others = [x for x in ids if x != eid]
        doc: dict[str, Any] = {"experiment_id": eid, "command": ["true"],
                               "ram_gb": shape["ram_gb"], "cpu_cores": shape["cpu_cores"]}
        if shape["gpu"]:
            doc.update(gpu_required=True, gpu_memory_gb=shape["gpu_memory_gb"])
        if shape["disk"]:
            doc["resources"] = {"disk_gb": shape["disk"]}
        if draw(st.integers(0, 9)) == 0:
            doc["preferred_node"] = draw(st.sampled_from(cluster.node_names))
        if draw(st.integers(0, 5)) == 0:
            doc["affinity"] = [draw(st.sampled_from(others))]
        if draw(st.integers(0, 5)) == 0:
            doc["anti_affinity"] = [draw(st.sampled_from(others))]
        if draw(st.integers(0, 7)) == 0:
            doc["constraints"] = [{"operator": "distinct_hosts"}]
        extra = draw(st.integers(0, 11))
        if extra == 0:
            doc["resources"] = {**doc.get("resources", {}),
                                "ports": [{"label": "http", "port": 9000}]}
        elif extra == 1:
            doc["resources"] = {**doc.get("resources", {}),
                                "devices": [{"kind": "gpu", "count": 1}]}
        specs.append(parse_spec(doc, SPEC_DIR / f"{eid}.json", cluster))
    return check_spec_set(specs)


CROWD_PROPS = settings(max_examples=60, deadline=None,
                       suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@CROWD_PROPS
@given(data=st.data())
def test_fast_plan_equals_the_reference_loop_on_crowds(data: st.DataObject) -> None:
    """Many identical nodes and repeated shapes (the views' home ground), pins, forced
    pins, occupied work, every strategy: the same plan, explanations and counts."""
    cluster = data.draw(crowds())
    specs = data.draw(crowd_specs(cluster))
    todo, kwargs = draw_plan_inputs(data, cluster, specs, unset=8, pin_one_in=10,
                                    occupy_one_in=10)
    fast = plan(cluster, todo, **kwargs)
    slow = plan(cluster, todo, reference=True, **kwargs)
    assert signature(fast) == signature(slow)
    names = {"enabled", "eligible", "healthy", "gpu", "constraints", "runtime_driver",
             "volumes", "max_instances", "ram", "gpu_memory", "cpu", "disk", "devices",
             "ports", "anti_affinity", "distinct_hosts"}
    for iid, evals in slow.evaluations.items():
        if iid in kwargs["pins"]:
            continue
        assert set(fast.rejections.get(iid, {})) <= names
        refused = sum(1 for e in evals if not e.feasible)
        assert sum(fast.rejections.get(iid, {}).values()) == refused


def test_ties_between_identical_nodes_go_to_the_first_listed() -> None:
    """Forty identical empty nodes listed out of name order: each instance of one shape
    takes the first node in topology (preferences) order that scores best, as the loop."""
    names = [f"n{i:02d}" for i in range(40)]
    order = list(reversed(names[:10])) + names[10:]
    cluster = parse_cluster({"nodes": [{"name": n, "host": f"127.0.2.{20 + i}", "ram_gb": 8,
                                        "cpu_cores": 4, "max_instances": 2}
                                       for i, n in enumerate(names)],
                             "placement": {"preferences": order}}, CONFIG_PATH)
    specs = specs_of(cluster, *({"experiment_id": f"e{i:02d}", "ram_gb": 2}
                                for i in range(50)))
    fast = plan(cluster, specs)
    slow = plan(cluster, specs, reference=True)
    assert fast.placements == slow.placements
    assert fast.node_of("e00") == "n09"  # the first preference, though not the first name
    full = sum(1 for e in slow.evaluations["e49"] if not e.feasible)
    assert 0 < full < 40
    assert fast.rejections["e49"] == {"max_instances": full}


def reference_placement_order(specs: list[ExperimentSpec]) -> list[str]:
    """``engine.placement_order``'s result, as ids."""
    return [s.experiment_id for s in placement_order(specs)]


@PROPS
@given(st.data())
def test_fast_order_is_the_reference_placement_order(data: st.DataObject) -> None:
    """Affinity waits, chains, cycles, self-references, unknown peers and equal keys."""
    count = data.draw(st.integers(0, 25))
    ids = [f"e{i:02d}" for i in range(count)]
    specs = []
    for eid in ids:
        peers = data.draw(st.lists(st.sampled_from([*ids, "elsewhere"]) if ids
                                   else st.just("elsewhere"), max_size=3))
        specs.append(ExperimentSpec(experiment_id=eid, command="true",
                                    source=SPEC_DIR / f"{eid}.json",
                                    ram_gb=data.draw(st.sampled_from([1.0, 2.0, 4.0])),
                                    gpu_required=data.draw(st.booleans()),
                                    affinity=tuple(peers)))
    random.Random(count).shuffle(specs)
    assert [s.experiment_id for s in fast_order(specs)] == reference_placement_order(specs)


NEAR = [None, None, 10.0, 10.0, 10.0 + 0.6e-9, 10.0 + 1.2e-9, 10.0 - 1e-6,
        10.0 - 1e-6 - 0.5e-9, 9.5, 45.0, 45.0]


@PROPS
@given(st.data())
def test_a_view_picks_what_the_reference_scan_picks(data: st.DataObject) -> None:
    """A view refreshed node by node (stale heap entries, totals that come back, nodes
    judged one by one as special) always hands over what scanning every node gives, near
    ties and chained ties included; its counts match the nodes' reasons."""
    size = data.draw(st.integers(1, 25))
    table: list[float | None] = [data.draw(st.sampled_from(NEAR)) for _ in range(size)]
    feasible = 3  # reasons 0..2, 3 = no check failed

    def judge(i: int) -> tuple[int, float]:
        points = table[i]
        return (2, 0.0) if points is None else (feasible, points)

    static = [data.draw(st.sampled_from([-1, -1, -1, 0])) for _ in range(size)]
    view = _View(judge, static, feasible + 1, 0)
    for _step in range(data.draw(st.integers(1, 10))):
        changed = data.draw(st.lists(st.integers(0, size - 1), max_size=5))
        for i in changed:
            table[i] = data.draw(st.sampled_from(NEAR))
        view.update(set(changed))
        special = set(data.draw(st.lists(st.integers(0, size - 1), max_size=3)))
        mine = [(i, t) for i in sorted(special)
                if (t := data.draw(st.sampled_from(NEAR))) is not None]
        rest = [(i, t) for i, t in enumerate(table)
                if static[i] < 0 and t is not None and i not in special]
        assert _choose(view, special, mine) == reference_scan(rest + mine)
        reasons = [0 if static[i] >= 0 else 2 if table[i] is None else feasible
                   for i in range(size)]
        assert view.counts == [reasons.count(k) for k in range(feasible + 1)]


def test_a_chain_of_near_ties_from_below_the_window_is_followed() -> None:
    """1,252 totals climbing 0.8e-9 at a time from just below the window's edge: the
    reference scan leapfrogs up the chain, so a total below the window changes which node
    wins; the view notices (a total in the band) and scans everything."""
    start = 10.0 - 1e-6
    table = [start - 0.5e-9] + [start + 0.8e-9 * k for k in range(1, 1253)]
    feasible = list(enumerate(table))
    edge = max(table) - 1e-6
    assert any(edge - 1e-9 <= t < edge for t in table)  # just below the window
    near_only = reference_scan([c for c in feasible if c[1] >= edge])
    assert reference_scan(feasible) != near_only  # the case is the one it claims to be
    assert _first_best(feasible) == reference_scan(feasible)
    view = _View(lambda i: (1, table[i]), [-1] * len(table), 2, 0)
    assert _choose(view, set(), []) == reference_scan(feasible)
    assert _choose(view, {0}, [(0, table[0])]) == reference_scan(feasible)


def test_a_peer_id_running_on_two_nodes_counts_on_both() -> None:
    """Occupied work of two runs can share an instance id: anti-affinity to it refuses
    both nodes, affinity to it draws to both, as in the loop (it reads each node's ids)."""
    cluster = two_twins()
    by_id = {s.experiment_id: s for s in specs_of(
        cluster, {"experiment_id": "x", "ram_gb": 1},
        {"experiment_id": "a", "ram_gb": 1, "anti_affinity": ["x"]},
        {"experiment_id": "b", "ram_gb": 1, "affinity": ["x"]})}
    x, a, b = by_id["x"], by_id["a"], by_id["b"]
    busy = [(x, "n0"), (x, "n1")]
    for todo in ([a], [b], [a, b]):
        fast = plan(cluster, todo, occupied=busy)
        assert signature(fast) == signature(plan(cluster, todo, occupied=busy,
                                                 reference=True))
    assert plan(cluster, [a], occupied=busy).rejections["a"] == {"anti_affinity": 2}
