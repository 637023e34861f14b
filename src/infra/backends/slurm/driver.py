"""A run on a Slurm target: pins, jobs in dependency order, record, deploy, submit once.

A run is all-bench or all-Slurm: every spec is pinned (``--placement ID:TARGET``, a sweep's
name pins all its tasks) to one Slurm target. Each plain spec becomes one job, each sweep
one job array (``sbatch.job_script``). The run, its instances (``node`` = the target) and
the intent of every job (key, job name) are recorded before anything is deployed; each job
is then submitted through ``SlurmClient.submit_once`` (lock, marker, lookup by name on the
login host), in dependency order, and its id stored. A coordinator killed anywhere leaves a
record the next ``watch`` finishes from, never submitting a job twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from infra.backends.slurm.client import SlurmClient, Submitted, transport_reason
from infra.backends.slurm.sbatch import Dependency, DependencyKind, JobScript, job_name, job_script
from infra.config.model import Cluster, ExperimentSpec, NodeConfig, SlurmTarget
from infra.config.specs import parse_pins, target_pins
from infra.errors import DeployRefused, InfraError, UsageError
from infra.placement.allocation import Allocation
from infra.runner.deploy import deploy_all
from infra.runner.lifecycle import RunSession, deploy_excludes, deploy_protect, stored_specs
from infra.state import InstancePhase, RunState
from infra.state.store import SLURM, SlurmJobRecord, new_run_id

SUBMIT_STATES = frozenset({InstancePhase.PLANNED, InstancePhase.DEPLOYING})
"""Instances whose job is not known to be submitted yet."""


def split_pins(text: str | None, cluster: Cluster,
               specs: Sequence[ExperimentSpec]) -> tuple[dict[str, str], dict[str, str]]:
    """``--placement`` (checked by ``parse_pins``: a sweep's name stands for all its tasks)
    split in two: {instance: Slurm target} and {instance: bench node}."""
    pins = parse_pins(text, cluster, specs)
    on_slurm = target_pins(pins, cluster)
    return on_slurm, {i: n for i, n in pins.items() if i not in on_slurm}


def check_all_slurm(pins: dict[str, str], specs: Sequence[ExperimentSpec],
                    auto_place: bool, cluster: Cluster) -> SlurmTarget:
    """The one target of an all-Slurm run, or refuse a run that mixes Slurm and bench."""
    others = sorted(s.experiment_id for s in specs if s.experiment_id not in pins)
    if others:
        on = sorted(pins)
        off = others
        raise UsageError(
            f"a run is all-Slurm or all-bench: {_some(on)} pinned to Slurm target "
            f"{', '.join(sorted(set(pins.values())))}, but {_some(off)} "
            f"{'is' if len(off) == 1 else 'are'} not; submit them in separate runs")
    targets = sorted(set(pins.values()))
    if len(targets) > 1:
        raise UsageError(f"a run goes to one Slurm target: {', '.join(targets)} named; "
                         "submit each target's work in its own run")
    if auto_place:
        raise UsageError("--auto-place does not apply to work pinned to a Slurm target "
                         f"({targets[0]}): Slurm places it; leave --auto-place out")
    target = cluster.slurm_target(targets[0])
    if target is None:  # split_pins only names configured targets
        raise UsageError(f"--placement: unknown Slurm target {targets[0]!r}")
    if not target.enabled:
        raise UsageError(f"--placement: Slurm target {target.name} is disabled in "
                         f"{cluster.path} (enabled: false)")
    return target


def _some(ids: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


@dataclass(frozen=True)
class PlannedJob:
    """One job (or array) to submit: its key, the tasks in index order, and what it waits
    for: (kind, the id named in ``after``/``after_any``)."""

    key: str
    tasks: tuple[ExperimentSpec, ...]
    waits: tuple[tuple[DependencyKind, str], ...]

    @property
    def instance_ids(self) -> tuple[str, ...]:
        return tuple(t.experiment_id for t in self.tasks)

    @property
    def is_array(self) -> bool:
        return self.tasks[0].task_index is not None and self.tasks[0].template_id is not None


def job_key(spec: ExperimentSpec) -> str:
    """A sweep task's job is its sweep's array; any other spec is its own job."""
    if spec.task_index is not None and spec.template_id is not None:
        return spec.template_id
    return spec.experiment_id


def plan_jobs(specs: Sequence[ExperimentSpec]) -> list[PlannedJob]:
    """The run's jobs in dependency order (a job after every job it waits for)."""
    groups: dict[str, list[ExperimentSpec]] = {}
    for spec in specs:
        groups.setdefault(job_key(spec), []).append(spec)
    key_of = {s.experiment_id: job_key(s) for s in specs}
    jobs: dict[str, PlannedJob] = {}
    for key, tasks in groups.items():
        tasks.sort(key=lambda s: s.task_index or 0)
        first = tasks[0]
        waits = tuple([(DependencyKind.AFTEROK, r) for r in first.after] +
                      [(DependencyKind.AFTERANY, r) for r in first.after_any])
        jobs[key] = PlannedJob(key, tuple(tasks), waits)
    order: list[str] = []
    seen: set[str] = set()

    def visit(key: str) -> None:
        if key in seen:
            return
        seen.add(key)
        for _, ref in jobs[key].waits:
            dep = ref if ref in jobs else key_of.get(ref)
            if dep is not None and dep != key:
                visit(dep)
        order.append(key)

    for key in sorted(jobs, key=lambda k: [s.experiment_id for s in specs].index(
            jobs[k].tasks[0].experiment_id)):
        visit(key)
    return [jobs[k] for k in order]


def shown_work_dir(target: SlurmTarget) -> str:
    """The target's work dir as a dry run shows it (``~`` as ``/HOME``: not asked)."""
    path = target.remote_work_dir
    if path.startswith("/"):
        return path
    return "/HOME" + (path[1:] if path.startswith("~/") else "/" + path.lstrip("~"))


def check_scripts(target: SlurmTarget, specs: Sequence[ExperimentSpec],
                  run_id: str = "RUN") -> list[JobScript]:
    """Build every job's script with stand-in ids (nothing is recorded or sent): a spec that
    cannot map to sbatch options is refused here, with one line, before the run exists."""
    jobs = plan_jobs(specs)
    stand_in = {j.key: SlurmJobRecord(run_id, j.key, j.key, target.name, n,
                                      j.instance_ids, str(n + 1), None, "")
                for n, j in enumerate(jobs)}
    out = []
    for job in jobs:
        first = job.tasks[0]
        deps = [Dependency(kind, SlurmRun.dep_word(ref, stand_in)) for kind, ref in job.waits]
        out.append(job_script(target, run_id, job.tasks, work_dir=shown_work_dir(target),
                              dependencies=tuple(deps), max_parallel=_throttle(first)))
    return out


def _throttle(first: ExperimentSpec) -> int | None:
    """A sweep's ``max_parallel`` (the array's ``%P``)."""
    if first.task_index is None or first.campaign is None:
        return None
    return first.campaign.max_parallel


def plan_doc(target: SlurmTarget, jobs: Sequence[PlannedJob]) -> dict[str, Any]:
    """What the store keeps as the run's plan: the target and each job's tasks."""
    return {"backend": SLURM, "target": target.name,
            "instances": {iid: {"node": target.name, "pinned": True}
                          for job in jobs for iid in job.instance_ids},
            "jobs": [{"key": j.key, "instances": list(j.instance_ids),
                      "after": [[k.value, r] for k, r in j.waits]} for j in jobs]}


def record_slurm_run(session: RunSession, target: SlurmTarget,
                     specs: Sequence[ExperimentSpec]) -> str:
    """Record the run, its instances and every job's intent before anything is touched."""
    run_id = new_run_id()
    jobs = plan_jobs(specs)
    rows: list[tuple[str, str, ExperimentSpec, Allocation | None]] = [
        (s.experiment_id, target.name, s, None) for j in jobs for s in j.tasks]
    session.store.create_run(
        run_id, str(session.cluster.path), plan_doc(target, jobs), rows, backend=SLURM,
        slurm_jobs=[(j.key, job_name(run_id, j.key), target.name, j.instance_ids)
                    for j in jobs])
    for j in jobs:
        what = f"array of {len(j.tasks)} task(s)" if j.is_array else "job"
        session.store.add_event(run_id, "placed", j.key,
                                f"pinned to Slurm target {target.name} (one {what})")
    return run_id


class SlurmRun:
    """One Slurm run as a coordinator drives it: its target, login host and jobs."""

    def __init__(self, session: RunSession, run_id: str) -> None:
        self.s = session
        self.run_id = run_id
        self._work_dir: str | None = None
        plan = session.store.run(run_id).plan
        name = str(plan.get("target") or "")
        target = session.cluster.slurm_target(name)
        if target is None:
            raise UsageError(f"run {run_id} went to Slurm target {name!r}, which is no longer "
                             f"in {session.cluster.path}")
        self.target = target
        self.login: NodeConfig = target.login_node()

    @property
    def store(self) -> Any:
        return self.s.store

    def jobs(self) -> list[SlurmJobRecord]:
        return list(self.s.store.slurm_jobs(self.run_id))

    async def client(self) -> SlurmClient:
        transport = await self.s.pool.get(self.login)
        return SlurmClient(self.login, transport,
                           timeout=max(30.0, self.s.cluster.health_check.timeout_seconds))

    async def work_dir(self) -> str:
        """The target's work dir as an absolute path (asked once per coordinator)."""
        if self._work_dir is None:
            self._work_dir = await (await self.client()).work_dir()
        return self._work_dir

    def specs(self) -> dict[str, ExperimentSpec]:
        return {r.instance_id: r.spec for r in self.s.store.instances(self.run_id)}

    # ------------------------------------------------------------------ launch

    async def deploy(self) -> str | None:
        """rsync the tree to the target's work dir (the bench's deploy rules); why it
        failed, or None."""
        cluster = self.s.cluster
        try:
            source = cluster.deploy_source
        except InfraError as exc:
            self.s.event(self.run_id, "deploy", self.target.name,
                         f"deploy failed: {exc.one_line()}")
            return exc.one_line()
        results = await deploy_all(
            [self.login], cluster.health_check, source,
            excludes=deploy_excludes(cluster, source), delete=True,
            protect=deploy_protect(cluster, stored_specs(self.s.store)),
            max_deletes=None if self.s.confirm_deletes else cluster.deploy.max_deletes)
        res = results[self.login.name]
        why = self.s._deployed(self.run_id, self.login.name, res)
        if isinstance(res, DeployRefused):
            self.s.refusals[self.target.name] = res
        return why

    def script_of(self, job: SlurmJobRecord, work_dir: str,
                  ids: dict[str, SlurmJobRecord]) -> JobScript:
        """The job's batch script and options, its dependencies on jobs already submitted."""
        specs = self.specs()
        tasks = [specs[i] for i in job.instance_ids]
        first = tasks[0]
        deps: list[Dependency] = []
        for kind, refs in ((DependencyKind.AFTEROK, first.after),
                           (DependencyKind.AFTERANY, first.after_any)):
            for ref in refs:
                deps.append(Dependency(kind, self.dep_word(ref, ids)))
        return job_script(self.target, self.run_id, tasks, work_dir=work_dir,
                          dependencies=tuple(deps), max_parallel=_throttle(first))

    @staticmethod
    def dep_word(ref: str, jobs: dict[str, SlurmJobRecord]) -> str:
        """``123`` for a job or a whole array, ``123_4`` for one task of an array."""
        if ref in jobs and jobs[ref].job_id:
            return str(jobs[ref].job_id)
        for job in jobs.values():
            if ref in job.instance_ids and job.job_id:
                if job.is_array:
                    return f"{job.job_id}_{job.instance_ids.index(ref)}"
                return str(job.job_id)
        raise InfraError(f"{ref}: its Slurm job is not submitted yet, so nothing can wait "
                         "for it")

    async def submit_pending(self) -> None:
        """Submit every job without a stored id, in order (each at most once on the
        cluster); a failed submission fails its instances with the reason."""
        jobs = self.jobs()
        if all(j.job_id for j in jobs):
            return
        work_dir = await self.work_dir()
        client = await self.client()
        by_key = {j.key: j for j in jobs}
        for job in jobs:
            if job.job_id:
                continue
            try:
                script = self.script_of(job, work_dir, by_key)
                got: Submitted = await client.submit_once(work_dir, self.run_id, script)
            except InfraError as exc:
                self._submit_failed(job, transport_reason(exc))
                continue
            self.s.store.set_slurm_job_id(self.run_id, job.key, got.job_id, got.how)
            by_key[job.key] = replace(job, job_id=got.job_id, how=got.how)
            self.s.store.update_instances(self.run_id, list(job.instance_ids),
                                          state=InstancePhase.QUEUED,
                                          reason=f"Slurm job {got.job_id}: submitted")
            verb = {"submitted": "submitted", "marker": "found already submitted (marker)",
                    "name": "found already submitted (by its name)"}.get(got.how, got.how)
            self.s.event(self.run_id, "submit", job.key,
                         f"{verb} to {self.target.name} as Slurm job {got.job_id}")

    def _submit_failed(self, job: SlurmJobRecord, why: str) -> None:
        self.s.store.update_instances(self.run_id, list(job.instance_ids),
                                      state=InstancePhase.FAILED,
                                      reason=f"not submitted to {self.target.name}: {why}")
        self.s.event(self.run_id, "submit", job.key, f"submission failed: {why}")

    async def launch(self) -> None:
        """Deploy, then submit the jobs not submitted yet (a resumed launch too)."""
        pending = [r for r in self.s.store.instances(self.run_id) if r.state in SUBMIT_STATES]
        if not pending:
            return
        self.s.store.set_run_state(self.run_id, RunState.STARTING)
        self.s.store.update_instances(self.run_id, [r.instance_id for r in pending],
                                      state=InstancePhase.DEPLOYING)
        why = await self.deploy()
        if why is not None:
            self.s.store.update_instances(
                self.run_id, [r.instance_id for r in pending], state=InstancePhase.FAILED,
                reason=f"deploy to {self.target.name} failed: {why}")
            self.s.store.set_run_state(self.run_id, RunState.FAILED)
            return
        await self.submit_pending()
        self.s.store.set_run_state(self.run_id, RunState.RUNNING)
