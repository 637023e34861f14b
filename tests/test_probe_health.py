"""NodeFacts validation and the pure health rules (thresholds, reasons, capacity mismatches)."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from infra.config.model import HealthChecks, NodeConfig, NodeType
from infra.errors import CommandFailedError, UnreachableError
from infra.probe import (
    CapacityMismatch,
    NodeFacts,
    NodeStatus,
    capacity_mismatches,
    evaluate,
    unavailable,
)

FIXTURES = Path(__file__).parent / "fixtures" / "probe"
GIB = 2**30
CHECKS = HealthChecks()  # 90 % memory, 1 GB disk, 85 C


def doc(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((FIXTURES / f"doc_{name}.json").read_text())
    return loaded


def facts(name: str, **edits: Any) -> NodeFacts:
    d = doc(name)
    for path, value in edits.items():
        *parents, leaf = path.split("__")
        target = d
        for p in parents:
            target = target[p]
        target[leaf] = value
    return NodeFacts.from_json(name, d)


JETSON = NodeConfig(name="jetson", host="127.0.0.21", type=NodeType.JETSON_ORIN, ram_gb=64,
                    gpu=True, gpu_memory_gb=64, cpu_cores=12, unified_memory=True)
PI = NodeConfig(name="rpi5", host="127.0.0.22", type=NodeType.RASPBERRY_PI, ram_gb=8,
                cpu_cores=4)
HOST = NodeConfig(name="host", host="127.0.0.23", type=NodeType.HOST, ram_gb=64, gpu=True,
                  gpu_memory_gb=24, cpu_cores=16)


# --------------------------------------------------------------------------- from_json

def test_jetson_facts() -> None:
    f = facts("jetson_orin")
    assert f.node == "jetson_orin" and f.hostname == "orin-agx" and f.arch == "aarch64"
    assert f.mem_total_gb == pytest.approx(64308708 * 1024 / GIB)
    assert f.nvmap_used_gb == pytest.approx(1805068 * 1024 / GIB)
    assert f.cpu_present == f.cpu_online == f.cpu_usable == 12
    assert f.unified_memory and f.has_gpu
    (gpu,) = f.gpus
    assert gpu.integrated and gpu.utilization_pct == 17.0 and gpu.power_w == pytest.approx(2.34)
    assert f.gpu_memory_gb == f.mem_total_gb  # the GPU's memory is the RAM, counted once
    assert f.jetson is not None and f.jetson.l4t_release == "35.4.1"
    assert f.jetson.power_mw == 2340 + 390 + 4025 + 301
    assert f.jetson.compatible[-1] == "nvidia,tegra234"
    assert f.max_temperature == ("cpu-thermal", 44.56)


def test_pi_facts() -> None:
    f = facts("pi5")
    assert f.pi is not None and f.pi.throttled == 0x50000
    assert f.pi.active_flags == ()  # only "occurred since boot" bits
    assert not f.has_gpu and not f.unified_memory and f.gpu_memory_gb is None
    assert f.disk_free_gb == pytest.approx(40.0) and f.disk_path == "/home/pi/lab-orchestrator"
    assert f.load == (0.5, 0.4, 0.3)


def test_x86_gpu_facts() -> None:
    f = facts("x86_gpu")
    assert [g.index for g in f.gpus] == [0, 1]
    assert f.gpus[1].power_w is None
    assert f.gpu_memory_gb == pytest.approx(48.0) and f.largest_gpu_memory_gb == pytest.approx(24.0)
    assert f.gpus[0].compute_cap == "8.6" and not f.unified_memory


def test_optional_sections_may_be_missing() -> None:
    d = doc("pi5")
    del d["disk"], d["load"], d["temperatures"], d["gpus"], d["pi"]
    d["errors"] = ["disk: PermissionError: denied"]
    f = NodeFacts.from_json("rpi5", d)
    assert f.disk_free_gb is None and f.load == (0.0, 0.0, 0.0) and f.max_temperature is None
    assert f.errors == ("disk: PermissionError: denied",)


def _without(d: dict[str, Any], key: str) -> dict[str, Any]:
    d = copy.deepcopy(d)
    del d[key]
    return d


def _with(path: str, value: Any) -> dict[str, Any]:
    d = doc("x86_gpu")
    *parents, leaf = path.split(".")
    target: Any = d
    for p in parents:
        target = target[int(p)] if isinstance(target, list) else target[p]
    target[leaf] = value
    return d


GARBAGE: list[tuple[str, Any, str]] = [
    ("none", None, "NoneType instead of a JSON object"),
    ("list", [1, 2], "list instead of a JSON object"),
    ("string", "hello", "str instead of a JSON object"),
    ("empty", {}, "probe_version None"),
    ("future version", _with("probe_version", 2), "probe_version 2"),
    ("no hostname", _without(doc("x86_gpu"), "hostname"), "no hostname"),
    ("no memory", _without(doc("x86_gpu"), "memory"), "no 'memory' section"),
    ("memory text", _with("memory.total_bytes", "lots"), "memory.total_bytes"),
    ("memory bool", _with("memory.available_bytes", True), "memory.available_bytes"),
    ("memory zero", _with("memory.total_bytes", 0), "impossible memory"),
    ("no cpu", _without(doc("x86_gpu"), "cpu"), "no 'cpu' section"),
    ("cpu zero", _with("cpu", {"count": None, "present": 0}), "no CPU count"),
    ("cpu negative", _with("cpu.online", -1), "cpu.online"),
    ("load short", _with("load", [1.0]), "load average"),
    ("errors not list", _with("errors", "boom"), "'errors' list"),
    ("gpus not list", _with("gpus", {"a": 1}), "'gpus' list"),
    ("gpu memory text", _with("gpus.0.memory_total_mb", "24GB"), "gpu.memory_total_mb"),
    ("gpu not object", _with("gpus", [3]), "GPU entry"),
    ("temperature no value", _with("temperatures", [{"name": "x"}]), "temperature.celsius"),
    ("jetson list", _with("jetson", [1]), "'jetson' section"),
    ("pi without model", _with("pi", {"throttled": 0}), "'model'"),
    ("disk text", _with("disk", {"total_bytes": "big", "free_bytes": 1}), "disk.total_bytes"),
]


@pytest.mark.parametrize(("label", "document", "fragment"), GARBAGE, ids=[g[0] for g in GARBAGE])
def test_garbage_is_rejected(label: str, document: Any, fragment: str) -> None:
    with pytest.raises(CommandFailedError) as info:
        NodeFacts.from_json("n1", document)
    assert info.value.node == "n1"
    assert info.value.reason.startswith("probe returned ")
    assert fragment in info.value.reason


def test_missing_section_names_the_probe_error() -> None:
    d = _without(doc("x86_gpu"), "memory")
    d["errors"] = ["memory: FileNotFoundError: /proc/meminfo"]
    with pytest.raises(CommandFailedError, match="FileNotFoundError: /proc/meminfo"):
        NodeFacts.from_json("n1", d)


# --------------------------------------------------------------------------- thresholds

def test_healthy_nodes() -> None:
    for name, node in (("jetson_orin", JETSON), ("pi5", PI), ("x86_gpu", HOST)):
        health = evaluate(node, facts(name), CHECKS)
        assert health.status is NodeStatus.HEALTHY, health.reasons
        assert health.reasons == () and health.mismatches == () and health.error is None
        assert health.facts is not None and health.reachable
        assert health.summary() == "healthy"


def test_memory_pressure_degrades() -> None:
    f = facts("pi5", memory__available_bytes=int(8245568 * 1024 * 0.07))
    health = evaluate(PI, f, CHECKS)
    assert health.status is NodeStatus.DEGRADED
    assert health.reasons == ("memory 93% used (> 90%)",)
    assert health.summary() == "degraded: memory 93% used (> 90%)"


def test_jetson_gpu_allocations_count_once() -> None:
    # NvMapMemUsed is carved out of RAM: MemAvailable already excludes it.
    f = facts("jetson_orin", memory__nvmap_used_bytes=40 * GIB)
    assert evaluate(JETSON, f, CHECKS).status is NodeStatus.HEALTHY


@pytest.mark.parametrize(("free_gb", "shown"), [(0.5, "0.5"), (0.99, "0.99"), (0.999, "0.99"),
                                               (1.0, None)])
def test_disk_threshold(free_gb: float, shown: str | None) -> None:
    f = facts("pi5", disk__free_bytes=int(free_gb * GIB))
    health = evaluate(PI, f, CHECKS)
    assert (health.status is NodeStatus.DEGRADED) is (shown is not None)
    if shown is not None:
        assert health.reasons[0].startswith(f"disk {shown} GB free at /home/pi/")
        assert health.reasons[0].endswith("(< 1 GB)")


@pytest.mark.parametrize(("celsius", "degraded"), [(84.9, False), (85.0, True), (97.25, True)])
def test_temperature_threshold(celsius: float, degraded: bool) -> None:
    f = facts("pi5", temperatures=[{"name": "cpu-thermal", "celsius": celsius},
                                   {"name": "vcgencmd", "celsius": 40.0}])
    health = evaluate(PI, f, CHECKS)
    assert (health.status is NodeStatus.DEGRADED) is degraded
    if degraded:
        assert health.reasons == (f"temperature {celsius:.1f} C at cpu-thermal (>= 85 C)",)


def test_custom_thresholds_and_several_reasons() -> None:
    f = facts("x86_gpu")
    checks = HealthChecks(memory_percent=10, disk_free_gb=500, temperature_c=50)
    health = evaluate(HOST, f, checks)
    assert health.status is NodeStatus.DEGRADED
    assert [r.split()[0] for r in health.reasons] == ["memory", "disk", "temperature"]
    assert health.reasons[0] == f"memory {f.mem_used_percent:.0f}% used (> 10%)"
    assert health.reasons[2] == "temperature 52.0 C at x86_pkg_temp (>= 50 C)"


def test_pi_throttling_now_degrades() -> None:
    f = facts("pi5", pi__throttled=0x50005,
              pi__throttled_flags=["under_voltage", "throttled", "under_voltage_occurred",
                                   "throttling_occurred"])
    health = evaluate(PI, f, CHECKS)
    assert health.reasons == ("raspberry pi under_voltage, throttled now "
                              "(get_throttled 0x50005)",)


# --------------------------------------------------------------------------- capacity mismatches

MISMATCHES: list[tuple[str, NodeConfig, str, tuple[CapacityMismatch, ...]]] = [
    ("jetson 64GB module declared 64", JETSON, "jetson_orin", ()),
    ("jetson declared 32", dataclasses.replace(JETSON, ram_gb=32), "jetson_orin",
     (CapacityMismatch("ram_gb", 32, 61.3),)),
    ("jetson unified gpu memory is the RAM", dataclasses.replace(JETSON, gpu_memory_gb=60),
     "jetson_orin", ()),
    ("jetson gpu memory bigger than RAM", dataclasses.replace(JETSON, gpu_memory_gb=128),
     "jetson_orin", (CapacityMismatch("gpu_memory_gb", 128, 61.3),)),
    ("pi declared a gpu", dataclasses.replace(PI, gpu=True), "pi5",
     (CapacityMismatch("gpu", True, False),)),
    ("pi declared gpu memory only", dataclasses.replace(PI, gpu_memory_gb=4), "pi5",
     (CapacityMismatch("gpu_memory_gb", 4, None),)),
    ("pi declared gpu and gpu memory", dataclasses.replace(PI, gpu=True, gpu_memory_gb=4), "pi5",
     (CapacityMismatch("gpu", True, False),)),
    ("pi declared 16 cores", dataclasses.replace(PI, cpu_cores=16), "pi5",
     (CapacityMismatch("cpu_cores", 16.0, 4.0),)),
    ("pi declared fewer cores than it has", dataclasses.replace(PI, cpu_cores=2), "pi5", ()),
    ("pi ram within 10%", dataclasses.replace(PI, ram_gb=7.5), "pi5", ()),
    ("pi ram undeclared", dataclasses.replace(PI, ram_gb=0), "pi5", ()),
    ("host gpu memory as the total", dataclasses.replace(HOST, gpu_memory_gb=48), "x86_gpu", ()),
    ("host gpu memory too small", dataclasses.replace(HOST, gpu_memory_gb=12), "x86_gpu",
     (CapacityMismatch("gpu_memory_gb", 12, 48.0),)),
    ("host ram wrong", dataclasses.replace(HOST, ram_gb=128), "x86_gpu",
     (CapacityMismatch("ram_gb", 128, 62.7),)),
]


@pytest.mark.parametrize(("label", "node", "doc_name", "expected"), MISMATCHES,
                         ids=[m[0] for m in MISMATCHES])
def test_capacity_mismatches(label: str, node: NodeConfig, doc_name: str,
                             expected: tuple[CapacityMismatch, ...]) -> None:
    assert capacity_mismatches(node, facts(doc_name)) == expected


def test_jetson_gpu_counts_without_any_gpu_entry() -> None:
    f = dataclasses.replace(facts("jetson_orin"), gpus=())
    assert capacity_mismatches(JETSON, f) == ()


def test_gpu_memory_unknown_on_a_discrete_gpu() -> None:
    f = facts("x86_gpu", gpus=[{"index": 0, "name": "GPU", "vendor": "nvidia",
                                "memory_total_mb": None}])
    assert capacity_mismatches(HOST, f) == (CapacityMismatch("gpu_memory_gb", 24, None),)


def test_mismatches_do_not_change_the_status() -> None:
    health = evaluate(dataclasses.replace(PI, gpu=True, ram_gb=64), facts("pi5"), CHECKS)
    assert health.status is NodeStatus.HEALTHY
    assert [m.describe() for m in health.mismatches] == [
        "ram_gb: declared 64, detected 7.9", "gpu: declared yes, detected no"]


# --------------------------------------------------------------------------- unavailable

def test_unavailable_from_transport_error() -> None:
    health = unavailable("n1", UnreachableError("n1", "connection refused by 127.0.0.21:2222"))
    assert health.status is NodeStatus.UNAVAILABLE and not health.reachable
    assert health.reasons == ("connection refused by 127.0.0.21:2222",)
    assert health.error == "connection refused by 127.0.0.21:2222"
    assert health.facts is None and health.mismatches == ()
    assert health.summary() == "unavailable: connection refused by 127.0.0.21:2222"


def test_unavailable_from_text() -> None:
    health = unavailable("n2", "disabled in topology")
    assert health.node == "n2" and health.reasons == ("disabled in topology",)


def test_status_values_are_stable_strings() -> None:
    assert [s.value for s in NodeStatus] == ["healthy", "degraded", "unavailable", "maintenance"]
    assert NodeStatus("degraded") is NodeStatus.DEGRADED
