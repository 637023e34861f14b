"""The live loop behind ``--monitor-duration`` and ``watch``.

Each tick: one status sweep per reachable node of the run; a probe per node when its
health interval (or reconnect backoff) is due; node-loss transitions recorded as events;
recovery by policy (move, pause, lose) for work on offline nodes and for instances whose
restarts are exhausted; log streams home; results fetched when instances end; a snapshot
for the dashboard and the saved-state file.

The run's lease (in the store) decides which coordinator *acts*: streams logs home,
applies the policies, fetches results. The holder renews it every tick and checks it again
right before acting; a renewal that fails (another coordinator took the lease over, e.g.
after this process was frozen past the lease) ends the acting role at once: streams are
cancelled and this loop goes on as a reporter, like any second watcher, which takes the
lease over when it frees or expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from infra.campaign.progress import Progress, render_bar
from infra.config.model import RecoverPolicy
from infra.errors import BadAnswerError, CommandFailedError, InfraError, StateError
from infra.monitor import tracker as trk
from infra.monitor.saved import SavedState
from infra.monitor.snapshot import (
    EventView,
    GpuView,
    InstanceView,
    NodeState,
    NodeView,
    RunSnapshot,
    TelemetryView,
)
from infra.placement import Condition, NodeCondition
from infra.probe.health import NodeHealth, NodeStatus
from infra.probe.run import check_health
from infra.runner.campaign import CampaignDriver
from infra.runner.lifecycle import LOG_SYNC_ATTEMPTS, RunSession
from infra.runner.telemetry_home import Latest, last_sample
from infra.state import FailureClass, InstancePhase, InstanceRecord
from infra.state.store import coordinator_id
from infra.telemetry.files import telemetry_path

FOLLOW_STREAMS_PER_NODE = 4
HARVEST_PER_TICK = 64
"""Ended instances per node whose logs and results one tick copies home, in one batched
supervisor call (the rest wait for the next tick)."""
HARVEST_LONG_LOGS = 4
"""Ended instances per node whose logs, longer than a batch brings, are read to the end at
once (with the old chunked reads)."""
PROGRESS_WIDTH = 72
"""Width of a campaign's progress bar with its counts (the pool states follow it)."""
"""Long-lived follow channels per node; further instances are synced by reads each tick,
so streams never use up the connection's channels (OpenSSH MaxSessions is 10)."""
TELEMETRY_STALE_SECONDS = 6.0
"""A telemetry sample older than this is shown stale (dim, with its age), never as current."""
RESULT_FETCH_ATTEMPTS = 3
MAX_MOVES = 3
"""An instance is moved at most this many times; after that it is paused with the reason."""
RECENT_EVENTS = 50
FENCE_STOP_SECONDS = 8.0
"""After a fence expires: the supervisor's check interval and its SIGTERM->SIGKILL grace
(5 s), with a margin: only then is the old copy certainly gone."""
FENCED = "fenced:"
FENCE_CLEAR_SECONDS = 5.0
"""At most this long for clearing the fences when a watcher detaches."""
CANCEL_GRACE_SECONDS = 5.0
"""How long a cancelled tick or log task may take to wind down (its commands are killed)."""

SnapshotSink = Callable[[RunSnapshot], None]
DASHBOARD_KEYS = "Ctrl-C detaches: the experiments keep running (`stop RUN` stops them)"


@dataclass
class MonitorOutcome:
    """How watching ended."""

    finished: bool            # every instance is over, logs drained, results fetched
    lease_holder: str | None  # another coordinator held the lease at the end (we reported)
    unreachable: dict[str, str] = field(default_factory=dict)


def _never_started(rec: InstanceRecord) -> bool:
    """Over before any process ran (deploy or start failed): nothing of it is on the node."""
    return rec.pid is None and rec.state.finished


_CONDITION_OF = {
    NodeState.HEALTHY: Condition.HEALTHY, NodeState.UNKNOWN: Condition.UNKNOWN,
    NodeState.DEGRADED: Condition.DEGRADED, NodeState.DISCONNECTED: Condition.DISCONNECTED,
    NodeState.OFFLINE: Condition.OFFLINE, NodeState.MAINTENANCE: Condition.MAINTENANCE,
    NodeState.DRAINING: Condition.DRAINING,
}


class Monitor:
    """Watches one run; ``run()`` returns when it is over or the duration has passed."""

    def __init__(self, session: RunSession, run_id: str, *, tick: float = 1.0,
                 on_snapshot: SnapshotSink | None = None, holder: str | None = None,
                 saved: SavedState | None = None, lease_ttl: float | None = None) -> None:
        self.s = session
        self.run_id = run_id
        self.tick = tick
        self.on_snapshot = on_snapshot
        self.holder = holder or coordinator_id()
        self.saved = saved
        cfg = session.cluster.health_check
        # renewed every tick: a lease shorter than two ticks would lapse between renewals
        self.lease_ttl = max(lease_ttl if lease_ttl is not None else cfg.lease_seconds,
                             2 * tick)
        self.acting = False          # we hold the lease: we stream, apply policies, fetch
        self.other: str | None = None  # who holds it when we don't ("" unknown)
        self.announced = False       # the first lease decision was said
        stored = session.store.node_states()
        self.trackers: dict[str, trk.Tracker] = {}
        for node in session.cluster.nodes:
            if not node.enabled:
                continue
            state, reason, _since = stored.get(node.name, (NodeState.UNKNOWN.value, "", 0.0))
            try:
                st = NodeState(state)
            except ValueError:
                st = NodeState.UNKNOWN
            self.trackers[node.name] = trk.Tracker(node.name, st, reason,
                                                   failures=cfg.reconnect_attempts
                                                   if st is NodeState.OFFLINE else 0)
        self.health: dict[str, NodeHealth] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.drained: set[str] = set()
        self.fetch_failures: dict[str, int] = {}
        self.started = time.monotonic()
        self.fence_waits: set[str] = set()
        self.last_seen: dict[str, float] = {}  # node -> wall time it last answered
        self.probed_at: dict[str, float] = {}  # node -> wall time of its last good probe
        self.log_failures: dict[str, int] = {}
        self.log_gave_up: dict[str, str] = {}  # instance -> the node its log was given up on
        self.kept: set[str] = set()  # failed instances said not to be moved (said once)
        self.campaigns = CampaignDriver(session, run_id)

    # ------------------------------------------------------------------ main loop

    async def run(self, duration: float | None) -> MonitorOutcome:
        deadline = None if duration is None else time.monotonic() + duration
        self.started = time.monotonic()  # a fence renewed before now has expired by started+T
        outcome = MonitorOutcome(finished=False, lease_holder=None)
        try:
            while True:
                await self.hold_lease()
                unreachable = await self._bounded_tick(self.acting, deadline)
                cut = unreachable is None
                if unreachable is not None:
                    outcome.unreachable = unreachable
                records = {r.instance_id: r for r in self.s.store.instances(self.run_id)}
                self.publish(records)
                if cut:
                    break
                if self._all_done(records, acting=self.acting):
                    outcome.finished = True
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    break
                wait = self.tick if deadline is None else \
                    max(0.0, min(self.tick, deadline - time.monotonic()))
                await asyncio.sleep(wait)
        finally:
            await self._cancel_streams()
            if self.acting:
                if not outcome.finished:
                    await self._clear_fences()
                with contextlib.suppress(StateError):
                    self.s.store.release_lease(self.run_id, self.holder)
        outcome.lease_holder = None if self.acting else self.other
        return outcome

    @property
    def fence_seconds(self) -> float | None:
        """The fence this watcher renews on every sweep (None: fencing is off)."""
        value = self.s.cluster.failover.fence_timeout_seconds
        return value if value > 0 else None

    async def _clear_fences(self) -> None:
        """Detaching: clear the run's fences, so work nobody watches keeps running.

        Only nodes that answer get cleared; this never holds up the detach for long: a node
        that cannot be told fences its work after the timeout (the next ``watch`` restarts it).
        The run's campaign pools are told at the same time (they keep starting their queued
        tasks while nobody watches).
        """
        if self.fence_seconds is None:
            return
        fenced = {r.node for r in self.s.store.instances(self.run_id)
                  if r.state.active and self.s.fenced(r.spec)}
        pooled = {p.node for p in self.s.store.pools(self.run_id) if not p.abandoned}
        down = {n for n in fenced | pooled if self._node_down(n)}
        if not (fenced | pooled) - down:
            return
        bound = min(self.s.cluster.health_check.timeout_seconds, FENCE_CLEAR_SECONDS)

        async def instances() -> set[str]:
            if not fenced - down:
                return set()
            return set(await self.s.sweep(self.run_id, skip=down, fence_clear=True,
                                          stop_stale=False))

        async def pools() -> set[str]:
            if not pooled - down:
                return set()
            return set(await self.campaigns.clear_fences(down))

        try:
            answers = await asyncio.wait_for(asyncio.gather(instances(), pools()),
                                             timeout=bound)
            failed = answers[0] | answers[1]
        except (asyncio.TimeoutError, InfraError):
            failed = (fenced | pooled) - down
        for node in sorted(((fenced | pooled) & failed) | down):
            self.s.emit("fence", node, "could not clear the fences there; its watched work "
                        "stops after the fence timeout unless the run is watched again")

    def fence_wait(self, node: str) -> float:
        """Seconds until ``node`` has certainly stopped its fenced work (0: it has)."""
        if self.fence_seconds is None:
            return 0.0
        heard = max(self.s.renewed.get(node, 0.0), self.started)
        return max(0.0, heard + self.fence_seconds + FENCE_STOP_SECONDS - time.monotonic())

    async def _bounded_tick(self, acting: bool,
                            deadline: float | None) -> dict[str, str] | None:
        """One tick; with a deadline, cut short when it ends (None: the tick was cut).

        Each remote call has its own timeout, but several in a row (a frozen node: a sweep,
        then a probe) could outlast ``--duration`` by far; the remaining time bounds them all.
        A tick always gets at least one tick interval, so a short duration still sweeps.
        """
        if deadline is None:
            return await self.tick_once(acting=acting)
        budget = max(deadline - time.monotonic(), self.tick)
        task = asyncio.ensure_future(self.tick_once(acting=acting))
        done, _ = await asyncio.wait({task}, timeout=budget)
        if done:
            return task.result()
        task.cancel()  # remote commands of a cancelled call are killed on their node
        await asyncio.wait({task}, timeout=CANCEL_GRACE_SECONDS)
        if task.done() and not task.cancelled():
            return task.result()  # it finished (or failed) just as it was cancelled
        self.s.emit("watch", self.run_id, f"duration over; the last tick was cut short after "
                                          f"{budget:.1f} s (a node is slow to answer)")
        return None

    # ------------------------------------------------------------------ lease

    async def hold_lease(self) -> bool:
        """Renew the lease (acting) or try to take it (reporting); switch roles on change.

        Returns whether this loop acts now. A failed renewal -- another holder, or the store
        failing -- stops the acting role before anything else is done.
        """
        why = ""
        try:
            other = self.s.store.acquire_lease(self.run_id, self.holder, self.lease_ttl)
        except StateError as exc:
            other, why = self.other or "", exc.one_line()
        first = not self.announced
        self.announced = True
        if other is None:
            if not self.acting and not first:
                self._say("lease taken over: acting now")
            if not self.acting:  # fences the last holder renewed may run until now + T
                self.started = time.monotonic()
            self.acting, self.other = True, None
            return True
        if self.acting:
            await self._stop_acting(f"lease renewal failed ({why})" if why
                                    else f"lease lost to {other}")
        elif first:
            self._say(f"cannot take the lease ({why}); showing status only here" if why else
                      f"run is watched by {other}; showing status only here "
                      "(that coordinator streams logs and applies the policies)")
        self.other = other
        return False

    def holding(self) -> bool:
        """Cheap check before each action and each log write: the store still names us."""
        if not self.acting:
            return False
        try:
            lease = self.s.store.lease(self.run_id)
        except StateError:
            return False
        return lease is not None and lease.holder == self.holder

    async def _stop_acting(self, why: str) -> None:
        """Give up the acting role at once: cancel the log streams, say so, report on."""
        self.acting = False
        await self._cancel_streams()
        self.drained.clear()  # the new holder owns the copies now; re-check them if we return
        self._say(f"{why}; now only reporting")

    async def _cancel_streams(self) -> None:
        """Cancel the log streams; a cancelled follow kills its command at once (bounded)."""
        tasks = list(self.tasks.values())
        self.tasks.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CANCEL_GRACE_SECONDS)
        for task in tasks:
            if task.done() and not task.cancelled():
                task.exception()  # seen: its log copy resumes next time

    def _say(self, message: str) -> None:
        """A lease event: recorded with the run's events when the store allows, always shown."""
        try:
            self.s.event(self.run_id, "lease", self.run_id, message)
        except (InfraError, sqlite3.Error):
            self.s.emit("lease", self.run_id, message)

    async def tick_once(self, *, acting: bool) -> dict[str, str]:
        """One sweep + due probes + policies + logs/results. Returns unreachable nodes."""
        now = time.monotonic()
        down = {n for n, t in self.trackers.items()
                if t.state in (NodeState.RECONNECTING, NodeState.DISCONNECTED,
                               NodeState.OFFLINE)}
        errors = await self.s.sweep(self.run_id, skip=down, stop_stale=acting,
                                    fence_seconds=self.fence_seconds if acting else None,
                                    telemetry=acting, guard=self.holding)
        seen = time.time()
        for name in self.trackers:
            if name not in errors and name not in down:
                self.last_seen[name] = seen
        # a broken node that answered cleanly this time is probed at once to clear it
        due = [n for n, t in self.trackers.items()
               if n not in errors and (t.next_probe_at <= now or t.state is NodeState.BROKEN)]
        probes = await asyncio.gather(*(self._probe(n) for n in due))
        now = time.monotonic()
        for name, exc in errors.items():
            if name not in self.trackers:
                continue
            if isinstance(exc, BadAnswerError):  # reachable, but its answers are unusable
                self._apply(*trk.on_broken(self.trackers[name], exc.one_line()))
            else:
                self._apply(*trk.on_failure(self.trackers[name], now, exc.one_line(),
                                            self.s.cluster.health_check))
        for health in probes:
            t = self.trackers[health.node]
            if health.status is NodeStatus.UNAVAILABLE:
                self._apply(*trk.on_failure(t, now, health.error or "unreachable",
                                            self.s.cluster.health_check))
            else:
                self.health[health.node] = health
                self.probed_at[health.node] = time.time()
                degraded = "; ".join(health.reasons) if health.status is NodeStatus.DEGRADED \
                    else None
                self._apply(*trk.on_success(t, now, degraded, self.s.cluster.health_check))
        # the sweep and probes may have taken a while: renew right before acting
        if acting and await self.hold_lease():
            await self._recover()
            if self.holding():
                await self.campaigns.tick(self.conditions(), down=down | set(errors),
                                          lost=self._lost_nodes(),
                                          fence_seconds=self.fence_seconds)
            records = {r.instance_id: r for r in self.s.store.instances(self.run_id)}
            await self._service_logs_and_results(records)
        return {n: t.reason for n, t in self.trackers.items()
                if t.state in (NodeState.RECONNECTING, NodeState.DISCONNECTED,
                               NodeState.OFFLINE)}

    async def _probe(self, name: str) -> NodeHealth:
        node = self.s.cluster.node(name)
        transport = await self.s.pool.get(node)
        return await check_health(transport, node, self.s.cluster.health_check.checks,
                                  self.s.cluster.health_check.timeout_seconds)

    def _apply(self, new: trk.Tracker, transition: trk.Transition | None) -> None:
        self.trackers[new.node] = new
        if transition is None:
            return
        self.s.store.set_node_state(new.node, new.state.value, new.reason)
        self.s.event(self.run_id, "node", new.node,
                     f"{transition.old.value} -> {transition.new.value}: {transition.reason}")

    # ------------------------------------------------------------------ policies

    def conditions(self) -> dict[str, NodeCondition]:
        """Where moved work may go: live health, overridden by operator states."""
        from infra.runner.nodeops import admin_conditions, merge_conditions
        health = {n: NodeCondition(_CONDITION_OF.get(t.state, Condition.UNAVAILABLE), t.reason)
                  for n, t in self.trackers.items()}
        return merge_conditions(health, admin_conditions(self.s.cluster, self.s.store))

    async def _resume_launch(self) -> None:
        """Finish a launch a dead coordinator left half done (starts are idempotent)."""
        records = self.s.store.instances(self.run_id)
        pending = [r for r in records if r.pid is None and r.state in (
            InstancePhase.PLANNED, InstancePhase.DEPLOYING, InstancePhase.STARTING,
            InstancePhase.MOVING)]
        if not pending:
            return
        nodes = {r.node for r in pending if not self._node_down(r.node)}
        failed = await self.s.deploy_for_run(self.run_id, nodes, only="resume")
        for rec in pending:
            if rec.node in failed:  # failed with the reason, not retried every tick
                self.s.deploy_failed(self.run_id, rec, failed[rec.node])
            elif rec.node in nodes and self.holding():
                self.s.emit("start", rec.instance_id, "resuming an unfinished launch")
                await self.s.start_instance(self.run_id, rec)

    def _lost_nodes(self) -> set[str]:
        """Offline nodes whose fenced work has certainly stopped: their tasks go elsewhere."""
        out = set()
        for name, t in self.trackers.items():
            if t.state is NodeState.OFFLINE and self.fence_wait(name) <= 0:
                out.add(name)
        return out

    async def _recover(self) -> None:
        """Apply each instance's ``recover`` policy to lost nodes and exhausted restarts.

        Campaign tasks are the campaign driver's: it requeues them instead of moving them,
        and a task that used up its attempts stays failed (the campaign goes on)."""
        await self._resume_launch()
        for rec in self.s.store.instances(self.run_id):
            if rec.spec.campaign is not None or not rec.node:
                continue
            t = self.trackers.get(rec.node)
            policy = rec.spec.recover
            case = self._recovery_case(rec, t, policy)
            if case is None:  # the lease is read before each action, not for rows needing none
                continue
            if not self.holding():
                return
            if case == "offline" and t is not None:
                why = f"node {rec.node} offline ({t.reason})"
                wait = self.fence_wait(rec.node) if self.s.fenced(rec.spec) else 0.0
                if wait > 0:
                    if rec.instance_id not in self.fence_waits:
                        self.fence_waits.add(rec.instance_id)
                        self.s.event(self.run_id, "fence", rec.instance_id,
                                     f"{why}; waiting {wait:.0f} s for its fence to stop the "
                                     "copy there before starting another")
                    continue
                self.fence_waits.discard(rec.instance_id)
                await self._recover_one(rec, policy, why, lost=True)
            elif case == "fenced":
                why = f"fenced on {rec.node} while no coordinator was heard"
                await self.s.move_instance(self.run_id, rec, self.conditions(), why,
                                           may_stay=True)
            else:
                why = f"restarts exhausted on {rec.node} ({rec.reason})"
                if rec.failure_class is FailureClass.BROKEN_COMMAND:
                    self._not_moved(rec, "the command is broken: it would fail anywhere")
                elif self.s.pinned(self.run_id, rec.instance_id):
                    self._not_moved(rec, f"pinned to {rec.node} (--placement)")
                else:
                    await self._recover_one(rec, policy, why, lost=False)

    def _recovery_case(self, rec: InstanceRecord, t: trk.Tracker | None,
                       policy: RecoverPolicy) -> str | None:
        """What ``_recover`` does for ``rec``: ``offline`` (its node is lost), ``fenced``
        (its node fenced it), ``exhausted`` (restarts used up), or None (nothing)."""
        if t is not None and t.state is NodeState.OFFLINE and rec.state.active:
            return "offline"
        if rec.state is InstancePhase.LOST and rec.reason.startswith(FENCED) \
                and policy is RecoverPolicy.CLUSTER and rec.moves < MAX_MOVES:
            return "fenced"
        # restarts exhausted: a broken command would fail anywhere, and a pin names the
        # one node the user wants; neither is moved (node loss still moves pinned work)
        if rec.state is InstancePhase.FAILED and policy is RecoverPolicy.CLUSTER \
                and self._auto_restart(rec) and rec.pid is not None \
                and not rec.reason.startswith(("stop", "start failed", "deploy")) \
                and rec.moves < MAX_MOVES and "moved" not in rec.reason:
            return "exhausted"
        return None

    def _not_moved(self, rec: InstanceRecord, why: str) -> None:
        """Say once why a failed instance stays failed where it is."""
        if rec.instance_id in self.kept:
            return
        self.kept.add(rec.instance_id)
        self.s.event(self.run_id, "failed", rec.instance_id, f"not moved: {why}")

    def _auto_restart(self, rec: InstanceRecord) -> bool:
        """The spec's ``auto_restart``, else the cluster's ``failover.auto_restart``."""
        own = rec.spec.auto_restart
        return self.s.cluster.failover.auto_restart if own is None else own

    async def _recover_one(self, rec: InstanceRecord, policy: RecoverPolicy, why: str, *,
                           lost: bool) -> None:
        if policy is RecoverPolicy.CLUSTER and rec.moves < MAX_MOVES:
            await self.s.move_instance(self.run_id, rec, self.conditions(), why)
        elif policy is RecoverPolicy.CLUSTER:
            self.s.mark(self.run_id, rec, InstancePhase.PAUSED,
                        f"{why}; already moved {rec.moves} times (limit {MAX_MOVES})")
        elif policy is RecoverPolicy.PAUSE and lost:
            self.s.mark(self.run_id, rec, InstancePhase.PAUSED, f"{why}; recover: pause")
        elif lost:
            self.s.mark(self.run_id, rec, InstancePhase.LOST, f"{why}; recover: none")

    # ------------------------------------------------------------------ logs, results

    def _per_node(self, node: str, records: dict[str, InstanceRecord]) -> int:
        return sum(1 for i, t in self.tasks.items()
                   if not t.done() and records.get(i) is not None and records[i].node == node)

    async def _service_logs_and_results(self, records: dict[str, InstanceRecord]) -> None:
        """Start log streams for running work; copy the logs and fetch the results of work
        that ended, a few instances per node at once (a campaign ends many short tasks per
        tick; one at a time the coordinator would fall far behind its nodes)."""
        ended: list[InstanceRecord] = []
        # the lease is read right before each action (a failure recorded, a stream started),
        # not for every row: a steady tick of a large run starts nothing and reads it not once
        for instance_id, rec in sorted(records.items()):
            task = self.tasks.get(instance_id)
            if task is not None and task.done():
                failure = None if task.cancelled() else task.exception()
                if not task.cancelled() and failure is None:
                    self.drained.add(instance_id)
                elif isinstance(failure, InfraError):
                    if not self.holding():
                        return
                    self._log_failed(rec, failure)
                del self.tasks[instance_id]
                task = None
            if rec.state is InstancePhase.MOVING or self._node_down(rec.node):
                if task is not None:
                    task.cancel()
                    self.tasks.pop(instance_id, None)
                self.drained.discard(instance_id)
                continue
            if _never_started(rec):
                continue  # nothing of it on the node: no log to copy, no results to fetch
            if self.log_gave_up.get(instance_id, rec.node) != rec.node:
                del self.log_gave_up[instance_id]  # moved since: its new node is asked
            if instance_id in self.drained and rec.state.active:
                self.drained.discard(instance_id)  # moved and running again elsewhere
            if instance_id not in self.drained and instance_id not in self.log_gave_up:
                if rec.pid is None and not rec.state.finished:
                    continue  # not started yet
                if task is None and not rec.state.finished and \
                        self._per_node(rec.node, records) < FOLLOW_STREAMS_PER_NODE:
                    if not self.holding():
                        return
                    self.tasks[instance_id] = asyncio.create_task(
                        self.s.stream_log_until_done(self.run_id, instance_id,
                                                     guard=self.holding))
                    continue
                if task is None:
                    ended.append(rec)
                continue
            if self._fetch_due(rec):
                ended.append(rec)
        if ended and not self.holding():
            return
        # a bounded batch per node and tick, one supervisor call each: dispatch and the
        # status sweep come round again soon, whatever number of short tasks ended meanwhile
        batch: dict[str, list[InstanceRecord]] = {}
        for rec in ended:
            recs = batch.setdefault(rec.node, [])
            if len(recs) < HARVEST_PER_TICK:
                recs.append(rec)
        await asyncio.gather(*(self._harvest(node, recs) for node, recs in batch.items()))

    def _fetch_due(self, rec: InstanceRecord) -> bool:
        """The instance ended, its log is home, and its results are not (retries left)."""
        fetchable = rec.state in (InstancePhase.EXITED, InstancePhase.FAILED,
                                  InstancePhase.STOPPED)
        copied = rec.instance_id in self.drained or rec.instance_id in self.log_gave_up
        return fetchable and copied and not rec.results_fetched \
            and self.fetch_failures.get(rec.instance_id, 0) < RESULT_FETCH_ATTEMPTS

    def _results_due(self, rec: InstanceRecord) -> bool:
        """The instance ended and its results are not home (retries left)."""
        return rec.state in (InstancePhase.EXITED, InstancePhase.FAILED, InstancePhase.STOPPED) \
            and not rec.results_fetched \
            and self.fetch_failures.get(rec.instance_id, 0) < RESULT_FETCH_ATTEMPTS

    def _wants_log(self, rec: InstanceRecord) -> bool:
        return rec.instance_id not in self.drained and rec.instance_id not in self.log_gave_up

    async def _harvest(self, node: str, recs: list[InstanceRecord]) -> None:
        """Bring the logs (no stream follows them) and the due results of ``recs`` home in one
        batched call to ``node``; failures count per instance as a single copy's would."""
        if not self.holding():
            return
        want = frozenset(r.instance_id for r in recs if self._results_due(r))
        try:
            outcomes = await self.s.harvest(self.run_id, node, recs, results_for=want,
                                            guard=self.holding)
        except InfraError as exc:
            for rec in recs:
                if self._wants_log(rec):
                    self._log_failed(rec, exc)
                if rec.instance_id in want:
                    self._fetch_failed(rec, exc)
            return
        longer = []
        for rec in recs:
            got = outcomes.get(rec.instance_id)
            if got is None or got.deferred:
                continue
            if self._wants_log(rec):
                if got.log_error is not None:
                    self._log_failed(rec, got.log_error)
                else:
                    self.log_failures.pop(rec.instance_id, None)
                    if rec.state.finished and got.eof:
                        self.drained.add(rec.instance_id)
                    elif rec.state.finished and got.log_size is not None:
                        longer.append(rec)  # more than one batch's share of log
            if rec.instance_id in want and got.results_error is not None:
                self._fetch_failed(rec, got.results_error)
        gate = asyncio.Semaphore(HARVEST_LONG_LOGS)

        async def rest(rec: InstanceRecord) -> None:
            async with gate:
                await self._sync_rest(self.s.store.instance(self.run_id, rec.instance_id))

        await asyncio.gather(*(rest(r) for r in longer))

    async def _sync_rest(self, rec: InstanceRecord) -> None:
        """Read the rest of a long log of an ended instance to its end (chunked reads)."""
        if not self.holding():
            return
        try:
            await self.s.sync_log(self.run_id, rec, follow=False, guard=self.holding)
            self.drained.add(rec.instance_id)
        except InfraError as exc:
            self._log_failed(rec, exc)

    def _fetch_failed(self, rec: InstanceRecord, exc: InfraError) -> None:
        """Count a failed results fetch and say it."""
        iid = rec.instance_id
        self.fetch_failures[iid] = self.fetch_failures.get(iid, 0) + 1
        self.s.event(self.run_id, "results", iid, f"fetching results failed: {exc.one_line()}")

    def _log_failed(self, rec: InstanceRecord, exc: InfraError) -> None:
        """Count a failed log copy; past the limit, stop asking and say why (and mark lost).

        A finished instance is given up on after any ``LOG_SYNC_ATTEMPTS`` failures in a row;
        a live one only when its node keeps refusing (a dropped link is the node tracker's to
        judge). When the node's supervisor refuses outright (no record of the instance),
        the instance is lost.
        """
        iid = rec.instance_id
        refused = isinstance(exc, (CommandFailedError, BadAnswerError))
        if not refused and not rec.state.finished:
            self.log_failures.pop(iid, None)
            self.s.emit("log", iid, f"log sync failed: {exc.one_line()}")
            return
        count = self.log_failures.get(iid, 0) + 1
        self.log_failures[iid] = count
        if count < LOG_SYNC_ATTEMPTS:
            self.s.emit("log", iid, f"log sync failed ({count}/{LOG_SYNC_ATTEMPTS}): "
                                    f"{exc.one_line()}")
            return
        del self.log_failures[iid]
        self.log_gave_up[iid] = rec.node
        why = f"its log cannot be copied from {rec.node} ({count} failures): {exc.one_line()}"
        if rec.state.finished:
            self.s.event(self.run_id, "log", iid, f"gave up: {why}; the local copy may be "
                                                  "incomplete")
        elif isinstance(exc, CommandFailedError):
            self.s.mark(self.run_id, rec, InstancePhase.LOST, why)
        else:
            self.s.event(self.run_id, "log", iid, f"gave up: {why}")

    def _node_down(self, node: str) -> bool:
        t = self.trackers.get(node)
        return t is not None and t.state in (NodeState.RECONNECTING, NodeState.DISCONNECTED,
                                             NodeState.OFFLINE)

    def _all_done(self, records: dict[str, InstanceRecord], *, acting: bool) -> bool:
        if not records:
            return True
        for rec in records.values():
            if not rec.state.finished:
                return False
            if not acting or rec.state in (InstancePhase.PAUSED, InstancePhase.LOST) \
                    or _never_started(rec):
                continue
            copied = rec.instance_id in self.drained or rec.instance_id in self.log_gave_up
            # telemetry comes home with the sweeps, as the log does with the streams
            telemetry = rec.telemetry_done or rec.instance_id in self.log_gave_up
            pending = not copied or not rec.results_fetched or not telemetry
            retry_left = self.fetch_failures.get(rec.instance_id, 0) < RESULT_FETCH_ATTEMPTS
            if pending and retry_left and not self._node_down(rec.node):
                return False
        return True

    # ------------------------------------------------------------------ snapshot

    def snapshot(self, records: dict[str, InstanceRecord]) -> RunSnapshot:
        now = time.time()
        nodes = []
        count: dict[str, int] = {}
        for rec in records.values():
            if rec.state.active:
                count[rec.node] = count.get(rec.node, 0) + 1
        latest = self._latest(records, now)
        newest: dict[str, Latest] = {}
        for got in latest.values():
            if got.node not in newest or got.sample.t > newest[got.node].sample.t:
                newest[got.node] = got
        for node in self.s.cluster.nodes:
            t = self.trackers.get(node.name)
            if t is None:
                nodes.append(NodeView(node.name, NodeState.DISABLED,
                                      max_instances=node.max_instances))
                continue
            h = self.health.get(node.name)
            f = h.facts if h else None
            stale = self._stale(node.name, now)
            power_mw = f.jetson.power_mw if f and f.jetson else None
            temperature = f.max_temperature[1] if f and f.max_temperature else None
            sampled = newest.get(node.name)
            if sampled is not None and \
                    sampled.arrived_at >= self.probed_at.get(node.name, 0.0):
                watts, hottest = sampled.sample.power_w, sampled.sample.max_temp_c
                power_mw = int(watts * 1000) if watts is not None else power_mw
                temperature = hottest if hottest is not None else temperature
            nodes.append(NodeView(
                name=node.name, state=t.state, reason=t.reason,
                load1=f.load[0] if f else None, cpu_count=f.cpu_online if f else None,
                mem_used_gb=(f.mem_total_gb - f.mem_available_gb) if f else None,
                mem_total_gb=f.mem_total_gb if f else None,
                gpus=tuple(GpuView(g.name, g.utilization_pct, g.memory_used_mb,
                                   g.memory_total_mb, g.temperature_c) for g in f.gpus)
                if f else (),
                power_mw=power_mw, temperature_c=temperature,
                instances=count.get(node.name, 0), max_instances=node.max_instances,
                stale_seconds=stale))
        instances = tuple(self._instance_view(r, now, latest.get(r.instance_id))
                          for r in sorted(records.values(), key=lambda r: r.instance_id))
        events = tuple(EventView(e.at, e.kind, e.subject, e.message)
                       for e in self.s.store.recent_events(self.run_id, RECENT_EVENTS))
        run_state, created_at = self.s.store.run_state(self.run_id)
        progress, plain = self._progress(records, created_at, now)
        return RunSnapshot(run_id=self.run_id, run_state=run_state.value, taken_at=now,
                           nodes=tuple(nodes), instances=instances, events=events,
                           watcher=self.other or "", footer=DASHBOARD_KEYS,
                           progress=progress, progress_plain=plain)

    def _progress(self, records: dict[str, InstanceRecord], started: float,
                  now: float) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """One progress line per campaign (bar, counts, rate, ETA, pool states), and the
        same without bar, rate and ETA for the plain line mode (it prints on change)."""
        bars: list[str] = []
        plain: list[str] = []
        groups: dict[str, list[InstanceRecord]] = {}
        for rec in records.values():
            if rec.spec.campaign is not None:
                groups.setdefault(rec.spec.campaign.name, []).append(rec)
        if not groups:
            return (), ()
        pools = self.s.store.pools(self.run_id)
        for name, tasks in sorted(groups.items()):
            p = Progress.of([(t.state, t.ended_at) for t in tasks], started, now)
            states = ", ".join(f"{pool.node} {'gave up' if pool.abandoned else pool.state}"
                               for pool in pools if pool.campaign == name)
            tail = f" · pools: {states}" if states else ""
            bars.append(f"{name} {render_bar(p, PROGRESS_WIDTH)}{tail}")
            plain.append(f"{name} {p.done}/{p.total} done, {p.running} running, "
                         f"{p.queued} queued, {p.failed} failed"
                         + (f", {p.skipped} skipped" if p.skipped else "")
                         + (f", {p.cancelled} cancelled" if p.cancelled else "") + tail)
        return tuple(bars), tuple(plain)

    def _stale(self, node: str, now: float) -> float | None:
        """How old what we know of ``node`` is, when it is not answering (None: current)."""
        t = self.trackers.get(node)
        if t is None or t.state not in (NodeState.RECONNECTING, NodeState.DISCONNECTED,
                                        NodeState.OFFLINE, NodeState.BROKEN):
            return None
        seen = self.last_seen.get(node)
        return max(0.0, now - seen) if seen is not None else None

    def _latest(self, records: dict[str, InstanceRecord], now: float) -> dict[str, Latest]:
        """The newest telemetry sample of each running instance: what the sweeps brought
        (acting), else the tail of its home copy (a reporter: the acting watcher writes it)."""
        found: dict[str, Latest] = {}
        for rec in records.values():
            if not rec.state.active:
                continue
            got = self.s.telemetry.get((self.run_id, rec.instance_id))
            if got is None or got.node != rec.node:
                got = self._home_latest(rec)
            if got is not None and got.node == rec.node:
                found[rec.instance_id] = got
        return found

    def _home_latest(self, rec: InstanceRecord) -> Latest | None:
        """The newest sample of an instance's home copy, arrived when the copy last grew
        (only what its current placement wrote: the copy's part after the base)."""
        path = telemetry_path(self.s.cluster.log_dir, self.run_id, rec.instance_id)
        try:
            st = path.stat()
        except OSError:
            return None
        if st.st_size <= rec.telemetry_base:
            return None
        sample = last_sample(path)
        return Latest(rec.node, sample, st.st_mtime) if sample is not None else None

    def _telemetry_view(self, got: Latest, now: float,
                        node_stale: float | None) -> TelemetryView:
        """The sample's numbers, its age, and whether it is too old to show as current."""
        age = got.age(now)
        s = got.sample
        return TelemetryView(
            age_seconds=age, stale=node_stale is not None or age > TELEMETRY_STALE_SECONDS,
            cpu_percent=s.cpu_percent, rss_bytes=s.rss_bytes,
            gpu_util_percent=s.gpu_util_percent, gpu_mem_mb=s.gpu_mem_mb, sampled_at=s.t)

    def _instance_view(self, r: InstanceRecord, now: float,
                       latest: Latest | None = None) -> InstanceView:
        """One instance row; on a node that is not answering, its last known state and an
        uptime that stops at the last answer instead of counting on."""
        stale = self._stale(r.node, now) if r.state.active else None
        uptime = r.runtime_seconds
        if stale is not None and uptime is not None:
            uptime = max(0.0, uptime - stale)
        return InstanceView(
            instance_id=r.instance_id, node=r.node, state=r.state.value, uptime_seconds=uptime,
            restarts=r.restarts, moves=r.moves, exit_code=r.exit_code, signal=r.signal,
            reason=r.reason, last_line=r.last_line, stale_seconds=stale,
            telemetry=self._telemetry_view(latest, now, stale) if latest is not None else None)

    def publish(self, records: dict[str, InstanceRecord]) -> None:
        snap = self.snapshot(records)
        if self.on_snapshot is not None:
            self.on_snapshot(snap)
        if self.saved is not None and self.acting:
            self.saved.write(snap, records)
