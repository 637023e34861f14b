"""The node-side telemetry parsers (pure functions) on fixtures written from the public
formats: /proc, thermal zones, tegrastats of several JetPack releases, INA3221 hwmon and
iio sysfs layouts, nvidia-smi CSV, vcgencmd, nvpmodel."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from infra.remote import telemetry as t

# --------------------------------------------------------------------------- tegrastats

JP4_NANO = ("RAM 1766/3964MB (lfb 197x4MB) SWAP 0/2048MB (cached 0MB) "
            "CPU [24%@1224,15%@1224,13%@1224,10%@1224] EMC_FREQ 0% GR3D_FREQ 0% PLL@21C "
            "CPU@25C PMIC@100C GPU@23.5C AO@33.5C thermal@24.5C POM_5V_IN 2545/2547 "
            "POM_5V_GPU 0/0 POM_5V_CPU 549/529")
JP4_NANO_BUSY = ("RAM 2581/3964MB (lfb 4x2MB) SWAP 0/1982MB (cached 0MB) IRAM 0/252kB(lfb 252kB) "
                 "CPU [43%@1479,38%@1479,off,off] EMC_FREQ 21%@1600 GR3D_FREQ 76%@921 APE 25 "
                 "PLL@37C CPU@40.5C PMIC@100C GPU@38C AO@46C thermal@39.25C POM_5V_IN 6180/5320 "
                 "POM_5V_GPU 2413/1810 POM_5V_CPU 957/875")
JP4_XAVIER = ("RAM 2443/31919MB (lfb 6820x4MB) SWAP 0/15959MB (cached 0MB) "
              "CPU [1%@1190,0%@1190,0%@1190,0%@1190,off,off,off,off] EMC_FREQ 0%@2133 "
              "GR3D_FREQ 0%@1377 APE 150 MTS fg 0% bg 0% AO@33C GPU@33.5C Tdiode@35.75C "
              "PMIC@100C AUX@32.5C CPU@34.5C thermal@33.55C Tboard@33C GPU 0/0 CPU 311/311 "
              "SOC 1249/1249 CV 0/0 VDDRQ 155/155 SYS5V 1134/1134")
JP3_TX1 = ("RAM 3607/3983MB (lfb 47x4MB) SWAP 873/8192MB (cached 281MB) "
           "cpu [17%,11%,65%,0%]@1734 EMC 1%@1600 APE 25 GR3D 39%@76")
JP5_ORIN_NANO = ("04-18-2023 10:27:24 RAM 2101/7620MB (lfb 1x4MB) SWAP 0/3810MB (cached 0MB) "
                 "CPU [2%@729,1%@729,0%@729,1%@729,0%@729,0%@729] EMC_FREQ 0%@2133 "
                 "GR3D_FREQ 0%@[305] VIC_FREQ 729 APE 200 CPU@47.5C soc2@45.875C "
                 "soc0@46.031C gpu@45.781C tj@47.5C soc1@45.5C "
                 "VDD_IN 5000mW/5000mW VDD_CPU_GPU_CV 587mW/587mW VDD_SOC 1369mW/1369mW")
JP5_ORIN_AGX = ("RAM 3322/30536MB (lfb 6065x4MB) SWAP 0/15268MB (cached 0MB) "
                "CPU [1%@729,0%@729,0%@729,0%@729,off,off,off,off,off,off,off,off] "
                "EMC_FREQ 0%@2133 GR3D_FREQ 76%@[1300,1300] VIC_FREQ 729 APE 174 CV0@-256C "
                "CPU@45.562C Tboard@34C SOC2@41.75C Tdiode@35.25C SOC0@42.968C CV1@-256C "
                "GPU@-256C tj@45.562C SOC1@42.031C CV2@-256C VDD_GPU_SOC 2400mW/2400mW "
                "VDD_CPU_CV 400mW/400mW VIN_SYS_5V0 3218mW/3218mW VDDQ_VDD2_1V8AO 503mW/503mW")
JP5_GPU_OFF = ("RAM 2101/7620MB (lfb 1x4MB) SWAP 0/3810MB (cached 0MB) CPU [2%@729,1%@729] "
               "EMC_FREQ 0%@2133 GR3D_FREQ 0% cpu@47.5C VDD_IN 4800mW/4900mW")
JP6_ORIN_NANO = ("11-12-2024 14:02:11 RAM 1985/7620MB (lfb 3x4MB) SWAP 0/3810MB (cached 0MB) "
                 "CPU [3%@1510,2%@1510,1%@1510,4%@1510,off,off] EMC_FREQ 21%@3199 "
                 "GR3D_FREQ 55%@[1020] NVENC off NVDEC off NVJPG off NVJPG1 off VIC off OFA off "
                 "APE 200 cpu@51.218C soc2@49.812C soc0@50.156C gpu@49.75C tj@52C soc1@49.5C "
                 "VDD_IN 7812mW/6001mW VDD_CPU_GPU_CV 2331mW/1214mW VDD_SOC 1890mW/1630mW")


def test_tegrastats_jetpack4_nano_idle() -> None:
    got = t.parse_tegrastats(JP4_NANO)
    assert got["gpu_load_percent"] == 0 and "gpu_mhz" not in got
    assert got["emc_percent"] == 0
    assert got["cpu_mhz"] == [1224, 1224, 1224, 1224]
    assert got["rails_mw"] == {"POM_5V_IN": 2545, "POM_5V_GPU": 0, "POM_5V_CPU": 549}
    assert got["power_mw"] == 2545
    assert got["temps_c"] == {"pll": 21, "cpu": 25, "pmic": 100, "gpu": 23.5, "ao": 33.5,
                              "thermal": 24.5}


def test_tegrastats_jetpack4_nano_busy_with_cores_off() -> None:
    got = t.parse_tegrastats(JP4_NANO_BUSY)
    assert (got["gpu_load_percent"], got["gpu_mhz"]) == (76, 921)
    assert (got["emc_percent"], got["emc_mhz"]) == (21, 1600)
    assert got["cpu_mhz"] == [1479, 1479]
    assert got["power_mw"] == 6180
    assert "RAM" not in got["rails_mw"] and "SWAP" not in got["rails_mw"]
    assert "IRAM" not in got["rails_mw"]


def test_tegrastats_jetpack4_xavier_rails_without_board_input() -> None:
    got = t.parse_tegrastats(JP4_XAVIER)
    assert got["rails_mw"] == {"GPU": 0, "CPU": 311, "SOC": 1249, "CV": 0, "VDDRQ": 155,
                               "SYS5V": 1134}
    assert "power_mw" not in got
    assert (got["gpu_load_percent"], got["gpu_mhz"]) == (0, 1377)
    assert got["temps_c"]["tdiode"] == 35.8


def test_tegrastats_old_lowercase_cpu_and_engine_names() -> None:
    got = t.parse_tegrastats(JP3_TX1)
    assert got["cpu_mhz"] == [1734] * 4
    assert (got["gpu_load_percent"], got["gpu_mhz"]) == (39, 76)
    assert (got["emc_percent"], got["emc_mhz"]) == (1, 1600)
    assert "rails_mw" not in got


def test_tegrastats_jetpack5_orin() -> None:
    nano = t.parse_tegrastats(JP5_ORIN_NANO)
    assert (nano["gpu_load_percent"], nano["gpu_mhz"]) == (0, 305)
    assert nano["rails_mw"] == {"VDD_IN": 5000, "VDD_CPU_GPU_CV": 587, "VDD_SOC": 1369}
    assert nano["power_mw"] == 5000
    assert nano["temps_c"]["tj"] == 47.5 and nano["temps_c"]["gpu"] == 45.8
    agx = t.parse_tegrastats(JP5_ORIN_AGX)
    assert (agx["gpu_load_percent"], agx["gpu_mhz"]) == (76, 1300)
    assert len(agx["cpu_mhz"]) == 4
    assert "cv0" not in agx["temps_c"] and "gpu" not in agx["temps_c"]  # -256C: sensor off
    assert agx["rails_mw"]["VIN_SYS_5V0"] == 3218 and "power_mw" not in agx
    off = t.parse_tegrastats(JP5_GPU_OFF)
    assert off["gpu_load_percent"] == 0 and "gpu_mhz" not in off
    assert off["power_mw"] == 4800


def test_tegrastats_jetpack6() -> None:
    got = t.parse_tegrastats(JP6_ORIN_NANO)
    assert (got["gpu_load_percent"], got["gpu_mhz"]) == (55, 1020)
    assert (got["emc_percent"], got["emc_mhz"]) == (21, 3199)
    assert got["cpu_mhz"] == [1510] * 4
    assert got["rails_mw"] == {"VDD_IN": 7812, "VDD_CPU_GPU_CV": 2331, "VDD_SOC": 1890}
    assert got["power_mw"] == 7812
    assert got["temps_c"] == {"cpu": 51.2, "soc2": 49.8, "soc0": 50.2, "gpu": 49.8, "tj": 52,
                              "soc1": 49.5}


@pytest.mark.parametrize("line", ["", "garbage", "tegrastats: command not found\n", "RAM x/yMB"])
def test_tegrastats_junk_is_empty(line: str) -> None:
    assert t.parse_tegrastats(line) == {}


# --------------------------------------------------------------------------- nvidia-smi

def test_nvidia_smi_full_line() -> None:
    line = "0, 97, 1234, 81559, 312.45, 61, 1980, 2619, GPU-1a2b3c4d-0000-1111-2222-333344445555"
    assert t.parse_nvidia_smi_line(line) == {
        "index": "0", "util_percent": 97, "mem_used_mb": 1234, "mem_total_mb": 81559,
        "power_w": 312.4, "temp_c": 61, "sm_clock_mhz": 1980, "mem_clock_mhz": 2619,
        "uuid": "GPU-1a2b3c4d-0000-1111-2222-333344445555"}


def test_nvidia_smi_unsupported_fields_are_left_out() -> None:
    line = "1, [N/A], 512, 16384, [Not Supported], 45, [N/A], N/A, [N/A]\n"
    assert t.parse_nvidia_smi_line(line) == {"index": "1", "mem_used_mb": 512,
                                             "mem_total_mb": 16384, "temp_c": 45}


def test_nvidia_smi_without_uuid_column() -> None:
    got = t.parse_nvidia_smi_line("2, 0, 0, 24576, 21.07, 30, 210, 405")
    assert got is not None and got["power_w"] == 21.1 and "uuid" not in got


@pytest.mark.parametrize("line", [
    "", "\n", "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.",
    "index, utilization.gpu [%], memory.used [MiB]", "0, 1, 2"])
def test_nvidia_smi_non_rows(line: str) -> None:
    assert t.parse_nvidia_smi_line(line) is None


# --------------------------------------------------------------------------- vcgencmd, nvpmodel

def test_vcgencmd() -> None:
    assert t.parse_vcgencmd_temp("temp=52.1'C\n") == 52.1
    assert t.parse_vcgencmd_temp("VCHI initialization failed") is None
    assert t.parse_vcgencmd_throttled("throttled=0x50000\n") == "0x50000"
    assert t.parse_vcgencmd_throttled("throttled=0x0") == "0x0"
    assert t.parse_vcgencmd_throttled("") is None
    assert t.parse_vcgencmd_clock("frequency(48)=1500398464\n") == 1500
    assert t.parse_vcgencmd_clock("frequency(0)=2400000000") == 2400
    assert t.parse_vcgencmd_clock("error=2 error_msg=\"Invalid arguments\"") is None


def test_nvpmodel() -> None:
    assert t.parse_nvpmodel_query("NV Power Mode: MAXN\n0\n") == "MAXN"
    assert t.parse_nvpmodel_query("NV Power Mode: 15W\n2\n") == "15W"
    assert t.parse_nvpmodel_query("NVPM ERROR: failed to read") is None
    assert t.parse_nvpmodel_status("pmode:0002 fmode:quiet\n") == "2"
    assert t.parse_nvpmodel_status("") is None


# --------------------------------------------------------------------------- /proc

STAT_LINE = ("12345 (python3 (x) y) R 678 12345 12345 0 -1 4194304 1000 0 0 0 "
             "250 50 7 3 20 0 1 0 987654 123456789 3000 18446744073709551615 0 0 0 0 0 0 0 "
             "0 0 0 0 0 0 17 1 0 0 0 0 0")


def test_cpu_times_from_stat_handles_parens_in_the_name() -> None:
    assert t.cpu_times_from_stat(STAT_LINE) == (678, 300, 10, 987654, 0)
    zombie = STAT_LINE.replace(") R ", ") Z ")
    assert t.cpu_times_from_stat(zombie) == (678, 300, 10, 987654, 1)
    assert t.cpu_times_from_stat("") is None
    assert t.cpu_times_from_stat("1 (x) S 0") is None


def test_tree_delta_counts_reaped_children_once() -> None:
    """{(pid, start): (own + reaped ticks, ppid)}: new processes count whole; a child reaped
    by its parent in the tree moves into the parent's cutime and is not counted twice."""
    prev = {(10, 1): (100, 1), (11, 5): (40, 10), (12, 6): (7, 1)}
    now = {(10, 1): (100 + 5 + 40 + 3, 1),   # 5 own, reaped 11 (40 + 3 since prev)
           (13, 9): (20, 10)}                 # new; 12 (parent 1: the supervisor) ended
    assert t.tree_delta(prev, now) == 5 + 3 + 20
    assert t.tree_delta(now, now) == 0
    assert t.tree_delta({(1, 1): (50, 0)}, {(1, 2): (3, 0)}) == 3  # a reused pid is new
    # 10 -> 11 -> 12: 11 reaped 12 and was reaped by 10 within one interval; 10's cutime
    # now holds both whole, of which 30 + 5 were counted before
    chain = {(10, 1): (100, 1), (11, 2): (30, 10), (12, 3): (5, 11)}
    after = {(10, 1): (100 + 1 + (30 + 2) + (5 + 4), 1)}
    assert t.tree_delta(chain, after) == 1 + 2 + 4


def test_statm_and_loadavg() -> None:
    assert t.rss_from_statm("30000 2500 400 10 0 2000 0\n") == 2500
    assert t.rss_from_statm("") is None
    assert t.parse_loadavg("1.02 0.80 0.50 2/345 6789\n") == 1.02


def test_proc_stat_busy_and_total() -> None:
    text = ("cpu  100 5 50 800 40 1 2 3 7 0\ncpu0 50 2 25 400 20 1 1 2 0 0\n"
            "intr 1 2 3\nctxt 99\n")
    busy, total = t.parse_proc_stat(text)  # type: ignore[misc]
    assert total == 100 + 5 + 50 + 800 + 40 + 1 + 2 + 3  # guest is inside user
    assert busy == total - 800 - 40
    assert t.parse_proc_stat("intr 1\n") is None


def test_meminfo() -> None:
    text = ("MemTotal:        8000000 kB\nMemFree:          100000 kB\n"
            "MemAvailable:    6000000 kB\nBuffers:           10000 kB\nCached:  500000 kB\n")
    assert t.parse_meminfo(text) == {"mem_total_bytes": 8000000 * 1024,
                                     "mem_used_bytes": 2000000 * 1024}
    old = "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 50 kB\nCached: 250 kB\n"
    assert t.parse_meminfo(old)["mem_used_bytes"] == 600 * 1024
    assert t.parse_meminfo("") == {}


# --------------------------------------------------------------------------- sysfs trees

def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_thermal_zones(tmp_path: Path) -> None:
    base = tmp_path / "thermal"
    for n, (kind, temp) in enumerate([("cpu-thermal", "48312\n"), ("gpu-thermal", "45000\n"),
                                      ("acpitz", "27800\n"), ("acpitz", "29800\n"),
                                      ("cv0-thermal", "-256000\n"), ("broken", "junk")]):
        write(base / f"thermal_zone{n}" / "type", kind + "\n")
        write(base / f"thermal_zone{n}" / "temp", temp)
    (base / "cooling_device0").mkdir()
    assert t.read_thermal_zones(str(base)) == {"cpu-thermal": 48.3, "gpu-thermal": 45.0,
                                               "acpitz": 27.8, "acpitz.2": 29.8}
    assert t.read_thermal_zones(str(tmp_path / "missing")) == {}


def test_ina3221_hwmon_jetpack5(tmp_path: Path) -> None:
    d = tmp_path / "hwmon3"
    for n, label, mv, ma in [(1, "VDD_IN", "5072", "1540"), (2, "VDD_CPU_GPU_CV", "5064", "460"),
                             (3, "VDD_SOC", "5064", "270")]:
        write(d / f"in{n}_label", label + "\n")
        write(d / f"in{n}_input", mv + "\n")
        write(d / f"curr{n}_input", ma + "\n")
    write(d / "in7_label", "sum of shunt voltages\n")  # no current: not a rail
    write(d / "in7_input", "12\n")
    write(d / "name", "ina3221\n")
    rails = t.read_ina3221_hwmon(str(d))
    assert rails == {"VDD_IN": 7811, "VDD_CPU_GPU_CV": 2329, "VDD_SOC": 1367}
    assert t.board_input(rails) == 7811


def test_ina3221_iio_jetpack4(tmp_path: Path) -> None:
    d = tmp_path / "iio:device0"
    for n, name, mw in [(0, "POM_5V_IN", "2545"), (1, "POM_5V_GPU", "0"),
                        (2, "POM_5V_CPU", "549")]:
        write(d / f"rail_name_{n}", name + "\n")
        write(d / f"in_power{n}_input", mw + "\n")
    write(d / "rail_name_3", "VDD_X\n")  # no power file: from voltage x current
    write(d / "in_voltage3_input", "1000\n")
    write(d / "in_current3_input", "250\n")
    assert t.read_ina3221_iio(str(d)) == {"POM_5V_IN": 2545, "POM_5V_GPU": 0, "POM_5V_CPU": 549,
                                          "VDD_X": 250}


def test_jetson_sysfs_reader_on_a_fake_tree(tmp_path: Path) -> None:
    """JetPack 6 Orin layout: GPU load per mille, devfreq clock in Hz, INA3221 via hwmon."""
    sysfs = tmp_path / "sys"
    write(sysfs / "devices/platform/bus@0/17000000.gpu/load", "763\n")
    write(sysfs / "class/devfreq/17000000.gpu/cur_freq", "1020000000\n")
    write(sysfs / "class/devfreq/15340000.vic/cur_freq", "729000000\n")
    hw = sysfs / "bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1"
    write(hw / "in1_label", "VDD_IN\n")
    write(hw / "in1_input", "5000\n")
    write(hw / "curr1_input", "1000\n")
    reader = t.JetsonSysfs(str(sysfs))
    got = reader.fields()
    assert got == {"gpu_load_percent": 76.3, "gpu_mhz": 1020, "rails_mw": {"VDD_IN": 5000},
                   "power_mw": 5000}


def test_jetson_sysfs_reader_jetpack4_layout(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    write(sysfs / "devices/gpu.0/load", "0\n")
    iio = sysfs / "bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    write(iio / "rail_name_0", "POM_5V_IN\n")
    write(iio / "in_power0_input", "3000\n")
    got = t.JetsonSysfs(str(sysfs)).fields()
    assert got == {"gpu_load_percent": 0, "rails_mw": {"POM_5V_IN": 3000}, "power_mw": 3000}


# --------------------------------------------------------------------------- request

def test_interval_and_gpus_from_the_request() -> None:
    assert t.interval_of({}) == 0
    assert t.interval_of({"telemetry": {"interval": 0}}) == 0
    assert t.interval_of({"telemetry": {"interval": "x"}}) == 0
    assert t.interval_of({"telemetry": {"interval": 0.01}}) == t.MIN_INTERVAL
    assert t.interval_of({"telemetry": {"interval": 2}}) == 2
    assert t.allocated_gpus({"gpu_ids": [0, "1"]}) == ["0", "1"]
    assert t.allocated_gpus({"allocation": {"gpu_ids": ["2"]}}) == ["2"]
    assert t.allocated_gpus({"env": {"CUDA_VISIBLE_DEVICES": "3,4"}}) == ["3", "4"]
    assert t.allocated_gpus({}) == []


# --------------------------------------------------------------------------- a full disk

def test_full_disk_skips_samples_and_leaves_no_partial_line(tmp_path: Path) -> None:
    """On a real, full tmpfs the sampler's writes fail or fall short: the sample is skipped,
    nothing half-written stays, and sampling resumes once there is room again."""
    from tests.tmpfs import small_tmpfs

    with small_tmpfs(tmp_path / "disk", size="64k") as disk:
        sampler = t.Sampler(str(disk), {}, interval=1.0)
        sampler.write(sampler.sample())
        assert sampler.samples == 1
        filler = disk / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:  # fill every block the file system has left
            while os.write(fd, b"x" * 512) > 0:
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        for _ in range(200):  # the file's last page still has room for a few lines
            sampler.write(sampler.sample())
            if sampler.skipped:
                break
        for _ in range(3):  # still full: each sample is skipped, none is half written
            sampler.write(sampler.sample())
        assert sampler.skipped >= 4 and sampler.errors == 0
        filler.unlink()
        sampler.write(sampler.sample())
        sampler.stop()
        text = (disk / t.FILE_NAME).read_text()
        assert text.endswith("\n")
        lines = text.splitlines()
        assert len(lines) == sampler.samples >= 2
        assert all(isinstance(json.loads(line)["t"], float) for line in lines)
