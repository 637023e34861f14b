"""The one small connector interface: run a command, put/get a file, stream output, close.

The runner only ever talks to a ``Transport``; ``infra.transport.connect_node`` picks the
asyncssh or local implementation in one place (pyinfra's connector idea).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

DEFAULT_CALL_TIMEOUT_S = 300.0
"""Bound on a ``run``/``put``/``get`` whose caller names none: no remote call is unbounded."""

DEFAULT_MAX_OUTPUT = 16 * 1024 * 1024
"""Bytes of stdout (and, apart, of stderr) one ``run`` reads before it kills the command."""


READ_CHUNK = 65536


class OutputCapped(Exception):
    """A command printed more than the caller reads (the transport turns it into an
    ``OutputTooLargeError`` after killing the command)."""


class ByteStream(Protocol):
    """What ``read_capped`` needs: asyncio's and asyncssh's stream readers both fit."""

    async def read(self, n: int = -1) -> bytes: ...


async def read_capped(stream: ByteStream, cap: int) -> bytes:
    """Everything until EOF, or ``OutputCapped`` past ``cap`` bytes (memory stays bounded)."""
    buf = bytearray()
    while True:
        chunk = await stream.read(READ_CHUNK)
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > cap:
            raise OutputCapped


async def read_both(stdout: ByteStream, stderr: ByteStream, cap: int) -> tuple[bytes, bytes]:
    """stdout and stderr read at once, each capped; the first failure is raised at once."""
    readers = [asyncio.ensure_future(read_capped(stdout, cap)),
               asyncio.ensure_future(read_capped(stderr, cap))]
    try:
        done, _ = await asyncio.wait(readers, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()  # raise the first failure
        return await readers[0], await readers[1]
    finally:
        for task in readers:
            if not task.done():
                task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


@dataclass(frozen=True)
class CommandResult:
    """Mirrors ``subprocess.CompletedProcess``: exit status, signal, stdout, stderr."""

    command: str
    exit_status: int | None
    signal: str | None
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


class Transport(abc.ABC):
    """How the coordinator reaches one node."""

    node: str

    @abc.abstractmethod
    async def run(self, command: str | Sequence[str], *, input: str | None = None,
                  timeout: float | None = None, check: bool = False,
                  max_output: int = DEFAULT_MAX_OUTPUT) -> CommandResult:
        """Run a command through the node's shell.

        A sequence is quoted with ``shlex.join``; a string is passed as is (the caller quoted
        it). ``check`` raises ``CommandFailedError`` on a non-zero exit. ``timeout`` (None:
        ``DEFAULT_CALL_TIMEOUT_S``) and ``max_output`` bound the call: past either, the
        command and everything it started in its process group are killed on the node and
        ``TransportTimeoutError`` / ``OutputTooLargeError`` is raised.
        """

    @abc.abstractmethod
    async def put(self, local_path: str, remote_path: str, *,
                  timeout: float | None = None) -> None:
        """Copy one local file to the node (``timeout`` None: ``DEFAULT_CALL_TIMEOUT_S``)."""

    @abc.abstractmethod
    async def get(self, remote_path: str, local_path: str, *,
                  timeout: float | None = None) -> None:
        """Copy one file from the node (``timeout`` None: ``DEFAULT_CALL_TIMEOUT_S``)."""

    @abc.abstractmethod
    def stream(self, command: str | Sequence[str], *,
               timeout: float | None = None) -> AsyncIterator[bytes]:
        """Run a command and yield its raw stdout bytes as they arrive.

        Bytes, not lines, so a caller can count exact offsets (resumable log streams).
        The iterator ends when the command exits; a lost connection raises TransportError.
        A follow may rightly stay quiet for hours, so a stream is bounded only when
        ``timeout`` is given (a frozen node is caught by the connection's keepalive); the
        command is killed whenever the stream ends early (timeout, error, caller gone).
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the connection; safe to call twice."""
