"""The one small connector interface: run a command, put/get a file, stream output, close.

The runner only ever talks to a ``Transport``; ``infra.transport.connect_node`` picks the
asyncssh or local implementation in one place (pyinfra's connector idea).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

DEFAULT_CALL_TIMEOUT_S = 300.0
"""Bound on a ``run``/``put``/``get`` whose caller names none: no remote call is unbounded."""

DEFAULT_MAX_OUTPUT = 16 * 1024 * 1024
"""Bytes of stdout (and, apart, of stderr) one ``run`` reads before it kills the command."""


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
