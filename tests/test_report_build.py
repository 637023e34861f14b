"""The run report's pure builder and its file I/O: escaping of everything that came from a
spec, log, event, metric or manifest; panels only with data; downsampling; the sweep table
and plot; the caps for big runs; the manifest read defensively; the atomic write; and the
CLI's one-line errors (real SQLite store, in-process CLI)."""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Iterator, Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.campaign.table import ResultRow
from infra.report import charts
from infra.report.build import build_report
from infra.report.files import read_manifest, write_atomic
from infra.report.html import inline_script, script_json
from infra.report.model import MAX_INSTANCE_CHARTS, MAX_POINTS, ManifestDoc, ReportInputs
from infra.state import Event, InstancePhase, InstanceRecord, RunRecord, RunState, Store
from infra.telemetry.sample import Sample, parse_line
from tests.builders import assert_one_line_error, cluster, node, run_cli, spec

T0 = 1765000000.0
EVIL = "</script><img src=x onerror=alert(1)><script>alert(2)</script>&amp;\u2028'\""
EVIL_SHOWN = "&lt;img src=x onerror=alert(1)&gt;"  # how the page must show it: as text
LIB = "/* plotly.js stand-in */"
C = cluster(node("n1"))


def record(iid: str, *, state: InstancePhase = InstancePhase.EXITED, node_name: str = "n1",
           reason: str = "", **spec_kw: Any) -> InstanceRecord:
    """A stored instance as the store gives it (the id is not re-validated there)."""
    return InstanceRecord(
        run_id="r-1", instance_id=iid, node=node_name, state=state,
        spec=spec(C, "x", **spec_kw), pid=1, exit_code=0, signal=None,
        started_at=T0 + 1, ended_at=T0 + 100, restarts=0, reason=reason, last_line="",
        log_offset=0, results_fetched=True, updated_at=T0)


def samples(n: int, **fields: Any) -> tuple[Sample, ...]:
    out = []
    for k in range(n):
        doc = {"t": T0 + k, **{key: (value(k) if callable(value) else value)
                               for key, value in fields.items()}}
        s = parse_line(json.dumps(doc))
        assert s is not None
        out.append(s)
    return tuple(out)


def inputs(recs: Sequence[InstanceRecord], **kw: Any) -> ReportInputs:
    run = RunRecord("r-1", T0, "cluster_config.yaml", RunState.FINISHED, {}, "host:1")
    return ReportInputs(run=run, instances=tuple(recs), generated_at=T0 + 200, **kw)


class Page(HTMLParser):
    """Every start tag and attribute of a page, and the text of each script element."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self._script: dict[str, str | None] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self._script = dict(attrs)
            self.scripts.append((self._script, ""))

    def handle_data(self, data: str) -> None:
        if self._script is not None:
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._script = None

    def figures(self) -> dict[str, dict[str, Any]]:
        """The figures by the element they are drawn into."""
        return {str(a["data-target"]): json.loads(text) for a, text in self.scripts
                if a.get("type") == "application/json"}


ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "nav",
                "a", "noscript", "section", "table", "thead", "tbody", "tr", "th", "td", "div",
                "span", "script"}


def strings(doc: Any) -> Iterator[str]:
    if isinstance(doc, str):
        yield doc
    elif isinstance(doc, dict):
        for k, v in doc.items():
            yield str(k)
            yield from strings(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from strings(v)


def evil_inputs() -> ReportInputs:
    recs = [record(EVIL, reason=EVIL, node_name=EVIL, params={"p": EVIL, "n": 1},
                   command=f"echo '{EVIL}'"),
            record("b", params={"p": "ok", "n": 2})]
    rows = tuple(ResultRow(instance_id=r.instance_id, template=None, task_index=None,
                           params=(("n", i), ("p", EVIL)), state="exited", exit_code=0,
                           signal=None, attempts=1, node=EVIL, runtime_seconds=1.0,
                           reason=EVIL, metrics=((EVIL, 0.5 + i), ("s", EVIL)),
                           metrics_error=EVIL) for i, r in enumerate(recs))
    manifest = {"tool": {"name": EVIL, "version": EVIL}, "command_line": ["run", EVIL],
                "tags": [EVIL], "cwd": EVIL,
                "git": {"commit": EVIL, "branch": EVIL, "dirty": True, "patch_file": EVIL},
                "config": {"path": EVIL, "sha256": EVIL}, "specs": [{"path": EVIL}],
                "nodes": {EVIL: {"hostname": EVIL, "gpus": [{"name": EVIL, "driver": EVIL}],
                                 "throttled_after": EVIL}}}
    tel = samples(30, cpu_percent=50.0, node={"temps_c": {EVIL: 40.0}},
                  gpus=[{"index": EVIL, "util_percent": 5, "temp_c": 50}])
    events = tuple(Event(k, "r-1", T0 + k, EVIL, EVIL, EVIL) for k in range(3))
    return inputs(recs, events=events, manifest=ManifestDoc(manifest),
                  samples={EVIL: tel}, rows=rows)


def test_text_from_specs_events_metrics_and_the_manifest_never_becomes_markup() -> None:
    text = build_report(evil_inputs(), plotly_js=LIB)
    page = Page(text)
    assert {tag for tag, _ in page.tags} <= ALLOWED_TAGS
    for tag, attrs in page.tags:
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
        if tag == "a":
            assert str(attrs["href"]).startswith("#")
    # the scripts are ours: the library once, one JSON document per figure, the drawing
    kinds = [a.get("type") for a, _ in page.scripts]
    assert kinds == [None, *["application/json"] * (len(kinds) - 2), None]
    assert page.scripts[0][1] == LIB
    figures = page.figures()
    assert set(figures) == {"chart-events", "chart-telemetry-0", "chart-sweep"}
    for fig in figures.values():  # what plotly draws is escaped text too
        for s in strings(fig):
            assert "<img" not in s and "<script" not in s and "</script" not in s, s
    assert any(EVIL_SHOWN in s for f in figures.values() for s in strings(f))
    assert text.count(EVIL_SHOWN) >= 20  # shown, as text, in every table
    csp = [a for tag, a in page.tags if a.get("http-equiv") == "Content-Security-Policy"]
    assert "default-src 'none'" in str(csp[0]["content"])


def test_json_in_a_script_cannot_close_it() -> None:
    out = script_json({"k": "</script><!--<script>", "a&b": 1})
    assert "<" not in out and ">" not in out and "&" not in out
    assert json.loads(out) == {"k": "</script><!--<script>", "a&b": 1}
    assert inline_script("var s = '</SCRIPT><!--';") == \
        "<script>var s = '<\\/SCRIPT><\\!--';</script>"


def test_plotly_js_is_embedded_once_and_nothing_is_fetched_from_elsewhere() -> None:
    text = build_report(inputs([record("a")], samples={"a": samples(5, cpu_percent=1.0)}))
    header = charts.plotly_js()[:200]
    assert text.count(header) == 1
    page = Page(text)
    assert not any("src" in attrs for tag, attrs in page.tags if tag == "script")
    assert not any(tag == "link" for tag, _ in page.tags)


def titles(fig: dict[str, Any]) -> list[str]:
    return [a["text"] for a in fig["layout"].get("annotations", [])]


def test_panels_appear_only_for_what_was_measured() -> None:
    cpu_only = samples(10, cpu_percent=lambda k: float(k), rss_bytes=1 << 20)
    everything = samples(10, cpu_percent=5.0, rss_bytes=1 << 20,
                         node={"temps_c": {"cpu-thermal": 40.0}},
                         gpus=[{"index": "0", "util_percent": 90, "mem_used_mb": 10,
                                "power_w": 200, "temp_c": 60}])
    jetson = samples(10, cpu_percent=5.0,
                     jetson={"gpu_load_percent": 50, "rails_mw": {"VDD_IN": 7000},
                             "temps_c": {"gpu": 45}})
    nothing = samples(10)  # t only: a board that measures nothing
    page = Page(build_report(inputs(
        [record("a"), record("b"), record("c"), record("d"), record("e")],
        samples={"a": cpu_only, "b": everything, "c": jetson, "d": nothing}), plotly_js=LIB))
    figs = page.figures()
    assert set(figs) == {"chart-telemetry-0", "chart-telemetry-1", "chart-telemetry-2"}
    assert titles(figs["chart-telemetry-0"]) == ["CPU (% of one core)", "Memory (RSS) (MiB)"]
    assert titles(figs["chart-telemetry-1"]) == [
        "CPU (% of one core)", "Memory (RSS) (MiB)", "GPU utilisation (%)",
        "GPU memory (MiB)", "Power (W)", "Temperature (°C)"]
    assert titles(figs["chart-telemetry-2"]) == [
        "CPU (% of one core)", "GPU utilisation (%)", "Power (W)", "Temperature (°C)"]
    power = [t for t in figs["chart-telemetry-2"]["data"] if t["name"] == "Power: power"]
    assert power[0]["y"][0] == 7.0  # the board's input rail, in watts

    empty = build_report(inputs([record("a")]), plotly_js=LIB)
    assert Page(empty).figures() == {}
    assert "no telemetry recorded for this run" in empty
    assert "no events recorded" in empty


def test_long_series_are_downsampled_keeping_peaks_and_order() -> None:
    points = [(float(t), 1.0) for t in range(100_000)]
    points[77_777] = (77_777.0, 99.0)
    points[12_345] = (12_345.0, -5.0)
    out = charts.downsample(points, 2000)
    assert len(out) <= 2000
    assert (77_777.0, 99.0) in out and (12_345.0, -5.0) in out
    assert [t for t, _ in out] == sorted(t for t, _ in out)
    assert charts.downsample(points[:10], 2000) == points[:10]

    long = samples(20_000, cpu_percent=lambda k: float(k % 100), rss_bytes=1 << 20,
                   gpus=[{"index": "0", "util_percent": 1, "mem_used_mb": 1, "power_w": 1,
                          "temp_c": 1}])
    fig = Page(build_report(inputs([record("a")], samples={"a": long}),
                            plotly_js=LIB)).figures()["chart-telemetry-0"]
    assert sum(len(t["x"]) for t in fig["data"]) <= MAX_POINTS
    cpu = next(t for t in fig["data"] if t["name"].startswith("CPU"))
    assert max(cpu["y"]) == 99.0 and min(cpu["y"]) == 0.0


def sweep_rows(n: int) -> tuple[ResultRow, ...]:
    return tuple(ResultRow(
        instance_id=f"grid.{i:04d}", template="grid", task_index=i,
        params=(("lr", 0.1 * (i + 1)), ("opt", "adam" if i % 2 else "sgd")),
        state="exited" if i < n - 1 else "failed", exit_code=0 if i < n - 1 else 1,
        signal=None, attempts=1, node="n1", runtime_seconds=1.5,
        reason="", metrics=(("loss", 1.0 / (i + 1)), ("note", "text")) if i < n - 1 else (),
        metrics_error=None) for i in range(n))


def test_a_sweep_gets_its_table_and_a_parameter_versus_metric_plot() -> None:
    recs = [record(f"grid.{i:04d}", sweep={"grid": {"lr": [1, 2, 3, 4]}}) for i in range(4)]
    tel = {r.instance_id: samples(5, cpu_percent=10.0 * k) for k, r in enumerate(recs)}
    text = build_report(inputs(recs, rows=sweep_rows(4), samples=tel), plotly_js=LIB)
    assert "Sweep: parameters, outcomes and metrics" in text
    for header in ("<th>param.lr</th>", "<th>param.opt</th>", "<th>metric.loss</th>",
                   "<th>metric.note</th>"):
        assert header in text
    fig = Page(text).figures()["chart-sweep"]
    names = [t["name"] for t in fig["data"]]
    # numbers only on y ("note" is text); every parameter on x (opt as categories)
    assert names[:2] == ["metric.loss vs param.lr", "metric.loss vs param.opt"]
    assert "metric.note vs param.lr" not in names
    assert "telemetry.cpu_percent.mean vs param.lr" in names
    assert [t["visible"] for t in fig["data"]] == [True] + [False] * (len(names) - 1)
    first = fig["data"][0]
    assert first["x"] == pytest.approx([0.1, 0.2, 0.3]) and first["y"][0] == 1.0
    buttons = fig["layout"]["updatemenus"][0]["buttons"]
    assert len(buttons) == len(names)
    assert buttons[1]["args"][1]["xaxis.type"] == "category"

    plain = build_report(inputs([record("a")], rows=()), plotly_js=LIB)
    assert "chart-sweep" not in plain and "no parameters or metrics recorded" in plain


def test_a_big_campaign_charts_some_instances_and_tabulates_all() -> None:
    n = MAX_INSTANCE_CHARTS + 16
    recs = [record(f"grid.{i:04d}", sweep={"grid": {"lr": list(range(n))}}) for i in range(n)]
    tel = {r.instance_id: samples(50, cpu_percent=1.0, rss_bytes=1 << 20) for r in recs}
    events = tuple(Event(k, "r-1", T0 + k, "state", "r-1", "m")
                   for k in range(100))
    text = build_report(inputs(recs, rows=sweep_rows(n), samples=tel, events=events,
                               events_total=7000), plotly_js=LIB)
    figs = Page(text).figures()
    assert sum(1 for k in figs if k.startswith("chart-telemetry-")) == MAX_INSTANCE_CHARTS
    assert f"charts for the first {MAX_INSTANCE_CHARTS} of {n} instances" in text
    assert text.count("<td>grid.0039</td>") == 3  # placement, telemetry and sweep tables
    assert "showing the first 100 of 7000 events" in text


def test_the_manifest_is_shown_when_there_and_read_defensively(tmp_path: Path) -> None:
    doc = {"version": 1, "tool": {"name": "cluster-experiment", "version": "0.1.0"},
           "created_at": T0, "command_line": ["cluster-experiment", "--config", "a b.json"],
           "tags": ["baseline", "pi"],
           "git": {"commit": "0123456789abcdef", "branch": "main", "dirty": True,
                   "patch_file": "code.patch", "untracked": ["new.py"]},
           "config": {"path": "cluster_config.yaml", "sha256": "f" * 64},
           "nodes": {"jet1": {"hostname": "jet1", "os": "Ubuntu 22.04", "l4t": "36.3",
                              "jetpack": "6.0", "nvpmodel": "MAXN",
                              "gpus": [{"name": "Orin", "driver": "540"}],
                              "throttled_before": "0x0", "throttled_after": "0x50000"}}}
    text = build_report(inputs([record("a")], manifest=ManifestDoc(doc)), plotly_js=LIB)
    for fragment in ("cluster-experiment 0.1.0", "cluster-experiment --config &#x27;a b.json&#x27;",
                     "baseline, pi", "0123456789abcdef (dirty: uncommitted changes)",
                     "code.patch", "(sha256 ffffffffffff)", "36.3 / 6.0", "MAXN",
                     "Orin (driver 540)", "0x50000"):
        assert fragment in text, fragment
    assert "no manifest recorded" not in text

    odd = {"tool": "x", "git": ["not", "a", "map"], "nodes": [1, 2], "command_line": 5,
           "tags": {"a": 1}, "created_at": "yesterday", "specs": "none"}
    assert "yesterday" in build_report(inputs([record("a")], manifest=ManifestDoc(odd)),
                                       plotly_js=LIB)
    none = build_report(inputs([record("a")]), plotly_js=LIB)
    assert "no manifest recorded for this run" in none

    path = tmp_path / "manifest.json"
    assert read_manifest(path) == ManifestDoc()
    path.write_text(json.dumps(doc))
    assert read_manifest(path).doc == doc
    path.write_text("[1, 2]")
    assert read_manifest(path).error == f"{path}: not a JSON object"
    path.write_text("{broken")
    assert str(read_manifest(path).error).startswith(f"{path}: not valid JSON")
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere.json")
    assert read_manifest(path).error == f"{path}: a link: not followed"
    shown = build_report(inputs([record("a")], manifest=read_manifest(path)), plotly_js=LIB)
    assert "manifest not readable" in shown


def test_the_file_is_written_whole_and_readable_by_others(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        target = tmp_path / "report.html"
        target.write_text("old")
        assert write_atomic(target, "new ü") == len("new ü".encode())
    finally:
        os.umask(old)
    assert target.read_text() == "new ü"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


# --------------------------------------------------------------------------- CLI

def cli_project(tmp_path: Path) -> tuple[str, Path]:
    """A topology and a real store with one finished run of two instances."""
    logs = tmp_path / "logs"
    cfg = tmp_path / "cluster_config.yaml"
    cfg.write_text(yaml.safe_dump({"nodes": [node("n1")],
                                   "logging": {"log_dir": str(logs)}}))
    store = Store(logs / "state.db")
    specs = [spec(C, "a", params={"lr": 0.1}), spec(C, "b", params={"lr": 0.2})]
    store.create_run("r-20260101-000000-abcd", str(cfg), {},
                     [(s.experiment_id, "n1", s, None) for s in specs])
    for s in specs:
        store.update_instance("r-20260101-000000-abcd", s.experiment_id,
                              state=InstancePhase.EXITED, exit_code=0, started_at=T0,
                              ended_at=T0 + 5)
    store.add_event("r-20260101-000000-abcd", "state", "a", "exited <b>0</b>")
    store.close()
    return str(cfg), logs


def test_report_command_writes_the_default_file_and_out(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, logs = cli_project(tmp_path)
    code, out, err = run_cli(capsys, "--cluster-config", cfg, "report", "r-2026")
    assert code == 0, err
    path = logs / "r-20260101-000000-abcd" / "report.html"
    assert out.startswith(f"report of r-20260101-000000-abcd: {path} (")
    text = path.read_text()
    assert "exited &lt;b&gt;0&lt;/b&gt;" in text and "no manifest recorded" in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o644

    other = tmp_path / "out.html"
    code, out, err = run_cli(capsys, "--cluster-config", cfg, "report",
                             "r-20260101-000000-abcd", "--out", str(other))
    assert code == 0, err
    assert other.read_text().startswith("<!DOCTYPE html>")

    path.unlink()
    code, out, err = run_cli(capsys, "--cluster-config", cfg, "report")  # the latest run
    assert code == 0 and path.exists(), err


def test_report_command_errors_are_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, _ = cli_project(tmp_path)
    code, _, err = run_cli(capsys, "--cluster-config", cfg, "report", "r-nope")
    assert_one_line_error(code, err, "no run 'r-nope'")
    code, _, err = run_cli(capsys, "--cluster-config", cfg, "report", "r-2026", "--out",
                           str(tmp_path / "missing" / "x.html"))
    assert_one_line_error(code, err, "--out", "does not exist")
    code, _, err = run_cli(capsys, "--cluster-config", cfg, "report", "r-2026", "--out",
                           str(tmp_path))
    assert_one_line_error(code, err, "--out", "is a directory")

    for name in [m for m in sys.modules if m == "plotly" or m.startswith("plotly.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "plotly", None)  # as if the extra were not installed
    code, _, err = run_cli(capsys, "--cluster-config", cfg, "report", "r-2026")
    assert_one_line_error(code, err, "report needs plotly: pip install "
                          "'lab-orchestrator[report]'", exit_code=1)


def test_run_events_are_the_runs_and_the_node_events_while_it_lasted(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    try:
        store.create_run("r-a", "c.yaml", {}, [("a", "n1", spec(C, "a"), None)])
        store.create_run("r-b", "c.yaml", {}, [])
        start = store.run("r-a").created_at
        rows = [("r-a", start + 1, "state", "a", "running"),
                (None, start + 2, "node", "n1", "draining: maintenance"),
                ("r-b", start + 3, "state", "x", "another run's"),
                ("r-a", start + 4, "state", "a", "exited"),
                (None, start + 5, "node", "n1", "after the run: not its"),
                (None, start - 5, "node", "n1", "before the run: not its")]
        for row in rows:
            store.db.execute("INSERT INTO events(run_id, at, kind, subject, message) "
                             "VALUES (?,?,?,?,?)", row)
        events, total = store.run_events("r-a", 100)
        messages = [e.message for e in events if e.at > start]
        assert messages == ["running", "draining: maintenance", "exited"]
        assert total == len(events)
        first, total = store.run_events("r-a", 2)
        assert len(first) == 2 and total == len(events)
    finally:
        store.close()
