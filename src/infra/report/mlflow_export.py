"""``cluster-experiment report RUN --mlflow [URI]``: a run exported to MLflow.

One MLflow experiment per run (``lab-orchestrator/<run id>``), holding one parent MLflow run
for the run itself (its manifest and code patch as artifacts) and, nested under it, one MLflow
run per instance (a sweep's task is an instance) with the instance's parameters, tags, metrics
(``metrics.json`` and the telemetry summary), the telemetry as step metrics, and its log, its
telemetry file and its fetched results as artifacts.

Idempotent: every MLflow run carries ``infra.run_id`` / ``infra.kind`` (and
``infra.instance_id``) tags and is looked up by them first; a second export updates the runs
it finds in place (tags, status and end time; metrics only where their value changed; the
telemetry series only after its last logged point; artifacts copied again) instead of making
new ones. MLflow params are write-once, so a param that would change keeps its first value;
the tags carry the current one.

The default store is ``sqlite:///<cwd>/mlruns/mlflow.db`` with artifacts under
``<cwd>/mlruns/artifacts/`` (MLflow 3 refuses its old ``./mlruns`` file store unless
``MLFLOW_ALLOW_FILE_STORE=true``). ``mlflow`` is imported here only, and only when exporting:
every other command starts without it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import stat
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.campaign.table import flatten, read_metrics_file, text_form
from infra.errors import InfraError, UsageError
from infra.state import InstancePhase, InstanceRecord, RunRecord, RunState
from infra.telemetry.files import read_samples, telemetry_path
from infra.telemetry.sample import Sample
from infra.telemetry.summary import summarize

MISSING = "--mlflow needs mlflow: pip install 'lab-orchestrator[mlflow]'"
EXPERIMENT_PREFIX = "lab-orchestrator/"
DEFAULT_DIR = "mlruns"
DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "artifacts"

TAG_RUN = "infra.run_id"
TAG_KIND = "infra.kind"          # "run" (the parent) or "instance"
TAG_INSTANCE = "infra.instance_id"
TAG_PARENT = "mlflow.parentRunId"  # MLflow's own tag: nests the instance under the run

KEY_MAX = 250       # MLflow's longest param, metric or tag name
PARAM_MAX = 6000    # MLflow's longest param value
TAG_MAX = 8000      # MLflow's longest tag value
BATCH_MAX = 100     # params or tags per log_batch call (metrics: 1000)
METRIC_BATCH_MAX = 1000
MANIFEST_MAX_BYTES = 64 << 20  # a manifest is read up to this size (a longer one: no tags)
SERIES_MAX_POINTS = 1000
"""A telemetry series is downsampled (evenly, first and last kept) to at most this many."""

SERIES: tuple[tuple[str, Callable[[Sample], float | None]], ...] = (
    ("telemetry.cpu_percent", lambda s: s.cpu_percent),
    ("telemetry.rss_bytes", lambda s: s.rss_bytes),
    ("telemetry.gpu_util_percent", lambda s: s.gpu_util_percent),
    ("telemetry.gpu_mem_mb", lambda s: s.gpu_mem_mb),
    ("telemetry.power_w", lambda s: s.power_w),
    ("telemetry.temp_c", lambda s: s.max_temp_c),
)
"""The telemetry step metrics (each only where the samples have it)."""

_STATUS = {
    InstancePhase.EXITED: "FINISHED",
    InstancePhase.FAILED: "FAILED", InstancePhase.LOST: "FAILED",
    InstancePhase.STOPPED: "KILLED", InstancePhase.CANCELLED: "KILLED",
    InstancePhase.SKIPPED: "KILLED", InstancePhase.PAUSED: "KILLED",
    InstancePhase.PLANNED: "SCHEDULED", InstancePhase.QUEUED: "SCHEDULED",
    InstancePhase.DISPATCHED: "SCHEDULED",
}
_RUN_STATUS = {RunState.FINISHED: "FINISHED", RunState.FAILED: "FAILED",
               RunState.STOPPED: "KILLED"}
_TERMINAL = frozenset({"FINISHED", "FAILED", "KILLED"})
_NAME_BAD = re.compile(r"[^A-Za-z0-9_.\- /]")


# --------------------------------------------------------------------------- where

@dataclass(frozen=True)
class Target:
    """Where to export: the tracking URI, and where new experiments keep their artifacts
    (None: MLflow's default for that store)."""

    tracking_uri: str
    artifact_root: Path | None = None


def resolve_target(uri: str | None, cwd: Path) -> Target:
    """The store ``--mlflow [URI]`` names: none is ``<cwd>/mlruns`` (a SQLite store); a plain
    path is a store directory (or, ending in ``.db``, the SQLite file); a URI is used as is."""
    if uri is None:
        return _sqlite_in(cwd / DEFAULT_DIR)
    if not uri.strip() or not uri.isprintable():
        raise UsageError(f"--mlflow {uri[:80]!r}: not a URI or a path")
    if re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*:", uri):  # a scheme: file:, sqlite:, http(s):
        if uri.startswith("sqlite:///"):  # artifacts beside the database, not in ./mlruns
            db = (cwd / uri[len("sqlite:///"):]).resolve()
            return Target(uri, db.parent / ARTIFACTS_DIR)
        return Target(uri)
    path = cwd / uri
    if path.suffix == ".db":
        return Target(f"sqlite:///{path.resolve()}", path.resolve().parent / ARTIFACTS_DIR)
    return _sqlite_in(path)


def _sqlite_in(directory: Path) -> Target:
    """A SQLite store in ``directory`` (``mlflow.db``), its artifacts beside it."""
    d = directory.resolve()
    return Target(f"sqlite:///{d / DB_NAME}", d / ARTIFACTS_DIR)


# --------------------------------------------------------------------------- what

@dataclass(frozen=True)
class Point:
    """One telemetry value as an MLflow step metric."""

    key: str
    value: float
    timestamp_ms: int
    step: int


@dataclass(frozen=True)
class Artifact:
    """A local file, or a directory's regular files, logged under ``under``."""

    path: Path
    under: str


@dataclass(frozen=True)
class RunDoc:
    """Everything one MLflow run gets; pure data, built before MLflow is touched."""

    name: str
    instance_id: str | None  # None: the run's parent
    status: str
    start_ms: int
    end_ms: int | None
    params: tuple[tuple[str, str], ...] = ()
    tags: tuple[tuple[str, str], ...] = ()
    metrics: tuple[tuple[str, float], ...] = ()
    metrics_ms: int = 0
    series: tuple[Point, ...] = ()
    artifacts: tuple[Artifact, ...] = ()


@dataclass(frozen=True)
class RunFiles:
    """What the run's directory holds for every instance: the manifest and the code patch
    (when part of the run record), and the tags read from the manifest."""

    manifest: Path | None = None
    patch: Path | None = None
    tags: tuple[tuple[str, str], ...] = ()


def mlflow_name(raw: str) -> str:
    """``raw`` as a valid MLflow param/metric/tag name: only ASCII letters, digits, ``_ - . /``
    and spaces (every other character becomes ``_``), no empty, ``.`` or ``..`` path part,
    at most 250 characters."""
    parts = [p for p in _NAME_BAD.sub("_", raw).split("/") if p not in ("", ".")]
    name = "/".join("__" if p == ".." else p for p in parts) or "_"
    return name[:KEY_MAX].rstrip("/") or "_"


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _cut(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, marked with an ellipsis when cut."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _number(value: object) -> float | None:
    """A finite number (bools and text are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond a float's range
        return None
    return number if math.isfinite(number) else None


def _put(out: dict[str, Any], raw: str, value: Any) -> None:
    """Add under the sanitized name unless that name is taken (the first one wins)."""
    out.setdefault(mlflow_name(raw), value)


def read_run_files(run_dir: Path) -> RunFiles:
    """The manifest (read as plain JSON, never trusted to have any shape) and the patch."""
    manifest = _regular(run_dir / "manifest.json")
    patch = _regular(run_dir / "code.patch")
    tags: dict[str, str] = {}
    doc: Any = None
    if manifest is not None:
        try:
            with open(manifest, "rb") as fh:
                doc = json.loads(fh.read(MANIFEST_MAX_BYTES).decode("utf-8", "replace"))
        except (OSError, ValueError, RecursionError):
            doc = None
    if isinstance(doc, dict):
        git = doc.get("git")
        if isinstance(git, dict):
            for key in ("commit", "branch"):
                if isinstance(git.get(key), str) and git[key]:
                    tags[f"infra.git_{key}"] = git[key]
            if isinstance(git.get("dirty"), bool):
                tags["infra.git_dirty"] = "true" if git["dirty"] else "false"
            if "infra.git_commit" in tags:  # MLflow shows it as the source version
                tags["mlflow.source.git.commit"] = tags["infra.git_commit"]
            if "infra.git_branch" in tags:
                tags["mlflow.source.git.branch"] = tags["infra.git_branch"]
        tool = doc.get("tool")
        if isinstance(tool, dict) and isinstance(tool.get("version"), str):
            tags["infra.tool_version"] = tool["version"]
        run_tags = doc.get("tags")
        if isinstance(run_tags, list) and all(isinstance(t, str) for t in run_tags) and run_tags:
            tags["infra.tags"] = ",".join(run_tags)
    return RunFiles(manifest, patch, tuple((k, _cut(v, TAG_MAX)) for k, v in tags.items()))


def _regular(path: Path) -> Path | None:
    """``path`` when it is a regular file (a link is not followed), else None."""
    try:
        return path if stat.S_ISREG(os.lstat(path).st_mode) else None
    except OSError:
        return None


def instance_status(state: InstancePhase) -> str:
    """The MLflow run status for an instance state (active ones are RUNNING)."""
    return _STATUS.get(state, "RUNNING")


def downsample(samples: Sequence[Sample], limit: int = SERIES_MAX_POINTS) -> list[
        tuple[int, Sample]]:
    """At most ``limit`` samples with their index, evenly spread, first and last kept."""
    n = len(samples)
    if n <= limit:
        return list(enumerate(samples))
    picks = sorted({round(i * (n - 1) / (limit - 1)) for i in range(limit)})
    return [(i, samples[i]) for i in picks]


def series_points(samples: Sequence[Sample]) -> tuple[Point, ...]:
    """The telemetry as step metrics (step: the sample's index among those having the
    value, in time order)."""
    ordered = sorted(samples, key=lambda s: s.t)
    points: list[Point] = []
    for key, get in SERIES:
        for index, sample in downsample([s for s in ordered if get(s) is not None]):
            value = _number(get(sample))
            if value is not None:
                points.append(Point(key, value, _ms(sample.t), index))
    return tuple(points)


def instance_doc(log_dir: Path, run: RunRecord, rec: InstanceRecord,
                 files: RunFiles) -> RunDoc:
    """One instance's MLflow run: parameters, tags, metrics, series and artifacts."""
    run_dir = log_dir / run.run_id
    spec = rec.spec
    found = read_metrics_file(run_dir, rec.instance_id)
    params: dict[str, str] = {}
    flat, _ = flatten(dict(spec.params))
    for key, value in flat:
        _put(params, key, _cut(text_form(value), PARAM_MAX))
    for key, value in (("infra.node", rec.node), ("infra.template", spec.template_id),
                       ("infra.task_index", spec.task_index), ("infra.command", spec.command)):
        if value not in (None, ""):
            _put(params, key, _cut(str(value), PARAM_MAX))
    tags: dict[str, str] = {TAG_RUN: run.run_id, TAG_KIND: "instance",
                            TAG_INSTANCE: rec.instance_id, "infra.state": rec.state.value}
    extra = {"infra.node": rec.node, "infra.exit_code": rec.exit_code,
             "infra.signal": rec.signal, "infra.restarts": rec.restarts,
             "infra.moves": rec.moves, "infra.reason": rec.reason,
             "infra.campaign": spec.campaign.name if spec.campaign else None,
             "infra.template": spec.template_id, "infra.metrics_error": found.error}
    tags.update((k, _cut(str(v), TAG_MAX)) for k, v in extra.items() if v not in (None, ""))
    tags.update(files.tags)
    values: dict[str, float] = {}
    for key, value in found.values:
        number = _number(value)
        if number is not None:
            _put(values, key, number)
    samples = read_samples(telemetry_path(log_dir, run.run_id, rec.instance_id))
    if samples:
        for key, number in summarize(samples).as_metrics().items():
            _put(values, key, number)
    runtime = rec.runtime_seconds
    if runtime is not None:
        _put(values, "infra.runtime_seconds", round(runtime, 3))
    start = rec.started_at or run.created_at
    status = instance_status(rec.state)
    end = (rec.ended_at or rec.updated_at or start) if status in _TERMINAL else None
    artifacts = [Artifact(p, under) for p, under in (
        (log_dir / run.run_id / f"{rec.instance_id}.log", "log"),
        (telemetry_path(log_dir, run.run_id, rec.instance_id), "telemetry"),
        (run_dir / rec.instance_id, "fetched"))]
    return RunDoc(name=rec.instance_id, instance_id=rec.instance_id, status=status,
                  start_ms=_ms(start), end_ms=None if end is None else _ms(end),
                  params=tuple(params.items()), tags=tuple(tags.items()),
                  metrics=tuple(values.items()), metrics_ms=_ms(end or time.time()),
                  series=series_points(samples), artifacts=tuple(artifacts))


def run_doc(run: RunRecord, records: Sequence[InstanceRecord], files: RunFiles) -> RunDoc:
    """The run's own MLflow run: the parent of its instances, with the manifest and patch."""
    status = _RUN_STATUS.get(run.state, "RUNNING")
    ends = [r.ended_at for r in records if r.ended_at is not None]
    end = max(ends, default=run.created_at) if status in _TERMINAL else None
    tags = {TAG_RUN: run.run_id, TAG_KIND: "run", "infra.state": run.state.value,
            "infra.instances": str(len(records)), **dict(files.tags)}
    artifacts = tuple(Artifact(p, "run") for p in (files.manifest, files.patch) if p)
    return RunDoc(name=run.run_id, instance_id=None, status=status,
                  start_ms=_ms(run.created_at), end_ms=None if end is None else _ms(end),
                  tags=tuple(tags.items()), artifacts=artifacts)


# --------------------------------------------------------------------------- MLflow

@dataclass(frozen=True)
class ExportResult:
    """What an export did: where, and how many instance runs it made or updated (the
    run's parent MLflow run is not counted)."""

    run_id: str
    uri: str
    experiment: str
    experiment_id: str
    instances: int
    created: int
    updated: int

    def one_line(self) -> str:
        again = f", {self.updated} updated" if self.updated else ""
        return (f"exported {self.instances} instances of {self.run_id} to {self.uri} "
                f"(experiment {self.experiment}, id {self.experiment_id}; "
                f"{self.created} MLflow runs created{again})")


@contextlib.contextmanager
def _mlflow_session() -> Iterator[None]:
    """Import MLflow for the export only, with no usage telemetry (unless the user's
    environment says otherwise) and its and the database migrations' chatter and warnings
    silenced; the environment and the loggers are put back afterwards."""
    saved_env = os.environ.get("MLFLOW_DISABLE_TELEMETRY")
    if saved_env is None:  # read when mlflow is imported, and again on each event
        os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    loggers = [logging.getLogger(n) for n in ("mlflow", "alembic", "sqlalchemy")]
    levels = [lg.level for lg in loggers]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                import mlflow.tracking  # noqa: F401  (sets its loggers up: quieted below)
            except ImportError:
                raise InfraError(MISSING) from None
            for lg in loggers:
                lg.setLevel(logging.ERROR)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if saved_env is None:
            os.environ.pop("MLFLOW_DISABLE_TELEMETRY", None)


def _client(target: Target) -> Any:
    """An ``MlflowClient`` for the target (no global tracking URI is set)."""
    from mlflow.tracking import MlflowClient

    if target.tracking_uri.startswith("sqlite:"):
        import importlib.util
        if importlib.util.find_spec("sqlalchemy") is None:  # mlflow-skinny alone
            raise InfraError(MISSING + " (a SQLite store needs sqlalchemy and alembic)")
        if target.artifact_root is not None:
            target.artifact_root.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=target.tracking_uri, registry_uri=target.tracking_uri)


def _mlflow_error(exc: Exception, uri: str) -> InfraError:
    """MLflow's (often multi-line) complaint as one line naming the store."""
    text = " ".join(str(exc).split())
    if "MLFLOW_ALLOW_FILE_STORE" in text:
        return UsageError(f"--mlflow {uri}: MLflow refuses its file store (maintenance mode): "
                          "leave the URI out for the default SQLite store in ./mlruns, or set "
                          "MLFLOW_ALLOW_FILE_STORE=true to use a file store anyway")
    return InfraError(f"mlflow ({uri}): {_cut(text, 300)}")


def export_run(log_dir: Path, run: RunRecord, records: Sequence[InstanceRecord],
               target: Target) -> ExportResult:
    """Export ``run`` and its instances into ``target``; updates what an earlier export of
    the same run made there (found by tags) instead of adding runs."""
    run_dir = log_dir / run.run_id
    files = read_run_files(run_dir)
    parent = run_doc(run, records, files)
    children = [instance_doc(log_dir, run, rec, files) for rec in records]
    with _mlflow_session():
        try:
            return _export(_client(target), target, run, parent, children)
        except InfraError:
            raise
        except Exception as exc:  # MlflowException, and the store's own (sqlite, OS) errors
            if type(exc).__module__.startswith(("mlflow", "sqlalchemy", "alembic")) or \
                    isinstance(exc, OSError):
                raise _mlflow_error(exc, target.tracking_uri) from None
            raise


def _export(client: Any, target: Target, run: RunRecord, parent: RunDoc,
            children: Sequence[RunDoc]) -> ExportResult:
    name = EXPERIMENT_PREFIX + run.run_id
    experiment_id = _experiment(client, target, name)
    existing = _existing(client, experiment_id, run.run_id)
    created = updated = 0
    parent_id, _ = _write(client, experiment_id, parent, existing.get(None), None)
    for doc in children:
        _, made = _write(client, experiment_id, doc, existing.get(doc.instance_id), parent_id)
        created += made
        updated += not made
    return ExportResult(run.run_id, target.tracking_uri, name, experiment_id, len(children),
                        created, updated)


def _experiment(client: Any, target: Target, name: str) -> str:
    """The experiment's id, made when missing; a deleted one is refused with the fix."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage != "active":
            raise UsageError(f"--mlflow {target.tracking_uri}: experiment {name!r} is deleted "
                             "there: restore it (mlflow experiments restore) or delete it "
                             "for good (mlflow gc) first")
        return str(found.experiment_id)
    location = None
    if target.artifact_root is not None:
        location = (target.artifact_root / mlflow_name(name).replace("/", "_")).as_uri()
    return str(client.create_experiment(name, artifact_location=location))


def _existing(client: Any, experiment_id: str, run_id: str) -> dict[str | None, Any]:
    """This run's MLflow runs from earlier exports: the parent under None, the instances by
    id (the oldest one wins if a key was made twice)."""
    found: dict[str | None, Any] = {}
    token = None
    while True:
        page = client.search_runs([experiment_id], f"tags.`{TAG_RUN}` = '{run_id}'",
                                  max_results=1000, order_by=["attributes.start_time ASC"],
                                  page_token=token)
        for mlrun in page:
            tags = mlrun.data.tags
            if tags.get(TAG_KIND) == "run":
                found.setdefault(None, mlrun)
            elif tags.get(TAG_KIND) == "instance" and tags.get(TAG_INSTANCE):
                found.setdefault(tags[TAG_INSTANCE], mlrun)
        token = page.token
        if not token:
            return found


def _write(client: Any, experiment_id: str, doc: RunDoc, existing: Any,
           parent_id: str | None) -> tuple[str, bool]:
    """Create the MLflow run for ``doc`` (or update ``existing``); (its id, created?)."""
    from mlflow.entities import Metric, Param, RunTag

    tags = dict(doc.tags)
    if parent_id is not None:
        tags[TAG_PARENT] = parent_id
    if existing is None:
        mlrun = client.create_run(experiment_id, start_time=doc.start_ms, tags=tags,
                                  run_name=doc.name)
        mlrun_id, had_params, had_metrics = mlrun.info.run_id, {}, {}
    else:
        mlrun_id = existing.info.run_id
        had_params, had_metrics = existing.data.params, existing.data.metrics
        _batches(lambda part: client.log_batch(mlrun_id, tags=part),
                 [RunTag(k, v) for k, v in tags.items()], BATCH_MAX)
    _batches(lambda part: client.log_batch(mlrun_id, params=part),
             [Param(k, v) for k, v in doc.params if k not in had_params], BATCH_MAX)
    metrics = [Metric(k, v, doc.metrics_ms, 0) for k, v in doc.metrics
               if had_metrics.get(k) != v]
    metrics += _new_points(client, mlrun_id, doc.series, existing is not None)
    _batches(lambda part: client.log_batch(mlrun_id, metrics=part), metrics, METRIC_BATCH_MAX)
    for artifact in doc.artifacts:
        _log_artifact(client, mlrun_id, artifact)
    if doc.status in _TERMINAL:
        client.set_terminated(mlrun_id, doc.status, end_time=doc.end_ms)
    else:
        client.update_run(mlrun_id, status=doc.status)
    return mlrun_id, existing is None


def _new_points(client: Any, mlrun_id: str, points: Sequence[Point],
                existed: bool) -> list[Any]:
    """The series points not logged yet: those after each key's last logged timestamp."""
    from mlflow.entities import Metric

    last: dict[str, int] = {}
    if existed:
        for key in {p.key for p in points}:
            history = client.get_metric_history(mlrun_id, key)
            if history:
                last[key] = max(m.timestamp for m in history)
    return [Metric(p.key, p.value, p.timestamp_ms, p.step) for p in points
            if p.timestamp_ms > last.get(p.key, -1)]


def _batches(call: Callable[[list[Any]], None], items: list[Any], size: int) -> None:
    for start in range(0, len(items), size):
        call(items[start:start + size])


def _log_artifact(client: Any, mlrun_id: str, artifact: Artifact) -> None:
    """Log a regular file, or every regular file below a directory (links and other
    special files are skipped, never followed); nothing when the path is missing."""
    try:
        mode = os.lstat(artifact.path).st_mode
    except OSError:
        return
    if stat.S_ISREG(mode):
        client.log_artifact(mlrun_id, str(artifact.path), artifact.under)
        return
    if not stat.S_ISDIR(mode):
        return
    for top, dirs, names in os.walk(artifact.path, followlinks=False):
        dirs.sort()
        rel = Path(top).relative_to(artifact.path)
        under = artifact.under if rel == Path(".") else f"{artifact.under}/{rel.as_posix()}"
        for name in sorted(names):
            path = Path(top) / name
            if _regular(path) is not None:
                client.log_artifact(mlrun_id, str(path), under)


def summary_doc(result: ExportResult) -> Mapping[str, object]:
    """The export as a JSON document (``--json``)."""
    return {"run_id": result.run_id, "uri": result.uri, "experiment": result.experiment,
            "experiment_id": result.experiment_id, "instances": result.instances,
            "created": result.created, "updated": result.updated}
