"""Slurm's answers about jobs as typed states, and those states in plain words (pure).

``parse_scontrol`` reads ``scontrol show -o job <id>`` (one line per job or array task, a
still-pending array range as one line: it becomes one ``JobState`` per index);
``parse_sacct`` reads ``sacct -n -P -X -j <ids> --format=<SACCT_FORMAT>`` for jobs
``scontrol`` no longer knows. ``plain_words`` says what happened as a user would;
``phase_of`` maps a state onto the store's ``InstancePhase``.

Times are the cluster's local time without a zone (Slurm's format); they are read as this
machine's local time, so coordinator and cluster should share a time zone for exact times.
"""

from __future__ import annotations

import enum
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

from infra.state.store import InstancePhase


class SlurmState(str, enum.Enum):
    """Slurm's job states (``squeue(1)``, JOB STATE CODES); UNKNOWN for any other text."""

    PENDING = "PENDING"
    CONFIGURING = "CONFIGURING"
    RUNNING = "RUNNING"
    SUSPENDED = "SUSPENDED"
    COMPLETING = "COMPLETING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    NODE_FAIL = "NODE_FAIL"
    PREEMPTED = "PREEMPTED"
    BOOT_FAIL = "BOOT_FAIL"
    DEADLINE = "DEADLINE"
    REQUEUED = "REQUEUED"
    REQUEUE_HOLD = "REQUEUE_HOLD"
    REQUEUE_FED = "REQUEUE_FED"
    RESV_DEL_HOLD = "RESV_DEL_HOLD"
    RESIZING = "RESIZING"
    REVOKED = "REVOKED"
    SPECIAL_EXIT = "SPECIAL_EXIT"
    STAGE_OUT = "STAGE_OUT"
    STOPPED = "STOPPED"
    SIGNALING = "SIGNALING"
    UNKNOWN = "UNKNOWN"

    @classmethod
    def parse(cls, text: str) -> SlurmState:
        """``COMPLETED``, sacct's ``CANCELLED by 0`` or ``OUT_OF_ME+`` (truncated): the state;
        anything unknown is UNKNOWN (a newer Slurm's state is never mistaken for an end)."""
        word = text.strip().split(" ")[0].upper() if text.strip() else ""
        if word.endswith("+"):
            stem = word[:-1]
            matches = [s for s in cls if s.value.startswith(stem)]
            return matches[0] if len(matches) == 1 else cls.UNKNOWN
        try:
            return cls(word)
        except ValueError:
            return cls.UNKNOWN

    @property
    def finished(self) -> bool:
        """The job ended: Slurm runs it again only if asked (``scontrol requeue``)."""
        return self in _FINISHED


_FINISHED = frozenset({
    SlurmState.COMPLETED, SlurmState.FAILED, SlurmState.CANCELLED, SlurmState.TIMEOUT,
    SlurmState.OUT_OF_MEMORY, SlurmState.NODE_FAIL, SlurmState.PREEMPTED, SlurmState.BOOT_FAIL,
    SlurmState.DEADLINE, SlurmState.REVOKED,
})

SACCT_FORMAT = "JobID,JobIDRaw,JobName,State,ExitCode,NodeList,Start,End,Timelimit"
"""The ``--format`` ``parse_sacct`` reads (with ``-n -P -X``), fields in this order."""
SACCT_FIELDS = tuple(SACCT_FORMAT.split(","))


@dataclass(frozen=True)
class JobState:
    """One job, or one task of a job array, as Slurm reports it."""

    job_id: str  # the job id (an array's master id, ArrayJobId)
    index: int | None  # ArrayTaskId for one array task, None for a plain job
    state: SlurmState
    reason: str | None  # Slurm's Reason (None for "None")
    exit_code: int | None  # from ExitCode=E:S
    signal: int | None  # the S of ExitCode=E:S when not 0
    node: str | None
    start_time: float | None  # epoch seconds, None when Unknown/None
    end_time: float | None  # only once finished
    restarts: int  # Restarts=
    time_limit: str | None
    name: str
    throttle: int | None = None  # an array's %P (ArrayTaskThrottle), when known
    raw_state: str = ""  # the state text as Slurm wrote it (for an UNKNOWN state)

    @property
    def task_id(self) -> str:
        """``123`` or ``123_4``: how sbatch/scancel/dependencies name this job or task."""
        return self.job_id if self.index is None else f"{self.job_id}_{self.index}"


# --------------------------------------------------------------------------- helpers

_KEY = re.compile(r"^([A-Z][A-Za-z0-9_:/]*)=(.*)$")
_NO_VALUE = frozenset({"", "None", "none", "(null)", "Unknown", "N/A", "None assigned"})


def _fields(line: str) -> dict[str, str]:
    """``Key=Value`` words of one scontrol line. A word that does not start a ``Key=`` (an
    upper-case key) belongs to the value before it (values with spaces: WorkDir, Comment);
    the first of a repeated key wins."""
    out: dict[str, str] = {}
    last: str | None = None
    for word in line.split(" "):
        m = _KEY.match(word)
        if m is not None and m.group(1) not in out:
            last = m.group(1)
            out[last] = m.group(2)
        elif last is not None and word:
            out[last] = f"{out[last]} {word}"
    return out


def _value(text: str | None) -> str | None:
    if text is None:
        return None
    text = text.strip()
    return None if text in _NO_VALUE else text


def _epoch(text: str | None) -> float | None:
    """``2026-12-06T23:01:02`` (local time) as epoch seconds; None for Unknown/None/N/A."""
    value = _value(text)
    if value is None:
        return None
    try:
        return time.mktime(time.strptime(value, "%Y-%m-%dT%H:%M:%S"))
    except (ValueError, OverflowError):
        return None


def _exit(text: str | None) -> tuple[int | None, int | None]:
    """``E:S`` -> (exit code, signal or None)."""
    value = _value(text)
    if value is None:
        return None, None
    code, _, sig = value.partition(":")
    try:
        exit_code = int(code)
    except ValueError:
        return None, None
    try:
        signal = int(sig) if sig else 0
    except ValueError:
        signal = 0
    return exit_code, (signal or None)


def _int(text: str | None, default: int = 0) -> int:
    try:
        return int(_value(text) or default)
    except ValueError:
        return default


def array_indices(text: str) -> tuple[list[int], int | None]:
    """``4-15%4`` / ``4,6,8-9`` / ``3`` -> the indices and the throttle (``%P``) if any.

    Steps (``0-15:2``) are honoured; an unreadable part is skipped, never guessed.
    """
    body, _, throttle_text = text.strip().strip("[]").partition("%")
    throttle = int(throttle_text) if throttle_text.isdigit() else None
    out: list[int] = []
    for part in body.split(","):
        rng, _, step_text = part.partition(":")
        lo, dash, hi = rng.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            continue
        step = int(step_text) if step_text.isdigit() and int(step_text) > 0 else 1
        out.extend(range(int(lo), int(hi if dash else lo) + 1, step))
    return out, throttle


def _states(base: JobState, indices: list[int] | None) -> Iterator[JobState]:
    """``base`` itself (a plain job), or one copy per array index."""
    if indices is None:
        yield base
        return
    for index in indices:
        yield replace(base, index=index)


# --------------------------------------------------------------------------- scontrol


def _scontrol_line(f: Mapping[str, str]) -> Iterator[JobState]:
    array_job = _value(f.get("ArrayJobId"))
    task = _value(f.get("ArrayTaskId"))
    indices: list[int] | None = None
    throttle = _int(f.get("ArrayTaskThrottle"), 0) or None
    if array_job is not None and task is not None:
        if task.isdigit():
            indices = [int(task)]
        else:
            indices, pct = array_indices(task)
            throttle = pct or throttle
    job_id = array_job if array_job is not None else f.get("JobId", "")
    raw = f.get("JobState", "")
    state = SlurmState.parse(raw)
    exit_code, signal = _exit(f.get("ExitCode"))
    if not state.finished and state is not SlurmState.COMPLETING:
        exit_code, signal = None, None
    yield from _states(JobState(
        job_id=job_id, index=None, state=state, reason=_value(f.get("Reason")),
        exit_code=exit_code, signal=signal, node=_value(f.get("NodeList")),
        start_time=_epoch(f.get("StartTime")) if state is not SlurmState.PENDING else None,
        end_time=_epoch(f.get("EndTime")) if state.finished else None,
        restarts=_int(f.get("Restarts")), time_limit=_value(f.get("TimeLimit")),
        name=f.get("JobName", ""), throttle=throttle, raw_state=raw), indices)


def parse_scontrol(text: str) -> list[JobState]:
    """Every job or array task in ``scontrol show -o job`` output (blank lines, and lines
    without a JobId, such as "slurm_load_jobs error: Invalid job id specified", skipped)."""
    out: list[JobState] = []
    for line in text.splitlines():
        f = _fields(line.strip())
        if "JobId" not in f or "JobState" not in f:
            continue
        out.extend(_scontrol_line(f))
    return out


# --------------------------------------------------------------------------- sacct

_SACCT_ID = re.compile(r"^(\d+)(?:_(\d+|\[[^\]]*\]))?(?:\+\d+)?$")


def parse_sacct(text: str) -> list[JobState]:
    """Jobs in ``sacct -n -P -X --format=SACCT_FORMAT`` output (``|``-separated). An array
    task is ``123_4``, a still-pending remainder ``123_[5-15%4]`` (one state per index);
    steps (``123.batch``) and unreadable lines are skipped."""
    out: list[JobState] = []
    for line in text.splitlines():
        parts = line.rstrip("\n").split("|")
        if len(parts) < len(SACCT_FIELDS):
            continue
        f = dict(zip(SACCT_FIELDS, parts[:len(SACCT_FIELDS)], strict=True))
        m = _SACCT_ID.match(f["JobID"].strip())
        if m is None:
            continue
        job_id, task = m.group(1), m.group(2)
        indices: list[int] | None = None
        throttle = None
        if task is not None:
            indices, throttle = array_indices(task) if task.startswith("[") \
                else ([int(task)], None)
        state = SlurmState.parse(f["State"])
        exit_code, signal = _exit(f["ExitCode"])
        if not state.finished:
            exit_code, signal = None, None
        reason = None
        words = f["State"].split(" ", 1)
        if len(words) == 2:
            reason = words[1].strip()  # "CANCELLED by 1000"
        out.extend(_states(JobState(
            job_id=job_id, index=None, state=state, reason=reason, exit_code=exit_code,
            signal=signal,
            node=_value(f["NodeList"]),
            start_time=_epoch(f["Start"]) if state is not SlurmState.PENDING else None,
            end_time=_epoch(f["End"]) if state.finished else None, restarts=0,
            time_limit=_value(f["Timelimit"]), name=f["JobName"], throttle=throttle,
            raw_state=f["State"]), indices))
    return out


# --------------------------------------------------------------------------- words

_WAITING = {
    "Dependency": "waiting: after its dependencies",
    "DependencyNeverSatisfied": "waiting: a dependency failed, so it will never start",
    "Resources": "waiting for resources",
    "Priority": "waiting: jobs of higher priority go first",
    "BeginTime": "waiting for its start time",
    "JobHeldUser": "held by its user (scontrol release to let it start)",
    "JobHeldAdmin": "held by an administrator",
    "ReqNodeNotAvail": "waiting: the nodes it needs are not available",
    "PartitionTimeLimit": "waiting: its time limit is longer than the partition allows, "
                          "so it will never start",
    "PartitionNodeLimit": "waiting: it asks for more nodes than the partition allows",
    "PartitionDown": "waiting: its partition is down",
    "PartitionInactive": "waiting: its partition is inactive",
    "BadConstraints": "waiting: no node offers the requested constraints, so it will never "
                      "start",
    "InvalidAccount": "waiting: its account is not valid",
    "InvalidQOS": "waiting: its QoS is not valid",
    "NodeDown": "waiting: a node it needs is down",
    "launch failed requeued held": "held after its launch failed",
}


def _waiting(state: JobState) -> str:
    reason = state.reason or ""
    if reason == "JobArrayTaskLimit":
        cap = f"%{state.throttle}" if state.throttle else "max_parallel"
        return f"waiting: the array's {cap} throttle"
    if reason in _WAITING:
        return _WAITING[reason]
    if reason.startswith(("QOS", "Assoc")):
        return f"waiting: a limit of its account or QoS ({reason})"
    return f"waiting ({reason})" if reason else "waiting in the Slurm queue"


_KILL_SIGNALS = frozenset({6, 9, 15})


def _failed(state: JobState) -> str:
    if state.reason == "JobLaunchFailure" and state.signal not in _KILL_SIGNALS:
        # e.g. ExitCode=0:53: slurmd could not start the batch script at all
        return ("failed to launch: Slurm could not start it on its node (a missing work "
                "dir or output directory?)")
    if state.signal:
        return f"killed by signal {state.signal}"
    if state.exit_code:
        return f"failed: exit code {state.exit_code}"
    reason = state.reason
    return f"failed ({reason})" if reason and reason != "NonZeroExitCode" else "failed"


_MEMORY_KILL = re.compile(r"exceeded (?:job )?memory limit|oom-kill event|out-of-memory",
                          re.IGNORECASE)


def memory_killed(output: str) -> bool:
    """Whether a job's output holds slurmstepd's note that it was killed for memory: the
    only sign of it where Slurm enforces ``--mem`` by sampling (``OverMemoryKill``), which
    ends the job FAILED (``JobLaunchFailure``, signal 9) rather than OUT_OF_MEMORY."""
    return any(_MEMORY_KILL.search(ln) for ln in output.splitlines()
               if ln.startswith("slurmstepd"))


def plain_words(state: JobState, output: str = "") -> str:
    """What the job is doing or how it ended, in plain words for status and watch.

    ``output``: the tail of the job's output file when known; a failed job whose output
    has slurmstepd's memory-kill note "ran out of memory" (``memory_killed``).
    """
    s = state.state
    if s in (SlurmState.FAILED, SlurmState.CANCELLED) and output and memory_killed(output):
        return "ran out of memory (killed at its --mem limit)"
    node = f" on {state.node}" if state.node else ""
    if s is SlurmState.PENDING:
        return _waiting(state)
    if s is SlurmState.COMPLETED:
        return "completed"
    if s is SlurmState.FAILED:
        return _failed(state)
    if s is SlurmState.TIMEOUT:
        return f"hit its time limit ({state.time_limit})" if state.time_limit \
            else "hit its time limit"
    words = {
        SlurmState.CONFIGURING: f"starting{node} (Slurm is configuring its nodes)",
        SlurmState.RUNNING: f"running{node}",
        SlurmState.COMPLETING: f"ending{node}",
        SlurmState.SUSPENDED: f"suspended{node}",
        SlurmState.STOPPED: f"stopped{node} (SIGSTOP)",
        SlurmState.SIGNALING: f"being signalled{node}",
        SlurmState.STAGE_OUT: f"staging out{node}",
        SlurmState.RESIZING: f"being resized{node}",
        SlurmState.OUT_OF_MEMORY: "ran out of memory",
        SlurmState.CANCELLED: "cancelled" + (f" ({state.reason})" if state.reason
                                             and state.reason.startswith("by ") else ""),
        SlurmState.NODE_FAIL: "its Slurm node failed",
        SlurmState.PREEMPTED: "preempted",
        SlurmState.BOOT_FAIL: "its Slurm node failed to boot",
        SlurmState.DEADLINE: "missed its deadline",
        SlurmState.REQUEUED: "requeued: it will start again",
        SlurmState.REQUEUE_FED: "requeued: it will start again",
        SlurmState.REQUEUE_HOLD: "requeued and held (scontrol release to let it start)",
        SlurmState.SPECIAL_EXIT: "held after a special exit (scontrol release to rerun it)",
        SlurmState.RESV_DEL_HOLD: "held: its reservation was deleted",
        SlurmState.REVOKED: "revoked (it runs on another cluster of the federation)",
    }
    if s in words:
        return words[s]
    return f"in Slurm state {state.raw_state or s.value}"


_PHASES = {
    SlurmState.PENDING: InstancePhase.QUEUED,
    SlurmState.CONFIGURING: InstancePhase.STARTING,
    SlurmState.RUNNING: InstancePhase.RUNNING,
    SlurmState.COMPLETING: InstancePhase.RUNNING,
    SlurmState.SUSPENDED: InstancePhase.RUNNING,
    SlurmState.STOPPED: InstancePhase.RUNNING,
    SlurmState.SIGNALING: InstancePhase.RUNNING,
    SlurmState.STAGE_OUT: InstancePhase.RUNNING,
    SlurmState.RESIZING: InstancePhase.RUNNING,
    SlurmState.COMPLETED: InstancePhase.EXITED,
    SlurmState.FAILED: InstancePhase.FAILED,
    SlurmState.TIMEOUT: InstancePhase.FAILED,
    SlurmState.OUT_OF_MEMORY: InstancePhase.FAILED,
    SlurmState.NODE_FAIL: InstancePhase.FAILED,
    SlurmState.PREEMPTED: InstancePhase.FAILED,
    SlurmState.BOOT_FAIL: InstancePhase.FAILED,
    SlurmState.DEADLINE: InstancePhase.FAILED,
    SlurmState.CANCELLED: InstancePhase.STOPPED,
    SlurmState.REVOKED: InstancePhase.STOPPED,
    SlurmState.REQUEUED: InstancePhase.RESTARTING,
    SlurmState.REQUEUE_FED: InstancePhase.RESTARTING,
    SlurmState.REQUEUE_HOLD: InstancePhase.PAUSED,
    SlurmState.SPECIAL_EXIT: InstancePhase.PAUSED,
    SlurmState.RESV_DEL_HOLD: InstancePhase.PAUSED,
    SlurmState.UNKNOWN: InstancePhase.RUNNING,
}


def phase_of(state: JobState) -> InstancePhase:
    """The store's phase for a Slurm state (PENDING -> QUEUED, COMPLETED -> EXITED, failures
    -> FAILED, CANCELLED -> STOPPED, held -> PAUSED; an unknown state counts as running)."""
    return _PHASES[state.state]
