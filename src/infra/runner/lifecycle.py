"""A run from plan to results: record, deploy, start, sweep status, stream logs, fetch results.

Every step writes the store before acting and after the outcome, so a coordinator killed
anywhere leaves a record that ``status`` and ``watch`` can rebuild from; starts go through
the node's idempotent supervisor, so retrying after a crash never starts a second copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import posixpath
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.campaign.env import task_env
from infra.config.model import (
    Cluster,
    ExperimentSpec,
    JobType,
    NodeConfig,
    RecoverPolicy,
)
from infra.errors import (
    BadAnswerError,
    CapacityRefusedError,
    CommandFailedError,
    DeployRefused,
    InfraError,
    LeaseLostError,
    StaleCopyError,
    StateError,
    TransportError,
    UsageError,
    node_reason,
)
from infra.placement import Condition, NodeCondition, Plan, plan, why_not
from infra.placement.allocation import Allocation, allocation_env
from infra.runner import harvest, results
from infra.runner import telemetry_home as tele
from infra.runner.claims import claim_request, claims_of, occupied_work
from infra.runner.deploy import DeployResult, deploy_all, results_protect_patterns
from infra.runner.harvest import HarvestOutcome
from infra.runner.results import ResultsFetch
from infra.runner.supervisor_client import (
    InstanceState,
    InstanceStatus,
    PoolState,
    RestartPolicy,
    StartRequest,
    SupervisorClient,
)
from infra.state import InstancePhase, InstanceRecord, RunState, Store, new_run_id
from infra.state.store import coordinator_id
from infra.transport.base import Transport
from infra.transport.pool import ConnectionPool

EventSink = Callable[[str, str, str], None]
"""(kind, subject, message) -> None: where progress lines go (console, dashboard, tests)."""

SETTLED = frozenset({InstancePhase.EXITED, InstancePhase.FAILED, InstancePhase.STOPPED,
                     InstancePhase.SKIPPED, InstancePhase.CANCELLED})
"""Over for good: a status sweep of a long run does not ask the node about them again."""
DESCRIBE_ALL_UP_TO = 32
"""A node holding at most this many of a run's instances describes all of them on every
sweep (whatever it holds, even records the coordinator does not know); past it (a campaign's
tasks), only those not settled."""
MAX_REPLACE_TRIES = 3
"""How often an instance refused by a node's claims is placed again before it fails."""
LOG_SYNC_ATTEMPTS = 3
"""Times in a row a node may refuse an instance's log (no record, broken answer) before the
coordinator stops asking and says so."""

_NO_SPACE = "no space left on device"  # in the supervisor's disk-full reasons

_PHASE_OF_STATUS = {
    InstanceStatus.STARTING: InstancePhase.STARTING,
    InstanceStatus.RUNNING: InstancePhase.RUNNING,
    InstanceStatus.RESTARTING: InstancePhase.RESTARTING,
    InstanceStatus.EXITED: InstancePhase.EXITED,
    InstanceStatus.FAILED: InstancePhase.FAILED,
    InstanceStatus.STOPPED: InstancePhase.STOPPED,
    InstanceStatus.LOST: InstancePhase.LOST,
}

def _noop(kind: str, subject: str, message: str) -> None:
    return None


def occupied_by(records: Iterable[InstanceRecord]) -> list[tuple[ExperimentSpec, str,
                                                                    Allocation | None]]:
    """Work holding capacity, ports and devices, in the form placement takes."""
    return [(r.spec, r.node, r.allocation) for r in records]


STORED_RUNS_PROTECTED = 200
"""How many recent runs of the store have their results globs protected from deploys."""


def stored_specs(store: Store, runs: int = STORED_RUNS_PROTECTED) -> list[ExperimentSpec]:
    """The specs of the store's recent runs: their outputs may still sit on the nodes.

    (A run whose records cannot be decoded is left out rather than stopping every deploy.)
    """
    specs: list[ExperimentSpec] = []
    for run in store.runs(runs):
        try:
            specs.extend(rec.spec for rec in store.instances(run.run_id))
        except StateError:
            continue
    return specs


def deploy_excludes(cluster: Cluster, source: Path) -> tuple[str, ...]:
    """``deploy.exclude``, plus the log directory when it lies inside the source: the state
    store and the local copies of logs are the coordinator's, never sent to the nodes."""
    try:
        rel = cluster.log_dir.resolve().relative_to(source.resolve())
    except ValueError:
        return tuple(cluster.deploy.exclude)
    if not rel.parts:
        return tuple(cluster.deploy.exclude)
    return (*cluster.deploy.exclude, f"/{rel.as_posix()}/")


def deploy_protect(cluster: Cluster, specs: Iterable[ExperimentSpec]) -> tuple[str, ...]:
    """What a deploy must never delete: ``deploy.protect`` and the specs' ``results`` globs."""
    patterns = list(cluster.deploy.protect)
    for spec in specs:
        patterns += results_protect_patterns(spec.workdir, spec.results)
    return tuple(dict.fromkeys(patterns))


def instance_cwd(node: NodeConfig, spec: ExperimentSpec) -> str:
    """Where the command runs on the node: the deployed tree, or ``workdir`` inside it."""
    base = node.remote_work_dir.rstrip("/") or "/"
    return posixpath.join(base, spec.workdir) if spec.workdir else base


def local_log_path(cluster: Cluster, run_id: str, instance_id: str) -> Path:
    return cluster.log_dir / run_id / f"{instance_id}.log"


class _CheckGate:
    """Opens once every node of a launch passed its deletion check (or ended its deploy)."""

    def __init__(self, nodes: set[str]) -> None:
        self.pending = set(nodes)
        self.opened = asyncio.Event()
        if not self.pending:
            self.opened.set()

    def passed(self, node: str) -> None:
        self.pending.discard(node)
        if not self.pending:
            self.opened.set()

    async def wait(self) -> None:
        await self.opened.wait()


@dataclass
class StopReport:
    """What a stop did: instances it stopped, those already over (their state), node errors."""

    stopped: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)  # queued work dropped before it started
    already_over: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # node -> one line


@dataclass
class RunSession:
    """Everything one coordinator process holds while it drives runs."""

    cluster: Cluster
    store: Store
    pool: ConnectionPool
    emit: EventSink = _noop
    clients: dict[str, SupervisorClient] = field(default_factory=dict)
    forced: set[str] = field(default_factory=set)  # instances pinned with --force
    renewed: dict[str, float] = field(default_factory=dict)  # node -> monotonic last renewal
    confirm_deletes: bool = False  # --yes: deploys may delete past deploy.max_deletes
    refusals: dict[str, DeployRefused] = field(default_factory=dict)
    # (run, instance) -> the newest telemetry sample the sweeps brought home
    telemetry: dict[tuple[str, str], tele.Latest] = field(default_factory=dict)

    def event(self, run_id: str | None, kind: str, subject: str, message: str) -> None:
        """Record an event durably, then show it."""
        self.store.add_event(run_id, kind, subject, message)
        self.emit(kind, subject, message)

    async def client(self, node_name: str) -> SupervisorClient:
        node = self.cluster.node(node_name)
        transport = await self.pool.get(node)
        held = self.clients.get(node_name)
        if held is None or held.transport is not transport:
            held = SupervisorClient(transport, node,
                                    command_timeout=max(30.0,
                                                        self.cluster.health_check.timeout_seconds))
            self.clients[node_name] = held
        return held

    async def transport(self, node_name: str) -> Transport:
        return await self.pool.get(self.cluster.node(node_name))

    # ------------------------------------------------------------------ start

    def record_run(self, specs: Sequence[ExperimentSpec], plan: Plan,
                   plan_doc: dict[str, Any], *, queued: Sequence[ExperimentSpec] = ()) -> str:
        """Write the run, its planned instances and its queued work before touching any
        node."""
        run_id = new_run_id()
        by_id = {s.experiment_id: s for s in specs}
        rows = [(p.instance_id, p.node, by_id[p.instance_id],
                 p.allocation.with_run(run_id) if p.allocation is not None else None)
                for p in plan.placements]
        self.store.create_run(run_id, str(self.cluster.path), plan_doc, rows, queued=queued)
        for p in plan.placements:
            self.store.add_event(run_id, "placed", p.instance_id,
                                 f"placed on {p.node} (score {p.score:g})")
        return run_id

    async def deploy_for_run(self, run_id: str, node_names: Iterable[str],
                             only: str | None = None, *,
                             on_checked: Callable[[str], None] | None = None,
                             then: Callable[[str, str | None], Awaitable[None]] | None = None,
                             ) -> dict[str, str]:
        """Deploy the tree to the nodes of a run; returns why each failed node failed.

        Results globs of every stored run are protected; a node where the deploy would
        delete more than ``deploy.max_deletes`` is refused (kept in ``refusals``) unless
        ``confirm_deletes``. ``on_checked`` and ``then`` (node, why it failed or None) as for
        ``deploy_all``: each node's next step runs as soon as its own deploy is done.
        """
        nodes = [self.cluster.node(n) for n in sorted(set(node_names))]
        for rec in self.store.instances(run_id):
            if only is None and rec.state is InstancePhase.PLANNED:
                self.store.update_instance(run_id, rec.instance_id,
                                           state=InstancePhase.DEPLOYING)
        try:
            source = self.cluster.deploy_source
        except InfraError as exc:
            for node in nodes:
                self.event(run_id, "deploy", node.name, f"deploy failed: {exc.one_line()}")
            failed = {node.name: exc.one_line() for node in nodes}
            for node in nodes:
                if on_checked is not None:
                    on_checked(node.name)
                if then is not None:
                    await then(node.name, failed[node.name])
            return failed
        deploy = self.cluster.deploy
        failed = {}

        async def done(name: str, res: DeployResult | InfraError) -> None:
            why = self._deployed(run_id, name, res)
            if why is not None:
                failed[name] = why
            if then is not None:
                await then(name, why)

        await deploy_all(nodes, self.cluster.health_check, source,
                         excludes=deploy_excludes(self.cluster, source), delete=True,
                         protect=deploy_protect(self.cluster, stored_specs(self.store)),
                         max_deletes=None if self.confirm_deletes else deploy.max_deletes,
                         on_checked=on_checked, then=done)
        return failed

    def _deployed(self, run_id: str, name: str, res: DeployResult | InfraError) -> str | None:
        """Record one node's deploy (an event; a refusal kept); why it failed, or None."""
        if isinstance(res, DeployResult):
            if res.skipped:
                self.event(run_id, "deploy", name, f"deploy skipped: {res.reason}")
            else:
                stats = res.stats
                sent = f"{stats.files_transferred} files, {stats.bytes_sent} bytes" \
                    if stats else "done"
                self.event(run_id, "deploy", name, f"deployed ({sent})")
            return None
        why = res.reason if isinstance(res, TransportError) else res.one_line()
        if isinstance(res, DeployRefused):
            self.refusals[name] = res
        self.event(run_id, "deploy", name, f"deploy "
                   f"{'refused' if isinstance(res, DeployRefused) else 'failed'}: {why}")
        return why

    def pinned(self, run_id: str, instance_id: str) -> bool:
        """Whether the instance was placed with ``--placement`` (a pin: exhausted restarts never
        move it, and a refused start is placed again only there)."""
        return instance_id in self.store.run(run_id).pinned

    def pin_conditions(self, rec: InstanceRecord,
                       conditions: dict[str, NodeCondition]) -> dict[str, NodeCondition]:
        """``conditions`` with every node but the instance's own unavailable (it is pinned)."""
        why = f"{rec.instance_id} is pinned to {rec.node} (--placement)"
        conds = dict(conditions)
        for node in self.cluster.nodes:
            if node.name != rec.node:
                conds[node.name] = NodeCondition(Condition.UNAVAILABLE, why)
        return conds

    def fenced(self, spec: ExperimentSpec) -> bool:
        """Whether the node fences this work while a coordinator watches it."""
        return spec.recover is RecoverPolicy.CLUSTER and \
            self.cluster.failover.fence_timeout_seconds > 0

    def start_request(self, run_id: str, rec: InstanceRecord) -> StartRequest:
        """What the node's supervisor gets to start this placement of the instance (a pool
        gets the same request for a campaign task)."""
        node = self.cluster.node(rec.node)
        spec = rec.spec
        env = task_env(spec)
        alloc = rec.allocation
        alloc_doc: dict[str, Any] = {"node": node.name, "ram_gb": spec.ram_gb,
                                     "gpu_required": spec.gpu_required,
                                     "gpu_memory_gb": spec.gpu_memory_gb,
                                     "cpu_cores": spec.cpu_cores}
        if alloc is not None:
            alloc_doc = alloc.to_json()
            hints = allocation_env(alloc)
            hints.pop("INFRA_ALLOCATION", None)  # the supervisor sets it from ``allocation``
            env.update(hints)
        return StartRequest(
            run_id=run_id,
            instance_id=rec.instance_id,
            command=spec.command,
            cwd=instance_cwd(node, spec),
            env=tuple(sorted(env.items())),
            allocation=alloc_doc,
            restart=RestartPolicy.from_config(self.cluster.failover,
                                              auto_restart=spec.auto_restart,
                                              max_retries=spec.max_retries,
                                              always=spec.job_type in (JobType.SERVICE,
                                                                       JobType.SYSTEM)),
            placement=rec.placement_id,
            claim=claim_request(node, spec, alloc, force=rec.instance_id in self.forced),
            claims_dir=node.claims_dir,
            fence=self.fenced(spec),
            telemetry_interval=self.cluster.telemetry.interval_seconds,
        )

    async def start_instance(self, run_id: str, rec: InstanceRecord, tries: int = 0) -> None:
        """Start one instance through the node's supervisor (idempotent on the node).

        The node checks the start against its live claims under its node-wide lock; when it
        refuses (another coordinator's work took the room), the instance is placed again.
        """
        self.store.update_instance(run_id, rec.instance_id, state=InstancePhase.STARTING)
        request = self.start_request(run_id, rec)
        answer: InstanceState | InfraError
        try:
            answer = await (await self.client(rec.node)).start(request)
        except InfraError as exc:
            answer = exc
        await self._started(run_id, rec, request, answer, tries)

    async def _ready(self, node_name: str) -> None:
        """Connect to the node and install its scripts if missing (errors come again, and
        are reported, at the start that follows)."""
        with contextlib.suppress(InfraError):
            await (await self.client(node_name)).ensure_installed()

    async def start_node(self, run_id: str, node_name: str,
                         records: Sequence[InstanceRecord]) -> None:
        """Start all of one node's instances in one batched call (one lock, one round trip);
        each instance's refusal or failure stays its own."""
        for rec in records:
            self.store.update_instance(run_id, rec.instance_id, state=InstancePhase.STARTING)
        requests = [self.start_request(run_id, rec) for rec in records]
        answers: list[InstanceState | InfraError]
        try:
            answers = await (await self.client(node_name)).start_batch(requests)
        except InfraError as exc:
            answers = [exc] * len(records)
        await asyncio.gather(*(self._started(run_id, rec, request, answer, 0)
                               for rec, request, answer in zip(records, requests, answers,
                                                               strict=True)))

    async def _started(self, run_id: str, rec: InstanceRecord, request: StartRequest,
                       answer: InstanceState | InfraError, tries: int) -> None:
        """Fold a start's answer in: a stale copy stopped and started again, a refusal
        placed again, a failure recorded, a start applied."""
        node = rec.node
        if isinstance(answer, StaleCopyError):
            self.event(run_id, "stale", rec.instance_id, f"{answer.one_line()}: stopping it")
            try:
                client = await self.client(node)
                await client.stop(run_id, rec.instance_id, grace=10.0)
                answer = await client.start(request)
            except InfraError as exc:
                answer = exc
        if isinstance(answer, CapacityRefusedError):
            await self._place_refused(run_id, rec, answer.reason, tries)
            return
        if isinstance(answer, InfraError):
            self.store.update_instance(run_id, rec.instance_id, state=InstancePhase.FAILED,
                                       reason=f"start failed on {node}: {node_reason(answer)}")
            self.event(run_id, "start", rec.instance_id, f"start failed on {node}: "
                       f"{node_reason(answer)}")
            return
        self.apply_state(run_id, rec, answer)
        verb = "already started" if answer.already else "started"
        self.event(run_id, "start", rec.instance_id, f"{verb} on {node} (pid {answer.pid})")

    def deploy_failed(self, run_id: str, rec: InstanceRecord, why: str) -> None:
        """The instance cannot start: its node did not take the tree. Failed, with why."""
        self.mark(run_id, rec, InstancePhase.FAILED, f"deploy to {rec.node} failed: {why}")

    async def _place_refused(self, run_id: str, rec: InstanceRecord, why: str,
                             tries: int) -> None:
        """A node refused the start: place the instance again from every node's claims."""
        self.event(run_id, "refused", rec.instance_id, f"{why}; placing it again")
        if tries >= MAX_REPLACE_TRIES:
            self.mark(run_id, rec, InstancePhase.FAILED,
                      f"no room: {why} (placed again {tries} times)")
            return
        claims = await claims_of([n.name for n in self.cluster.nodes if n.enabled], self.client)
        conds: dict[str, NodeCondition] = {}
        for name, found in claims.items():
            if isinstance(found, InfraError):
                conds[name] = NodeCondition(Condition.UNAVAILABLE, found.one_line())
        from infra.runner.nodeops import admin_conditions, merge_conditions
        conds = merge_conditions(conds, admin_conditions(self.cluster, self.store))
        if self.pinned(run_id, rec.instance_id):  # placed again only where it was pinned
            conds = self.pin_conditions(rec, conds)
        occupied = occupied_work(self.cluster, claims, self.store.active_instances(),
                                 but=(run_id, rec.instance_id))
        result = plan(self.cluster, [rec.spec], conditions=conds, occupied=occupied)
        target = result.node_of(rec.instance_id)
        if target is None:
            self.mark(run_id, rec, InstancePhase.FAILED,
                      f"no room: {why}; no node can take it now: "
                      f"{why_not(result, rec.instance_id)}")
            return
        alloc = result.allocation_of(rec.instance_id)
        self.store.update_instance(run_id, rec.instance_id, node=target,
                                   allocation=alloc.with_run(run_id) if alloc else None,
                                   state=InstancePhase.DEPLOYING,
                                   reason=f"placed again on {target}: {why}")
        self.event(run_id, "placed", rec.instance_id, f"placed again on {target}")
        if target != rec.node and await self.deploy_for_run(run_id, [target],
                                                            only=rec.instance_id):
            self.mark(run_id, rec, InstancePhase.FAILED, f"deploy to {target} failed")
            return
        await self.start_instance(run_id, self.store.instance(run_id, rec.instance_id),
                                  tries + 1)

    async def launch(self, run_id: str) -> None:
        """Deploy to the run's nodes and start their instances, each node on its own: a node's
        instances start in one batched call as soon as its own deploy is done and every
        node's deletion check has passed (a refused deploy still starts nothing anywhere)."""
        self.store.set_run_state(run_id, RunState.STARTING)
        records = [r for r in self.store.instances(run_id) if r.node]  # not queued work
        by_node: dict[str, list[InstanceRecord]] = {}
        for rec in records:
            by_node.setdefault(rec.node, []).append(rec)
        for name in by_node:
            self.refusals.pop(name, None)  # an earlier launch's refusal is not this one's
        gate = _CheckGate(set(by_node))
        # connect and check the node-side scripts while the tree is being deployed
        ready = {name: asyncio.create_task(self._ready(name)) for name in by_node}

        async def then(node_name: str, why: str | None) -> None:
            gate.passed(node_name)
            if why is not None:
                return  # failed here: recorded below, once refusals are known
            await gate.wait()
            await ready[node_name]
            if not self.refusals.keys() & by_node.keys():
                await self.start_node(run_id, node_name, by_node[node_name])

        try:
            failed_nodes = await self.deploy_for_run(run_id, by_node, on_checked=gate.passed,
                                                     then=then)
        finally:
            for task in ready.values():
                task.cancel()
            await asyncio.gather(*ready.values(), return_exceptions=True)
        refused = sorted(n for n in failed_nodes if n in self.refusals)
        if refused:  # the run refuses as a whole: nothing starts until deletions are confirmed
            for rec in records:
                why = (f"deploy to {rec.node} refused: {failed_nodes[rec.node]}"
                       if rec.node in failed_nodes else
                       f"not started: deploy refused on {', '.join(refused)}")
                self.store.update_instance(run_id, rec.instance_id, state=InstancePhase.FAILED,
                                           reason=why)
            self.store.set_run_state(run_id, RunState.FAILED)
            return
        for rec in records:
            if rec.node in failed_nodes:
                self.deploy_failed(run_id, rec, failed_nodes[rec.node])
        self.store.set_run_state(run_id, RunState.RUNNING)

    # ------------------------------------------------------------------ status

    def apply_state(self, run_id: str, rec: InstanceRecord, state: InstanceState) -> None:
        """Fold the supervisor's view of an instance into the store; events on changes.

        A paused instance stays paused when its node reports it over (the pause reason is
        the useful one); it becomes running again only if the node says it still runs. A
        full disk on an active instance becomes its reason and a "disk" event.
        """
        phase = _PHASE_OF_STATUS[state.status]
        if state.fenced and state.is_final:
            phase = InstancePhase.LOST  # stopped by its node's fence: to be placed again
        reason = state.final_reason or ""
        if not reason and state.attempts and state.attempts[-1].reason:
            reason = state.attempts[-1].reason or ""
        disk_full = None if state.is_final else state.disk_full
        if disk_full is not None and _NO_SPACE not in reason:
            reason = f"{reason}; {disk_full}" if reason else disk_full
        if rec.state is InstancePhase.PAUSED and state.is_final:
            return
        self.store.update_instance(
            run_id, rec.instance_id, changed_only=True,  # a tick that hears the same: no write
            state=phase, pid=state.pid, exit_code=state.exit_code,
            signal=state.signal, started_at=state.started_at or state.created_at,
            ended_at=state.ended_at if state.is_final else None, restarts=state.restarts,
            reason=reason, last_line=state.last_line[:200], failure_class=state.failure_class)
        if disk_full is not None and _NO_SPACE not in (rec.reason or ""):
            self.event(run_id, "disk", rec.instance_id, f"disk full on {rec.node}: "
                       f"{disk_full}; output and results written now are lost")
        if state.restarts > rec.restarts:
            ended = [a for a in state.attempts if a.ended_at is not None]
            why = ended[-1].reason if ended and ended[-1].reason else reason
            self.event(run_id, "restart", rec.instance_id,
                       f"restarted on {rec.node} (attempt {state.restarts + 1}) after: {why}")
        quiet = rec.state in (InstancePhase.DISPATCHED, InstancePhase.QUEUED) and \
            phase in (InstancePhase.RUNNING, InstancePhase.EXITED)  # a task's usual course
        if phase != rec.state and not quiet and rec.state not in (InstancePhase.STARTING,
                                                                   InstancePhase.PLANNED,
                                                                   InstancePhase.DEPLOYING,
                                                                   InstancePhase.MOVING):
            detail = f" ({reason})" if reason else ""
            self.event(run_id, "state", rec.instance_id, f"{rec.state.value} -> "
                       f"{phase.value}{detail}")

    async def sweep(self, run_id: str, skip: Iterable[str] = (), *,
                    fence_seconds: float | None = None, fence_clear: bool = False,
                    stop_stale: bool = True, telemetry: bool = False,
                    guard: Callable[[], bool] | None = None) -> dict[str, InfraError]:
        """One status call per node of the run; returns node -> error for nodes that failed.

        An unreachable node gives a ``TransportError``; a node whose answer is malformed or
        far too long a ``BadAnswerError`` (the node is broken). Either way the other nodes'
        answers are applied.

        Nodes an instance was moved away from are asked too: a copy still running there
        (the node came back) is stopped, so there are never two -- only with ``stop_stale``,
        which only the coordinator acting on the run (the lease holder) sets; a reporter
        (``status``, a second ``watch``) just records. ``skip`` names nodes not to contact
        this time (known to be down). ``fence_seconds`` renews the fences of the run's fenced
        work on each node (only the acting watcher does); ``fence_clear`` clears them (the
        watcher detaches: work nobody watches is never fenced). With ``telemetry`` (the
        acting watcher only) the same call brings the telemetry of each node's started,
        undrained work home, appended exactly once (``guard`` is asked before each write).
        """
        records = self.store.instances(run_id)
        skipped = set(skip)
        by_node: dict[str, list[InstanceRecord]] = {}
        for rec in records:
            if rec.node and rec.node not in skipped:  # queued work is on no node yet
                by_node.setdefault(rec.node, []).append(rec)
            for old in rec.previous_nodes:
                if old not in skipped and old != rec.node:
                    by_node.setdefault(old, [])

        holder = coordinator_id()
        asked: dict[str, dict[str, int]] = {}  # node -> instance -> telemetry offset asked

        pooled = {p.node for p in self.store.pools(run_id)}
        for name in pooled - skipped:
            by_node.setdefault(name, [])

        async def one(node_name: str) -> tuple[str, list[InstanceState] | InfraError]:
            # what the node may still change: work not over (paused and lost work may be
            # found running again), on this node or moved away from it (stale copies)
            mine = [r for r in records
                    if r.node == node_name or node_name in r.previous_nodes]
            only = [r.instance_id for r in mine if r.state not in SETTLED] \
                if len(mine) > DESCRIBE_ALL_UP_TO else None
            if telemetry:
                asked[node_name] = tele.wanted(self.cluster.log_dir,
                                               [r for r in mine if r.node == node_name])
            try:
                client = await self.client(node_name)
                states, pools = await client.status_with_pools(
                    run_id, fence_seconds=fence_seconds, fence_clear=fence_clear,
                    holder=holder, only=only, telemetry=asked.get(node_name))
                if node_name in pooled:  # the same one call also reports the run's pools
                    self._record_pools(run_id, node_name, pools)
            except InfraError as exc:
                return node_name, exc
            if fence_seconds is not None:
                self.renewed[node_name] = time.monotonic()
            return node_name, states

        errors: dict[str, InfraError] = {}
        answers: list[tuple[str, dict[str, InstanceState]]] = []
        for node_name, result in await asyncio.gather(*(one(n) for n in by_node)):
            if isinstance(result, InfraError):
                errors[node_name] = result
                continue
            found = {s.instance_id: s for s in result}
            if stop_stale:
                await self._stop_stale_copies(run_id, node_name, records, found)
            answers.append((node_name, found))
        # every node's answer folded in with one commit: nothing below awaits, and the lease
        # checks before telemetry writes read the store inside the same transaction
        with self.store.tx():
            self._fold_answers(run_id, by_node, answers, asked, guard)
        self._settle_run(run_id)
        return errors

    def _fold_answers(self, run_id: str, by_node: dict[str, list[InstanceRecord]],
                      answers: list[tuple[str, dict[str, InstanceState]]],
                      asked: dict[str, dict[str, int]],
                      guard: Callable[[], bool] | None) -> None:
        """Apply each node's instance states and append the telemetry it brought."""
        for node_name, found in answers:
            for rec in by_node[node_name]:
                state = found.get(rec.instance_id)
                if state is not None and state.placement != rec.placement_id:
                    state = None  # an earlier placement's copy: not this record's
                if state is not None:
                    self.apply_state(run_id, rec, state)
                elif rec.state in (InstancePhase.RUNNING, InstancePhase.RESTARTING):
                    self.store.update_instance(run_id, rec.instance_id, state=InstancePhase.LOST,
                                               reason=f"no record of it on {node_name}")
                    self.event(run_id, "state", rec.instance_id,
                               f"lost: no record of it on {node_name}")
            for rec in by_node[node_name]:
                offsets = asked.get(node_name, {})
                if rec.instance_id in offsets:
                    try:
                        tele.take_telemetry(self.store, self.cluster.log_dir, rec,
                                            offsets[rec.instance_id],
                                            found.get(rec.instance_id), guard, self.telemetry)
                    except LeaseLostError:
                        break  # not ours to write any more: the lease check says so next

    def _record_pools(self, run_id: str, node_name: str, pools: Sequence[PoolState]) -> None:
        """What a node says of the run's pools there (state, held and running tasks)."""
        rows = {p.name: p for p in self.store.pools(run_id) if p.node == node_name}
        for pool in pools:
            row = rows.get(pool.name)
            if row is None:
                continue
            reason = pool.waiting or pool.error or row.reason
            if (row.state, row.queued, row.running, row.reason) != \
                    (pool.phase.value, len(pool.queued), len(pool.running), reason):
                self.store.save_pool(run_id, row.campaign, node_name, state=pool.phase.value,
                                     queued=len(pool.queued), running=len(pool.running),
                                     reason=reason)

    async def _stop_stale_copies(self, run_id: str, node_name: str,
                                 records: list[InstanceRecord],
                                 found: dict[str, InstanceState]) -> None:
        for rec in records:
            state = found.get(rec.instance_id)
            if rec.node == node_name or state is None or state.is_final:
                continue
            if node_name not in rec.previous_nodes:
                continue
            try:
                await (await self.client(node_name)).stop(run_id, rec.instance_id, grace=5.0)
                self.event(run_id, "stale", rec.instance_id,
                           f"stopped a stale copy on {node_name} (pid {state.pid}); the "
                           f"instance runs on {rec.node} now")
            except InfraError as exc:
                self.event(run_id, "stale", rec.instance_id,
                           f"could not stop the stale copy on {node_name}: {node_reason(exc)}")

    # ------------------------------------------------------------------ recovery

    async def move_instance(self, run_id: str, rec: InstanceRecord,
                            conditions: dict[str, NodeCondition], why: str, *,
                            count: bool = True, keep_if_blocked: bool = False,
                            stop_old: bool = False, may_stay: bool = False) -> bool:
        """Re-place an instance off its node through the placement engine and start it there.

        Returns False when no node can take it: the instance is paused with the reason, or
        left as it is with ``keep_if_blocked`` (a drain retries later). ``count`` adds to the
        failure-move count (drains don't); ``stop_old`` stops the copy on the old node first
        (a drain: the node is reachable); ``may_stay`` lets the placement pick the same node
        again (a fenced copy on a node that is back). Every move is a new placement on the
        node (``placement_seq``), so a move back to an earlier node starts a fresh copy.
        """
        target = await self.begin_move(run_id, rec, conditions, why, count=count,
                                       keep_if_blocked=keep_if_blocked, stop_old=stop_old,
                                       may_stay=may_stay)
        if target is None:
            return False
        return await self.finish_move(run_id, rec.instance_id, why)

    async def begin_move(self, run_id: str, rec: InstanceRecord,
                         conditions: dict[str, NodeCondition], why: str, *,
                         count: bool = True, keep_if_blocked: bool = False,
                         stop_old: bool = False, may_stay: bool = False) -> str | None:
        """Choose the new node and record the move (MOVING) before touching it; the target.

        A coordinator killed after this finds the instance MOVING, and the next ``watch``
        finishes the move (deploy, then the idempotent start of the new placement).
        """
        conds = dict(conditions)
        if not may_stay:
            conds[rec.node] = NodeCondition(Condition.UNAVAILABLE, why)
        spec = rec.spec
        peers = [(r.spec, r.node, r.allocation) for r in self.store.instances(run_id)
                 if r.instance_id != rec.instance_id and r.state.active]
        result = plan(self.cluster, [spec], conditions=conds, peers=peers,
                      occupied=occupied_by(self.store.active_instances(exclude_run=run_id)))
        target = result.node_of(rec.instance_id)
        if target is None:
            reason = f"{why}; no node can take it: {why_not(result, rec.instance_id)}"
            if keep_if_blocked:
                self.event(run_id, "blocked", rec.instance_id, reason)
                return None
            self.store.update_instance(run_id, rec.instance_id, state=InstancePhase.PAUSED,
                                       reason=reason)
            self.event(run_id, "paused", rec.instance_id, reason)
            return None
        if stop_old:
            await (await self.client(rec.node)).stop(run_id, rec.instance_id, grace=10.0)
            await self.sync_log(run_id, rec, follow=False)  # drain the old copy's last lines
            await self.drain_telemetry(run_id, rec)
        path = local_log_path(self.cluster, run_id, rec.instance_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as fh:
            fh.write(f"[orchestrator] moved from {rec.node} to {target}: {why}\n".encode())
            base = fh.tell()
        new_alloc = result.allocation_of(rec.instance_id)
        self.store.update_instance(
            run_id, rec.instance_id, state=InstancePhase.MOVING, node=target,
            allocation=new_alloc.with_run(run_id) if new_alloc is not None else None,
            previous_nodes=(*rec.previous_nodes, rec.node),
            placement_seq=rec.placement_seq + 1,
            moves=rec.moves + (1 if count else 0), pid=None, failure_class=None,
            exit_code=None, signal=None, ended_at=None, restarts=0, log_base=base,
            log_offset=base, results_fetched=0, results_missing="[]",
            **tele.restart_fields(self.cluster.log_dir, run_id, rec.instance_id),
            reason=f"moving from {rec.node}: {why}")
        self.event(run_id, "move", rec.instance_id, f"moving from {rec.node} to {target}: {why}")
        self.store.set_run_state(run_id, RunState.RUNNING)
        return target

    async def finish_move(self, run_id: str, instance_id: str, why: str) -> bool:
        """Deploy to the node a move chose and start the new placement there."""
        moved = self.store.instance(run_id, instance_id)
        failed = await self.deploy_for_run(run_id, [moved.node], only=instance_id)
        if moved.node in failed:
            self.store.update_instance(run_id, instance_id, state=InstancePhase.PAUSED,
                                       reason=f"{why}; deploy to {moved.node} failed: "
                                              f"{failed[moved.node]}")
            return False
        await self.start_instance(run_id, moved)
        return True

    def mark(self, run_id: str, rec: InstanceRecord, phase: InstancePhase, reason: str) -> None:
        self.store.update_instance(run_id, rec.instance_id, state=phase, reason=reason)
        self.event(run_id, phase.value, rec.instance_id, reason)

    def _settle_run(self, run_id: str) -> None:
        records = self.store.instances(run_id)
        if records and all(r.state.finished for r in records):
            run = self.store.run(run_id)
            if run.state not in (RunState.FINISHED, RunState.STOPPED, RunState.FAILED):
                bad = [r for r in records if r.state in (InstancePhase.FAILED, InstancePhase.LOST,
                                                         InstancePhase.PAUSED)]
                final = RunState.FAILED if bad else RunState.FINISHED
                if all(r.state is InstancePhase.STOPPED for r in records):
                    final = RunState.STOPPED
                self.store.set_run_state(run_id, final)
                self.event(run_id, "run", run_id, f"run {final.value}")

    # ------------------------------------------------------------------ logs

    async def sync_log(self, run_id: str, rec: InstanceRecord, *, follow: bool,
                       on_bytes: Callable[[bytes], None] | None = None,
                       guard: Callable[[], bool] | None = None) -> int:
        """Append the node's log bytes to the local copy from where the copy ends.

        The local file's size is the offset, so after any interruption the stream resumes
        with no byte lost and none written twice. ``guard`` is asked before every write: the
        copy has one writer, the lease holder, and a coordinator that lost the lease (it was
        frozen past its lease) must not append bytes its successor appends too; it raises
        ``LeaseLostError`` then. Returns the new size.
        """
        path = local_log_path(self.cluster, run_id, rec.instance_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        client = await self.client(rec.node)
        with open(path, "ab") as fh:

            def write(data: bytes) -> None:
                if guard is not None and not guard():
                    raise LeaseLostError(f"{run_id}: the run's lease was lost; not writing "
                                         f"{rec.instance_id}'s log copy")
                fh.write(data)
                fh.flush()
                if on_bytes:
                    on_bytes(data)

            offset = fh.tell() - rec.log_base  # where the current node's log continues
            if offset < 0:
                offset = 0
            if follow:
                async for chunk in client.follow(run_id, rec.instance_id, offset):
                    write(chunk)
            else:
                while True:
                    piece = await client.read(run_id, rec.instance_id, offset)
                    if piece.data:
                        write(piece.data)
                    offset = fh.tell() - rec.log_base
                    if piece.eof or not piece.data:
                        break
            size = fh.tell()
        self.store.update_instance(run_id, rec.instance_id, log_offset=size)
        return size

    async def drain_telemetry(self, run_id: str, rec: InstanceRecord,
                              guard: Callable[[], bool] | None = None) -> None:
        """Bring a stopped copy's remaining telemetry home before it is left behind (a
        drain's move); best effort: what a node cannot send now stays on it."""
        asked = tele.node_offset(self.cluster.log_dir, rec)
        for _ in range(64):  # each call brings at most the per-instance cap
            try:
                states, _pools = await (await self.client(rec.node)).status_with_pools(
                    run_id, only=[rec.instance_id], telemetry={rec.instance_id: asked})
            except InfraError:
                return
            mine = next((s for s in states if s.instance_id == rec.instance_id), None)
            if mine is None or mine.telemetry is None or mine.placement != rec.placement_id:
                return
            if tele.append_chunk(self.store, self.cluster.log_dir, rec, asked, mine.telemetry,
                                 guard) is None or mine.telemetry.eof:
                return
            asked = mine.telemetry.offset

    async def stream_log_until_done(self, run_id: str, instance_id: str, *,
                                    retry_delay: float = 1.0, attempts: int = LOG_SYNC_ATTEMPTS,
                                    on_bytes: Callable[[bytes], None] | None = None,
                                    guard: Callable[[], bool] | None = None) -> None:
        """Follow one instance's log until it ended and is drained, reconnecting on drops.

        A dropped link is retried for as long as it takes (the node tracker decides when a
        node is gone); a node that answers but refuses (no record of the instance, a broken
        supervisor) is retried ``attempts`` times in a row, then its error is raised.
        """
        refused = 0
        while True:
            rec = self.store.instance(run_id, instance_id)
            try:
                await self.sync_log(run_id, rec, follow=True, on_bytes=on_bytes, guard=guard)
                rec = self.store.instance(run_id, instance_id)
                if rec.state.finished:
                    # drained after the end: one last non-following read closes any gap
                    await self.sync_log(run_id, rec, follow=False, on_bytes=on_bytes,
                                        guard=guard)
                    return
                # follow ended: the instance ended on the node; the sweep will record it
                state = await (await self.client(rec.node)).status(run_id,
                                                                   only=[instance_id])
                mine = [s for s in state if s.instance_id == instance_id]
                if not mine or mine[0].is_final:
                    await self.sync_log(run_id, rec, follow=False, on_bytes=on_bytes,
                                        guard=guard)
                    return
                refused = 0
            except (CommandFailedError, BadAnswerError) as exc:
                refused += 1
                if refused >= attempts:
                    raise
                self.emit("log", instance_id, f"log sync refused ({exc.reason}); "
                          f"retry {refused}/{attempts - 1}")
            except TransportError as exc:
                self.emit("log", instance_id, f"log stream interrupted ({exc.reason}); "
                          "resuming")
            await asyncio.sleep(retry_delay)

    async def harvest(self, run_id: str, node: str, records: Sequence[InstanceRecord], *,
                      results_for: frozenset[str] = frozenset(),
                      guard: Callable[[], bool] | None = None) -> dict[str, HarvestOutcome]:
        """Logs (and results of ``results_for``) of many instances on one node in one call
        (see ``infra.runner.harvest``)."""
        return await harvest.harvest_node(self, run_id, node, records,
                                          results_for=results_for, guard=guard)

    # ------------------------------------------------------------------ results

    async def fetch_results(self, run_id: str, rec: InstanceRecord) -> ResultsFetch:
        """Copy results home and record what did not come (see ``infra.runner.results``)."""
        node = self.cluster.node(rec.node)
        return await results.fetch_results(self, rec, list(rec.spec.results),
                                           instance_cwd(node, rec.spec))

    # ------------------------------------------------------------------ stop

    async def stop(self, run_id: str, instance_id: str | None = None,
                   grace: float = 10.0) -> StopReport:
        """Stop a run (or one instance): SIGTERM to the process group, SIGKILL after grace.

        Only instances not over in the store are asked for; those already over (exited,
        failed, stopped, lost, paused) are left as they are, and so is the run's state
        unless something was actually stopped.
        """
        records = self.store.instances(run_id)
        if instance_id is not None:
            records = [r for r in records if r.instance_id == instance_id]
            if not records:
                raise UsageError(f"run {run_id} has no instance {instance_id!r}")
        report = StopReport(already_over={r.instance_id: r.state.value
                                          for r in records if r.state.finished})
        waiting = [r.instance_id for r in records
                   if r.state in (InstancePhase.QUEUED, InstancePhase.DISPATCHED)]
        if waiting:  # never started: dropped from the queue (a pool drops its own copy)
            self.store.update_instances(run_id, waiting, state=InstancePhase.CANCELLED,
                                        reason="cancelled: stop requested")
            report.cancelled.extend(waiting)
        targets = [r for r in records if not r.state.finished and r.node
                   and r.instance_id not in waiting]
        by_node: dict[str, list[InstanceRecord]] = {}
        for rec in targets:
            by_node.setdefault(rec.node, []).append(rec)

        async def one(node_name: str, recs: list[InstanceRecord]) -> None:
            try:
                client = await self.client(node_name)
                states: list[InstanceState] = []
                if instance_id is None:
                    states = await client.stop(run_id, None, grace=grace)
                else:
                    states = await client.stop(run_id, instance_id, grace=grace)
            except InfraError as exc:
                report.errors[node_name] = node_reason(exc)
                return
            found = {s.instance_id: s for s in states}
            for rec in recs:
                if rec.instance_id in found:
                    self.apply_state(run_id, rec, found[rec.instance_id])

        await asyncio.gather(*(one(n, r) for n, r in by_node.items()))
        for rec in targets:
            self.store.add_event(run_id, "stop", rec.instance_id, f"stop requested "
                                 f"(grace {grace:g} s)")
            now = self.store.instance(run_id, rec.instance_id).state
            if now is InstancePhase.STOPPED:
                report.stopped.append(rec.instance_id)
            elif now.finished:  # it ended on its own before the stop reached it
                report.already_over[rec.instance_id] = now.value
        if instance_id is None and not report.errors and (report.stopped or report.cancelled):
            self.store.set_run_state(run_id, RunState.STOPPED)
        self._settle_run(run_id)
        return report

