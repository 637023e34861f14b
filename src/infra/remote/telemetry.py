"""Node-side telemetry: a sampler thread that appends one JSON line per interval.

Standard library only, Python 3.8+. Installed next to ``supervisor.py`` (same versioned
directory); the supervisor starts a ``Sampler`` for the life of an instance (all attempts)
when its start request carries ``"telemetry": {"interval": SECONDS}`` and stops it when the
instance ends. Every ``interval`` seconds one compact JSON object is appended to
``<instance dir>/telemetry.jsonl`` with a single ``os.write`` (O_APPEND):

    t            epoch seconds of the sample (strictly increasing within the file)
    cpu_percent  the instance's process tree (every descendant of the supervisor, which is a
                 child subreaper), % of ONE core, from utime+stime (plus the cutime+cstime of
                 children reaped inside the tree) deltas in /proc/PID/stat
    rss_bytes    the tree's resident memory (/proc/PID/statm, shared pages counted per process)
    procs        processes in the tree
    node         whole node: cpu_percent (all cores, 0..100), mem_used_bytes, mem_total_bytes,
                 load1, temps_c (thermal zones by type)
    gpus         the allocated NVIDIA GPUs, from one long-lived ``nvidia-smi ... -lms`` child
    jetson       GPU load, EMC, clocks, power rails, temperatures (``tegrastats --interval``
                 child, else sysfs and INA3221 hwmon/iio), nvpmodel mode
    pi           ``vcgencmd`` temperature, throttle flags and ARM clock (every 5 s at most)

Any field but ``t`` may be absent. Sampling never harms the instance: every error is counted
and swallowed, a full disk skips samples (a short write is cut back, so no partial line is
left), the thread is a daemon, and the helper children are killed when the sampler stops
(and die of SIGPIPE if the supervisor itself is killed). Every parser is a pure function.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

FILE_NAME = "telemetry.jsonl"
MIN_INTERVAL = 0.2
MAX_INTERVAL = 3600.0
PI_EVERY_SECONDS = 5.0         # vcgencmd forks a process: not more often than this
NVPMODEL_EVERY_SECONDS = 60.0  # the power mode changes seldom
HELPER_TIMEOUT = 5.0           # vcgencmd / nvpmodel -q
STALE_FACTOR = 3.0             # a helper's line older than this many intervals is not used
MAX_LINE = 65536

try:
    CLK_TCK = os.sysconf("SC_CLK_TCK")
except (ValueError, OSError, AttributeError):
    CLK_TCK = 100
try:
    PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
except (ValueError, OSError, AttributeError):
    PAGE_SIZE = 4096

NVIDIA_QUERY = ("index,utilization.gpu,memory.used,memory.total,power.draw,temperature.gpu,"
                "clocks.sm,clocks.mem,uuid")
NVIDIA_FIELDS = ("index", "util_percent", "mem_used_mb", "mem_total_mb", "power_w", "temp_c",
                 "sm_clock_mhz", "mem_clock_mhz", "uuid")


# --------------------------------------------------------------------------- small helpers

def read_text(path: str, limit: int = 65536) -> str | None:
    """The text of a small file (procfs, sysfs), or None when it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(fd, limit).decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def number(text: Any) -> float | None:
    """A float from text, or None for "[N/A]", "[Not Supported]", empty or junk."""
    try:
        value = float(str(text).strip())
    except (TypeError, ValueError):
        return None
    return value if value == value and value not in (float("inf"), float("-inf")) else None


def compact(value: float) -> Any:
    """An int when the value is whole, else the float rounded to 0.1 (smaller lines)."""
    if float(value).is_integer():
        return int(value)
    return round(value, 1)


def interval_of(request: dict[str, Any]) -> float:
    """The sampling interval a start request asks for (0: none, or a bad value)."""
    doc = request.get("telemetry")
    if not isinstance(doc, dict):
        return 0.0
    value = number(doc.get("interval"))
    if value is None or value <= 0:
        return 0.0
    return min(max(value, MIN_INTERVAL), MAX_INTERVAL)


def allocated_gpus(request: dict[str, Any]) -> list[str]:
    """The instance's NVIDIA GPUs: ``gpu_ids``, else the allocation's, else the env's."""
    ids = request.get("gpu_ids") or (request.get("allocation") or {}).get("gpu_ids") or []
    if not ids:
        visible = str((request.get("env") or {}).get("CUDA_VISIBLE_DEVICES") or "")
        ids = [g for g in visible.split(",") if g.strip()]
    return [str(g).strip() for g in ids if str(g).strip()]


# --------------------------------------------------------------------------- /proc parsers

def cpu_times_from_stat(text: str) -> tuple[int, int, int, int, int] | None:
    """(ppid, utime+stime, cutime+cstime, start ticks, 1 when a zombie) from
    /proc/PID/stat text (times in clock ticks; the name may hold spaces and parentheses)."""
    end = text.rfind(")")
    if end < 0:
        return None
    fields = text[end + 2:].split()
    try:
        # fields[0] is proc(5) field 3 (state): ppid 4, utime 14, stime 15, cutime 16,
        # cstime 17, starttime 22
        return (int(fields[1]), int(fields[11]) + int(fields[12]),
                int(fields[13]) + int(fields[14]), int(fields[19]),
                1 if fields[0] in ("Z", "X") else 0)
    except (IndexError, ValueError):
        return None


def rss_from_statm(text: str) -> int | None:
    """Resident pages (second field of /proc/PID/statm)."""
    parts = text.split()
    try:
        return int(parts[1])
    except (IndexError, ValueError):
        return None


def parse_proc_stat(text: str) -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat (idle and iowait are not busy)."""
    for line in text.splitlines():
        if line.startswith("cpu "):
            try:
                values = [int(v) for v in line.split()[1:]]
            except ValueError:
                return None
            if len(values) < 4:
                return None
            total = sum(values[:8])  # guest time is already inside user/nice
            idle = values[3] + (values[4] if len(values) > 4 else 0)
            return total - idle, total
    return None


def parse_meminfo(text: str) -> dict[str, int]:
    """{"mem_total_bytes", "mem_used_bytes"} from /proc/meminfo (used = total - available)."""
    kb: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("MemTotal:", "MemAvailable:", "MemFree:",
                                            "Buffers:", "Cached:"):
            with contextlib.suppress(ValueError):
                kb[parts[0][:-1]] = int(parts[1])
    if "MemTotal" not in kb:
        return {}
    avail = kb.get("MemAvailable")
    if avail is None:  # kernels before 3.14
        avail = kb.get("MemFree", 0) + kb.get("Buffers", 0) + kb.get("Cached", 0)
    total = kb["MemTotal"] * 1024
    return {"mem_total_bytes": total, "mem_used_bytes": max(0, total - avail * 1024)}


def parse_loadavg(text: str) -> float | None:
    """The 1-minute load average from /proc/loadavg."""
    parts = text.split()
    return number(parts[0]) if parts else None


def milli_celsius(text: str | None) -> float | None:
    """Degrees C from a sysfs millidegree value; None for junk or a switched-off sensor."""
    value = number(text) if text is not None else None
    if value is None:
        return None
    celsius = value / 1000.0
    return round(celsius, 1) if -60.0 < celsius < 250.0 else None


def read_thermal_zones(base: str = "/sys/class/thermal") -> dict[str, float]:
    """{zone type: degrees C} of every readable thermal zone under ``base``."""
    temps: dict[str, float] = {}
    for zone in sorted(glob.glob(os.path.join(base, "thermal_zone*")),
                       key=lambda p: int(re.sub(r"\D", "", os.path.basename(p)) or 0)):
        name = (read_text(os.path.join(zone, "type")) or "").strip() or os.path.basename(zone)
        celsius = milli_celsius(read_text(os.path.join(zone, "temp")))
        if celsius is None:
            continue
        key, n = name, 2
        while key in temps:
            key = f"{name}.{n}"
            n += 1
        temps[key] = celsius
    return temps


# --------------------------------------------------------------------------- process tree

def children_supported() -> bool:
    """True when /proc/PID/task/TID/children exists (CONFIG_PROC_CHILDREN)."""
    return os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def tree_by_children(root: int, skip: Any) -> list[int]:
    """Descendants of ``root`` from the children files of every thread (cheap)."""
    out: list[int] = []
    todo = [root]
    seen = {root}
    while todo:
        pid = todo.pop()
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            text = read_text(f"/proc/{pid}/task/{tid}/children") or ""
            for word in text.split():
                child = int(word) if word.isdigit() else 0
                if child and child not in seen and child not in skip:
                    seen.add(child)
                    out.append(child)
                    todo.append(child)
    return out


def tree_by_scan(root: int, skip: Any) -> list[int]:
    """Descendants of ``root`` from the parent of every process in /proc (no children files)."""
    kids: dict[int, list[int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        text = read_text(f"/proc/{name}/stat", 1024)
        end = text.rfind(")") if text else -1
        if end < 0:
            continue
        parts = text[end + 2:].split(None, 2)  # type: ignore[index]
        if len(parts) >= 2 and parts[1].isdigit():
            kids.setdefault(int(parts[1]), []).append(int(name))
    out: list[int] = []
    todo = [root]
    seen = {root}
    while todo:
        for child in kids.get(todo.pop(), ()):
            if child not in seen and child not in skip:
                seen.add(child)
                out.append(child)
                todo.append(child)
    return out


class TreeMeter:
    """CPU % and RSS of a process tree between successive calls.

    Each process is keyed by (pid, start ticks), so a reused pid is a new process, and
    counts its own CPU time plus that of the children it reaped (cutime+cstime): a process
    too short-lived to be seen by any sample is still counted once its parent in the tree
    reaps it. A process that appeared since the previous sample counts all its time; one that
    was reaped by a parent still in the tree has its whole time moved into that parent's, so
    what was counted for it before is taken off again. One reaped by the supervisor (the top
    process of an attempt, an orphan) loses its last moments: at most one interval of it.
    """

    def __init__(self, root: int) -> None:
        self.root = root
        self.children = children_supported()
        self.prev: dict[tuple[int, int], tuple[int, int]] | None = None
        self.prev_at = 0.0

    def measure(self, skip: Any) -> dict[str, Any]:
        """{"cpu_percent" (absent on the first call), "rss_bytes", "procs"}."""
        pids = (tree_by_children if self.children else tree_by_scan)(self.root, skip)
        now_at = time.monotonic()
        now: dict[tuple[int, int], tuple[int, int]] = {}
        rss = 0
        for pid in pids:
            parsed = cpu_times_from_stat(read_text(f"/proc/{pid}/stat", 1024) or "")
            if parsed is None:
                continue  # ended between the listing and now
            ppid, own, reaped, started, zombie = parsed
            now[(pid, started)] = (own + reaped, ppid)
            if not zombie:
                pages = rss_from_statm(read_text(f"/proc/{pid}/statm", 256) or "")
                rss += (pages or 0) * PAGE_SIZE
        out: dict[str, Any] = {"rss_bytes": rss, "procs": len(now)}
        if self.prev is not None and now_at > self.prev_at:
            out["cpu_percent"] = round(100.0 * tree_delta(self.prev, now) / CLK_TCK
                                       / (now_at - self.prev_at), 1)
        self.prev = now
        self.prev_at = now_at
        return out


def tree_delta(prev: dict[tuple[int, int], tuple[int, int]],
               now: dict[tuple[int, int], tuple[int, int]]) -> int:
    """Ticks the tree used between two readings of {(pid, start): (ticks, ppid)} (pure)."""
    delta = 0
    for key, (ticks, _ppid) in now.items():
        before = prev.get(key)
        delta += ticks if before is None else max(0, ticks - before[0])
    live = {pid for pid, _start in now}
    gone = {key[0]: ppid for key, (_ticks, ppid) in prev.items() if key not in now}
    for key, (ticks, ppid) in prev.items():
        if key in now:
            continue
        reaper, hops = ppid, 0
        while reaper in gone and hops < 64:  # its parent ended too: the chain ends up in the
            reaper, hops = gone[reaper], hops + 1  # nearest ancestor still alive
        if reaper in live:
            delta -= ticks  # reaped inside the tree: counted again in that ancestor's cutime
    return max(0, delta)


class NodeMeter:
    """Whole-node CPU % (between calls), memory, load and thermal zones."""

    def __init__(self, thermal_base: str = "/sys/class/thermal") -> None:
        self.prev: tuple[int, int] | None = None
        self.thermal_base = thermal_base

    def measure(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        cpu = parse_proc_stat(read_text("/proc/stat", 8192) or "")
        if cpu is not None:
            if self.prev is not None and cpu[1] > self.prev[1]:
                busy = cpu[0] - self.prev[0]
                out["cpu_percent"] = round(100.0 * busy / (cpu[1] - self.prev[1]), 1)
            self.prev = cpu
        out.update(parse_meminfo(read_text("/proc/meminfo") or ""))
        load = parse_loadavg(read_text("/proc/loadavg") or "")
        if load is not None:
            out["load1"] = load
        temps = read_thermal_zones(self.thermal_base)
        if temps:
            out["temps_c"] = temps
        return out


# --------------------------------------------------------------------------- the sampler

class Sampler:
    """The thread that writes ``telemetry.jsonl`` for one instance every ``interval`` s."""

    def __init__(self, idir: str, request: dict[str, Any], root_pid: int | None = None,
                 interval: float | None = None) -> None:
        self.path = os.path.join(idir, FILE_NAME)
        self.interval = interval_of(request) if interval is None else interval
        self.root = root_pid or os.getpid()
        self.gpu_ids = allocated_gpus(request)
        self.done = threading.Event()
        self.thread: threading.Thread | None = None
        self.fd: int | None = None
        self.last_t = 0.0
        self.samples = 0
        self.errors = 0
        self.skipped = 0
        self.tree = TreeMeter(self.root)
        self.node = NodeMeter()
        self.boards: list[Any] = []

    def start(self) -> None:
        """Start the daemon thread (and the board readers) when the interval is > 0."""
        if self.interval <= 0 or self.thread is not None:
            return
        self.thread = threading.Thread(target=self.loop, name="telemetry", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """End the thread (waiting briefly) and the helper children; never raises."""
        self.done.set()
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=min(self.interval, 5.0) + 2.0)
        self.close_boards()
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None

    def counters(self) -> dict[str, int]:
        """What the sampler did (recorded in state.json when the instance ends)."""
        return {"samples": self.samples, "errors": self.errors, "skipped": self.skipped}

    def loop(self) -> None:
        """Sample every interval until stopped; a missed beat is skipped, not caught up."""
        try:
            self.boards = make_boards(self.interval, self.gpu_ids)
        except Exception:
            self.errors += 1
        due = time.monotonic()
        while not self.done.is_set():
            try:
                self.write(self.sample())
            except Exception:
                self.errors += 1
            due += self.interval
            now = time.monotonic()
            if due < now:
                due = now + self.interval
            if self.done.wait(max(0.0, due - now)):
                break
        self.close_boards()  # stop() may have come before the boards existed

    def close_boards(self) -> None:
        """Kill the helper children (safe to call more than once)."""
        for board in list(self.boards):
            try:
                board.close()
            except Exception:
                self.errors += 1

    def sample(self) -> dict[str, Any]:
        """One sample: the tree, the node and every board reader's fields."""
        skip = set()
        for board in self.boards:
            skip.update(board.pids())
        doc: dict[str, Any] = {"t": 0.0}
        try:
            doc.update(self.tree.measure(skip))
        except Exception:
            self.errors += 1
        try:
            node = self.node.measure()
            if node:
                doc["node"] = node
        except Exception:
            self.errors += 1
        for board in self.boards:
            try:
                board.add(doc)
            except Exception:
                self.errors += 1
        t = round(time.time(), 3)
        if t <= self.last_t:  # the clock stepped back: keep the file strictly increasing
            t = round(self.last_t + 0.001, 3)
        doc["t"] = t
        return doc

    def write(self, doc: dict[str, Any]) -> None:
        """Append one line with one write; a short write (disk full) is cut back off."""
        line = (json.dumps(doc, separators=(",", ":")) + "\n").encode()
        if self.fd is None:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        size = os.fstat(self.fd).st_size
        try:
            written = os.write(self.fd, line)
        except OSError:
            written = -1
        if written != len(line):
            self.skipped += 1
            if written > 0:
                try:
                    os.ftruncate(self.fd, size)
                except OSError:
                    self.errors += 1
            return
        self.last_t = doc["t"]
        self.samples += 1


# --------------------------------------------------------------------------- board parsers

def parse_nvidia_smi_line(line: str) -> dict[str, Any] | None:
    """One GPU from ``nvidia-smi --query-gpu=NVIDIA_QUERY --format=csv,noheader,nounits``.

    "[N/A]", "N/A" and "[Not Supported]" leave the field out; None for a line that is not
    a GPU row (a warning, a blank line).
    """
    parts = [p.strip() for p in line.strip().split(",")]
    if len(parts) < 8 or not parts[0].isdigit():
        return None
    gpu: dict[str, Any] = {"index": parts[0]}
    for i in range(1, 8):  # (no zip: strict= is not in Python 3.8)
        name, value = NVIDIA_FIELDS[i], number(parts[i])
        if value is not None:
            gpu[name] = compact(value)
    if len(parts) > 8 and parts[8] and not parts[8].startswith("["):
        gpu["uuid"] = parts[8]
    return gpu


TEGRA_RAIL = re.compile(r"(?<!\S)([A-Za-z][A-Za-z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?!\S)")
TEGRA_TEMP = re.compile(r"(?<!\S)([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C(?!\S)")
TEGRA_ENGINE = re.compile(r"(?<!\S)(GR3D_FREQ|GR3D|EMC_FREQ|EMC) (\d+)%(?:@\[?([\d,]+)\]?)?")
TEGRA_CPU = re.compile(r"(?<!\S)CPU \[([^\]]*)\](?:@(\d+))?", re.IGNORECASE)
NOT_RAILS = ("RAM", "SWAP", "IRAM", "MTS")
BOARD_INPUT_RAILS = ("VDD_IN", "POM_5V_IN")


def parse_tegrastats(line: str) -> dict[str, Any]:
    """The fields of one ``tegrastats`` line (JetPack 4, 5 and 6 formats); {} when none.

    GPU load and clock from ``GR3D_FREQ 76%@[1300,1300]`` / ``GR3D_FREQ 0%@1300`` /
    ``GR3D_FREQ 0%`` (``GR3D 3%@76`` on older releases), EMC likewise, per-core CPU clocks
    from ``CPU [5%@1510,off,...]`` (or ``CPU [5%,3%]@1510``), rails as ``NAME cur/avg`` (mW,
    with or without the ``mW`` suffix), temperatures ``name@48.5C`` (a switched-off sensor
    reads -256C and is left out).
    """
    out: dict[str, Any] = {}
    for m in TEGRA_ENGINE.finditer(line):
        key = "gpu" if m.group(1).startswith("GR3D") else "emc"
        out[f"{key}_load_percent" if key == "gpu" else "emc_percent"] = int(m.group(2))
        if m.group(3):
            mhz = [int(v) for v in m.group(3).split(",") if v]
            if mhz:
                out[f"{key}_mhz"] = max(mhz)
    cpu = TEGRA_CPU.search(line)
    if cpu:
        shared = int(cpu.group(2)) if cpu.group(2) else None
        mhz = []
        for core in cpu.group(1).split(","):
            core = core.strip()
            if "@" in core:
                value = core.split("@", 1)[1]
                if value.isdigit():
                    mhz.append(int(value))
            elif core.endswith("%") and shared is not None:
                mhz.append(shared)
        if mhz:
            out["cpu_mhz"] = mhz
    rails = {m.group(1): int(m.group(2)) for m in TEGRA_RAIL.finditer(line)
             if m.group(1).upper() not in NOT_RAILS}
    if rails:
        out["rails_mw"] = rails
        power = board_input(rails)
        if power is not None:
            out["power_mw"] = power
    temps = {}
    for m in TEGRA_TEMP.finditer(line):
        celsius = float(m.group(2))
        if celsius > -60:
            temps[m.group(1).lower()] = compact(celsius)
    if temps:
        out["temps_c"] = temps
    return out


def board_input(rails: dict[str, int]) -> int | None:
    """The board's input power (mW) among the rails, when the board measures it."""
    for name in BOARD_INPUT_RAILS:
        if name in rails:
            return rails[name]
    return None


def read_ina3221_hwmon(directory: str) -> dict[str, int]:
    """{rail label: mW} from an INA3221 hwmon directory (JetPack 5/6): ``inN_label``,
    ``inN_input`` (mV) and ``currN_input`` (mA); channels without a current are skipped."""
    rails: dict[str, int] = {}
    for label_path in sorted(glob.glob(os.path.join(directory, "in*_label"))):
        n = os.path.basename(label_path)[2:-len("_label")]
        if not n.isdigit():
            continue
        label = (read_text(label_path) or "").strip()
        mv = number(read_text(os.path.join(directory, f"in{n}_input")))
        ma = number(read_text(os.path.join(directory, f"curr{n}_input")))
        if label and mv is not None and ma is not None:
            rails[label] = round(mv * ma / 1000.0)
    return rails


def read_ina3221_iio(directory: str) -> dict[str, int]:
    """{rail name: mW} from an INA3221x iio device (JetPack 4): ``rail_name_N`` with
    ``in_power N_input`` (mW), else ``in_voltageN_input`` (mV) x ``in_currentN_input`` (mA)."""
    rails: dict[str, int] = {}
    for name_path in sorted(glob.glob(os.path.join(directory, "rail_name_*"))):
        n = name_path.rsplit("_", 1)[-1]
        if not n.isdigit():
            continue
        name = (read_text(name_path) or "").strip()
        power = number(read_text(os.path.join(directory, f"in_power{n}_input")))
        if power is None:
            mv = number(read_text(os.path.join(directory, f"in_voltage{n}_input")))
            ma = number(read_text(os.path.join(directory, f"in_current{n}_input")))
            power = None if mv is None or ma is None else mv * ma / 1000.0
        if name and power is not None:
            rails[name] = round(power)
    return rails


def parse_nvpmodel_query(text: str) -> str | None:
    """The mode name from ``nvpmodel -q`` ("NV Power Mode: MAXN")."""
    for line in text.splitlines():
        if line.startswith("NV Power Mode:"):
            return line.split(":", 1)[1].strip() or None
    return None


def parse_nvpmodel_status(text: str) -> str | None:
    """The mode id from /var/lib/nvpmodel/status ("pmode:0000 fmode:quiet" -> "0")."""
    m = re.search(r"pmode:\s*(\d+)", text)
    return str(int(m.group(1))) if m else None


def parse_vcgencmd_temp(text: str) -> float | None:
    """Degrees C from ``vcgencmd measure_temp`` ("temp=52.1'C")."""
    m = re.search(r"temp=(-?\d+(?:\.\d+)?)", text)
    return float(m.group(1)) if m else None


def parse_vcgencmd_throttled(text: str) -> str | None:
    """The flags from ``vcgencmd get_throttled`` ("throttled=0x50000"), as hex text."""
    m = re.search(r"throttled=(0x[0-9a-fA-F]+|\d+)", text)
    if not m:
        return None
    return hex(int(m.group(1), 0))


def parse_vcgencmd_clock(text: str) -> int | None:
    """MHz from ``vcgencmd measure_clock arm`` ("frequency(48)=1500398464")."""
    m = re.search(r"frequency\(\d+\)=(\d+)", text)
    return round(int(m.group(1)) / 1e6) if m else None


# --------------------------------------------------------------------------- board readers

def which(name: str, extra: tuple[str, ...] = ()) -> str | None:
    """The path of a tool in PATH or in one of ``extra`` places."""
    found = shutil.which(name)
    if found:
        return found
    for path in extra:
        if os.access(path, os.X_OK):
            return path
    return None


def run_helper(argv: list[str]) -> str:
    """The stdout of a short helper command (bounded); "" on any failure."""
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, timeout=HELPER_TIMEOUT)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout[:MAX_LINE].decode("utf-8", "replace")


class LineChild:
    """A long-lived helper (``nvidia-smi -lms``, ``tegrastats --interval``) whose stdout lines
    a daemon thread hands to ``on_line``; killed by ``close``. If the supervisor is killed
    the helper dies of SIGPIPE at its next line."""

    def __init__(self, argv: list[str], on_line: Callable[[str], None]) -> None:
        self.on_line = on_line
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        self.thread = threading.Thread(target=self.read, name="telemetry-child", daemon=True)
        self.thread.start()

    def read(self) -> None:
        stdout = self.proc.stdout
        if stdout is None:
            return
        try:
            for raw in stdout:
                with contextlib.suppress(Exception):
                    self.on_line(raw[:MAX_LINE].decode("utf-8", "replace"))
        except (OSError, ValueError):
            pass

    def pids(self) -> list[int]:
        return [self.proc.pid]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        """Terminate, then kill, the helper (only while it is still our unreaped child)."""
        proc = self.proc
        if proc.poll() is None:
            try:
                proc.terminate()
                proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=2.0)
            except OSError:
                pass
        if proc.stdout is not None:
            with contextlib.suppress(OSError):
                proc.stdout.close()


class NvidiaGpus:
    """The allocated NVIDIA GPUs from one ``nvidia-smi --query-gpu ... -lms`` child."""

    def __init__(self, tool: str, interval: float, gpu_ids: list[str]) -> None:
        self.wanted = set(gpu_ids)
        self.interval = interval
        self.latest: dict[str, tuple[float, dict[str, Any]]] = {}
        ms = max(100, int(interval * 1000))
        self.child = LineChild([tool, f"--query-gpu={NVIDIA_QUERY}",
                                "--format=csv,noheader,nounits", "-lms", str(ms)], self.on_line)

    def on_line(self, line: str) -> None:
        gpu = parse_nvidia_smi_line(line)
        if gpu is not None:
            self.latest[gpu["index"]] = (time.monotonic(), gpu)

    def pids(self) -> list[int]:
        return self.child.pids()

    def add(self, doc: dict[str, Any]) -> None:
        fresh = time.monotonic() - STALE_FACTOR * max(self.interval, 1.0)
        gpus = []
        for _index, (at, gpu) in sorted(self.latest.items(), key=lambda kv: int(kv[0])):
            if at < fresh:
                continue
            if gpu["index"] in self.wanted or gpu.get("uuid") in self.wanted:
                gpus.append({k: v for k, v in gpu.items() if k != "uuid"})
        if gpus:
            doc["gpus"] = gpus

    def close(self) -> None:
        self.child.close()


class NvpModel:
    """The Jetson power mode: ``nvpmodel -q`` (its name), else the status file (its id),
    read once a minute."""

    def __init__(self, status_file: str = "/var/lib/nvpmodel/status") -> None:
        self.tool = which("nvpmodel", ("/usr/sbin/nvpmodel", "/usr/bin/nvpmodel"))
        self.status_file = status_file
        self.value: str | None = None
        self.at = -1e18

    def get(self) -> str | None:
        now = time.monotonic()
        if now - self.at >= NVPMODEL_EVERY_SECONDS:
            self.at = now
            mode = parse_nvpmodel_query(run_helper([self.tool, "-q"])) if self.tool else None
            if mode is None:
                mode = parse_nvpmodel_status(read_text(self.status_file) or "")
            self.value = mode or self.value
        return self.value


class JetsonTegrastats:
    """Jetson fields from one ``tegrastats --interval MS`` child, plus the nvpmodel mode."""

    def __init__(self, tool: str, interval: float) -> None:
        self.interval = interval
        self.latest: tuple[float, dict[str, Any]] | None = None
        self.nvp = NvpModel()
        self.sysfs: JetsonSysfs | None = None
        ms = max(100, int(interval * 1000))
        self.child = LineChild([tool, "--interval", str(ms)], self.on_line)

    def on_line(self, line: str) -> None:
        fields = parse_tegrastats(line)
        if fields:
            self.latest = (time.monotonic(), fields)

    def pids(self) -> list[int]:
        return self.child.pids()

    def add(self, doc: dict[str, Any]) -> None:
        out: dict[str, Any] = {}
        latest = self.latest
        if latest is not None and latest[0] >= time.monotonic() - STALE_FACTOR * max(
                self.interval, 1.0):
            out.update(latest[1])
        elif not self.child.alive():  # tegrastats refused to run here: read sysfs instead
            if self.sysfs is None:
                self.sysfs = JetsonSysfs()
            out.update(self.sysfs.fields())
        put_jetson(doc, out, self.nvp)

    def close(self) -> None:
        self.child.close()


def put_jetson(doc: dict[str, Any], fields: dict[str, Any], nvp: NvpModel) -> None:
    """A sample's ``jetson`` object: the board's fields and the nvpmodel mode (if any)."""
    mode = nvp.get()
    if mode is not None:
        fields["nvpmodel"] = mode
    if fields:
        doc["jetson"] = fields


GPU_LOAD_FILES = ("/sys/devices/gpu.0/load", "/sys/devices/platform/gpu.0/load",
                  "/sys/devices/platform/*.ga10b/load", "/sys/devices/platform/*.gpu/load",
                  "/sys/devices/platform/bus@0/*.gpu/load")
GPU_DEVFREQ = re.compile(r"gpu|ga10b|gv11b|gp10b|gm20b")


def first_existing(patterns: tuple[str, ...]) -> str | None:
    """The first file matching one of the glob patterns, in order."""
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            if os.path.isfile(path):
                return path
    return None


class JetsonSysfs:
    """Jetson fields from sysfs when tegrastats is missing: GPU load and clock, the INA3221
    power rails (hwmon on JetPack 5/6, iio on JetPack 4), the nvpmodel mode."""

    def __init__(self, sys_root: str = "/sys") -> None:
        def under(path: str) -> str:
            return sys_root.rstrip("/") + path[len("/sys"):]

        self.load_file = first_existing(tuple(under(p) for p in GPU_LOAD_FILES))
        self.freq_file = None
        for path in sorted(glob.glob(under("/sys/class/devfreq/*/cur_freq"))):
            if GPU_DEVFREQ.search(os.path.basename(os.path.dirname(path))):
                self.freq_file = path
                break
        self.hwmon = sorted(glob.glob(under("/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*")))
        self.iio = sorted(glob.glob(under("/sys/bus/i2c/drivers/ina3221x/*/iio:device*")))
        self.nvp = NvpModel()

    def pids(self) -> list[int]:
        return []

    def fields(self) -> dict[str, Any]:
        """The readable fields now (pure reads of sysfs files)."""
        out: dict[str, Any] = {}
        if self.load_file:
            load = number(read_text(self.load_file))
            if load is not None:
                out["gpu_load_percent"] = compact(load / 10.0)  # per mille
        if self.freq_file:
            hz = number(read_text(self.freq_file))
            if hz is not None:
                out["gpu_mhz"] = round(hz / 1e6)
        rails: dict[str, int] = {}
        for d in self.hwmon:
            rails.update(read_ina3221_hwmon(d))
        for d in self.iio:
            rails.update(read_ina3221_iio(d))
        if rails:
            out["rails_mw"] = rails
            power = board_input(rails)
            if power is not None:
                out["power_mw"] = power
        return out

    def add(self, doc: dict[str, Any]) -> None:
        put_jetson(doc, self.fields(), self.nvp)

    def close(self) -> None:
        pass


class RaspberryPi:
    """``vcgencmd`` temperature, throttle flags and ARM clock, at most every 5 s."""

    def __init__(self, tool: str) -> None:
        self.tool = tool
        self.values: dict[str, Any] = {}
        self.at = -1e18

    def pids(self) -> list[int]:
        return []

    def add(self, doc: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self.at >= PI_EVERY_SECONDS:
            self.at = now
            values: dict[str, Any] = {}
            temp = parse_vcgencmd_temp(run_helper([self.tool, "measure_temp"]))
            if temp is not None:
                values["temp_c"] = temp
            flags = parse_vcgencmd_throttled(run_helper([self.tool, "get_throttled"]))
            if flags is not None:
                values["throttled"] = flags
            mhz = parse_vcgencmd_clock(run_helper([self.tool, "measure_clock", "arm"]))
            if mhz is not None:
                values["arm_mhz"] = mhz
            self.values = values
        if self.values:
            doc["pi"] = dict(self.values)

    def close(self) -> None:
        pass


def is_jetson() -> bool:
    """True on an NVIDIA Jetson (L4T release file or a Tegra SoC family)."""
    if os.path.exists("/etc/nv_tegra_release"):
        return True
    family = (read_text("/sys/devices/soc0/family") or "").strip().lower()
    return family == "tegra"


def make_boards(interval: float, gpu_ids: list[str]) -> list[Any]:
    """The board readers this node supports (NVIDIA GPUs, Jetson, Raspberry Pi).

    A reader that cannot start is left out; none of them is required.
    """
    boards: list[Any] = []
    smi = which("nvidia-smi") if gpu_ids else None
    if smi:
        with contextlib.suppress(OSError):
            boards.append(NvidiaGpus(smi, interval, gpu_ids))
    tegrastats = which("tegrastats", ("/usr/bin/tegrastats", "/home/nvidia/tegrastats"))
    if tegrastats or is_jetson():
        board: Any = None
        if tegrastats:
            try:
                board = JetsonTegrastats(tegrastats, interval)
            except OSError:
                board = None
        boards.append(board or JetsonSysfs())
    vcgencmd = which("vcgencmd", ("/usr/bin/vcgencmd", "/opt/vc/bin/vcgencmd"))
    if vcgencmd:
        boards.append(RaspberryPi(vcgencmd))
    return boards


def start(idir: str, request: dict[str, Any]) -> Sampler | None:
    """The running sampler for an instance, or None when its request asks for none."""
    if interval_of(request) <= 0:
        return None
    sampler = Sampler(idir, request)
    sampler.start()
    return sampler
