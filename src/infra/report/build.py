"""Build the report page from its inputs (pure: no store, no file, no clock).

One HTML document: a strict Content-Security-Policy (no request of any kind may leave the
page), plotly.js inline once, each figure as escaped JSON in a ``script`` element of type
``application/json``, and one small script that draws them. Everything shown that came from
a spec, a log, an event, a metric or the manifest is escaped (``html.esc``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from infra.campaign.table import METRIC_PREFIX, PARAM_PREFIX, Scalar, columns, row_values
from infra.report import charts
from infra.report import manifest_view as mv
from infra.report.html import (
    Cell,
    Raw,
    duration,
    esc,
    inline_script,
    json_text_for_script,
    note,
    pairs,
    section,
    size,
    table,
    text_of,
    utc,
)
from infra.report.model import (
    MAX_EVENTS,
    MAX_INSTANCE_CHARTS,
    MAX_POINTS,
    MAX_SWEEP_TRACES,
    ReportInputs,
)
from infra.state import InstanceRecord
from infra.telemetry.summary import Summary, summarize

CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
       "img-src data: blob:; font-src data:; connect-src 'none'; base-uri 'none'; "
       "form-action 'none'")

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 2em 3em;color:#222}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
nav a{margin-right:1em}.note{color:#666;font-style:italic}
table{border-collapse:collapse;font-size:13px;margin:.5em 0}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
thead th{background:#f3f3f3;position:sticky;top:0}
table.kv th{background:#f7f7f7;font-weight:600;white-space:nowrap}
.scroll{max-height:32em;overflow:auto;border:1px solid #eee}
.chart{width:100%;min-height:200px;margin:1em 0}
.s-exited{color:#06c}.s-failed,.s-lost{color:#c00}.s-running{color:#080}
"""

DRAW = """
(function () {
  var figures = document.querySelectorAll('script.figure');
  for (var i = 0; i < figures.length; i++) {
    var el = figures[i];
    var fig = JSON.parse(el.textContent);
    Plotly.newPlot(el.getAttribute('data-target'), fig.data, fig.layout || {},
                   {responsive: true, displaylogo: false, typesetMath: false});
  }
})();
"""


def build_report(inputs: ReportInputs, plotly_js: str | None = None) -> str:
    """The whole page as text; ``plotly_js`` defaults to the installed plotly's bundle."""
    library = charts.plotly_js() if plotly_js is None else plotly_js
    found: list[charts.Chart] = []
    summaries = {i: summarize(s) for i, s in inputs.samples.items() if s}
    body = [
        _summary(inputs),
        _placement(inputs.instances),
        _events(inputs, found),
        _telemetry(inputs, summaries, found),
        _results(inputs, summaries, found),
    ]
    run = inputs.run
    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in (
        ("summary", "Summary"), ("placement", "Placement"), ("events", "Events"),
        ("telemetry", "Telemetry"), ("results", "Results")))
    figures = "\n".join(
        f'<script type="application/json" class="figure" data-target="{esc(c.chart_id)}">'
        f"{json_text_for_script(c.figure_json)}</script>" for c in found)
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(run.run_id)}: run report</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>Run {esc(run.run_id)}</h1>",
        f'<p class="note">report written {esc(utc(inputs.generated_at))} UTC'
        + (f" by cluster-experiment {esc(inputs.tool_version)}" if inputs.tool_version else "")
        + "; all times UTC</p>",
        f"<nav>{nav}</nav>",
        '<noscript><p class="note">The charts need JavaScript; the tables do not.</p>'
        "</noscript>",
        *(part.markup for part in body),
        inline_script(library),
        figures,
        f"<script>{DRAW}</script>",
        "</body></html>",
        "",
    ])


def _chart_div(chart: charts.Chart) -> Raw:
    return Raw(f'<div class="chart" id="{esc(chart.chart_id)}"></div>')


def _scroll(inner: Raw) -> Raw:
    return Raw(f'<div class="scroll">{inner.markup}</div>')


# --------------------------------------------------------------------------- summary

def _summary(inputs: ReportInputs) -> Raw:
    run, recs = inputs.run, inputs.instances
    starts = [r.started_at for r in recs if r.started_at is not None]
    ends = [r.ended_at for r in recs if r.ended_at is not None]
    done = bool(recs) and all(r.state.finished for r in recs)
    first, last = (min(starts) if starts else None), (max(ends) if ends and done else None)
    counts = Counter(r.state.value for r in recs)
    rows: list[tuple[str, Cell]] = [
        ("run", run.run_id), ("state", run.state.value),
        ("created", utc(run.created_at)), ("first start", utc(first)),
        ("last end", utc(last)),
        ("wall time", duration(last - first) if first is not None and last is not None
         else None),
        ("instances", len(recs)),
        ("by state", ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))),
        ("cluster config", run.cluster_config), ("coordinator", run.coordinator),
        ("pruned", f"{utc(run.pruned_at)} (run directories removed)"
         if run.pruned_at is not None else None),
    ]
    parts = [pairs((k, v) for k, v in rows if v not in (None, "")), *_manifest(inputs)]
    return section("summary", "Summary", *parts)


def _manifest(inputs: ReportInputs) -> list[Raw]:
    m = inputs.manifest
    if m.doc is None:
        return [note(f"manifest not readable: {m.error}" if m.error
                     else "no manifest recorded for this run")]
    out = [Raw("<h3>Manifest</h3>"), pairs(mv.essentials(m.doc))]
    nodes = mv.node_rows(m.doc)
    if nodes:
        out += [Raw("<h3>Nodes</h3>"), table(mv.NODE_COLUMNS, nodes)]
    return out


# --------------------------------------------------------------------------- placement

def _exit(rec: InstanceRecord) -> str:
    if rec.exit_code is not None:
        return str(rec.exit_code)
    return rec.signal or ""


def _state_cell(state: str) -> Raw:
    return Raw(f'<span class="s-{esc(state)}">{esc(state)}</span>')


def _placement(recs: Sequence[InstanceRecord]) -> Raw:
    if not recs:
        return section("placement", "Placement", note("the run has no instances"))
    rows: list[list[Cell]] = [
        [r.instance_id, r.node or None, _state_cell(r.state.value), _exit(r),
         duration(r.runtime_seconds) if r.started_at is not None else None, r.restarts,
         r.moves, ", ".join(r.previous_nodes) or None,
         r.failure_class.value if r.failure_class else None, r.reason[:300] or None,
         _cut(r.spec.command)]
        for r in recs]
    headers = ("instance", "node", "state", "exit", "runtime", "restarts", "moves",
               "previous nodes", "failure", "reason", "command")
    return section("placement", "Placement", _scroll(table(headers, rows)))


# --------------------------------------------------------------------------- events

def _events(inputs: ReportInputs, found: list[charts.Chart]) -> Raw:
    events = list(inputs.events)[:MAX_EVENTS]
    if not events:
        return section("events", "Events", note("no events recorded"))
    chart = charts.event_chart("chart-events", events)
    found.append(chart)
    total = inputs.events_total if inputs.events_total is not None else len(inputs.events)
    parts = [_chart_div(chart)]
    if total > len(events):
        parts.append(note(f"showing the first {len(events)} of {total} events"))
    rows: list[list[Cell]] = [[utc(e.at), e.kind, e.subject, e.message] for e in events]
    parts.append(_scroll(table(("time (UTC)", "kind", "subject", "message"), rows)))
    return section("events", "Events", *parts)


# --------------------------------------------------------------------------- telemetry

def _r1(value: float | None) -> float | None:
    """A measured value to one decimal: sensors and deltas are not more precise than that."""
    return None if value is None else round(value, 1)


def _summary_row(instance_id: str, s: Summary) -> list[Cell]:
    return [instance_id, s.samples, duration(s.duration_s), _r1(s.cpu_mean), _r1(s.cpu_max),
            size(s.rss_max_bytes), _r1(s.gpu_util_mean), _r1(s.gpu_util_max),
            _r1(s.gpu_mem_max_mb), _r1(s.power_mean_w), _r1(s.energy_j), _r1(s.temp_max_c)]


SUMMARY_HEADERS = ("instance", "samples", "span", "CPU % mean", "CPU % max", "RSS max",
                   "GPU % mean", "GPU % max", "GPU MiB max", "power W mean", "energy J",
                   "temp °C max")


def _telemetry(inputs: ReportInputs, summaries: Mapping[str, Summary],
               found: list[charts.Chart]) -> Raw:
    measured = [r for r in inputs.instances if r.instance_id in summaries]
    if not measured:
        return section("telemetry", "Telemetry", note(
            "no telemetry recorded for this run (telemetry.interval_seconds 0, or the "
            "instances never started)"))
    parts = [_scroll(table(SUMMARY_HEADERS, [_summary_row(r.instance_id,
                                                          summaries[r.instance_id])
                                             for r in measured]))]
    charted = 0
    for rec in measured:
        if charted >= MAX_INSTANCE_CHARTS:
            break
        found_panels = charts.panels(inputs.samples[rec.instance_id])
        if not found_panels:
            continue
        chart = charts.telemetry_chart(f"chart-telemetry-{charted}", rec.instance_id,
                                       rec.node, found_panels, MAX_POINTS)
        found.append(chart)
        parts.append(_chart_div(chart))
        charted += 1
    if len(measured) > charted:
        parts.append(note(f"charts for the first {charted} of {len(measured)} instances "
                          "with telemetry; the table above covers them all"))
    return section("telemetry", "Telemetry", *parts)


# --------------------------------------------------------------------------- results

def _is_sweep(rec: InstanceRecord) -> bool:
    spec = rec.spec
    return spec.sweep is not None or spec.campaign is not None or spec.task_index is not None


def _results(inputs: ReportInputs, summaries: Mapping[str, Summary],
             found: list[charts.Chart]) -> Raw:
    rows = inputs.rows
    sweep = any(_is_sweep(r) for r in inputs.instances)
    title = "Sweep: parameters, outcomes and metrics" if sweep else "Results"
    if not any(r.params or r.metrics or r.metrics_error for r in rows):
        return section("results", title, note("no parameters or metrics recorded "
                                              "(metrics.json in $INFRA_RESULTS_DIR)"))
    cols = columns(rows)
    values = [row_values(r) for r in rows]
    cells: list[list[Cell]] = [[_cut(v.get(c)) for c in cols] for v in values]
    parts = [_scroll(table(cols, cells))]
    plot_rows: list[dict[str, Scalar]] = []
    for v in values:
        extra = summaries.get(str(v["instance_id"]))
        plot_rows.append({**v, **(extra.as_metrics() if extra else {})})
    params = [c for c in cols if c.startswith(PARAM_PREFIX)]
    metrics = [c for c in cols if c.startswith(METRIC_PREFIX)]
    metrics += sorted({k for r in plot_rows for k in r if k.startswith("telemetry.")})
    xs, ys = charts.plot_axes(plot_rows, params, metrics)
    chart = charts.sweep_chart("chart-sweep", plot_rows, xs, ys,
                               lambda r: f"{r.get('instance_id')} ({r.get('state')})",
                               MAX_SWEEP_TRACES)
    if chart is not None:
        found.append(chart)
        parts.insert(0, _chart_div(chart))
        if len(xs) * len(ys) > MAX_SWEEP_TRACES:
            parts.insert(1, note(f"the menu offers the first {MAX_SWEEP_TRACES} of "
                                 f"{len(xs) * len(ys)} parameter/metric pairs"))
    elif sweep:
        parts.insert(0, note("no parameter/metric pair to plot (a plot needs a parameter "
                             "set and a numeric metric in two tasks or more)"))
    return section("results", title, *parts)


def _cut(value: Scalar, limit: int = 300) -> Cell:
    text = text_of(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"
