"""Live terminal dashboard: pure rendering of a run snapshot plus the driver that draws it."""

from infra.dashboard.live import Dashboard
from infra.dashboard.render import render, render_event_line, render_status_line

__all__ = ["Dashboard", "render", "render_event_line", "render_status_line"]
