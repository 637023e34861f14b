"""Failure classes and live output, end to end on the real sshd fleet through the real CLI.

A broken command fails on its node with its real error and is never moved; a pinned
instance is never moved by the restart policy; a Python program's ``print()`` lines reach
the local log copy while it still runs (``PYTHONUNBUFFERED=1`` by default).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.state import Store
from tests.builders import wait_for
from tests.sshfleet import SSHFleet
from tests.test_run_e2e import cli, project, status_json

__all__ = ["project"]  # the fixture, shared with the end-to-end tests

pytestmark = pytest.mark.integration


@pytest.fixture()
def restarting(project: Path) -> Path:
    """The e2e project with restarts on (a short delay) and every spec ``recover: cluster``."""
    path = project / "cluster_config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["failover"] = {"auto_restart": True, "retry_delay_seconds": 0.2}
    path.write_text(yaml.safe_dump(cfg))
    return project


def write_spec(root: Path, eid: str, command: str, **extra: Any) -> Path:
    doc = {"experiment_id": eid, "command": command, "ram_gb": 0.5, "recover": "cluster",
           **extra}
    path = root / "experiments" / f"{eid}.json"
    path.write_text(json.dumps(doc))
    return path


def events(root: Path, run_id: str) -> list[str]:
    store = Store(root / "logs" / "state.db")
    try:
        return [f"{e.kind} {e.subject}: {e.message}" for e in store.events(run_id)]
    finally:
        store.close()


def copies_elsewhere(fleet: SSHFleet, root: Path, run_id: str, node: str) -> list[str]:
    """Fleet nodes other than ``node`` where the run left an instance directory."""
    found = []
    for h in fleet.hosts:
        runs = Path(f"{h.home}/work/{root.parent.name}/.infra/runs/{run_id}")
        if h.name != node and runs.is_dir() and any(runs.iterdir()):
            found.append(h.name)
    return found


def test_pinned_typo_fails_with_its_error_and_is_never_moved(restarting: Path,
                                                             ssh_fleet: SSHFleet) -> None:
    s = write_spec(restarting, "typo", "pyhton3 workloads/mind.py --duration 1")
    proc = cli(restarting, "--config", str(s), "--placement", "typo:node2")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    doc = status_json(restarting)
    (inst,) = doc["instances"]
    assert inst["node"] == "node2" and inst["state"] == "failed", inst
    assert inst["moves"] == 0 and inst["exit_code"] == 127
    assert inst["restarts"] == 1  # one retry, and the record is that last attempt's
    assert inst["failure_class"] == "broken_command"
    assert "exit code 127 (command not found)" in inst["reason"], inst["reason"]
    assert "pyhton3: not found" in inst["reason"]
    assert "Traceback" not in proc.stderr
    said = events(restarting, doc["run_id"])
    assert not [e for e in said if e.startswith("move ")], said
    assert copies_elsewhere(ssh_fleet, restarting, doc["run_id"], "node2") == []


def test_auto_placed_broken_command_is_not_moved(restarting: Path,
                                                 ssh_fleet: SSHFleet) -> None:
    s = write_spec(restarting, "nocfg", "echo 'error: no such file: data.csv' >&2; exit 2")
    proc = cli(restarting, "--config", str(s), "--auto-place")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    doc = status_json(restarting)
    (inst,) = doc["instances"]
    assert inst["state"] == "failed" and inst["moves"] == 0, inst
    assert inst["reason"].startswith("exit code 2: error: no such file: data.csv; gave up after 2 "
                                     "failed attempts"), inst["reason"]
    said = events(restarting, doc["run_id"])
    assert any("not moved: the command is broken" in e for e in said), said
    assert not [e for e in said if e.startswith("move ")], said
    assert copies_elsewhere(ssh_fleet, restarting, doc["run_id"], inst["node"]) == []


def test_pinned_instance_is_not_moved_when_its_restarts_run_out(restarting: Path,
                                                                ssh_fleet: SSHFleet) -> None:
    # killed by a signal: not a broken command, an ordinary failure the policy would move
    s = write_spec(restarting, "crash", "echo going; kill -KILL $$", max_retries=0)
    proc = cli(restarting, "--config", str(s), "--placement", "crash:node3")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    doc = status_json(restarting)
    (inst,) = doc["instances"]
    assert inst["node"] == "node3" and inst["state"] == "failed", inst
    assert inst["moves"] == 0 and inst["signal"] == "SIGKILL"
    assert inst["failure_class"] == "resource"
    said = events(restarting, doc["run_id"])
    assert any("not moved: pinned to node3" in e for e in said), said
    assert copies_elsewhere(ssh_fleet, restarting, doc["run_id"], "node3") == []


LIVE = """\
import os, sys, time
print("step 1")
print("step 2")
while not os.path.exists(sys.argv[1]):
    time.sleep(0.05)
print("done")
"""


@pytest.fixture()
def release_dir() -> Iterator[Path]:
    """A directory every node user can look into (the fleet's users are not root)."""
    path = Path(tempfile.mkdtemp(prefix="infra-live-"))
    path.chmod(0o755)
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def test_print_output_reaches_the_local_log_while_it_runs(project: Path,
                                                          release_dir: Path) -> None:
    (project / "workloads" / "live.py").write_text(LIVE)
    release = release_dir / "release"
    s = write_spec(project, "live", f"python3 workloads/live.py {release}")
    coord = subprocess.Popen([sys.executable, "-m", "infra.cli.main", "--config", str(s),
                              "--placement", "live:node1"], cwd=project,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "COLUMNS": "200"})
    try:
        def early_lines() -> bool:
            logs = list((project / "logs").glob("r-*/live.log"))
            return bool(logs) and "step 2" in logs[0].read_text()

        # the program waits for the release file: these lines came while it runs
        wait_for(early_lines, timeout=60)
        run_id = status_json(project)["run_id"]
        assert status_json(project, run_id)["instances"][0]["state"] == "running"
    finally:
        release.write_text("go")
        out, err = coord.communicate(timeout=120)
    assert coord.returncode == 0, out + err
    log = (project / "logs" / run_id / "live.log").read_text()
    assert log.splitlines() == ["step 1", "step 2", "done"]


def test_pythonunbuffered_is_set_unless_the_spec_sets_it(project: Path) -> None:
    dflt = write_spec(project, "dflt", 'echo "unbuffered=[$PYTHONUNBUFFERED]"')
    own = write_spec(project, "own", 'echo "unbuffered=[$PYTHONUNBUFFERED]"',
                     env={"PYTHONUNBUFFERED": ""})
    proc = cli(project, "--config", str(dflt), "--config", str(own),
               "--placement", "dflt:local,own:node1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id = status_json(project)["run_id"]
    logs = project / "logs" / run_id
    assert (logs / "dflt.log").read_text() == "unbuffered=[1]\n"
    assert (logs / "own.log").read_text() == "unbuffered=[]\n"
