"""The real probe script, run for real: locally through LocalTransport and on the sshd fleet.

Assertions are on this machine's actual values (hostname, memory, cores), cross-checked
against the standard library and psutil, never against canned output.
"""

from __future__ import annotations

import asyncio
import os
import platform
import socket
import stat
import sys
from pathlib import Path

import psutil
import pytest

from infra.config.model import HealthChecks, NodeConfig
from infra.errors import CommandFailedError
from infra.probe import NodeHealth, NodeStatus, check_health, probe_node, probe_source
from infra.transport.local import LocalTransport
from infra.transport.ssh import SSHTransport
from tests.sshfleet import SSHFleet

LENIENT = HealthChecks(memory_percent=100.0, disk_free_gb=0.0, temperature_c=1000.0)
PYENV = Path(os.path.expanduser("~/.pyenv/versions"))


def local_node(tmp_path: Path, **overrides: object) -> NodeConfig:
    values: dict[str, object] = {"name": "local", "host": "localhost",
                                 "remote_work_dir": str(tmp_path),
                                 "python_path": sys.executable}
    values.update(overrides)
    return NodeConfig(**values)  # type: ignore[arg-type]


def fake_python(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-python"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def old_python(version: str) -> str:
    path = PYENV / version / "bin" / "python3"
    if not path.exists():
        pytest.skip(f"no Python {version} interpreter on this machine")
    return str(path)


# --------------------------------------------------------------------------- local

def test_probe_source_is_the_node_script() -> None:
    source = probe_source()
    assert "def parse_tegrastats" in source and "@@INFRA-JSON-BEGIN@@" in source


def test_local_probe_reports_this_machine(tmp_path: Path) -> None:
    facts = asyncio.run(probe_node(LocalTransport("local"), local_node(tmp_path), timeout=60))
    assert facts.node == "local"
    assert facts.hostname == socket.gethostname()
    assert facts.arch == platform.machine()
    assert facts.kernel == platform.release()
    assert facts.python == platform.python_version()
    assert facts.mem_total_gb > 0
    assert facts.mem_total_gb * 2**30 == psutil.virtual_memory().total
    assert 0 < facts.mem_available_gb <= facts.mem_total_gb
    assert facts.cpu_online >= 1
    assert facts.cpu_usable == len(os.sched_getaffinity(0))
    assert facts.cpu_present >= facts.cpu_online
    assert facts.disk_path == str(tmp_path)
    assert facts.disk_total_gb is not None and facts.disk_total_gb > 0
    usage = psutil.disk_usage(str(tmp_path))
    assert facts.disk_total_gb * 2**30 == usage.total
    assert all(-100 < c < 200 for _, c in facts.temperatures)
    assert facts.jetson is None and facts.pi is None  # this is an x86/arm server, not a board


def test_local_probe_of_a_work_dir_that_does_not_exist_yet(tmp_path: Path) -> None:
    node = local_node(tmp_path, remote_work_dir=str(tmp_path / "not" / "yet"))
    facts = asyncio.run(probe_node(LocalTransport("local"), node, timeout=60))
    assert facts.disk_path == str(tmp_path)


def test_work_dir_with_a_tilde_is_expanded_on_the_node(tmp_path: Path) -> None:
    node = local_node(tmp_path, remote_work_dir="~/infra-probe-test-not-created")
    facts = asyncio.run(probe_node(LocalTransport("local"), node, timeout=60))
    assert facts.disk_path == os.path.expanduser("~")


def test_local_health_from_real_values(tmp_path: Path) -> None:
    transport, node = LocalTransport("local"), local_node(tmp_path)
    healthy = asyncio.run(check_health(transport, node, LENIENT, timeout=60))
    assert healthy.status is NodeStatus.HEALTHY and healthy.reasons == ()
    strict = HealthChecks(memory_percent=0.0, disk_free_gb=1e9, temperature_c=1000.0)
    degraded = asyncio.run(check_health(transport, node, strict, timeout=60))
    assert degraded.status is NodeStatus.DEGRADED
    assert degraded.facts is not None
    used = degraded.facts.mem_used_percent
    assert degraded.reasons[0] == f"memory {used:.0f}% used (> 0%)"
    assert degraded.reasons[1].startswith("disk ") and degraded.reasons[1].endswith(
        "(< 1e+09 GB)")


def test_missing_python(tmp_path: Path) -> None:
    node = local_node(tmp_path, python_path="/nonexistent/python3")
    with pytest.raises(CommandFailedError) as info:
        asyncio.run(probe_node(LocalTransport("local"), node, timeout=60))
    assert info.value.reason == "/nonexistent/python3 not found on node"
    assert info.value.exit_status == 127
    health = asyncio.run(check_health(LocalTransport("local"), node, LENIENT, timeout=60))
    assert health.status is NodeStatus.UNAVAILABLE
    assert health.reasons == ("/nonexistent/python3 not found on node",)


def too_old_python() -> str:
    """Any interpreter older than 3.7 (pyenv's 3.6 or 2.7 here)."""
    for version in sorted(PYENV.glob("[23].*"), key=lambda p: p.name):
        parts = version.name.split(".")
        old = parts[0].isdigit() and parts[1].isdigit() and (int(parts[0]), int(parts[1])) < (3, 7)
        if old and (version / "bin" / "python").exists():
            return str(version / "bin" / "python")
    pytest.skip("no Python older than 3.7 on this machine")


def test_python_too_old(tmp_path: Path) -> None:
    node = local_node(tmp_path, python_path=too_old_python())
    with pytest.raises(CommandFailedError, match=r"too old to run the probe \(needs Python 3.8"):
        asyncio.run(probe_node(LocalTransport("local"), node, timeout=60))


def test_oldest_supported_python_runs_the_probe(tmp_path: Path) -> None:
    node = local_node(tmp_path, python_path=old_python("3.8.18"))
    facts = asyncio.run(probe_node(LocalTransport("local"), node, timeout=60))
    assert facts.python == "3.8.18" and facts.errors == ()
    assert facts.hostname == socket.gethostname()


def test_garbage_output(tmp_path: Path) -> None:
    node = local_node(tmp_path, python_path=fake_python(tmp_path, "cat >/dev/null; echo hello\n"))
    with pytest.raises(CommandFailedError) as info:
        asyncio.run(probe_node(LocalTransport("local"), node, timeout=60))
    assert info.value.reason == "probe returned no JSON document: hello"


def test_foreign_json_is_rejected(tmp_path: Path) -> None:
    script = "cat >/dev/null; echo '@@INFRA-JSON-BEGIN@@[1]@@INFRA-JSON-END@@'\n"
    node = local_node(tmp_path, python_path=fake_python(tmp_path, script))
    health = asyncio.run(check_health(LocalTransport("local"), node, LENIENT, timeout=60))
    assert health.status is NodeStatus.UNAVAILABLE
    assert health.reasons == ("probe returned a list instead of a JSON object",)


def test_probe_crash_is_reported(tmp_path: Path) -> None:
    script = "cat >/dev/null; echo 'Traceback ...' >&2; echo 'MemoryError' >&2; exit 1\n"
    node = local_node(tmp_path, python_path=fake_python(tmp_path, script))
    with pytest.raises(CommandFailedError) as info:
        asyncio.run(probe_node(LocalTransport("local"), node, timeout=60))
    assert info.value.reason == "probe failed (exit 1): MemoryError"


def test_hung_node_becomes_unavailable(tmp_path: Path) -> None:
    # Short sleep: LocalTransport kills only its /bin/sh on timeout, and asyncio waits for
    # the orphaned child to close the pipes before returning.
    node = local_node(tmp_path, python_path=fake_python(tmp_path, "exec sleep 3\n"))
    health = asyncio.run(check_health(LocalTransport("local"), node, LENIENT, timeout=0.5))
    assert health.status is NodeStatus.UNAVAILABLE
    assert health.error is not None and health.error.startswith("timed out after 0.5 s")


# --------------------------------------------------------------------------- ssh fleet

async def _fleet_check(fleet: SSHFleet, node: NodeConfig, **section: object) -> NodeHealth:
    transport = SSHTransport(node, fleet.health_section(**section))
    try:
        return await check_health(transport, node, LENIENT, timeout=30)
    finally:
        await transport.close()


@pytest.mark.integration
def test_probe_every_fleet_host_over_ssh(ssh_fleet: SSHFleet) -> None:
    async def probe_all() -> list[NodeHealth]:
        nodes = [ssh_fleet.node_config(h, remote_work_dir=str(h.home / "no-such" / "work"))
                 for h in ssh_fleet.hosts]
        return list(await asyncio.gather(*(_fleet_check(ssh_fleet, n) for n in nodes)))

    for host, health in zip(ssh_fleet.hosts, asyncio.run(probe_all()), strict=True):
        assert health.status is NodeStatus.HEALTHY, health.reasons
        facts = health.facts
        assert facts is not None and facts.node == host.name
        assert facts.hostname == socket.gethostname()  # every fleet host is this machine
        assert facts.mem_total_gb * 2**30 == psutil.virtual_memory().total
        assert facts.cpu_online >= 1
        # The work dir does not exist: disk is measured at its nearest existing parent.
        assert facts.disk_path == str(host.home)
        assert facts.errors == ()


@pytest.mark.integration
def test_fleet_host_failures_become_unavailable(ssh_fleet: SSHFleet) -> None:
    host = ssh_fleet.hosts[0]
    no_python = asyncio.run(_fleet_check(
        ssh_fleet, ssh_fleet.node_config(host, python_path="/nope/python3")))
    assert no_python.status is NodeStatus.UNAVAILABLE
    assert no_python.reasons == ("/nope/python3 not found on node",)

    host.stop()
    try:
        down = asyncio.run(_fleet_check(ssh_fleet, ssh_fleet.node_config(host)))
    finally:
        host.start()
    assert down.status is NodeStatus.UNAVAILABLE
    assert down.error and down.facts is None

    back = asyncio.run(_fleet_check(ssh_fleet, ssh_fleet.node_config(host)))
    assert back.status is NodeStatus.HEALTHY


@pytest.mark.integration
def test_frozen_fleet_host_becomes_unavailable(ssh_fleet: SSHFleet) -> None:
    host = ssh_fleet.hosts[1]
    host.pause()
    try:
        frozen = asyncio.run(_fleet_check(ssh_fleet, ssh_fleet.node_config(host),
                                          timeout_seconds=1.0))
    finally:
        host.resume()
    assert frozen.status is NodeStatus.UNAVAILABLE
    assert frozen.error is not None and "timed out" in frozen.error
