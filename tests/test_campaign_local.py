"""Campaigns on the built-in local node with the real CLI: the queue, max_parallel, suites,
stop, rerun --failed and the submit-time checks (the fleet tests are in
test_campaign_e2e.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.builders import wait_for

REPO = Path(__file__).resolve().parent.parent

# A task that counts how many tasks run at once (under a lock), remembers the highest count
# seen, and appends its id to the marker file; it fails while FAIL_IF names its x and the
# flag file is absent.
TASK = textwrap.dedent('''\
    import fcntl, json, os, sys, time
    here = sys.argv[1]
    with open(os.path.join(here, "count.lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = os.path.join(here, "count.json")
        doc = json.load(open(path)) if os.path.exists(path) else {"now": 0, "max": 0}
        doc["now"] += 1
        doc["max"] = max(doc["max"], doc["now"])
        json.dump(doc, open(path, "w"))
    time.sleep(float(sys.argv[2]))
    with open(os.path.join(here, "count.lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        doc = json.load(open(path))
        doc["now"] -= 1
        json.dump(doc, open(path, "w"))
    params = json.loads(os.environ["INFRA_PARAMS"])
    print("ran", os.environ["INFRA_INSTANCE_ID"], "attempt", os.environ["INFRA_ATTEMPT"])
    with open(os.path.join(here, "markers.txt"), "a") as out:
        out.write("task %s %s\\n" % (os.environ["INFRA_INSTANCE_ID"], os.environ["INFRA_TASK_INDEX"]))
    json.dump({"x2": params["x"] * 2}, open(os.path.join(os.environ["INFRA_RESULTS_DIR"], "metrics.json"), "w"))
    if str(params["x"]) in os.environ.get("FAIL_IF", "").split(",") and \\
            not os.path.exists(os.path.join(here, "flag")):
        sys.exit(1)
''')


@pytest.fixture()
def lab(tmp_path: Path) -> Iterator[Path]:
    """A project with only the local node (3 slots) and the counting task."""
    root = tmp_path / "lab"
    (root / "experiments").mkdir(parents=True)
    (root / "task.py").write_text(TASK)
    (root / "shared").mkdir()
    config = {"nodes": [{"name": "local", "host": "localhost", "remote_work_dir": ".",
                         "ram_gb": 8.0, "max_instances": 3, "python_path": sys.executable}],
              "failover": {"auto_restart": False},
              "health_check": {"interval_seconds": 2, "timeout_seconds": 10},
              "deploy": {"source": "."}}
    (root / "cluster_config.yaml").write_text(yaml.safe_dump(config))
    yield root
    subprocess.run(["pkill", "-KILL", "-f", str(root / "task.py")], check=False)


def write_spec(root: Path, name: str, **doc: Any) -> Path:
    doc.setdefault("experiment_id", name)
    doc.setdefault("ram_gb", 0.25)
    doc.setdefault("recover", "none")
    path = root / "experiments" / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def task_command(root: Path, seconds: float = 0.3) -> str:
    return f"{sys.executable} {root / 'task.py'} {root / 'shared'} {seconds}"


def cli(root: Path, *args: str, timeout: float = 240.0,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "infra.cli.main", *args], cwd=root,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


def status(root: Path, run: str = "") -> dict[str, Any]:
    proc = cli(root, "status", *([run] if run else []), "--json")
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def markers(root: Path) -> list[str]:
    path = root / "shared" / "markers.txt"
    return path.read_text().splitlines() if path.exists() else []


def test_sweep_with_a_suite_runs_every_task_once_within_max_parallel(lab: Path) -> None:
    shared = lab / "shared"
    spec = write_spec(lab, "grid", command=task_command(lab),
                      sweep={"grid": {"x": [1, 2, 3, 4], "y": ["a", "b", "c"]}},
                      max_parallel=2,
                      suite={"setup": f"echo setup $INFRA_SUITE_NAME $INFRA_WORKER_COUNT >> "
                                      f"{shared}/markers.txt",
                             "cleanup": f"echo cleanup >> {shared}/markers.txt",
                             "workers": 3})
    proc = cli(lab, "--config", str(spec), "--auto-place")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    lines = markers(lab)
    tasks = [line.split()[1] for line in lines if line.startswith("task ")]
    assert Counter(tasks) == {f"grid.{i:04d}": 1 for i in range(12)}, lines
    assert lines[0] == "setup grid 2", lines  # max_parallel 2 caps the node's 3 workers
    assert lines[-1] == "cleanup" and lines.count("cleanup") == 1, lines
    assert json.loads((shared / "count.json").read_text())["max"] <= 2
    doc = status(lab)
    [camp] = doc["campaigns"]
    assert camp["name"] == "grid" and camp["total"] == 12
    assert camp["counts"] == {"exited": 12}, camp
    assert [p["node"] for p in camp["pools"]] == ["local"]
    assert camp["pools"][0]["state"] == "done"
    run = doc["run_id"]
    for i in range(12):  # each task's metrics came home next to its log
        metrics = lab / "logs" / run / f"grid.{i:04d}" / "results" / "metrics.json"
        assert json.loads(metrics.read_text())["x2"] in (2, 4, 6, 8)


def test_stop_cancels_queued_tasks_stops_running_ones_and_cleans_up(lab: Path) -> None:
    shared = lab / "shared"
    spec = write_spec(lab, "slow", command=task_command(lab, 60),
                      sweep={"repeat": 6},
                      suite={"cleanup": f"echo cleanup >> {shared}/markers.txt", "workers": 1})
    proc = cli(lab, "--config", str(spec), "--auto-place", "--monitor-duration", "0")
    assert proc.returncode == 0, proc.stderr
    run = status(lab)["run_id"]
    wait_for(lambda: json.loads((shared / "count.json").read_text())["now"] == 1
             if (shared / "count.json").exists() else False, 60, "the first task to start")
    proc = cli(lab, "stop", run, "--grace", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert len(doc["stopped"]) == 1 and len(doc["cancelled"]) == 5, doc
    wait_for(lambda: "cleanup" in markers(lab), 60, "the pool's cleanup after a stop")
    counts = status(lab, run)["campaigns"][0]["counts"]
    assert counts == {"stopped": 1, "cancelled": 5}, counts
    assert markers(lab).count("cleanup") == 1


def test_rerun_failed_runs_only_the_failed_tasks_again_under_their_ids(lab: Path) -> None:
    spec = write_spec(lab, "flaky", command=task_command(lab, 0.1),
                      sweep={"grid": {"x": [1, 2, 3, 4]}}, env={"FAIL_IF": "2,4"})
    proc = cli(lab, "--config", str(spec), "--auto-place")
    assert proc.returncode == 1, proc.stderr
    assert "2 instance(s) did not finish" in proc.stderr
    assert "rerun" in proc.stderr and "--failed" in proc.stderr
    doc = status(lab)
    assert doc["campaigns"][0]["counts"] == {"exited": 2, "failed": 2}
    assert sorted(f["instance_id"] for f in doc["campaigns"][0]["failed"]) == \
        ["flaky.0001", "flaky.0003"]
    (lab / "shared" / "flag").touch()
    proc = cli(lab, "rerun", doc["run_id"], "--failed")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert status(lab)["campaigns"][0]["counts"] == {"exited": 4}
    runs = Counter(line.split()[1] for line in markers(lab))
    assert runs == {"flaky.0000": 1, "flaky.0001": 2, "flaky.0002": 1, "flaky.0003": 2}
    log = (lab / "logs" / doc["run_id"] / "flaky.0001.log").read_text()
    assert log.count("ran flaky.0001 attempt 1") == 2, log  # the rerun's output appended
    proc = cli(lab, "rerun", doc["run_id"], "--failed")
    assert proc.returncode == 0 and "nothing to rerun" in proc.stdout


def test_submit_checks_for_queued_work(lab: Path) -> None:
    gpu = write_spec(lab, "gpu", command="true", sweep={"repeat": 2}, gpu_required=True,
                     gpu_memory_gb=1)
    proc = cli(lab, "--config", str(gpu), "--auto-place")
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "gpu can never run here (local: " in proc.stderr
    plain = write_spec(lab, "plain", command="true", sweep={"repeat": 2})
    proc = cli(lab, "--config", str(plain))
    assert proc.returncode == 2 and "add --auto-place" in proc.stderr, proc.stderr
    proc = cli(lab, "--config", str(plain), "--placement", "plain.0001:local")
    assert proc.returncode == 2 and "plain: queued work" in proc.stderr, proc.stderr
    proc = cli(lab, "--config", str(gpu), "--placement", "gpu:nowhere")
    assert proc.returncode == 2 and "unknown node 'nowhere' for gpu" in proc.stderr, proc.stderr
    proc = cli(lab, "runs", "--json")  # nothing was recorded (or started)
    assert proc.returncode == 0 and json.loads(proc.stdout)["runs"] == [], proc.stdout
