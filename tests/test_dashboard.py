"""Dashboard rendering on fixed snapshots, checked as the text a recording console holds."""

from __future__ import annotations

import io
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from infra.dashboard import Dashboard, render, render_event_line, render_status_line
from infra.monitor.snapshot import (
    EventView,
    GpuView,
    InstanceView,
    NodeState,
    NodeView,
    RunSnapshot,
)

T0 = 1_700_000_000.0


def clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


def text_of(snapshot: RunSnapshot, width: int = 160, height: int = 50) -> list[str]:
    console = Console(record=True, width=width, file=io.StringIO(), force_terminal=False,
                      color_system=None)
    console.print(render(snapshot, width=width, height=height))
    return console.export_text().splitlines()


def small() -> RunSnapshot:
    nodes = (
        NodeView("jetson", NodeState.HEALTHY, load1=1.5, cpu_count=12, mem_used_gb=10.2,
                 mem_total_gb=64, gpus=(GpuView("Orin", 87, None, None, 55),),
                 power_mw=23456, temperature_c=61.5, instances=2, max_instances=4),
        NodeView("x86-a", NodeState.HEALTHY, load1=0.25, cpu_count=16, mem_used_gb=31.9,
                 mem_total_gb=128,
                 gpus=(GpuView("A100", 40, 10240, 40960, 70), GpuView("A100", 60, 2048, 40960, 77)),
                 temperature_c=77, instances=1, max_instances=2),
        NodeView("pi5", NodeState.RECONNECTING, reason="ssh: connection refused",
                 instances=1, max_instances=1),
    )
    instances = (
        InstanceView("train-a", "jetson", "running", uptime_seconds=3725, restarts=1,
                     last_line="epoch 3 loss=0.12 [####    ]"),
        InstanceView("train-b", "jetson", "exited", uptime_seconds=59, exit_code=0),
        InstanceView("eval-c", "x86-a", "failed", uptime_seconds=12, restarts=3, moves=1,
                     exit_code=2, reason="retries exhausted"),
        InstanceView("probe-d", "pi5", "lost", signal="SIGKILL", last_line="killed"),
        InstanceView("bench-e", "x86-a", "failed", signal="9"),
    )
    events = (
        EventView(T0 + 1, "instance", "eval-c", "exited with code 2"),
        EventView(T0 + 5, "node", "pi5", "reconnecting (attempt 2)"),
    )
    return RunSnapshot("r-42", "running", T0 + 10, nodes, instances, events,
                       watcher="", notice="detached: Ctrl-C leaves the run going")


def big(n_nodes: int = 50, n_instances: int = 200, n_events: int = 60) -> RunSnapshot:
    nodes = tuple(
        NodeView(f"node-{k:02d}", NodeState.OFFLINE if k % 10 == 3 else NodeState.HEALTHY,
                 reason="lost" if k % 10 == 3 else "", load1=k / 10, cpu_count=8,
                 mem_used_gb=k / 2, mem_total_gb=32, instances=k % 4, max_instances=4)
        for k in range(n_nodes))
    phases = ["running"] * 8 + ["exited", "failed"]
    instances = tuple(
        InstanceView(f"inst-{k:03d}-with-a-long-name", f"node-{k % n_nodes:02d}",
                     phases[k % len(phases)], uptime_seconds=k * 60,
                     exit_code=1 if phases[k % len(phases)] == "failed" else None,
                     last_line="x" * 300)
        for k in range(n_instances))
    events = tuple(EventView(T0 + k, "instance", f"inst-{k:03d}", f"event {k}")
                   for k in range(n_events))
    return RunSnapshot("big-run", "running", T0 + 100, nodes, instances, events)


# --------------------------------------------------------------------------------- render


def test_title_has_run_state_counts_and_notice() -> None:
    lines = text_of(small())
    title = lines[0]
    assert "run r-42" in title and "running" in title
    assert "5 instances" in title
    assert "2 failed" in title and "1 lost" in title and "1 running" in title
    assert "1 exited" in title
    assert clock(T0 + 10) in title
    assert lines[1].strip() == "detached: Ctrl-C leaves the run going"


def test_title_shows_lease_holder() -> None:
    snap = small()
    watched = RunSnapshot(snap.run_id, snap.run_state, snap.taken_at, snap.nodes,
                          snap.instances, watcher="lab-pc:4242")
    assert "lease held by lab-pc:4242" in text_of(watched)[0]
    assert "lease held by lab-pc:4242" in text_of(watched, width=80)[0]


def test_nodes_panel() -> None:
    text = "\n".join(text_of(small()))
    rows = {line.split()[0]: line for line in text_of(small()) if line[:1].isalnum()}
    assert "Nodes 3 · 1 not healthy" in text
    # the node that is not healthy comes first
    names = [n for n in rows if n in ("jetson", "x86-a", "pi5")]
    assert names[0] == "pi5"
    assert "reconnecting" in rows["pi5"] and "ssh: connection refused" in rows["pi5"]
    jetson = rows["jetson"]
    assert "healthy" in jetson and "1.5/12" in jetson and "10.2/64.0G" in jetson
    assert "87%" in jetson and "23.5W" in jetson and "62°C" in jetson and "2/4" in jetson
    x86 = rows["x86-a"]
    assert "2x 40/60%" in x86 and "12.0/80.0G" in x86 and "77°C" in x86 and "1/2" in x86


def test_power_column_only_when_some_node_reports_it() -> None:
    snap = small()
    no_power = RunSnapshot(snap.run_id, snap.run_state, snap.taken_at,
                           tuple(NodeView(n.name, n.state) for n in snap.nodes), snap.instances)
    assert "power" not in "\n".join(text_of(no_power))
    assert "power" in "\n".join(text_of(snap))


def test_instances_panel() -> None:
    lines = text_of(small())
    rows = {line.split()[0]: line for line in lines if line[:1].isalnum()}
    running = rows["train-a"]
    assert "jetson" in running and "running" in running and "1h02m" in running
    assert "epoch 3 loss=0.12 [####    ]" in running  # brackets are text, not markup
    assert re.search(r"\b0\b", rows["train-b"])       # exit code 0
    failed = rows["eval-c"]
    assert "failed" in failed and "retries exhausted" in failed
    assert re.search(r"\b3\s+1\s+2\b", failed)        # restarts, moves, exit code
    assert "SIGKILL" in rows["probe-d"]
    assert "SIGKILL" in rows["bench-e"]                # signal number shown by name
    # troubled instances before running ones, running before finished
    order = [i for i in rows if i in ("train-a", "train-b", "eval-c", "probe-d", "bench-e")]
    assert order.index("eval-c") < order.index("train-a") < order.index("train-b")
    assert order.index("probe-d") < order.index("train-a")


def test_events_panel() -> None:
    lines = text_of(small())
    assert "Recent events" in "\n".join(lines)
    assert f"{clock(T0 + 1)} eval-c exited with code 2" in lines
    assert f"{clock(T0 + 5)} pi5 reconnecting (attempt 2)" in lines


def test_large_run_fits_height_and_says_what_was_cut() -> None:
    snap = big()
    lines = text_of(snap, width=160, height=40)
    assert len(lines) <= 40
    text = "\n".join(lines)
    assert re.search(r"\+\d+ more nodes", text)
    assert re.search(r"\+\d+ more instances", text)
    assert re.search(r"\+\d+ earlier events", text)
    assert all(len(line) <= 160 for line in lines)
    # the 20 failed instances come before any running or finished one is shown
    shown = [line.split()[0] for line in lines if line.startswith("inst-")]
    states = [line.split()[2] for line in lines if line.startswith("inst-")]
    assert len(states) >= 10
    assert states[:20] == ["failed"] * min(20, len(states))
    assert "exited" not in states
    # offline nodes are listed before healthy ones
    node_states = [line.split()[1] for line in lines if line.startswith("node-")]
    assert node_states[:5] == ["offline"] * 5
    # and the "+N more" counts add up
    more = int(re.search(r"\+(\d+) more instances", text).group(1))  # type: ignore[union-attr]
    assert more + len(shown) == 200
    nodes_more = int(re.search(r"\+(\d+) more nodes", text).group(1))  # type: ignore[union-attr]
    assert nodes_more + len(node_states) == 50
    # the newest event is on screen
    assert any(line.endswith("event 59") for line in lines)


@pytest.mark.parametrize(("width", "height"), [(160, 50), (120, 40), (80, 24), (80, 40),
                                               (60, 15), (100, 6), (40, 3), (30, 1)])
def test_any_size_stays_within_the_screen(width: int, height: int) -> None:
    lines = text_of(big(), width=width, height=height)
    assert 1 <= len(lines) <= height
    assert all(len(line) <= width for line in lines)


def test_narrow_width_no_wrapped_rows_and_ids_shown() -> None:
    snap = big(n_nodes=5, n_instances=8)
    lines = text_of(snap, width=80, height=40)
    assert all(len(line) <= 80 for line in lines)
    inst_lines = [line for line in lines if line.startswith("inst-")]
    assert len(inst_lines) == 8  # one line per instance: nothing wrapped onto a second line
    for k in range(8):
        assert any(line.startswith(f"inst-{k:03d}-with-a-long-name ") for line in inst_lines)
    assert any(line.rstrip().endswith("…") for line in inst_lines)  # the long log line is cut
    header = next(line for line in lines if line.startswith("instance"))
    assert "moves" not in header  # low-value column dropped


def test_small_snapshot_narrow_keeps_signals_and_codes() -> None:
    lines = text_of(small(), width=80, height=30)
    rows = {line.split()[0]: line for line in lines if line[:1].isalnum()}
    assert "SIGKILL" in rows["probe-d"] and "SIGKILL" in rows["bench-e"]
    assert re.search(r"\b2\b", rows["eval-c"])


def test_control_characters_never_break_a_row() -> None:
    snap = RunSnapshot("r", "running", T0, (), (
        InstanceView("a", "n", "running", last_line="tab\there\rcarriage\x1b[31mred"),))
    lines = text_of(snap, width=100, height=20)
    row = next(line for line in lines if line.startswith("a "))
    assert "tab here carriage" in row and "\x1b" not in row


def test_empty_run() -> None:
    lines = text_of(RunSnapshot("empty", "planned", T0, (), ()), width=100, height=20)
    text = "\n".join(lines)
    assert "no instances" in text and "(no nodes)" in text
    assert len(lines) <= 20


# ----------------------------------------------------------------------------- plain lines


def test_event_and_status_lines() -> None:
    snap = small()
    assert render_event_line(snap.events[0]) == f"{clock(T0 + 1)} eval-c exited with code 2"
    status = render_status_line(snap)
    assert "\n" not in status
    assert status.startswith("run r-42 running")
    assert "2 failed" in status and "1 running" in status
    assert "nodes 2/3 healthy" in status


# -------------------------------------------------------------------------------- driver


def plain_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=200, force_terminal=False, color_system=None), out


def test_plain_mode_prints_each_event_once_and_status_on_change() -> None:
    console, out = plain_console()
    snap = small()
    e1, e2 = snap.events
    e3 = EventView(T0 + 7, "instance", "train-a", "restarted")
    with Dashboard(console) as dash:
        assert not dash.live
        dash.update(snap)
        dash.update(snap)
        more = RunSnapshot(snap.run_id, snap.run_state, T0 + 20, snap.nodes, snap.instances,
                           (e2, e3))  # e1 fell out of the window
        dash.update(more)
        dash.update(more)
        finished = RunSnapshot(snap.run_id, "finished", T0 + 30, snap.nodes, snap.instances,
                               (e2, e3))
        dash.update(finished)
    lines = out.getvalue().splitlines()
    for event in (e1, e2, e3):
        assert lines.count(render_event_line(event)) == 1
    statuses = [line for line in lines if line.startswith("run r-42")]
    assert statuses == [render_status_line(snap), render_status_line(finished)]
    assert lines == [render_event_line(e1), render_event_line(e2), render_status_line(snap),
                     render_event_line(e3), render_status_line(finished)]


def test_plain_mode_same_time_events_are_distinct() -> None:
    console, out = plain_console()
    a = EventView(T0, "node", "pi5", "offline")
    b = EventView(T0, "node", "jetson", "offline")
    snap = RunSnapshot("r", "running", T0, (), (), (a,))
    with Dashboard(console) as dash:
        dash.update(snap)
        dash.update(RunSnapshot("r", "running", T0, (), (), (a, b)))
    lines = out.getvalue().splitlines()
    assert lines.count(render_event_line(a)) == 1 and lines.count(render_event_line(b)) == 1


def test_live_mode_reuses_one_live_and_leaves_last_frame() -> None:
    out = io.StringIO()
    console = Console(file=out, width=120, height=30, force_terminal=True, color_system=None)
    now = [100.0]
    dash = Dashboard(console, refresh_per_second=4, clock=lambda: now[0])
    assert dash.live
    snap = small()
    dash.update(snap)
    live = dash._live
    assert live is not None
    drawn = out.getvalue()
    assert "train-a" in drawn
    # too soon after the last frame: deferred, not drawn
    later = RunSnapshot("r-42", "finished", T0 + 11, snap.nodes, snap.instances)
    dash.update(later)
    assert out.getvalue() == drawn
    now[0] += 1.0
    dash.update(later)
    assert dash._live is live
    assert "finished" in out.getvalue()[len(drawn):]
    final = RunSnapshot("r-42", "stopped", T0 + 12, snap.nodes, snap.instances)
    now[0] += 0.01
    dash.update(final)  # deferred, then drawn by close()
    dash.close()
    assert "stopped" in out.getvalue()
    assert dash._live is None
    dash.update(snap)  # after close: ignored


@settings(max_examples=80, deadline=None)
@given(width=st.integers(5, 220), height=st.integers(1, 70), n_nodes=st.integers(0, 60),
       n_instances=st.integers(0, 250), n_events=st.integers(0, 40), notice=st.booleans())
def test_frame_never_exceeds_the_screen(width: int, height: int, n_nodes: int,
                                        n_instances: int, n_events: int, notice: bool) -> None:
    snap = big(max(1, n_nodes), n_instances, n_events)
    if not n_nodes:
        snap = RunSnapshot(snap.run_id, snap.run_state, snap.taken_at, (), snap.instances,
                           snap.events)
    if notice:
        snap = RunSnapshot(snap.run_id, snap.run_state, snap.taken_at, snap.nodes,
                           snap.instances, snap.events, notice="a notice " * 30)
    lines = text_of(snap, width=width, height=height)
    assert 1 <= len(lines) <= height
    assert all(len(line) <= width for line in lines)
    text = "\n".join(lines)
    shown = sum(1 for line in lines if line.startswith("inst-"))
    found = re.search(r"\+(\d+) more instances", text)
    if found and n_instances:
        assert shown + int(found.group(1)) == n_instances


def test_broken_node_is_shown_first_with_its_reason() -> None:
    """A node whose supervisor answers with a malformed document is flagged, not hidden."""
    snap = small()
    broken = NodeView("pi4", NodeState.BROKEN, instances=1, max_instances=1,
                      reason="malformed supervisor document: instances[0].pid: expected an "
                             "integer, got 'abc'")
    snap = RunSnapshot(snap.run_id, snap.run_state, snap.taken_at, (*snap.nodes, broken),
                       snap.instances, snap.events)
    lines = text_of(snap, width=200)
    rows = [line for line in lines if line.split()[:1] and line.split()[0] in
            ("jetson", "x86-a", "pi5", "pi4")]
    assert rows[0].split()[0] == "pi4"
    assert "broken" in rows[0] and "instances[0].pid" in rows[0]
    assert "Nodes 4 · 2 not healthy" in "\n".join(lines)


def stale_run() -> RunSnapshot:
    nodes = (NodeView("pi5", NodeState.DISCONNECTED, reason="ssh: connection refused",
                      load1=3.5, cpu_count=4, mem_used_gb=6.0, mem_total_gb=8, instances=1,
                      max_instances=1, stale_seconds=42),
             NodeView("host", NodeState.HEALTHY, load1=0.5, cpu_count=8, instances=1,
                      max_instances=2))
    instances = (InstanceView("far", "pi5", "running", uptime_seconds=100,
                              last_line="step 9", stale_seconds=42),
                 InstanceView("near", "host", "running", uptime_seconds=100,
                              last_line="step 9"))
    return RunSnapshot(run_id="r-1", run_state="running", taken_at=T0, nodes=nodes,
                       instances=instances, footer="Ctrl-C detaches: the experiments keep "
                       "running (`stop RUN` stops them)")


def test_values_of_a_node_that_does_not_answer_are_marked_with_their_age() -> None:
    lines = text_of(stale_run())
    pi5 = next(ln for ln in lines if ln.lstrip().startswith("pi5"))
    assert "last seen 42s ago; ssh: connection refused" in pi5, pi5
    far = next(ln for ln in lines if ln.lstrip().startswith("far"))
    assert "running?" in far and "node not answering: last known 42s ago" in far, far
    near = next(ln for ln in lines if ln.lstrip().startswith("near"))
    assert "running?" not in near and "not answering" not in near and "step 9" in near


def test_the_keys_are_on_the_last_line_when_there_is_room() -> None:
    lines = text_of(stale_run(), width=100, height=30)
    assert lines[-1].startswith("Ctrl-C detaches: the experiments keep running")
    short = text_of(stale_run(), width=100, height=6)
    assert not any("Ctrl-C" in ln for ln in short) and len(short) <= 6
    narrow = text_of(stale_run(), width=30, height=30)
    assert all(len(ln) <= 30 for ln in narrow)
