"""The generated jobs under a real Slurm (the harness's single-node cluster, reached over the
fleet's sshd): sbatch accepts every option job_script gives, the array runs each task with
its environment, dependencies on an array task, a whole array and afterany hold as Slurm
means them, and parse_scontrol reads what this Slurm says about our own jobs."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest

from infra.backends.slurm.jobstate import SlurmState, parse_scontrol, plain_words
from infra.backends.slurm.sbatch import (
    Dependency,
    DependencyKind,
    JobScript,
    job_script,
    output_path,
    results_dir,
    slurm_dir,
)
from infra.campaign.sweep import expand
from infra.config.model import SlurmTarget
from infra.config.specs import parse_spec
from infra.config.topology import parse_cluster
from tests.slurmcluster import PARTITION, SlurmLogin

pytestmark = pytest.mark.xdist_group("slurm")

CLUSTER = parse_cluster({"nodes": [{"name": "n1", "host": "localhost", "ram_gb": 8,
                                    "remote_work_dir": "/tmp"}]}, Path("/tmp/c/cluster.yaml"))
TARGET = SlurmTarget(name="hpc", host="node1", partition=PARTITION, time_limit="5")
RUN = "20261206-real-core"


def spec(**kw: Any) -> Any:
    doc: dict[str, Any] = {"experiment_id": "e1", "command": "true", "ram_gb": 0.1}
    doc.update(kw)
    return parse_spec(doc, Path(f"/tmp/c/{doc['experiment_id']}.json"), CLUSTER)


def submit(login: SlurmLogin, script: JobScript) -> str:
    return login.sbatch(script.text, *script.options)


def env_of(login: SlurmLogin, work: str, instance: str) -> dict[str, str]:
    text = login.ssh(f"cat {shlex.quote(results_dir(work, RUN, instance) + '/env.txt')}").stdout
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def test_real_sbatch_takes_our_jobs(slurm_login: SlurmLogin) -> None:
    work = str(slurm_login.workdir / "lab dir")  # a space in the work dir, as users have
    slurm_login.ssh(f"mkdir -p {shlex.quote(slurm_dir(work, RUN))}")  # the driver's part
    cmd = ('env | grep -E "^(INFRA_[A-Z_]+|GREETING)=" > "$INFRA_RESULTS_DIR/env.txt"; '
           "echo task {lr} at $(pwd)")
    tasks = expand(spec(experiment_id="sw", command=cmd, env={"GREETING": "it's $HOME"},
                        cpu_cores=2, slurm={"signal": "B:USR1@30", "time_limit": "00:03:00"},
                        sweep={"grid": {"lr": [1, 2, 3, 4]}}), 1000)
    array = job_script(TARGET, RUN, tasks, work_dir=work, max_parallel=2)
    array_id = submit(slurm_login, array)

    after = job_script(TARGET, RUN, [spec(experiment_id="after", command="echo after; exit 3")],
                       work_dir=work, dependencies=[
                           Dependency(DependencyKind.AFTEROK, f"{array_id}_1"),
                           Dependency(DependencyKind.AFTEROK, array_id)])
    after_id = submit(slurm_login, after)
    anyway = job_script(TARGET, RUN, [spec(experiment_id="anyway", command="echo anyway")],
                        work_dir=work,
                        dependencies=[Dependency(DependencyKind.AFTERANY, after_id)])
    anyway_id = submit(slurm_login, anyway)

    slurm_login.cluster.wait_job(anyway_id, timeout=240)
    text = slurm_login.ssh(f"scontrol show -o job {array_id}").stdout
    states = parse_scontrol(text)
    assert sorted(s.index for s in states if s.index is not None) == [0, 1, 2, 3]
    assert {(s.job_id, s.state, s.exit_code, s.name) for s in states} == \
        {(array_id, SlurmState.COMPLETED, 0, array.name)}
    assert {s.throttle for s in states} == {2} and {s.time_limit for s in states} == {"00:03:00"}
    assert f"Comment=lab-orchestrator run={RUN} key=sw" in text
    assert "NumCPUs=2" in text

    for i, task in enumerate(tasks):
        out = slurm_login.ssh(f"cat {shlex.quote(output_path(work, RUN, 'sw', i))}").stdout
        assert out == f"task {i + 1} at {work}\n"
        env = env_of(slurm_login, work, task.experiment_id)
        assert env["INFRA_INSTANCE_ID"] == task.experiment_id
        assert env["INFRA_TASK_INDEX"] == str(i) and env["INFRA_ATTEMPT"] == "1"
        assert env["INFRA_RUN_ID"] == RUN and env["INFRA_NODE"] == slurm_login.cluster.node
        assert env["GREETING"] == "it's $HOME"

    [failed] = parse_scontrol(slurm_login.ssh(f"scontrol show -o job {after_id}").stdout)
    assert plain_words(failed) == "failed: exit code 3"
    out = slurm_login.ssh(f"cat {shlex.quote(output_path(work, RUN, 'after', None))}").stdout
    assert out == "after\n"
    [done] = parse_scontrol(slurm_login.ssh(f"scontrol show -o job {anyway_id}").stdout)
    assert done.state is SlurmState.COMPLETED  # afterany: it ran although "after" failed


def test_real_job_without_its_output_directory_fails_to_launch(slurm_login: SlurmLogin) -> None:
    """Slurm creates no --output directory: the job fails at launch, said as such."""
    work = str(slurm_login.workdir / "no-output-dir")
    slurm_login.ssh(f"mkdir -p {shlex.quote(work)}")  # the work dir, but not slurm_dir
    job = submit(slurm_login, job_script(TARGET, "run-without-dir", [spec()], work_dir=work))
    slurm_login.cluster.wait_job(job, timeout=120)
    [state] = parse_scontrol(slurm_login.ssh(f"scontrol show -o job {job}").stdout)
    assert (state.state, state.reason) == (SlurmState.FAILED, "JobLaunchFailure")
    assert plain_words(state).startswith("failed to launch: Slurm could not start it")
