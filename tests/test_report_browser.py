"""The report of a real run on the built-in local node, opened in headless Chromium
(Debian's ``chromium``, driven by playwright; never a downloaded browser): every chart
renders, the console has no error, nothing is requested but the file itself, and hostile
text from the sweep's parameters and the metrics stays text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.state import Store
from tests.conftest import skip_or_fail

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
EVIL = "</script><img src=x onerror=window.__pwned=1><script>window.__pwned=2</script>"

TASK = textwrap.dedent('''\
    import json, os
    params = json.loads(os.environ["INFRA_PARAMS"])
    print("task", os.environ["INFRA_INSTANCE_ID"], "x", params["x"])
    metrics = {"y": params["x"] * 2, "loss": 1.0 / params["x"], os.environ["EVIL"]: 1}
    with open(os.path.join(os.environ["INFRA_RESULTS_DIR"], "metrics.json"), "w") as f:
        json.dump(metrics, f)
''')


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless, with its background traffic turned off."""
    if not os.access(CHROMIUM, os.X_OK):
        skip_or_fail(f"{CHROMIUM} not installed (scripts/test.sh installs Debian's chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_or_fail("playwright not installed (pip install -e '.[dev]')")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture()
def lab(tmp_path: Path) -> Path:
    """A project with only the local node and a three-task sweep that writes metrics."""
    root = tmp_path / "lab"
    (root / "experiments").mkdir(parents=True)
    (root / "task.py").write_text(TASK)
    (root / "cluster_config.yaml").write_text(yaml.safe_dump({
        "nodes": [{"name": "local", "host": "localhost", "remote_work_dir": ".",
                   "ram_gb": 8.0, "max_instances": 3, "python_path": sys.executable}],
        "failover": {"auto_restart": False}, "deploy": {"source": "."}}))
    (root / "experiments" / "grid.yaml").write_text(yaml.safe_dump({
        "experiment_id": "grid", "command": f"{sys.executable} task.py", "ram_gb": 0.25,
        "recover": "none", "env": {"EVIL": EVIL},
        "sweep": {"grid": {"x": [1, 2, 4], "label": [EVIL]}}}))
    return root


def cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "infra.cli.main", *args], cwd=root,
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ, "COLUMNS": "200"})


def write_telemetry(path: Path, n: int, gpu: bool) -> None:
    """A home telemetry file as the watcher leaves it (the sampler's part is elsewhere)."""
    with path.open("w") as f:
        for k in range(n):
            doc: dict[str, Any] = {"t": 1765000000.0 + k, "cpu_percent": 95.0 + k % 10,
                                   "rss_bytes": (100 + k) << 20, "procs": 2,
                                   "node": {"cpu_percent": 40.0, "load1": 1.5,
                                            "temps_c": {"cpu-thermal": 45.0 + k % 3,
                                                        EVIL: 50.0}}}
            if gpu:
                doc["gpus"] = [{"index": "0", "util_percent": 90, "mem_used_mb": 2000,
                                "power_w": 250.0, "temp_c": 61}]
            f.write(json.dumps(doc) + "\n")


def open_report(browser: Any, path: Path, charts: int) -> dict[str, Any]:
    """Open the file, wait until ``charts`` plots are drawn; what the page did and showed."""
    page = browser.new_page()
    seen: dict[str, list[str]] = {"errors": [], "requests": [], "dialogs": []}
    page.on("console", lambda m: seen["errors"].append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: seen["errors"].append(str(e)))
    page.on("request", lambda r: seen["requests"].append(r.url))
    page.on("dialog", lambda d: (seen["dialogs"].append(d.message), d.dismiss()))
    # a script error ends the wait at once (the charts would never come)
    page.add_init_script("window.__errors = 0; "
                         "window.addEventListener('error', () => { window.__errors++; });")
    try:
        page.goto(path.as_uri(), wait_until="load", timeout=120_000)
        page.wait_for_function(
            "n => window.__errors > 0 || (document.querySelectorAll('div.chart').length === n"
            " && Array.from(document.querySelectorAll('div.chart')).every("
            "d => d.classList.contains('js-plotly-plot') && d.querySelector('.main-svg')))",
            arg=charts, timeout=120_000)
        assert page.evaluate("window.__errors") == 0, f"the page failed: {seen}"
        seen["plots"] = page.evaluate(
            "Array.from(document.querySelectorAll('div.chart')).map("
            "d => d.id + ':' + d.classList.contains('js-plotly-plot'))")
        seen["pwned"] = page.evaluate("String(window.__pwned)")
        seen["imgs"] = page.evaluate("document.querySelectorAll('img').length")
        seen["event_rows"] = page.evaluate("document.querySelectorAll('#events tbody tr').length")
        seen["text"] = page.inner_text("body")
        seen["traces"] = page.evaluate(
            "Array.from(document.querySelectorAll('div.chart')).map(d => d.data.length)")
    finally:
        page.close()
    return seen


def test_the_report_of_a_real_sweep_renders_offline_in_chromium(lab: Path, browser: Any) -> None:
    run = cli(lab, "--config", "experiments/grid.yaml", "--auto-place")
    assert run.returncode == 0, run.stderr + run.stdout
    status = json.loads(cli(lab, "status", "--json", "--no-refresh").stdout)
    run_id = status["run_id"]
    tasks = sorted(i["instance_id"] for i in status["instances"])
    assert tasks == ["grid.0000", "grid.0001", "grid.0002"]
    fetched = cli(lab, "results", run_id)
    assert fetched.returncode == 0, fetched.stderr
    store = Store(lab / "logs" / "state.db")
    try:
        events, total = store.run_events(run_id, 10_000)
    finally:
        store.close()
    assert total == len(events) and {e.kind for e in events} >= {"run", "pool"}

    for n, task in enumerate(tasks):
        write_telemetry(lab / "logs" / run_id / f"{task}.telemetry.jsonl", 300, gpu=n == 0)
    proc = cli(lab, "report", run_id)
    assert proc.returncode == 0, proc.stderr
    path = lab / "logs" / run_id / "report.html"
    assert proc.stdout.startswith(f"report of {run_id}: {path} (")
    assert (path.stat().st_mode & 0o777) == 0o644

    seen = open_report(browser, path, charts=5)  # events, 3 instances, the sweep
    assert seen["errors"] == [], seen["errors"]
    assert seen["dialogs"] == [] and seen["pwned"] == "undefined" and seen["imgs"] == 0
    assert {u.split(":", 1)[0] for u in seen["requests"]} <= {"file", "data", "blob"}, \
        seen["requests"]
    assert [u for u in seen["requests"] if u.startswith("file:")] == [path.as_uri()]
    assert sorted(seen["plots"]) == sorted(
        [f"{c}:true" for c in ("chart-events", "chart-telemetry-0", "chart-telemetry-1",
                               "chart-telemetry-2", "chart-sweep")])
    assert seen["event_rows"] == len(events)
    text = seen["text"]
    for fragment in (run_id, *tasks, "metric.y", "metric.loss", "param.x", "param.label",
                     "Manifest", "--auto-place", "Nodes", EVIL):  # the hostile text is shown as text
        assert fragment in text, fragment
    assert seen["traces"][0] >= 1  # the events chart has a trace per event kind
