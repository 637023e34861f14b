"""Benchmark: cost of one dashboard frame (render + export) at 50 nodes / 200 instances.

Compared, in the same run, with a baseline of one plain rich Table of 200 rows rendered and
exported the same way (a recording console of the same size), and prints ms per frame, the
ratio to the baseline and the frames per second each could sustain on one core.

    python scripts/bench_dashboard.py [--frames 50] [--width 160] [--height 50]
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import time
from collections.abc import Callable

from rich.console import Console, RenderableType
from rich.table import Table

from infra.dashboard import render
from infra.monitor.snapshot import (
    EventView,
    GpuView,
    InstanceView,
    NodeState,
    NodeView,
    RunSnapshot,
)

PHASES = ["running"] * 6 + ["exited", "failed", "restarting", "lost", "stopped", "starting"]


def big_snapshot(n_nodes: int = 50, n_instances: int = 200, n_events: int = 100,
                 seed: int = 1) -> RunSnapshot:
    """A busy run: mixed node states, GPUs, Jetson power, every instance phase."""
    rnd = random.Random(seed)
    states = list(NodeState)
    nodes = []
    for k in range(n_nodes):
        state = NodeState.HEALTHY if k % 7 else states[k % len(states)]
        gpus = tuple(GpuView(f"gpu{g}", rnd.uniform(0, 100), rnd.uniform(0, 20000), 24576,
                             rnd.uniform(40, 80)) for g in range(k % 4))
        nodes.append(NodeView(
            f"node-{k:02d}", state, reason="" if state is NodeState.HEALTHY else "probe timeout",
            load1=rnd.uniform(0, 8), cpu_count=8, mem_used_gb=rnd.uniform(0, 64),
            mem_total_gb=64, gpus=gpus, power_mw=23456 if k % 5 == 0 else None,
            temperature_c=rnd.uniform(30, 90), instances=k % 5, max_instances=4))
    instances = []
    for k in range(n_instances):
        phase = PHASES[k % len(PHASES)]
        instances.append(InstanceView(
            f"exp-{k:03d}-sweep", f"node-{k % n_nodes:02d}", phase,
            uptime_seconds=rnd.uniform(0, 200000), restarts=k % 3, moves=k % 2,
            exit_code=1 if phase == "failed" else 0 if phase == "exited" else None,
            signal="SIGKILL" if phase == "lost" else None,
            reason="out of memory" if phase == "failed" else "",
            last_line=f"epoch {k} loss=0.{k:03d} [{'#' * 30}]"))
    events = tuple(EventView(1_700_000_000 + k, "instance", f"exp-{k:03d}-sweep",
                             f"event number {k}") for k in range(n_events))
    return RunSnapshot("bench-run", "running", 1_700_000_100, tuple(nodes), tuple(instances),
                       events)


def baseline_table(snapshot: RunSnapshot) -> Table:
    """The naive dashboard: every instance as a row of one plain Table."""
    table = Table()
    for col in ("instance", "node", "state", "up", "restarts", "moves", "exit", "last line"):
        table.add_column(col)
    for i in snapshot.instances:
        table.add_row(i.instance_id, i.node, i.state, f"{i.uptime_seconds:.0f}", str(i.restarts),
                      str(i.moves), str(i.exit_code), i.last_line)
    return table


Make = Callable[[], RenderableType]


def one_frame(make: Make, width: int, height: int) -> tuple[float, float]:
    """(wall ms, CPU ms) of building a renderable, rendering it and exporting its text."""
    console = Console(record=True, width=width, height=height, file=io.StringIO(),
                      force_terminal=True, color_system="truecolor")
    w0, c0 = time.perf_counter(), time.process_time()
    console.print(make())
    console.export_text()
    return (time.perf_counter() - w0) * 1000, (time.process_time() - c0) * 1000


def measure(methods: dict[str, tuple[Make, int, int]], frames: int) -> dict[str, tuple[float, float]]:
    """Median (wall ms, CPU ms) per method; frames interleaved so all see the same load."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
    for k in range(frames + 3):
        for name, (make, width, height) in methods.items():
            sample = one_frame(make, width, height)
            if k >= 3:  # the first frames warm caches
                samples[name].append(sample)
    return {name: (statistics.median(s[0] for s in got), statistics.median(s[1] for s in got))
            for name, got in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--height", type=int, default=50)
    args = parser.parse_args()
    snapshot = big_snapshot()
    w, h = args.width, args.height
    base_name = f"baseline: one Table of {len(snapshot.instances)} rows, {w} wide"
    results = measure({
        f"dashboard render() {w}x{h}": (lambda: render(snapshot, width=w, height=h), w, h),
        "dashboard render() 80x24": (lambda: render(snapshot, width=80, height=24), 80, 24),
        base_name: (lambda: baseline_table(snapshot), w, h),
    }, args.frames)

    print(f"snapshot: {len(snapshot.nodes)} nodes, {len(snapshot.instances)} instances, "
          f"{len(snapshot.events)} events; render + export_text, median of {args.frames} "
          f"interleaved frames; os.getloadavg()={os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    base_wall, base_cpu = results[base_name]
    print(f"{'method':<44} {'wall ms':>8} {'CPU ms':>8} {'frames/s':>9} {'CPU vs base':>12}")
    for name, (wall, cpu) in results.items():
        print(f"{name:<44} {wall:8.2f} {cpu:8.2f} {1000 / cpu:9.1f} {cpu / base_cpu:11.3f}x")
    dash_wall, dash_cpu = results[f"dashboard render() {w}x{h}"]
    print(f"dashboard frame costs {base_cpu / dash_cpu:.1f}x less CPU than the baseline table "
          f"(wall {base_wall / dash_wall:.1f}x); at 4 frames/s it uses "
          f"{dash_cpu * 4 / 10:.1f}% of one core")


if __name__ == "__main__":
    main()
