"""Node probe: report what this machine has (CPU, memory, disk, temperatures, GPUs, board).

Runs on the node as ``python3 - WORK_DIR`` with its own source fed on stdin, so nothing has
to be deployed first. Standard library only, Python 3.8+; psutil and jtop are used when they
import, never required. Prints one JSON document between the two marker strings. A failure
inside one section is recorded in the document's "errors" list and never stops the others.

Every parser is a pure function of text so tests can feed it captured output.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

BEGIN = "@@INFRA-JSON-BEGIN@@"
END = "@@INFRA-JSON-END@@"

PROBE_VERSION = 1

# Fields asked of nvidia-smi; the last ones are dropped when an old driver rejects them.
NVIDIA_FIELDS = (
    "index", "uuid", "name", "memory.total", "memory.used", "utilization.gpu",
    "temperature.gpu", "power.draw", "driver_version", "compute_cap",
)
# Asked too where the driver knows it (dropped otherwise): why the clocks are held down now.
NVIDIA_THROTTLE_FIELD = "clocks_throttle_reasons.active"
NVIDIA_QUERY = (*NVIDIA_FIELDS, NVIDIA_THROTTLE_FIELD)
NVIDIA_OPTIONAL_FIELDS = ("compute_cap", NVIDIA_THROTTLE_FIELD)

# Jetson power mode: the daemon's state file, the mode names, and the query tool.
NVPMODEL_STATUS = "/var/lib/nvpmodel/status"
NVPMODEL_CONF = "/etc/nvpmodel.conf"
NVPMODEL_TIMEOUT = 3.0

# Seconds each external command may take before it is killed.
COMMAND_TIMEOUT = 5.0
TEGRASTATS_TIMEOUT = 3.0
JTOP_TIMEOUT = 3.0

# Raspberry Pi `vcgencmd get_throttled` bits (documented by the Raspberry Pi firmware).
THROTTLED_BITS = (
    (0, "under_voltage"),
    (1, "arm_frequency_capped"),
    (2, "throttled"),
    (3, "soft_temperature_limit"),
    (16, "under_voltage_occurred"),
    (17, "arm_frequency_capping_occurred"),
    (18, "throttling_occurred"),
    (19, "soft_temperature_limit_occurred"),
)

_NA_VALUES = ("", "n/a", "[n/a]", "[not supported]", "not supported", "[unknown error]",
              "[insufficient permissions]", "[gpu is lost]", "[requires reset]")


# --------------------------------------------------------------------------- pure parsers

def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` -> {key: value}; "kB" values become bytes, unitless ones stay counts."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        key, _, rest = line.partition(":")
        parts = rest.split()
        if not parts or not key.strip():
            continue
        try:
            value = int(parts[0])
        except ValueError:
            continue
        if len(parts) > 1:
            unit = parts[1].lower()
            if unit == "kb":
                value *= 1024
            elif unit == "mb":
                value *= 1024 * 1024
            elif unit == "gb":
                value *= 1024 * 1024 * 1024
        out[key.strip()] = value
    if not out:
        raise ValueError("no meminfo fields found")
    return out


def memory_from_meminfo(info: dict[str, int]) -> dict[str, int | None]:
    """Total/available/NvMap bytes from parsed meminfo; available is estimated on old kernels."""
    if "MemTotal" not in info:
        raise ValueError("MemTotal missing from meminfo")
    available = info.get("MemAvailable")
    if available is None:  # kernels before 3.14 have no MemAvailable
        available = (info.get("MemFree", 0) + info.get("Buffers", 0) + info.get("Cached", 0)
                     + info.get("SReclaimable", 0) - info.get("Shmem", 0))
        available = max(0, min(available, info["MemTotal"]))
    return {
        "total_bytes": info["MemTotal"],
        "available_bytes": available,
        "nvmap_used_bytes": info.get("NvMapMemUsed"),
        "swap_total_bytes": info.get("SwapTotal"),
        "swap_free_bytes": info.get("SwapFree"),
    }


def parse_cpu_list(text: str) -> list[int]:
    """Kernel cpu list such as ``0-3,5`` (``/sys/devices/system/cpu/online``) -> [0,1,2,3,5]."""
    cpus: list[int] = []
    text = text.strip()
    if not text:
        return cpus
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"empty item in cpu list {text!r}")
        if "-" in part:
            lo_s, _, hi_s = part.partition("-")
            lo, hi = int(lo_s), int(hi_s)
            if lo < 0 or hi < lo:
                raise ValueError(f"bad cpu range {part!r}")
            cpus.extend(range(lo, hi + 1))
        else:
            value = int(part)
            if value < 0:
                raise ValueError(f"bad cpu number {part!r}")
            cpus.append(value)
    return sorted(set(cpus))


def parse_loadavg(text: str) -> list[float]:
    """``/proc/loadavg`` -> [1 min, 5 min, 15 min]."""
    parts = text.split()
    if len(parts) < 3:
        raise ValueError(f"loadavg needs three numbers, got {text.strip()!r}")
    return [float(parts[0]), float(parts[1]), float(parts[2])]


def parse_os_release(text: str) -> dict[str, str]:
    """``/etc/os-release`` KEY=value lines (values may be quoted) -> dict."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def parse_thermal_temp(text: str) -> float | None:
    """A thermal zone's ``temp`` (millidegrees C) -> degrees C; None for an offline sensor."""
    value = int(text.strip()) / 1000.0
    if value <= -100.0 or value >= 200.0:  # Orin reports -256 C for powered-down sensors
        return None
    return value


def is_placeholder_temperature(name: str, celsius: float) -> bool:
    """True for readings that are not measurements: Jetson's PMIC die reports a fixed 100 C
    until a 120 C threshold trips, and powered-down Orin sensors report -256 C."""
    if name.upper().startswith("PMIC") and celsius == 100.0:
        return True
    return celsius <= -100.0 or celsius >= 200.0


def parse_device_tree_string(data: bytes) -> str:
    """A device-tree string property (NUL-terminated) -> text."""
    return data.split(b"\x00", 1)[0].decode("utf-8", "replace").strip()


def parse_device_tree_list(data: bytes) -> list[str]:
    """A device-tree string-list property (NUL-separated, e.g. ``compatible``) -> list."""
    return [p.decode("utf-8", "replace") for p in data.split(b"\x00") if p.strip()]


def _na(value: str) -> bool:
    return value.strip().lower() in _NA_VALUES


def _num(value: str) -> float | None:
    value = value.strip()
    if _na(value):
        return None
    return float(value)


def parse_nvidia_smi_csv(text: str, fields: list[str]) -> list[dict[str, Any]]:
    """``nvidia-smi --query-gpu=... --format=csv,noheader,nounits`` -> one dict per GPU.

    Values like ``[N/A]`` / ``[Not Supported]`` become None; numeric fields become numbers.
    """
    text_fields = ("uuid", "name", "driver_version", "compute_cap", "pci.bus_id", "serial",
                   NVIDIA_THROTTLE_FIELD)
    gpus: list[dict[str, Any]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        values = [v.strip() for v in line.split(",")]
        if len(values) != len(fields):
            raise ValueError(
                f"nvidia-smi line has {len(values)} values, expected {len(fields)}: {line!r}")
        row: dict[str, Any] = {}
        for field, value in zip(fields, values):  # noqa: B905 (strict= needs 3.10)
            if _na(value):
                row[field] = None
            elif field in text_fields:
                row[field] = value
            elif field == "index":
                row[field] = int(value)
            else:
                row[field] = float(value)
        gpus.append(row)
    return gpus


def nvidia_smi_invalid_field(text: str) -> str | None:
    """The field named by nvidia-smi's ``Field "X" is not a valid field to query.``, or None."""
    match = re.search(r'Field "([^"]+)" is not a valid field to query', text)
    return match.group(1) if match else None


def gpu_from_nvidia_row(row: dict[str, Any]) -> dict[str, Any]:
    """Normalise one parsed nvidia-smi row to the probe's GPU record."""
    name = row.get("name") or "NVIDIA GPU"
    vendor = "nvidia-tegra" if "nvgpu" in name.lower() else "nvidia"
    return {
        "index": row.get("index"),
        "uuid": row.get("uuid"),
        "name": name,
        "memory_total_mb": row.get("memory.total"),
        "memory_used_mb": row.get("memory.used"),
        "utilization_pct": row.get("utilization.gpu"),
        "temperature_c": row.get("temperature.gpu"),
        "power_w": row.get("power.draw"),
        "driver": row.get("driver_version"),
        "compute_cap": row.get("compute_cap"),
        "throttle_reasons": row.get(NVIDIA_THROTTLE_FIELD),
        "vendor": vendor,
    }


_TS_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_TS_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB")
_TS_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_TS_GR3D = re.compile(r"\bGR3D_FREQ (\d+)%(?:@\[?([\d,]+)\]?)?")
_TS_EMC = re.compile(r"\bEMC_FREQ (\d+)%(?:@(\d+))?")
_TS_TEMP = re.compile(r"(?<![\w@])([A-Za-z][\w]*)@(-?\d+(?:\.\d+)?)C\b")
_TS_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?\b")
_TS_TOTAL_RAILS = ("VDD_IN", "POM_5V_IN")
_TS_GPU_RAILS = ("VDD_GPU_SOC", "VDD_SYS_GPU", "POM_5V_GPU", "VDD_GPU")


def parse_tegrastats(line: str) -> dict[str, Any]:
    """One ``tegrastats`` line (Orin, Xavier, Nano/TX formats) -> dict of the values found."""
    out: dict[str, Any] = {
        "ram_used_mb": None, "ram_total_mb": None, "swap_used_mb": None,
        "swap_total_mb": None, "cpu_loads_pct": [], "gpu_utilization_pct": None,
        "gpu_freq_mhz": None, "emc_utilization_pct": None, "temperatures": {},
        "rails_mw": {}, "power_mw": None, "gpu_power_mw": None,
    }
    found = False
    m = _TS_RAM.search(line)
    if m:
        out["ram_used_mb"], out["ram_total_mb"] = int(m.group(1)), int(m.group(2))
        found = True
    m = _TS_SWAP.search(line)
    if m:
        out["swap_used_mb"], out["swap_total_mb"] = int(m.group(1)), int(m.group(2))
    m = _TS_CPU.search(line)
    if m:
        loads: list[float | None] = []
        for item in m.group(1).split(","):
            item = item.strip()
            pct = re.match(r"(\d+)%", item)
            loads.append(float(pct.group(1)) if pct else None)  # "off" -> None
        out["cpu_loads_pct"] = loads
        found = True
    m = _TS_GR3D.search(line)
    if m:
        out["gpu_utilization_pct"] = float(m.group(1))
        if m.group(2):
            freqs = [int(f) for f in m.group(2).split(",") if f]
            out["gpu_freq_mhz"] = max(freqs) if freqs else None
        found = True
    m = _TS_EMC.search(line)
    if m:
        out["emc_utilization_pct"] = float(m.group(1))
    temps: dict[str, float] = {}
    for name, value in _TS_TEMP.findall(line):
        celsius = float(value)
        if not is_placeholder_temperature(name, celsius):
            temps[name] = celsius
    out["temperatures"] = temps
    rails: dict[str, int] = {}
    for name, current, _average in _TS_RAIL.findall(line):
        if name in ("RAM", "SWAP", "NC"):
            continue
        rails[name] = int(current)
    out["rails_mw"] = rails
    if rails:
        found = True
        total: int | None = None
        for key in _TS_TOTAL_RAILS:
            if key in rails:
                total = rails[key]
                break
        out["power_mw"] = total if total is not None else sum(rails.values())
        for key in _TS_GPU_RAILS:
            if key in rails:
                out["gpu_power_mw"] = rails[key]
                break
    if temps:
        found = True
    if not found:
        raise ValueError(f"not a tegrastats line: {line[:80]!r}")
    return out


_TEGRA_RELEASE = re.compile(
    r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)(?:,\s*GCID:\s*(\d+))?"
    r"(?:,\s*BOARD:\s*([\w.-]+))?(?:,\s*EABI:\s*(\w+))?(?:,\s*DATE:\s*(.+))?")


def parse_nv_tegra_release(text: str) -> dict[str, str | None]:
    """``/etc/nv_tegra_release`` first line -> release, revision, l4t ("35.4.1"), board, date."""
    m = _TEGRA_RELEASE.search(text)
    if not m:
        raise ValueError(f"not an nv_tegra_release header: {text.strip()[:80]!r}")
    release, revision = m.group(1), m.group(2).rstrip(".")
    return {
        "release": release,
        "revision": revision,
        "l4t": f"{release}.{revision}",
        "gcid": m.group(3),
        "board": m.group(4),
        "eabi": m.group(5),
        "date": m.group(6).strip() if m.group(6) else None,
    }


def _first_key(card: dict[str, Any], *names: str) -> Any:
    lowered = {k.lower(): v for k, v in card.items()}
    for name in names:
        if name.lower() in lowered:
            return lowered[name.lower()]
    return None


def _opt_float(value: Any) -> float | None:
    if value is None:
        return None
    text = str(value).strip()
    if _na(text):
        return None
    try:
        return float(text)
    except ValueError:
        return None


def parse_rocm_smi_json(text: str) -> list[dict[str, Any]]:
    """``rocm-smi ... --json`` -> one GPU record per ``cardN`` key (the "system" key is skipped)."""
    doc = json.loads(text)
    if not isinstance(doc, dict):
        raise ValueError("rocm-smi JSON is not an object")
    gpus: list[dict[str, Any]] = []
    cards: list[tuple[int, dict[str, Any]]] = []
    for key, card in doc.items():
        m = re.match(r"card(\d+)$", key)
        if not m or not isinstance(card, dict):
            continue
        cards.append((int(m.group(1)), card))
    for index, card in sorted(cards, key=lambda c: c[0]):
        total_b = _opt_float(_first_key(card, "VRAM Total Memory (B)"))
        used_b = _opt_float(_first_key(card, "VRAM Total Used Memory (B)"))
        temp = _opt_float(_first_key(card, "Temperature (Sensor edge) (C)",
                                     "Temperature (Sensor junction) (C)"))
        if temp is None:
            for k, v in card.items():
                if k.lower().startswith("temperature"):
                    temp = _opt_float(v)
                    if temp is not None:
                        break
        name = (_first_key(card, "Card Series", "Card series", "Device Name", "Card Model",
                           "Card model") or "AMD GPU")
        uuid = _first_key(card, "Unique ID")
        gpus.append({
            "index": index,
            "uuid": None if uuid is None or _na(str(uuid)) else str(uuid),
            "name": str(name),
            "memory_total_mb": total_b / (1024.0 * 1024.0) if total_b is not None else None,
            "memory_used_mb": used_b / (1024.0 * 1024.0) if used_b is not None else None,
            "utilization_pct": _opt_float(_first_key(card, "GPU use (%)")),
            "temperature_c": temp,
            "power_w": _opt_float(_first_key(card, "Average Graphics Package Power (W)",
                                             "Current Socket Graphics Package Power (W)")),
            "driver": _first_key(card, "Driver version"),
            "compute_cap": _first_key(card, "GFX Version"),
            "vendor": "amd",
        })
    if not gpus and doc:
        raise ValueError("rocm-smi JSON has no cardN entries")
    return gpus


def parse_vcgencmd_temp(text: str) -> float:
    """``vcgencmd measure_temp`` output ``temp=48.3'C`` -> 48.3."""
    m = re.search(r"temp=(-?\d+(?:\.\d+)?)\s*'?C", text)
    if not m:
        raise ValueError(f"not a measure_temp output: {text.strip()[:80]!r}")
    return float(m.group(1))


def parse_vcgencmd_throttled(text: str) -> int:
    """``vcgencmd get_throttled`` output ``throttled=0x50000`` -> 0x50000."""
    m = re.search(r"throttled=(0[xX][0-9a-fA-F]+|\d+)\s*$", text.strip())
    if not m:
        raise ValueError(f"not a get_throttled output: {text.strip()[:80]!r}")
    return int(m.group(1), 0)


def parse_nvpmodel_query(text: str) -> str | None:
    """``nvpmodel -q`` output (``NV Power Mode: MAXN`` then the id) -> "MAXN (0)"."""
    m = re.search(r"NV Power Mode:\s*(\S[^\n]*?)\s*$", text, re.MULTILINE)
    if not m:
        return None
    rest = text[m.end():].split()
    return m.group(1) + (f" ({int(rest[0])})" if rest and rest[0].isdigit() else "")


def parse_nvpmodel_status(text: str) -> int | None:
    """``/var/lib/nvpmodel/status`` (``pmode:0002 fmode:quiet``) -> 2."""
    m = re.search(r"pmode:\s*(\d+)", text)
    return int(m.group(1)) if m else None


def parse_nvpmodel_conf(text: str) -> dict[int, str]:
    """``/etc/nvpmodel.conf`` -> mode id -> name (``< POWER_MODEL ID=0 NAME=MAXN >``)."""
    names: dict[int, str] = {}
    for m in re.finditer(r"<\s*POWER_MODEL\s+ID=(\d+)\s+NAME=([^\s>]+)", text):
        names[int(m.group(1))] = m.group(2)
    return names


def throttled_flags(value: int) -> list[str]:
    """Names of the bits set in a get_throttled value."""
    return [name for bit, name in THROTTLED_BITS if value & (1 << bit)]


# --------------------------------------------------------------------------- node access

def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()




def run_command(argv: list[str], timeout: float = COMMAND_TIMEOUT) -> tuple[int, str, str]:
    """Run argv with a timeout; returns (exit status, stdout, stderr). Raises on timeout."""
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=timeout,
                          text=True, errors="replace")
    return proc.returncode, proc.stdout, proc.stderr


def first_line_of(argv: list[str], timeout: float) -> str:
    """Start a command that never ends on its own, return its first line, then kill it."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, universal_newlines=True,
                            errors="replace", start_new_session=True)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
    finally:
        timer.cancel()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: take any helpers too
        except OSError:
            proc.kill()
        proc.wait()
    if not line.strip():
        raise RuntimeError(f"{argv[0]} printed nothing within {timeout:.0f} s")
    return line.strip()


class Probe:
    """Collects one probe document; each section records its own failure."""

    def __init__(self, work_dir: str, root: str = "/", search_path: str | None = None,
                 use_libraries: bool = True) -> None:
        # root and search_path let tests point the probe at a captured board's files and at
        # stand-in commands; on a node they are "/" and $PATH.
        self.work_dir = work_dir
        self.root = root
        self.search_path = search_path
        self.use_libraries = use_libraries
        self.errors: list[str] = []
        self.doc: dict[str, Any] = {"probe_version": PROBE_VERSION, "errors": self.errors}

    def path(self, absolute: str) -> str:
        """Where an absolute node path lives under the probe's root."""
        return os.path.join(self.root, absolute.lstrip("/"))

    def exists(self, absolute: str) -> bool:
        return os.path.exists(self.path(absolute))

    def read(self, absolute: str) -> str:
        return _read_text(self.path(absolute))

    def which(self, name: str) -> str | None:
        """A command's path: $PATH first, then the usual places tools hide outside it."""
        import shutil

        found = shutil.which(name, path=self.search_path)
        if found:
            return found
        if self.search_path is not None:
            return None
        for extra in ("/usr/bin", "/usr/sbin", "/usr/local/bin", "/opt/rocm/bin", "/opt/vc/bin"):
            candidate = os.path.join(extra, name)
            if os.access(candidate, os.X_OK):
                return candidate
        return None

    def section(self, name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # one broken section never stops the others
            self.errors.append(f"{name}: {type(exc).__name__}: {exc}")

    def run(self) -> dict[str, Any]:
        self.section("system", self.system)
        self.section("cpu", self.cpu)
        self.section("load", self.load)
        self.section("memory", self.memory)
        self.section("disk", self.disk)
        self.doc["temperatures"] = []
        self.section("thermal", self.thermal_zones)
        self.section("psutil", self.psutil_temperatures)
        self.doc["gpus"] = []
        self.section("nvidia-smi", self.nvidia)
        self.section("rocm-smi", self.rocm)
        self.doc["jetson"] = None
        self.section("jetson", self.jetson)
        self.doc["pi"] = None
        self.section("raspberry-pi", self.raspberry_pi)
        return self.doc

    # --- sections

    def system(self) -> None:
        uname = platform.uname()
        self.doc["hostname"] = socket.gethostname()
        self.doc["arch"] = uname.machine
        self.doc["kernel"] = uname.release
        self.doc["python"] = platform.python_version()
        os_name = f"{uname.system} {uname.release}"
        for path in ("/etc/os-release", "/usr/lib/os-release"):
            if self.exists(path):
                pretty = parse_os_release(self.read(path)).get("PRETTY_NAME")
                if pretty:
                    os_name = pretty
                break
        self.doc["os"] = os_name

    def cpu(self) -> None:
        info: dict[str, int | None] = {"count": os.cpu_count(), "present": None,
                                       "online": None, "usable": None}
        base = "/sys/devices/system/cpu"
        for key in ("present", "online"):
            path = os.path.join(base, key)
            if self.exists(path):
                info[key] = len(parse_cpu_list(self.read(path)))
        if hasattr(os, "sched_getaffinity"):
            info["usable"] = len(os.sched_getaffinity(0))
        self.doc["cpu"] = info

    def load(self) -> None:
        if self.exists("/proc/loadavg"):
            self.doc["load"] = parse_loadavg(self.read("/proc/loadavg"))
        else:
            self.doc["load"] = list(os.getloadavg())

    def memory(self) -> None:
        self.doc["memory"] = memory_from_meminfo(parse_meminfo(self.read("/proc/meminfo")))

    def disk(self) -> None:
        path = os.path.abspath(os.path.expanduser(self.work_dir))
        while not os.path.exists(path):
            parent = os.path.dirname(path)
            if parent == path:
                break
            path = parent
        st = os.statvfs(path)
        self.doc["disk"] = {"path": path, "total_bytes": st.f_blocks * st.f_frsize,
                            "free_bytes": st.f_bavail * st.f_frsize}

    def _add_temperature(self, name: str, celsius: float | None) -> None:
        if celsius is None:
            return
        self.doc["temperatures"].append({"name": name, "celsius": round(celsius, 2)})

    def thermal_zones(self) -> None:
        def zone_number(path: str) -> int:
            digits = re.sub(r"\D", "", os.path.basename(path))
            return int(digits) if digits else 0

        zones = glob.glob(self.path("/sys/class/thermal/thermal_zone*"))
        for zone in sorted(zones, key=zone_number):
            try:
                name = _read_text(os.path.join(zone, "type")).strip() or os.path.basename(zone)
                celsius = parse_thermal_temp(_read_text(os.path.join(zone, "temp")))
                if celsius is not None and not is_placeholder_temperature(name, celsius):
                    self._add_temperature(name, celsius)
            except (OSError, ValueError):
                continue  # a zone that cannot be read (EINVAL, EAGAIN) is skipped

    def psutil_temperatures(self) -> None:
        if not self.use_libraries:
            return
        try:
            import psutil  # type: ignore
        except ImportError:
            return
        if not hasattr(psutil, "sensors_temperatures"):
            return
        for chip, entries in sorted(psutil.sensors_temperatures().items()):
            for i, entry in enumerate(entries):
                label = entry.label or str(i)
                if entry.current is not None and not is_placeholder_temperature(
                        label, float(entry.current)):
                    self._add_temperature(f"{chip}/{label}", float(entry.current))

    def nvidia(self) -> None:
        exe = self.which("nvidia-smi")
        if exe is None:
            return
        fields = list(NVIDIA_QUERY)
        while True:
            rc, out, err = run_command(
                [exe, "--query-gpu=" + ",".join(fields), "--format=csv,noheader,nounits"])
            if rc == 0:
                try:
                    rows = parse_nvidia_smi_csv(out, fields)
                    break
                except ValueError:
                    if NVIDIA_THROTTLE_FIELD not in fields:
                        raise
                    fields.remove(NVIDIA_THROTTLE_FIELD)  # answered without it: ask again
                    continue
            bad = nvidia_smi_invalid_field(out + "\n" + err)
            if bad is not None and bad in NVIDIA_OPTIONAL_FIELDS and bad in fields:
                fields.remove(bad)  # old driver: ask again without the newer field
                continue
            message = (err.strip() or out.strip()).splitlines()
            first = message[0] if message else "no output"
            raise RuntimeError(f"exit {rc}: {first}")
        for row in rows:
            self.doc["gpus"].append(gpu_from_nvidia_row(row))

    def rocm(self) -> None:
        exe = self.which("rocm-smi")
        if exe is None:
            return
        rc, out, err = run_command([exe, "--showproductname", "--showmeminfo", "vram",
                                    "--showuse", "--showtemp", "--json"])
        if rc != 0 and not out.strip().startswith("{"):
            raise RuntimeError(f"exit {rc}: {err.strip()[:200]}")
        self.doc["gpus"].extend(parse_rocm_smi_json(out))

    def _device_tree(self) -> tuple[str | None, list[str]]:
        model: str | None = None
        compatible: list[str] = []
        if self.exists("/proc/device-tree/model"):
            model = parse_device_tree_string(_read_bytes(self.path("/proc/device-tree/model")))
            model = model or None
        if self.exists("/proc/device-tree/compatible"):
            compatible = parse_device_tree_list(
                _read_bytes(self.path("/proc/device-tree/compatible")))
        return model, compatible

    def jetson(self) -> None:
        model, compatible = self._device_tree()
        has_release = self.exists("/etc/nv_tegra_release")
        tegra = any(c.startswith("nvidia,tegra") or c.startswith("nvidia,p") for c in compatible)
        if not (has_release or tegra or (model and "jetson" in model.lower())):
            return
        info: dict[str, Any] = {"model": model, "compatible": compatible, "l4t_release": None,
                                "tegrastats": None, "jtop": None, "power_mw": None,
                                "gpu_utilization_pct": None, "gpu_power_mw": None,
                                "nvpmodel": None}
        self.doc["jetson"] = info
        self.section("nvpmodel", lambda: info.update(nvpmodel=self._nvpmodel()))
        if has_release:
            self.section("nv_tegra_release", lambda: info.update(
                l4t_release=parse_nv_tegra_release(self.read("/etc/nv_tegra_release"))["l4t"]))
        self.section("jtop", lambda: self._jtop(info))
        if info["jtop"] is None:
            self.section("tegrastats", lambda: self._tegrastats(info))
        self._tegra_gpu(info)

    def _nvpmodel(self) -> str | None:
        """The power mode: the daemon's status file (named from its config), else
        ``nvpmodel -q``; None when neither says."""
        if self.exists(NVPMODEL_STATUS):
            mode = parse_nvpmodel_status(self.read(NVPMODEL_STATUS))
            if mode is not None:
                names = parse_nvpmodel_conf(self.read(NVPMODEL_CONF)) \
                    if self.exists(NVPMODEL_CONF) else {}
                return f"{names[mode]} ({mode})" if mode in names else f"mode {mode}"
        exe = self.which("nvpmodel")
        if exe is None:
            return None
        _rc, out, _err = run_command([exe, "-q"], timeout=NVPMODEL_TIMEOUT)
        return parse_nvpmodel_query(out)

    def _tegrastats(self, info: dict[str, Any]) -> None:
        exe = self.which("tegrastats")
        if exe is None:
            return
        stats = parse_tegrastats(first_line_of([exe, "--interval", "100"], TEGRASTATS_TIMEOUT))
        info["tegrastats"] = stats
        info["power_mw"] = stats["power_mw"]
        info["gpu_power_mw"] = stats["gpu_power_mw"]
        info["gpu_utilization_pct"] = stats["gpu_utilization_pct"]

    def _jtop(self, info: dict[str, Any]) -> None:
        if not self.use_libraries:
            return
        try:
            from jtop import jtop  # type: ignore
        except ImportError:
            return
        result: dict[str, Any] = {}

        def read() -> None:
            try:
                with jtop() as jetson:
                    if jetson.ok():
                        result["stats"] = dict(jetson.stats)
                        result["board"] = jetson.board
                        result["power"] = jetson.power
            except Exception as exc:
                result["error"] = f"{type(exc).__name__}: {exc}"

        worker = threading.Thread(target=read, daemon=True)
        worker.start()
        worker.join(JTOP_TIMEOUT)
        if worker.is_alive():
            raise RuntimeError(f"jtop did not answer within {JTOP_TIMEOUT:.0f} s")
        if "error" in result:
            raise RuntimeError(result["error"])
        if not result:
            return
        stats = result.get("stats") or {}
        power = result.get("power") or {}
        total = power.get("tot") if isinstance(power, dict) else None
        summary: dict[str, Any] = {
            "gpu_utilization_pct": _opt_float(stats.get("GPU")),
            "power_mw": _opt_float(total.get("power")) if isinstance(total, dict) else None,
            "model": None, "l4t": None, "jetpack": None,
        }
        board = result.get("board") or {}
        hardware = board.get("hardware", {}) if isinstance(board, dict) else {}
        if isinstance(hardware, dict):
            summary["model"] = hardware.get("Model")
            summary["l4t"] = hardware.get("L4T")
            summary["jetpack"] = hardware.get("Jetpack")
        info["jtop"] = summary
        info["gpu_utilization_pct"] = summary["gpu_utilization_pct"]
        if summary["power_mw"] is not None:
            info["power_mw"] = int(summary["power_mw"])
        if info["l4t_release"] is None and summary["l4t"]:
            info["l4t_release"] = str(summary["l4t"])

    def _tegra_gpu(self, info: dict[str, Any]) -> None:
        """The integrated GPU: enrich nvidia-smi's "(nvgpu)" row, or add one when it is absent."""
        gpu_temp: float | None = None
        for t in self.doc["temperatures"]:
            if t["name"].lower().startswith("gpu"):
                gpu_temp = t["celsius"]
                break
        stats = info.get("tegrastats") or {}
        if gpu_temp is None:
            for name, value in (stats.get("temperatures") or {}).items():
                if name.lower() == "gpu":
                    gpu_temp = value
        power_w = info["gpu_power_mw"] / 1000.0 if info.get("gpu_power_mw") is not None else None
        tegra = [g for g in self.doc["gpus"] if g["vendor"] == "nvidia-tegra"]
        if not tegra and not any(g["vendor"] == "nvidia" for g in self.doc["gpus"]):
            tegra = [{"index": 0, "uuid": None, "name": "%s iGPU" % (info["model"] or "Tegra"),
                      "memory_total_mb": None, "memory_used_mb": None, "utilization_pct": None,
                      "temperature_c": None, "power_w": None, "driver": None,
                      "compute_cap": None, "vendor": "nvidia-tegra"}]
            self.doc["gpus"].extend(tegra)
        for gpu in tegra:
            if gpu["utilization_pct"] is None:
                gpu["utilization_pct"] = info.get("gpu_utilization_pct")
            if gpu["temperature_c"] is None:
                gpu["temperature_c"] = gpu_temp
            if gpu["power_w"] is None:
                gpu["power_w"] = power_w
            if gpu["driver"] is None and info.get("l4t_release"):
                gpu["driver"] = "L4T " + info["l4t_release"]

    def raspberry_pi(self) -> None:
        model, _compatible = self._device_tree()
        if not model or not model.startswith("Raspberry Pi"):
            return
        info: dict[str, Any] = {"model": model, "temperature_c": None, "throttled": None,
                                "throttled_flags": []}
        self.doc["pi"] = info
        exe = self.which("vcgencmd")
        if exe is None:
            return

        def temp() -> None:
            _rc, out, _err = run_command([exe, "measure_temp"], timeout=2.0)
            info["temperature_c"] = parse_vcgencmd_temp(out)

        def throttled() -> None:
            _rc, out, _err = run_command([exe, "get_throttled"], timeout=2.0)
            value = parse_vcgencmd_throttled(out)
            info["throttled"] = value
            info["throttled_flags"] = throttled_flags(value)

        self.section("vcgencmd measure_temp", temp)
        self.section("vcgencmd get_throttled", throttled)
        if info["temperature_c"] is not None and not any(
                t["name"] == "vcgencmd" for t in self.doc["temperatures"]):
            self._add_temperature("vcgencmd", info["temperature_c"])


def main(argv: list[str]) -> int:
    """Probe this node and print the marked JSON document."""
    work_dir = argv[1] if len(argv) > 1 else "~"
    doc = Probe(work_dir).run()
    sys.stdout.write(BEGIN + json.dumps(doc, sort_keys=True) + END + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    code = main(sys.argv)
    # A jtop client thread stuck on its socket must not keep the process alive.
    if threading.active_count() > 1:
        os._exit(code)
    sys.exit(code)
