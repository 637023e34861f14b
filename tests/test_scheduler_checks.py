"""Every feasibility checker and constraint operator, table-driven; device and port
allocation without double-booking (within a plan and against other runs); why-not text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.cli.main import main
from infra.config.model import AttrValue, Constraint, Operator
from infra.placement import Allocation, Condition, NodeCondition, Snapshot, plan, why_not
from infra.placement.checks import (
    DEFAULT_CHECKS,
    constraints_met,
    devices_available,
    disk_fits,
    distinct_hosts,
    node_eligible,
    node_healthy,
    ports_free,
    runtime_driver_available,
    volumes_available,
)
from infra.placement.constraints import holds, rejection, version_matches
from infra.probe.facts import GpuInfo, NodeFacts
from tests.builders import cluster, node, spec


def reasons(result: Any, instance: str) -> dict[str, str | None]:
    return {e.node: e.rejection for e in result.evaluations[instance]}


GPU2 = {"gpu": True, "gpu_memory_gb": 32,
        "devices": [{"id": "gpu0", "vendor": "nvidia", "driver": "cuda", "memory_mb": 24576,
                     "capabilities": ["fp16", "bf16"], "index": 0},
                    {"id": "gpu1", "vendor": "nvidia", "driver": "cuda", "memory_mb": 8192,
                     "capabilities": ["fp16"], "index": 1}]}


# ---------------------------------------------------------------- single checkers

@pytest.mark.parametrize(("node_kw", "spec_kw", "check", "reason"), [
    # scheduling_eligible
    ({"scheduling_eligible": False}, {}, node_eligible,
     "not eligible for scheduling (scheduling_eligible: false)"),
    ({}, {}, node_eligible, None),
    # disk
    ({"disk_gb": 10}, {"resources": {"disk_gb": 12}}, disk_fits,
     "not enough disk: needs 12 GB, 10 GB free of 10 GB"),
    ({"disk_gb": 10}, {"resources": {"disk_mb": 10240}}, disk_fits, None),
    ({}, {"resources": {"disk_gb": 999}}, disk_fits, None),  # disk unknown: not checked
    # runtime driver
    ({}, {"resources": {"runtime_driver": "host_local"}}, runtime_driver_available, None),
    ({}, {"resources": {"runtime_driver": "openshell"}}, runtime_driver_available,
     "runtime driver openshell not available (has host_local)"),
    ({"runtime_drivers": ["openshell", "host_local"]}, {"resources": {"runtime_driver": "openshell"}},
     runtime_driver_available, None),
    # volumes
    ({"host_paths": ["/mnt/models"]},
     {"resources": {"volumes": [{"name": "m", "source": "/mnt/models"}]}}, volumes_available, None),
    ({"host_paths": ["/data"]}, {"resources": {"volumes": [{"name": "m", "source": "/data/m"}]}},
     volumes_available, None),
    ({"host_paths": ["/data"]}, {"resources": {"volumes": [{"name": "m", "source": "/mnt/m"}]}},
     volumes_available, "volume m: no host path /mnt/m (advertises /data)"),
    ({}, {"resources": {"volumes": [{"name": "m", "source": "/mnt/m"}]}}, volumes_available,
     "volume m: no host path /mnt/m (advertises none)"),
    # devices
    ({}, {"resources": {"devices": [{"kind": "tpu"}]}}, devices_available,
     "needs a tpu device: this node has none"),
    (GPU2, {"resources": {"devices": [{"driver": "metal"}]}}, devices_available,
     "needs a GPU with driver metal: none matches here (gpu0: nvidia cuda 24576 MB; "
     "gpu1: nvidia cuda 8192 MB)"),
    (GPU2, {"resources": {"devices": [{"min_memory_mb": 16000, "count": 2}]}}, devices_available,
     "needs 2 GPUs with >= 16000 MB: only 1 matches here"),
    (GPU2, {"resources": {"devices": [{"capabilities": ["bf16"]}]}}, devices_available, None),
    (GPU2, {"resources": {"devices": [{"capabilities": ["fp8"]}]}}, devices_available,
     "needs a GPU with capabilities fp8: none matches"),
    (GPU2, {"resources": {"devices": [{"ids": ["gpu7"]}]}}, devices_available,
     "needs a GPU with id in gpu7: none matches"),
    (GPU2, {"resources": {"devices": [{"vendor": "amd"}]}}, devices_available,
     "needs a GPU with vendor amd: none matches"),
    (GPU2, {"resources": {"gpu_count": 2}}, devices_available, None),
    (GPU2, {"resources": {"gpu_count": 3}}, devices_available, "needs 3 GPUs: only 2 matches"),
    (GPU2, {"resources": {"devices": [{"min_memory_mb": 16000}, {"min_memory_mb": 16000}]}},
     devices_available,
     "needs a GPU with >= 16000 MB: its other device requests take the matching ones"),
    # ports (own node ports)
    ({"ssh_port": 2222}, {"resources": {"ports": [{"label": "a", "port": 2222}]}}, ports_free,
     "port 2222 is the node's SSH port"),
    ({"host": "localhost", "ssh_port": 2222},
     {"resources": {"ports": [{"label": "a", "port": 2222}]}}, ports_free, None),
    ({"monitor_port": 9100}, {"resources": {"ports": [{"label": "m", "port": 9100}]}}, ports_free,
     "port 9100 is the node's monitor_port"),
    ({}, {"resources": {"ports": [{"label": "a", "port": 8088}]}}, ports_free, None),
])
def test_checker(node_kw: dict[str, Any], spec_kw: dict[str, Any], check: Any,
                 reason: str | None) -> None:
    c = cluster(node("n", **node_kw))
    s = spec(c, **spec_kw)
    got = check(Snapshot.build(c, [s]), c.nodes[0], s)
    if reason is None:
        assert got is None
    else:
        assert got is not None and got.startswith(reason), got


@pytest.mark.parametrize("condition", [Condition.MAINTENANCE, Condition.DRAINING,
                                       Condition.DISCONNECTED, Condition.OFFLINE,
                                       Condition.QUARANTINED, Condition.DEGRADED,
                                       Condition.UNAVAILABLE])
def test_node_states_never_receive_new_work(condition: Condition) -> None:
    c = cluster(node("host"), node("other", ram_gb=4))
    s = spec(c, preferred_node="host")
    conds = {"host": NodeCondition(condition, "GPU driver update")}
    snap = Snapshot.build(c, [s], conds)
    assert node_healthy(snap, c.nodes[0], s) == f"{condition.value}: GPU driver update"
    assert not condition.schedulable
    assert plan(c, [s], conditions=conds).as_dict() == {"x": "other"}
    bare = Snapshot.build(c, [s], {"host": NodeCondition(condition)})
    assert node_healthy(bare, c.nodes[0], s) == condition.value


@pytest.mark.parametrize("condition", [Condition.HEALTHY, Condition.UNKNOWN])
def test_healthy_and_unprobed_nodes_take_work(condition: Condition) -> None:
    assert condition.schedulable


def test_ineligible_node_gets_nothing_even_when_pinned() -> None:
    c = cluster(node("cordoned", scheduling_eligible=False), node("ok"))
    s = spec(c)
    assert plan(c, [s]).as_dict() == {"x": "ok"}
    assert plan(c, [s], pins={"x": "cordoned"}).pin_errors == {
        "x": "cordoned not eligible for scheduling (scheduling_eligible: false)"}


def test_disk_is_used_up_by_earlier_placements() -> None:
    c = cluster(node("n", disk_gb=10))
    a, b = spec(c, "a", resources={"disk_gb": 6}), spec(c, "b", resources={"disk_gb": 6})
    result = plan(c, [a, b])
    assert result.as_dict() == {"a": "n"}
    assert reasons(result, "b")["n"] == "not enough disk: needs 6 GB, 4 GB free of 10 GB"


def test_probed_free_disk_is_used_when_none_is_declared() -> None:
    c = cluster(node("n"))
    f = NodeFacts(node="n", hostname="n", arch="x86_64", os="Linux", kernel="6", python="3",
                  cpu_present=8, cpu_online=8, cpu_usable=8, load=(0, 0, 0), mem_total_gb=16,
                  mem_available_gb=15, nvmap_used_gb=None, swap_total_gb=None, disk_path="/",
                  disk_total_gb=100, disk_free_gb=3)
    s = spec(c, resources={"disk_gb": 5})
    assert plan(c, [s]).as_dict() == {"x": "n"}  # dry run: disk unknown
    assert reasons(plan(c, [s], facts={"n": f}), "x")["n"].startswith("not enough disk")


# ---------------------------------------------------------------- constraint operators

ATTRS: dict[str, AttrValue] = {
    "name": "jetson", "arch": "aarch64", "ram_gb": 64.0, "cpu_cores": 12, "gpu": True,
    "kernel": "5.15.136-tegra", "tags": frozenset({"cuda", "arm64"}), "rack": "a10",
    "features": frozenset({"fp16", "int8"}), "cuda": "12.2",
}


@pytest.mark.parametrize(("attribute", "op", "value", "ok"), [
    ("arch", "=", "aarch64", True), ("arch", "=", "x86_64", False),
    ("ram_gb", "=", "64", True), ("gpu", "=", "true", True), ("gpu", "=", "false", False),
    ("missing", "=", "x", False),
    ("arch", "!=", "x86_64", True), ("arch", "!=", "aarch64", False),
    ("missing", "!=", "x", True),  # Nomad: != holds for a missing attribute
    ("ram_gb", "<", "128", True), ("ram_gb", "<", "64", False), ("ram_gb", "<=", "64", True),
    ("cpu_cores", ">", "8", True), ("cpu_cores", ">", "12", False), ("cpu_cores", ">=", "12", True),
    ("rack", ">", "a09", True), ("rack", "<", "a09", False),  # text comparison
    ("ram_gb", "<", "10", False), ("missing", ">", "1", False),
    ("kernel", "regexp", "tegra$", True), ("kernel", "regexp", "^6\\.", False),
    ("name", "regexp", "^jet", True), ("missing", "regexp", ".*", False),
    ("kernel", "version", ">= 5.10, < 6", True), ("kernel", "version", ">= 6.0", False),
    ("cuda", "version", "~> 12.0", True), ("cuda", "version", "~> 11.4", False),
    ("cuda", "version", "= 12.2", True), ("cuda", "version", "!= 12.2", False),
    ("missing", "version", ">= 1", False),
    ("tags", "set_contains", "cuda", True), ("tags", "set_contains", "cuda,arm64", True),
    ("tags", "set_contains", "cuda,x86", False), ("features", "set_contains", "fp16", True),
    ("tags", "set_contains_any", "x86,cuda", True), ("tags", "set_contains_any", "x86,rpi", False),
    ("rack", "set_contains", "a10", True),  # a scalar reads as a one-item set
    ("rack", "is_set", None, True), ("missing", "is_set", None, False),
    ("missing", "is_not_set", None, True), ("rack", "is_not_set", None, False),
    ("${attr.cpu.arch}", "=", "aarch64", True), ("${meta.rack}", "=", "a10", True),
    ("node.name", "=", "jetson", True), ("attributes.rack", "=", "a10", True),
])
def test_constraint_operators(attribute: str, op: str, value: str | None, ok: bool) -> None:
    c = Constraint(attribute, Operator(op), value)
    assert holds(c, ATTRS) is ok
    assert (rejection(c, ATTRS) is None) is ok


@pytest.mark.parametrize(("have", "spec_", "ok"), [
    ("1.2.3", ">= 1.2", True), ("1.2.3", "> 1.2.3", False), ("v2.0", ">= 1, < 3", True),
    ("1.10", "> 1.9", True), ("2.0", "~> 1.2", False), ("1.9", "~> 1.2", True),
    ("1.2.9", "~> 1.2.3", True), ("1.3.0", "~> 1.2.3", False), ("abc", ">= 1", False),
])
def test_version_matching(have: str, spec_: str, ok: bool) -> None:
    assert version_matches(have, spec_) is ok


@pytest.mark.parametrize(("constraints", "reason"), [
    (["cuda"], None),
    (["cuda", "arm64"], None),  # subset rule: every listed tag must be advertised
    (["cuda", "x86"], "needs tag x86 (tags: arm64, cuda)"),
    ([{"attribute": "arch", "value": "x86_64"}],
     "constraint arch = x86_64 not met (arch is aarch64)"),
    ([{"attribute": "rack", "operator": "is_set"}], "constraint rack is_set: rack is not set"),
    ([{"attribute": "${attr.kernel.version}", "operator": "version", "value": ">= 6"}],
     "constraint ${attr.kernel.version} version >= 6: kernel is not set"),
])
def test_spec_constraint_reasons(constraints: list[Any], reason: str | None) -> None:
    c = cluster(node("jetson", type="jetson_orin", gpu=True, tags=["cuda", "arm64"]))
    s = spec(c, constraints=constraints)
    assert constraints_met(Snapshot.build(c, [s]), c.nodes[0], s) == reason


def test_tag_reason_on_a_node_without_tags() -> None:
    c = cluster(node("rpi1"))
    s = spec(c, constraints=["cuda"])
    assert constraints_met(Snapshot.build(c, [s]), c.nodes[0], s) == "needs tag cuda (no tags)"


def test_global_constraints_apply_to_every_instance() -> None:
    c = cluster(node("a", tags=["lab"]), node("b"),
                placement={"constraints": ["lab", {"attribute": "cpu_cores", "operator": ">=",
                                                    "value": 4}]})
    result = plan(c, [spec(c, "x", preferred_node="b")])
    assert result.as_dict() == {"x": "a"}
    assert reasons(result, "x")["b"] == "needs tag lab (no tags)"
    c2 = cluster(node("a", cpu_cores=2),
                 placement={"constraints": [{"attribute": "cpu_cores", "operator": ">=",
                                             "value": 4}]})
    assert reasons(plan(c2, [spec(c2)]), "x")["a"] == \
        "placement constraint cpu_cores >= 4 not met (cpu_cores is 2)"


def test_constraints_see_probed_arch() -> None:
    c = cluster(node("h"), node("p", type="raspberry_pi"))
    s = spec(c, constraints=[{"attribute": "arch", "value": "x86_64"}])
    assert plan(c, [s]).unplaced == ("x",)  # dry run: h's arch unknown, p is aarch64
    f = NodeFacts(node="h", hostname="h", arch="x86_64", os="Linux", kernel="6", python="3",
                  cpu_present=8, cpu_online=8, cpu_usable=8, load=(0, 0, 0), mem_total_gb=16,
                  mem_available_gb=15, nvmap_used_gb=None, swap_total_gb=None, disk_path=None,
                  disk_total_gb=None, disk_free_gb=None)
    result = plan(c, [s], facts={"h": f})
    assert result.as_dict() == {"x": "h"}
    assert reasons(result, "x")["p"] == "constraint arch = x86_64 not met (arch is aarch64)"


def test_distinct_hosts_per_spec_and_global() -> None:
    c = cluster(node("a", ram_gb=64), node("b", ram_gb=64))
    dh = [{"operator": "distinct_hosts"}]
    x, y, z = (spec(c, i, constraints=dh) for i in "xyz")
    result = plan(c, [x, y, z])
    assert sorted(result.as_dict().values()) == ["a", "b"]
    (left,) = result.unplaced
    assert all(r is not None and r.startswith("distinct_hosts: ") for r in reasons(result, left).values())
    # an instance without distinct_hosts may share a node with them
    free = spec(c, "w")
    assert len(plan(c, [x, y, free]).placements) == 3
    # global distinct_hosts, with one spec opting out
    g = cluster(node("a", ram_gb=64), node("b", ram_gb=64),
                placement={"constraints": [{"operator": "distinct_hosts"}]})
    specs = [spec(g, "p"), spec(g, "q"), spec(g, "r", constraints=[
        {"operator": "distinct_hosts", "value": False}])]
    assert len(plan(g, specs).placements) == 3
    assert len(plan(g, [*specs[:2], spec(g, "s")]).placements) == 2


def test_distinct_hosts_ignores_other_runs() -> None:
    c = cluster(node("a"))
    dh = [{"operator": "distinct_hosts"}]
    other = spec(c, "old", constraints=dh)
    assert plan(c, [spec(c, "x", constraints=dh)], occupied=[(other, "a")]).as_dict() == {"x": "a"}
    snap = Snapshot.build(c, [other]).with_placement(other, c.nodes[0])
    assert distinct_hosts(snap, c.nodes[0], spec(c, "x", constraints=dh)) == \
        "distinct_hosts: old is already there"


# ---------------------------------------------------------------- devices: no double-booking

def test_devices_are_allocated_by_id_without_double_booking() -> None:
    c = cluster(node("g", ram_gb=64, **GPU2))
    specs = [spec(c, f"s{i}", resources={"gpu_count": 1}) for i in range(3)]
    result = plan(c, specs)
    assert result.as_dict() == {"s0": "g", "s1": "g"}
    allocs = {p.instance_id: p.allocation for p in result.placements}
    assert allocs["s0"] is not None and allocs["s1"] is not None
    assert (allocs["s0"].device_ids, allocs["s1"].device_ids) == (("gpu0",), ("gpu1",))
    assert (allocs["s0"].gpu_ids, allocs["s1"].gpu_ids) == (("0",), ("1",))
    assert reasons(result, "s2")["g"] == "needs a GPU: gpu0 held by s0, gpu1 held by s1"


def test_requested_ids_are_honoured_in_order() -> None:
    c = cluster(node("g", **GPU2))
    s = spec(c, resources={"devices": [{"ids": ["gpu1", "gpu0"], "count": 1}]})
    (p,) = plan(c, [s]).placements
    assert p.allocation is not None and p.allocation.device_ids == ("gpu1",)


def test_filters_pick_the_matching_device() -> None:
    c = cluster(node("g", **GPU2))
    big = spec(c, "big", resources={"devices": [{"min_memory_mb": 16000}]})
    small = spec(c, "small", resources={"devices": [{"kind": "gpu"}]})
    allocs = {p.instance_id: p.allocation for p in plan(c, [big, small]).placements}
    assert allocs["big"] is not None and allocs["big"].device_ids == ("gpu0",)
    assert allocs["small"] is not None and allocs["small"].device_ids == ("gpu1",)


def test_devices_held_by_another_run_are_not_handed_out() -> None:
    c = cluster(node("g", ram_gb=64, **GPU2))
    old = spec(c, "old", resources={"gpu_count": 1})
    held = Allocation(instance_id="old", node="g", device_ids=("gpu0",), run_id="r-12")
    new = spec(c, "new", resources={"devices": [{"min_memory_mb": 16000}]})
    result = plan(c, [new], occupied=[(old, "g", held)])
    assert result.unplaced == ("new",)
    assert reasons(result, "new")["g"] == \
        "needs a GPU with >= 16000 MB: gpu0 held by old (run r-12)"
    anyone = spec(c, "any", resources={"gpu_count": 1})
    (p,) = plan(c, [anyone], occupied=[(old, "g", held)]).placements
    assert p.allocation is not None and p.allocation.device_ids == ("gpu1",)


def test_two_tuple_occupied_still_holds_its_devices_and_ports() -> None:
    c = cluster(node("g", ram_gb=64, **GPU2))
    old = spec(c, "old", resources={"gpu_count": 2, "ports": [{"label": "api", "port": 8088}]})
    new = spec(c, "new", resources={"gpu_count": 1})
    assert plan(c, [new], occupied=[(old, "g")]).unplaced == ("new",)
    web = spec(c, "web", resources={"ports": [{"label": "http", "port": 8088}]})
    assert reasons(plan(c, [web], occupied=[(old, "g")]), "web")["g"] == \
        "port 8088 held by old"


def test_flat_gpu_required_jobs_share_the_gpu() -> None:
    c = cluster(node("g", ram_gb=64, **GPU2))
    specs = [spec(c, f"s{i}", gpu_required=True, gpu_memory_gb=1) for i in range(4)]
    result = plan(c, specs)
    assert len(result.placements) == 4
    assert all(p.allocation is not None and p.allocation.device_ids == ()
               for p in result.placements)


# ---------------------------------------------------------------- ports

def test_port_conflicts_within_a_plan_and_across_runs() -> None:
    c = cluster(node("jetson", ram_gb=64), node("rpi1", ram_gb=8))
    a = spec(c, "a", resources={"ports": [{"label": "api", "port": 8088}]}, preferred_node="jetson")
    b = spec(c, "b", resources={"ports": [{"label": "api", "port": 8088}]})
    result = plan(c, [a, b])
    assert result.as_dict() == {"a": "jetson", "b": "rpi1"}
    assert reasons(result, "b")["jetson"] == "port 8088 held by a"
    old = spec(c, "srv", resources={"ports": [{"label": "api", "port": 8088}]})
    held = Allocation(instance_id="srv", node="jetson", ports=(("api", 8088),)).with_run("r-12")
    result = plan(c, [b], occupied=[(old, "jetson", held)])
    assert result.as_dict() == {"b": "rpi1"}
    assert reasons(result, "b")["jetson"] == "port 8088 held by srv (run r-12)"


def test_allocation_records_ports_volumes_driver_and_amounts() -> None:
    c = cluster(node("n", host_paths=["/mnt"]))
    s = spec(c, resources={"cpu_cores": 2, "memory_mb": 2048, "disk_mb": 512,
                           "ports": [{"label": "api", "port": 8088}, {"label": "m", "port": 9100}],
                           "volumes": [{"name": "models", "source": "/mnt/models",
                                        "target": "/models"}],
                           "runtime_driver": "host_local"})
    (p,) = plan(c, [s]).placements
    a = p.allocation
    assert a is not None
    assert (a.instance_id, a.node, a.ports, a.runtime_driver) == (
        "x", "n", (("api", 8088), ("m", 9100)), "host_local")
    assert [(v.name, v.source, v.target, v.mode) for v in a.volumes] == [
        ("models", "/mnt/models", "/models", "ro")]
    assert (a.cpu_cores, a.memory_mb, a.disk_mb) == (2.0, 2048.0, 512.0)


def test_forced_pin_records_what_it_overrode_and_its_allocation() -> None:
    c = cluster(node("n", ram_gb=64, **GPU2))
    old = spec(c, "old", resources={"gpu_count": 2})
    s = spec(c, resources={"gpu_count": 1, "ports": [{"label": "a", "port": 80}]})
    result = plan(c, [s], pins={"x": "n"}, force=True, occupied=[(old, "n")])
    (p,) = result.placements
    assert p.forced == ("needs a GPU: gpu0 held by old, gpu1 held by old",)
    assert p.allocation is not None and p.allocation.ports == (("a", 80),)
    assert p.allocation.device_ids == ()


def test_probe_detected_gpus_are_allocated_by_their_ids() -> None:
    c = cluster(node("g", gpu=True, gpu_memory_gb=48))
    f = NodeFacts(node="g", hostname="g", arch="x86_64", os="Linux", kernel="6", python="3",
                  cpu_present=8, cpu_online=8, cpu_usable=8, load=(0, 0, 0), mem_total_gb=16,
                  mem_available_gb=15, nvmap_used_gb=None, swap_total_gb=None, disk_path=None,
                  disk_total_gb=None, disk_free_gb=None,
                  gpus=(GpuInfo(0, "A", "nvidia", memory_total_mb=24000, compute_cap="8.6"),
                        GpuInfo(1, "B", "nvidia", memory_total_mb=24000, compute_cap="8.6")))
    s = spec(c, resources={"devices": [{"count": 2, "capabilities": ["bf16"]}]})
    (p,) = plan(c, [s], facts={"g": f}).placements
    assert p.allocation is not None
    assert (p.allocation.device_ids, p.allocation.gpu_ids) == (("gpu0", "gpu1"), ("0", "1"))
    # without the probe the node is one generic GPU without capabilities
    assert plan(c, [s]).unplaced == ("x",)


# ---------------------------------------------------------------- why not

def test_why_not_reads_one_reason_per_node() -> None:
    c = cluster(node("rpi1", ram_gb=8), node("jetson", type="jetson_orin", gpu=True, ram_gb=64),
                node("host", gpu=True, gpu_memory_gb=8))
    srv = spec(c, "srv", resources={"ports": [{"label": "api", "port": 8088}]})
    held = Allocation(instance_id="srv", node="jetson", ports=(("api", 8088),), run_id="r-12")
    s = spec(c, "x", resources={"gpu_count": 1, "ports": [{"label": "api", "port": 8088}]})
    result = plan(c, [s], occupied=[(srv, "jetson", held)],
                  conditions={"host": NodeCondition(Condition.DRAINING, "GPU driver update")})
    assert why_not(result, "x") == ("rpi1: has no GPU; jetson: port 8088 held by srv (run r-12); "
                                    "host: draining: GPU driver update")


def test_every_default_check_has_a_name() -> None:
    names = [n for n, _ in DEFAULT_CHECKS]
    assert len(names) == len(set(names))
    assert {"eligible", "constraints", "runtime_driver", "volumes", "disk", "devices", "ports",
            "distinct_hosts"} <= set(names)


def test_why_not_through_the_cli_text_and_json(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(yaml.safe_dump({"nodes": [
        {"name": "rpi1", "host": "localhost", "ram_gb": 8, "remote_work_dir": "."},
        {"name": "jetson", "host": "localhost", "ram_gb": 64, "type": "jetson_orin", "gpu": True,
         "remote_work_dir": ".", "scheduling_eligible": False},
    ]}))
    sp = tmp_path / "a.json"
    sp.write_text(json.dumps({"command": "true", "resources": {"gpu_count": 1}}))
    base = ["--cluster-config", str(cfg), "--config", str(sp), "--auto-place", "--dry-run"]
    code = main(base)
    _, err = capsys.readouterr()
    assert code == 3
    assert err.strip() == ("error: cannot place a (rpi1: has no GPU; jetson: not eligible for "
                           "scheduling (scheduling_eligible: false))")
    code = main([*base, "--json"])
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc["instances"]["a"]["nodes"]["rpi1"] == {"feasible": False, "reason": "has no GPU"}
    assert doc["instances"]["a"]["error"].startswith("cannot place: rpi1: has no GPU; jetson: ")
    assert doc["unplaced"] == ["a"]


def test_plan_json_has_allocation_per_instance(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(yaml.safe_dump({"nodes": [
        {"name": "g", "host": "localhost", "ram_gb": 64, "gpu": True, "gpu_memory_gb": 16,
         "remote_work_dir": ".", "host_paths": ["/mnt"]}]}))
    sp = tmp_path / "a.json"
    sp.write_text(json.dumps({"command": "true", "resources": {
        "gpus": 1, "ports": [{"label": "api", "port": 8088}],
        "volumes": [{"name": "m", "source": "/mnt/m", "target": "/m"}]}}))
    code = main(["--cluster-config", str(cfg), "--config", str(sp), "--auto-place", "--dry-run",
                 "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    alloc = json.loads(out)["instances"]["a"]["allocation"]
    assert Allocation.from_json(alloc) == Allocation(
        instance_id="a", node="g", device_ids=("gpu0",), gpu_ids=("0",), ports=(("api", 8088),),
        volumes=(Allocation.from_json({"instance_id": "a", "node": "g", "volumes": [
            {"name": "m", "source": "/mnt/m", "target": "/m", "mode": "ro"}]}).volumes),
        memory_mb=1024.0)
