"""Telemetry comes home: the node cuts chunks after whole lines, status carries them, the
sweep appends each exactly once (home copy, store offsets, drained flag), the dashboard and
``status --json`` show the newest sample.

The node side runs the real supervisor script through LocalTransport; the telemetry files
are written by the test into the instance's directory on the node, as the sampler would.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.config import load_cluster
from infra.config.model import Cluster, ExperimentSpec, NodeConfig
from infra.errors import LeaseLostError
from infra.monitor.loop import Monitor
from infra.monitor.snapshot import NodeState
from infra.monitor.tracker import Tracker
from infra.remote import supervisor as script
from infra.runner.lifecycle import RunSession
from infra.runner.supervisor_client import (
    SUPERVISOR_SOURCE,
    RestartPolicy,
    StartRequest,
    SupervisorClient,
    TelemetryChunk,
)
from infra.runner.telemetry_home import append_chunk, last_sample, restart_fields
from infra.state import InstancePhase, Store
from infra.telemetry.files import read_samples, telemetry_path
from infra.transport.local import LocalTransport
from infra.transport.pool import ConnectionPool

PY = shlex.quote(sys.executable)
HOLD = f"{PY} -c 'import time; time.sleep(60)'"


def line(t: float, cpu: float = 50.0, rss: int = 1 << 20, **extra: Any) -> bytes:
    """One sample line as the sampler writes it."""
    return (json.dumps({"t": t, "cpu_percent": cpu, "rss_bytes": rss, **extra},
                       separators=(",", ":")) + "\n").encode()


# --------------------------------------------------------------------------- node: chunks

def test_chunk_is_cut_after_the_last_newline(tmp_path: Path) -> None:
    idir = tmp_path / "inst"
    idir.mkdir()
    assert script.telemetry_chunk(str(idir), 0, 100) == {
        "data_b64": "", "offset": 0, "size": 0, "eof": True}  # no file yet: nothing, caught up
    (idir / "telemetry.jsonl").write_bytes(b"a\nbb\nccc")  # "ccc" is being written
    whole = script.telemetry_chunk(str(idir), 0, 100)
    assert whole["data_b64"] == "YQpiYgo=" and whole["offset"] == 5  # b"a\nbb\n"
    assert whole["size"] == 8 and whole["eof"]  # no complete line left after 5
    capped = script.telemetry_chunk(str(idir), 0, 4)  # b"a\nbb" read: cut to b"a\n"
    assert capped["data_b64"] == "YQo=" and capped["offset"] == 2 and not capped["eof"]
    short = script.telemetry_chunk(str(idir), 2, 2)  # b"bb": no newline, nothing sent
    assert short["data_b64"] == "" and short["offset"] == 2 and not short["eof"]
    rest = script.telemetry_chunk(str(idir), 5, 100)
    assert rest["data_b64"] == "" and rest["offset"] == 5 and rest["eof"]
    beyond = script.telemetry_chunk(str(idir), 50, 100)
    assert beyond["data_b64"] == "" and beyond["offset"] == 50 and beyond["eof"]


def _node(tmp_path: Path) -> NodeConfig:
    return NodeConfig(name="local", host="localhost", remote_work_dir=str(tmp_path / "work"),
                      python_path=sys.executable)


def _idir(node: NodeConfig, run_id: str, instance_id: str) -> Path:
    return Path(node.remote_work_dir) / ".infra" / "runs" / run_id / instance_id


def test_status_sends_telemetry_of_named_instances_within_caps(tmp_path: Path) -> None:
    node = _node(tmp_path)
    client = SupervisorClient(LocalTransport(node.name), node)
    a_lines = b"".join(line(100.0 + k) for k in range(3))
    size = len(line(100.0))

    async def scenario() -> tuple[Any, ...]:
        for iid in ("a", "b", "c"):
            await client.start(StartRequest(run_id="r1", instance_id=iid, command=HOLD,
                                            restart=RestartPolicy(auto_restart=False)))
        _idir(node, "r1", "a").joinpath("telemetry.jsonl").write_bytes(a_lines + b'{"t": 1')
        _idir(node, "r1", "b").joinpath("telemetry.jsonl").write_bytes(a_lines)
        plain, _ = await client.status_with_pools("r1", only=["c"])
        asked, _ = await client.status_with_pools(
            "r1", only=["c"], telemetry={"a": 0, "b": size},
            telemetry_max=2 * size + 3, telemetry_total=3 * size)
        await client.stop("r1", grace=0.2)
        return plain, asked

    plain, asked = asyncio.run(scenario())
    assert [s.instance_id for s in plain] == ["c"] and plain[0].telemetry is None
    by_id = {s.instance_id: s for s in asked}
    assert sorted(by_id) == ["a", "b", "c"]  # named for telemetry: described though not "only"
    assert by_id["c"].telemetry is None
    a = by_id["a"].telemetry
    assert a == TelemetryChunk(data=a_lines[:2 * size], offset=2 * size,
                               size=len(a_lines) + 7, eof=False)  # per-instance cap, whole lines
    b = by_id["b"].telemetry
    assert b is not None and b.data == a_lines[size:2 * size]  # what the total cap left over
    assert b.offset == 2 * size and not b.eof


def test_a_bad_status_request_is_one_line(tmp_path: Path) -> None:
    for doc, words in (('{"telemetry": {"a": -1}}', "non-negative"),
                       ('{"telemetry": {"../x": 0}}', "instance id"),
                       ('{"only": "a"}', "only"), ("[1", "not JSON")):
        proc = subprocess.run([sys.executable, str(SUPERVISOR_SOURCE), "status", "--root",
                               str(tmp_path), "--run", "r1", "--stdin-doc"], input=doc,
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        answer = json.loads(proc.stdout.split(script.BEGIN)[1].split(script.END)[0])
        assert not answer["ok"] and words in answer["error"], answer


# --------------------------------------------------------------------------- home: append

def _store(tmp_path: Path, node: str = "local") -> Store:
    store = Store(tmp_path / "logs" / "state.db")
    spec = ExperimentSpec(experiment_id="a", command="true", source=Path("."))
    store.create_run("r1", "cluster_config.yaml", {}, [("a", node, spec, None)])
    return store


def test_append_only_when_the_home_copy_ends_where_the_chunk_starts(tmp_path: Path) -> None:
    store = _store(tmp_path)
    log_dir = tmp_path / "logs"
    home = telemetry_path(log_dir, "r1", "a")
    one, two = line(1.0), line(2.0)
    rec = store.instance("r1", "a")
    first = TelemetryChunk(one, len(one), len(one + two), False)
    assert append_chunk(store, log_dir, rec, 0, first, None) == len(one)
    assert append_chunk(store, log_dir, rec, 0, first, None) is None  # again: home moved on
    assert home.read_bytes() == one
    late = TelemetryChunk(two, len(one + two), len(one + two), True)
    assert append_chunk(store, log_dir, rec, 0, late, None) is None  # asked 0, starts at len
    with pytest.raises(LeaseLostError):
        append_chunk(store, log_dir, rec, len(one), late, lambda: False)
    assert home.read_bytes() == one  # a lost lease writes nothing
    assert append_chunk(store, log_dir, rec, len(one), late, lambda: True) == len(one + two)
    assert home.read_bytes() == one + two
    assert store.instance("r1", "a").telemetry_offset == len(one + two)
    # a new placement continues the same home file: its node file starts at 0 again
    store.update_instance("r1", "a", **restart_fields(log_dir, "r1", "a"))
    moved = store.instance("r1", "a")
    assert (moved.telemetry_base, moved.telemetry_offset, moved.telemetry_done) == \
        (len(one + two), len(one + two), False)
    three = line(3.0)
    assert append_chunk(store, log_dir, moved, 0, TelemetryChunk(three, len(three), 0, True),
                        None) == len(one + two + three)
    assert [s.t for s in read_samples(home)] == [1.0, 2.0, 3.0]
    store.close()


# --------------------------------------------------------------------------- sweep + monitor

def _cluster(tmp_path: Path) -> Cluster:
    config = {"nodes": [{"name": "local", "host": "localhost",
                         "remote_work_dir": str(tmp_path / "work"), "ram_gb": 4.0,
                         "max_instances": 4, "python_path": sys.executable}],
              "failover": {"auto_restart": False},
              "logging": {"log_dir": str(tmp_path / "logs")}}
    path = tmp_path / "cluster_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_cluster(path)


def test_the_acting_sweep_brings_telemetry_home_once_and_marks_it_drained(
        tmp_path: Path) -> None:
    cluster = _cluster(tmp_path)
    store = _store(tmp_path)
    node = cluster.node("local")
    node_file = _idir(node, "r1", "a") / "telemetry.jsonl"
    home = telemetry_path(cluster.log_dir, "r1", "a")
    lines = [line(1000.0 + k, cpu=10.0 * k, rss=(k + 1) << 20) for k in range(4)]

    async def scenario() -> None:
        async with ConnectionPool(cluster) as pool:
            session = RunSession(cluster, store, pool)
            client = await session.client("local")
            state = await client.start(StartRequest(
                run_id="r1", instance_id="a", command=HOLD,
                restart=RestartPolicy(auto_restart=False)))
            store.update_instance("r1", "a", state=InstancePhase.RUNNING, pid=state.pid,
                                  started_at=state.started_at)
            node_file.write_bytes(lines[0] + lines[1] + lines[2][:9])
            await session.sweep("r1", stop_stale=False)  # a reporter: never asks, never writes
            assert not home.exists()
            await session.sweep("r1", telemetry=True, guard=lambda: True)
            assert home.read_bytes() == lines[0] + lines[1]
            await session.sweep("r1", telemetry=True, guard=lambda: True)  # nothing new
            assert home.read_bytes() == lines[0] + lines[1]
            latest = session.telemetry[("r1", "a")]
            assert latest.sample.t == 1001.0 and latest.node == "local"
            node_file.write_bytes(b"".join(lines))
            await session.sweep("r1", telemetry=True, guard=lambda: False)  # lease lost
            assert home.read_bytes() == lines[0] + lines[1]
            await session.sweep("r1", telemetry=True, guard=lambda: True)
            assert home.read_bytes() == b"".join(lines)
            assert not store.instance("r1", "a").telemetry_done  # still running
            # the dashboard's row: the newest sample's values
            monitor = Monitor(session, "r1")
            view = monitor.snapshot({"a": store.instance("r1", "a")}).instances[0]
            assert view.telemetry is not None and view.telemetry.cpu_percent == 30.0
            assert view.telemetry.rss_bytes == 4 << 20
            await client.stop("r1", grace=0.2)
            await session.sweep("r1", telemetry=True, guard=lambda: True)
            rec = store.instance("r1", "a")
            assert rec.state.finished and rec.telemetry_done
            assert rec.telemetry_offset == home.stat().st_size
            ended = monitor.snapshot({"a": rec}).instances[0]
            assert ended.telemetry is None  # an ended instance shows no current usage

    asyncio.run(scenario())
    assert home.read_bytes() == node_file.read_bytes()
    store.close()


def test_a_monitor_waits_for_telemetry_before_it_is_done(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path)
    store = _store(tmp_path)

    async def scenario() -> None:
        async with ConnectionPool(cluster) as pool:
            session = RunSession(cluster, store, pool)
            monitor = Monitor(session, "r1")
            store.update_instance("r1", "a", state=InstancePhase.EXITED, pid=123,
                                  exit_code=0, results_fetched=1)
            monitor.drained.add("a")
            waiting = monitor._all_done({"a": store.instance("r1", "a")}, acting=True)
            store.update_instance("r1", "a", telemetry_done=1)
            done = monitor._all_done({"a": store.instance("r1", "a")}, acting=True)
            assert (waiting, done) == (False, True)

    asyncio.run(scenario())
    store.close()


def test_stale_sample_is_marked_and_old_probe_values_give_way(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path)
    store = _store(tmp_path)
    home = telemetry_path(cluster.log_dir, "r1", "a")
    home.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    home.write_bytes(line(now - 0.5, cpu=99.0, node={"temps_c": {"cpu-thermal": 71.0}},
                          jetson={"power_mw": 7500}))

    async def scenario() -> None:
        async with ConnectionPool(cluster) as pool:
            session = RunSession(cluster, store, pool)
            monitor = Monitor(session, "r1")  # a reporter: reads the home copy's tail
            store.update_instance("r1", "a", state=InstancePhase.RUNNING, pid=1,
                                  started_at=now - 5)
            snap = monitor.snapshot({"a": store.instance("r1", "a")})
            view = snap.instances[0].telemetry
            assert view is not None and view.cpu_percent == 99.0 and not view.stale
            assert view.age_seconds < 30
            (n,) = [n for n in snap.nodes if n.name == "local"]
            assert n.temperature_c == 71.0 and n.power_mw == 7500
            # the node stops answering: the same values are shown stale, never as current
            monitor.trackers["local"] = Tracker("local", NodeState.DISCONNECTED, "unreachable")
            monitor.last_seen["local"] = now - 20
            stale = monitor.snapshot({"a": store.instance("r1", "a")}).instances[0].telemetry
            assert stale is not None and stale.stale

    asyncio.run(scenario())
    store.close()


def test_status_json_lists_the_newest_sample(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path)
    store = _store(tmp_path)
    home = telemetry_path(cluster.log_dir, "r1", "a")
    home.parent.mkdir(parents=True, exist_ok=True)
    home.write_bytes(line(10.0, cpu=5.0) + line(11.0, cpu=97.5, rss=3 << 20) + b'{"t":')
    store.close()
    proc = subprocess.run([sys.executable, "-m", "infra.cli.main", "--cluster-config",
                           str(tmp_path / "cluster_config.yaml"), "status", "r1", "--json",
                           "--no-refresh"], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (inst,) = json.loads(proc.stdout)["instances"]
    assert inst["telemetry"]["t"] == 11.0 and inst["telemetry"]["cpu_percent"] == 97.5
    assert inst["telemetry"]["rss_bytes"] == 3 << 20



def test_the_newest_sample_is_read_from_the_tail(tmp_path: Path) -> None:
    path = tmp_path / "a.telemetry.jsonl"
    assert last_sample(path) is None
    path.write_bytes(b"".join(line(float(k)) for k in range(2000)) + b'{"t": 99999')
    found = last_sample(path)
    assert found is not None and found.t == 1999.0  # the torn line is not a sample
    rails = {f"RAIL_{k}": k for k in range(600)}  # one line longer than the first 4 KiB read
    path.write_bytes(line(1.0) + line(2.0, jetson={"rails_mw": rails}))
    found = last_sample(path)
    assert found is not None and found.t == 2.0 and found.jetson is not None
