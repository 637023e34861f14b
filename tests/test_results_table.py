"""``results RUN --table | --csv | --json``: each instance's parameters joined with its outcome
and the metrics it wrote to ``$INFRA_RESULTS_DIR/metrics.json``.

Pure parts (flattening, bad metrics files, CSV/JSON forms, the terminal table) over a real
SQLite store and real files; the CLI over a store whose nodes cannot be reached
(``--no-fetch`` asks none); and one real run on the local node through the real CLI.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from infra.campaign.table import (
    METRICS_MAX_BYTES,
    METRICS_MAX_VALUES,
    Metrics,
    ResultRow,
    build_rows,
    columns,
    parse_metrics,
    read_metrics_file,
    render_table,
    to_csv,
    to_json,
)
from infra.state import InstancePhase, Store
from tests.builders import assert_one_line_error, cluster, node, run_cli, spec

RUN = "r-20261206-120000-abcd"


# --------------------------------------------------------------------------- metrics.json

def test_nested_metrics_are_flattened_with_dots_and_non_scalars_kept_as_json_text() -> None:
    doc = {"loss": 0.25, "val": {"acc": 0.9, "f1": {"macro": 0.7}}, "tags": ["a", 1],
           "none": None, "ok": True, "epochs": 3, "empty": {}, "name": "x, \"y\""}
    m = parse_metrics(json.dumps(doc).encode())
    assert m.error is None
    assert dict(m.values) == {"loss": 0.25, "val.acc": 0.9, "val.f1.macro": 0.7,
                              "tags": '["a", 1]', "none": None, "ok": True, "epochs": 3,
                              "empty": "{}", "name": "x, \"y\""}
    assert type(dict(m.values)["epochs"]) is int and type(dict(m.values)["ok"]) is bool


@pytest.mark.parametrize(("data", "reason"), [
    (b"{oops", "invalid JSON: Expecting property name"),
    (b"", "invalid JSON: Expecting value"),
    (b"[1, 2]", "not a JSON object (an array)"),
    (b'"text"', "not a JSON object (a string)"),
    (b"0.5", "not a JSON object (a number)"),
    (b"null", "not a JSON object (null)"),
    (b'{"a": "\xff\xfe"}', "not UTF-8 text"),
    (b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, "nested too deeply"),
    (b'{"a": ' + b"9" * 50_000 + b"}", "invalid JSON: Exceeds the limit"),
    (b'{"a": "' + b"x" * METRICS_MAX_BYTES + b'"}', f"larger than {METRICS_MAX_BYTES} bytes"),
])
def test_a_bad_metrics_file_is_a_short_reason_never_a_crash(data: bytes, reason: str) -> None:
    m = parse_metrics(data)
    assert m.values == () and m.error is not None
    assert m.error.startswith(reason), m.error
    assert len(m.error) < 160 and "\n" not in m.error


def test_too_many_values_and_a_dotted_key_twice_keep_what_they_can() -> None:
    doc = {f"k{i:05d}": i for i in range(METRICS_MAX_VALUES + 5)}
    m = parse_metrics(json.dumps(doc).encode())
    assert len(m.values) == METRICS_MAX_VALUES
    assert m.error == f"more than {METRICS_MAX_VALUES} values: 5 left out"
    m = parse_metrics(b'{"a.b": 1, "a": {"b": 2}, "c": 3}')
    assert dict(m.values) == {"a.b": 1, "c": 3}
    assert m.error is not None and "'a.b' given twice" in m.error


def results_dir(log_dir: Path, instance: str) -> Path:
    d = log_dir / RUN / instance / "results"
    d.mkdir(parents=True, exist_ok=True)
    return d


def test_reading_metrics_home_follows_no_link_and_opens_no_fifo(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    run_dir = log_dir / RUN
    outside = tmp_path / "secret.json"
    outside.write_text('{"secret": 1}')

    (results_dir(log_dir, "good") / "metrics.json").write_text('{"loss": 1.5}')
    assert read_metrics_file(run_dir, "good") == Metrics((("loss", 1.5),))
    results_dir(log_dir, "none")
    assert read_metrics_file(run_dir, "none") == Metrics()  # wrote none: no error
    assert read_metrics_file(run_dir, "never-fetched") == Metrics()
    assert read_metrics_file(tmp_path / "no-such-run", "good") == Metrics()

    (results_dir(log_dir, "filelink") / "metrics.json").symlink_to(outside)
    assert read_metrics_file(run_dir, "filelink").error == "metrics.json is a link: not followed"
    (run_dir / "dirlink").mkdir()
    (run_dir / "dirlink" / "results").symlink_to(tmp_path)
    (tmp_path / "metrics.json").write_text('{"secret": 2}')
    assert read_metrics_file(run_dir, "dirlink").error == \
        "dirlink/results is a link: not followed"
    (run_dir / "instlink").symlink_to(log_dir / RUN / "good")
    assert read_metrics_file(run_dir, "instlink").error == "instlink is a link: not followed"
    os.mkfifo(results_dir(log_dir, "fifo") / "metrics.json")  # reading it would block
    assert read_metrics_file(run_dir, "fifo").error == "metrics.json is not a regular file"
    (results_dir(log_dir, "isdir") / "metrics.json").mkdir()
    assert read_metrics_file(run_dir, "isdir").error == "metrics.json is not a regular file"
    with (results_dir(log_dir, "big") / "metrics.json").open("wb") as f:
        f.truncate(METRICS_MAX_BYTES + 1)
    assert read_metrics_file(run_dir, "big").error == \
        f"larger than {METRICS_MAX_BYTES} bytes ({METRICS_MAX_BYTES + 1}): not read"
    assert read_metrics_file(run_dir, "..").error == "instance id is not a plain name: not read"
    assert read_metrics_file(run_dir, "a/b").error == "instance id is not a plain name: not read"


# --------------------------------------------------------------------------- rows

def make_store(log_dir: Path, host: str = "node1.lab.invalid") -> None:
    """A run of four instances in a real store: exited twice (one after a restart), failed,
    and one still queued; two wrote metrics, one wrote a bad file."""
    c = cluster(node("node1", host=host))
    specs = [
        spec(c, "t1", params={"lr": 0.1, "depth": 2, "opt": {"name": "adam"}}),
        spec(c, "t2", params={"lr": 0.01, "depth": 4, "opt": {"name": "sgd"}}),
        spec(c, "t3", params={"lr": 1.0, "extra": "a,b"}),
        spec(c, "t4", params={"lr": 0.5}),
    ]
    log_dir.mkdir(parents=True, exist_ok=True)
    store = Store(log_dir / "state.db")
    store.create_run(RUN, "cluster_config.yaml", {}, [(s.experiment_id, "node1", s, None)
                                                      for s in specs])
    store.update_instance(RUN, "t1", state=InstancePhase.EXITED, exit_code=0, started_at=100.0,
                          ended_at=112.5, reason="exit code 0")
    store.update_instance(RUN, "t2", state=InstancePhase.EXITED, exit_code=0, started_at=100.0,
                          ended_at=160.0, restarts=1, reason="exit code 0")
    store.update_instance(RUN, "t3", state=InstancePhase.FAILED, exit_code=3, started_at=100.0,
                          ended_at=101.0, reason="exit code 3")
    store.update_instance(RUN, "t4", state=InstancePhase.QUEUED, node="",
                          reason="queued: node1 is full")
    store.close()
    (results_dir(log_dir, "t1") / "metrics.json").write_text(
        json.dumps({"loss": 0.5, "val": {"acc": 0.75}, "steps": 10}))
    (results_dir(log_dir, "t2") / "metrics.json").write_text(
        json.dumps({"loss": 0.25, "note": "line1\nline2, \"quoted\"", "ok": False}))
    (results_dir(log_dir, "t3") / "metrics.json").write_text("[1, 2, 3]")


def load_rows(log_dir: Path) -> tuple[Any, ...]:
    store = Store(log_dir / "state.db")
    try:
        return build_rows(store.instances(RUN),
                          lambda rec: read_metrics_file(log_dir / RUN, rec.instance_id))
    finally:
        store.close()


def test_rows_join_params_outcome_and_metrics(tmp_path: Path) -> None:
    make_store(tmp_path)
    rows = {r.instance_id: r for r in load_rows(tmp_path)}
    assert list(rows) == ["t1", "t2", "t3", "t4"]
    t1, t2, t3, t4 = rows.values()
    assert dict(t1.params) == {"depth": 2, "lr": 0.1, "opt.name": "adam"}
    assert dict(t1.metrics) == {"loss": 0.5, "val.acc": 0.75, "steps": 10}
    assert (t1.state, t1.exit_code, t1.attempts, t1.node, t1.runtime_seconds) == \
        ("exited", 0, 1, "node1", 12.5)
    assert t2.attempts == 2 and t2.runtime_seconds == 60.0
    assert (t3.state, t3.exit_code, t3.metrics, t3.metrics_error) == \
        ("failed", 3, (), "not a JSON object (an array)")
    assert (t4.state, t4.attempts, t4.node, t4.runtime_seconds, t4.metrics, t4.metrics_error) \
        == ("queued", 0, None, None, (), None)
    assert t4.reason == "queued: node1 is full"
    assert (t1.template, t1.task_index) == (None, None)
    assert columns(list(rows.values())) == [
        "instance_id", "template", "task_index",
        "param.depth", "param.extra", "param.lr", "param.opt.name",
        "state", "exit_code", "signal", "attempts", "node", "runtime_seconds",
        "metric.loss", "metric.note", "metric.ok", "metric.steps", "metric.val.acc",
        "reason", "metrics_error"]


def test_csv_quotes_commas_quotes_and_newlines_and_reads_back(tmp_path: Path) -> None:
    make_store(tmp_path)
    text = to_csv(load_rows(tmp_path))
    records = list(csv.DictReader(io.StringIO(text, newline="")))
    assert text.startswith("instance_id,template,task_index,param.depth,")
    assert [r["instance_id"] for r in records] == ["t1", "t2", "t3", "t4"]
    t1, t2, t3, t4 = records
    assert t2["metric.note"] == "line1\nline2, \"quoted\""
    assert t3["param.extra"] == "a,b" and t1["param.extra"] == ""
    assert (t1["param.lr"], t1["param.depth"], t1["metric.loss"], t1["metric.steps"]) == \
        ("0.1", "2", "0.5", "10")
    assert t2["metric.ok"] == "false" and t2["attempts"] == "2"
    assert t3["metrics_error"] == "not a JSON object (an array)" and t3["exit_code"] == "3"
    assert (t4["state"], t4["attempts"], t4["node"], t4["metric.loss"]) == \
        ("queued", "0", "", "")


def test_a_carriage_return_survives_csv() -> None:
    m = parse_metrics(json.dumps({"a": "x\ry", "b": "tab\there"}).encode())
    row = ResultRow("i", None, None, (), "exited", 0, None, 1, "n", 1.0, "", m.values)
    (back,) = list(csv.DictReader(io.StringIO(to_csv([row]), newline="")))
    assert back["metric.a"] == "x\ry" and back["metric.b"] == "tab\there"


def test_json_keeps_types_and_stays_strict(tmp_path: Path) -> None:
    make_store(tmp_path)
    (results_dir(tmp_path, "t4") / "metrics.json").write_text(
        '{"loss": NaN, "best": Infinity, "worst": -Infinity}')
    doc = to_json(load_rows(tmp_path))
    text = json.dumps(doc, allow_nan=False)  # strict JSON: no bare NaN
    t1, t2, t3, t4 = json.loads(text)
    assert t1["params"] == {"depth": 2, "lr": 0.1, "opt.name": "adam"}
    assert t1["metrics"] == {"loss": 0.5, "steps": 10, "val.acc": 0.75}
    assert type(t1["metrics"]["steps"]) is int and t2["metrics"]["ok"] is False
    assert t1["exit_code"] == 0 and t1["attempts"] == 1 and t1["runtime_seconds"] == 12.5
    assert t3["metrics"] == {} and t3["metrics_error"] == "not a JSON object (an array)"
    assert t4["metrics"] == {"best": "Infinity", "loss": "NaN", "worst": "-Infinity"}
    assert t4["node"] is None and t4["exit_code"] is None and t4["attempts"] == 0
    assert math.isnan(dict(load_rows(tmp_path)[3].metrics)["loss"])  # the row keeps the float


def render(rows: Any, width: int) -> str:
    console = Console(width=width, record=True, file=io.StringIO(), highlight=False)
    console.print(render_table(rows, title="Results", width=width))
    return console.export_text()


def test_the_terminal_table_cuts_long_values_and_splits_wide_tables(tmp_path: Path) -> None:
    make_store(tmp_path)
    (results_dir(tmp_path, "t4") / "metrics.json").write_text(json.dumps(
        {"blob": "y" * 500, "ctl": "a\x1b[31mred\x07"} | {f"m{i}": i / 3 for i in range(12)}))
    rows = load_rows(tmp_path)
    wide = render(rows, 1000)
    lines = wide.splitlines()
    assert all(len(ln) <= 1000 for ln in lines)
    assert "y" * 31 + "…" in wide and "y" * 33 not in wide
    assert "a [31mred" in wide and "\x1b" not in wide and "\x07" not in wide
    assert "0.333333" in wide and "0.3333333" not in wide
    assert "line1 line2" in wide  # one line per row
    assert sum(1 for ln in lines if ln.startswith("┏")) == 1
    assert "template" not in wide and "signal" not in wide  # empty in every row: left out
    narrow = render(rows, 80)
    assert all(len(ln) <= 80 for ln in narrow.splitlines()), narrow
    tops = [ln for ln in narrow.splitlines() if ln.startswith("┏")]
    assert len(tops) > 2
    heads = [ln for ln in narrow.splitlines() if ln.startswith("┃")]
    assert all(h.startswith("┃ instance ") for h in heads)
    for name in ("param.opt.name", "metric.m11", "metric.val.acc", "metrics_error", "state"):
        assert name in narrow, name


# --------------------------------------------------------------------------- the CLI

def cli_project(tmp_path: Path, host: str = "node1.lab.invalid") -> Path:
    """A topology whose one node cannot be reached, and a run of it in the store."""
    cfg = tmp_path / "cluster_config.yaml"
    cfg.write_text(yaml.safe_dump({"nodes": [{"name": "node1", "host": host, "ram_gb": 8,
                                              "max_instances": 2}],
                                   "logging": {"log_dir": str(tmp_path / "logs")}}))
    make_store(tmp_path / "logs", host)
    return cfg


def test_no_fetch_builds_the_table_from_what_is_home(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(cli_project(tmp_path))  # node1.lab.invalid: any attempt to ask it fails
    code, out, err = run_cli(capsys, "--cluster-config", cfg, "results", RUN, "--no-fetch",
                             "--csv")
    assert code == 0, err
    assert err == ""
    records = list(csv.DictReader(io.StringIO(out, newline="")))
    assert [(r["instance_id"], r["metric.loss"]) for r in records] == \
        [("t1", "0.5"), ("t2", "0.25"), ("t3", ""), ("t4", "")]

    code, out, err = run_cli(capsys, "--cluster-config", cfg, "results", RUN, "--no-fetch",
                             "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert set(doc) == {"run_id", "rows"} and doc["run_id"] == RUN
    assert [r["metrics"].get("loss") for r in doc["rows"]] == [0.5, 0.25, None, None]

    code, out, err = run_cli(capsys, "--cluster-config", cfg, "results", RUN, "--no-fetch")
    assert code == 0, err
    assert f"Results of {RUN}" in out and "param.lr" in out and "metric.val.acc" in out

    code, _, err = run_cli(capsys, "--cluster-config", cfg, "results", RUN, "--csv", "--json")
    assert_one_line_error(code, err, "--csv and --json", "choose one")


def test_with_fetch_an_unreachable_node_still_gives_the_table_then_fails(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(cli_project(tmp_path, host="127.0.0.1"))
    (Path(cfg).parent / "cluster_config.yaml").write_text(yaml.safe_dump({
        "nodes": [{"name": "node1", "host": "127.0.0.1", "ssh_port": 1, "ram_gb": 8,
                   "max_instances": 2}],
        "health_check": {"timeout_seconds": 5},
        "logging": {"log_dir": str(tmp_path / "logs")}}))
    store = Store(tmp_path / "logs" / "state.db")
    store.update_instance(RUN, "t3", node="retired")  # since taken out of the topology
    store.close()
    code, out, err = run_cli(capsys, "--cluster-config", cfg, "results", RUN, "--csv")
    assert code == 1, err
    records = list(csv.DictReader(io.StringIO(out, newline="")))
    assert [r["instance_id"] for r in records] == ["t1", "t2", "t3", "t4"]
    assert records[0]["metric.loss"] == "0.5"  # what is home still shows
    error = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(error) == 1 and error[0].startswith("error: results incomplete: t1: "), err
    assert "t3: node retired is no longer in" in error[0]
    assert "t4" not in error[0]  # queued: never on a node, nothing to fetch
    assert "Traceback" not in err


# --------------------------------------------------------------------------- end to end

METRICS_SCRIPT = """\
import json, os, sys
p = json.loads(os.environ["INFRA_PARAMS"])
out = os.path.join(os.environ["INFRA_RESULTS_DIR"], "metrics.json")
if "broken" in p:
    open(out, "w").write("{not json")
    sys.exit(3)
m = {"loss": 1.0 / p["depth"], "val": {"acc": p["lr"] * 2}, "note": p["name"] + ", done"}
with open(out, "w") as f:
    json.dump(m, f)
"""


@pytest.fixture()
def local_project(tmp_path: Path) -> Path:
    """A project whose only node is this machine (``local``)."""
    root = tmp_path / "proj"
    (root / "experiments").mkdir(parents=True)
    (root / "cluster_config.yaml").write_text(yaml.safe_dump({
        "nodes": [{"name": "local", "host": "localhost", "remote_work_dir": ".",
                   "ram_gb": 4.0, "max_instances": 3, "python_path": sys.executable}],
        "failover": {"auto_restart": False}, "deploy": {"source": "."}}))
    (root / "metrics.py").write_text(METRICS_SCRIPT)
    command = f"{shlex.quote(sys.executable)} metrics.py"
    for eid, params in (("t1", {"lr": 0.1, "depth": 2, "name": "a,b"}),
                        ("t2", {"lr": 0.25, "depth": 4, "name": 'say "hi"'}),
                        ("t3", {"lr": 0.5, "depth": 1, "name": "x", "broken": True})):
        (root / "experiments" / f"{eid}.json").write_text(json.dumps(
            {"experiment_id": eid, "command": command, "ram_gb": 0.5, "params": params,
             "max_retries": 0}))
    return root


def cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "infra.cli.main", *args], cwd=root,
                          capture_output=True, text=True, timeout=180,
                          env={**os.environ, "COLUMNS": "250"})


def test_results_table_of_a_real_run_on_the_local_node(local_project: Path) -> None:
    run = cli(local_project, "--config", "experiments", "--auto-place")
    assert "Traceback" not in run.stderr, run.stderr
    status = cli(local_project, "status", "--json", "--no-refresh")
    assert status.returncode == 0, status.stderr
    run_id = json.loads(status.stdout)["run_id"]
    states = {i["instance_id"]: i["state"] for i in json.loads(status.stdout)["instances"]}
    assert states == {"t1": "exited", "t2": "exited", "t3": "failed"}, run.stderr

    proc = cli(local_project, "results", run_id, "--csv")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("instance_id,template,task_index,param.broken,param.depth,")
    rows = {r["instance_id"]: r for r in csv.DictReader(io.StringIO(proc.stdout, newline=""))}
    assert list(rows) == ["t1", "t2", "t3"]
    t1, t2, t3 = rows.values()
    assert (t1["param.lr"], t1["param.name"], t1["metric.loss"], t1["metric.val.acc"],
            t1["metric.note"]) == ("0.1", "a,b", "0.5", "0.2", "a,b, done")
    assert (t2["param.name"], t2["metric.note"], t2["metric.loss"]) == \
        ('say "hi"', 'say "hi", done', "0.25")
    assert (t1["state"], t1["exit_code"], t1["attempts"], t1["node"]) == \
        ("exited", "0", "1", "local")
    assert float(t1["runtime_seconds"]) > 0
    assert (t3["state"], t3["exit_code"], t3["param.broken"], t3["metric.loss"]) == \
        ("failed", "3", "true", "")
    assert t3["metrics_error"].startswith("invalid JSON")

    proc = cli(local_project, "results", run_id, "--table", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert set(doc) == {"run_id", "results", "missing", "rows"}
    assert sorted(Path(f).name for f in doc["results"]["t1"]) == ["metrics.json"]
    j1, j2, j3 = doc["rows"]
    assert j1["params"] == {"depth": 2, "lr": 0.1, "name": "a,b"}
    assert j1["metrics"] == {"loss": 0.5, "note": "a,b, done", "val.acc": 0.2}
    assert j2["metrics"]["loss"] == 0.25 and j3["params"]["broken"] is True
    assert j3["exit_code"] == 3 and j3["metrics"] == {}

    proc = cli(local_project, "results", run_id, "--table")
    assert proc.returncode == 0, proc.stderr
    assert f"Results of {run_id}" in proc.stdout
    for text in ("param.name", "metric.val.acc", "a,b, done", "invalid JSON", "failed"):
        assert text in proc.stdout, text

    # --no-fetch asks no node: a file removed at home stays missing until a fetch
    home = local_project / "logs" / run_id / "t1" / "results" / "metrics.json"
    home.unlink()
    proc = cli(local_project, "results", run_id, "--no-fetch", "--csv")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    rows = {r["instance_id"]: r for r in csv.DictReader(io.StringIO(proc.stdout, newline=""))}
    assert rows["t1"]["metric.loss"] == "" and rows["t2"]["metric.loss"] == "0.25"
    assert not home.exists()
    proc = cli(local_project, "results", run_id, "--csv")
    assert proc.returncode == 0, proc.stderr
    rows = {r["instance_id"]: r for r in csv.DictReader(io.StringIO(proc.stdout, newline=""))}
    assert rows["t1"]["metric.loss"] == "0.5" and home.exists()
