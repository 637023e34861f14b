"""The Slurm driver's fast parts: jobs in dependency order, all-Slurm runs, dependency words,
the store's backend column and job intents (old stores upgraded), and the node-side output
reader run for real (no Slurm, no fleet)."""

from __future__ import annotations

import base64
import json
import sqlite3
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from infra.backends.slurm.driver import (
    SlurmRun,
    check_all_slurm,
    check_scripts,
    plan_jobs,
    split_pins,
)
from infra.backends.slurm.sbatch import DependencyKind, job_name
from infra.campaign.sweep import expand_all
from infra.config.specs import check_spec_set, parse_spec
from infra.config.topology import parse_cluster
from infra.errors import UsageError
from infra.state import InstancePhase, Store
from infra.state.store import SLURM, SlurmJobRecord
from infra.transport.marker import extract_json

CLUSTER = parse_cluster({"nodes": [
    {"name": "n1", "host": "localhost", "ram_gb": 8.0, "remote_work_dir": "."},
    {"name": "hpc", "type": "slurm", "host": "login.hpc.invalid"},
    {"name": "hpc2", "type": "slurm", "host": "login2.hpc.invalid"}]},
    Path("/tmp/c/cluster.yaml"))


def specs(*docs: dict[str, Any]) -> tuple[Any, ...]:
    parsed = [parse_spec({"command": "true", **d}, Path(f"/tmp/c/{d['experiment_id']}.json"),
                         CLUSTER) for d in docs]
    return check_spec_set(expand_all(parsed, 100))


def test_jobs_come_in_dependency_order_and_a_sweep_is_one_job() -> None:
    s = specs({"experiment_id": "z", "after": ["sw"]},
              {"experiment_id": "sw", "sweep": {"repeat": 3}, "max_parallel": 2,
               "after_any": ["a"]},
              {"experiment_id": "a"})
    jobs = plan_jobs(s)
    assert [j.key for j in jobs] == ["a", "sw", "z"]
    sw = jobs[1]
    assert sw.is_array and sw.instance_ids == ("sw.0000", "sw.0001", "sw.0002")
    assert sw.waits == ((DependencyKind.AFTERANY, "a"),)
    assert jobs[2].waits == ((DependencyKind.AFTEROK, "sw"),) and not jobs[2].is_array


def test_dependency_words_name_a_job_an_array_or_one_task() -> None:
    jobs = {"a": SlurmJobRecord("r", "a", "n", "hpc", 0, ("a",), "7", None, ""),
            "sw": SlurmJobRecord("r", "sw", "n", "hpc", 1, ("sw.0000", "sw.0001"), "8",
                                 None, "")}
    assert SlurmRun.dep_word("a", jobs) == "7"
    assert SlurmRun.dep_word("sw", jobs) == "8"
    assert SlurmRun.dep_word("sw.0001", jobs) == "8_1"


def test_a_run_is_all_slurm_on_one_target() -> None:
    s = specs({"experiment_id": "a"}, {"experiment_id": "b"},
              {"experiment_id": "sw", "sweep": {"repeat": 2}})
    pins, bench = split_pins("a:hpc,sw:hpc,b:hpc", CLUSTER, s)
    assert pins == {"a": "hpc", "b": "hpc", "sw.0000": "hpc", "sw.0001": "hpc"} and not bench
    assert check_all_slurm(pins, s, False, CLUSTER).name == "hpc"
    pins, bench = split_pins("a:hpc,b:n1", CLUSTER, s)
    with pytest.raises(UsageError, match=r"all-Slurm or all-bench: a pinned to Slurm target "
                                         r"hpc, but b, sw.0000, sw.0001 are not"):
        check_all_slurm(pins, s, False, CLUSTER)
    pins, _ = split_pins("a:hpc,b:hpc2,sw:hpc", CLUSTER, s)
    with pytest.raises(UsageError, match="one Slurm target: hpc, hpc2"):
        check_all_slurm(pins, s, False, CLUSTER)
    pins, _ = split_pins("a:hpc,b:hpc,sw:hpc", CLUSTER, s)
    with pytest.raises(UsageError, match="--auto-place does not apply"):
        check_all_slurm(pins, s, True, CLUSTER)


def test_check_scripts_builds_every_job_before_anything_is_recorded() -> None:
    s = specs({"experiment_id": "a"}, {"experiment_id": "b", "after": ["a"]},
              {"experiment_id": "sw", "sweep": {"repeat": 4}, "max_parallel": 2})
    target = CLUSTER.slurm_target("hpc")
    assert target is not None
    scripts = {j.key: j for j in check_scripts(target, s)}
    assert "--dependency=afterok:1" in scripts["b"].options
    assert "--array=0-3%2" in scripts["sw"].options
    assert f"--job-name={job_name('RUN', 'a')}" in scripts["a"].options
    assert any(o.startswith("--chdir=/HOME/lab-orchestrator") for o in scripts["a"].options)


def test_store_records_slurm_intents_and_keeps_slurm_work_off_the_bench(
        tmp_path: Path) -> None:
    s = specs({"experiment_id": "a"}, {"experiment_id": "b"})
    store = Store(tmp_path / "state.db")
    store.create_run("r-bench", "c.yaml", {}, [("a", "n1", s[0], None)])
    store.create_run("r-slurm", "c.yaml", {"target": "hpc"},
                     [("a", "hpc", s[0], None), ("b", "hpc", s[1], None)], backend=SLURM,
                     slurm_jobs=[("b", "infra.r-slurm.b", "hpc", ("b",)),
                                 ("a", "infra.r-slurm.a", "hpc", ("a",))])
    for run in ("r-bench", "r-slurm"):
        store.update_instances(run, ["a"], state=InstancePhase.RUNNING)
    assert not store.run("r-bench").on_slurm and store.run("r-slurm").on_slurm
    # Slurm work holds nothing on bench nodes: placement never counts it
    assert [(r.run_id, r.instance_id) for r in store.active_instances()] == [("r-bench", "a")]
    jobs = store.slurm_jobs("r-slurm")
    assert [(j.key, j.seq, j.job_id) for j in jobs] == [("b", 0, None), ("a", 1, None)]
    store.set_slurm_job_id("r-slurm", "a", "42", "name")
    a = store.slurm_jobs("r-slurm")[1]
    assert (a.job_id, a.how, a.submitted_at is not None) == ("42", "name", True)
    store.close()


def test_an_older_store_gains_the_backend_column_and_the_jobs_table(tmp_path: Path) -> None:
    s = specs({"experiment_id": "a"})
    store = Store(tmp_path / "state.db")
    store.create_run("r-old", "c.yaml", {}, [("a", "n1", s[0], None)])
    store.close()
    db = sqlite3.connect(tmp_path / "state.db")
    db.execute("ALTER TABLE runs DROP COLUMN backend")
    db.execute("DROP TABLE slurm_jobs")
    db.commit()
    db.close()
    store = Store(tmp_path / "state.db")
    assert store.run("r-old").backend == "bench" and store.slurm_jobs("r-old") == []
    store.close()


def reader(*args: str) -> Any:
    source = resources.files("infra.remote").joinpath("slurm_logs.py").read_text()
    proc = subprocess.run([sys.executable, "-", *args], input=source, capture_output=True,
                          text=True, timeout=60, check=True)
    return extract_json(proc.stdout)


def test_the_output_reader_brings_exact_bytes_from_an_offset(tmp_path: Path) -> None:
    out = tmp_path / "job.out"
    data = bytes(range(256)) * 10 + "é\n".encode()
    out.write_bytes(data)
    doc = reader("1000", str(out), "100", str(tmp_path / "none.out"), "0")
    first, missing = doc["files"]
    assert base64.b64decode(first["data"]) == data[100:1100] and first["size"] == len(data)
    assert missing == {"size": None, "data": "", "error": None}
    rest = reader("100000", str(out), "1100")["files"][0]
    assert data[:1100] + base64.b64decode(rest["data"]) == data
    end = reader("100000", str(out), str(len(data)))["files"][0]
    assert end["data"] == "" and end["size"] == len(data)
    assert json.dumps(doc)  # plain JSON throughout
