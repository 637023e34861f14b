"""Table-driven tests for every pure parser of the node probe, on captured-format fixtures.

Also runs the whole probe against fabricated board roots (Jetson, Raspberry Pi, an x86 GPU
host) with stand-in ``nvidia-smi`` / ``tegrastats`` / ``vcgencmd`` executables, so the
section wiring, the compute_cap retry and the tegrastats kill are exercised for real.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import infra.remote.probe as probe
from infra.transport import marker

FIXTURES = Path(__file__).parent / "fixtures" / "probe"
PROBE_PATH = Path(probe.__file__)
KIB = 1024


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


# --------------------------------------------------------------------------- meminfo

@pytest.mark.parametrize(("name", "total_kb", "available_kb", "nvmap_kb"), [
    ("meminfo_jetson_orin.txt", 64308708, 58901332, 1805068),
    ("meminfo_pi5.txt", 8245568, 7580160, None),
])
def test_meminfo_fixtures(name: str, total_kb: int, available_kb: int,
                          nvmap_kb: int | None) -> None:
    info = probe.parse_meminfo(fixture(name))
    mem = probe.memory_from_meminfo(info)
    assert mem["total_bytes"] == total_kb * KIB
    assert mem["available_bytes"] == available_kb * KIB
    assert mem["nvmap_used_bytes"] == (None if nvmap_kb is None else nvmap_kb * KIB)
    assert info["HugePages_Total"] == 0  # unitless counts stay counts


def test_meminfo_old_kernel_estimates_available() -> None:
    mem = probe.memory_from_meminfo(probe.parse_meminfo(fixture("meminfo_old_kernel.txt")))
    # MemFree + Buffers + Cached + SReclaimable - Shmem
    assert mem["available_bytes"] == (1210144 + 120344 + 1603776 + 88000 - 12000) * KIB


@pytest.mark.parametrize("text", ["", "garbage\nno colons here\n", "MemTotal: lots kB\n"])
def test_meminfo_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        probe.parse_meminfo(text)


def test_meminfo_without_total_is_rejected() -> None:
    with pytest.raises(ValueError, match="MemTotal"):
        probe.memory_from_meminfo(probe.parse_meminfo("MemFree: 10 kB\n"))


# --------------------------------------------------------------------------- small files

@pytest.mark.parametrize(("text", "expected"), [
    ("0-3,5", [0, 1, 2, 3, 5]),
    ("0-1\n", [0, 1]),
    ("7", [7]),
    ("0,2-3,2", [0, 2, 3]),
    ("", []),
    ("\n", []),
])
def test_cpu_list(text: str, expected: list[int]) -> None:
    assert probe.parse_cpu_list(text) == expected


@pytest.mark.parametrize("text", ["a-b", "3-1", "0,,1", "-1", "1-", "x"])
def test_cpu_list_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        probe.parse_cpu_list(text)


@pytest.mark.parametrize(("text", "expected"), [
    ("0.52 0.58 0.59 1/467 12345\n", [0.52, 0.58, 0.59]),
    ("3.00 2.50 1.25", [3.0, 2.5, 1.25]),
])
def test_loadavg(text: str, expected: list[float]) -> None:
    assert probe.parse_loadavg(text) == expected


@pytest.mark.parametrize("text", ["", "0.5 0.4", "a b c"])
def test_loadavg_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        probe.parse_loadavg(text)


def test_os_release() -> None:
    info = probe.parse_os_release(fixture("os_release_ubuntu.txt"))
    assert info["PRETTY_NAME"] == "Ubuntu 22.04.4 LTS"
    assert info["ID"] == "ubuntu"
    assert probe.parse_os_release("garbage without equals\n") == {}


@pytest.mark.parametrize(("text", "expected"), [
    ("45500\n", 45.5),
    ("-256000\n", None),  # Orin: sensor powered down
    ("0", 0.0),
])
def test_thermal_temp(text: str, expected: float | None) -> None:
    assert probe.parse_thermal_temp(text) == expected


@pytest.mark.parametrize("text", ["", "hot", "45.5.1"])
def test_thermal_temp_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        probe.parse_thermal_temp(text)


@pytest.mark.parametrize(("name", "celsius", "placeholder"), [
    ("PMIC-Die", 100.0, True),
    ("PMIC", 100.0, True),
    ("PMIC-Die", 120.0, False),  # a tripped threshold is real news
    ("CV0", -256.0, True),
    ("cpu-thermal", 100.0, False),
    ("tj", 44.3, False),
])
def test_placeholder_temperatures(name: str, celsius: float, placeholder: bool) -> None:
    assert probe.is_placeholder_temperature(name, celsius) is placeholder


def test_device_tree_properties() -> None:
    model = (FIXTURES / "dt_model_jetson_orin.bin").read_bytes()
    compatible = (FIXTURES / "dt_compatible_jetson_orin.bin").read_bytes()
    assert probe.parse_device_tree_string(model) == "NVIDIA Jetson AGX Orin Developer Kit"
    assert probe.parse_device_tree_list(compatible) == [
        "nvidia,p3737-0000+p3701-0005", "nvidia,p3701-0005", "nvidia,tegra234"]
    assert probe.parse_device_tree_string(b"") == ""
    assert probe.parse_device_tree_list(b"\x00\x00") == []


# --------------------------------------------------------------------------- nvidia-smi

FIELDS = list(probe.NVIDIA_FIELDS)
FIELDS_OLD = [f for f in FIELDS if f != "compute_cap"]


def test_nvidia_smi_two_gpus() -> None:
    rows = probe.parse_nvidia_smi_csv(fixture("nvidia_smi_two_gpus.csv"), FIELDS)
    gpus = [probe.gpu_from_nvidia_row(r) for r in rows]
    assert [g["index"] for g in gpus] == [0, 1]
    first, second = gpus
    assert first["name"] == "NVIDIA GeForce RTX 3090"
    assert first["uuid"].startswith("GPU-5a1c")
    assert first["memory_total_mb"] == 24576.0
    assert first["memory_used_mb"] == 1432.0
    assert first["utilization_pct"] == 37.0
    assert first["temperature_c"] == 61.0
    assert first["power_w"] == 112.48
    assert first["driver"] == "535.129.03"
    assert first["compute_cap"] == "8.6"
    assert first["vendor"] == "nvidia"
    assert second["power_w"] is None  # "[N/A]"


def test_nvidia_smi_not_supported_values_without_compute_cap() -> None:
    rows = probe.parse_nvidia_smi_csv(fixture("nvidia_smi_not_supported.csv"), FIELDS_OLD)
    gpu = probe.gpu_from_nvidia_row(rows[0])
    assert gpu["utilization_pct"] is None and gpu["power_w"] is None
    assert gpu["temperature_c"] == 44.0
    assert gpu["compute_cap"] is None


def test_nvidia_smi_jetson_orin_row_is_tegra() -> None:
    rows = probe.parse_nvidia_smi_csv(fixture("nvidia_smi_jetson_orin_jp6.csv"), FIELDS)
    gpu = probe.gpu_from_nvidia_row(rows[0])
    assert gpu["vendor"] == "nvidia-tegra"
    assert gpu["uuid"] is None and gpu["memory_total_mb"] is None
    assert gpu["compute_cap"] == "8.7"


@pytest.mark.parametrize(("text", "fields"), [
    ("0, GPU-x, name\n", FIELDS),                       # too few values
    ("zero, GPU-x, n, 1, 1, 1, 1, 1, d, 8.6\n", FIELDS),  # index not a number
    ("0, GPU-x, n, lots, 1, 1, 1, 1, d, 8.6\n", FIELDS),  # memory not a number
])
def test_nvidia_smi_malformed(text: str, fields: list[str]) -> None:
    with pytest.raises(ValueError):
        probe.parse_nvidia_smi_csv(text, fields)


def test_nvidia_smi_empty_output_means_no_gpus() -> None:
    assert probe.parse_nvidia_smi_csv("\n", FIELDS) == []


@pytest.mark.parametrize(("name", "expected"), [
    ("nvidia_smi_invalid_field.txt", "compute_cap"),
    ("nvidia_smi_no_driver.txt", None),
    ("nvidia_smi_two_gpus.csv", None),
])
def test_nvidia_smi_invalid_field(name: str, expected: str | None) -> None:
    assert probe.nvidia_smi_invalid_field(fixture(name)) == expected


# --------------------------------------------------------------------------- tegrastats

def test_tegrastats_orin_agx() -> None:
    ts = probe.parse_tegrastats(fixture("tegrastats_orin_agx_jp5.txt").strip())
    assert (ts["ram_used_mb"], ts["ram_total_mb"]) == (4321, 62801)
    assert (ts["swap_used_mb"], ts["swap_total_mb"]) == (19, 31400)
    assert len(ts["cpu_loads_pct"]) == 12
    assert ts["cpu_loads_pct"][4] == 12.0 and ts["cpu_loads_pct"][-1] is None  # "off"
    assert ts["gpu_utilization_pct"] == 17.0
    assert ts["gpu_freq_mhz"] == 305
    assert ts["emc_utilization_pct"] == 0.0
    assert ts["temperatures"]["tj"] == 44.343
    assert ts["temperatures"]["GPU"] == 39.5
    assert "CV0" not in ts["temperatures"]  # -256C: powered down
    assert ts["rails_mw"]["VDD_GPU_SOC"] == 2340
    assert "NC" not in ts["rails_mw"]
    assert ts["gpu_power_mw"] == 2340
    assert ts["power_mw"] == 2340 + 390 + 4025 + 301  # no VDD_IN: sum of the rails


def test_tegrastats_orin_nano_jp6() -> None:
    ts = probe.parse_tegrastats(fixture("tegrastats_orin_nano_jp6.txt").strip())
    assert (ts["ram_used_mb"], ts["ram_total_mb"]) == (1234, 30536)
    assert ts["gpu_utilization_pct"] == 0.0 and ts["gpu_freq_mhz"] is None
    assert ts["temperatures"]["cpu"] == 45.5
    assert ts["power_mw"] == 4551  # VDD_IN is the module's input
    assert ts["rails_mw"]["VDD_SOC"] == 1234
    assert ts["gpu_power_mw"] is None


def test_tegrastats_tx2_old_format_without_mw() -> None:
    ts = probe.parse_tegrastats(fixture("tegrastats_tx2_jp4.txt").strip())
    assert ts["swap_total_mb"] is None
    assert ts["power_mw"] == 3140
    assert ts["gpu_power_mw"] == 153
    assert "PMIC" not in ts["temperatures"]  # fixed 100C placeholder
    assert ts["temperatures"]["GPU"] == 41.0


def test_tegrastats_nano_pom_rails() -> None:
    ts = probe.parse_tegrastats(fixture("tegrastats_nano_jp4.txt").strip())
    assert ts["cpu_loads_pct"] == [7.0, 3.0, None, None]
    assert ts["gpu_freq_mhz"] == 76
    assert ts["power_mw"] == 2643
    assert ts["gpu_power_mw"] == 0


@pytest.mark.parametrize("line", ["", "hello world", "RAM lots", "Error: no permission"])
def test_tegrastats_malformed(line: str) -> None:
    with pytest.raises(ValueError):
        probe.parse_tegrastats(line)


# --------------------------------------------------------------------------- nv_tegra_release

@pytest.mark.parametrize(("name", "l4t", "board"), [
    ("nv_tegra_release_r35.txt", "35.4.1", "t186ref"),
    ("nv_tegra_release_r32.txt", "32.7.1", "t210ref"),
    ("nv_tegra_release_r36.txt", "36.4.0", "generic"),
])
def test_nv_tegra_release(name: str, l4t: str, board: str) -> None:
    info = probe.parse_nv_tegra_release(fixture(name))
    assert info["l4t"] == l4t
    assert info["board"] == board
    assert info["eabi"] == "aarch64"
    assert info["date"] is not None and "UTC" in info["date"]


def test_nv_tegra_release_minimal_header() -> None:
    info = probe.parse_nv_tegra_release("# R35 (release), REVISION: 5.0, GCID: 35550185\n")
    assert info["l4t"] == "35.5.0" and info["board"] is None


@pytest.mark.parametrize("text", ["", "R35", "# R35 (release)", "TARGET_USERSPACE_LIB_DIR=nvidia"])
def test_nv_tegra_release_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        probe.parse_nv_tegra_release(text)


# --------------------------------------------------------------------------- rocm-smi

def test_rocm_smi_two_cards() -> None:
    gpus = probe.parse_rocm_smi_json(fixture("rocm_smi_two_cards.json"))
    assert [g["index"] for g in gpus] == [0, 1]
    first, second = gpus
    assert first["name"].startswith("Navi 21")
    assert first["memory_total_mb"] == pytest.approx(17163091968 / 2**20)
    assert first["memory_used_mb"] == pytest.approx(692142080 / 2**20)
    assert first["utilization_pct"] == 12.0
    assert first["temperature_c"] == 41.0  # edge sensor preferred
    assert first["compute_cap"] == "gfx1030"
    assert first["vendor"] == "amd"
    assert second["temperature_c"] is None  # "N/A"


def test_rocm_smi_apu() -> None:
    (gpu,) = probe.parse_rocm_smi_json(fixture("rocm_smi_apu.json"))
    assert gpu["name"] == "Phoenix3"
    assert gpu["uuid"] is None
    assert gpu["power_w"] == pytest.approx(7.222)
    assert gpu["utilization_pct"] == 19.0


@pytest.mark.parametrize("text", ["", "not json", "[1, 2]", '{"system": {"x": 1}}'])
def test_rocm_smi_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        probe.parse_rocm_smi_json(text)


def test_rocm_smi_empty_object_means_no_gpus() -> None:
    assert probe.parse_rocm_smi_json("{}") == []


# --------------------------------------------------------------------------- vcgencmd

@pytest.mark.parametrize(("text", "expected"), [
    (fixture("vcgencmd_measure_temp.txt"), 48.3),
    ("temp=61.0'C", 61.0),
    ("temp=-3.5'C\n", -3.5),
])
def test_vcgencmd_temp(text: str, expected: float) -> None:
    assert probe.parse_vcgencmd_temp(text) == expected


@pytest.mark.parametrize("text", ["", "VCHI initialization failed", "temp=hot'C"])
def test_vcgencmd_temp_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        probe.parse_vcgencmd_temp(text)


@pytest.mark.parametrize(("text", "value", "flags"), [
    (fixture("vcgencmd_get_throttled.txt"), 0x50000,
     ["under_voltage_occurred", "throttling_occurred"]),
    ("throttled=0x0\n", 0, []),
    ("throttled=0x50005", 0x50005,
     ["under_voltage", "throttled", "under_voltage_occurred", "throttling_occurred"]),
])
def test_vcgencmd_throttled(text: str, value: int, flags: list[str]) -> None:
    parsed = probe.parse_vcgencmd_throttled(text)
    assert parsed == value
    assert probe.throttled_flags(parsed) == flags


@pytest.mark.parametrize("text", ["", "throttled=", "VCHI initialization failed",
                                  "throttled=0xZZ"])
def test_vcgencmd_throttled_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        probe.parse_vcgencmd_throttled(text)


# --------------------------------------------------------------------------- whole probe on fake boards

def _script(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _write(root: Path, rel: str, data: str | bytes) -> None:
    target = root / rel.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        target.write_bytes(data)
    else:
        target.write_text(data)


def _board(tmp_path: Path, meminfo: str) -> tuple[Path, Path]:
    root, bin_dir = tmp_path / "root", tmp_path / "bin"
    bin_dir.mkdir()
    _write(root, "/proc/meminfo", fixture(meminfo))
    _write(root, "/proc/loadavg", "0.50 0.40 0.30 1/100 999\n")
    _write(root, "/sys/devices/system/cpu/present", "0-11\n")
    _write(root, "/sys/devices/system/cpu/online", "0-7\n")
    _write(root, "/etc/os-release", fixture("os_release_ubuntu.txt"))
    return root, bin_dir


def _zone(root: Path, n: int, name: str, millic: int) -> None:
    _write(root, f"/sys/class/thermal/thermal_zone{n}/type", name + "\n")
    _write(root, f"/sys/class/thermal/thermal_zone{n}/temp", f"{millic}\n")


def _run_probe(root: Path, bin_dir: Path, work_dir: Path) -> dict[str, Any]:
    doc = probe.Probe(str(work_dir), root=str(root), search_path=str(bin_dir),
                      use_libraries=False).run()
    json.dumps(doc)  # the document must serialise
    return doc


def test_probe_jetson_board_with_tegrastats(tmp_path: Path) -> None:
    root, bin_dir = _board(tmp_path, "meminfo_jetson_orin.txt")
    _write(root, "/etc/nv_tegra_release", fixture("nv_tegra_release_r35.txt"))
    _write(root, "/proc/device-tree/model", (FIXTURES / "dt_model_jetson_orin.bin").read_bytes())
    _write(root, "/proc/device-tree/compatible",
           (FIXTURES / "dt_compatible_jetson_orin.bin").read_bytes())
    _zone(root, 0, "cpu-thermal", 44562)
    _zone(root, 1, "gpu-thermal", 39500)
    _zone(root, 2, "cv0-thermal", -256000)
    _zone(root, 10, "tj-thermal", 44343)
    _zone(root, 3, "PMIC-Die", 100000)
    line = fixture("tegrastats_orin_agx_jp5.txt").strip()
    # tegrastats never exits on its own: the probe must take one line and kill it.
    _script(bin_dir / "tegrastats", f"while true; do echo '{line}'; sleep 0.05; done\n")
    doc = _run_probe(root, bin_dir, tmp_path / "missing" / "work")

    assert doc["errors"] == []
    assert doc["memory"]["nvmap_used_bytes"] == 1805068 * KIB
    assert doc["cpu"]["present"] == 12 and doc["cpu"]["online"] == 8
    assert doc["os"] == "Ubuntu 22.04.4 LTS"
    assert doc["disk"]["path"] == str(tmp_path)  # nearest existing parent
    names = [t["name"] for t in doc["temperatures"]]
    assert names == ["cpu-thermal", "gpu-thermal", "tj-thermal"]  # numeric zone order
    jetson = doc["jetson"]
    assert jetson["model"] == "NVIDIA Jetson AGX Orin Developer Kit"
    assert jetson["l4t_release"] == "35.4.1"
    assert jetson["power_mw"] == 2340 + 390 + 4025 + 301
    (gpu,) = doc["gpus"]
    assert gpu["vendor"] == "nvidia-tegra"
    assert gpu["utilization_pct"] == 17.0
    assert gpu["temperature_c"] == 39.5
    assert gpu["power_w"] == pytest.approx(2.34)
    assert gpu["driver"] == "L4T 35.4.1"
    assert doc["pi"] is None


def test_probe_jetson_jp6_nvidia_smi_row_is_enriched(tmp_path: Path) -> None:
    root, bin_dir = _board(tmp_path, "meminfo_jetson_orin.txt")
    _write(root, "/etc/nv_tegra_release", fixture("nv_tegra_release_r36.txt"))
    _script(bin_dir / "nvidia-smi", f"cat '{FIXTURES / 'nvidia_smi_jetson_orin_jp6.csv'}'\n")
    line = fixture("tegrastats_orin_nano_jp6.txt").strip()
    _script(bin_dir / "tegrastats", f"echo '{line}'; exec sleep 60\n")
    doc = _run_probe(root, bin_dir, tmp_path)
    assert doc["errors"] == []
    (gpu,) = doc["gpus"]
    assert gpu["name"] == "Orin (nvgpu)" and gpu["vendor"] == "nvidia-tegra"
    assert gpu["driver"] == "540.4.0"  # nvidia-smi's own value wins
    assert gpu["utilization_pct"] == 0.0  # filled from tegrastats
    assert gpu["temperature_c"] == 43.937  # no gpu thermal zone: tegrastats' "gpu@"
    assert doc["jetson"]["power_mw"] == 4551


def test_probe_x86_retries_nvidia_smi_without_compute_cap(tmp_path: Path) -> None:
    root, bin_dir = _board(tmp_path, "meminfo_pi5.txt")
    csv = FIXTURES / "nvidia_smi_not_supported.csv"
    err = FIXTURES / "nvidia_smi_invalid_field.txt"
    # An old driver: rejects compute_cap (exit 2, message on stdout), answers without it.
    _script(bin_dir / "nvidia-smi",
            f'case "$1" in *compute_cap*) cat \'{err}\'; exit 2;; esac\ncat \'{csv}\'\n')
    doc = _run_probe(root, bin_dir, tmp_path)
    assert doc["errors"] == []
    (gpu,) = doc["gpus"]
    assert gpu["name"] == "GeForce GTX 960M" and gpu["compute_cap"] is None
    assert doc["jetson"] is None and doc["pi"] is None


def test_probe_records_a_broken_driver_and_carries_on(tmp_path: Path) -> None:
    root, bin_dir = _board(tmp_path, "meminfo_pi5.txt")
    msg = FIXTURES / "nvidia_smi_no_driver.txt"
    _script(bin_dir / "nvidia-smi", f"cat '{msg}'; exit 9\n")
    _script(bin_dir / "rocm-smi", f"cat '{FIXTURES / 'rocm_smi_two_cards.json'}'\n")
    doc = _run_probe(root, bin_dir, tmp_path)
    assert len(doc["errors"]) == 1
    assert doc["errors"][0].startswith("nvidia-smi: RuntimeError: exit 9: NVIDIA-SMI has failed")
    assert [g["vendor"] for g in doc["gpus"]] == ["amd", "amd"]
    assert doc["memory"]["total_bytes"] == 8245568 * KIB


def test_probe_raspberry_pi(tmp_path: Path) -> None:
    root, bin_dir = _board(tmp_path, "meminfo_pi5.txt")
    _write(root, "/proc/device-tree/model", (FIXTURES / "dt_model_pi5.bin").read_bytes())
    _write(root, "/proc/device-tree/compatible", (FIXTURES / "dt_compatible_pi5.bin").read_bytes())
    _zone(root, 0, "cpu-thermal", 48300)
    _script(bin_dir / "vcgencmd",
            f'case "$1" in measure_temp) cat \'{FIXTURES / "vcgencmd_measure_temp.txt"}\';;\n'
            f'get_throttled) cat \'{FIXTURES / "vcgencmd_get_throttled.txt"}\';; esac\n')
    doc = _run_probe(root, bin_dir, tmp_path)
    assert doc["errors"] == []
    pi = doc["pi"]
    assert pi["model"] == "Raspberry Pi 5 Model B Rev 1.0"
    assert pi["temperature_c"] == 48.3
    assert pi["throttled"] == 0x50000
    assert pi["throttled_flags"] == ["under_voltage_occurred", "throttling_occurred"]
    assert doc["jetson"] is None and doc["gpus"] == []


def test_probe_sections_fail_independently(tmp_path: Path) -> None:
    root, bin_dir = _board(tmp_path, "meminfo_pi5.txt")
    _write(root, "/proc/meminfo", "garbage\n")
    _write(root, "/sys/devices/system/cpu/online", "x-y\n")
    _write(root, "/proc/device-tree/model", (FIXTURES / "dt_model_pi5.bin").read_bytes())
    _script(bin_dir / "vcgencmd", "echo 'VCHI initialization failed'; exit 255\n")
    doc = _run_probe(root, bin_dir, tmp_path)
    sections = sorted(e.split(":")[0] for e in doc["errors"])
    assert sections == ["cpu", "memory", "vcgencmd get_throttled", "vcgencmd measure_temp"]
    assert "memory" not in doc and "cpu" not in doc
    assert doc["disk"]["total_bytes"] > 0 and doc["pi"]["model"].startswith("Raspberry Pi 5")


# --------------------------------------------------------------------------- the script itself

def test_script_parses_as_python_3_8() -> None:
    ast.parse(PROBE_PATH.read_text(), feature_version=(3, 8))


def test_script_imports_only_the_standard_library() -> None:
    tree = ast.parse(PROBE_PATH.read_text())
    top_level = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            top_level.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            top_level.add(node.module.split(".")[0])
    optional = {"psutil", "jtop"}  # imported inside try/except ImportError
    assert top_level - optional <= set(sys.stdlib_module_names)


def test_script_markers_match_the_coordinator() -> None:
    assert (probe.BEGIN, probe.END) == (marker.BEGIN, marker.END)


PY38 = Path(os.path.expanduser("~/.pyenv/versions/3.8.18/bin/python3"))


def _oldest_python() -> str | None:
    for candidate in (str(PY38), "python3.8", "python3.9"):
        found = shutil.which(candidate)
        if found:
            return found
    return None


def test_script_runs_from_stdin_under_the_oldest_python(tmp_path: Path) -> None:
    python = _oldest_python()
    if python is None:
        pytest.skip("no Python 3.8/3.9 interpreter on this machine")
    proc = subprocess.run([python, "-", str(tmp_path)], input=PROBE_PATH.read_text(),
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    doc = marker.extract_json(proc.stdout)
    assert doc["python"].startswith(("3.8", "3.9"))
    assert doc["errors"] == []
    assert doc["memory"]["total_bytes"] > 0
