"""Node operations on the real sshd fleet: drain, maintenance, undrain, reconcile."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sshfleet import SSHFleet
from tests.test_live_ops import fast_health
from tests.test_run_e2e import cli, project, spec, status_json

pytestmark = pytest.mark.integration
__all__ = ["project"]


def nodes(root: Path) -> dict[str, dict[str, object]]:
    proc = cli(root, "node", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    return {n["name"]: n for n in json.loads(proc.stdout)["nodes"]}


def pin_dry_run(root: Path, node: str) -> subprocess.CompletedProcess[str]:
    probe = spec(root, "probe_pin")
    return cli(root, "--config", str(probe), "--placement", f"probe_pin:{node}", "--dry-run")


def test_drain_moves_service_lets_batch_finish_then_undrain(project: Path,
                                                            ssh_fleet: SSHFleet) -> None:
    fast_health(project)
    svc = spec(project, "svc", duration=120.0, interval=0.5, job_type="service",
               recover="cluster")
    bat = spec(project, "bat", duration=10.0, interval=0.2, job_type="batch", recover="cluster")
    proc = cli(project, "--config", str(svc), "--config", str(bat),
               "--placement", "svc:node1,bat:node1", "--monitor-duration", "0")
    assert proc.returncode == 0, proc.stderr
    run_id = status_json(project)["run_id"]

    dry = cli(project, "node", "drain", "node1", "--reason", "kernel update", "--dry-run",
              "--json")
    assert dry.returncode == 0, dry.stderr
    planned = {a["instance_id"]: a["action"] for a in json.loads(dry.stdout)["actions"]}
    assert planned == {"svc": "move", "bat": "wait"}
    assert nodes(project)["node1"]["admin"] == "none"  # a dry run changes nothing

    proc = cli(project, "node", "drain", "node1", "--reason", "kernel update",
               "--deadline", "10m", "--wait", "--json", timeout=180)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["done"] is True
    insts = {i["instance_id"]: i for i in status_json(project, run_id)["instances"]}
    assert insts["svc"]["node"] != "node1" and insts["svc"]["state"] == "running"
    assert insts["bat"]["node"] == "node1" and insts["bat"]["state"] == "exited"
    assert insts["bat"]["exit_code"] == 0  # the batch job was allowed to finish in place
    n1 = nodes(project)["node1"]
    assert n1["admin"] == "maintenance" and n1["eligible"] is False

    refused = pin_dry_run(project, "node1")
    assert refused.returncode == 3 and "maintenance" in refused.stderr

    # a successful probe never clears maintenance
    cli(project, "--health-check")
    assert nodes(project)["node1"]["admin"] == "maintenance"

    proc = cli(project, "node", "undrain", "node1", "--reason", "done", "--mark-eligible")
    assert proc.returncode == 0, proc.stderr
    assert nodes(project)["node1"]["eligible"] is True
    assert pin_dry_run(project, "node1").returncode == 0
    cli(project, "stop", run_id, "--grace", "1")


def test_reconcile_recovers_work_of_a_dead_node(project: Path, ssh_fleet: SSHFleet) -> None:
    fast_health(project)
    keep = spec(project, "keep", duration=60.0, interval=0.5, recover="cluster")
    hold = spec(project, "hold", duration=60.0, interval=0.5, recover="pause")
    proc = cli(project, "--config", str(keep), "--config", str(hold),
               "--placement", "keep:node3,hold:node3", "--monitor-duration", "0")
    assert proc.returncode == 0, proc.stderr
    run_id = status_json(project)["run_id"]
    host = ssh_fleet.host("node3")
    host.stop(kill_user_processes=True)
    try:
        dry = cli(project, "node", "reconcile", "node3", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        counts = json.loads(dry.stdout)
        assert (counts["checked"], counts["recovered"], counts["paused"]) == (2, 1, 1)
        proc = cli(project, "node", "reconcile", "node3", "--reason", "box died")
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        assert {k: doc[k] for k in ("checked", "recovered", "paused", "blocked", "failed")} \
            == {"checked": 2, "recovered": 1, "paused": 1, "blocked": 0, "failed": 0}
    finally:
        host.start()
    insts = {i["instance_id"]: i for i in status_json(project, run_id)["instances"]}
    assert insts["keep"]["node"] != "node3" and insts["keep"]["state"] == "running"
    assert insts["hold"]["state"] == "paused"
    subprocess.run([sys.executable, "-m", "infra.cli.main", "stop", run_id, "--grace", "1"],
                   cwd=project, capture_output=True, timeout=60)


def test_maintenance_and_resource_list(project: Path, ssh_fleet: SSHFleet) -> None:
    proc = cli(project, "node", "maintenance", "node2", "--enable", "--reason", "fan swap")
    assert proc.returncode == 0, proc.stderr
    assert nodes(project)["node2"]["admin"] == "maintenance"
    refused = pin_dry_run(project, "node2")
    assert refused.returncode == 3 and "maintenance: fan swap" in refused.stderr
    res = cli(project, "resource", "list", "--json")
    assert res.returncode == 0, res.stderr
    rows = {r["name"]: r for r in json.loads(res.stdout)["nodes"]}
    assert rows["node2"]["operator"] == "maintenance"
    assert rows["node1"]["cpu_cores"] >= 1
    cli(project, "node", "maintenance", "node2", "--disable")
    assert nodes(project)["node2"]["admin"] == "none"
    bad = cli(project, "node", "drain", "nope")
    assert bad.returncode == 2 and "unknown node 'nope'" in bad.stderr
    bad = cli(project, "node", "drain", "node2", "--deadline", "soon")
    assert bad.returncode == 2 and "--deadline" in bad.stderr


def test_drain_wait_reports_a_blocked_move(project: Path, ssh_fleet: SSHFleet) -> None:
    fast_health(project)
    svc = spec(project, "stuck", duration=120.0, interval=0.5, job_type="service",
               recover="cluster")
    proc = cli(project, "--config", str(svc), "--placement", "stuck:node2",
               "--monitor-duration", "0")
    assert proc.returncode == 0, proc.stderr
    run_id = status_json(project)["run_id"]
    for other in ("node1", "node3", "local"):
        cli(project, "node", "maintenance", other, "--enable", "--reason", "busy")
    try:
        proc = cli(project, "node", "drain", "node2", "--reason", "swap", "--wait", timeout=120)
        assert proc.returncode == 1
        assert "drain blocked: no node can take stuck" in proc.stderr
        assert nodes(project)["node2"]["admin"] == "draining"
        inst = status_json(project, run_id)["instances"][0]
        assert inst["node"] == "node2" and inst["state"] == "running"  # left where it was
    finally:
        for other in ("node1", "node3", "local"):
            cli(project, "node", "maintenance", other, "--disable")
        cli(project, "node", "undrain", "node2", "--mark-eligible")
        cli(project, "stop", run_id, "--grace", "1")
