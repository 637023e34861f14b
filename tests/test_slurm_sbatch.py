"""The sbatch job of a spec and the job array of a sweep (backends.slurm.sbatch): every
option mapping, arrays, dependencies, refusals; and the generated batch script run for real
with /bin/sh (no Slurm needed: SLURM_* variables set by the test as sbatch would)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from infra.backends.slurm.sbatch import (
    Dependency,
    DependencyKind,
    JobScript,
    dependency_option,
    job_name,
    job_script,
    output_path,
    results_dir,
)
from infra.campaign.sweep import expand
from infra.config.model import SlurmTarget
from infra.config.specs import parse_spec
from infra.config.topology import parse_cluster
from infra.errors import SlurmMappingError

CLUSTER = parse_cluster({"nodes": [{"name": "n1", "host": "localhost", "ram_gb": 8,
                                    "remote_work_dir": "/tmp"}]}, Path("/tmp/c/cluster.yaml"))
TARGET = SlurmTarget(name="hpc", host="login.invalid", partition="debug", account="lab",
                     qos="normal", time_limit="02:00:00")
BARE = SlurmTarget(name="hpc", host="login.invalid")
WORK = "/scratch/alice/lab"
RUN = "20261206-230000-abcd"


def spec(**kw: Any) -> Any:
    doc: dict[str, Any] = {"experiment_id": "e1", "command": "python3 run.py"}
    doc.update(kw)
    return parse_spec(doc, Path(f"/tmp/c/{doc['experiment_id']}.json"), CLUSTER)


def opts(script: JobScript) -> dict[str, str]:
    """Options as a mapping (flags without a value map to "")."""
    out: dict[str, str] = {}
    for word in script.options:
        key, _, value = word.partition("=")
        assert key not in out, f"{key} given twice"
        out[key] = value
    return out


# --------------------------------------------------------------------------- one job

def test_a_plain_spec_is_one_job_with_every_default() -> None:
    s = job_script(BARE, RUN, [spec()], work_dir=WORK)
    assert s.key == "e1" and s.instance_ids == ("e1",) and not s.is_array
    assert s.name == f"infra.{RUN}.e1" == job_name(RUN, "e1")
    assert opts(s) == {
        "--job-name": f"infra.{RUN}.e1",
        "--comment": f"lab-orchestrator run={RUN} key=e1",
        "--time": "01:00:00",
        "--cpus-per-task": "1",
        "--mem": "1024M",
        "--requeue": "",
        "--chdir": WORK,
        "--output": f"{WORK}/.infra/slurm/{RUN}/e1.out",
        "--open-mode": "append",
    }
    assert output_path(WORK, RUN, "e1", None) == f"{WORK}/.infra/slurm/{RUN}/e1.out"
    assert output_path(WORK, RUN, "sw", 3) == f"{WORK}/.infra/slurm/{RUN}/sw.3.out"


@pytest.mark.parametrize(("keys", "target", "expected"), [
    ({}, TARGET, {"--partition": "debug", "--account": "lab", "--qos": "normal",
                  "--time": "02:00:00"}),
    ({"slurm": {"time_limit": "00:05:00"}}, TARGET, {"--time": "00:05:00"}),
    ({"slurm": {"time_limit": "1-00"}}, BARE, {"--time": "1-00"}),
    ({"slurm": {"signal": "B:USR1@60"}}, BARE, {"--signal": "B:USR1@60"}),
    ({"cpu_cores": 2.5}, BARE, {"--cpus-per-task": "3"}),
    ({"cpu_cores": 4}, BARE, {"--cpus-per-task": "4"}),
    ({"cpu_cores": 0.25}, BARE, {"--cpus-per-task": "1"}),
    ({"resources": {"cpu_millis": 1500}}, BARE, {"--cpus-per-task": "2"}),
    ({"ram_gb": 2}, BARE, {"--mem": "2048M"}),
    ({"ram_gb": 0.3}, BARE, {"--mem": "308M"}),
    ({"resources": {"memory_mb": 700}}, BARE, {"--mem": "700M"}),
    ({"gpu_required": True, "gpu_memory_gb": 4}, BARE, {"--gres": "gpu:1"}),
    ({"resources": {"devices": [{"kind": "gpu", "count": 2}]}}, BARE, {"--gres": "gpu:2"}),
    ({"constraints": ["avx512", "ib"]}, BARE, {"--constraint": "avx512&ib"}),
    ({"constraints": "avx2"}, BARE, {"--constraint": "avx2"}),
    ({"auto_restart": False}, BARE, {"--no-requeue": ""}),
    ({"max_retries": 0}, BARE, {"--no-requeue": ""}),
    ({"max_retries": 3}, BARE, {"--requeue": ""}),
    ({"workdir": "sub/dir"}, BARE, {"--chdir": f"{WORK}/sub/dir"}),
])
def test_each_spec_key_maps_to_its_option(keys: dict[str, Any], target: SlurmTarget,
                                          expected: dict[str, str]) -> None:
    got = opts(job_script(target, RUN, [spec(**keys)], work_dir=WORK))
    for key, value in expected.items():
        assert got.get(key) == value, (key, got)
    if "--gres" not in expected:
        assert "--gres" not in got
    if "--no-requeue" in expected:
        assert "--requeue" not in got


def test_comma_partitions_pass() -> None:
    t = SlurmTarget(name="hpc", host="h", partition="gpu,cpu")
    assert opts(job_script(t, RUN, [spec()], work_dir=WORK))["--partition"] == "gpu,cpu"


@pytest.mark.parametrize(("keys", "message"), [
    ({"constraints": [{"attribute": "arch", "operator": "=", "value": "x86_64"}]},
     "constraint 'arch = x86_64' cannot map to Slurm"),
    ({"constraints": [{"operator": "distinct_hosts"}]}, "cannot map to Slurm"),
    ({"constraints": ["a|b"]}, "is not a Slurm feature name"),
    ({"resources": {"devices": [{"kind": "fpga"}]}}, "device kind 'fpga' cannot map"),
])
def test_what_cannot_map_is_refused_in_one_line(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(SlurmMappingError) as err:
        job_script(BARE, RUN, [spec(**keys)], work_dir=WORK)
    assert message in str(err.value) and "\n" not in err.value.one_line()


@pytest.mark.parametrize(("target", "run", "work", "message"), [
    (SlurmTarget(name="hpc", host="h", partition="a;b"), RUN, WORK, "slurm partition"),
    (SlurmTarget(name="hpc", host="h", account="x y"), RUN, WORK, "slurm account"),
    (SlurmTarget(name="hpc", host="h", qos="q\nx"), RUN, WORK, "slurm qos"),
    (SlurmTarget(name="hpc", host="h", time_limit="1h"), RUN, WORK, "slurm time_limit"),
    (BARE, "run 1", WORK, "run id 'run 1'"),
    (BARE, "r$x", WORK, "run id"),
    (BARE, RUN, "~/lab", "must be an absolute path on the cluster"),
    (BARE, RUN, "/w/a\nb", "slurm work dir"),
    (BARE, RUN, "/w/$(id)", "slurm work dir"),
])
def test_nasty_values_never_reach_sbatch(target: SlurmTarget, run: str, work: str,
                                         message: str) -> None:
    with pytest.raises(SlurmMappingError, match=re.escape(message)):
        job_script(target, run, [spec()], work_dir=work)


def test_a_percent_in_the_work_dir_is_doubled_in_output() -> None:
    s = job_script(BARE, RUN, [spec()], work_dir="/w/100%/lab")
    assert opts(s)["--output"] == f"/w/100%%/lab/.infra/slurm/{RUN}/e1.out"
    assert opts(s)["--chdir"] == "/w/100%/lab"


def test_a_long_name_is_cut_with_a_digest() -> None:
    key = "k" * 128
    name = job_name(RUN, key)
    assert len(name) <= 200 and name != job_name(RUN, "k" * 127 + "j")
    assert name.startswith(f"infra.{RUN}.kkk")


# --------------------------------------------------------------------------- arrays

def sweep(n: int, **kw: Any) -> tuple[Any, ...]:
    return expand(spec(experiment_id="sw", command="python3 t.py --lr {lr}",
                       sweep={"grid": {"lr": list(range(n))}}, **kw), 1000)


@pytest.mark.parametrize(("n", "parallel", "array"), [
    (16, 4, "0-15%4"), (16, None, "0-15"), (3, 1, "0-2%1"), (1, None, "0-0"),
])
def test_a_sweep_is_one_array(n: int, parallel: int | None, array: str) -> None:
    tasks = sweep(n)
    s = job_script(TARGET, RUN, tasks, work_dir=WORK, max_parallel=parallel)
    o = opts(s)
    assert s.is_array and o["--array"] == array and s.key == "sw"
    assert s.instance_ids == tuple(t.experiment_id for t in tasks)
    assert o["--output"] == f"{WORK}/.infra/slurm/{RUN}/sw.%a.out"
    assert o["--job-name"] == f"infra.{RUN}.sw" and o["--comment"].endswith("key=sw")


def test_a_sweep_keeps_its_slurm_key() -> None:
    tasks = sweep(2, slurm={"time_limit": "7"})
    assert {t.slurm.time_limit for t in tasks} == {"7"}
    assert opts(job_script(BARE, RUN, tasks, work_dir=WORK))["--time"] == "7"


def test_array_tasks_asking_for_different_options_are_refused() -> None:
    a, b = sweep(2)
    b = replace(b, ram_gb=4.0)
    with pytest.raises(SlurmMappingError,
                       match=re.escape("must ask for the same Slurm options; sw.0001")):
        job_script(BARE, RUN, [a, b], work_dir=WORK)


def test_max_parallel_must_be_positive() -> None:
    with pytest.raises(SlurmMappingError, match="max_parallel must be at least 1"):
        job_script(BARE, RUN, sweep(2), work_dir=WORK, max_parallel=0)


# --------------------------------------------------------------------------- dependencies

@pytest.mark.parametrize(("deps", "option"), [
    ([Dependency(DependencyKind.AFTEROK, "12")], "--dependency=afterok:12"),
    ([Dependency(DependencyKind.AFTEROK, "12_3")], "--dependency=afterok:12_3"),
    ([Dependency(DependencyKind.AFTERANY, "40")], "--dependency=afterany:40"),
    ([Dependency(DependencyKind.AFTEROK, "1"), Dependency(DependencyKind.AFTEROK, "2_0"),
      Dependency(DependencyKind.AFTERANY, "3"), Dependency(DependencyKind.AFTEROK, "1")],
     "--dependency=afterok:1:2_0,afterany:3"),
    ([Dependency(DependencyKind.AFTERANY, "9"), Dependency(DependencyKind.AFTEROK, "8")],
     "--dependency=afterany:9,afterok:8"),
    ([], None),
])
def test_dependencies(deps: list[Dependency], option: str | None) -> None:
    assert dependency_option(deps) == option
    got = opts(job_script(BARE, RUN, [spec()], work_dir=WORK, dependencies=deps))
    assert ("--dependency=" + got["--dependency"] if "--dependency" in got else None) == option


@pytest.mark.parametrize("job", ["", "12a", "12_", "_3", "1;2", "12_3_4", "12 3", "afterok:1"])
def test_a_dependency_must_be_a_job_id(job: str) -> None:
    with pytest.raises(SlurmMappingError, match="is not a job id"):
        job_script(BARE, RUN, [spec()], work_dir=WORK,
                   dependencies=[Dependency(DependencyKind.AFTEROK, job)])


# --------------------------------------------------------------------------- the script runs

PROBE = (f"{sys.executable} -c 'import json, os, sys; "
         "json.dump({\"argv\": sys.argv[1:], \"cwd\": os.getcwd(), \"env\": dict(os.environ)}, "
         "open(os.environ[\"OUT_FILE\"], \"w\"))'")


def run_script(tmp: Path, script: JobScript, index: int | None,
               extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the batch script as slurmd would: /bin/sh, SLURM_* in the environment."""
    path = tmp / "job.sh"
    path.write_text(script.text)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp), "SLURMD_NODENAME": "c07",
           "SLURM_JOB_ID": "55", **(extra or {})}
    if index is not None:
        env["SLURM_ARRAY_TASK_ID"] = str(index)
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    return subprocess.run(["/bin/sh", str(path)], cwd=work, env=env, text=True,
                          capture_output=True, timeout=60, check=False)


NASTY = "it's \"$HOME\" `id` $(id) \\ ; & | * ? ~ #x"


def test_the_script_runs_each_task_with_its_environment(tmp_path: Path) -> None:
    work = str(tmp_path / "work")
    probe = tmp_path / "probe.py"
    probe.write_text("import json, os, sys\n"
                     "json.dump({'argv': sys.argv[1:], 'cwd': os.getcwd(), 'env': dict(os.environ)},"
                     " open(os.environ['OUT_FILE'], 'w'))\n")
    tasks = expand(spec(experiment_id="sw", command=f"{sys.executable} {probe} --lr {{lr}} 'a b'",
                        env={"NASTY": NASTY, "OUT_FILE": str(tmp_path / "out.{task_id}.json"),
                             "MULTI": "line1\nline2"},
                        params={"base": "x y"}, sweep={"grid": {"lr": [0.1, "$(id)", 3]}}),
                   1000)
    script = job_script(BARE, RUN, tasks, work_dir=work, max_parallel=2)
    for index in (0, 1, 2):
        proc = run_script(tmp_path, script, index,
                          extra={"SLURM_RESTART_COUNT": "2"} if index == 1 else None)
        assert proc.returncode == 0, proc.stderr
        got = json.loads((tmp_path / f"out.sw.000{index}.json").read_text())
        env = got["env"]
        tid = f"sw.000{index}"
        assert env["INFRA_RUN_ID"] == RUN and env["INFRA_INSTANCE_ID"] == tid
        assert env["INFRA_NODE"] == "c07"
        assert env["INFRA_ATTEMPT"] == ("3" if index == 1 else "1")
        assert env["INFRA_TASK_INDEX"] == str(index)
        assert env["INFRA_RESULTS_DIR"] == results_dir(work, RUN, tid)
        assert Path(env["INFRA_RESULTS_DIR"]).is_dir()
        assert json.loads(env["INFRA_PARAMS"]) == {"base": "x y",
                                                   "lr": [0.1, "$(id)", 3][index]}
        alloc = json.loads(env["INFRA_ALLOCATION"])
        assert alloc["backend"] == "slurm" and alloc["target"] == "hpc"
        assert env["NASTY"] == NASTY and env["MULTI"] == "line1\nline2"
        assert env["PYTHONUNBUFFERED"] == "1"
        assert got["argv"] == ["--lr", str([0.1, "$(id)", 3][index]), "a b"]


def test_a_plain_job_runs_without_an_array_index(tmp_path: Path) -> None:
    out = tmp_path / "plain.json"
    script = job_script(BARE, RUN, [spec(command=PROBE, env={"OUT_FILE": str(out)})],
                        work_dir=str(tmp_path / "work"))
    proc = run_script(tmp_path, script, None)
    assert proc.returncode == 0, proc.stderr
    env = json.loads(out.read_text())["env"]
    assert env["INFRA_INSTANCE_ID"] == "e1" and "INFRA_TASK_INDEX" not in env
    assert env["INFRA_ATTEMPT"] == "1"


def test_the_command_exit_code_is_the_job_exit_code(tmp_path: Path) -> None:
    script = job_script(BARE, RUN, [spec(command="echo out; echo err >&2; exit 7")],
                        work_dir=str(tmp_path / "work"))
    proc = run_script(tmp_path, script, None)
    assert (proc.returncode, proc.stdout, proc.stderr) == (7, "out\n", "err\n")


def test_an_index_outside_the_array_is_refused(tmp_path: Path) -> None:
    script = job_script(BARE, RUN, sweep(2), work_dir=str(tmp_path / "work"))
    proc = run_script(tmp_path, script, 5)
    assert proc.returncode == 2 and "no task for array index 5" in proc.stderr


def test_a_command_with_quotes_and_newlines_runs_verbatim(tmp_path: Path) -> None:
    out = tmp_path / "o.txt"
    cmd = f"printf '%s|' \"$0\" 'x'\"'\"'y' > {out}\nprintf 'second line' >> {out}"
    script = job_script(BARE, RUN, [spec(command=cmd)], work_dir=str(tmp_path / "work"))
    proc = run_script(tmp_path, script, None)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == "/bin/sh|x'y|second line"
