"""``report RUN --mlflow [URI]``: a real sweep on the built-in local node, exported with the
real ``mlflow`` package into a local store and read back with ``MlflowClient``.

One run and one export per module (MLflow takes seconds to import and to set up a store);
the manifest, code patch and telemetry file are written into the run's directory as the
coordinator records them (other parts of issue 11 produce them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.report.mlflow_export import (
    SERIES_MAX_POINTS,
    downsample,
    mlflow_name,
    resolve_target,
)
from infra.state import InstanceRecord, Store
from infra.telemetry.files import read_samples, telemetry_path
from infra.telemetry.summary import summarize
from tests.builders import run_cli

mlflow = pytest.importorskip("mlflow")
# the test's own MlflowClient: SQLAlchemy's deprecation notes about MLflow's store code
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

TASK = textwrap.dedent('''\
    import json, os, sys
    params = json.loads(os.environ["INFRA_PARAMS"])
    print("task", os.environ["INFRA_INSTANCE_ID"], "x", params["x"])
    out = os.environ["INFRA_RESULTS_DIR"]
    os.makedirs(os.path.join(out, "plots"), exist_ok=True)
    open(os.path.join(out, "plots", "curve.txt"), "w").write("curve %s\\n" % params["x"])
    json.dump({"x2": params["x"] * 2, "val": {"loss": 1.0 / params["x"]},
               "note": "text", "flag": True, "bad": float("nan"), "odd key!": 7},
              open(os.path.join(out, "metrics.json"), "w"))
    sys.exit(1 if params["x"] == 3 else 0)
''')

MANIFEST = {"version": 1, "run_id": "?", "tool": {"name": "lab-orchestrator", "version": "0.1.0"},
            "git": {"commit": "0123456789abcdef0123456789abcdef01234567", "branch": "main",
                    "dirty": True, "patch_file": "code.patch"}, "tags": ["baseline"]}
TELEMETRY_SAMPLES = 1500  # more than SERIES_MAX_POINTS: the series must be downsampled


def cli(root: Path, *args: str, env: dict[str, str] | None = None,
        timeout: float = 240.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "infra.cli.main", *args], cwd=root,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


@dataclass(frozen=True)
class Lab:
    root: Path
    run_id: str
    records: dict[str, InstanceRecord]
    first: subprocess.CompletedProcess[str]  # the first export, through the real CLI

    @property
    def run_dir(self) -> Path:
        return self.root / "logs" / self.run_id

    def client(self) -> Any:
        return MlflowClient(tracking_uri=f"sqlite:///{self.root / 'mlruns' / 'mlflow.db'}")

    def runs(self) -> dict[str, Any]:
        """The instance runs of the export, by instance id (asserting there are no twins)."""
        client = self.client()
        exp = client.get_experiment_by_name(f"lab-orchestrator/{self.run_id}")
        found = client.search_runs([exp.experiment_id], "tags.`infra.kind` = 'instance'",
                                   max_results=1000)
        ids = [r.data.tags["infra.instance_id"] for r in found]
        assert len(ids) == len(set(ids)), ids
        return {r.data.tags["infra.instance_id"]: r for r in found}


def write_telemetry(path: Path, start: float) -> None:
    """A home telemetry file as the coordinator appends it (one JSON object per line)."""
    with open(path, "w") as fh:
        for i in range(TELEMETRY_SAMPLES):
            fh.write(json.dumps({"t": start + i * 0.5, "cpu_percent": float(i % 100),
                                 "rss_bytes": 1000 + i, "procs": 1}) + "\n")
        fh.write('{"t": 12')  # a torn last line is skipped


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A 3-task sweep (x=3 fails) run on the local node, then exported once by the CLI."""
    root = tmp_path_factory.mktemp("mlflow") / "lab"
    (root / "experiments").mkdir(parents=True)
    (root / "task.py").write_text(TASK)
    config = {"nodes": [{"name": "local", "host": "localhost", "remote_work_dir": ".",
                         "ram_gb": 8.0, "max_instances": 3, "python_path": sys.executable}],
              "failover": {"auto_restart": False}, "deploy": {"source": "."},
              "telemetry": {"interval_seconds": 0}}  # the test writes the telemetry itself
    (root / "cluster_config.yaml").write_text(yaml.safe_dump(config))
    spec = root / "experiments" / "grid.yaml"
    spec.write_text(yaml.safe_dump({
        "experiment_id": "grid", "ram_gb": 0.25, "recover": "none",
        "command": f"{sys.executable} {root / 'task.py'}",
        "sweep": {"grid": {"x": [1, 2, 3]}}}))
    proc = cli(root, "--config", str(spec), "--auto-place")
    assert proc.returncode == 1 and "did not finish" in proc.stderr, proc.stderr
    store = Store(root / "logs" / "state.db")
    try:
        run_id = store.latest_run().run_id
        records = {r.instance_id: r for r in store.instances(run_id)}
    finally:
        store.close()
    run_dir = root / "logs" / run_id
    (run_dir / "manifest.json").write_text(json.dumps({**MANIFEST, "run_id": run_id}))
    (run_dir / "code.patch").write_text("--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n")
    start = records["grid.0000"].started_at or 0.0
    write_telemetry(telemetry_path(root / "logs", run_id, "grid.0000"), start)
    first = cli(root, "report", run_id, "--mlflow")
    yield Lab(root, run_id, records, first)


def test_each_task_is_one_mlflow_run_with_its_params_state_and_times(lab: Lab) -> None:
    assert lab.first.returncode == 0, lab.first.stderr
    assert lab.first.stdout.startswith(f"exported 3 instances of {lab.run_id} to sqlite:///")
    assert lab.first.stdout.count("\n") == 1, lab.first.stdout  # one line, no MLflow chatter
    assert lab.first.stderr == ""  # nor on stderr
    assert (lab.root / "mlruns" / "mlflow.db").is_file()
    runs = lab.runs()
    assert sorted(runs) == ["grid.0000", "grid.0001", "grid.0002"]
    for iid, mlrun in runs.items():
        rec = lab.records[iid]
        assert mlrun.info.run_name == iid
        assert mlrun.data.params["x"] == str(rec.spec.task_index + 1)  # type: ignore[operator]
        assert mlrun.data.params["infra.node"] == "local"
        assert mlrun.data.params["infra.template"] == "grid"
        assert mlrun.data.params["infra.command"] == rec.spec.command
        tags = mlrun.data.tags
        assert tags["infra.run_id"] == lab.run_id and tags["infra.node"] == "local"
        assert tags["infra.campaign"] == "grid" and tags["infra.state"] == rec.state.value
        assert tags["infra.exit_code"] == str(rec.exit_code)
        assert tags["mlflow.source.git.commit"] == MANIFEST["git"]["commit"]  # type: ignore[index]
        assert tags["infra.git_dirty"] == "true" and tags["infra.tags"] == "baseline"
        assert mlrun.info.status == ("FAILED" if iid == "grid.0002" else "FINISHED")
        assert mlrun.info.start_time == round(rec.started_at * 1000)  # type: ignore[operator]
        assert mlrun.info.end_time == round(rec.ended_at * 1000)  # type: ignore[operator]
    parents = {r.data.tags.get("mlflow.parentRunId") for r in runs.values()}
    assert len(parents) == 1
    parent = lab.client().get_run(parents.pop())
    assert parent.info.run_name == lab.run_id and parent.data.tags["infra.kind"] == "run"


def test_metrics_are_the_numbers_of_metrics_json_telemetry_and_runtime(lab: Lab) -> None:
    runs = lab.runs()
    for iid, mlrun in runs.items():
        x = lab.records[iid].spec.task_index + 1  # type: ignore[operator]
        metrics = mlrun.data.metrics
        assert metrics["x2"] == 2 * x and metrics["val.loss"] == pytest.approx(1.0 / x)
        assert metrics["odd key_"] == 7  # sanitized to MLflow's characters
        assert not {"note", "flag", "bad"} & set(metrics)  # text, bool, NaN: not numbers
        runtime = lab.records[iid].runtime_seconds
        assert metrics["infra.runtime_seconds"] == pytest.approx(runtime, abs=0.001)
    summary = summarize(read_samples(telemetry_path(lab.root / "logs", lab.run_id,
                                                    "grid.0000")))
    assert summary.samples == TELEMETRY_SAMPLES
    got = runs["grid.0000"].data.metrics
    for key, value in summary.as_metrics().items():
        assert got[key] == pytest.approx(value), key
    assert not any(k.startswith("telemetry.") for k in runs["grid.0001"].data.metrics)
    history = lab.client().get_metric_history(runs["grid.0000"].info.run_id,
                                              "telemetry.cpu_percent")
    assert 2 <= len(history) <= SERIES_MAX_POINTS
    start = lab.records["grid.0000"].started_at or 0.0
    first, last = min(history, key=lambda m: m.step), max(history, key=lambda m: m.step)
    assert (first.step, first.timestamp, first.value) == (0, round(start * 1000), 0.0)
    assert last.step == TELEMETRY_SAMPLES - 1
    assert last.timestamp == round((start + (TELEMETRY_SAMPLES - 1) * 0.5) * 1000)


def test_artifacts_hold_the_log_telemetry_results_manifest_and_patch(lab: Lab) -> None:
    client = lab.client()
    runs = lab.runs()

    def files(run_id: str, path: str = "") -> set[str]:
        out: set[str] = set()
        for info in client.list_artifacts(run_id, path):
            out |= files(run_id, info.path) if info.is_dir else {info.path}
        return out

    zero = files(runs["grid.0000"].info.run_id)
    assert zero == {"log/grid.0000.log", "telemetry/grid.0000.telemetry.jsonl",
                    "fetched/results/metrics.json", "fetched/results/plots/curve.txt"}, zero
    assert "telemetry/grid.0001.telemetry.jsonl" not in files(runs["grid.0001"].info.run_id)
    local = Path(client.download_artifacts(runs["grid.0002"].info.run_id, "log"))
    assert "task grid.0002 x 3" in (local / "grid.0002.log").read_text()
    parent_id = runs["grid.0000"].data.tags["mlflow.parentRunId"]
    assert files(parent_id) == {"run/manifest.json", "run/code.patch"}
    manifest = Path(client.download_artifacts(parent_id, "run/manifest.json"))
    assert json.loads(manifest.read_text())["git"]["branch"] == "main"
    # artifacts live beside the store, not wherever the command happened to run
    artifact_uri = runs["grid.0000"].info.artifact_uri
    assert artifact_uri.startswith((lab.root / "mlruns" / "artifacts").as_uri()), artifact_uri


def test_exporting_again_updates_in_place_without_duplicates(
        lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    client = lab.client()
    before = {iid: r.info.run_id for iid, r in lab.runs().items()}
    exp = client.get_experiment_by_name(f"lab-orchestrator/{lab.run_id}")
    total = len(client.search_runs([exp.experiment_id], max_results=1000))
    uri = f"sqlite:///{lab.root / 'mlruns' / 'mlflow.db'}"
    code, out, err = run_cli(capsys, "--cluster-config", str(lab.root / "cluster_config.yaml"),
                             "report", lab.run_id, "--mlflow", uri, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["created"], doc["updated"], doc["instances"]) == (0, 3, 3), doc
    assert {iid: r.info.run_id for iid, r in lab.runs().items()} == before
    assert len(client.search_runs([exp.experiment_id], max_results=1000)) == total == 4
    zero = before["grid.0000"]
    assert len(client.get_metric_history(zero, "x2")) == 1
    history = client.get_metric_history(zero, "telemetry.cpu_percent")
    assert len({m.step for m in history}) == len(history) <= SERIES_MAX_POINTS


def test_without_mlflow_the_export_fails_in_one_line_and_other_commands_never_import_it(
        lab: Lab) -> None:
    blocker = textwrap.dedent('''\
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "mlflow" or name.startswith("mlflow."):
                    raise ImportError("no module named " + name)
        sys.meta_path.insert(0, Block())
        from infra.cli.main import main
        code = main(sys.argv[1:])
        assert not [m for m in sys.modules if m.split(".")[0] in ("mlflow", "sqlalchemy")]
        sys.exit(code)
    ''')
    run = [sys.executable, "-c", blocker]
    proc = subprocess.run([*run, "report", lab.run_id, "--mlflow", "elsewhere"], cwd=lab.root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == "error: --mlflow needs mlflow: pip install 'lab-orchestrator[mlflow]'\n"
    assert proc.stdout == "" and not (lab.root / "elsewhere").exists()
    proc = subprocess.run([*run, "status", lab.run_id, "--no-refresh"], cwd=lab.root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_bad_store_and_usage_are_one_line_errors(
        lab: Lab, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    config = str(lab.root / "cluster_config.yaml")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    code, out, err = run_cli(capsys, "--cluster-config", config, "report", lab.run_id,
                             "--mlflow", (lab.root / "filestore").as_uri())
    assert code == 2 and out == "", err
    assert err.count("\n") == 1 and "MLFLOW_ALLOW_FILE_STORE=true" in err, err
    code, out, err = run_cli(capsys, "--cluster-config", config, "report", "r-nope",
                             "--mlflow", str(lab.root / "unused"))
    assert code == 2 and "no run 'r-nope'" in err and err.count("\n") == 1, err


def test_default_store_names_and_downsampling() -> None:
    cwd = Path("/work/lab")
    assert resolve_target(None, cwd).tracking_uri == "sqlite:////work/lab/mlruns/mlflow.db"
    assert resolve_target(None, cwd).artifact_root == Path("/work/lab/mlruns/artifacts")
    assert resolve_target("store", cwd).tracking_uri == "sqlite:////work/lab/store/mlflow.db"
    assert resolve_target("x/t.db", cwd).tracking_uri == "sqlite:////work/lab/x/t.db"
    assert resolve_target("http://127.0.0.1:5000", cwd).artifact_root is None
    assert resolve_target("sqlite:////srv/m.db", cwd).artifact_root == Path("/srv/artifacts")
    assert mlflow_name("a/../b//c d:é!") == "a/__/b/c d___"
    assert mlflow_name("/./") == "_" and len(mlflow_name("k" * 300)) == 250
    picked = downsample(list(range(2500)), 1000)  # type: ignore[arg-type]
    assert len(picked) == 1000 and picked[0] == (0, 0) and picked[-1] == (2499, 2499)
    assert downsample([1, 2], 1000) == [(0, 1), (1, 2)]  # type: ignore[list-item]
