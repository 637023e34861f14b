"""asyncssh transport: one lazily opened, reused, keepalive-watched connection per node.

Host keys are always verified against ``health.known_hosts`` (default
``~/.ssh/known_hosts``).  With ``accept_new_host_keys`` an unknown host's key is recorded on
first contact (OpenSSH's ``StrictHostKeyChecking=accept-new``); a changed key is refused in
every mode.  Keys and known_hosts files are parsed once per process and re-read only when the
file changes.  Every asyncssh/OS failure becomes a typed ``TransportError`` carrying the node
name and a short reason.

Every call is bounded (connect, channel wait and open, command, transfer; a stream when asked)
and a command that is given up on is killed on the node, not merely detached from: see
``node_command`` and ``_kill``. Output is read up to a cap, so a node printing without end
costs the coordinator at most that much memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import os
import posixpath
import shlex
import socket
import warnings
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

with warnings.catch_warnings():
    # cryptography 4x+ warns at import time that DSA support is deprecated; asyncssh merely
    # references the DSA types, and the warning would be printed before every CLI error line.
    warnings.filterwarnings("ignore", message=r".*DSA is deprecated.*")
    import asyncssh

from infra.config.model import HealthCheckSection, NodeConfig
from infra.errors import (
    AuthFailedError,
    CommandFailedError,
    HostKeyError,
    OutputTooLargeError,
    TransportError,
    TransportTimeoutError,
    UnreachableError,
)
from infra.transport.base import (
    DEFAULT_CALL_TIMEOUT_S,
    DEFAULT_MAX_OUTPUT,
    READ_CHUNK,
    CommandResult,
    OutputCapped,
    Transport,
    read_both,
)

DEFAULT_MAX_CHANNELS = 8
"""Concurrent channels per connection: below OpenSSH's default ``MaxSessions 10``."""

DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
DEFAULT_SSH_CONFIG = "~/.ssh/config"
"""Host aliases, User, Port, IdentityFile, ProxyJump... apply where the node leaves them."""
SSH_PORT = 22

CLOSE_WAIT_S = 2.0
"""The most ``close`` waits for the node to acknowledge before it aborts the connection."""
KILL_AFTER_S = 5
"""The node-side ``timeout`` fires this long after the coordinator's own deadline."""

_OPEN_RETRIES = 8  # about 0.9 s of waiting in all before a refused channel is an error
_OPEN_RETRY_FIRST_S = 0.01
_OPEN_RETRY_MAX_S = 0.2

_T = TypeVar("_T")
_Stamp = tuple[int, int]

_key_cache: dict[str, tuple[_Stamp, asyncssh.SSHKey]] = {}
_known_hosts_cache: dict[str, tuple[_Stamp | None, asyncssh.SSHKnownHosts]] = {}

# Failures of the connection itself (as opposed to the command or the file).
_LINK_ERRORS = (asyncssh.DisconnectError, asyncssh.ChannelOpenError, OSError)

_OS_REASONS = {
    errno.ECONNREFUSED: "connection refused",
    errno.EHOSTUNREACH: "no route to host",
    errno.ENETUNREACH: "network unreachable",
    errno.ETIMEDOUT: "timed out",
    errno.ECONNRESET: "connection reset",
    errno.ECONNABORTED: "connection aborted",
    errno.EPIPE: "connection closed",
}


def _stamp(path: Path) -> _Stamp | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size)


def load_client_key(path: str | os.PathLike[str]) -> asyncssh.SSHKey:
    """Read a private key once per process; re-read only when the file changes."""
    p = Path(path).expanduser()
    stamp = _stamp(p)
    cached = _key_cache.get(str(p))
    if cached is not None and cached[0] == stamp:
        return cached[1]
    key = asyncssh.read_private_key(str(p))
    if stamp is not None:
        _key_cache[str(p)] = (stamp, key)
    return key


def load_known_hosts(path: str | os.PathLike[str]) -> asyncssh.SSHKnownHosts:
    """Parse a known_hosts file once per process (again when it changes); empty if missing."""
    p = Path(path).expanduser()
    stamp = _stamp(p)
    cached = _known_hosts_cache.get(str(p))
    if cached is not None and cached[0] == stamp:
        return cached[1]
    known = asyncssh.read_known_hosts(str(p)) if stamp is not None else asyncssh.SSHKnownHosts()
    _known_hosts_cache[str(p)] = (stamp, known)
    return known


PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                     "chacha20-poly1305@openssh.com", "aes128-ctr", "aes192-ctr", "aes256-ctr")
"""The ciphers offered, best first. AES-GCM before asyncssh's default chacha20-poly1305:
it is as safe, and its Python-side cost per packet is about a third lower (one cipher call
per packet where chacha20 makes several), which a watch's per-tick status call to every
node pays many times over. The node picks the first one it also has."""


def names_ciphers(path: Path | None) -> bool:
    """Whether an ssh config file mentions ``Ciphers``: then its choice is left alone."""
    if path is None:
        return False
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return False
    return any(line.strip().lower().startswith("ciphers") for line in text.splitlines())


def known_hosts_lines(path: str | os.PathLike[str], host: str, addr: str,
                      port: int | None) -> list[int]:
    """1-based line numbers of known_hosts entries that vouch for this host (key or CA)."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(errors="replace")
    except FileNotFoundError:
        return []
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        try:
            keys, cas, *_ = asyncssh.import_known_hosts(entry).match(host, addr, port)
        except (ValueError, asyncssh.KeyImportError):
            continue
        if keys or cas:
            found.append(number)
    return found


def _known_hosts_name(host: str, port: int | None) -> str:
    return host if port is None else f"[{host}]:{port}"


@dataclass(frozen=True)
class RecordedKey:
    """A host key this process accepted on first contact: shown so the user can check it."""

    host: str          # as written in known_hosts (``[addr]:port`` for other ports)
    algorithm: str     # e.g. ssh-ed25519
    fingerprint: str   # SHA256:..., as ``ssh-keygen -lf`` prints it
    known_hosts: str


RECORDED_KEYS: list[RecordedKey] = []
"""Keys recorded with accept-new in this process, in order (the CLI prints them)."""


def record_host_key(path: str | os.PathLike[str], host: str, port: int | None,
                    key: asyncssh.SSHKey) -> None:
    """Append ``host``'s public key to a known_hosts file (created 0600 when missing)."""
    p = Path(path).expanduser()
    kind, blob = key.export_public_key("openssh").decode().split()[:2]
    line = f"{_known_hosts_name(host, port)} {kind} {blob}\n"
    p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(p, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode())
    RECORDED_KEYS.append(RecordedKey(_known_hosts_name(host, port), kind,
                                     key.get_fingerprint("sha256"), str(p)))


class _HostKeyPolicy:
    """Decides host keys asyncssh did not find trusted; remembers why one was refused."""

    def __init__(self, known_hosts: Path, accept_new: bool) -> None:
        self.known_hosts = known_hosts
        self.accept_new = accept_new
        self.host = ""
        self.changed_lines: list[int] = []
        self.recorded = False

    def validate(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        """Accept only a first-contact key, and only when accept-new is on."""
        named_port = None if port == SSH_PORT else port
        self.host = _known_hosts_name(host, named_port)
        self.changed_lines = known_hosts_lines(self.known_hosts, host, addr, named_port)
        if self.changed_lines or not self.accept_new:
            return False
        record_host_key(self.known_hosts, host, named_port, key)
        self.recorded = True
        return True

    def reason(self, detail: str) -> str:
        """The short reason a HostKeyError carries."""
        if self.changed_lines:
            where = ", ".join(f"{self.known_hosts}:{n}" for n in self.changed_lines)
            return (f"host key changed for {self.host}: it differs from the key at {where} "
                    f"(if the node was reinstalled, remove that line with "
                    f"ssh-keygen -R '{self.host}' -f {self.known_hosts})")
        if self.host:
            return (f"unknown host key for {self.host}: not in {self.known_hosts} "
                    f"(add it with ssh-keyscan, or set health_check.accept_new_host_keys)")
        return f"host key not verifiable: {detail}"


class _Client(asyncssh.SSHClient):
    """asyncssh client callbacks: host key decisions go to the policy; keeps why it closed."""

    def __init__(self, policy: _HostKeyPolicy) -> None:
        self._policy = policy
        self.lost: Exception | None = None

    def validate_host_public_key(self, host: str, addr: str, port: int,
                                 key: asyncssh.SSHKey) -> bool:
        return self._policy.validate(host, addr, port, key)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc


def _consume_outcome(future: asyncio.Future[Any]) -> None:
    """Mark a shared attempt's error as seen even when every waiter was cancelled."""
    if not future.cancelled():
        future.exception()


async def _open_channel(conn: asyncssh.SSHClientConnection,
                        opener: Callable[[asyncssh.SSHClientConnection], Awaitable[_T]]) -> _T:
    """Open a channel, waiting out a momentarily full server.

    sshd frees a session slot a little after the client sees the channel close, so even
    under ``MaxSessions`` an open can be refused ("no more sessions"). Nothing ran on a
    refused channel, so trying again shortly is safe.
    """
    delay = _OPEN_RETRY_FIRST_S
    for _ in range(_OPEN_RETRIES):
        try:
            return await opener(conn)
        except asyncssh.ChannelOpenError as exc:
            if exc.code != asyncssh.OPEN_CONNECT_FAILED or conn.is_closed():
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, _OPEN_RETRY_MAX_S)
    return await opener(conn)


def _as_shell(command: str | Sequence[str]) -> str:
    return command if isinstance(command, str) else shlex.join(command)


def _sftp_path(remote_path: str) -> str:
    """SFTP paths are relative to the home directory; it does not expand ``~``."""
    if remote_path == "~":
        return "."
    if remote_path.startswith("~/"):
        return remote_path[2:] or "."
    return remote_path


def _os_reason(exc: OSError) -> str:
    """A short reason for a socket error ("connection refused", "no route to host"...)."""
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host name ({exc.strerror})"
    if exc.errno in _OS_REASONS:
        return _OS_REASONS[exc.errno]
    text = str(exc)
    if exc.errno is None:  # asyncio's "Multiple exceptions: [Errno 111] ..., [Errno 111] ..."
        for code, reason in _OS_REASONS.items():
            if f"[Errno {code}]" in text:
                return reason
    return exc.strerror or text or type(exc).__name__


def node_command(cmd: str, timeout: float) -> str:
    """``cmd`` wrapped so the node bounds it too, not only the coordinator.

    The login shell execs coreutils ``timeout`` (when the node has it) in its own place, so
    the command runs in the session's process group, which sshd kills on the channel's
    signal request (see ``_kill``); should that request be refused or never arrive (a link
    that died), ``timeout`` kills the group ``KILL_AFTER_S`` after the coordinator's own
    deadline. Processes that start their own session (the supervisor daemon) are not hit.
    """
    limit = math.ceil(timeout) + KILL_AFTER_S
    return (f"set -- timeout -k 2 {limit}; command -v timeout >/dev/null 2>&1 || set --; "
            f'exec "$@" "${{SHELL:-/bin/sh}}" -c {shlex.quote(cmd)}')


def _kill(proc: asyncssh.SSHClientProcess[Any]) -> None:
    """Kill a command's process group on the node (sshd's ``killpg``), then close it."""
    if proc.exit_status is None and proc.exit_signal is None:
        with contextlib.suppress(OSError, asyncssh.Error):
            proc.kill()
    proc.close()


async def _communicate(proc: asyncssh.SSHClientProcess[bytes], input: str | None,
                       cap: int) -> tuple[bytes, bytes]:
    """Send ``input``, read stdout and stderr (each capped) and wait for the exit."""
    if input:
        proc.stdin.write(input.encode())
    proc.stdin.write_eof()
    out, err = await read_both(proc.stdout, proc.stderr, cap)
    await proc.wait_closed()
    return out, err


class SSHTransport(Transport):
    """Talks to one node over a single reused asyncssh connection.

    The connection is opened on first use and reopened transparently after it drops.
    At most ``max_channels`` commands/transfers/streams run on it at once; the rest wait.
    ``ssh_user``, ``ssh_port`` (when not 22) and ``ssh_key_path`` come from the node;
    what it leaves unset comes from ``ssh_config`` (``~/.ssh/config``: Host aliases, User,
    Port, IdentityFile, ProxyJump) and, without a key path, from the agent and default keys.
    """

    def __init__(self, node: NodeConfig, health: HealthCheckSection | None = None, *,
                 max_channels: int = DEFAULT_MAX_CHANNELS,
                 ssh_config: str | None = DEFAULT_SSH_CONFIG,
                 call_timeout: float = DEFAULT_CALL_TIMEOUT_S) -> None:
        self.node = node.name
        self.call_timeout = call_timeout
        self.config = node
        self.health = health if health is not None else HealthCheckSection()
        self.known_hosts = Path(self.health.known_hosts or DEFAULT_KNOWN_HOSTS).expanduser()
        self.ssh_config = Path(ssh_config).expanduser() if ssh_config else None
        self.connections_opened = 0
        self._conn: asyncssh.SSHClientConnection | None = None
        self._clients: weakref.WeakKeyDictionary[asyncssh.SSHClientConnection, _Client] = (
            weakref.WeakKeyDictionary())
        self._connecting: asyncio.Future[asyncssh.SSHClientConnection] | None = None
        self._channels = asyncio.Semaphore(max_channels)

    @property
    def target(self) -> str:
        """``user@host:port`` as shown in messages."""
        user = f"{self.config.ssh_user}@" if self.config.ssh_user else ""
        return f"{user}{self.config.host}:{self.config.ssh_port}"

    @property
    def connection(self) -> asyncssh.SSHClientConnection | None:
        """The current connection, or None before the first call or after it dropped."""
        conn = self._conn
        return conn if conn is not None and not conn.is_closed() else None

    async def connect(self) -> None:
        """Open the connection now (it is otherwise opened by the first call)."""
        await self._connection()

    # -- connection management -------------------------------------------------------

    def _connect_options(self, client: _Client) -> dict[str, Any]:
        cfg, health = self.config, self.health
        has_config = self.ssh_config is not None and self.ssh_config.is_file()
        options: dict[str, Any] = {
            "config": [str(self.ssh_config)] if has_config else None,
            "known_hosts": load_known_hosts(self.known_hosts),
            "client_factory": lambda: client,
            "connect_timeout": health.timeout_seconds or None,
            "keepalive_interval": health.keepalive_seconds,
            "keepalive_count_max": health.keepalive_count_max,
        }
        if not names_ciphers(self.ssh_config if has_config else None):
            options["encryption_algs"] = list(PREFERRED_CIPHERS)
        if cfg.ssh_user:
            options["username"] = cfg.ssh_user
        if cfg.ssh_port != SSH_PORT:  # else ~/.ssh/config's Port (or 22) applies
            options["port"] = cfg.ssh_port
        if cfg.ssh_key_path:
            try:
                options["client_keys"] = [load_client_key(cfg.ssh_key_path)]
            except (OSError, asyncssh.KeyImportError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else str(exc)
                raise AuthFailedError(
                    self.node, f"cannot read SSH key {cfg.ssh_key_path}: {reason}") from None
            options["agent_path"] = None  # the declared key only, like IdentitiesOnly
        return options

    async def _open_connection(self) -> asyncssh.SSHClientConnection:
        policy = _HostKeyPolicy(self.known_hosts, self.health.accept_new_host_keys)
        client = _Client(policy)
        try:
            options = self._connect_options(client)
        except ValueError as exc:  # unparsable known_hosts
            raise HostKeyError(self.node, f"cannot read {self.known_hosts}: {exc}") from None
        try:
            conn = await asyncssh.connect(self.config.host, **options)
        except asyncssh.ConfigParseError as exc:
            raise TransportError(self.node, f"cannot use {self.ssh_config}: {exc}") from None
        except asyncssh.HostKeyNotVerifiable as exc:
            raise HostKeyError(self.node, policy.reason(exc.reason)) from None
        except asyncssh.PermissionDenied as exc:
            raise AuthFailedError(
                self.node, f"auth failed for {self.target} ({exc.reason})") from None
        except asyncio.TimeoutError:
            raise TransportTimeoutError(
                self.node, f"timed out after {self.health.timeout_seconds:g} s "
                           f"connecting to {self.target}") from None
        except asyncssh.DisconnectError as exc:
            raise UnreachableError(self.node, f"{exc.reason} ({self.target})") from None
        except OSError as exc:
            raise UnreachableError(self.node, f"{_os_reason(exc)} ({self.target})") from None
        self.connections_opened += 1
        self._clients[conn] = client
        return conn

    async def _connection(self) -> tuple[asyncssh.SSHClientConnection, bool]:
        """The live connection and whether it was opened during this call.

        Callers arriving while a connection attempt runs share that attempt and its
        outcome, so N waiting calls to a dead node fail after one timeout, not N.
        """
        conn = self._conn
        if conn is not None and not conn.is_closed():
            return conn, False
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._attempt())
            self._connecting.add_done_callback(_consume_outcome)
        return await asyncio.shield(self._connecting), True

    async def _attempt(self) -> asyncssh.SSHClientConnection:
        try:
            self._conn = None
            conn = await self._open_connection()
            self._conn = conn
            return conn
        finally:
            self._connecting = None

    def _forget(self, conn: asyncssh.SSHClientConnection) -> None:
        if self._conn is conn:
            self._conn = None
        conn.abort()

    def _link_error(self, exc: BaseException) -> TransportError:
        """Map a failure of an established connection to a typed error."""
        if isinstance(exc, TransportError):
            return exc
        if isinstance(exc, asyncssh.ConnectionLost) and "keepalive" in exc.reason:
            bound = self.health.keepalive_seconds * (self.health.keepalive_count_max + 1)
            return TransportTimeoutError(
                self.node, f"not responding (no keepalive reply for {bound:g} s)")
        if isinstance(exc, asyncssh.ConnectionLost):
            return UnreachableError(self.node, f"connection lost: {exc.reason}")
        if isinstance(exc, asyncssh.DisconnectError):
            return UnreachableError(self.node, f"disconnected: {exc.reason}")
        if isinstance(exc, asyncssh.ChannelOpenError):
            return TransportError(self.node, f"cannot open an SSH channel: {exc.reason}")
        if isinstance(exc, OSError):
            return UnreachableError(self.node, _os_reason(exc))
        return TransportError(self.node, f"{type(exc).__name__}: {exc}")

    async def _open(self, opener: Callable[[asyncssh.SSHClientConnection], Awaitable[_T]],
                    ) -> tuple[asyncssh.SSHClientConnection, _T]:
        """Open a channel with ``opener``.

        A reused connection that turns out to be dead while the channel opens (the server
        went away since the last call) is replaced once, transparently.
        """
        conn, fresh = await self._connection()
        try:
            return conn, await _open_channel(conn, opener)
        except _LINK_ERRORS as exc:
            error = self._failed(conn, exc)
            if fresh or not conn.is_closed() or isinstance(error, TransportTimeoutError):
                raise error from None  # not stale: a live refusal or a frozen node
        conn, _ = await self._connection()
        try:
            return conn, await _open_channel(conn, opener)
        except _LINK_ERRORS as exc:
            raise self._failed(conn, exc) from None

    def _failed(self, conn: asyncssh.SSHClientConnection, exc: BaseException) -> TransportError:
        """An operation failed on ``conn``: drop it when it is dead; return the typed error.

        When the connection is gone, the reason it went (say, keepalive expiry) wins over
        the symptom the operation saw.
        """
        if conn.is_closed() or isinstance(exc, asyncssh.DisconnectError):
            client = self._clients.get(conn)
            if client is not None and client.lost is not None:
                exc = client.lost
            self._forget(conn)
        return self._link_error(exc)

    # -- Transport ---------------------------------------------------------------------

    async def run(self, command: str | Sequence[str], *, input: str | None = None,
                  timeout: float | None = None, check: bool = False,
                  max_output: int = DEFAULT_MAX_OUTPUT) -> CommandResult:
        """Run a command through the login shell of ``ssh_user`` on the node.

        The whole call (waiting for a channel, opening it, the command) is bounded by
        ``timeout``; on timeout, on more than ``max_output`` bytes of output and when the
        caller is cancelled, the command's process group is killed on the node.
        """
        cmd = _as_shell(command)
        limit = self.call_timeout if timeout is None else timeout
        try:
            proc, out, err = await asyncio.wait_for(
                self._run(cmd, input, limit, max_output), limit)
        except TransportError:
            raise
        except asyncio.TimeoutError:
            raise TransportTimeoutError(
                self.node, f"timed out after {limit:g} s: {cmd}") from None
        signal_info = proc.exit_signal
        signal = None
        if signal_info is not None:
            name = signal_info[0]
            signal = name if name.startswith("SIG") else f"SIG{name}"
        status = proc.exit_status if signal is None else None
        result = CommandResult(command=cmd, exit_status=status, signal=signal,
                               stdout=out.decode("utf-8", "replace"),
                               stderr=err.decode("utf-8", "replace"))
        if check and not result.ok:
            what = f"signal {signal}" if signal else f"exit {status}"
            raise CommandFailedError(self.node, f"command failed ({what}): "
                                                f"{result.stderr.strip()[-500:]}",
                                     exit_status=status, stderr=result.stderr)
        return result

    async def _run(self, cmd: str, input: str | None, limit: float, max_output: int,
                   ) -> tuple[asyncssh.SSHClientProcess[bytes], bytes, bytes]:
        """Open a channel, run ``cmd`` under the node-side bound, read capped output."""
        wrapped = node_command(cmd, limit)
        async with self._channels:
            conn, proc = await self._open(
                lambda c: c.create_process(wrapped, encoding=None))
            try:
                out, err = await _communicate(proc, input, max_output)
            except OutputCapped:
                _kill(proc)
                raise OutputTooLargeError(self.node, max_output, cmd) from None
            except _LINK_ERRORS as exc:
                _kill(proc)
                raise self._failed(conn, exc) from None
            except BaseException:  # timed out or the caller went away: not left running
                _kill(proc)
                raise
            if proc.exit_status is None and proc.exit_signal is None:
                # The channel closed with no exit report: the connection went away.
                raise self._failed(conn, asyncssh.ConnectionLost("closed while running"))
        return proc, out, err

    async def put(self, local_path: str, remote_path: str, *,
                  timeout: float | None = None) -> None:
        """Copy a local file to the node over SFTP (parent directories are created)."""
        if not os.path.isfile(local_path):
            raise FileNotFoundError(local_path)
        target = _sftp_path(remote_path)

        async def transfer(sftp: asyncssh.SFTPClient) -> None:
            parent = posixpath.dirname(target)
            if parent:
                await sftp.makedirs(parent, exist_ok=True)
            await sftp.put(local_path, target)

        await self._sftp(transfer, f"put {local_path} -> {remote_path}", timeout)

    async def get(self, remote_path: str, local_path: str, *,
                  timeout: float | None = None) -> None:
        """Copy a file from the node over SFTP (local parent directories are created)."""
        os.makedirs(os.path.dirname(local_path) or ".", exist_ok=True)

        async def transfer(sftp: asyncssh.SFTPClient) -> None:
            await sftp.get(_sftp_path(remote_path), local_path)

        await self._sftp(transfer, f"get {remote_path} -> {local_path}", timeout)

    async def _sftp(self, transfer: Callable[[asyncssh.SFTPClient], Awaitable[None]],
                    what: str, timeout: float | None) -> None:
        """One SFTP session doing ``transfer``, bounded by ``timeout`` as a whole."""
        limit = self.call_timeout if timeout is None else timeout

        async def session() -> None:
            async with self._channels:
                conn, sftp = await self._open(lambda c: c.start_sftp_client())
                try:
                    await transfer(sftp)
                except asyncssh.SFTPError as exc:
                    raise TransportError(self.node, f"{what}: {exc.reason}") from None
                except _LINK_ERRORS as exc:
                    raise self._failed(conn, exc) from None
                finally:
                    sftp.exit()

        try:
            await asyncio.wait_for(session(), limit)
        except TransportError:
            raise
        except asyncio.TimeoutError:
            raise TransportTimeoutError(self.node, f"{what}: timed out after {limit:g} s") \
                from None

    async def stream(self, command: str | Sequence[str], *,
                     timeout: float | None = None) -> AsyncIterator[bytes]:
        """Yield the command's raw stdout bytes as they arrive, until it exits.

        Opening the channel is bounded by the call timeout; the stream as a whole only by
        ``timeout`` when given. However it ends early, the command is killed on the node.
        """
        cmd = _as_shell(command)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        wrapped = cmd if timeout is None else node_command(cmd, timeout)

        def left() -> float:
            return self.call_timeout if deadline is None else max(0.0, deadline - loop.time())

        def expired() -> TransportTimeoutError:
            return TransportTimeoutError(self.node, f"stream timed out after "
                                                    f"{timeout or self.call_timeout:g} s: {cmd}")

        async with self._channels:
            try:
                conn, proc = await asyncio.wait_for(self._open(
                    lambda c: c.create_process(wrapped, encoding=None, stdin=asyncssh.DEVNULL,
                                               stderr=asyncssh.DEVNULL)), left())
            except TransportError:
                raise
            except asyncio.TimeoutError:
                raise expired() from None
            try:
                while True:
                    try:
                        chunk = await (proc.stdout.read(READ_CHUNK) if deadline is None else
                                       asyncio.wait_for(proc.stdout.read(READ_CHUNK), left()))
                    except _LINK_ERRORS as exc:
                        raise self._failed(conn, exc) from None
                    except asyncio.TimeoutError:
                        raise expired() from None
                    if not chunk:
                        break
                    yield chunk
                await proc.wait_closed()
                if proc.exit_status is None and proc.exit_signal is None:
                    raise self._failed(conn, asyncssh.ConnectionLost("closed while streaming"))
            finally:
                _kill(proc)

    async def close(self) -> None:
        """Close the connection (waiting a moment at most, then abort); safe to call twice.

        A healthy node closes in milliseconds; a frozen one never answers, and waiting the
        full connect timeout for it would hold up the end of every command.
        """
        conn, self._conn = self._conn, None
        if conn is None:
            return
        conn.close()
        try:
            await asyncio.wait_for(conn.wait_closed(),
                                   min(self.health.timeout_seconds or CLOSE_WAIT_S, CLOSE_WAIT_S))
        except (asyncio.TimeoutError, *_LINK_ERRORS):
            conn.abort()
