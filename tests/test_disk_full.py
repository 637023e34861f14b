"""A node's disk fills up: the supervisor keeps its record and says "no space left on device".

The disk is a real 2 MiB tmpfs mounted by the test (root only; skipped or failed elsewhere,
see tests/tmpfs.py) and filled by a real program (tests/progs/fill.py). Locally through
LocalTransport, and end to end on the sshd fleet through the real CLI.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.config.model import NodeConfig
from infra.errors import CommandFailedError
from infra.remote import supervisor as script
from infra.runner.supervisor_client import InstanceStatus, SupervisorClient
from infra.state import Store
from infra.transport.local import LocalTransport
from tests.sshfleet import SSHFleet
from tests.test_supervisor import NODE_PYTHON, PROGS, PY, one, prog, request, wait_final, wait_for
from tests.tmpfs import small_tmpfs

NO_SPACE = "no space left on device"
BOUND = 60.0  # upper bound for waits on the fleet, only so a bug cannot hang the suite


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: the node's whole work dir lives on it."""
    with small_tmpfs(tmp_path / "disk") as path:
        yield path


@pytest.fixture
def client(disk: Path) -> Iterator[SupervisorClient]:
    node = NodeConfig(name="local", host="localhost", remote_work_dir=str(disk / "work"),
                      python_path=NODE_PYTHON)
    c = SupervisorClient(LocalTransport(node.name), node)
    yield c
    runs = disk / "work" / ".infra" / "runs"
    if runs.is_dir():  # leave nothing running on the tmpfs, so it can be unmounted
        for run_dir in runs.iterdir():
            asyncio.run(c.stop(run_dir.name, grace=0.2))


def fill_up(path: Path) -> None:
    """Write ``path`` until the disk holding it refuses (ENOSPC)."""
    with path.open("ab", buffering=0) as f:
        while True:
            try:
                f.write(b"x" * 65536)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                return


def test_state_stays_writable_on_a_full_disk(disk: Path) -> None:
    idir = disk / "inst"
    idir.mkdir()
    state = idir / "state.json"
    doc: dict[str, Any] = {"state": "running", "attempts": []}
    script.write_json_atomic(str(state), doc)
    script.make_reserve(str(idir / "reserve"))
    fill_up(disk / "hog.bin")
    # fits in the blocks state.json already has: rewritten in place, the reserve is kept
    doc["state"] = "restarting"
    assert script.write_state(str(state), doc)
    assert json.loads(state.read_text())["state"] == "restarting"
    assert doc["disk_full"].startswith(f"{NO_SPACE} ({idir}: ")
    assert (idir / "reserve").exists()
    # grown past its blocks: the reserve is given back and the write goes through
    doc["attempts"] = [{"attempt": i, "reason": "x" * 100} for i in range(80)]
    assert len(json.dumps(doc)) > 8192
    assert script.write_state(str(state), doc)
    assert json.loads(state.read_text()) == doc
    assert not (idir / "reserve").exists()
    assert sorted(p.name for p in idir.iterdir()) == ["state.json"]  # no temp file left


def test_a_read_only_filesystem_is_never_full(disk: Path) -> None:
    fill_up(disk / "hog.bin")
    assert (script.full_disk([str(disk)]) or "").startswith(f"{NO_SPACE} ({disk}: ")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    assert script.full_disk([str(disk)]) is None  # e.g. a read-only working directory


def test_start_on_a_full_disk_says_so(client: SupervisorClient, disk: Path) -> None:
    asyncio.run(client.ensure_installed())
    fill_up(disk / "hog.bin")
    with pytest.raises(CommandFailedError, match=f"supervisor start: {NO_SPACE} \\(.*bytes free"):
        asyncio.run(client.start(request("df", "late", "true")))
    # nothing half made is left: once there is room, the same start really starts
    assert not (disk / "work" / ".infra" / "runs" / "df" / "late").exists()
    (disk / "hog.bin").unlink()
    state = asyncio.run(client.start(request("df", "late", "true")))
    assert not state.already and state.pid is not None


def test_experiment_dying_of_a_full_disk_is_recorded_not_lost(client: SupervisorClient,
                                                              disk: Path) -> None:
    fill = f'{PY} {PROGS / "fill.py"} "$INFRA_RESULTS_DIR/fill.bin"'
    final = asyncio.run(_start_and_wait(client, request("df", "dies", fill, max_retries=1)))
    assert final.status is InstanceStatus.FAILED, final
    reason = final.final_reason or ""
    assert reason.startswith(f"exit code 1; {NO_SPACE} ("), reason
    assert "gave up after 2 failed attempts" in reason
    assert [a.attempt for a in final.attempts] == [1, 2]  # the restart happened, recorded
    assert all(NO_SPACE in (a.reason or "") for a in final.attempts), final.attempts
    assert final.disk_full is not None and final.disk_full.startswith(NO_SPACE)
    idir = disk / "work" / ".infra" / "runs" / "df" / "dies"
    assert json.loads((idir / "state.json").read_text())["state"] == "failed"
    assert not (idir / "reserve").exists()  # given back once the instance ended


async def _start_and_wait(client: SupervisorClient, req: Any) -> Any:
    await client.start(req)
    return await wait_final(client, req.run_id, req.instance_id)


def test_full_output_log_is_reported_while_running_and_at_the_end(
        client: SupervisorClient, disk: Path, tmp_path: Path) -> None:
    release = tmp_path / "release"  # not on the full disk
    command = prog("fill.py", "-", "--until", release)

    async def scenario() -> tuple[Any, Any]:
        await client.start(request("df", "log", command))
        running = await wait_for(client, "df", "log", lambda s: s.disk_full is not None,
                                 "reported disk full")
        release.write_text("go")
        return running, await wait_final(client, "df", "log")

    running, final = asyncio.run(scenario())
    assert running.status is InstanceStatus.RUNNING and running.alive
    assert running.disk_full is not None and running.disk_full.startswith(f"{NO_SPACE} (")
    assert "bytes free" in running.disk_full
    assert final.status is InstanceStatus.EXITED, final
    assert (final.final_reason or "").startswith(f"exit code 0; {NO_SPACE} ("), final
    assert final.log_size > 1 << 20  # the log is what filled the disk


def test_lost_instance_on_a_full_disk_names_the_disk(client: SupervisorClient, disk: Path,
                                                     tmp_path: Path) -> None:
    started = asyncio.run(client.start(request("df", "gone", prog("lines.py", 1, 0,
                                                                  "--hold", 600))))
    assert started.supervisor_pid is not None and started.pgid is not None
    fill_up(disk / "hog.bin")
    os.kill(started.supervisor_pid, signal.SIGKILL)
    os.killpg(started.pgid, signal.SIGKILL)
    lost = asyncio.run(wait_for(client, "df", "gone", lambda s: s.is_final, "lost"))
    assert lost.status is InstanceStatus.LOST
    assert "supervisor killed?" in (lost.final_reason or "")
    assert f"; {NO_SPACE} (" in (lost.final_reason or ""), lost.final_reason
    (disk / "hog.bin").unlink()
    assert asyncio.run(one(client, "df", "gone")).status is InstanceStatus.LOST


# --------------------------------------------------------------------------- on the fleet

def cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "infra.cli.main", *args], cwd=root,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})


def status_instance(root: Path, run_id: str) -> dict[str, Any]:
    proc = cli(root, "status", run_id, "--json")
    assert proc.returncode == 0, proc.stderr
    (inst,) = json.loads(proc.stdout)["instances"]
    return inst  # type: ignore[no-any-return]


def poll(root: Path, run_id: str, predicate: Any, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + BOUND
    while True:
        inst = status_instance(root, run_id)
        if predicate(inst):
            return inst
        assert time.monotonic() < deadline, f"never {what}: {inst}"
        time.sleep(0.3)


def test_disk_full_on_a_fleet_node_shows_in_status_and_events(ssh_fleet: SSHFleet,
                                                              tmp_path: Path) -> None:
    host = ssh_fleet.host("node1")
    tag = uuid.uuid4().hex[:8]
    release = host.home / f"release-{tag}"  # outside the small disk
    root = tmp_path / "proj"
    (root / "workloads").mkdir(parents=True)
    (root / "workloads" / "fill.py").write_text((PROGS / "fill.py").read_text())
    (root / "experiments").mkdir()
    with small_tmpfs(host.home / f"disk-{tag}", owner=host.uid) as disk:
        config = {"nodes": [{"name": host.name, "host": host.address, "ssh_port": host.port,
                             "ssh_user": host.user,
                             "ssh_key_path": str(ssh_fleet.client_key),
                             "remote_work_dir": str(disk / "work"),
                             "python_path": "/usr/bin/python3", "ram_gb": 8.0}],
                  "health_check": {"known_hosts": str(ssh_fleet.known_hosts),
                                   "timeout_seconds": 10,
                                   "checks": {"disk_free_gb": 0}},  # 2 MiB is the point
                  "failover": {"auto_restart": False}}
        (root / "cluster_config.yaml").write_text(yaml.safe_dump(config))
        spec = root / "experiments" / "filler.json"
        spec.write_text(json.dumps({"experiment_id": "filler", "ram_gb": 1.0,
                                    "command": f"python3 workloads/fill.py - --until {release}"}))
        proc = cli(root, "--config", str(spec), "--placement", f"filler:{host.name}",
                   "--monitor-duration", "0")
        assert proc.returncode == 0, proc.stderr
        store = Store(root / "logs" / "state.db")
        (run,) = store.runs(1)
        store.close()
        try:
            running = poll(root, run.run_id, lambda i: NO_SPACE in (i.get("reason") or ""),
                           "showed the full disk")
            assert running["state"] == "running", running
            assert str(disk / "work") in running["reason"]
            release.write_text("go")
            final = poll(root, run.run_id, lambda i: i["state"] != "running", "ended")
            assert final["state"] == "exited", final
            assert final["reason"].startswith(f"exit code 0; {NO_SPACE} ("), final
            store = Store(root / "logs" / "state.db")
            disk_events = [e for e in store.events(run.run_id) if e.kind == "disk"]
            store.close()
            assert len(disk_events) == 1, disk_events
            assert f"disk full on {host.name}: {NO_SPACE}" in disk_events[0].message
        finally:
            cli(root, "stop", run.run_id, "--grace", "1")  # nothing left holding the disk
            release.unlink(missing_ok=True)
