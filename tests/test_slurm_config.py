"""Slurm targets in the topology and the ``slurm`` spec key: parsing, one-line errors through
the real CLI, ``--validate-config`` output, pins naming a target, the stored-spec round trip."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.config.model import SlurmOptions, SlurmTarget
from infra.config.slurm import duration_seconds, signal_problem
from infra.config.specs import bench_pins, parse_pins, parse_spec, target_pins
from infra.config.topology import parse_cluster
from infra.errors import ConfigError, UsageError
from infra.state.codec import decode_spec, encode_spec
from tests.builders import assert_one_line_error, run_cli

BENCH = {"name": "n1", "host": "localhost", "ram_gb": 8.0, "remote_work_dir": "."}


def target(**kw: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"name": "hpc", "type": "slurm", "host": "login.hpc.invalid"}
    doc.update(kw)
    return doc


def write(tmp: Path, nodes: list[dict[str, Any]]) -> Path:
    p = tmp / "cluster.yaml"
    p.write_text(yaml.safe_dump({"nodes": nodes}))
    return p


def test_a_slurm_entry_becomes_a_target_not_a_node() -> None:
    cluster = parse_cluster({"nodes": [BENCH, target(
        ssh_user="alice", ssh_port=2222, ssh_key_path="/keys/id_hpc",
        remote_work_dir="/scratch/alice/lab//", partition="gpu,cpu", account="proj-1",
        qos="normal", time_limit="2-12:00:00", description="the institute", enabled=True)]},
        Path("/tmp/c/cluster.yaml"))
    assert cluster.node_names == ("n1",)
    assert cluster.slurm_targets == (SlurmTarget(
        name="hpc", host="login.hpc.invalid", ssh_user="alice", ssh_port=2222,
        ssh_key_path="/keys/id_hpc", remote_work_dir="/scratch/alice/lab",
        partition="gpu,cpu", account="proj-1", qos="normal", time_limit="2-12:00:00",
        description="the institute"),)
    assert cluster.slurm_target("hpc") is cluster.slurm_targets[0]
    assert cluster.slurm_target("n1") is None
    with pytest.raises(KeyError):
        cluster.node("hpc")
    login = cluster.slurm_targets[0].login_node()
    assert (login.name, login.host, login.ssh_user, login.ssh_port, login.ssh_key_path,
            login.remote_work_dir) == ("hpc", "login.hpc.invalid", "alice", 2222,
                                       "/keys/id_hpc", "/scratch/alice/lab")
    assert not login.scheduling_eligible and not login.is_local


def test_defaults_and_a_cluster_of_targets_only() -> None:
    cluster = parse_cluster({"nodes": [target()]}, Path("c.yaml"))
    assert cluster.nodes == ()
    t = cluster.slurm_targets[0]
    assert (t.remote_work_dir, t.time_limit, t.partition, t.account, t.qos, t.ssh_port) == \
        ("~/lab-orchestrator", "01:00:00", None, None, None, 22)


TARGET_ERRORS = [
    ({"ram_gb": 8}, "nodes[1].ram_gb", "not a key of a slurm target"),
    ({"max_instances": 2}, "nodes[1].max_instances", "not a key of a slurm target"),
    ({"gpu": True}, "nodes[1].gpu", "not a key of a slurm target"),
    ({"tags": ["a"]}, "nodes[1].tags", "not a key of a slurm target"),
    ({"colour": "red"}, "nodes[1].colour", "unknown key (known keys: account, description"),
    ({"host": "bad host"}, "nodes[1].host", "invalid character ' '"),
    ({"host": "-oProxyCommand=x"}, "nodes[1].host", "must not start with '-'"),
    ({"ssh_user": "a;b"}, "nodes[1].ssh_user", "not a valid user name"),
    ({"ssh_port": 0}, "nodes[1].ssh_port", "1..65535"),
    ({"ssh_key_path": "keys/id"}, "nodes[1].ssh_key_path", "must be an absolute path"),
    ({"remote_work_dir": "work"}, "nodes[1].remote_work_dir", "must be an absolute path"),
    ({"remote_work_dir": "/w/$(x)"}, "nodes[1].remote_work_dir", "character '$'"),
    ({"partition": "gpu;rm"}, "nodes[1].partition", "not a comma-separated list of names"),
    ({"partition": "a b"}, "nodes[1].partition", "not a comma-separated list"),
    ({"account": "a,b"}, "nodes[1].account", "is not a name Slurm accepts"),
    ({"qos": "high\nlow"}, "nodes[1].qos", "is not a name Slurm accepts"),
    ({"time_limit": "1h"}, "nodes[1].time_limit", "is not a Slurm duration"),
    ({"time_limit": "0"}, "nodes[1].time_limit", "must be longer than zero"),
    ({"time_limit": "10:61"}, "nodes[1].time_limit", "is not a Slurm duration"),
    ({"time_limit": 60}, "nodes[1].time_limit", "expected a string"),
    ({"enabled": "yes"}, "nodes[1].enabled", "expected true or false"),
    ({"name": "n1"}, "nodes[1].name", "duplicate node name 'n1' (also nodes[0])"),
    ({"name": "../x"}, "nodes[1].name", "is not a safe id"),
]


@pytest.mark.parametrize(("patch", "key", "reason"), TARGET_ERRORS)
def test_target_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    patch: dict[str, Any], key: str, reason: str) -> None:
    path = write(tmp_path, [BENCH, target(**patch)])
    code, _, err = run_cli(capsys, "--cluster-config", str(path), "--validate-config")
    assert_one_line_error(code, err, f"{path}: {key}: ", reason)


def test_a_bad_node_type_lists_slurm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, [{**BENCH, "type": "cluster"}])
    code, _, err = run_cli(capsys, "--cluster-config", str(path), "--validate-config")
    assert_one_line_error(code, err, "nodes[0].type: must be one of", "generic, slurm")


def test_validate_config_shows_targets_apart(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, [BENCH, target(partition="debug", account="lab")])
    code, out, err = run_cli(capsys, "--cluster-config", str(path), "--validate-config")
    assert code == 0, err
    assert "Slurm targets" in out and "login.hpc.invalid" in out and "partition debug" in out
    assert "1 nodes (1 enabled), 1 Slurm targets" in out
    code, out, err = run_cli(capsys, "--cluster-config", str(path), "--validate-config",
                             "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert [n["name"] for n in doc["nodes"]] == ["n1"]
    assert doc["slurm_targets"][0]["name"] == "hpc"
    assert doc["slurm_targets"][0]["partition"] == "debug"


def test_validate_config_checks_a_target_key_file(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, [BENCH, target(ssh_key_path=str(tmp_path / "missing"))])
    code, _, err = run_cli(capsys, "--cluster-config", str(path), "--validate-config")
    assert_one_line_error(code, err, "nodes[1].ssh_key_path: ", "does not exist",
                          "(slurm target hpc)")


def test_a_node_after_a_target_is_named_by_its_place_in_the_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    node = {"name": "n2", "host": "n2.lab.invalid", "ram_gb": 4,
            "ssh_key_path": str(tmp_path / "nokey")}
    path = write(tmp_path, [target(), node])
    code, _, err = run_cli(capsys, "--cluster-config", str(path), "--validate-config")
    assert_one_line_error(code, err, "nodes[1].ssh_key_path: ", "(node n2)")


# --------------------------------------------------------------------------- durations, signals

@pytest.mark.parametrize(("text", "seconds"), [
    ("5", 300), ("05:30", 330), ("01:00:00", 3600), ("2-0", 172800), ("1-12", 129600),
    ("1-00:30", 88200), ("1-00:00:05", 86405), ("90", 5400), ("0", 0),
    ("1:60", None), ("25:00:61", None), ("1-24", None), ("1h", None), ("", None),
    ("-5", None), ("1:2:3:4", None), ("UNLIMITED", None),
])
def test_durations(text: str, seconds: int | None) -> None:
    assert duration_seconds(text) == seconds


@pytest.mark.parametrize(("text", "ok"), [
    ("USR1@60", True), ("B:USR1@60", True), ("SIGTERM@120", True), ("10@5", True),
    ("R:TERM", True), ("usr2", True), ("USR1@65536", False), ("USR1@", False),
    ("BOGUS@60", False), ("0@60", False), ("65", False), ("X:USR1", False),
    ("USR1@60;rm", False), ("USR1 @60", False),
])
def test_signals(text: str, ok: bool) -> None:
    assert (signal_problem(text) is None) is ok


# --------------------------------------------------------------------------- spec key

CLUSTER = parse_cluster({"nodes": [BENCH, target()]}, Path("/tmp/c/cluster.yaml"))


def spec(**kw: Any) -> Any:
    doc: dict[str, Any] = {"experiment_id": "e1", "command": "python3 run.py"}
    doc.update(kw)
    return parse_spec(doc, Path("/tmp/c/e1.json"), CLUSTER)


def test_the_slurm_key_is_parsed_and_stored() -> None:
    s = spec(slurm={"time_limit": "00:10:00", "signal": "B:USR1@60"})
    assert s.slurm == SlurmOptions(time_limit="00:10:00", signal="B:USR1@60")
    assert decode_spec(encode_spec(s)) == s
    plain = spec()
    assert plain.slurm is None and "slurm" not in json.loads(encode_spec(plain))
    assert decode_spec(encode_spec(spec(slurm={}))).slurm == SlurmOptions()


@pytest.mark.parametrize(("value", "key", "reason"), [
    ({"time_limit": "forever"}, "slurm.time_limit", "is not a Slurm duration"),
    ({"signal": "USR1@99999"}, "slurm.signal", "at most 65535"),
    ({"signal": "HUP;x"}, "slurm.signal", "is not a Slurm signal"),
    ({"constraint": "a"}, "slurm.constraint", "unknown key"),
    ({"partition": "x"}, "slurm.partition", "unknown key"),
    ("fast", "slurm", "expected a mapping, got string"),
])
def test_slurm_key_errors(value: Any, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        spec(slurm=value)
    assert f"{key}: " in str(err.value) and reason in str(err.value)


def test_spec_errors_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, [BENCH, target()])
    sp = tmp_path / "e1.json"
    sp.write_text(json.dumps({"command": "true", "slurm": {"time_limit": "soon"}}))
    code, _, err = run_cli(capsys, "--cluster-config", str(path), "--validate-config",
                           "--config", str(sp))
    assert_one_line_error(code, err, "slurm.time_limit: is not a Slurm duration")


def test_preferred_node_may_not_name_a_target() -> None:
    with pytest.raises(ConfigError, match="is a Slurm target, not a node: pin the experiment "
                                          "there with --placement e1:hpc"):
        spec(preferred_node="hpc")


# --------------------------------------------------------------------------- pins

def test_a_pin_may_name_a_target_but_the_planner_never_sees_it() -> None:
    specs = [spec(), spec(experiment_id="e2")]
    pins = parse_pins("e1:hpc,e2:n1", CLUSTER, specs)
    assert pins == {"e1": "hpc", "e2": "n1"}
    assert target_pins(pins, CLUSTER) == {"e1": "hpc"}
    assert bench_pins({"e2": "n1"}, CLUSTER) == {"e2": "n1"}
    with pytest.raises(UsageError, match="e1:hpc pins work to a Slurm target"):
        bench_pins(pins, CLUSTER)
    with pytest.raises(UsageError, match="unknown node 'ghost' for e1; nodes: n1; "
                                         "slurm targets: hpc"):
        parse_pins("e1:ghost", CLUSTER, specs)


def test_a_dry_run_pinned_to_a_target_shows_its_sbatch_options(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """(The driver's dispatch: a pinned dry run lists each job's sbatch words, sends nothing;
    a run mixing a target and bench work is refused in one line naming the ids.)"""
    path = write(tmp_path, [BENCH, target()])
    sp = tmp_path / "e1.json"
    sp.write_text(json.dumps({"command": "true"}))
    code, out, err = run_cli(capsys, "--cluster-config", str(path), "--config", str(sp),
                             "--placement", "e1:hpc", "--dry-run")
    assert code == 0 and "Traceback" not in err, err
    assert "e1 -> hpc: sbatch " in out and "--job-name=infra.RUN.e1" in out, out
    sp2 = tmp_path / "e2.json"
    sp2.write_text(json.dumps({"command": "true"}))
    code, _, err = run_cli(capsys, "--cluster-config", str(path), "--config", str(sp),
                           "--config", str(sp2), "--placement", "e1:hpc", "--dry-run")
    assert code != 0 and "Traceback" not in err
    assert "all-Slurm or all-bench" in err and "e1" in err and "e2" in err, err
