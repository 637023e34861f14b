"""Local transport: the node is this machine; commands run through ``/bin/sh -c``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import signal
from collections.abc import AsyncIterator, Sequence

from infra.errors import CommandFailedError, TransportTimeoutError
from infra.transport.base import CommandResult, Transport


def _as_shell(command: str | Sequence[str]) -> str:
    return command if isinstance(command, str) else shlex.join(command)


def _signal_name(returncode: int) -> str | None:
    if returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"SIG{-returncode}"


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class LocalTransport(Transport):
    """Runs commands as the coordinator's own user, on the coordinator's machine."""

    def __init__(self, node: str) -> None:
        self.node = node

    async def run(self, command: str | Sequence[str], *, input: str | None = None,
                  timeout: float | None = None, check: bool = False) -> CommandResult:
        cmd = _as_shell(command)
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", cmd,
            stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # so a timeout can kill the shell and its children
        )
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(input.encode() if input is not None else None), timeout)
        except asyncio.TimeoutError:
            _kill_group(proc.pid)
            await proc.wait()
            raise TransportTimeoutError(self.node,
                                        f"timed out after {timeout:g} s: {cmd}") from None
        rc = proc.returncode if proc.returncode is not None else -1
        result = CommandResult(
            command=cmd,
            exit_status=rc if rc >= 0 else None,
            signal=_signal_name(rc),
            stdout=out.decode(errors="replace"),
            stderr=err.decode(errors="replace"),
        )
        if check and not result.ok:
            raise CommandFailedError(self.node, f"command failed ({rc}): {result.stderr.strip()}",
                                     exit_status=result.exit_status, stderr=result.stderr)
        return result

    async def put(self, local_path: str, remote_path: str) -> None:
        dest = os.path.expanduser(remote_path)
        os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
        await asyncio.to_thread(shutil.copyfile, local_path, dest)

    async def get(self, remote_path: str, local_path: str) -> None:
        os.makedirs(os.path.dirname(local_path) or ".", exist_ok=True)
        await asyncio.to_thread(shutil.copyfile, os.path.expanduser(remote_path), local_path)

    async def stream(self, command: str | Sequence[str]) -> AsyncIterator[bytes]:
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", _as_shell(command),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
        )
        assert proc.stdout is not None
        try:
            while True:
                chunk = await proc.stdout.read(65536)
                if not chunk:
                    break
                yield chunk
        finally:
            if proc.returncode is None:
                _kill_group(proc.pid)
            await proc.wait()

    async def close(self) -> None:
        return None
