"""Telemetry on the real sshd fleet, through the real CLI: a burning instance shows about one
core and a sleeping one about none, live in ``status --json`` while a watcher runs; the
node's file comes home byte for byte across an SSH drop and across a move."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.telemetry.files import read_samples, telemetry_path
from infra.telemetry.sample import Sample
from tests.builders import wait_for
from tests.sshfleet import SSHFleet
from tests.test_live_ops import fast_health
from tests.test_run_e2e import cli, project, status_json

pytestmark = pytest.mark.integration
__all__ = ["project"]

BURN = ("python3 -c 'import time; start = time.time(); end = start + {s}; "
        "exec(\"while time.time() < end: pass\"); "
        "print(\"share\", 100 * time.process_time() / (time.time() - start))'")
"""Burns one core for ``s`` seconds, then prints the share of a core it really got (on a
loaded test machine that is well under 100%: the telemetry must agree with it)."""


def job(root: Path, eid: str, command: str, **extra: Any) -> Path:
    doc = {"experiment_id": eid, "command": command, "ram_gb": 0.5, "results": [], **extra}
    path = root / "experiments" / f"{eid}.json"
    path.write_text(json.dumps(doc))
    return path


def node_file(root: Path, node: str, run_id: str, iid: str) -> Path:
    """The instance's telemetry file on the node (the fleet's homes are on this machine)."""
    cfg = yaml.safe_load((root / "cluster_config.yaml").read_text())
    work = next(n["remote_work_dir"] for n in cfg["nodes"] if n["name"] == node)
    return Path(work) / ".infra" / "runs" / run_id / iid / "telemetry.jsonl"


def home_file(root: Path, run_id: str, iid: str) -> Path:
    return telemetry_path(root / "logs", run_id, iid)


def samples(path: Path) -> list[Sample]:
    return read_samples(path)


def check_continuous(found: list[Sample], interval: float = 1.0) -> None:
    """Strictly increasing times (nothing twice) and no hole larger than a few intervals."""
    times = [s.t for s in found]
    assert times == sorted(set(times)), times
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert not gaps or max(gaps) < 5 * interval, gaps


def watcher(root: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "infra.cli.main", *args], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str], timeout: float = 180) -> None:
    try:
        _out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err


def test_burning_and_sleeping_instances_show_live_cpu(project: Path) -> None:
    burn = job(project, "burn", BURN.format(s=25))
    nap = job(project, "nap", "sleep 25")
    proc = watcher(project, "--config", str(burn), "--config", str(nap),
                   "--placement", "burn:node1,nap:node2", "--json")
    try:
        db = project / "logs" / "state.db"
        wait_for(db.exists, timeout=60)
        run_id = wait_for(lambda: status_json(project).get("run_id"), timeout=60)

        def live() -> dict[str, Any] | None:
            doc = status_json(project, run_id)
            tele = {i["instance_id"]: i.get("telemetry") for i in doc["instances"]}
            if not all(tele.values()):
                return None
            b, n = tele["burn"], tele["nap"]
            fresh = b["age_seconds"] <= 5 and n["age_seconds"] <= 5
            # The first sample of a tree has no CPU figure yet (no interval to measure over).
            measured = b["cpu_percent"] is not None and n["cpu_percent"] is not None
            busy = measured and b["cpu_percent"] >= 20 and b["rss_bytes"] > 0
            return tele if fresh and busy else None

        tele = wait_for(live, timeout=90, interval=0.5)
        assert tele["nap"]["cpu_percent"] <= 10 and tele["nap"]["rss_bytes"] > 0
    finally:
        finish(proc)
    run_id = status_json(project)["run_id"]
    burned = samples(home_file(project, run_id, "burn"))
    napped = samples(home_file(project, run_id, "nap"))
    busy = [s.cpu_percent for s in burned if s.cpu_percent is not None]
    idle = [s.cpu_percent for s in napped if s.cpu_percent is not None]
    log = (project / "logs" / run_id / "burn.log").read_text()
    share = float(log.split("share")[-1].split()[0])  # what the burner measured itself
    mean = sum(busy) / len(busy)
    assert len(busy) >= 5 and abs(mean - share) <= 25, (share, busy)
    assert len(idle) >= 5 and max(idle) <= 10 < mean, (idle, busy)
    for iid, node in (("burn", "node1"), ("nap", "node2")):
        home = home_file(project, run_id, iid).read_bytes()
        assert home == node_file(project, node, run_id, iid).read_bytes()
        check_continuous(samples(home_file(project, run_id, iid)))


def test_telemetry_comes_home_complete_across_an_ssh_drop(project: Path,
                                                          ssh_fleet: SSHFleet) -> None:
    nap = job(project, "nap", "sleep 30")
    launched = cli(project, "--config", str(nap), "--placement", "nap:node2",
                   "--monitor-duration", "0")
    assert launched.returncode == 0, launched.stderr
    run_id = status_json(project)["run_id"]
    home = home_file(project, run_id, "nap")
    on_node = node_file(project, "node2", run_id, "nap")
    proc = watcher(project, "watch", run_id, "--json")
    host = ssh_fleet.host("node2")
    try:
        wait_for(lambda: len(samples(home)) >= 3, timeout=60, interval=0.2)
        host.stop()  # sshd and every SSH session die; the node keeps sampling
        before = len(samples(home))
        wait_for(lambda: len(samples(on_node)) >= before + 4, timeout=60, interval=0.2)
        host.start()
    finally:
        if not host.is_running():
            host.start()
        finish(proc)
    assert home.read_bytes() == on_node.read_bytes()  # byte for byte, nothing twice
    found = samples(home)
    assert len(found) >= 20
    check_continuous(found)


def test_a_moved_instance_continues_its_home_telemetry(project: Path) -> None:
    fast_health(project)
    svc = job(project, "svc", "sleep 300", job_type="service", recover="cluster")
    launched = cli(project, "--config", str(svc), "--placement", "svc:node1",
                   "--monitor-duration", "0")
    assert launched.returncode == 0, launched.stderr
    run_id = status_json(project)["run_id"]
    home = home_file(project, run_id, "svc")
    first = node_file(project, "node1", run_id, "svc")
    watched = cli(project, "watch", run_id, "--duration", "4", "--json")
    assert watched.returncode == 0, watched.stderr
    assert len(samples(home)) >= 2
    drained = cli(project, "node", "drain", "node1", "--reason", "move it", "--wait",
                  "--json", timeout=180)
    assert drained.returncode == 0, drained.stderr
    moved_to = {i["instance_id"]: i for i in status_json(project, run_id)["instances"]}["svc"]
    assert moved_to["node"] != "node1" and moved_to["state"] == "running"
    second = node_file(project, moved_to["node"], run_id, "svc")
    old = first.read_bytes()
    assert home.read_bytes()[:len(old)] == old  # the stopped copy's last samples came home
    watched = cli(project, "watch", run_id, "--duration", "4", "--json")
    assert watched.returncode == 0, watched.stderr
    stopped = cli(project, "stop", run_id, "--grace", "1")
    assert stopped.returncode == 0, stopped.stderr
    deadline = time.monotonic() + 120
    while home.read_bytes() != old + second.read_bytes():  # a watch drains the new copy
        assert time.monotonic() < deadline, "the new copy's telemetry never came home"
        watched = cli(project, "watch", run_id, "--duration", "5", "--json")
        assert watched.returncode == 0, watched.stderr
    check_continuous(samples(home), interval=30.0)  # the move's pause is one hole
    assert len(samples(first)) >= 2 and len(samples(second)) >= 2
