"""The shared telemetry decoder, home-file reader and summaries (pure)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infra.telemetry.files import read_samples, telemetry_path
from infra.telemetry.sample import Sample, parse_line
from infra.telemetry.summary import summarize

FULL = {
    "t": 100.0, "cpu_percent": 99.5, "rss_bytes": 1000, "procs": 2,
    "node": {"cpu_percent": 50.0, "mem_used_bytes": 10, "mem_total_bytes": 20, "load1": 1.5,
             "temps_c": {"cpu-thermal": 48.5, "bad": "hot"}},
    "gpus": [{"index": "0", "util_percent": 90, "mem_used_mb": 100, "power_w": 200.0,
              "temp_c": 70},
             {"index": "1", "util_percent": 30, "mem_used_mb": 50, "power_w": 100.0}],
    "jetson": {"gpu_load_percent": 12.0, "cpu_mhz": [1500, "x", 1400],
               "rails_mw": {"VDD_IN": 7000}, "temps_c": {"tj": 55.0}, "nvpmodel": "MAXN"},
    "pi": {"temp_c": 51.0, "throttled": "0x50005", "arm_mhz": 2400},
}


def test_full_sample_decodes_every_board_field() -> None:
    s = parse_line(json.dumps(FULL))
    assert s is not None
    assert (s.t, s.cpu_percent, s.rss_bytes, s.procs) == (100.0, 99.5, 1000.0, 2)
    assert s.temps_c == (("cpu-thermal", 48.5),)  # the non-number is dropped
    assert [g.index for g in s.gpus] == ["0", "1"]
    assert s.jetson is not None and s.jetson.cpu_mhz == (1500.0, 1400.0)
    assert s.jetson.nvpmodel == "MAXN"
    assert s.pi is not None and s.pi.throttled_now is True
    assert s.max_temp_c == 70.0
    assert s.power_w == 7.0  # the Jetson board input wins over the GPUs' sum
    assert s.gpu_util_percent == 90.0
    assert s.gpu_mem_mb == 150.0


def test_gpu_power_is_summed_without_a_board_input() -> None:
    doc = dict(FULL)
    doc.pop("jetson")
    s = Sample.of(doc)
    assert s is not None and s.power_w == 300.0


@pytest.mark.parametrize("line", ["", "{", "[1, 2]", '{"cpu_percent": 3}', '{"t": "now"}',
                                  '{"t": NaN}', '{"t": true}', b"\xff\xfe"])
def test_bad_lines_are_skipped_not_raised(line: str | bytes) -> None:
    assert parse_line(line) is None


def test_read_samples_skips_a_torn_last_line_and_keeps_the_last_n(tmp_path: Path) -> None:
    path = telemetry_path(tmp_path, "r1", "a")
    assert path == tmp_path / "r1" / "a.telemetry.jsonl"
    path.parent.mkdir()
    lines = [json.dumps({"t": float(i), "cpu_percent": float(i)}) for i in range(5)]
    path.write_text("\n".join(lines) + '\n{"t": 9')
    assert [s.t for s in read_samples(path)] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [s.t for s in read_samples(path, limit=2)] == [3.0, 4.0]
    assert read_samples(tmp_path / "missing.jsonl") == []


def test_summary_means_peaks_and_energy() -> None:
    samples = [Sample(t=10.0, cpu_percent=100.0, rss_bytes=5.0),
               Sample(t=11.0, cpu_percent=50.0, rss_bytes=9.0),
               Sample(t=12.0, cpu_percent=None, rss_bytes=7.0)]
    s = summarize(list(reversed(samples)))  # order does not matter
    assert (s.samples, s.duration_s, s.cpu_mean, s.cpu_max, s.rss_max_bytes) == \
        (3, 2.0, 75.0, 100.0, 9.0)
    assert s.energy_j is None and s.power_mean_w is None
    metrics = s.as_metrics()
    assert metrics["telemetry.cpu_percent.mean"] == 75.0
    assert "telemetry.energy_j" not in metrics


def test_energy_integrates_power_over_time() -> None:
    doc = {"gpus": [{"index": "0", "power_w": 100.0}]}
    samples = [Sample.of({"t": 0.0, **doc}), Sample.of({"t": 2.0, **doc}),
               Sample.of({"t": 3.0, "gpus": [{"index": "0", "power_w": 300.0}]})]
    s = summarize([x for x in samples if x is not None])
    assert s.energy_j == pytest.approx(100.0 * 2 + 200.0 * 1)
    assert s.power_mean_w == pytest.approx(500.0 / 3)


def test_empty_summary() -> None:
    s = summarize([])
    assert (s.samples, s.duration_s) == (0, 0.0)
    assert s.as_metrics() == {"telemetry.samples": 0.0, "telemetry.duration_s": 0.0}
