"""Campaign progress: counts by state, a recent completion rate and an ETA (pure).

``Progress.of`` takes each task's phase and end time (a wall-clock ``time.time()`` value, or
None while it has not ended) plus ``now``; ``render_bar`` draws the one-line bar the run
command and ``watch`` show, and ``render_bar_text`` the same line styled for rich.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from rich.text import Text

from infra.state.store import InstancePhase

__all__ = ["RATE_WINDOW_S", "PhaseEnd", "Progress", "format_eta", "render_bar",
           "render_bar_text"]

P = InstancePhase

RATE_WINDOW_S = 300.0  # the rate counts tasks that ended in the last five minutes
MIN_BAR_CELLS = 10

PhaseEnd = tuple[InstancePhase, float | None]  # one task: its phase, when it ended

_RUNNING = frozenset({P.DEPLOYING, P.STARTING, P.RUNNING, P.RESTARTING, P.MOVING})
_QUEUED = frozenset({P.PLANNED, P.QUEUED, P.DISPATCHED, P.PAUSED})
_FAILED = frozenset({P.FAILED, P.LOST})
_CANCELLED = frozenset({P.CANCELLED, P.STOPPED})


@dataclass(frozen=True)
class Progress:
    """Where a campaign stands: every task is in exactly one of the six counts."""

    done: int
    running: int
    queued: int
    failed: int
    skipped: int
    cancelled: int
    rate: float        # tasks that ran to an end (done or failed) per minute, recently
    eta: float | None  # seconds until queued and running work is through; None: no rate yet

    @property
    def total(self) -> int:
        return (self.done + self.running + self.queued + self.failed + self.skipped
                + self.cancelled)

    @property
    def ended(self) -> int:
        """Tasks that will not run again (done, failed, skipped or cancelled)."""
        return self.done + self.failed + self.skipped + self.cancelled

    @property
    def remaining(self) -> int:
        return self.running + self.queued

    @classmethod
    def of(cls, tasks: Iterable[PhaseEnd], started_at: float | None, now: float,
           window: float = RATE_WINDOW_S) -> Progress:
        """Count ``tasks`` by phase; rate over the last ``window`` s (or since the start)."""
        counts = dict.fromkeys(("done", "running", "queued", "failed", "skipped",
                                "cancelled"), 0)
        recent = 0
        since = now - window if started_at is None else max(now - window, started_at)
        for phase, ended_at in tasks:
            bucket = _bucket(phase)
            counts[bucket] += 1
            if bucket in ("done", "failed") and ended_at is not None and since <= ended_at <= now:
                recent += 1
        span = now - since
        rate = recent * 60.0 / span if span > 0 else 0.0
        remaining = counts["running"] + counts["queued"]
        eta = 0.0 if remaining == 0 else (remaining * 60.0 / rate if rate > 0 else None)
        return cls(rate=rate, eta=eta, **counts)


def _bucket(phase: InstancePhase) -> str:
    """Which count a phase falls in."""
    if phase is P.EXITED:
        return "done"
    if phase in _FAILED:
        return "failed"
    if phase is P.SKIPPED:
        return "skipped"
    if phase in _CANCELLED:
        return "cancelled"
    if phase in _RUNNING:
        return "running"
    if phase in _QUEUED:
        return "queued"
    raise ValueError(f"no progress bucket for phase {phase!r}")


def format_eta(seconds: float | None) -> str:
    """``45s``, ``6m``, ``2h05m``; ``?`` when unknown."""
    if seconds is None or math.isnan(seconds) or math.isinf(seconds):
        return "?"
    s = max(0, math.ceil(seconds))
    if s < 60:
        return f"{s}s"
    minutes = (s + 30) // 60
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _summary(p: Progress) -> str:
    parts = [f"{p.done}/{p.total} done", f"{p.running} running", f"{p.queued} queued",
             f"{p.failed} failed"]
    if p.skipped:
        parts.append(f"{p.skipped} skipped")
    if p.cancelled:
        parts.append(f"{p.cancelled} cancelled")
    parts.append(f"{p.rate:.1f}/min")
    parts.append(f"ETA {format_eta(p.eta)}")
    return " · ".join(parts)


def _cells(p: Progress, cells: int) -> tuple[int, int]:
    """Bar cells for tasks done and for tasks ended without success (never rounding up)."""
    if p.total == 0:
        return 0, 0
    done = p.done * cells // p.total
    bad = (p.ended * cells // p.total) - done
    return done, bad


def render_bar(progress: Progress, width: int) -> str:
    """``[#####x....] 12/40 done · 3 running · ...`` fitting ``width`` (bar ≥ 10 cells)."""
    text = _summary(progress)
    cells = max(MIN_BAR_CELLS, width - len(text) - 3)
    done, bad = _cells(progress, cells)
    return f"[{'#' * done}{'x' * bad}{'.' * (cells - done - bad)}] {text}"


def render_bar_text(progress: Progress, width: int) -> Text:
    """``render_bar`` as a rich ``Text``: done cells green, failed/skipped ones red."""
    text = _summary(progress)
    cells = max(MIN_BAR_CELLS, width - len(text) - 3)
    done, bad = _cells(progress, cells)
    out = Text("[")
    out.append("#" * done, style="green")
    out.append("x" * bad, style="red")
    out.append("." * (cells - done - bad), style="dim")
    out.append("] ")
    out.append(text)
    return out
