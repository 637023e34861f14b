"""Campaign dispatch: the coordinator's side of node-side pools (the node remembers).

Tasks of a campaign wait QUEUED in the store. On every tick of the acting watcher (and
once at submit) the driver: skips tasks whose dependencies failed; cancels a ``fail_fast``
campaign after a failure; requeues tasks of lost nodes (after their fences stopped them) and
of nodes whose setup failed; places new **worker slots** with the placement engine (each
slot is one task's resources on one node, capped by ``max_parallel`` cluster-wide and
``suite.workers`` per node); hands tasks to the nodes' pools, at most ``workers + prefetch``
per pool (``dispatch: prefetch``) or all of them at once (``dispatch: all``); and syncs every
pool in one call per node (adds, drops, fence, close, cancel). A task is written DISPATCHED
with its node before the node is told; a repeated add is ignored by the node, so a
coordinator killed at any point hands nothing out twice.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from infra.campaign.env import DEFAULT_ENV
from infra.campaign.model import CampaignSpec, CpuBinding, DispatchMode
from infra.campaign.queue import DepKind, TaskView, dependencies, order
from infra.config.model import Cluster, ExperimentSpec
from infra.errors import InfraError, PlacementError
from infra.placement import Condition, NodeCondition, plan, why_not
from infra.placement.allocation import Allocation
from infra.probe.facts import NodeFacts
from infra.runner.claims import OccupiedWork
from infra.runner.lifecycle import (
    RunSession,
    instance_cwd,
    local_log_path,
    occupied_by,
)
from infra.runner.supervisor_client import (
    PoolPhase,
    PoolState,
    PoolSuite,
    PoolSyncRequest,
)
from infra.runner.telemetry_home import restart_fields
from infra.state import InstancePhase, InstanceRecord, PoolRecord, RunState, Store
from infra.state.store import coordinator_id

GROW_PER_TICK = 32
"""At most this many new worker slots are placed per tick (dispatch: all places them all)."""
DEFAULT_PREFETCH = 2
"""Tasks a pool holds beyond its running ones when the campaign has no ``suite.prefetch``."""
REFILL_SECONDS = 10.0
"""Work a pool holds per worker for short tasks, in seconds of typical task time: more than
the coordinator's refill interval (one tick), so workers never wait for it."""
MAX_PREFETCH = 256
RECENT_TASKS = 50
"""How many recently ended tasks judge a campaign's typical task time."""
TASK_REQUEUES = 3
"""A task interrupted this many times (its node lost) is given up as lost."""
DONE_POOL_STATES = frozenset({PoolPhase.DONE, PoolPhase.CANCELLED, PoolPhase.SETUP_FAILED})


def next_generation(name: str, campaign: str) -> str:
    """The next pool name of a campaign on a node: ``train``, ``train.r1``, ``train.r2``..."""
    tail = name[len(campaign) + 2:] if name.startswith(f"{campaign}.r") else ""
    return f"{campaign}.r{int(tail) + 1 if tail.isdigit() else 1}"


def is_queued_work(spec: ExperimentSpec) -> bool:
    """Work that waits in the coordinator's queue instead of being placed at submit."""
    return spec.campaign is not None or bool(spec.after) or bool(spec.after_any)


def campaign_key(spec: ExperimentSpec) -> str | None:
    return spec.campaign.name if spec.campaign is not None else None


def task_view(rec: InstanceRecord, run_seq: int = 0) -> TaskView:
    """The queue's pure view of one stored instance."""
    spec = rec.spec
    ended_ok: bool | None = None
    if rec.state.finished:
        ended_ok = rec.state is InstancePhase.EXITED
    return TaskView(instance_id=rec.instance_id, run_id=rec.run_id, run_seq=run_seq,
                    template_id=spec.template_id if spec.task_index is not None else None,
                    task_index=spec.task_index, priority=spec.priority, phase=rec.state,
                    after=spec.after, after_any=spec.after_any, ended_ok=ended_ok,
                    reason=rec.reason)


def prefetch_of(camp: CampaignSpec, tasks: Sequence[InstanceRecord] = (),
                workers: int = 1) -> int:
    """Tasks a pool holds beyond its running ones: the spec's ``suite.prefetch``, raised for
    short tasks so that a pool's workers do not run dry between two refills (the pool holds
    about ``REFILL_SECONDS`` of work per worker, at most ``MAX_PREFETCH``)."""
    base = camp.suite.prefetch if camp.suite is not None else DEFAULT_PREFETCH
    ended = sorted((t.ended_at, t.ended_at - t.started_at) for t in tasks
                   if t.state is InstancePhase.EXITED and t.ended_at is not None
                   and t.started_at is not None)[-RECENT_TASKS:]
    durations = sorted(took for _at, took in ended)
    if not durations or base == 0:
        return base
    typical = max(durations[len(durations) // 2], 0.01)
    per_worker = math.ceil(REFILL_SECONDS / typical)
    return max(base, min(MAX_PREFETCH, per_worker * max(1, workers)))


def per_node_cap(camp: CampaignSpec) -> int | None:
    return camp.suite.workers if camp.suite is not None else None


@dataclass
class CampaignDriver:
    """Drives one run's campaigns; one per watching coordinator."""

    session: RunSession
    run_id: str
    deployed: set[str] = field(default_factory=set)
    held: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # pool -> tasks known
    said: dict[str, str] = field(default_factory=dict)  # campaign -> last queue reason said
    states: dict[tuple[str, str], PoolState] = field(default_factory=dict)
    cancelling: set[str] = field(default_factory=set)  # campaigns whose pools get cancel

    @property
    def store(self) -> Store:
        return self.session.store

    # ------------------------------------------------------------------ the tick

    async def tick(self, conditions: dict[str, NodeCondition], *, down: Iterable[str] = (),
                   lost: Iterable[str] = (), fence_seconds: float | None = None) -> None:
        """One dispatch round. ``down``: nodes not to contact now; ``lost``: nodes whose
        work is certainly stopped (offline past the fence), whose tasks go elsewhere."""
        records = self.store.instances(self.run_id)
        if not any(is_queued_work(r.spec) or r.state is InstancePhase.QUEUED
                   for r in records):
            return
        down_set, lost_set = set(down), set(lost)
        self._requeue_lost(records, lost_set)
        records = self.store.instances(self.run_id)
        self._skip_and_cancel(records)
        records = self.store.instances(self.run_id)
        await self._start_gated_instances(records, conditions, down_set)
        for _name, tasks in sorted(self._campaigns(records).items()):
            camp = tasks[0].spec.campaign
            assert camp is not None
            self._dispatch(camp, tasks, records, conditions, down_set)
        errors = await self.sync_pools(down_set, fence_seconds=fence_seconds)
        for node, exc in errors.items():  # said once per node and message
            text = exc.one_line()
            if self.said.get(f"@{node}") != text:
                self.said[f"@{node}"] = text
                self.session.event(self.run_id, "pool", node, f"pool sync failed: {text}")

    def _campaigns(self, records: Sequence[InstanceRecord]) -> dict[str, list[InstanceRecord]]:
        out: dict[str, list[InstanceRecord]] = {}
        for rec in records:
            key = campaign_key(rec.spec)
            if key is not None:
                out.setdefault(key, []).append(rec)
        return out

    # ------------------------------------------------------------------ dependencies

    def _skip_and_cancel(self, records: Sequence[InstanceRecord]) -> None:
        """Skip work whose dependency failed; cancel the rest of a failed fail_fast campaign."""
        decisions = dependencies([task_view(r) for r in records])
        skipped: dict[str, list[str]] = {}
        for rec in records:
            decision = decisions.get(rec.instance_id)
            if rec.state is InstancePhase.QUEUED and decision is not None \
                    and decision.kind is DepKind.SKIP:
                skipped.setdefault(decision.reason, []).append(rec.instance_id)
        for reason, ids in skipped.items():
            self.store.update_instances(self.run_id, ids, state=InstancePhase.SKIPPED,
                                        reason=f"skipped: {reason}")
            self.session.event(self.run_id, "skipped", ids[0] if len(ids) == 1 else
                               f"{len(ids)} tasks", f"skipped: {reason}")
        for name, tasks in self._campaigns(records).items():
            camp = tasks[0].spec.campaign
            if camp is None or not camp.fail_fast:
                continue
            failed = [t for t in tasks if t.state in (InstancePhase.FAILED, InstancePhase.LOST)]
            if not failed:
                continue
            waiting = [t.instance_id for t in tasks
                       if t.state in (InstancePhase.QUEUED, InstancePhase.DISPATCHED)]
            if not waiting and all(p.closed for p in self._pools(name)):
                continue
            why = f"cancelled: fail_fast: {failed[0].instance_id} failed ({failed[0].reason})"
            self.store.update_instances(self.run_id, waiting, state=InstancePhase.CANCELLED,
                                        reason=why)
            for pool in self._pools(name):
                self.store.save_pool(self.run_id, name, pool.node, closed=True)
            self.cancelling.add(name)
            self.session.event(self.run_id, "campaign", name, why)

    async def _start_gated_instances(self, records: Sequence[InstanceRecord],
                                     conditions: dict[str, NodeCondition],
                                     down: set[str]) -> None:
        """Plain instances that waited for their dependencies start like any instance."""
        decisions = dependencies([task_view(r) for r in records])
        ready = [r for r in records if r.spec.campaign is None and
                 r.state is InstancePhase.QUEUED and
                 (r.instance_id not in decisions or decisions[r.instance_id].ready)]
        for rec in ready:
            node, alloc, why = self._place_one(rec.spec, records, conditions, down)
            if node is None:
                self._queued_reason(rec.instance_id, [rec.instance_id], why)
                continue
            self.store.update_instance(self.run_id, rec.instance_id, node=node,
                                       state=InstancePhase.PLANNED, reason="",
                                       allocation=alloc.with_run(self.run_id)
                                       if alloc is not None else None)
            self.session.event(self.run_id, "placed", rec.instance_id,
                               f"dependencies met: placed on {node}")
            failed = await self.session.deploy_for_run(self.run_id, [node], only=rec.instance_id)
            moved = self.store.instance(self.run_id, rec.instance_id)
            if node in failed:
                self.session.deploy_failed(self.run_id, moved, failed[node])
                continue
            await self.session.start_instance(self.run_id, moved)

    # ------------------------------------------------------------------ placement

    def _occupied(self, records: Sequence[InstanceRecord],
                  reserved: Iterable[tuple[ExperimentSpec, str]] = ()
                  ) -> list[OccupiedWork]:
        """Work that holds capacity: other runs' active work, this run's, and idle slots of
        this run's pools (reserved for the pool's next tasks)."""
        busy: list[OccupiedWork] = list(
            occupied_by(self.store.active_instances(exclude_run=self.run_id)))
        busy += [(r.spec, r.node, r.allocation) for r in records if r.state.active and r.node]
        busy += [(spec, node, None) for spec, node in reserved]
        return busy

    def _place_one(self, spec: ExperimentSpec, records: Sequence[InstanceRecord],
                   conditions: dict[str, NodeCondition], down: set[str],
                   reserved: Iterable[tuple[ExperimentSpec, str]] = ()
                   ) -> tuple[str | None, Allocation | None, str]:
        """The node the engine picks for ``spec`` now, its allocation, or why none."""
        conds = dict(conditions)
        for name in down:
            conds[name] = NodeCondition(Condition.UNAVAILABLE, "not answering")
        result = plan(self.session.cluster, [spec], conditions=conds,
                      occupied=self._occupied(records, reserved))
        node = result.node_of(spec.experiment_id)
        if node is None:
            return None, None, why_not(result, spec.experiment_id)
        return node, result.allocation_of(spec.experiment_id), ""

    def _pools(self, campaign: str) -> list[PoolRecord]:
        return [p for p in self.store.pools(self.run_id) if p.campaign == campaign]

    def _serving(self, camp: CampaignSpec, down: set[str]) -> dict[str, PoolRecord]:
        """The campaign's pools that can take tasks now, by node: live, answering, and with
        worker slots placed there."""
        return {p.node: p for p in self._pools(camp.name)
                if self._live(p) and p.node not in down and p.workers > 0}

    def _live(self, pool: PoolRecord) -> bool:
        """The pool may still take tasks: not given up, not done (as last heard)."""
        return not pool.abandoned and not self._over(pool)

    def _over(self, pool: PoolRecord) -> bool:
        state = self.states.get((pool.campaign, pool.node))
        if state is not None:
            return state.phase in DONE_POOL_STATES
        return pool.state in {p.value for p in DONE_POOL_STATES}

    def _dispatch(self, camp: CampaignSpec, tasks: list[InstanceRecord],
                  records: Sequence[InstanceRecord], conditions: dict[str, NodeCondition],
                  down: set[str]) -> None:
        """Place new worker slots and hand tasks to the campaign's pools (store only; the
        nodes are told by ``sync_pools``)."""
        if camp.name in self.cancelling:
            return
        decisions = dependencies([task_view(r) for r in records])
        queued = [t for t in tasks if t.state is InstancePhase.QUEUED]
        ready_ids = [v.instance_id for v in order([task_view(t) for t in queued])
                     if v.instance_id not in decisions or decisions[v.instance_id].ready]
        by_id = {t.instance_id: t for t in tasks}
        ready = [by_id[i] for i in ready_ids]
        pools = self._serving(camp, down)
        held: dict[str, int] = {}
        running: dict[str, int] = {}
        for t in tasks:
            if t.node in pools and (t.state is InstancePhase.DISPATCHED or t.state.active):
                held[t.node] = held.get(t.node, 0) + 1
            if t.node in pools and t.state.active:
                running[t.node] = running.get(t.node, 0) + 1
        workers = {n: p.workers for n, p in pools.items()}
        cap = camp.max_parallel if camp.max_parallel is not None else len(tasks)
        prefetch = {n: prefetch_of(camp, tasks, workers[n]) for n in pools}
        everything = camp.dispatch is DispatchMode.ALL
        room = sum(max(0, workers[n] + prefetch[n] - held.get(n, 0)) for n in pools)
        want = min(cap - sum(workers.values()), len(ready) - (0 if everything else room))
        if not everything:
            want = min(want, GROW_PER_TICK)
        if ready and want > 0:
            self._grow(camp, ready, records, conditions, down, workers, running, want)
            pools = self._serving(camp, down)
        # hand out: in node order, each pool up to workers + prefetch (all: round robin)
        if not pools or not ready:
            self._close_if_over(camp, tasks, pools, down)
            return
        handed: dict[str, list[str]] = {}
        if everything:
            slots = [n for n in sorted(pools) for _ in range(max(1, pools[n].workers))]
            for rec, node in zip(ready, itertools.cycle(slots)):
                handed.setdefault(node, []).append(rec.instance_id)
        else:
            queue = iter(ready)
            for node in sorted(pools):
                depth = prefetch.get(node, prefetch_of(camp, tasks, pools[node].workers))
                free = max(0, pools[node].workers + depth - held.get(node, 0))
                for rec in itertools.islice(queue, free):
                    handed.setdefault(node, []).append(rec.instance_id)
        for node, ids in handed.items():
            self.store.update_instances(self.run_id, ids, node=node,
                                        state=InstancePhase.DISPATCHED,
                                        reason=f"dispatched to {node}")
        tasks = [t for t in self.store.instances(self.run_id)
                 if campaign_key(t.spec) == camp.name]
        self._close_if_over(camp, tasks, pools, down)

    def _grow(self, camp: CampaignSpec, ready: list[InstanceRecord],
              records: Sequence[InstanceRecord], conditions: dict[str, NodeCondition],
              down: set[str], workers: dict[str, int], running: dict[str, int],
              want: int) -> None:
        """Place up to ``want`` new worker slots with the engine, one at a time."""
        conds = dict(conditions)
        for pool in self._pools(camp.name):
            # a node given up (its setup failed), or whose old pool is not over yet, takes
            # no new slots; one that came back after it was lost does, once its old pool is
            # over (a new pool there then)
            lost_and_over = pool.reason.startswith("node ") and self._over(pool)
            if (pool.abandoned and not lost_and_over) or (self._over(pool) and
                                                          pool.state == "setup_failed"):
                conds[pool.node] = NodeCondition(Condition.UNAVAILABLE,
                                                 f"{camp.name} gave up this node: {pool.reason}")
        node_cap = per_node_cap(camp)
        reserved = [(ready[0].spec, node) for node, count in workers.items()
                    for _ in range(max(0, count - running.get(node, 0)))]
        added: dict[str, int] = {}
        why = ""
        for i in range(want):
            spec = ready[min(i, len(ready) - 1)].spec
            node, _alloc, why = self._place_one(spec, records, conds, down, reserved)
            if node is None:
                break
            reserved.append((spec, node))
            added[node] = added.get(node, 0) + 1
            if node_cap is not None and workers.get(node, 0) + added[node] >= node_cap:
                conds[node] = NodeCondition(Condition.UNAVAILABLE,
                                            f"suite.workers ({node_cap}) reached")
        for node, count in added.items():
            existing = {p.node: p for p in self._pools(camp.name)}.get(node)
            if existing is not None and (existing.abandoned or self._over(existing)):
                # that pool is over (it cleaned up, or was given up): a new one takes over
                self.store.save_pool(self.run_id, camp.name, node,
                                     name=next_generation(existing.name, camp.name),
                                     workers=count, abandoned=False, closed=False,
                                     state="new", reason="", queued=0, running=0)
                self.states.pop((camp.name, node), None)
                self.held.pop((camp.name, node), None)
                total = count
            else:
                total = (existing.workers if existing is not None else 0) + count
                self.store.save_pool(self.run_id, camp.name, node, workers=total)
            self.session.event(self.run_id, "pool", f"{camp.name}@{node}",
                               f"{total} worker(s) on {node}")
        if not added and why and not workers:
            self._queued_reason(camp.name, [r.instance_id for r in ready], why)
        elif added:
            self.said.pop(camp.name, None)

    def _queued_reason(self, key: str, ids: list[str], why: str) -> None:
        """Say once (and record on the waiting work) why queued work cannot start now."""
        text = f"queued: {why}"
        if self.said.get(key) == text:
            return
        self.said[key] = text
        self.store.update_instances(self.run_id, ids, reason=text)
        self.session.event(self.run_id, "queued", key, text)

    def _close_if_over(self, camp: CampaignSpec, tasks: list[InstanceRecord],
                       pools: dict[str, PoolRecord], down: set[str]) -> None:
        """Nothing more will be handed out: tell the pools to clean up after their last task
        (not while work on an unreachable node may still come back to the queue)."""
        if any(t.state is InstancePhase.QUEUED or (t.node in down and not t.state.finished)
               for t in tasks):
            return
        for node, pool in pools.items():
            if not pool.closed:
                self.store.save_pool(self.run_id, camp.name, node, closed=True)

    # ------------------------------------------------------------------ recovery

    def _requeue_lost(self, records: Sequence[InstanceRecord], lost: set[str]) -> None:
        """Tasks of nodes that are gone (or that gave up on the campaign) wait again."""
        abandoned = {(p.campaign, p.node) for p in self.store.pools(self.run_id) if p.abandoned}
        for rec in records:
            key = campaign_key(rec.spec)
            if key is None or not rec.node:
                continue
            waiting = rec.state is InstancePhase.DISPATCHED
            interrupted = rec.state.active or (rec.state is InstancePhase.LOST)
            why = ""
            if rec.node in lost and (waiting or rec.state.active):
                why = f"node {rec.node} lost"
            elif rec.state is InstancePhase.LOST:
                why = rec.reason or f"lost on {rec.node}"
            elif waiting and (key, rec.node) in abandoned:
                why = f"{rec.node} gave up the campaign"
            if not why:
                continue
            self._requeue(rec, why, counts=interrupted and rec.pid is not None)
        for pool in self.store.pools(self.run_id):
            if pool.node in lost and not pool.abandoned:
                self.store.save_pool(self.run_id, pool.campaign, pool.node, abandoned=True,
                                     workers=0, reason=f"node {pool.node} lost")

    def _requeue(self, rec: InstanceRecord, why: str, *, counts: bool) -> None:
        if counts and rec.moves + 1 > TASK_REQUEUES:
            self.session.mark(self.run_id, rec, InstancePhase.LOST,
                              f"{why}; interrupted {rec.moves + 1} times, given up")
            return
        self.store.update_instance(
            self.run_id, rec.instance_id, state=InstancePhase.QUEUED, node="",
            previous_nodes=(*rec.previous_nodes, rec.node), placement_seq=rec.placement_seq + 1,
            moves=rec.moves + (1 if counts else 0), pid=None, exit_code=None, signal=None,
            ended_at=None, restarts=0, failure_class=None, allocation=None,
            **restart_fields(self.session.cluster.log_dir, self.run_id, rec.instance_id),
            reason=f"requeued: {why}")
        self.session.event(self.run_id, "requeue", rec.instance_id, f"requeued: {why}")

    # ------------------------------------------------------------------ talking to nodes

    def sync_request(self, pool: PoolRecord, records: Sequence[InstanceRecord], *,
                     fence_seconds: float | None, fence_clear: bool = False) -> PoolSyncRequest:
        """What one pool is told: its new tasks, tasks to forget, workers, close/cancel."""
        node = self.session.cluster.node(pool.node)
        mine = [r for r in records if campaign_key(r.spec) == pool.campaign]
        known = self.held.get((pool.campaign, pool.node), set())
        adds = [self.session.start_request(self.run_id, r) for r in mine
                if r.node == pool.node and r.state is InstancePhase.DISPATCHED
                and r.instance_id not in known]
        drops = [r.instance_id for r in mine
                 if (r.node != pool.node and pool.node in r.previous_nodes
                     and not r.state.finished)
                 or (r.node == pool.node and r.state is InstancePhase.CANCELLED
                     and r.pid is None)]
        spec = mine[0].spec
        camp = spec.campaign
        assert camp is not None
        suite = camp.suite
        common = set(spec.env)  # the hooks get the env every task shares (no placeholders)
        for other in mine[1:]:
            common &= set(other.spec.env)
        env = {**DEFAULT_ENV, **dict(sorted(common))}
        if pool.abandoned:
            adds = []
        return PoolSyncRequest(
            run_id=self.run_id, pool=pool.name, workers=0 if pool.abandoned else pool.workers,
            suite=PoolSuite(
                suite_id=f"{self.run_id}/{pool.campaign}", suite_name=pool.campaign,
                setup=suite.setup if suite else None, cleanup=suite.cleanup if suite else None,
                cwd=instance_cwd(node, spec), env=tuple(sorted(env.items())),
                cpu_binding=suite.cpu_binding if suite else CpuBinding.SHARED,
                cores=suite.cores if suite else ()),
            add=tuple(adds), drop=tuple(drops), close=pool.closed or pool.abandoned,
            cancel=pool.campaign in self.cancelling,
            # a given-up pool's fence is left to expire: it must start nothing
            fence_seconds=None if fence_clear or pool.abandoned else fence_seconds,
            fence_clear=fence_clear and not pool.abandoned,
            holder=coordinator_id(), claims_dir=node.claims_dir)

    async def sync_pools(self, down: set[str], *, fence_seconds: float | None,
                         fence_clear: bool = False) -> dict[str, InfraError]:
        """One pool-sync call per live pool (all nodes at once); folds the answers in."""
        records = self.store.instances(self.run_id)
        # a given-up pool on a node that answers is told too: it drops the tasks that went
        # elsewhere, starts nothing more (no workers) and closes
        pools = [p for p in self.store.pools(self.run_id)
                 if p.node not in down and self._needs_sync(p)]
        errors: dict[str, InfraError] = {}

        async def one(pool: PoolRecord) -> None:
            key = (pool.campaign, pool.node)
            try:
                request = self.sync_request(pool, records, fence_seconds=fence_seconds,
                                            fence_clear=fence_clear)
                if request.add and pool.node not in self.deployed:
                    # the tree goes to a node before its first tasks (once per coordinator)
                    failed = await self.session.deploy_for_run(self.run_id, [pool.node],
                                                               only="campaign")
                    if pool.node in failed:
                        self._abandon(pool, f"deploy failed: {failed[pool.node]}")
                        return
                    self.deployed.add(pool.node)
                client = await self.session.client(pool.node)
                state = await client.pool_sync(request)
            except InfraError as exc:
                errors[pool.node] = exc
                return
            self.states[key] = state
            self.held[key] = set(state.queued) | set(state.running) | \
                {a.instance_id for a in request.add
                 if a.instance_id not in state.dropped and a.instance_id not in state.ignored}
            self._fold(pool, state)

        await asyncio.gather(*(one(p) for p in pools))
        return errors

    def _needs_sync(self, pool: PoolRecord) -> bool:
        return not self._over(pool)

    def _fold(self, pool: PoolRecord, state: PoolState) -> None:
        """Record what the node said of its pool; a failed setup sends its tasks elsewhere."""
        reason = pool.reason if pool.abandoned else (state.waiting or state.error or "")
        if state.phase is PoolPhase.SETUP_FAILED and not pool.abandoned:
            reason = state.setup.reason or state.error or "setup failed"
        if (pool.state, pool.reason, pool.queued, pool.running) != \
                (state.phase.value, reason, len(state.queued), len(state.running)):
            self.store.save_pool(self.run_id, pool.campaign, pool.node, state=state.phase.value,
                                 reason=reason, queued=len(state.queued),
                                 running=len(state.running))
            if pool.state != state.phase.value:
                self.session.event(self.run_id, "pool", f"{pool.campaign}@{pool.node}",
                                   f"{state.phase.value}" + (f": {reason}" if reason else ""))
        if state.phase is PoolPhase.SETUP_FAILED and not pool.abandoned:
            self._abandon(pool, f"setup failed: {reason}")
        if state.ignored:
            # handed here after the pool had finished: the node refused them (none started
            # there), so they wait again for another pool
            refused = set(state.ignored)
            for rec in self.store.instances(self.run_id):
                if rec.instance_id in refused and rec.node == pool.node \
                        and rec.state is InstancePhase.DISPATCHED:
                    self._requeue(rec, f"the pool on {pool.node} had finished", counts=False)

    def _abandon(self, pool: PoolRecord, why: str) -> None:
        self.store.save_pool(self.run_id, pool.campaign, pool.node, abandoned=True, workers=0,
                             reason=why)
        self.session.event(self.run_id, "pool", f"{pool.campaign}@{pool.node}",
                           f"gave up {pool.node} for {pool.campaign}: {why}; its tasks go "
                           "elsewhere")
        for rec in self.store.instances(self.run_id):
            if campaign_key(rec.spec) == pool.campaign and rec.node == pool.node \
                    and rec.state is InstancePhase.DISPATCHED:
                self._requeue(rec, f"{pool.node}: {why}", counts=False)

    async def clear_fences(self, down: set[str]) -> dict[str, InfraError]:
        """Detaching: pools keep starting their queued tasks while nobody watches; returns
        the nodes that could not be told."""
        return await self.sync_pools(down, fence_seconds=None, fence_clear=True)

    async def cancel(self) -> dict[str, InfraError]:
        """`stop RUN`: every pool drops its queue, stops its tasks and still runs its cleanup
        (the store's queued work is cancelled by ``RunSession.stop``)."""
        self.cancelling.update(p.campaign for p in self.store.pools(self.run_id))
        for pool in self.store.pools(self.run_id):
            self.store.save_pool(self.run_id, pool.campaign, pool.node, closed=True)
        return await self.sync_pools(set(), fence_seconds=None)



def never_fits(cluster: Cluster, queued: Sequence[ExperimentSpec],
               conditions: Mapping[str, NodeCondition] | None = None,
               facts: Mapping[str, NodeFacts] | None = None) -> PlacementError | None:
    """Queued work that no enabled node could take even empty: an error at submit, naming
    each node's reason (work that only lacks room *now* waits instead)."""
    seen: set[str] = set()
    bad: list[str] = []
    for spec in queued:
        key = campaign_key(spec) or spec.experiment_id
        if key in seen:
            continue
        seen.add(key)  # a campaign's tasks share their resources and constraints
        probe = replace(spec, affinity=(), anti_affinity=())
        result = plan(cluster, [probe], conditions=conditions, facts=facts)
        if result.node_of(probe.experiment_id) is None:
            bad.append(f"{key} can never run here ({why_not(result, probe.experiment_id)})")
    return PlacementError("; ".join(bad)) if bad else None


RERUNNABLE = (InstancePhase.FAILED, InstancePhase.LOST, InstancePhase.CANCELLED,
              InstancePhase.PAUSED)


def rerun_failed(session: RunSession, run_id: str) -> list[str]:
    """Queue the run's failed work again under the same ids (a new placement each); work
    skipped because of a failed dependency is queued again too. Returns what was queued."""
    store = session.store
    records = store.instances(run_id)
    again = [r for r in records if r.state in RERUNNABLE or
             (r.state is InstancePhase.SKIPPED and "dependency" in r.reason)]
    for rec in again:
        path = local_log_path(session.cluster, run_id, rec.instance_id)
        base = path.stat().st_size if path.exists() else 0
        store.update_instance(
            run_id, rec.instance_id, state=InstancePhase.QUEUED, node="",
            previous_nodes=(*rec.previous_nodes, rec.node) if rec.node else rec.previous_nodes,
            placement_seq=rec.placement_seq + 1, moves=0, pid=None, exit_code=None,
            signal=None, started_at=None, ended_at=None, restarts=0, failure_class=None,
            allocation=None, results_fetched=0, results_missing="[]", log_base=base,
            log_offset=base, **restart_fields(session.cluster.log_dir, run_id, rec.instance_id),
            reason=f"rerun requested (was {rec.state.value}: {rec.reason})")
    if again:
        # the campaigns' pools have closed (cleanup ran): the rerun gets fresh ones, so each
        # node runs the suite's setup once more before the rerun's first task there
        for pool in store.pools(run_id):
            store.save_pool(run_id, pool.campaign, pool.node,
                            name=next_generation(pool.name, pool.campaign),
                            workers=0, closed=False, abandoned=False, state="new", reason="",
                            queued=0, running=0)
        store.set_run_state(run_id, RunState.RUNNING)
        session.event(run_id, "rerun", run_id, f"{len(again)} instance(s) queued again: "
                      + ", ".join(r.instance_id for r in again[:12])
                      + (f" and {len(again) - 12} more" if len(again) > 12 else ""))
    return [r.instance_id for r in again]


def first_wave(cluster: Cluster, queued: Sequence[ExperimentSpec],
               conditions: Mapping[str, NodeCondition] | None = None,
               occupied: Sequence[OccupiedWork] = ()) -> dict[str, dict[str, int]]:
    """Where each campaign's first worker slots would go now (campaign -> node -> slots):
    what a dry run shows. Slots are placed one at a time, as the queue does, up to
    ``max_parallel`` (and ``suite.workers`` per node)."""
    out: dict[str, dict[str, int]] = {}
    busy = list(occupied)
    groups: dict[str, list[ExperimentSpec]] = {}
    for spec in queued:
        if spec.campaign is not None and not spec.after and not spec.after_any:
            groups.setdefault(spec.campaign.name, []).append(spec)
    for name, tasks in groups.items():
        camp = tasks[0].campaign
        assert camp is not None
        conds = dict(conditions or {})
        cap = min(len(tasks), camp.max_parallel or len(tasks), GROW_PER_TICK)
        slots: dict[str, int] = {}
        for spec in tasks[:cap]:
            probe = replace(spec, affinity=(), anti_affinity=())
            result = plan(cluster, [probe], conditions=conds, occupied=busy)
            node = result.node_of(probe.experiment_id)
            if node is None:
                break
            busy.append((probe, node, result.allocation_of(probe.experiment_id)))
            slots[node] = slots.get(node, 0) + 1
            limit = per_node_cap(camp)
            if limit is not None and slots[node] >= limit:
                conds[node] = NodeCondition(Condition.UNAVAILABLE, "suite.workers reached")
        out[name] = slots
    return out
