"""The node-side ``prune`` subcommand, driven for real through LocalTransport + client:
finished runs go, a run with any active instance is refused and left whole, an interrupted
earlier prune is finished, and nothing outside ``runs/RUN`` is touched."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from infra.config.model import NodeConfig
from infra.errors import CommandFailedError, UsageError
from infra.runner.supervisor_client import PruneState, SupervisorClient
from tests.test_supervisor import client, node, request, run, wait_final, wait_for

__all__ = ["client", "node"]  # the fixtures, re-used


def test_prune_removes_finished_runs_and_refuses_an_active_one(
        client: SupervisorClient, node: NodeConfig, tmp_path: Path) -> None:
    runs = Path(node.remote_work_dir) / ".infra" / "runs"
    cdir = str(tmp_path / "claims")

    async def scenario() -> None:
        await client.start(request("r-done", "a", "echo done"))
        await wait_final(client, "r-done", "a")
        await client.start(request("r-mixed", "over", "true"))
        await wait_final(client, "r-mixed", "over")
        await client.start(request("r-mixed", "live", "sleep 300", claims_dir=cdir,
                                   claim={"capacity": {}, "demand": {"slots": 1}}))
        await wait_for(client, "r-mixed", "live", lambda s: s.pid is not None, "running")

    run(scenario())
    claims = sorted(p.name for p in (tmp_path / "claims").iterdir())
    assert any(n.endswith(".json") for n in claims)  # the live instance's claim
    dry = run(client.prune(["r-done", "r-mixed", "r-none"], dry_run=True))
    assert [(p.run_id, p.state) for p in dry] == [
        ("r-done", PruneState.WOULD_PRUNE), ("r-mixed", PruneState.ACTIVE),
        ("r-none", PruneState.ABSENT)]
    assert dry[0].bytes > 0 and dry[1].active == ("live",)
    assert (runs / "r-done").is_dir()
    done = run(client.prune(["r-done", "r-mixed"]))
    assert [(p.run_id, p.state) for p in done] == [
        ("r-done", PruneState.PRUNED), ("r-mixed", PruneState.ACTIVE)]
    assert not (runs / "r-done").exists()
    assert (runs / "r-mixed" / "live" / "state.json").is_file()
    assert (runs / "r-mixed" / "over" / "state.json").is_file()  # the run stays whole
    assert sorted(p.name for p in (tmp_path / "claims").iterdir()) == claims
    assert sorted(os.listdir(runs)) == ["r-mixed"]  # nothing renamed aside is left


def test_prune_finishes_an_interrupted_prune_and_leaves_links_alone(
        client: SupervisorClient, node: NodeConfig, tmp_path: Path) -> None:
    runs = Path(node.remote_work_dir) / ".infra" / "runs"
    run(client.status())  # installs the script, makes the root
    runs.mkdir(parents=True, exist_ok=True)
    aside = runs / ".prune-r-cut-4242"  # a prune killed between its rename and its delete
    (aside / "a").mkdir(parents=True)
    (aside / "a" / "output.log").write_text("x" * 100)
    (aside / "a" / "state.json").write_text('{"state": "exited"}')
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    (runs / "r-link").symlink_to(outside)
    got = run(client.prune(["r-cut", "r-link"]))
    assert got[0].state is PruneState.PRUNED and got[0].bytes >= 100
    assert not aside.exists()
    assert got[1].state is PruneState.ERROR and "not a directory" in (got[1].error or "")
    assert (outside / "keep.txt").read_text() == "keep" and (runs / "r-link").is_symlink()
    with pytest.raises(UsageError):
        run(client.prune(["../x"]))
    with pytest.raises(CommandFailedError, match="invalid run id"):
        run(client._call(["prune", "--root", client.root, "--run", ".."]))
