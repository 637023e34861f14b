"""The run manifest end to end, with the real CLI on the built-in local node and a real git
repository: a dirty tree's patch reproduces it, `runs` lists commit and tags, `show` prints
the manifest, `compare` names a changed sweep parameter and the metric it changed."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_run_e2e import cli as fleet_cli
from tests.test_run_e2e import project
from tests.test_run_e2e import spec as fleet_spec

__all__ = ["project"]  # the fleet project fixture

REPO = Path(__file__).resolve().parent.parent

# A task that writes a metric from its parameter.
TASK = (
    "import json, os\n"
    "p = json.loads(os.environ['INFRA_PARAMS'])\n"
    "out = os.path.join(os.environ['INFRA_RESULTS_DIR'], 'metrics.json')\n"
    "json.dump({'score': p['lr'] * 10}, open(out, 'w'))\n"
)


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True,
                          text=True, timeout=60).stdout


@pytest.fixture()
def lab(tmp_path: Path) -> Iterator[Path]:
    """A git project with the local node only; committed, then made dirty (a text change,
    a binary change, a staged new file) with one untracked file."""
    root = tmp_path / "lab"
    (root / "experiments").mkdir(parents=True)
    (root / "task.py").write_text(TASK)
    (root / "blob.bin").write_bytes(bytes(range(256)) * 4)
    (root / ".gitignore").write_text(".infra/\n")  # the local node's state; logs/ is not here
    config = {"nodes": [{"name": "local", "host": "localhost", "remote_work_dir": ".",
                         "ram_gb": 8.0, "max_instances": 2, "python_path": sys.executable}],
              "failover": {"auto_restart": False},
              "health_check": {"interval_seconds": 2, "timeout_seconds": 10},
              "deploy": {"source": "."}}
    (root / "cluster_config.yaml").write_text(yaml.safe_dump(config))
    git(root, "init", "-q", "-b", "main")
    git(root, "-c", "user.email=t@example.invalid", "-c", "user.name=t", "add", "-A")
    git(root, "-c", "user.email=t@example.invalid", "-c", "user.name=t", "commit", "-qm",
        "first")
    (root / "task.py").write_text(TASK + "# tuned\n")
    (root / "blob.bin").write_bytes(bytes(reversed(range(256))) * 4 + b"\0tail")
    (root / "staged.txt").write_text("staged but not committed\n")
    git(root, "add", "staged.txt")
    (root / "scratch.txt").write_text("untracked\n")
    yield root


def write_sweep(root: Path, lrs: list[float]) -> Path:
    path = root / "experiments" / "train.yaml"
    path.write_text(yaml.safe_dump({
        "experiment_id": "train", "ram_gb": 0.25, "recover": "none",
        "command": f"{sys.executable} {root / 'task.py'}",
        "sweep": {"grid": {"lr": lrs}}}))
    return path


def cli(root: Path, *args: str, timeout: float = 240.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "infra.cli.main", *args], cwd=root,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "250"})


def run(root: Path, *args: str) -> str:
    """Run to the end; the new run's id."""
    before = runs(root)
    proc = cli(root, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (new,) = [r for r in runs(root) if r["run_id"] not in {b["run_id"] for b in before}]
    return str(new["run_id"])


def runs(root: Path) -> list[dict[str, Any]]:
    proc = cli(root, "runs", "--json")
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout)["runs"])


def test_manifest_of_a_dirty_tree_runs_show_and_compare(lab: Path, tmp_path: Path) -> None:
    spec = write_sweep(lab, [0.1])
    first = run(lab, "--config", str(spec), "--auto-place", "--tag", "base", "--tag", "v1")
    run_dir = lab / "logs" / first
    manifest_file = run_dir / "manifest.json"
    patch = run_dir / "code.patch"
    assert stat.S_IMODE(manifest_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(patch.stat().st_mode) == 0o600
    m = json.loads(manifest_file.read_text())
    assert m["version"] == 1 and m["run_id"] == first
    assert m["tags"] == ["base", "v1"]
    assert "--tag" in m["command_line"] and m["cwd"] == str(lab)
    assert m["tool"]["name"] == "lab-orchestrator" and m["tool"]["version"]
    g = m["git"]
    assert g["commit"] == git(lab, "rev-parse", "HEAD").strip()
    assert g["branch"] == "main" and g["dirty"] is True
    assert g["untracked"] == ["experiments/", "scratch.txt"]  # never the log directory
    assert g["patch_sha256"] == hashlib.sha256(patch.read_bytes()).hexdigest()
    assert b"# tuned" in patch.read_bytes() and b"staged.txt" in patch.read_bytes()
    assert m["config"]["text"] == (lab / "cluster_config.yaml").read_text()
    assert m["config"]["sha256"] == hashlib.sha256(
        (lab / "cluster_config.yaml").read_bytes()).hexdigest()
    assert [s["text"] for s in m["specs"]] == [spec.read_text()]
    (task_id,) = m["experiments"]
    assert m["experiments"][task_id]["params"] == {"lr": 0.1}
    local = m["nodes"]["local"]
    assert local["hostname"] and local["python"] and local["kernel"] and local["arch"]
    assert m["finished_at"] is not None  # the end record was added when the run finished

    # the patch on a clean checkout of the commit reproduces the tracked tree exactly
    clean = tmp_path / "clean"
    subprocess.run(["git", "clone", "-q", str(lab), str(clean)], check=True, timeout=60)
    git(clean, "checkout", "-q", g["commit"])
    git(clean, "apply", str(patch))
    for name in ("task.py", "blob.bin", "staged.txt"):
        assert (clean / name).read_bytes() == (lab / name).read_bytes(), name

    # a second run whose sweep differs in one value
    write_sweep(lab, [0.2])
    second = run(lab, "--config", str(spec), "--auto-place", "--tag", "v2")
    listed = {r["run_id"]: r for r in runs(lab)}
    assert listed[first]["commit"] == g["commit"][:10] + "+dirty"
    assert listed[first]["tags"] == ["base", "v1"] and listed[second]["tags"] == ["v2"]
    table = cli(lab, "runs")
    assert g["commit"][:10] + "+dirty" in table.stdout and "base, v1" in table.stdout

    shown = cli(lab, "show", first)
    assert shown.returncode == 0, shown.stderr
    for text in (g["commit"], str(patch), str(manifest_file), "base, v1", task_id, "local"):
        assert text in shown.stdout, (text, shown.stdout)
    doc = json.loads(cli(lab, "show", first, "--json").stdout)
    assert doc["manifest"]["git"]["commit"] == g["commit"]
    assert doc["patch_file"] == str(patch)

    # each task's telemetry at home (the documented sample lines): compare summarizes it
    for run_id, cpu in ((first, 50.0), (second, 90.0)):
        home = lab / "logs" / run_id / f"{task_id}.telemetry.jsonl"
        home.write_text("".join(json.dumps({"t": 1000.0 + i, "cpu_percent": cpu,
                                            "rss_bytes": 1 << 20}) + "\n" for i in range(3)))
    proc = cli(lab, "compare", first, second, "--json")
    assert proc.returncode == 0, proc.stderr
    sections = json.loads(proc.stdout)["sections"]
    specs = {(d["subject"], d["key"]): (d["a"], d["b"])
             for d in sections["specs"]["differences"]}
    assert specs[(task_id, "params.lr")] == (0.1, 0.2)
    assert specs[("sweep train", "lr")] == ("[0.1]", "[0.2]")
    metrics = {(d["subject"], d["key"]): (d["a"], d["b"])
               for d in sections["metrics"]["differences"]}
    assert metrics[(task_id, "score")] == (1.0, 2.0)
    assert metrics[(task_id, "telemetry.cpu_percent.mean")] == (50.0, 90.0)
    assert (task_id, "telemetry.rss_bytes.max") not in metrics  # equal: not listed
    assert sections["code"]["differences"] == []  # same commit, same patch
    text = cli(lab, "compare", first, second)
    assert "params.lr" in text.stdout and "score" in text.stdout, text.stdout

    # a run recorded before manifests existed, and a run that does not exist
    db = sqlite3.connect(lab / "logs" / "state.db")
    with db:
        db.execute("UPDATE runs SET manifest_json=NULL WHERE run_id=?", (second,))
    db.close()
    old = cli(lab, "show", second)
    assert old.returncode == 0 and "no manifest recorded" in old.stdout
    latest = cli(lab, "show")  # the latest run: the second
    assert latest.returncode == 0 and "no manifest recorded" in latest.stdout
    cmp_old = json.loads(cli(lab, "compare", first, second, "--json").stdout)["sections"]
    assert "no manifest recorded" in (cmp_old["specs"]["note"] or "")
    assert cmp_old["metrics"]["differences"]  # outcomes and metrics still compared
    for args in (("show", "nope"), ("compare", first, "nope")):
        bad = cli(lab, *args)
        lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
        assert bad.returncode != 0 and len(lines) == 1 and "nope" in lines[0], bad.stderr
        assert "Traceback" not in bad.stderr


def test_a_bad_tag_is_one_line(lab: Path) -> None:
    spec = write_sweep(lab, [0.1])
    proc = cli(lab, "--config", str(spec), "--auto-place", "--tag", "two words")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "--tag" in lines[0], proc.stderr
    assert not (lab / "logs" / "state.db").exists()


@pytest.mark.integration
def test_fleet_run_records_its_ssh_node_and_no_git(project: Path) -> None:
    """On the sshd fleet: the node record comes from the node's probe over SSH, the end
    record from a second probe; a project that is no git work tree gets `git: null`."""
    path = fleet_spec(project, "rec", duration=0.5)
    proc = fleet_cli(project, "--config", str(path), "--placement", "rec:node1", "--json")
    assert proc.returncode == 0, proc.stderr
    run_id = json.loads(proc.stdout)["run_id"]
    m = json.loads((project / "logs" / run_id / "manifest.json").read_text())
    assert list(m["nodes"]) == ["node1"]
    assert m["nodes"]["node1"]["hostname"] and m["nodes"]["node1"]["kernel"]
    assert m["finished_at"] is not None and m["nodes"]["node1"]["after_error"] is None
    assert m["git"] is None and "not a git repository" in m["git_error"]
    assert not (project / "logs" / run_id / "code.patch").exists()
    assert "no git state recorded" in proc.stderr
