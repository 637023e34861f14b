"""Node-side worker pools, driven for real through the client and the local transport: the
supervisor's ``pool-sync`` starts a detached pool daemon that runs tasks as instances.

Tasks are tests/progs/pooltask.py: each appends "start ID NS CPUS PID" and "end ID NS" lines
(CLOCK_MONOTONIC, system wide) to a marker file, so every assertion is on what ran: how
often, in which order, how many at once, on which cores. No timing assertions."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from infra.campaign.model import CpuBinding
from infra.config.model import NodeConfig
from infra.errors import CommandFailedError
from infra.remote import pool as pool_script
from infra.runner.supervisor_client import (
    HookState,
    InstanceStatus,
    PoolPhase,
    PoolState,
    PoolSuite,
    PoolSyncRequest,
    RestartPolicy,
    StartRequest,
    SupervisorClient,
)
from infra.transport.local import LocalTransport
from tests.test_supervisor import NODE_PYTHON, node

__all__ = ["node"]  # the fixture, re-used

PROGS = Path(__file__).parent / "progs"
PY = shlex.quote(sys.executable)
BOUND = 60.0  # only so a broken pool cannot hang the suite
RUN = "r-pool"


@pytest.fixture
def client(node: NodeConfig) -> Iterator[SupervisorClient]:
    c = SupervisorClient(LocalTransport(node.name), node)
    yield c
    root = Path(node.remote_work_dir) / ".infra" / "runs"
    for pdir in root.glob("*/.pools/*"):  # leave no daemon and no task behind
        doc = json.loads((pdir / "daemon.json").read_text()) if (
            pdir / "daemon.json").exists() else {}
        if pool_script.daemon_alive(str(pdir)):
            os.kill(int(doc["pid"]), signal.SIGKILL)
    if root.is_dir():
        for run in root.iterdir():
            if not run.name.startswith("."):
                asyncio.run(c.stop(run.name, grace=0.2))


def arun(coro: Any) -> Any:
    return asyncio.run(coro)


def task(marks: Path, task_id: str, pause: float = 0.0, **kw: Any) -> StartRequest:
    command = " ".join([PY, "-S", "-E", shlex.quote(str(PROGS / "pooltask.py")),
                        shlex.quote(str(marks)), shlex.quote(task_id), repr(pause)])
    return StartRequest(run_id=RUN, instance_id=task_id, command=command,
                        restart=RestartPolicy(auto_restart=False, retry_delay_seconds=0.0),
                        **kw)


def suite(marks: Path | None = None, *, setup: str | None = None, cleanup: str | None = None,
          binding: CpuBinding = CpuBinding.ROUND_ROBIN,
          cores: tuple[int, ...] = ()) -> PoolSuite:
    hook = ("echo {} $INFRA_SUITE_ID $INFRA_SUITE_NAME $INFRA_WORKER_COUNT >> "
            + shlex.quote(str(marks))) if marks is not None else None
    return PoolSuite(suite_id=f"{RUN}/train", suite_name="train",
                     setup=setup if setup is not None else (hook.format("setup") if hook else None),
                     cleanup=cleanup if cleanup is not None else (
                         hook.format("cleanup") if hook else None),
                     cpu_binding=binding, cores=cores)


def sync(client: SupervisorClient, workers: int = 3, **kw: Any) -> PoolState:
    kw.setdefault("idle_exit_seconds", 60.0)
    kw.setdefault("grace", 1.0)
    return arun(client.pool_sync(PoolSyncRequest(run_id=RUN, pool="train", workers=workers,
                                                 **kw)))


def pool_now(client: SupervisorClient, name: str = "train") -> PoolState:
    pools = [p for p in arun(client.pools(RUN)) if p.name == name]
    assert pools, "the pool is not in status"
    return pools[0]


def settle(client: SupervisorClient, predicate: Callable[[PoolState], bool],
           what: str) -> PoolState:
    deadline = time.monotonic() + BOUND
    while True:
        state = pool_now(client)
        if predicate(state):
            return state
        assert time.monotonic() < deadline, f"pool never {what}: {state}"
        time.sleep(0.05)


def finished(client: SupervisorClient) -> PoolState:
    return settle(client, lambda p: p.phase.is_final and not p.daemon_alive, "finished")


def lines(path: Path) -> list[list[str]]:
    return [ln.split() for ln in path.read_text().splitlines()] if path.exists() else []


def starts(marks: Path) -> list[str]:
    return [ln[1] for ln in lines(marks) if ln[0] == "start"]


def max_overlap(marks: Path) -> int:
    """Most tasks running at one instant, from their recorded start/end times."""
    events = []
    for ln in lines(marks):
        if ln[0] in ("start", "end"):
            events.append((int(ln[2]), 1 if ln[0] == "start" else -1))
    most = now = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):  # an end before a start
        now += step
        most = max(most, now)
    return most


def ids(n: int, first: int = 0) -> list[str]:
    return [f"train.{i:04d}" for i in range(first, first + n)]


def pool_path(node: NodeConfig) -> Path:
    return Path(node.remote_work_dir) / ".infra" / "runs" / RUN / ".pools" / "train"


# --------------------------------------------------------------------------- the life cycle

def test_setup_once_cleanup_once_after_last_task_with_cap(client: SupervisorClient,
                                                          tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    answer = sync(client, 3, suite=suite(marks),
                  add=tuple(task(marks, t, 0.1) for t in ids(12)), close=True)
    assert answer.workers == 3 and answer.phase is not PoolPhase.SETUP_FAILED
    state = finished(client)
    assert state.phase is PoolPhase.DONE, state
    assert state.setup.state is HookState.OK and state.cleanup.state is HookState.OK
    rows = lines(marks)
    assert [r for r in rows if r[0] == "setup"] == [["setup", f"{RUN}/train", "train", "3"]]
    assert [r for r in rows if r[0] == "cleanup"] == [["cleanup", f"{RUN}/train", "train", "3"]]
    assert rows[0][0] == "setup" and rows[-1][0] == "cleanup"  # around every task
    assert sorted(starts(marks)) == ids(12)  # each exactly once
    assert sorted(r[1] for r in rows if r[0] == "end") == ids(12)
    assert max_overlap(marks) <= 3
    assert state.done == 12 and state.queued == () and state.running == ()
    for t in ids(12):  # every task is an ordinary instance
        inst = [s for s in arun(client.status(RUN)) if s.instance_id == t]
        assert inst and inst[0].status is InstanceStatus.EXITED


def test_queue_order_with_one_worker(client: SupervisorClient, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    order = ["train.0003", "train.0001", "train.0007", "train.0002"]
    sync(client, 1, add=tuple(task(marks, t) for t in order[:2]))
    sync(client, 1, add=tuple(task(marks, t) for t in order[2:]), close=True)
    assert finished(client).phase is PoolPhase.DONE
    assert starts(marks) == order
    assert max_overlap(marks) == 1


def test_repeated_add_is_ignored(client: SupervisorClient, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    batch = tuple(task(marks, t, 0.2) for t in ids(3))
    sync(client, 1, add=batch)
    sync(client, 1, add=batch)  # a retried call: queued or started, never twice
    sync(client, 1, add=batch, close=True)
    assert finished(client).phase is PoolPhase.DONE
    assert sorted(starts(marks)) == ids(3)
    # once done: what it ran is skipped silently, only new work is named as refused
    later = sync(client, 1, add=(*batch, task(marks, "train.0009")))
    assert later.ignored == ("train.0009",) and later.queued == ()
    assert sorted(starts(marks)) == ids(3)


# --------------------------------------------------------------------------- CPU binding

def cpu_set(text: str) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


@pytest.mark.parametrize("binding", list(CpuBinding))
def test_cpu_binding_read_back_from_proc(client: SupervisorClient, tmp_path: Path,
                                         binding: CpuBinding) -> None:
    marks = tmp_path / "marks"
    cores = sorted(os.sched_getaffinity(0))
    workers = 1 if binding is CpuBinding.EXCLUSIVE else 3
    sync(client, workers, suite=suite(binding=binding),
         add=tuple(task(marks, t, 0.2) for t in ids(4)), close=True)
    state = finished(client)
    assert state.phase is PoolPhase.DONE, state
    seen = {ln[1]: cpu_set(ln[3]) for ln in lines(marks) if ln[0] == "start"}
    assert sorted(seen) == ids(4)
    if binding is CpuBinding.SHARED:
        assert all(s == set(cores) for s in seen.values())
        assert [set(c) for c in state.worker_cores] == [set(cores)] * 3
    else:
        assert all(len(s) == 1 and s <= set(cores) for s in seen.values())
        assert len(state.worker_cores) == workers
        if binding is CpuBinding.ROUND_ROBIN:
            assert state.worker_cores == tuple((cores[i % len(cores)],) for i in range(3))
        assert {next(iter(s)) for s in seen.values()} <= {c[0] for c in state.worker_cores}


def test_exclusive_with_more_workers_than_cores_fails_clearly(client: SupervisorClient,
                                                              tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    n = len(os.sched_getaffinity(0))
    sync(client, n + 1, suite=suite(marks, binding=CpuBinding.EXCLUSIVE),
         add=(task(marks, "train.0000"),))
    state = finished(client)
    assert state.phase is PoolPhase.SETUP_FAILED
    assert state.error is not None and state.error.startswith(
        f"cannot bind {n + 1} workers exclusively: only {n} free cores")
    assert not marks.exists() and state.queued == ("train.0000",)


def test_exclusive_cores_are_not_bound_twice_on_the_machine(client: SupervisorClient,
                                                            tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    n = len(os.sched_getaffinity(0))
    sync(client, n, suite=suite(binding=CpuBinding.EXCLUSIVE),
         add=(task(marks, "train.0000", 30.0),))
    settle(client, lambda p: bool(p.running), "running")
    other = arun(client.pool_sync(PoolSyncRequest(
        run_id=RUN, pool="other", workers=1, suite=suite(binding=CpuBinding.EXCLUSIVE),
        add=(task(marks, "other.0000"),), idle_exit_seconds=60.0)))
    deadline = time.monotonic() + BOUND
    while other.phase is not PoolPhase.SETUP_FAILED:
        assert time.monotonic() < deadline, other
        other = pool_now(client, "other")
    assert other.error is not None and "only 0 free cores" in other.error


# --------------------------------------------------------------------------- failures

def test_failed_setup_starts_no_task(client: SupervisorClient, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    sync(client, 2, suite=suite(marks, setup="echo preparing; echo no dataset here; exit 3"),
         add=tuple(task(marks, t) for t in ids(3)), close=True)
    state = finished(client)
    assert state.phase is PoolPhase.SETUP_FAILED
    assert state.setup.state is HookState.FAILED and state.setup.exit_code == 3
    assert state.setup.reason == "setup failed: exit code 3: no dataset here"
    assert state.queued == tuple(ids(3)) and starts(marks) == []
    assert state.cleanup.state is HookState.NONE
    # the coordinator drops them to place them elsewhere
    assert sync(client, 2, drop=tuple(ids(3))).dropped == tuple(ids(3))


def test_sigkill_of_the_daemon_mid_pool_runs_every_task_once(client: SupervisorClient,
                                                              node: NodeConfig,
                                                              tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    sync(client, 2, suite=suite(marks), add=tuple(task(marks, t, 0.3) for t in ids(10)),
         close=True)
    settle(client, lambda p: p.done >= 2 and bool(p.running), "half way")
    daemon = json.loads((pool_path(node) / "daemon.json").read_text())
    os.kill(daemon["pid"], signal.SIGKILL)
    settle(client, lambda p: not p.daemon_alive, "dead")
    sync(client, 2)  # the coordinator's next visit restarts the daemon
    state = finished(client)
    assert state.phase is PoolPhase.DONE, state
    assert sorted(starts(marks)) == ids(10)
    assert max_overlap(marks) <= 2
    assert [r[0] for r in lines(marks)].count("setup") == 1
    assert [r[0] for r in lines(marks)].count("cleanup") == 1


def test_daemon_killed_during_setup_never_runs_it_again(client: SupervisorClient,
                                                        node: NodeConfig,
                                                        tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    setup = f"echo setup >> {shlex.quote(str(marks))}; sleep 60"
    sync(client, 1, suite=suite(marks, setup=setup), add=(task(marks, "train.0000"),))
    settle(client, lambda p: p.setup.state is HookState.RUNNING and marks.exists(),
           "in setup")
    daemon = json.loads((pool_path(node) / "daemon.json").read_text())
    hook_pid = json.loads((pool_path(node) / "state.json").read_text())["setup"]["pid"]
    os.kill(daemon["pid"], signal.SIGKILL)
    os.killpg(hook_pid, signal.SIGKILL)
    settle(client, lambda p: not p.daemon_alive, "dead")
    sync(client, 1, close=True)
    state = finished(client)
    assert state.phase is PoolPhase.SETUP_FAILED and state.setup.state is HookState.FAILED
    assert state.setup.reason is not None and "setup interrupted" in state.setup.reason
    assert [r[0] for r in lines(marks)] == ["setup"]  # not run again, no task started
    assert state.queued == ("train.0000",)


def test_drop_queued_tasks_and_not_started_ones(client: SupervisorClient,
                                                tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    sync(client, 1, add=tuple(task(marks, t, 30.0 if t == "train.0000" else 0.0)
                              for t in ids(4)))
    settle(client, lambda p: p.running == ("train.0000",), "running the first")
    answer = sync(client, 1, drop=("train.0000", "train.0002", "train.0003"))
    assert answer.dropped == ("train.0002", "train.0003")
    assert answer.not_dropped == ("train.0000",)
    assert answer.queued == ("train.0001",)
    arun(client.stop(RUN, "train.0000", grace=0.5))
    sync(client, 1, close=True)
    assert finished(client).phase is PoolPhase.DONE
    assert starts(marks) == ["train.0000", "train.0001"]


def test_cancel_drops_the_queue_stops_running_and_cleans_up_once(client: SupervisorClient,
                                                                 tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    sync(client, 2, suite=suite(marks), add=tuple(task(marks, t, 30.0) for t in ids(5)))
    settle(client, lambda p: len(p.running) == 2, "running two")
    answer = sync(client, 2, cancel=True)
    assert answer.dropped == tuple(ids(5)[2:])
    state = finished(client)
    assert state.phase is PoolPhase.CANCELLED and state.cleanup.state is HookState.OK
    assert sorted(starts(marks)) == ids(2)
    insts = {s.instance_id: s for s in arun(client.status(RUN))}
    assert {insts[t].status for t in ids(2)} == {InstanceStatus.STOPPED}
    assert [r[0] for r in lines(marks)].count("cleanup") == 1
    # over: nothing more starts; the refused adds are named, the ones it ran are not
    later = sync(client, 2, add=(task(marks, "train.0009"), task(marks, "train.0000")))
    assert later.error is not None and "ignored" in later.error and later.queued == ()
    assert later.ignored == ("train.0009",)


# --------------------------------------------------------------------------- waiting

def test_expired_fence_pauses_new_starts_and_renewal_resumes(client: SupervisorClient,
                                                             tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    sync(client, 1, add=(task(marks, "train.0000", 1.0),), fence_seconds=0.5)
    settle(client, lambda p: p.done == 1 and p.phase is PoolPhase.IDLE, "idle")
    # the coordinator went silent: the fence expired, the next task must not start
    state = sync(client, 1, add=(task(marks, "train.0001"),))
    state = settle(client, lambda p: p.phase is PoolPhase.FENCED, "fenced")
    assert state.queued == ("train.0001",) and state.waiting is not None
    assert "fenced" in state.waiting and starts(marks) == ["train.0000"]
    sync(client, 1, fence_seconds=60.0, close=True)  # back: renewed
    assert finished(client).phase is PoolPhase.DONE
    assert starts(marks) == ["train.0000", "train.0001"]


def test_claim_refusal_waits_until_room_frees(client: SupervisorClient,
                                              tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    capacity = {"slots": 1}
    claim = {"coordinator": "ws:1", "demand": {"slots": 1}, "capacity": capacity}
    blocker = arun(client.start(StartRequest(run_id="r-other", instance_id="big",
                                             command="sleep 60", claim=claim)))
    assert blocker.status is InstanceStatus.RUNNING
    sync(client, 2, add=tuple(task(marks, t, claim=claim) for t in ids(2)))
    state = settle(client, lambda p: p.waiting is not None, "waiting")
    assert state.waiting is not None and state.waiting.startswith("local full: 1/1 held by "
                                                                  "run r-other (big)")
    assert state.queued == tuple(ids(2)) and state.running == ()
    arun(client.stop("r-other", "big", grace=0.5))
    sync(client, 2, close=True)
    assert finished(client).phase is PoolPhase.DONE
    assert sorted(starts(marks)) == ids(2)
    assert max_overlap(marks) == 1  # one slot: one at a time though two workers


def test_two_concurrent_pool_syncs_start_one_daemon(client: SupervisorClient, node: NodeConfig,
                                                    tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    script = arun(client.ensure_installed())
    procs = []
    for half in (ids(4), ids(4, 4)):
        doc = PoolSyncRequest(run_id=RUN, pool="train", workers=2, suite=suite(marks),
                              add=tuple(task(marks, t, 0.1) for t in half),
                              idle_exit_seconds=60.0).to_json("local")
        procs.append(subprocess.Popen(
            [NODE_PYTHON, "-S", "-E", script, "pool-sync", "--root",
             node.remote_work_dir + "/.infra"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True))
        assert procs[-1].stdin is not None
        procs[-1].stdin.write(json.dumps(doc))
        procs[-1].stdin.close()
    for p in procs:
        assert p.wait(timeout=BOUND) == 0
    sync(client, 2, close=True)
    assert finished(client).phase is PoolPhase.DONE
    assert sorted(starts(marks)) == ids(8)
    assert [r[0] for r in lines(marks)].count("setup") == 1
    assert max_overlap(marks) <= 2
    log = (pool_path(node) / "daemon.log").read_text() if (
        pool_path(node) / "daemon.log").exists() else ""
    assert "Traceback" not in log


def test_idle_exit_then_restart_without_setup_again(client: SupervisorClient,
                                                    tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    sync(client, 1, suite=suite(marks), add=(task(marks, "train.0000"),),
         idle_exit_seconds=0.2)
    state = settle(client, lambda p: p.done == 1 and not p.daemon_alive, "exited idle")
    assert state.phase is PoolPhase.IDLE and state.setup.state is HookState.OK
    sync(client, 1, add=(task(marks, "train.0001"),), close=True, idle_exit_seconds=0.2)
    assert finished(client).phase is PoolPhase.DONE
    assert starts(marks) == ["train.0000", "train.0001"]
    assert [r[0] for r in lines(marks)].count("setup") == 1
    assert [r[0] for r in lines(marks)].count("cleanup") == 1


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("change, fragment", [
    ({"workers": 0}, "workers must be an integer >= 1"),
    ({"pool": "../x"}, "invalid pool"),
    ({"suite": {"cpu_binding": "fast"}}, "suite.cpu_binding must be one of"),
    ({"suite": {"cores": [4096]}}, "suite.cores: core(s) [4096] not available"),
    ({"add": [{"run_id": "r-other", "instance_id": "a", "command": "true"}]},
     "add[0].run_id 'r-other' is not the pool's run"),
    ({"add": [{"run_id": RUN, "instance_id": "a", "command": ""}]},
     "add[0]: the start request needs a non-empty command"),
])
def test_bad_pool_sync_is_one_clear_line(client: SupervisorClient, node: NodeConfig,
                                         change: dict[str, Any], fragment: str) -> None:
    doc: dict[str, Any] = {"run_id": RUN, "pool": "train", "workers": 1}
    doc.update(change)
    script = arun(client.ensure_installed())
    out = subprocess.run([NODE_PYTHON, "-S", "-E", script, "pool-sync", "--root",
                          node.remote_work_dir + "/.infra"], input=json.dumps(doc),
                         capture_output=True, text=True,
                         timeout=BOUND)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert fragment in out.stdout, out.stdout


def test_status_lists_pools_and_keeps_its_return_type(client: SupervisorClient,
                                                      tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    sync(client, 1, add=(task(marks, "train.0000"),), close=True)
    finished(client)
    instances, pools = arun(client.status_with_pools(RUN))
    assert [p.name for p in pools] == ["train"] and pools[0].phase is PoolPhase.DONE
    assert [s.instance_id for s in instances] == ["train.0000"]
    assert [s.instance_id for s in arun(client.status(RUN))] == ["train.0000"]


def test_prune_leaves_a_run_with_a_live_pool_alone(client: SupervisorClient,
                                                   tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    sync(client, 1, add=(task(marks, "train.0000", 30.0), task(marks, "train.0001")))
    settle(client, lambda p: bool(p.running), "running")
    arun(client.stop(RUN, "train.0000", grace=0.2))
    settle(client, lambda p: p.done == 2 and p.phase is PoolPhase.IDLE, "idle")
    pruned = arun(client.prune([RUN]))
    assert pruned[0].state.value == "active" and "pool train" in pruned[0].active


def test_unknown_pool_script_error_is_reported(client: SupervisorClient) -> None:
    with pytest.raises(CommandFailedError, match="workers must be"):
        sync(client, 0)


def test_pool_script_is_python38_syntax() -> None:
    ast.parse(Path(pool_script.__file__).read_text(), feature_version=(3, 8))
