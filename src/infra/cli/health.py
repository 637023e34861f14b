"""The health check (``--health-check``) and the helpers every node-touching action shares.

Kept apart from ``infra.cli.actions`` so that a health check loads the transport and the
probe only: not the planner, the store, the monitor or the live dashboard.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from infra.errors import InfraError, UsageError
from infra.probe.health import NodeHealth
from infra.probe.run import check_health
from infra.transport.pool import ConnectionPool

if TYPE_CHECKING:
    from infra.cli.main import Ctx
    from infra.config import Cluster

T = TypeVar("T")


def with_accept_new(cluster: Cluster, accept_new: bool) -> Cluster:
    """The cluster with first-contact host keys accepted when the flag asks for it."""
    if not accept_new:
        return cluster
    return dataclasses.replace(cluster, health_check=dataclasses.replace(
        cluster.health_check, accept_new_host_keys=True))


CLEANUP_WAIT_S = 15.0
"""After Ctrl-C, the longest the command's cancelled tasks get to finish their own cleanup
(kill a subprocess, close a connection) before ``asyncio.run`` cancels them a second time."""


def run_async(factory: Callable[[], Awaitable[T]]) -> T:
    """Run the command's coroutine. After Ctrl-C the processes it started are killed, but
    asyncio may still report their transports as collected after the loop closed: noise that
    must not look like a crash ("Event loop is closed"), so it is not printed."""
    try:
        return asyncio.run(_drained(factory()))
    except KeyboardInterrupt:
        quiet_closed_loop_noise()
        raise


async def _drained(command: Awaitable[T]) -> T:
    """The command; when Ctrl-C cancels it, it ends only after the tasks being cancelled with
    it have finished their cleanup (bounded by CLEANUP_WAIT_S).

    ``asyncio.gather`` gives up on its other children as soon as one of them ends cancelled,
    and ``asyncio.run`` then cancels whatever is still running a second time, in the middle
    of its cleanup. On Python 3.11 that second cancellation, landing on a subprocess being
    created, leaves a wait for its end that never returns: a deploy hung for ever after
    Ctrl-C. Tasks nobody cancelled (a background loop) are left to ``asyncio.run``.
    """
    try:
        return await command
    except asyncio.CancelledError:
        me = asyncio.current_task()
        cleaning = {t for t in asyncio.all_tasks()
                    if t is not me and not t.done() and _cancelling(t)}
        if cleaning:
            await asyncio.wait(cleaning, timeout=CLEANUP_WAIT_S)
        raise


def _cancelling(task: asyncio.Task[Any]) -> bool:
    """True when the task has been asked to cancel and has not finished (3.11+; else False)."""
    count = getattr(task, "cancelling", None)
    return bool(count()) if count is not None else False


def quiet_closed_loop_noise() -> None:
    """Drop asyncio's leftovers of an interrupted loop: unraisable 'Event loop is closed'
    from transport finalizers, and the child watcher's 'loop ... is closed' warnings."""
    import logging
    logging.getLogger("asyncio").setLevel(logging.ERROR + 10)
    previous = sys.unraisablehook

    def hook(unraisable: sys.UnraisableHookArgs) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc):
            return
        previous(unraisable)

    sys.unraisablehook = hook


async def probe_nodes(cluster: Cluster, pool: ConnectionPool,
                      names: list[str] | None = None) -> dict[str, NodeHealth]:
    """Probe enabled nodes (or the named ones) concurrently: one probe call per node."""
    nodes = [n for n in cluster.nodes if (n.enabled if names is None else n.name in names)]
    timeout = cluster.health_check.timeout_seconds

    async def one(node_name: str) -> NodeHealth:
        node = cluster.node(node_name)
        transport = await pool.get(node)
        return await check_health(transport, node, cluster.health_check.checks, timeout)

    results = await asyncio.gather(*(one(n.name) for n in nodes))
    return {h.node: h for h in results}


def report_new_host_keys(c: Ctx) -> None:
    """Show every host key recorded on first contact (accept-new), so it can be checked."""
    from infra.transport.ssh import RECORDED_KEYS
    if not RECORDED_KEYS:
        return
    from rich.markup import escape
    while RECORDED_KEYS:
        key = RECORDED_KEYS.pop(0)
        c.err.print(f"[yellow]new host key recorded[/] for {escape(key.host)} in "
                    f"{escape(key.known_hosts)}: {key.algorithm} {key.fingerprint} "
                    "(compare with `ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub` on the node)",
                    soft_wrap=True)


def health_json(h: NodeHealth) -> dict[str, Any]:
    """One node's health as the ``--health-check --json`` document shows it (no rich needed)."""
    doc: dict[str, Any] = {"status": h.status.value.upper(), "reasons": list(h.reasons),
                           "error": h.error,
                           "mismatches": [{"field": m.field, "declared": m.declared,
                                           "detected": m.detected} for m in h.mismatches]}
    if h.facts is not None:
        doc["facts"] = dataclasses.asdict(h.facts)
    return doc


def do_health_check(c: Ctx, cluster: Cluster, accept_new: bool) -> None:
    cluster = with_accept_new(cluster, accept_new)
    enabled = [n for n in cluster.nodes if n.enabled]
    if not enabled:
        raise UsageError(f"{cluster.path}: no node is enabled")

    async def go() -> dict[str, NodeHealth]:
        async with ConnectionPool(cluster) as pool:
            return await probe_nodes(cluster, pool)

    started = time.monotonic()
    try:
        if c.json_out:
            health = run_async(go)
        else:
            with c.err.status(f"probing {len(enabled)} node(s)..."):
                health = run_async(go)
    finally:
        report_new_host_keys(c)
    elapsed = time.monotonic() - started
    if c.json_out:
        c.emit_json({"nodes": {name: health_json(h) for name, h in health.items()},
                     "ok": all(h.reachable for h in health.values()),
                     "seconds": round(elapsed, 3)})
    else:
        from infra.cli import views  # rich tables: not for --json
        c.console.print(views.health_table(cluster, health))
    down = [n for n, h in health.items() if not h.reachable]
    if down:
        raise InfraError(f"{len(down)} of {len(health)} enabled node(s) unavailable: "
                         + ", ".join(f"{n} ({health[n].error})" for n in down))
