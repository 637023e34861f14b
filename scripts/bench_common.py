"""Shared helpers for the benchmark scripts: timing with CPU, summaries, tables, a deadline.

The benchmarks start their own loopback sshd fleet (``tests.sshfleet.SSHFleet``), so this
module puts the repository root on ``sys.path`` to import it when run as ``python scripts/X``.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.sshfleet import (  # noqa: E402
    FIRST_HOST_OCTET,
    MAX_HOSTS,
    FleetError,
    SSHFleet,
    unavailable_reason,
)

__all__ = [
    "IDLE_START_S",
    "REPO",
    "BenchFailure",
    "FleetError",
    "SSHFleet",
    "Sample",
    "Series",
    "check_hosts",
    "cluster_yaml",
    "compile_package",
    "deadline",
    "finish",
    "load_note",
    "load_scale",
    "measure",
    "node_python",
    "paired_ratio",
    "print_table",
    "ratio",
    "require_fleet",
    "scaled_deadline",
]


class BenchFailure(RuntimeError):
    """A method did not produce what it should (wrong result count, failed command...)."""


class BenchTimeout(BenchFailure):
    """The whole benchmark ran past its time limit."""


@dataclass(frozen=True)
class Sample:
    """One timed run: wall seconds and client CPU seconds (this process + reaped children)."""

    wall: float
    cpu_self: float
    cpu_children: float

    @property
    def cpu(self) -> float:
        return self.cpu_self + self.cpu_children


@dataclass
class Series:
    """Repeated samples of one method, summarised as median and min."""

    name: str
    samples: list[Sample] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)

    def median(self, attr: str = "wall") -> float:
        """Median of the samples' ``attr`` (NaN when a failing method left none)."""
        values = [getattr(s, attr) for s in self.samples]
        return statistics.median(values) if values else math.nan

    def min(self, attr: str = "wall") -> float:
        values = [getattr(s, attr) for s in self.samples]
        return min(values) if values else math.nan


def _cpu() -> tuple[float, float]:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


@contextlib.contextmanager
def measure(series: Series) -> Iterator[None]:
    """Time the block (wall, self CPU, children CPU) and append the sample to ``series``."""
    self0, kids0 = _cpu()
    t0 = time.perf_counter()
    yield
    wall = time.perf_counter() - t0
    self1, kids1 = _cpu()
    series.add(Sample(wall, self1 - self0, kids1 - kids0))


def paired_ratio(a: Series, b: Series, attr: str = "wall") -> str:
    """Median over rounds of a/b within the same round (robust to load drifting between rounds)."""
    pairs = [getattr(x, attr) / getattr(y, attr)
             for x, y in zip(a.samples, b.samples, strict=False) if getattr(y, attr) > 0]
    return f"{statistics.median(pairs):.2f}x" if pairs else "n/a"


def load_note() -> str:
    """The 1/5/15-minute load averages and core count (other work on the machine skews timings)."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} {five:.1f} {fifteen:.1f} on {os.cpu_count()} cores"


IDLE_START_S = 0.025
"""Wall seconds of ``python3 -c pass`` on an idle machine of this kind: the load reference."""
LOAD_SCALE_MAX = 10.0
"""A limit grows at most tenfold with load: a hung benchmark still ends."""


@dataclass(frozen=True)
class LoadScale:
    """How much slower this machine runs now than idle, and the two measures behind it."""

    factor: float
    start_s: float  # median wall of `python -c pass`, measured now
    load_per_core: float  # 1-minute load average over the core count

    def describe(self) -> str:
        return (f"load factor {self.factor:.2f} (python -c pass {self.start_s * 1000:.0f} ms "
                f"against {IDLE_START_S * 1000:.0f} ms idle; 1-min load {self.load_per_core:.2f} "
                "per core)")


def load_scale(runs: int = 5) -> LoadScale:
    """Measure the machine's slowdown now: max(1, interpreter start / idle start, load/core)."""
    import subprocess
    walls = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True, timeout=60)
        walls.append(time.perf_counter() - t0)
    start = statistics.median(walls)
    per_core = os.getloadavg()[0] / (os.cpu_count() or 1)
    factor = min(LOAD_SCALE_MAX, max(1.0, start / IDLE_START_S, per_core))
    return LoadScale(factor, start, per_core)


@contextlib.contextmanager
def scaled_deadline(base_s: float, scale: LoadScale) -> Iterator[None]:
    """``deadline`` of ``base_s`` (an idle machine's limit) times the load factor; says so."""
    limit = math.ceil(base_s * scale.factor)
    print(f"time limit {limit} s = {base_s:g} s (idle) x {scale.describe()}", flush=True)
    with deadline(limit):
        yield


def ratio(a: float, b: float) -> str:
    """``a / b`` formatted as ``1.23x`` (``n/a`` when b is zero)."""
    return f"{a / b:.2f}x" if b > 0 and not math.isnan(a) else "n/a"


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a plain fixed-width text table (pastes cleanly into an issue)."""
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        first, *rest = row
        return "  ".join([first.ljust(widths[0]),
                          *(c.rjust(w) for c, w in zip(rest, widths[1:], strict=True))])

    print(f"\n{title}")
    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Raise ``BenchTimeout`` in the main thread once ``seconds`` have passed (SIGALRM)."""
    def fire(_signum: int, _frame: FrameType | None) -> None:
        raise BenchTimeout(f"benchmark ran past its {seconds} s limit")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def finish(start_load: str, started: float, failures: Sequence[str]) -> int:
    """The closing lines every fleet benchmark prints (load, total time, failures); its exit
    status: 1 when a method returned wrong results, else 0."""
    print(f"{load_note()} at the end ({start_load} at the start)")
    print(f"total {time.monotonic() - started:.1f} s")
    if failures:
        print("\nFAILURES:")
        for line in failures:
            print("  " + line)
        return 1
    return 0


def compile_package() -> None:
    """Byte-compile the ``infra`` package the CLI runs from, as an installed package is.

    With PYTHONDONTWRITEBYTECODE set (or a tree edited since its last run) every CLI
    subprocess would compile its sources again: start-up figures would count the compiler.
    """
    import compileall

    import infra
    compileall.compile_dir(str(Path(infra.__file__).parent), quiet=1)


def require_fleet() -> None:
    """Exit 2 with the reason when this machine cannot start an sshd fleet."""
    why = unavailable_reason()
    if why is not None:
        print(f"cannot run: {why}", file=sys.stderr)
        raise SystemExit(2)


def check_hosts(n: int) -> None:
    """Exit 2 with one line when ``--hosts`` is outside what the loopback fleet can start."""
    if not 1 <= n <= MAX_HOSTS:
        last = FIRST_HOST_OCTET + MAX_HOSTS - 1
        print(f"--hosts {n}: at most {MAX_HOSTS} hosts (the loopback fleet runs 1..{MAX_HOSTS} "
              f"sshd hosts on 127.0.0.{FIRST_HOST_OCTET}..127.0.0.{last})", file=sys.stderr)
        raise SystemExit(2)


def node_python() -> str:
    """The interpreter the fleet's users run (same rule as the fixture)."""
    return "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


def cluster_yaml(path: Path, fleet: SSHFleet, *, work_dir: Callable[[Any], str],
                 health: dict[str, Any] | None = None,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write a cluster_config.yaml naming every fleet host; returns its path."""
    nodes = [{"name": h.name, "host": h.address, "ssh_port": h.port, "ssh_user": h.user,
              "ssh_key_path": str(fleet.client_key), "remote_work_dir": work_dir(h),
              "python_path": node_python(), "ram_gb": 8.0}
             for h in fleet.hosts]
    doc: dict[str, Any] = {"nodes": nodes,
                           "health_check": {"known_hosts": str(fleet.known_hosts),
                                            **(health or {})}}
    doc.update(extra or {})
    path.write_text(yaml.safe_dump(doc))
    return path
