#!/usr/bin/env python3
"""The node-side cost of telemetry: the supervisor's own CPU time with sampling on and off.

Starts two instances of the same sleeping command on this machine through the real node-side
supervisor (``SupervisorClient`` over the local transport, as on a node), side by side and at
the same time: one with ``telemetry_interval`` (1 s by default), one without. After a short
warm-up it reads each supervisor's utime+stime from ``/proc/PID/stat`` (its threads included:
the sampler runs in one) and, for the sampled one, the helper children it started
(``nvidia-smi -lms`` or ``tegrastats`` where present), over the same ``--duration`` (20 s by
default), and prints each as % of one core and the difference. The issue's bar: at most 1%
of one core at 1 s. ``--extra-procs N`` starts N sleeping processes outside the instance so
that the /proc scan of a busy node is priced too.

    python scripts/bench_telemetry.py [--duration 20] [--interval 1] [--extra-procs 0]

Exit 0 when the difference is within the bar, 1 when it is not, 2 when it could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from infra.config.model import NodeConfig
from infra.runner.supervisor_client import StartRequest, SupervisorClient
from infra.transport.local import LocalTransport

BAR_PERCENT = 1.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def stat_fields(pid: int) -> list[str] | None:
    """The fields after the command name in /proc/PID/stat, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def cpu_ticks(pid: int) -> int:
    """utime+stime of one process (all its threads)."""
    fields = stat_fields(pid)
    return int(fields[11]) + int(fields[12]) if fields else 0


def helpers(supervisor: int, instance_pgid: int) -> list[int]:
    """The supervisor's children that are not the instance (the sampler's helpers)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = stat_fields(int(name))
            if fields and int(fields[1]) == supervisor and int(fields[2]) != instance_pgid:
                out.append(int(name))
    return out


def usage(supervisor: int, pgid: int) -> int:
    """Ticks of the supervisor and of its helper children."""
    return cpu_ticks(supervisor) + sum(cpu_ticks(p) for p in helpers(supervisor, pgid))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--extra-procs", type=int, default=0)
    args = parser.parse_args()
    if not os.path.isdir("/proc/self"):
        print("bench_telemetry: needs Linux /proc", file=sys.stderr)
        return 2
    noise = [subprocess.Popen(["sleep", str(args.duration + 60)])
             for _ in range(max(0, args.extra_procs))]
    with tempfile.TemporaryDirectory(prefix="bench-telemetry-") as work:
        node = NodeConfig(name="local", host="localhost", remote_work_dir=work,
                          python_path=sys.executable)
        client = SupervisorClient(LocalTransport(node.name), node)
        try:
            return asyncio.run(measure(client, Path(work), args))
        finally:
            asyncio.run(client.stop("bench", grace=1.0))
            for proc in noise:
                proc.kill()
                proc.wait()


async def measure(client: SupervisorClient, work: Path, args: argparse.Namespace) -> int:
    """Run both instances side by side and print the comparison."""
    sleeper = f"sleep {int(args.duration + 120)}"
    ids = {"on": args.interval, "off": 0.0}
    states = {}
    for iid, interval in ids.items():
        states[iid] = await client.start(StartRequest(run_id="bench", instance_id=iid,
                                                      command=sleeper,
                                                      telemetry_interval=interval))
    pids = {}
    for iid, state in states.items():
        doc = json.loads((work / ".infra" / "runs" / "bench" / iid / "state.json").read_text())
        pids[iid] = (int(doc["supervisor_pid"]), int(state.pgid or doc["pgid"]))
    time.sleep(min(3.0, args.interval * 2 + 0.5))  # the first samples and helper start-up
    before = {iid: usage(*pids[iid]) for iid in ids}
    began = time.monotonic()
    time.sleep(args.duration)
    seconds = time.monotonic() - began
    after = {iid: usage(*pids[iid]) for iid in ids}
    lines = (work / ".infra" / "runs" / "bench" / "on" / "telemetry.jsonl").read_text()
    percent = {iid: 100.0 * (after[iid] - before[iid]) / CLK_TCK / seconds for iid in ids}
    procs = len([n for n in os.listdir("/proc") if n.isdigit()])
    print(f"processes on this machine: {procs}; duration {seconds:.1f} s; "
          f"samples written: {len(lines.splitlines())}")
    print(f"telemetry off        : {percent['off']:6.3f} % of one core")
    print(f"telemetry every {args.interval:g} s : {percent['on']:6.3f} % of one core")
    diff = percent["on"] - percent["off"]
    print(f"difference           : {diff:6.3f} % of one core (bar: {BAR_PERCENT:g} %)")
    return 0 if diff <= BAR_PERCENT else 1


if __name__ == "__main__":
    sys.exit(main())
