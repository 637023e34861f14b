"""Node-side claims, placement identity and fencing, driven for real through the local
transport: the supervisor script runs as a subprocess, exactly as it does on a node."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from infra.config.model import ExperimentSpec, NodeConfig
from infra.errors import CapacityRefusedError, StaleCopyError
from infra.placement.allocation import Allocation
from infra.remote import supervisor as script
from infra.runner.claims import claim_request, node_capacity
from infra.runner.supervisor_client import (
    InstanceStatus,
    RestartPolicy,
    StartRequest,
    SupervisorClient,
)
from infra.transport.local import LocalTransport
from tests.builders import wait_for
from tests.test_supervisor import NODE_PYTHON, client, prog

__all__ = ["client"]  # the fixture, re-used

SLEEPER = "sleep 60"


# --------------------------------------------------------------------------- pure rules

def demand(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"slots": 1, "ram_gb": 1.0, "gpu_memory_gb": 0.0, "cpu_cores": 0.0,
                            "devices": [], "ports": []}
    base.update(kw)
    return base


def held(run: str, inst: str, **kw: Any) -> dict[str, Any]:
    return {"run_id": run, "instance_id": inst, "coordinator": "ws2:4121", "demand": demand(**kw)}


CAP = {"slots": 2, "ram_gb": 4.0, "gpu_memory_gb": 8.0, "cpu_cores": 4}


def test_refusal_names_the_holder_when_slots_are_gone() -> None:
    claims = [held("r-a", "x"), held("r-b", "y")]
    why = script.claim_refusal("rpi1", CAP, demand(), claims)
    assert why is not None and why.startswith("rpi1 full: 2/2 held by run r-a (x) from ws2:4121")


@pytest.mark.parametrize("want, have, fragment", [
    (demand(ram_gb=2.5), [held("r", "a", ram_gb=2.0)], "not enough RAM left: needs 2.5, 2 of 4"),
    (demand(gpu_memory_gb=5), [held("r", "a", gpu_memory_gb=4)], "not enough GPU memory"),
    (demand(cpu_cores=3), [held("r", "a", cpu_cores=2)], "not enough CPU cores"),
    (demand(devices=["gpu0"]), [held("r", "a", devices=["gpu0"])], "device gpu0 is held by"),
    (demand(ports=[8080]), [held("r", "a", ports=[8080])], "port 8080 is held by run r (a)"),
])
def test_refusal_for_each_resource(want: dict[str, Any], have: list[dict[str, Any]],
                                   fragment: str) -> None:
    why = script.claim_refusal("n", CAP, want, have)
    assert why is not None and fragment in why, why


def test_what_fits_is_accepted_exactly_at_capacity() -> None:
    assert script.claim_refusal("n", CAP, demand(ram_gb=2.0), [held("r", "a", ram_gb=2.0)]) \
        is None
    assert script.claim_refusal("n", CAP, demand(devices=["gpu1"], ports=[81]),
                                [held("r", "a", devices=["gpu0"], ports=[80])]) is None
    assert script.claim_refusal("n", {}, demand(), [held("r", "a")] * 9) is None  # no capacity


def test_claim_request_uses_the_placement_accounting() -> None:
    node = NodeConfig(name="orin", host="orin.lab.invalid", ram_gb=32.0, reserved_ram_gb=2.0,
                      gpu=True, gpu_memory_gb=32.0, unified_memory=True, max_instances=3)
    spec = ExperimentSpec(experiment_id="llm", command="true", source=Path("."), ram_gb=4.0,
                          gpu_required=True, gpu_memory_gb=6.0)
    alloc = Allocation(instance_id="llm", node="orin", device_ids=("gpu0",),
                       ports=(("api", 8000),))
    req = claim_request(node, spec, alloc)
    assert node_capacity(node) == {"slots": 3.0, "ram_gb": 30.0, "gpu_memory_gb": 0.0,
                                   "cpu_cores": 1.0}
    assert req["demand"] == {"slots": 1, "ram_gb": 10.0, "gpu_memory_gb": 0.0, "cpu_cores": 0.0,
                             "devices": ["gpu0"], "ports": [8000]}  # unified: one pool
    assert req["spec"]["experiment_id"] == "llm" and req["force"] is False


# --------------------------------------------------------------------------- on a node

@pytest.fixture
def node(tmp_path: Path) -> NodeConfig:
    return NodeConfig(name="bench", host="localhost", remote_work_dir=str(tmp_path / "work"),
                      python_path=NODE_PYTHON, max_instances=1, ram_gb=4.0,
                      claims_dir=str(tmp_path / "claims"))


def start_req(node: NodeConfig, run_id: str, iid: str, command: str = SLEEPER, *,
              ram_gb: float = 1.0, placement: str = "p0", fence: bool = False,
              claim: bool = True) -> StartRequest:
    spec = ExperimentSpec(experiment_id=iid, command=command, source=Path("."), ram_gb=ram_gb)
    return StartRequest(run_id=run_id, instance_id=iid, command=command,
                        restart=RestartPolicy(auto_restart=False), placement=placement,
                        claim=claim_request(node, spec, None) if claim else None,
                        claims_dir=node.claims_dir, fence=fence)


def test_a_full_node_refuses_a_second_start_with_the_holder(node: NodeConfig,
                                                            client: SupervisorClient) -> None:
    first = asyncio.run(client.start(start_req(node, "r-one", "a")))
    assert first.status is InstanceStatus.RUNNING
    with pytest.raises(CapacityRefusedError) as err:
        asyncio.run(client.start(start_req(node, "r-two", "b")))
    assert "bench full: 1/1 held by run r-one (a)" in err.value.reason
    assert not (Path(node.remote_work_dir) / ".infra" / "runs" / "r-two" / "b").exists()
    claims = asyncio.run(client.claims())
    assert [(c.run_id, c.instance_id) for c in claims] == [("r-one", "a")]
    assert claims[0].spec is not None and claims[0].spec.ram_gb == 1.0


def test_an_ended_instance_frees_its_slot_without_anyone_watching(
        node: NodeConfig, client: SupervisorClient) -> None:
    asyncio.run(client.start(start_req(node, "r-one", "quick", "true")))
    # nobody asks for its status: the supervisor itself drops the claim when it ends
    wait_for(lambda: not list(Path(node.claims_dir or "").glob("*.json")))
    second = asyncio.run(client.start(start_req(node, "r-two", "b")))
    assert second.status is InstanceStatus.RUNNING


def test_a_claim_left_by_a_killed_supervisor_is_dropped(node: NodeConfig,
                                                         client: SupervisorClient) -> None:
    import os
    import signal
    state = asyncio.run(client.start(start_req(node, "r-one", "a")))
    os.kill(state.supervisor_pid or 0, signal.SIGKILL)
    os.killpg(state.pgid or 0, signal.SIGKILL)
    second = asyncio.run(client.start(start_req(node, "r-two", "b")))
    assert second.status is InstanceStatus.RUNNING
    names = sorted(p.name for p in Path(node.claims_dir or "").glob("*.json"))
    assert names == ["r-two+b+p0.json"]


def test_simultaneous_starts_never_overcommit(node: NodeConfig, tmp_path: Path) -> None:
    """Twelve starts at once from separate processes on a one-slot node: exactly one runs."""
    async def go() -> list[Any]:
        clients = [SupervisorClient(LocalTransport(node.name), node) for _ in range(12)]
        return await asyncio.gather(
            *(c.start(start_req(node, f"r-{i:02d}", "x")) for i, c in enumerate(clients)),
            return_exceptions=True)

    try:
        results = asyncio.run(go())
        started = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, CapacityRefusedError)]
        assert len(started) == 1 and len(refused) == 11, results
    finally:
        c = SupervisorClient(LocalTransport(node.name), node)
        for i in range(12):
            asyncio.run(c.stop(f"r-{i:02d}", grace=0.2)) if (
                Path(node.remote_work_dir) / ".infra" / "runs" / f"r-{i:02d}").exists() else None


def test_a_repeated_start_of_the_same_placement_is_the_same_copy(
        node: NodeConfig, client: SupervisorClient) -> None:
    first = asyncio.run(client.start(start_req(node, "r-one", "a")))
    again = asyncio.run(client.start(start_req(node, "r-one", "a")))
    assert again.already and again.pid == first.pid and again.placement == "p0"


def test_a_later_placement_starts_a_fresh_copy_and_keeps_the_old(
        node: NodeConfig, client: SupervisorClient) -> None:
    first = asyncio.run(client.start(start_req(node, "r-one", "a", "echo first")))
    wait_for(lambda: asyncio.run(client.status("r-one"))[0].is_final)
    back = asyncio.run(client.start(start_req(node, "r-one", "a", SLEEPER, placement="p2")))
    assert not back.already and back.status is InstanceStatus.RUNNING
    assert back.placement == "p2" and back.pid != first.pid
    kept = list((Path(node.remote_work_dir) / ".infra" / "runs" / "r-one" / ".previous").iterdir())
    assert [p.name.split(".")[:2] for p in kept] == [["a", "p0"]]
    assert (kept[0] / "output.log").read_text() == "first\n"


def test_a_later_placement_is_refused_while_the_old_copy_runs(
        node: NodeConfig, client: SupervisorClient) -> None:
    asyncio.run(client.start(start_req(node, "r-one", "a")))
    with pytest.raises(StaleCopyError) as err:
        asyncio.run(client.start(start_req(node, "r-one", "a", placement="p1")))
    assert "an earlier copy (p0) of a still runs" in err.value.reason


def test_an_expired_fence_stops_the_work_and_says_why(node: NodeConfig,
                                                      client: SupervisorClient) -> None:
    state = asyncio.run(client.start(start_req(node, "r-one", "a", fence=True)))
    asyncio.run(client.status("r-one", fence_seconds=0.5, holder="ws:1"))
    done = wait_for(lambda: [s for s in asyncio.run(client.status("r-one")) if s.is_final])
    assert done[0].fenced and done[0].status is InstanceStatus.STOPPED
    assert done[0].final_reason and done[0].final_reason.startswith("fenced:")
    assert done[0].pid == state.pid
    assert not list(Path(node.claims_dir or "").glob("*.json"))


def test_a_cleared_fence_never_stops_the_work(node: NodeConfig, client: SupervisorClient,
                                              tmp_path: Path) -> None:
    marker = tmp_path / "ticks"
    command = prog("lines.py", 400, 0, "--sleep", 0.02) + f" > {marker}"
    asyncio.run(client.start(start_req(node, "r-one", "a", command, fence=True)))
    # a fence long enough that the clearing call (~0.4 s on a loaded box) comes before it ends
    asyncio.run(client.status("r-one", fence_seconds=3.0, holder="ws:1"))
    asyncio.run(client.status("r-one", fence_clear=True, holder="ws:1"))
    fence = json.loads((Path(node.remote_work_dir) / ".infra" / "runs" / "r-one" / "a" /
                        "fence.json").read_text())
    assert fence["deadline"] is None
    # the program writes for ~8 s; well past the old deadline (5 s of lines) it still runs
    wait_for(lambda: marker.exists() and len(marker.read_text().splitlines()) > 250)
    state = asyncio.run(client.status("r-one"))[0]
    assert state.status is InstanceStatus.RUNNING and not state.fenced


def test_unfenced_work_ignores_fence_renewals(node: NodeConfig,
                                              client: SupervisorClient) -> None:
    asyncio.run(client.start(start_req(node, "r-one", "a", fence=False)))
    asyncio.run(client.status("r-one", fence_seconds=0.1, holder="ws:1"))
    assert not (Path(node.remote_work_dir) / ".infra" / "runs" / "r-one" / "a" /
                "fence.json").exists()
