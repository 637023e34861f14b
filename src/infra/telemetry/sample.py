"""One telemetry sample as the node's sampler writes it (one JSON object per line).

The node (``remote/telemetry.py``) writes ``telemetry.jsonl`` next to the instance's log; the
coordinator appends its bytes to ``logs/<run>/<instance>.telemetry.jsonl``. Every field but
``t`` may be absent (not measurable on that board); a line that is not a JSON object with a
numeric ``t`` is skipped, never an error: the file is a record, and a torn last line must not
hide the rest. The field list per board is in docs/records.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

INPUT_RAILS = ("VDD_IN", "POM_5V_IN")
"""Jetson rails that measure the whole board's input (Orin / Xavier+Nano), in that order."""


def _num(doc: Mapping[str, Any], key: str) -> float | None:
    """A finite number at ``key`` (bools and everything else: None)."""
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _map(doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = doc.get(key)
    return value if isinstance(value, Mapping) else {}


def _named(doc: Mapping[str, Any], key: str) -> tuple[tuple[str, float], ...]:
    """A ``{name: number}`` mapping as sorted pairs, non-numbers dropped."""
    found = _map(doc, key)
    return tuple(sorted((str(k), v) for k, v in
                        ((k, _num(found, k)) for k in found) if v is not None))


@dataclass(frozen=True)
class GpuSample:
    """One allocated NVIDIA GPU at the sample's time (``nvidia-smi`` / NVML)."""

    index: str
    util_percent: float | None = None
    mem_used_mb: float | None = None
    mem_total_mb: float | None = None
    power_w: float | None = None
    temp_c: float | None = None
    sm_clock_mhz: float | None = None
    mem_clock_mhz: float | None = None

    @classmethod
    def of(cls, doc: Mapping[str, Any]) -> GpuSample:
        return cls(index=str(doc.get("index", "")), util_percent=_num(doc, "util_percent"),
                   mem_used_mb=_num(doc, "mem_used_mb"), mem_total_mb=_num(doc, "mem_total_mb"),
                   power_w=_num(doc, "power_w"), temp_c=_num(doc, "temp_c"),
                   sm_clock_mhz=_num(doc, "sm_clock_mhz"),
                   mem_clock_mhz=_num(doc, "mem_clock_mhz"))


@dataclass(frozen=True)
class JetsonSample:
    """A Jetson board's integrated GPU, memory controller, clocks, power rails and sensors."""

    gpu_load_percent: float | None = None
    gpu_mhz: float | None = None
    emc_percent: float | None = None
    emc_mhz: float | None = None
    cpu_mhz: tuple[float, ...] = ()
    rails_mw: tuple[tuple[str, float], ...] = ()
    power_mw: float | None = None
    temps_c: tuple[tuple[str, float], ...] = ()
    nvpmodel: str | None = None

    @classmethod
    def of(cls, doc: Mapping[str, Any]) -> JetsonSample:
        cpus = doc.get("cpu_mhz")
        cpu_mhz = tuple(float(v) for v in cpus if isinstance(v, (int, float))
                        and not isinstance(v, bool)) if isinstance(cpus, list) else ()
        mode = doc.get("nvpmodel")
        return cls(gpu_load_percent=_num(doc, "gpu_load_percent"), gpu_mhz=_num(doc, "gpu_mhz"),
                   emc_percent=_num(doc, "emc_percent"), emc_mhz=_num(doc, "emc_mhz"),
                   cpu_mhz=cpu_mhz, rails_mw=_named(doc, "rails_mw"),
                   power_mw=_num(doc, "power_mw"), temps_c=_named(doc, "temps_c"),
                   nvpmodel=str(mode) if isinstance(mode, (str, int)) else None)

    @property
    def board_mw(self) -> float | None:
        """The board's input power: ``power_mw``, else the input rail (VDD_IN, POM_5V_IN)."""
        if self.power_mw is not None:
            return self.power_mw
        rails = dict(self.rails_mw)
        for name in INPUT_RAILS:
            if name in rails:
                return rails[name]
        return None


@dataclass(frozen=True)
class PiSample:
    """A Raspberry Pi's SoC temperature, throttle flags (``get_throttled``) and ARM clock."""

    temp_c: float | None = None
    throttled: str | None = None
    arm_mhz: float | None = None

    @classmethod
    def of(cls, doc: Mapping[str, Any]) -> PiSample:
        flags = doc.get("throttled")
        return cls(temp_c=_num(doc, "temp_c"),
                   throttled=str(flags) if isinstance(flags, (str, int)) else None,
                   arm_mhz=_num(doc, "arm_mhz"))

    @property
    def throttled_now(self) -> bool | None:
        """Under-voltage, capped or throttled right now (bits 0-3 of ``get_throttled``)."""
        if self.throttled is None:
            return None
        try:
            return bool(int(self.throttled, 0) & 0xF)
        except ValueError:
            return None


@dataclass(frozen=True)
class Sample:
    """What one instance used, and how its node was, at time ``t`` (epoch seconds)."""

    t: float
    cpu_percent: float | None = None       # the process tree, % of one core (may pass 100)
    rss_bytes: float | None = None         # the process tree's resident memory
    procs: int | None = None               # processes in the tree
    node_cpu_percent: float | None = None  # the whole node, % of all its cores
    node_mem_used_bytes: float | None = None
    node_mem_total_bytes: float | None = None
    load1: float | None = None
    temps_c: tuple[tuple[str, float], ...] = ()  # the node's thermal zones by type
    gpus: tuple[GpuSample, ...] = ()
    jetson: JetsonSample | None = None
    pi: PiSample | None = None

    @property
    def max_temp_c(self) -> float | None:
        """The hottest sensor of the node (thermal zones, Jetson sensors, Pi SoC, GPUs)."""
        values = [c for _, c in self.temps_c]
        if self.jetson is not None:
            values += [c for _, c in self.jetson.temps_c]
        if self.pi is not None and self.pi.temp_c is not None:
            values.append(self.pi.temp_c)
        values += [g.temp_c for g in self.gpus if g.temp_c is not None]
        return max(values) if values else None

    @property
    def power_w(self) -> float | None:
        """Power drawn: a Jetson's board input, else the sum of the allocated GPUs' power."""
        board = self.jetson.board_mw if self.jetson is not None else None
        if board is not None:
            return board / 1000.0
        watts = [g.power_w for g in self.gpus if g.power_w is not None]
        return sum(watts) if watts else None

    @property
    def gpu_util_percent(self) -> float | None:
        """The busiest allocated GPU's utilisation, else a Jetson's integrated GPU load."""
        utils = [g.util_percent for g in self.gpus if g.util_percent is not None]
        if utils:
            return max(utils)
        return self.jetson.gpu_load_percent if self.jetson is not None else None

    @property
    def gpu_mem_mb(self) -> float | None:
        """Memory used on the allocated GPUs, summed (None without discrete GPUs)."""
        used = [g.mem_used_mb for g in self.gpus if g.mem_used_mb is not None]
        return sum(used) if used else None

    @classmethod
    def of(cls, doc: Mapping[str, Any]) -> Sample | None:
        """Decode one sample object; None when it has no usable ``t``."""
        t = _num(doc, "t")
        if t is None:
            return None
        node = _map(doc, "node")
        procs = doc.get("procs")
        gpus = doc.get("gpus")
        jetson = doc.get("jetson")
        pi = doc.get("pi")
        return cls(
            t=t, cpu_percent=_num(doc, "cpu_percent"), rss_bytes=_num(doc, "rss_bytes"),
            procs=procs if isinstance(procs, int) and not isinstance(procs, bool) else None,
            node_cpu_percent=_num(node, "cpu_percent"),
            node_mem_used_bytes=_num(node, "mem_used_bytes"),
            node_mem_total_bytes=_num(node, "mem_total_bytes"), load1=_num(node, "load1"),
            temps_c=_named(node, "temps_c"),
            gpus=tuple(GpuSample.of(g) for g in gpus if isinstance(g, Mapping))
            if isinstance(gpus, list) else (),
            jetson=JetsonSample.of(jetson) if isinstance(jetson, Mapping) else None,
            pi=PiSample.of(pi) if isinstance(pi, Mapping) else None)


def parse_line(line: bytes | str) -> Sample | None:
    """One line of a telemetry file; None for a blank, torn or malformed line."""
    try:
        doc = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return Sample.of(doc) if isinstance(doc, Mapping) else None
