"""Watch a run: one status sweep per node per tick, log streams home, results on finish.

The watcher holds the run's lease in the store so two coordinators never both write the
same log copy; without the lease it only reports. Leaving (duration over, Ctrl-C) cancels
the streams and leaves every experiment running: the next watcher resumes from the offsets.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

from infra.errors import InfraError
from infra.runner.lifecycle import RunSession
from infra.state import InstanceRecord
from infra.state.store import coordinator_id

FOLLOW_STREAMS_PER_NODE = 4
"""Long-lived follow channels per node; further instances are synced by reads each tick,
so streams never use up the connection's channels (OpenSSH MaxSessions is 10)."""
RESULT_FETCH_ATTEMPTS = 3


@dataclass
class MonitorOutcome:
    """How watching ended."""

    finished: bool           # every instance is over, logs drained, results fetched
    lease_holder: str | None  # another coordinator held the lease (we only reported)
    unreachable: dict[str, str] = field(default_factory=dict)


@dataclass
class _Streams:
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    drained: set[str] = field(default_factory=set)
    fetch_failures: dict[str, int] = field(default_factory=dict)

    def per_node(self, node: str, records: dict[str, InstanceRecord]) -> int:
        return sum(1 for i, t in self.tasks.items()
                   if not t.done() and records.get(i) is not None and records[i].node == node)


async def monitor_run(session: RunSession, run_id: str, duration: float | None, *,
                      tick: float = 1.0, holder: str | None = None) -> MonitorOutcome:
    """Watch until ``duration`` seconds pass (None: until everything has finished)."""
    holder = holder or coordinator_id()
    ttl = max(30.0, tick * 5)
    other = session.store.acquire_lease(run_id, holder, ttl)
    if other is not None:
        session.emit("lease", run_id, f"run is being watched by {other}; showing status only "
                     "(no log streaming or result fetching from here)")
    deadline = None if duration is None else time.monotonic() + duration
    streams = _Streams()
    outcome = MonitorOutcome(finished=False, lease_holder=other)
    try:
        while True:
            outcome.unreachable = await session.sweep(run_id)
            for node, why in outcome.unreachable.items():
                session.emit("node", node, f"unreachable: {why}")
            records = {r.instance_id: r for r in session.store.instances(run_id)}
            if other is None:
                session.store.acquire_lease(run_id, holder, ttl)
                await _service_logs_and_results(session, run_id, records, streams)
            if _all_done(records, streams, watching=other is None):
                outcome.finished = True
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            await asyncio.sleep(tick if deadline is None else
                                max(0.0, min(tick, deadline - time.monotonic())))
    finally:
        for task in streams.tasks.values():
            task.cancel()
        for task in streams.tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if other is None:
            session.store.release_lease(run_id, holder)
    return outcome


def _all_done(records: dict[str, InstanceRecord], streams: _Streams, *, watching: bool) -> bool:
    if not records:
        return True
    for rec in records.values():
        if not rec.state.finished:
            return False
        pending = rec.instance_id not in streams.drained or not rec.results_fetched
        retry_left = streams.fetch_failures.get(rec.instance_id, 0) < RESULT_FETCH_ATTEMPTS
        if watching and pending and retry_left:
            return False
    return True


async def _service_logs_and_results(session: RunSession, run_id: str,
                                    records: dict[str, InstanceRecord],
                                    streams: _Streams) -> None:
    for instance_id, rec in sorted(records.items()):
        task = streams.tasks.get(instance_id)
        if task is not None and task.done():
            if task.cancelled() or task.exception() is None:
                streams.drained.add(instance_id)
            del streams.tasks[instance_id]
            task = None
        if instance_id in streams.drained:
            pass
        elif rec.pid is None and not rec.state.finished:
            continue  # not started yet
        elif task is None and streams.per_node(rec.node, records) < FOLLOW_STREAMS_PER_NODE \
                and not rec.state.finished:
            streams.tasks[instance_id] = asyncio.create_task(
                session.stream_log_until_done(run_id, instance_id))
            continue
        elif task is None:
            try:
                await session.sync_log(run_id, rec, follow=False)
                if rec.state.finished:
                    streams.drained.add(instance_id)
            except InfraError as exc:
                session.emit("log", instance_id, f"log sync failed: {exc.one_line()}")
        if rec.state.finished and instance_id in streams.drained and not rec.results_fetched \
                and streams.fetch_failures.get(instance_id, 0) < RESULT_FETCH_ATTEMPTS:
            try:
                await session.fetch_results(run_id, rec)
            except InfraError as exc:
                streams.fetch_failures[instance_id] = \
                    streams.fetch_failures.get(instance_id, 0) + 1
                session.event(run_id, "results", instance_id,
                              f"fetching results failed: {exc.one_line()}")
