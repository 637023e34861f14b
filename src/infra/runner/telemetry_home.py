"""Instances' telemetry comes home: node-side lines appended exactly once to the home copy.

The acting watcher's status sweep asks each node for the telemetry of its started, not yet
drained instances from ``home size - telemetry_base`` (the bytes of the current placement's
node file already home) and appends each chunk only while the home copy still ends at the
offset it asked from, as log chunks are (``harvest.append_log``): after any drop or retry no
byte is lost and none is written twice. A move starts a new node file that continues the same
home file (``restart_fields``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.errors import LeaseLostError
from infra.runner.supervisor_client import InstanceState, TelemetryChunk
from infra.state import InstancePhase, InstanceRecord
from infra.state.store import Store
from infra.telemetry.files import telemetry_path
from infra.telemetry.sample import Sample, parse_line

TELEMETRY_PER_SWEEP = 256
"""At most this many instances' telemetry is asked of one node per sweep (the rest next)."""
TAIL_BYTES = (4 << 10, 64 << 10)
"""The newest sample of a home file is looked for in its last 4 KiB, then 64 KiB (a
``status --json`` of a large campaign reads many files)."""


def home_size(path: Path) -> int:
    """The home copy's size (0 while it does not exist)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def restart_fields(log_dir: Path, run_id: str, instance_id: str) -> dict[str, Any]:
    """Store fields for a new placement: its node file continues the home file from here."""
    base = home_size(telemetry_path(log_dir, run_id, instance_id))
    return {"telemetry_base": base, "telemetry_offset": base, "telemetry_done": 0}


def _started(rec: InstanceRecord) -> bool:
    """A process of the current placement may have run (so a node file may exist)."""
    return rec.pid is not None or (rec.started_at is not None and rec.state not in (
        InstancePhase.QUEUED, InstancePhase.DISPATCHED, InstancePhase.MOVING,
        InstancePhase.PLANNED, InstancePhase.DEPLOYING))


def wanted(log_dir: Path, records: Sequence[InstanceRecord],
           limit: int = TELEMETRY_PER_SWEEP) -> dict[str, int]:
    """Instance -> node-file offset to ask from, for the node's started, undrained work
    (running work first, at most ``limit``)."""
    todo = [r for r in records if not r.telemetry_done and _started(r)]
    todo.sort(key=lambda r: (not r.state.active, r.instance_id))
    return {r.instance_id: node_offset(log_dir, r) for r in todo[:limit]}


def node_offset(log_dir: Path, rec: InstanceRecord) -> int:
    """Where the current placement's node file continues: home size minus the base."""
    size = home_size(telemetry_path(log_dir, rec.run_id, rec.instance_id))
    return max(0, size - rec.telemetry_base)


def append_chunk(store: Store, log_dir: Path, rec: InstanceRecord, asked: int,
                 chunk: TelemetryChunk, guard: Callable[[], bool] | None) -> int | None:
    """Append a chunk read from node offset ``asked`` to the home copy; None (nothing
    written) when the copy no longer ends there or the chunk does not start there."""
    if chunk.offset - len(chunk.data) != asked:
        return None
    path = telemetry_path(log_dir, rec.run_id, rec.instance_id)
    if not chunk.data:  # nothing new: no empty file for work that was never sampled
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        return size if max(0, size - rec.telemetry_base) == asked else None
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as fh:
        if max(0, fh.tell() - rec.telemetry_base) != asked:
            return None
        if guard is not None and not guard():
            raise LeaseLostError(f"{rec.run_id}: the run's lease was lost; not writing "
                                 f"{rec.instance_id}'s telemetry copy")
        fh.write(chunk.data)
        fh.flush()
        size = fh.tell()
    store.update_instance(rec.run_id, rec.instance_id, telemetry_offset=size)
    return size


@dataclass(frozen=True)
class Latest:
    """The newest sample of one instance, where it ran and when it arrived (wall time)."""

    node: str
    sample: Sample
    arrived_at: float

    def age(self, now: float) -> float:
        """Seconds since it was taken: its lag on arrival (clocks trusted only then) plus
        the time since."""
        return max(0.0, now - self.arrived_at) + max(0.0, self.arrived_at - self.sample.t)


def newest_sample(data: bytes) -> Sample | None:
    """The last decodable sample of some complete lines (None if there is none)."""
    for line in reversed(data.splitlines()):
        sample = parse_line(line) if line.strip() else None
        if sample is not None:
            return sample
    return None


def last_sample(path: Path) -> Sample | None:
    """The newest sample of a home telemetry file (read from its tail; None if none)."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, 2)
            for most in TAIL_BYTES:
                fh.seek(max(0, size - most))
                sample = newest_sample(fh.read(most))
                if sample is not None or most >= size:
                    return sample
    except OSError:
        pass
    return None


def take_telemetry(store: Store, log_dir: Path, rec: InstanceRecord, asked: int | None,
                   state: InstanceState | None, guard: Callable[[], bool] | None,
                   seen: dict[tuple[str, str], Latest]) -> None:
    """Fold one node answer's telemetry for ``rec`` in: append the chunk once, keep the
    newest sample, and mark the telemetry drained once the instance is over there and its
    file is home. A finished instance the node has no copy of has nothing more to send."""
    if asked is None:
        return
    if state is None or state.placement != rec.placement_id:
        if rec.state.finished:
            store.update_instance(rec.run_id, rec.instance_id, telemetry_done=1)
        return
    chunk = state.telemetry
    if chunk is None:
        return
    size = append_chunk(store, log_dir, rec, asked, chunk, guard)
    if size is None:
        return
    sample = newest_sample(chunk.data) if chunk.data else None
    if sample is not None:
        seen[(rec.run_id, rec.instance_id)] = Latest(rec.node, sample, time.time())
    if state.is_final and chunk.eof:
        store.update_instance(rec.run_id, rec.instance_id, telemetry_done=1)
