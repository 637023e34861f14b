"""Table-driven tests of every score part and hard constraint, and the reference worked example."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from infra.config.model import Cluster, ExperimentSpec
from infra.config.specs import check_spec_set, parse_spec
from infra.config.topology import parse_cluster
from infra.placement import Condition, NodeCondition, placement_order, plan
from infra.placement.scoring import (
    affinity,
    gpu_match,
    load_balance,
    preferred_node,
    ram_efficiency,
)
from infra.placement.snapshot import Snapshot

REPO = Path(__file__).resolve().parent.parent


def node(name: str, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": name, "host": f"{name}.lab.invalid", "ram_gb": 16.0,
                            "max_instances": 4}
    base.update(kw)
    return base


def cluster(*nodes: dict[str, Any]) -> Cluster:
    return parse_cluster({"nodes": list(nodes)}, Path("test_cluster.yaml"))


def spec(c: Cluster, eid: str, **kw: Any) -> ExperimentSpec:
    data: dict[str, Any] = {"experiment_id": eid, "command": "true", "ram_gb": 1.0}
    data.update(kw)
    return parse_spec(data, Path(f"{eid}.json"), c)


def lab() -> Cluster:
    """The reference lab with every node enabled (docs/example-lab.yaml)."""
    from infra.config.topology import load_cluster
    return load_cluster(REPO / "docs" / "example-lab.yaml")


# ---------------------------------------------------------------- worked example

def test_reference_worked_example_scores_65() -> None:
    c = lab()
    a = spec(c, "split_brain_A", ram_gb=8.0, gpu_required=True, gpu_memory_gb=8.0,
             preferred_node="jetson")
    result = plan(c, [a])
    (p,) = result.placements
    assert p.node == "jetson"
    parts = {x.name: x.points for x in p.parts}
    assert parts == {"ram_efficiency": 20.0, "load_balance": 20.0, "gpu_match": 15.0,
                     "affinity": 0.0, "preferred_node": 10.0}
    assert p.score == 65.0


def test_reference_split_brain_places_b_away_from_a() -> None:
    c = lab()
    a = spec(c, "split_brain_A", ram_gb=8.0, gpu_required=True, gpu_memory_gb=8.0,
             preferred_node="jetson")
    b = spec(c, "split_brain_B", ram_gb=2.0, anti_affinity=["split_brain_A"])
    assert plan(c, [b, a]).as_dict() == {"split_brain_A": "jetson", "split_brain_B": "rpi1"}


def test_shipped_scenarios_place_as_reference_describes() -> None:
    c = lab()
    from infra.config.specs import load_spec

    def run(*names: str) -> dict[str, str]:
        specs = check_spec_set(load_spec(REPO / "experiments" / f"{n}.json", c) for n in names)
        result = plan(c, specs)
        assert result.ok
        return result.as_dict()

    hive = run("hive_historian", "hive_critic", "hive_optimist", "hive_pessimist")
    assert hive == {"hive_historian": "jetson", "hive_critic": "jetson",
                    "hive_optimist": "jetson", "hive_pessimist": "rpi1"}
    assert run("panopticon_subject", "panopticon_observer") == {
        "panopticon_subject": "rpi1", "panopticon_observer": "jetson"}
    assert run("prisoners_dilemma_A", "prisoners_dilemma_B") == {
        "prisoners_dilemma_A": "rpi1", "prisoners_dilemma_B": "rpi2"}


# ---------------------------------------------------------------- score parts

@pytest.mark.parametrize(("ram_gb", "node_ram", "reserved", "points"), [
    (2.0, 12.0, 2.0, 20.0),    # 20% -> below 30%
    (3.0, 12.0, 2.0, 30.0),    # exactly 30% -> optimal
    (5.0, 12.0, 2.0, 30.0),    # 50%
    (7.0, 12.0, 2.0, 30.0),    # exactly 70% -> optimal
    (8.0, 12.0, 2.0, 10.0),    # 80% -> tight
    (10.0, 12.0, 2.0, 10.0),   # 100%
])
def test_ram_efficiency(ram_gb: float, node_ram: float, reserved: float, points: float) -> None:
    c = cluster(node("n", ram_gb=node_ram, reserved_ram_gb=reserved))
    s = spec(c, "x", ram_gb=ram_gb)
    snap = Snapshot.build(c, [s])
    assert ram_efficiency(snap, c.nodes[0], s).points == points


def test_ram_efficiency_uses_free_ram_after_earlier_placements() -> None:
    c = cluster(node("n", ram_gb=12.0, reserved_ram_gb=2.0))
    first, second = spec(c, "a", ram_gb=5.0), spec(c, "b", ram_gb=4.0)
    snap = Snapshot.build(c, [first, second]).with_placement(first, c.nodes[0])
    # 4 of the 5 GB still free = 80% -> tight
    assert ram_efficiency(snap, c.nodes[0], second).points == 10.0


def test_ram_efficiency_on_unified_node_counts_gpu_memory_in_the_pool() -> None:
    c = cluster(node("j", type="jetson_orin", ram_gb=20.0, gpu=True))
    s = spec(c, "x", ram_gb=4.0, gpu_required=True, gpu_memory_gb=4.0)
    snap = Snapshot.build(c, [s])
    part = ram_efficiency(snap, c.nodes[0], s)
    assert part.points == 30.0  # (4 + 4) / 20 = 40%
    assert part.detail.startswith("8/20 GB")


@pytest.mark.parametrize(("placed", "max_instances", "points"), [
    (0, 4, 20.0), (1, 4, 15.0), (2, 4, 10.0), (3, 4, 5.0), (0, 1, 20.0), (1, 2, 10.0),
])
def test_load_balance(placed: int, max_instances: int, points: float) -> None:
    c = cluster(node("n", ram_gb=64.0, max_instances=max_instances))
    specs = [spec(c, f"s{i}") for i in range(placed + 1)]
    snap = Snapshot.build(c, specs)
    for s in specs[:placed]:
        snap = snap.with_placement(s, c.nodes[0])
    assert load_balance(snap, c.nodes[0], specs[-1]).points == points


@pytest.mark.parametrize(("gpu_job", "gpu_node", "points"), [
    (True, True, 15.0), (False, False, 5.0), (False, True, 0.0),
])
def test_gpu_match(gpu_job: bool, gpu_node: bool, points: float) -> None:
    extra = {"gpu": True, "gpu_memory_gb": 8.0} if gpu_node else {}
    c = cluster(node("n", **extra))
    s = spec(c, "x", gpu_required=gpu_job, **({"gpu_memory_gb": 1.0} if gpu_job else {}))
    assert gpu_match(Snapshot.build(c, [s]), c.nodes[0], s).points == points


@pytest.mark.parametrize(("peers_here", "points"), [(0, 0.0), (1, 10.0), (2, 20.0), (3, 25.0)])
def test_affinity_is_capped_at_25(peers_here: int, points: float) -> None:
    c = cluster(node("n", ram_gb=64.0, max_instances=8))
    peers = [spec(c, f"p{i}") for i in range(3)]
    s = spec(c, "x", affinity=[p.experiment_id for p in peers])
    snap = Snapshot.build(c, [*peers, s])
    for p in peers[:peers_here]:
        snap = snap.with_placement(p, c.nodes[0])
    assert affinity(snap, c.nodes[0], s).points == points


def test_preferred_node() -> None:
    c = cluster(node("a"), node("b"))
    s = spec(c, "x", preferred_node="b")
    snap = Snapshot.build(c, [s])
    assert preferred_node(snap, c.nodes[0], s).points == 0.0
    assert preferred_node(snap, c.nodes[1], s).points == 10.0


# ---------------------------------------------------------------- hard constraints

@pytest.mark.parametrize(("node_kw", "spec_kw", "reason"), [
    ({"enabled": False}, {}, "disabled in the cluster config"),
    ({"max_instances": 1}, {"_fill": 1}, "full (1/1 instances)"),
    ({}, {"gpu_required": True, "gpu_memory_gb": 1.0}, "has no GPU"),
    ({"ram_gb": 8.0, "reserved_ram_gb": 2.0}, {"ram_gb": 7.0}, "not enough RAM: needs 7 GB, 6 GB free"),
    ({"gpu": True, "gpu_memory_gb": 4.0}, {"gpu_required": True, "gpu_memory_gb": 6.0},
     "not enough GPU memory: needs 6 GB, 4 GB free of 4 GB"),
    ({"type": "jetson_orin", "gpu": True, "ram_gb": 16.0, "reserved_ram_gb": 4.0},
     {"ram_gb": 8.0, "gpu_required": True, "gpu_memory_gb": 6.0},
     "not enough memory (RAM + GPU, unified): needs 14 GB, 12 GB free"),
    ({"cpu_cores": 2}, {"cpu_cores": 4.0}, "not enough CPU cores: needs 4, 2 free of 2"),
])
def test_hard_constraints(node_kw: dict[str, Any], spec_kw: dict[str, Any], reason: str) -> None:
    fill = spec_kw.pop("_fill", 0)
    c = cluster(node("n", **node_kw))
    fillers = [spec(c, f"f{i}", ram_gb=2.0) for i in range(fill)]
    s = spec(c, "x", **spec_kw)
    result = plan(c, [*fillers, s])
    assert "x" in result.unplaced
    ev = dict((e.node, e) for e in result.evaluations["x"])["n"]
    assert ev.rejection is not None and ev.rejection.startswith(reason), ev.rejection


def test_unified_memory_is_one_pool_not_two() -> None:
    # 16 GB unified: 12 GB usable. A 6+6 GPU job fits exactly; a second one does not,
    # even though the declared gpu_memory_gb (16) would allow it if counted separately.
    c = cluster(node("j", type="jetson_orin", ram_gb=16.0, reserved_ram_gb=4.0, gpu=True,
                     gpu_memory_gb=16.0))
    a = spec(c, "a", ram_gb=6.0, gpu_required=True, gpu_memory_gb=6.0)
    b = spec(c, "b", ram_gb=1.0, gpu_required=True, gpu_memory_gb=1.0)
    result = plan(c, [a, b])
    assert result.as_dict() == {"a": "j"}
    assert result.unplaced == ("b",)


def test_non_unified_gpu_memory_is_its_own_pool() -> None:
    c = cluster(node("g", ram_gb=16.0, gpu=True, gpu_memory_gb=8.0))
    a = spec(c, "a", ram_gb=6.0, gpu_required=True, gpu_memory_gb=6.0)
    b = spec(c, "b", ram_gb=6.0, gpu_required=True, gpu_memory_gb=2.0)
    assert plan(c, [a, b]).as_dict() == {"a": "g", "b": "g"}


@pytest.mark.parametrize("condition", [Condition.UNAVAILABLE, Condition.DEGRADED])
def test_unhealthy_nodes_are_never_chosen(condition: Condition) -> None:
    c = cluster(node("a", ram_gb=64.0), node("b", ram_gb=4.0))
    s = spec(c, "x", preferred_node="a")
    result = plan(c, [s], conditions={"a": NodeCondition(condition, "memory 95% used")})
    assert result.as_dict() == {"x": "b"}
    ev = result.evaluations["x"][0]
    assert ev.rejection == f"{condition.value}: memory 95% used"


def test_anti_affinity_is_symmetric_whatever_the_order() -> None:
    c = cluster(node("a", ram_gb=64.0), node("b", ram_gb=64.0))
    # only y names x; x is placed first (bigger), y must still avoid it
    x = spec(c, "x", ram_gb=8.0)
    y = spec(c, "y", ram_gb=1.0, anti_affinity=["x"])
    r1 = plan(c, [x, y]).as_dict()
    assert r1["x"] != r1["y"]
    # and the other direction: x names y, y is placed first
    x2 = spec(c, "x", ram_gb=1.0, anti_affinity=["y"])
    y2 = spec(c, "y", ram_gb=8.0)
    r2 = plan(c, [x2, y2]).as_dict()
    assert r2["x"] != r2["y"]


def test_affinity_peer_is_placed_first_so_the_bonus_counts() -> None:
    c = cluster(node("a", ram_gb=32.0), node("b", ram_gb=32.0))
    # 'follower' is bigger, so the base order would place it first; affinity delays it.
    leader = spec(c, "leader", ram_gb=2.0, preferred_node="b")
    follower = spec(c, "follower", ram_gb=10.0, affinity=["leader"])
    result = plan(c, [follower, leader])
    assert [p.instance_id for p in result.placements] == ["leader", "follower"]
    assert result.as_dict() == {"leader": "b", "follower": "b"}


def test_affinity_cycle_falls_back_to_base_order() -> None:
    c = cluster(node("a", ram_gb=32.0))
    p = spec(c, "p", ram_gb=2.0, affinity=["q"])
    q = spec(c, "q", ram_gb=4.0, affinity=["p"])
    assert [s.experiment_id for s in placement_order([p, q])] == ["q", "p"]


def test_base_order_gpu_then_ram_then_id() -> None:
    c = cluster(node("g", ram_gb=64.0, gpu=True, gpu_memory_gb=16.0, max_instances=8))
    specs = [spec(c, "b", ram_gb=2.0), spec(c, "a", ram_gb=2.0), spec(c, "big", ram_gb=9.0),
             spec(c, "gpu_small", ram_gb=1.0, gpu_required=True, gpu_memory_gb=1.0)]
    assert [s.experiment_id for s in placement_order(specs)] == ["gpu_small", "big", "a", "b"]


def test_ties_go_to_the_node_listed_first() -> None:
    c = cluster(node("second", ram_gb=16.0), node("first", ram_gb=16.0))
    assert plan(c, [spec(c, "x")]).as_dict() == {"x": "second"}


def test_placement_preferences_reorder_ties() -> None:
    c = parse_cluster({"nodes": [node("a"), node("b")], "placement": {"preferences": ["b"]}},
                      Path("c.yaml"))
    assert plan(c, [spec(c, "x")]).as_dict() == {"x": "b"}


# ---------------------------------------------------------------- pins

def test_pin_is_checked_against_hard_constraints() -> None:
    c = cluster(node("gpu", gpu=True, gpu_memory_gb=8.0), node("rpi1"))
    s = spec(c, "a", gpu_required=True, gpu_memory_gb=2.0)
    result = plan(c, [s], pins={"a": "rpi1"})
    assert result.pin_errors == {"a": "rpi1 has no GPU"}
    assert not result.ok


def test_forced_pin_is_placed_and_records_what_it_overrode() -> None:
    c = cluster(node("gpu", gpu=True, gpu_memory_gb=8.0), node("rpi1"))
    s = spec(c, "a", gpu_required=True, gpu_memory_gb=2.0)
    result = plan(c, [s], pins={"a": "rpi1"}, force=True)
    (p,) = result.placements
    assert (p.node, p.pinned, p.forced) == ("rpi1", True, ("has no GPU",))


def test_pins_count_for_auto_placed_instances() -> None:
    c = cluster(node("a", ram_gb=64.0), node("b", ram_gb=64.0))
    x = spec(c, "x")
    y = spec(c, "y", anti_affinity=["x"])
    result = plan(c, [x, y], pins={"x": "a"})
    assert result.as_dict() == {"x": "a", "y": "b"}


def test_nothing_fits_lists_every_node() -> None:
    c = cluster(node("a", ram_gb=4.0), node("b", enabled=False))
    result = plan(c, [spec(c, "x", ram_gb=10.0)])
    assert result.unplaced == ("x",)
    reasons = {e.node: e.rejection for e in result.evaluations["x"]}
    assert reasons == {"a": "not enough RAM: needs 10 GB, 4 GB free of 4 GB",
                       "b": "disabled in the cluster config"}
