"""Local transport: the node is this machine; commands run through ``/bin/sh -c``.

Bounded like the SSH transport: a timeout (default ``DEFAULT_CALL_TIMEOUT_S``) and an output
cap on every command, whose whole process group is killed when either is passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import signal
from collections.abc import AsyncIterator, Sequence

from infra.errors import CommandFailedError, OutputTooLargeError, TransportTimeoutError
from infra.transport.base import (
    DEFAULT_CALL_TIMEOUT_S,
    DEFAULT_MAX_OUTPUT,
    READ_CHUNK,
    CommandResult,
    OutputCapped,
    Transport,
    read_both,
)

_REAP_DRAIN_S = 5.0


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


async def _communicate(proc: asyncio.subprocess.Process, input: str | None,
                       cap: int) -> tuple[bytes, bytes]:
    """Feed ``input``, read stdout and stderr (each capped), wait for the exit."""
    assert proc.stdout is not None and proc.stderr is not None
    if input is not None and proc.stdin is not None:
        proc.stdin.write(input.encode())
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await proc.stdin.drain()
        proc.stdin.close()
    out, err = await read_both(proc.stdout, proc.stderr, cap)
    await proc.wait()
    return out, err


class LocalTransport(Transport):
    """Runs commands as the coordinator's own user, on the coordinator's machine."""

    def __init__(self, node: str, *, call_timeout: float = DEFAULT_CALL_TIMEOUT_S) -> None:
        self.node = node
        self.call_timeout = call_timeout

    async def run(self, command: str | Sequence[str], *, input: str | None = None,
                  timeout: float | None = None, check: bool = False,
                  max_output: int = DEFAULT_MAX_OUTPUT) -> CommandResult:
        cmd = _as_shell(command)
        limit = self.call_timeout if timeout is None else timeout
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", cmd,
            stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # so a timeout can kill the shell and its children
        )
        try:
            out, err = await asyncio.wait_for(_communicate(proc, input, max_output), limit)
        except asyncio.TimeoutError:
            await _reap(proc)
            raise TransportTimeoutError(self.node,
                                        f"timed out after {limit:g} s: {cmd}") from None
        except OutputCapped:
            await _reap(proc)
            raise OutputTooLargeError(self.node, max_output, cmd) from None
        except BaseException:  # cancelled (Ctrl-C, a bounded tick): kill it and close its pipes,
            _kill_group(proc.pid)  # or the transport is collected after the loop closed
            with contextlib.suppress(BaseException):
                await asyncio.shield(_reap(proc))
            raise
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

    async def put(self, local_path: str, remote_path: str, *,
                  timeout: float | None = None) -> None:
        dest = os.path.expanduser(remote_path)
        os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
        await self._copy(local_path, dest, timeout)

    async def get(self, remote_path: str, local_path: str, *,
                  timeout: float | None = None) -> None:
        os.makedirs(os.path.dirname(local_path) or ".", exist_ok=True)
        await self._copy(os.path.expanduser(remote_path), local_path, timeout)

    async def _copy(self, src: str, dest: str, timeout: float | None) -> None:
        """Copy in a thread, bounded (a stuck file system does not hang the caller)."""
        limit = self.call_timeout if timeout is None else timeout
        try:
            await asyncio.wait_for(asyncio.to_thread(shutil.copyfile, src, dest), limit)
        except asyncio.TimeoutError:
            raise TransportTimeoutError(
                self.node, f"copy {src} -> {dest}: timed out after {limit:g} s") from None

    async def stream(self, command: str | Sequence[str], *,
                     timeout: float | None = None) -> AsyncIterator[bytes]:
        cmd = _as_shell(command)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", cmd,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
        )
        assert proc.stdout is not None
        try:
            while True:
                read = proc.stdout.read(READ_CHUNK)
                try:
                    chunk = await (read if deadline is None else
                                   asyncio.wait_for(read, max(0.0, deadline - loop.time())))
                except asyncio.TimeoutError:
                    raise TransportTimeoutError(
                        self.node, f"stream timed out after {timeout:g} s: {cmd}") from None
                if not chunk:
                    break
                yield chunk
        finally:
            if proc.returncode is None:
                _kill_group(proc.pid)
            await proc.wait()

    async def close(self) -> None:
        return None


async def _reap(proc: asyncio.subprocess.Process) -> None:
    """Kill the command's process group, drop what is left in its pipes, collect its exit."""
    _kill_group(proc.pid)

    async def drain() -> None:
        for pipe in (proc.stdout, proc.stderr):
            while pipe is not None and await pipe.read(READ_CHUNK):
                pass

    with contextlib.suppress(asyncio.TimeoutError):  # a detached child may hold a pipe
        await asyncio.wait_for(drain(), _REAP_DRAIN_S)
    await proc.wait()
