"""The supervisor over real SSH: runs as the node's user, survives the connection, resumes logs."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from infra.runner.supervisor_client import (
    InstanceState,
    InstanceStatus,
    StartRequest,
    SupervisorClient,
)
from infra.transport.ssh import SSHTransport
from tests.sshfleet import SSHFleet

pytestmark = pytest.mark.integration

PROGS = Path(__file__).parent / "progs"
BOUND = 30.0  # only so a broken supervisor cannot hang the suite
LINES = 30

_T = TypeVar("_T")


def arun(coro: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coro)


async def wait_final(client: SupervisorClient, run_id: str, instance_id: str,
                     bound: float = BOUND) -> InstanceState:
    deadline = time.monotonic() + bound
    while True:
        states = [s for s in await client.status(run_id) if s.instance_id == instance_id]
        if states and states[0].is_final:
            return states[0]
        assert time.monotonic() < deadline, f"never ended: {states}"
        await asyncio.sleep(0.1)


def test_detached_over_ssh_survives_disconnect_and_log_resumes(ssh_fleet: SSHFleet) -> None:
    host = ssh_fleet.hosts[0]
    node = ssh_fleet.node_config(host)
    health = ssh_fleet.health_section()
    run_id = f"ssh-{uuid.uuid4().hex[:8]}"
    prog = f"{host.home}/lines.py"

    async def scenario() -> None:
        first_transport = SSHTransport(node, health)
        first = SupervisorClient(first_transport, node)
        await first_transport.put(str(PROGS / "lines.py"), prog)
        command = f"{node.python_path} {prog} {LINES} 0 --sleep 0.1"
        started = await first.start(StartRequest(run_id=run_id, instance_id="a",
                                                 command=command))
        assert started.status is InstanceStatus.RUNNING and started.pid is not None
        owner = await first_transport.run(f"ps -o user:64= -p {started.pid}")
        assert owner.stdout.strip() == host.user
        assert started.log_path is not None and started.log_path.startswith(str(host.home))

        # read the first lines, then drop the connection while the program runs
        head = b""
        async with contextlib.aclosing(first.follow(run_id, "a", 0)) as stream:
            async for chunk in stream:
                head += chunk
                if head.count(b"\n") >= 5:
                    break
        await first_transport.close()

        second_transport = SSHTransport(node, health)
        second = SupervisorClient(second_transport, node)
        try:
            (found,) = await second.status(run_id)
            assert found.instance_id == "a" and found.pid == started.pid
            assert found.status in (InstanceStatus.RUNNING, InstanceStatus.EXITED)
            tail = b"".join([c async for c in second.follow(run_id, "a", len(head))])
            final = await wait_final(second, run_id, "a")
            assert final.status is InstanceStatus.EXITED and final.exit_code == 0
            assert len(final.attempts) == 1
            text = (head + tail).decode()
            assert text.splitlines() == [f"line {i}" for i in range(1, LINES + 1)]
            assert final.log_size == len(head + tail)
            # the follower of the dropped connection does not linger on the node
            deadline = time.monotonic() + BOUND
            while True:
                ps = await second_transport.run(f"ps -u {host.user} -o args=")
                followers = [ln for ln in ps.stdout.splitlines() if " follow " in ln]
                if not followers:
                    break
                assert time.monotonic() < deadline, followers
                await asyncio.sleep(0.1)
        finally:
            await second.stop(run_id, grace=1.0)
            await second_transport.close()

    arun(scenario())


def test_status_and_stop_on_every_host(ssh_fleet: SSHFleet) -> None:
    run_id = f"ssh-{uuid.uuid4().hex[:8]}"

    async def one_host(index: int) -> list[InstanceState]:
        host = ssh_fleet.hosts[index]
        node = ssh_fleet.node_config(host)
        transport = SSHTransport(node, ssh_fleet.health_section())
        client = SupervisorClient(transport, node)
        try:
            await client.start(StartRequest(run_id=run_id, instance_id=f"i{index}",
                                            command="sleep 60"))
            (running,) = await client.status(run_id)
            assert running.status is InstanceStatus.RUNNING and running.alive
            return await client.stop(run_id, grace=1.0)
        finally:
            await transport.close()

    async def scenario() -> list[list[InstanceState]]:
        return list(await asyncio.gather(*(one_host(i) for i in range(len(ssh_fleet.hosts)))))

    for index, stopped in enumerate(arun(scenario())):
        assert [(s.node, s.instance_id, s.status) for s in stopped] == [
            (ssh_fleet.hosts[index].name, f"i{index}", InstanceStatus.STOPPED)]
