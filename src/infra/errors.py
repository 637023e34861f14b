"""One error tree for the whole library.

The CLI turns any ``InfraError`` into a one-line message and a non-zero exit code;
anything else is a bug and may show a traceback.
"""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):  # asyncio.TimeoutError is the builtin: no asyncio import
    _AsyncTimeout = TimeoutError
else:  # pragma: no cover - Python 3.10
    import asyncio
    _AsyncTimeout = asyncio.TimeoutError


class InfraError(Exception):
    """Root of every error the orchestrator raises on purpose."""

    exit_code: int = 1

    def one_line(self) -> str:
        """The message the CLI prints: a single line, never a traceback."""
        return " ".join(str(self).split())


class Interrupted(InfraError):
    """Ctrl-C before the command's work was done (what was done is said with it)."""

    exit_code = 130


class UsageError(InfraError):
    """The user asked for something that cannot work (bad flags, unknown ids)."""

    exit_code = 2


class ConfigError(UsageError):
    """A config or spec file is malformed: names the file, the key path and the reason."""

    def __init__(self, file: str, key: str, reason: str, line: int | None = None) -> None:
        self.file = file
        self.key = key
        self.reason = reason
        self.line = line
        where = file if line is None else f"{file}:{line}"
        super().__init__(f"{where}: {key}: {reason}" if key else f"{where}: {reason}")


class PlacementError(InfraError):
    """Nothing fits an instance (or a pin breaks a hard constraint)."""

    exit_code = 3


class StateError(InfraError):
    """The durable store is missing, locked by another coordinator, or inconsistent."""


class LeaseLostError(StateError):
    """Another coordinator holds the run's lease now: this one must stop acting on it."""


class TransportError(InfraError):
    """Talking to a node failed; carries the node name."""

    def __init__(self, node: str, reason: str) -> None:
        self.node = node
        self.reason = reason
        super().__init__(f"{node}: {reason}")


def node_reason(exc: InfraError) -> str:
    """An error's text without its node name in front, for messages that name the node
    themselves ("start failed on rpi1: ..."), so a node is never named twice."""
    return " ".join(exc.reason.split()) if isinstance(exc, TransportError) else exc.one_line()


class UnreachableError(TransportError):
    """The node could not be reached (refused, no route, DNS)."""


class AuthFailedError(TransportError):
    """The node refused our credentials."""


class HostKeyError(TransportError):
    """The node's host key is unknown or changed; we refuse to talk to it."""


class TransportTimeoutError(TransportError, _AsyncTimeout):
    """An operation on a node took longer than allowed."""


class CommandFailedError(TransportError):
    """A remote command ran but failed (non-zero exit or unparsable output)."""

    def __init__(self, node: str, reason: str, exit_status: int | None = None,
                 stderr: str = "") -> None:
        super().__init__(node, reason)
        self.exit_status = exit_status
        self.stderr = stderr


class BadAnswerError(TransportError):
    """The node answered, but unusably (malformed, or far too long): the node is broken.

    Not a sign that the node is unreachable: the live loop marks it broken, moves nothing
    off it, and goes on with the other nodes.
    """


class OutputTooLargeError(BadAnswerError):
    """A node printed more than the coordinator reads from one call; the command was killed."""

    def __init__(self, node: str, limit: int, command: str) -> None:
        super().__init__(node, f"node printed more than {limit} bytes (command killed): "
                               f"{command[:200]}")
        self.limit = limit


class NodeDocumentError(BadAnswerError):
    """A node answered with a document of the wrong shape (a broken or foreign supervisor).

    ``field`` names the offending key path (``instances[0].pid``).
    """

    def __init__(self, node: str, what: str, field: str, reason: str) -> None:
        super().__init__(node, f"malformed {what} document: {field}: {reason}")
        self.what = what
        self.field = field


class DeployError(TransportError):
    """rsync to a node failed."""


class CapacityRefusedError(CommandFailedError):
    """The node's claims say it cannot take the instance now (another coordinator's work)."""


class StaleCopyError(CommandFailedError):
    """An earlier placement of the instance still runs on the node; stop it first."""


class DeployRefused(DeployError):
    """A ``--delete`` deploy would remove more files on a node than ``deploy.max_deletes``.

    Raised before anything on the node changed; ``paths`` are the first paths it would delete.
    """

    def __init__(self, node: str, count: int, limit: int, paths: tuple[str, ...] = ()) -> None:
        self.count = count
        self.limit = limit
        self.paths = paths
        super().__init__(node, f"deploy would delete {count} files or directories (more than "
                               f"deploy.max_deletes {limit}); nothing was changed: list them with "
                               "--deploy-all --dry-run, then rerun with --yes to allow it")


class SlurmMappingError(UsageError):
    """A spec asks for something an sbatch job cannot express (an attribute constraint, a
    non-GPU device, unsafe text in an option); raised before anything is submitted."""
