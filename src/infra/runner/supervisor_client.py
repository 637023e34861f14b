"""Coordinator side of the node supervisor: install it, start/status/stop instances, read logs.

Everything goes through the ``Transport`` ABC, so the same code drives a node over asyncssh
or this machine through the local transport. The node-side scripts
(``infra/remote/*.py``: the supervisor, the pool, ...) are copied once to
``<remote_work_dir>/.infra/bin-<sha256[:12]>/``: the name changes with their content, so an
upgraded coordinator never runs a stale copy, and two versions can coexist.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import functools
import hashlib
import json
import re
import shlex
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.campaign.model import CpuBinding
from infra.config.model import ExperimentSpec, FailoverSection, NodeConfig
from infra.errors import (
    CapacityRefusedError,
    CommandFailedError,
    InfraError,
    NodeDocumentError,
    StaleCopyError,
    StateError,
    UsageError,
)
from infra.placement.allocation import Allocation
from infra.quoting import program_command, shell_path
from infra.state import FailureClass
from infra.state.codec import decode_allocation, spec_from_document
from infra.transport.base import CommandResult, Transport
from infra.transport.marker import extract_json

REMOTE_DIR = Path(__file__).resolve().parent.parent / "remote"
"""The node-side scripts (``supervisor.py``, ``pool.py``, ...), as shipped in this package."""

SUPERVISOR_SOURCE = REMOTE_DIR / "supervisor.py"
"""The node-side supervisor script, as shipped in this package."""

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
"""Run and instance ids become path components on the node; the script checks the same rule."""

START_BATCH_SECONDS_EACH = 2.0  # a batched start's timeout grows by this per request
TELEMETRY_MAX_BYTES = 256 << 10
"""Telemetry bytes per instance and status call (about four minutes of 1 s samples)."""
TELEMETRY_TOTAL_BYTES = 4 << 20
"""Telemetry bytes per status call: well under the transport's output cap, base64 included."""

_ROOT_TAG = "@@INFRA-ROOT:"
_SCRIPT_TAG = "@@INFRA-SCRIPT:"


def remote_sources() -> tuple[Path, ...]:
    """Every node-side script installed together (``remote/*.py`` but the package marker)."""
    return tuple(sorted(p for p in REMOTE_DIR.glob("*.py") if p.name != "__init__.py"))


@functools.lru_cache(maxsize=1)
def supervisor_digest() -> str:
    """First 12 hex digits of the sha256 over all remote scripts: their version on the node."""
    digest = hashlib.sha256()
    for path in remote_sources():
        data = path.read_bytes()
        digest.update(f"{path.name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()[:12]


def install_dirname() -> str:
    """Name of the versioned directory holding the scripts under the node's ``.infra``."""
    return f"bin-{supervisor_digest()}"


def supervisor_filename() -> str:
    """Path of the installed supervisor relative to the node's ``.infra`` directory."""
    return f"{install_dirname()}/supervisor.py"


def check_id(value: str, what: str) -> str:
    """Refuse an id that is not a safe single path component (before it reaches a node)."""
    if not ID_PATTERN.match(value) or ".." in value:
        raise UsageError(f"invalid {what} {value!r}: use letters, digits and ._@- "
                         "(at most 128 characters, no '..')")
    return value


class InstanceStatus(str, enum.Enum):
    """Where an instance stands on its node, as the supervisor (and its live checks) see it."""

    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    EXITED = "exited"
    FAILED = "failed"
    STOPPED = "stopped"
    LOST = "lost"

    @property
    def is_final(self) -> bool:
        """True when nothing of the instance runs any more and nothing will restart it."""
        return self in (InstanceStatus.EXITED, InstanceStatus.FAILED, InstanceStatus.STOPPED,
                        InstanceStatus.LOST)


@dataclass(frozen=True)
class AttemptRecord:
    """One run of the command: its pid, times and how it ended (reason is readable text)."""

    attempt: int
    pid: int | None
    started_at: float | None
    ended_at: float | None
    exit_code: int | None
    signal: str | None
    reason: str | None

    @classmethod
    def from_json(cls, doc: Any, *, node: str = "",
                  where: str = "attempts[]") -> AttemptRecord:
        """Build from one entry of the supervisor's ``attempts`` list (types checked)."""
        f = _Fields(node, where, _mapping(node, where, doc))
        return cls(attempt=f.count("attempt"), pid=f.opt_int("pid"),
                   started_at=f.opt_float("started_at"), ended_at=f.opt_float("ended_at"),
                   exit_code=f.opt_int("exit_code"), signal=f.opt_text("signal"),
                   reason=f.opt_text("reason"))


@dataclass(frozen=True)
class TelemetryChunk:
    """Complete lines of an instance's node-side telemetry file from an offset (never a
    partial line); ``eof``: no complete line is left after ``offset`` (the new offset)."""

    data: bytes
    offset: int
    size: int
    eof: bool

    @classmethod
    def from_json(cls, node: str, doc: Any, *, where: str = "telemetry") -> TelemetryChunk:
        """Build from the ``telemetry`` object of a status answer (types checked)."""
        f = _Fields(node, where, _mapping(node, where, doc))
        return cls(data=_b64(node, f"{where}.data_b64", f.text("data_b64")),
                   offset=f.count("offset"), size=f.count("size"), eof=f.flag("eof"))


@dataclass(frozen=True)
class InstanceState:
    """One instance on one node: the supervisor's record plus live process checks.

    ``pid``/``started_at``/``exit_code``/``signal`` describe the latest attempt; ``alive``
    means that pid still runs with the start time we recorded (a reused pid is not ours);
    ``detached`` means the process runs but its supervisor is gone. ``already`` is set on
    the result of a start that found the instance there before. ``disk_full`` is the
    supervisor's "no space left on device (PATH: N bytes free)" while the disk the instance
    writes to is full (None otherwise).
    """

    node: str
    run_id: str
    instance_id: str
    status: InstanceStatus
    pid: int | None = None
    pid_start_ticks: int | None = None
    pgid: int | None = None
    supervisor_pid: int | None = None
    alive: bool = False
    supervisor_alive: bool = False
    detached: bool = False
    created_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    exit_code: int | None = None
    signal: str | None = None
    attempts: tuple[AttemptRecord, ...] = ()
    restarts: int = 0
    stop_requested: bool = False
    final_reason: str | None = None
    log_size: int = 0
    last_line: str = ""
    log_path: str | None = None
    results_dir: str | None = None
    cwd: str | None = None
    command: str | None = None
    already: bool = False
    placement: str = "p0"     # which placement of the instance this copy is
    fenced: bool = False      # stopped by its own supervisor: the coordinator went silent
    disk_full: str | None = None
    failure_class: FailureClass | None = None  # how the latest attempt failed, if it did
    telemetry: TelemetryChunk | None = None  # when asked for: its telemetry from an offset

    @property
    def broken_command(self) -> bool:
        """The latest attempt failed as a broken command (exit 126/127 or a quick exit)."""
        return self.failure_class is FailureClass.BROKEN_COMMAND

    @property
    def is_final(self) -> bool:
        """True once the instance is over (exited, failed, stopped or lost)."""
        return self.status.is_final

    @classmethod
    def from_json(cls, node: str, doc: Any, *, where: str = "instance") -> InstanceState:
        """Build from one instance document printed by the node-side script.

        Every field's type is checked: a wrong one raises ``NodeDocumentError`` naming the
        node and the field (``instances[0].pid``), never a bare TypeError/ValueError.
        """
        f = _Fields(node, where, _mapping(node, where, doc))
        state = f.opt_text("state") or "lost"
        try:
            status = InstanceStatus(state)
        except ValueError:
            status = InstanceStatus.LOST
        attempts = f.items("attempts")
        tele = f.doc.get("telemetry")
        return cls(
            node=node, run_id=f.text("run_id"), instance_id=f.text("instance_id"),
            status=status, pid=f.opt_int("pid"), pid_start_ticks=f.opt_int("pid_start_ticks"),
            pgid=f.opt_int("pgid"), supervisor_pid=f.opt_int("supervisor_pid"),
            alive=f.flag("alive"), supervisor_alive=f.flag("supervisor_alive"),
            detached=f.flag("detached"), created_at=f.opt_float("created_at"),
            started_at=f.opt_float("started_at"), ended_at=f.opt_float("ended_at"),
            exit_code=f.opt_int("exit_code"), signal=f.opt_text("signal"),
            attempts=tuple(AttemptRecord.from_json(a, node=node, where=f"{where}.attempts[{i}]")
                           for i, a in enumerate(attempts)),
            restarts=f.count("restarts"), stop_requested=f.flag("stop_requested"),
            final_reason=f.opt_text("final_reason"), log_size=f.count("log_size"),
            last_line=f.text("last_line"), log_path=f.opt_text("log_path"),
            results_dir=f.opt_text("results_dir"), cwd=f.opt_text("cwd"),
            command=f.opt_text("command"), already=f.flag("already"),
            placement=f.text("placement") or "p0", fenced=f.flag("fenced"),
            disk_full=f.opt_text("disk_full") or None,
            failure_class=FailureClass.parse(f.opt_text("failure_class")),
            telemetry=None if tele is None else
            TelemetryChunk.from_json(node, tele, where=f"{where}.telemetry"),
        )


@dataclass(frozen=True)
class RestartPolicy:
    """Node-side restart policy of one instance (rules in ``infra/remote/supervisor.py``).

    ``max_retries`` counts restarts: N allows at most N+1 attempts; None keeps the built-in
    limits (2 for a broken command and for SIGSEGV/SIGILL/SIGBUS/SIGFPE, 3 for everything
    else). A non-zero exit within ``quick_failure_seconds`` of an attempt's start (None: the
    node's default, 3 s; 0: off) counts as a broken command, like exit 126/127.
    """

    auto_restart: bool = True
    max_retries: int | None = None
    retry_delay_seconds: float = 5.0
    always: bool = False  # service/system jobs: a clean exit is restarted too
    quick_failure_seconds: float | None = None

    @classmethod
    def from_config(cls, failover: FailoverSection, *, auto_restart: bool | None = None,
                    max_retries: int | None = None, always: bool = False) -> RestartPolicy:
        """The cluster's failover section, with an experiment spec's overrides applied."""
        return cls(
            auto_restart=failover.auto_restart if auto_restart is None else auto_restart,
            max_retries=failover.max_retries if max_retries is None else max_retries,
            retry_delay_seconds=failover.retry_delay_seconds,
            always=always,
        )

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"auto_restart": self.auto_restart,
                               "max_retries": self.max_retries,
                               "retry_delay_seconds": self.retry_delay_seconds,
                               "always": self.always}
        if self.quick_failure_seconds is not None:
            doc["quick_failure_seconds"] = self.quick_failure_seconds
        return doc


@dataclass(frozen=True)
class StartRequest:
    """Everything the supervisor needs to start one instance.

    ``cwd`` and ``results_dir`` are node paths (``~`` allowed; a relative ``results_dir`` is
    under ``cwd``); ``results_dir`` defaults to the instance's own directory on the node.
    ``allocation`` is passed to the program as JSON in ``INFRA_ALLOCATION``.
    """

    run_id: str
    instance_id: str
    command: str
    cwd: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    allocation: Mapping[str, Any] = field(default_factory=dict, hash=False)
    gpu_ids: tuple[str, ...] = ()
    results_dir: str | None = None
    restart: RestartPolicy = RestartPolicy()
    placement: str = "p0"
    claim: Mapping[str, Any] | None = field(default=None, hash=False)
    claims_dir: str | None = None
    fence: bool = False
    telemetry_interval: float = 0.0  # seconds between node-side samples; 0: no telemetry

    def to_json(self, node: str) -> dict[str, Any]:
        """The JSON request the script reads on stdin."""
        doc = {
            "run_id": self.run_id, "instance_id": self.instance_id, "node": node,
            "command": self.command, "cwd": self.cwd, "env": dict(self.env),
            "allocation": dict(self.allocation), "gpu_ids": [str(g) for g in self.gpu_ids],
            "results_dir": self.results_dir, "restart": self.restart.to_json(),
            "placement": self.placement, "fence": self.fence,
        }
        if self.claim is not None:
            doc["claim"] = dict(self.claim)
        if self.claims_dir:
            doc["claims_dir"] = self.claims_dir
        if self.telemetry_interval > 0:
            doc["telemetry"] = {"interval": self.telemetry_interval}
        return doc


@dataclass(frozen=True)
class Claim:
    """One live instance on a node as its claim file records it (from any coordinator)."""

    node: str
    run_id: str
    instance_id: str
    placement: str
    coordinator: str
    spec: ExperimentSpec | None
    allocation: Allocation | None

    @classmethod
    def from_json(cls, node: str, doc: Mapping[str, Any]) -> Claim:
        spec_doc = doc.get("spec")
        spec = None
        if isinstance(spec_doc, dict):
            try:
                spec = spec_from_document(spec_doc)
            except StateError:
                spec = None
        alloc_doc = doc.get("allocation")
        return cls(node=node, run_id=str(doc.get("run_id", "")),
                   instance_id=str(doc.get("instance_id", "")),
                   placement=str(doc.get("placement") or "p0"),
                   coordinator=str(doc.get("coordinator") or ""), spec=spec,
                   allocation=decode_allocation(json.dumps(alloc_doc))
                   if isinstance(alloc_doc, dict) else None)


class PruneState(str, enum.Enum):
    """What a node did with one run's directory."""

    PRUNED = "pruned"
    WOULD_PRUNE = "would_prune"   # dry run: it would go
    ACTIVE = "active"             # an instance is not over there: left alone
    ABSENT = "absent"             # nothing of the run on the node
    ERROR = "error"


@dataclass(frozen=True)
class PrunedRun:
    """One run in a node's ``prune`` answer: its state, size and any active instances."""

    run_id: str
    state: PruneState
    bytes: int
    active: tuple[str, ...] = ()
    error: str | None = None

    @classmethod
    def from_json(cls, node: str, doc: Any, *, where: str = "runs[]") -> PrunedRun:
        f = _Fields(node, where, _mapping(node, where, doc))
        raw = f.text("state")
        try:
            state = PruneState(raw)
        except ValueError:
            raise f._bad("state", "a prune state", raw) from None
        return cls(run_id=f.text("run_id"), state=state, bytes=f.count("bytes"),
                   active=tuple(str(a) for a in f.items("active")),
                   error=f.opt_text("error"))


class PoolPhase(str, enum.Enum):
    """Where a node-side pool stands."""

    IDLE = "idle"
    PREPARING = "preparing"          # setup runs
    EXECUTING = "executing"
    CLEANUP = "cleanup"
    DONE = "done"
    SETUP_FAILED = "setup_failed"    # setup failed, or exclusive cores could not be bound
    CANCELLED = "cancelled"
    FENCED = "fenced"                # the pool's fence expired: no new task starts

    @property
    def is_final(self) -> bool:
        """True when the pool will never start another task."""
        return self in (PoolPhase.DONE, PoolPhase.SETUP_FAILED, PoolPhase.CANCELLED)


class HookState(str, enum.Enum):
    """What became of a pool's setup or cleanup command."""

    NONE = "none"
    RUNNING = "running"
    OK = "ok"
    FAILED = "failed"
    INTERRUPTED = "interrupted"      # the pool daemon died while cleanup ran: not run again


@dataclass(frozen=True)
class HookRecord:
    """One hook's state, exit code, reason (exit code and last output line) and time."""

    state: HookState = HookState.NONE
    exit_code: int | None = None
    reason: str | None = None
    at: float | None = None

    @classmethod
    def from_json(cls, node: str, doc: Any, *, where: str) -> HookRecord:
        f = _Fields(node, where, _mapping(node, where, doc))
        raw = f.text("state") or "none"
        try:
            state = HookState(raw)
        except ValueError:
            raise f._bad("state", "a hook state", raw) from None
        return cls(state=state, exit_code=f.opt_int("exit_code"), reason=f.opt_text("reason"),
                   at=f.opt_float("at"))


@dataclass(frozen=True)
class PoolSuite:
    """A pool's suite: hooks (run once per node), their cwd/env, and the CPU binding."""

    suite_id: str
    suite_name: str
    setup: str | None = None
    cleanup: str | None = None
    cwd: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    cpu_binding: CpuBinding = CpuBinding.ROUND_ROBIN
    cores: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"suite_id": self.suite_id, "suite_name": self.suite_name, "setup": self.setup,
                "cleanup": self.cleanup, "cwd": self.cwd, "env": dict(self.env),
                "cpu_binding": self.cpu_binding.value, "cores": list(self.cores)}


@dataclass(frozen=True)
class PoolSyncRequest:
    """One ``pool-sync``: tasks to add (start requests) or drop, close/cancel, the fence.

    Applied atomically per task on the node; adding a task the pool already holds (or that
    already has an instance directory there) is ignored, so a retried call is harmless.
    ``idle_exit_seconds`` (None: the node's default, 600 s) is how long an idle, unclosed
    pool's daemon lingers; ``grace`` is SIGTERM -> SIGKILL for tasks stopped by ``cancel``.
    """

    run_id: str
    pool: str
    workers: int
    suite: PoolSuite | None = None
    add: tuple[StartRequest, ...] = ()
    drop: tuple[str, ...] = ()
    close: bool = False
    cancel: bool = False
    fence_seconds: float | None = None
    fence_clear: bool = False
    holder: str = ""
    claims_dir: str | None = None
    idle_exit_seconds: float | None = None
    grace: float | None = None

    def to_json(self, node: str) -> dict[str, Any]:
        """The JSON document the script reads on stdin."""
        doc: dict[str, Any] = {
            "run_id": self.run_id, "pool": self.pool, "node": node,
            "suite": self.suite.to_json() if self.suite is not None else None,
            "workers": self.workers, "add": [r.to_json(node) for r in self.add],
            "drop": list(self.drop), "close": self.close, "cancel": self.cancel,
            "fence_seconds": self.fence_seconds, "fence_clear": self.fence_clear,
            "holder": self.holder, "claims_dir": self.claims_dir}
        if self.idle_exit_seconds is not None:
            doc["idle_exit_seconds"] = self.idle_exit_seconds
        if self.grace is not None:
            doc["grace"] = self.grace
        return doc


@dataclass(frozen=True)
class PoolState:
    """A node-side pool as its node reports it (pool-sync answer, or status ``pools``)."""

    node: str
    name: str
    phase: PoolPhase
    daemon_alive: bool
    workers: int
    worker_cores: tuple[tuple[int, ...], ...]
    queued: tuple[str, ...]
    running: tuple[str, ...]
    dropped: tuple[str, ...]
    not_dropped: tuple[str, ...]
    setup: HookRecord
    cleanup: HookRecord
    waiting: str | None = None
    error: str | None = None
    done: int = 0
    closed: bool = False
    cancelled: bool = False
    ignored: tuple[str, ...] = ()  # adds refused because the pool is over (never started)

    @classmethod
    def from_json(cls, node: str, doc: Any, *, where: str = "pool") -> PoolState:
        """Build from one pool document; a wrong type raises ``NodeDocumentError``."""
        f = _Fields(node, where, _mapping(node, where, doc))
        raw = f.text("state")
        try:
            phase = PoolPhase(raw)
        except ValueError:
            raise f._bad("state", "a pool state", raw) from None
        cores = []
        for i, entry in enumerate(f.items("worker_cores")):
            if not isinstance(entry, list) or not all(
                    isinstance(c, int) and not isinstance(c, bool) for c in entry):
                raise f._bad(f"worker_cores[{i}]", "a list of integers", entry)
            cores.append(tuple(entry))
        return cls(node=node, name=f.text("name"), phase=phase,
                   daemon_alive=f.flag("daemon_alive"), workers=f.count("workers"),
                   worker_cores=tuple(cores), queued=f.names("queued"),
                   running=f.names("running"), dropped=f.names("dropped"),
                   not_dropped=f.names("not_dropped"),
                   setup=HookRecord.from_json(node, f.doc.get("setup") or {},
                                              where=f"{where}.setup"),
                   cleanup=HookRecord.from_json(node, f.doc.get("cleanup") or {},
                                                where=f"{where}.cleanup"),
                   waiting=f.opt_text("waiting"), error=f.opt_text("error"),
                   done=f.count("done"), closed=f.flag("closed"),
                   cancelled=f.flag("cancelled"), ignored=f.names("ignored"))


@dataclass(frozen=True)
class LogChunk:
    """Bytes of an instance's log from an offset; ``ended and eof`` means nothing more comes."""

    data: bytes
    offset: int
    size: int
    eof: bool
    ended: bool


class SupervisorClient:
    """Drives the supervisor script on one node; one client per transport (connection)."""

    def __init__(self, transport: Transport, node: NodeConfig, *,
                 command_timeout: float = 30.0) -> None:
        self.transport = transport
        self.node = node
        self.command_timeout = command_timeout
        self._script: str | None = None
        self._install_lock = asyncio.Lock()

    @property
    def root(self) -> str:
        """The supervisor's directory on the node, as configured (may start with ``~``)."""
        return self.node.remote_work_dir.rstrip("/") + "/.infra"

    async def ensure_installed(self) -> str:
        """Make sure this version of the script is on the node; return its absolute path.

        The scripts live in ``.infra/bin-<digest>/``. One ``test -f`` per client
        (connection); the upload goes to a temporary directory that is renamed into place
        whole, so a half-copied set of scripts is never run (a concurrent installer's rename
        wins and ours is removed).
        """
        if self._script is not None:
            return self._script
        async with self._install_lock:
            if self._script is not None:
                return self._script
            name = supervisor_filename()
            probe = (f"mkdir -p {shell_path(self.root)} && cd {shell_path(self.root)} && "
                     f"printf '%s%s\\n' {_ROOT_TAG} \"$PWD\" && "
                     f"if test -f {shlex.quote(name)}; then echo {_SCRIPT_TAG}present; "
                     f"else echo {_SCRIPT_TAG}missing; fi")
            result = await self.transport.run(probe, timeout=self.command_timeout)
            root = _tagged_line(result.stdout, _ROOT_TAG)
            present = _tagged_line(result.stdout, _SCRIPT_TAG)
            if not result.ok or root is None or present is None:
                raise CommandFailedError(
                    self.node.name, f"cannot prepare {self.root}: {_tail(result)}",
                    exit_status=result.exit_status, stderr=result.stderr)
            script = f"{root}/{name}"
            if present != "present":
                await self._upload(root)
            self._script = script
            return script

    async def _upload(self, root: str) -> None:
        """Copy every remote script into a temporary directory, then rename it into place."""
        final = f"{root}/{install_dirname()}"
        tmp = f"{root}/.{install_dirname()}.{uuid.uuid4().hex}.tmp"
        await self.transport.run(f"mkdir -p {shlex.quote(tmp)}", timeout=self.command_timeout,
                                 check=True)
        for source in remote_sources():
            await self.transport.put(str(source), f"{tmp}/{source.name}",
                                     timeout=self.command_timeout)
        # byte-compiled here, once: the scripts run with -B, so a node never writes a .pyc
        # itself (one cut short by a full disk would break every later call)
        await self.transport.run(
            program_command(self.node.python_path, [
                "-S", "-E", "-c", "import compileall, sys; "
                "sys.exit(0 if compileall.compile_dir(sys.argv[1], quiet=1) else 1)", tmp]),
            timeout=self.command_timeout, check=True)
        q_tmp, q_final = shlex.quote(tmp), shlex.quote(final)
        await self.transport.run(
            f"if test -f {q_final}/supervisor.py; then rm -rf {q_tmp}; "
            f"else mv -T {q_tmp} {q_final} 2>/dev/null || "
            f"{{ rm -rf {q_tmp}; test -f {q_final}/supervisor.py; }}; fi",
            timeout=self.command_timeout, check=True)

    async def start(self, request: StartRequest) -> InstanceState:
        """Start one instance detached; idempotent (a repeat returns it with ``already``)."""
        check_id(request.run_id, "run id")
        check_id(request.instance_id, "instance id")
        doc = await self._call(["start", "--root", self.root],
                               input=_json(request.to_json(self.node.name)))
        return InstanceState.from_json(self.node.name, doc.get("instance"))

    async def start_batch(self, requests: Sequence[StartRequest],
                          ) -> list[InstanceState | InfraError]:
        """Start many instances in one call (the node lock taken once, each claim judged
        against the live ones and those accepted before it): per request, in order, its
        state or its own error (``CapacityRefusedError``, ``StaleCopyError``, ...)."""
        if not requests:
            return []
        for request in requests:
            check_id(request.run_id, "run id")
            check_id(request.instance_id, "instance id")
        stdin = json.dumps([r.to_json(self.node.name) for r in requests], sort_keys=True)
        timeout = self.command_timeout + START_BATCH_SECONDS_EACH * len(requests)
        doc = await self._call(["start-batch", "--root", self.root], input=stdin,
                               timeout=timeout)
        answers = _Fields(self.node.name, "answer", doc).items("results", required=True)
        if len(answers) != len(requests):
            raise NodeDocumentError(self.node.name, "supervisor", "results",
                                    f"{len(answers)} answers for {len(requests)} requests")
        out: list[InstanceState | InfraError] = []
        for i, answer in enumerate(answers):
            failure = _answer_error(self.node.name, "start", answer)
            out.append(failure if failure is not None else InstanceState.from_json(
                self.node.name, answer.get("instance"), where=f"results[{i}].instance"))
        return out

    async def status(self, run_id: str | None = None, *, fence_seconds: float | None = None,
                     fence_clear: bool = False, holder: str = "",
                     only: Sequence[str] | None = None) -> list[InstanceState]:
        """Every instance on the node (or of one run), with live checks, in one call.

        With ``fence_seconds`` the run's fenced instances get their fence renewed for that
        long (the watching coordinator's heartbeat); ``fence_clear`` clears them (detach).
        ``only`` (with a run) limits the answer to those instances: a campaign's thousands
        of ended tasks need not be described again on every sweep.
        """
        if run_id is None:
            return self._instances(await self._call(["status", "--root", self.root]))
        return (await self.status_with_pools(run_id, fence_seconds=fence_seconds,
                                             fence_clear=fence_clear, holder=holder,
                                             only=only))[0]

    async def status_with_pools(self, run_id: str, *, fence_seconds: float | None = None,
                                fence_clear: bool = False, holder: str = "",
                                only: Sequence[str] | None = None,
                                telemetry: Mapping[str, int] | None = None,
                                telemetry_max: int = TELEMETRY_MAX_BYTES,
                                telemetry_total: int = TELEMETRY_TOTAL_BYTES,
                                ) -> tuple[list[InstanceState], list[PoolState]]:
        """One status call for a run: its instances (``only`` those, when given) and its
        node-side pools (fences as in ``status``; a pool's own fence is pool-sync's alone).

        ``telemetry`` (instance -> offset in its node-side telemetry file) asks for those
        instances' telemetry lines from there: each is described (even if not in ``only``)
        with ``InstanceState.telemetry`` set, at most ``telemetry_max`` bytes each and
        ``telemetry_total`` in all (the rest comes on the next call)."""
        args = ["status", "--root", self.root, "--run", check_id(run_id, "run id")]
        if fence_clear:
            args += ["--fence-clear", "--fence-holder", holder]
        elif fence_seconds is not None:
            args += ["--fence-seconds", repr(float(fence_seconds)), "--fence-holder", holder]
        stdin = None
        if only is not None or telemetry:
            args.append("--stdin-doc")
            stdin = _json({
                "only": None if only is None else [check_id(i, "instance id") for i in only],
                "telemetry": {check_id(i, "instance id"): max(0, int(o))
                              for i, o in (telemetry or {}).items()},
                "telemetry_max": telemetry_max, "telemetry_total": telemetry_total})
        doc = await self._call(args, input=stdin)
        f = _Fields(self.node.name, "answer", doc)
        pools = [PoolState.from_json(self.node.name, d, where=f"pools[{i}]")
                 for i, d in enumerate(f.items("pools"))]
        return self._instances(doc), pools

    async def pools(self, run_id: str) -> list[PoolState]:
        """The run's node-side pools (the same status call, without fence changes)."""
        return (await self.status_with_pools(run_id))[1]

    async def pool_sync(self, request: PoolSyncRequest) -> PoolState:
        """Hand tasks to (or drop, close, cancel, fence) the run's pool on this node."""
        check_id(request.run_id, "run id")
        check_id(request.pool, "pool name")
        for add in request.add:
            check_id(add.instance_id, "instance id")
            if add.run_id != request.run_id:
                raise UsageError(f"task {add.instance_id} belongs to run {add.run_id}, "
                                 f"not to the pool's run {request.run_id}")
        for task in request.drop:
            check_id(task, "instance id")
        doc = await self._call(["pool-sync", "--root", self.root],
                               input=_json(request.to_json(self.node.name)))
        return PoolState.from_json(self.node.name, doc.get("pool"))

    async def claims(self) -> list[Claim]:
        """The node's live claims: every coordinator's work that holds capacity there."""
        args = ["claims"]
        if self.node.claims_dir:
            args += ["--claims-dir", self.node.claims_dir]
        doc = await self._call(args)
        return [Claim.from_json(self.node.name, d) for d in doc["claims"]
                if isinstance(d, dict)]

    async def stop(self, run_id: str, instance_id: str | None = None,
                   grace: float = 10.0) -> list[InstanceState]:
        """SIGTERM the instance's process group, SIGKILL after ``grace``; the final states."""
        args = ["stop", "--root", self.root, "--run", check_id(run_id, "run id"),
                "--grace", repr(float(grace))]
        if instance_id is not None:
            args += ["--instance", check_id(instance_id, "instance id")]
        return self._instances(await self._call(args, timeout=grace + self.command_timeout))

    async def prune(self, run_ids: Sequence[str], *, dry_run: bool = False,
                    timeout: float | None = None) -> list[PrunedRun]:
        """Remove (or with ``dry_run`` only size) the runs' directories on the node; a run
        with an instance still active there is refused by the node and reported ``active``."""
        args = ["prune", "--root", self.root]
        for run_id in run_ids:
            args += ["--run", check_id(run_id, "run id")]
        if dry_run:
            args.append("--dry-run")
        doc = await self._call(args, timeout=timeout)
        f = _Fields(self.node.name, "answer", doc)
        return [PrunedRun.from_json(self.node.name, d, where=f"runs[{i}]")
                for i, d in enumerate(f.items("runs", required=True))]

    async def follow(self, run_id: str, instance_id: str, offset: int = 0,
                     ) -> AsyncIterator[bytes]:
        """Raw log bytes from ``offset`` as they are written; ends when the instance ended.

        Count the bytes to resume after a lost connection from the right offset. An unknown
        instance yields nothing.
        """
        args = ["follow", "--root", self.root, "--run", check_id(run_id, "run id"),
                "--instance", check_id(instance_id, "instance id"), "--offset", str(offset)]
        command = await self._command(args)
        async for chunk in self.transport.stream(command):
            yield chunk

    async def read(self, run_id: str, instance_id: str, offset: int = 0,
                   max_bytes: int = 1 << 20) -> LogChunk:
        """At most ``max_bytes`` of the log from ``offset`` (non-blocking)."""
        args = ["read", "--root", self.root, "--run", check_id(run_id, "run id"),
                "--instance", check_id(instance_id, "instance id"), "--offset", str(offset),
                "--max-bytes", str(max_bytes)]
        f = _Fields(self.node.name, "read", await self._call(args))
        data = _b64(self.node.name, "read.data_b64", f.text("data_b64"))
        return LogChunk(data=data, offset=f.count("offset"), size=f.count("size"),
                        eof=f.flag("eof"), ended=f.flag("ended"))

    async def harvest(self, request: Mapping[str, Any], *,
                      timeout: float | None = None) -> list[Mapping[str, Any]]:
        """One ``harvest`` call (see ``infra/remote/harvest.py``): per item, its state, a log
        chunk and its results listings; each entry a mapping (decoded by the caller)."""
        check_id(str(request.get("run_id")), "run id")
        for item in request.get("items") or ():
            check_id(str(item.get("instance")), "instance id")
        doc = await self._call(["harvest", "--root", self.root], input=_json(request),
                               timeout=timeout)
        f = _Fields(self.node.name, "harvest", doc)
        return [_mapping(self.node.name, f"harvest.items[{i}]", d)
                for i, d in enumerate(f.items("items", required=True))]

    def _instances(self, doc: Mapping[str, Any]) -> list[InstanceState]:
        """The ``instances`` list of a status/stop answer, each entry type-checked."""
        f = _Fields(self.node.name, "answer", doc)
        return [InstanceState.from_json(self.node.name, d, where=f"instances[{i}]")
                for i, d in enumerate(f.items("instances", required=True))]

    async def _command(self, args: Sequence[str]) -> str:
        # -S -E: the script is stdlib only, so skip site-packages (.pth files can cost 100+ ms
        # per call) and ignore PYTHON* variables; the experiment still gets the full env.
        # -B: read the .pyc files compiled at install, never write one (see ``_upload``).
        script = await self.ensure_installed()
        return program_command(self.node.python_path, ["-S", "-E", "-B", script, *args])

    async def _call(self, args: Sequence[str], *, input: str | None = None,
                    timeout: float | None = None) -> dict[str, Any]:
        """Run one subcommand and return its JSON; reinstall once if the script vanished."""
        for retry in (False, True):
            command = await self._command(args)
            result = await self.transport.run(command, input=input,
                                              timeout=timeout or self.command_timeout)
            if not retry and result.exit_status == 2 and "can't open file" in result.stderr:
                self._script = None  # deleted behind our back (node wiped): install again
                continue
            break
        try:
            doc = extract_json(result.stdout)
        except ValueError:
            raise CommandFailedError(
                self.node.name, f"supervisor {args[0]} printed no result: {_tail(result)}",
                exit_status=result.exit_status, stderr=result.stderr) from None
        failure = _answer_error(self.node.name, args[0], doc, result.exit_status, result.stderr)
        if failure is not None or not isinstance(doc, dict):
            raise failure or CommandFailedError(self.node.name, f"supervisor {args[0]}: {doc}")
        return doc


def _answer_error(node: str, what: str, doc: Any, exit_status: int | None = None,
                  stderr: str = "") -> CommandFailedError | None:
    """The error a supervisor answer stands for (refused, stale copy, failed), or None."""
    if isinstance(doc, dict) and doc.get("ok"):
        return None
    if isinstance(doc, dict) and doc.get("refused"):
        return CapacityRefusedError(node, str(doc.get("error")), exit_status=exit_status)
    if isinstance(doc, dict) and doc.get("stale"):
        return StaleCopyError(node, str(doc.get("error")), exit_status=exit_status)
    error = doc.get("error") if isinstance(doc, dict) else doc
    return CommandFailedError(node, f"supervisor {what}: {error}", exit_status=exit_status,
                              stderr=stderr)


def _b64(node: str, where: str, encoded: str) -> bytes:
    """Decode base64 text from a node's answer (``NodeDocumentError`` naming it if bad)."""
    try:
        return base64.b64decode(encoded, validate=True)
    except ValueError:
        raise NodeDocumentError(node, "supervisor", where, "not base64") from None


def _json(document: Mapping[str, Any]) -> str:
    return json.dumps(document, sort_keys=True)


def _tagged_line(text: str, tag: str) -> str | None:
    found = None
    for line in text.splitlines():
        if line.startswith(tag):
            found = line[len(tag):]
    return found


def _tail(result: CommandResult) -> str:
    text = (result.stderr.strip() or result.stdout.strip())[-500:]
    status = result.exit_status if result.exit_status is not None else result.signal
    return f"exit {status}: {text}" if text else f"exit {status}"


def _shown(value: Any) -> str:
    """A wrong value as an error message shows it: short, containers by type."""
    if isinstance(value, (dict, list)):
        return f"a {'mapping' if isinstance(value, dict) else 'list'}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _mapping(node: str, where: str, doc: Any) -> Mapping[str, Any]:
    if not isinstance(doc, Mapping):
        raise NodeDocumentError(node, "supervisor", where,
                                f"expected a mapping, got {_shown(doc)}")
    return doc


@dataclass(frozen=True)
class _Fields:
    """Reads a node document's fields with their types checked; errors name the field."""

    node: str
    where: str
    doc: Mapping[str, Any]

    def _bad(self, key: str, expected: str, value: Any) -> NodeDocumentError:
        return NodeDocumentError(self.node, "supervisor", f"{self.where}.{key}",
                                 f"expected {expected}, got {_shown(value)}")

    def opt_int(self, key: str) -> int | None:
        value = self.doc.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, "an integer", value)
        return value

    def count(self, key: str) -> int:
        return self.opt_int(key) or 0

    def opt_float(self, key: str) -> float | None:
        value = self.doc.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._bad(key, "a number", value)
        return float(value)

    def opt_text(self, key: str) -> str | None:
        value = self.doc.get(key)
        if value is None or isinstance(value, str):
            return value
        raise self._bad(key, "a string", value)

    def text(self, key: str) -> str:
        return self.opt_text(key) or ""

    def flag(self, key: str) -> bool:
        value = self.doc.get(key)
        if value is None or isinstance(value, bool):
            return bool(value)
        raise self._bad(key, "true or false", value)

    def names(self, key: str) -> tuple[str, ...]:
        """A list of strings (ids)."""
        values = self.items(key)
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise self._bad(f"{key}[{i}]", "a string", value)
        return tuple(values)

    def items(self, key: str, *, required: bool = False) -> list[Any]:
        value = self.doc.get(key)
        if value is None and not required:
            return []
        if not isinstance(value, list):
            raise self._bad(key, "a list", value)
        return value
