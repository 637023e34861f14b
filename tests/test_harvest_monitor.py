"""Batched harvest, coordinator side: a campaign of many short tasks on the local node, run to
the end by the node's pool with no coordinator attached (``dispatch: all``), then watched by
the real monitor in-process. Every log and results file must come home exactly once, and the
remote calls spent bringing them home must be a few batches, not several per task (counted
by a thin wrapper around the real local transport)."""

from __future__ import annotations

import asyncio
import json
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.config import load_cluster
from infra.monitor.loop import Monitor
from infra.runner.lifecycle import RunSession
from infra.state import InstancePhase, Store
from infra.transport.local import LocalTransport
from infra.transport.pool import ConnectionPool
from tests.builders import wait_for

TASKS = 40
BIG = 70_000  # above the inline limit: this one file travels by the ordinary copy
LONG = 2_500_000  # a log longer than one batch brings: the rest is read to its end
COMMAND = ("echo task {seed}; mkdir -p out; echo {seed} > out/{seed}.txt; "
           "printf '{{\"seed\": %s}}' {seed} > \"$INFRA_RESULTS_DIR/metrics.json\"; "
           "if [ {seed} = 0 ]; then head -c " + str(BIG) + " /dev/zero "
           "> \"$INFRA_RESULTS_DIR/big.bin\"; fi; "
           "if [ {seed} = 1 ]; then head -c " + str(LONG) + " /dev/zero | tr '\\0' x; echo; fi")


def cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "infra.cli.main", *args], cwd=root,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture()
def campaign(tmp_path: Path) -> tuple[Path, Path]:
    """A project with only the local node, and a 40-task campaign spec."""
    root = tmp_path / "proj"
    (root / "experiments").mkdir(parents=True)
    work = tmp_path / "node"
    config = {"nodes": [{"name": "local", "host": "localhost", "remote_work_dir": str(work),
                         "ram_gb": 8.0, "max_instances": 4, "python_path": sys.executable}],
              "failover": {"auto_restart": False}, "deploy": {"source": "."}}
    (root / "cluster_config.yaml").write_text(yaml.safe_dump(config))
    spec = {"experiment_id": "many", "command": COMMAND, "ram_gb": 0.1,
            "results": ["out/{seed}.txt"], "sweep": {"repeat": TASKS},
            "suite": {"workers": 2}, "dispatch": "all"}
    (root / "experiments" / "many.yaml").write_text(yaml.safe_dump(spec))
    return root, work


def all_ended(work: Path, run_id: str) -> bool:
    states = []
    for i in range(TASKS):
        path = work / ".infra" / "runs" / run_id / f"many.{i:04d}" / "state.json"
        try:
            states.append(json.loads(path.read_text()).get("state"))
        except (OSError, ValueError):
            return False
    return all(s == "exited" for s in states)


def counting(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Count the local transport's calls by kind: supervisor subcommand, lister, copy."""
    calls: Counter[str] = Counter()
    real_run, real_get = LocalTransport.run, LocalTransport.get

    async def run(self: LocalTransport, command: Any, **kw: Any) -> Any:
        words = shlex.split(command) if isinstance(command, str) else list(command)
        for i, word in enumerate(words[:-1]):
            if word.endswith("/supervisor.py"):
                calls[f"supervisor {words[i + 1]}"] += 1
        if "Node-side results lister" in (kw.get("input") or ""):
            calls["lister"] += 1
        return await real_run(self, command, **kw)

    async def get(self: LocalTransport, *args: Any, **kw: Any) -> Any:
        calls["get"] += 1
        return await real_get(self, *args, **kw)

    monkeypatch.setattr(LocalTransport, "run", run)
    monkeypatch.setattr(LocalTransport, "get", get)
    return calls


def test_ended_tasks_come_home_in_batches_each_file_once(campaign: tuple[Path, Path],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    root, work = campaign
    proc = cli(root, "--config", "experiments/many.yaml", "--auto-place",
               "--monitor-duration", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    run_id = json.loads(proc.stdout)["run_id"]
    wait_for(lambda: all_ended(work, run_id), timeout=240, interval=0.2)

    calls = counting(monkeypatch)
    cluster = load_cluster(root / "cluster_config.yaml")
    store = Store.for_log_dir(cluster.log_dir)

    async def watch() -> bool:
        async with ConnectionPool(cluster) as pool:
            session = RunSession(cluster, store, pool)
            outcome = await Monitor(session, run_id, tick=0.5).run(240)
            return outcome.finished

    assert asyncio.run(watch())
    home = cluster.log_dir / run_id
    for i in range(TASKS):
        iid = f"many.{i:04d}"
        rec = store.instance(run_id, iid)
        assert rec.state is InstancePhase.EXITED and rec.results_fetched, rec
        assert rec.results_missing == (), rec.results_missing
        tail = "x" * LONG + "\n" if i == 1 else ""
        assert (home / f"{iid}.log").read_text() == f"task {i}\n{tail}"  # once, whole
        assert json.loads((home / iid / "results" / "metrics.json").read_text()) == {"seed": i}
        assert (home / iid / "out" / f"{i}.txt").read_text() == f"{i}\n"
        left = sorted(p.name for p in (home / iid).rglob("*") if p.is_file())
        expect = sorted([f"{i}.txt", "metrics.json", *(["big.bin"] if i == 0 else [])])
        assert left == expect, left  # no temporary names left behind
    assert (home / "many.0000" / "results" / "big.bin").stat().st_size == BIG
    # one batched call per node and tick; the old way was a read, a status, two listings
    # and one copy per file for every task
    spent = calls["supervisor harvest"] + calls["supervisor read"] + calls["lister"] \
        + calls["get"]
    assert calls["lister"] == 0, calls
    assert calls["supervisor read"] <= 2, calls  # the long log's rest, in 1 MiB reads
    assert calls["get"] == 1, calls  # big.bin only: the small files came inline
    assert 1 <= calls["supervisor harvest"] <= 3, calls
    assert spent * 4 <= TASKS, calls
    store.close()
