"""A node's schedulable inventory: its config merged with what the probe detected.

Devices declared in the topology win field by field; GPUs the probe found fill the gaps (ids
``gpu<index>``, memory, capabilities from the compute capability). A ``gpu: true`` node that
declares no device and was not probed gets one generic ``gpu0``, so dry runs still place GPU
requests. Attributes (for constraints) come from the config, the probe and ``attributes:``.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from infra.config.model import AttrValue, NodeConfig, NodeDevice, NodeType
from infra.probe.facts import GpuInfo, NodeFacts

MB_PER_GB = 1024.0
# Compute capability of the GPU a node type always has (used before any probe ran).
TYPE_COMPUTE_CAP = {NodeType.JETSON_ORIN: "8.7"}
TYPE_ARCH = {NodeType.JETSON_ORIN: "aarch64", NodeType.RASPBERRY_PI: "aarch64"}
VENDOR_DRIVER = {"nvidia": "cuda", "amd": "rocm", "apple": "metal"}


@dataclass(frozen=True)
class NodeInventory:
    """Devices, host paths, runtime drivers, disk and attributes of one node."""

    node: str
    devices: tuple[NodeDevice, ...] = ()
    host_paths: tuple[str, ...] = ()
    runtime_drivers: frozenset[str] = frozenset()
    attributes: Mapping[str, AttrValue] = field(default_factory=lambda: MappingProxyType({}))
    disk_gb: float | None = None

    def has_path(self, path: str) -> bool:
        """True when ``path`` is an advertised host path or lies beneath one."""
        path = posixpath.normpath(path)
        return any(path == p or path.startswith(p.rstrip("/") + "/") for p in self.host_paths)

    def device(self, device_id: str) -> NodeDevice | None:
        return next((d for d in self.devices if d.id == device_id), None)


def capabilities_for(compute_cap: str | None) -> frozenset[str]:
    """Capability labels a CUDA compute capability implies (``8.7`` -> sm_87, fp16, bf16...)."""
    if not compute_cap:
        return frozenset()
    try:
        major_s, _, minor_s = compute_cap.strip().partition(".")
        major, minor = int(major_s), int(minor_s or "0")
    except ValueError:
        return frozenset()
    caps = {"cuda", f"sm_{major}{minor}"}
    if (major, minor) >= (5, 3):
        caps.add("fp16")
    if (major, minor) >= (6, 1):
        caps.add("int8")
    if (major, minor) >= (8, 0):
        caps.update({"bf16", "tf32"})
    if (major, minor) >= (8, 9):
        caps.add("fp8")
    return frozenset(caps)


def _detected(gpu: GpuInfo, facts: NodeFacts) -> NodeDevice:
    vendor = "nvidia" if gpu.vendor.startswith("nvidia") else gpu.vendor.lower()
    memory = gpu.memory_total_mb
    if memory is None and gpu.integrated:
        memory = facts.mem_total_gb * MB_PER_GB
    return NodeDevice(id=f"gpu{gpu.index}", kind="gpu", vendor=vendor,
                      driver=VENDOR_DRIVER.get(vendor), memory_mb=memory,
                      capabilities=capabilities_for(gpu.compute_cap), index=gpu.index)


def probe_devices(node: NodeConfig, facts: NodeFacts | None) -> tuple[NodeDevice, ...]:
    """The GPUs the probe found, as devices (a Jetson without GPU rows gets its one GPU)."""
    if facts is None or not node.gpu:
        return ()
    found = tuple(_detected(g, facts) for g in facts.gpus)
    if not found and facts.jetson is not None:
        found = (NodeDevice(id="gpu0", kind="gpu", vendor="nvidia", driver="cuda",
                            memory_mb=facts.mem_total_gb * MB_PER_GB,
                            capabilities=capabilities_for(TYPE_COMPUTE_CAP[NodeType.JETSON_ORIN]),
                            index=0),)
    return found


def _fill(declared: NodeDevice, seen: NodeDevice) -> NodeDevice:
    """Declared fields win; detected ones fill what the topology left out."""
    return replace(declared,
                   vendor=declared.vendor or seen.vendor,
                   driver=declared.driver or seen.driver,
                   memory_mb=declared.memory_mb if declared.memory_mb is not None
                   else seen.memory_mb,
                   capabilities=declared.capabilities | seen.capabilities,
                   index=declared.index if declared.index is not None else seen.index)


def _generic_gpu(node: NodeConfig) -> NodeDevice:
    """The one GPU a ``gpu: true`` node stands for before anything more is known."""
    memory: float | None = None
    if node.gpu_memory_gb > 0:
        memory = node.gpu_memory_gb * MB_PER_GB
    elif node.unified_memory:
        memory = node.ram_gb * MB_PER_GB
    jetson = node.type is NodeType.JETSON_ORIN
    return NodeDevice(id="gpu0", kind="gpu", vendor="nvidia" if jetson else None,
                      driver="cuda" if jetson else None, memory_mb=memory,
                      capabilities=capabilities_for(TYPE_COMPUTE_CAP.get(node.type)), index=0)


def merge_devices(node: NodeConfig, detected: tuple[NodeDevice, ...]) -> tuple[NodeDevice, ...]:
    """Declared devices (filled from detected ones with the same id or index), then the rest."""
    out: list[NodeDevice] = []
    used: set[str] = set()
    for dev in node.devices:
        twin = next((d for d in detected if d.id not in used and
                     (d.id == dev.id or (dev.index is not None and d.index == dev.index))), None)
        if twin is not None and twin.kind == dev.kind:
            used.add(twin.id)
            dev = _fill(dev, twin)
        out.append(dev)
    out.extend(d for d in detected if d.id not in used and d.id not in {o.id for o in out})
    if node.gpu and not any(d.kind == "gpu" for d in out):
        out.append(_generic_gpu(node))
    return tuple(out)


def probed_host_paths(facts: NodeFacts | None) -> tuple[str, ...]:
    """Hook: host paths the probe found to exist. The probe reports none yet."""
    return ()


def node_attributes(node: NodeConfig, devices: tuple[NodeDevice, ...],
                    facts: NodeFacts | None, disk_gb: float | None,
                    host_paths: tuple[str, ...]) -> dict[str, AttrValue]:
    """Every attribute a constraint may name (built-ins, then the node's ``attributes:``)."""
    gpus = [d for d in devices if d.kind == "gpu"]
    attrs: dict[str, AttrValue] = {
        "name": node.name, "host": node.host, "type": node.type.value,
        "enabled": node.enabled, "scheduling_eligible": node.scheduling_eligible,
        "ram_gb": node.ram_gb, "available_ram_gb": node.available_ram_gb,
        "cpu_cores": node.cpu_cores, "max_instances": node.max_instances,
        "gpu": node.gpu, "gpu_count": len(gpus), "gpu_memory_gb": node.gpu_memory_gb,
        "unified_memory": node.unified_memory, "tags": node.tags,
        "runtime_drivers": frozenset(node.runtime_drivers),
        "gpu_vendors": frozenset(d.vendor for d in gpus if d.vendor),
        "gpu_drivers": frozenset(d.driver for d in gpus if d.driver),
        "gpu_capabilities": frozenset(c for d in gpus for c in d.capabilities),
        "device_kinds": frozenset(d.kind for d in devices),
        "host_paths": frozenset(host_paths),
    }
    if disk_gb is not None:
        attrs["disk_gb"] = disk_gb
    arch = TYPE_ARCH.get(node.type)
    if arch is not None:
        attrs["arch"] = arch
    attrs.update(node.attributes)
    if facts is not None:
        for key, value in (("arch", facts.arch), ("os", facts.os), ("kernel", facts.kernel),
                           ("hostname", facts.hostname)):
            if value:
                attrs[key] = value
    return attrs


def node_inventory(node: NodeConfig, facts: NodeFacts | None = None) -> NodeInventory:
    """The node's inventory for placement; ``facts`` (a probe result) refines it when given."""
    devices = merge_devices(node, probe_devices(node, facts))
    paths = tuple(dict.fromkeys((*node.host_paths, *probed_host_paths(facts))))
    disk = node.disk_gb
    if disk is None and facts is not None:
        disk = facts.disk_free_gb
    return NodeInventory(
        node=node.name,
        devices=devices,
        host_paths=paths,
        runtime_drivers=frozenset(node.runtime_drivers),
        attributes=MappingProxyType(node_attributes(node, devices, facts, disk, paths)),
        disk_gb=disk,
    )
