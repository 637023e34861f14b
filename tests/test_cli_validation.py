"""Every validation error through the CLI: one line naming file, key and reason; exit 2;
no traceback; nothing started. Runs the real entry point in-process (and a few real
subprocesses through scripts/cluster_experiment.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.builders import assert_one_line_error, run_cli

REPO = Path(__file__).resolve().parent.parent


def good_node(name: str = "n1", **kw: Any) -> dict[str, Any]:
    node: dict[str, Any] = {"name": name, "host": "localhost", "ram_gb": 8.0,
                            "max_instances": 2, "remote_work_dir": "."}
    node.update(kw)
    return node


def write_cluster(tmp: Path, data: Any) -> Path:
    p = tmp / "cluster.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def write_spec(tmp: Path, name: str, data: Any) -> Path:
    p = tmp / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p




NODE_ERRORS = [
    ({"ram_gb": -4}, "nodes[0].ram_gb", "must be greater than 0"),
    ({"ram_gb": 0}, "nodes[0].ram_gb", "must be greater than 0"),
    ({"ram_gb": "lots"}, "nodes[0].ram_gb", "expected a number, got string"),
    ({"max_instances": 0}, "nodes[0].max_instances", "must be at least 1"),
    ({"max_instances": 1.5}, "nodes[0].max_instances", "expected an integer"),
    ({"cpu_cores": -2}, "nodes[0].cpu_cores", "must be at least 1"),
    ({"reserved_ram_gb": 8.0}, "nodes[0].reserved_ram_gb", "must be less than ram_gb (8)"),
    ({"reserved_ram_gb": -1}, "nodes[0].reserved_ram_gb", "must be at least 0"),
    ({"ssh_port": 70000}, "nodes[0].ssh_port", "port must be in 1..65535"),
    ({"ssh_port": 0}, "nodes[0].ssh_port", "port must be in 1..65535"),
    ({"monitor_port": -1}, "nodes[0].monitor_port", "port must be in 1..65535"),
    ({"type": "mainframe"}, "nodes[0].type", "must be one of jetson_orin, raspberry_pi"),
    ({"gpu": "yes"}, "nodes[0].gpu", "expected true or false"),
    ({"gpu": True}, "nodes[0].gpu_memory_gb", "must be greater than 0 when gpu is true"),
    ({"enabled": 1}, "nodes[0].enabled", "expected true or false"),
    ({"name": "../etc"}, "nodes[0].name", "is not a safe id"),
    ({"name": "a b"}, "nodes[0].name", "is not a safe id"),
    ({"host": "remote.invalid", "remote_work_dir": "work"}, "nodes[0].remote_work_dir",
     "must be an absolute path"),
    ({"ssh_key_path": "keys/id"}, "nodes[0].ssh_key_path", "must be an absolute path"),
    ({"tags": "gpu"}, None, None),  # a single string is accepted as one tag
    ({"tags": [1]}, "nodes[0].tags[0]", "expected a non-empty string"),
    ({"colour": "red"}, "nodes[0].colour", "unknown key"),
]


@pytest.mark.parametrize(("patch", "key", "reason"), NODE_ERRORS)
def test_node_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], patch: dict[str, Any],
                     key: str | None, reason: str | None) -> None:
    path = write_cluster(tmp_path, {"nodes": [good_node(**patch)]})
    code, out, err = run_cli(capsys, "--cluster-config", str(path), "--validate-config")
    if key is None:
        assert code == 0, err
        return
    assert_one_line_error(code, err, f"{path}: {key}: ", reason)


def test_missing_required_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    node = good_node()
    del node["ram_gb"]
    path = write_cluster(tmp_path, {"nodes": [node]})
    code, _, err = run_cli(capsys, "--cluster-config", str(path), "--validate-config")
    assert_one_line_error(code, err, "nodes[0].ram_gb: required key is missing")


def test_duplicate_node_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_cluster(tmp_path, {"nodes": [good_node("a"), good_node("b"), good_node("a")]})
    code, _, err = run_cli(capsys, "--cluster-config", str(path), "--validate-config")
    assert_one_line_error(code, err, "nodes[2].name: duplicate node name 'a' (also nodes[0])")


@pytest.mark.parametrize(("doc", "key", "reason"), [
    ({"health_check": {"interval_seconds": 0}}, "health_check.interval_seconds", "greater than 0"),
    ({"health_check": {"checks": ["ssh", "cpu_magic"]}}, "health_check.checks[1]", "unknown check"),
    ({"health_check": {"known_hosts": "kh"}}, "health_check.known_hosts", "absolute path"),
    ({"health_check": {"lease_seconds": 1}}, "health_check.lease_seconds", "at least 2"),
    ({"health_check": {"lease_seconds": "long"}}, "health_check.lease_seconds", "a number"),
    ({"failover": {"max_retries": -1}}, "failover.max_retries", "at least 0"),
    ({"failover": {"auto_restart": "sometimes"}}, "failover.auto_restart", "true or false"),
    ({"network": {"peer_port_range": {"start": 9100, "end": 9000}}},
     "network.peer_port_range.end", "must not be below start"),
    ({"network": {"peer_port_range": {"start": 0, "end": 9000}}},
     "network.peer_port_range.start", "1..65535"),
    ({"network": {"subnets": ["not-a-net"]}}, "network.subnets[0]", "CIDR"),
    ({"placement": {"strategy": "random"}}, "placement.strategy", "must be one of score"),
    ({"placement": {"preferences": ["ghost"]}}, "placement.preferences[0]", "unknown node 'ghost'"),
    ({"logging": {"level": "LOUD"}}, "logging.level", "must be one of"),
    ({"defaults": {"ram_gb": -1}}, "defaults.ram_gb", "greater than 0"),
    ({"extras": {}}, "extras", "unknown key"),
    ({"cluster": []}, "cluster", "expected a mapping, got list"),
])
def test_section_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], doc: dict[str, Any],
                        key: str, reason: str) -> None:
    path = write_cluster(tmp_path, {"nodes": [good_node()], **doc})
    code, _, err = run_cli(capsys, "--cluster-config", str(path), "--validate-config")
    assert_one_line_error(code, err, f"{key}: ", reason)


def test_malformed_yaml_names_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_cluster(tmp_path, "nodes:\n  - name: a\n    host: [unclosed\n    ram_gb: 4\n")
    code, _, err = run_cli(capsys, "--cluster-config", str(path), "--validate-config")
    assert_one_line_error(code, err, f"{path}:", "invalid YAML")
    assert f"{path}:4" in err or f"{path}:3" in err


def test_duplicate_yaml_keys_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_cluster(tmp_path, "nodes:\n  - name: a\n    host: localhost\n    ram_gb: 4\n    ram_gb: 8\n")
    code, _, err = run_cli(capsys, "--cluster-config", str(path), "--validate-config")
    assert_one_line_error(code, err, f"{path}:5", "duplicate key 'ram_gb'")


def test_missing_cluster_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "--cluster-config", str(tmp_path / "nope.yaml"),
                           "--validate-config")
    assert_one_line_error(code, err, "nope.yaml: file not found")


def test_empty_cluster_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_cluster(tmp_path, "")
    code, _, err = run_cli(capsys, "--cluster-config", str(path), "--validate-config")
    assert_one_line_error(code, err, "the file is empty")


# ---------------------------------------------------------------- specs

SPEC_ERRORS = [
    ({"command": ""}, "command", "expected a non-empty string"),
    ({"command": None}, "command", "expected a non-empty string"),
    ({"ram_gb": -1}, "ram_gb", "must be greater than 0"),
    ({"gpu_required": "true"}, "gpu_required", "expected true or false"),
    ({"gpu_memory_gb": 4}, "gpu_memory_gb", "is set but gpu_required is false"),
    ({"preferred_node": "mars"}, "preferred_node", "unknown node 'mars'"),
    ({"affinity": ["ghost"]}, "affinity[0]", "unknown instance id 'ghost'"),
    ({"anti_affinity": ["ghost"]}, "anti_affinity[0]", "unknown instance id 'ghost'"),
    ({"anti_affinity": ["exp"]}, "anti_affinity", "lists the experiment itself"),
    ({"experiment_id": "../../etc/passwd"}, "experiment_id", "not a safe id"),
    ({"experiment_id": "a/b"}, "experiment_id", "not a safe id"),
    ({"results": ["/etc/shadow"]}, "results[0]", "must be relative"),
    ({"results": ["../up.txt"]}, "results[0]", "no '..'"),
    ({"workdir": "/abs"}, "workdir", "must be relative"),
    ({"env": {"1BAD": "x"}}, "env.1BAD", "not a valid environment variable name"),
    ({"env": {"INFRA_RUN_ID": "x"}}, "env.INFRA_RUN_ID", "reserved"),
    ({"env": {"X": ["list"]}}, "env.X", "expected a string or a number"),
    ({"recover": "pray"}, "recover", "must be one of cluster, pause, none"),
    ({"max_retries": -3}, "max_retries", "must be at least 0"),
    ({"params": [1, 2]}, "params", "expected a mapping"),
    ({"banana": 1}, "banana", "unknown key"),
]


@pytest.mark.parametrize(("patch", "key", "reason"), SPEC_ERRORS)
def test_spec_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], patch: dict[str, Any],
                     key: str, reason: str) -> None:
    cluster = write_cluster(tmp_path, {"nodes": [good_node()]})
    data = {"command": "true", "ram_gb": 1.0}
    data.update(patch)
    spec = write_spec(tmp_path, "exp.json", data)
    code, _, err = run_cli(capsys, "--cluster-config", str(cluster), "--validate-config",
                           "--config", str(spec))
    assert_one_line_error(code, err, f"{spec}: {key}: ", reason)


def test_malformed_json_names_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cluster = write_cluster(tmp_path, {"nodes": [good_node()]})
    spec = write_spec(tmp_path, "bad.json", '{\n  "command": "true",\n  "ram_gb": ,\n}\n')
    code, _, err = run_cli(capsys, "--cluster-config", str(cluster), "--validate-config",
                           "--config", str(spec))
    assert_one_line_error(code, err, f"{spec}:3: invalid JSON")


def test_duplicate_instance_ids(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cluster = write_cluster(tmp_path, {"nodes": [good_node()]})
    a = write_spec(tmp_path, "a.json", {"experiment_id": "same", "command": "true"})
    b = write_spec(tmp_path, "b.json", {"experiment_id": "same", "command": "true"})
    code, _, err = run_cli(capsys, "--cluster-config", str(cluster), "--validate-config",
                           "--config", str(a), "--config", str(b))
    assert_one_line_error(code, err, "experiment_id: duplicate instance id 'same'")


@pytest.mark.parametrize(("pins", "message"), [
    ("a:mars", "--placement: unknown node 'mars' for a"),
    ("ghost:n1", "--placement: unknown instance id 'ghost'"),
    ("a", "--placement: 'a' is not of the form INSTANCE:NODE"),
    ("a:n1,a:n2", "--placement: a is pinned twice (n1 and n2)"),
])
def test_placement_flag_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], pins: str,
                               message: str) -> None:
    cluster = write_cluster(tmp_path, {"nodes": [good_node("n1"), good_node("n2")]})
    a = write_spec(tmp_path, "a.json", {"command": "true"})
    code, _, err = run_cli(capsys, "--cluster-config", str(cluster), "--config", str(a),
                           "--placement", pins, "--dry-run")
    assert_one_line_error(code, err, message)


def test_unpinned_instances_need_auto_place(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    cluster = write_cluster(tmp_path, {"nodes": [good_node("n1")]})
    a = write_spec(tmp_path, "a.json", {"command": "true"})
    b = write_spec(tmp_path, "b.json", {"command": "true"})
    code, _, err = run_cli(capsys, "--cluster-config", str(cluster), "--config", str(a),
                           "--config", str(b), "--placement", "a:n1", "--dry-run")
    assert_one_line_error(code, err, "no placement for b: add --auto-place")


def test_refused_pin_says_why_and_force_overrides(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    cluster = write_cluster(tmp_path, {"nodes": [good_node("gpu", gpu=True, gpu_memory_gb=8),
                                                 good_node("rpi1")]})
    a = write_spec(tmp_path, "a.json", {"command": "true", "gpu_required": True,
                                        "gpu_memory_gb": 2})
    base = ["--cluster-config", str(cluster), "--config", str(a), "--placement", "a:rpi1",
            "--dry-run"]
    code, _, err = run_cli(capsys, *base)
    assert_one_line_error(code, err, "a pinned to rpi1 has no GPU", "--force", exit_code=3)
    code, out, err = run_cli(capsys, *base, "--force", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["placements"] == {"a": "rpi1"}
    assert doc["instances"]["a"]["forced"] == ["has no GPU"]


def test_nothing_fits_lists_every_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cluster = write_cluster(tmp_path, {"nodes": [good_node("n1", ram_gb=2),
                                                 good_node("n2", enabled=False)]})
    a = write_spec(tmp_path, "a.json", {"command": "true", "ram_gb": 4})
    code, _, err = run_cli(capsys, "--cluster-config", str(cluster), "--config", str(a),
                           "--auto-place", "--dry-run")
    assert_one_line_error(code, err, "cannot place a (n1: not enough RAM",
                          "n2: disabled in the cluster config", exit_code=3)


# ---------------------------------------------------------------- happy paths

def test_validate_shipped_config_and_specs(capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    code, out, err = run_cli(capsys, "--validate-config", "--config", "experiments")
    assert code == 0, err
    assert "is valid: 4 nodes (1 enabled), 11 experiment specs" in " ".join(out.split())


def test_dry_run_json_is_independent_of_flag_order(capsys: pytest.CaptureFixture[str]) -> None:
    lab = str(REPO / "docs" / "example-lab.yaml")
    names = ["split_brain_A", "split_brain_B"]
    docs = []
    for order in (names, names[::-1]):
        args = ["--cluster-config", lab, "--auto-place", "--dry-run", "--json"]
        for n in order:
            args += ["--config", str(REPO / "experiments" / f"{n}.json")]
        code, out, err = run_cli(capsys, *args)
        assert code == 0, err
        docs.append(json.loads(out))
    assert docs[0] == docs[1]
    assert docs[0]["placements"] == {"split_brain_A": "jetson", "split_brain_B": "rpi1"}
    jetson = docs[0]["instances"]["split_brain_A"]["nodes"]["jetson"]
    assert jetson["score"] == 65
    assert docs[0]["instances"]["split_brain_A"]["nodes"]["rpi1"] == {
        "feasible": False, "reason": "has no GPU"}


def test_explain_shows_parts_and_reasons(capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    lab = str(REPO / "docs" / "example-lab.yaml")
    code, out, err = run_cli(capsys, "--cluster-config", lab, "--auto-place", "--dry-run",
                             "--explain", "--config", str(REPO / "experiments/split_brain_A.json"),
                             "--config", str(REPO / "experiments/split_brain_B.json"))
    assert code == 0, err
    flat = " ".join(out.split())
    assert "split_brain_A -> jetson" in flat
    assert "rejected: has no GPU" in flat
    assert "anti-affinity" in flat


@pytest.mark.parametrize("args", [
    ["--validate-config"],
    ["--config", "experiments/nope.json", "--auto-place", "--dry-run"],
])
def test_real_subprocess_no_traceback(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "scripts/cluster_experiment.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    if args == ["--validate-config"]:
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode == 2
        assert proc.stderr.strip() == "error: experiments/nope.json: file not found"
    assert "Traceback" not in proc.stderr


def test_force_never_uses_a_disabled_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cluster = write_cluster(tmp_path, {"nodes": [good_node("on"), good_node("off", enabled=False)]})
    a = write_spec(tmp_path, "a.json", {"command": "true"})
    code, _, err = run_cli(capsys, "--cluster-config", str(cluster), "--config", str(a),
                           "--placement", "a:off", "--force", "--dry-run")
    assert_one_line_error(code, err, "a pinned to off disabled in the cluster config", exit_code=3)
    assert "--force" not in err


def test_placement_flags_need_specs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cluster = write_cluster(tmp_path, {"nodes": [good_node("n1")]})
    code, _, err = run_cli(capsys, "--cluster-config", str(cluster), "--auto-place")
    assert_one_line_error(code, err, "--placement/--auto-place need experiment specs")


def test_config_directory_skips_the_cluster_config(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    cluster = write_cluster(tmp_path, {"nodes": [good_node("n1")]})
    write_spec(tmp_path, "exp.json", {"command": "true"})
    code, out, err = run_cli(capsys, "--cluster-config", str(cluster), "--validate-config",
                             "--config", str(tmp_path))
    assert code == 0, err
    assert "1 experiment specs" in " ".join(out.split())


def test_system_job_without_an_eligible_node_is_refused(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    cluster = write_cluster(tmp_path, {"nodes": [good_node("n1"), good_node("n2", enabled=False)]})
    a = write_spec(tmp_path, "diag.json", {"command": "true", "job_type": "sysbatch",
                                           "gpu_required": True, "gpu_memory_gb": 1})
    code, _, err = run_cli(capsys, "--cluster-config", str(cluster), "--config", str(a),
                           "--dry-run")
    assert_one_line_error(code, err, "no eligible node for system job(s) diag",
                          "n1: has no GPU", exit_code=3)


@pytest.mark.parametrize("make, fragment", [
    (lambda k: None, "does not exist"),
    (lambda k: (k.write_text("key\n"), k.chmod(0o644)), "is readable by others (mode 0644)"),
    (lambda k: k.mkdir(), "is not a file"),
])
def test_validate_config_checks_key_files(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          make: Any, fragment: str) -> None:
    key = tmp_path / "id_lab"
    make(key)
    cfg = write_cluster(tmp_path, {"nodes": [good_node("n1"),
                                             good_node("n2", host="127.0.0.21", remote_work_dir="~/lab", ssh_key_path=str(key))]})
    code, _, err = run_cli(capsys, "--cluster-config", str(cfg), "--validate-config")
    assert_one_line_error(code, err, "nodes[1].ssh_key_path", fragment, "(node n2)")


def test_validate_config_accepts_a_private_key(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "id_lab"
    key.write_text("key\n")
    key.chmod(0o600)
    cfg = write_cluster(tmp_path, {"nodes": [good_node("n1", host="127.0.0.21", remote_work_dir="~/lab", ssh_key_path=str(key)),
                                             good_node("n2", ssh_key_path="/nowhere/key",
                                                       enabled=False)]})
    code, _, err = run_cli(capsys, "--cluster-config", str(cfg), "--validate-config")
    assert code == 0, err  # a disabled node's key is not checked
