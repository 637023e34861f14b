"""``node`` and ``resource`` subcommands: list, maintenance, drain, undrain, reconcile.

Operator states live in the durable store (``node_admin``) and override health: a good
probe never clears maintenance or draining.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

import click

from infra.cli.params import GRACE_MAX_SECONDS, Seconds
from infra.errors import InfraError, UsageError

if TYPE_CHECKING:  # loaded by the commands themselves, so that ``--help`` stays fast
    from infra.cli.main import Ctx
    from infra.config import Cluster
    from infra.runner.claims import OccupiedWork
    from infra.runner.nodeops import DrainReport
    from infra.state import Store
    from infra.state.store import AdminState
    from infra.transport.pool import ConnectionPool

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd]?)$")
DEADLINE_MAX_SECONDS = 30 * 86400.0
"""--deadline: at most 30 days."""


def parse_duration(text: str, flag: str = "--deadline") -> float:
    """``30m``, ``2h``, ``90s``, ``1d`` or plain seconds -> seconds."""
    m = _DURATION.match(text.strip()) if len(text) <= 32 else None
    if not m:
        raise UsageError(f"{flag}: {text[:32]!r} is not a duration like 30m, 2h or 90s")
    seconds = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if seconds > DEADLINE_MAX_SECONDS:
        raise UsageError(f"{flag}: {text!r} is longer than {DEADLINE_MAX_SECONDS / 86400:g} "
                         "days")
    return seconds


def _store(cluster: Cluster) -> Store:
    from infra.state import Store
    return Store.for_log_dir(cluster.log_dir)


def _node(cluster: Cluster, name: str) -> None:
    if name not in cluster.node_names:
        raise UsageError(f"unknown node {name!r}; nodes: {', '.join(cluster.node_names)}")


def _held_work(cluster: Cluster, store: Store,
               refresh: bool) -> tuple[list[OccupiedWork], dict[str, str]]:
    """Work holding capacity per node: the enabled nodes' own claims (any coordinator's),
    this store's records for nodes that could not be asked; and those nodes' errors."""
    from infra.cli.health import run_async
    from infra.runner.claims import claims_of, occupied_work
    from infra.runner.lifecycle import RunSession
    from infra.runner.supervisor_client import Claim
    from infra.transport.pool import ConnectionPool
    stored = store.active_instances()
    if not refresh:
        return occupied_work(cluster, {}, stored), {}

    async def go() -> dict[str, list[Claim] | InfraError]:
        async with ConnectionPool(cluster) as pool:
            session = RunSession(cluster, store, pool)
            return await claims_of([n.name for n in cluster.nodes if n.enabled],
                                   session.client)

    claims = run_async(go)
    unreachable = {n: c.one_line() for n, c in claims.items() if isinstance(c, InfraError)}
    return occupied_work(cluster, claims, stored), unreachable


def _source(name: str, enabled: bool, refresh: bool, unreachable: dict[str, str]) -> str:
    """Where a node's held work was read: ``node`` (its claims) or ``store`` (our cache)."""
    return "node" if refresh and enabled and name not in unreachable else "store"


async def _conditions(cluster: Cluster, store: Store,
                      pool: ConnectionPool) -> dict[str, Any]:
    from infra.cli.actions import conditions_from
    from infra.cli.health import probe_nodes
    from infra.runner.nodeops import admin_conditions, merge_conditions
    health = await probe_nodes(cluster, pool)
    return merge_conditions(conditions_from(health), admin_conditions(cluster, store))


def _set_admin(c: Ctx, name: str, admin: AdminState, eligible: bool, reason: str,
               what: str) -> None:
    """Record an operator state for a node, with an event, and say so."""
    cluster = c.cluster
    _node(cluster, name)
    store = _store(cluster)
    msg = f"{what}: {reason or 'no reason given'}"
    store.set_node_admin(name, admin, eligible=eligible, reason=reason)
    store.add_event(None, "node", name, msg)
    store.close()
    c.console.print(f"{name}: {msg}")


@click.group()
def node() -> None:
    """Node operations: list, maintenance, drain, undrain, reconcile."""


REFRESH = click.option("--refresh/--no-refresh", default=True, show_default=True,
                       help="Count the work each enabled node holds from its own claims "
                            "(every coordinator's); --no-refresh reads the local store only.")


@node.command("list")
@click.option("--json", "json_out", is_flag=True, help="Machine-readable output.")
@REFRESH
@click.pass_obj
def node_list(c: Ctx, json_out: bool, refresh: bool) -> None:
    """Every node: health state, operator state, eligibility, active work."""
    from rich.table import Table

    from infra.state.store import AdminState
    cluster = c.cluster
    store = _store(cluster)
    health = store.node_states()
    admins = {n: store.node_admin(n) for n in cluster.node_names}
    work, unreachable = _held_work(cluster, store, refresh)
    active: dict[str, int] = {}
    for _spec, node_name, _alloc in work:
        active[node_name] = active.get(node_name, 0) + 1
    rows: list[dict[str, Any]] = []
    for n in cluster.nodes:
        state, reason, _ = health.get(n.name, ("unknown", "", 0.0))
        admin = admins[n.name]
        rows.append({"name": n.name, "enabled": n.enabled, "health": state,
                     "health_reason": reason, "admin": admin.admin.value,
                     "eligible": admin.eligible and admin.admin is AdminState.NONE
                     and n.enabled and getattr(n, "scheduling_eligible", True),
                     "admin_reason": admin.reason, "deadline": admin.deadline,
                     "active_instances": active.get(n.name, 0),
                     "max_instances": n.max_instances,
                     "work_from": _source(n.name, n.enabled, refresh, unreachable)})
    store.close()
    if c.json_out or json_out:
        c.emit_json({"nodes": rows, "unreachable": unreachable})
        return
    table = Table(title="Nodes", title_justify="left")
    for col in ("node", "enabled", "health", "operator", "eligible", "work", "reason"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], "yes" if r["enabled"] else "no", r["health"], r["admin"],
                      "yes" if r["eligible"] else "[yellow]no[/]",
                      f"{r['active_instances']}/{r['max_instances']}",
                      r["admin_reason"] or r["health_reason"])
    c.console.print(table)
    for name, why in unreachable.items():
        c.err.print(f"[yellow]{name}: could not read its claims ({why}); its work is "
                    "counted from the local store[/]")


@node.command()
@click.argument("name")
@click.option("--enable/--disable", required=True, help="Enter or leave maintenance.")
@click.option("--reason", default="", help="Why (recorded with the state and an event).")
@click.pass_obj
def maintenance(c: Ctx, name: str, enable: bool, reason: str) -> None:
    """Stop (or resume) new placements on a node; its current work stays where it is."""
    from infra.state.store import AdminState
    if enable:
        _set_admin(c, name, AdminState.MAINTENANCE, False, reason, "maintenance enabled")
    else:
        _set_admin(c, name, AdminState.NONE, True, reason, "maintenance disabled")


def _print_drain(c: Ctx, report: DrainReport, dry_run: bool) -> None:
    from rich.table import Table
    table = Table(title=f"Drain {report.node}" + (" (dry run)" if dry_run else ""),
                  title_justify="left")
    for col in ("run", "instance", "action", "detail"):
        table.add_column(col)
    for a in report.actions:
        table.add_row(a.run_id, a.instance_id, a.kind.value, a.detail)
    c.console.print(table)


@node.command()
@click.argument("name")
@click.option("--reason", default="", help="Why (recorded).")
@click.option("--deadline", default="30m", show_default=True,
              help="How long batch work may run before it is moved or paused.")
@click.option("--dry-run", is_flag=True, help="Show what the drain would do; change nothing.")
@click.option("--wait", is_flag=True, help="Keep going until the drain is complete.")
@click.option("--grace", type=Seconds(GRACE_MAX_SECONDS), default=10.0, show_default=True,
              help="Seconds between SIGTERM and SIGKILL for work that is paused.")
@click.option("--json", "json_out", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def drain(c: Ctx, name: str, reason: str, deadline: str, dry_run: bool, wait: bool,
          grace: float, json_out: bool) -> None:
    """Mark a node draining (no new work) and move its work off (reference semantics)."""
    import asyncio

    from infra.cli.health import run_async
    from infra.runner.lifecycle import RunSession
    from infra.runner.nodeops import ActionKind, drain_pass
    from infra.state.store import AdminState
    from infra.transport.pool import ConnectionPool
    cluster = c.cluster
    _node(cluster, name)
    seconds = parse_duration(deadline)
    store = _store(cluster)
    admin = store.node_admin(name)
    reason = reason or admin.reason
    if not dry_run:
        if admin.admin is not AdminState.DRAINING:
            store.set_node_admin(name, AdminState.DRAINING, eligible=False, reason=reason,
                                 deadline=time.time() + seconds)
            store.add_event(None, "node", name, f"draining: {reason or 'no reason given'} "
                            f"(deadline {deadline})")
        elif reason != admin.reason:
            store.set_node_admin(name, AdminState.DRAINING, eligible=False, reason=reason,
                                 deadline=admin.deadline)

    async def go() -> DrainReport:
        async with ConnectionPool(cluster) as pool:
            session = RunSession(cluster, store, pool)
            while True:
                conds = await _conditions(cluster, store, pool)
                report = await drain_pass(session, name, conds, dry_run=dry_run, grace=grace)
                if dry_run or report.done or not wait:
                    return report
                counts = report.counts()
                if counts["blocked"] and not counts["wait"]:
                    return report  # only blocked moves left: waiting would not change that
                if not c.json_out and not json_out:
                    counts = report.counts()
                    c.err.print(f"{name}: draining ({counts['wait']} waiting, "
                                f"{counts['blocked']} blocked)")
                await asyncio.sleep(2.0)

    report = run_async(go)
    store.close()
    if c.json_out or json_out:
        c.emit_json({"node": name, "dry_run": dry_run, "done": report.done,
                     "counts": report.counts(),
                     "actions": [{"run_id": a.run_id, "instance_id": a.instance_id,
                                  "action": a.kind.value, "detail": a.detail}
                                 for a in report.actions]})
    else:
        _print_drain(c, report, dry_run)
        if report.done:
            c.console.print(f"{name}: drain complete; the node is in maintenance "
                            "(`node undrain --mark-eligible` makes it schedulable)")
        elif not dry_run:
            c.console.print(f"{name}: draining; run `cluster-experiment node drain {name} "
                            "--wait` to finish")
    blocked = [a.instance_id for a in report.actions if a.kind is ActionKind.BLOCKED]
    if blocked and wait:
        raise InfraError(f"{name}: drain blocked: no node can take {', '.join(blocked)}; the "
                         "node stays draining (free capacity, then run the drain again)")


@node.command()
@click.argument("name")
@click.option("--reason", default="", help="Why (recorded).")
@click.option("--mark-eligible", is_flag=True, help="Also make the node schedulable again.")
@click.pass_obj
def undrain(c: Ctx, name: str, reason: str, mark_eligible: bool) -> None:
    """Cancel a drain (the node stays in maintenance unless --mark-eligible)."""
    from infra.state.store import AdminState
    if mark_eligible:
        _set_admin(c, name, AdminState.NONE, True, reason, "undrained and eligible")
    else:
        _set_admin(c, name, AdminState.MAINTENANCE, False, reason,
                   "drain cancelled; in maintenance")


@node.command()
@click.argument("name")
@click.option("--reason", default="", help="Why (recorded with the events).")
@click.option("--dry-run", is_flag=True, help="Count what would happen; change nothing.")
@click.pass_obj
def reconcile(c: Ctx, name: str, reason: str, dry_run: bool) -> None:
    """Check the work placed on a node; recover it by policy if the node is gone (JSON)."""
    from infra.cli.health import probe_nodes, run_async
    from infra.runner.lifecycle import RunSession
    from infra.runner.nodeops import reconcile_node
    from infra.transport.pool import ConnectionPool
    cluster = c.cluster
    _node(cluster, name)
    store = _store(cluster)

    async def go() -> dict[str, object]:
        async with ConnectionPool(cluster) as pool:
            session = RunSession(cluster, store, pool)
            health = await probe_nodes(cluster, pool, [name])
            reachable = name in health and health[name].reachable
            conds = await _conditions(cluster, store, pool)
            report = await reconcile_node(session, name, reachable, conds, dry_run=dry_run)
            doc = report.as_json()
            doc.update(reachable=reachable, dry_run=dry_run, reason=reason)
            return doc

    doc = run_async(go)
    if not dry_run:
        store.add_event(None, "node", name, f"reconciled: {reason or 'manual'}")
    store.close()
    c.emit_json(doc)


@click.group()
def resource() -> None:
    """Cluster capacity."""


@resource.command("list")
@click.option("--json", "json_out", is_flag=True, help="Machine-readable output.")
@REFRESH
@click.pass_obj
def resource_list(c: Ctx, json_out: bool, refresh: bool) -> None:
    """Per node and in total: capacity, what active work holds, what is free, eligibility."""
    from rich.table import Table

    from infra.placement.snapshot import demand_on
    from infra.runner.nodeops import admin_summary
    cluster = c.cluster
    store = _store(cluster)
    held: dict[str, dict[str, float]] = {}
    devices: dict[str, list[str]] = {}
    work, unreachable = _held_work(cluster, store, refresh)
    for spec, node_name, alloc in work:
        h = held.setdefault(node_name, {"ram_gb": 0.0, "gpu_memory_gb": 0.0, "cpu_cores": 0.0,
                                        "instances": 0})
        if node_name in cluster.node_names:  # the same accounting placement uses
            demand = demand_on(cluster.node(node_name), spec)
            h["ram_gb"] += demand.ram_gb
            h["gpu_memory_gb"] += demand.gpu_memory_gb
            h["cpu_cores"] += demand.cpu_cores
        h["instances"] += 1
        ids = alloc.device_ids if alloc is not None else ()
        devices.setdefault(node_name, []).extend(str(i) for i in ids)
    admins = {n: store.node_admin(n) for n in cluster.node_names}
    health = store.node_states()
    store.close()
    rows: list[dict[str, Any]] = []
    total = {"cpu_cores": 0.0, "ram_gb": 0.0, "gpu_memory_gb": 0.0, "instances": 0.0,
             "held_ram_gb": 0.0, "held_cpu_cores": 0.0, "held_gpu_memory_gb": 0.0}
    for n in cluster.nodes:
        h = held.get(n.name, {"ram_gb": 0.0, "gpu_memory_gb": 0.0, "cpu_cores": 0.0,
                              "instances": 0})
        row = {"name": n.name, "enabled": n.enabled, "state": health.get(n.name, ("unknown",))[0],
               "operator": admin_summary(admins[n.name]) if n.enabled else "disabled",
               "cpu_cores": n.cpu_cores,
               "ram_gb": n.ram_gb, "available_ram_gb": n.available_ram_gb,
               "gpu": n.gpu, "gpu_memory_gb": n.gpu_memory_gb,
               "unified_memory": n.unified_memory, "max_instances": n.max_instances,
               "held": h, "devices_held": devices.get(n.name, []),
               "free_ram_gb": n.available_ram_gb - h["ram_gb"],
               "free_slots": n.max_instances - int(h["instances"]),
               "work_from": _source(n.name, n.enabled, refresh, unreachable)}
        rows.append(row)
        if n.enabled:
            total["cpu_cores"] += n.cpu_cores
            total["ram_gb"] += n.available_ram_gb
            total["gpu_memory_gb"] += 0.0 if n.unified_memory else n.gpu_memory_gb
            total["instances"] += n.max_instances
            total["held_ram_gb"] += h["ram_gb"]
            total["held_cpu_cores"] += h["cpu_cores"]
            total["held_gpu_memory_gb"] += h["gpu_memory_gb"]
    if c.json_out or json_out:
        c.emit_json({"nodes": rows, "total": total, "unreachable": unreachable})
        return
    table = Table(title="Resources (held = live work on each node, from any coordinator)"
                  if refresh else "Resources (held = active instances in the local store)",
                  title_justify="left")
    for col in ("node", "state", "operator", "cores held/total", "RAM GB held/avail",
                "GPU", "slots free", "devices held"):
        table.add_column(col)
    for r in rows:
        h = r["held"]
        gpu = "-" if not r["gpu"] else ("unified" if r["unified_memory"] else
                                       f"{h['gpu_memory_gb']:g}/{r['gpu_memory_gb']:g} GB")
        table.add_row(r["name"], r["state"] if r["enabled"] else "disabled", r["operator"],
                      f"{h['cpu_cores']:g}/{r['cpu_cores']}",
                      f"{h['ram_gb']:g}/{r['available_ram_gb']:g}", gpu,
                      f"{r['free_slots']}/{r['max_instances']}",
                      ", ".join(r["devices_held"]) or "-")
    table.add_row("[bold]total (enabled)[/]", "", "",
                  f"{total['held_cpu_cores']:g}/{total['cpu_cores']:g}",
                  f"{total['held_ram_gb']:g}/{total['ram_gb']:g}",
                  f"{total['held_gpu_memory_gb']:g}/{total['gpu_memory_gb']:g} GB", "", "")
    c.console.print(table)
    for name, why in unreachable.items():
        c.err.print(f"[yellow]{name}: could not read its claims ({why}); its work is "
                    "counted from the local store[/]")
