"""What a placement concretely reserves on its node, and the env hints a process gets from it.

An ``Allocation`` is recorded on every ``Placement``: the device ids chosen, the ports and
volumes, the runtime driver, the scalar amounts. The runner stores ``to_json()`` per instance
and passes ``allocation_env()`` to the process. Device matching lives here too, so the
feasibility check and the allocation agree by construction.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from infra.config.model import DeviceRequest, NodeDevice

MB_PER_GB = 1024.0


@dataclass(frozen=True)
class Holder:
    """Who holds a device or port on a node: an instance, of some run when known."""

    instance_id: str
    run_id: str | None = None

    def describe(self) -> str:
        return f"{self.instance_id} (run {self.run_id})" if self.run_id else self.instance_id


@dataclass(frozen=True)
class VolumeAllocation:
    """A host volume as allocated: the source on the node, the target the process is told."""

    name: str
    source: str
    target: str
    mode: str


@dataclass(frozen=True)
class Allocation:
    """Concrete resources of one placed instance on one node (JSON round-trips exactly)."""

    instance_id: str
    node: str
    device_ids: tuple[str, ...] = ()
    gpu_ids: tuple[str, ...] = ()  # CUDA device indices (or ids) for CUDA_VISIBLE_DEVICES
    ports: tuple[tuple[str, int], ...] = ()  # (label, port) in request order
    volumes: tuple[VolumeAllocation, ...] = ()
    runtime_driver: str | None = None
    cpu_cores: float = 0.0
    memory_mb: float = 0.0
    disk_mb: float = 0.0
    run_id: str | None = None

    def with_run(self, run_id: str) -> Allocation:
        """The same allocation tagged with the run that holds it (for conflict messages)."""
        return replace(self, run_id=run_id)

    @property
    def holder(self) -> Holder:
        return Holder(self.instance_id, self.run_id)

    def to_json(self) -> dict[str, Any]:
        """A plain JSON document; ``from_json`` reads it back to an equal Allocation."""
        doc: dict[str, Any] = {
            "instance_id": self.instance_id,
            "node": self.node,
            "device_ids": list(self.device_ids),
            "gpu_ids": list(self.gpu_ids),
            "ports": dict(self.ports),
            "volumes": [{"name": v.name, "source": v.source, "target": v.target,
                         "mode": v.mode} for v in self.volumes],
            "runtime_driver": self.runtime_driver,
            "cpu_cores": self.cpu_cores,
            "memory_mb": self.memory_mb,
            "disk_mb": self.disk_mb,
        }
        if self.run_id is not None:
            doc["run_id"] = self.run_id
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Allocation:
        """Rebuild an allocation stored with ``to_json`` (raises KeyError/ValueError on garbage)."""
        ports = doc.get("ports") or {}
        return cls(
            instance_id=str(doc["instance_id"]),
            node=str(doc["node"]),
            device_ids=tuple(str(d) for d in doc.get("device_ids") or ()),
            gpu_ids=tuple(str(g) for g in doc.get("gpu_ids") or ()),
            ports=tuple((str(k), int(v)) for k, v in ports.items()),
            volumes=tuple(VolumeAllocation(str(v["name"]), str(v["source"]), str(v["target"]),
                                           str(v["mode"])) for v in doc.get("volumes") or ()),
            runtime_driver=doc.get("runtime_driver"),
            cpu_cores=float(doc.get("cpu_cores") or 0.0),
            memory_mb=float(doc.get("memory_mb") or 0.0),
            disk_mb=float(doc.get("disk_mb") or 0.0),
            run_id=doc.get("run_id"),
        )

    def summary(self) -> str:
        """One short line for tables: devices, ports and volumes, or '' when none."""
        bits: list[str] = []
        if self.device_ids:
            bits.append("devices " + ",".join(self.device_ids))
        if self.ports:
            bits.append("ports " + ",".join(f"{label}={port}" for label, port in self.ports))
        if self.volumes:
            bits.append("volumes " + ",".join(v.name for v in self.volumes))
        return "; ".join(bits)


def env_key(text: str) -> str:
    """Upper-case with every non-alphanumeric character as '_' (``api-v2`` -> ``API_V2``)."""
    return re.sub(r"[^A-Z0-9]", "_", text.upper())


def allocation_env(alloc: Allocation) -> dict[str, str]:
    """Env hints for the process: INFRA_ALLOCATION, device ids, CUDA_VISIBLE_DEVICES, ports,
    volumes. Device variables appear only when devices were allocated, so a plain
    ``gpu_required`` job keeps seeing every GPU."""
    env = {"INFRA_ALLOCATION": json.dumps(alloc.to_json(), sort_keys=True,
                                          separators=(",", ":"))}
    if alloc.device_ids:
        env["INFRA_DEVICE_IDS"] = ",".join(alloc.device_ids)
    if alloc.gpu_ids:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(alloc.gpu_ids)
    for label, port in alloc.ports:
        env[f"INFRA_PORT_{env_key(label)}"] = str(port)
    for v in alloc.volumes:
        env[f"INFRA_VOLUME_{env_key(v.name)}_SOURCE"] = v.source
        env[f"INFRA_VOLUME_{env_key(v.name)}_TARGET"] = v.target
    return env


# --------------------------------------------------------------------------- devices

def device_matches(dev: NodeDevice, req: DeviceRequest) -> bool:
    """Kind, vendor, driver, memory, capabilities and ids all satisfied (ignoring holders)."""
    if dev.kind != req.kind:
        return False
    if req.vendor is not None and dev.vendor != req.vendor:
        return False
    if req.driver is not None and dev.driver != req.driver:
        return False
    if req.min_memory_mb > 0 and (dev.memory_mb is None or dev.memory_mb < req.min_memory_mb):
        return False
    if not req.capabilities <= dev.capabilities:
        return False
    return not req.ids or dev.id in req.ids


def _kind_word(kind: str, count: int) -> str:
    word = "GPU" if kind == "gpu" else f"{kind} device"
    if count == 1:
        return f"an {word}" if word[0] in "AEIOUaeiou" else f"a {word}"
    return f"{count} {word}s"


def describe_request(req: DeviceRequest) -> str:
    """``a GPU with driver cuda, >= 16000 MB`` -- what the instance asked for."""
    filters: list[str] = []
    if req.vendor:
        filters.append(f"vendor {req.vendor}")
    if req.driver:
        filters.append(f"driver {req.driver}")
    if req.min_memory_mb:
        filters.append(f">= {req.min_memory_mb:g} MB")
    if req.capabilities:
        filters.append("capabilities " + ",".join(sorted(req.capabilities)))
    if req.ids:
        filters.append("id in " + ",".join(req.ids))
    text = _kind_word(req.kind, req.count)
    return text + (" with " + ", ".join(filters) if filters else "")


def choose_devices(devices: Sequence[NodeDevice], requests: Iterable[DeviceRequest],
                   held: Mapping[str, Holder]) -> tuple[tuple[NodeDevice, ...], str | None]:
    """Pick free matching devices for every request, first fit in node order (ids in the
    order the request lists them). Returns (chosen, None) or (partial, reason)."""
    chosen: list[NodeDevice] = []
    taken: set[str] = set()
    for req in requests:
        candidates = [d for d in devices if device_matches(d, req)]
        if req.ids:
            order = {i: n for n, i in enumerate(req.ids)}
            candidates.sort(key=lambda d: order[d.id])
        free = [d for d in candidates if d.id not in held and d.id not in taken]
        if len(free) >= req.count:
            pick = free[:req.count]
            chosen.extend(pick)
            taken.update(d.id for d in pick)
            continue
        want = describe_request(req)
        if len(candidates) < req.count:
            same_kind = [d for d in devices if d.kind == req.kind]
            if not same_kind:
                return tuple(chosen), f"needs {want}: this node has none"
            have = "; ".join(d.describe() for d in same_kind)
            found = f"only {len(candidates)} matches" if candidates else "none matches"
            return tuple(chosen), f"needs {want}: {found} here ({have})"
        busy = [d for d in candidates if d.id in held]
        if busy:
            holders = ", ".join(f"{d.id} held by {held[d.id].describe()}" for d in busy)
            return tuple(chosen), f"needs {want}: {holders}"
        return tuple(chosen), f"needs {want}: its other device requests take the matching ones"
    return tuple(chosen), None


def cuda_ids(devices: Iterable[NodeDevice]) -> tuple[str, ...]:
    """CUDA_VISIBLE_DEVICES entries: GPUs whose driver is CUDA or unknown, by index if known."""
    return tuple(str(d.index) if d.index is not None else d.id for d in devices
                 if d.kind == "gpu" and d.driver in (None, "cuda"))
