"""Terminal driver for the dashboard: a rich Live frame on a terminal, plain lines otherwise.

It owns the rich ``Console`` and only decides when and how to draw; what a frame shows is
``render.render`` (pure). On a terminal one ``Live`` is reused and refreshed at most
``refresh_per_second`` times a second; into a pipe or file each new event is printed once and
the status line only when it changes, so logs of a detached run stay readable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType

from rich.console import Console
from rich.live import Live
from rich.text import Text

from infra.dashboard.render import (
    render,
    render_event_line,
    render_status_line,
    render_usage_line,
)
from infra.monitor.snapshot import RunSnapshot

_EventKey = tuple[float, str, str]

USAGE_EVERY_SECONDS = 30.0
"""Plain mode prints the instances' usage line at most this often (logs stay readable)."""


class Dashboard:
    """Draws successive ``RunSnapshot``s; use as a context manager or call ``close()``."""

    def __init__(self, console: Console | None = None, refresh_per_second: float = 4,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.console = console if console is not None else Console()
        self._interval = 1.0 / refresh_per_second if refresh_per_second > 0 else 0.0
        self._clock = clock
        self._live: Live | None = None
        self._last_draw: float | None = None
        self._pending: RunSnapshot | None = None
        self._printed: set[_EventKey] = set()
        self._status: str | None = None
        self._usage_at: float | None = None
        self._closed = False

    @property
    def live(self) -> bool:
        """True when drawing a live frame (terminal), False in plain line mode."""
        return self.console.is_terminal

    def __enter__(self) -> Dashboard:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def update(self, snapshot: RunSnapshot) -> None:
        """Show ``snapshot``; on a terminal a too-early frame waits for the next update/close."""
        if self._closed:
            return
        if not self.live:
            self._print_plain(snapshot)
            return
        now = self._clock()
        if self._last_draw is not None and now - self._last_draw < self._interval:
            self._pending = snapshot
            return
        self._draw(snapshot)
        self._last_draw = now

    def close(self) -> None:
        """Draw any deferred frame and stop; the last frame stays on screen."""
        if self._closed:
            return
        self._closed = True
        if self._live is not None:
            if self._pending is not None:
                self._draw(self._pending)
            self._live.stop()
            self._live = None
        self._pending = None

    def _draw(self, snapshot: RunSnapshot) -> None:
        self._pending = None
        width, height = self.console.size
        # One line short of the screen so the frame never scrolls the terminal.
        frame = render(snapshot, width=width, height=max(1, height - 1))
        if self._live is None:
            self._live = Live(frame, console=self.console, auto_refresh=False, screen=False,
                              transient=False)
            self._live.start(refresh=True)
        else:
            self._live.update(frame, refresh=True)

    def _print_plain(self, snapshot: RunSnapshot) -> None:
        events = sorted(snapshot.events, key=lambda e: e.at)
        for event in events:
            key = (event.at, event.subject, event.message)
            if key not in self._printed:
                self._out(render_event_line(event))
                self._printed.add(key)
        if events:
            # Keys older than the snapshot's window cannot come back: keep the set small.
            oldest = events[0].at
            self._printed = {k for k in self._printed if k[0] >= oldest}
        status = render_status_line(snapshot)
        if status != self._status:
            self._out(status)
            self._status = status
        usage = render_usage_line(snapshot)
        now = self._clock()
        if usage is not None and (self._usage_at is None or
                                  now - self._usage_at >= USAGE_EVERY_SECONDS):
            self._out(usage)
            self._usage_at = now

    def _out(self, line: str) -> None:
        self.console.print(Text(line), soft_wrap=True, highlight=False)
