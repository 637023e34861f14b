"""A node-side pool over real SSH: the daemon runs as the node's user, outlives the
connection that handed it the tasks, and runs setup once, every task once, cleanup once."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from infra.runner.supervisor_client import (
    HookState,
    PoolPhase,
    PoolState,
    PoolSuite,
    PoolSyncRequest,
    RestartPolicy,
    StartRequest,
    SupervisorClient,
)
from infra.transport.ssh import SSHTransport
from tests.sshfleet import SSHFleet

pytestmark = pytest.mark.integration

BOUND = 60.0  # only so a broken pool cannot hang the suite


def test_pool_over_ssh_survives_the_connection(ssh_fleet: SSHFleet) -> None:
    host = ssh_fleet.hosts[0]
    node = ssh_fleet.node_config(host)
    health = ssh_fleet.health_section()
    run_id = f"pool-{uuid.uuid4().hex[:8]}"
    marks = f"{host.home}/marks-{run_id}"
    tasks = [f"t.{i:04d}" for i in range(9)]
    hook = 'echo "{} $INFRA_SUITE_NAME $INFRA_WORKER_COUNT" >> ' + marks
    command = (f'echo "start $INFRA_INSTANCE_ID $(grep Cpus_allowed_list /proc/self/status '
               f'| cut -f2)" >> {marks}; sleep 0.3; echo "end $INFRA_INSTANCE_ID" >> {marks}')

    async def scenario() -> tuple[PoolState, str, str]:
        first_transport = SSHTransport(node, health)
        first = SupervisorClient(first_transport, node)
        answer = await first.pool_sync(PoolSyncRequest(
            run_id=run_id, pool="suite", workers=3, close=True,
            suite=PoolSuite(suite_id=f"{run_id}/suite", suite_name="suite",
                            setup=hook.format("setup"), cleanup=hook.format("cleanup")),
            add=tuple(StartRequest(run_id=run_id, instance_id=t, command=command,
                                   restart=RestartPolicy(auto_restart=False))
                      for t in tasks)))
        assert answer.daemon_alive and answer.workers == 3
        await first_transport.close()  # the coordinator goes away at once

        second_transport = SSHTransport(node, health)
        second = SupervisorClient(second_transport, node)
        try:
            deadline = time.monotonic() + BOUND
            while True:
                instances, pools = await second.status_with_pools(run_id)
                if pools and pools[0].phase.is_final and not pools[0].daemon_alive:
                    break
                assert time.monotonic() < deadline, pools
                await asyncio.sleep(0.2)
            assert sorted(s.instance_id for s in instances) == tasks
            text = (await second_transport.run(f"cat {marks}", check=True)).stdout
            owner = (await second_transport.run(
                f"stat -c %U {node.remote_work_dir}/.infra/runs/{run_id}/.pools/suite/"
                "state.json", check=True)).stdout.strip()
            return pools[0], text, owner
        finally:
            await second.stop(run_id, grace=1.0)
            await second_transport.close()

    pool, text, owner = asyncio.run(scenario())
    assert pool.phase is PoolPhase.DONE and pool.setup.state is HookState.OK
    assert pool.cleanup.state is HookState.OK and pool.done == 9
    rows = [ln.split() for ln in text.splitlines()]
    assert rows[0] == ["setup", "suite", "3"] and rows[-1] == ["cleanup", "suite", "3"]
    assert [r[0] for r in rows].count("setup") == 1
    assert [r[0] for r in rows].count("cleanup") == 1
    assert sorted(r[1] for r in rows if r[0] == "start") == tasks
    assert sorted(r[1] for r in rows if r[0] == "end") == tasks
    cores = {tuple(c) for c in pool.worker_cores}
    assert all(len(c) == 1 for c in cores)  # round_robin: one core per worker
    assert {r[2] for r in rows if r[0] == "start"} <= {str(c[0]) for c in cores}
    assert owner == host.user
