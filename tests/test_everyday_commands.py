"""Everyday commands without nodes: the `runs` list (views and the real CLI on a real
SQLite store), `logs` argument forms, `prune` selection and its views, `stop`'s summary.

The fleet side (prune on real nodes, stop on a finished run, logs of the latest run) is in
tests/test_everyday_e2e.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from infra.cli import views
from infra.config.model import ExperimentSpec
from infra.runner.lifecycle import StopReport
from infra.runner.prune import LocalState, PruneReport, RunOutcome, Skipped, select
from infra.runner.supervisor_client import PrunedRun, PruneState
from infra.state import InstancePhase, RunState, Store
from tests.builders import assert_one_line_error, run_cli

T0 = 1_790_000_000.0


def render(renderable: object, width: int = 160) -> str:
    console = Console(width=width, record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def add_run(store: Store, run_id: str, created: float,
            instances: list[tuple[str, str, InstancePhase]],
            state: RunState = RunState.FINISHED) -> None:
    rows = [(iid, node, ExperimentSpec(experiment_id=iid, command="true", source=Path(".")),
             None) for iid, node, _ in instances]
    store.create_run(run_id, "cluster_config.yaml", {}, rows)
    store.db.execute("UPDATE runs SET created_at=? WHERE run_id=?", (created, run_id))
    store.set_run_state(run_id, state)
    for iid, _node, phase in instances:
        store.update_instance(run_id, iid, state=phase, started_at=created + 1,
                              ended_at=created + 10 if phase.finished else None)


@pytest.fixture()
def lab(tmp_path: Path) -> Iterator[tuple[Path, Store]]:
    """A cluster config (nodes n1, n2) and its store with three runs, oldest first."""
    cfg = tmp_path / "cluster_config.yaml"
    cfg.write_text(yaml.safe_dump({"nodes": [
        {"name": n, "host": f"{n}.lab.invalid", "ram_gb": 8, "max_instances": 2}
        for n in ("n1", "n2")]}))
    store = Store(tmp_path / "logs" / "state.db")
    add_run(store, "r-20261101-100000-aaaa", T0, [("a", "n1", InstancePhase.EXITED),
                                                   ("b", "n2", InstancePhase.FAILED)],
            RunState.FAILED)
    add_run(store, "r-20261102-100000-bbbb", T0 + 86400, [("a", "n1", InstancePhase.EXITED)])
    add_run(store, "r-20261103-100000-cccc", T0 + 2 * 86400,
            [("a", "n2", InstancePhase.RUNNING), ("hello", "n1", InstancePhase.EXITED)],
            RunState.RUNNING)
    store.update_instance("r-20261103-100000-cccc", "a", previous_nodes=["n1"], moves=1)
    yield cfg, store
    store.close()


# --------------------------------------------------------------------------- runs: views

def test_run_summary_counts_states_and_every_node_used(lab: tuple[Path, Store]) -> None:
    _cfg, store = lab
    run = store.run("r-20261103-100000-cccc")
    row = views.run_summary(run, store.instances(run.run_id))
    assert row.instances == 2
    assert row.states == {"running": 1, "exited": 1}
    assert row.nodes == ("n1", "n2")  # the moved instance's earlier node counts
    assert row.state == "running" and row.pruned_at is None


def test_runs_table_and_json_render_newest_first_as_given(lab: tuple[Path, Store]) -> None:
    _cfg, store = lab
    rows = [views.run_summary(r, store.instances(r.run_id)) for r in store.runs(20)]
    text = render(views.runs_table(rows))
    order = [text.index(r) for r in ("r-20261103-100000-cccc", "r-20261102-100000-bbbb",
                                      "r-20261101-100000-aaaa")]
    assert order == sorted(order)
    assert "1 exited, 1 failed" in text and "n1, n2" in text
    doc = views.runs_json(rows)
    assert next(r["run_id"] for r in doc["runs"]) == "r-20261103-100000-cccc"
    assert doc["runs"][2] == {"run_id": "r-20261101-100000-aaaa", "created_at": T0,
                              "state": "failed", "instances": 2,
                              "states": {"exited": 1, "failed": 1}, "nodes": ["n1", "n2"],
                              "pruned_at": None, "commit": None, "tags": []}
    store.mark_pruned("r-20261101-100000-aaaa", at=T0 + 5)
    rows = [views.run_summary(r, store.instances(r.run_id)) for r in store.runs(20)]
    assert "failed (pruned)" in render(views.runs_table(rows))
    assert views.runs_json(rows)["runs"][2]["pruned_at"] == T0 + 5


# --------------------------------------------------------------------------- runs: CLI

def test_runs_command_lists_newest_first_with_limit(lab: tuple[Path, Store],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    cfg, _store = lab
    code, out, err = run_cli(capsys, "--cluster-config", str(cfg), "runs", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert [r["run_id"] for r in doc["runs"]] == [
        "r-20261103-100000-cccc", "r-20261102-100000-bbbb", "r-20261101-100000-aaaa"]
    assert doc["runs"][0]["instances"] == 2 and doc["runs"][0]["nodes"] == ["n1", "n2"]
    code, out, err = run_cli(capsys, "--cluster-config", str(cfg), "runs", "--limit", "1")
    assert code == 0, err
    assert "r-20261103-100000-cccc" in out and "r-20261102" not in out
    code, out, err = run_cli(capsys, "--cluster-config", str(cfg), "runs", "--limit", "0")
    assert code == 2 and "--limit" in err and "Traceback" not in err


def test_runs_command_without_a_store_says_so(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "cluster_config.yaml"
    cfg.write_text(yaml.safe_dump({"nodes": [{"name": "n1", "host": "n1.lab.invalid",
                                              "ram_gb": 8}]}))
    code, out, err = run_cli(capsys, "--cluster-config", str(cfg), "runs", "--json")
    assert code == 0, err
    assert json.loads(out) == {"runs": []}
    assert not (tmp_path / "logs" / "state.db").exists()  # listing creates nothing


# --------------------------------------------------------------------------- logs forms

def test_logs_one_argument_forms_fail_in_one_line(lab: tuple[Path, Store],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    cfg, _store = lab
    base = ("--cluster-config", str(cfg), "logs")
    code, _out, err = run_cli(capsys, *base, "nosuch")
    assert_one_line_error(code, err, "latest run r-20261103-100000-cccc has no instance "
                          "'nosuch'", "hello")
    code, _out, err = run_cli(capsys, *base, "r-20261102")
    assert_one_line_error(code, err, "names a run, not an instance",
                          "logs r-20261102 INSTANCE")
    code, _out, err = run_cli(capsys, *base, "r-20261102", "nosuch")
    assert_one_line_error(code, err, "has no instance 'nosuch'")


def test_logs_refuses_an_instance_name_that_is_also_a_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "cluster_config.yaml"
    cfg.write_text(yaml.safe_dump({"nodes": [{"name": "n1", "host": "n1.lab.invalid",
                                              "ram_gb": 8}]}))
    store = Store(tmp_path / "logs" / "state.db")
    add_run(store, "r-20261101-100000-aaaa", T0, [("a", "n1", InstancePhase.EXITED)])
    add_run(store, "r-20261102-100000-bbbb", T0 + 1,
            [("r-20261101-100000-aaaa", "n1", InstancePhase.EXITED)])
    store.close()
    code, _out, err = run_cli(capsys, "--cluster-config", str(cfg), "logs",
                              "r-20261101-100000-aaaa")
    assert_one_line_error(code, err, "is an instance of the latest run", "also a run id",
                          "logs RUN INSTANCE")


def test_logs_of_a_pruned_run_says_so(lab: tuple[Path, Store],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    cfg, store = lab
    store.mark_pruned("r-20261102-100000-bbbb")
    code, _out, err = run_cli(capsys, "--cluster-config", str(cfg), "logs",
                              "r-20261102", "a")
    assert_one_line_error(code, err, "run r-20261102-100000-bbbb was pruned", "logs are gone")


# --------------------------------------------------------------------------- prune: rules

def test_prune_selects_old_finished_runs_and_names_the_rest(lab: tuple[Path, Store]) -> None:
    _cfg, store = lab
    cutoff = T0 + 3 * 86400
    cands, skipped = select(store, cutoff, ["n1", "n2"])
    assert [(c.run_id, c.nodes) for c in cands] == [
        ("r-20261102-100000-bbbb", ("n1",)), ("r-20261101-100000-aaaa", ("n1", "n2"))]
    assert cands[0].ended_at == T0 + 86400 + 10  # its last instance's end
    assert [s.run_id for s in skipped] == ["r-20261103-100000-cccc"]
    assert "a not over in the store" in skipped[0].reason
    # newer than the cutoff: neither pruned nor listed
    cands, skipped = select(store, T0 + 86400, ["n1", "n2"])
    assert [c.run_id for c in cands] == ["r-20261101-100000-aaaa"] and not skipped
    # already pruned: gone from the selection; a node missing from the config: skipped
    store.mark_pruned("r-20261102-100000-bbbb")
    cands, skipped = select(store, cutoff, ["n1"])
    assert cands == []
    assert {s.run_id: s.reason for s in skipped}["r-20261101-100000-aaaa"] == (
        "used node(s) not in the cluster config: n2")


def test_prune_with_a_bad_duration_is_one_line(lab: tuple[Path, Store],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    cfg, _store = lab
    code, _out, err = run_cli(capsys, "--cluster-config", str(cfg), "prune",
                              "--older-than", "a week")
    assert_one_line_error(code, err, "--older-than: 'a week' is not a duration")


# --------------------------------------------------------------------------- prune: views

def _report(dry_run: bool) -> PruneReport:
    gone = PruneState.WOULD_PRUNE if dry_run else PruneState.PRUNED
    local = LocalState.WOULD_PRUNE if dry_run else LocalState.PRUNED
    return PruneReport(
        dry_run=dry_run, cutoff=T0,
        runs=[RunOutcome("r-1", T0 - 10, {"n1": PrunedRun("r-1", gone, 2048)}, local, 1536),
              RunOutcome("r-2", T0 - 20, {"n1": PrunedRun("r-2", PruneState.ACTIVE, 10,
                                                          ("x",)),
                                          "n2": "failed: connection refused"},
                         LocalState.KEPT, 99, "n1: still active there (x)")],
        skipped=[Skipped("r-3", "x not over in the store")],
        node_errors={"n2": "connection refused"})


def test_prune_views_list_per_node_and_local_with_sizes() -> None:
    text = render(views.prune_table(_report(True)), width=200)
    assert "dry run: nothing removed" in text
    assert "n1: would prune 2.0 KiB" in text and "would prune 1.5 KiB" in text
    assert "n1: active (x) 10 B" in text and "n2: failed: connection refused" in text
    assert "kept 99 B" in text and "n1: still active there (x)" in text
    lines = render(views.prune_lines(_report(True)), width=200)
    assert "skipped r-3: x not over in the store" in lines
    assert "n2: not reachable (connection refused)" in lines
    assert "1 run(s), would free 2.0 KiB on nodes and 1.5 KiB locally" in lines
    doc = views.prune_json(_report(False))
    assert doc["runs"][0] == {"run_id": "r-1", "ended_at": T0 - 10,
                              "nodes": {"n1": {"state": "pruned", "bytes": 2048,
                                               "active": [], "error": None}},
                              "local": {"state": "pruned", "bytes": 1536}, "reason": ""}
    assert doc["runs"][1]["nodes"]["n2"]["state"] == "error"
    assert doc["unreachable"] == {"n2": "connection refused"}
    assert doc["bytes"] == {"nodes": 2048, "local": 1536} and doc["ok"] is False


def test_format_bytes() -> None:
    assert [views.format_bytes(n) for n in (0, 1023, 1024, 5 * 1024 ** 2, 3 * 1024 ** 4)] == [
        "0 B", "1023 B", "1.0 KiB", "5.0 MiB", "3072.0 GiB"]


# --------------------------------------------------------------------------- stop: views

def test_stop_lines_say_what_was_stopped_and_what_was_already_over() -> None:
    text = render(views.stop_lines(StopReport(stopped=["s"], already_over={"q": "exited",
                                                                          "f": "failed"})))
    assert "stopped: s" in text
    assert "already over (left as they were): f failed, q exited" in text
    assert "nothing to stop" in render(views.stop_lines(StopReport()))
    assert views.stop_json(StopReport(already_over={"q": "exited"})) == {
        "stopped": [], "cancelled": [], "already_over": {"q": "exited"}, "errors": {}}
