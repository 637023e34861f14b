"""Job types: system and sysbatch specs expand to one pinned copy (``name@node``) per
eligible node; service and batch pass through; the engine places the copies there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from infra.config.model import Cluster, ExperimentSpec, JobType
from infra.config.specs import check_spec_set, parse_spec
from infra.placement import (
    Allocation,
    Condition,
    NodeCondition,
    expand_system_jobs,
    plan,
)
from infra.placement.jobs import copy_id
from tests.builders import cluster, node


def spec(c: Cluster, eid: str, **kw: Any) -> ExperimentSpec:
    data: dict[str, Any] = {"experiment_id": eid, "command": "true", "ram_gb": 1.0}
    data.update(kw)
    return parse_spec(data, Path(f"{eid}.json"), c)


def lab() -> Cluster:
    return cluster(node("jetson", type="jetson_orin", gpu=True, ram_gb=64, tags=["cuda", "arm64"]),
                   node("rpi1", type="raspberry_pi", ram_gb=8, tags=["arm64"]),
                   node("rpi2", type="raspberry_pi", ram_gb=8, tags=["arm64"], enabled=False),
                   node("host", ram_gb=32, tags=["x86_64"]))


@pytest.mark.parametrize("job_type", ["system", "sysbatch"])
def test_system_jobs_get_one_copy_per_eligible_node(job_type: str) -> None:
    c = lab()
    mon = spec(c, "mon", job_type=job_type)
    exp = expand_system_jobs(c, [mon],
                             {"host": NodeCondition(Condition.DRAINING, "kernel update")})
    assert [s.experiment_id for s in exp.specs] == ["mon@jetson", "mon@rpi1"]
    assert dict(exp.pins) == {"mon@jetson": "jetson", "mon@rpi1": "rpi1"}
    assert all(s.template_id == "mon" and s.job_type is JobType(job_type) for s in exp.specs)
    assert dict(exp.skipped) == {"mon": (("rpi2", "disabled in the cluster config"),
                                         ("host", "draining: kernel update"))}
    assert exp.copies_of("mon") == ("mon@jetson", "mon@rpi1")


@pytest.mark.parametrize("job_type", ["service", "batch"])
def test_service_and_batch_pass_through(job_type: str) -> None:
    c = lab()
    s = spec(c, "api", job_type=job_type)
    exp = expand_system_jobs(c, [s])
    assert exp.specs == (s,) and not exp.pins and not exp.skipped


def test_default_job_type_is_batch() -> None:
    assert spec(lab(), "x").job_type is JobType.BATCH


@pytest.mark.parametrize(("spec_kw", "copies"), [
    ({"constraints": ["arm64"]}, ["jetson", "rpi1"]),
    ({"resources": {"gpu_count": 1}}, ["jetson"]),
    ({"ram_gb": 16}, ["jetson", "host"]),
    ({"constraints": [{"attribute": "arch", "value": "aarch64"}]}, ["jetson", "rpi1"]),
])
def test_eligibility_uses_the_hard_checks(spec_kw: dict[str, Any], copies: list[str]) -> None:
    c = lab()
    exp = expand_system_jobs(c, [spec(c, "d", job_type="system", **spec_kw)])
    assert sorted(exp.pins[s.experiment_id] for s in exp.specs) == sorted(copies)


def test_ineligible_node_is_skipped() -> None:
    c = cluster(node("a"), node("b", scheduling_eligible=False))
    exp = expand_system_jobs(c, [spec(c, "d", job_type="sysbatch")])
    assert exp.copies_of("d") == ("d@a",)
    assert exp.skipped["d"] == (("b", "not eligible for scheduling (scheduling_eligible: false)"),)


def test_other_runs_count_when_choosing_nodes() -> None:
    c = cluster(node("a"), node("b"))
    old = spec(c, "old", resources={"ports": [{"label": "p", "port": 9100}]})
    held = Allocation(instance_id="old", node="a", ports=(("p", 9100),), run_id="r-3")
    d = spec(c, "exporter", job_type="system", resources={"ports": [{"label": "m", "port": 9100}]})
    exp = expand_system_jobs(c, [d], occupied=[(old, "a", held)])
    assert exp.copies_of("exporter") == ("exporter@b",)
    assert exp.skipped["exporter"] == (("a", "port 9100 held by old (run r-3)"),)


def test_system_job_eligible_nowhere_has_no_copy_and_says_why() -> None:
    c = cluster(node("a"))
    exp = expand_system_jobs(c, [spec(c, "g", job_type="system", resources={"gpus": 1})])
    assert exp.specs == () and exp.skipped == {"g": (("a", "has no GPU"),)}


def test_copies_are_placed_on_their_nodes_next_to_other_work() -> None:
    c = lab()
    specs = check_spec_set([spec(c, "mon", job_type="system", ram_gb=0.5),
                            spec(c, "train", ram_gb=8, gpu_required=True),
                            spec(c, "web")])
    exp = expand_system_jobs(c, specs)
    result = plan(c, exp.specs, pins=exp.pins)
    assert result.ok
    where = result.as_dict()
    assert {k: v for k, v in where.items() if k.startswith("mon@")} == {
        "mon@jetson": "jetson", "mon@rpi1": "rpi1", "mon@host": "host"}
    assert where["train"] == "jetson"
    assert all(p.pinned for p in result.placements if p.instance_id.startswith("mon@"))


def test_anti_affinity_to_a_system_job_names_every_copy() -> None:
    c = cluster(node("a"), node("b"), node("c", enabled=False))
    specs = check_spec_set([spec(c, "agent", job_type="system"),
                            spec(c, "loner", anti_affinity=["agent"]),
                            spec(c, "friend", affinity=["agent"])])
    exp = expand_system_jobs(c, specs)
    by_id = {s.experiment_id: s for s in exp.specs}
    assert by_id["loner"].anti_affinity == ("agent@a", "agent@b")
    assert by_id["friend"].affinity == ("agent@a", "agent@b")
    result = plan(c, exp.specs, pins=exp.pins)
    assert "loner" in result.unplaced  # an agent runs on every node
    assert result.node_of("friend") in ("a", "b")


def test_copy_ids_are_safe_ids() -> None:
    from infra.config.reader import check_safe_id
    assert copy_id("mon", "rpi1") == "mon@rpi1"
    assert check_safe_id(copy_id("mon", "rpi1")) is None


def test_copies_keep_their_resources_and_each_gets_its_own_device() -> None:
    c = cluster(node("g1", gpu=True, gpu_memory_gb=8), node("g2", gpu=True, gpu_memory_gb=8))
    exp = expand_system_jobs(c, [spec(c, "probe", job_type="sysbatch",
                                      resources={"gpu_count": 1})])
    result = plan(c, exp.specs, pins=exp.pins)
    allocs = {p.instance_id: p.allocation for p in result.placements}
    assert {k: (a.node, a.device_ids) for k, a in allocs.items() if a} == {
        "probe@g1": ("g1", ("gpu0",)), "probe@g2": ("g2", ("gpu0",))}
