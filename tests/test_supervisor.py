"""The node-side supervisor, driven for real: local subprocesses through LocalTransport + client.

Each test gets its own supervisor root under tmp_path; programs in tests/progs count their own
attempts in a file, so restart rules are checked by what actually ran.
"""

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
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.config.model import NodeConfig
from infra.errors import CommandFailedError
from infra.remote import supervisor as script
from infra.runner.supervisor_client import (
    SUPERVISOR_SOURCE,
    InstanceState,
    InstanceStatus,
    RestartPolicy,
    StartRequest,
    SupervisorClient,
)
from infra.state import FailureClass
from infra.transport.local import LocalTransport

PROGS = Path(__file__).parent / "progs"
PY = shlex.quote(sys.executable)
BOUND = 30.0  # upper bound for waits, only so a broken supervisor cannot hang the suite


def prog(name: str, *args: object) -> str:
    return " ".join([PY, shlex.quote(str(PROGS / name)), *(shlex.quote(str(a)) for a in args)])


def lines_in(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# The interpreter that runs the node-side script; set INFRA_TEST_NODE_PYTHON to an old one
# (e.g. a Python 3.8) to check the script's compatibility with the whole suite.
NODE_PYTHON = os.environ.get("INFRA_TEST_NODE_PYTHON", sys.executable)


@pytest.fixture
def node(tmp_path: Path) -> NodeConfig:
    return NodeConfig(name="local", host="localhost", remote_work_dir=str(tmp_path / "work"),
                      python_path=NODE_PYTHON)


@pytest.fixture
def client(node: NodeConfig) -> Iterator[SupervisorClient]:
    c = SupervisorClient(LocalTransport(node.name), node)
    yield c
    # leave no process behind, whatever the test did
    root = Path(node.remote_work_dir) / ".infra" / "runs"
    if root.is_dir():
        for run in root.iterdir():
            if not run.name.startswith("."):  # a prune's leftovers are not runs
                asyncio.run(c.stop(run.name, grace=0.2))


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def request(run_id: str, instance_id: str, command: str, *, auto_restart: bool = True,
            max_retries: int | None = None, delay: float = 0.0, quick: float | None = None,
            **kw: object) -> StartRequest:
    return StartRequest(run_id=run_id, instance_id=instance_id, command=command,
                        restart=RestartPolicy(auto_restart=auto_restart, max_retries=max_retries,
                                              retry_delay_seconds=delay,
                                              quick_failure_seconds=quick), **kw)  # type: ignore[arg-type]


async def one(client: SupervisorClient, run_id: str, instance_id: str) -> InstanceState:
    for state in await client.status(run_id):
        if state.instance_id == instance_id:
            return state
    raise AssertionError(f"{run_id}/{instance_id} not in status")


async def wait_for(client: SupervisorClient, run_id: str, instance_id: str,
                   predicate, what: str) -> InstanceState:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + BOUND
    while True:
        state = await one(client, run_id, instance_id)
        if predicate(state):
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"never {what}: {state}")
        await asyncio.sleep(0.03)


async def wait_final(client: SupervisorClient, run_id: str, instance_id: str) -> InstanceState:
    return await wait_for(client, run_id, instance_id, lambda s: s.is_final, "final")


def wait_file(path: Path) -> str:
    deadline = time.monotonic() + BOUND
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    return path.read_text()


def process_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2] in "ZX"  # a zombie no longer runs


def instance_dir(node: NodeConfig, run_id: str, instance_id: str) -> Path:
    return Path(node.remote_work_dir) / ".infra" / "runs" / run_id / instance_id


# --------------------------------------------------------------------------- lifecycle

def test_start_status_then_exit(client: SupervisorClient, tmp_path: Path) -> None:
    count = tmp_path / "count"

    async def scenario() -> tuple[InstanceState, list[InstanceState], InstanceState]:
        started = await client.start(request("r1", "a", prog("lines.py", 3, 0, "--hold", 0.5,
                                                             "--count", count)))
        listed = await client.status()
        final = await wait_final(client, "r1", "a")
        return started, listed, final

    started, listed, final = run(scenario())
    assert started.status is InstanceStatus.RUNNING
    assert started.pid is not None and started.alive and started.supervisor_alive
    assert not started.already
    assert [(s.run_id, s.instance_id) for s in listed] == [("r1", "a")]
    assert final.status is InstanceStatus.EXITED
    assert final.exit_code == 0 and final.signal is None
    assert len(final.attempts) == 1 and final.attempts[0].reason == "exit code 0"
    assert final.ended_at is not None and not final.alive
    assert final.last_line == "line 3"
    assert final.log_path is not None
    assert Path(final.log_path).read_text() == "line 1\nline 2\nline 3\n"
    assert final.log_size == len("line 1\nline 2\nline 3\n")
    assert lines_in(count) == ["1"]


def test_environment_hints_and_results_dir(client: SupervisorClient, tmp_path: Path) -> None:
    cwd = tmp_path / "code"
    cwd.mkdir()
    command = 'env | grep -E "^(INFRA_|CUDA_VISIBLE|MY_VAR)" | sort > "$INFRA_RESULTS_DIR/env.txt"; pwd'
    req = request("r1", "env", command, cwd=str(cwd), env=(("MY_VAR", "a b"),),
                  allocation={"ram_gb": 2.0, "gpu": True}, gpu_ids=("0", "2"))
    final = run(_start_and_wait(client, req))
    assert final.status is InstanceStatus.EXITED
    assert final.results_dir is not None
    env = dict(line.split("=", 1)
               for line in (Path(final.results_dir) / "env.txt").read_text().splitlines())
    assert env["INFRA_RUN_ID"] == "r1" and env["INFRA_INSTANCE_ID"] == "env"
    assert env["INFRA_NODE"] == "local" and env["INFRA_ATTEMPT"] == "1"
    assert json.loads(env["INFRA_ALLOCATION"]) == {"ram_gb": 2.0, "gpu": True}
    assert env["CUDA_VISIBLE_DEVICES"] == "0,2"
    assert env["MY_VAR"] == "a b"
    assert final.last_line == str(cwd)


async def _start_and_wait(client: SupervisorClient, req: StartRequest) -> InstanceState:
    await client.start(req)
    return await wait_final(client, req.run_id, req.instance_id)


def test_start_is_idempotent(client: SupervisorClient, tmp_path: Path) -> None:
    count = tmp_path / "count"
    req = request("r1", "once", prog("lines.py", 1, 0, "--hold", 1.0, "--count", count))

    async def scenario() -> tuple[list[InstanceState], InstanceState, InstanceState]:
        # two coordinators racing, then a third retrying later
        racing = list(await asyncio.gather(client.start(req), client.start(req)))
        again = await client.start(req)
        final = await wait_final(client, "r1", "once")
        return racing, again, final

    racing, again, final = run(scenario())
    assert sorted(s.already for s in racing) == [False, True]
    assert again.already
    assert racing[0].pid == racing[1].pid == again.pid
    assert final.status is InstanceStatus.EXITED and len(final.attempts) == 1
    assert lines_in(count) == ["1"]
    final_again = run(client.start(req))
    assert final_again.already and final_again.status is InstanceStatus.EXITED
    assert lines_in(count) == ["1"]


def test_bad_ids_are_refused_by_the_script(client: SupervisorClient) -> None:
    async def scenario() -> None:
        script_path = await client.ensure_installed()
        doc = {"run_id": "../etc", "instance_id": "x", "command": "true"}
        result = await client.transport.run(
            f"{PY} {shlex.quote(script_path)} start --root {shlex.quote(client.root)}",
            input=json.dumps(doc))
        assert result.exit_status == 2
        assert "invalid run_id" in result.stdout

    run(scenario())
    with pytest.raises(CommandFailedError, match="no instance"):
        run(client.stop("r1", "missing"))


def test_command_that_cannot_start_fails_without_restart(client: SupervisorClient,
                                                         tmp_path: Path) -> None:
    req = request("r1", "nocwd", "true", cwd=str(tmp_path / "does-not-exist"))
    final = run(_start_and_wait(client, req))
    assert final.status is InstanceStatus.FAILED
    assert final.final_reason is not None and "could not start" in final.final_reason
    assert len(final.attempts) == 1


# --------------------------------------------------------------------------- stop

def test_stop_kills_whole_group_and_is_not_a_failure(client: SupervisorClient,
                                                     tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    count = tmp_path / "count"
    command = (prog("lines.py", 0, 0, "--count", count) + " && "
               + prog("grandchild.py", pids_file, "--ignore-term"))

    async def scenario() -> list[InstanceState]:
        await client.start(request("r1", "g", command))
        await asyncio.to_thread(wait_file, pids_file)
        return await client.stop("r1", "g", grace=0.5)

    stopped = run(scenario())
    child, grandchild = (int(p) for p in pids_file.read_text().split())
    assert len(stopped) == 1
    state = stopped[0]
    assert state.status is InstanceStatus.STOPPED
    assert state.stop_requested
    assert len(state.attempts) == 1 and state.restarts == 0
    assert state.final_reason is not None and "stopped on request" in state.final_reason
    assert process_gone(child) and process_gone(grandchild)
    assert state.pgid is not None and script.group_members(state.pgid) == []
    assert lines_in(count) == ["1"]
    later = run(one(client, "r1", "g"))
    assert later.status is InstanceStatus.STOPPED and len(later.attempts) == 1


def test_stop_during_retry_delay(client: SupervisorClient, tmp_path: Path) -> None:
    count = tmp_path / "count"
    req = request("r1", "d", prog("lines.py", 1, 1, "--count", count), delay=60.0)

    async def scenario() -> list[InstanceState]:
        await client.start(req)
        await wait_for(client, "r1", "d", lambda s: s.status is InstanceStatus.RESTARTING,
                       "restarting")
        return await client.stop("r1", grace=1.0)

    (state,) = run(scenario())
    assert state.status is InstanceStatus.STOPPED
    assert len(state.attempts) == 1
    assert lines_in(count) == ["1"]


def test_stop_whole_run(client: SupervisorClient, tmp_path: Path) -> None:
    async def scenario() -> list[InstanceState]:
        for name in ("a", "b"):
            await client.start(request("r2", name, prog("lines.py", 1, 0, "--hold", 60)))
        await client.start(request("other", "c", prog("lines.py", 1, 0, "--hold", 60)))
        return await client.stop("r2", grace=1.0)

    stopped = run(scenario())
    assert [(s.instance_id, s.status) for s in stopped] == [
        ("a", InstanceStatus.STOPPED), ("b", InstanceStatus.STOPPED)]
    other = run(one(client, "other", "c"))
    assert other.status is InstanceStatus.RUNNING and other.alive


# --------------------------------------------------------------------------- restart rules

@pytest.mark.parametrize(("name", "command", "policy", "attempts", "status"), [
    ("segv", ("selfkill.py", "SIGSEGV"), {}, 2, InstanceStatus.FAILED),
    ("segv-max5", ("selfkill.py", "SIGSEGV"), {"max_retries": 5}, 2, InstanceStatus.FAILED),
    ("abrt", ("selfkill.py", "SIGABRT"), {}, 3, InstanceStatus.FAILED),
    ("kill", ("selfkill.py", "SIGKILL"), {}, 3, InstanceStatus.FAILED),
    ("exit1", ("lines.py", 1, 1), {}, 3, InstanceStatus.FAILED),
    ("exit1-max1", ("lines.py", 1, 1), {"max_retries": 1}, 2, InstanceStatus.FAILED),
    ("exit1-max0", ("lines.py", 1, 1), {"max_retries": 0}, 1, InstanceStatus.FAILED),
    ("exit1-max4", ("lines.py", 1, 1), {"max_retries": 4}, 5, InstanceStatus.FAILED),
    ("exit1-noauto", ("lines.py", 1, 1), {"auto_restart": False}, 1, InstanceStatus.FAILED),
    ("exit0", ("lines.py", 1, 0), {}, 1, InstanceStatus.EXITED),
    ("term", ("selfkill.py", "SIGTERM"), {}, 1, InstanceStatus.STOPPED),
])
def test_restart_rules(client: SupervisorClient, tmp_path: Path, name: str,
                       command: tuple[object, ...], policy: dict[str, object], attempts: int,
                       status: InstanceStatus) -> None:
    count = tmp_path / "count"
    if command[0] == "selfkill.py":
        cmd = prog(command[0], command[1], count)  # type: ignore[arg-type]
    else:
        cmd = prog(*command, "--count", count)  # type: ignore[arg-type]
    # quick failures are broken commands (see test_broken_*): off here, to see the limits
    final = run(_start_and_wait(client, request("rules", name, cmd, quick=0.0,
                                                **policy)))  # type: ignore[arg-type]
    assert final.status is status, final
    assert lines_in(count) == [str(i) for i in range(1, attempts + 1)]
    assert [a.attempt for a in final.attempts] == list(range(1, attempts + 1))
    assert final.restarts == attempts - 1
    log = Path(final.log_path or "").read_text()
    assert log.count("[supervisor] attempt ") == attempts - 1
    if command[0] == "selfkill.py":
        sig = str(command[1])
        assert final.signal == sig
        assert all((a.reason or "").startswith(f"killed by {sig}") for a in final.attempts)
        if sig == "SIGKILL":
            assert "out of memory" in (final.attempts[0].reason or "").lower() or \
                "oom" in (final.attempts[0].reason or "").lower()
    elif status is InstanceStatus.FAILED:
        assert final.exit_code == 1 and final.signal is None
        # each failed attempt's reason ends with the last line that attempt wrote
        assert [a.reason for a in final.attempts] == ["exit code 1: line 1"] * attempts
        assert final.failure_class is FailureClass.EXIT_CODE
        if attempts > 1:
            assert "[supervisor] attempt 2 after exit code 1: line 1\n" in log


def test_restart_counts_exit_code_then_succeeds(client: SupervisorClient, tmp_path: Path) -> None:
    count = tmp_path / "count"
    # fails on attempts 1 and 2, succeeds on 3: the attempt number reaches the program
    cmd = prog("lines.py", 1, 0, "--count", count) + ' && test "$INFRA_ATTEMPT" -ge 3'
    final = run(_start_and_wait(client, request("rules", "third", cmd, quick=0.0)))
    assert final.status is InstanceStatus.EXITED
    assert [a.exit_code for a in final.attempts] == [1, 1, 0]


# --------------------------------------------------------------------------- broken commands

def _broken(final: InstanceState, exit_code: int, reason: str, count: Path | None = None) -> None:
    """A broken command: failed after one retry, the last attempt recorded, its output named."""
    assert final.status is InstanceStatus.FAILED, final
    assert [a.attempt for a in final.attempts] == [1, 2]  # at most one retry
    if count is not None:
        assert lines_in(count) == ["1", "2"]
    last = final.attempts[-1]
    assert final.restarts == 1 and final.pid == last.pid  # the record is the last attempt's
    assert final.exit_code == exit_code == last.exit_code and final.signal is None
    assert last.reason == reason, last.reason
    assert final.final_reason == (f"{reason}; gave up after 2 failed attempts "
                                  "(limit 2 for a broken command)")
    assert final.attempts[0].reason == reason  # the first attempt's own output, not more
    assert final.failure_class is FailureClass.BROKEN_COMMAND and final.broken_command


def test_broken_command_not_found(client: SupervisorClient, tmp_path: Path) -> None:
    count = tmp_path / "count"
    cmd = f'echo "$INFRA_ATTEMPT" >> {shlex.quote(str(count))}; pyhton3 train.py'
    final = run(_start_and_wait(client, request("broken", "typo", cmd)))
    reason = "exit code 127 (command not found): /bin/sh: 1: pyhton3: not found"  # dash
    _broken(final, 127, reason, count)
    log = Path(final.log_path or "").read_text()
    assert f"[supervisor] attempt 2 after {reason}\n" in log


def test_broken_command_not_executable(client: SupervisorClient, tmp_path: Path) -> None:
    target = tmp_path / "run.sh"
    target.write_text("#!/bin/sh\necho never\n")
    target.chmod(0o644)  # no execute bit: even root gets "Permission denied" (exit 126)
    final = run(_start_and_wait(client, request("broken", "noexec", shlex.quote(str(target)))))
    _broken(final, 126, f"exit code 126 (command not executable): /bin/sh: 1: {target}: "
                        "Permission denied")


def test_immediate_failure_is_a_broken_command(client: SupervisorClient, tmp_path: Path) -> None:
    count = tmp_path / "count"
    cmd = (prog("lines.py", 2, 0, "--count", count) +
           "; echo 'error: config.yaml not found' >&2; echo; exit 1")
    final = run(_start_and_wait(client, request("broken", "quick", cmd, max_retries=5)))
    # max_retries cannot buy a broken command more retries; the empty line is skipped
    _broken(final, 1, "exit code 1: error: config.yaml not found", count)


def test_slow_failure_keeps_the_normal_limits(client: SupervisorClient, tmp_path: Path) -> None:
    count = tmp_path / "count"
    # runs past quick_failure_seconds (0.3 s here) before failing: an ordinary failure
    cmd = prog("lines.py", 1, 0, "--count", count, "--hold", 0.6) + '; echo "bad $INFRA_ATTEMPT"; exit 3'
    final = run(_start_and_wait(client, request("broken", "slow", cmd, quick=0.3)))
    assert final.status is InstanceStatus.FAILED, final
    assert lines_in(count) == ["1", "2", "3"]
    assert [a.reason for a in final.attempts] == [f"exit code 3: bad {i}" for i in (1, 2, 3)]
    assert final.failure_class is FailureClass.EXIT_CODE and not final.broken_command
    assert final.final_reason == "exit code 3: bad 3; gave up after 3 failed attempts (limit 3)"
    assert final.restarts == 2 and final.pid == final.attempts[-1].pid


def test_a_clean_end_clears_the_failure_class(client: SupervisorClient, tmp_path: Path) -> None:
    cmd = 'test "$INFRA_ATTEMPT" -ge 2 || exit 4; echo ok'
    final = run(_start_and_wait(client, request("broken", "second", cmd)))
    assert final.status is InstanceStatus.EXITED
    assert [a.reason for a in final.attempts] == ["exit code 4", "exit code 0"]
    assert final.failure_class is None and final.exit_code == 0


@pytest.fixture
def small_memory_cgroup() -> Iterator[Path]:
    """A fresh memory cgroup limited to 64 MiB (v1 or v2); skipped where we cannot make one."""
    name = f"infra-oom-test-{os.getpid()}"
    candidates = [(Path("/sys/fs/cgroup/memory") / name, "memory.limit_in_bytes"),
                  (Path("/sys/fs/cgroup") / name, "memory.max")]
    for path, limit_file in candidates:
        try:
            path.mkdir()
        except OSError:
            continue
        try:
            (path / limit_file).write_text(str(64 << 20))
        except OSError:
            path.rmdir()
            continue
        try:
            yield path
        finally:
            deadline = time.monotonic() + BOUND
            while True:
                try:
                    path.rmdir()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        return
    pytest.skip("cannot create a memory cgroup here (needs root and a memory controller)")


def test_sigkill_by_the_oom_killer_is_named(client: SupervisorClient,
                                            small_memory_cgroup: Path) -> None:
    procs = shlex.quote(str(small_memory_cgroup / "cgroup.procs"))
    hog = shlex.quote("data = b'x' * (400 << 20)")
    command = f"echo $$ > {procs} && exec {PY} -c {hog}"
    final = run(_start_and_wait(client, request("oom", "hog", command, max_retries=0)))
    assert final.status is InstanceStatus.FAILED
    assert final.signal == "SIGKILL"
    assert final.attempts[0].reason == "killed by SIGKILL (killed by the kernel OOM killer)"


# --------------------------------------------------------------------------- lost supervisor

def test_supervisor_killed_child_detached_then_lost(client: SupervisorClient) -> None:
    started = run(client.start(request("r1", "orphan", prog("lines.py", 1, 0, "--hold", 60))))
    assert started.supervisor_pid is not None and started.pid is not None
    os.kill(started.supervisor_pid, signal.SIGKILL)
    detached = run(wait_for(client, "r1", "orphan", lambda s: not s.supervisor_alive,
                            "without supervisor"))
    assert detached.status is InstanceStatus.RUNNING
    assert detached.alive and detached.detached
    assert started.pgid is not None
    os.killpg(started.pgid, signal.SIGKILL)
    lost = run(wait_for(client, "r1", "orphan", lambda s: s.is_final, "lost"))
    assert lost.status is InstanceStatus.LOST
    assert lost.final_reason is not None and "gone" in lost.final_reason


def test_stop_without_supervisor_kills_group_directly(client: SupervisorClient,
                                                      tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    started = run(client.start(request("r1", "nosup", prog("grandchild.py", pids_file))))
    wait_file(pids_file)
    assert started.supervisor_pid is not None
    os.kill(started.supervisor_pid, signal.SIGKILL)
    (state,) = run(client.stop("r1", "nosup", grace=0.5))
    assert state.status is InstanceStatus.STOPPED and state.stop_requested
    assert all(process_gone(int(p)) for p in pids_file.read_text().split())


def test_pid_reuse_is_not_mistaken_for_ours(client: SupervisorClient, node: NodeConfig) -> None:
    run(client.ensure_installed())
    idir = instance_dir(node, "r9", "reused")
    idir.mkdir(parents=True)
    me = os.getpid()
    ticks = script.start_ticks(me)
    assert ticks is not None
    state = {"run_id": "r9", "instance_id": "reused", "state": "running", "pid": me,
             "pid_start_ticks": ticks + 1, "pgid": me, "supervisor_pid": me,
             "supervisor_start_ticks": ticks + 1, "attempts": []}
    (idir / "state.json").write_text(json.dumps(state))
    reused = run(one(client, "r9", "reused"))
    assert not reused.alive and not reused.supervisor_alive
    assert reused.status is InstanceStatus.LOST
    state.update(pid_start_ticks=ticks, supervisor_start_ticks=ticks)
    (idir / "state.json").write_text(json.dumps(state))
    ours = run(one(client, "r9", "reused"))
    assert ours.alive and ours.supervisor_alive and ours.status is InstanceStatus.RUNNING
    (idir / "state.json").write_text(json.dumps({**state, "state": "exited"}))


# --------------------------------------------------------------------------- logs

def test_follow_from_start_and_from_middle(client: SupervisorClient, node: NodeConfig) -> None:
    req = request("r1", "log", prog("lines.py", 60, 0, "--sleep", 0.01))

    async def collect(offset: int) -> bytes:
        return b"".join([chunk async for chunk in client.follow("r1", "log", offset)])

    async def scenario() -> tuple[bytes, bytes, int]:
        await client.start(req)
        state = await wait_for(client, "r1", "log", lambda s: s.log_size >= 20, "logging")
        middle = state.log_size // 2 + 3
        from_zero, from_middle = await asyncio.gather(collect(0), collect(middle))
        return from_zero, from_middle, middle

    from_zero, from_middle, middle = run(scenario())
    content = (instance_dir(node, "r1", "log") / "output.log").read_bytes()
    assert content == "".join(f"line {i}\n" for i in range(1, 61)).encode()
    assert from_zero == content
    assert from_middle == content[middle:]
    # after the end: a follow from any offset gives the rest and ends
    assert run(collect(len(content) - 8)) == content[-8:]
    assert run(collect(len(content))) == b""


def test_read_in_chunks(client: SupervisorClient, node: NodeConfig) -> None:
    final = run(_start_and_wait(client, request("r1", "rd", prog("lines.py", 20, 0))))
    assert final.status is InstanceStatus.EXITED
    pieces = []
    offset = 0
    while True:
        chunk = run(client.read("r1", "rd", offset, max_bytes=16))
        pieces.append(chunk.data)
        assert chunk.offset == offset + len(chunk.data)
        offset = chunk.offset
        if chunk.eof and chunk.ended:
            break
    assert b"".join(pieces) == (instance_dir(node, "r1", "rd") / "output.log").read_bytes()


def test_follow_unknown_instance_yields_nothing(client: SupervisorClient) -> None:
    async def collect() -> bytes:
        return b"".join([c async for c in client.follow("nope", "nope", 0)])

    assert run(collect()) == b""


# --------------------------------------------------------------------------- pure parts

@pytest.mark.parametrize(("returncode", "expected"), [
    (0, ("ok", 0, None)),
    (1, ("exit_code", 1, None)),
    (-11, ("hard_fault", None, "SIGSEGV")),
    (-4, ("hard_fault", None, "SIGILL")),
    (-7, ("hard_fault", None, "SIGBUS")),
    (-8, ("hard_fault", None, "SIGFPE")),
    (-9, ("resource", None, "SIGKILL")),
    (-6, ("resource", None, "SIGABRT")),
    (-15, ("intentional", None, "SIGTERM")),
    (-1, ("signal", None, "SIGHUP")),
    (139, ("hard_fault", 139, "SIGSEGV")),  # a shell that did not exec reports 128+N
    (137, ("resource", 137, "SIGKILL")),
    (255, ("exit_code", 255, None)),
])
def test_classify(returncode: int, expected: tuple[str, int | None, str | None]) -> None:
    assert script.classify(returncode) == expected


def test_failure_classes() -> None:
    assert script.failure_class("exit_code", 127, 60.0, 3.0) == "broken_command"
    assert script.failure_class("exit_code", 126, 60.0, 3.0) == "broken_command"
    assert script.failure_class("exit_code", 1, 0.5, 3.0) == "broken_command"
    assert script.failure_class("exit_code", 1, 5.0, 3.0) == "exit_code"
    assert script.failure_class("exit_code", 1, 0.5, 0.0) == "exit_code"  # time rule off
    assert script.failure_class("hard_fault", None, 0.1, 3.0) == "hard_fault"  # signals keep theirs
    assert script.failure_limit("broken_command", None) == 2
    assert script.failure_limit("broken_command", 9) == 2
    assert script.failure_limit("broken_command", 0) == 1
    assert script.describe_end(127, None) == "exit code 127 (command not found)"
    assert script.describe_end(126, None) == "exit code 126 (command not executable)"


def test_failure_limits() -> None:
    assert script.failure_limit("hard_fault", None) == 2
    assert script.failure_limit("resource", None) == 3
    assert script.failure_limit("exit_code", None) == 3
    assert script.failure_limit("exit_code", 7) == 8
    assert script.failure_limit("hard_fault", 7) == 2
    assert script.failure_limit("resource", 0) == 1
    assert script.describe_end(None, "SIGKILL", oom=True) == (
        "killed by SIGKILL (killed by the kernel OOM killer)")
    assert script.describe_end(None, "SIGKILL") == "killed by SIGKILL (possibly out of memory)"


def test_script_is_python38_syntax() -> None:
    ast.parse(SUPERVISOR_SOURCE.read_text(), feature_version=(3, 8))


def test_service_restarts_after_clean_exit_until_stopped(client: SupervisorClient,
                                                         tmp_path: Path) -> None:
    count = tmp_path / "service-count"
    cmd = f"echo x >> {count}; exit 0"
    req = StartRequest(run_id="svc", instance_id="api", command=cmd,
                       restart=RestartPolicy(auto_restart=True, retry_delay_seconds=0.05,
                                             always=True))

    async def scenario() -> InstanceState:
        await client.start(req)
        await wait_for(client, "svc", "api", lambda s: s.restarts >= 3, "restarted 3 times")
        await client.stop("svc", "api", grace=1.0)
        return await wait_final(client, "svc", "api")

    final = run(scenario())
    assert final.status is InstanceStatus.STOPPED
    assert len(count.read_text().split()) >= 4  # a clean exit did not end the service
    assert all(a.exit_code in (0, None) for a in final.attempts)


def test_batch_clean_exit_is_final_without_always(client: SupervisorClient,
                                                  tmp_path: Path) -> None:
    count = tmp_path / "batch-count"
    final = run(_start_and_wait(client, request("svc", "batch", f"echo x >> {count}")))
    assert final.status is InstanceStatus.EXITED
    assert count.read_text().split() == ["x"]


def test_an_end_written_between_reading_the_state_and_the_liveness_check_is_not_lost(
        tmp_path: Path) -> None:
    """The supervisor records the end, then exits: a caller that read "running" just before
    that write sees the supervisor gone just after it. The end on record wins, not "lost"."""
    from infra.remote import supervisor as sup

    gone = subprocess.Popen(["true"])
    gone.wait()  # a supervisor that has exited (its pid is free, its start ticks differ)
    idir = tmp_path / "r1" / "a"
    idir.mkdir(parents=True)
    ended = {"run_id": "r1", "instance_id": "a", "state": "exited", "exit_code": 0,
             "supervisor_pid": gone.pid, "supervisor_start_ticks": 1, "pid": gone.pid,
             "pid_start_ticks": 1, "pgid": gone.pid, "final_reason": "exited with code 0"}
    (idir / "state.json").write_text(json.dumps(ended))
    read_before = {**ended, "state": "running", "exit_code": None, "final_reason": None}
    doc = sup.effective_state(str(idir), read_before)
    assert doc["state"] == "exited" and doc["exit_code"] == 0, doc
    # with nothing on record but the same running state, it is lost indeed
    (idir / "state.json").write_text(json.dumps(read_before))
    assert sup.effective_state(str(idir), read_before)["state"] == "lost"
