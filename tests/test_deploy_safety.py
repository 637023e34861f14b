"""Deploy never destroys experiment data: the source is the project, outputs on the node are
protected from ``--delete``, and a deploy that would delete many files stops for ``--yes``.

The fleet tests drive the real CLI in-process (cwd set per test) against the real sshd fleet
and real rsync, and look at the node's files directly.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.config.project import git_top_level, resolve_deploy_source
from infra.errors import ConfigError, DeployRefused
from infra.runner.deploy import (
    deploy_all,
    deploy_node,
    parse_rsync_stats,
    results_protect_patterns,
)
from tests.builders import assert_one_line_error, run_cli
from tests.sshfleet import FleetHost, SSHFleet

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- helpers


def make_project(root: Path, *, stale: int = 0) -> Path:
    """A small project tree (pyproject.toml marks it) with ``stale`` extra files in old/."""
    (root / "pkg").mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'p'\n")
    (root / "main.py").write_text("print('v1')\n")
    (root / "pkg" / "mod.py").write_text("X = 1\n")
    (root / "stale.py").write_text("gone soon\n")
    if stale:
        (root / "old").mkdir()
        for i in range(stale):
            (root / "old" / f"f{i:02d}.txt").write_text(f"{i}\n")
    return root


def write_config(path: Path, fleet: SSHFleet, hosts: list[FleetHost], workdir: str,
                 **deploy: Any) -> Path:
    """A cluster config naming ``hosts`` with ``workdir`` under each host's home."""
    nodes = [{"name": h.name, "host": h.address, "ssh_port": h.port, "ssh_user": h.user,
              "ssh_key_path": str(fleet.client_key), "remote_work_dir": f"{h.home}/{workdir}",
              "python_path": "/usr/bin/python3", "ram_gb": 8.0, "max_instances": 2}
             for h in hosts]
    doc: dict[str, Any] = {"nodes": nodes,
                           "health_check": {"known_hosts": str(fleet.known_hosts),
                                            "timeout_seconds": 10},
                           "failover": {"auto_restart": False}}
    if deploy:
        doc["deploy"] = deploy
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


def on_node(host: FleetHost, root: Path, rel: str, text: str = "output\n") -> Path:
    """Write a file into a node's work dir as if the node's user had written it."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    subprocess.run(["chown", "-R", f"{host.user}:", str(root)], check=True)
    return path


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def fresh() -> str:
    return f"safe-{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------- source rules


def test_default_source_is_the_git_top_level_of_the_current_directory(tmp_path: Path) -> None:
    proj = make_project(tmp_path / "proj")
    (proj / ".git").mkdir()
    config = tmp_path / "mylab" / "lab.yaml"
    assert git_top_level(proj / "pkg") == proj
    assert resolve_deploy_source(config, None, proj / "pkg") == proj.resolve()
    plain = make_project(tmp_path / "plain")  # no git: the directory itself
    assert resolve_deploy_source(config, None, plain) == plain.resolve()


def test_explicit_source_is_relative_to_the_config_folder(tmp_path: Path) -> None:
    proj = make_project(tmp_path / "proj")
    config = tmp_path / "mylab" / "lab.yaml"
    assert resolve_deploy_source(config, "../proj", tmp_path) == proj.resolve()
    bare = tmp_path / "bare"  # an explicit source need not carry a project marker
    bare.mkdir()
    assert resolve_deploy_source(config, str(bare), tmp_path) == bare.resolve()


@pytest.mark.parametrize(("source", "cwd", "fragments"), [
    (None, "mylab", ["lab.yaml: deploy.source: not set, and the current directory",
                     "is not a project (none of pyproject.toml",
                     "set deploy.source in"]),
    (None, "home", ["is the home directory", "set deploy.source in"]),
    ("nope", "proj", ["deploy.source:", "nope does not exist"]),
    ("lab.yaml", "proj", ["deploy.source:", "lab.yaml is not a directory"]),
    ("~", "proj", ["deploy.source:", "is the home directory"]),
    ("/", "proj", ["deploy.source:", "is the filesystem root"]),
])
def test_bad_sources_are_config_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       source: str | None, cwd: str,
                                       fragments: list[str]) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    make_project(tmp_path / "proj")
    config = tmp_path / "mylab" / "lab.yaml"
    config.parent.mkdir()
    config.write_text("nodes: []\n")
    with pytest.raises(ConfigError) as info:
        resolve_deploy_source(config, source, tmp_path / cwd)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    assert info.value.exit_code == 2


def _offline_config(path: Path, **deploy: Any) -> Path:
    """A config whose one enabled node cannot be reached (its name never resolves)."""
    doc: dict[str, Any] = {"nodes": [{"name": "n1", "host": "n1.lab.invalid", "ram_gb": 4.0,
                                      "remote_work_dir": "~/lab"}]}
    if deploy:
        doc["deploy"] = deploy
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("args", [["--deploy-all"], ["--deploy-all", "--dry-run"],
                                  ["--config", "SPEC", "--placement", "x:n1"]])
def test_cli_refuses_a_non_project_source_before_touching_a_node(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    config = _offline_config(tmp_path / "mylab" / "lab.yaml")
    spec = tmp_path / "mylab" / "x.json"
    spec.write_text(json.dumps({"experiment_id": "x", "command": "true", "ram_gb": 1}))
    monkeypatch.chdir(config.parent)  # the config's folder: no project marker in it
    args = [str(spec) if a == "SPEC" else a for a in args]
    code, _, err = run_cli(capsys, "--cluster-config", str(config), *args)
    # exit 2 and the source message: the unreachable node was never contacted
    assert_one_line_error(code, err, "deploy.source: not set", "is not a project",
                          f"set deploy.source in {config}")


@pytest.mark.parametrize(("deploy", "fragments"), [
    ({"source": "missing"}, ["deploy.source:", "missing does not exist"]),
    ({"max_deletes": -1}, ["deploy.max_deletes: must be at least 0, got -1"]),
    ({"max_deletes": "many"}, ["deploy.max_deletes: expected an integer"]),
    ({"protect": ["out/\nx"]}, ["deploy.protect[0]: an rsync pattern must be on one line"]),
    ({"protect": [""]}, ["deploy.protect[0]: expected a non-empty string"]),
])
def test_cli_bad_deploy_settings_are_one_line_errors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        deploy: dict[str, Any], fragments: list[str]) -> None:
    proj = make_project(tmp_path / "proj")
    config = _offline_config(tmp_path / "mylab" / "lab.yaml", **deploy)
    monkeypatch.chdir(proj)
    code, _, err = run_cli(capsys, "--cluster-config", str(config), "--deploy-all")
    assert_one_line_error(code, err, str(config), *fragments)


# --------------------------------------------------------------------------- pure pieces


def test_results_globs_become_anchored_protect_patterns() -> None:
    assert results_protect_patterns(None, ["out/exp/*", "summary.json"]) == (
        "/out/exp/*", "/out/exp/*/**", "/summary.json", "/summary.json/**")
    assert results_protect_patterns("sub/dir", ["res/"]) == ("/sub/dir/res", "/sub/dir/res/**")


def test_a_directory_kept_for_protected_contents_is_not_counted_as_deleted() -> None:
    out = ("cannot delete non-empty directory: out/hello\n"
           "*deleting   out/hello/\n*deleting   out/other.txt\n"
           "cannot delete non-empty directory: out\n*deleting   stale.py\n")
    assert parse_rsync_stats(out).deleted == ("out/other.txt", "stale.py")


# --------------------------------------------------------------------------- on the fleet


@pytest.mark.integration
def test_outside_config_never_wipes_the_node(ssh_fleet: SSHFleet, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The reported bug: ``--cluster-config ~/mylab/lab.yaml`` deployed ~/mylab with --delete."""
    host = ssh_fleet.hosts[0]
    name = fresh()
    proj = make_project(tmp_path / "proj")
    (proj / ".git").mkdir()
    (proj / ".gitignore").write_text("out/\n")  # as in this repository
    config = write_config(tmp_path / "mylab" / "lab.yaml", ssh_fleet, [host], name)
    remote = host.home / name
    monkeypatch.chdir(proj)
    code, _, err = run_cli(capsys, "--cluster-config", str(config), "--deploy-all")
    assert code == 0, err
    on_node(host, remote, "out/old/result.txt")  # an earlier run's output, never fetched
    before = files_under(remote)
    assert {"main.py", "pkg/mod.py", "out/old/result.txt"} <= before
    (config.parent / "notes.txt").write_text("the config folder holds no project\n")

    monkeypatch.chdir(config.parent)  # run from the config's folder: refused, node untouched
    code, _, err = run_cli(capsys, "--cluster-config", str(config), "--deploy-all")
    assert_one_line_error(code, err, "deploy.source: not set", "is not a project",
                          f"set deploy.source in {config}")
    assert files_under(remote) == before

    monkeypatch.chdir(proj / "pkg")  # from inside the project: its git top-level is the source
    code, out, err = run_cli(capsys, "--cluster-config", str(config), "--deploy-all", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["source"] == str(proj.resolve())
    assert doc["nodes"][host.name]["deleted"] == []
    assert files_under(remote) == before


@pytest.mark.integration
def test_outputs_written_on_the_node_survive_a_redeploy(ssh_fleet: SSHFleet,
                                                        tmp_path: Path) -> None:
    src = make_project(tmp_path / "src")
    host = ssh_fleet.hosts[1]
    node = ssh_fleet.node_config(host, remote_work_dir=str(host.home / fresh()))
    remote = Path(node.remote_work_dir)
    health = ssh_fleet.health_section()
    protect = ["keep/", *results_protect_patterns(None, ["out/exp/*"]),
               *results_protect_patterns("sub", ["res/*.csv"])]
    asyncio.run(deploy_node(node, health, src, excludes=[], protect=protect, max_deletes=50))
    outputs = ["sub/logs/run.log", ".infra/runs/r1/i1/results/answer.txt",
               "out/exp/summary.json", "out/exp/plots/a.png", "keep/data.bin",
               "sub/res/table.csv"]
    for rel in outputs:
        on_node(host, remote, rel)
    on_node(host, remote, "sub/res/scratch.tmp")  # not a declared result: may go
    (src / "stale.py").unlink()
    result = asyncio.run(deploy_node(node, health, src, excludes=[], protect=protect,
                                     max_deletes=50))
    assert result.stats is not None
    assert not (remote / "stale.py").exists()  # a stale project file is still deleted
    assert "stale.py" in result.stats.deleted
    assert not (remote / "sub" / "res" / "scratch.tmp").exists()
    for rel in outputs:
        assert (remote / rel).exists(), rel
    assert not any(d.startswith(("out/exp", "keep", ".infra", "sub/logs"))
                   for d in result.stats.deleted), result.stats.deleted


@pytest.mark.integration
def test_deletion_threshold_refuses_then_yes_proceeds(
        ssh_fleet: SSHFleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    many, few = ssh_fleet.hosts[0], ssh_fleet.hosts[2]
    name = fresh()
    proj = make_project(tmp_path / "proj", stale=60)
    config = write_config(proj / "cluster_config.yaml", ssh_fleet, [many], name)
    monkeypatch.chdir(proj)
    code, _, err = run_cli(capsys, "--deploy-all")
    assert code == 0, err
    remote = many.home / name
    shutil.rmtree(proj / "old")  # 60 files and their directory are gone locally
    (proj / "main.py").write_text("print('version 2')\n")
    # the second node only loses stale.py: it deploys while the first is refused
    write_config(config, ssh_fleet, [many, few], name)
    (proj / "stale.py").write_text("x\n")
    before = files_under(remote)

    code, _, err = run_cli(capsys, "--deploy-all")
    assert_one_line_error(code, err, f"deploy refused on {many.name}: would delete 61 files",
                          "more than deploy.max_deletes 50", "--yes", exit_code=1)
    assert few.name not in err
    assert files_under(remote) == before  # nothing deleted and nothing sent
    assert (remote / "main.py").read_text() == "print('v1')\n"
    assert (few.home / name / "main.py").read_text() == "print('version 2')\n"

    code, out, err = run_cli(capsys, "--deploy-all", "--dry-run")
    assert code == 0, err
    listed = [ln.strip() for ln in out.splitlines()]
    assert f"{many.name}: would delete 61 (over deploy.max_deletes: a deploy needs --yes):" \
        in listed
    assert {f"old/f{i:02d}.txt" for i in range(60)} | {"old/"} <= set(listed)
    code, out, err = run_cli(capsys, "--deploy-all", "--dry-run", "--json")
    assert code == 0, err
    node_doc = json.loads(out)["nodes"][many.name]
    assert len(node_doc["deleted"]) == 61 and node_doc["needs_yes"] is True
    assert files_under(remote) == before

    code, out, err = run_cli(capsys, "--yes", "--deploy-all", "--json")
    assert code == 0, err
    assert len(json.loads(out)["nodes"][many.name]["deleted"]) == 61
    assert not (remote / "old").exists()
    assert (remote / "main.py").read_text() == "print('version 2')\n"


@pytest.mark.integration
def test_deploy_all_library_refusal_changes_nothing(ssh_fleet: SSHFleet, tmp_path: Path) -> None:
    src = make_project(tmp_path / "src", stale=5)
    host = ssh_fleet.hosts[1]
    node = ssh_fleet.node_config(host, remote_work_dir=str(host.home / fresh()))
    health = ssh_fleet.health_section()
    asyncio.run(deploy_node(node, health, src, excludes=[]))
    shutil.rmtree(src / "old")
    results = asyncio.run(deploy_all([node], health, src, excludes=[], max_deletes=3))
    refused = results[node.name]
    assert isinstance(refused, DeployRefused) and refused.count == 6 and refused.limit == 3
    assert (Path(node.remote_work_dir) / "old" / "f04.txt").exists()
    done = asyncio.run(deploy_node(node, health, src, excludes=[], max_deletes=6))
    assert done.stats is not None and len(done.stats.deleted) == 6


def _wait_for_file(path: Path, timeout: float = 60.0) -> None:
    import time
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


@pytest.mark.integration
def test_run_outputs_are_protected_and_run_refuses_like_deploy(
        ssh_fleet: SSHFleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    host = ssh_fleet.hosts[2]
    name = fresh()
    proj = make_project(tmp_path / "proj")
    (proj / "workloads").mkdir()
    shutil.copy(REPO / "workloads" / "mind.py", proj / "workloads" / "mind.py")
    (proj / "experiments").mkdir()
    spec = proj / "experiments" / "writer.json"
    spec.write_text(json.dumps({
        "experiment_id": "writer", "ram_gb": 1.0, "results": ["out/writer/*"],
        "command": "python3 workloads/mind.py "
                   "--duration 0.5 --interval 0.1 --work 10"}))
    write_config(proj / "cluster_config.yaml", ssh_fleet, [host], name, max_deletes=5)
    remote = host.home / name
    monkeypatch.chdir(proj)
    # first run: started and left alone (its output is never fetched)
    code, _, err = run_cli(capsys, "--config", str(spec), "--placement", f"writer:{host.name}",
                           "--monitor-duration", "0")
    assert code == 0, err
    summary = remote / "out" / "writer" / "summary.json"
    _wait_for_file(summary)

    # the stored run declares out/writer/*: a --delete deploy keeps it, stale.py goes
    (proj / "stale.py").unlink()
    code, out, err = run_cli(capsys, "--deploy-all", "--json")
    assert code == 0, err
    assert json.loads(out)["nodes"][host.name]["deleted"] == ["stale.py"]
    assert summary.exists()

    # ten leftovers on the node: the run refuses, naming the node and the count
    for i in range(10):
        on_node(host, remote, f"leftover/l{i}.txt")
    code, _, err = run_cli(capsys, "--config", str(spec), "--placement", f"writer:{host.name}",
                           "--monitor-duration", "0")
    assert code == 1 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]  # (after the run's event lines)
    assert last.startswith("error: run r-") and "not started: deploy refused on " \
        f"{host.name}: would delete 11 files" in last, last
    assert "deploy.max_deletes 5" in last and "--yes" in last
    assert len(list((remote / "leftover").iterdir())) == 10
    code, out, err = run_cli(capsys, "status", "--no-refresh", "--json")
    inst = json.loads(out)["instances"][0]
    assert inst["state"] == "failed" and "refused" in inst["reason"]
    assert inst["pid"] is None

    code, out, err = run_cli(capsys, "--yes", "--config", str(spec), "--placement",
                             f"writer:{host.name}", "--monitor-duration", "0", "--json")
    assert code == 0, err
    assert not (remote / "leftover").exists()
    assert summary.exists()


def test_a_log_dir_inside_the_project_is_never_sent(ssh_fleet: SSHFleet, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The coordinator's own files (state store, log copies) stay home whatever log_dir is."""
    host = ssh_fleet.host("node1")
    proj = make_project(tmp_path / "proj")
    workdir = f"logdir-{uuid.uuid4().hex[:8]}"
    config = write_config(proj / "cluster_config.yaml", ssh_fleet, [host], workdir)
    doc = yaml.safe_load(config.read_text())
    doc["logging"] = {"log_dir": "records/coordinator"}
    config.write_text(yaml.safe_dump(doc))
    (proj / "records" / "coordinator").mkdir(parents=True)
    (proj / "records" / "coordinator" / "run.log").write_text("private\n")
    (proj / "records" / "notes.txt").write_text("project file\n")
    monkeypatch.chdir(proj)
    code, _, err = run_cli(capsys, "--deploy-all")
    assert code == 0, err
    sent = files_under(host.home / workdir)
    assert "records/notes.txt" in sent and "main.py" in sent
    assert not any(p.startswith("records/coordinator") for p in sent), sent
