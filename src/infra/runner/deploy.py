"""Code deployment: rsync the project tree to each node's work dir over the node's SSH settings.

rsync does the real work (delta transfer, deletes, ``.gitignore`` rules); this module builds
its command line from the same ``NodeConfig``/``HealthCheckSection`` settings the asyncssh
transport uses, runs it without a shell, parses ``--stats``/``--itemize-changes`` into a
``DeployStats`` and turns rsync/ssh failures into ``DeployError`` with a readable reason.

Never destroying outputs: with ``--delete``, rsync protect rules (``--filter=P PATTERN``,
first in the rule list) keep ``BUILTIN_PROTECT`` paths, the caller's ``protect`` patterns
(``deploy.protect`` and the specs' ``results`` globs, see ``results_protect_patterns``) on
the node. With ``max_deletes`` set, a dry-run check pass counts what ``--delete`` would remove
first: more than the limit raises ``DeployRefused`` with the node untouched; nothing to send
or delete skips the real pass; otherwise the real pass runs under ``--max-delete``.

Skipping unchanged deploys: ``source_fingerprint`` is a cheap hash of the tree's paths, sizes
and mtimes. The caller keeps the fingerprint of the last successful deploy per node (it is
returned in ``DeployResult.fingerprint``) and passes it back as ``last_fingerprint``; when the
tree still hashes the same, the deploy is skipped without contacting the node. This misses
changes made on the node itself, so it is an optimisation only: the authoritative check is a
normal deploy, which rsync turns into a cheap no-op when nothing differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import functools
import hashlib
import math
import os
import posixpath
import re
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from infra.config.model import HealthCheckSection, NodeConfig
from infra.errors import DeployError, DeployRefused, InfraError
from infra.quoting import (
    command_line,
    home_relative,
    normalize_node_path,
    pattern_problem,
    rsync_remote,
    shell_path,
    ssh_option_value,
)

DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".git/", "__pycache__/", "*.pyc", "/logs/", ".infra/", ".venv/",
)
"""Never deployed: VCS data, bytecode, the coordinator's logs and state, virtualenvs."""

BUILTIN_PROTECT: tuple[str, ...] = ("logs/", ".infra/")
"""Never deleted on a node, at any depth: experiment logs and the supervisor's files
(which hold the default ``$INFRA_RESULTS_DIR`` of every instance)."""

GITIGNORE_FILTER = "--filter=:- .gitignore"
"""Per-directory merge of ``.gitignore`` files as exclude rules (``!`` negations unsupported)."""

MKPATH_VERSION = (3, 2, 3)
"""First rsync with ``--mkpath``."""

PROTECT_ARGS = "--protect-args"
"""How every rsync since 3.0 spells "send paths over the protocol, never the remote shell"
(3.3+ also calls it ``--secluded-args``); see ``local_rsync_protect_flag``."""

ProgressCallback = Callable[[str, str], None]


@dataclass(frozen=True)
class DeployStats:
    """What one rsync run did, from ``--stats`` and ``--itemize-changes`` output.

    ``changed`` lists created or updated paths (directories end in ``/``; directories whose
    only change is a timestamp are left out); ``deleted`` the paths removed on the node.
    """

    files_transferred: int = 0
    bytes_sent: int = 0
    total_files: int = 0
    changed: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeployResult:
    """Outcome of deploying to one node; ``stats`` is None when the deploy was skipped.

    ``fingerprint`` is the source fingerprint the deploy was made from (None for dry runs):
    store it and pass it back as ``last_fingerprint`` to skip the next unchanged deploy.
    """

    node: str
    stats: DeployStats | None
    skipped: bool = False
    reason: str = ""
    fingerprint: str | None = None


# --------------------------------------------------------------------------- command line


def known_hosts_path(health: HealthCheckSection) -> str:
    """The known_hosts file both transports verify host keys against."""
    return os.path.expanduser(health.known_hosts or "~/.ssh/known_hosts")


def ssh_command_for(node: NodeConfig, health: HealthCheckSection) -> list[str]:
    """The ssh client command line with the same settings as the asyncssh transport.

    Port, key (only that key), known_hosts, strict host key checking (``accept-new`` only when
    configured), connect timeout and keepalive; ``BatchMode`` so nothing ever prompts.
    """
    cmd = ["ssh", "-p", str(node.ssh_port)]
    if node.ssh_key_path:
        key = os.path.expanduser(node.ssh_key_path)
        cmd += ["-o", f"IdentityFile={ssh_option_value(key)}", "-o", "IdentitiesOnly=yes"]
    cmd += ["-o", "BatchMode=yes"]
    cmd += ["-o", f"UserKnownHostsFile={ssh_option_value(known_hosts_path(health))}"]
    if health.known_hosts:
        # An explicit known_hosts file is the only source of trust, as in asyncssh.
        cmd += ["-o", "GlobalKnownHostsFile=/dev/null"]
    checking = "accept-new" if health.accept_new_host_keys else "yes"
    cmd += ["-o", f"StrictHostKeyChecking={checking}"]
    cmd += ["-o", f"ConnectTimeout={max(1, math.ceil(health.timeout_seconds))}"]
    interval = math.ceil(health.keepalive_seconds) if health.keepalive_seconds > 0 else 0
    cmd += ["-o", f"ServerAliveInterval={interval}"]
    cmd += ["-o", f"ServerAliveCountMax={max(1, health.keepalive_count_max)}"]
    return cmd


_TILDE_USER = re.compile(r"^~[A-Za-z0-9._-]*$")


def remote_dir_for(node: NodeConfig) -> str:
    """The node's work dir as rsync names it: ``~/x`` becomes ``x`` (home-relative).

    Nothing else changes (no stripping, no ``..`` resolution): the deploy lands in exactly
    the directory the supervisor runs experiments in (``remote_work_dir``, which the config
    parser normalised). Raises ``DeployError`` for ``.``/``..`` components and for the home
    or root directory itself, where a ``--delete`` deploy would wipe unrelated files.
    """
    rel = normalize_node_path(home_relative(node.remote_work_dir))
    first = rel.split("/", 1)[0]
    if (rel in ("", ".", "/") or any(p in (".", "..") for p in rel.split("/"))
            or _TILDE_USER.match(rel)):
        raise DeployError(node.name, f"refusing to deploy into {node.remote_work_dir!r}: "
                                     "use a dedicated directory under the home directory")
    if first.startswith("~") and not _TILDE_USER.match(first):
        raise DeployError(node.name, f"remote_work_dir {node.remote_work_dir!r}: "
                                     "invalid ~user prefix")
    return rel


def local_work_dir(node: NodeConfig) -> Path:
    """A local node's work dir, resolved (a relative dir is relative to the home directory)."""
    path = Path(node.remote_work_dir).expanduser()
    if not path.is_absolute():
        path = Path.home() / path
    return path.resolve()


def protect_filter(node: str, pattern: str) -> str:
    """One rsync protect rule as a single argv word: matches are never deleted by --delete.

    (``P`` rules act on the receiving side only, so they never change what is sent.) The
    argv reaches rsync without a shell; rsync reads the rest of the word as the pattern.
    """
    if not pattern.strip() or pattern_problem(pattern):
        raise DeployError(node, f"invalid protect pattern {pattern!r}")
    return f"--filter=P {pattern}"


def results_protect_patterns(workdir: str | None, results: Sequence[str]) -> tuple[str, ...]:
    """Protect patterns for a spec's ``results`` globs, anchored at the work dir.

    Each glob is relative to the instance's cwd (``workdir`` inside the work dir); the second
    pattern keeps everything inside a matching directory too.
    """
    out: list[str] = []
    for glob in results:
        rel = posixpath.normpath(posixpath.join(workdir or "", glob.strip("/")))
        if rel in (".", "") or rel.startswith("../"):
            continue
        out += [f"/{rel}", f"/{rel}/**"]
    return tuple(out)


def build_rsync_command(node: NodeConfig, health: HealthCheckSection, source: Path, *,
                        excludes: Sequence[str], delete: bool = True, dry_run: bool = False,
                        rsync_version: tuple[int, ...] | None = None,
                        protect: Sequence[str] = (), max_delete: int | None = None,
                        protect_flag: str | None = PROTECT_ARGS) -> list[str]:
    """The rsync argv that copies ``source``'s contents into the node's work dir (pure).

    ``rsync_version`` is the local rsync's version (None: assume a current one); it decides
    between ``--mkpath`` and a ``mkdir -p`` prefix on the remote rsync command.
    ``protect_flag`` is how the local rsync spells ``--protect-args`` (None: it has none);
    it is always passed for a remote node, so the work dir reaches the node's rsync over
    the protocol and never through its shell; without it, a work dir with characters the
    shell would read is refused. Local nodes get a plain local rsync (the caller creates
    the target dir). With ``delete``, ``BUILTIN_PROTECT`` and ``protect`` patterns come
    first (rsync takes the first matching rule) and ``max_delete`` caps deletions. Raises
    ``DeployError`` for a work dir that is the home or root directory, or unsafe.
    """
    version = rsync_version or (99,)
    cmd = ["rsync", "-az", "--stats", "--itemize-changes"]
    if delete:
        cmd.append("--delete")
        if max_delete is not None:
            cmd.append(f"--max-delete={max_delete}")
        cmd += [protect_filter(node.name, p) for p in (*BUILTIN_PROTECT, *protect)]
    if dry_run:
        cmd.append("--dry-run")
    for pattern in (*DEFAULT_EXCLUDES, *excludes):
        if not pattern.strip() or pattern_problem(pattern):
            raise DeployError(node.name, f"invalid exclude pattern {pattern!r}")
        cmd.append(f"--exclude={pattern}")
    cmd.append(GITIGNORE_FILTER)
    src = str(source).rstrip("/") + "/"
    if node.is_local:
        return [*cmd, src, str(local_work_dir(node)) + "/"]

    remote_dir = remote_dir_for(node)
    try:
        target = rsync_remote(node.host, node.ssh_user, remote_dir + "/",
                              protected=protect_flag is not None)
    except ValueError as exc:
        raise DeployError(node.name, str(exc)) from None
    if version >= MKPATH_VERSION:
        cmd.append("--mkpath")
    else:
        cmd.append(f"--rsync-path=mkdir -p {shell_path(remote_dir)} && rsync")
    if protect_flag is not None:
        cmd.append(protect_flag)
    cmd += ["-e", command_line(ssh_command_for(node, health))]
    return [*cmd, src, target]


# --------------------------------------------------------------------------- output parsing

_STAT_PATTERNS = {
    "total_files": re.compile(r"^Number of files:\s*([\d,.]+)", re.M),
    "files_transferred": re.compile(
        r"^Number of (?:regular )?files transferred:\s*([\d,.]+)", re.M),
    "bytes_sent": re.compile(r"^Total bytes sent:\s*([\d,.]+)", re.M),
}
_ITEM = re.compile(r"^([<>ch.])([fdLDS])([^ ]{7,9}) (.+)$")
_DELETING = re.compile(r"^\*deleting +(.+)$")
_NOT_EMPTY = re.compile(r"^cannot delete non-empty directory: (.+)$", re.M)


def _number(text: str) -> int:
    return int(re.sub(r"[,.]", "", text))


def parse_rsync_stats(output: str) -> DeployStats:
    """Parse rsync's stdout from ``--stats --itemize-changes`` (rsync 3.0 to 3.4+ formats)."""
    values: dict[str, int] = {}
    for key, pattern in _STAT_PATTERNS.items():
        match = pattern.search(output)
        values[key] = _number(match.group(1)) if match else 0
    changed: list[str] = []
    deleted: list[str] = []
    # A directory kept for its protected contents: a dry run still lists it as deleted.
    kept = {m.rstrip("/") + "/" for m in _NOT_EMPTY.findall(output)}
    for line in output.splitlines():
        gone = _DELETING.match(line)
        if gone:
            if gone.group(1) not in kept:
                deleted.append(gone.group(1))
            continue
        item = _ITEM.match(line)
        if not item:
            continue
        update, kind, flags, path = item.groups()
        if kind == "d" and update == "." and "+" not in flags:
            continue  # a directory whose timestamp or permissions moved along with its files
        if kind == "L":
            path = path.split(" -> ", 1)[0]
        elif update == "h":
            path = path.split(" => ", 1)[0]
        changed.append(path)
    return DeployStats(files_transferred=values["files_transferred"],
                       bytes_sent=values["bytes_sent"], total_files=values["total_files"],
                       changed=tuple(changed), deleted=tuple(deleted))


_FAILURES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.I | re.M), reason) for pattern, reason in (
        (r"REMOTE HOST IDENTIFICATION HAS CHANGED",
         "host key verification failed: the node's host key does not match known_hosts"),
        (r"No \S+ host key is known for",
         "host key verification failed: the node's host key is not in known_hosts"),
        (r"Host key verification failed", "host key verification failed"),
        (r"Connection refused", "connection refused"),
        (r"Timeout, server .* not responding", "node stopped responding (ssh keepalive)"),
        (r"Connection timed out|Operation timed out", "connection timed out"),
        (r"Could not resolve hostname", "could not resolve the node's host name"),
        (r"No route to host|Network is unreachable", "no route to host"),
        (r"Identity file .* not accessible",
         "permission denied: ssh key file not accessible on the coordinator"),
        (r"Permission denied \(publickey", "permission denied: the node refused the ssh key"),
        (r"\brsync: (?:command )?not found", "rsync not found on node"),
        (r"Failed to exec ssh", "ssh client not found on the coordinator"),
        (r"--mkpath: unknown option", "the node's rsync is too old for --mkpath"),
        (r"No space left on device", "no space left on the node"),
    ))
_MKPATH_UNKNOWN = re.compile(r"--mkpath: unknown option|unknown option.*--mkpath")
_PERMISSION_LINE = re.compile(r"^rsync: (?:\[\w+\] )?(.*): Permission denied \(13\)", re.M)


def rsync_failure_reason(stderr: str, returncode: int) -> str:
    """A short readable reason for a failed rsync run, from its stderr and exit code."""
    for pattern, reason in _FAILURES:
        if pattern.search(stderr):
            return reason
    denied = _PERMISSION_LINE.search(stderr)
    if denied:
        return f"permission denied: {denied.group(1)}"
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    if returncode == 127:
        # Only say "rsync" when the node said so: another missing command is a different fix.
        missing = next((ln for ln in lines if ln.endswith("not found")), None)
        return f"command not found on node: {missing}" if missing else "rsync not found on node"
    detail = next((ln for ln in lines if ln.startswith("rsync:")), lines[0] if lines else "")
    return f"rsync failed (exit {returncode}): {detail}" if detail else \
        f"rsync failed (exit {returncode})"


# --------------------------------------------------------------------------- fingerprint


def _roughly_excluded(rel: str, is_dir: bool, patterns: Sequence[str]) -> bool:
    name = rel.rsplit("/", 1)[-1]
    for raw in patterns:
        dir_only = raw.endswith("/")
        pattern = raw.rstrip("/")
        if not pattern or (dir_only and not is_dir):
            continue
        if pattern.startswith("/") or "/" in pattern:
            if fnmatch.fnmatchcase(rel, pattern.lstrip("/")):
                return True
        elif fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def source_fingerprint(source: Path, excludes: Sequence[str]) -> str:
    """Hash of the tree's relative paths, sizes, modes and mtimes (no file contents).

    Honours the default and configured excludes roughly (not ``.gitignore``): it may see a
    change rsync would not deploy, never the reverse, so a stale skip cannot come from it.
    """
    patterns = (*DEFAULT_EXCLUDES, *excludes)
    digest = hashlib.sha256()
    digest.update(f"{Path(source).resolve()}\0{chr(0).join(patterns)}\n".encode())
    root = str(source)
    entries: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        kept = []
        for name in sorted(dirnames):
            rel = rel_dir + name
            if os.path.islink(os.path.join(dirpath, name)):
                filenames.append(name)  # rsync copies a symlink to a dir as a link
            elif not _roughly_excluded(rel, True, patterns):
                kept.append(name)
                entries.append(f"d {rel}")
        dirnames[:] = kept
        for name in filenames:
            rel = rel_dir + name
            if _roughly_excluded(rel, False, patterns):
                continue
            full = os.path.join(dirpath, name)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue
            target = os.readlink(full) if os.path.islink(full) else ""
            entries.append(f"f {rel}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_mode}\0{target}")
    for entry in sorted(entries):
        digest.update(entry.encode(errors="surrogateescape") + b"\n")
    return digest.hexdigest()


# --------------------------------------------------------------------------- running

@dataclass(frozen=True)
class LocalRsync:
    """What the coordinator's rsync can do: its version and its ``--protect-args`` spelling."""

    version: tuple[int, ...]
    protect_flag: str | None


_local_rsync: list[LocalRsync] = []


def parse_rsync_help(text: str) -> LocalRsync:
    """Version and protect-args flag from ``rsync --help`` (3.3+ says ``--secluded-args``)."""
    match = re.search(r"version\s+(\d+)\.(\d+)\.(\d+)", text)
    version = tuple(int(x) for x in match.groups()) if match else (0, 0, 0)
    flag = next((f for f in ("--secluded-args", PROTECT_ARGS) if f in text), None)
    return LocalRsync(version, flag)


async def local_rsync() -> LocalRsync:
    """The coordinator's rsync, probed once per process with ``rsync --help``.

    Raises ``FileNotFoundError`` when rsync is not installed.
    """
    if not _local_rsync:
        proc = await asyncio.create_subprocess_exec(
            "rsync", "--help", stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            env=_rsync_env())
        out, _ = await proc.communicate()
        _local_rsync.append(parse_rsync_help(out.decode(errors="replace")))
    return _local_rsync[0]


async def local_rsync_version() -> tuple[int, ...]:
    """The coordinator's rsync version, e.g. ``(3, 2, 7)``; probed once per process."""
    return (await local_rsync()).version


def _rsync_env() -> dict[str, str]:
    env = dict(os.environ)
    env["LC_ALL"] = "C"  # English messages and plain number formats to parse
    for name in ("RSYNC_OLD_ARGS", "RSYNC_PROTECT_ARGS", "RSYNC_RSH"):
        env.pop(name, None)
    return env


async def _run_rsync(node: NodeConfig, argv: list[str]) -> tuple[int, str, str]:
    # Own process group: cancelling can kill rsync and its ssh child together. The spawn is
    # shielded: a cancellation that lands while the process is being created still gets the
    # process back, to kill it, instead of leaving an rsync running after Ctrl-C.
    spawn = asyncio.ensure_future(asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=_rsync_env(), start_new_session=True))
    try:
        proc = await asyncio.shield(spawn)
    except FileNotFoundError:
        raise DeployError(node.name, "rsync is not installed on the coordinator") from None
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await _end_rsync(await spawn)
        raise
    try:
        out, err = await proc.communicate()
    finally:
        if proc.returncode is None:  # cancelled: leave neither rsync nor ssh running
            await _end_rsync(proc)
    rc = proc.returncode if proc.returncode is not None else -1
    return rc, out.decode(errors="replace"), err.decode(errors="replace")


async def _end_rsync(proc: asyncio.subprocess.Process) -> None:
    """Kill rsync's process group and read its pipes to the end, so its transport closes now
    rather than when collected after the loop is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(proc.communicate(), 5)
    await proc.wait()


def _local_target(node: NodeConfig, source: Path) -> tuple[Path, str | None]:
    """A local node's resolved work dir and, when rsync must not run, why."""
    target = local_work_dir(node)
    src = source.resolve()
    if target == src:
        return target, "work dir is the source tree"
    if target == Path.home().resolve() or target == Path(target.anchor):
        raise DeployError(node.name, f"refusing to deploy into {target}")
    if src in target.parents:
        raise DeployError(node.name, f"work dir {target} is inside the source tree {src}")
    if target in src.parents:
        raise DeployError(node.name, f"source tree {src} is inside the work dir {target}")
    return target, None


@dataclass(frozen=True)
class _Options:
    """What one deploy asks of rsync, shared by its check pass and its real pass."""

    excludes: tuple[str, ...]
    protect: tuple[str, ...]
    delete: bool
    max_deletes: int | None


async def _rsync_pass(node: NodeConfig, health: HealthCheckSection, source: Path,
                      opts: _Options, *, dry_run: bool) -> str:
    """Run one rsync pass and return its stdout; rsync failures become ``DeployError``."""
    try:
        local = await local_rsync()
    except FileNotFoundError:
        raise DeployError(node.name, "rsync is not installed on the coordinator") from None

    def argv(rsync_version: tuple[int, ...]) -> list[str]:
        return build_rsync_command(node, health, source, excludes=opts.excludes,
                                   delete=opts.delete, dry_run=dry_run,
                                   rsync_version=rsync_version, protect=opts.protect,
                                   max_delete=None if dry_run else opts.max_deletes,
                                   protect_flag=local.protect_flag)

    rc, out, err = await _run_rsync(node, argv(local.version))
    if rc != 0 and not node.is_local and _MKPATH_UNKNOWN.search(err):
        # Our rsync has --mkpath, the node's does not: create the dir with a mkdir prefix.
        rc, out, err = await _run_rsync(node, argv((3, 2, 2)))
    if rc == 25:  # --max-delete reached: deletions appeared after the check pass
        raise DeployError(node.name, f"stopped deleting at deploy.max_deletes "
                                     f"({opts.max_deletes}): more files to delete appeared "
                                     "since the check; rerun to see them")
    if rc not in (0, 24):  # 24: some source files vanished mid-transfer; the rest arrived
        raise DeployError(node.name, rsync_failure_reason(err, rc))
    return out


def nothing_to_change(stats: DeployStats) -> bool:
    """True when a dry run found nothing to send and nothing to delete.

    (Directories whose only change is a timestamp do not count, as in ``DeployStats``.)
    """
    return not stats.changed and not stats.deleted and stats.files_transferred == 0


async def _deploy(node: NodeConfig, health: HealthCheckSection, source: Path, opts: _Options,
                  *, dry_run: bool, fingerprint: str | None,
                  last_fingerprint: str | None,
                  checked: Callable[[], None] | None = None) -> DeployResult:
    """One node's deploy; ``checked`` is called once its deletions are known to be allowed."""
    if checked is not None and not (opts.delete and opts.max_deletes is not None):
        checked()  # no deletion check to wait for
    if not source.is_dir():
        raise DeployError(node.name, f"source {source} is not a directory")
    if node.is_local:
        target, why_not = _local_target(node, source)
        if why_not:
            return DeployResult(node.name, None, skipped=True, reason=why_not,
                                fingerprint=fingerprint)
        if not dry_run:
            target.mkdir(parents=True, exist_ok=True)
    if (last_fingerprint is not None and fingerprint == last_fingerprint and not dry_run):
        return DeployResult(node.name, None, skipped=True,
                            reason="source unchanged since the last deploy",
                            fingerprint=fingerprint)
    if dry_run:
        stats = parse_rsync_stats(await _rsync_pass(node, health, source, opts, dry_run=True))
        return DeployResult(node.name, stats, reason="dry run")
    if opts.delete and opts.max_deletes is not None:
        # Check pass: count what --delete would remove before anything changes on the node.
        check = parse_rsync_stats(await _rsync_pass(node, health, source, opts, dry_run=True))
        if len(check.deleted) > opts.max_deletes:
            raise DeployRefused(node.name, len(check.deleted), opts.max_deletes,
                                check.deleted[:20])
        if checked is not None:
            checked()
        if nothing_to_change(check):  # the real pass would be a no-op: spare the round
            return DeployResult(node.name, check, fingerprint=fingerprint)
    stats = parse_rsync_stats(await _rsync_pass(node, health, source, opts, dry_run=False))
    return DeployResult(node.name, stats, fingerprint=fingerprint)


async def deploy_node(node: NodeConfig, health: HealthCheckSection, source: Path, *,
                      excludes: Sequence[str], delete: bool = True, dry_run: bool = False,
                      last_fingerprint: str | None = None, protect: Sequence[str] = (),
                      max_deletes: int | None = None) -> DeployResult:
    """rsync ``source`` into one node's work dir; raises ``DeployError`` with a clear reason.

    A local node whose work dir is the source tree is skipped; with ``last_fingerprint``
    equal to the tree's current fingerprint the deploy is skipped without contacting the node.
    ``protect`` patterns (besides ``BUILTIN_PROTECT``) are never deleted; with ``delete`` and
    ``max_deletes`` set, a dry run first counts the deletions and more than ``max_deletes``
    raise ``DeployRefused`` with the node untouched (None: no limit, one rsync pass).
    """
    fingerprint = await asyncio.to_thread(source_fingerprint, source, excludes) \
        if source.is_dir() else None
    opts = _Options(tuple(excludes), tuple(protect), delete, max_deletes)
    return await _deploy(node, health, source, opts, dry_run=dry_run, fingerprint=fingerprint,
                         last_fingerprint=last_fingerprint)


async def deploy_all(nodes: Sequence[NodeConfig], health: HealthCheckSection, source: Path, *,
                     excludes: Sequence[str], delete: bool = True, dry_run: bool = False,
                     on_progress: ProgressCallback | None = None,
                     last_fingerprints: Mapping[str, str] | None = None,
                     max_parallel: int | None = None, protect: Sequence[str] = (),
                     max_deletes: int | None = None,
                     on_checked: Callable[[str], None] | None = None,
                     then: Callable[[str, DeployResult | InfraError], Awaitable[None]] | None
                     = None) -> dict[str, DeployResult | InfraError]:
    """Deploy to every node concurrently: node name -> result or the error for that node.

    One failing node never hides the others (Fabric's ``GroupResult``). ``on_progress`` is
    called with (node name, "started" | "done" | "failed") and must not raise.
    ``max_parallel`` bounds simultaneous rsync/ssh processes (default: one per node, at
    least 8, at most 32; a lab has few nodes and a second wave costs a full rsync round).
    ``protect`` and ``max_deletes`` as for ``deploy_node``, per node. ``on_checked`` is
    called with a node's name once its deletion check passed (at once without one);
    ``then`` is awaited with each node's result as soon as that node is done, outside the
    parallel bound (a launch starts a node's instances there without waiting for the rest).
    """
    fingerprint = await asyncio.to_thread(source_fingerprint, source, excludes) \
        if source.is_dir() else None
    if max_parallel is None:
        max_parallel = min(32, max(8, len(nodes)))
    limit = asyncio.Semaphore(max(1, max_parallel))
    last = last_fingerprints or {}
    opts = _Options(tuple(excludes), tuple(protect), delete, max_deletes)

    async def one(node: NodeConfig) -> DeployResult | InfraError:
        result = await bounded(node)
        if then is not None:
            await then(node.name, result)
        return result

    async def bounded(node: NodeConfig) -> DeployResult | InfraError:
        async with limit:
            if on_progress:
                on_progress(node.name, "started")
            try:
                result = await _deploy(node, health, source, opts, dry_run=dry_run,
                                       fingerprint=fingerprint,
                                       last_fingerprint=last.get(node.name),
                                       checked=None if on_checked is None
                                       else functools.partial(on_checked, node.name))
            except InfraError as exc:
                if on_progress:
                    on_progress(node.name, "failed")
                return exc
            if on_progress:
                on_progress(node.name, "done")
            return result

    results = await asyncio.gather(*(one(node) for node in nodes))
    return {node.name: result for node, result in zip(nodes, results, strict=True)}
