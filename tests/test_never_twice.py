"""Never lose, never twice, never overcommit: the guarantees that rest on the node remembering,
checked on the real sshd fleet with the real CLI.

Two coordinators racing for one node, slots freed while nobody watches, a move back to a node
an instance ran on before, a coordinator killed in the middle of a move, a partition that the
node fences before the coordinator starts a replacement, and a detached run never fenced.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from infra.config import load_cluster
from infra.placement import Condition, NodeCondition
from infra.runner.lifecycle import RunSession, local_log_path
from infra.state import InstancePhase, Store
from infra.transport.pool import ConnectionPool
from tests.sshfleet import FleetHost, SSHFleet
from tests.test_live_ops import fast_health, monitor
from tests.test_run_e2e import cli, project, spec, status_json, wait_for

pytestmark = pytest.mark.integration
__all__ = ["project"]


def edit_config(root: Path, name: str = "cluster_config.yaml", **changes: Any) -> Path:
    """Rewrite the project's cluster config (``nodes`` entries are updated by name)."""
    path = root / "cluster_config.yaml"
    cfg = yaml.safe_load(path.read_text())
    for node_name, values in changes.pop("nodes", {}).items():
        for entry in cfg["nodes"]:
            if entry["name"] == node_name:
                entry.update(values)
    for key, values in changes.items():
        cfg.setdefault(key, {}).update(values)
    out = root / name
    out.write_text(yaml.safe_dump(cfg))
    return out


def only_node1(root: Path, **node1: Any) -> None:
    """Every node but node1 switched off, node1 shaped as given."""
    edit_config(root, nodes={"node1": node1, "node2": {"enabled": False},
                             "node3": {"enabled": False}, "local": {"enabled": False}})


def node_file(root: Path, host: FleetHost, *parts: str) -> Path:
    """A file under the project's work dir on a fleet node (root reads it directly)."""
    cfg = yaml.safe_load((root / "cluster_config.yaml").read_text())
    work = next(n["remote_work_dir"] for n in cfg["nodes"] if n["name"] == host.name)
    return Path(work, *parts)


def workloads_of(host: FleetHost) -> list[psutil.Process]:
    """The node user's running workload processes (the Python ones, not their shells)."""
    out = []
    for p in psutil.process_iter(["uids", "cmdline", "status"]):
        try:
            argv = p.info["cmdline"] or []
            if p.info["uids"] and p.info["uids"].real == host.uid and argv and \
                    Path(argv[0]).name.startswith("python") and \
                    any(a.endswith("mind.py") for a in argv) and \
                    p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            continue
    return out


# --------------------------------------------------------------------------- two coordinators

def test_two_coordinators_at_once_never_overcommit_a_node(project: Path,
                                                          ssh_fleet: SSHFleet) -> None:
    """Ten pairs of coordinators, each with its own store (two workstations), launch two
    1.5 GB instances at the same moment onto one 2-slot, 4 GB node: never more than two run."""
    fast_health(project, failover={"auto_restart": False})
    only_node1(project, max_instances=2, ram_gb=4.0)
    sides = {side: edit_config(project, f"lab_{side}.yaml", logging={"log_dir": f"logs/{side}"})
             for side in ("a", "b")}
    specs = {side: [spec(project, f"{side}{i}", duration=120.0, interval=0.5, ram_gb=1.5)
                    for i in (1, 2)] for side in sides}
    host = ssh_fleet.host("node1")
    claims = node_file(project, host).parent / f"{node_file(project, host).name}.claims"
    outcomes: list[tuple[int, int]] = []
    for _pair in range(10):
        before = {side: _runs(project, side) for side in sides}
        procs = {side: subprocess.Popen(
            [sys.executable, "-m", "infra.cli.main", "--cluster-config", str(cfg),
             *[arg for s in specs[side] for arg in ("--config", str(s))], "--auto-place",
             "--monitor-duration", "0"], cwd=project, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
            for side, cfg in sides.items()}
        errors = {side: proc.communicate(timeout=180)[1] for side, proc in procs.items()}
        running = 0
        for side in sides:
            assert "Traceback" not in errors[side], errors[side]
            fresh = sorted(set(_runs(project, side)) - set(before[side]))
            if not fresh:  # it planned after the other claimed the node: nothing fits
                assert procs[side].returncode == 3, errors[side]
                assert "node1" in errors[side] and "full" in errors[side], errors[side]
                continue
            store = Store.for_log_dir(project / "logs" / side)
            try:
                for inst in store.instances(fresh[0]):
                    if inst.state is InstancePhase.RUNNING:
                        running += 1
                    else:  # refused by the node, placed again, and no room anywhere
                        assert inst.state is InstancePhase.FAILED, inst
                        assert "no room" in inst.reason, inst.reason
                        assert "node1 full: 2/2 held by run" in inst.reason, inst.reason
            finally:
                store.close()
        held = len(workloads_of(host))
        outcomes.append((running, held))
        assert running <= 2 and held <= 2, outcomes
        # end the pair's work on the node; its supervisors record it and drop the claims
        subprocess.run(["pkill", "-KILL", "-u", host.user, "-f", "mind.py"], check=False)
        wait_for(lambda: not workloads_of(host) and not list(claims.glob("*.json")),
                 timeout=60)
    assert all(running == 2 for running, _ in outcomes), outcomes  # and the node was used


def test_fleet_cleared_leaves_no_supervisor_to_restart_a_workload(project: Path,
                                                                  ssh_fleet: SSHFleet) -> None:
    """What conftest's ``fleet_cleared`` does after every fleet test. Killing the workloads
    alone (the old teardown) let their supervisors start them again, and a later test
    counted that stray as its own: once "3 held" on the 2-slot node above."""
    fast_health(project)  # auto_restart: a killed workload comes back after 0.2 s
    s = spec(project, "left", duration=60.0, interval=0.5)
    proc = cli(project, "--config", str(s), "--placement", "left:node1",
               "--monitor-duration", "0")
    assert proc.returncode == 0, proc.stderr
    host = ssh_fleet.host("node1")
    wait_for(lambda: workloads_of(host), timeout=60)
    supervisors = [p for p in ssh_fleet.leftover_processes()
                   if any(a.endswith("supervisor.py") for a in p.cmdline())]
    assert supervisors
    ssh_fleet.clear_work()
    assert ssh_fleet.leftover_processes() == []
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in supervisors)
    assert host.is_running()  # sshd and its sessions stay


def _runs(root: Path, side: str) -> list[str]:
    """The run ids one coordinator's store holds (read directly, no node contacted)."""
    if not (root / "logs" / side / "state.db").exists():
        return []
    store = Store.for_log_dir(root / "logs" / side)
    try:
        return [r.run_id for r in store.runs(1000)]
    finally:
        store.close()


# --------------------------------------------------------------------------- slots after detach

def test_work_that_ended_unwatched_frees_its_slot(project: Path, ssh_fleet: SSHFleet) -> None:
    fast_health(project)
    only_node1(project, max_instances=1)
    first = spec(project, "first", duration=1.0, interval=0.2)
    proc = cli(project, "--config", str(first), "--auto-place", "--monitor-duration", "0")
    assert proc.returncode == 0, proc.stderr
    host = ssh_fleet.host("node1")
    claims = node_file(project, host).parent / f"{node_file(project, host).name}.claims"
    # it ends on the node while nobody watches; the store still says "running"
    wait_for(lambda: not list(claims.glob("*.json")), timeout=60)
    store = Store.for_log_dir(project / "logs")
    run_id = store.latest_run().run_id
    assert store.instance(run_id, "first").state is InstancePhase.RUNNING
    store.close()
    # node list / resource list count what the node holds, not the stale cache
    listed = json.loads(cli(project, "node", "list", "--json").stdout)
    row = next(n for n in listed["nodes"] if n["name"] == "node1")
    assert row["active_instances"] == 0 and row["work_from"] == "node", row
    cached = json.loads(cli(project, "node", "list", "--json", "--no-refresh").stdout)
    assert next(n for n in cached["nodes"] if n["name"] == "node1")["active_instances"] == 1
    res = json.loads(cli(project, "resource", "list", "--json").stdout)
    assert next(n for n in res["nodes"] if n["name"] == "node1")["free_slots"] == 1
    second = spec(project, "second", duration=1.0, interval=0.2)
    proc = cli(project, "--config", str(second), "--auto-place", "--monitor-duration", "30")
    assert proc.returncode == 0, proc.stderr  # placed on node1: the node said it is free
    doc = status_json(project)
    assert doc["instances"][0]["node"] == "node1" and doc["instances"][0]["state"] == "exited"


# --------------------------------------------------------------------------- move back

def test_a_move_back_to_an_earlier_node_starts_a_fresh_copy(project: Path,
                                                            ssh_fleet: SSHFleet) -> None:
    fast_health(project)
    edit_config(project, nodes={"node3": {"enabled": False}, "local": {"enabled": False}})
    svc = spec(project, "svc", duration=300.0, interval=0.5, job_type="service",
               recover="cluster")
    proc = cli(project, "--config", str(svc), "--placement", "svc:node1",
               "--monitor-duration", "0")
    assert proc.returncode == 0, proc.stderr
    run_id = status_json(project)["run_id"]
    first_pid = status_json(project, run_id)["instances"][0]["pid"]
    try:
        for src, dst in (("node1", "node2"), ("node2", "node1")):
            proc = cli(project, "node", "drain", src, "--reason", "swap", "--deadline", "5m",
                       "--wait", "--json", timeout=180)
            assert proc.returncode == 0, proc.stderr
            inst = status_json(project, run_id)["instances"][0]
            assert inst["node"] == dst and inst["state"] == "running", inst
            proc = cli(project, "node", "undrain", src, "--mark-eligible")
            assert proc.returncode == 0, proc.stderr
        final = status_json(project, run_id)["instances"][0]
        assert final["pid"] != first_pid  # a new copy, not the old stopped one
        node1 = ssh_fleet.host("node1")
        state = json.loads(node_file(project, node1, ".infra", "runs", run_id, "svc",
                                     "state.json").read_text())
        assert state["placement"] == "p2" and state["state"] == "running"
        previous = list(node_file(project, node1, ".infra", "runs", run_id,
                                  ".previous").iterdir())
        assert [p.name.split(".")[:2] for p in previous] == [["svc", "p0"]]
        assert len(workloads_of(node1)) == 1 and not workloads_of(ssh_fleet.host("node2"))
    finally:
        cli(project, "stop", run_id, "--grace", "1")


# --------------------------------------------------------------------------- killed mid-move

def test_a_move_left_half_done_by_a_dead_coordinator_is_finished_by_watch(
        project: Path, ssh_fleet: SSHFleet) -> None:
    fast_health(project)
    job = spec(project, "hop", duration=3.0, interval=0.2, recover="cluster")
    proc = cli(project, "--config", str(job), "--placement", "hop:node1",
               "--monitor-duration", "0")
    assert proc.returncode == 0, proc.stderr
    run_id = status_json(project)["run_id"]
    cluster = load_cluster(project / "cluster_config.yaml")
    store = Store.for_log_dir(cluster.log_dir)

    async def die_after_recording_the_move() -> str | None:
        async with ConnectionPool(cluster) as pool:
            session = RunSession(cluster, store, pool)
            rec = store.instance(run_id, "hop")
            healthy = {n.name: NodeCondition(Condition.HEALTHY) for n in cluster.nodes}
            return await session.begin_move(run_id, rec, healthy, "operator test",
                                            stop_old=True)

    target = asyncio.run(die_after_recording_the_move())
    assert target is not None and target != "node1"
    moving = store.instance(run_id, "hop")
    assert moving.state is InstancePhase.MOVING and moving.pid is None
    store.close()
    proc = cli(project, "watch", run_id, "--duration", "120", "--json", timeout=180)
    assert proc.returncode == 0, proc.stderr
    inst = json.loads(proc.stdout)["instances"][0]
    assert inst["node"] == target and inst["state"] == "exited" and inst["exit_code"] == 0
    log = local_log_path(cluster, run_id, "hop").read_text()
    after = log.split(f"[orchestrator] moved from node1 to {target}: operator test\n", 1)[1]
    assert after.count("role=") == 1 and after.count("done:") == 1, log


# --------------------------------------------------------------------------- fencing

def test_a_partitioned_node_fences_its_copy_before_another_starts(
        project: Path, ssh_fleet: SSHFleet, go_flag: Path) -> None:
    fast_health(project, failover={"auto_restart": True, "retry_delay_seconds": 0.2,
                                   "fence_timeout_seconds": 4})
    edit_config(project, nodes={"node3": {"enabled": False}, "local": {"enabled": False}})
    # runs until the test says so: the copy on node1 must be fenced, not end by itself first
    job = spec(project, "solo", duration=300.0, interval=0.2, recover="cluster",
               until=go_flag)
    proc = cli(project, "--config", str(job), "--placement", "solo:node1",
               "--monitor-duration", "0")
    assert proc.returncode == 0, proc.stderr
    run_id = status_json(project)["run_id"]
    node1, node2 = ssh_fleet.host("node1"), ssh_fleet.host("node2")
    overlap = threading.Event()
    stop_watching = threading.Event()

    def watch_copies() -> None:  # both copies alive at once, ever?
        while not stop_watching.is_set():
            on_node2 = workloads_of(node2)
            if workloads_of(node1) and on_node2:
                overlap.set()
            if on_node2:
                go_flag.touch()  # the replacement runs: it may end now
            time.sleep(0.05)

    watcher = threading.Thread(target=watch_copies, daemon=True)
    watcher.start()
    try:
        # the partition: node1's sshd dies, the node and its experiment live on
        events, store = monitor(project, run_id, 120, during=node1.stop,
                                once=lambda session: "node1" in session.renewed)
    finally:
        stop_watching.set()
        watcher.join()
        node1.start()
    old = json.loads(node_file(project, node1, ".infra", "runs", run_id, "solo",
                               "state.json").read_text())
    assert old["fenced"] is True and old["final_reason"].startswith("fenced:"), old
    moved = store.instance(run_id, "solo")
    assert moved.node == "node2" and moved.state is InstancePhase.EXITED, moved
    new = json.loads(node_file(project, node2, ".infra", "runs", run_id, "solo",
                               "state.json").read_text())
    assert old["ended_at"] <= new["created_at"]  # the old copy was gone before
    assert not overlap.is_set()
    assert any(k == "fence" and "waiting" in m for k, _s, m in events), events
    store.close()


def test_work_of_a_killed_watcher_is_fenced_then_restarted_by_the_next_watch(
        project: Path, ssh_fleet: SSHFleet, go_flag: Path) -> None:
    fast_health(project)
    edit_config(project, nodes={"node2": {"enabled": False}, "node3": {"enabled": False},
                                "local": {"enabled": False}})
    # runs until the test says so: it must be fenced, not end by itself first
    job = spec(project, "orphan", duration=300.0, interval=0.2, recover="cluster",
               until=go_flag)
    coord = subprocess.Popen([sys.executable, "-m", "infra.cli.main", "--config", str(job),
                              "--placement", "orphan:node1", "--monitor-duration", "300"],
                             cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    node1 = ssh_fleet.host("node1")
    try:
        db = project / "logs" / "state.db"
        wait_for(lambda: db.exists() and _fence_set(project, node1), timeout=90)
        coord.send_signal(signal.SIGKILL)
        coord.wait(timeout=10)
    finally:
        if coord.poll() is None:
            coord.kill()
    run_id = status_json(project)["run_id"]
    state = node_file(project, node1, ".infra", "runs", run_id, "orphan", "state.json")
    wait_for(lambda: json.loads(state.read_text()).get("fenced"), timeout=60)
    go_flag.touch()  # the copy the next watch starts may end now
    proc = cli(project, "watch", run_id, "--duration", "120", "--json", timeout=180)
    assert proc.returncode == 0, proc.stderr
    inst = json.loads(proc.stdout)["instances"][0]
    assert inst["node"] == "node1" and inst["state"] == "exited" and inst["exit_code"] == 0
    assert json.loads(state.read_text())["placement"] == "p1"


def _fence_set(root: Path, host: FleetHost) -> bool:
    runs = node_file(root, host, ".infra", "runs")
    return any(p.name == "fence.json" and json.loads(p.read_text()).get("deadline")
               for p in runs.rglob("fence.json")) if runs.is_dir() else False


def test_a_detached_run_is_never_fenced(project: Path, ssh_fleet: SSHFleet) -> None:
    fast_health(project)
    job = spec(project, "longer", duration=9.0, interval=0.2, recover="cluster")
    proc = cli(project, "--config", str(job), "--placement", "longer:node2",
               "--monitor-duration", "2")
    assert proc.returncode == 0, proc.stderr
    run_id = status_json(project)["run_id"]
    node2 = ssh_fleet.host("node2")
    fence = json.loads(node_file(project, node2, ".infra", "runs", run_id, "longer",
                                 "fence.json").read_text())
    assert fence["deadline"] is None  # cleared when the watcher detached
    state = node_file(project, node2, ".infra", "runs", run_id, "longer", "state.json")
    # well past the 3 s fence timeout, the work runs to its end
    wait_for(lambda: json.loads(state.read_text())["state"] != "running", timeout=90)
    final = json.loads(state.read_text())
    assert final["state"] == "exited" and not final["fenced"], final
