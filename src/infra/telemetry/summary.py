"""One instance's telemetry in a few numbers: for ``compare``, the report and MLflow."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from infra.telemetry.sample import Sample

PREFIX = "telemetry."


def _values(samples: Sequence[Sample], get: Callable[[Sample], float | None]) -> list[float]:
    return [v for v in (get(s) for s in samples) if v is not None]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _max(values: Sequence[float]) -> float | None:
    return max(values) if values else None


def _energy(samples: Sequence[Sample]) -> float | None:
    """Joules by the trapezoid rule over consecutive samples that both know the power."""
    total = 0.0
    known = False
    for a, b in itertools.pairwise(samples):
        pa, pb = a.power_w, b.power_w
        if pa is None or pb is None or b.t <= a.t:
            continue
        total += (pa + pb) / 2.0 * (b.t - a.t)
        known = True
    return total if known else None


@dataclass(frozen=True)
class Summary:
    """Means and peaks of one instance's samples (None: never measured)."""

    samples: int
    duration_s: float
    cpu_mean: float | None = None
    cpu_max: float | None = None
    rss_max_bytes: float | None = None
    gpu_util_mean: float | None = None
    gpu_util_max: float | None = None
    gpu_mem_max_mb: float | None = None
    power_mean_w: float | None = None
    energy_j: float | None = None
    temp_max_c: float | None = None

    def as_metrics(self) -> dict[str, float]:
        """The known values as flat metric names (``telemetry.cpu_percent.mean``, ...)."""
        pairs = {
            "samples": float(self.samples), "duration_s": self.duration_s,
            "cpu_percent.mean": self.cpu_mean, "cpu_percent.max": self.cpu_max,
            "rss_bytes.max": self.rss_max_bytes,
            "gpu_util_percent.mean": self.gpu_util_mean,
            "gpu_util_percent.max": self.gpu_util_max, "gpu_mem_mb.max": self.gpu_mem_max_mb,
            "power_w.mean": self.power_mean_w, "energy_j": self.energy_j,
            "temp_c.max": self.temp_max_c,
        }
        return {PREFIX + k: v for k, v in pairs.items() if v is not None}


def summarize(samples: Sequence[Sample]) -> Summary:
    """Summarize samples in time order (an empty sequence gives ``samples=0``)."""
    ordered = sorted(samples, key=lambda s: s.t)
    cpu = _values(ordered, lambda s: s.cpu_percent)
    gpu = _values(ordered, lambda s: s.gpu_util_percent)
    power = _values(ordered, lambda s: s.power_w)
    return Summary(
        samples=len(ordered),
        duration_s=ordered[-1].t - ordered[0].t if ordered else 0.0,
        cpu_mean=_mean(cpu), cpu_max=_max(cpu),
        rss_max_bytes=_max(_values(ordered, lambda s: s.rss_bytes)),
        gpu_util_mean=_mean(gpu), gpu_util_max=_max(gpu),
        gpu_mem_max_mb=_max(_values(ordered, lambda s: s.gpu_mem_mb)),
        power_mean_w=_mean(power), energy_j=_energy(ordered),
        temp_max_c=_max(_values(ordered, lambda s: s.max_temp_c)))
