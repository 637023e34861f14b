"""Durable run state in SQLite: runs, instances, events.

Written before and after every action, so a coordinator killed at any point finds every
run and instance again. The file and its directory are private to the user (0600/0700).
"""

from __future__ import annotations

import enum
import functools
import json
import os
import secrets
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.config.model import ExperimentSpec
from infra.errors import StateError, UsageError
from infra.manifest.model import Manifest
from infra.placement.allocation import Allocation
from infra.state.codec import decode_allocation, decode_spec, encode_allocation, encode_spec

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    cluster_config TEXT NOT NULL,
    state TEXT NOT NULL,
    plan_json TEXT NOT NULL DEFAULT '{}',
    coordinator TEXT NOT NULL DEFAULT '',
    lease_holder TEXT,
    lease_expires REAL
);
CREATE TABLE IF NOT EXISTS run_plans (
    run_id TEXT PRIMARY KEY REFERENCES runs(run_id),
    plan_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    instance_id TEXT NOT NULL,
    node TEXT NOT NULL,
    state TEXT NOT NULL,
    spec_json TEXT NOT NULL,
    pid INTEGER,
    exit_code INTEGER,
    signal TEXT,
    started_at REAL,
    ended_at REAL,
    restarts INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    last_line TEXT NOT NULL DEFAULT '',
    log_offset INTEGER NOT NULL DEFAULT 0,
    log_base INTEGER NOT NULL DEFAULT 0,
    allocation_json TEXT NOT NULL DEFAULT '{}',
    results_fetched INTEGER NOT NULL DEFAULT 0,
    moves INTEGER NOT NULL DEFAULT 0,
    previous_nodes TEXT NOT NULL DEFAULT '[]',
    placement_seq INTEGER NOT NULL DEFAULT 0,
    failure_class TEXT,
    updated_at REAL NOT NULL,
    PRIMARY KEY (run_id, instance_id)
);
CREATE TABLE IF NOT EXISTS node_states (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    since REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS node_admin (
    name TEXT PRIMARY KEY,
    admin TEXT NOT NULL DEFAULT 'none',
    eligible INTEGER NOT NULL DEFAULT 1,
    reason TEXT NOT NULL DEFAULT '',
    deadline REAL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_run ON events(run_id, id);
CREATE TABLE IF NOT EXISTS pools (
    run_id TEXT NOT NULL,
    campaign TEXT NOT NULL,
    node TEXT NOT NULL,
    name TEXT NOT NULL,
    workers INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'new',
    reason TEXT NOT NULL DEFAULT '',
    closed INTEGER NOT NULL DEFAULT 0,
    abandoned INTEGER NOT NULL DEFAULT 0,
    queued INTEGER NOT NULL DEFAULT 0,
    running INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL,
    PRIMARY KEY (run_id, campaign, node)
);
CREATE TABLE IF NOT EXISTS slurm_jobs (
    run_id TEXT NOT NULL,
    key TEXT NOT NULL,
    name TEXT NOT NULL,
    target TEXT NOT NULL,
    seq INTEGER NOT NULL DEFAULT 0,
    instance_ids TEXT NOT NULL DEFAULT '[]',
    job_id TEXT,
    submitted_at REAL,
    how TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL,
    PRIMARY KEY (run_id, key)
);
"""


OPEN_BUSY_SECONDS = 30.0
"""How long opening a store waits for another process creating or upgrading it."""

# Columns added after the first release: opening an older store adds them in place.
ADDED_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "runs": (
        ("pruned_at", "REAL"),  # when `prune` removed its directories (rows are kept)
        ("manifest_json", "TEXT"),  # the run's manifest (infra.manifest); NULL before issue 11
        ("backend", "TEXT NOT NULL DEFAULT 'bench'"),  # 'bench' or 'slurm' (issue 13)
    ),
    "instances": (
        ("moves", "INTEGER NOT NULL DEFAULT 0"),
        ("previous_nodes", "TEXT NOT NULL DEFAULT '[]'"),
        ("log_base", "INTEGER NOT NULL DEFAULT 0"),
        ("allocation_json", "TEXT NOT NULL DEFAULT '{}'"),
        ("placement_seq", "INTEGER NOT NULL DEFAULT 0"),
        ("results_missing", "TEXT NOT NULL DEFAULT '[]'"),
        ("failure_class", "TEXT"),
        ("telemetry_offset", "INTEGER NOT NULL DEFAULT 0"),  # the home telemetry file's size
        ("telemetry_base", "INTEGER NOT NULL DEFAULT 0"),    # its size when this placement began
        ("telemetry_done", "INTEGER NOT NULL DEFAULT 0"),    # ended, and its telemetry is home
    ),
}


class AdminState(str, enum.Enum):
    """What an operator set on a node; the health loop never changes it."""

    NONE = "none"
    MAINTENANCE = "maintenance"   # no new work; current work stays
    DRAINING = "draining"         # no new work; work is moved off or allowed to finish
    QUARANTINED = "quarantined"   # treated as inactive


@dataclass(frozen=True)
class NodeAdmin:
    name: str
    admin: AdminState = AdminState.NONE
    eligible: bool = True
    reason: str = ""
    deadline: float | None = None
    updated_at: float = 0.0


class RunState(str, enum.Enum):
    PLANNED = "planned"
    STARTING = "starting"
    RUNNING = "running"
    FINISHED = "finished"
    STOPPED = "stopped"
    FAILED = "failed"


class InstancePhase(str, enum.Enum):
    """Coordinator-side life of one instance (the node's supervisor has the finer detail)."""

    PLANNED = "planned"
    DEPLOYING = "deploying"
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    EXITED = "exited"       # finished with exit code 0
    FAILED = "failed"       # finished with a non-zero exit code or a signal, retries exhausted
    STOPPED = "stopped"     # stopped on request
    LOST = "lost"           # gone with its node, or neither process nor supervisor exists
    PAUSED = "paused"       # its node was lost and policy (or lack of room) says wait
    MOVING = "moving"       # being re-placed and started on another node
    QUEUED = "queued"       # waits in the coordinator's queue (campaign task or queued work)
    DISPATCHED = "dispatched"  # written to its node's pool queue, not started yet
    SKIPPED = "skipped"     # never started: a dependency failed
    CANCELLED = "cancelled"  # never started: the run was stopped or a fail_fast campaign failed

    @property
    def finished(self) -> bool:
        """Over: nothing runs and nothing will run it again without the user."""
        return self in (InstancePhase.EXITED, InstancePhase.FAILED, InstancePhase.STOPPED,
                        InstancePhase.LOST, InstancePhase.PAUSED, InstancePhase.SKIPPED,
                        InstancePhase.CANCELLED)

    @property
    def active(self) -> bool:
        """Holds (or is about to hold) resources on its node."""
        return self in (InstancePhase.DEPLOYING, InstancePhase.STARTING, InstancePhase.RUNNING,
                        InstancePhase.RESTARTING, InstancePhase.MOVING)


class FailureClass(str, enum.Enum):
    """How the latest failed attempt of an instance failed, as its node's supervisor judged
    it (the restart limits in ``infra/remote/supervisor.py`` go by it)."""

    BROKEN_COMMAND = "broken_command"  # exit 126/127 or a quick non-zero exit: never moved
    EXIT_CODE = "exit_code"
    HARD_FAULT = "hard_fault"          # SIGSEGV, SIGILL, SIGBUS, SIGFPE
    RESOURCE = "resource"              # SIGKILL, SIGABRT
    SIGNAL = "signal"

    @classmethod
    def parse(cls, value: object) -> FailureClass | None:
        """The class named by ``value``; None for none or one this version does not know."""
        try:
            return cls(value)
        except ValueError:
            return None


BENCH = "bench"
SLURM = "slurm"
"""A run's backend (``runs.backend``): its instances' ``node`` names a Slurm target."""


@dataclass(frozen=True)
class SlurmJobRecord:
    """One Slurm job of a run (a plain job, or a sweep's array), recorded before it is
    submitted (``job_id`` None: the intent) and given its id once sbatch (or the lookup on
    the login host) answered; ``instance_ids[i]`` is array task ``i`` (or the one job)."""

    run_id: str
    key: str
    name: str
    target: str
    seq: int
    instance_ids: tuple[str, ...]
    job_id: str | None
    submitted_at: float | None
    how: str  # "submitted", "found by marker", "found by name"

    @property
    def is_array(self) -> bool:
        return len(self.instance_ids) > 1 or self.key not in self.instance_ids


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    created_at: float
    cluster_config: str
    state: RunState
    stored_plan: dict[str, Any] | str | Callable[[], str]  # the plan, its JSON, or a reader
    coordinator: str
    pruned_at: float | None = None  # its directories were removed by `prune` then
    manifest: Manifest | None = None  # None: recorded before manifests, or unreadable
    manifest_error: str | None = None  # why a stored manifest could not be read
    backend: str = BENCH  # where its work runs: BENCH nodes or a SLURM target

    @property
    def on_slurm(self) -> bool:
        """Its work was submitted to a Slurm target (``infra.backends.slurm``)."""
        return self.backend == SLURM

    @functools.cached_property
    def plan(self) -> dict[str, Any]:
        """The stored plan, decoded on first use: it holds every node's evaluation of every
        instance (megabytes for a large run), and most readers of a run never look at it
        (a watch reads the run's state every tick)."""
        stored = self.stored_plan
        if callable(stored):
            stored = stored()
        if isinstance(stored, str):
            return json.loads(stored)  # type: ignore[no-any-return]
        return stored

    @functools.cached_property
    def pinned(self) -> frozenset[str]:
        """Instances placed with --placement (never moved)."""
        return _pinned(self.plan)


@dataclass(frozen=True)
class ResultIssue:
    """A declared or produced result that did not come home: a pattern that matched nothing,
    a file skipped on the node, or a copy that failed; ``path`` is relative to its base."""

    path: str
    reason: str

    def one_line(self) -> str:
        return f"{self.path}: {self.reason}"

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


@functools.lru_cache(maxsize=16)
def _manifest(text: str | None) -> tuple[Manifest | None, str | None]:
    """A stored manifest decoded once, here (cached: the watcher reads its run every tick,
    and a sweep's manifest holds every task's spec); an unreadable one gives None and the
    reason."""
    if text is None:
        return None, None
    try:
        return Manifest.from_json(json.loads(text)), None
    except (ValueError, StateError) as exc:
        return None, str(exc)


def issues_json(issues: tuple[ResultIssue, ...] | list[ResultIssue]) -> str:
    """How the store keeps an instance's result issues."""
    return json.dumps([i.to_json() for i in issues])


def _previous_nodes(text: str) -> tuple[str, ...]:
    """The nodes an instance was moved away from (``[]`` for nearly every row)."""
    return () if text == "[]" else tuple(json.loads(text))


def _issues(text: str | None) -> tuple[ResultIssue, ...]:
    if not text or text == "[]":  # nearly every row: no JSON to decode
        return ()
    return tuple(ResultIssue(str(d["path"]), str(d["reason"])) for d in json.loads(text or "[]"))


@dataclass(frozen=True)
class InstanceRecord:
    """One instance as the store holds it, decoded into its types once, here."""

    run_id: str
    instance_id: str
    node: str
    state: InstancePhase
    spec: ExperimentSpec
    pid: int | None
    exit_code: int | None
    signal: str | None
    started_at: float | None
    ended_at: float | None
    restarts: int
    reason: str
    last_line: str
    log_offset: int
    results_fetched: bool
    updated_at: float
    moves: int = 0
    previous_nodes: tuple[str, ...] = ()
    log_base: int = 0  # local log size when the current node's log began (after a move)
    allocation: Allocation | None = None
    placement_seq: int = 0  # which placement of the instance this is: +1 on every move
    results_missing: tuple[ResultIssue, ...] = ()  # what the last fetch could not bring home
    failure_class: FailureClass | None = None  # how its latest failed attempt failed
    telemetry_offset: int = 0  # the home telemetry file's size after the last append
    telemetry_base: int = 0    # the home telemetry file's size when this placement began
    telemetry_done: bool = False  # over on its node and its whole telemetry file is home

    @property
    def placement_id(self) -> str:
        """The node-side identity of this placement: a move back to a node is a new copy."""
        return f"p{self.placement_seq}"

    @property
    def runtime_seconds(self) -> float | None:
        if self.started_at is None:
            return None
        return (self.ended_at or time.time()) - self.started_at


@dataclass(frozen=True)
class PoolRecord:
    """A campaign's worker pool on one node, as the coordinator last saw it.

    ``workers`` is how many of the campaign's tasks the coordinator placed there at once;
    ``state`` is the node-side pool state (``new`` before the node first answered);
    ``abandoned`` means its tasks go elsewhere (setup failed, node lost)."""

    run_id: str
    campaign: str
    node: str
    name: str
    workers: int
    state: str
    reason: str
    closed: bool
    abandoned: bool
    queued: int
    running: int
    updated_at: float


@dataclass(frozen=True)
class Event:
    id: int
    run_id: str | None
    at: float
    kind: str
    subject: str
    message: str


def _pinned(plan: Any) -> frozenset[str]:
    """The instances a run's stored plan says were pinned (``instances.X.pinned``)."""
    instances = plan.get("instances") if isinstance(plan, dict) else None
    if not isinstance(instances, dict):
        return frozenset()
    return frozenset(iid for iid, entry in instances.items()
                     if isinstance(entry, dict) and entry.get("pinned") is True)


def new_run_id(now: float | None = None) -> str:
    """Sortable, path-safe run id: r-YYYYmmdd-HHMMSS-xxxx."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now or time.time()))
    return f"r-{stamp}-{secrets.token_hex(2)}"


def coordinator_id() -> str:
    """Who holds a lease: ``host:pid`` of this coordinator process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def holder_is_dead(holder: str) -> bool:
    """True when ``holder`` is a process on this machine that no longer exists."""
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass(frozen=True)
class Lease:
    """Who acts on a run (``host:pid``) and until when (``time.time()`` seconds)."""

    holder: str
    expires: float

    def live(self, now: float, holder_dead: Callable[[str], bool] = holder_is_dead) -> bool:
        """Still binding: not expired, and the holder is not a known-dead local process."""
        return self.expires > now and not holder_dead(self.holder)


def may_take(current: Lease | None, claimant: str, now: float, *, steal: bool = False,
             holder_dead: Callable[[str], bool] = holder_is_dead) -> bool:
    """The lease rules: free, ours (renewal), stolen, expired, or its holder died here."""
    if current is None or current.holder == claimant or steal:
        return True
    return not current.live(now, holder_dead)


class Store:
    """One SQLite file (``<log_dir>/state.db``); every write is its own transaction."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
                os.close(fd)
            os.chmod(path, 0o600)
            self.db = sqlite3.connect(str(path), timeout=30.0, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StateError(f"{path}: cannot open the state store: {exc}") from None
        self.db.row_factory = sqlite3.Row
        deadline = time.monotonic() + OPEN_BUSY_SECONDS
        while True:
            try:
                self._prepare()
                break
            except sqlite3.OperationalError as exc:
                # another process is creating or upgrading the same store right now: SQLite
                # answers "locked" at once for a journal-mode switch or a lock upgrade it
                # cannot wait for; the schema steps are idempotent, so try again
                if "locked" in str(exc) and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                self.db.close()
                raise StateError(f"{path}: not a usable state store ({exc}); move it aside "
                                 "to start a new one") from None
            except sqlite3.Error as exc:  # not a database, or a damaged one: say which file
                self.db.close()
                raise StateError(f"{path}: not a usable state store ({exc}); move it aside "
                                 "to start a new one") from None
        for suffix in ("-wal", "-shm"):
            side = Path(str(path) + suffix)
            if side.exists():
                os.chmod(side, 0o600)

    def _prepare(self) -> None:
        """WAL mode, the schema and the added columns (each step idempotent)."""
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")  # a step that failed half way
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Add the columns an older store lacks, under the write lock: two processes opening
        one new store at once (a coordinator and a ``status``) must not both add a column."""
        if not self._missing_columns():
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for table, name, decl in self._missing_columns():  # again, under the lock
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _missing_columns(self) -> list[tuple[str, str, str]]:
        """(table, column, declaration) of every added column this store does not have."""
        missing = []
        for table, columns in ADDED_COLUMNS.items():
            have = {r["name"] for r in self.db.execute(f"PRAGMA table_info({table})")}
            missing += [(table, name, decl) for name, decl in columns if name not in have]
        return missing

    @classmethod
    def for_log_dir(cls, log_dir: Path) -> Store:
        return cls(log_dir / "state.db")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ------------------------------------------------------------------ runs

    def create_run(self, run_id: str, cluster_config: str, plan: dict[str, Any],
                   instances: list[tuple[str, str, ExperimentSpec, Allocation | None]],
                   queued: Sequence[ExperimentSpec] = (), *, backend: str = BENCH,
                   slurm_jobs: Sequence[tuple[str, str, str, Sequence[str]]] = ()) -> None:
        """Record a run and its planned instances (id, node, spec, allocation) in one go;
        ``queued`` work (campaign tasks) is recorded QUEUED, on no node yet. A Slurm run
        (``backend`` SLURM) also records the intent of each job (key, name, target,
        instance ids) in submission order, before anything is submitted."""
        now = time.time()
        with self.tx() as db:
            db.execute("INSERT INTO runs(run_id, created_at, cluster_config, state, plan_json,"
                       " coordinator, backend) VALUES (?,?,?,?,?,?,?)",
                       (run_id, now, cluster_config, RunState.PLANNED.value,
                        "{}", coordinator_id(), backend))
            # the plan in a table of its own: in the runs row its megabytes (every node's
            # evaluation of every instance) would be read past for the lease columns, and
            # copied again by each lease renewal (SQLite rewrites a changed row whole)
            db.execute("INSERT INTO run_plans(run_id, plan_json) VALUES (?,?)",
                       (run_id, json.dumps(plan)))
            db.executemany("INSERT INTO slurm_jobs(run_id, key, name, target, seq, "
                           "instance_ids, updated_at) VALUES (?,?,?,?,?,?,?)",
                           [(run_id, key, name, target, seq, json.dumps(list(ids)), now)
                            for seq, (key, name, target, ids) in enumerate(slurm_jobs)])
            for instance_id, node, spec, alloc in instances:
                db.execute("INSERT INTO instances(run_id, instance_id, node, state, spec_json,"
                           " allocation_json, updated_at) VALUES (?,?,?,?,?,?,?)",
                           (run_id, instance_id, node, InstancePhase.PLANNED.value,
                            encode_spec(spec), encode_allocation(alloc), now))
            db.executemany("INSERT INTO instances(run_id, instance_id, node, state, spec_json,"
                           " updated_at) VALUES (?,?,?,?,?,?)",
                           [(run_id, spec.experiment_id, "", InstancePhase.QUEUED.value,
                             encode_spec(spec), now) for spec in queued])
            total = len(instances) + len(queued)
            db.execute("INSERT INTO events(run_id, at, kind, subject, message) VALUES "
                       "(?,?,?,?,?)", (run_id, now, "run", run_id,
                                       f"run created with {total} instances"
                                       + (f" ({len(queued)} queued)" if queued else "")))

    def set_run_state(self, run_id: str, state: RunState) -> None:
        self.db.execute("UPDATE runs SET state=? WHERE run_id=?", (state.value, run_id))

    def run(self, run_id: str) -> RunRecord:
        row = self.db.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()
        if row is None:
            raise UsageError(f"no run {run_id!r} in {self.path}")
        return self._run(row)

    def runs(self, limit: int = 50) -> list[RunRecord]:
        rows = self.db.execute("SELECT * FROM runs ORDER BY created_at DESC, run_id DESC LIMIT ?",
                               (limit,)).fetchall()
        return [self._run(r) for r in rows]

    def latest_run(self) -> RunRecord:
        runs = self.runs(1)
        if not runs:
            raise UsageError(f"no runs recorded yet in {self.path}")
        return runs[0]

    def resolve_run(self, run_id: str | None) -> RunRecord:
        """A run by exact id, unique prefix (literal, case-sensitive), or the latest when None."""
        if run_id is None:
            return self.latest_run()
        if not run_id.strip():
            raise UsageError("an empty run id: give a run id or a prefix of one "
                             "(or leave it out for the latest run)")
        if not run_id.isprintable() or not run_id.isascii():
            raise UsageError(f"no run {run_id[:80]!r} in {self.path} (run ids are printable "
                             "ASCII)")
        rows = self.db.execute("SELECT * FROM runs WHERE substr(run_id, 1, ?) = ? "
                               "ORDER BY run_id", (len(run_id), run_id)).fetchall()
        exact = [r for r in rows if r["run_id"] == run_id]
        if exact:
            return self._run(exact[0])
        if len(rows) == 1:
            return self._run(rows[0])
        if not rows:
            raise UsageError(f"no run {run_id!r} in {self.path}")
        shown = ", ".join(r["run_id"] for r in rows[:5])
        more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
        raise UsageError(f"run id {run_id!r} is ambiguous ({len(rows)} runs match): "
                         f"{shown}{more}")

    def _run(self, row: sqlite3.Row) -> RunRecord:
        manifest, manifest_error = _manifest(row["manifest_json"])
        run_id = str(row["run_id"])
        inline = str(row["plan_json"])  # runs recorded before run_plans keep it here
        return RunRecord(run_id=run_id, created_at=row["created_at"],
                         cluster_config=row["cluster_config"], state=RunState(row["state"]),
                         stored_plan=inline if inline != "{}" else
                         functools.partial(self._plan_text, run_id),
                         coordinator=row["coordinator"],
                         pruned_at=row["pruned_at"], manifest=manifest,
                         manifest_error=manifest_error, backend=row["backend"] or BENCH)

    def _plan_text(self, run_id: str) -> str:
        """A run's stored plan as JSON text (``{}`` when none was kept)."""
        row = self.db.execute("SELECT plan_json FROM run_plans WHERE run_id=?",
                              (run_id,)).fetchone()
        return str(row["plan_json"]) if row is not None else "{}"

    def run_state(self, run_id: str) -> tuple[RunState, float]:
        """A run's state and creation time alone: what a watch needs every tick."""
        row = self.db.execute("SELECT state, created_at FROM runs WHERE run_id=?",
                              (run_id,)).fetchone()
        if row is None:
            raise UsageError(f"no run {run_id!r} in {self.path}")
        return RunState(row["state"]), float(row["created_at"])

    def set_manifest(self, run_id: str, manifest: Manifest) -> None:
        """Keep the run's manifest (written before launch, updated with the end record)."""
        self.db.execute("UPDATE runs SET manifest_json=? WHERE run_id=?",
                        (json.dumps(manifest.to_json()), run_id))

    def mark_pruned(self, run_id: str, at: float | None = None) -> None:
        """Record that the run's directories are gone; its rows stay (specs, states)."""
        self.db.execute("UPDATE runs SET pruned_at=? WHERE run_id=?",
                        (time.time() if at is None else at, run_id))
        self.add_event(run_id, "run", run_id, "pruned: run directories removed")

    # ------------------------------------------------------------------ lease

    def lease(self, run_id: str) -> Lease | None:
        """The run's lease as recorded (possibly expired), or None when nobody holds it."""
        row = self._lease_row(self.db, run_id)
        if row["lease_holder"] is None:
            return None
        return Lease(str(row["lease_holder"]), float(row["lease_expires"] or 0.0))

    def _lease_row(self, db: sqlite3.Connection, run_id: str) -> sqlite3.Row:
        try:
            row = db.execute("SELECT lease_holder, lease_expires FROM runs WHERE run_id=?",
                             (run_id,)).fetchone()
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: cannot read the lease of {run_id}: {exc}") from None
        if row is None:
            raise StateError(f"no run {run_id!r} in {self.path}")
        return row  # type: ignore[no-any-return]

    def acquire_lease(self, run_id: str, holder: str, ttl: float, *, steal: bool = False,
                      now: float | None = None) -> str | None:
        """Take or renew the run's lease; returns None on success, else the live holder.

        The rules are ``may_take``'s. A renewal is the same call by the holder: it fails
        (returns the new holder) once another coordinator took an expired lease over.
        """
        at = time.time() if now is None else now
        try:
            with self.tx() as db:
                row = self._lease_row(db, run_id)
                current = None if row["lease_holder"] is None else \
                    Lease(str(row["lease_holder"]), float(row["lease_expires"] or 0.0))
                if current is not None and not may_take(current, holder, at, steal=steal):
                    return current.holder
                db.execute("UPDATE runs SET lease_holder=?, lease_expires=? WHERE run_id=?",
                           (holder, at + ttl, run_id))
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: cannot take the lease of {run_id}: {exc}") from None
        return None

    def release_lease(self, run_id: str, holder: str) -> bool:
        """Give the lease up; only its holder can. Returns True when it was ours."""
        try:
            cur = self.db.execute("UPDATE runs SET lease_holder=NULL, lease_expires=NULL "
                                  "WHERE run_id=? AND lease_holder=?", (run_id, holder))
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: cannot release the lease of {run_id}: "
                             f"{exc}") from None
        return cur.rowcount > 0

    # ------------------------------------------------------------------ instances

    def instances(self, run_id: str) -> list[InstanceRecord]:
        rows = self.db.execute("SELECT * FROM instances WHERE run_id=? ORDER BY instance_id",
                               (run_id,)).fetchall()
        return [self._instance(r) for r in rows]

    def instance(self, run_id: str, instance_id: str) -> InstanceRecord:
        row = self.db.execute("SELECT * FROM instances WHERE run_id=? AND instance_id=?",
                              (run_id, instance_id)).fetchone()
        if row is None:
            raise UsageError(f"run {run_id} has no instance {instance_id!r}")
        return self._instance(row)

    def update_instance(self, run_id: str, instance_id: str, *, changed_only: bool = False,
                        **fields: Any) -> None:
        """Set ``fields`` of one instance (and its ``updated_at``). With ``changed_only`` the
        row is left alone when it holds these values already: a watch tick that hears the
        same state again writes nothing (no WAL page, no commit of a changed row)."""
        allowed = {"node", "state", "pid", "exit_code", "signal", "started_at", "ended_at",
                   "restarts", "reason", "last_line", "log_offset", "results_fetched", "moves",
                   "previous_nodes", "log_base", "allocation", "placement_seq",
                   "results_missing", "failure_class", "telemetry_offset", "telemetry_base",
                   "telemetry_done"}
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"unknown instance fields {bad}")
        if not fields:
            return
        if "allocation" in fields:
            fields["allocation_json"] = encode_allocation(fields.pop("allocation"))
        values = [v.value if isinstance(v, enum.Enum) else
                  json.dumps(list(v)) if isinstance(v, (tuple, list)) else v
                  for v in fields.values()]
        cols = ", ".join(f"{k}=?" for k in fields)
        if changed_only:  # IS compares NULLs as equal: any difference makes the row match
            same = " AND ".join(f"{k} IS ?" for k in fields)
            self.db.execute(f"UPDATE instances SET {cols}, updated_at=? "
                            f"WHERE run_id=? AND instance_id=? AND NOT ({same})",
                            (*values, time.time(), run_id, instance_id, *values))
            return
        self.db.execute(f"UPDATE instances SET {cols}, updated_at=? "
                        "WHERE run_id=? AND instance_id=?",
                        (*values, time.time(), run_id, instance_id))

    def update_instances(self, run_id: str, instance_ids: Sequence[str], **fields: Any) -> None:
        """The same change to many instances in one transaction (a campaign's tasks)."""
        if not instance_ids or not fields:
            return
        with self.tx():
            for instance_id in instance_ids:
                self.update_instance(run_id, instance_id, **fields)

    @staticmethod
    def _instance(row: sqlite3.Row) -> InstanceRecord:
        return InstanceRecord(
            run_id=row["run_id"], instance_id=row["instance_id"], node=row["node"],
            state=InstancePhase(row["state"]), spec=decode_spec(row["spec_json"]),
            pid=row["pid"], exit_code=row["exit_code"], signal=row["signal"],
            started_at=row["started_at"], ended_at=row["ended_at"], restarts=row["restarts"],
            reason=row["reason"], last_line=row["last_line"], log_offset=row["log_offset"],
            results_fetched=bool(row["results_fetched"]), updated_at=row["updated_at"],
            moves=row["moves"], previous_nodes=_previous_nodes(row["previous_nodes"]),
            log_base=row["log_base"], allocation=decode_allocation(row["allocation_json"]),
            placement_seq=row["placement_seq"],
            results_missing=_issues(row["results_missing"]),
            failure_class=FailureClass.parse(row["failure_class"]),
            telemetry_offset=row["telemetry_offset"], telemetry_base=row["telemetry_base"],
            telemetry_done=bool(row["telemetry_done"]))

    def active_instances(self, exclude_run: str | None = None) -> list[InstanceRecord]:
        """Instances of every run that hold resources on their nodes right now."""
        phases = [p.value for p in InstancePhase if p.active]
        rows = self.db.execute(
            f"SELECT * FROM instances WHERE state IN ({','.join('?' * len(phases))}) "
            "AND run_id != ? AND run_id NOT IN (SELECT run_id FROM runs WHERE backend=?) "
            "ORDER BY run_id, instance_id",
            (*phases, exclude_run or "", SLURM)).fetchall()
        return [self._instance(r) for r in rows]

    # ------------------------------------------------------------------ slurm jobs

    def slurm_jobs(self, run_id: str) -> list[SlurmJobRecord]:
        """A Slurm run's jobs in submission (dependency) order."""
        rows = self.db.execute("SELECT * FROM slurm_jobs WHERE run_id=? ORDER BY seq",
                               (run_id,)).fetchall()
        return [SlurmJobRecord(run_id=r["run_id"], key=r["key"], name=r["name"],
                               target=r["target"], seq=r["seq"],
                               instance_ids=tuple(json.loads(r["instance_ids"])),
                               job_id=r["job_id"], submitted_at=r["submitted_at"],
                               how=r["how"]) for r in rows]

    def set_slurm_job_id(self, run_id: str, key: str, job_id: str, how: str) -> None:
        """Record the Slurm job id of one job (what the login host answered)."""
        now = time.time()
        self.db.execute("UPDATE slurm_jobs SET job_id=?, submitted_at=COALESCE(submitted_at, ?),"
                        " how=?, updated_at=? WHERE run_id=? AND key=?",
                        (job_id, now, how, now, run_id, key))

    # ------------------------------------------------------------------ pools

    def pools(self, run_id: str) -> list[PoolRecord]:
        """The run's campaign pools, by campaign then node."""
        rows = self.db.execute("SELECT * FROM pools WHERE run_id=? ORDER BY campaign, node",
                               (run_id,)).fetchall()
        return [PoolRecord(run_id=r["run_id"], campaign=r["campaign"], node=r["node"],
                           name=r["name"], workers=r["workers"], state=r["state"],
                           reason=r["reason"], closed=bool(r["closed"]),
                           abandoned=bool(r["abandoned"]), queued=r["queued"],
                           running=r["running"], updated_at=r["updated_at"]) for r in rows]

    def save_pool(self, run_id: str, campaign: str, node: str, **fields: Any) -> None:
        """Create or update one pool row (``name`` defaults to the campaign's name)."""
        allowed = {"name", "workers", "state", "reason", "closed", "abandoned", "queued",
                   "running"}
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"unknown pool fields {bad}")
        now = time.time()
        with self.tx() as db:
            db.execute("INSERT OR IGNORE INTO pools(run_id, campaign, node, name, updated_at) "
                       "VALUES (?,?,?,?,?)", (run_id, campaign, node, campaign, now))
            if fields:
                cols = ", ".join(f"{k}=?" for k in fields)
                db.execute(f"UPDATE pools SET {cols}, updated_at=? WHERE run_id=? AND "
                           "campaign=? AND node=?",
                           (*[int(v) if isinstance(v, bool) else v for v in fields.values()],
                            now, run_id, campaign, node))

    # ------------------------------------------------------------------ node states

    def node_states(self) -> dict[str, tuple[str, str, float]]:
        """name -> (state, reason, since)."""
        rows = self.db.execute("SELECT * FROM node_states").fetchall()
        return {r["name"]: (r["state"], r["reason"], r["since"]) for r in rows}

    def set_node_state(self, name: str, state: str, reason: str) -> bool:
        """Record a node's state; returns True when it changed (``since`` restarts then)."""
        now = time.time()
        with self.tx() as db:
            row = db.execute("SELECT state, reason FROM node_states WHERE name=?",
                             (name,)).fetchone()
            if row is not None and row["state"] == state:
                db.execute("UPDATE node_states SET reason=?, updated_at=? WHERE name=?",
                           (reason, now, name))
                return False
            db.execute("INSERT OR REPLACE INTO node_states(name, state, reason, since, "
                       "updated_at) VALUES (?,?,?,?,?)", (name, state, reason, now, now))
        return True

    # ------------------------------------------------------------------ node admin

    def node_admin(self, name: str) -> NodeAdmin:
        row = self.db.execute("SELECT * FROM node_admin WHERE name=?", (name,)).fetchone()
        if row is None:
            return NodeAdmin(name)
        return NodeAdmin(name, AdminState(row["admin"]), bool(row["eligible"]), row["reason"],
                         row["deadline"], row["updated_at"])

    def node_admins(self) -> dict[str, NodeAdmin]:
        rows = self.db.execute("SELECT name FROM node_admin").fetchall()
        return {r["name"]: self.node_admin(r["name"]) for r in rows}

    def set_node_admin(self, name: str, admin: AdminState, *, eligible: bool, reason: str,
                       deadline: float | None = None) -> None:
        self.db.execute("INSERT OR REPLACE INTO node_admin(name, admin, eligible, reason, "
                        "deadline, updated_at) VALUES (?,?,?,?,?,?)",
                        (name, admin.value, int(eligible), reason, deadline, time.time()))

    def instances_on(self, node: str) -> list[InstanceRecord]:
        """Active instances of every run on one node."""
        return [r for r in self.active_instances() if r.node == node]

    # ------------------------------------------------------------------ events

    def add_event(self, run_id: str | None, kind: str, subject: str, message: str) -> None:
        self.db.execute("INSERT INTO events(run_id, at, kind, subject, message) VALUES "
                        "(?,?,?,?,?)", (run_id, time.time(), kind, subject, message))

    def recent_events(self, run_id: str, limit: int) -> list[Event]:
        """The last ``limit`` events of a run (and node events), oldest first."""
        rows = self.db.execute("SELECT * FROM events WHERE run_id=? ORDER BY id DESC LIMIT ?",
                               (run_id, limit)).fetchall()
        return [Event(r["id"], r["run_id"], r["at"], r["kind"], r["subject"], r["message"])
                for r in reversed(rows)]

    def events(self, run_id: str | None = None, after_id: int = 0,
               limit: int = 1000) -> list[Event]:
        if run_id is None:
            rows = self.db.execute("SELECT * FROM events WHERE id>? ORDER BY id LIMIT ?",
                                   (after_id, limit)).fetchall()
        else:
            rows = self.db.execute("SELECT * FROM events WHERE run_id=? AND id>? ORDER BY id "
                                   "LIMIT ?", (run_id, after_id, limit)).fetchall()
        return [Event(r["id"], r["run_id"], r["at"], r["kind"], r["subject"], r["message"])
                for r in rows]

    def run_events(self, run_id: str, limit: int) -> tuple[list[Event], int]:
        """The first ``limit`` events of a run, oldest first, with the node events (no run)
        recorded while it lasted; and how many such events there are in all (the report)."""
        first = self.db.execute("SELECT created_at FROM runs WHERE run_id=?",
                                (run_id,)).fetchone()
        last = self.db.execute("SELECT MAX(at) AS at FROM events WHERE run_id=?",
                               (run_id,)).fetchone()
        since = first["created_at"] if first is not None else 0.0
        until = last["at"] if last is not None and last["at"] is not None else since
        where = "WHERE run_id=? OR (run_id IS NULL AND at BETWEEN ? AND ?)"
        args = (run_id, since, until)
        total = self.db.execute(f"SELECT COUNT(*) AS n FROM events {where}", args).fetchone()
        rows = self.db.execute(f"SELECT * FROM events {where} ORDER BY id LIMIT ?",
                               (*args, limit)).fetchall()
        return ([Event(r["id"], r["run_id"], r["at"], r["kind"], r["subject"], r["message"])
                 for r in rows], int(total["n"]))
