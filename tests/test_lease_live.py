"""The run lease between real coordinators: `cluster-experiment watch` subprocesses on the
sshd fleet. Exactly one watcher acts (streams the log home, fetches results), the other
reports; the reporter takes over when the actor is killed; an actor frozen past its lease
notices the failed renewal once resumed and stops acting; reading (`logs`, `logs -f`,
`status`) needs no lease and works while a watcher holds it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from infra.config import load_cluster
from infra.monitor.loop import Monitor, MonitorOutcome
from infra.monitor.snapshot import RunSnapshot
from infra.runner.lifecycle import RunSession, local_log_path
from infra.state import Store
from infra.transport.pool import ConnectionPool
from tests.test_live_ops import _lease
from tests.test_run_e2e import check_log, cli, project, spec, status_json, wait_for

pytestmark = pytest.mark.integration
__all__ = ["project"]  # the fixture, re-used


def set_lease(root: Path, seconds: float) -> None:
    """The watchers' lease length (``health_check.lease_seconds``)."""
    cfg = yaml.safe_load((root / "cluster_config.yaml").read_text())
    cfg["health_check"]["lease_seconds"] = seconds
    (root / "cluster_config.yaml").write_text(yaml.safe_dump(cfg))


def launch(root: Path, eid: str, node: str, until: Path) -> str:
    """Start one instance detached (no watcher) that runs until ``until`` exists (at most
    five minutes); returns the run id."""
    s = spec(root, eid, duration=300.0, interval=0.2, until=until)
    proc = cli(root, "--config", str(s), "--placement", f"{eid}:{node}",
               "--monitor-duration", "0")
    assert proc.returncode == 0, proc.stderr
    return str(status_json(root)["run_id"])


class Watcher:
    """A `cluster-experiment watch RUN --json` subprocess; output goes to files (a full pipe
    would block it)."""

    def __init__(self, root: Path, run_id: str, name: str) -> None:
        self.out = root / f"{name}.out"
        self.err = root / f"{name}.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "infra.cli.main", "watch", run_id, "--json"],
                cwd=root, stdout=out, stderr=err, env={**os.environ, "COLUMNS": "200"})
        self.holder = f"{socket.gethostname()}:{self.proc.pid}"

    def finish(self, timeout: float = 120.0) -> int:
        """Wait for the watcher to end by itself; its exit code."""
        return self.proc.wait(timeout=timeout)

    def stderr(self) -> str:
        return self.err.read_text()


@contextmanager
def watchers(root: Path, run_id: str, *names: str) -> Iterator[list[Watcher]]:
    """Watchers started one after the other: the first holds the lease, the others report."""
    started: list[Watcher] = []
    db = root / "logs" / "state.db"
    try:
        started.append(Watcher(root, run_id, names[0]))
        first = started[0].holder
        wait_for(lambda: _lease(db, run_id) == first, timeout=60)
        for name in names[1:]:
            started.append(Watcher(root, run_id, name))
            wait_for(lambda: lease_said(root, run_id, f"run is watched by {first}"), timeout=60)
        yield started
    finally:
        for w in started:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGCONT)
                w.proc.kill()
                w.proc.wait()


def lease_events(root: Path, run_id: str, after: int = 0) -> list[tuple[int, str]]:
    """(id, message) of the run's lease events, oldest first."""
    store = Store(root / "logs" / "state.db")
    try:
        return [(e.id, e.message) for e in store.events(run_id, after_id=after)
                if e.kind == "lease"]
    finally:
        store.close()


def lease_said(root: Path, run_id: str, text: str, after: int = 0) -> bool:
    return any(text in m for _, m in lease_events(root, run_id, after))


def last_event_id(root: Path, run_id: str) -> int:
    store = Store(root / "logs" / "state.db")
    try:
        events = store.events(run_id, limit=100000)
        return events[-1].id if events else 0
    finally:
        store.close()


def log_steps(path: Path) -> int:
    return path.read_text().count(" step ") if path.exists() else 0


def test_two_watchers_one_acts_and_the_other_takes_over_after_sigkill(
        project: Path, go_flag: Path) -> None:
    set_lease(project, 300)  # takeover below is by the dead-holder rule, long before expiry
    run_id = launch(project, "duo", "node1", go_flag)
    db = project / "logs" / "state.db"
    log = project / "logs" / run_id / "duo.log"
    with watchers(project, run_id, "first", "second") as (first, second):
        assert _lease(db, run_id) == first.holder  # exactly one acts ...
        assert f"run is watched by {first.holder}" in second.stderr()  # ... the other reports
        wait_for(lambda: log_steps(log) >= 3, timeout=60)  # the actor streams the log home
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(timeout=30)
        wait_for(lambda: _lease(db, run_id) == second.holder, timeout=60)
        go_flag.touch()  # the workload ends now
        assert second.finish() == 0, second.stderr()
    assert lease_said(project, run_id, "lease taken over: acting now")
    assert "lease taken over: acting now" in second.stderr()
    final = status_json(project, run_id)["instances"][0]
    assert final["state"] == "exited" and final["exit_code"] == 0
    check_log(log.read_text(), "duo")  # complete, every line exactly once
    assert (project / "logs" / run_id / "duo" / "out" / "duo" / "summary.json").exists()
    assert _lease(db, run_id) is None  # released by the one that acted last


def test_reading_needs_no_lease_while_a_watcher_acts(project: Path, go_flag: Path) -> None:
    run_id = launch(project, "reader", "node2", go_flag)
    log = project / "logs" / run_id / "reader.log"
    with watchers(project, run_id, "watcher") as (watcher,):
        wait_for(lambda: log_steps(log) >= 2, timeout=60)  # the watcher acts
        status = cli(project, "status", run_id, "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["instances"][0]["state"] == "running"
        go_flag.touch()  # the workload ends now: `logs -f` below follows it to its end
        followed = cli(project, "logs", run_id, "reader", "-f")
        assert followed.returncode == 0, followed.stderr
        check_log(followed.stdout, "reader")  # the copy so far, then the node's log: once
        once = cli(project, "logs", run_id[:12], "reader")
        assert once.returncode == 0, once.stderr
        assert "showing the local copy only" not in once.stderr
        check_log(once.stdout, "reader")
        assert watcher.finish() == 0, watcher.stderr()
    # no reader was turned away and the lease never changed hands (a reader taking it would
    # have made the watcher say "lease lost to ...")
    assert lease_events(project, run_id) == []
    check_log(log.read_text(), "reader")  # the readers wrote nothing into the watcher's copy
    assert (project / "logs" / run_id / "reader" / "out" / "reader" / "summary.json").exists()


def test_watcher_frozen_past_its_lease_stops_acting_when_resumed(
        project: Path, go_flag: Path) -> None:
    set_lease(project, 5)
    run_id = launch(project, "frost", "node3", go_flag)
    db = project / "logs" / "state.db"
    log = project / "logs" / run_id / "frost.log"
    with watchers(project, run_id, "first", "second") as both:
        wait_for(lambda: log_steps(log) >= 3, timeout=60)
        actor = next(w for w in both if w.holder == _lease(db, run_id))
        reporter = next(w for w in both if w is not actor)
        actor.proc.send_signal(signal.SIGSTOP)  # frozen (a suspended laptop, a debugger)
        try:
            wait_for(lambda: _lease(db, run_id) == reporter.holder, timeout=60)
            mark = last_event_id(project, run_id)
            steps = log_steps(log)
            wait_for(lambda: log_steps(log) > steps, timeout=60)  # the new actor streams
        finally:
            actor.proc.send_signal(signal.SIGCONT)
        lost = f"lease lost to {reporter.holder}; now only reporting"
        wait_for(lambda: lease_said(project, run_id, lost, after=mark), timeout=60)
        go_flag.touch()  # the workload ends now
        assert reporter.finish() == 0, reporter.stderr()
        assert actor.finish() == 0, actor.stderr()
    assert lost in actor.stderr()
    final = status_json(project, run_id)["instances"][0]
    assert final["state"] == "exited" and final["exit_code"] == 0
    check_log(log.read_text(), "frost")  # the resumed one appended nothing twice
    assert (project / "logs" / run_id / "frost" / "out" / "frost" / "summary.json").exists()


def test_monitor_stops_acting_the_tick_its_lease_is_taken_and_takes_it_back(
        project: Path, go_flag: Path) -> None:
    """Through the library: another holder takes the lease (steal) mid-run; the monitor says
    so, cancels its stream and writes nothing more into the copy; when the lease frees it
    acts again and the copy ends complete, every line once."""
    run_id = launch(project, "steady", "node1", go_flag)
    cluster = load_cluster(project / "cluster_config.yaml")
    store = Store.for_log_dir(cluster.log_dir)
    other_store = Store.for_log_dir(cluster.log_dir)  # the other coordinator's connection
    log = local_log_path(cluster, run_id, "steady")
    intruder = "other-host.invalid:7"
    seen: list[tuple[str, str, str]] = []
    sizes: dict[str, int] = {}
    reported: list[RunSnapshot] = []  # snapshots taken while the intruder held the lease

    def on_snapshot(snap: RunSnapshot) -> None:
        """Called after every tick: steal the lease once lines stream, free it 4 ticks on,
        and end the workload once the monitor acts again."""
        if "stolen" not in sizes:
            if log_steps(log) >= 3:
                assert other_store.acquire_lease(run_id, intruder, 600, steal=True) is None
                sizes["stolen"] = log.stat().st_size
        elif "freed" not in sizes and snap.watcher == intruder:
            reported.append(snap)
            if len(reported) >= 4:
                sizes["freed"] = log.stat().st_size
                assert other_store.release_lease(run_id, intruder)
        elif "freed" in sizes and snap.watcher == "":
            go_flag.touch()  # acting again: the workload may end now

    async def go() -> MonitorOutcome:
        async with ConnectionPool(cluster) as pool:
            session = RunSession(cluster, store, pool,
                                 emit=lambda k, s, m: seen.append((k, s, m)))
            return await Monitor(session, run_id, tick=0.5, on_snapshot=on_snapshot,
                                 lease_ttl=600).run(120)

    outcome = asyncio.run(go())
    lease_msgs = [m for k, _, m in seen if k == "lease"]
    assert lease_msgs == [f"lease lost to {intruder}; now only reporting",
                          "lease taken over: acting now"], lease_msgs
    assert sizes["freed"] == sizes["stolen"]  # nothing written while another held the lease
    assert outcome.finished and outcome.lease_holder is None
    check_log(log.read_text(), "steady")
    assert store.lease(run_id) is None
    store.close()
    other_store.close()
