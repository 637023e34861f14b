"""Coordinator side of the supervisor: quoting, install-once, typed results, id checks.

Runs the real script through LocalTransport; a counting LocalTransport subclass only observes
how many commands the client sends.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from infra.config.model import FailoverSection, NodeConfig
from infra.errors import CommandFailedError, NodeDocumentError, UsageError
from infra.runner.supervisor_client import (
    SUPERVISOR_SOURCE,
    AttemptRecord,
    InstanceState,
    InstanceStatus,
    RestartPolicy,
    StartRequest,
    SupervisorClient,
    remote_sources,
    shell_path,
    supervisor_digest,
    supervisor_filename,
)
from infra.transport.base import DEFAULT_MAX_OUTPUT, CommandResult
from infra.transport.local import LocalTransport


class CountingTransport(LocalTransport):
    """LocalTransport that records the commands and uploads it was asked for."""

    def __init__(self, node: str) -> None:
        super().__init__(node)
        self.commands: list[str] = []
        self.puts: list[str] = []

    async def run(self, command: str | Sequence[str], *, input: str | None = None,
                  timeout: float | None = None, check: bool = False,
                  max_output: int = DEFAULT_MAX_OUTPUT) -> CommandResult:
        self.commands.append(command if isinstance(command, str) else " ".join(command))
        return await super().run(command, input=input, timeout=timeout, check=check,
                                 max_output=max_output)

    async def put(self, local_path: str, remote_path: str, *,
                  timeout: float | None = None) -> None:
        self.puts.append(remote_path)
        await super().put(local_path, remote_path, timeout=timeout)


def make_node(work: str, python: str = sys.executable) -> NodeConfig:
    return NodeConfig(name="n1", host="localhost", remote_work_dir=work, python_path=python)


@pytest.mark.parametrize("path", ["~", "~/", "~/a b", "~/x/'q'/$HOME", "/abs/with space",
                                  "rel/path", "~root/x y", "~$(touch nope)/x"])
def test_shell_path_expands_tilde_and_quotes_the_rest(path: str, tmp_path: Path) -> None:
    home = str(tmp_path / "home dir")
    out = subprocess.run(["/bin/sh", "-c", f"printf %s {shell_path(path)}"], text=True,
                         capture_output=True, check=True, cwd=tmp_path,
                         env={"HOME": home, "PATH": "/usr/bin:/bin"}).stdout
    if path == "~" or path.startswith("~/"):
        assert out == home + path[1:]
    elif path.startswith("~root"):
        assert out == str(Path("~root").expanduser()) + path[5:]
    else:
        assert out == path
    assert not (tmp_path / "nope").exists()


def test_install_once_per_client_and_reinstall_when_wiped(tmp_path: Path) -> None:
    transport = CountingTransport("n1")
    node = make_node(str(tmp_path / "work"))
    client = SupervisorClient(transport, node)

    async def scenario() -> None:
        assert await client.status() == []
        assert await client.status() == []
        probes = [c for c in transport.commands if "@@INFRA-SCRIPT:" in c]
        scripts = remote_sources()
        assert len(probes) == 1 and len(transport.puts) == len(scripts)
        installed = tmp_path / "work" / ".infra" / supervisor_filename()
        assert installed.read_bytes() == SUPERVISOR_SOURCE.read_bytes()
        # every remote script, in one versioned directory, byte-compiled there at install
        # (the node runs them with -B and never writes a .pyc), and nothing else left behind
        assert installed.parent.name == f"bin-{supervisor_digest()}"
        assert sorted(p.name for p in installed.parent.iterdir()) == \
            ["__pycache__", *(p.name for p in scripts)]
        compiled = sorted(p.name.split(".")[0] for p in (installed.parent / "__pycache__").iterdir())
        assert compiled == sorted(p.stem for p in scripts)
        calls = [c for c in transport.commands if "supervisor.py" in c and " status " in f"{c} "]
        assert calls and all(" -B " in c for c in calls), calls
        assert [p.name for p in installed.parent.parent.iterdir()] == [installed.parent.name]
        # a second client (new connection) finds it and does not upload again
        other = CountingTransport("n1")
        await SupervisorClient(other, node).status()
        assert other.puts == []
        shutil.rmtree(installed.parent)  # node wiped behind our back: the next call reinstalls
        assert await client.status() == []
        assert installed.exists() and len(transport.puts) == 2 * len(scripts)

    asyncio.run(scenario())


def test_tilde_work_dir_with_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    client = SupervisorClient(LocalTransport("n1"), make_node("~/lab work"))

    async def scenario() -> InstanceState:
        await client.start(StartRequest(run_id="r", instance_id="i", command="echo hi"))
        for _ in range(600):
            (state,) = await client.status("r")
            if state.is_final:
                return state
            await asyncio.sleep(0.05)
        raise AssertionError("never ended")

    state = asyncio.run(scenario())
    assert state.status is InstanceStatus.EXITED and state.last_line == "hi"
    assert state.log_path == str(tmp_path / "lab work" / ".infra" / "runs" / "r" / "i"
                                 / "output.log")


def test_bad_python_is_a_command_failure(tmp_path: Path) -> None:
    node = make_node(str(tmp_path / "work"), python=str(tmp_path / "no-python"))
    client = SupervisorClient(LocalTransport("n1"), node)
    with pytest.raises(CommandFailedError, match=r"\(127\): .*no-python: not found"):
        asyncio.run(client.status())  # the install's byte-compile step already says why


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "-rf", ".hidden", "a..b", "x" * 129,
                                 "sp ace", "semi;colon"])
def test_ids_are_checked_before_anything_is_sent(bad: str, tmp_path: Path) -> None:
    transport = CountingTransport("n1")
    client = SupervisorClient(transport, make_node(str(tmp_path / "work")))
    with pytest.raises(UsageError):
        asyncio.run(client.start(StartRequest(run_id=bad, instance_id="i", command="true")))
    with pytest.raises(UsageError):
        asyncio.run(client.stop("r", bad))
    with pytest.raises(UsageError):
        asyncio.run(client.status(bad))
    assert transport.commands == []


def test_instance_state_from_json() -> None:
    doc = {
        "run_id": "r", "instance_id": "i", "state": "failed", "pid": 10, "pid_start_ticks": 5,
        "pgid": 10, "supervisor_pid": 9, "alive": False, "supervisor_alive": False,
        "started_at": 1.5, "ended_at": 2.5, "exit_code": None, "signal": "SIGSEGV",
        "attempts": [{"attempt": 1, "pid": 8, "started_at": 1.0, "ended_at": 1.2,
                      "exit_code": None, "signal": "SIGSEGV", "reason": "killed by SIGSEGV"}],
        "restarts": 1, "stop_requested": False, "final_reason": "gave up", "log_size": 12,
        "last_line": "x", "unknown_future_field": 1,
    }
    state = InstanceState.from_json("n1", doc)
    assert state.node == "n1" and state.status is InstanceStatus.FAILED and state.is_final
    assert state.attempts == (AttemptRecord(1, 8, 1.0, 1.2, None, "SIGSEGV",
                                            "killed by SIGSEGV"),)
    assert InstanceState.from_json("n1", {**doc, "state": "weird"}).status is InstanceStatus.LOST
    assert not InstanceStatus.RESTARTING.is_final and InstanceStatus.LOST.is_final


def test_restart_policy_and_request_json() -> None:
    failover = FailoverSection(auto_restart=True, max_retries=None, retry_delay_seconds=2.0)
    assert RestartPolicy.from_config(failover) == RestartPolicy(True, None, 2.0)
    assert RestartPolicy.from_config(failover, auto_restart=False, max_retries=4) == \
        RestartPolicy(False, 4, 2.0)
    req = StartRequest(run_id="r", instance_id="i", command="c", env=(("A", "1"),),
                       allocation={"ram_gb": 1}, gpu_ids=("0",))
    assert req.to_json("n1") == {
        "run_id": "r", "instance_id": "i", "node": "n1", "command": "c", "cwd": None,
        "env": {"A": "1"}, "allocation": {"ram_gb": 1}, "gpu_ids": ["0"],
        "results_dir": None,
        "restart": {"auto_restart": True, "max_retries": None, "retry_delay_seconds": 5.0,
                    "always": False},
        "placement": "p0", "fence": False,
    }


@pytest.mark.parametrize(("change", "field", "reason"), [
    ({"pid": "abc"}, "instances[0].pid", "expected an integer, got 'abc'"),
    ({"attempts": {"1": {}}}, "instances[0].attempts", "expected a list, got a mapping"),
    ({"attempts": [{"pid": 1.5}]}, "instances[0].attempts[0].pid", "expected an integer"),
    ({"attempts": ["x"]}, "instances[0].attempts[0]", "expected a mapping, got 'x'"),
    ({"restarts": None, "alive": "yes"}, "instances[0].alive", "expected true or false"),
    ({"state": 3}, "instances[0].state", "expected a string, got 3"),
    ({"created_at": [1]}, "instances[0].created_at", "expected a number, got a list"),
])
def test_malformed_instance_document_is_a_node_document_error(
        change: dict[str, object], field: str, reason: str) -> None:
    doc = {"run_id": "r", "instance_id": "i", "state": "running", "pid": 10, **change}
    with pytest.raises(NodeDocumentError) as caught:
        InstanceState.from_json("n1", doc, where="instances[0]")
    assert caught.value.node == "n1" and caught.value.field == field
    assert reason in str(caught.value) and str(caught.value).startswith("n1: malformed")


def test_malformed_answers_from_a_replaced_script_are_typed_errors(tmp_path: Path) -> None:
    """The node's installed script is swapped for one printing wrong shapes: every client
    call fails with a NodeDocumentError naming the field, never a TypeError."""
    from infra.transport.marker import wrap

    transport = CountingTransport("n1")
    client = SupervisorClient(transport, make_node(str(tmp_path)))
    script = asyncio.run(client.ensure_installed())
    answers = {"status": {"ok": True, "instances": {}},
               "start": {"ok": True, "instance": ["not", "a", "mapping"]},
               "read": {"ok": True, "data_b64": "!!", "offset": 0, "size": 0, "eof": True,
                        "ended": True}}
    Path(script).write_text("import sys\nanswers = " + repr(
        {k: wrap(v) for k, v in answers.items()}) + "\nprint(answers[sys.argv[1]])\n")
    with pytest.raises(NodeDocumentError, match="instances: expected a list, got a mapping"):
        asyncio.run(client.status("r"))
    with pytest.raises(NodeDocumentError, match="instance: expected a mapping"):
        asyncio.run(client.start(StartRequest(run_id="r", instance_id="i", command="true")))
    with pytest.raises(NodeDocumentError, match="data_b64: not base64"):
        asyncio.run(client.read("r", "i"))

