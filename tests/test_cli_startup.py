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

import pytest

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


def test_validate_config_loads_no_ssh_planner_or_store() -> None:
    loaded = loaded_after({"validate": ["--cluster-config", str(SHIPPED_CONFIG),
                                        "--validate-config"]})
    present = sorted(m for m in HEAVY if m in loaded["validate"])
    assert not present, f"after --validate-config: {present} loaded"
    assert "infra.config" in loaded["validate"]  # it did validate


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
            "infra.cli.actions", "infra.monitor.loop", "plotly", "mlflow")
    present = sorted(m for m in lean if m in loaded)
    assert not present, f"after --health-check: {present} loaded"


def test_strategy_choices_match_the_enum() -> None:
    assert tuple(s.value for s in Strategy) == STRATEGY_CHOICES


def test_version_constant_matches_installed_metadata() -> None:
    assert __version__ == importlib.metadata.version("lab-orchestrator")
    out = subprocess.run([sys.executable, "-m", "infra.cli.main", "--version"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == f"cluster-experiment, version {__version__}"
