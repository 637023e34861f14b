"""LocalTransport: the same Transport contract, run through /bin/sh on this machine."""

from __future__ import annotations

import asyncio
import getpass
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from infra.config.model import NodeConfig
from infra.errors import CommandFailedError, TransportTimeoutError
from infra.transport import ConnectionPool, LocalTransport, connect_node

_T = TypeVar("_T")


def arun(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run one coroutine on a fresh event loop."""
    return asyncio.run(coro)


def test_runs_as_the_coordinator_user() -> None:
    result = arun(LocalTransport("host").run("whoami"))
    assert result.ok and result.stdout.strip() == getpass.getuser()
    assert result.command == "whoami"


def test_sequence_is_quoted_and_string_goes_to_the_shell() -> None:
    t = LocalTransport("host")
    quoted = arun(t.run(["printf", "%s|", "a b", "$HOME", "it's", ";true"]))
    assert quoted.stdout == "a b|$HOME|it's|;true|"
    assert quoted.command == "printf '%s|' 'a b' '$HOME' 'it'\"'\"'s' ';true'"
    assert arun(t.run("echo $((2 + 3))")).stdout == "5\n"


def test_exit_status_stderr_input_and_signal() -> None:
    t = LocalTransport("host")
    failed = arun(t.run("echo oops >&2; exit 3"))
    assert (failed.exit_status, failed.signal, failed.stderr, failed.ok) == (3, None, "oops\n",
                                                                             False)
    assert arun(t.run("cat", input="hello\nworld")).stdout == "hello\nworld"
    assert arun(t.run("cat")).stdout == ""  # no input: stdin is empty, never a hang
    killed = arun(t.run("kill -TERM $$"))
    assert (killed.exit_status, killed.signal) == (None, "SIGTERM")


def test_check_raises_command_failed_with_details() -> None:
    with pytest.raises(CommandFailedError) as info:
        arun(LocalTransport("host").run("echo bad >&2; exit 5", check=True))
    assert (info.value.node, info.value.exit_status, info.value.stderr) == ("host", 5, "bad\n")


def test_timeout_kills_the_command() -> None:
    async def main() -> None:
        t = LocalTransport("host")
        with pytest.raises(TransportTimeoutError, match="timed out") as info:
            await t.run("exec sleep 30", timeout=0.2)
        assert isinstance(info.value, asyncio.TimeoutError)
        assert info.value.node == "host"

    arun(main())
    sleepers = [p for p in psutil.process_iter(["cmdline", "ppid"])
                if p.info["cmdline"] == ["sleep", "30"] and p.info["ppid"] == os.getpid()]
    assert sleepers == []


def test_put_get_round_trip(tmp_path: Path) -> None:
    payload = os.urandom(100_000)
    src = tmp_path / "src.bin"
    src.write_bytes(payload)
    remote = tmp_path / "node" / "deep" / "file.bin"
    back = tmp_path / "home" / "again" / "file.bin"

    async def main() -> None:
        t = LocalTransport("host")
        await t.put(str(src), str(remote))
        await t.get(str(remote), str(back))
        await t.close()
        await t.close()  # twice is fine

    arun(main())
    assert remote.read_bytes() == payload and back.read_bytes() == payload


def test_stream_yields_raw_bytes_until_exit() -> None:
    async def main() -> list[bytes]:
        script = "for i in 1 2 3; do printf 'line %s\\n' $i; sleep 0.1; done; printf '\\377'"
        return [c async for c in LocalTransport("host").stream(script)]

    chunks = arun(main())
    assert all(isinstance(c, bytes) for c in chunks)
    assert b"".join(chunks) == b"line 1\nline 2\nline 3\n\xff"
    assert len(chunks) >= 2


def test_stream_closed_early_stops_the_command(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"

    async def main() -> None:
        gen = LocalTransport("host").stream(
            f"echo $$ > {pid_file}; exec sh -c 'while true; do echo tick; sleep 0.05; done'")
        async for _chunk in gen:
            break
        await gen.aclose()

    arun(main())
    pid = int(pid_file.read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_local_nodes_get_the_local_transport() -> None:
    for host in ("localhost", "local"):
        node = NodeConfig(name="host", host=host)
        assert isinstance(connect_node(node), LocalTransport)

    async def main() -> None:
        async with ConnectionPool() as pool:
            node = NodeConfig(name="host", host="localhost")
            t = await pool.get(node)
            assert isinstance(t, LocalTransport) and t.node == "host"
            assert await pool.get(node) is t
            assert (await t.run("echo hi")).stdout == "hi\n"

    arun(main())
