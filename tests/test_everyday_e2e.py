"""Everyday commands on the real sshd fleet, through the real CLI in subprocesses:
`prune` (dry run, real prune on nodes and locally, a live run never pruned, an unreachable
node reported), `stop` on a run whose instances are already over, and `logs INSTANCE`
reading the latest run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psutil
import pytest

from infra.state import InstancePhase, RunState, Store
from tests.builders import wait_for
from tests.sshfleet import SSHFleet
from tests.test_run_e2e import cli, project, spec, status_json  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration


def run_to_end(root: Path, eid: str, node: str, command: str) -> str:
    """Run one instance pinned to ``node``, watched until it ended; its run id."""
    path = spec(root, eid, command=command, results=[])
    proc = cli(root, "--config", str(path), "--placement", f"{eid}:{node}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return str(status_json(root)["run_id"])


def node_run_dir(fleet: SSHFleet, node: str, root: Path, run_id: str) -> Path:
    return Path(f"{fleet.host(node).home}/work/{root.parent.name}/.infra/runs/{run_id}")


def prune(root: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    proc = cli(root, "prune", "--older-than", "0", "--json", *args)
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def by_run(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["run_id"]: r for r in doc["runs"]}


def test_prune_removes_old_finished_runs_and_never_a_live_one(project: Path,  # noqa: F811
                                                              ssh_fleet: SSHFleet) -> None:
    run_a = run_to_end(project, "pa", "node1", "echo a")
    run_c = run_to_end(project, "pc", "node2", "echo c")
    live = spec(project, "plive", command="sleep 300", results=[])
    proc = cli(project, "--config", str(live), "--placement", "plive:node3",
               "--monitor-duration", "0")
    assert proc.returncode == 0, proc.stderr
    run_live = str(status_json(project)["run_id"])
    pid = status_json(project, run_live)["instances"][0]["pid"]
    dirs = {run_a: node_run_dir(ssh_fleet, "node1", project, run_a),
            run_c: node_run_dir(ssh_fleet, "node2", project, run_c),
            run_live: node_run_dir(ssh_fleet, "node3", project, run_live)}
    local = {r: project / "logs" / r for r in dirs}
    local[run_live].mkdir(exist_ok=True)  # detached at once: no copy yet; make one to keep
    (local[run_live] / "plive.log").write_text("kept\n")
    assert all(d.is_dir() for d in dirs.values()) and all(d.is_dir() for d in local.values())
    claims = Path(f"{ssh_fleet.host('node3').home}/work/{project.parent.name}.claims")
    claims_before = sorted(p.name for p in claims.iterdir())
    assert claims_before  # the live instance's claim

    # dry run: lists per node and locally, with sizes; removes nothing
    code, doc, err = prune(project, "--dry-run")
    assert code == 0, err
    runs = by_run(doc)
    assert runs[run_a]["nodes"]["node1"]["state"] == "would_prune"
    assert runs[run_a]["nodes"]["node1"]["bytes"] > 0
    assert runs[run_a]["local"]["state"] == "would_prune" and runs[run_a]["local"]["bytes"] > 0
    assert runs[run_c]["nodes"]["node2"]["state"] == "would_prune"
    assert run_live not in runs
    assert [s["run_id"] for s in doc["skipped"]] == [run_live]
    assert all(d.is_dir() for d in dirs.values()) and all(d.is_dir() for d in local.values())
    text = cli(project, "prune", "--older-than", "0", "--dry-run")
    assert text.returncode == 0, text.stderr
    assert "node1: would prune" in text.stdout and "would free" in text.stdout

    # node2 unreachable: reported, its run kept (there and here), exit 1; the rest pruned
    host2 = ssh_fleet.host("node2")
    host2.stop()
    try:
        code, doc, err = prune(project)
    finally:
        host2.start()
    assert code == 1
    assert "node2" in doc["unreachable"]
    assert "error: prune incomplete on node2" in err and "Traceback" not in err
    runs = by_run(doc)
    assert runs[run_a]["nodes"]["node1"]["state"] == "pruned"
    assert runs[run_a]["local"]["state"] == "pruned"
    assert runs[run_c]["local"]["state"] == "kept"
    assert not dirs[run_a].exists() and not local[run_a].exists()
    assert dirs[run_c].is_dir() and local[run_c].is_dir()
    assert dirs[run_live].is_dir() and local[run_live].is_dir() and psutil.pid_exists(pid)
    listed = json.loads(cli(project, "runs", "--json").stdout)["runs"]
    pruned = {r["run_id"]: r["pruned_at"] for r in listed}
    assert pruned[run_a] is not None and pruned[run_c] is None and pruned[run_live] is None

    # a store that says the live run is over (stale, or edited): its node refuses anyway
    store = Store(project / "logs" / "state.db")
    store.update_instance(run_live, "plive", state=InstancePhase.EXITED)
    store.set_run_state(run_live, RunState.FINISHED)
    store.close()
    code, doc, err = prune(project)
    assert code == 0, err
    runs = by_run(doc)
    assert runs[run_live]["nodes"]["node3"]["state"] == "active"
    assert runs[run_live]["nodes"]["node3"]["active"] == ["plive"]
    assert runs[run_live]["local"]["state"] == "kept"
    assert dirs[run_live].is_dir() and local[run_live].is_dir() and psutil.pid_exists(pid)
    assert sorted(p.name for p in claims.iterdir()) == claims_before  # claims untouched
    # node2 is back: the run it held is finished now, there and here
    assert runs[run_c]["nodes"]["node2"]["state"] == "pruned"
    assert not dirs[run_c].exists() and not local[run_c].exists()
    assert run_a not in runs  # pruned runs are not asked again

    store = Store(project / "logs" / "state.db")
    store.update_instance(run_live, "plive", state=InstancePhase.RUNNING)
    store.close()
    assert cli(project, "stop", run_live, "--grace", "1").returncode == 0
    wait_for(lambda: not psutil.pid_exists(pid), timeout=30)


def test_stop_leaves_instances_that_are_already_over_as_they_are(project: Path,  # noqa: F811
                                                                 ssh_fleet: SSHFleet) -> None:
    def states(doc: dict[str, Any]) -> dict[str, str]:
        return {i["instance_id"]: i["state"] for i in doc["instances"]}

    # a run that finished on its own stays finished, its instance exited
    done_id = run_to_end(project, "done", "node3", "echo done")
    proc = cli(project, "stop", done_id, "--json")
    assert proc.returncode == 0, proc.stderr
    again = status_json(project, done_id)
    assert again["state"] == "finished" and states(again) == {"done": "exited"}
    doc = json.loads(proc.stdout)
    assert doc["state"] == "finished" and states(doc) == {"done": "exited"}
    assert doc["stopped"] == [] and doc["already_over"] == {"done": "exited"}
    proc = cli(project, "stop", done_id, "done")  # one instance, already over
    assert proc.returncode == 0, proc.stderr
    assert status_json(project, done_id)["instances"][0]["state"] == "exited"

    # a run with one instance over and one running: only the running one is stopped
    quick = spec(project, "quick", command="echo quick", results=[])
    slow = spec(project, "slow", command="sleep 300", results=[])
    proc = cli(project, "--config", str(quick), "--config", str(slow),
               "--placement", "quick:node1,slow:node2", "--monitor-duration", "0")
    assert proc.returncode == 0, proc.stderr
    run_id = str(status_json(project)["run_id"])

    wait_for(lambda: states(status_json(project, run_id))["quick"] == "exited", timeout=60)
    proc = cli(project, "stop", run_id, "--grace", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert states(doc) == {"quick": "exited", "slow": "stopped"}
    assert doc["stopped"] == ["slow"] and doc["already_over"] == {"quick": "exited"}
    assert doc["state"] == "stopped"
    quick_rec = next(i for i in doc["instances"] if i["instance_id"] == "quick")
    assert quick_rec["exit_code"] == 0

    # stopping it again stops nothing and rewrites nothing
    proc = cli(project, "stop", run_id)
    assert proc.returncode == 0, proc.stderr
    assert "already over (left as they were): quick exited, slow stopped" in proc.stdout


def test_logs_instance_alone_reads_the_latest_run(project: Path) -> None:  # noqa: F811
    first = run_to_end(project, "hello", "node1", "echo first run")
    second = run_to_end(project, "hello", "node2", "echo second run")
    assert first != second
    proc = cli(project, "logs", "hello")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "second run"
    proc = cli(project, "logs", first, "hello")  # the two-argument form still works
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "first run"
    proc = cli(project, "logs", first)  # a run without an instance: one clear line
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "names a run, not an instance" in lines[0], proc.stderr
