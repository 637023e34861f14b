"""Pure rendering of a ``RunSnapshot`` into rich renderables and plain lines.

No I/O and no clock reads: the frame's time comes from ``snapshot.taken_at``, so a frame is
a function of (snapshot, width, height) and is tested by rendering to a recording console.
Only what fits is rendered (troubled rows first, "+N more" for the rest), which keeps a frame
of 50 nodes and 200 instances within the terminal and cheap to draw.
"""

from __future__ import annotations

import signal as signal_module
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from rich.cells import cell_len, set_cell_size
from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.segment import Segment
from rich.text import Text

from infra.monitor.snapshot import (
    EventView,
    GpuView,
    InstanceView,
    NodeState,
    NodeView,
    RunSnapshot,
    TelemetryView,
)

_T = TypeVar("_T")

NARROW_WIDTH = 100
"""Below this many columns, low-value columns are dropped."""
TINY_WIDTH = 70
"""Below this many columns, only the columns needed to spot trouble are kept."""

NODE_STYLE: dict[NodeState, str] = {
    NodeState.HEALTHY: "green",
    NodeState.DEGRADED: "yellow",
    NodeState.RECONNECTING: "yellow",
    NodeState.DISCONNECTED: "red",
    NodeState.OFFLINE: "bold red",
    NodeState.BROKEN: "bold magenta",
    NodeState.UNKNOWN: "dim",
    NodeState.DISABLED: "dim",
    NodeState.MAINTENANCE: "blue",
    NodeState.DRAINING: "magenta",
}

# Lower rank is shown first: nodes that need attention before healthy and disabled ones.
_NODE_RANK: dict[NodeState, int] = {
    NodeState.OFFLINE: 0,
    NodeState.BROKEN: 1,
    NodeState.DISCONNECTED: 1,
    NodeState.RECONNECTING: 2,
    NodeState.DEGRADED: 3,
    NodeState.UNKNOWN: 4,
    NodeState.DRAINING: 5,
    NodeState.MAINTENANCE: 6,
    NodeState.HEALTHY: 7,
    NodeState.DISABLED: 8,
}

INSTANCE_STYLE: dict[str, str] = {
    "planned": "cyan",
    "deploying": "cyan",
    "starting": "cyan",
    "running": "green",
    "restarting": "yellow",
    "unknown": "yellow",
    "failed": "bold red",
    "lost": "red",
    "exited": "dim green",
    "stopped": "dim",
}

# Order of states in counts and the rank used to pick which instances to show: troubled
# (failing, restarting, lost, unreachable) first, then active, then finished.
_INSTANCE_ORDER: tuple[str, ...] = (
    "failed", "lost", "restarting", "unknown",
    "running", "starting", "deploying", "planned",
    "exited", "stopped",
)
_TROUBLED = frozenset({"failed", "lost", "restarting", "unknown"})
_FINISHED = frozenset({"exited", "stopped"})

_EVENT_STYLE_WORDS: tuple[tuple[str, str], ...] = (
    ("fail", "red"), ("lost", "red"), ("error", "red"), ("offline", "red"),
    ("disk full", "red"),
    ("restart", "yellow"), ("reconnect", "yellow"), ("degrad", "yellow"),
)


# ---------------------------------------------------------------------------------------------
# small formatters (pure)


def _clean(value: str) -> str:
    """One printable line: control characters become spaces, ends are stripped."""
    if value.isprintable():
        return value.strip()
    return "".join(ch if ch.isprintable() else " " for ch in value).strip()


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


def format_duration(seconds: float | None) -> str:
    """Compact duration: 45s, 12m05s, 3h04m, 2d03h; "-" when unknown."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def signal_name(value: str | int) -> str:
    """SIGKILL for "9", 9 or "SIGKILL"; the value itself when it names no known signal."""
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        try:
            return signal_module.Signals(abs(int(text))).name
        except ValueError:
            return f"signal {text}"
    return text


def exit_text(instance: InstanceView) -> str:
    """How the instance ended: a signal name, an exit code, or "" while it has not."""
    if instance.signal:
        return signal_name(instance.signal)
    if instance.exit_code is None:
        return ""
    if instance.exit_code < 0:  # subprocess convention: -N means killed by signal N
        return signal_name(-instance.exit_code)
    return str(instance.exit_code)


def _num(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _load(node: NodeView) -> str:
    if node.load1 is None:
        return "-"
    if node.cpu_count:
        return f"{node.load1:.1f}/{node.cpu_count}"
    return f"{node.load1:.1f}"


def _ram(node: NodeView) -> str:
    if node.mem_used_gb is None and node.mem_total_gb is None:
        return "-"
    used = "?" if node.mem_used_gb is None else _num(node.mem_used_gb)
    total = "?" if node.mem_total_gb is None else _num(node.mem_total_gb)
    return f"{used}/{total}G"


def gpu_text(gpus: Sequence[GpuView], *, detail: bool = True) -> str:
    """Several GPUs in one cell: utilisations, summed memory, hottest GPU temperature."""
    if not gpus:
        return "-"
    utils = [g.utilization_pct for g in gpus]
    known = [u for u in utils if u is not None]
    if not known:
        util = "?%"
    elif len(gpus) > 4:
        util = f"avg {sum(known) / len(known):.0f}% max {max(known):.0f}%"
    else:
        util = "/".join("?" if u is None else f"{u:.0f}" for u in utils) + "%"
    parts = [f"{len(gpus)}x {util}" if len(gpus) > 1 else util]
    if detail:
        used = [g.memory_used_mb for g in gpus if g.memory_used_mb is not None]
        total = [g.memory_total_mb for g in gpus if g.memory_total_mb is not None]
        if used and total:
            parts.append(f"{_num(sum(used) / 1024)}/{_num(sum(total) / 1024)}G")
        temps = [g.temperature_c for g in gpus if g.temperature_c is not None]
        if temps:
            parts.append(f"{max(temps):.0f}°C")
    return " ".join(parts)


def format_bytes(value: float | None) -> str:
    """Compact size: 512K, 340M, 1.2G; "-" when unknown."""
    if value is None:
        return "-"
    for unit, size in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if value >= size:
            scaled = value / size
            return f"{scaled:.1f}{unit}" if scaled < 10 else f"{scaled:.0f}{unit}"
    return f"{value:.0f}B"


def _aged(text: str, t: TelemetryView) -> Cell:
    """A telemetry value: plain while current; dim with the sample's age when it is not."""
    if text == "-":
        return text, "dim"
    if t.stale:
        return f"{text} ({format_duration(t.age_seconds)} ago)", "dim"
    return text, ""


def usage_cells(t: TelemetryView | None, *, gpu: bool) -> list[Cell]:
    """The CPU %, RSS (and GPU) cells of one instance from its newest telemetry sample."""
    if t is None:
        return [("-", "dim")] * (3 if gpu else 2)
    cpu = "-" if t.cpu_percent is None else f"{t.cpu_percent:.0f}%"
    cells = [_aged(cpu, t), _aged(format_bytes(t.rss_bytes), t)]
    if gpu:
        cells.append(_aged(gpu_usage(t), t))
    return cells


def gpu_usage(t: TelemetryView) -> str:
    """GPU utilisation and memory of one instance: "97% 1.2G", "97%", "-"."""
    parts = []
    if t.gpu_util_percent is not None:
        parts.append(f"{t.gpu_util_percent:.0f}%")
    if t.gpu_mem_mb is not None:
        parts.append(format_bytes(t.gpu_mem_mb * (1 << 20)))
    return " ".join(parts) or "-"


def _power(node: NodeView) -> str:
    return "-" if node.power_mw is None else f"{node.power_mw / 1000:.1f}W"


def _temp(node: NodeView) -> str:
    return "-" if node.temperature_c is None else f"{node.temperature_c:.0f}°C"


def _temp_style(node: NodeView) -> str:
    t = node.temperature_c
    if t is None:
        return ""
    return "bold red" if t >= 85 else "yellow" if t >= 70 else ""


def _instance_rank(state: str) -> int:
    if state in _TROUBLED:
        return 0
    if state in _FINISHED:
        return 2
    return 1


def _state_counts(states: Iterable[str]) -> list[tuple[str, int]]:
    """(state, count) in the fixed display order, unknown states after, alphabetically."""
    counts = Counter(states)
    order = {s: i for i, s in enumerate(_INSTANCE_ORDER)}
    return sorted(counts.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))


def _counts_text(states: Iterable[str], *, styled: bool) -> Text:
    out = Text()
    for i, (state, n) in enumerate(_state_counts(states)):
        if i:
            out.append(" · ")
        out.append(f"{n} {state}", style=INSTANCE_STYLE.get(state, "") if styled else "")
    return out


def _line(text: Text | str, style: str = "") -> Text:
    """A Text that never wraps: cut with an ellipsis at the available width."""
    t = Text(text, style=style) if isinstance(text, str) else text
    t.no_wrap = True
    t.overflow = "ellipsis"
    return t


def _section_rule(label: Text, width: int) -> Text:
    """A one-line section header "── label ─────" that fills the width."""
    out = Text("── ", style="dim")
    out.append_text(label)
    out.append(" ", style="dim")
    fill = width - out.cell_len
    if fill > 0:
        out.append("─" * fill, style="dim")
    return _line(out)


# ---------------------------------------------------------------------------------------------
# grid: fixed-width columns, one line per row (cheaper than rich.Table, and never wraps)

Cell = tuple[str, str]
"""(text, style) of one grid cell."""

_GAP = "  "


@dataclass(frozen=True)
class Column:
    """One grid column: ``flex`` takes the width left over, others their content's width."""

    header: str
    right: bool = False
    flex: bool = False
    min_width: int = 1


def _fit(text: str, width: int, right: bool) -> str:
    """``text`` cut with an ellipsis or padded with spaces to exactly ``width`` cells."""
    length = cell_len(text)
    if length > width:
        return set_cell_size(text, width - 1) + "…" if width > 1 else "…"[:width]
    pad = " " * (width - length)
    return pad + text if right else text + pad


def _widths(columns: Sequence[Column], rows: Sequence[Sequence[Cell]], width: int) -> list[int]:
    """Content widths, the flex column taking what is left; shrink the widest when too wide."""
    natural = [cell_len(c.header) for c in columns]
    for row in rows:
        for k, (text, _style) in enumerate(row):
            n = cell_len(text)
            if n > natural[k]:
                natural[k] = n
    available = width - len(_GAP) * (len(columns) - 1)
    widths = list(natural)
    flex = [k for k, c in enumerate(columns) if c.flex]
    fixed = sum(w for k, w in enumerate(widths) if k not in flex)
    flex_min = sum(columns[k].min_width for k in flex)
    excess = fixed + flex_min - available
    while excess > 0:  # narrow the widest shrinkable fixed column, one cell at a time
        candidates = [k for k in range(len(columns))
                      if k not in flex and widths[k] > columns[k].min_width]
        if not candidates:
            break
        k = max(candidates, key=lambda j: widths[j] - columns[j].min_width)
        widths[k] -= 1
        excess -= 1
    left = available - sum(w for k, w in enumerate(widths) if k not in flex)
    for k in flex:
        widths[k] = max(0, min(natural[k], left))
        left -= widths[k]
    return widths


def _grid(columns: Sequence[Column], rows: Sequence[Sequence[Cell]], width: int) -> list[Text]:
    """A bold header line and one line per row; every line at most ``width`` cells."""
    widths = _widths(columns, rows, width)
    header = Text(style="bold")
    body: list[Text] = []
    for k, c in enumerate(columns):
        if k:
            header.append(_GAP)
        header.append(_fit(c.header, widths[k], c.right))
    for row in rows:
        line = Text()
        for k, (text, style) in enumerate(row):
            if k:
                line.append(_GAP)
            line.append(_fit(text, widths[k], columns[k].right), style or None)
        body.append(line)
    return [header, *body]


# ---------------------------------------------------------------------------------------------
# layout


@dataclass(frozen=True)
class _Budget:
    """Rows (including a "+N more" line when cut) given to each section; 0 = section omitted."""

    nodes: int
    instances: int
    events: int


_NODE_OVERHEAD = 2      # rule + header
_INSTANCE_OVERHEAD = 2  # rule + header
_EVENT_OVERHEAD = 1     # rule only


def _budget(body: int, want_nodes: int, want_instances: int, want_events: int) -> _Budget:
    """Split ``body`` lines between sections: instances first, nodes a third, events a sixth."""
    sections = [  # priority order: what is kept when the terminal is tiny
        ("instances", _INSTANCE_OVERHEAD, want_instances),
        ("nodes", _NODE_OVERHEAD, want_nodes),
        ("events", _EVENT_OVERHEAD, want_events),
    ]
    included: dict[str, int] = {}
    left = body
    for name, overhead, want in sections:
        if want > 0 and left >= overhead + 1:
            included[name] = want
            left -= overhead + 1
    rows = dict.fromkeys(included, 1)  # every included section has its first row
    # Remaining lines: nodes up to a third, events up to a sixth, instances take the rest;
    # whatever a section does not want flows to the others in priority order.
    total_rows = left + len(included)
    caps = {"nodes": total_rows // 3, "events": total_rows // 6}
    for name in ("nodes", "events"):
        if name in included:
            extra = min(included[name], max(1, caps[name])) - rows[name]
            extra = max(0, min(extra, left))
            rows[name] += extra
            left -= extra
    for name in ("instances", "nodes", "events"):
        if name in included:
            extra = max(0, min(included[name] - rows[name], left))
            rows[name] += extra
            left -= extra
    # A table section cut down to its "+N more" line draws no header: that line goes to the
    # next section that still wants rows.
    for name in ("instances", "nodes"):
        if rows.get(name) == 1 and included[name] > 1:
            for other in ("instances", "nodes", "events"):
                if other != name and other in included and rows[other] < included[other]:
                    rows[other] += 1
                    break
    return _Budget(rows.get("nodes", 0), rows.get("instances", 0), rows.get("events", 0))


def _cut(items: Sequence[_T], rows: int) -> tuple[list[_T], list[_T]]:
    """Keep what fits in ``rows`` lines, leaving one line for "+N more" when cut."""
    if rows >= len(items):
        return list(items), []
    keep = max(0, rows - 1)
    return list(items[:keep]), list(items[keep:])


# ---------------------------------------------------------------------------------------------
# sections


def _nodes_section(nodes: Sequence[NodeView], rows: int, width: int) -> list[Text]:
    narrow = width < NARROW_WIDTH
    tiny = width < TINY_WIDTH
    ordered = sorted(nodes, key=lambda n: _NODE_RANK.get(n.state, 4))
    shown, hidden = _cut(ordered, rows)
    not_healthy = sum(1 for n in nodes if n.state not in (NodeState.HEALTHY, NodeState.DISABLED))
    label = Text(f"Nodes {len(nodes)}", style="bold")
    if not_healthy:
        label.append(f" · {not_healthy} not healthy", style="yellow")
    out = [_section_rule(label, width)]

    has_gpu = any(n.gpus for n in nodes) and not tiny
    has_power = any(n.power_mw is not None for n in nodes) and not narrow
    has_temp = any(n.temperature_c is not None for n in nodes)
    columns = [Column("node", min_width=8), Column("state", min_width=7)]
    if not tiny:
        columns.append(Column("load", right=True))
    columns.append(Column("RAM", right=True))
    if has_gpu:
        columns.append(Column("GPU", min_width=4))
    if has_power:
        columns.append(Column("power", right=True))
    if has_temp:
        columns.append(Column("temp", right=True))
    columns += [Column("inst", right=True), Column("reason", flex=True, min_width=0)]
    table: list[list[Cell]] = []
    for n in shown:
        old = "dim" if n.stale_seconds is not None else ""  # last known values, not current
        cells: list[Cell] = [(_clean(n.name), ""), (n.state.value, NODE_STYLE.get(n.state, ""))]
        if not tiny:
            cells.append((_load(n), old))
        cells.append((_ram(n), old))
        if has_gpu:
            cells.append((gpu_text(n.gpus, detail=not narrow), old))
        if has_power:
            cells.append((_power(n), old))
        if has_temp:
            cells.append((_temp(n), old or _temp_style(n)))
        full = n.max_instances > 0 and n.instances >= n.max_instances
        cells.append((f"{n.instances}/{n.max_instances}", "bold" if full else ""))
        reason = _clean(n.reason)
        if n.stale_seconds is not None:
            reason = f"last seen {format_duration(n.stale_seconds)} ago" + \
                (f"; {reason}" if reason else "")
        cells.append((reason, "dim" if n.state.usable else "yellow"))
        table.append(cells)
    if not nodes:
        out.append(_line("  (no nodes)", "dim"))
    elif shown:
        out += _grid(columns, table, width)
    if hidden:
        states = Counter(n.state.value for n in hidden)
        detail = ", ".join(f"{c} {s}" for s, c in sorted(states.items(), key=lambda kv: -kv[1]))
        out.append(_line(f"  +{len(hidden)} more nodes ({detail})", "dim"))
    return out


def _instances_section(instances: Sequence[InstanceView], rows: int, width: int) -> list[Text]:
    narrow = width < NARROW_WIDTH
    tiny = width < TINY_WIDTH
    ordered = sorted(instances, key=lambda i: _instance_rank(i.state))
    shown, hidden = _cut(ordered, rows)
    label = Text(f"Instances {len(instances)}", style="bold")
    troubled = sum(1 for i in instances if i.state in _TROUBLED)
    if troubled:
        label.append(f" · {troubled} need attention", style="red")
    out = [_section_rule(label, width)]

    usage = not tiny and any(i.telemetry is not None for i in instances)
    gpu = usage and any(i.telemetry is not None and gpu_usage(i.telemetry) != "-"
                        for i in instances)
    columns = [Column("instance", min_width=12), Column("node", min_width=6),
               Column("state", min_width=7)]
    if not tiny:
        columns += [Column("up", right=True), Column("rst" if narrow else "restarts", right=True)]
    if usage:
        columns += [Column("cpu", right=True), Column("rss", right=True)]
        if gpu:
            columns.append(Column("gpu", right=True))
    if not narrow:
        columns.append(Column("moves", right=True))
    columns += [Column("exit", right=True, min_width=4),
                Column("reason / last line", flex=True, min_width=0)]
    table: list[list[Cell]] = []
    for i in shown:
        ended = exit_text(i)
        stale = i.stale_seconds is not None
        cells: list[Cell] = [(_clean(i.instance_id), ""), (_clean(i.node) or "-", ""),
                             (f"{i.state}?", "dim") if stale else
                             (i.state, INSTANCE_STYLE.get(i.state, ""))]
        if not tiny:
            cells.append((format_duration(i.uptime_seconds), ""))
            cells.append((str(i.restarts), "yellow") if i.restarts else ("-", "dim"))
        if usage:
            cells += usage_cells(i.telemetry, gpu=gpu)
        if not narrow:
            cells.append((str(i.moves), "") if i.moves else ("-", "dim"))
        cells.append((ended, "red" if ended != "0" else "") if ended else ("-", "dim"))
        if i.stale_seconds is not None:
            cells.append((f"node not answering: last known {format_duration(i.stale_seconds)} "
                          "ago", "yellow"))
        elif i.reason:
            cells.append((_clean(i.reason), "red" if i.state in _TROUBLED else ""))
        else:
            cells.append((_clean(i.last_line), "dim"))
        table.append(cells)
    if not instances:
        out.append(_line("  (no instances)", "dim"))
    elif shown:
        out += _grid(columns, table, width)
    if hidden:
        detail = _counts_text((i.state for i in hidden), styled=False)
        out.append(_line(Text(f"  +{len(hidden)} more instances (", style="dim")
                         .append_text(detail).append(")")))
    return out


def _events_section(events: Sequence[EventView], rows: int, width: int) -> list[Text]:
    ordered = sorted(events, key=lambda e: e.at)
    out = [_section_rule(Text("Recent events", style="bold"), width)]
    if rows >= len(ordered):
        shown: Sequence[EventView] = ordered
    elif rows < 3:  # too few lines for a "+N earlier" note: the newest events only
        shown = ordered[len(ordered) - rows:]
    else:
        shown = ordered[len(ordered) - (rows - 1):]
        out.append(_line(f"  +{len(ordered) - len(shown)} earlier events", "dim"))
    for e in shown:
        line = Text(_clock(e.at), style="dim")
        line.append(" ")
        line.append(_clean(e.subject), style="bold")
        line.append(" ")
        line.append(_clean(e.message), style=_event_style(e))
        out.append(_line(line))
    return out


def _event_style(event: EventView) -> str:
    key = f"{event.kind} {event.message}".lower()
    for word, style in _EVENT_STYLE_WORDS:
        if word in key:
            return style
    return ""


# ---------------------------------------------------------------------------------------------
# public


def title_text(snapshot: RunSnapshot) -> Text:
    """Run id, run state, who holds the lease, instance counts by state, snapshot time."""
    t = Text()
    t.append(f"run {_clean(snapshot.run_id)}", style="bold")
    t.append(" ")
    t.append(snapshot.run_state, style=INSTANCE_STYLE.get(snapshot.run_state, "bold cyan"))
    if snapshot.watcher:  # before the counts so a narrow terminal still shows it
        t.append(" │ ", style="dim")
        t.append(f"watching only: lease held by {_clean(snapshot.watcher)}", style="yellow")
    t.append(" │ ", style="dim")
    if snapshot.instances:
        t.append(f"{len(snapshot.instances)} instances: ")
        t.append_text(_counts_text((i.state for i in snapshot.instances), styled=True))
    else:
        t.append("no instances", style="dim")
    t.append(" │ ", style="dim")
    t.append(_clock(snapshot.taken_at), style="dim")
    return t


FOOTER_MIN_HEIGHT = 8
"""Below this many lines the keys line gives way to the nodes and instances."""


PROGRESS_LINES = 3
"""Campaign progress lines a frame shows under its title, at most."""


def frame_lines(snapshot: RunSnapshot, *, width: int, height: int) -> list[Text]:
    """The frame as lines: at most ``height`` of them, each at most ``width`` cells."""
    width = max(1, width)
    height = max(1, height)
    lines = [title_text(snapshot)]
    if snapshot.notice and height > 1:
        lines.append(Text(_clean(snapshot.notice), style="italic yellow"))
    for progress in snapshot.progress[:PROGRESS_LINES]:
        if height - len(lines) > 2:
            lines.append(Text(_clean(progress), style="bold cyan"))
    footer = snapshot.footer and height >= FOOTER_MIN_HEIGHT
    body = height - len(lines) - (1 if footer else 0)
    budget = _budget(body, max(1, len(snapshot.nodes)), max(1, len(snapshot.instances)),
                     len(snapshot.events))
    if budget.nodes:
        lines += _nodes_section(snapshot.nodes, budget.nodes, width)
    if budget.instances:
        lines += _instances_section(snapshot.instances, budget.instances, width)
    if budget.events:
        lines += _events_section(snapshot.events, budget.events, width)
    if footer:
        lines.append(Text(_clean(snapshot.footer), style="dim"))
    for line in lines:
        line.truncate(width, overflow="ellipsis")
    return lines


class Frame:
    """Prepared lines drawn as they are: one terminal line each, never wrapped.

    A console narrower than the lines cuts them with an ellipsis. (A plain ``Text`` would be
    re-joined by ``Console.print``, losing ``no_wrap``, and word-wrapped at a cost.)
    """

    def __init__(self, lines: Sequence[Text]) -> None:
        self.lines = tuple(lines)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        newline = Segment.line()
        for line in self.lines:
            if line.cell_len > width:
                line = line.copy()
                line.truncate(width, overflow="ellipsis")
            yield from line.render(console)
            yield newline


def render(snapshot: RunSnapshot, *, width: int, height: int) -> RenderableType:
    """One dashboard frame of at most ``height`` lines, none wider than ``width`` columns."""
    return Frame(frame_lines(snapshot, width=width, height=height))


def render_event_line(event: EventView) -> str:
    """One plain line for an event: "HH:MM:SS subject message" (local time)."""
    return f"{_clock(event.at)} {_clean(event.subject)} {_clean(event.message)}"


USAGE_LINE_INSTANCES = 8
"""Instances named in the plain mode's usage line (the busiest first)."""


def render_usage_line(snapshot: RunSnapshot) -> str | None:
    """One plain line of what the running instances use ("usage: a cpu 99% rss 1.2G · ..."),
    stale values with their age; None when no instance has a sample."""
    shown = [(i, i.telemetry) for i in snapshot.instances if i.telemetry is not None]
    if not shown:
        return None
    shown.sort(key=lambda pair: -(pair[1].cpu_percent or 0.0))
    parts = []
    for i, t in shown[:USAGE_LINE_INSTANCES]:
        text = f"{_clean(i.instance_id)} cpu " + \
            ("-" if t.cpu_percent is None else f"{t.cpu_percent:.0f}%") + \
            f" rss {format_bytes(t.rss_bytes)}"
        if gpu_usage(t) != "-":
            text += f" gpu {gpu_usage(t)}"
        if t.stale:
            text += f" ({format_duration(t.age_seconds)} ago)"
        parts.append(text)
    more = len(shown) - USAGE_LINE_INSTANCES
    return "usage: " + " · ".join(parts) + (f" · +{more} more" if more > 0 else "")


def render_status_line(snapshot: RunSnapshot) -> str:
    """One-line plain summary; holds no clock so it only changes when the run does."""
    parts = [f"run {_clean(snapshot.run_id)} {snapshot.run_state}"]
    if snapshot.instances:
        parts.append(_counts_text((i.state for i in snapshot.instances), styled=False).plain)
    else:
        parts.append("no instances")
    if snapshot.nodes:
        healthy = sum(1 for n in snapshot.nodes if n.state is NodeState.HEALTHY)
        enabled = sum(1 for n in snapshot.nodes if n.state is not NodeState.DISABLED)
        line = f"nodes {healthy}/{enabled} healthy"
        lost = [_clean(n.name) for n in snapshot.nodes
                if n.state in (NodeState.OFFLINE, NodeState.DISCONNECTED)]
        if lost:
            line += " (down: " + ", ".join(lost[:5]) + (", ..." if len(lost) > 5 else "") + ")"
        parts.append(line)
    parts += [_clean(p) for p in snapshot.progress_plain]
    if snapshot.watcher:
        parts.append(f"lease held by {_clean(snapshot.watcher)}")
    return " | ".join(parts)
