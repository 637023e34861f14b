"""Slurm runs end to end: the real CLI against a real single-node Slurm, over the fleet's sshd.

The login host is the fleet's node1 (its sessions get ``SLURM_CONF``); the cluster config
names it as a ``type: slurm`` target. Covered: a plain experiment (logs home equal to the
job's output, results home), a 16-task sweep as one throttled array, an afterok chain (and
a failed first job leaving the second never started), ``stop``, a job over its memory, and
a coordinator SIGKILLed right after sbatch before it stored the job id, then ``watch``
finishing the run with exactly one job in Slurm.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.backends.slurm.sbatch import job_name, output_path
from infra.state import Store
from tests.builders import wait_for
from tests.slurmcluster import SlurmLogin, max_overlap
from tests.sshfleet import SSHFleet
from tests.test_run_e2e import cli, status_json

pytestmark = [pytest.mark.xdist_group("slurm"), pytest.mark.integration]

TARGET = "hpc"
RUN_BOUND = 420.0  # seconds a whole run may take on a loaded box
TASK = """#!/bin/sh
# task.sh SECONDS EXIT: times into the results dir, a few lines of output, then exit
echo "start $(date +%s.%N)" > "$INFRA_RESULTS_DIR/times.txt"
i=0
while [ $i -lt 5 ]; do echo "line $i of $INFRA_INSTANCE_ID task=${INFRA_TASK_INDEX:-}"; i=$((i+1)); done
sleep "$1"
echo "end $(date +%s.%N)" >> "$INFRA_RESULTS_DIR/times.txt"
mkdir -p out && echo "$INFRA_INSTANCE_ID" > "out/$INFRA_INSTANCE_ID.txt"
echo "done $INFRA_INSTANCE_ID"
exit "$2"
"""


@pytest.fixture()
def sproj(slurm_login: SlurmLogin, ssh_fleet: SSHFleet, tmp_path: Path) -> Iterator[Path]:
    """A project whose cluster config has the Slurm target ``hpc`` and one bench node."""
    root = tmp_path / "proj"
    (root / "experiments").mkdir(parents=True)
    (root / "task.sh").write_text(TASK)
    h = slurm_login.host
    bench = ssh_fleet.host("node2")
    config = {
        "nodes": [
            {"name": TARGET, "type": "slurm", "host": h.address, "ssh_port": h.port,
             "ssh_user": h.user, "ssh_key_path": str(ssh_fleet.client_key),
             "remote_work_dir": f"{h.home}/slurmwork/{tmp_path.name}",
             "partition": "debug", "time_limit": "00:10:00"},
            {"name": "bench", "host": bench.address, "ssh_port": bench.port,
             "ssh_user": bench.user, "ssh_key_path": str(ssh_fleet.client_key),
             "remote_work_dir": f"{bench.home}/work/{tmp_path.name}",
             "python_path": "/usr/bin/python3", "ram_gb": 8.0, "max_instances": 2}],
        "health_check": {"known_hosts": str(ssh_fleet.known_hosts), "timeout_seconds": 20,
                         "keepalive_seconds": 2, "keepalive_count_max": 3},
        "failover": {"auto_restart": False},
        "deploy": {"source": "."}}
    (root / "cluster_config.yaml").write_text(yaml.safe_dump(config))
    yield root
    # cancel whatever a failed test left in Slurm for this project
    store_db = root / "logs" / "state.db"
    if store_db.exists():
        store = Store(store_db)
        try:
            ids = [j.job_id for run in store.runs(50) for j in store.slurm_jobs(run.run_id)
                   if j.job_id]
        finally:
            store.close()
        if ids:
            slurm_login.ssh("scancel " + " ".join(shlex.quote(str(i)) for i in ids),
                            check=False)


def spec(root: Path, eid: str, command: str, **extra: Any) -> Path:
    doc = {"experiment_id": eid, "command": command, "ram_gb": 0.25}
    doc.update(extra)
    path = root / "experiments" / f"{eid}.json"
    path.write_text(json.dumps(doc))
    return path


def run(root: Path, *specs: Path, pins: str, extra: tuple[str, ...] = (),
        timeout: float = RUN_BOUND) -> subprocess.CompletedProcess[str]:
    """A run through the real CLI with its own monitor until every job is over."""
    args = [a for s in specs for a in ("--config", str(s))]
    return cli(root, *args, "--placement", pins, "--monitor-duration", str(int(timeout)),
               "--json", *extra, timeout=timeout + 60)


def instances(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {i["instance_id"]: i for i in doc["instances"]}


def jobs_of(root: Path, run_id: str) -> list[Any]:
    store = Store(root / "logs" / "state.db")
    try:
        return store.slurm_jobs(run_id)
    finally:
        store.close()


def work_dir(root: Path) -> str:
    return str(yaml.safe_load((root / "cluster_config.yaml").read_text())["nodes"][0]
               ["remote_work_dir"])


def times(root: Path, run_id: str, iid: str) -> tuple[float, float]:
    text = (root / "logs" / run_id / iid / "results" / "times.txt").read_text()
    start = float(re.search(r"start ([\d.]+)", text).group(1))  # type: ignore[union-attr]
    end = float(re.search(r"end ([\d.]+)", text).group(1))  # type: ignore[union-attr]
    return start, end


def slurm_jobs_named(login: SlurmLogin, name: str) -> list[str]:
    """Every job id Slurm knows under ``name`` (any state; array tasks folded)."""
    out = login.ssh(f"squeue -h --states=all --name={shlex.quote(name)} --format=%F").stdout
    return sorted(set(out.split()))


# --------------------------------------------------------------------------- plain


def test_plain_experiment_end_to_end(sproj: Path, slurm_login: SlurmLogin) -> None:
    s = spec(sproj, "plain", "sh task.sh 0.5 0", results=["out/plain.txt"])
    proc = run(sproj, s, pins=f"plain:{TARGET}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    run_id = doc["run_id"]
    rec = instances(doc)["plain"]
    assert rec["state"] == "exited" and rec["node"] == TARGET, rec
    [job] = jobs_of(sproj, run_id)
    assert job.job_id and job.how == "submitted" and job.instance_ids == ("plain",)
    # the log home is exactly the job's output file
    remote = slurm_login.ssh("cat " + shlex.quote(output_path(work_dir(sproj), run_id,
                                                              "plain", None))).stdout
    local = (sproj / "logs" / run_id / "plain.log").read_text()
    assert local == remote and "done plain" in local and local.count("line 0 of") == 1
    proc = cli(sproj, "logs", run_id, "plain")
    assert proc.returncode == 0 and proc.stdout == remote, proc.stderr
    proc = cli(sproj, "logs", "plain", "-f")  # the task is over: it drains and returns
    assert proc.returncode == 0 and proc.stdout == remote, proc.stderr
    for words in (("status", run_id), ("watch", run_id)):  # tables, dashboard lines
        proc = cli(sproj, *words)
        assert proc.returncode == 0 and "plain" in proc.stdout and TARGET in proc.stdout, \
            proc.stdout + proc.stderr
    # results home: the results dir and the spec's glob
    assert (sproj / "logs" / run_id / "plain" / "results" / "times.txt").exists()
    assert (sproj / "logs" / run_id / "plain" / "out" / "plain.txt").read_text() == "plain\n"
    proc = cli(sproj, "results", run_id, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    st = status_json(sproj, run_id)
    assert st["state"] == "finished" and instances(st)["plain"]["state"] == "exited", st
    for words in (("show", run_id), ("runs",), ("report", run_id)):  # local records
        proc = cli(sproj, *words)
        assert proc.returncode == 0 and run_id in proc.stdout, proc.stdout + proc.stderr
    proc = cli(sproj, "rerun", run_id, "--failed")
    assert proc.returncode == 2 and "is a Slurm run" in proc.stderr, proc.stderr
    proc = cli(sproj, "prune", "--older-than", "0", "--json")
    assert proc.returncode == 0 and "a Slurm run" in proc.stdout, proc.stdout + proc.stderr


def test_mixed_run_is_refused_and_submits_nothing(sproj: Path,
                                                  slurm_login: SlurmLogin) -> None:
    a = spec(sproj, "ma", "sh task.sh 0 0")
    b = spec(sproj, "mb", "sh task.sh 0 0")
    proc = cli(sproj, "--config", str(a), "--config", str(b), "--placement",
               f"ma:{TARGET},mb:bench")
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "ma" in lines[0] and "mb" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (sproj / "logs" / "state.db").exists() or not jobs_of_any(sproj)


def jobs_of_any(root: Path) -> list[Any]:
    store = Store(root / "logs" / "state.db")
    try:
        return [j for r in store.runs(10) for j in store.slurm_jobs(r.run_id)]
    finally:
        store.close()


# --------------------------------------------------------------------------- sweep


def test_sweep_is_one_array_throttled_to_four(sproj: Path, slurm_login: SlurmLogin) -> None:
    s = spec(sproj, "sw", "sh task.sh 1 0", sweep={"repeat": 16}, max_parallel=4)
    proc = run(sproj, s, pins=f"sw:{TARGET}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    run_id = doc["run_id"]
    recs = instances(doc)
    assert len(recs) == 16 and {r["state"] for r in recs.values()} == {"exited"}, recs
    [job] = jobs_of(sproj, run_id)
    assert job.key == "sw" and len(job.instance_ids) == 16
    shown = slurm_login.ssh(f"scontrol show -o job {job.job_id}").stdout
    assert len(shown.splitlines()) == 16 and "ArrayTaskThrottle=4" in shown, shown
    spans = [times(sproj, run_id, iid) for iid in sorted(recs)]
    assert len(spans) == 16
    assert max_overlap(spans) <= 4, spans
    for iid in recs:  # each task's log home, once
        text = (sproj / "logs" / run_id / f"{iid}.log").read_text()
        assert text.count(f"done {iid}") == 1 and text.count("line 0 of") == 1, text


# --------------------------------------------------------------------------- afterok


def test_afterok_chain_runs_b_after_a(sproj: Path, slurm_login: SlurmLogin) -> None:
    a = spec(sproj, "a", "sh task.sh 2 0")
    b = spec(sproj, "b", "sh task.sh 0 0", after=["a"])
    proc = run(sproj, a, b, pins=f"a:{TARGET},b:{TARGET}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    run_id = doc["run_id"]
    assert {i: r["state"] for i, r in instances(doc).items()} == {"a": "exited",
                                                                   "b": "exited"}
    ja, jb = jobs_of(sproj, run_id)
    assert (ja.key, jb.key) == ("a", "b")
    shown = slurm_login.ssh(f"scontrol show -o job {jb.job_id}").stdout
    assert f"Dependency=afterok:{ja.job_id}" in shown or "Dependency=(null)" in shown
    _, a_end = times(sproj, run_id, "a")
    b_start, _ = times(sproj, run_id, "b")
    assert b_start >= a_end, (a_end, b_start)


def test_failed_first_job_leaves_the_second_never_started(sproj: Path,
                                                          slurm_login: SlurmLogin) -> None:
    a = spec(sproj, "fa", "sh task.sh 0 3")
    b = spec(sproj, "fb", "sh task.sh 0 0", after=["fa"])
    proc = run(sproj, a, b, pins=f"fa:{TARGET},fb:{TARGET}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    doc = json.loads(proc.stdout)
    recs = instances(doc)
    assert recs["fa"]["state"] == "failed" and "exit code 3" in recs["fa"]["reason"], recs
    assert recs["fb"]["state"] == "skipped", recs
    assert "never started" in recs["fb"]["reason"], recs["fb"]
    assert recs["fb"]["started_at"] is None
    run_id = doc["run_id"]
    assert not (sproj / "logs" / run_id / "fb" / "results" / "times.txt").exists()


# --------------------------------------------------------------------------- stop


def test_stop_cancels_the_job(sproj: Path, slurm_login: SlurmLogin) -> None:
    s = spec(sproj, "long", "sh task.sh 600 0")
    sweep = spec(sproj, "ls", "sh task.sh 600 0", sweep={"repeat": 3}, max_parallel=2)
    proc = cli(sproj, "--config", str(s), "--config", str(sweep), "--placement",
               f"long:{TARGET},ls:{TARGET}", "--monitor-duration", "0", "--json",
               timeout=RUN_BOUND)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id = json.loads(proc.stdout)["run_id"]

    def running() -> bool:
        return instances(status_json(sproj, run_id))["long"]["state"] == "running"

    wait_for(running, timeout=RUN_BOUND, interval=1.0)
    # a sweep's name: its whole array, one scancel; the other job runs on
    proc = cli(sproj, "stop", run_id, "ls", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recs = instances(json.loads(proc.stdout))
    assert {recs[f"ls.{i:04d}"]["state"] for i in range(3)} == {"stopped"}, recs
    assert recs["long"]["state"] == "running", recs
    follow = subprocess.Popen([sys.executable, "-m", "infra.cli.main", "logs", run_id, "long",
                               "-f"], cwd=sproj, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        proc = cli(sproj, "stop", run_id, "--json")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out, err = follow.communicate(timeout=RUN_BOUND)  # `logs -f` ends with the job
    finally:
        follow.kill()
    assert follow.returncode == 0 and "line 4 of long" in out, out + err
    doc = json.loads(proc.stdout)
    assert instances(doc)["long"]["state"] == "stopped", doc
    assert doc["state"] == "stopped"
    for job in jobs_of(sproj, run_id):
        shown = slurm_login.ssh(f"scontrol show -o job {job.job_id}").stdout
        assert "JobState=CANCELLED" in shown and "JobState=RUNNING" not in shown, shown


# --------------------------------------------------------------------------- memory


OVER_MEMORY = ("python3 -c 'import time; b = bytearray(300 * 1024 * 1024); "
               "[b.__setitem__(i, 1) for i in range(0, len(b), 4096)]; time.sleep(120); "
               "print(\"survived\")'")


def test_job_over_its_memory_fails_with_the_plain_reason(sproj: Path,
                                                          slurm_login: SlurmLogin) -> None:
    s = spec(sproj, "hog", OVER_MEMORY, ram_gb=0.05)
    proc = run(sproj, s, pins=f"hog:{TARGET}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    rec = instances(json.loads(proc.stdout))["hog"]
    assert rec["state"] == "failed", rec
    assert "memory" in rec["reason"], rec
    assert "survived" not in (sproj / "logs" / json.loads(proc.stdout)["run_id"] /
                              "hog.log").read_text()


# --------------------------------------------------------------------------- never twice


WRAPPER = """#!/bin/sh
# sbatch for the test: submit for real, say so, then hang until killed (the coordinator is
# SIGKILLed meanwhile, before it could store the job id or the marker be written)
out=$(/usr/bin/sbatch "$@") || exit $?
echo "$$ $PPID $out" > {flag}.tmp && mv {flag}.tmp {flag}
while :; do sleep 1; done
"""


def test_coordinator_killed_after_sbatch_then_watch_submits_nothing_new(
        sproj: Path, slurm_login: SlurmLogin) -> None:
    h = slurm_login.host
    bindir = h.home / f"sbatch-wrap-{sproj.parent.name}"
    bindir.mkdir(exist_ok=True)
    flag = bindir / "submitted"
    wrapper = bindir / "sbatch"
    wrapper.write_text(WRAPPER.format(flag=flag))
    wrapper.chmod(0o755)
    os.chown(bindir, h.uid, -1)
    before = dict(h.env)
    h.set_env({**before, "PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin"})
    s = spec(sproj, "once", "sh task.sh 1 0")
    try:
        coord = subprocess.Popen(
            [sys.executable, "-m", "infra.cli.main", "--config", str(s), "--placement",
             f"once:{TARGET}", "--monitor-duration", "300", "--json"],
            cwd=sproj, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "COLUMNS": "200"})
        try:
            wait_for(flag.exists, timeout=RUN_BOUND, interval=0.2)
            coord.send_signal(signal.SIGKILL)  # sbatch answered; nothing stored it yet
        finally:
            coord.kill()
            coord.wait()
        wrapper_pid, shell_pid, job_id = flag.read_text().split()[:3]
        # the submit command dies too, before it could write the job id marker
        slurm_login.ssh(f"kill -9 {int(wrapper_pid)} {int(shell_pid)}", check=False)
    finally:
        h.set_env(before)
    run_id = status_json(sproj)["run_id"]
    [job] = jobs_of(sproj, run_id)
    assert job.job_id is None, "the coordinator was killed before it stored the job id"
    name = job_name(run_id, "once")
    assert slurm_jobs_named(slurm_login, name) == [job_id.split(";")[0]]
    proc = cli(sproj, "watch", run_id, "--json", timeout=RUN_BOUND)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    assert instances(doc)["once"]["state"] == "exited", doc
    [job] = jobs_of(sproj, run_id)
    assert job.job_id == job_id.split(";")[0] and job.how == "name", job
    assert slurm_jobs_named(slurm_login, name) == [job.job_id]
    local = (sproj / "logs" / run_id / "once.log").read_text()
    assert local.count("done once") == 1, local


# --------------------------------------------------------------------------- restart rules


def test_failed_task_is_requeued_while_its_restart_rules_allow(sproj: Path,
                                                                slurm_login: SlurmLogin) -> None:
    s = spec(sproj, "flaky", 'echo "attempt $INFRA_ATTEMPT"; [ "$INFRA_ATTEMPT" -ge 2 ]',
             auto_restart=True, max_retries=1)
    proc = run(sproj, s, pins=f"flaky:{TARGET}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    rec = instances(doc)["flaky"]
    assert rec["state"] == "exited" and rec["restarts"] == 1, rec
    text = (sproj / "logs" / doc["run_id"] / "flaky.log").read_text()
    assert text.count("attempt 1") == 1 and text.count("attempt 2") == 1, text
    [job] = jobs_of(sproj, doc["run_id"])
    assert slurm_jobs_named(slurm_login, job.name) == [job.job_id]
