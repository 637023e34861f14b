"""Hostile documents and arguments through the real CLI: exit 2 (or 0 when valid), exactly one
``error:`` line naming the file/key or the argument, never a traceback, each case within
seconds (hypothesis ``deadline``, a per-example bound, not a timing assertion on the suite).

Mutations of valid topology and spec documents (wrong types, huge numbers, nan/inf, deep
nesting, YAML aliases, JSON duplicate keys, unicode, empty strings) and hostile option values
run in-process through ``tests/builders.py: run_cli``; a few run as real subprocesses.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from rich.console import Console

from infra.cli import views
from infra.config.model import ExperimentSpec
from infra.config.topology import parse_cluster
from infra.probe import NodeFacts, NodeHealth, NodeStatus
from infra.state import Store
from tests.builders import assert_one_line_error, run_cli

REPO = Path(__file__).resolve().parent.parent
PROBE_FIXTURES = Path(__file__).parent / "fixtures" / "probe"

FUZZ = settings(max_examples=150, deadline=timedelta(seconds=10), database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])

CLUSTER: dict[str, Any] = {
    "cluster": {"name": "lab"},
    "nodes": [{"name": "n1", "host": "localhost", "ram_gb": 8.0, "max_instances": 2,
               "cpu_cores": 4, "remote_work_dir": ".", "tags": ["cpu", "x86"],
               "attributes": {"rack": "a1", "zones": ["z1"]}}],
    "defaults": {"ram_gb": 1.0, "cpu_cores": 1},
    "health_check": {"interval_seconds": 30, "timeout_seconds": 10, "keepalive_seconds": 5,
                     "keepalive_count_max": 3, "reconnect_attempts": 3,
                     "disconnected_grace_seconds": 60, "lease_seconds": 30},
    "failover": {"enabled": True, "max_retries": 2, "retry_delay_seconds": 5,
                 "fence_timeout_seconds": 60},
    "logging": {"log_dir": "logs", "level": "INFO"},
    "deploy": {"exclude": [".git"], "max_deletes": 100},
}

SPEC: dict[str, Any] = {
    "experiment_id": "a",
    "command": ["python3", "train.py", "--lr", "0.1"],
    "workdir": "sub",
    "env": {"SEED": 1, "MODE": "fast"},
    "ram_gb": 1.0,
    "cpu_cores": 1,
    "max_retries": 2,
    "results": ["out/*.csv"],
    "params": {"lr": 0.1, "layers": [1, 2, 3], "name": "run"},
    "resources": {"cores": 1, "memory_mb": 1024, "devices": []},
    "constraints": [{"attribute": "rack", "operator": "=", "value": "a1"}],
    "description": "fuzzed",
}

HUGE_INTS = st.one_of(st.integers(min_value=10**18, max_value=10**400),
                      st.integers(min_value=-(10**400), max_value=-(10**18)))
ODD_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, 1e30, -1e30, 1e308, 5e-324,
                              86401.0, 1e15 + 1])
ODD_TEXT = st.one_of(st.just(""), st.just(" "), st.just("~/x"), st.just("a/~/b"),
                     st.just("\x00"), st.just("\n"), st.just("-rf"), st.just("a" * 300),
                     st.text(max_size=12))
HOSTILE = st.one_of(
    HUGE_INTS, ODD_FLOATS, ODD_TEXT, st.none(), st.booleans(),
    st.integers(min_value=-5, max_value=5),
    st.lists(st.one_of(ODD_TEXT, st.integers(-2, 2), st.none()), max_size=4),
    st.dictionaries(ODD_TEXT, st.one_of(ODD_TEXT, HUGE_INTS, ODD_FLOATS), max_size=3),
)


# --------------------------------------------------------------------------- helpers

def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path inside a document (mappings and lists), the containers included."""
    out: list[tuple[Any, ...]] = []
    items: list[tuple[Any, Any]] = (list(doc.items()) if isinstance(doc, dict)
                                    else list(enumerate(doc)) if isinstance(doc, list) else [])
    for key, value in items:
        out.append((*prefix, key))
        out.extend(_paths(value, (*prefix, key)))
    return out


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> None:
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


def _dump(doc: Any, suffix: str) -> str:
    """JSON (nan and inf as NaN/Infinity tokens) or YAML; YAML falls back to JSON text
    (also YAML) when the emitter cannot write a value (a lone surrogate)."""
    if suffix == ".json":
        return json.dumps(doc)
    try:
        return yaml.safe_dump(doc, allow_unicode=True)
    except yaml.YAMLError:
        return json.dumps(doc)


def _validate(capsys: pytest.CaptureFixture[str], cluster_text: str, cluster_suffix: str,
              spec_text: str | None, spec_suffix: str) -> tuple[int, str, str, Path, Path]:
    """Write the documents to a fresh directory and run ``--validate-config`` on them."""
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        cluster = Path(tmp) / f"cluster{cluster_suffix}"
        cluster.write_text(cluster_text, encoding="utf-8", errors="surrogatepass")
        spec = Path(tmp) / f"spec{spec_suffix}"
        args = ["--cluster-config", str(cluster), "--validate-config"]
        if spec_text is not None:
            spec.write_text(spec_text, encoding="utf-8", errors="surrogatepass")
            args += ["--config", str(spec)]
        code, out, err = run_cli(capsys, *args)
        return code, out, err, cluster, spec


def _check_outcome(code: int, err: str, *names: str) -> None:
    """0 with no error, or 2 with exactly one ``error:`` line naming one of ``names``."""
    assert "Traceback" not in err, err
    if code == 0:
        assert "error:" not in err, err
        return
    assert_one_line_error(code, err)
    line = err.strip()
    assert any(n in line for n in names), (names, line)


# --------------------------------------------------------------------------- document fuzz

@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_the_base_documents_are_valid(capsys: pytest.CaptureFixture[str], suffix: str) -> None:
    code, _out, err, _c, _s = _validate(capsys, _dump(CLUSTER, suffix), suffix,
                                        _dump(SPEC, suffix), suffix)
    assert code == 0, err


@settings(FUZZ, max_examples=400)
@given(data=st.data(), value=HOSTILE, suffix=st.sampled_from([".yaml", ".json"]))
def test_fuzzed_topology_documents(capsys: pytest.CaptureFixture[str], data: st.DataObject,
                                   value: Any, suffix: str) -> None:
    """A topology with one value replaced by a hostile one: valid, or one line naming it."""
    doc = copy.deepcopy(CLUSTER)
    path = data.draw(st.sampled_from(_paths(doc)))
    _set(doc, path, value)
    code, _out, err, cluster, _spec = _validate(capsys, _dump(doc, suffix), suffix, None, "")
    _check_outcome(code, err, cluster.name)


BOUNDED_KEYS = ([("health_check", k) for k in ("interval_seconds", "timeout_seconds",
                                               "keepalive_seconds", "lease_seconds",
                                               "disconnected_grace_seconds",
                                               "keepalive_count_max", "reconnect_attempts")]
                + [("failover", k) for k in ("retry_delay_seconds", "fence_timeout_seconds",
                                             "max_retries")]
                + [("nodes", 0, k) for k in ("ram_gb", "cpu_cores", "max_instances")])


@FUZZ
@example(path=("health_check", "keepalive_seconds"), value=1e30, suffix=".yaml")
@example(path=("health_check", "timeout_seconds"), value=10**400, suffix=".json")
@example(path=("nodes", 0, "ram_gb"), value=10**300, suffix=".yaml")
@example(path=("failover", "retry_delay_seconds"), value=math.nan, suffix=".json")
@given(path=st.sampled_from(BOUNDED_KEYS),
       value=st.one_of(HUGE_INTS, st.sampled_from([math.nan, math.inf, -math.inf, 1e30])),
       suffix=st.sampled_from([".yaml", ".json"]))
def test_numbers_out_of_bounds_are_refused(capsys: pytest.CaptureFixture[str],
                                           path: tuple[Any, ...], value: Any,
                                           suffix: str) -> None:
    """Huge, non-finite and over-bound numbers in a topology: refused naming the key."""
    doc = copy.deepcopy(CLUSTER)
    _set(doc, path, value)
    code, _out, err, cluster, _spec = _validate(capsys, _dump(doc, suffix), suffix, None, "")
    assert_one_line_error(code, err, cluster.name, str(path[-1]))


@pytest.mark.parametrize(("path", "value", "key"), [
    (("health_check", "keepalive_seconds"), 86401, "at most 86400"),
    (("health_check", "timeout_seconds"), 1e30, "at most 86400"),
    (("failover", "max_retries"), 1001, "at most 1000"),
])
def test_bounds_are_in_the_message(capsys: pytest.CaptureFixture[str], path: tuple[Any, ...],
                                   value: Any, key: str) -> None:
    doc = copy.deepcopy(CLUSTER)
    _set(doc, path, value)
    code, _out, err, cluster, _spec = _validate(capsys, _dump(doc, ".yaml"), ".yaml", None, "")
    assert_one_line_error(code, err, cluster.name, f"{path[0]}.{path[-1]}", key)


@settings(FUZZ, max_examples=400)
@given(data=st.data(), value=HOSTILE, suffix=st.sampled_from([".json", ".yaml"]))
def test_fuzzed_spec_documents(capsys: pytest.CaptureFixture[str], data: st.DataObject,
                               value: Any, suffix: str) -> None:
    """A spec with one value replaced by a hostile one: valid, or one line naming the spec."""
    doc = copy.deepcopy(SPEC)
    path = data.draw(st.sampled_from([*_paths(doc), ("params", "new"), ("extra_key",)]))
    _set(doc, path, value)
    code, _out, err, _cluster, spec = _validate(capsys, yaml.safe_dump(CLUSTER),
                                                ".yaml", _dump(doc, suffix), suffix)
    _check_outcome(code, err, spec.name)


@pytest.mark.parametrize(("path", "value", "suffix", "fragment"), [
    (("params", "lr"), math.nan, ".json", "params.lr"),
    (("params", "lr"), math.inf, ".yaml", "params.lr"),
    (("params", "big"), 10**500, ".json", "params.big"),
    (("env", "SEED"), 10**300, ".yaml", "env.SEED"),
    (("max_retries",), 10**400, ".json", "max_retries"),
    (("ram_gb",), 10**30, ".json", "ram_gb"),
    (("command", 1), "", ".json", "command[1]"),
    (("results", 0), "a/~/b", ".json", "results[0]"),
    (("constraints", 0, "value"), ["", "x"], ".json", "constraints[0].value"),
    (("description",), "a\x00b", ".json", "description"),
    (("params", "name"), "\ud800", ".json", "params.name"),
])
def test_hostile_spec_values_are_refused(capsys: pytest.CaptureFixture[str],
                                         path: tuple[Any, ...], value: Any, suffix: str,
                                         fragment: str) -> None:
    doc = copy.deepcopy(SPEC)
    _set(doc, path, value)
    code, _out, err, _cluster, spec = _validate(capsys, yaml.safe_dump(CLUSTER),
                                                ".yaml", _dump(doc, suffix), suffix)
    assert_one_line_error(code, err, spec.name, fragment)


def _nested(depth: int, style: str) -> str:
    if style == "flow":
        return "[" * depth + "1" + "]" * depth
    return "- " * depth + "1"


@settings(FUZZ, max_examples=30)
@example(depth=500, style="flow", suffix=".yaml")
@example(depth=500, style="block", suffix=".yaml")
@example(depth=5000, style="flow", suffix=".json")
@given(depth=st.integers(min_value=65, max_value=6000),
       style=st.sampled_from(["flow", "block"]), suffix=st.sampled_from([".yaml", ".json"]))
def test_deep_nesting_is_refused(capsys: pytest.CaptureFixture[str], depth: int, style: str,
                                 suffix: str) -> None:
    """Nesting past the depth limit: one line naming the file, never a RecursionError."""
    if suffix == ".json":
        text = '{"command": "true", "params": {"x": ' + _nested(depth, "flow") + "}}"
    elif style == "flow":
        text = "command: 'true'\nparams:\n  x: " + _nested(depth, "flow") + "\n"
    else:
        text = "command: 'true'\nparams:\n  x:\n    " + _nested(depth, "block") + "\n"
    code, _out, err, _cluster, spec = _validate(capsys, yaml.safe_dump(CLUSTER), ".yaml",
                                                text, suffix)
    assert_one_line_error(code, err, spec.name, "nested more than 64 levels")


def test_nesting_within_the_limit_is_accepted(capsys: pytest.CaptureFixture[str]) -> None:
    text = '{"command": "true", "params": {"x": ' + _nested(60, "flow") + "}}"
    code, _out, err, _cluster, _spec = _validate(capsys, yaml.safe_dump(CLUSTER), ".yaml",
                                                 text, ".json")
    assert code == 0, err


def _alias_bomb(width: int, levels: int) -> str:
    lines = ["command: 'true'", "params:", "  l0: &l0 [" + ", ".join(["x"] * width) + "]"]
    for i in range(1, levels + 1):
        lines.append(f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


@FUZZ
@example(width=9, levels=7, where="spec")
@given(width=st.integers(min_value=1, max_value=9), levels=st.integers(min_value=1, max_value=7),
       where=st.sampled_from(["spec", "topology"]))
def test_yaml_aliases_are_refused(capsys: pytest.CaptureFixture[str], width: int, levels: int,
                                  where: str) -> None:
    """Any alias (a 9^7 bomb included) is refused at once, naming the file and the line."""
    bomb = _alias_bomb(width, levels)
    if where == "spec":
        code, _out, err, _cluster, spec = _validate(capsys, yaml.safe_dump(CLUSTER), ".yaml",
                                                    bomb, ".yaml")
        assert_one_line_error(code, err, f"{spec.name}:4", "aliases")
    else:
        text = yaml.safe_dump(CLUSTER) + "x_anchor: &n1 n1\nx_alias: *n1\n"
        code, _out, err, cluster, _spec = _validate(capsys, text, ".yaml", None, "")
        assert_one_line_error(code, err, cluster.name, "aliases")


@FUZZ
@example(key="command", first='"true"', second='"rm -rf /tmp/x"')
@given(key=st.sampled_from(["command", "experiment_id", "ram_gb", "params", "env"]),
       first=st.sampled_from(['"true"', "1", "{}"]), second=st.sampled_from(['"b"', "2", "{}"]))
def test_duplicate_json_keys_are_refused(capsys: pytest.CaptureFixture[str], key: str,
                                         first: str, second: str) -> None:
    """JSON repeating a key (anywhere) is refused like YAML, naming the key."""
    text = '{"command": "true", "params": {"k": 1, "k": 2}}' if key == "params" else (
        f'{{"command": "true", "{key}": {first}, "{key}": {second}}}')
    code, _out, err, _cluster, spec = _validate(capsys, yaml.safe_dump(CLUSTER), ".yaml",
                                                text, ".json")
    assert_one_line_error(code, err, spec.name, "duplicate key")


@FUZZ
@example(digits=400, where="ram_gb")
@given(digits=st.integers(min_value=19, max_value=6000),
       where=st.sampled_from(["ram_gb", "max_retries", "params", "cpu_cores"]))
def test_huge_integer_literals_are_refused(capsys: pytest.CaptureFixture[str], digits: int,
                                           where: str) -> None:
    """Integer literals of many digits: refused before conversion (no Overflow/ValueError)."""
    number = "9" * digits
    value = f'{{"n": {number}}}' if where == "params" else number
    text = f'{{"command": "true", "{where}": {value}}}'
    code, _out, err, _cluster, spec = _validate(capsys, yaml.safe_dump(CLUSTER), ".yaml",
                                                text, ".json")
    assert_one_line_error(code, err, spec.name, where, "out of range")


@pytest.mark.parametrize(("params", "fragment"), [
    ("  b: !!binary aGk=\n", "params.b: a bytes value is not allowed"),
    ("  s: !!set {a, b}\n", "params.s: a set value is not allowed"),
    ("  1: a\n  b: c\n", "params: keys must be strings, got 1"),
    ("  ? [a]\n  : b\n", "keys must be plain scalars"),
    ("  h: 0x" + "f" * 32 + "\n", "params.h: integer out of range"),
])
def test_yaml_values_must_be_json_like(capsys: pytest.CaptureFixture[str], params: str,
                                       fragment: str) -> None:
    """YAML tags that make bytes, sets or non-string keys: refused (they broke the state store
    or sorting later); an unquoted date stays text and the spec stores."""
    text = "command: 'true'\nparams:\n" + params
    code, _out, err, _cluster, spec = _validate(capsys, yaml.safe_dump(CLUSTER), ".yaml",
                                                text, ".yaml")
    assert_one_line_error(code, err, spec.name, fragment)


def test_unquoted_yaml_dates_stay_text(tmp_path: Path) -> None:
    from infra.config import load_spec
    from infra.state.codec import decode_spec, encode_spec
    (tmp_path / "d.yaml").write_text("command: 'true'\nparams:\n  day: 2024-01-01\n")
    cluster = parse_cluster(copy.deepcopy(CLUSTER), tmp_path / "cluster.yaml")
    spec = load_spec(tmp_path / "d.yaml", cluster)
    assert dict(decode_spec(encode_spec(spec)).params) == {"day": "2024-01-01"}


def test_oversized_documents_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    text = '{"command": "true", "description": "' + "x" * (1 << 20) + '"}'
    code, _out, err, _cluster, spec = _validate(capsys, yaml.safe_dump(CLUSTER), ".yaml",
                                                text, ".json")
    assert_one_line_error(code, err, spec.name, "larger than 1024 KiB")


# --------------------------------------------------------------------------- argument fuzz

@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """A topology whose store holds exactly one run (``r-20261206-1200-aa``)."""
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump(CLUSTER))
    (tmp_path / "logs").mkdir()
    store = Store.for_log_dir(tmp_path / "logs")
    spec = ExperimentSpec(experiment_id="a", command="true", source=Path("."))
    store.create_run("r-20261206-1200-aa", str(cluster), {}, [("a", "n1", spec, None)])
    store.close()
    return cluster


def _seconds_ok(text: str, maximum: float) -> bool:
    """The oracle for a SECONDS option value."""
    if len(text.strip()) > 32:
        return False
    try:
        value = float(text)
    except ValueError:
        return False
    return math.isfinite(value) and 0 <= value <= maximum


NUMBER_TEXT = st.one_of(
    st.sampled_from(["nan", "NaN", "inf", "-inf", "1e30", "1e400", "-1", "9" * 400, "0", "5",
                     "2592000", "2592001", "1_0", "0x10", "", " 3 "]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=8),
)


@FUZZ
@example(option="--grace", value="nan")
@example(option="--grace", value="inf")
@example(option="--duration", value="nan")
@example(option="--monitor-duration", value="1e400")
@given(option=st.sampled_from(["--grace", "--duration", "--monitor-duration"]),
       value=NUMBER_TEXT)
def test_fuzzed_seconds_options(capsys: pytest.CaptureFixture[str], project: Path, option: str,
                                value: str) -> None:
    """SECONDS options: finite and within their bound, else one line naming the option."""
    if "\x00" in value:
        return
    base = ["--cluster-config", str(project)]
    if option == "--grace":
        args, maximum = [*base, "stop", "zz-no-such-run", "--grace", value], 3600.0
    elif option == "--duration":
        args, maximum = [*base, "watch", "zz-no-such-run", "--duration", value], 30 * 86400.0
    else:
        args, maximum = [*base, "--validate-config", "--monitor-duration", value], 30 * 86400.0
    code, _out, err = run_cli(capsys, *args)
    assert "Traceback" not in err
    if not _seconds_ok(value, maximum):
        assert_one_line_error(code, err, option)
    elif option == "--monitor-duration":
        assert code == 0, err
    else:
        assert_one_line_error(code, err, "no run 'zz-no-such-run'")


@pytest.mark.parametrize("deadline", ["9" * 400, "31d"])
def test_drain_deadline_is_bounded(capsys: pytest.CaptureFixture[str], project: Path,
                                   deadline: str) -> None:
    code, _out, err = run_cli(capsys, "--cluster-config", str(project), "node", "drain", "n1",
                              "--dry-run", "--deadline", deadline)
    assert_one_line_error(code, err, "--deadline")


def test_odd_run_ids_never_resolve(capsys: pytest.CaptureFixture[str], project: Path) -> None:
    """``stop ""``, ``stop %``, ``stop _``: one line, and the only run is never picked."""
    for run_id in ("", " ", "%", "_", "r-%", "r-2026120_", "\x00", "r\n", "\udcff"):
        for command in ("stop", "status"):
            extra = ["--no-refresh"] if command == "status" else []
            code, _out, err = run_cli(capsys, "--cluster-config", str(project), command,
                                      run_id, *extra)
            assert_one_line_error(code, err)
            assert "r-20261206-1200-aa" not in err
            assert ("empty run id" in err) if not run_id.strip() else ("no run" in err), err


PATH_VALUES = ["a" * 256 + ".json", "d/" + "b" * 300 + ".yaml", "x\x00y.json", "",
               "/".join(["c" * 200] * 25) + ".json"]


@pytest.mark.parametrize("value", PATH_VALUES)
@pytest.mark.parametrize("option", ["--config", "--cluster-config"])
def test_odd_paths_are_one_line(capsys: pytest.CaptureFixture[str], project: Path, option: str,
                                value: str) -> None:
    """Over-long names, NUL and empty paths: one line naming the option, never OSError."""
    if option == "--config":
        args = ["--cluster-config", str(project), "--validate-config", "--config", value]
    else:
        args = ["--cluster-config", value, "--validate-config"]
    code, _out, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, option)


@pytest.mark.parametrize(("section", "key", "value"), [
    ("logging", "log_dir", "l" * 300),
    ("deploy", "source", "/tmp/" + "s" * 300),
    ("health_check", "known_hosts", "/" + "k" * 300),
])
def test_long_paths_in_the_topology_are_one_line(capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path, section: str, key: str,
                                                 value: str) -> None:
    """A path key naming a file name over 255 bytes: refused naming the key, for every
    command (``status`` opened the store under it and raised OSError)."""
    doc = copy.deepcopy(CLUSTER)
    doc.setdefault(section, {})[key] = value
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump(doc))
    for args in (["--validate-config"], ["status", "--no-refresh"]):
        code, _out, err = run_cli(capsys, "--cluster-config", str(cluster), *args)
        assert_one_line_error(code, err, f"{section}.{key}", "longer than 255 bytes")


@FUZZ
@example(name="a\x00b")
@given(name=st.text(min_size=1, max_size=400))
def test_fuzzed_config_paths(capsys: pytest.CaptureFixture[str], project: Path,
                             name: str) -> None:
    """Any --config text: a one-line error (usually 'file not found'), never a traceback."""
    code, _out, err = run_cli(capsys, "--cluster-config", str(project), "--validate-config",
                              "--config", str(project.parent / "nowhere" / name))
    assert_one_line_error(code, err)


# --------------------------------------------------------------------------- partial probe

def test_health_table_without_a_disk_section() -> None:
    """A probe document with no disk section renders ('-'), not a TypeError."""
    doc = json.loads((PROBE_FIXTURES / "doc_pi5.json").read_text())
    del doc["disk"]
    facts = NodeFacts.from_json("rpi5", doc)
    health = {"rpi5": NodeHealth(node="rpi5", status=NodeStatus.HEALTHY, facts=facts)}
    console = Console(record=True, width=200)
    cluster = parse_cluster(copy.deepcopy(CLUSTER), Path("cluster.yaml"))
    console.print(views.health_table(cluster, health))
    assert "rpi5" in console.export_text()


# --------------------------------------------------------------------------- real processes

def _deep_yaml(tmp: Path) -> list[str]:
    (tmp / "deep.yaml").write_text("command: 'true'\nparams:\n  x: " + _nested(500, "flow"))
    return ["--config", str(tmp / "deep.yaml")]


def _deep_json(tmp: Path) -> list[str]:
    (tmp / "deep.json").write_text('{"command": "true", "p": ' + _nested(5000, "flow") + "}")
    return ["--config", str(tmp / "deep.json")]


def _bomb(tmp: Path) -> list[str]:
    (tmp / "bomb.yaml").write_text(_alias_bomb(9, 7))
    return ["--config", str(tmp / "bomb.yaml")]


def _big_int(tmp: Path) -> list[str]:
    (tmp / "big.json").write_text('{"command": "true", "ram_gb": 1' + "0" * 400 + "}")
    return ["--config", str(tmp / "big.json")]


@pytest.mark.parametrize(("make", "fragment"), [
    (_deep_yaml, "nested more than 64 levels"),
    (_deep_json, "nested more than 64 levels"),
    (_bomb, "aliases"),
    (_big_int, "out of range"),
    (lambda tmp: ["--config", "z" * 300 + ".json"], "--config"),
    (lambda tmp: ["--monitor-duration", "nan"], "--monitor-duration"),
])
def test_real_subprocess_one_line(tmp_path: Path, make: Any, fragment: str) -> None:
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump(CLUSTER))
    args = ["--cluster-config", str(cluster), "--validate-config", *make(tmp_path)]
    proc = subprocess.run([sys.executable, "scripts/cluster_experiment.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
