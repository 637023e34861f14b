"""Resource requests, node inventory and allocations: parsing, units, validation through the
CLI (one-line error, exit 2), inventory merged with probe facts, JSON round trips, env hints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.config.model import (
    Constraint,
    DeviceRequest,
    JobType,
    NodeDevice,
    Operator,
    PortProtocol,
    ResourceRequest,
    VolumeMode,
)
from infra.placement import Allocation, VolumeAllocation, allocation_env, node_inventory
from infra.probe.facts import GpuInfo, JetsonInfo, NodeFacts
from tests.builders import assert_one_line_error, cluster, node, run_cli, spec

# ---------------------------------------------------------------- helpers







def good_node(name: str = "n1", **kw: Any) -> dict[str, Any]:
    n: dict[str, Any] = {"name": name, "host": "localhost", "ram_gb": 8.0, "max_instances": 2,
                         "remote_work_dir": "."}
    n.update(kw)
    return n


# ---------------------------------------------------------------- forms and units

@pytest.mark.parametrize(("resources", "cpu"), [
    ({"cpu_cores": 2}, 2.0), ({"cores": 1.5}, 1.5), ({"cpu": 4}, 4.0),
    ({"cpu_millis": 500}, 0.5), ({"cpu_mcores": 2500}, 2.5), ({}, 0.0),
])
def test_cpu_forms(resources: dict[str, Any], cpu: float) -> None:
    c = cluster(node("n"))
    assert spec(c, resources=resources).cpu_cores == cpu


@pytest.mark.parametrize(("resources", "ram_gb"), [
    ({"memory_mb": 8192}, 8.0), ({"memory": 512}, 0.5), ({"memory_gb": 3}, 3.0), ({}, 1.0),
])
def test_memory_forms_map_to_ram_gb(resources: dict[str, Any], ram_gb: float) -> None:
    c = cluster(node("n"))
    assert spec(c, resources=resources).ram_gb == ram_gb


@pytest.mark.parametrize(("resources", "disk_gb"), [
    ({"disk_mb": 20480}, 20.0), ({"disk": 1024}, 1.0), ({"disk_gb": 7.5}, 7.5), ({}, 0.0),
])
def test_disk_forms(resources: dict[str, Any], disk_gb: float) -> None:
    c = cluster(node("n"))
    assert spec(c, resources=resources).resources.disk_gb == disk_gb


@pytest.mark.parametrize("key", ["gpu_count", "gpus", "gpu"])
def test_legacy_gpu_count_is_a_generic_gpu_device(key: str) -> None:
    c = cluster(node("n"))
    s = spec(c, resources={key: 2})
    assert s.gpu_required
    assert s.resources.devices == (DeviceRequest(kind="gpu", count=2),)


def test_zero_gpu_count_requests_nothing() -> None:
    c = cluster(node("n"))
    s = spec(c, resources={"gpu_count": 0})
    assert not s.gpu_required and s.resources.devices == ()


def test_full_reference_shape() -> None:
    c = cluster(node("n"))
    s = spec(c, resources={
        "cpu_cores": 2, "memory_mb": 8192, "disk_mb": 20480,
        "devices": [{"kind": "gpu", "driver": "cuda", "vendor": "NVIDIA", "min_memory_mb": 16000,
                     "capabilities": ["fp16"], "count": 1}],
        "ports": [{"label": "api", "port": 8088, "protocol": "http"}],
        "volumes": [{"name": "models", "source": "/mnt/models/", "target": "/models",
                     "mode": "ro", "type": "host"}],
        "runtime_driver": "host_local",
    })
    assert (s.cpu_cores, s.ram_gb, s.gpu_required) == (2.0, 8.0, True)
    r = s.resources
    assert r.disk_gb == 20.0
    assert r.devices == (DeviceRequest("gpu", 1, "nvidia", "cuda", 16000.0,
                                       frozenset({"fp16"})),)
    assert [(p.label, p.port, p.protocol) for p in r.ports] == [("api", 8088, PortProtocol.HTTP)]
    (v,) = r.volumes
    assert (v.name, v.source, v.target, v.mode, v.type) == (
        "models", "/mnt/models", "/models", VolumeMode.RO, "host")
    assert r.runtime_driver == "host_local"


def test_device_type_is_kind_and_ids_set_the_count() -> None:
    c = cluster(node("n"))
    (d,) = spec(c, resources={"devices": [{"type": "tpu", "ids": ["t1", "t0"]}]}).resources.devices
    assert (d.kind, d.count, d.ids) == ("tpu", 2, ("t1", "t0"))


def test_defaults_port_tcp_volume_ro_target_is_source() -> None:
    c = cluster(node("n"))
    r = spec(c, resources={"ports": [{"label": "m", "port": 9100}],
                           "volumes": [{"name": "cache", "source": "/var/cache"}]}).resources
    assert r.ports[0].protocol is PortProtocol.TCP
    assert (r.volumes[0].target, r.volumes[0].mode) == ("/var/cache", VolumeMode.RO)


@pytest.mark.parametrize(("flat", "resources", "field", "value"), [
    ({"ram_gb": 8}, {"memory_mb": 8192}, "ram_gb", 8.0),      # same amount twice: fine
    ({"cpu_cores": 2}, {"cpu_millis": 2000}, "cpu_cores", 2.0),
    ({"gpu_required": True}, {"gpu_count": 1}, "gpu_required", True),
    ({"gpu_required": True}, {}, "gpu_required", True),       # flat only: shared GPU, no device
])
def test_flat_keys_and_resources_agree(flat: dict[str, Any], resources: dict[str, Any],
                                       field: str, value: object) -> None:
    c = cluster(node("n"))
    assert getattr(spec(c, resources=resources, **flat), field) == value


def test_flat_gpu_required_allocates_no_device() -> None:
    c = cluster(node("n"))
    assert spec(c, gpu_required=True).resources.devices == ()


def test_job_type_and_constraints_parse() -> None:
    c = cluster(node("n"))
    s = spec(c, job_type="system", constraints=["cuda", {"attribute": "arch", "value": "aarch64"},
                                                {"operator": "distinct_hosts"}])
    assert s.job_type is JobType.SYSTEM
    assert s.constraints[0].tag == "cuda"
    assert s.constraints[1] == Constraint("arch", Operator.EQ, "aarch64")
    assert s.constraints[2].operator is Operator.DISTINCT_HOSTS
    assert spec(c).job_type is JobType.BATCH


# ---------------------------------------------------------------- validation through the CLI

SPEC_ERRORS = [
    # malformed devices / ports / volumes
    ({"resources": []}, "resources", "expected a mapping, got list"),
    ({"resources": {"devices": {"kind": "gpu"}}}, "resources.devices", "expected a list"),
    ({"resources": {"devices": ["gpu"]}}, "resources.devices[0]", "expected a mapping"),
    ({"resources": {"devices": [{"kind": "gpu", "colour": "red"}]}}, "resources.devices[0].colour",
     "unknown key"),
    ({"resources": {"devices": [{"kind": "gpu", "type": "tpu"}]}}, "resources.devices[0].type",
     "kind is 'gpu' but type is 'tpu'"),
    ({"resources": {"devices": [{"count": 0}]}}, "resources.devices[0].count", "at least 1"),
    ({"resources": {"devices": [{"count": -1}]}}, "resources.devices[0].count", "at least 1"),
    ({"resources": {"devices": [{"ids": ["a"], "count": 2}]}}, "resources.devices[0].count",
     "only 1 ids"),
    ({"resources": {"devices": [{"ids": ["a", "a"]}]}}, "resources.devices[0].ids", "twice"),
    ({"resources": {"devices": [{"capabilities": [1]}]}}, "resources.devices[0].capabilities[0]",
     "expected a non-empty string"),
    ({"resources": {"devices": [{"driver": 5}]}}, "resources.devices[0].driver",
     "expected a string"),
    ({"resources": {"ports": {"api": 80}}}, "resources.ports", "expected a list"),
    ({"resources": {"ports": [{"port": 80}]}}, "resources.ports[0].label", "required key"),
    ({"resources": {"ports": [{"label": "api"}]}}, "resources.ports[0].port", "required key"),
    ({"resources": {"volumes": [{"name": "v"}]}}, "resources.volumes[0].source", "required key"),
    ({"resources": {"volumes": [{"name": "v", "source": "/a", "size": 1}]}},
     "resources.volumes[0].size", "unknown key"),
    # negative values
    ({"resources": {"memory_mb": -1}}, "resources.memory_mb", "at least 0"),
    ({"resources": {"memory_mb": 0}}, "resources.memory_mb", "greater than 0"),
    ({"resources": {"cpu_cores": -2}}, "resources.cpu_cores", "at least 0"),
    ({"resources": {"cpu_millis": -5}}, "resources.cpu_millis", "at least 0"),
    ({"resources": {"cpu_millis": 1.5}}, "resources.cpu_millis", "expected an integer"),
    ({"resources": {"disk_mb": -5}}, "resources.disk_mb", "at least 0"),
    ({"resources": {"gpu_count": -1}}, "resources.gpu_count", "at least 0"),
    ({"resources": {"devices": [{"min_memory_mb": -1}]}}, "resources.devices[0].min_memory_mb",
     "at least 0"),
    ({"resources": {"memory_gb": "lots"}}, "resources.memory_gb", "expected a number"),
    # duplicates
    ({"resources": {"ports": [{"label": "api", "port": 80}, {"label": "api", "port": 81}]}},
     "resources.ports[1].label", "duplicate port label 'api' (also ports[0])"),
    ({"resources": {"ports": [{"label": "api-x", "port": 80}, {"label": "api_x", "port": 81}]}},
     "resources.ports[1].label", "duplicate port label"),
    ({"resources": {"ports": [{"label": "a", "port": 80}, {"label": "b", "port": 80}]}},
     "resources.ports[1].port", "port 80 is also ports[0]"),
    ({"resources": {"volumes": [{"name": "m", "source": "/a"}, {"name": "m", "source": "/b"}]}},
     "resources.volumes[1].name", "duplicate volume name 'm' (also volumes[0])"),
    # ports out of range
    ({"resources": {"ports": [{"label": "a", "port": 0}]}}, "resources.ports[0].port",
     "port must be in 1..65535, got 0"),
    ({"resources": {"ports": [{"label": "a", "port": 70000}]}}, "resources.ports[0].port",
     "port must be in 1..65535, got 70000"),
    ({"resources": {"ports": [{"label": "a", "port": "80"}]}}, "resources.ports[0].port",
     "expected a port number, got string"),
    ({"resources": {"ports": [{"label": "a b", "port": 80}]}}, "resources.ports[0].label",
     "not a valid label"),
    # relative volume paths
    ({"resources": {"volumes": [{"name": "m", "source": "models"}]}},
     "resources.volumes[0].source", "must be an absolute path, got 'models'"),
    ({"resources": {"volumes": [{"name": "m", "source": "~/m"}]}},
     "resources.volumes[0].source", "must be an absolute path"),
    ({"resources": {"volumes": [{"name": "m", "source": "/m", "target": "m"}]}},
     "resources.volumes[0].target", "must be an absolute path"),
    # unsupported modes, protocols, types
    ({"resources": {"volumes": [{"name": "m", "source": "/m", "mode": "rwx"}]}},
     "resources.volumes[0].mode", "must be one of ro, rw"),
    ({"resources": {"volumes": [{"name": "m", "source": "/m", "type": "nfs"}]}},
     "resources.volumes[0].type", "must be one of host"),
    ({"resources": {"ports": [{"label": "a", "port": 80, "protocol": "sctp"}]}},
     "resources.ports[0].protocol", "must be one of tcp, udp, http, grpc"),
    # runtime driver
    ({"resources": {"runtime_driver": 1}}, "resources.runtime_driver",
     "expected a non-empty string, got integer"),
    ({"resources": {"runtime_driver": ["a"]}}, "resources.runtime_driver", "got list"),
    ({"resources": {"runtime_driver": ""}}, "resources.runtime_driver", "non-empty string"),
    # aliases and flat keys
    ({"resources": {"cpu": 1, "cpu_cores": 1}}, "resources.cpu",
     "CPU is given twice (cpu_cores and cpu)"),
    ({"resources": {"gpus": 1, "gpu_count": 1}}, "resources.gpus", "GPU count is given twice"),
    ({"resources": {"gpu_count": 1, "devices": [{"kind": "gpu"}]}}, "resources.gpu_count",
     "keep one"),
    ({"ram_gb": 4, "resources": {"memory_mb": 8192}}, "resources.memory_mb",
     "conflicts with ram_gb: resources.memory_mb means 8 GB, ram_gb is 4"),
    ({"cpu_cores": 1, "resources": {"cpu": 2}}, "resources.cpu", "conflicts with cpu_cores"),
    ({"gpu_required": False, "resources": {"gpu_count": 1}}, "gpu_required",
     "is false but resources requests a GPU device"),
    ({"resources": {"banana": 1}}, "resources.banana", "unknown key"),
    # constraints and job type
    ({"constraints": [{"attribute": "arch", "operator": "~=", "value": "x"}]},
     "constraints[0].operator", "must be one of =, !=, <, <=, >, >=, regexp, version"),
    ({"constraints": [{"attribute": "arch", "operator": "="}]}, "constraints[0].value",
     "required for operator ="),
    ({"constraints": [{"operator": "="}]}, "constraints[0].attribute", "required key"),
    ({"constraints": [{"attribute": "h", "operator": "regexp", "value": "("}]},
     "constraints[0].value", "not a valid regular expression"),
    ({"constraints": [{"attribute": "k", "operator": "version", "value": "newest"}]},
     "constraints[0].value", "not a version constraint"),
    ({"constraints": [{"attribute": "k", "operator": "is_set", "value": "1"}]},
     "constraints[0].value", "is_set takes no value"),
    ({"constraints": [{"operator": "distinct_hosts", "value": "maybe"}]}, "constraints[0].value",
     "distinct_hosts takes true or false"),
    ({"constraints": [""]}, "constraints[0]", "expected a non-empty tag"),
    ({"constraints": [7]}, "constraints[0]", "expected a mapping"),
    ({"constraints": [{"attribute": "a", "value": {"x": 1}}]}, "constraints[0].value",
     "expected a string, number or list"),
    ({"job_type": "cron"}, "job_type", "must be one of service, batch, system, sysbatch"),
]


@pytest.mark.parametrize(("patch", "key", "reason"), SPEC_ERRORS)
def test_spec_resource_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              patch: dict[str, Any], key: str, reason: str) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"nodes": [good_node()]}))
    data: dict[str, Any] = {"command": "true"}
    data.update(patch)
    sp = tmp_path / "exp.json"
    sp.write_text(json.dumps(data))
    code, _, err = run_cli(capsys, "--cluster-config", str(path), "--validate-config",
                           "--config", str(sp))
    assert_one_line_error(code, err, f"{sp}: {key}: ", reason)


NODE_ERRORS = [
    ({"devices": [{"id": "gpu0"}]}, "nodes[0].devices[0].kind",
     "a GPU device on a node with gpu: false"),
    ({"gpu": True, "gpu_memory_gb": 8, "devices": [{"id": "g"}, {"id": "g"}]},
     "nodes[0].devices[1].id", "duplicate device id 'g' (also devices[0])"),
    ({"devices": [{"kind": "tpu"}]}, "nodes[0].devices[0].id", "required key"),
    ({"devices": [{"id": "t", "kind": "tpu", "memory_mb": -1}]}, "nodes[0].devices[0].memory_mb",
     "at least 0"),
    ({"devices": [{"id": "t", "kind": "tpu", "index": -1}]}, "nodes[0].devices[0].index",
     "at least 0"),
    ({"host_paths": ["data"]}, "nodes[0].host_paths[0]", "must be an absolute path"),
    ({"attributes": {"tags": "x"}}, "nodes[0].attributes.tags", "is a built-in attribute"),
    ({"attributes": {"rack": {"a": 1}}}, "nodes[0].attributes.rack", "expected a string"),
    ({"attributes": {"bad key": 1}}, "nodes[0].attributes.bad key", "not a valid attribute name"),
    ({"attributes": ["a"]}, "nodes[0].attributes", "expected a mapping"),
    ({"scheduling_eligible": "no"}, "nodes[0].scheduling_eligible", "expected true or false"),
    ({"runtime_drivers": [3]}, "nodes[0].runtime_drivers[0]", "expected a non-empty string"),
    ({"disk_gb": -1}, "nodes[0].disk_gb", "at least 0"),
]


@pytest.mark.parametrize(("patch", "key", "reason"), NODE_ERRORS)
def test_node_inventory_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               patch: dict[str, Any], key: str, reason: str) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"nodes": [good_node(**patch)]}))
    code, _, err = run_cli(capsys, "--cluster-config", str(path), "--validate-config")
    assert_one_line_error(code, err, f"{path}: {key}: ", reason)


@pytest.mark.parametrize(("placement", "key", "reason"), [
    ({"strategy": "random"}, "placement.strategy", "must be one of score, binpack, spread"),
    ({"constraints": [{"attribute": "arch", "operator": "like", "value": "x"}]},
     "placement.constraints[0].operator", "must be one of"),
    ({"constraints": 5}, "placement.constraints", "expected a list of constraints"),
])
def test_placement_section_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  placement: dict[str, Any], key: str, reason: str) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"nodes": [good_node()], "placement": placement}))
    code, _, err = run_cli(capsys, "--cluster-config", str(path), "--validate-config")
    assert_one_line_error(code, err, f"{key}: ", reason)


def test_full_inventory_validates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({
        "nodes": [good_node(gpu=True, gpu_memory_gb=24, scheduling_eligible=False,
                            devices=[{"id": "gpu0", "vendor": "nvidia", "driver": "cuda",
                                      "memory_mb": 24576, "capabilities": ["fp16"], "index": 0},
                                     {"id": "coral0", "type": "tpu"}],
                            host_paths=["/mnt/models"], runtime_drivers=["host_local", "docker"],
                            attributes={"rack": "a1", "cuda": "12.2", "features": ["x", "y"]},
                            disk_gb=500)],
        "placement": {"strategy": "binpack", "constraints": ["linux", {"operator": "distinct_hosts"}]},
    }))
    sp = tmp_path / "a.json"
    sp.write_text(json.dumps({"command": "true", "job_type": "sysbatch",
                              "resources": {"gpus": 1, "memory_mb": 1024}}))
    code, out, err = run_cli(capsys, "--cluster-config", str(path), "--validate-config",
                             "--config", str(sp))
    assert code == 0, err
    assert "is valid" in out


# ---------------------------------------------------------------- node inventory

def facts(**kw: Any) -> NodeFacts:
    base: dict[str, Any] = dict(
        node="n", hostname="box", arch="x86_64", os="Linux", kernel="6.1.0", python="3.11",
        cpu_present=8, cpu_online=8, cpu_usable=8, load=(0.0, 0.0, 0.0), mem_total_gb=32.0,
        mem_available_gb=30.0, nvmap_used_gb=None, swap_total_gb=None, disk_path="/",
        disk_total_gb=100.0, disk_free_gb=80.0)
    base.update(kw)
    return NodeFacts(**base)


def test_declared_gpu_node_without_devices_gets_a_generic_gpu() -> None:
    c = cluster(node("g", gpu=True, gpu_memory_gb=8))
    (d,) = node_inventory(c.nodes[0]).devices
    assert (d.id, d.kind, d.memory_mb, d.index, d.vendor, d.driver) == (
        "gpu0", "gpu", 8192.0, 0, None, None)


def test_jetson_generic_gpu_is_cuda_with_orin_capabilities() -> None:
    c = cluster(node("j", type="jetson_orin", gpu=True, ram_gb=64))
    (d,) = node_inventory(c.nodes[0]).devices
    assert (d.vendor, d.driver, d.memory_mb) == ("nvidia", "cuda", 65536.0)
    assert {"fp16", "bf16", "sm_87", "cuda"} <= d.capabilities


def test_probe_gpus_become_devices_with_ids_memory_and_capabilities() -> None:
    c = cluster(node("g", gpu=True, gpu_memory_gb=32))
    f = facts(gpus=(GpuInfo(0, "RTX 4090", "nvidia", uuid="GPU-a", memory_total_mb=24564,
                            compute_cap="8.9"),
                    GpuInfo(1, "T4", "nvidia", memory_total_mb=15360, compute_cap="7.5")))
    inv = node_inventory(c.nodes[0], f)
    assert [(d.id, d.index, d.memory_mb, d.driver) for d in inv.devices] == [
        ("gpu0", 0, 24564.0, "cuda"), ("gpu1", 1, 15360.0, "cuda")]
    assert "fp8" in inv.devices[0].capabilities and "bf16" not in inv.devices[1].capabilities
    assert inv.attributes["gpu_count"] == 2
    assert inv.attributes["arch"] == "x86_64"
    assert inv.disk_gb == 80.0  # no declared disk_gb: probed free disk


def test_declared_devices_win_and_probe_fills_gaps() -> None:
    c = cluster(node("g", gpu=True, gpu_memory_gb=24, disk_gb=200,
                     devices=[{"id": "big", "index": 0, "capabilities": ["fp16"]},
                              {"id": "coral", "kind": "tpu"}]))
    f = facts(gpus=(GpuInfo(0, "A", "nvidia", memory_total_mb=24000, compute_cap="8.0"),
                    GpuInfo(1, "B", "amd", memory_total_mb=16000)))
    inv = node_inventory(c.nodes[0], f)
    by_id = {d.id: d for d in inv.devices}
    assert list(by_id) == ["big", "coral", "gpu1"]
    assert by_id["big"].memory_mb == 24000.0 and by_id["big"].driver == "cuda"
    assert {"fp16", "tf32"} <= by_id["big"].capabilities
    assert (by_id["gpu1"].vendor, by_id["gpu1"].driver) == ("amd", "rocm")
    assert inv.disk_gb == 200.0  # declared disk wins over the probe


def test_jetson_probe_without_gpu_rows_has_one_unified_gpu() -> None:
    c = cluster(node("j", type="jetson_orin", gpu=True, ram_gb=64))
    inv = node_inventory(c.nodes[0], facts(arch="aarch64", mem_total_gb=61.0,
                                           jetson=JetsonInfo(model="Orin")))
    (d,) = inv.devices
    assert (d.id, d.memory_mb, d.driver) == ("gpu0", 61.0 * 1024, "cuda")


def test_probe_gpus_are_ignored_on_a_gpu_false_node() -> None:
    c = cluster(node("n"))
    f = facts(gpus=(GpuInfo(0, "A", "nvidia", memory_total_mb=8000),))
    assert node_inventory(c.nodes[0], f).devices == ()


def test_attributes_builtin_user_and_probe() -> None:
    c = cluster(node("r", type="raspberry_pi", tags=["arm64"], attributes={"rack": "b2",
                                                                           "arch": "armv7l"}))
    attrs = node_inventory(c.nodes[0]).attributes
    assert attrs["name"] == "r" and attrs["rack"] == "b2" and attrs["tags"] == frozenset({"arm64"})
    assert attrs["arch"] == "armv7l"  # declared attribute beats the type default
    assert node_inventory(c.nodes[0], facts(arch="aarch64")).attributes["arch"] == "aarch64"
    assert "arch" in node_inventory(cluster(node("p", type="raspberry_pi")).nodes[0]).attributes
    assert "arch" not in node_inventory(cluster(node("h")).nodes[0]).attributes


def test_host_paths_cover_what_lies_beneath() -> None:
    c = cluster(node("n", host_paths=["/mnt/models/", "/data"]))
    inv = node_inventory(c.nodes[0])
    assert inv.host_paths == ("/mnt/models", "/data")
    assert inv.has_path("/mnt/models") and inv.has_path("/data/x/y")
    assert not inv.has_path("/mnt/modelsX") and not inv.has_path("/mnt")


# ---------------------------------------------------------------- JSON round trips and env

def test_resource_request_and_constraints_round_trip() -> None:
    c = cluster(node("n"))
    s = spec(c, resources={"disk_gb": 2, "devices": [{"kind": "gpu", "vendor": "nvidia",
                                                       "driver": "cuda", "min_memory_mb": 100,
                                                       "capabilities": ["fp16"], "ids": ["a"]}],
                           "ports": [{"label": "api", "port": 80, "protocol": "grpc"}],
                           "volumes": [{"name": "v", "source": "/s", "target": "/t",
                                        "mode": "rw"}],
                           "runtime_driver": "host_local"},
             constraints=["cuda", {"attribute": "k", "operator": "version", "value": ">= 1"},
                          {"attribute": "k", "operator": "is_set"}])
    doc = json.loads(json.dumps(s.resources.to_json()))
    assert ResourceRequest.from_json(doc) == s.resources
    assert ResourceRequest.from_json({}) == ResourceRequest() == ResourceRequest.from_json(None)
    again = tuple(Constraint.from_json(json.loads(json.dumps(x.to_json())))
                  for x in s.constraints)
    assert again == s.constraints


def test_allocation_round_trips_through_json() -> None:
    alloc = Allocation(instance_id="a", node="jetson", device_ids=("gpu0", "gpu1"),
                       gpu_ids=("0", "1"), ports=(("api", 8088), ("metrics", 9100)),
                       volumes=(VolumeAllocation("models", "/mnt/m", "/models", "ro"),),
                       runtime_driver="host_local", cpu_cores=2.0, memory_mb=8192.0,
                       disk_mb=100.0)
    assert Allocation.from_json(json.loads(json.dumps(alloc.to_json()))) == alloc
    tagged = alloc.with_run("r-12")
    assert Allocation.from_json(tagged.to_json()) == tagged
    assert tagged.holder.describe() == "a (run r-12)"


def test_allocation_env_is_exactly_the_hints() -> None:
    alloc = Allocation(instance_id="a", node="n", device_ids=("gpu1",), gpu_ids=("1",),
                       ports=(("api-v2", 8088),),
                       volumes=(VolumeAllocation("model.cache", "/mnt/m", "/models", "ro"),))
    env = allocation_env(alloc)
    assert env == {
        "INFRA_ALLOCATION": json.dumps(alloc.to_json(), sort_keys=True, separators=(",", ":")),
        "INFRA_DEVICE_IDS": "gpu1",
        "CUDA_VISIBLE_DEVICES": "1",
        "INFRA_PORT_API_V2": "8088",
        "INFRA_VOLUME_MODEL_CACHE_SOURCE": "/mnt/m",
        "INFRA_VOLUME_MODEL_CACHE_TARGET": "/models",
    }
    assert Allocation.from_json(json.loads(env["INFRA_ALLOCATION"])) == alloc


def test_allocation_env_without_devices_leaves_gpu_visibility_alone() -> None:
    env = allocation_env(Allocation(instance_id="a", node="n"))
    assert set(env) == {"INFRA_ALLOCATION"}


def test_node_device_describe() -> None:
    assert NodeDevice("gpu0", vendor="nvidia", driver="cuda", memory_mb=8192).describe() == \
        "gpu0: nvidia cuda 8192 MB"
    assert NodeDevice("t0", kind="tpu").describe() == "t0"
