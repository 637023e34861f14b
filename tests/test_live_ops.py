"""Live operation on the real sshd fleet: node loss walked through its states, recovery by
policy (move / pause), stale copies stopped, crash loops, reattach after SIGKILL, lease."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from infra.config import load_cluster
from infra.monitor.loop import Monitor
from infra.monitor.saved import SavedState
from infra.runner.lifecycle import RunSession, local_log_path
from infra.state import InstancePhase, Store
from infra.transport.pool import ConnectionPool
from tests.sshfleet import SSHFleet
from tests.test_run_e2e import (
    _instance_state,
    check_log,
    cli,
    project,
    spec,
    status_json,
    wait_for,
)

pytestmark = pytest.mark.integration
__all__ = ["project"]  # the fixture, re-used


def fast_health(root: Path, **extra: Any) -> None:
    """Tight health settings so node loss is decided in seconds."""
    cfg = yaml.safe_load((root / "cluster_config.yaml").read_text())
    cfg["health_check"].update({"interval_seconds": 1, "timeout_seconds": 3,
                                "keepalive_seconds": 1, "keepalive_count_max": 2,
                                "reconnect_attempts": 1, "disconnected_grace_seconds": 1})
    cfg["failover"] = {"auto_restart": True, "retry_delay_seconds": 0.2,
                       "fence_timeout_seconds": 3}
    cfg.update(extra)
    (root / "cluster_config.yaml").write_text(yaml.safe_dump(cfg))


def monitor(root: Path, run_id: str, duration: float, *,
            during: Any = None, once: Any = None) -> tuple[list[tuple[str, str, str]], Store]:
    """Run the live loop in-process for at most ``duration`` s; returns the events seen.

    ``during()`` runs in a thread while the loop goes on, as soon as ``once(session)`` holds
    (e.g. "the watcher has renewed the fence on node1").
    """
    cluster = load_cluster(root / "cluster_config.yaml")
    store = Store.for_log_dir(cluster.log_dir)
    seen: list[tuple[str, str, str]] = []

    async def go() -> None:
        async with ConnectionPool(cluster) as pool:
            session = RunSession(cluster, store, pool,
                                 emit=lambda k, s, m: seen.append((k, s, m)))
            saved = SavedState(cluster.log_dir)
            try:
                watch = asyncio.ensure_future(
                    Monitor(session, run_id, tick=0.5, saved=saved).run(duration))
                if during is not None:
                    while not watch.done() and not (once is None or once(session)):
                        await asyncio.sleep(0.1)
                    await asyncio.get_running_loop().run_in_executor(None, during)
                await watch
            finally:
                saved.close()

    asyncio.run(go())
    return seen, store


def node_path(events: list[tuple[str, str, str]], node: str) -> list[str]:
    return [m.split(":")[0] for k, s, m in events if k == "node" and s == node]


def test_lost_node_moves_cluster_work_and_pauses_the_rest(project: Path,
                                                          ssh_fleet: SSHFleet) -> None:
    fast_health(project)
    # long enough to be still running when the node dies, even on a loaded machine
    mover = spec(project, "mover", duration=15.0, interval=0.2, recover="cluster")
    waiter = spec(project, "waiter", duration=15.0, interval=0.2, recover="pause")
    proc = cli(project, "--config", str(mover), "--config", str(waiter),
               "--placement", "mover:node1,waiter:node1", "--monitor-duration", "0")
    assert proc.returncode == 0, proc.stderr
    run_id = status_json(project)["run_id"]
    host = ssh_fleet.host("node1")
    host.stop(kill_user_processes=True)  # the node dies with its experiments
    try:
        events, store = monitor(project, run_id, duration=120)
    finally:
        host.start()
    path = node_path(events, "node1")
    assert path[:1] == ["healthy -> reconnecting"] or path[0].endswith("-> reconnecting")
    assert any(p.endswith("-> disconnected") for p in path)
    assert any(p.endswith("-> offline") for p in path)
    moved = store.instance(run_id, "mover")
    assert moved.node in ("node2", "node3") and moved.moves == 1
    assert moved.previous_nodes == ("node1",)
    assert moved.state is InstancePhase.EXITED and moved.exit_code == 0
    cluster = load_cluster(project / "cluster_config.yaml")
    summary = cluster.log_dir / run_id / "mover" / "out" / "mover" / "summary.json"
    assert json.loads(summary.read_text())["node"] == moved.node
    log = local_log_path(cluster, run_id, "mover").read_text()
    assert f"[orchestrator] moved from node1 to {moved.node}" in log
    paused = store.instance(run_id, "waiter")
    assert paused.state is InstancePhase.PAUSED
    assert "node node1 offline" in paused.reason and "recover: pause" in paused.reason
    saved = sorted((cluster.log_dir / "cluster").glob("cluster_state_*.json"))[-1]
    doc = json.loads(saved.read_text())
    assert doc["instances"]["mover"]["previous_nodes"] == ["node1"]
    assert doc["nodes"]["node1"]["state"] == "offline"
    store.close()


def test_returning_node_has_its_stale_copy_stopped(project: Path, ssh_fleet: SSHFleet,
                                                   go_flag: Path) -> None:
    # fencing off (fence_timeout_seconds: 0): the coordinator moves the work while the old
    # copy still runs behind the partition, and stops that copy when the node is back.
    # The workload runs until the test ends it (go_flag): a fixed 30 s could run out on a
    # loaded machine before the stale copy is found, and then there is nothing to stop.
    fast_health(project, failover={"auto_restart": True, "retry_delay_seconds": 0.2,
                                   "fence_timeout_seconds": 0})
    s = spec(project, "twin", duration=600.0, interval=0.5, recover="cluster", until=go_flag)
    proc = cli(project, "--config", str(s), "--placement", "twin:node2",
               "--monitor-duration", "0")
    assert proc.returncode == 0, proc.stderr
    run_id = status_json(project)["run_id"]
    old_pid = status_json(project, run_id)["instances"][0]["pid"]
    host = ssh_fleet.host("node2")
    host.stop()  # sshd down (a partition): the experiment keeps running on node2
    try:
        events, store = monitor(project, run_id, duration=12)
        moved = store.instance(run_id, "twin")
        assert moved.node != "node2" and moved.state is InstancePhase.RUNNING
        assert psutil.pid_exists(old_pid)  # the first copy still runs behind the partition
    finally:
        host.start()
    # `status` is a reader: it records what node2 says but stops nothing (no lease, no policy)
    status = cli(project, "status", run_id, "--json")
    assert status.returncode == 0, status.stderr
    assert psutil.pid_exists(old_pid) and psutil.Process(old_pid).status() != \
        psutil.STATUS_ZOMBIE
    events, store = monitor(project, run_id, duration=10)
    assert any(k == "stale" and "stopped a stale copy on node2" in m for k, _, m in events)
    wait_for(lambda: not psutil.pid_exists(old_pid) or
             psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE, timeout=15)
    subprocess.run([sys.executable, "-m", "infra.cli.main", "stop", run_id, "--grace", "1"],
                   cwd=project, capture_output=True, timeout=60)
    store.close()


def test_frozen_node_is_noticed_and_does_not_hang(project: Path, ssh_fleet: SSHFleet) -> None:
    fast_health(project)
    s = spec(project, "frozen", duration=20.0, interval=0.5, recover="pause")
    proc = cli(project, "--config", str(s), "--placement", "frozen:node3",
               "--monitor-duration", "0")
    assert proc.returncode == 0, proc.stderr
    run_id = status_json(project)["run_id"]
    host = ssh_fleet.host("node3")
    host.pause()  # SIGSTOP sshd, its sessions and the user's processes
    try:
        events, store = monitor(project, run_id, duration=20)
        path = node_path(events, "node3")
        assert any(p.endswith("-> offline") for p in path), path
        rec = store.instance(run_id, "frozen")
        assert rec.state is InstancePhase.PAUSED
        store.close()
    finally:
        host.resume()
    subprocess.run([sys.executable, "-m", "infra.cli.main", "stop", run_id, "--grace", "1"],
                   cwd=project, capture_output=True, timeout=60)


def test_crash_loop_reasons_reach_status_and_events(project: Path) -> None:
    fast_health(project)
    crasher = project / "crash.py"
    crasher.write_text("import os, signal\nopen('attempts.txt', 'a').write('x')\n"
                       "os.kill(os.getpid(), signal.SIGSEGV)\n")
    s = spec(project, "crasher", command="python3 crash.py", recover="none", results=[])
    proc = cli(project, "--config", str(s), "--placement", "crasher:node1", "--json")
    doc = json.loads(proc.stdout)
    (inst,) = doc["instances"]
    assert inst["state"] == "failed" and inst["signal"] == "SIGSEGV"
    assert inst["restarts"] == 1  # SIGSEGV aborts after 2 failures
    assert "SIGSEGV" in inst["reason"]
    assert proc.returncode == 1 and "crasher" in proc.stderr
    store = Store(project / "logs" / "state.db")
    events = [e.message for e in store.events(doc["run_id"])]
    assert any("restarted" in m and "SIGSEGV" in m for m in events), events
    store.close()


def test_watch_reattaches_after_sigkill_and_lease_says_who(project: Path,
                                                          go_flag: Path) -> None:
    fast_health(project)
    # back within the fence timeout: the node has not fenced the work, the same copy runs
    cfg = yaml.safe_load((project / "cluster_config.yaml").read_text())
    cfg["failover"]["fence_timeout_seconds"] = 300
    (project / "cluster_config.yaml").write_text(yaml.safe_dump(cfg))
    s = spec(project, "phoenix", duration=300.0, interval=0.2, until=go_flag)
    coord = subprocess.Popen([sys.executable, "-m", "infra.cli.main", "--config", str(s),
                              "--placement", "phoenix:node2"], cwd=project,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    db = project / "logs" / "state.db"
    try:
        wait_for(lambda: db.exists() and _instance_state(db) == "running", timeout=60)
        wait_for(lambda: any(" step " in p.read_text()
                             for p in (project / "logs").glob("*/phoenix.log")),
                 timeout=60)  # the coordinator streams the log home: it is watching
        coord.send_signal(signal.SIGKILL)
        coord.wait(timeout=10)
    finally:
        if coord.poll() is None:
            coord.kill()
    run_id = status_json(project)["run_id"]
    pid = status_json(project, run_id)["instances"][0]["pid"]
    first = subprocess.Popen([sys.executable, "-m", "infra.cli.main", "watch", run_id],
                             cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "COLUMNS": "200"})
    try:
        holder = f"{socket.gethostname()}:{first.pid}"
        wait_for(lambda: _lease(db, run_id) == holder, timeout=30)
        second = cli(project, "watch", run_id, "--duration", "1")
        assert f"watched by {holder}" in second.stderr
        go_flag.touch()  # the workload ends now
        out, err = first.communicate(timeout=90)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    final = status_json(project, run_id)["instances"][0]
    assert final["state"] == "exited" and final["pid"] == pid  # started once, found again
    check_log((project / "logs" / run_id / "phoenix.log").read_text(), "phoenix")
    assert (project / "logs" / run_id / "phoenix" / "out" / "phoenix" / "summary.json").exists()


def _lease(db: Path, run_id: str) -> str | None:
    store = Store(db)
    try:
        row = store.db.execute("SELECT lease_holder FROM runs WHERE run_id=?",
                               (run_id,)).fetchone()
        return row["lease_holder"] if row else None
    finally:
        store.close()


def test_watch_finishes_a_launch_a_dead_coordinator_left_half_done(project: Path) -> None:
    """The run was recorded but the coordinator died before deploying or starting anything:
    `watch` deploys and starts it, exactly once."""
    from infra.config import check_spec_set, load_spec
    from infra.placement import plan

    fast_health(project)
    s = spec(project, "orphan", duration=2.0, interval=0.2)
    cluster = load_cluster(project / "cluster_config.yaml")
    specs = check_spec_set([load_spec(s, cluster)])
    result = plan(cluster, specs, pins={"orphan": "node3"})
    store = Store.for_log_dir(cluster.log_dir)

    async def record_only() -> str:
        async with ConnectionPool(cluster) as pool:
            return RunSession(cluster, store, pool).record_run(specs, result, {})

    run_id = asyncio.run(record_only())
    assert store.instance(run_id, "orphan").state is InstancePhase.PLANNED
    store.close()
    proc = cli(project, "watch", run_id, "--duration", "60", "--json")
    assert proc.returncode == 0, proc.stderr
    inst = json.loads(proc.stdout)["instances"][0]
    assert inst["node"] == "node3" and inst["state"] == "exited" and inst["exit_code"] == 0
    check_log((project / "logs" / run_id / "orphan.log").read_text(), "orphan")
