"""Honest messages on the real fleet: an unreachable node is never "fixed" with --force, and
Ctrl-C during a launch says exactly what was started and what was not."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from infra.state import Store
from tests.builders import wait_for
from tests.sshfleet import SSHFleet
from tests.test_live_ops import fast_health
from tests.test_run_e2e import cli, project, spec

pytestmark = pytest.mark.integration
__all__ = ["project"]


def test_a_pin_to_an_unreachable_node_names_the_real_fix_even_with_force(
        project: Path, ssh_fleet: SSHFleet) -> None:
    fast_health(project)
    job = spec(project, "nowhere", duration=1.0)
    host = ssh_fleet.host("node2")
    host.stop()
    try:
        for extra in ((), ("--force",)):
            proc = cli(project, "--config", str(job), "--placement", "nowhere:node2", *extra,
                       "--monitor-duration", "0")
            assert proc.returncode == 3, proc.stderr
            line = proc.stderr.strip().splitlines()[-1]
            assert line.startswith("error: nowhere pinned to node2 unavailable"), line
            assert "cannot be reached" in line and "ssh_key_path" in line, line
            assert "use --force" not in line, line
    finally:
        host.start()
    assert not (project / "logs" / "state.db").exists() or \
        not Store.for_log_dir(project / "logs").runs()  # no run was created


def test_ctrl_c_during_a_launch_says_what_started(project: Path, ssh_fleet: SSHFleet) -> None:
    """SIGINT as soon as the run is recorded, while node1 hangs: the message and the exit code
    agree with what the nodes really run."""
    fast_health(project)
    first = spec(project, "first", duration=30.0)
    second = spec(project, "second", duration=30.0)
    host = ssh_fleet.host("node1")
    db = project / "logs" / "state.db"
    coord = subprocess.Popen(
        [sys.executable, "-m", "infra.cli.main", "--config", str(first), "--config", str(second),
         "--placement", "first:node1,second:node2", "--monitor-duration", "0"],
        cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: db.exists() and _recorded(db), timeout=60, interval=0.02)
        host.pause()  # node1's deploy or start now hangs
        coord.send_signal(signal.SIGINT)
        out, err = coord.communicate(timeout=120)
    finally:
        host.resume()
        if coord.poll() is None:
            coord.kill()
    assert "Traceback" not in err, err
    doc = json.loads(cli(project, "status", "--json", "--no-refresh").stdout)
    started = sorted(i["instance_id"] for i in doc["instances"] if i["pid"] is not None)
    if coord.returncode == 130:  # interrupted while launching
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"error: launch of {doc['run_id']} interrupted: "
                               f"{len(started)} of 2 instance(s) started"), line
        assert "keep running" not in line or started
        if len(started) < 2:
            assert "not started" in line and "watch" in line, line
    else:  # the launch had finished: a plain detach, and then both were started
        assert coord.returncode == 0, err
        assert started == ["first", "second"] and "detached" in err
    cli(project, "stop", doc["run_id"], "--grace", "1")


def _recorded(db: Path) -> bool:
    store = Store(db)
    try:
        return bool(store.runs(1))
    finally:
        store.close()


def test_first_contact_shows_the_recorded_host_key(project: Path, ssh_fleet: SSHFleet,
                                                   tmp_path: Path) -> None:
    import yaml
    cfg = yaml.safe_load((project / "cluster_config.yaml").read_text())
    known = tmp_path / "fresh_known_hosts"
    cfg["health_check"]["known_hosts"] = str(known)
    (project / "cluster_config.yaml").write_text(yaml.safe_dump(cfg))
    proc = cli(project, "--health-check", "--accept-new-host-keys")
    assert proc.returncode == 0, proc.stderr
    host = ssh_fleet.host("node1")
    fingerprint = subprocess.run(["ssh-keygen", "-lf", str(host.host_key) + ".pub"],
                                 capture_output=True, text=True, check=True).stdout.split()[1]
    said = " ".join(proc.stderr.split())
    assert f"new host key recorded for [{host.address}]:{host.port} in {known}" in said, said
    assert fingerprint in said, (fingerprint, said)
    again = cli(project, "--health-check")
    assert again.returncode == 0 and "new host key" not in again.stderr  # known now


def _interrupt(project: Path, *args: str, ready: Any) -> subprocess.CompletedProcess[str]:
    """Run the CLI, send SIGINT once ``ready()`` holds, and collect what it said."""
    proc = subprocess.Popen([sys.executable, "-m", "infra.cli.main", *args], cwd=project,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: ready(proc.pid), timeout=60, interval=0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_ctrl_c_in_watch_logs_and_deploy_is_honest_and_clean(project: Path,
                                                             ssh_fleet: SSHFleet) -> None:
    fast_health(project)
    job = spec(project, "steady", duration=60.0, interval=0.2)
    proc = cli(project, "--config", str(job), "--placement", "steady:node1",
               "--monitor-duration", "0")
    assert proc.returncode == 0, proc.stderr
    run_id = json.loads(cli(project, "status", "--json").stdout)["run_id"]
    local_log = project / "logs" / run_id / "steady.log"
    try:
        watched = _interrupt(project, "watch", run_id,
                             ready=lambda _: local_log.exists() and local_log.stat().st_size > 0)
        assert watched.returncode == 0, watched.stderr
        assert "Traceback" not in watched.stderr, watched.stderr
        assert "detached" in watched.stderr, watched.stderr
        followed = _interrupt(project, "logs", run_id, "steady", "-f",
                              ready=lambda pid: _connected(pid, ssh_fleet.host("node1").port))
        assert followed.returncode == 130, followed.stderr
        assert "Traceback" not in followed.stderr, followed.stderr
        assert followed.stderr.strip().splitlines()[-1] == "interrupted"
        (project / "big").mkdir()
        for i in range(300):
            (project / "big" / f"f{i:03d}.bin").write_bytes(bytes(200_000))
        deployed = _interrupt(project, "--deploy-all", ready=_rsync_running)
        assert deployed.returncode == 130, deployed.stderr
        assert "Traceback" not in deployed.stderr, deployed.stderr
        assert "Task exception" not in deployed.stderr, deployed.stderr
        state = json.loads(cli(project, "status", "--json").stdout)["instances"][0]
        assert state["state"] == "running"  # none of this stopped the experiment
    finally:
        cli(project, "stop", run_id, "--grace", "1")


def _connected(pid: int, port: int) -> bool:
    """The process holds an SSH connection to ``port``: it is talking to the node."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return False
    return any(c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
               for c in conns)


def _rsync_running(pid: int) -> bool:
    try:
        return any(p.name() == "rsync" for p in psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return False


def test_an_unreachable_node_is_named_once(project: Path, ssh_fleet: SSHFleet) -> None:
    fast_health(project)
    job = spec(project, "cutoff", duration=60.0)
    proc = cli(project, "--config", str(job), "--placement", "cutoff:node3",
               "--monitor-duration", "0")
    assert proc.returncode == 0, proc.stderr
    run_id = json.loads(cli(project, "status", "--json").stdout)["run_id"]
    host = ssh_fleet.host("node3")
    host.stop()  # sshd gone, the experiment lives on
    try:
        stopped = cli(project, "stop", run_id, "--grace", "1")
    finally:
        host.start()
    line = stopped.stderr.strip().splitlines()[-1]
    assert stopped.returncode == 1 and line.startswith("error: could not stop on node3: "), line
    assert "node3: node3" not in line, line
    assert cli(project, "stop", run_id, "--grace", "1").returncode == 0
