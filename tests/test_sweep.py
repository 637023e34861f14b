"""Sweeps (issue 10, part A): expansion tables, placeholders through a real shell, every
validation error as one line from the real CLI, properties of the expansion, the store's
round trip of the new keys, the dry-run plan of a sweep larger than the free slots, and a
2x2 grid run for real on the local node."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infra.campaign.env import task_env
from infra.campaign.model import CampaignSpec, CpuBinding, DispatchMode, SuiteSpec
from infra.campaign.sweep import expand, expand_all
from infra.config.model import Cluster, ExperimentSpec
from infra.config.reader import display_path
from infra.config.specs import check_spec_set, parse_spec
from infra.errors import ConfigError
from infra.runner.supervisor_client import ID_PATTERN
from infra.state.codec import decode_spec, encode_spec
from tests.builders import assert_one_line_error, cluster, node, run_cli

REPO = Path(__file__).resolve().parent.parent


def lab(**top: Any) -> Cluster:
    return cluster(node("n1"), **top)


def template(sweep: Any, eid: str = "s", c: Cluster | None = None, **kw: Any) -> ExperimentSpec:
    doc: dict[str, Any] = {"experiment_id": eid, "command": "true", "sweep": sweep, **kw}
    return parse_spec(doc, Path(f"{eid}.json"), c or lab())


def tasks(sweep: Any, **kw: Any) -> tuple[ExperimentSpec, ...]:
    c = kw.pop("c", None) or lab()
    return expand(template(sweep, c=c, **kw), c.campaigns.max_tasks)


def points(ts: tuple[ExperimentSpec, ...]) -> list[dict[str, object]]:
    return [dict(t.params) for t in ts]


# --------------------------------------------------------------------------- expansion tables

EXPANSIONS: list[tuple[str, dict[str, Any], list[dict[str, object]]]] = [
    ("grid: file order, last key fastest",
     {"grid": {"b": [1, 2], "a": ["x", "y", "z"]}},
     [{"b": b, "a": a} for b in (1, 2) for a in ("x", "y", "z")]),
    ("cases: in list order",
     {"cases": [{"m": "small", "l": 2}, {"m": "big", "l": 8}]},
     [{"m": "small", "l": 2}, {"m": "big", "l": 8}]),
    ("zip: element-wise",
     {"zip": {"lr": [0.1, 0.01, 0.001], "bs": [32, 64, 128]}},
     [{"lr": 0.1, "bs": 32}, {"lr": 0.01, "bs": 64}, {"lr": 0.001, "bs": 128}]),
    ("repeat: seed 0..N-1",
     {"repeat": 3}, [{"seed": 0}, {"seed": 1}, {"seed": 2}]),
    ("grid x repeat: seed fastest",
     {"grid": {"a": [1, 2]}, "repeat": 2},
     [{"a": 1, "seed": 0}, {"a": 1, "seed": 1}, {"a": 2, "seed": 0}, {"a": 2, "seed": 1}]),
    ("cases x zip x grid x repeat, whatever order the file lists them in",
     {"repeat": 2, "grid": {"g": [True, False]}, "zip": {"z": ["p", "q"], "w": [1, 2]},
      "cases": [{"c": "one"}, {"c": "two"}]},
     [{"c": c, "z": z, "w": w, "g": g, "seed": s}
      for c in ("one", "two") for z, w in (("p", 1), ("q", 2)) for g in (True, False)
      for s in (0, 1)]),
]


@pytest.mark.parametrize(("title", "sweep", "expected"), EXPANSIONS, ids=[e[0] for e in EXPANSIONS])
def test_expansion_order(title: str, sweep: dict[str, Any],
                         expected: list[dict[str, object]]) -> None:
    ts = tasks(sweep)
    assert points(ts) == expected
    assert [t.experiment_id for t in ts] == [f"s.{i:04d}" for i in range(len(expected))]
    assert [t.task_index for t in ts] == list(range(len(expected)))
    assert all(t.template_id == "s" and t.sweep is None for t in ts)
    assert all(t.campaign == CampaignSpec(name="s", size=len(expected)) for t in ts)


def test_template_params_merge_and_the_task_wins() -> None:
    ts = tasks({"grid": {"lr": [0.5]}}, params={"lr": 1, "model": "resnet", "layers": [1, 2]})
    assert dict(ts[0].params) == {"lr": 0.5, "model": "resnet", "layers": [1, 2]}


def test_ids_grow_past_four_digits_only_beyond_ten_thousand() -> None:
    c = lab(campaigns={"max_tasks": 20000})
    big = tasks({"grid": {"a": list(range(101))}, "repeat": 100}, c=c)
    assert len(big) == 10100
    assert big[0].experiment_id == "s.00000" and big[-1].experiment_id == "s.10099"
    exact = tasks({"repeat": 10000}, c=c)
    assert exact[-1].experiment_id == "s.9999"


def test_a_spec_without_sweep_is_itself_and_keeps_its_braces() -> None:
    c = lab()
    spec = parse_spec({"experiment_id": "p", "command": "awk '{print $1}' f"}, Path("p.json"), c)
    assert expand(spec, 10) == (spec,)
    assert spec.command == "awk '{print $1}' f" and spec.campaign is None


# --------------------------------------------------------------------------- placeholders

NASTY = ["plain", "a b", "it's", 'say "hi"', "$HOME", "${HOME}", "`id`", "; rm -rf x", "",
         "back\\slash", "{braces}", "new\nline", "*"]


def sh_lines(command: str) -> list[str]:
    """What a real ``sh -c`` prints for the filled command, one element per argument."""
    out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True,
                         env={**os.environ, "HOME": "/home/someone"}, timeout=30)
    return out.stdout.split("\0")[:-1]


def test_command_values_are_shell_quoted_whatever_they_hold() -> None:
    ts = tasks({"grid": {"v": NASTY}}, command="printf '%s\\0' {v} x{v}y")
    for t, value in zip(ts, NASTY, strict=True):
        assert sh_lines(t.command) == [value, f"x{value}y"], t.command


def test_list_command_keeps_each_element_one_argument() -> None:
    ts = tasks({"grid": {"v": NASTY}}, command=["printf", "%s\\0", "--v={v}", "{v}", "$HOME {{x}}"])
    for t, value in zip(ts, NASTY, strict=True):
        assert sh_lines(t.command) == [f"--v={value}", value, "$HOME {x}"], t.command


def test_braces_shell_variables_and_builtins() -> None:
    ts = tasks({"grid": {"n": [3]}},
               command='printf "%s\\0" {{n}} {{{n}}} ${HOME} "$HOME" {task_index} {task_id} '
                       '${NOPE_UNSET:-d{n}}')
    assert sh_lines(ts[0].command) == ["{n}", "{3}", "/home/someone", "/home/someone", "0",
                                       "s.0000", "d{n}"]
    assert ts[0].command.endswith(" 0 s.0000 ${NOPE_UNSET:-d{n}}")  # ${...} copied as written


@pytest.mark.parametrize(("value", "text"), [
    (True, "true"), (False, "false"), (3, "3"), (0.1, "0.1"), (1e-05, "1e-05"), (-2.5, "-2.5"),
    ("0.10", "0.10"),
])
def test_str_form_of_values(value: object, text: str) -> None:
    ts = tasks({"grid": {"v": [value]}}, command="echo {v}", env={"V": "<{v}>"},
               results=["out/{v}/r.txt"])
    assert ts[0].command == f"echo {text}"
    assert dict(ts[0].env) == {"V": f"<{text}>"}
    assert ts[0].results == (f"out/{text}/r.txt",)


def test_env_and_results_are_filled_raw() -> None:
    ts = tasks({"cases": [{"name": "a b", "q": "it's"}]}, command="true",
               env={"NAME": "{name}", "Q": "{q}", "KEEP": "$HOME {{x}}"},
               results=["out/{name}/{task_id}/*"])
    assert dict(ts[0].env) == {"NAME": "a b", "Q": "it's", "KEEP": "$HOME {x}"}
    assert ts[0].results == ("out/a b/s.0000/*",)


def test_task_env_gives_params_and_index() -> None:
    ts = tasks({"grid": {"lr": [0.1, 0.2]}}, params={"model": "m"}, env={"A": "{lr}"})
    env = task_env(ts[1])
    assert json.loads(env["INFRA_PARAMS"]) == {"lr": 0.2, "model": "m"}
    assert env["INFRA_TASK_INDEX"] == "1"
    assert env["A"] == "0.2" and env["PYTHONUNBUFFERED"] == "1"
    plain = parse_spec({"experiment_id": "p", "command": "true"}, Path("p.json"), lab())
    assert task_env(plain) == {"PYTHONUNBUFFERED": "1"}


# --------------------------------------------------------------------------- campaign keys

def test_campaign_keys_and_suite() -> None:
    spec = template({"repeat": 4}, max_parallel=2, priority=5, dispatch="all", fail_fast=True,
                    after=["prep"], after_any=["probe"],
                    suite={"setup": ["sh", "prep.sh", "a b"], "cleanup": "rm -rf tmp",
                           "workers": 3, "cpu_binding": "exclusive", "cores": [0, 2, 4],
                           "prefetch": 0})
    assert spec.campaign == CampaignSpec(
        name="s", size=4, max_parallel=2, priority=5, dispatch=DispatchMode.ALL, fail_fast=True,
        suite=SuiteSpec(setup="sh prep.sh 'a b'", cleanup="rm -rf tmp", workers=3,
                        cpu_binding=CpuBinding.EXCLUSIVE, cores=(0, 2, 4), prefetch=0))
    assert spec.priority == 5 and spec.after == ("prep",) and spec.after_any == ("probe",)
    ts = expand(spec, 10)
    assert all(t.after == ("prep",) and t.after_any == ("probe",) and t.priority == 5
               for t in ts)


def test_a_suite_or_queue_key_alone_makes_a_campaign_of_one() -> None:
    c = lab()
    for extra in ({"suite": {}}, {"max_parallel": 1}, {"dispatch": "prefetch"}):
        spec = parse_spec({"experiment_id": "one", "command": "true", **extra},
                          Path("one.json"), c)
        assert spec.campaign is not None and spec.campaign.size == 1, extra
        assert spec.campaign.suite == (SuiteSpec() if "suite" in extra else None)
        assert expand(spec, 10) == (spec,) and spec.task_index is None
    plain = parse_spec({"experiment_id": "p", "command": "true", "priority": -3,
                        "fail_fast": True}, Path("p.json"), c)
    assert plain.campaign is None and plain.priority == -3


def test_spec_set_accepts_dependencies_and_expands_affinity_to_tasks() -> None:
    c = lab()
    sweep = template({"repeat": 3}, eid="train", c=c, after=["prep"])
    prep = parse_spec({"experiment_id": "prep", "command": "true"}, Path("prep.json"), c)
    report = parse_spec({"experiment_id": "report", "command": "true",
                         "after_any": ["train"], "anti_affinity": ["train", "prep"]},
                        Path("report.json"), c)
    tail = parse_spec({"experiment_id": "tail", "command": "true", "after": ["train.0002"]},
                      Path("tail.json"), c)
    out = {s.experiment_id: s for s in check_spec_set(expand_all([sweep, prep, report, tail],
                                                                 100))}
    assert sorted(out) == ["prep", "report", "tail", "train.0000", "train.0001", "train.0002"]
    assert out["report"].anti_affinity == ("train.0000", "train.0001", "train.0002", "prep")
    assert out["report"].after_any == ("train",)  # the queue resolves a sweep's name itself
    assert out["train.0001"].after == ("prep",)


def test_check_spec_set_refuses_an_unexpanded_sweep() -> None:
    with pytest.raises(ValueError, match="expanded"):
        check_spec_set([template({"repeat": 2})])


# --------------------------------------------------------------------------- one-line errors

def write(tmp: Path, name: str, doc: Any) -> Path:
    p = tmp / name
    p.write_text(json.dumps(doc))
    return p


def write_cluster(tmp: Path, **top: Any) -> Path:
    p = tmp / "cluster.yaml"
    p.write_text(yaml.safe_dump({"nodes": [{"name": "n1", "host": "localhost", "ram_gb": 8.0,
                                            "max_instances": 2, "remote_work_dir": "."}],
                                 **top}))
    return p


SWEEP_ERRORS: list[tuple[dict[str, Any], str, str]] = [
    ({"sweep": {}}, "sweep", "needs at least one of grid, cases, zip, repeat"),
    ({"sweep": None}, "sweep", "needs at least one of grid, cases, zip, repeat"),
    ({"sweep": [1]}, "sweep", "expected a mapping, got list"),
    ({"sweep": {"grids": {"a": [1]}}}, "sweep.grids", "unknown key"),
    ({"sweep": {"grid": {"a": []}}}, "sweep.grid.a", "expected a non-empty list of values, "
                                                     "got an empty list"),
    ({"sweep": {"grid": {"a": 3}}}, "sweep.grid.a", "expected a non-empty list of values, got int"),
    ({"sweep": {"grid": {}}}, "sweep.grid", "must name at least one parameter"),
    ({"sweep": {"grid": {"a": [1, [2]]}}}, "sweep.grid.a[1]",
     "expected a string, number or boolean, got a list"),
    ({"sweep": {"grid": {"a": [None]}}}, "sweep.grid.a[0]",
     "expected a string, number or boolean, got null"),
    ({"sweep": {"grid": {"a": [{"x": 1}]}}}, "sweep.grid.a[0]", "got a mapping"),
    ({"sweep": {"grid": {"a": [1, 2, 1]}}}, "sweep.grid.a[2]",
     "repeats a[0] (1); use repeat for repeated runs"),
    ({"sweep": {"grid": {"2x": [1]}}}, "sweep.grid.2x", "'2x' is not a valid parameter name"),
    ({"sweep": {"grid": {"task_id": [1]}}}, "sweep.grid.task_id",
     "'task_id' is a built-in placeholder"),
    ({"sweep": {"cases": []}}, "sweep.cases", "expected a non-empty list of parameter mappings, "
                                              "got an empty list"),
    ({"sweep": {"cases": {"a": 1}}}, "sweep.cases", "got a mapping"),
    ({"sweep": {"cases": [{}]}}, "sweep.cases[0]", "must set at least one parameter"),
    ({"sweep": {"cases": [[1]]}}, "sweep.cases[0]", "expected a mapping, got list"),
    ({"sweep": {"cases": [{"a": 1, "b": 2}, {"a": 2, "c": 3}]}}, "sweep.cases[1]",
     "sets a, c but cases[0] sets a, b; every case must set the same parameters"),
    ({"sweep": {"cases": [{"a": 1}, {"a": 1}]}}, "sweep.cases[1]", "repeats cases[0]"),
    ({"sweep": {"cases": [{"a": [1]}]}}, "sweep.cases[0].a", "got a list"),
    ({"sweep": {"zip": {"a": [1, 2], "b": [1, 2, 3]}}}, "sweep.zip.b",
     "has 3 values but zip.a has 2; zip lists must all be the same length"),
    ({"sweep": {"zip": {"a": [1, 1], "b": [2, 2]}}}, "sweep.zip",
     "entry 1 of the lists repeats entry 0"),
    ({"sweep": {"grid": {"a": [1]}, "zip": {"a": [1]}}}, "sweep.grid.a",
     "duplicate parameter 'a' (also set by sweep.zip.a)"),
    ({"sweep": {"cases": [{"lr": 1}], "grid": {"lr": [2]}}}, "sweep.grid.lr",
     "duplicate parameter 'lr' (also set by sweep.cases[0].lr)"),
    ({"sweep": {"grid": {"seed": [1]}, "repeat": 2}}, "sweep.repeat",
     "adds the parameter 'seed', already set by sweep.grid.seed"),
    ({"sweep": {"repeat": 0}}, "sweep.repeat", "must be at least 1"),
    ({"sweep": {"repeat": True}}, "sweep.repeat", "expected an integer"),
    ({"sweep": {"grid": {"a": [1, 2, 3, 4]}, "repeat": 3}}, "sweep",
     "expands to 12 tasks, more than the limit of 10 (campaigns.max_tasks in the cluster config: "
     "raise it there or split the sweep)"),
    ({"command": "run --lr {lr}", "sweep": {"grid": {"a": [1]}, "repeat": 2}}, "command",
     "unknown placeholder {lr}; sweep parameters: a, seed (built-ins: task_index, task_id)"),
    ({"command": "run {p}", "params": {"p": [1, 2]}, "sweep": {"repeat": 2}}, "command",
     "placeholder {p} names a parameter that is not a string, number or boolean"),
    ({"env": {"X": "{nope}"}, "sweep": {"repeat": 2}}, "env.X", "unknown placeholder {nope}"),
    ({"results": ["out/{nope}"], "sweep": {"repeat": 2}}, "results[0]",
     "unknown placeholder {nope}"),
    ({"command": "awk '{print $1}'", "sweep": {"repeat": 2}}, "command",
     "a lone '{' at \"{print $1}'\": write {{ for a literal brace, {name} for a sweep parameter"),
    ({"command": "echo }", "sweep": {"repeat": 2}}, "command", "a lone '}'"),
    ({"command": ["echo", "{a"], "sweep": {"repeat": 2}}, "command[1]", "a lone '{'"),
    ({"results": ["{d}/x"], "sweep": {"grid": {"d": ["ok", ".."]}}}, "results[0]",
     "for task s.0001: must stay inside the working directory (no '..'), got '../x'"),
    ({"results": ["{d}"], "sweep": {"grid": {"d": ["/etc"]}}}, "results[0]",
     "for task s.0000: must be relative"),
    ({"experiment_id": "x" * 124, "sweep": {"repeat": 2}}, "experiment_id",
     "a sweep's tasks are named " + "x" * 124 + ".NNNN:"),
    ({"experiment_id": "s.", "sweep": {"repeat": 2}}, "experiment_id", "must not contain '..'"),
    ({"job_type": "sysbatch", "sweep": {"repeat": 2}}, "sweep",
     "a sysbatch job runs one copy per node and cannot have a sweep"),
    ({"max_parallel": 0}, "max_parallel", "must be at least 1"),
    ({"priority": "high"}, "priority", "expected an integer, got string"),
    ({"priority": 10**7}, "priority", "must be at most 1e+06"),
    ({"dispatch": "eager"}, "dispatch", "must be one of prefetch, all; got 'eager'"),
    ({"fail_fast": "yes"}, "fail_fast", "expected true or false"),
    ({"suite": []}, "suite", "expected a mapping, got list"),
    ({"suite": {"workers": 0}}, "suite.workers", "must be at least 1"),
    ({"suite": {"cpu_binding": "pinned"}}, "suite.cpu_binding",
     "must be one of round_robin, exclusive, shared; got 'pinned'"),
    ({"suite": {"cores": [0, -1]}}, "suite.cores[1]", "expected a core number 0..4095"),
    ({"suite": {"cores": [1, 1]}}, "suite.cores[1]", "lists core 1 twice"),
    ({"suite": {"cores": 3}}, "suite.cores", "expected a list of core numbers"),
    ({"suite": {"cpu_binding": "exclusive", "cores": [0, 1], "workers": 3}}, "suite.workers",
     "3 workers cannot each have a core of their own: cores lists 2"),
    ({"suite": {"prefetch": -1}}, "suite.prefetch", "must be at least 0"),
    ({"suite": {"setup": ""}}, "suite.setup", "expected a non-empty string or a list of strings"),
    ({"suite": {"teardown": "x"}}, "suite.teardown", "unknown key"),
    ({"after": ["s"]}, "after[0]", "lists the experiment itself ('s')"),
    ({"after": ["a", "a"]}, "after[1]", "lists 'a' twice"),
    ({"after": ["../x"]}, "after[0]", "is not a safe id"),
    ({"after": "prep", "after_any": ["prep"]}, "after_any[0]", "'prep' is also in after"),
    ({"after_any": [3]}, "after_any[0]", "expected a non-empty string, got integer"),
]


@pytest.mark.parametrize(("patch", "key", "reason"), SWEEP_ERRORS,
                         ids=[f"{e[1]}:{e[2][:30]}" for e in SWEEP_ERRORS])
def test_spec_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  patch: dict[str, Any], key: str, reason: str) -> None:
    config = write_cluster(tmp_path, campaigns={"max_tasks": 10})
    spec = write(tmp_path, "s.json", {"experiment_id": "s", "command": "true", **patch})
    code, out, err = run_cli(capsys, "--cluster-config", str(config), "--config", str(spec),
                             "--validate-config")
    assert_one_line_error(code, err, f"{spec}: {key}: ", reason)
    assert "OK" not in out


SET_ERRORS: list[tuple[list[dict[str, Any]], str, str]] = [
    ([{"experiment_id": "a", "after": ["ghost"]}], "after[0]",
     "unknown id 'ghost'; ids in this run: a"),
    ([{"experiment_id": "a", "after_any": ["ghost"]},
      {"experiment_id": "t", "sweep": {"repeat": 2}}], "after_any[0]",
     "unknown id 'ghost'; ids in this run: a, t (tasks t.0000..t.0001)"),
    ([{"experiment_id": "a", "after": ["b"]}, {"experiment_id": "b", "after_any": ["a"]}],
     "after_any", "dependency cycle: a -> b -> a"),
    ([{"experiment_id": "a", "after": ["b"]}, {"experiment_id": "b", "after": ["c"]},
      {"experiment_id": "c", "after": ["a"]}], "after", "dependency cycle: a -> b -> c -> a"),
    ([{"experiment_id": "t", "after": ["t.0001"], "sweep": {"repeat": 2}}], "after",
     "dependency cycle: t -> t.0001 (a task of t)"),
    ([{"experiment_id": "t", "after": ["u"], "sweep": {"repeat": 2}},
      {"experiment_id": "u", "after": ["t.0000"], "sweep": {"repeat": 3}}], "after",
     "dependency cycle: t -> u -> t.0000 (a task of t)"),
    ([{"experiment_id": "t", "sweep": {"repeat": 2}}, {"experiment_id": "t.0001"}],
     "experiment_id", "duplicate instance id 't.0001'"),
    ([{"experiment_id": "t", "sweep": {"repeat": 2}}, {"experiment_id": "t"}],
     "experiment_id", "duplicate"),
    ([{"experiment_id": "t", "anti_affinity": ["t.0001"], "sweep": {"repeat": 2}}],
     "anti_affinity[0]", "names 't.0001', one of this sweep's own tasks"),
    ([{"experiment_id": "a", "affinity": ["ghost"]},
      {"experiment_id": "t", "sweep": {"repeat": 300}}], "affinity[0]",
     "unknown instance id 'ghost'; instances in this run: a, t (tasks t.0000..t.0299)"),
]


@pytest.mark.parametrize(("docs", "key", "reason"), SET_ERRORS,
                         ids=[f"{e[1]}:{e[2][:30]}" for e in SET_ERRORS])
def test_spec_set_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      docs: list[dict[str, Any]], key: str, reason: str) -> None:
    config = write_cluster(tmp_path)
    paths = [write(tmp_path, f"f{i}.json", {"command": "true", **d}) for i, d in enumerate(docs)]
    code, _, err = run_cli(capsys, "--cluster-config", str(config),
                           *itertools.chain.from_iterable(("--config", str(p)) for p in paths),
                           "--validate-config")
    assert_one_line_error(code, err, f".json: {key}: ", reason)


@pytest.mark.parametrize(("campaigns", "key", "reason"), [
    ({"max_tasks": 0}, "campaigns.max_tasks", "must be at least 1"),
    ({"max_tasks": 2_000_000}, "campaigns.max_tasks", "must be at most 1e+06"),
    ({"max_tasks": "many"}, "campaigns.max_tasks", "expected an integer"),
    ({"max_task": 5}, "campaigns.max_task", "unknown key"),
])
def test_topology_campaigns_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   campaigns: dict[str, Any], key: str, reason: str) -> None:
    config = write_cluster(tmp_path, campaigns=campaigns)
    code, _, err = run_cli(capsys, "--cluster-config", str(config), "--validate-config")
    assert_one_line_error(code, err, f"{config}: {key}: ", reason)


def test_default_limit_is_ten_thousand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_cluster(tmp_path)
    spec = write(tmp_path, "big.json", {"experiment_id": "big", "command": "true",
                                        "sweep": {"grid": {"a": list(range(101))}, "repeat": 100}})
    code, _, err = run_cli(capsys, "--cluster-config", str(config), "--config", str(spec),
                           "--validate-config")
    assert_one_line_error(code, err, "sweep: expands to 10100 tasks, more than the limit of 10000")


def test_validate_lists_a_sweep_as_one_row(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    config = write_cluster(tmp_path)
    spec = write(tmp_path, "g.json", {"experiment_id": "g", "command": "true",
                                      "sweep": {"grid": {"a": [1, 2, 3], "b": [1, 2]}}})
    code, out, err = run_cli(capsys, "--cluster-config", str(config), "--config", str(spec),
                             "--validate-config", "--json")
    assert code == 0, err
    assert json.loads(out)["experiments"] == [f"g.{i:04d}" for i in range(6)]
    code, out, err = run_cli(capsys, "--cluster-config", str(config), "--config", str(spec),
                             "--validate-config")
    assert code == 0, err
    assert "g (6 tasks: g.0000..g.0005)" in out
    assert "1 experiment specs (6 instances, sweeps expanded)" in out


def test_placement_pins_name_tasks_not_the_sweep(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    config = write_cluster(tmp_path)
    spec = write(tmp_path, "g.json", {"experiment_id": "g", "command": "true",
                                      "sweep": {"repeat": 500}})
    base = ["--cluster-config", str(config), "--config", str(spec), "--dry-run"]
    code, out, err = run_cli(capsys, *base, "--placement", "g:n1", "--json")
    assert code == 0, err  # a sweep's name pins all its tasks (they wait in the queue)
    assert len(json.loads(out)["queued"]) == 500
    code, _, err = run_cli(capsys, *base, "--placement", "h:n1")
    assert_one_line_error(code, err, "--placement: unknown instance id 'h'; instances: "
                          "g (tasks g.0000..g.0499)")
    code, out, err = run_cli(capsys, *base, "--placement", "g.0007:n1", "--auto-place", "--json")
    assert code == 0, err
    assert "g.0007" in json.loads(out)["queued"]


# --------------------------------------------------------------------------- dry run

def test_dry_run_of_a_sweep_larger_than_the_free_slots(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    config = write_cluster(tmp_path)  # one node, 2 slots
    spec = write(tmp_path, "g.json", {"experiment_id": "g", "command": "true", "ram_gb": 1,
                                      "sweep": {"grid": {"a": list(range(8)), "b": list(range(5))}}})
    code, out, err = run_cli(capsys, "--cluster-config", str(config), "--config", str(spec),
                             "--auto-place", "--dry-run")
    assert code == 0, err
    assert "queued: g: 40 task(s); dispatch prefetch" in " ".join(out.split())
    assert "cannot place" not in out
    code, out, err = run_cli(capsys, "--cluster-config", str(config), "--config", str(spec),
                             "--auto-place", "--dry-run", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["ok"] and doc["unplaced"] == [] and len(doc["queued"]) == 40
    assert doc["placements"] == {}
    # a task no node could ever take is refused at submit, naming why per node
    huge = write(tmp_path, "h.json", {"experiment_id": "h", "command": "true", "ram_gb": 64,
                                      "sweep": {"repeat": 3}})
    code, _, err = run_cli(capsys, "--cluster-config", str(config), "--config", str(huge),
                           "--auto-place", "--dry-run")
    assert_one_line_error(code, err, "h can never run here (n1: not enough RAM: needs 64 GB", exit_code=3)


# --------------------------------------------------------------------------- store round trip

def test_store_round_trips_the_new_keys() -> None:
    c = lab()
    spec = template({"grid": {"z": [1, 2], "a": ["x", "y"]}, "cases": [{"k": True}],
                     "zip": {"q": [0.5]}, "repeat": 2}, eid="tpl", c=c,
                    after=["p"], after_any=["q"], priority=-4, max_parallel=3, dispatch="all",
                    fail_fast=True, params={"base": [1, {"n": 2}]},
                    suite={"setup": "sh s.sh", "workers": 2, "cpu_binding": "shared",
                           "cores": [3, 1], "prefetch": 5})
    back = decode_spec(encode_spec(spec))
    assert back == spec and back.params == spec.params
    # the grid keeps its file order through the store's sorted-key JSON
    assert [t.params for t in expand(back, 100)] == [t.params for t in expand(spec, 100)]
    for task in expand(spec, 100):
        again = decode_spec(encode_spec(task))
        assert again == task and again.params == task.params and again.task_index is not None
    plain = parse_spec({"experiment_id": "p", "command": "true"}, Path("p.json"), c)
    doc = json.loads(encode_spec(plain))
    assert not {"campaign", "task_index", "sweep"} & set(doc)  # a plain spec's doc as before
    assert decode_spec(encode_spec(plain)) == plain


# --------------------------------------------------------------------------- properties

SCALARS = st.one_of(st.integers(-5, 5), st.booleans(), st.floats(-2, 2, allow_nan=False),
                    st.text("ab '$\"{}", max_size=4))
NAMES = st.sampled_from(["a", "b", "c", "lr", "bs", "m", "x_1", "_y"])


def distinct(values: list[Any]) -> list[Any]:
    seen: dict[str, Any] = {}
    for v in values:
        seen.setdefault(json.dumps(v), v)
    return list(seen.values())


@st.composite
def sweeps(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(NAMES, min_size=1, max_size=5, unique=True))
    split = sorted(draw(st.lists(st.integers(0, len(names)), min_size=2, max_size=2)))
    case_names, zip_names, grid_names = names[:split[0]], names[split[0]:split[1]], names[split[1]:]
    sweep: dict[str, Any] = {}
    if grid_names:
        sweep["grid"] = {n: distinct(draw(st.lists(SCALARS, min_size=1, max_size=3)))
                         for n in grid_names}
    if zip_names:
        rows = distinct(draw(st.lists(st.tuples(*[SCALARS] * len(zip_names)), min_size=1,
                                      max_size=3)))
        sweep["zip"] = {n: [r[i] for r in rows] for i, n in enumerate(zip_names)}
    if case_names:
        cases = distinct(draw(st.lists(st.tuples(*[SCALARS] * len(case_names)), min_size=1,
                                       max_size=3)))
        sweep["cases"] = [dict(zip(case_names, c, strict=True)) for c in cases]
    if draw(st.booleans()) or not sweep:
        sweep["repeat"] = draw(st.integers(1, 3))
    return sweep


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sweep=sweeps(), name=st.sampled_from(["t", "train-v2", "A.b_c", "x" * 120]))
def test_expansion_properties(sweep: dict[str, Any], name: str) -> None:
    c = lab()
    spec = template(sweep, eid=name, c=c,
                    command="run " + " ".join(f"{{{n}}}" for n in spec_names(sweep)))
    ts = expand(spec, c.campaigns.max_tasks)
    sizes = [len(sweep.get("cases") or [0])]
    sizes += [len(next(iter(sweep["zip"].values())))] if "zip" in sweep else []
    sizes += [len(v) for v in (sweep.get("grid") or {}).values()]
    sizes += [sweep.get("repeat") or 1]
    expected_size = 1
    for n in sizes:
        expected_size *= n
    assert len(ts) == expected_size == spec.sweep.size  # type: ignore[union-attr]
    ids = [t.experiment_id for t in ts]
    assert len(set(ids)) == len(ids) and ids == sorted(ids)
    assert all(ID_PATTERN.match(i) and ".." not in i and "/" not in i for i in ids)
    combos = [json.dumps(sorted(t.params), sort_keys=True) for t in ts]
    assert len(set(combos)) == len(combos)  # every combination once
    want = {json.dumps(sorted(p), sort_keys=True) for p in cross(sweep)}
    assert set(combos) == want
    for again in (expand(spec, c.campaigns.max_tasks),  # deterministic
                  expand(template(sweep, eid=name, c=c, command=spec.command), 10**6)):
        assert again == ts and [t.params for t in again] == [t.params for t in ts]
        assert [t.command for t in again] == [t.command for t in ts]


def spec_names(sweep: dict[str, Any]) -> list[str]:
    names = [*(sweep.get("cases") or [{}])[0], *(sweep.get("zip") or {}),
             *(sweep.get("grid") or {})]
    return names + (["seed"] if "repeat" in sweep else [])


def cross(sweep: dict[str, Any]) -> Iterator[list[tuple[str, Any]]]:
    """The expected parameter sets, built independently of the expansion's order."""
    cases = [list(c.items()) for c in sweep.get("cases") or [{}]]
    z = sweep.get("zip") or {}
    rows = [list(zip(z, vals, strict=True)) for vals in zip(*z.values(), strict=True)] or [[]]
    grid = [list(zip(sweep.get("grid") or {}, vals, strict=True))
            for vals in itertools.product(*(sweep.get("grid") or {}).values())]
    seeds = [[("seed", s)] for s in range(sweep["repeat"])] if "repeat" in sweep else [[]]
    for a, b, g, s in itertools.product(cases, rows, grid, seeds):
        yield a + b + g + s


# --------------------------------------------------------------------------- end to end

@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """A project whose only node is the local ``host`` (local transport, 4 slots)."""
    root = tmp_path / "proj"
    (root / "experiments").mkdir(parents=True)
    config = {"nodes": [{"name": "host", "host": "localhost", "remote_work_dir": ".",
                         "ram_gb": 4.0, "max_instances": 4, "python_path": sys.executable}],
              "failover": {"auto_restart": False}, "deploy": {"source": "."}}
    (root / "cluster_config.yaml").write_text(yaml.safe_dump(config))
    return root


def test_a_grid_runs_for_real_on_the_local_node(project: Path) -> None:
    doc = {"experiment_id": "grid",
           "command": "mkdir -p out && printf '%s\\n' \"$INFRA_TASK_INDEX\" \"$INFRA_PARAMS\" "
                      "{label} \"$LR\" > out/{task_id}.txt",
           "env": {"LR": "lr={lr}"}, "ram_gb": 0.5, "recover": "none",
           "results": ["out/{task_id}.txt"],
           "params": {"model": "tiny"},
           "sweep": {"grid": {"lr": [0.1, 0.01], "label": ["a b", "it's $HOME"]}}}
    spec = project / "experiments" / "grid.json"
    spec.write_text(json.dumps(doc))
    proc = subprocess.run([sys.executable, "-m", "infra.cli.main", "--config", str(spec),
                           "--auto-place", "--json"], cwd=project, capture_output=True,
                          text=True, timeout=240, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    run_id = out["run_id"]
    insts = {i["instance_id"]: i for i in out["instances"]}
    assert sorted(insts) == ["grid.0000", "grid.0001", "grid.0002", "grid.0003"]
    expected = [(lr, label) for lr in (0.1, 0.01) for label in ("a b", "it's $HOME")]
    for index, (lr, label) in enumerate(expected):
        tid = f"grid.{index:04d}"
        assert insts[tid]["state"] == "exited" and insts[tid]["exit_code"] == 0, insts[tid]
        written = (project / "out" / f"{tid}.txt").read_text().splitlines()
        assert written[0] == str(index)
        assert json.loads(written[1]) == {"lr": lr, "label": label, "model": "tiny"}
        assert written[2:] == [label, f"lr={lr}"]
        fetched = project / "logs" / run_id / tid / "out" / f"{tid}.txt"
        assert fetched.read_text().splitlines() == written
    shutil.rmtree(project / "out")


def test_sweep_errors_name_the_template_file_not_a_task() -> None:
    """Errors found while expanding name the spec file the sweep came from."""
    c = lab()
    spec = template({"grid": {"d": ["ok", "/abs"]}}, results=["{d}"], c=c)
    with pytest.raises(ConfigError) as info:
        expand(spec, 10)
    assert info.value.file == display_path(spec.source) and info.value.key == "results[0]"
    assert expand(replace(spec, results=()), 10)[1].results == ()
