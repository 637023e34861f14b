"""Node-side worker pool: a durable node-local task queue run by one daemon per pool.

Standard library only, Python 3.8+. Installed next to ``supervisor.py`` (same versioned
directory) and driven by its ``pool-sync`` subcommand. Every task is an ordinary instance:
the daemon starts it with the regular per-instance supervisor (``daemon_main``) in a forked
child, so status, stop, follow, read, results and prune work for tasks unchanged.

Layout under ``ROOT/runs/RUN/.pools/POOL/``::

    config.json          what the coordinator asked for (suite, workers, close, cancel, ...)
    state.json           what the daemon did (phase, setup, cleanup, worker cores, waiting)
    fence.json           the pool's fence: no new task starts while it has expired
    queue/SEQ-TASK.json  a handed-over start request, not started yet (written tmp+rename)
    started/SEQ-TASK.json  moved here once the instance directory exists (started for good)
    done/SEQ-TASK.json   moved here once the task's supervisor ended
    pool.lock            flock: one change at a time (pool-sync, a task start, idle exit)
    daemon.lock          flock held by the daemon for its whole life: one daemon per pool
    daemon.json          the daemon's pid and start ticks (for status)
    setup.log, cleanup.log, daemon.log

Never twice: a task starts only after ``os.mkdir`` of its instance directory succeeded under
``pool.lock``; a queue file whose instance directory exists is moved to ``started/`` and
never started again, whatever point a SIGKILL hit. Setup and cleanup are recorded as
"running" before they are spawned, so a daemon killed during one never runs it again (the
pool says so: ``setup_failed`` with "interrupted", cleanup ``interrupted``).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback
from typing import Any

if __package__:
    from . import supervisor as sup
else:  # installed side by side on the node: supervisor.py registered itself as "supervisor"
    import supervisor as sup  # type: ignore[no-redef]

PHASES = ("idle", "preparing", "executing", "cleanup", "done", "setup_failed", "cancelled",
          "fenced")
TERMINAL_PHASES = ("done", "setup_failed", "cancelled")
BINDINGS = ("round_robin", "shared", "exclusive")
IDLE_EXIT_SECONDS = 600.0      # an idle, unclosed pool's daemon exits after this long
RETRY_SECONDS = 1.0            # a refused claim or an expired fence is looked at again after this
LOCK_SECONDS = 20.0            # how long pool.lock is waited for
READY_SECONDS = 10.0           # how long pool-sync waits for a new daemon to hold its lock
STOP_GRACE_SECONDS = 10.0      # cancel: SIGTERM -> SIGKILL for running tasks


# --------------------------------------------------------------------------- paths, files

def pool_dir(root: str, run_id: str, name: str) -> str:
    return os.path.join(root, "runs", run_id, ".pools", name)


def pool_dirs(root: str, run_id: str) -> list[str]:
    """Every pool directory of one run (name order)."""
    base = os.path.join(root, "runs", run_id, ".pools")
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return []
    return [os.path.join(base, n) for n in names
            if sup.ID_RE.match(n) and os.path.isdir(os.path.join(base, n))]


def task_of(name: str) -> str:
    """The task id in a queue file name ``SEQ-TASK+PLACEMENT.json`` (or ``SEQ-TASK.json``)."""
    return name[9:-5].split("+", 1)[0]


def placement_of(name: str) -> str:
    """The placement a queue file is for (``p0`` when its name does not say)."""
    rest = name[9:-5]
    return rest.split("+", 1)[1] if "+" in rest else "p0"


def copy_here(run_dir: str, task: str) -> str | None:
    """The placement whose copy of ``task`` this node holds (its instance dir), if any; a
    directory whose state is not written yet counts as the one being started."""
    idir = os.path.join(run_dir, task)
    if not os.path.isdir(idir):
        return None
    state = sup.read_json(os.path.join(idir, "state.json")) or {}
    return str(state.get("placement") or "p0") if state else "?"


def entries(pdir: str, sub: str) -> list[str]:
    """Queue-style file names in ``pdir/sub`` in name (= queue) order."""
    try:
        names = os.listdir(os.path.join(pdir, sub))
    except OSError:
        return []
    return sorted(n for n in names if n.endswith(".json") and len(n) > 14 and n[8] == "-")


class FileLock:
    """An flock on one file, waited for with a deadline."""

    def __init__(self, path: str, wait: float = LOCK_SECONDS) -> None:
        self.path = path
        self.wait = wait
        self.fd: int | None = None

    def acquire(self, block: bool = True) -> bool:
        import fcntl
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + (self.wait if block else 0.0)
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    self.release()
                    return False
                time.sleep(0.005)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> FileLock:
        if not self.acquire():
            raise sup.Bad(f"{self.path} is held by another pool change for over "
                          f"{self.wait:g} s")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def write_doc(path: str, doc: dict[str, Any]) -> None:
    """Atomic JSON write (tmp + fsync + rename)."""
    sup.write_json_atomic(path, doc)


# --------------------------------------------------------------------------- CPU binding

def node_cores() -> list[int]:
    """The cores this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def pool_claim_name(run_id: str, name: str) -> str:
    # a leading dot: live_claims (instance claims) never reads it
    return f".pool+{run_id}+{name}.json"


def bound_elsewhere(cdir: str, mine: str) -> set[int]:
    """Cores bound exclusively by the other live pools on this machine (their claim files)."""
    taken: set[int] = set()
    try:
        names = os.listdir(cdir)
    except OSError:
        return taken
    for n in names:
        if not (n.startswith(".pool+") and n.endswith(".json")) or n == mine:
            continue
        doc = sup.read_json(os.path.join(cdir, n)) or {}
        if doc.get("boot_id") not in (None, sup.boot_id()):
            continue
        if not sup.is_alive(doc.get("pid"), doc.get("pid_start_ticks")):
            continue
        taken.update(int(c) for c in doc.get("bound_cores") or () if isinstance(c, int))
    return taken


def worker_cores(binding: str, cores: list[int], workers: int) -> list[list[int]]:
    """Each worker's CPU set for ``round_robin`` and ``shared`` (pure)."""
    if binding == "shared":
        return [list(cores) for _ in range(workers)]
    return [[cores[i % len(cores)]] for i in range(workers)]


# --------------------------------------------------------------------------- describe

def hook_doc(doc: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"state": "none", "exit_code": None, "reason": None, "at": None}
    if isinstance(doc, dict):
        base.update({k: doc.get(k) for k in base if k in doc})
    return base


def daemon_alive(pdir: str) -> bool:
    doc = sup.read_json(os.path.join(pdir, "daemon.json")) or {}
    return sup.same_boot(doc) and sup.is_alive(doc.get("pid"), doc.get("pid_start_ticks"))


def running_tasks(pdir: str) -> list[str]:
    """Started tasks whose instance is not over (read from their state, with live checks)."""
    run_dir = os.path.dirname(os.path.dirname(pdir))
    out = []
    for n in entries(pdir, "started"):
        idir = os.path.join(run_dir, task_of(n))
        if sup.effective_state(idir).get("state") not in sup.FINAL_STATES:
            out.append(task_of(n))
    return out


def describe_pool(pdir: str, dropped: list[str] | None = None,
                  not_dropped: list[str] | None = None, error: str | None = None,
                  ignored: list[str] | None = None) -> dict[str, Any]:
    """The pool document of pool-sync and status answers (``ignored``: adds refused because
    the pool is over; none of them started here)."""
    cfg = sup.read_json(os.path.join(pdir, "config.json")) or {}
    state = sup.read_json(os.path.join(pdir, "state.json")) or {}
    alive = daemon_alive(pdir)
    queued = [task_of(n) for n in entries(pdir, "queue")]
    running = running_tasks(pdir)
    phase = state.get("phase") or "idle"
    if phase not in PHASES:
        phase = "idle"
    if not alive and phase not in TERMINAL_PHASES and not running and not queued:
        phase = "idle"
    elif phase == "idle" and (running or queued):
        phase = "executing"  # the daemon has not seen the tasks just handed to it yet
    suite = cfg.get("suite") or {}
    cores = state.get("worker_cores")
    if not isinstance(cores, list):
        binding = suite.get("cpu_binding") or "round_robin"
        avail = [int(c) for c in suite.get("cores") or ()] or node_cores()
        cores = ([] if binding == "exclusive" else
                 worker_cores(binding, avail, int(cfg.get("workers") or 1)))
    return {"name": os.path.basename(pdir), "state": phase, "daemon_alive": alive,
            "workers": int(cfg.get("workers") or 0), "worker_cores": cores,
            "queued": queued, "running": running, "dropped": dropped or [],
            "not_dropped": not_dropped or [], "ignored": ignored or [],
            "setup": hook_doc(state.get("setup")),
            "cleanup": hook_doc(state.get("cleanup")), "waiting": state.get("waiting"),
            "error": error or state.get("error"),
            "done": len(entries(pdir, "done")), "closed": bool(cfg.get("close")),
            "cancelled": bool(cfg.get("cancel"))}


# --------------------------------------------------------------------------- pool-sync

def check_sync(req: Any) -> dict[str, Any]:
    """Validate a pool-sync document; raise Bad with one line naming the key."""
    if not isinstance(req, dict):
        raise sup.Bad("the pool-sync request must be a JSON object")
    sup.check_id(req.get("run_id"), "run_id")
    sup.check_id(req.get("pool"), "pool")
    workers = req.get("workers")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise sup.Bad(f"workers must be an integer >= 1, got {workers!r}")
    suite = req.get("suite")
    if suite is not None:
        if not isinstance(suite, dict):
            raise sup.Bad("suite must be a JSON object")
        for key in ("setup", "cleanup", "cwd", "suite_id", "suite_name"):
            if suite.get(key) is not None and not isinstance(suite[key], str):
                raise sup.Bad(f"suite.{key} must be a string")
        if suite.get("env") is not None and not isinstance(suite["env"], dict):
            raise sup.Bad("suite.env must be a JSON object")
        binding = suite.get("cpu_binding") or "round_robin"
        if binding not in BINDINGS:
            raise sup.Bad(f"suite.cpu_binding must be one of {', '.join(BINDINGS)}, "
                          f"got {binding!r}")
        cores = suite.get("cores") or []
        if not isinstance(cores, list) or not all(
                isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in cores):
            raise sup.Bad("suite.cores must be a list of integers >= 0")
        missing = sorted(set(cores) - set(node_cores()))
        if missing:
            raise sup.Bad(f"suite.cores: core(s) {missing} not available on this node "
                          f"(available: {node_cores()})")
    for key in ("add", "drop"):
        if req.get(key) is not None and not isinstance(req[key], list):
            raise sup.Bad(f"{key} must be a JSON array")
    for i, add in enumerate(req.get("add") or []):
        if not isinstance(add, dict):
            raise sup.Bad(f"add[{i}] must be a JSON object")
        try:
            sup.check_request(add)
        except sup.Bad as exc:
            raise sup.Bad(f"add[{i}]: {exc}") from None
        if add["run_id"] != req["run_id"]:
            raise sup.Bad(f"add[{i}].run_id {add['run_id']!r} is not the pool's run "
                          f"{req['run_id']!r}")
    for i, task in enumerate(req.get("drop") or []):
        sup.check_id(task, f"drop[{i}]")
    for key in ("fence_seconds", "idle_exit_seconds", "grace"):
        value = req.get(key)
        if value is not None and (isinstance(value, bool) or
                                  not isinstance(value, (int, float)) or value < 0):
            raise sup.Bad(f"{key} must be a number >= 0")
    return req


def known_tasks(pdir: str) -> set[tuple[str, str]]:
    """(task, placement) pairs the pool holds in any form (queued, started, done): a task
    placed here again (rerun, or back after a move) is a new placement, and new work."""
    return {(task_of(n), placement_of(n)) for sub in ("queue", "started", "done")
            for n in entries(pdir, sub)}


def apply_sync(root: str, req: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Apply one pool-sync under the pool lock; (answer, daemon needed)."""
    run_dir = os.path.join(root, "runs", req["run_id"])
    pdir = pool_dir(root, req["run_id"], req["pool"])
    for sub in ("queue", "started", "done"):
        os.makedirs(os.path.join(pdir, sub), exist_ok=True)
    cfg = sup.read_json(os.path.join(pdir, "config.json")) or {
        "run_id": req["run_id"], "pool": req["pool"], "node": req.get("node"), "next_seq": 0,
        "close": False, "cancel": False, "created_at": time.time()}
    state = sup.read_json(os.path.join(pdir, "state.json")) or {}
    unused = not cfg.get("suite") or hook_doc(state.get("setup"))["state"] == "none"
    if unused and req.get("suite") is not None:  # a suite never changes once setup ran
        cfg["suite"] = req["suite"]
    cfg["suite"] = cfg.get("suite") or {}
    cfg["workers"] = req["workers"]
    for key in ("idle_exit_seconds", "grace", "claims_dir"):
        if key in req:
            cfg[key] = req[key]
    cfg["close"] = bool(cfg.get("close") or req.get("close"))
    cfg["cancel"] = bool(cfg.get("cancel") or req.get("cancel"))
    over = ((state.get("phase") in TERMINAL_PHASES and not state.get("bind_failed"))
            or cfg["cancel"] or hook_doc(state.get("cleanup"))["state"] != "none")
    error = None
    known = known_tasks(pdir)
    ignored = []
    for add in req.get("add") or []:
        task = add["instance_id"]
        placement = str(add.get("placement") or "p0")
        if (task, placement) in known or copy_here(run_dir, task) in (placement, "?"):
            continue
        if over:
            ignored.append(task)
            continue
        name = "{:08d}-{}+{}.json".format(int(cfg["next_seq"]), task, placement)
        cfg["next_seq"] = int(cfg["next_seq"]) + 1
        if req.get("claims_dir") and not add.get("claims_dir"):
            add = dict(add, claims_dir=req["claims_dir"])
        write_doc(os.path.join(pdir, "queue", name), add)
        known.add((task, placement))
    if ignored:
        error = "the pool is {}: {} add(s) ignored ({})".format(
            "cancelled" if cfg["cancel"] else state.get("phase") or "over", len(ignored),
            ", ".join(ignored[:5]))
    dropped, not_dropped = [], []
    queue = {task_of(n): n for n in entries(pdir, "queue")}
    drops = list(req.get("drop") or [])
    if cfg["cancel"]:
        drops += [t for t in queue if t not in drops]
    for task in drops:
        if task in queue:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(pdir, "queue", queue[task]))
            dropped.append(task)
        elif any(t == task for t, _p in known) or os.path.isdir(os.path.join(run_dir, task)):
            not_dropped.append(task)
        else:
            dropped.append(task)  # never handed here: nothing to run
    if req.get("fence_clear"):
        sup.set_fence(pdir, None, str(req.get("holder") or ""))
    elif req.get("fence_seconds") is not None:
        sup.set_fence(pdir, float(req["fence_seconds"]), str(req.get("holder") or ""))
    write_doc(os.path.join(pdir, "config.json"), cfg)
    needed = daemon_needed(pdir, cfg, state)
    return describe_pool(pdir, dropped, not_dropped, error, ignored), needed


def daemon_needed(pdir: str, cfg: dict[str, Any], state: dict[str, Any]) -> bool:
    """True when the pool has something for a daemon to do."""
    phase = state.get("phase")
    if phase in ("done", "cancelled"):
        return False
    if phase == "setup_failed" and not state.get("bind_failed"):
        return bool(cfg.get("cancel")) and bool(running_tasks(pdir))
    if entries(pdir, "queue") or running_tasks(pdir):
        return True
    return bool(cfg.get("close") or cfg.get("cancel"))


def cmd_pool_sync(root: str, text: str) -> dict[str, Any]:
    """The pool-sync subcommand: apply the document, start the daemon when needed, answer."""
    try:
        req = json.loads(text)
    except ValueError as exc:
        raise sup.Bad(f"the pool-sync request is not JSON: {exc}") from None
    req = check_sync(req)
    pdir = pool_dir(root, req["run_id"], req["pool"])
    os.makedirs(pdir, exist_ok=True)
    with FileLock(os.path.join(pdir, "pool.lock")):
        answer, needed = apply_sync(root, req)
        probe = FileLock(os.path.join(pdir, "daemon.lock"))
        if probe.acquire(block=False):  # nobody holds it: no daemon runs
            probe.release()
            if needed:
                spawn_daemon(root, req["run_id"], req["pool"])
                answer["daemon_alive"] = daemon_alive(pdir)
        else:
            wake(pdir)
    return answer


def wake(pdir: str) -> None:
    """Tell a live daemon to look at its queue and config now (SIGUSR1)."""
    doc = sup.read_json(os.path.join(pdir, "daemon.json")) or {}
    if sup.is_alive(doc.get("pid"), doc.get("pid_start_ticks")):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(int(doc["pid"]), signal.SIGUSR1)


def spawn_daemon(root: str, run_id: str, name: str) -> None:
    """Double fork the pool daemon (new session); return once it holds daemon.lock."""
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        code = 0
        try:
            os.close(r)
            os.setsid()
            if os.fork() == 0:
                daemon_entry(root, run_id, name, w)
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    os.close(w)
    os.waitpid(child, 0)
    try:
        ready, _, _ = select.select([r], [], [], READY_SECONDS)
        if ready:
            os.read(r, 1)
    finally:
        os.close(r)


def daemon_entry(root: str, run_id: str, name: str, ready_fd: int) -> None:
    """Body of the detached daemon process: redirect fds, take the lock, run, exit."""
    code = 0
    pdir = pool_dir(root, run_id, name)
    try:
        sup.detach_fds(os.path.join(pdir, "daemon.log"), keep=(ready_fd,))
        lock = FileLock(os.path.join(pdir, "daemon.lock"), wait=READY_SECONDS)
        got = lock.acquire()
        if got:
            write_doc(os.path.join(pdir, "daemon.json"),
                      {"pid": os.getpid(), "pid_start_ticks": sup.start_ticks(os.getpid()),
                       "boot_id": sup.boot_id(), "started_at": time.time()})
        with contextlib.suppress(OSError):
            os.write(ready_fd, b"1" if got else b"0")
            os.close(ready_fd)
        if got:
            daemon = PoolDaemon(root, run_id, name)
            daemon.keep_fds = (lock.fd,) if lock.fd is not None else ()
            daemon.run()
    except BaseException:
        traceback.print_exc()
        code = 1
    os._exit(code)


# --------------------------------------------------------------------------- the daemon

class PoolDaemon:
    """Runs one pool's queue: setup once, up to ``workers`` tasks at a time, cleanup once."""

    def __init__(self, root: str, run_id: str, name: str) -> None:
        self.root = root
        self.run_id = run_id
        self.name = name
        self.pdir = pool_dir(root, run_id, name)
        self.run_dir = os.path.join(root, "runs", run_id)
        self.cfg: dict[str, Any] = {}
        self.cfg_stamp: int | None = None
        self.state: dict[str, Any] = sup.read_json(os.path.join(self.pdir, "state.json")) or {}
        self.written: str = ""
        self.children: dict[int, str] = {}      # our forked supervisors: pid -> queue name
        self.adopted: dict[str, str] = {}       # started by an earlier daemon: name -> idir
        self.slots: dict[str, int] = {}         # queue name -> worker slot
        self.cores: list[list[int]] = []
        self.idle_since = time.monotonic()
        self.wake_r = -1
        self.queue: list[str] | None = None     # cached queue listing (see queued)
        self.pending: list[tuple[str, str, dict[str, Any], list[int]]] = []  # to fork
        self.keep_fds: tuple[int, ...] = ()     # lock fds a forked child closes at once

    # ---- small helpers
    def path(self, *parts: str) -> str:
        return os.path.join(self.pdir, *parts)

    def idir(self, name: str) -> str:
        return os.path.join(self.run_dir, task_of(name))

    def save(self, **changes: Any) -> None:
        """Write state.json when something changed (one small atomic write)."""
        self.state.update(changes)
        self.state["workers"] = self.workers()
        text = json.dumps(self.state, sort_keys=True)
        if text != self.written:
            write_doc(self.path("state.json"), self.state)
            self.written = text

    def load_config(self) -> None:
        try:
            stamp = os.stat(self.path("config.json")).st_mtime_ns
        except OSError:
            return
        if stamp != self.cfg_stamp:
            self.cfg = sup.read_json(self.path("config.json")) or self.cfg
            self.cfg_stamp = stamp

    def workers(self) -> int:
        return max(1, int(self.cfg.get("workers") or 1))

    def suite(self) -> dict[str, Any]:
        return self.cfg.get("suite") or {}

    def claims_dir(self) -> str:
        cdir, shared = sup.claims_dir(self.cfg.get("claims_dir"))
        sup.ensure_claims_dir(cdir, shared)
        return cdir

    def running_count(self) -> int:
        return len(self.children) + len(self.adopted) + len(self.pending)

    def queued(self) -> list[str]:
        """The queue in order: listed again after a pool-sync's wake-up or a quiet wait,
        else the cached list (a 500-entry listdir per started task is measurable)."""
        if self.queue is None:
            self.queue = entries(self.pdir, "queue")
        return self.queue

    # ---- signals: a SIGCHLD or SIGUSR1 wakes the wait
    def install_signals(self) -> None:
        r, w = os.pipe()
        for fd in (r, w):
            os.set_blocking(fd, False)
        self.wake_r = r
        signal.set_wakeup_fd(w)
        for sig in (signal.SIGCHLD, signal.SIGUSR1):
            signal.signal(sig, lambda *_: None)

    def wait(self, timeout: float) -> None:
        """Sleep until a signal arrives or ``timeout``; a SIGUSR1 (pool-sync) or a quiet
        wait makes the next round list the queue again."""
        data = b""
        with contextlib.suppress(InterruptedError, OSError):
            select.select([self.wake_r], [], [], max(0.0, timeout))
        with contextlib.suppress(BlockingIOError, OSError):
            while True:
                chunk = os.read(self.wake_r, 512)
                if not chunk:
                    break
                data += chunk
        if not data or int(signal.SIGUSR1) in data:
            self.queue = None

    # ---- main
    def run(self) -> None:
        sup.make_subreaper()
        gc.freeze()  # forked supervisors copy fewer pages: no collection walks these objects
        self.install_signals()
        self.load_config()
        self.recover()
        over = self.state.get("phase") in TERMINAL_PHASES and not self.state.get("bind_failed")
        if over and not (self.cfg.get("cancel") and self.adopted):
            return
        self.state.pop("bind_failed", None)
        if not self.bind():
            return
        if hook_doc(self.state.get("setup"))["state"] == "running":
            self.save(phase="setup_failed", setup=dict(
                hook_doc(self.state.get("setup")), state="failed",
                reason="setup interrupted: the pool daemon died while it ran; not run again",
                at=time.time()), error="setup interrupted")
        while True:
            self.load_config()
            self.reap()
            if self.cfg.get("cancel"):
                self.cancel()
                return
            if self.state.get("phase") == "setup_failed":
                if not self.running_count():
                    return
                self.wait(RETRY_SECONDS)
                continue
            timeout = self.step()
            if timeout is None:
                return
            self.wait(timeout)

    def step(self) -> float | None:
        """One round: start what may start; None when the daemon should exit."""
        queue = self.queued()
        fence = sup.fence_deadline(self.pdir)
        fenced = fence is not None and time.monotonic() > fence
        if queue and not fenced and self.running_count() < self.workers():
            setup_due = hook_doc(self.state.get("setup"))["state"] == "none"
            if self.suite().get("setup") and setup_due and not self.run_setup():
                return RETRY_SECONDS
            self.fill(queue)
            queue = self.queued()
        if queue or self.running_count():
            self.idle_since = time.monotonic()
            phase = "fenced" if fenced and queue else "executing"
            if not queue:
                self.state["waiting"] = None
            elif fenced:
                self.state["waiting"] = "fenced: no word from the coordinator within the " \
                                        "pool's fence timeout; no new task starts"
            self.save(phase=phase)
            return RETRY_SECONDS if queue else 5.0
        return self.when_empty()

    def when_empty(self) -> float | None:
        """Nothing queued, nothing running: cleanup and end when closed, else idle (and exit)."""
        with FileLock(self.path("pool.lock")) as lock:
            if entries(self.pdir, "queue"):
                return 0.0
            self.load_config()
            if self.cfg.get("close"):
                self.save(phase="cleanup", waiting=None)
            else:
                idle_for = time.monotonic() - self.idle_since
                limit = float(self.cfg.get("idle_exit_seconds", IDLE_EXIT_SECONDS))
                if idle_for >= limit:
                    self.save(phase="idle", waiting=None)
                    self.release_binding()
                    self.drop_daemon_lock()  # before pool.lock: a pool-sync then starts anew
                    lock.release()
                    return None
                self.save(phase="idle", waiting=None)
                return min(limit - idle_for, 5.0) + 0.01
        self.run_cleanup()
        self.save(phase="done")
        self.release_binding()
        return None

    def drop_daemon_lock(self) -> None:
        """Give up daemon.lock (the daemon is about to exit)."""
        for fd in self.keep_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.keep_fds = ()

    # ---- recovery after a daemon crash
    def recover(self) -> None:
        """Queue files with an instance dir are started; started tasks still active are ours."""
        with FileLock(self.path("pool.lock")):
            for n in entries(self.pdir, "queue"):
                if copy_here(self.run_dir, task_of(n)) in (placement_of(n), "?"):
                    os.replace(self.path("queue", n), self.path("started", n))
        for n in entries(self.pdir, "started"):
            idir = self.idir(n)
            if sup.effective_state(idir).get("state") in sup.FINAL_STATES:
                self.finished(n)
                continue
            self.adopted[n] = idir
            req = sup.read_json(os.path.join(idir, "request.json")) or {}
            slot = (req.get("pool") or {}).get("slot")
            if isinstance(slot, int):
                self.slots[n] = slot

    def finished(self, name: str) -> None:
        with contextlib.suppress(OSError):
            os.replace(self.path("started", name), self.path("done", name))
        self.slots.pop(name, None)

    def reap(self) -> None:
        """Collect ended supervisors (ours by waitpid, adopted ones by their state)."""
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            name = self.children.pop(pid, None)
            if name is not None:
                self.finished(name)
        for name, idir in list(self.adopted.items()):
            if sup.effective_state(idir).get("state") in sup.FINAL_STATES:
                del self.adopted[name]
                self.finished(name)

    # ---- CPU binding
    def bind(self) -> bool:
        """Choose every worker's cores; exclusive ones under the node-wide lock."""
        suite = self.suite()
        binding = suite.get("cpu_binding") or "round_robin"
        cores = [int(c) for c in suite.get("cores") or ()] or node_cores()
        workers = self.workers()
        if binding != "exclusive":
            self.cores = worker_cores(binding, cores, workers)
            self.save(worker_cores=self.cores)
            return True
        cdir = self.claims_dir()
        mine = pool_claim_name(self.run_id, self.name)
        with sup.NodeLock(cdir):
            taken = bound_elsewhere(cdir, mine)
            free = [c for c in cores if c not in taken]
            before = [c[0] for c in self.state.get("worker_cores") or () if c]
            free = [c for c in before if c in free] + [c for c in free if c not in before]
            if len(free) < workers:
                reason = (f"cannot bind {workers} workers exclusively: only {len(free)} free "
                          f"cores (of {cores}; bound by other pools: {sorted(taken)})")
                self.save(phase="setup_failed", error=reason, waiting=None, bind_failed=True)
                return False
            self.cores = [[c] for c in free[:workers]]
            write_doc(os.path.join(cdir, mine), {
                "run_id": self.run_id, "pool": self.name, "pid": os.getpid(),
                "pid_start_ticks": sup.start_ticks(os.getpid()), "boot_id": sup.boot_id(),
                "uid": os.getuid(), "bound_cores": [c[0] for c in self.cores],
                "at": time.time()})
        self.save(worker_cores=self.cores, error=None)
        return True

    def release_binding(self) -> None:
        if (self.suite().get("cpu_binding") or "") == "exclusive":
            cdir, _shared = sup.claims_dir(self.cfg.get("claims_dir"))
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(cdir, pool_claim_name(self.run_id, self.name)))

    # ---- hooks
    def hook_env(self) -> dict[str, str]:
        suite = self.suite()
        env = dict(os.environ)
        for key, value in (suite.get("env") or {}).items():
            env[str(key)] = str(value)
        env["INFRA_SUITE_ID"] = str(suite.get("suite_id") or f"{self.run_id}/{self.name}")
        env["INFRA_SUITE_NAME"] = str(suite.get("suite_name") or self.name)
        env["INFRA_WORKER_COUNT"] = str(self.workers())
        env["INFRA_RUN_ID"] = self.run_id
        env["INFRA_NODE"] = str(self.cfg.get("node") or "")
        return env

    def run_hook(self, which: str) -> bool:
        """Run setup or cleanup once, recording "running" first; True when it succeeded."""
        command = self.suite().get(which)
        if not command:
            return True
        self.save(**{which: {"state": "running", "exit_code": None, "reason": None,
                             "at": time.time()}},
                  phase="preparing" if which == "setup" else "cleanup")
        log_path = self.path(f"{which}.log")
        cwd = os.path.abspath(os.path.expanduser(self.suite().get("cwd") or "~"))
        with open(log_path, "ab") as log:
            start = sup.log_size(log)
            try:
                proc = subprocess.Popen(["/bin/sh", "-c", command], cwd=cwd,
                                        env=self.hook_env(), stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True, close_fds=True)
            except OSError as exc:
                self.save(**{which: {"state": "failed", "exit_code": None,
                                     "reason": f"{which} could not start: {exc}",
                                     "at": time.time()}})
                return False
            self.state[which]["pid"] = proc.pid
            self.save()
            code = self.wait_hook(proc, which)
        kind, exit_code, sig = sup.classify(code)
        if kind == "ok":
            self.save(**{which: {"state": "ok", "exit_code": 0, "reason": None,
                                 "at": time.time()}})
            return True
        line = sup.last_line(log_path, start)[1].strip()
        what = sup.describe_end(exit_code, sig)
        reason = f"{which} failed: {what}" + (f": {line}" if line else "")
        self.save(**{which: {"state": "failed", "exit_code": exit_code, "reason": reason,
                             "at": time.time()}})
        return False

    def wait_hook(self, proc: Any, which: str) -> int:
        """Wait for a hook; a cancel during setup ends it."""
        while True:
            try:
                return int(proc.wait(timeout=0.2))
            except subprocess.TimeoutExpired:
                pass
            if which == "setup":
                self.load_config()
                if self.cfg.get("cancel"):
                    sup.signal_group(proc.pid, signal.SIGTERM)

    def run_setup(self) -> bool:
        if self.run_hook("setup"):
            return True
        setup = hook_doc(self.state.get("setup"))
        self.save(phase="setup_failed", error=setup["reason"], waiting=None)
        return False

    def run_cleanup(self) -> None:
        """Cleanup once, when setup ran well (or there is no setup and a task started)."""
        if hook_doc(self.state.get("cleanup"))["state"] != "none":
            if hook_doc(self.state.get("cleanup"))["state"] == "running":
                self.save(cleanup=dict(hook_doc(self.state.get("cleanup")),
                                       state="interrupted", at=time.time(),
                                       reason="the pool daemon died while cleanup ran; "
                                              "not run again"))
            return
        if not self.suite().get("cleanup"):
            return
        setup = hook_doc(self.state.get("setup"))["state"]
        anything = bool(entries(self.pdir, "done") or entries(self.pdir, "started"))
        if setup == "ok" or (not self.suite().get("setup") and anything):
            self.run_hook("cleanup")

    # ---- starting tasks
    def free_slot(self) -> int:
        used = set(self.slots.values())
        return next(i for i in range(self.workers() + len(used) + 1) if i not in used)

    def fill(self, queue: list[str]) -> None:
        """Start queued tasks in order while a worker is free and claims allow.

        The instance dirs are made under pool.lock; the supervisors are forked after it is
        released (a forked child would hold the lock until it closes its fds).
        """
        waiting = None
        consumed = 0
        with FileLock(self.path("pool.lock")):
            for name in queue:
                if self.running_count() >= self.workers():
                    break
                why = self.start_one(name)
                if why is not None:
                    waiting = why
                    break
                consumed += 1
        pending, self.pending = self.pending, []
        for item in pending:
            self.spawn(*item)
        if self.queue is not None:
            self.queue = self.queue[consumed:]
        self.save(waiting=waiting)

    def start_one(self, name: str) -> str | None:
        """Start one queued task (under pool.lock); the refusal reason when it must wait."""
        qpath = self.path("queue", name)
        req = sup.read_json(qpath)
        if req is None:
            return None  # dropped meanwhile
        idir = self.idir(name)
        placement = req.get("placement") or "p0"
        had = copy_here(self.run_dir, task_of(name))
        if had in (placement, "?"):  # started before: never again
            self.already_started(name, idir)
            return None
        if had is not None:  # an earlier placement's copy of this task is here
            if sup.effective_state(idir).get("state") not in sup.FINAL_STATES:
                return (f"an earlier copy ({had}) of {task_of(name)} still runs here; "
                        "waiting for it to end")
            sup.archive_previous(idir, had)  # kept under .previous/, as a start does
        slot = self.free_slot()
        cpus = self.cores[slot % len(self.cores)] if self.cores else []
        req["pool"] = {"name": self.name, "slot": slot, "cpus": cpus}
        claim = req.get("claim")
        try:
            if isinstance(claim, dict):
                cdir, shared = sup.claims_dir(req.get("claims_dir"))
                sup.ensure_claims_dir(cdir, shared)
                with sup.NodeLock(cdir):
                    claims = sup.live_claims(cdir, prune=True)
                    why = None if claim.get("force") else sup.claim_refusal(
                        str(req.get("node") or "node"), claim.get("capacity") or {},
                        claim.get("demand") or {}, claims)
                    if why is not None:
                        return why
                    self.make_instance(idir, req, placement, cdir)
            else:
                self.make_instance(idir, req, placement, None)
        except FileExistsError:  # its instance dir appeared meanwhile: never twice
            self.already_started(name, idir)
            return None
        except sup.Bad as exc:
            return str(exc)
        os.replace(qpath, self.path("started", name))
        self.slots[name] = slot
        self.pending.append((name, idir, req, cpus))
        return None

    def already_started(self, name: str, idir: str) -> None:
        """A queued task whose instance dir exists: move it to started/, never start it."""
        os.replace(self.path("queue", name), self.path("started", name))
        if sup.effective_state(idir).get("state") not in sup.FINAL_STATES:
            self.adopted[name] = idir
        else:
            self.finished(name)

    def make_instance(self, idir: str, req: dict[str, Any], placement: str,
                      cdir: str | None) -> None:
        """mkdir (the durable "started" token), claim, request and first state."""
        os.mkdir(idir)
        claim_path = None
        try:
            if cdir is not None:
                claim_path = sup.write_claim(cdir, idir, req, placement)
            sup.start_new(idir, req, placement, claim_path)
        except OSError:
            sup.release_claim(claim_path)
            shutil.rmtree(idir, ignore_errors=True)
            raise
        fence = sup.read_json(self.path("fence.json"))
        if req.get("fence") and fence is not None and fence.get("deadline") is not None:
            write_doc(os.path.join(idir, "fence.json"), fence)

    def spawn(self, name: str, idir: str, req: dict[str, Any], cpus: list[int]) -> None:
        """Fork the task's supervisor: new session, the worker's CPUs, then daemon_main."""
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                for fd in self.keep_fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGCHLD, signal.SIGUSR1, signal.SIGTERM):
                    signal.signal(sig, signal.SIG_DFL)
                os.setsid()
                if cpus and hasattr(os, "sched_setaffinity"):
                    os.sched_setaffinity(0, cpus)
                sup.daemon_main(idir, req)
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        self.children[pid] = name

    # ---- cancel
    def cancel(self) -> None:
        """Stop every running task (stop.json + SIGTERM, SIGKILL after the grace), cleanup."""
        grace = float(self.cfg.get("grace", STOP_GRACE_SECONDS))
        self.save(phase="cleanup", waiting=None)
        dirs = [self.idir(n) for n in list(self.children.values()) + list(self.adopted)]
        for idir in dirs:
            if sup.effective_state(idir).get("state") not in sup.FINAL_STATES:
                with contextlib.suppress(OSError):
                    write_doc(os.path.join(idir, "stop.json"),
                              {"requested_at": time.time(), "grace": grace})
        signalled: set[str] = set()
        direct: dict[str, float] = {}
        pending = list(dirs)
        deadline = time.monotonic() + grace + 15.0
        while pending and time.monotonic() < deadline:
            pending = [d for d in pending if not sup.stop_step(d, grace, signalled, direct)]
            self.reap()
            if pending:
                self.wait(0.05)
        self.reap()
        self.run_cleanup()
        self.save(phase="cancelled")
        self.release_binding()


def pool_docs(root: str, run_id: str) -> list[dict[str, Any]]:
    """Every pool of a run, as status lists them."""
    return [describe_pool(p) for p in pool_dirs(root, run_id)]


def live_pools(run_dir: str) -> list[str]:
    """Names of the run's pools whose daemon runs (prune leaves such a run alone)."""
    base = os.path.join(run_dir, ".pools")
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return []
    return [f"pool {n}" for n in names if daemon_alive(os.path.join(base, n))]


