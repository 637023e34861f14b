"""What a campaign adds up to, for `status`, the dashboard and `--json` (pure)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from infra.state import InstancePhase, InstanceRecord, PoolRecord

HIDDEN_WHEN_LONG = frozenset({InstancePhase.QUEUED, InstancePhase.DISPATCHED,
                              InstancePhase.EXITED, InstancePhase.CANCELLED,
                              InstancePhase.SKIPPED})
"""Task phases a long table leaves to the campaign's summary line."""
LONG_TABLE = 30
"""A run with more rows than this shows only the tasks that need a look."""


@dataclass(frozen=True)
class PoolLine:
    node: str
    state: str
    workers: int
    queued: int
    running: int
    reason: str
    abandoned: bool


@dataclass(frozen=True)
class CampaignSummary:
    """One campaign of a run: its tasks by phase, failed ones with reasons, its pools."""

    name: str
    total: int
    counts: tuple[tuple[str, int], ...]  # phase value -> count, in phase order
    failed: tuple[tuple[str, str], ...]  # (task id, reason), failed and lost tasks
    pools: tuple[PoolLine, ...]
    queued_reason: str

    def count(self, *phases: InstancePhase) -> int:
        wanted = {p.value for p in phases}
        return sum(n for phase, n in self.counts if phase in wanted)

    @property
    def done(self) -> int:
        return self.count(InstancePhase.EXITED)

    def line(self) -> str:
        """``train: 40 tasks: 31 exited, 3 running, 4 queued, 2 failed``."""
        parts = ", ".join(f"{n} {phase}" for phase, n in self.counts if n)
        return f"{self.name}: {self.total} task(s): {parts}"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "total": self.total, "counts": dict(self.counts),
                "failed": [{"instance_id": i, "reason": r} for i, r in self.failed],
                "queued_reason": self.queued_reason,
                "pools": [{"node": p.node, "state": p.state, "workers": p.workers,
                           "queued": p.queued, "running": p.running, "reason": p.reason,
                           "abandoned": p.abandoned} for p in self.pools]}


def summarize(records: Iterable[InstanceRecord],
              pools: Sequence[PoolRecord] = ()) -> tuple[CampaignSummary, ...]:
    """Every campaign of a run, by name."""
    groups: dict[str, list[InstanceRecord]] = {}
    for rec in records:
        if rec.spec.campaign is not None:
            groups.setdefault(rec.spec.campaign.name, []).append(rec)
    out = []
    for name, tasks in sorted(groups.items()):
        counts = {p.value: 0 for p in InstancePhase}
        for t in tasks:
            counts[t.state.value] += 1
        failed = tuple((t.instance_id, t.reason or t.state.value) for t in tasks
                       if t.state in (InstancePhase.FAILED, InstancePhase.LOST))
        waiting = [t.reason for t in tasks
                   if t.state is InstancePhase.QUEUED and t.reason.startswith("queued:")]
        lines = tuple(PoolLine(p.node, p.state, p.workers, p.queued, p.running, p.reason,
                               p.abandoned) for p in pools if p.campaign == name)
        out.append(CampaignSummary(
            name=name, total=len(tasks),
            counts=tuple((k, v) for k, v in counts.items() if v),
            failed=failed, pools=lines, queued_reason=waiting[0] if waiting else ""))
    return tuple(out)


def shown_rows(records: Sequence[InstanceRecord]) -> tuple[list[InstanceRecord], int]:
    """The rows a table shows, and how many it leaves to the campaign summaries: all of
    them for a short run; for a long one, every plain instance and the tasks that are
    running, failed or otherwise worth a look."""
    if len(records) <= LONG_TABLE:
        return list(records), 0
    shown = [r for r in records
             if r.spec.campaign is None or r.state not in HIDDEN_WHEN_LONG]
    return shown, len(records) - len(shown)
