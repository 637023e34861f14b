"""The dashboard's per-instance usage columns (CPU %, RSS, GPU) from telemetry samples:
current values plain, stale ones dim with their age; the plain mode's usage line."""

from __future__ import annotations

import io

from rich.console import Console

from infra.dashboard import Dashboard, render
from infra.dashboard.render import format_bytes, render_usage_line
from infra.monitor.snapshot import InstanceView, NodeState, NodeView, RunSnapshot, TelemetryView

T0 = 1_700_000_000.0


def frame(snapshot: RunSnapshot, width: int = 160, height: int = 40) -> Console:
    console = Console(record=True, width=width, file=io.StringIO(), force_terminal=True,
                      color_system="standard")
    console.print(render(snapshot, width=width, height=height))
    return console


def row(console: Console, name: str) -> str:
    text = console.export_text(clear=False)
    return next(ln for ln in text.splitlines() if ln.lstrip().startswith(name))


def usage_run() -> RunSnapshot:
    nodes = (NodeView("gpu", NodeState.HEALTHY, instances=2, max_instances=2),
             NodeView("pi5", NodeState.DISCONNECTED, instances=1, max_instances=1,
                      stale_seconds=42))
    instances = (
        InstanceView("burn", "gpu", "running", uptime_seconds=30,
                     telemetry=TelemetryView(age_seconds=1.2, cpu_percent=99.6,
                                             rss_bytes=1.5 * (1 << 30), gpu_util_percent=97,
                                             gpu_mem_mb=2048)),
        InstanceView("nap", "gpu", "running", uptime_seconds=30,
                     telemetry=TelemetryView(age_seconds=0.8, cpu_percent=0.0,
                                             rss_bytes=12 * (1 << 20))),
        InstanceView("far", "pi5", "running", uptime_seconds=100, stale_seconds=42,
                     telemetry=TelemetryView(age_seconds=43, stale=True, cpu_percent=88.0,
                                             rss_bytes=300 * (1 << 20))),
        InstanceView("done", "gpu", "exited", uptime_seconds=5, exit_code=0),
    )
    return RunSnapshot("r-7", "running", T0, nodes, instances)


def test_instance_rows_show_cpu_rss_and_gpu() -> None:
    console = frame(usage_run())
    header = next(ln for ln in console.export_text(clear=False).splitlines()
                  if ln.lstrip().startswith("instance"))
    assert "cpu" in header and "rss" in header and "gpu" in header, header
    burn = row(console, "burn")
    assert "100%" in burn and "1.5G" in burn and "97% 2.0G" in burn, burn
    nap = row(console, "nap")
    assert " 0%" in nap and "12M" in nap and "ago" not in nap, nap
    done = row(console, "done")
    assert "%" not in done  # no sample: no usage shown


def test_stale_usage_is_dim_and_carries_its_age() -> None:
    console = frame(usage_run())
    far = row(console, "far")
    assert "88% (43s ago)" in far and "300M (43s ago)" in far, far
    styled = console.export_text(clear=False, styles=True)
    far_styled = next(ln for ln in styled.splitlines() if "88% (43s ago)" in ln)
    burn_styled = next(ln for ln in styled.splitlines() if "burn" in ln)
    assert "\x1b[2m88% (43s ago)" in far_styled, repr(far_styled)  # dim
    assert "\x1b[2m100%" not in burn_styled, repr(burn_styled)     # current: not dim


def test_no_usage_columns_without_samples_and_none_when_tiny() -> None:
    bare = RunSnapshot("r-7", "running", T0, (), (InstanceView("x", "n", "running"),))
    header = next(ln for ln in frame(bare).export_text().splitlines()
                  if ln.lstrip().startswith("instance"))
    assert "cpu" not in header and "rss" not in header
    tiny = frame(usage_run(), width=60).export_text()
    assert all(len(ln) <= 60 for ln in tiny.splitlines())
    assert "1.5G" not in tiny


def test_usage_line_for_plain_mode() -> None:
    line = render_usage_line(usage_run())
    assert line == ("usage: burn cpu 100% rss 1.5G gpu 97% 2.0G · far cpu 88% rss 300M "
                    "(43s ago) · nap cpu 0% rss 12M")
    assert render_usage_line(RunSnapshot("r", "running", T0, (), ())) is None


def test_plain_mode_prints_usage_at_most_every_half_minute() -> None:
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=False, color_system=None)
    now = [100.0]
    snap = usage_run()
    with Dashboard(console, clock=lambda: now[0]) as dash:
        dash.update(snap)
        now[0] += 5
        dash.update(snap)
        now[0] += 30
        dash.update(snap)
    usage = [ln for ln in out.getvalue().splitlines() if ln.startswith("usage:")]
    assert len(usage) == 2


def test_format_bytes() -> None:
    assert [format_bytes(v) for v in (None, 512, 2048, 5 << 20, 1.25 * (1 << 30))] == \
        ["-", "512B", "2.0K", "5.0M", "1.2G"]
