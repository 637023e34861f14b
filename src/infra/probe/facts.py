"""What a node probe found, as typed immutable values.

``NodeFacts.from_json`` is the one place that turns the probe's JSON document
(``infra/remote/probe.py``) into values; it rejects garbage with ``CommandFailedError`` so a
broken or foreign probe never reaches placement. Sizes are in GiB ("GB" in names, as ``free -g``
and the topology file use it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from infra.errors import CommandFailedError

GIB = 1024.0 ** 3
SUPPORTED_PROBE_VERSION = 1

# get_throttled bits that describe the board right now (the others say "since boot").
PI_ACTIVE_FLAGS = ("under_voltage", "arm_frequency_capped", "throttled", "soft_temperature_limit")


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as the probe saw it; None marks a value the tool could not report."""

    index: int
    name: str
    vendor: str  # "nvidia", "nvidia-tegra" (Jetson integrated GPU) or "amd"
    uuid: str | None = None
    memory_total_mb: float | None = None
    memory_used_mb: float | None = None
    utilization_pct: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    driver: str | None = None
    compute_cap: str | None = None
    throttle_reasons: str | None = None  # nvidia-smi clocks_throttle_reasons.active ("0x...")

    @property
    def integrated(self) -> bool:
        """True for a GPU that shares system RAM (Jetson's Tegra GPU)."""
        return self.vendor == "nvidia-tegra"


@dataclass(frozen=True)
class JetsonInfo:
    """Jetson board details: model, L4T release and module power when readable."""

    model: str | None
    l4t_release: str | None = None
    jetpack: str | None = None
    power_mw: int | None = None
    gpu_power_mw: int | None = None
    gpu_utilization_pct: float | None = None
    compatible: tuple[str, ...] = ()
    nvpmodel: str | None = None  # power mode, e.g. "MAXN (0)"


@dataclass(frozen=True)
class PiInfo:
    """Raspberry Pi details: model, SoC temperature and ``get_throttled`` flags."""

    model: str
    temperature_c: float | None = None
    throttled: int | None = None
    throttled_flags: tuple[str, ...] = ()

    @property
    def active_flags(self) -> tuple[str, ...]:
        """Throttling conditions happening now (not merely since boot)."""
        return tuple(f for f in self.throttled_flags if f in PI_ACTIVE_FLAGS)


@dataclass(frozen=True)
class NodeFacts:
    """Everything one probe reported about one node, at one moment."""

    node: str
    hostname: str
    arch: str
    os: str
    kernel: str
    python: str
    cpu_present: int
    cpu_online: int
    cpu_usable: int
    load: tuple[float, float, float]
    mem_total_gb: float
    mem_available_gb: float
    nvmap_used_gb: float | None
    swap_total_gb: float | None
    disk_path: str | None
    disk_total_gb: float | None
    disk_free_gb: float | None
    temperatures: tuple[tuple[str, float], ...] = ()
    gpus: tuple[GpuInfo, ...] = ()
    jetson: JetsonInfo | None = None
    pi: PiInfo | None = None
    errors: tuple[str, ...] = ()

    @property
    def mem_used_gb(self) -> float:
        return max(0.0, self.mem_total_gb - self.mem_available_gb)

    @property
    def mem_used_percent(self) -> float:
        """Share of RAM not available to new work (GPU allocations included on Jetson)."""
        return 100.0 * self.mem_used_gb / self.mem_total_gb if self.mem_total_gb > 0 else 0.0

    @property
    def max_temperature(self) -> tuple[str, float] | None:
        """The hottest sensor as (name, celsius), or None when the node reports none."""
        if not self.temperatures:
            return None
        return max(self.temperatures, key=lambda t: t[1])

    @property
    def unified_memory(self) -> bool:
        """True when the GPU allocates from system RAM (Jetson): GPU memory *is* the RAM."""
        return self.jetson is not None or any(g.integrated for g in self.gpus)

    @property
    def has_gpu(self) -> bool:
        """A GPU was detected (Jetson's integrated GPU counts)."""
        return bool(self.gpus) or self.jetson is not None

    @property
    def discrete_gpus(self) -> tuple[GpuInfo, ...]:
        return tuple(g for g in self.gpus if not g.integrated)

    @property
    def gpu_memory_gb(self) -> float | None:
        """Detected GPU memory: RAM on unified-memory nodes, else the sum over discrete GPUs."""
        if self.unified_memory:
            return self.mem_total_gb
        sizes = [g.memory_total_mb for g in self.discrete_gpus if g.memory_total_mb is not None]
        return sum(sizes) / 1024.0 if sizes else None

    @property
    def largest_gpu_memory_gb(self) -> float | None:
        """The biggest single GPU's memory (what one process can use without sharding)."""
        if self.unified_memory:
            return self.mem_total_gb
        sizes = [g.memory_total_mb for g in self.discrete_gpus if g.memory_total_mb is not None]
        return max(sizes) / 1024.0 if sizes else None

    @classmethod
    def from_json(cls, node_name: str, doc: Any) -> NodeFacts:
        """Validate a probe document and build the facts; ``CommandFailedError`` on garbage."""
        return _Reader(node_name).facts(doc)


class _Reader:
    """Checks a probe document field by field; every failure names the field."""

    def __init__(self, node: str) -> None:
        self.node = node

    def fail(self, what: str) -> CommandFailedError:
        return CommandFailedError(self.node, f"probe returned {what}")

    def mapping(self, doc: Mapping[str, Any], key: str, *,
                optional: bool = False) -> Mapping[str, Any] | None:
        value = doc.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, Mapping):
            raise self.fail(f"no {key!r} section{self._why(doc, key)}")
        return value

    def _why(self, doc: Mapping[str, Any], key: str) -> str:
        errors = doc.get("errors")
        if isinstance(errors, list):
            related = [str(e) for e in errors if str(e).startswith(key)]
            if related:
                return f" ({related[0]})"
        return ""

    def string(self, doc: Mapping[str, Any], key: str, *, default: str | None = None) -> str:
        value = doc.get(key, default)
        if not isinstance(value, str):
            raise self.fail(f"a bad {key!r}: {value!r}")
        return value

    def opt_string(self, doc: Mapping[str, Any], key: str) -> str | None:
        value = doc.get(key)
        if value is None:
            return None
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise self.fail(f"a bad {key!r}: {value!r}")

    def number(self, doc: Mapping[str, Any], key: str, where: str) -> float:
        value = doc.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(f"a bad {where}.{key}: {value!r}")
        return float(value)

    def opt_number(self, doc: Mapping[str, Any], key: str, where: str) -> float | None:
        if doc.get(key) is None:
            return None
        return self.number(doc, key, where)

    def count(self, doc: Mapping[str, Any], key: str, where: str) -> int | None:
        value = doc.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.fail(f"a bad {where}.{key}: {value!r}")
        return value

    def facts(self, doc: Any) -> NodeFacts:
        if not isinstance(doc, Mapping):
            raise self.fail(f"a {type(doc).__name__} instead of a JSON object")
        version = doc.get("probe_version")
        if version != SUPPORTED_PROBE_VERSION:
            raise self.fail(f"probe_version {version!r}, expected {SUPPORTED_PROBE_VERSION}")
        errors = doc.get("errors", [])
        if not isinstance(errors, list):
            raise self.fail("a bad 'errors' list")
        if not isinstance(doc.get("hostname"), str):
            raise self.fail(f"no hostname{self._why(doc, 'system')}")

        memory = self.mapping(doc, "memory")
        assert memory is not None
        total = self.number(memory, "total_bytes", "memory")
        available = self.number(memory, "available_bytes", "memory")
        if total <= 0 or available < 0:
            raise self.fail(f"impossible memory figures: total {total}, available {available}")
        nvmap = self.opt_number(memory, "nvmap_used_bytes", "memory")
        swap = self.opt_number(memory, "swap_total_bytes", "memory")

        cpu = self.mapping(doc, "cpu")
        assert cpu is not None
        counts = {k: self.count(cpu, k, "cpu") for k in ("count", "present", "online", "usable")}
        present = counts["present"] or counts["count"]
        if not present:
            raise self.fail("no CPU count")
        online = counts["online"] or present
        usable = counts["usable"] or online

        load = doc.get("load")
        if load is None:
            load_t = (0.0, 0.0, 0.0)
        elif (isinstance(load, list) and len(load) == 3
              and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in load)):
            load_t = (float(load[0]), float(load[1]), float(load[2]))
        else:
            raise self.fail(f"a bad load average: {load!r}")

        disk = self.mapping(doc, "disk", optional=True)
        disk_total = disk_free = None
        disk_path = None
        if disk is not None:
            disk_total = self.number(disk, "total_bytes", "disk") / GIB
            disk_free = self.number(disk, "free_bytes", "disk") / GIB
            disk_path = self.opt_string(disk, "path")

        return NodeFacts(
            node=self.node,
            hostname=doc["hostname"],
            arch=self.string(doc, "arch", default=""),
            os=self.string(doc, "os", default=""),
            kernel=self.string(doc, "kernel", default=""),
            python=self.string(doc, "python", default=""),
            cpu_present=present,
            cpu_online=online,
            cpu_usable=usable,
            load=load_t,
            mem_total_gb=total / GIB,
            mem_available_gb=min(available, total) / GIB,
            nvmap_used_gb=None if nvmap is None else nvmap / GIB,
            swap_total_gb=None if swap is None else swap / GIB,
            disk_path=disk_path,
            disk_total_gb=disk_total,
            disk_free_gb=disk_free,
            temperatures=self.temperatures(doc.get("temperatures", [])),
            gpus=self.gpus(doc.get("gpus", [])),
            jetson=self.jetson(doc.get("jetson")),
            pi=self.pi(doc.get("pi")),
            errors=tuple(str(e) for e in errors),
        )

    def temperatures(self, raw: Any) -> tuple[tuple[str, float], ...]:
        if not isinstance(raw, list):
            raise self.fail("a bad 'temperatures' list")
        out = []
        for item in raw:
            if not isinstance(item, Mapping):
                raise self.fail(f"a bad temperature entry: {item!r}")
            out.append((self.string(item, "name"), self.number(item, "celsius", "temperature")))
        return tuple(out)

    def gpus(self, raw: Any) -> tuple[GpuInfo, ...]:
        if not isinstance(raw, list):
            raise self.fail("a bad 'gpus' list")
        out = []
        for i, item in enumerate(raw):
            if not isinstance(item, Mapping):
                raise self.fail(f"a bad GPU entry: {item!r}")
            index = self.count(item, "index", "gpu")
            out.append(GpuInfo(
                index=i if index is None else index,
                name=self.string(item, "name", default="GPU"),
                vendor=self.string(item, "vendor", default="unknown"),
                uuid=self.opt_string(item, "uuid"),
                memory_total_mb=self.opt_number(item, "memory_total_mb", "gpu"),
                memory_used_mb=self.opt_number(item, "memory_used_mb", "gpu"),
                utilization_pct=self.opt_number(item, "utilization_pct", "gpu"),
                temperature_c=self.opt_number(item, "temperature_c", "gpu"),
                power_w=self.opt_number(item, "power_w", "gpu"),
                driver=self.opt_string(item, "driver"),
                compute_cap=self.opt_string(item, "compute_cap"),
                throttle_reasons=self.opt_string(item, "throttle_reasons"),
            ))
        return tuple(out)

    def jetson(self, raw: Any) -> JetsonInfo | None:
        if raw is None:
            return None
        if not isinstance(raw, Mapping):
            raise self.fail("a bad 'jetson' section")
        jtop = raw.get("jtop") if isinstance(raw.get("jtop"), Mapping) else {}
        compatible = raw.get("compatible") or []
        if not isinstance(compatible, list):
            raise self.fail("a bad jetson.compatible list")
        power = self.opt_number(raw, "power_mw", "jetson")
        gpu_power = self.opt_number(raw, "gpu_power_mw", "jetson")
        return JetsonInfo(
            model=self.opt_string(raw, "model"),
            l4t_release=self.opt_string(raw, "l4t_release"),
            jetpack=self.opt_string(jtop, "jetpack") if jtop else None,
            power_mw=None if power is None else int(power),
            gpu_power_mw=None if gpu_power is None else int(gpu_power),
            gpu_utilization_pct=self.opt_number(raw, "gpu_utilization_pct", "jetson"),
            compatible=tuple(str(c) for c in compatible),
            nvpmodel=self.opt_string(raw, "nvpmodel"),
        )

    def pi(self, raw: Any) -> PiInfo | None:
        if raw is None:
            return None
        if not isinstance(raw, Mapping):
            raise self.fail("a bad 'pi' section")
        flags = raw.get("throttled_flags") or []
        if not isinstance(flags, list):
            raise self.fail("a bad pi.throttled_flags list")
        return PiInfo(
            model=self.string(raw, "model"),
            temperature_c=self.opt_number(raw, "temperature_c", "pi"),
            throttled=self.count(raw, "throttled", "pi"),
            throttled_flags=tuple(str(f) for f in flags),
        )
