"""Watching a Slurm run: job states, logs home exactly once, results home, stop, requeue.

One ``scontrol show -o job ID`` per job (an array's tasks all come in its one answer) per
refresh, all in one round trip to the login host; ``sacct`` only for jobs scontrol no
longer knows. States go into the store as instance phases with Slurm's reason in plain
words. The acting watcher (the run's lease holder) also: submits what a dead coordinator
left unsubmitted, appends each task's output file to the local log copy from where the copy
ends (the same exact-once offsets as bench logs), fetches results when a task ends,
cancels a job whose dependency failed (it would wait forever) and requeues a failed task
while its restart rules allow.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal as signals
import time
from collections.abc import Callable
from pathlib import Path

from infra.backends.slurm.client import LOG_FILES_PER_CALL, LogPiece, transport_reason
from infra.backends.slurm.driver import SlurmRun
from infra.backends.slurm.jobstate import JobState, SlurmState, memory_killed, phase_of, plain_words
from infra.backends.slurm.sbatch import output_path, results_dir
from infra.config.model import JobType
from infra.errors import InfraError, LeaseLostError, TransportError, UsageError
from infra.monitor.loop import Monitor
from infra.monitor.snapshot import NodeState, NodeView, RunSnapshot
from infra.runner import results as res
from infra.runner.lifecycle import RunSession, StopReport, local_log_path
from infra.runner.results import ResultsFetch
from infra.runner.supervisor_client import RestartPolicy
from infra.state import InstancePhase, InstanceRecord, ResultIssue, RunState
from infra.state.store import SlurmJobRecord

DEFAULT_ATTEMPTS = 4
"""Attempts of a failed task when restarts are on and ``max_retries`` is not set (the
bench's built-in limit: 3 restarts)."""
NEVER_SATISFIED = "DependencyNeverSatisfied"
SETTLED = frozenset({InstancePhase.EXITED, InstancePhase.FAILED, InstancePhase.STOPPED,
                     InstancePhase.SKIPPED, InstancePhase.CANCELLED, InstancePhase.LOST})
FETCHABLE = frozenset({InstancePhase.EXITED, InstancePhase.FAILED, InstancePhase.STOPPED})
RESULT_ATTEMPTS = 3
MEMORY_TAIL_BYTES = 16 * 1024
Guard = Callable[[], bool]


def signal_name(number: int | None) -> str | None:
    """``SIGKILL`` for 9 (the store keeps signal names)."""
    if number is None:
        return None
    try:
        return signals.Signals(number).name
    except ValueError:
        return str(number)


def max_attempts(rec: InstanceRecord, session: RunSession) -> int:
    """How many attempts the instance's restart rules allow (1: none again)."""
    spec = rec.spec
    policy = RestartPolicy.from_config(session.cluster.failover, auto_restart=spec.auto_restart,
                                       max_retries=spec.max_retries,
                                       always=spec.job_type in (JobType.SERVICE,
                                                                JobType.SYSTEM))
    if not policy.auto_restart:
        return 1
    return DEFAULT_ATTEMPTS if policy.max_retries is None else policy.max_retries + 1


class SlurmWatch(SlurmRun):
    """A Slurm run's refresh and its acting watcher's duties."""

    def __init__(self, session: RunSession, run_id: str) -> None:
        super().__init__(session, run_id)
        self.drained: set[str] = set()
        self.fetch_failures: dict[str, int] = {}
        self.requeued: set[tuple[str, int]] = set()  # (instance, restarts) asked once
        self.error: InfraError | None = None
        self.never: set[str] = set()  # pending on a dependency that failed

    # ------------------------------------------------------------------ states

    def _task_of(self, job: SlurmJobRecord, state: JobState) -> str | None:
        """The instance an array task (or the one job) is."""
        if state.index is None:
            return job.instance_ids[0] if not job.is_array else None
        if 0 <= state.index < len(job.instance_ids):
            return job.instance_ids[state.index]
        return None

    async def refresh(self) -> InfraError | None:
        """Ask Slurm for every job with instances not over; record what it says."""
        records = {r.instance_id: r for r in self.s.store.instances(self.run_id)}
        jobs = [j for j in self.jobs() if j.job_id and
                any(records[i].state not in SETTLED for i in j.instance_ids if i in records)]
        if not jobs:
            self._settle()
            return None
        try:
            client = await self.client()
            found = await client.show_jobs([str(j.job_id) for j in jobs])
            gone = [j for j in jobs if found.get(str(j.job_id)) is None]
            old = await client.accounting([str(j.job_id) for j in gone]) if gone else []
        except InfraError as exc:
            self.error = exc
            return exc
        self.error = None
        for job in jobs:
            states = found.get(str(job.job_id))
            if states is None:
                states = [s for s in (old or []) if s.job_id == job.job_id]
            if not states:
                self._forgotten(job, records, accounting=old is not None)
                continue
            for state in states:
                iid = self._task_of(job, state)
                if iid is not None and iid in records:
                    self.apply(records[iid], state)
        self._settle()
        return None

    def _forgotten(self, job: SlurmJobRecord, records: dict[str, InstanceRecord], *,
                   accounting: bool) -> None:
        """Slurm forgot the job (scontrol no longer knows it, sacct has nothing or is off):
        its end is unknown."""
        for iid in job.instance_ids:
            rec = records.get(iid)
            if rec is not None and rec.state not in SETTLED:
                why = (f"Slurm job {job.job_id} is no longer known to scontrol and "
                       + ("sacct has no record of it" if accounting else
                          "Slurm accounting is off") + ": its end state is unknown")
                self.s.store.update_instance(self.run_id, iid, state=InstancePhase.LOST,
                                             reason=why)
                self.s.event(self.run_id, "state", iid, f"lost: {why}")

    def apply(self, rec: InstanceRecord, state: JobState) -> None:
        """Fold one job (or array task) state into its instance; an event on a change."""
        if rec.state in (InstancePhase.SKIPPED, InstancePhase.CANCELLED):
            return  # decided here (a dependency failed): Slurm's later CANCELLED adds nothing
        phase = phase_of(state)
        reason = plain_words(state)
        if state.state is SlurmState.PENDING and state.reason == NEVER_SATISFIED:
            self.never.add(rec.instance_id)
        job_word = state.job_id if state.index is None else f"{state.job_id}_{state.index}"
        # a pending job's StartTime is Slurm's estimate, and a job cancelled while pending
        # gets one too: only a job that got a node has started
        ran = state.node is not None and state.state is not SlurmState.PENDING
        self.s.store.update_instance(
            self.run_id, rec.instance_id, state=phase, exit_code=state.exit_code,
            signal=signal_name(state.signal), started_at=state.start_time if ran else None,
            ended_at=state.end_time if phase.finished else None, restarts=state.restarts,
            reason=f"Slurm job {job_word}: {reason}")
        if state.restarts > rec.restarts:
            self.s.event(self.run_id, "restart", rec.instance_id,
                         f"requeued by Slurm (attempt {state.restarts + 1})")
        if phase != rec.state:
            self.s.event(self.run_id, "state", rec.instance_id,
                         f"{rec.state.value} -> {phase.value} ({reason})")

    def _settle(self) -> None:
        """The run's state once every instance is over."""
        records = self.s.store.instances(self.run_id)
        if not records or not all(r.state.finished for r in records):
            return
        run = self.s.store.run(self.run_id)
        if run.state in (RunState.FINISHED, RunState.STOPPED, RunState.FAILED):
            return
        bad = [r for r in records if r.state in (InstancePhase.FAILED, InstancePhase.LOST,
                                                 InstancePhase.PAUSED, InstancePhase.SKIPPED)]
        final = RunState.FAILED if bad else RunState.FINISHED
        if all(r.state is InstancePhase.STOPPED for r in records):
            final = RunState.STOPPED
        self.s.store.set_run_state(self.run_id, final)
        self.s.event(self.run_id, "run", self.run_id, f"run {final.value}")

    # ------------------------------------------------------------------ acting

    async def act(self, guard: Guard) -> None:
        """The lease holder's duties for one tick (each step checks ``guard`` first)."""
        if guard():
            await self.launch()
        if guard():
            await self._never_satisfied()
        if guard():
            await self._requeue_failed()
        if guard():
            await self.sync_logs(guard)
        if guard():
            await self.fetch_due(guard)

    async def _never_satisfied(self) -> None:
        """A pending job whose dependency failed waits forever: cancel it, mark it skipped."""
        for rec in self.s.store.instances(self.run_id):
            if rec.state is InstancePhase.QUEUED and rec.instance_id in self.never:
                word = self._word(rec.instance_id)
                if word is None:
                    continue
                try:
                    await (await self.client()).cancel([word])
                except InfraError as exc:
                    self.s.emit("skip", rec.instance_id, f"could not cancel job {word}: "
                                f"{transport_reason(exc)}")
                    continue
                why = (f"never started: a job it waits for failed ({rec.reason}); "
                       f"its Slurm job {word} was cancelled")
                self.s.mark(self.run_id, rec, InstancePhase.SKIPPED, why)

    def _word(self, instance_id: str) -> str | None:
        """``ID`` of a plain job, ``ID_i`` of an array task (None: not submitted)."""
        for job in self.jobs():
            if instance_id in job.instance_ids and job.job_id:
                if job.is_array:
                    return f"{job.job_id}_{job.instance_ids.index(instance_id)}"
                return str(job.job_id)
        return None

    async def _requeue_failed(self) -> None:
        """``scontrol requeue`` a failed task while its restart rules allow another go."""
        for rec in self.s.store.instances(self.run_id):
            if rec.state is not InstancePhase.FAILED or rec.started_at is None:
                continue
            if rec.restarts + 1 >= max_attempts(rec, self.s):
                continue
            if (rec.instance_id, rec.restarts) in self.requeued:
                continue
            word = self._word(rec.instance_id)
            if word is None:
                continue
            self.requeued.add((rec.instance_id, rec.restarts))
            try:
                await (await self.client()).requeue(word)
            except InfraError as exc:
                self.s.event(self.run_id, "restart", rec.instance_id,
                             f"requeue of Slurm job {word} refused: {transport_reason(exc)}")
                continue
            self.drained.discard(rec.instance_id)
            self.s.store.update_instance(self.run_id, rec.instance_id,
                                         state=InstancePhase.QUEUED, ended_at=None,
                                         reason=f"Slurm job {word}: requeued after: "
                                                f"{rec.reason}")
            self.s.event(self.run_id, "restart", rec.instance_id,
                         f"requeued Slurm job {word} (attempt {rec.restarts + 2} of "
                         f"{max_attempts(rec, self.s)}) after: {rec.reason}")

    # ------------------------------------------------------------------ logs

    def output_of(self, work_dir: str, instance_id: str) -> str | None:
        """The output file of one instance on the cluster."""
        for job in self.jobs():
            if instance_id in job.instance_ids:
                index = job.instance_ids.index(instance_id) if job.is_array else None
                return output_path(work_dir, self.run_id, job.key, index)
        return None

    def _wants_log(self, rec: InstanceRecord) -> bool:
        if rec.instance_id in self.drained:
            return False
        if rec.state.finished and rec.started_at is None:
            self.drained.add(rec.instance_id)  # never ran: nothing to copy
            return False
        return rec.started_at is not None or rec.state.finished

    async def sync_logs(self, guard: Guard) -> None:
        """Append what each started task's output file holds beyond the local copy."""
        records = [r for r in self.s.store.instances(self.run_id) if self._wants_log(r)]
        if not records:
            return
        work_dir = await self.work_dir()
        client = await self.client()
        for start in range(0, len(records), LOG_FILES_PER_CALL):
            batch = records[start:start + LOG_FILES_PER_CALL]
            reads = []
            for rec in batch:
                path = local_log_path(self.s.cluster, self.run_id, rec.instance_id)
                have = path.stat().st_size if path.exists() else 0
                reads.append((str(self.output_of(work_dir, rec.instance_id)),
                              max(0, have - rec.log_base)))
            try:
                pieces = await client.read_logs(reads)
            except InfraError as exc:
                self.s.emit("log", self.target.name, f"log read failed: {exc.one_line()}")
                return
            for rec, piece in zip(batch, pieces, strict=True):
                if not guard():
                    return
                self._append(rec, piece, guard)

    def _append(self, rec: InstanceRecord, piece: LogPiece, guard: Guard) -> None:
        """Append one piece to the local copy (its size is the offset); drained when the
        task is over and nothing is left to read."""
        path = local_log_path(self.s.cluster, self.run_id, rec.instance_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as fh:
            if piece.data:
                if not guard():
                    raise LeaseLostError(f"{self.run_id}: the run's lease was lost; not "
                                         f"writing {rec.instance_id}'s log copy")
                fh.write(piece.data)
                fh.flush()
            size = fh.tell()
        if piece.data:
            tail = piece.data.rstrip(b"\n").rsplit(b"\n", 1)[-1].decode("utf-8", "replace")
            self.s.store.update_instance(self.run_id, rec.instance_id, log_offset=size,
                                         last_line=tail[:200])
        if rec.state is InstancePhase.FAILED:
            self._memory_reason(rec, path)
        remote_end = piece.size if piece.size is not None else 0
        if rec.state.finished and size - rec.log_base >= remote_end and \
                len(piece.data) < 1 and piece.error is None:
            self.drained.add(rec.instance_id)

    def _memory_reason(self, rec: InstanceRecord, path: Path) -> None:
        """A task Slurm killed past its ``--mem`` without cgroups (OverMemoryKill) ends
        FAILED by signal 9; slurmstepd's line in its output says why: say it plainly."""
        if "memory" in rec.reason:
            return
        try:
            with open(path, "rb") as fh:
                fh.seek(max(0, path.stat().st_size - MEMORY_TAIL_BYTES))
                tail = fh.read().decode("utf-8", "replace")
        except OSError:
            return
        if not memory_killed(tail):
            return
        word = self._word(rec.instance_id) or "?"
        why = f"Slurm job {word}: ran out of memory (killed at its --mem limit)"
        self.s.store.update_instance(self.run_id, rec.instance_id, reason=why)
        self.s.event(self.run_id, "state", rec.instance_id, why)

    # ------------------------------------------------------------------ results

    async def fetch_due(self, guard: Guard) -> None:
        """Fetch the results of tasks that ended and whose logs are home."""
        for rec in self.s.store.instances(self.run_id):
            if not guard():
                return
            if rec.state in FETCHABLE and rec.started_at is not None and \
                    not rec.results_fetched and rec.instance_id in self.drained and \
                    self.fetch_failures.get(rec.instance_id, 0) < RESULT_ATTEMPTS:
                try:
                    await self.fetch_results(rec)
                except InfraError as exc:
                    n = self.fetch_failures.get(rec.instance_id, 0) + 1
                    self.fetch_failures[rec.instance_id] = n
                    self.s.event(self.run_id, "results", rec.instance_id,
                                 f"fetching results failed: {exc.one_line()}")

    async def fetch_results(self, rec: InstanceRecord) -> ResultsFetch:
        """Copy the task's ``INFRA_RESULTS_DIR`` and its ``results`` globs home."""
        work_dir = await self.work_dir()
        transport = await self.s.pool.get(self.login)
        timeout = self.s.cluster.health_check.timeout_seconds * 3
        login = dataclasses.replace(self.login, remote_work_dir=work_dir)
        sources: list[tuple[res.ResultListing, str]] = []
        issues: list[ResultIssue] = []
        patterns = list(rec.spec.results)
        if patterns:
            cwd = f"{work_dir}/{rec.spec.workdir}" if rec.spec.workdir else work_dir
            listing = await res.list_results(transport, login, cwd, patterns, timeout)
            sources.append((listing, ""))
            issues += listing.issues("", declared=True)
        listing = await res.list_results(transport, login,
                                         results_dir(work_dir, self.run_id, rec.instance_id),
                                         ["*"], timeout)
        sources.append((listing, "results"))
        issues += listing.issues("results", declared=False)
        dest_root = res.local_results_dir(self.s.cluster, self.run_id, rec.instance_id)
        fetched: list[Path] = []
        for lst, prefix in sources:
            got, failed = await res.copy_home(transport, lst.files,
                                              dest_root / prefix if prefix else dest_root,
                                              timeout)
            fetched += got
            issues += [ResultIssue(f"{prefix}/{f.path}" if prefix else f.path, f.reason)
                       for f in failed]
        outcome = ResultsFetch(dest_root, tuple(fetched), tuple(issues))
        res.record_fetch(self.s, rec, outcome, final=rec.state.finished,
                         declared=bool(patterns))
        return outcome

    # ------------------------------------------------------------------ stop

    async def stop(self, instance_id: str | None) -> StopReport:
        """``scancel`` the run's jobs (one word per job or array), or one task; then record
        what Slurm says."""
        records = self.s.store.instances(self.run_id)
        array = next((j for j in self.jobs() if j.key == instance_id and j.is_array), None)
        if array is not None:  # a sweep's name: its whole array, one scancel
            records = [r for r in records if r.instance_id in array.instance_ids]
        elif instance_id is not None:
            records = [r for r in records if r.instance_id == instance_id]
            if not records:
                raise UsageError(f"run {self.run_id} has no instance or sweep "
                                 f"{instance_id!r}")
        report = StopReport(already_over={r.instance_id: r.state.value
                                          for r in records if r.state.finished})
        live = [r for r in records if not r.state.finished]
        unsubmitted = [r.instance_id for r in live if r.state in (InstancePhase.PLANNED,
                                                                 InstancePhase.DEPLOYING)]
        if unsubmitted:  # never submitted: nothing to cancel in Slurm
            self.s.store.update_instances(self.run_id, unsubmitted,
                                          state=InstancePhase.CANCELLED,
                                          reason="cancelled: stop requested before submit")
            report.cancelled.extend(unsubmitted)
        words: list[str] = []
        if instance_id is None or array is not None:
            words = [str(j.job_id) for j in self.jobs() if j.job_id and any(
                r.instance_id in j.instance_ids for r in live)]
        elif live and instance_id not in unsubmitted:
            word = self._word(instance_id)
            words = [word] if word else []
        if words:
            try:
                await (await self.client()).cancel(words)
            except InfraError as exc:
                report.errors[self.target.name] = transport_reason(exc)
        for r in live:
            if r.instance_id not in unsubmitted:
                self.s.store.add_event(self.run_id, "stop", r.instance_id,
                                       "stop requested (scancel)")
        if not report.errors:
            await self._until_cancelled([r.instance_id for r in live
                                         if r.instance_id not in unsubmitted])
        for r in live:
            now = self.s.store.instance(self.run_id, r.instance_id).state
            if now is InstancePhase.STOPPED:
                report.stopped.append(r.instance_id)
            elif now.finished and r.instance_id not in unsubmitted:
                report.already_over[r.instance_id] = now.value
        if instance_id is None and not report.errors and (report.stopped or report.cancelled):
            self.s.store.set_run_state(self.run_id, RunState.STOPPED)
        self._settle()
        return report

    async def _until_cancelled(self, ids: list[str], bound: float = 30.0) -> None:
        """Refresh until the cancelled tasks are over in Slurm (a cancel takes a moment)."""
        deadline = time.monotonic() + bound
        while ids:
            await self.refresh()
            states = {r.instance_id: r.state for r in self.s.store.instances(self.run_id)}
            if all(states[i].finished for i in ids) or time.monotonic() > deadline:
                return
            await asyncio.sleep(0.5)


class SlurmMonitor(Monitor):
    """The live loop of a Slurm run: the bench loop's lease and snapshot machinery, with
    Slurm's answers in place of node sweeps, probes and policies."""

    def __init__(self, session: RunSession, run_id: str, **kwargs: object) -> None:
        super().__init__(session, run_id, **kwargs)  # type: ignore[arg-type]
        self.trackers = {}  # no bench node is watched
        self.slurm = SlurmWatch(session, run_id)

    async def tick_once(self, *, acting: bool) -> dict[str, str]:
        exc = await self.slurm.refresh()
        if exc is None:
            self.last_seen[self.slurm.target.name] = time.time()
        if acting and await self.hold_lease():  # what it changes it records itself
            try:
                await self.slurm.act(self.holding)
            except LeaseLostError:
                pass
            except TransportError as err:
                exc = err
        if exc is not None:
            self.s.emit("slurm", self.slurm.target.name, f"unreachable: {exc.one_line()}")
            return {self.slurm.target.name: transport_reason(exc)}
        return {}

    async def _clear_fences(self) -> None:
        return None  # Slurm work is never fenced

    def _all_done(self, records: dict[str, InstanceRecord], *, acting: bool) -> bool:
        if not records:
            return True
        for rec in records.values():
            if not rec.state.finished:
                return False
            if not acting or rec.started_at is None or rec.state not in FETCHABLE:
                continue
            if rec.instance_id not in self.slurm.drained:
                return False
            if not rec.results_fetched and \
                    self.slurm.fetch_failures.get(rec.instance_id, 0) < RESULT_ATTEMPTS:
                return False
        return True

    def snapshot(self, records: dict[str, InstanceRecord]) -> RunSnapshot:
        snap = super().snapshot(records)
        target = self.slurm.target
        err = self.slurm.error
        active = sum(1 for r in records.values() if r.state is InstancePhase.RUNNING)
        view = NodeView(name=target.name,
                        state=NodeState.RECONNECTING if err is not None else NodeState.HEALTHY,
                        reason=transport_reason(err) if err is not None else
                        f"Slurm target (login host {target.host})",
                        instances=active, max_instances=len(records))
        return dataclasses.replace(snap, nodes=(view,))


async def show_slurm_log(session: RunSession, run_id: str, instance_id: str,
                         out: Callable[[bytes], None], *, follow: bool,
                         retry_delay: float = 1.0) -> None:
    """``logs``: the local copy, then the task's output file beyond it (to its end with
    ``follow``, until Slurm says the task is over). Reads only: no store writes."""
    from infra.runner.logread import print_local
    watch = SlurmWatch(session, run_id)
    path = local_log_path(session.cluster, run_id, instance_id)
    position = print_local(path, 0, None, out)
    rec = session.store.instance(run_id, instance_id)
    offset = max(0, position - rec.log_base)
    work_dir = await watch.work_dir()
    remote = watch.output_of(work_dir, instance_id)
    if remote is None:
        return
    client = await watch.client()
    word = watch._word(instance_id)
    while True:
        over = rec.state.finished
        if follow and not over and word is not None:
            job = word.split("_")[0]
            found = (await client.show_jobs([job])).get(job)
            index = int(word.split("_")[1]) if "_" in word else None
            mine = [s for s in (found or []) if s.index == index or index is None]
            over = found is None or bool(mine and mine[0].state.finished)
        while True:
            piece = (await client.read_logs([(remote, offset)]))[0]
            if piece.data:
                out(piece.data)
                offset += len(piece.data)
            if not piece.data:
                break
        if not follow or over:
            return
        await asyncio.sleep(retry_delay)

