"""The store's run lease and run-id rules, on a real SQLite file (fast, no nodes).

The lease decides which coordinator acts on a run: it lasts ``ttl`` seconds unless renewed
by its holder, a dead holder on this machine is taken over at once, ``steal`` takes it
regardless, and only the holder can release it. Times are passed in (``now=``) so the
expiry rules are checked without waiting.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.config.model import ExperimentSpec
from infra.errors import StateError, UsageError
from infra.state import FailureClass, InstancePhase, Store
from infra.state.store import Lease, holder_is_dead, may_take

HOST = socket.gethostname()
T0 = 1_000_000.0


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "logs" / "state.db")
    yield s
    s.close()


def add_run(store: Store, run_id: str) -> str:
    spec = ExperimentSpec(experiment_id="a", command="true", source=Path("."))
    store.create_run(run_id, "cluster_config.yaml", {}, [("a", "node1", spec, None)])
    return run_id


@pytest.fixture()
def live_pid() -> Iterator[int]:
    """A process on this machine that is alive for the test (stands for another watcher)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture()
def dead_pid() -> int:
    """The pid of a process on this machine that has exited (a killed watcher)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------- pure rules

def test_may_take_rules() -> None:
    alive = lambda holder: False  # noqa: E731 - nobody is known dead
    held = Lease("lab:1", T0 + 30)
    assert may_take(None, "lab:2", T0, holder_dead=alive)                   # free
    assert may_take(held, "lab:1", T0, holder_dead=alive)                   # renewal
    assert not may_take(held, "lab:2", T0, holder_dead=alive)               # live, other
    assert not may_take(held, "lab:2", T0 + 29.9, holder_dead=alive)
    assert may_take(held, "lab:2", T0 + 30, holder_dead=alive)              # expired
    assert may_take(held, "lab:2", T0, steal=True, holder_dead=alive)       # stolen
    assert may_take(held, "lab:2", T0, holder_dead=lambda h: h == "lab:1")  # holder died


def test_holder_is_dead_only_for_gone_local_processes(live_pid: int, dead_pid: int) -> None:
    assert holder_is_dead(f"{HOST}:{dead_pid}")
    assert not holder_is_dead(f"{HOST}:{live_pid}")
    assert not holder_is_dead(f"other-host.invalid:{dead_pid}")  # can't tell: wait for ttl
    assert not holder_is_dead("garbage")


# --------------------------------------------------------------------------- store lease

def test_lease_is_exclusive_until_it_expires(store: Store, live_pid: int) -> None:
    run = add_run(store, "r-1")
    me, other = f"{HOST}:{live_pid}", "other-host.invalid:77"
    assert store.lease(run) is None
    assert store.acquire_lease(run, me, 30, now=T0) is None
    assert store.lease(run) == Lease(me, T0 + 30)
    assert store.acquire_lease(run, other, 30, now=T0 + 29) == me
    assert store.lease(run) == Lease(me, T0 + 30)  # a refused claim changes nothing
    assert store.acquire_lease(run, other, 30, now=T0 + 30) is None  # expired: taken over
    assert store.lease(run) == Lease(other, T0 + 60)


def test_renewal_by_the_holder_extends_and_fails_once_taken_over(store: Store,
                                                                 live_pid: int) -> None:
    run = add_run(store, "r-1")
    me, other = f"{HOST}:{live_pid}", "other-host.invalid:77"
    assert store.acquire_lease(run, me, 10, now=T0) is None
    assert store.acquire_lease(run, me, 10, now=T0 + 8) is None  # renewed before expiry
    assert store.acquire_lease(run, other, 10, now=T0 + 15) == me  # still live: T0 + 18
    # the holder froze past its lease; another coordinator took it over ...
    assert store.acquire_lease(run, other, 10, now=T0 + 40) is None
    # ... so the holder's next renewal fails and names the new holder
    assert store.acquire_lease(run, me, 10, now=T0 + 41) == other
    assert store.lease(run) == Lease(other, T0 + 50)


def test_dead_holder_on_this_host_is_taken_over_at_once(store: Store, dead_pid: int,
                                                        live_pid: int) -> None:
    run = add_run(store, "r-1")
    assert store.acquire_lease(run, f"{HOST}:{dead_pid}", 30, now=T0) is None
    assert store.acquire_lease(run, f"{HOST}:{live_pid}", 30, now=T0 + 1) is None
    assert store.lease(run) == Lease(f"{HOST}:{live_pid}", T0 + 31)
    # a live holder on this host, or any holder elsewhere, is not taken over early
    assert store.acquire_lease(run, "other-host.invalid:5", 30, now=T0 + 2) == \
        f"{HOST}:{live_pid}"


def test_steal_takes_a_live_lease(store: Store, live_pid: int) -> None:
    run = add_run(store, "r-1")
    assert store.acquire_lease(run, f"{HOST}:{live_pid}", 30, now=T0) is None
    assert store.acquire_lease(run, "thief:1", 30, steal=True, now=T0 + 1) is None
    assert store.lease(run) == Lease("thief:1", T0 + 31)


def test_only_the_holder_releases(store: Store) -> None:
    run = add_run(store, "r-1")
    assert store.acquire_lease(run, "lab:1", 30, now=T0) is None
    assert store.release_lease(run, "lab:2") is False
    assert store.lease(run) == Lease("lab:1", T0 + 30)
    assert store.release_lease(run, "lab:1") is True
    assert store.lease(run) is None
    assert store.acquire_lease(run, "lab:2", 30, now=T0 + 1) is None  # free again


def test_leases_are_per_run_and_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    first = Store(path)
    add_run(first, "r-1")
    add_run(first, "r-2")
    assert first.acquire_lease("r-1", "lab:1", 30, now=T0) is None
    assert first.acquire_lease("r-2", "lab:2", 30, now=T0) is None  # another run: free
    first.close()
    second = Store(path)  # another coordinator process opening the same file
    assert second.acquire_lease("r-1", "lab:2", 30, now=T0 + 1) == "lab:1"
    second.close()


def test_lease_of_an_unknown_run_is_a_state_error(store: Store) -> None:
    with pytest.raises(StateError, match="no run 'r-nope'"):
        store.acquire_lease("r-nope", "lab:1", 30)
    with pytest.raises(StateError, match="no run 'r-nope'"):
        store.lease("r-nope")


def test_a_locked_store_is_a_state_error_not_a_sqlite_one(store: Store, tmp_path: Path) -> None:
    run = add_run(store, "r-1")
    blocker = sqlite3.connect(str(store.path), timeout=0.1, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        store.db.execute("PRAGMA busy_timeout=100")
        with pytest.raises(StateError, match="cannot take the lease"):
            store.acquire_lease(run, "lab:1", 30)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert store.acquire_lease(run, "lab:1", 30) is None


# --------------------------------------------------------------------------- run ids

def test_resolve_run_exact_prefix_latest(store: Store) -> None:
    for rid in ("r-20261122-0457-aa", "r-20261122-0457-ab", "r-20261123-1000-cc"):
        add_run(store, rid)
    assert store.resolve_run("r-20261122-0457-ab").run_id == "r-20261122-0457-ab"
    assert store.resolve_run("r-20261123").run_id == "r-20261123-1000-cc"  # unique prefix
    assert store.resolve_run(None).run_id == "r-20261123-1000-cc"          # latest
    with pytest.raises(UsageError) as err:
        store.resolve_run("r-20261122-0457")
    assert "ambiguous (2 runs match)" in str(err.value)
    assert "r-20261122-0457-aa" in str(err.value) and "r-20261122-0457-ab" in str(err.value)
    with pytest.raises(UsageError, match="no run 'r-2027'"):
        store.resolve_run("r-2027")


def test_resolve_run_exact_id_wins_over_longer_ids(store: Store) -> None:
    add_run(store, "r-1")
    add_run(store, "r-10")
    assert store.resolve_run("r-1").run_id == "r-1"


def test_resolve_run_prefix_is_literal(store: Store) -> None:
    """SQL LIKE wildcards and case folding must not make a prefix match: `_`, `%`, case."""
    add_run(store, "r-20261122-0457-aa")
    for prefix in ("r_2026", "r-%", "R-2026", "%"):
        with pytest.raises(UsageError, match="no run"):
            store.resolve_run(prefix)


def test_resolve_run_lists_at_most_five_candidates(store: Store) -> None:
    for i in range(7):
        add_run(store, f"r-x-{i}")
    with pytest.raises(UsageError) as err:
        store.resolve_run("r-x")
    text = str(err.value)
    assert "(7 runs match)" in text and "and 2 more" in text
    assert "r-x-4" in text and "r-x-5" not in text


def test_no_runs_is_a_usage_error(store: Store) -> None:
    with pytest.raises(UsageError, match="no runs recorded yet"):
        store.resolve_run(None)
    with pytest.raises(UsageError, match="no run 'r-1'"):
        store.resolve_run("r-1")


def test_a_file_that_is_not_a_store_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "state.db"
    bad.write_text("this is not SQLite\n")
    with pytest.raises(StateError) as err:
        Store(bad)
    assert str(bad) in err.value.one_line() and "not a usable state store" in str(err.value)


# --------------------------------------------------------------------------- failure classes, pins

def test_pins_come_from_the_stored_plan(store: Store) -> None:
    spec = ExperimentSpec(experiment_id="a", command="true", source=Path("."))
    plan = {"instances": {"a": {"node": "node1", "pinned": True},
                          "b": {"node": "node2", "pinned": False}, "c": "garbage"}}
    store.create_run("r-pins", "cluster_config.yaml", plan,
                     [("a", "node1", spec, None), ("b", "node2", spec, None)])
    assert store.run("r-pins").pinned == frozenset({"a"})
    store.create_run("r-old", "cluster_config.yaml", {}, [("a", "node1", spec, None)])
    assert store.run("r-old").pinned == frozenset()  # runs recorded before pins were read


def test_failure_class_round_trip_and_an_older_store(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "state.db"
    store = Store(path)
    add_run(store, "r-fc")
    assert store.instance("r-fc", "a").failure_class is None
    store.update_instance("r-fc", "a", failure_class=FailureClass.BROKEN_COMMAND)
    assert store.instance("r-fc", "a").failure_class is FailureClass.BROKEN_COMMAND
    store.update_instance("r-fc", "a", failure_class=None)
    assert store.instance("r-fc", "a").failure_class is None
    store.db.execute("ALTER TABLE instances DROP COLUMN failure_class")  # as before
    store.close()
    store = Store(path)  # the column is added back in place
    try:
        assert store.instance("r-fc", "a").failure_class is None
        store.update_instance("r-fc", "a", failure_class=FailureClass.RESOURCE)
        assert store.instance("r-fc", "a").failure_class is FailureClass.RESOURCE
    finally:
        store.close()
    assert FailureClass.parse("from-a-newer-node") is None


def test_processes_opening_one_new_store_at_once_all_get_it(tmp_path: Path) -> None:
    """A coordinator creating the store while `status` opens it: both add the columns an
    older store lacks; only one may (the other then sees them), never 'duplicate column'."""
    script = ("import sys, time\n"
              "from pathlib import Path\n"
              "from infra.state import Store\n"
              "start = float(sys.argv[2])\n"
              "while time.time() < start: pass\n"
              "Store(Path(sys.argv[1])).close()\n")
    for round_ in range(12):
        db = tmp_path / f"state{round_}.db"
        start = f"{__import__('time').time() + 1.5:.3f}"  # all of them open it together
        procs = [subprocess.Popen([sys.executable, "-c", script, str(db), start],
                                  stderr=subprocess.PIPE, text=True) for _ in range(6)]
        errors = [p.communicate(timeout=120)[1] for p in procs]
        assert [p.returncode for p in procs] == [0] * 6, errors


def test_an_unchanged_instance_is_not_written_again(store: Store) -> None:
    """A watch tick that hears the same state writes nothing: ``updated_at`` stays."""
    run_id = add_run(store, "r-same")
    store.update_instance(run_id, "a", state=InstancePhase.RUNNING, pid=41, exit_code=None,
                          started_at=T0 + 0.25, reason="", failure_class=None)
    first = store.instance(run_id, "a").updated_at
    db = sqlite3.connect(str(store.path))
    db.execute("UPDATE instances SET updated_at=? WHERE instance_id='a'", (T0,))
    db.commit()
    db.close()
    store.update_instance(run_id, "a", changed_only=True, state=InstancePhase.RUNNING, pid=41,
                          exit_code=None, started_at=T0 + 0.25, reason="",
                          failure_class=None)
    assert store.instance(run_id, "a").updated_at == T0  # the same values: no write
    store.update_instance(run_id, "a", changed_only=True, state=InstancePhase.EXITED, pid=41,
                          exit_code=0, started_at=T0 + 0.25, reason="", failure_class=None)
    now = store.instance(run_id, "a")
    assert (now.state, now.exit_code) == (InstancePhase.EXITED, 0) and now.updated_at > T0
    assert first > T0


def test_a_run_record_decodes_its_plan_only_when_asked(store: Store) -> None:
    """A watch reads the run every tick; its stored plan (every node's evaluation of every
    instance: megabytes for a large run) is decoded on first use only, pins included."""
    spec = ExperimentSpec(experiment_id="a", command="true", source=Path("."))
    plan = {"instances": {"a": {"node": "node1", "pinned": True}}, "big": ["x" * 100] * 1000}
    store.create_run("r-lazy", "cluster_config.yaml", plan, [("a", "node1", spec, None)])
    run = store.run("r-lazy")
    assert "plan" not in vars(run) and run.state.value
    assert run.pinned == frozenset({"a"}) and run.plan == plan


def test_the_plan_is_kept_out_of_the_runs_row(store: Store) -> None:
    """The lease columns sit in the runs row: a large plan there would be read past on every
    lease check and copied again by every renewal. A run recorded before (plan inline) reads
    as before."""
    spec = ExperimentSpec(experiment_id="a", command="true", source=Path("."))
    plan = {"instances": {"a": {"node": "node1", "pinned": True}}, "big": ["x" * 100] * 1000}
    store.create_run("r-side", "cluster_config.yaml", plan, [("a", "node1", spec, None)])
    row = store.db.execute("SELECT length(plan_json) AS n FROM runs WHERE run_id='r-side'")
    assert row.fetchone()["n"] < 10
    assert store.run("r-side").plan == plan and store.run_state("r-side")[0].value == "planned"
    old = {"instances": {"a": {"node": "node1", "pinned": True}}}
    store.create_run("r-inline", "cluster_config.yaml", {}, [("a", "node1", spec, None)])
    store.db.execute("UPDATE runs SET plan_json=? WHERE run_id='r-inline'", (json.dumps(old),))
    assert store.run("r-inline").plan == old and store.run("r-inline").pinned == {"a"}
