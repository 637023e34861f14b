"""Batched starts (``supervisor.py start-batch``) judged exactly like single starts: the node
lock taken once, every request checked against the live claims and those accepted before it
in the same batch, one answer per request. Driven for real through the local transport."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
from pathlib import Path
from typing import Any

import pytest

from infra.config.model import NodeConfig
from infra.errors import CapacityRefusedError, CommandFailedError, InfraError, StaleCopyError
from infra.remote import supervisor as script
from infra.runner.supervisor_client import InstanceState, InstanceStatus, SupervisorClient
from infra.transport.local import LocalTransport
from infra.transport.marker import extract_json
from tests.test_claims import start_req
from tests.test_supervisor import NODE_PYTHON, client

__all__ = ["client"]  # the fixture, re-used


@pytest.fixture
def node(tmp_path: Path) -> NodeConfig:
    """A node with room for two instances (slots), its own work and claims directories."""
    return NodeConfig(name="bench", host="localhost", remote_work_dir=str(tmp_path / "work"),
                      python_path=NODE_PYTHON, max_instances=2, ram_gb=8.0,
                      claims_dir=str(tmp_path / "claims"))


def stop_all(node: NodeConfig, runs: list[str]) -> None:
    """Stop every run left on the node (nothing outlives the test)."""
    c = SupervisorClient(LocalTransport(node.name), node)
    for run in runs:
        if (Path(node.remote_work_dir) / ".infra" / "runs" / run).exists():
            asyncio.run(c.stop(run, grace=0.2))


def claim_files(node: NodeConfig) -> list[str]:
    return sorted(p.name for p in Path(node.claims_dir or "").glob("*.json"))


def test_a_batch_that_would_overcommit_has_its_excess_refused(
        node: NodeConfig, client: SupervisorClient) -> None:
    reqs = [start_req(node, "r-one", name) for name in ("a", "b", "c")]
    try:
        answers = asyncio.run(client.start_batch(reqs))
        first, second, third = answers
        assert isinstance(first, InstanceState) and first.status is InstanceStatus.RUNNING
        assert isinstance(second, InstanceState) and second.status is InstanceStatus.RUNNING
        assert isinstance(third, CapacityRefusedError)
        assert "bench full: 2/2 held by run r-one (a)" in third.reason
        assert not (Path(node.remote_work_dir) / ".infra" / "runs" / "r-one" / "c").exists()
        assert claim_files(node) == ["r-one+a+p0.json", "r-one+b+p0.json"]
        # a batch also counts the live claims from before it
        later = asyncio.run(client.start_batch([start_req(node, "r-two", "d")]))
        assert isinstance(later[0], CapacityRefusedError)
        # a repeated batch finds the same copies
        again = asyncio.run(client.start_batch(reqs[:2]))
        assert [a.already for a in again if isinstance(a, InstanceState)] == [True, True]
        assert [a.pid for a in again if isinstance(a, InstanceState)] == [first.pid, second.pid]
    finally:
        stop_all(node, ["r-one", "r-two"])


def test_each_request_of_a_batch_gets_its_own_answer(node: NodeConfig,
                                                    client: SupervisorClient) -> None:
    roomy = dataclasses.replace(node, max_instances=4)
    try:
        asyncio.run(client.start(start_req(roomy, "r-one", "old")))
        answers = asyncio.run(client.start_batch([
            start_req(roomy, "r-one", "old", placement="p1"),   # an earlier copy still runs
            start_req(roomy, "r-one", "empty", command=""),     # a bad request
            start_req(roomy, "r-one", "fine"),
        ]))
        stale, bad, fine = answers
        assert isinstance(stale, StaleCopyError)
        assert "an earlier copy (p0) of old still runs" in stale.reason
        assert isinstance(bad, CommandFailedError) and not isinstance(bad, StaleCopyError)
        assert "needs a non-empty command" in bad.one_line()
        assert isinstance(fine, InstanceState) and fine.status is InstanceStatus.RUNNING
        assert claim_files(roomy) == ["r-one+fine+p0.json", "r-one+old+p0.json"]
    finally:
        stop_all(roomy, ["r-one"])


def test_two_batches_at_once_never_overcommit(node: NodeConfig) -> None:
    """Two coordinators' batches of three, at once, on a two-slot node: two start in all."""
    async def go() -> list[list[InstanceState | InfraError]]:
        clients = [SupervisorClient(LocalTransport(node.name), node) for _ in range(2)]
        return list(await asyncio.gather(*(
            c.start_batch([start_req(node, f"r-{side}", f"x{i}") for i in range(3)])
            for side, c in zip("ab", clients, strict=True))))

    try:
        answers = [a for batch in asyncio.run(go()) for a in batch]
        started = [a for a in answers if isinstance(a, InstanceState)]
        refused = [a for a in answers if isinstance(a, CapacityRefusedError)]
        assert len(started) == 2 and len(refused) == 4, answers
        assert len(claim_files(node)) == 2
    finally:
        stop_all(node, ["r-a", "r-b"])


@pytest.mark.parametrize(("stdin", "error"), [
    ("not json", "the start-batch input is not JSON"),
    ('{"run_id": "r"}', "the start-batch input must be a JSON list of start requests"),
])
def test_bad_batch_input_is_one_line(tmp_path: Path, stdin: str, error: str) -> None:
    out = subprocess.run([NODE_PYTHON, script.__file__, "start-batch", "--root",
                          str(tmp_path)], input=stdin, capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    doc: Any = extract_json(out.stdout)
    assert doc == {"ok": False, "error": doc["error"]} and error in doc["error"]


def test_a_batch_entry_that_is_not_an_object_is_refused_alone(tmp_path: Path) -> None:
    out = subprocess.run([NODE_PYTHON, script.__file__, "start-batch", "--root",
                          str(tmp_path)], input='[42]', capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0
    assert extract_json(out.stdout) == {"ok": True, "results": [
        {"ok": False, "error": "the start request must be a JSON object"}]}


def test_an_empty_batch_asks_nothing(node: NodeConfig, client: SupervisorClient) -> None:
    assert asyncio.run(client.start_batch([])) == []
