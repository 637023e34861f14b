"""The Slurm test harness itself: a real single-node cluster reached over the fleet's sshd.

Each end state a Slurm backend must understand is produced here for real, and the line
``scontrol show job -o`` prints for it is checked field by field.  With
``INFRA_SLURM_RECORD=DIR`` the observed lines are also written to DIR (that is how
tests/fixtures/slurm/ was made; the backend's parser tests read those files).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.builders import wait_for
from tests.slurmcluster import (
    CGROUP,
    SlurmCluster,
    SlurmLogin,
    max_overlap,
    reap_stale_clusters,
)

pytestmark = pytest.mark.xdist_group("slurm")

RECORD_ENV = "INFRA_SLURM_RECORD"


def record(name: str, text: str) -> None:
    """Keep what Slurm printed as a fixture file when INFRA_SLURM_RECORD names a folder."""
    folder = os.environ.get(RECORD_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / name).write_text(text if text.endswith("\n") else text + "\n")


def show_raw(login: SlurmLogin, job_id: str) -> str:
    """``scontrol show job -o ID`` as the login user prints it."""
    return login.ssh(f"scontrol show job -o {job_id}").stdout


def finished(login: SlurmLogin, job_id: str, fixture: str, timeout: float = 180.0) -> dict[str, str]:
    """Wait for the job to end, record its line, and return its fields."""
    [job] = login.cluster.wait_job(job_id, timeout=timeout)
    record(fixture, show_raw(login, job_id))
    return job


def test_cluster_listens_on_loopback_only(slurm_cluster: SlurmCluster) -> None:
    """slurmctld and slurmd bind 127.0.0.1 on their own ports, never every interface."""
    pids = slurm_cluster.pids()
    assert set(pids) == {"munged", "slurmctld", "slurmd"}
    for daemon, port in (("slurmctld", slurm_cluster.ctld_port),
                         ("slurmd", slurm_cluster.slurmd_port)):
        listens = [c.laddr for c in psutil.Process(pids[daemon]).net_connections(kind="tcp")
                   if c.status == psutil.CONN_LISTEN]
        assert [tuple(a) for a in listens] == [("127.0.0.1", port)], (daemon, listens)
    assert slurm_cluster.node_state() == "IDLE"


def test_sbatch_over_ssh_runs_as_the_fleet_user(slurm_login: SlurmLogin) -> None:
    """sbatch on the login host (SLURM_CONF from sshd's SetEnv) runs the job as its user."""
    job_id = slurm_login.sbatch("#!/bin/sh\necho \"user=$(id -un) job=$SLURM_JOB_ID\"\npwd\n",
                                "--job-name=hello", "--output=hello-%j.out")
    job = finished(slurm_login, job_id, "completed.txt")
    assert (job["JobState"], job["Reason"], job["ExitCode"]) == ("COMPLETED", "None", "0:0")
    assert job["UserId"].startswith(slurm_login.host.user + "(")
    out = slurm_login.read(f"hello-{job_id}.out").splitlines()
    assert out == [f"user={slurm_login.host.user} job={job_id}", str(slurm_login.workdir)]


def test_nonzero_exit_is_failed_with_its_code(slurm_login: SlurmLogin) -> None:
    """A script exiting 3 ends FAILED, Reason=NonZeroExitCode, ExitCode=3:0."""
    job_id = slurm_login.sbatch("#!/bin/sh\necho failing\nexit 3\n", "--output=fail-%j.out")
    job = finished(slurm_login, job_id, "failed_exit3.txt")
    assert (job["JobState"], job["Reason"], job["ExitCode"]) == (
        "FAILED", "NonZeroExitCode", "3:0")


ARRAY_TASK = """#!/bin/sh
echo "start $(date +%s.%N)" > "array-$SLURM_ARRAY_TASK_ID.times"
sleep 2
echo "end $(date +%s.%N)" >> "array-$SLURM_ARRAY_TASK_ID.times"
"""


def test_array_throttle_runs_at_most_two_at_once(slurm_login: SlurmLogin) -> None:
    """--array=0-7%2: all eight tasks complete, never more than two at the same time."""
    cluster = slurm_login.cluster
    job_id = slurm_login.sbatch(ARRAY_TASK, "--array=0-7%2", "--output=array-%A_%a.out")

    def throttled() -> str:
        lines = show_raw(slurm_login, job_id).splitlines()
        return "\n".join(lines) if any("Reason=JobArrayTaskLimit" in ln for ln in lines) else ""

    record("array_pending_throttled.txt", wait_for(throttled, timeout=120.0, interval=0.3))
    tasks = cluster.wait_job(job_id, timeout=240.0)
    record("array_completed.txt", show_raw(slurm_login, job_id))
    assert sorted(int(t["ArrayTaskId"]) for t in tasks) == list(range(8))
    assert {t["JobState"] for t in tasks} == {"COMPLETED"}
    assert {t["ArrayJobId"] for t in tasks} == {job_id}
    spans = []
    for index in range(8):
        text = slurm_login.read(f"array-{index}.times")
        start = float(re.search(r"start ([\d.]+)", text).group(1))  # type: ignore[union-attr]
        end = float(re.search(r"end ([\d.]+)", text).group(1))  # type: ignore[union-attr]
        spans.append((start, end))
    assert max_overlap(spans) <= 2, spans


OVER_MEMORY = """#!/bin/sh
sleep 2
python3 -c '
import time
block = bytearray(300 * 1024 * 1024)
for i in range(0, len(block), 4096):
    block[i] = 1
time.sleep(120)
print("survived")
'
"""


def test_job_over_its_memory_is_killed(slurm_login: SlurmLogin) -> None:
    """--mem=50M and 300 MB resident: the job is killed within seconds.

    With cgroups (task/cgroup, ConstrainRAMSpace) the kernel's OOM killer does it and Slurm
    says OUT_OF_MEMORY, Reason=OutOfMemory, ExitCode=0:125; without (OverMemoryKill of
    jobacct_gather/linux) slurmstepd does it and Slurm 22.05 says FAILED,
    Reason=JobLaunchFailure, ExitCode=0:9, with 'Exceeded job memory limit' in the output.
    """
    mode = slurm_login.cluster.memory
    job_id = slurm_login.sbatch(OVER_MEMORY, "--mem=50M", "--output=oom-%j.out")
    job = finished(slurm_login, job_id, f"over_memory_{mode}.txt")
    out = slurm_login.read(f"oom-{job_id}.out")
    record(f"over_memory_{mode}_output.txt", out)
    fields = (job["JobState"], job["Reason"], job["ExitCode"])
    if mode == CGROUP:
        assert fields == ("OUT_OF_MEMORY", "OutOfMemory", "0:125"), fields
        assert "oom-kill event" in out
    else:
        assert fields == ("FAILED", "JobLaunchFailure", "0:9"), fields
        assert "Exceeded job memory limit" in out
    assert "survived" not in out


def test_job_over_its_time_limit_times_out(slurm_login: SlurmLogin) -> None:
    """--time=1 with `sleep 600`: TIMEOUT, Reason=TimeLimit, about 60-100 s after the start
    (Slurm checks time limits every 30 s)."""
    job_id = slurm_login.sbatch("#!/bin/sh\nsleep 600\n", "--time=1", "--output=to-%j.out")
    job = finished(slurm_login, job_id, "timeout.txt", timeout=280.0)
    assert (job["JobState"], job["Reason"]) == ("TIMEOUT", "TimeLimit")
    assert "DUE TO TIME LIMIT" in slurm_login.read(f"to-{job_id}.out")


def test_scancel_gives_cancelled(slurm_login: SlurmLogin) -> None:
    """scancel by the user of a running job: CANCELLED."""
    cluster = slurm_login.cluster
    job_id = slurm_login.sbatch("#!/bin/sh\nsleep 600\n", "--output=cancel-%j.out")
    cluster.wait_job(job_id, states=["RUNNING"], timeout=120.0)
    record("running.txt", show_raw(slurm_login, job_id))
    slurm_login.ssh(f"scancel {job_id}")
    job = finished(slurm_login, job_id, "cancelled.txt")
    assert job["JobState"] == "CANCELLED"


def test_afterok_waits_then_runs(slurm_login: SlurmLogin) -> None:
    """afterok:A holds B (Reason=Dependency) until A completes, then B runs."""
    cluster = slurm_login.cluster
    flag = slurm_login.workdir / "dep-go"
    first = slurm_login.sbatch(f"#!/bin/sh\nwhile [ ! -e {flag} ]; do sleep 0.2; done\n",
                               "--output=dep-a-%j.out")
    second = slurm_login.sbatch("#!/bin/sh\necho second\n", f"--dependency=afterok:{first}",
                                "--output=dep-b-%j.out")
    cluster.wait_job(first, states=["RUNNING"], timeout=120.0)
    [waiting] = cluster.show_job(second)
    record("pending_dependency.txt", show_raw(slurm_login, second))
    assert (waiting["JobState"], waiting["Reason"]) == ("PENDING", "Dependency")
    slurm_login.ssh(f"touch {flag}")
    [a] = cluster.wait_job(first)
    [b] = cluster.wait_job(second)
    assert (a["JobState"], b["JobState"]) == ("COMPLETED", "COMPLETED")
    assert b["StartTime"] >= a["EndTime"]


def test_afterok_on_failed_job_never_runs(slurm_login: SlurmLogin) -> None:
    """afterok on a failed job: the dependent job stays PENDING, DependencyNeverSatisfied."""
    cluster = slurm_login.cluster
    first = slurm_login.sbatch("#!/bin/sh\nexit 1\n", "--output=depfail-a-%j.out")
    second = slurm_login.sbatch("#!/bin/sh\necho never\n", f"--dependency=afterok:{first}",
                                "--output=depfail-b-%j.out")
    cluster.wait_job(first)

    def never() -> dict[str, str]:
        [job] = cluster.show_job(second)
        return job if job["Reason"] == "DependencyNeverSatisfied" else {}

    job = wait_for(never, timeout=120.0, interval=0.3)
    record("dependency_never_satisfied.txt", show_raw(slurm_login, second))
    assert job["JobState"] == "PENDING"
    slurm_login.ssh(f"scancel {second}")
    cluster.wait_job(second)


def test_sacct_says_accounting_is_disabled(slurm_login: SlurmLogin) -> None:
    """Without slurmdbd, sacct refuses: a backend must fall back to scontrol show job."""
    proc = slurm_login.ssh("sacct -X -n -P -j 1", check=False)
    record("sacct_disabled.txt", f"rc={proc.returncode}\n{proc.stdout}{proc.stderr}")
    assert proc.returncode != 0
    assert "accounting storage is disabled" in proc.stderr.lower()


def test_second_cluster_coexists_and_leaves_nothing(slurm_cluster: SlurmCluster) -> None:
    """Another cluster (as another pytest session would start) runs beside the session's
    one, and stopping it leaves no daemon, stray slurmstepd or directory behind."""
    with SlurmCluster.start() as other:
        assert other.name != slurm_cluster.name
        assert {other.ctld_port, other.slurmd_port}.isdisjoint(
            {slurm_cluster.ctld_port, slurm_cluster.slurmd_port})
        job_id = other.run("sbatch", "--parsable", "--output=/dev/null",
                           "--wrap=sleep 600").stdout.strip()
        other.wait_job(job_id, states=["RUNNING"], timeout=120.0)
        # slurmstepd, the job's shell and its `sleep`, once the step has launched
        wait_for(lambda: len(other.strays()) >= 3, timeout=60.0)
        pids = list(other.pids().values())
        workdir = other.workdir
    assert not [p for p in pids if psutil.pid_exists(p)
                and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert other.strays() == []
    assert other.cgroup_dirs() == []
    assert not workdir.exists()
    assert slurm_cluster.node_state() in ("IDLE", "MIXED")


KEEP_A_CLUSTER = """
import time
from tests.slurmcluster import SlurmCluster
with SlurmCluster.start() as cluster:
    print(cluster.workdir, flush=True)
    time.sleep(600)  # until the test SIGKILLs this stand-in for a pytest session
"""


def test_cluster_of_a_killed_session_is_reaped(slurm_cluster: SlurmCluster) -> None:
    """A session SIGKILLed with its cluster up leaves the daemons running (they have their
    own sessions); the next cluster to start stops them and removes their directory, and
    leaves live sessions' clusters alone."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", KEEP_A_CLUSTER], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line:
        proc.wait(timeout=60)
        assert proc.stderr is not None
        raise AssertionError(f"the stand-in session failed: {proc.stderr.read()[-2000:]}")
    workdir = Path(line)
    proc.kill()
    proc.communicate(timeout=60)
    survivors = [p for p in psutil.process_iter(["cmdline"])
                 if any(str(workdir) in arg for arg in p.info["cmdline"] or [])]
    assert len(survivors) >= 3, "munged, slurmctld and slurmd outlive the killed session"

    assert workdir in reap_stale_clusters()
    assert not workdir.exists()
    gone, alive = psutil.wait_procs(survivors, timeout=30.0)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert slurm_cluster.workdir.exists()
    assert set(slurm_cluster.pids()) == {"munged", "slurmctld", "slurmd"}
