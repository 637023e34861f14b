"""Per-task overhead of a node-side pool on this machine (local transport, real daemon).

Hands N tasks of ``true`` to one pool with W workers in one pool-sync (closed), waits until
the pool is done and prints wall time / task, wall time measured from the pool-sync call to
the last task's recorded end (the pool's cleanup and the slow done-poll are not counted).
``BENCH_DIR`` picks the filesystem (default: the temp dir); fsync costs depend on it. Not a test: numbers depend on the machine.

    .venv/bin/python scripts/bench_pool.py [--tasks 500] [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from infra.config.model import NodeConfig
from infra.runner.supervisor_client import (
    PoolSyncRequest,
    RestartPolicy,
    StartRequest,
    SupervisorClient,
)
from infra.transport.local import LocalTransport


async def bench(tasks: int, workers: int, command: str) -> tuple[float, float]:
    """(Seconds from the pool-sync call until the last task's end was recorded, CPU seconds
    used by the daemon and its children meanwhile, sampled until shortly before the end)."""
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as work:
        node = NodeConfig(name="local", host="localhost", remote_work_dir=work,
                          python_path=sys.executable)
        client = SupervisorClient(LocalTransport("local"), node)
        await client.ensure_installed()
        adds = tuple(StartRequest(run_id="r-bench", instance_id=f"t.{i:04d}", command=command,
                                  restart=RestartPolicy(auto_restart=False))
                     for i in range(tasks))
        began = time.time()
        await client.pool_sync(PoolSyncRequest(run_id="r-bench", pool="p", workers=workers,
                                               add=adds, close=True))
        daemon = Path(work) / ".infra/runs/r-bench/.pools/p/daemon.json"
        cpu = 0.0
        while True:  # polled slowly: each poll is a process that competes for the CPUs
            cpu = max(cpu, tree_cpu(daemon))
            pools = await client.pools("r-bench")
            if pools and pools[0].phase.is_final and not pools[0].daemon_alive:
                break
            await asyncio.sleep(0.2)
        ends = [s.ended_at or began for s in await client.status("r-bench")]
        return max(ends) - began, cpu  # until the last task's supervisor recorded its end


def tree_cpu(daemon_doc: Path) -> float:
    """CPU seconds of the pool daemon and every process it reaped (supervisors, tasks)."""
    try:
        pid = json.loads(daemon_doc.read_text())["pid"]
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError, KeyError):
        return 0.0
    fields = stat[stat.rfind(")") + 2:].split()
    ticks = sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--command", default="true")
    args = parser.parse_args()
    wall, cpu = asyncio.run(bench(args.tasks, args.workers, args.command))
    print(f"{args.tasks} tasks of {args.command!r}, {args.workers} workers: {wall:.2f} s, "
          f"{1000 * wall / args.tasks:.1f} ms/task wall, "
          f"{1000 * wall * args.workers / args.tasks:.1f} ms/task per worker, "
          f"CPU (daemon + supervisors + tasks) {1000 * cpu / args.tasks:.1f} ms/task; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
