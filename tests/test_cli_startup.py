"""The CLI's start-up stays light: what ``--help``, ``--version`` and ``--validate-config``
load is checked in a fresh interpreter (module sets, never timings), so that an eager import
cannot silently bring the start-up cost back."""

from __future__ import annotations

import importlib.metadata
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra import __version__
from infra.cli.params import STRATEGY_CHOICES
from infra.config.model import Strategy

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_CONFIG = ROOT / "cluster_config.yaml"

HEAVY = ("asyncssh", "rich.live", "infra.placement.engine", "sqlite3", "plotly", "mlflow",
         "psutil", "infra.state.store", "infra.transport.ssh")
"""Modules no start-up path below may load: SSH, the live dashboard, the planner, the store,
the report and export extras."""

NOT_FOR_HELP = (*HEAVY, "yaml", "rich.console", "rich.table", "asyncio", "importlib.metadata")
"""``--help`` and ``--version`` need click alone: no config parser, no rich, no event loop."""

PROBE = """
import json, sys
import infra.cli.main as m
loaded = {"import": sorted(sys.modules)}
for name, argv in json.loads(sys.argv[1]).items():
    try:
        m.main(argv)
    except SystemExit:
        pass
    loaded[name] = sorted(sys.modules)
print(json.dumps(loaded))
"""


def loaded_after(steps: dict[str, list[str]]) -> dict[str, set[str]]:
    """Run the CLI's steps in one fresh interpreter; the modules loaded after each."""
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(steps)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=True)
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    return {k: set(v) for k, v in doc.items()}


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_load_only_click(flag: str) -> None:
    loaded = loaded_after({"run": [flag]})
    for step in ("import", "run"):
        present = sorted(m for m in NOT_FOR_HELP if m in loaded[step])
        assert not present, f"after {step} of {flag}: {present} loaded"


def test_subcommand_help_loads_nothing_heavy() -> None:
    loaded = loaded_after({"node": ["node", "--help"], "status": ["status", "--help"]})
    for step in ("node", "status"):
        present = sorted(m for m in HEAVY if m in loaded[step])
        assert not present, f"after {step} --help: {present} loaded"


NOT_FOR_VALIDATE = (*HEAVY, "asyncio", "infra.config.specs", "infra.campaign.sweep",
                    "infra.cli.actions", "infra.cli.health", "infra.probe", "infra.runner")
"""``--validate-config`` of a topology alone: the topology parser and rich, not the spec
parser (no ``--config``), the event loop, the probe or anything that runs work."""

NO_RICH = ("rich", "rich.console", "rich.table", "rich.markup", "infra.cli.views")
"""``--json`` output needs no rich console or table."""


def test_validate_config_loads_no_ssh_planner_or_store() -> None:
    loaded = loaded_after({"validate": ["--cluster-config", str(SHIPPED_CONFIG),
                                        "--validate-config"]})["validate"]
    present = sorted(m for m in NOT_FOR_VALIDATE if m in loaded)
    assert not present, f"after --validate-config: {present} loaded"
    assert "infra.config.topology" in loaded and "rich.table" in loaded  # it did validate


def test_validate_config_json_loads_no_rich() -> None:
    loaded = loaded_after({"validate": ["--cluster-config", str(SHIPPED_CONFIG),
                                        "--validate-config", "--json"]})["validate"]
    present = sorted(m for m in (*NOT_FOR_VALIDATE, *NO_RICH) if m in loaded)
    assert not present, f"after --validate-config --json: {present} loaded"
    assert "infra.config.topology" in loaded


def test_config_package_names_load_on_use() -> None:
    """``infra.config`` imports no submodule itself; each public name still resolves."""
    code = ("import sys, infra.config as c; "
            "print(sorted(m for m in sys.modules if m.startswith('infra.config.'))); "
            "print(all(getattr(c, n) is not None for n in c.__all__))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True).stdout.splitlines()
    assert out == ["[]", "True"]


def closed_loopback_port() -> int:
    """A loopback port nothing listens on (bound once, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_health_check_loads_no_planner_store_or_dashboard(tmp_path: Path) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text(json.dumps({"nodes": [{
        "name": "n1", "host": "127.0.0.1", "ssh_port": closed_loopback_port(), "ram_gb": 8.0,
        "max_instances": 2, "remote_work_dir": "~/lab"}]}))
    loaded = loaded_after({"health": ["--cluster-config", str(config), "--health-check",
                                      "--json"]})["health"]
    assert "infra.probe.run" in loaded and "asyncssh" in loaded  # it did probe
    lean = ("rich.live", "infra.placement.engine", "sqlite3", "infra.state.store",
            "infra.cli.actions", "infra.monitor.loop", "plotly", "mlflow", *NO_RICH,
            "infra.config.specs", "infra.campaign.sweep")
    present = sorted(m for m in lean if m in loaded)
    assert not present, f"after --health-check: {present} loaded"


def test_strategy_choices_match_the_enum() -> None:
    assert tuple(s.value for s in Strategy) == STRATEGY_CHOICES


def test_version_constant_matches_installed_metadata() -> None:
    assert __version__ == importlib.metadata.version("lab-orchestrator")
    out = subprocess.run([sys.executable, "-m", "infra.cli.main", "--version"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == f"cluster-experiment, version {__version__}"


ENTRY_PROBE = """
import atexit, gc, sys
atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count() > 0, file=sys.stderr))
sys.argv = ["cluster-experiment", *sys.argv[1:]]
from infra.cli.main import entry
entry()
"""


def test_installed_command_is_entry() -> None:
    scripts = importlib.metadata.entry_points(group="console_scripts")
    assert [ep.value for ep in scripts if ep.name == "cluster-experiment"] == [
        "infra.cli.main:entry"]


@pytest.mark.parametrize(("argv", "code", "stdout", "stderr"), [
    (["--version"], 0, f"cluster-experiment, version {__version__}\n", ""),
    (["--cluster-config", "no-such.yaml", "--validate-config"], 2, "", "error: "),
])
def test_entry_exits_with_main_code_and_output_and_skips_the_final_collection(
        argv: list[str], code: int, stdout: str, stderr: str) -> None:
    """The command's exit code and output pass through; the heap is frozen before exit, so
    the collector's last pass (about 60 ms after a health check's imports) is skipped."""
    out = subprocess.run([sys.executable, "-c", ENTRY_PROBE, *argv], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=False)
    assert (out.returncode, out.stdout) == (code, stdout), out.stderr
    lines = out.stderr.splitlines()
    assert lines[-1] == "frozen at exit: True"
    assert "\n".join(lines[:-1]).startswith(stderr)


YAML_CASES = {
    "plain": "a: 1\nb: [x, 'y', 2.5, 1_000, 0x1f, 2024-01-02, ~, true]\nc: {d: {e: [f]}}\n",
    "alias": "a: &x [1]\nb: *x\n",
    "duplicate": "a: 1\nb: 2\na: 3\n",
    "huge int": "a: 123456789012345678901234567890\n",
    "nan": "a: .nan\n",
    "two documents": "a: 1\n---\nb: 2\n",
    "syntax": "a: [1, 2\nb: 3\n",
    "deep": "a: " + "[" * 70 + "]" * 70 + "\n",
    "tab": "a:\n\tb: 1\n",
}
"""Documents for the two YAML paths: what libyaml takes and what goes to the exact parser."""


def _yaml_outcome(load: Any, text: str) -> str:
    """What parsing ``text`` gives: the data (refused numbers with their reason) or the error."""
    try:
        return repr(load(text))
    except yaml.YAMLError as exc:
        return f"error: {exc}"


@pytest.mark.parametrize("name", sorted(YAML_CASES))
def test_yaml_fast_path_gives_what_the_strict_parser_gives(name: str) -> None:
    from infra.config import reader
    text = YAML_CASES[name]
    strict = _yaml_outcome(lambda t: yaml.load(t, Loader=reader._StrictLoader), text)
    assert _yaml_outcome(reader._load_yaml, text) == strict


def test_shipped_yaml_files_take_the_libyaml_path() -> None:
    """The topology the CLI reads at start-up parses through libyaml, to the same data."""
    from infra.config import reader
    assert reader._FastLoader is not None, "PyYAML without libyaml: nothing to check"
    for path in (SHIPPED_CONFIG, ROOT / "docs" / "example-lab.yaml"):
        text = path.read_text()
        assert reader._plain_for_libyaml(text), path
        assert reader._load_yaml(text) == yaml.load(text, Loader=reader._StrictLoader)
