"""Runs end to end on the real sshd fleet, driven through the real CLI in subprocesses.

Covers: health check, deploy, a run with --placement and --auto-place, logs home exactly
once, results fetched, stop killing the whole group, an SSH drop mid-run, and the
coordinator SIGKILLed mid-run then found again by `status`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from infra.config import load_cluster
from infra.runner.lifecycle import RunSession, local_log_path
from infra.state import InstancePhase, Store
from infra.transport.pool import ConnectionPool
from tests.builders import wait_for
from tests.sshfleet import SSHFleet

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration


@pytest.fixture()
def project(ssh_fleet: SSHFleet, tmp_path: Path) -> Iterator[Path]:
    """A project tree: the workload, a cluster config naming the fleet and the local node."""
    root = tmp_path / "proj"
    (root / "workloads").mkdir(parents=True)
    shutil.copy(REPO / "workloads" / "mind.py", root / "workloads" / "mind.py")
    (root / "experiments").mkdir()
    nodes: list[dict[str, Any]] = []
    for h in ssh_fleet.hosts:
        nodes.append({"name": h.name, "host": h.address, "ssh_port": h.port,
                      "ssh_user": h.user, "ssh_key_path": str(ssh_fleet.client_key),
                      "remote_work_dir": f"{h.home}/work/{tmp_path.name}",
                      # each test's own claims (a real node has one per account): work a
                      # previous test left stopping cannot take this test's slots
                      "claims_dir": f"{h.home}/work/{tmp_path.name}.claims",
                      "python_path": "/usr/bin/python3", "ram_gb": 8.0, "max_instances": 2})
    nodes.append({"name": "local", "host": "localhost", "remote_work_dir": ".",
                  "ram_gb": 4.0, "max_instances": 2, "python_path": sys.executable})
    config = {"nodes": nodes,
              "health_check": {"known_hosts": str(ssh_fleet.known_hosts),
                               "timeout_seconds": 10, "keepalive_seconds": 2,
                               "keepalive_count_max": 2},
              "failover": {"auto_restart": False},
              # explicit: in-process sessions (cwd: the repo) deploy this tree, not the repo
              "deploy": {"source": "."}}
    (root / "cluster_config.yaml").write_text(yaml.safe_dump(config))
    yield root  # what the test left running on the fleet: conftest's fleet_cleared


def spec(root: Path, eid: str, *, duration: float = 2.0, interval: float = 0.2,
         until: Path | None = None, **extra: Any) -> Path:
    """A mind.py experiment; with ``until`` it runs until that file exists (``duration``
    only bounds it), so a test ends it when ready instead of racing a fixed duration."""
    stop = f" --until {until}" if until is not None else ""
    doc = {"experiment_id": eid,
           "command": f"id -un; python3 workloads/mind.py --duration {duration} "
                      f"--interval {interval} --work 100{stop}",
           "ram_gb": 1.0, "results": [f"out/{eid}/*"]}
    doc.update(extra)
    path = root / "experiments" / f"{eid}.json"
    path.write_text(json.dumps(doc))
    return path


def cli(root: Path, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "infra.cli.main", *args], cwd=root,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})


def status_json(root: Path, run_id: str | None = None) -> dict[str, Any]:
    proc = cli(root, "status", *([run_id] if run_id else []), "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def check_log(text: str, eid: str) -> None:
    """The workload's log arrived exactly once: one header, steps 1..n in order, one 'done'."""
    lines = text.splitlines()
    assert sum(1 for ln in lines if "role=" in ln) == 1, text
    steps = [int(m.group(1)) for ln in lines if (m := re.search(rf"\[{eid}\] step (\d+) ", ln))]
    assert steps == list(range(1, len(steps) + 1)), steps
    assert len(steps) >= 2
    assert sum(1 for ln in lines if "done:" in ln) == 1, text


def test_health_check_all_healthy_then_one_down(project: Path, ssh_fleet: SSHFleet) -> None:
    proc = cli(project, "--health-check", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert {n: v["status"] for n, v in doc["nodes"].items()} == {
        "node1": "HEALTHY", "node2": "HEALTHY", "node3": "HEALTHY", "local": "HEALTHY"} or all(
        v["status"] in ("HEALTHY", "DEGRADED") for v in doc["nodes"].values())
    assert doc["nodes"]["node1"]["facts"]["hostname"]

    host = ssh_fleet.host("node2")
    host.stop()
    try:
        proc = cli(project, "--health-check", "--json")
    finally:
        host.start()
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert doc["nodes"]["node2"]["status"] == "UNAVAILABLE"
    assert "connection refused" in doc["nodes"]["node2"]["error"]
    assert "node2" in proc.stderr and "Traceback" not in proc.stderr


def test_health_check_refuses_a_changed_host_key(project: Path, ssh_fleet: SSHFleet,
                                                 tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts_wrong"
    lines = ssh_fleet.known_hosts.read_text().splitlines()
    other = ssh_fleet.host("node3").host_key_line().split(" ", 1)[1]
    h1 = ssh_fleet.host("node1")
    kh.write_text("\n".join([f"[{h1.address}]:{h1.port} {other}"] +
                            [ln for ln in lines if not ln.startswith(f"[{h1.address}]")]) + "\n")
    cfg = yaml.safe_load((project / "cluster_config.yaml").read_text())
    cfg["health_check"]["known_hosts"] = str(kh)
    (project / "cluster_config.yaml").write_text(yaml.safe_dump(cfg))
    proc = cli(project, "--health-check", "--json")
    assert proc.returncode == 1
    node1 = json.loads(proc.stdout)["nodes"]["node1"]
    assert node1["status"] == "UNAVAILABLE"
    assert "host key" in node1["error"] and "changed" in node1["error"]


def test_run_end_to_end_with_pins_and_auto_place(project: Path, ssh_fleet: SSHFleet) -> None:
    a = spec(project, "exp_a", command='id -un; echo "from $INFRA_NODE" > '
             '"$INFRA_RESULTS_DIR/note.txt"; python3 workloads/mind.py --duration 2 '
             '--interval 0.2 --work 100')
    b = spec(project, "exp_b")
    c = spec(project, "exp_c", anti_affinity=["exp_a", "exp_b"])
    proc = cli(project, "--config", str(a), "--config", str(b), "--config", str(c),
               "--placement", "exp_a:node1,exp_b:node2", "--auto-place")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = status_json(project)
    run_id = doc["run_id"]
    by_id = {i["instance_id"]: i for i in doc["instances"]}
    assert by_id["exp_a"]["node"] == "node1" and by_id["exp_b"]["node"] == "node2"
    assert by_id["exp_c"]["node"] not in ("node1", "node2")
    for eid, inst in by_id.items():
        assert inst["state"] == "exited" and inst["exit_code"] == 0, inst
        log = (project / "logs" / run_id / f"{eid}.log").read_text()
        check_log(log, eid)
        node = inst["node"]
        expected_user = (ssh_fleet.host(node).user if node != "local"
                         else psutil.Process().username())
        assert log.splitlines()[0] == expected_user
        summary = project / "logs" / run_id / eid / "out" / eid / "summary.json"
        assert json.loads(summary.read_text())["name"] == eid
    # what the experiment wrote to $INFRA_RESULTS_DIR came home too
    note = project / "logs" / run_id / "exp_a" / "results" / "note.txt"
    assert note.read_text() == "from node1\n"
    # files the node wrote are owned by that node's user
    h1 = ssh_fleet.host("node1")
    deployed = Path(f"{h1.home}/work/{project.parent.name}/workloads/mind.py")
    assert deployed.stat().st_uid == h1.uid
    # state and logs are private
    assert (project / "logs" / "state.db").stat().st_mode & 0o077 == 0


def test_stop_kills_the_whole_process_group(project: Path, ssh_fleet: SSHFleet) -> None:
    s = spec(project, "sleeper", command="sh -c 'sleep 300 & sleep 300; wait'")
    proc = cli(project, "--config", str(s), "--placement", "sleeper:node3",
               "--monitor-duration", "0")
    assert proc.returncode == 0, proc.stderr
    doc = status_json(project)
    run_id = doc["run_id"]
    (inst,) = doc["instances"]
    assert inst["state"] == "running"
    pgid = os.getpgid(inst["pid"])
    members = [p for p in psutil.process_iter() if _pgid(p) == pgid]
    assert len(members) >= 3  # sh + two sleeps
    assert all(p.username() == ssh_fleet.host("node3").user for p in members)
    proc = cli(project, "stop", run_id, "--grace", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["instances"][0]["state"] == "stopped"
    wait_for(lambda: not [p for p in psutil.process_iter() if _pgid(p) == pgid], timeout=15)


def _pgid(p: psutil.Process) -> int | None:
    try:
        return os.getpgid(p.pid)
    except (ProcessLookupError, PermissionError):
        return None


def test_coordinator_killed_mid_run_is_found_again(project: Path) -> None:
    s = spec(project, "survivor", duration=6.0, interval=0.3)
    coord = subprocess.Popen([sys.executable, "-m", "infra.cli.main", "--config", str(s),
                              "--placement", "survivor:node1"], cwd=project,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        db = project / "logs" / "state.db"
        wait_for(lambda: db.exists() and _instance_state(db) == "running", timeout=60)
        time.sleep(1.0)  # let some log lines stream home
        coord.send_signal(signal.SIGKILL)
        coord.wait(timeout=10)
    finally:
        if coord.poll() is None:
            coord.kill()
    doc = status_json(project)
    run_id = doc["run_id"]
    assert doc["instances"][0]["state"] in ("running", "exited")
    pid = doc["instances"][0]["pid"]
    done = wait_for(lambda: status_json(project, run_id)["instances"][0]["state"] == "exited",
                    timeout=60)
    assert done
    final = status_json(project, run_id)["instances"][0]
    assert final["exit_code"] == 0 and final["pid"] == pid  # never started twice
    local = project / "logs" / run_id / "survivor.log"
    before = local.read_bytes() if local.exists() else b""
    proc = cli(project, "logs", run_id, "survivor")
    assert proc.returncode == 0, proc.stderr
    check_log(proc.stdout, "survivor")  # the local copy, then the node's log beyond it
    assert (local.read_bytes() if local.exists() else b"") == before  # reading writes nothing
    proc = cli(project, "watch", run_id, "--json")  # the watcher brings the copy home
    assert proc.returncode == 0, proc.stderr
    check_log(local.read_text(), "survivor")
    proc = cli(project, "results", run_id, "--json")
    assert proc.returncode == 0, proc.stderr
    assert any(f.endswith("summary.json")
               for f in json.loads(proc.stdout)["results"]["survivor"])


def _instance_state(db: Path) -> str | None:
    store = Store(db)
    try:
        runs = store.runs(1)
        if not runs:
            return None
        recs = store.instances(runs[0].run_id)
        return recs[0].state.value if recs else None
    finally:
        store.close()


def test_ssh_drop_mid_run_keeps_experiment_and_resumes_log(project: Path,
                                                           ssh_fleet: SSHFleet) -> None:
    s = spec(project, "dropper", duration=5.0, interval=0.2)
    proc = cli(project, "--config", str(s), "--placement", "dropper:node2",
               "--monitor-duration", "0")
    assert proc.returncode == 0, proc.stderr
    run_id = status_json(project)["run_id"]
    cluster = load_cluster(project / "cluster_config.yaml")
    host = ssh_fleet.host("node2")

    async def scenario() -> None:
        store = Store.for_log_dir(cluster.log_dir)
        async with ConnectionPool(cluster) as pool:
            session = RunSession(cluster, store, pool)
            await session.sweep(run_id)
            stream = asyncio.create_task(session.stream_log_until_done(run_id, "dropper",
                                                                       retry_delay=0.5))
            await asyncio.sleep(1.5)
            host.stop()                      # sshd and every SSH session die
            await asyncio.sleep(1.0)
            host.start()
            await session.sweep(run_id)
            await asyncio.wait_for(stream, timeout=60)
            await session.sweep(run_id)
        rec = store.instance(run_id, "dropper")
        assert rec.state is InstancePhase.EXITED and rec.exit_code == 0
        store.close()

    asyncio.run(scenario())
    check_log(local_log_path(cluster, run_id, "dropper").read_text(), "dropper")


def test_system_job_runs_on_every_node_with_allocation_hints(project: Path,
                                                              ssh_fleet: SSHFleet) -> None:
    sysjob = spec(project, "census", job_type="sysbatch", results=[],
                  command='echo "node=$INFRA_NODE port=$INFRA_PORT_API id=$INFRA_INSTANCE_ID"',
                  resources={"ports": [{"label": "api", "port": 18088}]})
    proc = cli(project, "--config", str(sysjob), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    run_id = doc["run_id"]
    insts = {i["instance_id"]: i for i in doc["instances"]}
    assert set(insts) == {"census@node1", "census@node2", "census@node3", "census@local"}
    for iid, inst in insts.items():
        node = iid.split("@")[1]
        assert inst["node"] == node and inst["state"] == "exited", inst
        log = (project / "logs" / run_id / f"{iid}.log").read_text()
        assert log.strip() == f"node={node} port=18088 id={iid}"
    # the port is held per node: a second user of 18088 is refused while one runs
    hold = spec(project, "holder", command="sleep 30", results=[],
                resources={"ports": [{"label": "api", "port": 18088}]})
    proc = cli(project, "--config", str(hold), "--placement", "holder:node1",
               "--monitor-duration", "0")
    assert proc.returncode == 0, proc.stderr
    other = spec(project, "clash", results=[],
                 resources={"ports": [{"label": "web", "port": 18088}]})
    proc = cli(project, "--config", str(other), "--placement", "clash:node1", "--dry-run")
    assert proc.returncode == 3
    assert "port 18088 held by holder" in proc.stderr
    holder_run = status_json(project)["run_id"]
    cli(project, "stop", holder_run, "--grace", "1")


def test_launch_starts_each_node_as_soon_as_its_own_deploy_is_done(
        project: Path, ssh_fleet: SSHFleet) -> None:
    """Several instances per node start in one batched call per node, each node on its own:
    node1's three start while the deploy to a node that never answers is still waiting."""
    import socket

    from infra.cli.views import plan_json
    from infra.config.specs import load_spec
    from infra.placement import Condition, NodeCondition, plan

    silent = socket.socket()  # accepts connections and never says a word: a hung node
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    cfg = yaml.safe_load((project / "cluster_config.yaml").read_text())
    for entry in cfg["nodes"]:
        if entry["name"] == "node1":
            entry["max_instances"] = 3
            silent_node = {**entry, "name": "silent", "host": "127.0.0.1",
                           "ssh_port": silent.getsockname()[1], "max_instances": 1}
    cfg["nodes"].append(silent_node)
    cfg["health_check"]["timeout_seconds"] = 3
    (project / "cluster_config.yaml").write_text(yaml.safe_dump(cfg))
    cluster = load_cluster(project / "cluster_config.yaml")
    until = project / "release"
    specs = [load_spec(spec(project, f"b{i}", duration=60, until=until), cluster)
             for i in range(4)]
    conds = {n.name: NodeCondition(Condition.HEALTHY if n.name in ("node1", "silent")
                                   else Condition.UNAVAILABLE, "off") for n in cluster.nodes}
    result = plan(cluster, specs, conditions=conds, pins={"b3": "silent"})
    assert sorted(p.node for p in result.placements) == ["node1"] * 3 + ["silent"]
    store = Store.for_log_dir(cluster.log_dir)

    async def launch() -> str:
        async with ConnectionPool(cluster) as pool:
            # --yes: no deletion check to wait for (with one, every node's check must pass
            # first, so that a refused deploy still starts nothing anywhere)
            session = RunSession(cluster, store, pool, confirm_deletes=True)
            run_id = session.record_run(specs, result, plan_json(result))
            await session.launch(run_id)
            return run_id

    try:
        run_id = asyncio.run(launch())
        recs = {r.instance_id: r for r in store.instances(run_id)}
        assert all(recs[f"b{i}"].state is InstancePhase.RUNNING for i in range(3)), recs
        assert len({recs[f"b{i}"].pid for i in range(3)}) == 3
        assert recs["b3"].state is InstancePhase.FAILED
        assert "deploy to silent failed" in (recs["b3"].reason or "")
        events = [(e.kind, e.subject, e.message) for e in store.events(run_id)]
        starts = [i for i, e in enumerate(events) if e[0] == "start" and "started on" in e[2]]
        silent_deploy = [i for i, e in enumerate(events) if e[0] == "deploy" and
                         e[1] == "silent"]
        assert len(starts) == 3 and len(silent_deploy) == 1, events
        assert max(starts) < silent_deploy[0], events  # no barrier across the cluster
    finally:
        silent.close()
        until.touch()
        store.close()
