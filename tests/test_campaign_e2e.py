"""Campaigns end to end on the real sshd fleet with the real CLI (issue 10, item 8).

A grid under ``max_parallel``, a suite's setup and cleanup once per node around its tasks,
CPU binding read back from /proc, a coordinator SIGKILLed mid-campaign, a node killed
mid-campaign, ``rerun --failed``, ``dispatch: all`` finishing with no coordinator, and a
dependency chain with a failing branch.

Every task runs ``tests/progs/camptask.py``: it appends JSON lines ("start", "end", and the
hooks' "setup"/"cleanup") to ``marks/MARK.log`` in the node's work dir (kept by deploys
through ``deploy.protect``), which root reads directly. The fleet's nodes are users of this
one machine, so a counter file and gate files in a shared directory reach every node, and
the tasks' CLOCK_MONOTONIC times compare across nodes.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.builders import wait_for
from tests.sshfleet import SSHFleet
from tests.test_live_ops import fast_health
from tests.test_never_twice import edit_config, node_file, only_node1
from tests.test_run_e2e import cli, project, status_json

pytestmark = pytest.mark.integration
__all__ = ["project"]  # the fixture, re-used

PROG = Path(__file__).resolve().parent / "progs" / "camptask.py"
TASK = "python3 workloads/camptask.py"
Event = dict[str, Any]


# --------------------------------------------------------------------------- fixtures

@pytest.fixture()
def shared() -> Iterator[Path]:
    """A directory every node user can write (all nodes share this machine): counters, gates."""
    path = Path(tempfile.mkdtemp(prefix="infra-camp-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture()
def camp(project: Path, ssh_fleet: SSHFleet) -> Iterator[Path]:
    """The project with the task program, the three fleet nodes (no local node), and the
    tasks' ``marks/`` kept on the nodes by every deploy."""
    shutil.copy(PROG, project / "workloads" / "camptask.py")
    edit_config(project, nodes={"local": {"enabled": False}}, deploy={"protect": ["marks/"]})
    yield project
    kill_leftovers(project, ssh_fleet)


def kill_leftovers(root: Path, fleet: SSHFleet) -> None:
    """SIGKILL what this test left on the nodes: pool daemons and tasks of its work dirs."""
    uids = {h.uid for h in fleet.hosts}
    work = [str(node_file(root, h)) for h in fleet.hosts]
    for proc in psutil.process_iter(["uids", "cmdline", "cwd"]):
        try:
            if proc.info["uids"] is None or proc.info["uids"].real not in uids:
                continue
            text = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["cwd"] or "")
            if any(w in text for w in work):
                proc.kill()
        except psutil.Error:
            continue


# --------------------------------------------------------------------------- helpers

def task_spec(root: Path, eid: str, *, mark: str | None = None, opts: str = "",
              **keys: Any) -> Path:
    """A spec file whose command runs camptask.py writing to marks/MARK.log (default: eid)."""
    doc: dict[str, Any] = {"experiment_id": eid,
                           "command": f"{TASK} {mark or eid} {opts}".strip(),
                           "ram_gb": 1.0, "results": []}
    doc.update(keys)
    path = root / "experiments" / f"{eid}.json"
    path.write_text(json.dumps(doc))
    return path


def launch(root: Path, *specs: Path, duration: float | None = None,
           timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    """The run command with --auto-place: watch until over, or detach after ``duration``."""
    args = [a for s in specs for a in ("--config", str(s))]
    extra = [] if duration is None else ["--monitor-duration", f"{duration:g}"]
    proc = cli(root, *args, "--auto-place", *extra, timeout=timeout)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def coordinator(root: Path, *specs: Path, duration: float = 300.0) -> subprocess.Popen[str]:
    """The run command in the background (to be killed or waited for)."""
    args = [a for s in specs for a in ("--config", str(s))]
    return subprocess.Popen([sys.executable, "-m", "infra.cli.main", *args, "--auto-place",
                             "--monitor-duration", f"{duration:g}", "--json"],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "COLUMNS": "200"})


def finish(root: Path, coord: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """Wait for a background coordinator; on time out kill it and fail with its output and
    what the store holds."""
    try:
        return coord.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        coord.kill()
        _out, err = coord.communicate(timeout=30)
        stored = cli(root, "status", "--json", "--no-refresh").stdout
        try:
            doc = json.loads(stored)
            stored = json.dumps({"campaigns": doc.get("campaigns"), "instances": [
                {k: i.get(k) for k in ("instance_id", "node", "state", "reason")}
                for i in doc["instances"]]})
        except ValueError:
            pass
        raise AssertionError(f"coordinator still running after {timeout:g} s: {err[:3000]}"
                             f" ... {err[-1000:]}\nstored: {stored}") from None


def marks(root: Path, fleet: SSHFleet, mark: str) -> list[Event]:
    """Every whole line of marks/MARK.log on every node, in file order, with ``on``: the node
    whose file held it."""
    out: list[Event] = []
    for host in fleet.hosts:
        path = node_file(root, host, "marks", f"{mark}.log")
        try:
            text = path.read_text()
        except FileNotFoundError:
            continue
        for line in text.splitlines(keepends=True):
            if line.endswith("\n"):  # a line being written is read next time
                out.append({**json.loads(line), "on": host.name})
    return out


def show(events: list[Event]) -> str:
    """The events in time order, one short line each (for failure messages)."""
    return "\n".join(f"{e['t']:.2f} {e['on']} {e['ev']} {e.get('id', '')} pid={e.get('pid')} "
                     f"rc={e.get('rc')}" for e in sorted(events, key=lambda e: e["t"]))


def of(events: list[Event], ev: str) -> list[Event]:
    return [e for e in events if e["ev"] == ev]


def ids_of(events: list[Event], ev: str) -> Counter[str]:
    return Counter(e["id"] for e in of(events, ev))


def task_ids(name: str, n: int) -> list[str]:
    return [f"{name}.{i:04d}" for i in range(n)]


def once_each(ids: list[str]) -> Counter[str]:
    return Counter(ids)


def by_id(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {i["instance_id"]: i for i in doc["instances"]}


def the_campaign(doc: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in doc.get("campaigns", []) if c["name"] == name]
    assert len(found) == 1, doc.get("campaigns")
    one: dict[str, Any] = found[0]
    return one


def all_exited(doc: dict[str, Any], ids: list[str]) -> None:
    insts = by_id(doc)
    assert sorted(i for i in insts if i.split(".")[0] == ids[0].split(".")[0]) == ids, insts
    for iid in ids:
        assert insts[iid]["state"] == "exited" and insts[iid]["exit_code"] == 0, insts[iid]


def cpu_set(text: str) -> set[int]:
    """A Cpus_allowed_list value ("0-2,5") as a set of cores."""
    cores: set[int] = set()
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        cores.update(range(int(lo), int(hi or lo) + 1))
    return cores


def proc_cpus(pid: int) -> set[int]:
    """Cpus_allowed_list of a live process, read from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return cpu_set(line.split(":", 1)[1])
    raise AssertionError(f"no Cpus_allowed_list for {pid}")


def peak(events: list[Event]) -> int:
    """Most tasks between their start and end lines at one time (ends first on a tie)."""
    points = sorted([(e["t"], 0 if e["ev"] == "end" else 1) for e in events
                     if e["ev"] in ("start", "end")])
    now = most = 0
    for _t, kind in points:
        now += 1 if kind else -1
        most = max(most, now)
    return most


def coordinators_of(root: Path) -> list[psutil.Process]:
    """Live CLI processes working in this project."""
    out = []
    for proc in psutil.process_iter(["cmdline", "cwd", "status"]):
        try:
            if "infra.cli.main" in (proc.info["cmdline"] or []) and \
                    proc.info["cwd"] == str(root) and proc.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.Error:
            continue
    return out


# --------------------------------------------------------------------------- 1: max_parallel

def test_grid_under_max_parallel_runs_each_task_once_never_more_than_three(
        camp: Path, ssh_fleet: SSHFleet, shared: Path) -> None:
    counter = shared / "counter"
    counter.write_text("0")
    counter.chmod(0o666)
    lrs, bss = [0.1, 0.01, 0.001], [8, 16, 32, 64]
    grid = task_spec(camp, "grid", opts=f"--sleep 1.5 --counter {counter} --metrics "
                     "--arg lr={lr} --arg bs={bs}",
                     sweep={"grid": {"lr": lrs, "bs": bss}}, max_parallel=3)
    proc = launch(camp, grid)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = task_ids("grid", 12)
    events = marks(camp, ssh_fleet, "grid")
    assert ids_of(events, "start") == once_each(ids), events
    assert ids_of(events, "end") == once_each(ids), events
    assert all(e["rc"] == 0 for e in of(events, "end"))
    # the shared counter (flock'd, held only while a task runs) never went above 3
    assert max(e["count"] for e in of(events, "start")) <= 3, events
    assert counter.read_text() == "0"
    assert peak(events) <= 3, events  # and by the machine-wide clock
    for e in of(events, "start"):  # each task got its own point of the grid
        i = int(e["id"].split(".")[1])
        lr, bs = lrs[i // 4], bss[i % 4]
        assert e["index"] == str(i) and e["params"] == {"lr": lr, "bs": bs}, e
        assert e["args"] == [f"lr={lr}", f"bs={bs}"] and e["node"] == e["on"], e
    doc = status_json(camp)
    c = the_campaign(doc, "grid")
    assert c["total"] == 12 and c["counts"] == {"exited": 12} and c["failed"] == [], c
    all_exited(doc, ids)
    where = {e["id"]: e["on"] for e in of(events, "start")}
    assert all(by_id(doc)[i]["node"] == where[i] for i in ids)
    # results: each task's parameters joined with its outcome and its metrics.json
    proc = cli(camp, "results", doc["run_id"], "--csv")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["instance_id"]: r for r in csv.DictReader(io.StringIO(proc.stdout))}
    assert sorted(rows) == ids, proc.stdout
    for iid, row in rows.items():
        i = int(iid.split(".")[1])
        assert row["state"] == "exited" and row["param.lr"] == str(lrs[i // 4]), row
        assert row["param.bs"] == str(bss[i % 4]) and row["metric.index"] == str(i), row
        assert row["metric.node"] == where[iid], row
    proc = cli(camp, "results", doc["run_id"], "--table")
    assert proc.returncode == 0 and "grid.0011" in proc.stdout, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- 2: suite hooks

def test_suite_setup_and_cleanup_run_once_per_node_around_its_tasks(
        camp: Path, ssh_fleet: SSHFleet) -> None:
    hook = f"{TASK} suite --hook"
    names = ["plain", "two words", "it's $HOME; `id`"]
    suite = task_spec(camp, "suite", opts="--sleep 0.5 --arg {name}",
                      sweep={"cases": [{"name": n} for n in names], "repeat": 2},
                      suite={"setup": f"{hook} setup", "cleanup": f"{hook} cleanup",
                             "workers": 2})
    proc = launch(camp, suite)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id = status_json(camp)["run_id"]
    ids = task_ids("suite", 6)
    events = marks(camp, ssh_fleet, "suite")
    assert ids_of(events, "start") == once_each(ids), events
    for e in of(events, "start"):  # values reach the command shell-quoted, unexpanded
        i = int(e["id"].split(".")[1])
        assert e["args"] == [names[i // 2]] and e["params"] == {"name": names[i // 2],
                                                               "seed": i % 2}, e
    used = {e["on"] for e in of(events, "start")}
    for host in ssh_fleet.hosts:
        if host.name not in used:
            assert not marks_on(camp, ssh_fleet, host.name), host.name
            continue
        # cleanup comes once the node's last task ended (maybe after the run command ended)
        lines = wait_for(lambda h=host.name: (got := marks_on(camp, ssh_fleet, h))
                         and got[-1]["ev"] == "cleanup" and got, timeout=60)
        kinds = [e["ev"] for e in lines]
        assert kinds.count("setup") == 1 and kinds.count("cleanup") == 1, kinds
        assert kinds[0] == "setup" and kinds[-1] == "cleanup", kinds
        setup = lines[0]
        assert setup["suite"] == "suite" and setup["workers"] == "2", setup
        assert run_id in (setup["suite_id"] or ""), setup
    doc = status_json(camp, run_id)
    c = the_campaign(doc, "suite")
    assert c["counts"] == {"exited": 6}, c
    assert used <= {p["node"] for p in c["pools"]}, c["pools"]
    all_exited(doc, ids)


def marks_on(root: Path, fleet: SSHFleet, node: str) -> list[Event]:
    return [e for e in marks(root, fleet, "suite") if e["on"] == node]


# --------------------------------------------------------------------------- 3: CPU binding

@pytest.mark.parametrize("binding", ["round_robin", "shared", "exclusive"])
def test_cpu_binding_of_running_tasks_is_visible_in_proc(
        camp: Path, ssh_fleet: SSHFleet, shared: Path, binding: str) -> None:
    cores = os.sched_getaffinity(0)
    if binding == "exclusive" and len(cores) < 2:
        pytest.skip("exclusive binding of 2 workers needs 2 cores")
    only_node1(camp, max_instances=2)
    gate = shared / "release"
    bind = task_spec(camp, "bind", opts=f"--gate {gate}", sweep={"grid": {"k": [0, 1]}},
                     suite={"workers": 2, "cpu_binding": binding})
    proc = launch(camp, bind, duration=0)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id = status_json(camp)["run_id"]
    node1 = ssh_fleet.host("node1")
    # both tasks run at once (each waits at the gate): read their affinity from /proc
    starts = wait_for(lambda: len(s := of(marks(camp, ssh_fleet, "bind"), "start")) == 2
                      and s, timeout=120)
    seen: dict[str, set[int]] = {}
    for e in starts:
        task = psutil.Process(e["pid"])
        assert task.uids().real == node1.uid and "workloads/camptask.py" in task.cmdline()
        seen[e["id"]] = proc_cpus(e["pid"])
        assert seen[e["id"]] == cpu_set(e["cpus"]), e  # as the task saw itself
    gate.touch()
    proc = cli(camp, "watch", run_id, "--duration", "120", "--json", timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    all_exited(json.loads(proc.stdout), task_ids("bind", 2))
    if binding == "round_robin":  # worker i -> cores[i % n]: one core each
        assert all(len(s) == 1 and s <= cores for s in seen.values()), seen
        if len(cores) >= 2:  # the two workers got different cores
            a, b = seen.values()
            assert a != b, seen
    elif binding == "exclusive":  # each worker its own core(s), shared with no other
        a, b = seen.values()
        assert a and b and a <= cores and b <= cores and not a & b, seen
    else:
        assert all(s == cores for s in seen.values()), (seen, cores)


# --------------------------------------------------------------------------- 4: coordinator

def test_coordinator_killed_mid_campaign_then_watch_runs_each_task_once(
        camp: Path, ssh_fleet: SSHFleet) -> None:
    kill = task_spec(camp, "kill", opts="--sleep 1", sweep={"grid": {"k": list(range(8))}},
                     max_parallel=2)
    coord = coordinator(camp, kill)
    try:
        wait_for(lambda: of(marks(camp, ssh_fleet, "kill"), "end"), timeout=120)
        coord.send_signal(signal.SIGKILL)  # the first task just ended: dispatch is under way
        coord.wait(timeout=10)
    finally:
        if coord.poll() is None:
            coord.kill()
            coord.wait(timeout=10)
    at_kill = of(marks(camp, ssh_fleet, "kill"), "start")
    assert len(at_kill) < 8, at_kill  # work was left in the queue
    run_id = status_json(camp)["run_id"]
    proc = cli(camp, "watch", run_id, "--duration", "240", "--json", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = task_ids("kill", 8)
    doc = json.loads(proc.stdout)
    all_exited(doc, ids)
    assert the_campaign(doc, "kill")["counts"] == {"exited": 8}
    events = marks(camp, ssh_fleet, "kill")
    assert ids_of(events, "start") == once_each(ids), events
    assert ids_of(events, "end") == once_each(ids), events
    assert peak(events) <= 2, events


# --------------------------------------------------------------------------- 5: node lost

def test_a_node_killed_mid_campaign_has_its_tasks_finished_elsewhere(
        camp: Path, ssh_fleet: SSHFleet) -> None:
    fast_health(camp)
    # on node1 a task holds until the node dies; elsewhere it takes a second
    lose = task_spec(camp, "lose", opts="--sleep 1 --hold-on node1",
                     sweep={"grid": {"k": list(range(8))}})
    node1 = ssh_fleet.host("node1")
    coord = coordinator(camp, lose)
    try:
        wait_for(lambda: [e for e in of(marks(camp, ssh_fleet, "lose"), "start")
                          if e["on"] == "node1"], timeout=120)
        node1.stop(kill_user_processes=True)  # the node dies with its pool and tasks
        out, err = finish(camp, coord, 200)
    finally:
        if coord.poll() is None:
            coord.kill()
            coord.communicate(timeout=10)
        node1.start()
    assert coord.returncode == 0, out + err
    ids = task_ids("lose", 8)
    doc = json.loads(out)
    all_exited(doc, ids)
    assert all(by_id(doc)[i]["node"] in ("node2", "node3") for i in ids), doc["instances"]
    events = marks(camp, ssh_fleet, "lose")
    on_node1 = {e["id"] for e in of(events, "start") if e["on"] == "node1"}
    assert on_node1 and not [e for e in of(events, "end") if e["on"] == "node1"]
    elsewhere = [e for e in events if e["on"] != "node1"]
    assert ids_of(elsewhere, "start") == once_each(ids), events  # none twice
    assert ids_of(elsewhere, "end") == once_each(ids), events
    assert all(e["rc"] == 0 for e in of(elsewhere, "end"))


# --------------------------------------------------------------------------- 6: rerun

def test_rerun_failed_runs_only_the_failed_tasks_again_under_their_ids(
        camp: Path, ssh_fleet: SSHFleet, shared: Path) -> None:
    fixed = shared / "fixed"
    flaky = task_spec(camp, "flaky", opts=f"--value {{mode}} --fail-value bad "
                      f"--fail-unless {fixed}",
                      sweep={"grid": {"mode": ["good", "bad"], "n": [1, 2]}},
                      auto_restart=False)
    proc = launch(camp, flaky)
    assert proc.returncode != 0, proc.stdout + proc.stderr  # two tasks failed
    run_id = status_json(camp)["run_id"]
    ids = task_ids("flaky", 4)
    bad = ["flaky.0002", "flaky.0003"]
    c = the_campaign(status_json(camp, run_id), "flaky")
    assert c["counts"] == {"exited": 2, "failed": 2}, c
    assert sorted(f["instance_id"] for f in c["failed"]) == bad, c
    fixed.touch()
    proc = cli(camp, "rerun", run_id, "--failed", "--duration", "180", "--json", timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    all_exited(doc, ids)
    assert the_campaign(doc, "flaky")["counts"] == {"exited": 4}
    events = marks(camp, ssh_fleet, "flaky")
    assert ids_of(events, "start") == Counter({**once_each(ids), **dict.fromkeys(bad, 2)}), \
        show(events)
    for iid in bad:  # the same task failed, then succeeded, under its id and index
        ends = sorted(of([e for e in events if e["id"] == iid], "end"), key=lambda e: e["t"])
        assert [e["rc"] for e in ends] == [1, 0], ends
        assert {e["index"] for e in of(events, "start") if e["id"] == iid} == \
            {str(int(iid.split(".")[1]))}


# --------------------------------------------------------------------------- 7: dispatch all

def test_dispatch_all_finishes_with_no_coordinator_running(
        camp: Path, ssh_fleet: SSHFleet) -> None:
    alone = task_spec(camp, "alone", opts="--sleep 0.5", sweep={"grid": {"k": list(range(8))}},
                      dispatch="all")
    proc = launch(camp, alone, duration=0)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id = json.loads(cli(camp, "status", "--json", "--no-refresh").stdout)["run_id"]
    assert not coordinators_of(camp)
    ids = task_ids("alone", 8)
    wait_for(lambda: ids_of(marks(camp, ssh_fleet, "alone"), "end") == once_each(ids),
             timeout=180)
    assert not coordinators_of(camp)  # the nodes did it all on their own
    proc = cli(camp, "watch", run_id, "--duration", "120", "--json", timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    all_exited(doc, ids)
    assert the_campaign(doc, "alone")["counts"] == {"exited": 8}
    events = marks(camp, ssh_fleet, "alone")
    assert ids_of(events, "start") == once_each(ids), events


# --------------------------------------------------------------------------- 8: dependencies

def test_dependency_chain_runs_in_order_and_a_failure_skips_its_dependents(
        camp: Path, ssh_fleet: SSHFleet) -> None:
    specs = [
        task_spec(camp, "prep", mark="chain", opts="--sleep 0.5"),
        task_spec(camp, "train", mark="chain", opts="--sleep 0.5",
                  sweep={"grid": {"k": [0, 1, 2]}}, after=["prep"]),
        task_spec(camp, "report", mark="chain", after=["train"]),
        task_spec(camp, "bad", mark="chain", opts="--value x --fail-value x",
                  auto_restart=False),
        task_spec(camp, "victim", mark="chain", sweep={"grid": {"k": [0, 1]}},
                  after=["bad"]),
        task_spec(camp, "victim2", mark="chain", after=["victim"]),
        task_spec(camp, "anyway", mark="chain", after_any=["bad"]),
    ]
    proc = launch(camp, *specs)
    assert proc.returncode != 0, proc.stdout + proc.stderr  # bad failed
    insts = by_id(status_json(camp))
    ran = ["prep", *task_ids("train", 3), "report", "anyway"]
    for iid in ran:
        assert insts[iid]["state"] == "exited" and insts[iid]["exit_code"] == 0, insts[iid]
    assert insts["bad"]["state"] == "failed", insts["bad"]
    for iid in [*task_ids("victim", 2), "victim2"]:
        assert insts[iid]["state"] == "skipped", insts[iid]
        assert re.search(r"dependency \S+ failed", insts[iid]["reason"]), insts[iid]
    assert all("bad" in insts[i]["reason"] for i in task_ids("victim", 2)), insts
    events = marks(camp, ssh_fleet, "chain")
    assert ids_of(events, "start") == once_each([*ran, "bad"]), events
    start = {e["id"]: e["t"] for e in of(events, "start")}
    end = {e["id"]: e["t"] for e in of(events, "end")}
    train = task_ids("train", 3)
    assert end["prep"] < min(start[i] for i in train), events
    assert max(end[i] for i in train) < start["report"], events
    assert end["bad"] < start["anyway"], events
