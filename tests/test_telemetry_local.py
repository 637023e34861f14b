"""Telemetry written by the node-side supervisor, for real: local subprocesses through
LocalTransport + client (as tests/test_supervisor.py), reading the instance's
``telemetry.jsonl`` while it runs."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from infra.config.model import NodeConfig
from infra.runner.supervisor_client import PoolSyncRequest, StartRequest, SupervisorClient
from tests.test_supervisor import NODE_PYTHON, client, node

__all__ = ["NODE_PYTHON", "client", "node"]  # the fixtures, re-used

PY = shlex.quote(sys.executable)
BOUND = 60.0  # upper bound for waits, only so a broken sampler cannot hang the suite


def start(client: SupervisorClient, run_id: str, command: str, interval: float) -> Path:
    """Start one instance with telemetry every ``interval`` s; its node-side directory."""
    state = asyncio.run(client.start(StartRequest(run_id=run_id, instance_id="i",
                                                  command=command,
                                                  telemetry_interval=interval)))
    assert state.log_path is not None
    return Path(state.log_path).parent


def samples(idir: Path) -> list[dict[str, Any]]:
    path = idir / "telemetry.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_samples(idir: Path, ok: Callable[[list[dict[str, Any]]], bool],
                 what: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + BOUND
    while True:
        got = samples(idir)
        if ok(got):
            return got
        assert time.monotonic() < deadline, f"never {what}: {got[-3:]}"
        time.sleep(0.05)


def with_cpu(got: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [s for s in got if "cpu_percent" in s]


BURN = ("import os, sys, time\n"
        "out = open(sys.argv[1], 'a')\n"
        "mark = time.monotonic()\n"
        "while True:\n"
        "    now = time.monotonic()\n"
        "    if now - mark >= 0.2:\n"
        "        out.write('%f %f\\n' % (time.time(), time.process_time())); out.flush()\n"
        "        mark = now\n")


def own_share(path: Path, t0: float, t1: float) -> float:
    """The burner's own CPU share (% of one core) between the records nearest t0 and t1."""
    rows = [tuple(map(float, line.split())) for line in path.read_text().splitlines()
            if len(line.split()) == 2]
    a = min(rows, key=lambda r: abs(r[0] - t0))
    b = min(rows, key=lambda r: abs(r[0] - t1))
    return 100.0 * (b[1] - a[1]) / (b[0] - a[0])


def test_busy_tree_near_one_core_and_file_is_ordered(client: SupervisorClient,
                                                     tmp_path: Path) -> None:
    """A CPU-burning program shows about 100% of one core: exactly its own measured share
    (the box may be loaded, so the share it got is what the tree must show), and > 60%."""
    log = tmp_path / "burn.txt"
    command = f"{PY} -c {shlex.quote(BURN)} {shlex.quote(str(log))}"
    idir = start(client, "busy", command, 0.25)
    got = wait_samples(idir, lambda g: len(with_cpu(g)) >= 12, "12 samples with cpu")
    window = with_cpu(got)[-8:]
    mean = sum(s["cpu_percent"] for s in window) / len(window)
    own = own_share(log, window[0]["t"] - 0.25, window[-1]["t"])
    assert abs(mean - own) <= max(15.0, 0.2 * own), (mean, own, window)
    assert mean > 60 or own < 70, (mean, own)  # ~100% whenever the box lets it run
    ts = [s["t"] for s in samples(idir)]
    assert all(b > a for a, b in itertools.pairwise(ts)), ts
    last = got[-1]
    assert last["procs"] >= 1 and last["rss_bytes"] > 0
    node = last["node"]
    assert node["mem_total_bytes"] >= node["mem_used_bytes"] > 0
    assert 0 <= node["cpu_percent"] <= 100 and "load1" in node


def tree_ticks(pid: int) -> int:
    """utime+stime+cutime+cstime of one process: its own and its reaped children's CPU."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rfind(")") + 2:].split()
    return sum(int(f) for f in fields[11:15])


def test_short_lived_children_are_counted(client: SupervisorClient) -> None:
    """A shell starting one short CPU-bound child after another (each far shorter than the
    interval, so most are never seen alive by a sample): the tree's CPU is what the shell and
    its reaped children really used."""
    child = f"{PY} -S -c 'x = 0\nfor i in range(150000): x += i'"
    state = asyncio.run(client.start(StartRequest(
        run_id="short", instance_id="i", command=f"while :; do {child}; done",
        telemetry_interval=0.5)))
    assert state.log_path is not None and state.pid is not None
    idir = Path(state.log_path).parent
    wait_samples(idir, lambda g: len(with_cpu(g)) >= 2, "2 samples with cpu")
    t0, ticks0 = time.time(), tree_ticks(state.pid)
    wait_samples(idir, lambda g: any(s["t"] > t0 + 5.0 for s in g), "5 s of samples")
    t1, ticks1 = time.time(), tree_ticks(state.pid)
    window = [s for s in with_cpu(samples(idir)) if t0 + 0.5 <= s["t"] <= t1]
    mean = sum(s["cpu_percent"] for s in window) / len(window)
    own = 100.0 * (ticks1 - ticks0) / os.sysconf("SC_CLK_TCK") / (t1 - t0)
    assert abs(mean - own) <= max(15.0, 0.25 * own), (mean, own, window)


def test_sleeping_tree_near_zero(client: SupervisorClient) -> None:
    idir = start(client, "idle", "sleep 600", 0.25)
    got = wait_samples(idir, lambda g: len(with_cpu(g)) >= 6, "6 samples with cpu")
    cpu = [s["cpu_percent"] for s in with_cpu(got)]
    assert sum(cpu) / len(cpu) < 10, cpu


def test_rss_grows_and_children_counted(client: SupervisorClient) -> None:
    grow = ("import time; b=[]\n"
            "for i in range(20):\n"
            "    b.append(bytearray(10*1024*1024)); time.sleep(0.2)\n"
            "time.sleep(600)\n")
    command = f"sleep 600 & {PY} -c {shlex.quote(grow)}"
    idir = start(client, "grow", command, 0.25)
    got = wait_samples(idir, lambda g: any(s.get("rss_bytes", 0) > 200 * 2**20 for s in g),
                       "more than 200 MiB resident")
    first = next(s for s in got if "rss_bytes" in s)
    assert first["rss_bytes"] < 100 * 2**20
    assert max(s.get("procs", 0) for s in got) >= 3  # sh, sleep, python


def test_interval_zero_writes_nothing(client: SupervisorClient) -> None:
    idir = start(client, "off", f"{PY} -c 'import time; time.sleep(1.5)'", 0.0)
    state = asyncio.run(client.status("off"))[0]
    deadline = time.monotonic() + BOUND
    while not state.is_final:
        assert time.monotonic() < deadline
        time.sleep(0.05)
        state = asyncio.run(client.status("off"))[0]
    assert not (idir / "telemetry.jsonl").exists()
    assert "telemetry" not in json.loads((idir / "request.json").read_text())


def test_sampler_stops_with_the_instance(client: SupervisorClient) -> None:
    idir = start(client, "ends", f"{PY} -c 'import time; time.sleep(1.5)'", 0.2)
    deadline = time.monotonic() + BOUND
    while not asyncio.run(client.status("ends"))[0].is_final:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    count = len(samples(idir))
    assert count >= 2
    state = json.loads((idir / "state.json").read_text())
    assert state["telemetry_counts"]["samples"] == count
    assert state["telemetry_counts"]["errors"] == 0


# --------------------------------------------------------------------------- board readers

FAKE_SMI = """
import os, sys, time
ms = int(sys.argv[sys.argv.index("-lms") + 1])
open(os.environ["FAKE_PIDS"] + "/smi", "w").write(str(os.getpid()))
while True:
    sys.stdout.write("0, 11, 100, 81559, 70.5, 40, 1410, 2619, GPU-aaaa\\n")
    sys.stdout.write("1, 97, 1234, 81559, [N/A], 61, 1980, 2619, GPU-bbbb\\n")
    sys.stdout.flush()
    time.sleep(ms / 1000.0)
"""
FAKE_TEGRASTATS = """
import os, sys, time
ms = int(sys.argv[sys.argv.index("--interval") + 1])
open(os.environ["FAKE_PIDS"] + "/tegrastats", "w").write(str(os.getpid()))
while True:
    print("RAM 1985/7620MB (lfb 3x4MB) CPU [3%@1510,2%@1510] EMC_FREQ 21%@3199 "
          "GR3D_FREQ 55%@[1020] cpu@51.2C gpu@49.75C VDD_IN 7812mW/6001mW "
          "VDD_CPU_GPU_CV 2331mW/1214mW", flush=True)
    time.sleep(ms / 1000.0)
"""
FAKE_NVPMODEL = 'print("NV Power Mode: MAXN")\nprint(0)\n'
FAKE_VCGENCMD = """
import sys
answers = {"measure_temp": "temp=52.1'C", "get_throttled": "throttled=0x50000",
           "measure_clock": "frequency(48)=2400000000"}
print(answers.get(sys.argv[1], "error=1"))
"""
BROKEN = "import sys\nprint('NVIDIA-SMI has failed: no driver')\nsys.exit(9)\n"


def fake_tools(folder: Path, tools: dict[str, str]) -> Path:
    """Executable stand-ins for the boards' tools (real subprocesses, public formats)."""
    folder.mkdir()
    for name, body in tools.items():
        path = folder / name
        path.write_text(f"#!{sys.executable}\n{body}")
        path.chmod(0o755)
    return folder


def gone(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return text[text.rfind(")") + 2] in "ZX"


def test_boards_from_long_lived_tools(client: SupervisorClient, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """One nvidia-smi and one tegrastats child feed the samples (the allocated GPU only, the
    Jetson fields, the nvpmodel mode), vcgencmd the Pi fields; the helpers are not counted in
    the instance's tree, and they are gone once the instance ended."""
    tools = fake_tools(tmp_path / "bin", {"nvidia-smi": FAKE_SMI, "tegrastats": FAKE_TEGRASTATS,
                                          "nvpmodel": FAKE_NVPMODEL, "vcgencmd": FAKE_VCGENCMD})
    pids = tmp_path / "pids"
    pids.mkdir()
    monkeypatch.setenv("PATH", f"{tools}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_PIDS", str(pids))
    state = asyncio.run(client.start(StartRequest(
        run_id="boards", instance_id="i", command="sleep 600", gpu_ids=("1",),
        telemetry_interval=0.25)))
    assert state.log_path is not None
    idir = Path(state.log_path).parent
    got = wait_samples(idir, lambda g: any("gpus" in s and "jetson" in s and "pi" in s
                                           for s in g), "all boards in one sample")
    full = next(s for s in got if "gpus" in s and "jetson" in s and "pi" in s)
    assert full["gpus"] == [{"index": "1", "util_percent": 97, "mem_used_mb": 1234,
                             "mem_total_mb": 81559, "temp_c": 61, "sm_clock_mhz": 1980,
                             "mem_clock_mhz": 2619}]
    jetson = full["jetson"]
    assert jetson["gpu_load_percent"] == 55 and jetson["power_mw"] == 7812
    assert jetson["nvpmodel"] == "MAXN"
    assert full["pi"] == {"temp_c": 52.1, "throttled": "0x50000", "arm_mhz": 2400}
    assert full["procs"] <= 2  # sh and sleep at most: the helpers are not the instance's
    helpers = [int((pids / name).read_text()) for name in ("smi", "tegrastats")]
    asyncio.run(client.stop("boards", grace=1.0))
    deadline = time.monotonic() + BOUND
    while not all(gone(p) for p in helpers):
        assert time.monotonic() < deadline, "a helper child outlived its sampler"
        time.sleep(0.05)


def test_broken_tools_never_harm_the_instance(client: SupervisorClient, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing nvidia-smi, tegrastats and vcgencmd: samples go on without their fields (the
    Jetson's from sysfs, here only the nvpmodel mode) and the instance ends as it would have."""
    tools = fake_tools(tmp_path / "bin", {"nvidia-smi": BROKEN, "vcgencmd": BROKEN,
                                          "tegrastats": BROKEN, "nvpmodel": FAKE_NVPMODEL})
    monkeypatch.setenv("PATH", f"{tools}:{os.environ['PATH']}")
    state = asyncio.run(client.start(StartRequest(
        run_id="broken", instance_id="i", command=f"{PY} -c 'import time; time.sleep(2)'",
        gpu_ids=("0",), telemetry_interval=0.2)))
    assert state.log_path is not None
    idir = Path(state.log_path).parent
    deadline = time.monotonic() + BOUND
    while not (final := asyncio.run(client.status("broken"))[0]).is_final:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert final.status.value == "exited", final
    got = samples(idir)
    assert len(got) >= 3
    assert not any("gpus" in s or "pi" in s for s in got)
    assert got[-1]["jetson"] == {"nvpmodel": "MAXN"}


def test_pool_task_samples_with_the_key_it_was_handed(client: SupervisorClient,
                                                      node: NodeConfig) -> None:
    """A campaign task started by a node-side pool gets telemetry as its request said; a task
    handed over without the key gets none."""
    command = f"{PY} -c 'import time; time.sleep(1.5)'"
    adds = (StartRequest(run_id="pooled", instance_id="t1", command=command,
                         telemetry_interval=0.2),
            StartRequest(run_id="pooled", instance_id="t2", command=command))
    asyncio.run(client.pool_sync(PoolSyncRequest(run_id="pooled", pool="p", workers=2,
                                                 add=adds, close=True, idle_exit_seconds=60.0,
                                                 grace=1.0)))
    run_dir = Path(node.remote_work_dir) / ".infra" / "runs" / "pooled"
    deadline = time.monotonic() + BOUND
    while not all(s.is_final for s in asyncio.run(client.status("pooled"))) or \
            len(asyncio.run(client.status("pooled"))) < 2:
        assert time.monotonic() < deadline, "the pool's tasks never ended"
        time.sleep(0.05)
    assert len(samples(run_dir / "t1")) >= 2
    assert not (run_dir / "t2" / "telemetry.jsonl").exists()
