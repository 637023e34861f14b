"""Strategies: score (the reference points), binpack and spread (Nomad-style fits over CPU and
memory), their named parts, the config key and the --strategy flag, and invariants that hold
for every strategy on random clusters."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infra.cli.main import main
from infra.config.model import Cluster, ExperimentSpec, Strategy
from infra.config.specs import check_spec_set, parse_spec
from infra.config.topology import load_cluster, parse_cluster
from infra.placement import Snapshot, plan, why_not
from infra.placement.scoring import (
    FIT_POINTS,
    STRATEGIES,
    binpack_cpu,
    binpack_memory,
    spread_cpu,
    spread_memory,
)
from tests.builders import cluster

REPO = Path(__file__).resolve().parent.parent
PART_NAMES = {
    Strategy.SCORE: ("ram_efficiency", "load_balance", "gpu_match", "affinity", "preferred_node"),
    Strategy.BINPACK: ("binpack_cpu", "binpack_memory", "affinity", "preferred_node"),
    Strategy.SPREAD: ("spread_cpu", "spread_memory", "affinity", "preferred_node"),
}


def node(name: str, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": name, "host": f"{name}.lab.invalid", "ram_gb": 16.0,
                            "max_instances": 8, "cpu_cores": 8}
    base.update(kw)
    return base



def spec(c: Cluster, eid: str = "x", **kw: Any) -> ExperimentSpec:
    data: dict[str, Any] = {"experiment_id": eid, "command": "true", "ram_gb": 1.0}
    data.update(kw)
    return parse_spec(data, Path(f"{eid}.json"), c)


# ---------------------------------------------------------------- the fit parts

@pytest.mark.parametrize(("cpu", "ram", "cpu_free", "mem_free"), [
    (8.0, 16.0, 0.0, 0.0),    # fills the node
    (0.0, 0.0001, 1.0, 1.0),  # (almost) nothing
    (4.0, 8.0, 0.5, 0.5),
    (2.0, 12.0, 0.75, 0.25),
])
def test_fit_parts(cpu: float, ram: float, cpu_free: float, mem_free: float) -> None:
    c = cluster(node("n"))
    s = spec(c, cpu_cores=cpu, ram_gb=ram)
    snap = Snapshot.build(c, [s])
    n = c.nodes[0]

    def pack(free: float) -> float:
        return (10 - 10 ** free) / 9 * FIT_POINTS

    def spread(free: float) -> float:
        return (10 ** free - 1) / 9 * FIT_POINTS

    assert binpack_cpu(snap, n, s).points == pytest.approx(pack(cpu_free), abs=1e-3)
    assert binpack_memory(snap, n, s).points == pytest.approx(pack(mem_free), abs=1e-3)
    assert spread_cpu(snap, n, s).points == pytest.approx(spread(cpu_free), abs=1e-3)
    assert spread_memory(snap, n, s).points == pytest.approx(spread(mem_free), abs=1e-3)


def test_fit_extremes_are_0_and_32_5() -> None:
    c = cluster(node("n"))
    full = spec(c, cpu_cores=8, ram_gb=16)
    snap = Snapshot.build(c, [full])
    assert binpack_cpu(snap, c.nodes[0], full).points == FIT_POINTS == 32.5
    assert spread_memory(snap, c.nodes[0], full).points == 0.0
    assert math.isclose(binpack_memory(snap, c.nodes[0], full).points, 32.5)


def test_fit_counts_what_is_already_placed_and_unified_memory() -> None:
    c = cluster(node("j", type="jetson_orin", gpu=True, ram_gb=20, cpu_cores=4))
    first = spec(c, "a", ram_gb=4, cpu_cores=2)
    gpu = spec(c, "b", ram_gb=2, gpu_required=True, gpu_memory_gb=4, cpu_cores=1)
    snap = Snapshot.build(c, [first, gpu]).with_placement(first, c.nodes[0])
    part = binpack_memory(snap, c.nodes[0], gpu)
    assert part.detail == "10/20 GB used after placement"  # 4 + (2 + 4 unified)
    assert binpack_cpu(snap, c.nodes[0], gpu).detail == "3/4 cores used after placement"


# ---------------------------------------------------------------- behaviour

def test_binpack_prefers_the_fuller_node_spread_the_emptier() -> None:
    c = cluster(node("a", ram_gb=32), node("b", ram_gb=32))
    busy = spec(c, "busy", ram_gb=16, cpu_cores=4)
    new = spec(c, "new", ram_gb=2, cpu_cores=1)
    kw: dict[str, Any] = {"occupied": [(busy, "b")]}
    assert plan(c, [new], strategy=Strategy.BINPACK, **kw).as_dict() == {"new": "b"}
    assert plan(c, [new], strategy=Strategy.SPREAD, **kw).as_dict() == {"new": "a"}


def test_binpack_consolidates_and_spread_distributes() -> None:
    c = cluster(node("a"), node("b"), node("c"))
    specs = [spec(c, f"s{i}", ram_gb=2, cpu_cores=1) for i in range(3)]
    packed = plan(c, specs, strategy=Strategy.BINPACK).as_dict()
    spread = plan(c, specs, strategy=Strategy.SPREAD).as_dict()
    assert set(packed.values()) == {"a"}
    assert sorted(spread.values()) == ["a", "b", "c"]


def test_binpack_fills_the_small_node_first() -> None:
    c = cluster(node("big", ram_gb=64, cpu_cores=32), node("small", ram_gb=8, cpu_cores=4))
    s = spec(c, ram_gb=4, cpu_cores=2)
    assert plan(c, [s], strategy=Strategy.BINPACK).as_dict() == {"x": "small"}
    assert plan(c, [s], strategy=Strategy.SPREAD).as_dict() == {"x": "big"}


def test_preferred_node_and_affinity_count_in_every_strategy() -> None:
    c = cluster(node("a"), node("b"))
    for strategy in Strategy:
        s = spec(c, preferred_node="b")
        (p,) = plan(c, [s], strategy=strategy).placements
        assert dict((x.name, x.points) for x in p.parts)["preferred_node"] == 10.0


@pytest.mark.parametrize("strategy", list(Strategy))
def test_every_strategy_names_its_parts(strategy: Strategy) -> None:
    c = cluster(node("a"))
    (p,) = plan(c, [spec(c)], strategy=strategy).placements
    assert tuple(x.name for x in p.parts) == PART_NAMES[strategy]
    assert p.score == pytest.approx(sum(x.points for x in p.parts))
    assert tuple(s.__name__ for s in STRATEGIES[strategy]) == PART_NAMES[strategy]


def test_worked_example_still_scores_65_with_the_default_strategy() -> None:
    c = load_cluster(REPO / "docs" / "example-lab.yaml")
    assert c.placement.strategy is Strategy.SCORE
    a = spec(c, "split_brain_A", ram_gb=8.0, gpu_required=True, gpu_memory_gb=8.0,
             preferred_node="jetson")
    result = plan(c, [a])
    assert result.strategy is Strategy.SCORE
    assert result.placements[0].score == 65.0


def test_config_strategy_and_override() -> None:
    c = cluster(node("a"), node("b"), placement={"strategy": "spread"})
    assert c.placement.strategy is Strategy.SPREAD
    specs = [spec(c, "p"), spec(c, "q")]
    assert plan(c, specs).strategy is Strategy.SPREAD
    assert sorted(plan(c, specs).as_dict().values()) == ["a", "b"]
    assert set(plan(c, specs, strategy=Strategy.BINPACK).as_dict().values()) == {"a"}
    assert c.with_strategy(Strategy.BINPACK).placement.strategy is Strategy.BINPACK


# ---------------------------------------------------------------- through the CLI

def _lab_args(*extra: str) -> list[str]:
    return ["--cluster-config", str(REPO / "docs" / "example-lab.yaml"), "--auto-place",
            "--dry-run", "--config", str(REPO / "experiments" / "split_brain_A.json"),
            "--config", str(REPO / "experiments" / "split_brain_B.json"), *extra]


@pytest.mark.parametrize("strategy", list(Strategy))
def test_strategy_flag_json(strategy: Strategy, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(_lab_args("--json", "--strategy", strategy.value))
    out, err = capsys.readouterr()
    assert code == 0, err
    doc = json.loads(out)
    assert doc["strategy"] == strategy.value
    a = doc["instances"]["split_brain_A"]
    assert tuple(a["nodes"][a["node"]]["parts"]) == PART_NAMES[strategy]
    assert doc["placements"]["split_brain_A"] == "jetson"  # the only GPU node


def test_default_flagless_json_says_score(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(_lab_args("--json"))
    out, err = capsys.readouterr()
    assert code == 0, err
    doc = json.loads(out)
    assert doc["strategy"] == "score"
    assert doc["instances"]["split_brain_A"]["nodes"]["jetson"]["score"] == 65


def test_explain_shows_the_strategys_parts(capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    code = main(_lab_args("--explain", "--strategy", "binpack"))
    out, err = capsys.readouterr()
    assert code == 0, err
    flat = " ".join(out.split())
    assert "cpu fit" in flat and "mem fit" in flat and "ram_eff" not in flat
    assert "rejected: has no GPU" in flat
    assert "used after placement" in flat
    code = main(_lab_args("--explain"))
    out, _ = capsys.readouterr()
    assert "ram_eff" in " ".join(out.split())


def test_bad_strategy_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(_lab_args("--strategy", "random"))
    _, err = capsys.readouterr()
    assert code == 2
    assert "Invalid value for '--strategy'" in err and "Traceback" not in err


# ---------------------------------------------------------------- invariants, any strategy

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw: st.DrawFn) -> tuple[Cluster, tuple[ExperimentSpec, ...]]:
    """A small random cluster with GPUs and devices, and specs that use them."""
    nodes = []
    for i in range(draw(st.integers(1, 5))):
        doc: dict[str, Any] = {
            "name": f"n{i}", "host": f"127.0.0.{20 + i}",
            "ram_gb": draw(st.integers(2, 64)), "cpu_cores": draw(st.integers(1, 16)),
            "max_instances": draw(st.integers(1, 4)),
            "scheduling_eligible": draw(st.sampled_from([True, True, False])),
        }
        if draw(st.booleans()):
            doc.update(gpu=True, gpu_memory_gb=16,
                       devices=[{"id": f"gpu{k}", "index": k, "driver": "cuda"}
                                for k in range(draw(st.integers(1, 3)))])
        nodes.append(doc)
    c = parse_cluster({"nodes": nodes}, Path("/tmp/strategies/cluster.yaml"))
    specs = []
    for j in range(draw(st.integers(1, 8))):
        res: dict[str, Any] = {"memory_gb": draw(st.integers(1, 16)),
                               "cpu_cores": draw(st.sampled_from([0, 0.5, 1, 2, 4]))}
        if draw(st.booleans()):
            res["gpu_count"] = draw(st.integers(1, 2))
        if draw(st.booleans()):
            res["ports"] = [{"label": "api", "port": draw(st.sampled_from([8000, 8001]))}]
        specs.append(parse_spec({"experiment_id": f"e{j}", "command": "true",
                                 "resources": res}, Path(f"/tmp/strategies/e{j}.json"), c))
    return c, check_spec_set(specs)


@PROPS
@given(problem=problems(), strategy=st.sampled_from(list(Strategy)))
def test_any_strategy_respects_capacity_devices_and_ports(
        problem: tuple[Cluster, tuple[ExperimentSpec, ...]], strategy: Strategy) -> None:
    c, specs = problem
    result = plan(c, specs, strategy=strategy)
    by_id = {s.experiment_id: s for s in specs}
    per_node: dict[str, list[str]] = {}
    for p in result.placements:
        per_node.setdefault(p.node, []).append(p.instance_id)
        assert 0 <= p.score <= 100 + 1e-9
        assert p.score == pytest.approx(sum(x.points for x in p.parts))
        assert tuple(x.name for x in p.parts) == PART_NAMES[strategy]
        assert c.node(p.node).scheduling_eligible
        alloc = p.allocation
        assert alloc is not None and alloc.node == p.node
        want = sum(d.count for d in by_id[p.instance_id].resources.devices)
        assert len(alloc.device_ids) == want
    for name, ids in per_node.items():
        n = c.node(name)
        assert len(ids) <= n.max_instances
        assert sum(by_id[i].ram_gb for i in ids) <= n.available_ram_gb + 1e-9
        devices = [d for i in ids for d in result.allocation_of(i).device_ids]  # type: ignore[union-attr]
        assert len(devices) == len(set(devices)), devices
        ports = [p.port for i in ids for p in by_id[i].resources.ports]
        assert len(ports) == len(set(ports)), ports
    for eid in result.unplaced:
        if eid in result.left_out:  # traded out by the repair: it fitted when judged
            assert why_not(result, eid).startswith("left out by the repair"), eid
            continue
        assert all(e.rejection for e in result.evaluations[eid])
