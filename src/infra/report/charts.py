"""The report's plotly figures, as plotly's JSON: telemetry per instance, the event
timeline and the sweep's parameter-versus-metric plot.

plotly is imported lazily (``require_plotly``): it is the ``report`` extra, not a core
dependency. Every text that reaches a figure (names, hover text, category values) is
HTML-escaped first: plotly.js renders a small HTML subset in labels and decodes entities,
so escaped text shows as written and never as markup.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from infra.campaign.table import Scalar
from infra.errors import InfraError
from infra.report.html import esc, utc_ms
from infra.state import Event
from infra.telemetry.sample import Sample

PLOTLY_MISSING = "report needs plotly: pip install 'lab-orchestrator[report]'"
PANEL_HEIGHT = 170
MAX_TEMP_SERIES = 6      # sensors drawn one by one; more: the hottest sensor only
MAX_EVENT_LANES = 40     # events drawn per subject up to this many subjects, else per kind


def require_plotly() -> ModuleType:
    """The plotly package, or the one-line error that says how to install it."""
    try:
        import plotly
        import plotly.graph_objects  # the parts the report uses
        import plotly.offline
        import plotly.subplots
    except ImportError:
        raise InfraError(PLOTLY_MISSING) from None
    module: ModuleType = plotly
    return module


def plotly_js() -> str:
    """plotly.js itself (the offline bundle shipped in the Python package)."""
    return str(require_plotly().offline.get_plotlyjs())


@dataclass(frozen=True)
class Chart:
    """One figure: the element id it is drawn into and plotly's JSON of it."""

    chart_id: str
    figure_json: str


def _finish(chart_id: str, fig: Any) -> Chart:
    return Chart(chart_id, str(fig.to_json(validate=True)))


# --------------------------------------------------------------------------- downsampling

Point = tuple[float, float]


def downsample(points: Sequence[Point], limit: int) -> list[Point]:
    """At most ``limit`` points of a time series: when longer, the lowest and the highest
    point of each of ``limit // 2`` equal buckets, in time order (peaks survive)."""
    if len(points) <= limit:
        return list(points)
    if limit < 2:
        return list(points[:max(limit, 0)])
    buckets = limit // 2
    out: list[Point] = []
    n = len(points)
    for b in range(buckets):
        part = points[b * n // buckets:(b + 1) * n // buckets]
        if not part:
            continue
        lo = min(range(len(part)), key=lambda i: part[i][1])
        hi = max(range(len(part)), key=lambda i: part[i][1])
        out.extend(part[i] for i in sorted({lo, hi}))
    return out


# --------------------------------------------------------------------------- telemetry

Getter = Callable[[Sample], float | None]


@dataclass(frozen=True)
class Series:
    """One line of a panel: its name and its points (time, value)."""

    name: str
    points: tuple[Point, ...]


@dataclass(frozen=True)
class Panel:
    """One row of an instance's chart: a measured quantity and its series."""

    title: str
    unit: str
    series: tuple[Series, ...]


def _series(samples: Sequence[Sample], name: str, get: Getter) -> Series | None:
    """The samples' values by ``get`` as a series; None when no sample has one."""
    points = tuple((s.t, v) for s in samples if (v := get(s)) is not None and math.isfinite(v))
    return Series(name, points) if points else None


def _sensor_names(samples: Sequence[Sample]) -> list[str]:
    """Every temperature sensor seen, in first-seen order."""
    names: dict[str, None] = {}
    for s in samples:
        for name, _ in s.temps_c:
            names.setdefault(name, None)
        if s.jetson is not None:
            for name, _ in s.jetson.temps_c:
                names.setdefault(f"jetson {name}", None)
        if s.pi is not None and s.pi.temp_c is not None:
            names.setdefault("soc", None)
        for g in s.gpus:
            if g.temp_c is not None:
                names.setdefault(f"gpu {g.index}", None)
    return list(names)


def _sensor(name: str) -> Getter:
    """The reading of one named sensor in a sample (as ``_sensor_names`` names them)."""
    def get(s: Sample) -> float | None:
        if name == "soc":
            return s.pi.temp_c if s.pi is not None else None
        if name.startswith("gpu "):
            found = [g.temp_c for g in s.gpus if g.index == name[4:]]
            return found[0] if found else None
        if name.startswith("jetson ") and s.jetson is not None:
            value = dict(s.jetson.temps_c).get(name[7:])
            if value is not None:
                return value
        return dict(s.temps_c).get(name)
    return get


def _mib(value: float | None) -> float | None:
    return None if value is None else value / (1 << 20)


def panels(samples: Sequence[Sample]) -> list[Panel]:
    """The panels that have data, in a fixed order: CPU, memory, GPU, power, temperature."""
    ordered = sorted(samples, key=lambda s: s.t)
    specs: list[tuple[str, str, list[tuple[str, Getter]]]] = [
        ("CPU", "% of one core", [("process tree", lambda s: s.cpu_percent)]),
        ("Memory (RSS)", "MiB", [("process tree", lambda s: _mib(s.rss_bytes))]),
        ("GPU utilisation", "%", [("gpu", lambda s: s.gpu_util_percent)]),
        ("GPU memory", "MiB", [("used", lambda s: s.gpu_mem_mb)]),
        ("Power", "W", [("power", lambda s: s.power_w)]),
    ]
    sensors = _sensor_names(ordered)
    temps: list[tuple[str, Getter]] = [(n, _sensor(n)) for n in sensors] \
        if len(sensors) <= MAX_TEMP_SERIES else [("hottest sensor", lambda s: s.max_temp_c)]
    specs.append(("Temperature", "°C", temps))
    out = []
    for title, unit, getters in specs:
        series = tuple(x for x in (_series(ordered, n, g) for n, g in getters) if x is not None)
        if series:
            out.append(Panel(title, unit, series))
    return out


def telemetry_chart(chart_id: str, instance_id: str, node: str,
                    found: Sequence[Panel], max_points: int) -> Chart:
    """One instance's panels stacked on a shared time axis, ``max_points`` in all."""
    plotly = require_plotly()
    go = plotly.graph_objects
    rows = len(found)
    fig = plotly.subplots.make_subplots(
        rows=rows, cols=1, shared_xaxes=True, vertical_spacing=min(0.08, 0.4 / rows),
        subplot_titles=[esc(f"{p.title} ({p.unit})") for p in found])
    count = sum(len(p.series) for p in found)
    budget = max(2, max_points // max(count, 1))
    for row, panel in enumerate(found, start=1):
        for series in panel.series:
            pts = downsample(series.points, budget)
            fig.add_trace(go.Scatter(
                x=[utc_ms(t) for t, _ in pts], y=[v for _, v in pts], mode="lines",
                name=esc(f"{panel.title}: {series.name}"), showlegend=len(panel.series) > 1,
                hovertemplate="%{y:.4g} " + esc(panel.unit) + "<extra>" +
                esc(series.name) + "</extra>"), row=row, col=1)
        fig.update_yaxes(title_text=esc(panel.unit), row=row, col=1, rangemode="tozero")
    fig.update_layout(title=esc(f"{instance_id} on {node}" if node else instance_id),
                      height=PANEL_HEIGHT * rows + 100, margin={"l": 60, "r": 20, "t": 70,
                                                                "b": 40},
                      xaxis={"type": "date"})
    fig.update_xaxes(type="date")
    fig.update_xaxes(title_text="time (UTC)", row=rows, col=1)
    return _finish(chart_id, fig)


# --------------------------------------------------------------------------- events

def event_chart(chart_id: str, events: Sequence[Event]) -> Chart:
    """Events over time, one colour per kind; one lane per subject (instance, node, run)
    while there are few, else one per kind. Hover shows the subject and the message."""
    plotly = require_plotly()
    go = plotly.graph_objects
    subjects = {e.subject for e in events}
    by_subject = len(subjects) <= MAX_EVENT_LANES
    kinds: dict[str, list[Event]] = {}
    for e in events:
        kinds.setdefault(e.kind, []).append(e)
    fig = go.Figure()
    for kind, group in kinds.items():
        fig.add_trace(go.Scatter(
            x=[utc_ms(e.at) for e in group],
            y=[esc(e.subject if by_subject else e.kind) for e in group],
            text=[esc(f"{e.subject}: {e.message[:300]}") for e in group],
            mode="markers", marker={"size": 9}, name=esc(kind),
            hovertemplate="%{x}<br>%{text}<extra>" + esc(kind) + "</extra>"))
    lanes = len(subjects) if by_subject else len(kinds)
    fig.update_layout(title="Events", height=min(140 + 22 * lanes, 1200),
                      xaxis={"type": "date", "title": {"text": "time (UTC)"}},
                      yaxis={"type": "category", "automargin": True},
                      margin={"l": 60, "r": 20, "t": 50, "b": 40})
    return _finish(chart_id, fig)


# --------------------------------------------------------------------------- sweep

def _number(value: Scalar) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True)
class Axis:
    """A sweep plot axis: a column's name and whether it is numeric or categorical."""

    name: str
    numeric: bool


def plot_axes(table: Sequence[Mapping[str, Scalar]], params: Sequence[str],
              metrics: Sequence[str]) -> tuple[list[Axis], list[str]]:
    """The parameters worth plotting (set in two rows or more; numeric when every value
    is a number) and the metrics that are numbers in two rows or more."""
    xs: list[Axis] = []
    for name in params:
        values = [r[name] for r in table if r.get(name) is not None]
        if len(values) >= 2:
            xs.append(Axis(name, all(_number(v) is not None for v in values)))
    ys = [m for m in metrics if sum(1 for r in table if _number(r.get(m)) is not None) >= 2]
    return xs, ys


def sweep_chart(chart_id: str, table: Sequence[Mapping[str, Scalar]], xs: Sequence[Axis],
                ys: Sequence[str], label: Callable[[Mapping[str, Scalar]], str],
                max_traces: int) -> Chart | None:
    """Each metric against each parameter, one pair shown at a time (a menu picks it); the
    first metric against the first parameter shown first. None when there is no pair."""
    pairs = [(x, y) for y in ys for x in xs][:max_traces]
    if not pairs:
        return None
    plotly = require_plotly()
    go = plotly.graph_objects
    fig = go.Figure()
    for i, (x, y) in enumerate(pairs):
        rows = [r for r in table if _number(r.get(y)) is not None and r.get(x.name) is not None]
        fig.add_trace(go.Scatter(
            x=[_number(r[x.name]) if x.numeric else esc(r[x.name]) for r in rows],
            y=[_number(r[y]) for r in rows], text=[esc(label(r)) for r in rows],
            mode="markers", marker={"size": 9}, visible=i == 0,
            name=esc(f"{y} vs {x.name}"),
            hovertemplate="%{text}<br>%{x}: %{y:.6g}<extra></extra>"))
    buttons = [{"label": esc(f"{y} vs {x.name}"), "method": "update",
                "args": [{"visible": [j == i for j in range(len(pairs))]},
                         {"xaxis.title.text": esc(x.name), "yaxis.title.text": esc(y),
                          "xaxis.type": "linear" if x.numeric else "category"}]}
               for i, (x, y) in enumerate(pairs)]
    first_x, first_y = pairs[0]
    fig.update_layout(
        title="Parameter versus metric", height=480, showlegend=False,
        xaxis={"title": {"text": esc(first_x.name)},
               "type": "linear" if first_x.numeric else "category"},
        yaxis={"title": {"text": esc(first_y)}},
        updatemenus=[{"buttons": buttons, "direction": "down", "x": 0, "xanchor": "left",
                      "y": 1.15, "yanchor": "bottom", "showactive": True}],
        margin={"l": 60, "r": 20, "t": 110, "b": 50})
    return _finish(chart_id, fig)
