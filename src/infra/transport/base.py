"""The one small connector interface: run a command, put/get a file, stream output, close.

The runner only ever talks to a ``Transport``; ``infra.transport.connect_node`` picks the
asyncssh or local implementation in one place (pyinfra's connector idea).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass


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
                  timeout: float | None = None, check: bool = False) -> CommandResult:
        """Run a command through the node's shell.

        A sequence is quoted with ``shlex.join``; a string is passed as is (the caller quoted
        it). ``check`` raises ``CommandFailedError`` on a non-zero exit.
        """

    @abc.abstractmethod
    async def put(self, local_path: str, remote_path: str) -> None:
        """Copy one local file to the node."""

    @abc.abstractmethod
    async def get(self, remote_path: str, local_path: str) -> None:
        """Copy one file from the node to the coordinator."""

    @abc.abstractmethod
    def stream(self, command: str | Sequence[str]) -> AsyncIterator[bytes]:
        """Run a command and yield its raw stdout bytes as they arrive.

        Bytes, not lines, so a caller can count exact offsets (resumable log streams).
        The iterator ends when the command exits; a lost connection raises TransportError.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the connection; safe to call twice."""
