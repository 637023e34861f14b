"""The benchmarks say cleanly what sizes they take: a ``--hosts`` beyond the loopback fleet's
limit is one line on stderr and exit 2, never a traceback (no fleet is started)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.sshfleet import FIRST_HOST_OCTET, MAX_HOSTS

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("script", "hosts"), [
    ("bench_health.py", MAX_HOSTS + 1),
    ("bench_health.py", 0),
    ("bench_deploy.py", MAX_HOSTS + 6),
    ("bench_deploy_check.py", MAX_HOSTS + 1),
])
def test_too_many_hosts_is_one_line_and_exit_2(script: str, hosts: int) -> None:
    proc = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "scripts" / script),
                           "--hosts", str(hosts)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"--hosts {hosts}: at most {MAX_HOSTS} hosts (the loopback fleet runs "
                     f"1..{MAX_HOSTS} sshd hosts on 127.0.0.21..127.0.0.84)"]


def test_fleet_limit_fits_the_loopback_addresses() -> None:
    assert FIRST_HOST_OCTET + MAX_HOSTS - 1 <= 254
