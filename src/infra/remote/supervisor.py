"""Node-side supervisor: runs one experiment detached, applies the restart policy, records state.

Standard library only, Python 3.8+. The coordinator copies this file, with its sibling
``pool.py`` (node-side worker pools, the ``pool-sync`` subcommand) and ``telemetry.py``
(the per-instance sampler, started when the request carries ``telemetry``), to
``<remote_work_dir>/.infra/bin-<sha256[:12]>/`` (versioned by content) and calls it over
SSH; every subcommand except ``follow`` prints one JSON document between the two marker
strings, so shell noise around it cannot break parsing.

Layout under ROOT (``<remote_work_dir>/.infra``)::

    runs/RUN/INSTANCE/state.json      the instance's state, replaced atomically
    runs/RUN/INSTANCE/request.json    the start request as received
    runs/RUN/INSTANCE/output.log      the program's stdout + stderr (append only)
    runs/RUN/INSTANCE/supervisor.log  the supervisor's own output (tracebacks only)
    runs/RUN/INSTANCE/telemetry.jsonl one JSON sample per interval (telemetry.py), when asked
    runs/RUN/INSTANCE/stop.json       present once a stop was requested
    runs/RUN/INSTANCE/reserve         64 KiB given back when the disk is full (see below)
    runs/RUN/INSTANCE/results/        default INFRA_RESULTS_DIR
    runs/RUN/INSTANCE/fence.json      the watching coordinator's fence (see below)
    runs/RUN/.previous/INSTANCE.pN.*  an earlier placement's copy, kept after a move back
    runs/RUN/.pools/POOL/             a node-side pool's queue and records (see pool.py)

Claims (``CLAIMS`` = ``~/.lab-orchestrator/claims`` by default, per account, or a shared
sticky directory named in the request): one JSON file per live instance with what it holds
(slots, RAM, GPU memory, cores, device ids, ports) and who started it. ``start`` takes the
node-wide lock ``CLAIMS/.lock`` (flock), drops claims whose instance is over, checks the
request against the node's capacity and the live claims, and refuses with a reason when it
no longer fits; so two coordinators can never overcommit a node. ``claims`` lists them.

Fencing: a start request with ``fence: true`` (``recover: cluster`` work) is stopped by its
supervisor when ``fence.json`` holds a deadline that has passed: the watching coordinator
renews it with every status sweep and clears it when it detaches, so work nobody watches is
never fenced, and a partitioned node stops its copy before the coordinator starts another.

Subcommands: ``start`` (idempotent: the instance directory is created with ``os.mkdir``, so
a retried start never runs a second copy), ``status`` (every instance on the node in one
call, with live checks), ``stop``, ``follow`` (raw log bytes from an offset until the
instance ended and the file is drained), ``read`` (one chunk of the log as JSON),
``pool-sync`` (hands tasks to a run's node-side pool; see pool.py) and ``prune`` (removes
``runs/RUN`` of runs none of whose instances is active here and whose pools' daemons are
gone; claims are never touched).

Restart policy (applied here, so it works while the coordinator is away). An attempt that
ends with exit code 0 ends the instance ("exited"). An attempt that ends after a stop was
requested is never a failure and never restarted ("stopped"); so is a SIGTERM/SIGINT that
the supervisor did not send (someone stopped it on purpose). Every other end is a failure.
The instance gives up ("failed") when the number of failed attempts so far reaches the
limit for the kind of the latest failure:

    exit code 126 or 127, or a non-zero exit code within
      ``quick_failure_seconds`` of the attempt's start (the command is broken)  2
    SIGSEGV, SIGILL, SIGBUS, SIGFPE (hardware or memory-safety faults)   2
    SIGKILL (likely out of memory), SIGABRT                               3
    non-zero exit code or any other signal                                3

``max_retries`` counts restarts: ``max_retries=N`` allows at most N+1 attempts. When set it
replaces the limit for exit codes and other signals and caps the three other limits above
(so ``max_retries=0`` never restarts anything, and a segfault still gives up after 2).

A broken command (exit 126: found but not executable, 127: not found, or any non-zero exit
within ``restart.quick_failure_seconds`` of its attempt's start, default
QUICK_FAILURE_SECONDS; 0 turns the time rule off) is retried at most once: running it again
elsewhere or later will not help. Its final state has ``failure_class: "broken_command"``,
which tells the coordinator never to move it. ``failure_class`` always names the class of
the latest failed attempt (None once an attempt ends well). Every failed attempt's reason
ends with the last non-empty line that attempt wrote
(``exit code 127 (command not found): sh: 1: pyhton3: not found``).
``auto_restart: false`` never restarts. ``retry_delay_seconds`` is waited between attempts.
``always: true`` (service and system jobs) also restarts after a clean exit (code 0); the
failure limits above still stop a crash loop.

The instance is its process group: when an attempt ends, processes left in its group get
SIGTERM and, after a short grace, SIGKILL, so a restart never competes with leftovers.

Disk full. The supervisor keeps its own record writable: state.json is replaced atomically
while there is room; when that fails with ENOSPC/EDQUOT it is rewritten in place (its blocks
are already allocated), and if that does not fit, the instance's ``reserve`` file is deleted
to make room. It notices a full disk on its own writes, every DISK_CHECK_SECONDS while the
instance is active (os.statvfs of the log, results and working directories) and when an
attempt ends; it records ``disk_full`` ("no space left on device (PATH: N bytes free)") in
state.json and adds it to the attempt's end reason.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import Any

BEGIN = "@@INFRA-JSON-BEGIN@@"
END = "@@INFRA-JSON-END@@"

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
ACTIVE_STATES = ("starting", "running", "restarting")
FINAL_STATES = ("exited", "failed", "stopped", "lost")

HARD_FAULT_SIGNALS = ("SIGSEGV", "SIGILL", "SIGBUS", "SIGFPE")
RESOURCE_SIGNALS = ("SIGKILL", "SIGABRT")
INTENTIONAL_SIGNALS = ("SIGTERM", "SIGINT")
LIMITS = {"broken_command": 2, "hard_fault": 2, "resource": 3, "exit_code": 3, "signal": 3}
BROKEN_EXIT_CODES = {126: "command not executable", 127: "command not found"}
QUICK_FAILURE_SECONDS = 3.0     # a non-zero exit sooner than this after its start: broken

START_WAIT_SECONDS = 10.0       # start returns once the first pid is recorded, or after this
NEVER_STARTED_SECONDS = 60.0    # a "starting" instance without a supervisor after this is lost
LEFTOVER_GRACE_SECONDS = 5.0    # SIGTERM -> SIGKILL for processes left in an ended attempt's group
KILL_WAIT_SECONDS = 5.0         # how long to wait for a SIGKILLed group to disappear
DEFAULT_GRACE_SECONDS = 10.0
LAST_LINE_CHARS = 200
DEFAULT_CLAIMS_DIR = "~/.lab-orchestrator/claims"
LOCK_WAIT_SECONDS = 20.0        # how long start waits for the node-wide claims lock
FENCE_GRACE_SECONDS = 5.0       # SIGTERM -> SIGKILL when a fence expires
WAIT_POLL_SECONDS = 0.25        # how often the supervisor looks at its fence while waiting
EPS = 1e-9
PR_SET_CHILD_SUBREAPER = 36
TELEMETRY_FILE = "telemetry.jsonl"  # the sampler's file, next to output.log
TELEMETRY_MAX_BYTES = 256 * 1024      # telemetry bytes per instance and status call (default)
TELEMETRY_TOTAL_BYTES = 4 * 1024 * 1024  # telemetry bytes per status call (default)
TELEMETRY_CAP_BYTES = 8 * 1024 * 1024    # what a caller may ask for at most (answer size)


class Bad(Exception):
    """A request the supervisor refuses (bad id, unknown instance); reported as ok=false."""


# --------------------------------------------------------------------------- small helpers

def emit(document: dict[str, Any]) -> None:
    """Print one marker-wrapped JSON document on stdout."""
    sys.stdout.write(BEGIN + json.dumps(document, sort_keys=True) + END + "\n")
    sys.stdout.flush()


def check_id(value: Any, what: str) -> str:
    """Refuse ids that are not safe single path components."""
    if not isinstance(value, str) or not ID_RE.match(value) or ".." in value:
        raise Bad(f"invalid {what} {value!r}: use letters, digits and ._@- (at most 128, no '..')")
    return value


def instance_dir(root: str, run_id: str, instance_id: str) -> str:
    return os.path.join(root, "runs", run_id, instance_id)


def read_json(path: str) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing or unreadable."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def write_json_atomic(path: str, document: dict[str, Any]) -> None:
    """Write temp + fsync + os.replace, so a reader never sees half a document."""
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
    try:
        with open(tmp, "w") as f:
            json.dump(document, f, sort_keys=True, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a failed write must not leave its blocks behind
            os.unlink(tmp)
        raise
    try:
        dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


# --------------------------------------------------------------------------- disk full

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
RESERVE_BYTES = 64 * 1024       # per active instance: given back so its state stays writable
DISK_LOW_BYTES = 256 * 1024     # less free space than this (for the node user) counts as full
DISK_CHECK_SECONDS = 2.0        # how often an active instance's filesystems are looked at
FINAL_WRITE_SECONDS = 30.0      # how long the supervisor keeps trying to record the end
STATE_READ_TRIES = 3            # an in-place rewrite may be read half done: read again


def no_space(exc: BaseException) -> bool:
    """True for the errors of a full disk or an exhausted quota."""
    return isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS


def free_bytes(path: str) -> int | None:
    """Bytes the node user may still write on the filesystem holding ``path`` (or its parent).

    None when unknown, and for read-only or size-less filesystems (nobody writes there, so
    they are never "full").
    """
    probe = os.path.abspath(path)
    while True:
        try:
            st = os.statvfs(probe)
        except OSError:
            parent = os.path.dirname(probe)
            if parent == probe:
                return None
            probe = parent
            continue
        if st.f_blocks == 0 or st.f_flag & os.ST_RDONLY:
            return None
        return st.f_bavail * st.f_frsize


def no_space_text(path: str, free: int | None, quota: bool = False) -> str:
    """The reason recorded for a full disk: what, where and how much is left."""
    left = "unknown" if free is None else str(free)
    extra = ", disk quota exceeded" if quota else ""
    return f"no space left on device ({path}: {left} bytes free{extra})"


def full_disk(paths: list[str]) -> str | None:
    """The no-space reason for the first of ``paths`` whose filesystem is (nearly) full."""
    for path in paths:
        free = free_bytes(path)
        if free is not None and free < DISK_LOW_BYTES:
            return no_space_text(path, free)
    return None


def make_reserve(path: str) -> None:
    """Best effort: RESERVE_BYTES of real (incompressible) blocks to give back when full."""
    try:
        with open(path, "wb") as f:
            f.write(os.urandom(RESERVE_BYTES))
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(path)


def release_reserve(path: str) -> bool:
    """Delete the reserve file, freeing its blocks; True when there was one."""
    try:
        os.unlink(path)
    except OSError:
        return False
    return True


def rewrite_in_place(path: str, document: dict[str, Any]) -> bool:
    """Overwrite ``path`` with compact JSON in the blocks it has; False when it is missing.

    Used only when the atomic write found no room. A document longer than the blocks the
    file already holds first gets them with posix_fallocate, which fails (ENOSPC) without
    touching the file; shorter text is padded with spaces, so one write leaves valid JSON.
    """
    data = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as exc:
        if no_space(exc):
            raise
        return False
    try:
        st = os.fstat(fd)
        if len(data) > max(st.st_size, st.st_blocks * 512):
            try:
                os.posix_fallocate(fd, 0, len(data))
            except OSError as exc:
                if no_space(exc):
                    raise  # nothing written: the old record is still whole
        data += b" " * max(0, st.st_size - len(data))
        if os.pwrite(fd, data, 0) != len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def write_state(path: str, document: dict[str, Any]) -> bool:
    """Write an instance's state.json even on a full disk; False when nothing worked.

    Atomic replace while there is room. On ENOSPC/EDQUOT: record ``disk_full`` in the
    document and rewrite the file in place; if that needs room too, free the instance's
    reserve and try both ways again. Other errors are raised.
    """
    try:
        write_json_atomic(path, document)
        return True
    except OSError as exc:
        if not no_space(exc):
            raise
        folder = os.path.dirname(path)
        document["disk_full"] = (full_disk([folder]) or
                                 no_space_text(folder, free_bytes(folder),
                                               exc.errno == errno.EDQUOT))
    for attempt in range(2):
        if attempt == 1:
            release_reserve(os.path.join(os.path.dirname(path), "reserve"))
            try:
                write_json_atomic(path, document)
                return True
            except OSError as exc:
                if not no_space(exc):
                    raise
        try:
            if rewrite_in_place(path, document):
                return True
        except OSError as exc:
            if not no_space(exc):
                raise
    return False


def error_text(exc: BaseException, root: str) -> str:
    """What a failed subcommand reports: a full disk by name, anything else as it is."""
    if not isinstance(exc, OSError) or not no_space(exc):
        return f"internal error: {exc!r}"
    folder = os.path.dirname(str(exc.filename)) if exc.filename else norm_root(root)
    return no_space_text(folder, free_bytes(folder), exc.errno == errno.EDQUOT)


def read_state(path: str) -> dict[str, Any] | None:
    """state.json, read again when it exists but does not parse (an in-place rewrite)."""
    for attempt in range(STATE_READ_TRIES):
        doc = read_json(path)
        if doc is not None or not os.path.exists(path):
            return doc
        if attempt + 1 < STATE_READ_TRIES:
            time.sleep(0.01)
    return None


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state letter, process group, start ticks) from /proc/PID/stat, or None when gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except (OSError, ValueError):
        return None
    fields = data[data.rfind(")") + 2:].split()
    try:
        # fields[0] is field 3 of proc(5): state; field 5 pgrp; field 22 starttime.
        return fields[0], int(fields[2]), int(fields[19])
    except (IndexError, ValueError):
        return None


def start_ticks(pid: int) -> int | None:
    stat = proc_stat(pid)
    return stat[2] if stat else None


def is_alive(pid: Any, ticks: Any) -> bool:
    """True when ``pid`` runs and is still the process we started (same start ticks)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    stat = proc_stat(pid)
    if stat is None:
        if os.path.isdir("/proc/self"):
            return False
        try:  # no procfs: the best we can do is "some process has this pid"
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    if stat[0] in ("Z", "X"):
        return False
    return ticks is None or stat[2] == ticks


def group_members(pgid: int | None) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    if not pgid:
        return []
    try:  # cheap first: an empty group needs no scan of /proc (the common end of an attempt)
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []
    except PermissionError:
        pass
    members = []
    try:
        names = os.listdir("/proc")
    except OSError:
        names = []
    if not names:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    for name in names:
        if not name.isdigit():
            continue
        stat = proc_stat(int(name))
        if stat is not None and stat[1] == pgid and stat[0] not in ("Z", "X"):
            members.append(int(name))
    return members


def boot_id() -> str | None:
    """This boot's id: a pid or start time recorded before a reboot means nothing after it."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def same_boot(doc: dict[str, Any]) -> bool:
    recorded = doc.get("boot_id")
    return recorded is None or recorded == boot_id()


def our_group_members(doc: dict[str, Any]) -> list[int]:
    """Live members of the instance's process group, only while that group is provably ours.

    The group id is the latest attempt's pid. If a process with that pid exists, it must have
    our recorded start ticks; otherwise the kernel cannot have reused the id while members of
    the old group live, and members started before our leader are not ours.
    """
    pgid = doc.get("pgid")
    ticks = doc.get("pid_start_ticks")
    if not isinstance(pgid, int) or pgid <= 0 or not same_boot(doc):
        return []
    leader = proc_stat(pgid)
    if leader is not None and ticks is not None and leader[2] != ticks:
        return []
    members = []
    for pid in group_members(pgid):
        stat = proc_stat(pid)
        if stat is not None and (ticks is None or stat[2] >= ticks):
            members.append(pid)
    return members


def signal_group(pgid: int | None, sig: int) -> None:
    if not pgid:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _is_known_signal(number: int) -> bool:
    try:
        signal.Signals(number)
    except ValueError:
        return False
    return True


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"


def reap_orphans() -> None:
    """Collect exited children that were reparented to us (we are a child subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        except OSError:
            return
        if pid == 0:
            return


def make_subreaper() -> None:
    """Best effort: orphaned grandchildren come back to us, so we can reap them."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except Exception:
        pass


def log_size(log: Any) -> int:
    """Bytes in the open output log now: where the next attempt's output begins."""
    try:
        return os.fstat(log.fileno()).st_size
    except OSError:
        return 0


def last_line(path: str, start: int = 0) -> tuple[int, str]:
    """(size in bytes, last non-empty line cut to LAST_LINE_CHARS) of a log file, looking
    only at bytes from offset ``start`` on (one attempt's output)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(start, size - 4096))
            tail = f.read()
    except OSError:
        return 0, ""
    lines = [ln for ln in tail.decode("utf-8", "replace").splitlines() if ln.strip()]
    line = lines[-1] if lines else ""
    return size, line[-LAST_LINE_CHARS:]


# --------------------------------------------------------------------------- OOM evidence

def _read_oom_kill(path: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[0] == "oom_kill":
                    return int(parts[1])
    except (OSError, ValueError):
        return None
    return None


def oom_counters() -> dict[str, int]:
    """oom_kill counters: system-wide (/proc/vmstat) and for our memory cgroup (v1 or v2)."""
    counters = {}
    value = _read_oom_kill("/proc/vmstat")
    if value is not None:
        counters["vmstat"] = value
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            candidate = "/sys/fs/cgroup" + path.rstrip("/") + "/memory.events"
        elif "memory" in controllers.split(","):
            candidate = "/sys/fs/cgroup/memory" + path.rstrip("/") + "/memory.oom_control"
        else:
            continue
        value = _read_oom_kill(candidate)
        if value is not None:
            counters[candidate] = value
    return counters


def kernel_log_mentions(pid: int) -> bool:
    """True when the kernel log says the OOM killer killed ``pid`` (dmesg may be forbidden)."""
    try:
        out = subprocess.run(["dmesg"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             stdin=subprocess.DEVNULL, timeout=3).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    pattern = re.compile(rf"(Killed process|Kill process) {pid}\b")
    return bool(pattern.search(out.decode("utf-8", "replace")))


def oom_evidence(before: dict[str, int], pid: int) -> bool:
    after = oom_counters()
    for key, value in after.items():
        if key in before and value > before[key]:
            return True
    return kernel_log_mentions(pid)


# --------------------------------------------------------------------------- policy (pure)

def classify(returncode: int) -> tuple[str, int | None, str | None]:
    """(kind, exit_code, signal name) of an attempt's end.

    kind is "ok", "exit_code", "hard_fault", "resource", "intentional" or "signal". A shell
    that did not exec its last command reports a child's death by signal N as exit 128+N;
    that is read as the signal too (the exit code is kept).
    """
    if returncode == 0:
        return "ok", 0, None
    exit_code: int | None = None
    if returncode < 0:
        sig = signal_name(-returncode)
    elif 128 < returncode <= 128 + 64 and _is_known_signal(returncode - 128):
        exit_code = returncode
        sig = signal_name(returncode - 128)
    else:
        return "exit_code", returncode, None
    if sig in HARD_FAULT_SIGNALS:
        return "hard_fault", exit_code, sig
    if sig in RESOURCE_SIGNALS:
        return "resource", exit_code, sig
    if sig in INTENTIONAL_SIGNALS:
        return "intentional", exit_code, sig
    return "signal", exit_code, sig


def failure_class(kind: str, exit_code: int | None, runtime: float, quick: float) -> str:
    """The restart class of a failed attempt: ``kind``, or "broken_command" for an exit code
    of 126/127 or a non-zero exit within ``quick`` seconds of the attempt's start."""
    if kind != "exit_code":
        return kind
    if exit_code in BROKEN_EXIT_CODES or runtime < quick:
        return "broken_command"
    return kind


def failure_limit(kind: str, max_retries: int | None) -> int:
    """Failed attempts after which the instance gives up (see the module docstring)."""
    base = LIMITS[kind]
    if max_retries is None:
        return base
    if kind in ("exit_code", "signal"):
        return max_retries + 1
    return min(base, max_retries + 1)


def describe_end(exit_code: int | None, sig: str | None, oom: bool = False) -> str:
    """Readable reason for an attempt's end."""
    if sig is None:
        what = BROKEN_EXIT_CODES.get(exit_code or 0)
        return f"exit code {exit_code or 0}" + (f" ({what})" if what else "")
    text = f"killed by {sig}"
    if sig == "SIGKILL":
        text += (" (killed by the kernel OOM killer)" if oom
                 else " (possibly out of memory)")
    if exit_code is not None:
        text += f" (the shell reported exit code {exit_code})"
    return text


# --------------------------------------------------------------------------- claims

def claims_dir(req_dir: Any) -> tuple[str, bool]:
    """(absolute claims directory, shared?) from a request's ``claims_dir`` (None: default)."""
    if isinstance(req_dir, str) and req_dir.strip():
        return os.path.abspath(os.path.expanduser(req_dir)), True
    env_dir = os.environ.get("INFRA_CLAIMS_DIR")  # a test session's own, on the local node
    if env_dir:
        return os.path.abspath(os.path.expanduser(env_dir)), False
    return os.path.abspath(os.path.expanduser(DEFAULT_CLAIMS_DIR)), False


def ensure_claims_dir(path: str, shared: bool) -> None:
    """Create the claims directory: private by default, sticky and world-writable if shared."""
    if os.path.isdir(path):
        return
    os.makedirs(path, mode=0o700, exist_ok=True)
    if shared:
        with contextlib.suppress(OSError):
            os.chmod(path, 0o1777)


class NodeLock:
    """The node-wide lock (flock on CLAIMS/.lock), taken with a deadline, never forever."""

    def __init__(self, directory: str, wait: float = LOCK_WAIT_SECONDS) -> None:
        self.path = os.path.join(directory, ".lock")
        self.wait = wait
        self.fd: int | None = None

    def __enter__(self) -> NodeLock:
        import fcntl
        old = os.umask(0)
        try:
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except PermissionError:  # another user's lock file in a shared directory
                self.fd = os.open(self.path, os.O_RDONLY)
        finally:
            os.umask(old)
        deadline = time.time() + self.wait
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.time() >= deadline:
                    os.close(self.fd)
                    self.fd = None
                    raise Bad(f"the node-wide lock {self.path} is held by another start for "
                              f"over {self.wait:g} s") from None
                time.sleep(0.02)

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None


def claim_name(run_id: str, instance_id: str, placement: str) -> str:
    return f"{run_id}+{instance_id}+{placement}.json"


def claim_is_live(claim: dict[str, Any]) -> bool:
    """True while the claimed instance may still hold what it claimed."""
    if claim.get("boot_id") is not None and claim.get("boot_id") != boot_id():
        return False
    idir = claim.get("instance_dir")
    state = read_json(os.path.join(idir, "state.json")) if isinstance(idir, str) else None
    if state is not None:
        if state.get("placement", "p0") != claim.get("placement", "p0"):
            return False  # that directory holds a later placement now
        return effective_state(idir, state).get("state") not in FINAL_STATES
    # unreadable (another user's private work dir): judge by the processes it recorded
    if is_alive(claim.get("supervisor_pid"), claim.get("supervisor_start_ticks")):
        return True
    if our_group_members({"pgid": claim.get("pgid"),
                          "pid_start_ticks": claim.get("pid_start_ticks")}):
        return True
    created = claim.get("created_at") or 0.0
    return claim.get("supervisor_pid") is None and time.time() - created < NEVER_STARTED_SECONDS


def live_claims(directory: str, prune: bool) -> list[dict[str, Any]]:
    """Every live claim in ``directory``; with ``prune``, our own dead claim files go."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    live = []
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        path = os.path.join(directory, name)
        claim = read_json(path)
        if claim is None:
            continue
        if claim_is_live(claim):
            claim["file"] = name
            live.append(claim)
        elif prune:
            with contextlib.suppress(OSError):
                os.unlink(path)
    return live


def _num(doc: Any, key: str) -> float:
    try:
        return float((doc or {}).get(key) or 0.0)
    except (TypeError, ValueError, AttributeError):
        return 0.0


def _holder(claim: dict[str, Any]) -> str:
    return "run {} ({}) from {}".format(claim.get("run_id"), claim.get("instance_id"),
                                        claim.get("coordinator") or "?")


def claim_refusal(node: str, capacity: dict[str, Any], demand: dict[str, Any],
                  claims: list[dict[str, Any]]) -> str | None:
    """Why the node cannot take ``demand`` next to ``claims``, or None when it fits (pure)."""
    held = {k: sum(_num(c.get("demand"), k) for c in claims)
            for k in ("slots", "ram_gb", "gpu_memory_gb", "cpu_cores")}
    slots = int(_num(capacity, "slots"))
    if slots > 0 and held["slots"] + _num(demand, "slots") > slots + EPS:
        who = "; ".join(_holder(c) for c in claims[:3])
        return f"{node} full: {int(held['slots'])}/{slots} held by {who}"
    names = {"ram_gb": "RAM", "gpu_memory_gb": "GPU memory", "cpu_cores": "CPU cores"}
    for key, what in names.items():
        need = _num(demand, key)
        total = _num(capacity, key)
        if need > 0 and total > 0 and held[key] + need > total + EPS:
            return (f"{node}: not enough {what} left: needs {need:g}, {total - held[key]:g} of "
                    f"{total:g} free (claimed by {len(claims)} live instance(s))")
    for key, what in (("devices", "device"), ("ports", "port")):
        wanted = {str(x) for x in (demand or {}).get(key) or ()}
        for c in claims:
            taken = wanted & {str(x) for x in (c.get("demand") or {}).get(key) or ()}
            if taken:
                return f"{node}: {what} {sorted(taken)[0]} is held by {_holder(c)}"
    return None


def write_claim(directory: str, idir: str, req: dict[str, Any], placement: str) -> str:
    """Record the new instance's claim (readable by the other users of a shared directory)."""
    claim = req.get("claim") or {}
    doc = {"run_id": req["run_id"], "instance_id": req["instance_id"], "placement": placement,
           "node": req.get("node"), "coordinator": claim.get("coordinator"),
           "demand": claim.get("demand") or {}, "spec": claim.get("spec"),
           "allocation": req.get("allocation") or {}, "instance_dir": idir,
           "uid": os.getuid(), "created_at": time.time(), "boot_id": boot_id(),
           "supervisor_pid": None, "supervisor_start_ticks": None, "pgid": None,
           "pid_start_ticks": None}
    path = os.path.join(directory, claim_name(req["run_id"], req["instance_id"], placement))
    old = os.umask(0o022)
    try:
        write_json_atomic(path, doc)
    finally:
        os.umask(old)
    return path


def update_claim(path: Any, **changes: Any) -> None:
    """Add the supervisor's and the process group's identity to a claim (best effort)."""
    if not isinstance(path, str):
        return
    doc = read_json(path)
    if doc is None:
        return
    doc.update(changes)
    with contextlib.suppress(OSError):
        write_json_atomic(path, doc)


def release_claim(path: Any) -> None:
    if isinstance(path, str):
        with contextlib.suppress(OSError):
            os.unlink(path)


# --------------------------------------------------------------------------- fencing

def fence_deadline(idir: str) -> float | None:
    """The monotonic deadline in fence.json, or None when no coordinator fences this instance."""
    doc = read_json(os.path.join(idir, "fence.json"))
    if doc is None or doc.get("boot_id") != boot_id():
        return None
    value = doc.get("deadline")
    return float(value) if isinstance(value, (int, float)) else None


def set_fence(idir: str, seconds: float | None, holder: str) -> None:
    """Renew (``seconds``) or clear (None) the fence of one instance."""
    deadline = None if seconds is None else time.monotonic() + max(0.0, seconds)
    write_json_atomic(os.path.join(idir, "fence.json"),
                      {"deadline": deadline, "seconds": seconds, "holder": holder,
                       "boot_id": boot_id(), "at": time.time()})


# --------------------------------------------------------------------------- the supervisor

class Supervisor:
    """The daemon that owns one instance: spawns attempts, forwards stops, writes state."""

    always = False

    def __init__(self, idir: str, request: dict[str, Any]) -> None:
        self.idir = idir
        self.request = request
        self.state_path = os.path.join(idir, "state.json")
        self.stop_path = os.path.join(idir, "stop.json")
        self.log_path = os.path.join(idir, "output.log")
        self.reserve_path = os.path.join(idir, "reserve")
        self.state = read_json(self.state_path) or {}
        self.state.setdefault("disk_full", None)
        self.lock = threading.Lock()          # state writes: the main thread and the watcher
        self.watch_done = threading.Event()
        self.watcher: threading.Thread | None = None
        self.disk_seen: str | None = None     # the disk was full during the current attempt
        self.pgid: int | None = None
        self.child_running = False
        self.forwarded = False
        self.stop_requested = False
        self.grace = DEFAULT_GRACE_SECONDS
        self.kill_deadline: float | None = None
        self.claim_path = self.state.get("claim_path")
        self.fence = bool(request.get("fence"))
        self.fenced = False
        self.sampler: Any = None              # telemetry (telemetry.py), when requested

    # signal handlers: flags and signals only, never state writes
    def on_term(self, signum: int, frame: Any) -> None:
        self.stop_requested = True
        self.read_stop_file()
        self.forward_stop()

    def on_alarm(self, signum: int, frame: Any) -> None:
        if self.child_running or self.pgid:
            signal_group(self.pgid, signal.SIGKILL)

    def read_stop_file(self) -> bool:
        doc = read_json(self.stop_path)
        if doc is None:
            return False
        self.stop_requested = True
        try:
            self.grace = max(0.0, float(doc.get("grace", DEFAULT_GRACE_SECONDS)))
        except (TypeError, ValueError):
            self.grace = DEFAULT_GRACE_SECONDS
        return True

    def forward_stop(self) -> None:
        if self.pgid is None or not self.child_running or self.forwarded:
            return
        self.forwarded = True
        signal_group(self.pgid, signal.SIGTERM)
        self.kill_deadline = time.time() + self.grace
        signal.setitimer(signal.ITIMER_REAL, max(self.grace, 0.001))

    def stop_pending(self) -> bool:
        if self.fence and not self.fenced and self.fence_expired():
            self.fenced = True
            self.stop_requested = True
            self.grace = FENCE_GRACE_SECONDS
        return self.stop_requested or self.read_stop_file()

    def fence_expired(self) -> bool:
        deadline = fence_deadline(self.idir)
        return deadline is not None and time.monotonic() > deadline

    def wait_child(self, proc: Any) -> int:
        """Wait for the attempt to end; a fenced instance looks at its fence meanwhile."""
        while True:
            try:
                return int(proc.wait(timeout=WAIT_POLL_SECONDS if self.fence else None))
            except subprocess.TimeoutExpired:
                pass
            if not self.forwarded and self.stop_pending():
                self.forward_stop()

    def save(self, **changes: Any) -> bool:
        """Apply ``changes`` and write state.json; False when even a full-disk write failed.

        A full disk never kills the supervisor: the state stays in memory and the next save
        writes it (see ``write_state``).
        """
        with self.lock:
            self.state.update(changes)
            self.state["stop_requested"] = self.stop_requested
            self.state["updated_at"] = time.time()
            written = write_state(self.state_path, self.state)
            if self.state.get("disk_full"):
                self.disk_seen = self.disk_seen or self.state["disk_full"]
            if not written:
                with contextlib.suppress(OSError, ValueError):
                    print(f"cannot write {self.state_path}: no space left", file=sys.stderr,
                          flush=True)
            return written

    def finish(self, state: str, reason: str) -> None:
        """Record the instance's end (retrying for a while when the disk is full), then end
        its claim."""
        if self.fenced and state == "stopped":
            reason = ("fenced: no word from the watching coordinator within its fence timeout; "
                      f"stopped so that a replacement may start elsewhere ({reason})")
        self.stop_watching()
        counts = self.stop_sampler()
        if counts is not None:
            self.state["telemetry_counts"] = counts
        deadline = time.time() + FINAL_WRITE_SECONDS
        ended = time.time()
        while not self.save(state=state, final_reason=reason, ended_at=ended,
                            fenced=self.fenced):
            if time.time() >= deadline:
                break
            time.sleep(1.0)
        release_reserve(self.reserve_path)
        release_claim(self.claim_path)

    # telemetry: a sampler thread for the life of the instance (all attempts)
    def start_sampler(self) -> None:
        """Start the telemetry sampler when the request asks for one; never fails the start."""
        try:
            self.sampler = load_telemetry().start(self.idir, self.request)
        except Exception:
            traceback.print_exc()
            self.sampler = None

    def stop_sampler(self) -> dict[str, Any] | None:
        """Stop the sampler and its helper children; what it did (None when there was none)."""
        sampler, self.sampler = self.sampler, None
        if sampler is None:
            return None
        try:
            sampler.stop()
            return dict(sampler.counters())
        except Exception:
            traceback.print_exc()
            return None

    # disk space: a watcher thread while the instance is active, a note when an attempt ends
    def disk_paths(self) -> list[str]:
        """Where the instance writes: its log (and state), its results, its working directory."""
        paths = [self.log_path]
        for key in ("results_dir", "cwd"):
            if isinstance(self.state.get(key), str):
                paths.append(self.state[key])
        return paths

    def start_watching(self) -> None:
        """Make the reserve and start the thread that looks at free space periodically."""
        make_reserve(self.reserve_path)
        self.watcher = threading.Thread(target=self.watch_disk, name="disk", daemon=True)
        self.watcher.start()

    def stop_watching(self) -> None:
        self.watch_done.set()
        if self.watcher is not None and self.watcher is not threading.current_thread():
            self.watcher.join(timeout=DISK_CHECK_SECONDS + 5.0)

    def watch_disk(self) -> None:
        """Record ``disk_full`` when the instance's disk fills up, clear it when space is back."""
        while not self.watch_done.wait(DISK_CHECK_SECONDS):
            try:
                reason = full_disk(self.disk_paths())
                if reason is not None:
                    self.disk_seen = self.disk_seen or reason
                elif (not os.path.exists(self.reserve_path) and  # space is back: re-arm
                      (free_bytes(self.idir) or 0) > DISK_LOW_BYTES + 2 * RESERVE_BYTES):
                    make_reserve(self.reserve_path)
                recorded = self.state.get("disk_full") is not None
                if (reason is not None) != recorded and not self.watch_done.is_set():
                    self.save(disk_full=reason)
            except Exception:
                traceback.print_exc()

    def disk_note(self, reason: str, stopping: bool) -> str:
        """An attempt's end reason, with the disk-full reason when its disk filled up."""
        seen, self.disk_seen = self.disk_seen, None
        now = full_disk(self.disk_paths())
        with self.lock:
            self.state["disk_full"] = now
        found = now or seen
        if found is None or stopping:
            return reason
        return f"{reason}; {found}"

    def log_note(self, log: Any, text: str) -> None:
        """Best effort: a supervisor line in the output log (not possible on a full disk)."""
        try:
            os.write(log.fileno(), text.encode())
        except OSError as exc:
            if not no_space(exc):
                raise
            self.disk_seen = self.disk_seen or full_disk([self.log_path]) or no_space_text(
                self.log_path, free_bytes(self.log_path))

    def child_env(self, attempt: int, results_dir: str) -> dict[str, str]:
        req = self.request
        env = dict(os.environ)
        for key, value in (req.get("env") or {}).items():
            env[str(key)] = str(value)
        env["INFRA_RUN_ID"] = req["run_id"]
        env["INFRA_INSTANCE_ID"] = req["instance_id"]
        env["INFRA_NODE"] = str(req.get("node") or "")
        env["INFRA_ALLOCATION"] = json.dumps(req.get("allocation") or {}, sort_keys=True)
        env["INFRA_RESULTS_DIR"] = results_dir
        env["INFRA_ATTEMPT"] = str(attempt)
        gpu_ids = req.get("gpu_ids") or []
        if gpu_ids:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpu_ids)
        return env

    def end_group(self, pgid: int, stopping: bool) -> None:
        """Make sure nothing of the attempt's process group is left."""
        if stopping:
            deadline = self.kill_deadline or (time.time() + self.grace)
            if not self.forwarded:
                signal_group(pgid, signal.SIGTERM)
        else:
            if not group_members(pgid):
                return
            signal_group(pgid, signal.SIGTERM)
            deadline = time.time() + LEFTOVER_GRACE_SECONDS
        while group_members(pgid) and time.time() < deadline:
            reap_orphans()
            time.sleep(0.05)
        if group_members(pgid):
            signal_group(pgid, signal.SIGKILL)
            deadline = time.time() + KILL_WAIT_SECONDS
            while group_members(pgid) and time.time() < deadline:
                reap_orphans()
                time.sleep(0.05)
        reap_orphans()

    def run(self) -> None:
        req = self.request
        restart = req.get("restart") or {}
        auto_restart = bool(restart.get("auto_restart", True))
        max_retries = restart.get("max_retries")
        max_retries = None if max_retries is None else max(0, int(max_retries))
        delay = max(0.0, float(restart.get("retry_delay_seconds") or 0.0))
        self.always = bool(restart.get("always", False)) and auto_restart
        results_dir = self.state["results_dir"]
        cwd = self.state["cwd"]

        signal.signal(signal.SIGTERM, self.on_term)
        signal.signal(signal.SIGINT, self.on_term)
        signal.signal(signal.SIGALRM, self.on_alarm)
        make_subreaper()
        self.save(supervisor_pid=os.getpid(), supervisor_start_ticks=start_ticks(os.getpid()))
        update_claim(self.claim_path, supervisor_pid=os.getpid(),
                     supervisor_start_ticks=start_ticks(os.getpid()))
        self.start_watching()
        self.start_sampler()

        with open(self.log_path, "ab") as log:
            self.attempts(log, auto_restart, max_retries, delay, results_dir, cwd)
        self.stop_watching()

    def quick_failure_seconds(self) -> float:
        """``restart.quick_failure_seconds`` of the request (QUICK_FAILURE_SECONDS if unset)."""
        value = (self.request.get("restart") or {}).get("quick_failure_seconds")
        try:
            return QUICK_FAILURE_SECONDS if value is None else max(0.0, float(value))
        except (TypeError, ValueError):
            return QUICK_FAILURE_SECONDS

    def with_output(self, reason: str, start: int) -> str:
        """A failed attempt's reason with the last non-empty line the attempt wrote."""
        line = last_line(self.log_path, start)[1].strip()
        return f"{reason}: {line}" if line else reason

    def attempts(self, log: Any, auto_restart: bool, max_retries: int | None, delay: float,
                 results_dir: str, cwd: str) -> None:
        """Run attempts until the instance exits, fails for good, or is stopped."""
        req = self.request
        quick = self.quick_failure_seconds()
        failures = 0
        attempt = 0
        last_reason = ""
        while True:
            if self.stop_pending():
                self.finish("stopped", f"stopped on request before attempt {attempt + 1}")
                return
            attempt += 1
            if attempt > 1:
                self.log_note(log, f"[supervisor] attempt {attempt} after {last_reason}\n")
            before = oom_counters()
            log_start = log_size(log)
            started = time.time()
            began = time.monotonic()
            try:
                os.makedirs(results_dir, exist_ok=True)
                proc = subprocess.Popen(
                    ["/bin/sh", "-c", req["command"]], cwd=cwd,
                    env=self.child_env(attempt, results_dir), stdin=subprocess.DEVNULL,
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                    close_fds=True)
            except OSError as exc:
                reason = f"could not start: {exc}"
                self.state.setdefault("attempts", []).append({
                    "attempt": attempt, "pid": None, "started_at": started,
                    "ended_at": time.time(), "exit_code": None, "signal": None,
                    "reason": reason})
                self.finish("failed", reason)
                return
            self.pgid = proc.pid
            self.child_running = True
            record = {"attempt": attempt, "pid": proc.pid, "started_at": started,
                      "ended_at": None, "exit_code": None, "signal": None, "reason": None}
            self.state.setdefault("attempts", []).append(record)
            self.save(state="running", pid=proc.pid, pid_start_ticks=start_ticks(proc.pid),
                      pgid=proc.pid, started_at=started, exit_code=None, signal=None,
                      failure_class=None, restarts=attempt - 1)
            update_claim(self.claim_path, pgid=proc.pid,
                         pid_start_ticks=self.state.get("pid_start_ticks"))
            if self.stop_pending():
                self.forward_stop()

            returncode = self.wait_child(proc)
            self.child_running = False
            ended = time.time()
            runtime = time.monotonic() - began
            stopping = self.stop_pending()
            kind, exit_code, sig = classify(returncode)
            oom = sig == "SIGKILL" and not stopping and oom_evidence(before, proc.pid)
            failed = not stopping and kind not in ("ok", "intentional")
            cls = failure_class(kind, exit_code, runtime, quick) if failed else None
            end = describe_end(exit_code, sig, oom)
            reason = self.disk_note(self.with_output(end, log_start) if failed else end,
                                    stopping)
            self.end_group(proc.pid, stopping)
            signal.setitimer(signal.ITIMER_REAL, 0)
            self.pgid = None
            self.forwarded = False
            self.kill_deadline = None
            record.update(ended_at=ended, exit_code=exit_code, signal=sig, reason=reason,
                          failure_class=cls)
            self.state.update(exit_code=exit_code, signal=sig, failure_class=cls)

            if stopping:
                self.finish("stopped", reason if self.fenced else f"stopped on request ({reason})")
                return
            if kind == "ok" and not self.always:
                self.finish("exited", reason)
                return
            if kind == "ok":  # a service (restart: always): a clean exit is restarted too
                last_reason = f"{reason} (restart: always)"
                self.save(state="restarting", final_reason=None)
                resume = time.time() + delay
                while time.time() < resume and not self.stop_pending():
                    time.sleep(min(0.1, max(0.0, resume - time.time())))
                continue
            if kind == "intentional":
                self.finish("stopped", f"{reason}, not sent by the supervisor: treated as an "
                                       "intentional stop")
                return
            failures += 1
            if not auto_restart:
                self.finish("failed", f"{reason}; auto_restart is off")
                return
            limit = failure_limit(cls or kind, max_retries)
            if failures >= limit:
                plural = "" if failures == 1 else "s"
                what = " for a broken command" if cls == "broken_command" else ""
                self.finish("failed", f"{reason}; gave up after {failures} failed "
                                      f"attempt{plural} (limit {limit}{what})")
                return
            last_reason = reason
            self.save(state="restarting", final_reason=None)
            resume = time.time() + delay
            while time.time() < resume and not self.stop_pending():
                time.sleep(min(0.1, max(0.0, resume - time.time())))


def detach_fds(log_path: str, keep: tuple[int, ...] = ()) -> None:
    """A detached daemon's descriptors: stdin from /dev/null, stdout and stderr appended to
    ``log_path``, cwd ``/``, and every other descriptor but ``keep`` closed."""
    null_fd = os.open(os.devnull, os.O_RDONLY)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(null_fd, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.chdir("/")
    try:
        fds = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 256))
    for fd in fds:
        if fd not in (0, 1, 2, *keep):
            with contextlib.suppress(OSError):
                os.close(fd)


def daemon_main(idir: str, request: dict[str, Any]) -> None:
    """Body of the detached process: redirect fds, then supervise until the instance ends."""
    detach_fds(os.path.join(idir, "supervisor.log"))
    supervisor = Supervisor(idir, request)
    try:
        supervisor.run()
    except BaseException as exc:  # record why, so status does not just say "lost"
        traceback.print_exc()
        try:
            supervisor.finish("failed", f"supervisor error: {exc!r}")
        except Exception:
            traceback.print_exc()


# --------------------------------------------------------------------------- status

def effective_state(idir: str, state: dict[str, Any] | None = None) -> dict[str, Any]:
    """state.json plus live checks; an active state with nothing alive becomes "lost".

    The supervisor writes the instance's end and then exits: a state read just before that
    write and a liveness check just after it would call a clean end "lost". So before
    judging an active state lost, state.json is read once more; what it says now wins.
    """
    doc = judge_state(idir, state)
    if doc.get("state") != "lost" or doc.get("final_reason") == REBOOTED_REASON:
        return doc
    fresh = read_state(os.path.join(idir, "state.json"))
    if fresh is not None and fresh.get("state") not in ACTIVE_STATES:
        return judge_state(idir, fresh)  # it ended (or was lost) on record meanwhile
    return doc


REBOOTED_REASON = "the node rebooted while the instance was active"


def judge_state(idir: str, state: dict[str, Any] | None = None) -> dict[str, Any]:
    """One reading of ``effective_state``: the given (or read) state plus live checks."""
    doc = dict(state if state is not None else (read_state(os.path.join(idir, "state.json"))
                                                 or {}))
    if not doc:
        parts = idir.rstrip("/").split("/")
        doc = {"run_id": parts[-2], "instance_id": parts[-1], "state": "starting",
               "created_at": os.path.getmtime(idir) if os.path.isdir(idir) else None}
    if os.path.exists(os.path.join(idir, "stop.json")):
        doc["stop_requested"] = True
    rebooted = not same_boot(doc)
    alive = not rebooted and is_alive(doc.get("pid"), doc.get("pid_start_ticks"))
    sup_alive = not rebooted and is_alive(doc.get("supervisor_pid"),
                                          doc.get("supervisor_start_ticks"))
    doc["alive"] = alive
    doc["supervisor_alive"] = sup_alive
    if doc.get("state") in ACTIVE_STATES and not sup_alive:
        if rebooted:
            doc["state"] = "lost"
            doc["final_reason"] = REBOOTED_REASON
        elif doc.get("supervisor_pid") is None:
            created = doc.get("created_at") or 0.0
            if time.time() - created > NEVER_STARTED_SECONDS:
                doc["state"] = "lost"
                doc["final_reason"] = "the supervisor never started"
        elif alive or our_group_members(doc):
            doc["detached"] = True  # the supervisor is gone, the process group still runs
        else:
            doc["state"] = "lost"
            doc["final_reason"] = (
                "the supervisor (pid {}) and the process (pid {}) are gone without a "
                "recorded exit (supervisor killed?)"
            ).format(doc.get("supervisor_pid"), doc.get("pid"))
        if doc.get("state") == "lost" and not rebooted:  # turned lost just now
            full = full_disk([idir])  # a supervisor that could not write is the likely cause
            if full is not None:
                doc["disk_full"] = full
                doc["final_reason"] = f"{doc['final_reason']}; {full}"
    return doc


def describe(idir: str, state: dict[str, Any] | None = None) -> dict[str, Any]:
    """What status/start/stop report for one instance."""
    doc = effective_state(idir, state)
    size, line = last_line(os.path.join(idir, "output.log"))
    doc["log_size"] = size
    doc["last_line"] = line
    doc["log_path"] = os.path.join(idir, "output.log")
    return doc


def list_instances(root: str, run_id: str | None) -> list[str]:
    runs_dir = os.path.join(root, "runs")
    try:
        runs = [run_id] if run_id is not None else sorted(os.listdir(runs_dir))
    except OSError:
        return []
    dirs = []
    for run in runs:
        if not ID_RE.match(run):
            continue
        try:
            names = sorted(os.listdir(os.path.join(runs_dir, run)))
        except OSError:
            continue
        for name in names:
            path = os.path.join(runs_dir, run, name)
            if ID_RE.match(name) and os.path.isdir(path):
                dirs.append(path)
    return dirs


# --------------------------------------------------------------------------- subcommands

def norm_root(root: str) -> str:
    return os.path.abspath(os.path.expanduser(root))


def parse_request(text: str) -> dict[str, Any]:
    try:
        req = json.loads(text)
    except ValueError as exc:
        raise Bad(f"the start request is not JSON: {exc}") from None
    if not isinstance(req, dict):
        raise Bad("the start request must be a JSON object")
    return check_request(req)


def check_request(req: dict[str, Any]) -> dict[str, Any]:
    """Refuse a start request with a bad id, command or field type (one line, naming it)."""
    check_id(req.get("run_id"), "run_id")
    check_id(req.get("instance_id"), "instance_id")
    if not isinstance(req.get("command"), str) or not req["command"].strip():
        raise Bad("the start request needs a non-empty command")
    for key, kind in (("env", dict), ("allocation", dict), ("gpu_ids", list),
                      ("restart", dict)):
        if req.get(key) is not None and not isinstance(req[key], kind):
            raise Bad("{} must be a JSON {}".format(key, "object" if kind is dict else "array"))
    return req


def wait_for_start(idir: str, bound: float) -> dict[str, Any]:
    """Poll state.json until the first pid is recorded, the instance ended, or ``bound``."""
    deadline = time.time() + bound
    while True:
        doc = effective_state(idir)
        if doc.get("pid") is not None or doc.get("state") in FINAL_STATES:
            return doc
        if time.time() >= deadline:
            return doc
        time.sleep(0.01)


def archive_previous(idir: str, placement: str) -> None:
    """Move an earlier placement's finished copy aside: a move back starts a fresh one."""
    run_dir, name = os.path.split(idir)
    keep = os.path.join(run_dir, ".previous")
    os.makedirs(keep, exist_ok=True)
    os.rename(idir, os.path.join(keep, f"{name}.{placement}.{int(time.time() * 1000)}"))


class ClaimBook:
    """The live claims per claims directory, read once under its lock; starts add theirs."""

    def __init__(self) -> None:
        self.known: dict[str, list[dict[str, Any]]] = {}

    def claims(self, cdir: str) -> list[dict[str, Any]]:
        if cdir not in self.known:
            self.known[cdir] = live_claims(cdir, prune=True)
        return self.known[cdir]

    def add(self, cdir: str, path: str) -> None:
        """Count a claim just written (by a start earlier in the same batch)."""
        doc = read_json(path)
        if doc is not None and cdir in self.known:
            self.known[cdir].append(doc)


class Begun:
    """One start request judged under the node lock: refused (``answer``) or to finish."""

    def __init__(self, idir: str, existing: bool, req: dict[str, Any],
                 answer: dict[str, Any] | None = None, code: int = 0) -> None:
        self.idir = idir
        self.existing = existing
        self.req = req
        self.answer = answer
        self.code = code


def request_claims_dir(req: dict[str, Any]) -> str:
    """The request's claims directory, created if missing."""
    cdir, shared = claims_dir(req.get("claims_dir"))
    ensure_claims_dir(cdir, shared)
    return cdir


def begin_start(root: str, req: dict[str, Any], cdir: str, book: ClaimBook) -> Begun:
    """Under the node lock: refuse, find the existing copy, or claim and write a new one."""
    placement = check_id(req.get("placement") or "p0", "placement")
    idir = instance_dir(root, req["run_id"], req["instance_id"])
    os.makedirs(os.path.dirname(idir), exist_ok=True)
    if os.path.isdir(idir):
        current = read_json(os.path.join(idir, "state.json")) or {}
        had = current.get("placement", "p0")
        if had == placement:
            return Begun(idir, True, req)
        if effective_state(idir).get("state") not in FINAL_STATES:
            return Begun(idir, False, req, {
                "ok": False, "stale": True,
                "error": f"an earlier copy ({had}) of {req['instance_id']} still runs "
                         "on this node; stop it first"}, 2)
        archive_previous(idir, had)
    claim = req.get("claim")
    claim_path = None
    if isinstance(claim, dict):
        why = None if claim.get("force") else claim_refusal(
            str(req.get("node") or "node"), claim.get("capacity") or {},
            claim.get("demand") or {}, book.claims(cdir))
        if why is not None:
            return Begun(idir, False, req, {"ok": False, "refused": True, "error": why}, 3)
    os.mkdir(idir)
    try:
        if isinstance(claim, dict):
            claim_path = write_claim(cdir, idir, req, placement)
            book.add(cdir, claim_path)
        start_new(idir, req, placement, claim_path)
    except OSError:
        # e.g. a full disk: leave nothing half made, so a retried start starts afresh
        release_claim(claim_path)
        shutil.rmtree(idir, ignore_errors=True)
        raise
    return Begun(idir, False, req)


def started_answer(begun: Begun) -> dict[str, Any]:
    """The answer for a started (or already running) instance, as ``start`` prints it."""
    doc = describe(begun.idir)
    doc["already"] = begun.existing
    return {"ok": True, "instance": doc}


def cmd_start(args: argparse.Namespace) -> int:
    root = norm_root(args.root)
    req = parse_request(sys.stdin.read())
    cdir = request_claims_dir(req)
    with NodeLock(cdir):
        begun = begin_start(root, req, cdir, ClaimBook())
    if begun.answer is not None:
        emit(begun.answer)
        return begun.code
    if not begun.existing:
        spawn_supervisor(begun.idir, req)
    wait_for_start(begun.idir, START_WAIT_SECONDS)
    emit(started_answer(begun))
    return 0


def parse_batch(text: str) -> list[Any]:
    """The start-batch input: a JSON list of start requests (each checked on its own)."""
    try:
        reqs = json.loads(text)
    except ValueError as exc:
        raise Bad(f"the start-batch input is not JSON: {exc}") from None
    if not isinstance(reqs, list):
        raise Bad("the start-batch input must be a JSON list of start requests")
    return reqs


def batch_item(raw: Any) -> tuple[dict[str, Any] | None, str | None, dict[str, Any] | None]:
    """(request, claims dir, None) for a good batch entry, or (None, None, error answer)."""
    try:
        if not isinstance(raw, dict):
            raise Bad("the start request must be a JSON object")
        req = check_request(raw)
        return req, request_claims_dir(req), None
    except Bad as exc:
        return None, None, {"ok": False, "error": str(exc)}
    except Exception as exc:
        return None, None, {"ok": False, "error": error_text(exc, "")}


def cmd_start_batch(args: argparse.Namespace) -> int:
    """Start many instances in one call: each node lock taken once, every request judged in
    order against the live claims and those accepted before it, each answered as ``start``."""
    root = norm_root(args.root)
    items = [batch_item(raw) for raw in parse_batch(sys.stdin.read())]
    answers: list[dict[str, Any] | None] = [error for _r, _c, error in items]
    begun: list[Begun | None] = [None] * len(items)
    book = ClaimBook()
    with contextlib.ExitStack() as locks:
        for cdir in sorted({c for _r, c, _e in items if c is not None}):
            locks.enter_context(NodeLock(cdir))  # sorted: two batches never deadlock
        for i, (req, cdir, _error) in enumerate(items):
            if req is None or cdir is None:
                continue
            try:
                one = begin_start(root, req, cdir, book)
            except Bad as exc:
                answers[i] = {"ok": False, "error": str(exc)}
                continue
            except Exception as exc:
                answers[i] = {"ok": False, "error": error_text(exc, root)}
                continue
            answers[i] = one.answer
            begun[i] = one if one.answer is None else None
    for one in begun:
        if one is not None and not one.existing:
            spawn_supervisor(one.idir, one.req)
    deadline = time.time() + START_WAIT_SECONDS
    for i, one in enumerate(begun):
        if one is not None:
            wait_for_start(one.idir, max(0.0, deadline - time.time()))
            answers[i] = started_answer(one)
    emit({"ok": True, "results": answers})
    return 0


def start_new(idir: str, req: dict[str, Any], placement: str, claim_path: str | None) -> None:
    """Write the request and the first state of a new instance (under the node lock)."""
    cwd = os.path.abspath(os.path.expanduser(req.get("cwd") or "~"))
    results = req.get("results_dir")
    results_dir = (os.path.join(idir, "results") if not results else
                   os.path.join(cwd, os.path.expanduser(results)))
    restart = req.get("restart") or {}
    state = {
        "run_id": req["run_id"], "instance_id": req["instance_id"],
        "node": req.get("node"), "command": req["command"], "cwd": cwd,
        "results_dir": results_dir, "restart": restart, "state": "starting",
        "created_at": time.time(), "pid": None, "pid_start_ticks": None, "pgid": None,
        "supervisor_pid": None, "supervisor_start_ticks": None, "started_at": None,
        "ended_at": None, "exit_code": None, "signal": None, "attempts": [],
        "restarts": 0, "stop_requested": False, "final_reason": None, "boot_id": boot_id(),
        "failure_class": None,
        "placement": placement, "claim_path": claim_path, "fence": bool(req.get("fence")),
        "fenced": False,
    }
    write_json_atomic(os.path.join(idir, "request.json"), req)
    write_json_atomic(os.path.join(idir, "state.json"), state)


def spawn_supervisor(idir: str, req: dict[str, Any]) -> None:
    """Fork the detached supervisor (double fork, new session) and return at once."""
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:
        code = 0
        try:
            os.setsid()
            if os.fork() == 0:
                daemon_main(idir, req)
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    os.waitpid(child, 0)


def cmd_claims(args: argparse.Namespace) -> int:
    """Every live claim on this node (any coordinator's), pruning our own dead ones."""
    cdir, _shared = claims_dir(args.claims_dir)
    if not os.path.isdir(cdir):
        emit({"ok": True, "claims": [], "dir": cdir})
        return 0
    with NodeLock(cdir):
        claims = live_claims(cdir, prune=True)
    emit({"ok": True, "claims": claims, "dir": cdir})
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    root = norm_root(args.root)
    if args.run is not None:
        check_id(args.run, "run id")
    dirs = list_instances(root, args.run)
    if args.run is not None and (args.fence_seconds is not None or args.fence_clear):
        seconds = None if args.fence_clear else max(0.0, float(args.fence_seconds))
        for idir in dirs:
            state = read_json(os.path.join(idir, "state.json")) or {}
            if state.get("fence") and state.get("state") not in FINAL_STATES:
                set_fence(idir, seconds, args.fence_holder or "")
    ask = parse_status_doc(sys.stdin.read()) if args.run is not None and args.stdin_doc \
        else StatusAsk(None, {}, TELEMETRY_MAX_BYTES, TELEMETRY_TOTAL_BYTES)
    if ask.only is not None:  # a campaign's ended tasks are not re-read
        dirs = [d for d in dirs
                if os.path.basename(d) in ask.only or os.path.basename(d) in ask.telemetry]
    budget = ask.total
    docs = []
    for idir in dirs:
        doc = describe(idir)  # judged before reading: final and eof means nothing more comes
        offset = ask.telemetry.get(os.path.basename(idir))
        if offset is not None:
            doc["telemetry"] = telemetry_chunk(idir, offset, min(ask.most, budget))
            budget -= max(0, doc["telemetry"]["offset"] - offset)
        docs.append(doc)
    answer: dict[str, Any] = {"ok": True, "instances": docs}
    if args.run is not None:
        answer["pools"] = load_pool().pool_docs(root, args.run)
    emit(answer)
    return 0


class StatusAsk:
    """What ``status --stdin-doc`` was asked: which instances, and whose telemetry from where."""

    def __init__(self, only: set[str] | None, telemetry: dict[str, int], most: int,
                 total: int) -> None:
        self.only = only
        self.telemetry = telemetry
        self.most = most
        self.total = total


def parse_status_doc(text: str) -> StatusAsk:
    """``{"only": [ids] | null, "telemetry": {id: offset}, "telemetry_max": N,
    "telemetry_total": N}`` (every key optional), each id checked like any id."""
    try:
        doc = json.loads(text or "{}")
    except ValueError as exc:
        raise Bad(f"the status request is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise Bad("the status request must be a JSON object")
    only = doc.get("only")
    if only is not None and not isinstance(only, list):
        raise Bad("status request: only must be a JSON array or null")
    wanted = None if only is None else {check_id(i, "instance id") for i in only}
    tele = doc.get("telemetry") or {}
    if not isinstance(tele, dict):
        raise Bad("status request: telemetry must be a JSON object")
    offsets = {}
    for name, offset in tele.items():
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise Bad(f"status request: telemetry offset of {name!r} must be a "
                      "non-negative integer")
        offsets[check_id(name, "instance id")] = offset
    caps = []
    for key, default in (("telemetry_max", TELEMETRY_MAX_BYTES),
                         ("telemetry_total", TELEMETRY_TOTAL_BYTES)):
        value = doc.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise Bad(f"status request: {key} must be a non-negative integer")
        caps.append(min(value, TELEMETRY_CAP_BYTES))
    return StatusAsk(wanted, offsets, caps[0], caps[1])


def load_pool() -> Any:
    """The sibling ``pool`` module (installed next to this script, or in the package)."""
    if __package__:
        from . import pool
        return pool
    sys.modules.setdefault("supervisor", sys.modules[__name__])
    import pool  # type: ignore[import-not-found]  # a sibling on the node
    return pool


def load_telemetry() -> Any:
    """The sibling ``telemetry`` module (installed next to this script, or in the package)."""
    if __package__:
        from . import telemetry
        return telemetry
    sys.modules.setdefault("supervisor", sys.modules[__name__])
    import telemetry  # type: ignore[import-not-found]  # a sibling on the node
    return telemetry


def load_harvest() -> Any:
    """The sibling ``harvest`` module (installed next to this script, or in the package)."""
    if __package__:
        from . import harvest
        return harvest
    sys.modules.setdefault("supervisor", sys.modules[__name__])
    import harvest  # type: ignore[import-not-found]  # a sibling on the node
    return harvest


def cmd_harvest(args: argparse.Namespace) -> int:
    """Many instances' state, log chunks and results listings (with small files inline) in
    one call: a campaign's ended tasks come home in batches, not four calls each."""
    root = norm_root(args.root)
    emit({"ok": True, "items": load_harvest().harvest(root, sys.stdin.read())})
    return 0


def cmd_pool_sync(args: argparse.Namespace) -> int:
    """Apply a pool-sync document (stdin) to the run's pool; start its daemon when needed."""
    root = norm_root(args.root)
    emit({"ok": True, "pool": load_pool().cmd_pool_sync(root, sys.stdin.read())})
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    root = norm_root(args.root)
    check_id(args.run, "run id")
    if args.instance is not None:
        check_id(args.instance, "instance id")
        idir = instance_dir(root, args.run, args.instance)
        if not os.path.isdir(idir):
            raise Bad(f"no instance {args.run}/{args.instance} on this node")
        dirs = [idir]
    else:
        dirs = list_instances(root, args.run)
    grace = max(0.0, float(args.grace))
    for idir in dirs:
        if effective_state(idir).get("state") not in FINAL_STATES:
            try:
                write_json_atomic(os.path.join(idir, "stop.json"),
                                  {"requested_at": time.time(), "grace": grace})
            except OSError as exc:  # a full disk: the supervisor still gets SIGTERM below
                if not no_space(exc):
                    raise
    deadline = time.time() + grace + 5.0
    pending = list(dirs)
    signalled: set[str] = set()
    direct: dict[str, float] = {}
    while pending:
        still = []
        for idir in pending:
            if not stop_step(idir, grace, signalled, direct):
                still.append(idir)
        pending = still
        if not pending or time.time() >= deadline:
            break
        time.sleep(0.05)
    emit({"ok": True, "instances": [describe(d) for d in dirs]})
    return 0


def tree_bytes(path: str) -> int:
    """Bytes of the files under ``path`` (links are not followed; vanishing entries skipped)."""
    total = 0
    for top, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(top, name)).st_size
    return total


def active_in(run_dir: str) -> list[str]:
    """The run's instances that are not over on this node (live checks included)."""
    return [os.path.basename(d) for d in list_instances_in(run_dir)
            if effective_state(d).get("state") not in FINAL_STATES]


def prune_run(root: str, run_id: str, dry_run: bool) -> dict[str, Any]:
    """Remove ``ROOT/runs/RUN`` when none of its instances is active here; say what happened.

    The directory is renamed aside, checked again, then deleted (or put back when an
    instance turned active meanwhile), so a live instance's directory is never removed.
    Nothing outside ``runs/RUN`` is touched (claims included).
    """
    run_dir = os.path.join(root, "runs", check_id(run_id, "run id"))
    doc: dict[str, Any] = {"run_id": run_id, "bytes": 0, "active": []}
    if os.path.islink(run_dir) or (os.path.exists(run_dir) and not os.path.isdir(run_dir)):
        doc.update(state="error", error=f"{run_dir} is not a directory; left alone")
        return doc
    leftovers = prune_leftovers(root, run_id)  # an earlier prune was cut off: finish it
    if not os.path.isdir(run_dir) and not leftovers:
        doc["state"] = "absent"
        return doc
    doc["bytes"] = tree_bytes(run_dir) + sum(tree_bytes(d) for d in leftovers)
    active = [a for d in [run_dir, *leftovers] for a in active_in(d) + load_pool().live_pools(d)]
    if active:
        doc.update(state="active", active=active)
        return doc
    if dry_run:
        doc["state"] = "would_prune"
        return doc
    aside = os.path.join(root, "runs", f".prune-{run_id}-{os.getpid()}")
    if os.path.isdir(run_dir):
        os.rename(run_dir, aside)
        active = active_in(aside)
        if active:
            os.rename(aside, run_dir)
            doc.update(state="active", active=active)
            return doc
        leftovers.append(aside)
    for path in leftovers:
        shutil.rmtree(path)
    doc["state"] = "pruned"
    return doc


def prune_leftovers(root: str, run_id: str) -> list[str]:
    """Directories an earlier, interrupted prune of the run renamed aside."""
    runs_dir = os.path.join(root, "runs")
    try:
        names = sorted(os.listdir(runs_dir))
    except OSError:
        return []
    prefix = f".prune-{run_id}-"
    return [os.path.join(runs_dir, n) for n in names if n.startswith(prefix)
            and n[len(prefix):].isdigit() and not os.path.islink(os.path.join(runs_dir, n))]


def list_instances_in(run_dir: str) -> list[str]:
    """Instance directories directly under one run directory."""
    try:
        names = sorted(os.listdir(run_dir))
    except OSError:
        return []
    return [os.path.join(run_dir, n) for n in names
            if ID_RE.match(n) and os.path.isdir(os.path.join(run_dir, n))]


def cmd_prune(args: argparse.Namespace) -> int:
    """Remove finished runs' directories (``--run`` repeated); ``--dry-run`` only reports."""
    root = norm_root(args.root)
    runs = [check_id(r, "run id") for r in (args.run or [])]
    out = []
    for run_id in runs:
        try:
            out.append(prune_run(root, run_id, args.dry_run))
        except OSError as exc:
            out.append({"run_id": run_id, "state": "error", "bytes": 0, "active": [],
                        "error": error_text(exc, root)})
    emit({"ok": True, "runs": out})
    return 0


def stop_step(idir: str, grace: float, signalled: set[str], direct: dict[str, float]) -> bool:
    """Advance the stop of one instance; True once it is over."""
    state_path = os.path.join(idir, "state.json")
    raw = read_json(state_path)
    if raw is None:
        return False  # the start call is between mkdir and its first write
    if raw.get("state") in FINAL_STATES:
        return True
    doc = effective_state(idir, raw)
    if doc["supervisor_alive"]:
        if idir not in signalled:  # it forwards SIGTERM, escalates, and records the end
            signalled.add(idir)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(doc["supervisor_pid"], signal.SIGTERM)
        return False
    if raw.get("supervisor_pid") is None and doc.get("state") != "lost":
        return False  # the supervisor is starting; it will see stop.json
    # no supervisor: end the process group ourselves
    members = our_group_members(raw)
    if members:
        now = time.time()
        if idir not in direct:
            direct[idir] = now
            signal_group(raw.get("pgid"), signal.SIGTERM)
        elif now - direct[idir] >= grace:
            signal_group(raw.get("pgid"), signal.SIGKILL)
        return False
    if idir in direct:
        raw.update(state="stopped", final_reason="stopped on request; the supervisor was "
                                                 "gone, so the exit status is unknown")
    else:
        raw.update(state="lost", final_reason=doc.get("final_reason"))
    raw.update(stop_requested=True, ended_at=raw.get("ended_at") or time.time())
    write_state(state_path, raw)
    release_claim(raw.get("claim_path"))
    return True


def open_instance(args: argparse.Namespace) -> str:
    root = norm_root(args.root)
    idir = instance_dir(root, check_id(args.run, "run id"), check_id(args.instance,
                                                                     "instance id"))
    if not os.path.isdir(idir):
        raise Bad(f"no instance {args.run}/{args.instance} on this node")
    return idir


def output_closed() -> bool:
    """True when the reader of our stdout went away (pipe or socket closed)."""
    try:
        poller = select.poll()
        poller.register(1, 0)
        for _, events in poller.poll(0):
            if events & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                return True
    except (OSError, ValueError, AttributeError):
        return False
    return False


def cmd_follow(args: argparse.Namespace) -> int:
    idir = open_instance(args)
    path = os.path.join(idir, "output.log")
    parent = os.getppid()
    idle = 0.02
    while not os.path.exists(path):  # the supervisor creates it before the first attempt
        if (effective_state(idir).get("state") in FINAL_STATES or output_closed()
                or os.getppid() != parent):
            return 0
        time.sleep(idle)
        idle = min(idle * 2, 0.5)
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, int(args.offset)))
            return follow_file(handle, idir, parent)
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        return 0


def follow_file(handle: Any, idir: str, parent: int) -> int:
    """Copy the log to stdout as it grows; end once the instance ended and all is copied."""
    out = sys.stdout.buffer
    idle = 0.02
    while True:
        data = handle.read(65536)
        if data:
            out.write(data)
            out.flush()
            idle = 0.02
            continue
        if effective_state(idir).get("state") in FINAL_STATES:
            # ended before this last read, so nothing more will be written: drain and end
            data = handle.read(65536)
            while data:
                out.write(data)
                data = handle.read(65536)
            out.flush()
            return 0
        if output_closed() or os.getppid() != parent:
            return 0  # the reader went away (SSH channel closed): do not linger
        time.sleep(idle)
        idle = min(idle * 2, 0.5)


def log_chunk(idir: str, offset: int, most: int, ended: bool) -> dict[str, Any]:
    """At most ``most`` bytes of the instance's log from ``offset`` (``read``, ``harvest``);
    ``ended`` is judged before reading, so ``ended and eof`` means nothing more comes."""
    data = b""
    size = 0
    try:
        with open(os.path.join(idir, "output.log"), "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(offset)
            data = f.read(max(0, most))
    except OSError:
        pass
    new_offset = offset + len(data)
    return {"data_b64": base64.b64encode(data).decode("ascii"), "offset": new_offset,
            "size": size, "eof": new_offset >= size, "ended": ended}


def telemetry_chunk(idir: str, offset: int, most: int) -> dict[str, Any]:
    """At most ``most`` bytes of the instance's telemetry file from ``offset``, cut after the
    last newline (a line being written is never sent half). ``eof``: no complete line is left
    after the new offset (what follows, if anything, is a line still being written)."""
    raw = b""
    size = 0
    try:
        with open(os.path.join(idir, TELEMETRY_FILE), "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if offset < size:
                f.seek(offset)
                raw = f.read(max(0, most))
    except OSError:
        pass
    cut = raw.rfind(b"\n") + 1
    data = raw[:cut]
    new_offset = offset + len(data)
    eof = offset + len(raw) >= size
    return {"data_b64": base64.b64encode(data).decode("ascii"), "offset": new_offset,
            "size": size, "eof": eof}


def cmd_read(args: argparse.Namespace) -> int:
    idir = open_instance(args)
    ended = effective_state(idir).get("state") in FINAL_STATES  # before reading: see "eof"
    chunk = log_chunk(idir, max(0, int(args.offset)), int(args.max_bytes), ended)
    emit({"ok": True, **chunk})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="lab-orchestrator node-side supervisor")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("start", help="start one instance detached (request JSON on stdin)")
    p.add_argument("--root", required=True)
    p = sub.add_parser("start-batch", help="start many instances (a JSON list of start "
                                           "requests on stdin), one answer per request")
    p.add_argument("--root", required=True)
    p = sub.add_parser("status", help="every instance on this node, with live checks")
    p.add_argument("--root", required=True)
    p.add_argument("--run")
    p.add_argument("--fence-seconds", type=float, help="renew the run's fences for this long")
    p.add_argument("--fence-clear", action="store_true", help="clear the run's fences")
    p.add_argument("--fence-holder", help="who renews (host:pid of the coordinator)")
    p.add_argument("--stdin-doc", action="store_true",
                   help="read {only, telemetry, telemetry_max, telemetry_total} as JSON on "
                        "stdin: describe only those instances (fences are renewed for the "
                        "whole run) and send telemetry from the given offsets")
    p = sub.add_parser("pool-sync", help="hand tasks to a run's node-side pool (JSON on stdin)")
    p.add_argument("--root", required=True)
    p = sub.add_parser("harvest", help="logs and results of many instances (JSON on stdin)")
    p.add_argument("--root", required=True)
    p = sub.add_parser("claims", help="every live claim on this node")
    p.add_argument("--claims-dir")
    p = sub.add_parser("stop", help="stop a run or one instance (SIGTERM, then SIGKILL)")
    p.add_argument("--root", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--instance")
    p.add_argument("--grace", type=float, default=DEFAULT_GRACE_SECONDS)
    p = sub.add_parser("prune", help="remove finished runs' directories on this node")
    p.add_argument("--root", required=True)
    p.add_argument("--run", action="append")
    p.add_argument("--dry-run", action="store_true")
    for name in ("follow", "read"):
        p = sub.add_parser(name, help="log bytes from an offset")
        p.add_argument("--root", required=True)
        p.add_argument("--run", required=True)
        p.add_argument("--instance", required=True)
        p.add_argument("--offset", type=int, default=0)
        if name == "read":
            p.add_argument("--max-bytes", type=int, default=1 << 20)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"start": cmd_start, "start-batch": cmd_start_batch, "status": cmd_status,
                "stop": cmd_stop, "claims": cmd_claims, "prune": cmd_prune,
                "follow": cmd_follow, "read": cmd_read,
                "pool-sync": cmd_pool_sync, "harvest": cmd_harvest}
    if args.command not in handlers:
        build_parser().print_usage(sys.stderr)
        return 2
    try:
        return handlers[args.command](args)
    except Bad as exc:
        if args.command == "follow":
            sys.stderr.write(f"supervisor: {exc}\n")
        else:
            emit({"ok": False, "error": str(exc)})
        return 2
    except Exception as exc:
        traceback.print_exc()
        if args.command != "follow":
            emit({"ok": False, "error": error_text(exc, args.root)})
        return 1


if __name__ == "__main__":
    sys.exit(main())
