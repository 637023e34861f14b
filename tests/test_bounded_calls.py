"""Every remote call is bounded, and a call given up on leaves nothing running on the node.

On the real sshd fleet: a timed-out command (and the children it started) is gone from the
node afterwards, a node printing without end costs at most the output cap, and a cancelled
caller kills its command too.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import time
from pathlib import Path

import psutil
import pytest
import yaml

from infra.errors import OutputTooLargeError, TransportError, TransportTimeoutError
from infra.state import Store
from infra.transport import LocalTransport, SSHTransport
from tests.builders import wait_for
from tests.sshfleet import FleetHost, SSHFleet
from tests.test_live_ops import fast_health
from tests.test_run_e2e import check_log, cli, project, spec, status_json

pytestmark = pytest.mark.integration
__all__ = ["project"]  # the fixture, re-used


def processes_with(uid: int, marker: str) -> list[str]:
    """Command lines of the live processes of ``uid`` that mention ``marker``."""
    found = []
    for proc in psutil.process_iter(["uids", "cmdline", "status"]):
        ids = proc.info.get("uids")
        if ids is None or ids.real != uid or proc.info.get("status") == psutil.STATUS_ZOMBIE:
            continue
        line = " ".join(proc.info.get("cmdline") or [])
        if marker in line:
            found.append(line)
    return found


def sleepers(marker: str) -> str:
    """A command whose shell and two children (one in the background) sleep for long."""
    return (f"sleep 600 {marker}-bg & python3 -c 'import time; time.sleep(600)' {marker}-fg; "
            f"wait")


def ssh(fleet: SSHFleet, host: FleetHost) -> SSHTransport:
    return SSHTransport(fleet.node_config(host), fleet.health_section())


def test_timed_out_ssh_call_leaves_no_process_on_the_node(ssh_fleet: SSHFleet) -> None:
    host = ssh_fleet.hosts[0]
    marker = f"bounded{secrets.token_hex(4)}"

    async def main() -> None:
        t = ssh(ssh_fleet, host)
        try:
            started = time.monotonic()
            with pytest.raises(TransportTimeoutError, match="timed out after 1 s"):
                await t.run(sleepers(marker), timeout=1.0)
            assert time.monotonic() - started < 20
            # the connection is still usable afterwards
            assert (await t.run("echo ok", timeout=10)).stdout == "ok\n"
        finally:
            await t.close()

    asyncio.run(main())
    wait_for(lambda: not processes_with(host.uid, marker), timeout=4.0)


def test_command_cut_off_by_a_dropped_link_is_ended_by_the_node_side_bound(
        ssh_fleet: SSHFleet) -> None:
    """No kill request can reach the node when the link drops: the node's own bound ends it."""
    host = ssh_fleet.hosts[1]
    marker = f"dropped{secrets.token_hex(4)}"

    async def main() -> None:
        t = ssh(ssh_fleet, host)
        try:
            call = asyncio.ensure_future(t.run(sleepers(marker), timeout=2.0))
            while not processes_with(host.uid, f"{marker}-fg"):
                await asyncio.sleep(0.05)
            assert t.connection is not None
            t.connection.abort()  # the link is gone: no signal request is ever sent
            with pytest.raises(TransportError):
                await call
        finally:
            await t.close()

    asyncio.run(main())
    assert processes_with(host.uid, marker)  # the kill did not come from the channel
    wait_for(lambda: not processes_with(host.uid, marker), timeout=60.0)


def test_cancelled_caller_kills_its_command(ssh_fleet: SSHFleet) -> None:
    host = ssh_fleet.hosts[2]
    marker = f"cancel{secrets.token_hex(4)}"

    async def main() -> None:
        t = ssh(ssh_fleet, host)
        try:
            call = asyncio.ensure_future(t.run(sleepers(marker), timeout=600))
            while not processes_with(host.uid, f"{marker}-fg"):
                await asyncio.sleep(0.05)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            # killed on the node well before the node-side bound (600 s + 5) could act
            while processes_with(host.uid, marker):
                await asyncio.sleep(0.05)
        finally:
            await t.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_output_cap_kills_the_command_and_bounds_memory(ssh_fleet: SSHFleet) -> None:
    host = ssh_fleet.hosts[0]
    marker = f"flood{secrets.token_hex(4)}"

    async def main() -> None:
        t = ssh(ssh_fleet, host)
        try:
            with pytest.raises(OutputTooLargeError, match="printed more than 1048576 bytes"):
                await t.run(f"yes {marker}", timeout=120, max_output=1 << 20)
            small = await t.run("printf 'x%.0s' $(seq 100)", max_output=1 << 20)
            assert small.stdout == "x" * 100
        finally:
            await t.close()

    asyncio.run(main())
    wait_for(lambda: not processes_with(host.uid, marker), timeout=30.0)


def test_local_transport_output_cap_and_timeout_kill_the_group() -> None:
    marker = f"local{secrets.token_hex(4)}"
    uid = psutil.Process().uids().real

    async def main() -> None:
        t = LocalTransport("local")
        with pytest.raises(OutputTooLargeError):
            await t.run(f"yes {marker}", timeout=120, max_output=1 << 16)
        with pytest.raises(TransportTimeoutError):
            await t.run(sleepers(marker), timeout=0.5)

    asyncio.run(main())
    wait_for(lambda: not processes_with(uid, marker), timeout=30.0)


# -- a broken or failing node never stops the loop ----------------------------------------

def _node_infra(project: Path, host: FleetHost) -> Path:
    """The supervisor directory of ``host`` for this project (``<work>/.infra``)."""
    return host.home / "work" / project.parent.name / ".infra"


def _as_node_user(path: Path, host: FleetHost) -> None:
    for parent in [path, *path.parents]:
        if parent == host.home:
            break
        os.chown(parent, host.uid, -1)


def _launch(project: Path, *pins: tuple[str, str], duration: float = 2.0) -> str:
    paths = [spec(project, eid, duration=duration, interval=0.2) for eid, _ in pins]
    args = [a for p in paths for a in ("--config", str(p))]
    placement = ",".join(f"{eid}:{node}" for eid, node in pins)
    proc = cli(project, *args, "--placement", placement, "--monitor-duration", "0")
    assert proc.returncode == 0, proc.stderr
    return str(status_json(project)["run_id"])


def test_broken_node_is_one_line_in_status_and_watch_goes_on(project: Path,
                                                            ssh_fleet: SSHFleet) -> None:
    fast_health(project)
    run_id = _launch(project, ("intact", "node2"), ("victim", "node1"), duration=3.0)
    node1 = ssh_fleet.host("node1")
    junk = _node_infra(project, node1) / "runs" / run_id / "junk"
    junk.mkdir(parents=True)
    (junk / "state.json").write_text(json.dumps(
        {"run_id": run_id, "instance_id": "junk", "state": "exited", "pid": "abc"}))
    _as_node_user(junk / "state.json", node1)
    try:
        proc = cli(project, "status", run_id)
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("node1: broken"), proc.stderr
        assert "pid: expected an integer, got 'abc'" in lines[0]
        assert "intact" in proc.stdout and "victim" in proc.stdout
        doc = json.loads(cli(project, "status", run_id, "--json").stdout)
        assert set(doc["broken"]) == {"node1"} and doc["unreachable"] == {}

        watch = cli(project, "watch", run_id, "--duration", "60", "--json")
        # node1 cannot be read, so the run is not over; the other node was watched through
        assert watch.returncode == 0 and "Traceback" not in watch.stderr, watch.stderr
        states = {i["instance_id"]: i["state"] for i in json.loads(watch.stdout)["instances"]}
        assert states["intact"] == "exited", states
        check_log((project / "logs" / run_id / "intact.log").read_text(), "intact")
        store = Store(project / "logs" / "state.db")
        moves = [e.message for e in store.events(run_id) if e.kind == "node"
                 and e.subject == "node1"]
        store.close()
        assert any("-> broken" in m and "pid" in m for m in moves), moves
    finally:
        shutil.rmtree(junk, ignore_errors=True)
    # repaired: the next watch reads node1 again and finishes the run
    final = cli(project, "watch", run_id, "--duration", "60", "--json")
    assert final.returncode == 0, final.stderr
    states = {i["instance_id"]: i["state"] for i in json.loads(final.stdout)["instances"]}
    assert states == {"intact": "exited", "victim": "exited"}


def _unwritable_workloads(project: Path, host: FleetHost) -> Path:
    """Make rsync fail on ``host`` while the node stays reachable and its supervisor works:
    the deployed tree's ``workloads`` directory belongs to root, read-only."""
    work = host.home / "work" / project.parent.name
    blocked = work / "workloads"
    blocked.mkdir(parents=True, exist_ok=True)
    _as_node_user(work, host)
    os.chown(blocked, 0, 0)
    blocked.chmod(0o555)
    return blocked


def test_failed_deploy_fails_the_instance_and_the_run_ends(project: Path,
                                                           ssh_fleet: SSHFleet) -> None:
    fast_health(project)
    work = _unwritable_workloads(project, ssh_fleet.host("node3"))
    try:
        s = spec(project, "nodeploy", duration=2.0)
        proc = cli(project, "--config", str(s), "--placement", "nodeploy:node3",
                   "--monitor-duration", "60", "--json")
    finally:
        work.chmod(0o755)
    assert proc.returncode == 1, proc.stderr  # finished, with the instance failed
    assert "Traceback" not in proc.stderr and "log sync failed" not in proc.stderr
    (inst,) = json.loads(proc.stdout)["instances"]
    assert inst["state"] == "failed"
    assert inst["reason"].startswith("deploy to node3 failed: permission denied"), inst


def test_watch_of_a_half_done_launch_whose_deploy_fails_ends(project: Path,
                                                             ssh_fleet: SSHFleet) -> None:
    """The coordinator died before deploying; `watch` resumes the launch, the deploy fails:
    the instance is failed with the reason and watch ends instead of redeploying forever."""
    from infra.config import check_spec_set, load_cluster, load_spec
    from infra.placement import plan
    from infra.runner.lifecycle import RunSession
    from infra.transport.pool import ConnectionPool

    fast_health(project)
    s = spec(project, "orphan", duration=2.0)
    cluster = load_cluster(project / "cluster_config.yaml")
    specs = check_spec_set([load_spec(s, cluster)])
    result = plan(cluster, specs, pins={"orphan": "node3"})
    store = Store.for_log_dir(cluster.log_dir)

    async def record_only() -> str:
        async with ConnectionPool(cluster) as pool:
            return RunSession(cluster, store, pool).record_run(specs, result, {})

    run_id = asyncio.run(record_only())
    store.close()
    work = _unwritable_workloads(project, ssh_fleet.host("node3"))
    try:
        proc = cli(project, "watch", run_id, "--duration", "60", "--json")
    finally:
        work.chmod(0o755)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    (inst,) = json.loads(proc.stdout)["instances"]
    assert inst["state"] == "failed", inst
    assert inst["reason"].startswith("deploy to node3 failed: permission denied"), inst


def test_instance_without_record_on_its_node_stops_being_asked(project: Path,
                                                              ssh_fleet: SSHFleet) -> None:
    """The node's supervisor directory was wiped after the instance ended: its log cannot be
    read; watch gives up after a few tries with an event, and ends."""
    fast_health(project)
    run_id = _launch(project, ("wiped", "node2"), duration=1.0)
    infra = _node_infra(project, ssh_fleet.host("node2"))
    wait_for(lambda: status_json(project, run_id)["instances"][0]["state"] == "exited")
    shutil.rmtree(infra / "runs" / run_id)
    proc = cli(project, "watch", run_id, "--duration", "60", "--json")
    assert proc.returncode == 0, proc.stderr
    store = Store(project / "logs" / "state.db")
    events = [e.message for e in store.events(run_id) if e.subject == "wiped"]
    store.close()
    assert any(m.startswith("gave up: its log cannot be copied from node2") for m in events), \
        events


def test_watch_duration_is_kept_with_a_frozen_node(project: Path, ssh_fleet: SSHFleet) -> None:
    cfg = yaml.safe_load((project / "cluster_config.yaml").read_text())
    # slow bounds: without the duration bounding the tick, one call would take 40 s
    cfg["health_check"].update({"timeout_seconds": 40, "keepalive_seconds": 10,
                                "keepalive_count_max": 3})
    (project / "cluster_config.yaml").write_text(yaml.safe_dump(cfg))
    run_id = _launch(project, ("cold", "node3"), duration=60.0)
    host = ssh_fleet.host("node3")
    host.pause()
    try:
        started = time.monotonic()
        proc = cli(project, "watch", run_id, "--duration", "3", "--json")
        elapsed = time.monotonic() - started
    finally:
        host.resume()
    assert proc.returncode == 0, proc.stderr
    assert elapsed < 20, elapsed
    assert json.loads(proc.stdout)["instances"][0]["instance_id"] == "cold"
    cli(project, "stop", run_id, "--grace", "1")
