"""Small builders shared by the unit tests: topology/spec dicts through the real parsers,
and the in-process CLI runner with its one-line-error assertion."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from infra.cli.main import main
from infra.config.model import Cluster, ExperimentSpec
from infra.config.specs import parse_spec
from infra.config.topology import parse_cluster


def node(name: str, **kw: Any) -> dict[str, Any]:
    """A valid node entry (placeholder host) with overrides."""
    base: dict[str, Any] = {"name": name, "host": f"{name}.lab.invalid", "ram_gb": 16.0,
                            "max_instances": 4, "cpu_cores": 8}
    base.update(kw)
    return base


def cluster(*nodes: dict[str, Any], **top: Any) -> Cluster:
    return parse_cluster({"nodes": list(nodes), **top}, Path("test_cluster.yaml"))


def spec(c: Cluster, eid: str = "x", **kw: Any) -> ExperimentSpec:
    data: dict[str, Any] = {"experiment_id": eid, "command": "true"}
    data.update(kw)
    return parse_spec(data, Path(f"{eid}.json"), c)


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the real CLI entry point in-process: (exit code, stdout, stderr)."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str, exit_code: int = 2) -> None:
    """The CLI failed with one ``error:`` line holding every fragment, and no traceback."""
    assert code == exit_code, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])


def wait_for(predicate: Any, timeout: float = 30.0, interval: float = 0.1) -> Any:
    """Poll until ``predicate()`` is truthy and return it (a bound, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
