"""The CLI's actions that touch nodes: health check, deploy, run, and the run subcommands.

Each action builds one ``ConnectionPool`` (one connection per node, reused for everything),
does its work with asyncio, and renders through ``infra.cli.views``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

import click
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from infra.campaign.summary import summarize
from infra.campaign.table import (
    ResultRow,
    build_rows,
    read_metrics_file,
    render_table,
    to_csv,
)
from infra.campaign.table import to_json as table_json
from infra.cli import views
from infra.cli.health import (
    probe_nodes,
    report_new_host_keys,
    run_async,
    with_accept_new,
)
from infra.config import Cluster, ExperimentSpec
from infra.errors import (
    BadAnswerError,
    DeployRefused,
    InfraError,
    Interrupted,
    TransportError,
    UsageError,
    node_reason,
)
from infra.monitor.loop import Monitor, MonitorOutcome
from infra.monitor.saved import SavedState
from infra.placement import Condition, NodeCondition
from infra.probe.health import NodeHealth, NodeStatus
from infra.runner.campaign import CampaignDriver, is_queued_work, never_fits, rerun_failed
from infra.runner.claims import claims_of, occupied_work
from infra.runner.deploy import DeployResult, deploy_all
from infra.runner.lifecycle import (
    RunSession,
    StopReport,
    deploy_excludes,
    deploy_protect,
    stored_specs,
)
from infra.runner.logread import show_log
from infra.runner.nodeops import admin_conditions, merge_conditions
from infra.runner.prune import PruneReport, prune_runs
from infra.runner.results import ResultsFetch
from infra.state import InstancePhase, Store
from infra.state.store import coordinator_id
from infra.transport.pool import ConnectionPool

if TYPE_CHECKING:
    from infra.cli.main import Ctx

T = TypeVar("T")


# --------------------------------------------------------------------------- health

def conditions_from(health: dict[str, NodeHealth]) -> dict[str, NodeCondition]:
    mapping = {NodeStatus.HEALTHY: Condition.HEALTHY, NodeStatus.DEGRADED: Condition.DEGRADED,
               NodeStatus.UNAVAILABLE: Condition.UNAVAILABLE,
               NodeStatus.MAINTENANCE: Condition.MAINTENANCE}
    return {name: NodeCondition(mapping[h.status], "; ".join(h.reasons) or (h.error or ""))
            for name, h in health.items()}


def probing(c: Ctx, cluster: Cluster) -> AbstractContextManager[object]:
    """A spinner line on stderr while the enabled nodes are probed (none with --json)."""
    if c.json_out:
        return contextlib.nullcontext()
    enabled = sum(1 for n in cluster.nodes if n.enabled)
    return c.err.status(f"probing {enabled} node(s) and reading their claims...")


# --------------------------------------------------------------------------- deploy

def known_specs(cluster: Cluster) -> list[ExperimentSpec]:
    """Specs of the runs in the state store, if it exists: their outputs stay on nodes."""
    db = cluster.log_dir / "state.db"
    if not db.exists():
        return []
    store = Store(db)
    try:
        return stored_specs(store)
    finally:
        store.close()


def _reason(result: object) -> str:
    """An error's reason without the node name its message starts with."""
    if isinstance(result, TransportError):
        return result.reason
    return result.one_line() if isinstance(result, InfraError) else str(result)


def refused_error(what: str, refused: Mapping[str, DeployRefused], limit: int) -> InfraError:
    """One line naming each refused node and its deletion count, and how to go on."""
    return InfraError(f"{what} on " + "; ".join(
        f"{n}: would delete {r.count} files or directories" for n, r in sorted(refused.items()))
        + f" (more than deploy.max_deletes {limit}); nothing was changed there: list them with "
        "--deploy-all --dry-run, then rerun with --yes")


def do_deploy_all(c: Ctx, cluster: Cluster, *, dry_run: bool, delete: bool,
                  accept_new: bool, specs: tuple[ExperimentSpec, ...] = ()) -> None:
    cluster = with_accept_new(cluster, accept_new)
    nodes = [n for n in cluster.nodes if n.enabled]
    if not nodes:
        raise UsageError(f"{cluster.path}: no node is enabled")
    source = cluster.deploy_source  # checked before any node is touched
    protect = deploy_protect(cluster, [*specs, *known_specs(cluster)])
    max_deletes = None if c.yes else cluster.deploy.max_deletes
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                        TimeElapsedColumn(), console=c.err, transient=True,
                        disable=c.json_out)
    task_ids = {n.name: progress.add_task(f"{n.name}: waiting", total=1) for n in nodes}

    def on_progress(node: str, what: str) -> None:
        progress.update(task_ids[node], description=f"{node}: {what}",
                        completed=1 if what in ("done", "failed") else 0)

    async def go() -> dict[str, DeployResult | InfraError]:
        return await deploy_all(nodes, cluster.health_check, source,
                                excludes=deploy_excludes(cluster, source), delete=delete,
                                dry_run=dry_run, on_progress=on_progress, protect=protect,
                                max_deletes=max_deletes)

    try:
        with progress:
            results = run_async(go)
    finally:
        report_new_host_keys(c)
    if c.json_out:
        c.emit_json({"source": str(source), "dry_run": dry_run, "max_deletes": max_deletes,
                     "nodes": {n: views.deploy_json(r, max_deletes) for n, r in results.items()}})
    else:
        c.console.print(views.deploy_table(results, dry_run=dry_run, max_deletes=max_deletes))
        if dry_run:
            c.console.print(views.deletions_text(results, max_deletes), end="", soft_wrap=True)
    refused = {n: r for n, r in results.items() if isinstance(r, DeployRefused)}
    failed = [n for n, r in results.items()
              if not isinstance(r, DeployResult) and n not in refused]
    problems = [f"deploy failed on {', '.join(failed)}: " + "; ".join(
        f"{n}: {_reason(results[n])}" for n in failed)] if failed else []
    if refused:
        problems.append(str(refused_error("deploy refused", refused,
                                          cluster.deploy.max_deletes)))
    if problems:
        raise InfraError("; ".join(problems))


# --------------------------------------------------------------------------- run

def _printer(c: Ctx, saved: SavedState | None = None,
             quiet: bool = False) -> Callable[[str, str, str], None]:
    """Where events go: the orchestrator's log file, and stderr unless a dashboard shows them."""
    def emit(kind: str, subject: str, message: str) -> None:
        if saved is not None:
            saved.log(kind, subject, message)
        if not quiet or kind == "lease":
            stamp = time.strftime("%H:%M:%S")
            c.err.print(f"[dim]{stamp}[/] [bold]{subject}[/] {escape(message)}", soft_wrap=True)
    return emit


async def _watch(c: Ctx, session: RunSession, run_id: str, duration: float | None,
                 saved: SavedState) -> MonitorOutcome:
    """Run the monitor with the live dashboard (or plain lines when not a terminal)."""
    from infra.dashboard import Dashboard

    monitor: type[Monitor] = Monitor
    if session.store.run(run_id).on_slurm:
        from infra.backends.slurm.watch import SlurmMonitor
        monitor = SlurmMonitor
    if c.json_out:
        outcome = await monitor(session, run_id, saved=saved).run(duration)
    else:
        with Dashboard(c.console) as dash:
            outcome = await monitor(session, run_id, saved=saved,
                                    on_snapshot=dash.update).run(duration)
    if outcome.finished and outcome.lease_holder is None:  # the acting watcher saw it end
        from infra.runner.manifest import record_end
        await record_end(session, run_id)
    return outcome


async def _after_launch(c: Ctx, session: RunSession, run_id: str, done: str,
                        monitor_duration: float | None, saved: SavedState) -> bool:
    """What follows a launch (bench or Slurm): a refused deploy fails the command, a zero
    ``--monitor-duration`` detaches, anything else watches; True when the watch saw the end."""
    store = session.store
    if session.refusals:
        store.release_lease(run_id, coordinator_id())
        raise refused_error(f"run {run_id} not {done}: deploy refused",
                            session.refusals, session.cluster.deploy.max_deletes)
    if monitor_duration is not None and monitor_duration <= 0:
        store.release_lease(run_id, coordinator_id())
        return False
    session.emit = _printer(c, saved, quiet=not c.json_out)
    outcome = await _watch(c, session, run_id, monitor_duration, saved)
    return outcome.finished


def do_run(c: Ctx, cluster: Cluster, specs: tuple[ExperimentSpec, ...], *,
           placement: str | None, auto_place: bool, force: bool, explain: bool,
           monitor_duration: float | None, accept_new: bool,
           tags: tuple[str, ...] = ()) -> None:
    from infra.backends.slurm.driver import split_pins
    from infra.cli.main import make_plan, plan_failure
    from infra.runner.manifest import record_manifest

    cluster = with_accept_new(cluster, accept_new)
    _ = cluster.deploy_source  # a bad deploy source fails here, before any node is touched
    on_slurm, _ = split_pins(placement, cluster, specs)
    if on_slurm:
        do_slurm_run(c, cluster, specs, on_slurm, auto_place=auto_place,
                     monitor_duration=monitor_duration, tags=tags)
        return
    store = Store.for_log_dir(cluster.log_dir)
    saved = SavedState(cluster.log_dir)
    holder: dict[str, str] = {}

    async def go() -> bool:
        async with ConnectionPool(cluster) as pool:
            session = RunSession(cluster, store, pool, emit=_printer(c, saved),
                                 confirm_deletes=c.yes)
            with probing(c, cluster):
                health = await probe_nodes(cluster, pool)
                claims = await claims_of([n for n, h in health.items() if h.reachable],
                                         session.client)
            for name, h in health.items():
                if not h.reachable:
                    session.emit("node", name, f"unavailable: {h.error}")
            facts = {n: h.facts for n, h in health.items() if h.facts is not None}
            queued, rest = queued_work(cluster, specs, placement, auto_place)
            waiting = {s.experiment_id for s in queued}
            now_specs = tuple(s for s in specs if s.experiment_id not in waiting)
            result, placed = make_plan(
                cluster, now_specs, rest, auto_place, force,
                conditions=merge_conditions(conditions_from(health),
                                            admin_conditions(cluster, store)),
                occupied=occupied_work(cluster, claims, store.active_instances()),
                facts=facts)
            if not c.json_out:
                if result.placements or not queued:
                    c.console.print(views.plan_table(result))
                if explain:
                    c.console.print(views.explain(result))
                if queued:
                    c.console.print(views.queued_summary(queued))
            if not result.ok:
                raise plan_failure(result)
            never = never_fits(cluster, queued, admin_conditions(cluster, store), facts)
            if never is not None:
                raise never
            run_id = session.record_run(placed, result, views.plan_json(result), queued=queued)
            session.forced = {p.instance_id for p in result.placements if p.forced}
            holder["run"] = run_id
            used = {p.node for p in result.placements}
            await record_manifest(session, run_id, specs=[*placed, *queued], tags=tags,
                                  facts={n: f for n, f in facts.items()
                                         if n in used or queued})
            # hold the run's lease while launching: a `watch` elsewhere only reports meanwhile
            store.acquire_lease(run_id, coordinator_id(), 120.0)
            session.emit("run", run_id, f"run {run_id}: {len(result.placements)} instance(s)")
            await session.launch(run_id)
            if queued:  # hand out the first wave (dispatch: all -- everything) right away
                driver = CampaignDriver(session, run_id)
                await driver.tick(merge_conditions(conditions_from(health),
                                                   admin_conditions(cluster, store)),
                                  down={n for n, h in health.items() if not h.reachable},
                                  fence_seconds=None)
            holder["launched"] = run_id
            return await _after_launch(c, session, run_id, "started", monitor_duration, saved)

    try:
        finished = run_async(go)
    except KeyboardInterrupt:
        finished = False
        if "run" not in holder:
            raise
        if "launched" not in holder:
            raise interrupted_launch(c, store, holder["run"]) from None
        c.err.print("detached (Ctrl-C): the experiments keep running")
    finally:
        saved.close()
        report_new_host_keys(c)
    run_id = holder["run"]
    _report(c, cluster, store, run_id, finished)


def do_slurm_run(c: Ctx, cluster: Cluster, specs: tuple[ExperimentSpec, ...],
                 pins: dict[str, str], *, auto_place: bool,
                 monitor_duration: float | None, tags: tuple[str, ...]) -> None:
    """An all-Slurm run: record it and its jobs' intents, deploy to the target's work dir,
    submit each job once (``infra.backends.slurm``), then watch it like any run."""
    from infra.backends.slurm.driver import check_all_slurm, check_scripts, record_slurm_run
    from infra.backends.slurm.watch import SlurmWatch
    from infra.runner.manifest import record_manifest

    target = check_all_slurm(pins, specs, auto_place, cluster)
    check_scripts(target, specs)  # what cannot map to sbatch is refused before any record
    store = Store.for_log_dir(cluster.log_dir)
    saved = SavedState(cluster.log_dir)
    holder: dict[str, str] = {}

    async def go() -> bool:
        async with ConnectionPool(cluster) as pool:
            session = RunSession(cluster, store, pool, emit=_printer(c, saved),
                                 confirm_deletes=c.yes)
            run_id = record_slurm_run(session, target, specs)
            holder["run"] = run_id
            await record_manifest(session, run_id, specs=specs, tags=tags, facts={})
            store.acquire_lease(run_id, coordinator_id(), 120.0)
            session.emit("run", run_id, f"run {run_id}: {len(specs)} instance(s) on Slurm "
                                        f"target {target.name}")
            await SlurmWatch(session, run_id).launch()
            holder["launched"] = run_id
            return await _after_launch(c, session, run_id, "submitted", monitor_duration,
                                       saved)

    try:
        finished = run_async(go)
    except KeyboardInterrupt:
        finished = False
        if "run" not in holder:
            raise
        if "launched" not in holder:
            raise Interrupted(f"submission of {holder['run']} interrupted: "
                              f"`cluster-experiment watch {holder['run']}` finishes it (a job "
                              "already submitted is found again, never submitted twice), "
                              f"`cluster-experiment stop {holder['run']}` gives it up") from None
        c.err.print("detached (Ctrl-C): the Slurm jobs keep running")
    finally:
        saved.close()
        report_new_host_keys(c)
    _report(c, cluster, store, holder["run"], finished)


def queued_work(cluster: Cluster, specs: tuple[ExperimentSpec, ...], placement: str | None,
                auto_place: bool) -> tuple[tuple[ExperimentSpec, ...], str | None]:
    """Campaign tasks and work with dependencies, and the ``--placement`` left for the rest.

    The queue places them when their turn comes, so they need --auto-place unless pinned; a
    pin (``--placement train:rpi1`` names every task of a sweep) becomes the constraint
    ``name = rpi1`` on each pinned task, which the queue's placements then honour.
    """
    from infra.config.model import Constraint, Operator
    from infra.config.specs import bench_pins, parse_pins
    queued = [s for s in specs if is_queued_work(s)]
    if not queued:
        return (), placement
    pins = bench_pins(parse_pins(placement, cluster, specs), cluster)
    ids = {s.experiment_id for s in queued}
    out: list[ExperimentSpec] = []
    unpinned: list[str] = []
    for spec in queued:
        node = pins.get(spec.experiment_id)
        if node is not None:
            spec = dataclasses.replace(spec, constraints=(
                *spec.constraints, Constraint("name", Operator.EQ, node)))
        elif not auto_place:
            unpinned.append(spec.template_id or spec.experiment_id)
        out.append(spec)
    if unpinned:
        names = sorted(set(unpinned))
        raise UsageError(f"no placement for {', '.join(names[:5])}: queued work is placed by "
                         "the scheduler when its turn comes; add --auto-place (or pin a whole "
                         "campaign with --placement NAME:NODE)")
    rest = ",".join(f"{i}:{n}" for i, n in pins.items() if i not in ids) or None
    return tuple(out), rest


def interrupted_launch(c: Ctx, store: Store, run_id: str) -> Interrupted:
    """Ctrl-C while deploying or starting: say exactly what runs and what never started."""
    records = store.instances(run_id)
    started = [r for r in records if r.pid is not None]
    waiting = [r for r in records if r.pid is None and not r.state.finished]
    c.console.print(views.instances_table(store.run(run_id), records))
    store.close()
    said = f"launch of {run_id} interrupted: {len(started)} of {len(records)} instance(s) " \
           "started"
    if started:
        said += " (" + ", ".join(f"{r.instance_id} on {r.node}" for r in started) + \
            ", which keep running)"
    if waiting:
        said += f"; not started: {', '.join(r.instance_id for r in waiting)}"
        said += f"; `cluster-experiment watch {run_id}` finishes the launch"
    if started or waiting:
        said += f", `cluster-experiment stop {run_id}` gives it up"
    return Interrupted(said)


def _report(c: Ctx, cluster: Cluster, store: Store, run_id: str, finished: bool) -> None:
    records = store.instances(run_id)
    run = store.run(run_id)
    pools = store.pools(run_id)
    if c.json_out:
        c.emit_json(views.status_json(run, records, pools, cluster.log_dir))
    else:
        summaries = summarize(records, pools)
        if summaries:
            c.console.print(views.campaign_block(summaries), end="")
        c.console.print(views.instances_table(run, records))
        if not finished:
            c.console.print(f"Experiments keep running on their nodes. Look again with:\n"
                            f"  cluster-experiment watch {run_id}\n"
                            f"  cluster-experiment status {run_id}\n"
                            f"  cluster-experiment logs {run_id} INSTANCE -f\n"
                            f"  cluster-experiment stop {run_id}")
        else:
            c.console.print(f"Logs and results are in {cluster.log_dir / run_id}")
    store.close()
    failed = [r for r in records if r.state in (InstancePhase.FAILED, InstancePhase.LOST,
                                                InstancePhase.PAUSED)]
    if failed and finished:
        hint = f"; `cluster-experiment rerun {run_id} --failed` tries them again" \
            if any(r.spec.campaign is not None for r in failed) else ""
        raise InfraError(f"{len(failed)} instance(s) did not finish: " + views.some(
            [f"{r.instance_id} {r.state.value} ({r.reason or r.state.value})"
             for r in failed], 5) + hint)
    short = [r for r in records if r.results_missing]
    if short and finished:
        raise InfraError(f"results incomplete for {len(short)} instance(s): " + views.some(
            [f"{r.instance_id}: {len(r.results_missing)} not fetched "
             f"({r.results_missing[0].one_line()})" for r in short], 5))


def do_watch(c: Ctx, run_id: str | None, duration: float | None) -> None:
    """Attach to a run: rebuild from the store and the nodes, resume streams, apply policy."""
    _attach(c, run_id, duration)


def do_rerun(c: Ctx, run_id: str | None, duration: float | None) -> None:
    """Queue a run's failed work again (same ids, new placements), then watch it."""
    cluster = c.cluster
    store = open_store(cluster)
    run = store.resolve_run(run_id)
    if run.on_slurm:
        store.close()
        raise UsageError(f"rerun: {run.run_id} is a Slurm run; its failed tasks are requeued "
                         "by their restart rules (`watch` applies them): submit the specs "
                         "again for a new run")
    other = store.acquire_lease(run.run_id, coordinator_id(), 120.0)
    store.close()
    if other is not None:
        raise UsageError(f"run {run.run_id} is watched by {other}: detach that watch "
                         "(Ctrl-C) first, then rerun")
    queued: list[str] = []

    def requeue(session: RunSession) -> bool:
        queued.extend(rerun_failed(session, run.run_id))
        if not queued:
            session.store.release_lease(run.run_id, coordinator_id())
        elif not c.json_out:
            c.err.print(f"queued again: {views.some(queued)}")
        return bool(queued)

    _attach(c, run.run_id, duration, before=requeue,
            idle=f"nothing to rerun: {run.run_id} has no failed, lost, cancelled or paused work")


def _attach(c: Ctx, run_id: str | None, duration: float | None,
            before: Callable[[RunSession], bool] | None = None, idle: str = "") -> None:
    """Watch a run (``watch``, ``rerun``): ``before`` runs first and may say there is
    nothing to watch (then ``idle`` is printed)."""
    cluster = c.cluster
    store = open_store(cluster)
    run = store.resolve_run(run_id)
    saved = SavedState(cluster.log_dir)
    watched = [True]

    async def go() -> bool:
        async with ConnectionPool(cluster) as pool:
            session = RunSession(cluster, store, pool,
                                 emit=_printer(c, saved, quiet=not c.json_out),
                                 confirm_deletes=c.yes)
            if before is not None and not before(session):
                watched[0] = False
                return True
            outcome = await _watch(c, session, run.run_id, duration, saved)
            return outcome.finished

    try:
        finished = run_async(go)
    except KeyboardInterrupt:
        finished = False
        c.err.print("detached (Ctrl-C): the experiments keep running")
    finally:
        saved.close()
    if not watched[0] and idle and not c.json_out:
        c.console.print(idle)
    _report(c, cluster, store, run.run_id, finished)


# --------------------------------------------------------------------------- subcommands

def open_store(cluster: Cluster) -> Store:
    db = cluster.log_dir / "state.db"
    if not db.exists():
        raise UsageError(f"no runs yet: {db} does not exist")
    return Store(db)


def do_status(c: Ctx, run_id: str | None, refresh: bool) -> None:
    cluster = c.cluster
    store = open_store(cluster)
    run = store.resolve_run(run_id)
    errors: dict[str, InfraError] = {}
    if refresh:
        async def go() -> dict[str, InfraError]:
            async with ConnectionPool(cluster) as pool:
                session = RunSession(cluster, store, pool)
                if run.on_slurm:  # Slurm's answer (scontrol per job), recorded; no action
                    from infra.backends.slurm.watch import SlurmWatch
                    watch = SlurmWatch(session, run.run_id)
                    exc = await watch.refresh()
                    return {} if exc is None else {watch.target.name: exc}
                # a reader: records what the nodes say, acts on nothing (no lease)
                return await session.sweep(run.run_id, stop_stale=False)
        errors = run_async(go)
        run = store.run(run.run_id)
    records = store.instances(run.run_id)
    pools = store.pools(run.run_id)
    broken = {n: e for n, e in errors.items() if isinstance(e, BadAnswerError)}
    if c.json_out:
        doc = views.status_json(run, records, pools, cluster.log_dir)
        doc["unreachable"] = {n: e.one_line() for n, e in errors.items() if n not in broken}
        doc["broken"] = {n: e.one_line() for n, e in broken.items()}
        doc["runs"] = [r.run_id for r in store.runs(20)]
        c.emit_json(doc)
    else:
        summaries = summarize(records, pools)
        if summaries:
            c.console.print(views.campaign_block(summaries), end="")
        c.console.print(views.instances_table(run, records))
        for node, exc in errors.items():
            what = "broken" if node in broken else "unreachable"
            why = " ".join(exc.reason.split()) if isinstance(exc, TransportError) \
                else exc.one_line()
            c.err.print(f"[yellow]{node}: {what} ({escape(why)}); showing its last known "
                        "state[/]", soft_wrap=True)
    store.close()


def logs_target(store: Store, first: str, second: str | None) -> tuple[str, str]:
    """``logs RUN INSTANCE`` or ``logs INSTANCE`` (the latest run): (run id, instance id).

    One argument that names no instance of the latest run but a run (or whose name is both)
    is refused with one line saying how to write it.
    """
    if second is not None:
        run = store.resolve_run(first)
        store.instance(run.run_id, second)  # an unknown instance is a usage error
        return run.run_id, second
    latest = store.latest_run()
    names = [r.instance_id for r in store.instances(latest.run_id)]
    try:
        is_run = bool(first) and store.resolve_run(first) is not None
    except UsageError:  # no such run, or an ambiguous prefix: not a run here
        is_run = False
    if first in names and is_run:
        raise UsageError(f"logs {first}: {first!r} is an instance of the latest run "
                         f"{latest.run_id} and also a run id; write `logs RUN INSTANCE`")
    if first in names:
        return latest.run_id, first
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    if is_run:
        raise UsageError(f"logs {first}: names a run, not an instance; write `logs {first} "
                         "INSTANCE`")
    raise UsageError(f"the latest run {latest.run_id} has no instance {first!r} "
                     f"(its instances: {shown or 'none'}); for another run write "
                     "`logs RUN INSTANCE`")


def do_logs(c: Ctx, first: str, second: str | None, follow: bool) -> None:
    """Print an instance's log: the local copy, then the node's log beyond it.

    Reading needs no lease and writes nothing (``runner.logread``): it works the same while
    another coordinator watches the run. ``logs INSTANCE`` reads the latest run's.
    """
    cluster = c.cluster
    store = open_store(cluster)
    try:
        run_id, instance_id = logs_target(store, first, second)
        pruned = store.run(run_id).pruned_at
    except InfraError:
        store.close()
        raise
    if pruned is not None:
        store.close()
        raise UsageError(f"run {run_id} was pruned on {views.format_time(pruned)}: its logs are "
                         "gone")
    run = store.run(run_id)

    def out(data: bytes) -> None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()

    async def go() -> None:
        async with ConnectionPool(cluster) as pool:
            session = RunSession(cluster, store, pool, emit=_printer(c))
            if run.on_slurm:
                from infra.backends.slurm.watch import show_slurm_log
                await show_slurm_log(session, run.run_id, instance_id, out, follow=follow)
                return
            await show_log(session, run.run_id, instance_id, out, follow=follow)

    try:
        run_async(go)
    except InfraError as exc:
        if follow:
            raise
        c.err.print(f"[yellow]showing the local copy only: {exc.one_line()}[/]")
    finally:
        store.close()


def do_stop(c: Ctx, run_id: str, instance_id: str | None, grace: float) -> None:
    """Stop what is active of a run; what is already over stays as it is, and is named."""
    cluster = c.cluster
    store = open_store(cluster)
    run = store.resolve_run(run_id)

    async def go() -> StopReport:
        async with ConnectionPool(cluster) as pool:
            session = RunSession(cluster, store, pool, emit=_printer(c))
            if run.on_slurm:  # scancel: one call for the run's jobs, or ID_i for one task
                from infra.backends.slurm.watch import SlurmWatch
                return await SlurmWatch(session, run.run_id).stop(instance_id)
            pool_errors: dict[str, InfraError] = {}
            if instance_id is None and store.pools(run.run_id):
                # pools first: they drop their queues, stop their tasks and run cleanup
                pool_errors = await CampaignDriver(session, run.run_id).cancel()
            report = await session.stop(run.run_id, instance_id, grace)
            if instance_id is not None and store.pools(run.run_id):
                await CampaignDriver(session, run.run_id).sync_pools(set(), fence_seconds=None)
            for node, exc in pool_errors.items():
                report.errors.setdefault(node, node_reason(exc))
            return report

    report = run_async(go)
    errors = report.errors
    records = store.instances(run.run_id)
    if c.json_out:
        doc = views.status_json(store.run(run.run_id), records, log_dir=cluster.log_dir)
        doc.update(views.stop_json(report))
        c.emit_json(doc)
    else:
        c.console.print(views.instances_table(store.run(run.run_id), records))
        c.console.print(views.stop_lines(report), end="", soft_wrap=True)
    store.close()
    if errors:
        raise InfraError("could not stop on " + "; ".join(f"{n}: {e}" for n, e in errors.items()))


# phases whose instance never reached a node: nothing of theirs can be fetched
NEVER_STARTED = frozenset({InstancePhase.QUEUED, InstancePhase.DISPATCHED,
                           InstancePhase.SKIPPED, InstancePhase.CANCELLED})


def do_results(c: Ctx, run_id: str, view: Literal["table", "csv"] | None = None,
               fetch: bool = True) -> None:
    """Fetch every instance's results (unless ``fetch`` is off), then list the files, or
    with ``view`` ``"table"``/``"csv"`` show each instance's parameters, outcome and
    metrics (``infra.campaign.table``); fails (exit 1) when anything declared did not come."""
    cluster = c.cluster
    store = open_store(cluster)
    try:
        run = store.resolve_run(run_id)
        fetched = run_async(lambda: _fetch_all(c, store, run.run_id)) if fetch else {}
        records = store.instances(run.run_id)
    finally:
        store.close()
    rows: tuple[ResultRow, ...] = ()
    if view is not None:
        run_dir = cluster.log_dir / run.run_id
        rows = build_rows(records, lambda rec: read_metrics_file(run_dir, rec.instance_id))
    if c.json_out:
        doc: dict[str, object] = {"run_id": run.run_id}
        if fetch:
            doc["results"] = {i: views.fetch_json(f) for i, f in fetched.items()}
            doc["missing"] = {i: [x.to_json() for x in f.issues] for i, f in fetched.items()
                              if isinstance(f, ResultsFetch) and f.issues}
        if view is not None:
            doc["rows"] = table_json(rows)
        c.emit_json(doc)
    elif view == "csv":
        click.echo(to_csv(rows), nl=False)
    elif view == "table":
        c.console.print(render_table(rows, title=f"Results of {run.run_id}",
                                     width=c.console.width))
    else:
        for instance, outcome in fetched.items():
            c.console.print(views.fetch_lines(instance, outcome, cluster.log_dir))
    problems = [p for p in (views.fetch_problem(i, f) for i, f in fetched.items()) if p]
    if problems:
        more = f"; ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise InfraError("results incomplete: " + "; ".join(problems[:5]) + more)


async def _fetch_all(c: Ctx, store: Store, run_id: str) -> dict[str, ResultsFetch | InfraError]:
    """Fetch the results of every instance of the run that reached a node, one by one."""
    cluster = c.cluster
    out: dict[str, ResultsFetch | InfraError] = {}
    async with ConnectionPool(cluster) as pool:
        session = RunSession(cluster, store, pool, emit=_printer(c))
        if store.run(run_id).on_slurm:
            return await _fetch_slurm(session, run_id)
        for rec in store.instances(run_id):
            if not rec.node or rec.state in NEVER_STARTED:
                continue
            if rec.node not in cluster.node_names:
                out[rec.instance_id] = UsageError(f"node {rec.node} is no longer in "
                                                  f"{cluster.path}: results not fetched")
                continue
            try:
                out[rec.instance_id] = await session.fetch_results(run_id, rec)
            except InfraError as exc:
                out[rec.instance_id] = exc
    return out


async def _fetch_slurm(session: RunSession, run_id: str) -> dict[str, ResultsFetch | InfraError]:
    """Fetch the results of every task of a Slurm run that ran."""
    from infra.backends.slurm.watch import SlurmWatch
    out: dict[str, ResultsFetch | InfraError] = {}
    try:
        watch = SlurmWatch(session, run_id)
    except InfraError as exc:
        return {r.instance_id: exc for r in session.store.instances(run_id)}
    for rec in session.store.instances(run_id):
        if rec.started_at is None or rec.state in NEVER_STARTED:
            continue
        try:
            out[rec.instance_id] = await watch.fetch_results(rec)
        except InfraError as exc:
            out[rec.instance_id] = exc
    return out


def do_report_html(c: Ctx, run_id: str | None, out: Path | None) -> None:
    """Write a run's self-contained HTML report (``report RUN [--out FILE]``); plotly is
    imported only here, and only the local store and the run's files are read."""
    from infra.report.files import write_report
    store = open_store(c.cluster)
    try:
        written = write_report(store, c.cluster.log_dir, run_id, out)
    finally:
        store.close()
    if c.json_out:
        c.emit_json({"run_id": written.run_id, "path": str(written.path),
                     "size": written.size})
    else:
        click.echo(f"report of {written.run_id}: {written.path} ({written.size // 1024} KiB)")


def do_report_mlflow(c: Ctx, run_id: str | None, uri: str | None) -> None:
    """Export a run to MLflow (``report RUN --mlflow [URI]``); mlflow is imported only here,
    and only the local store and the run's files are read (no node is asked)."""
    from infra.report.mlflow_export import export_run, resolve_target, summary_doc
    cluster = c.cluster
    target = resolve_target(uri, Path.cwd())
    store = open_store(cluster)
    try:
        run = store.resolve_run(run_id)
        records = store.instances(run.run_id)
    finally:
        store.close()
    result = export_run(cluster.log_dir, run, records, target)
    if c.json_out:
        c.emit_json(summary_doc(result))
    else:
        click.echo(result.one_line())


def do_runs(c: Ctx, limit: int) -> None:
    """The latest ``limit`` runs of the store, newest first (no node is asked)."""
    db = c.cluster.log_dir / "state.db"
    rows: list[views.RunSummary] = []
    if db.exists():
        store = Store(db)
        try:
            rows = [views.run_summary(run, store.instances(run.run_id))
                    for run in store.runs(limit)]
        finally:
            store.close()
    if c.json_out:
        c.emit_json(views.runs_json(rows))
    elif rows:
        c.console.print(views.runs_table(rows))
    else:
        c.console.print(f"no runs yet in {db}")


def do_prune(c: Ctx, older_than: float, dry_run: bool) -> None:
    """Remove old finished runs on their nodes and locally (``runner.prune``); exit 1 when a
    node could not be asked or could not remove something."""
    cluster = c.cluster
    store = open_store(cluster)
    cutoff = time.time() - older_than

    async def go() -> PruneReport:
        async with ConnectionPool(cluster) as pool:
            session = RunSession(cluster, store, pool)
            return await prune_runs(store, cluster.log_dir, cluster.node_names,
                                    session.client, cutoff=cutoff, dry_run=dry_run,
                                    bound=max(30.0, cluster.health_check.timeout_seconds))

    try:
        report = run_async(go)
    finally:
        store.close()
    if c.json_out:
        c.emit_json(views.prune_json(report))
    else:
        if report.runs:
            c.console.print(views.prune_table(report))
        c.console.print(views.prune_lines(report), end="", soft_wrap=True)
    if report.failed:
        bad = dict(report.node_errors)
        for r in report.runs:
            for node, a in r.nodes.items():
                if not isinstance(a, str) and a.state.value == "error":
                    bad.setdefault(node, f"{r.run_id}: {a.error}")
        if report.local_errors:
            bad["this machine"] = "; ".join(f"{run}: {why}"
                                            for run, why in report.local_errors.items())
        raise InfraError("prune incomplete on " + "; ".join(
            f"{n}: {why}" for n, why in sorted(bad.items())) + "; rerun prune to finish")
