"""The report's I/O: gather its inputs from the store and the run's directory, and write
the page atomically (``cluster-experiment report RUN [--out FILE]``)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from infra import __version__
from infra.campaign.table import build_rows, read_metrics_file
from infra.errors import InfraError, UsageError
from infra.report.build import build_report
from infra.report.charts import require_plotly
from infra.report.model import MAX_EVENTS, ManifestDoc, ReportInputs
from infra.state import Store
from infra.telemetry.files import read_samples, telemetry_path

MANIFEST_FILE = "manifest.json"
REPORT_FILE = "report.html"
MANIFEST_MAX_BYTES = 32 << 20


def read_manifest(path: Path) -> ManifestDoc:
    """The run's manifest as a JSON object; absent is no error (older runs have none), a
    link, a huge or a malformed file is said in one short line instead."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return ManifestDoc()
    except OSError as exc:
        why = "a link: not followed" if exc.errno == errno.ELOOP else exc.strerror or str(exc)
        return ManifestDoc(error=f"{path}: {why}")
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(MANIFEST_MAX_BYTES + 1)
    if len(data) > MANIFEST_MAX_BYTES:
        return ManifestDoc(error=f"{path}: larger than {MANIFEST_MAX_BYTES} bytes: not read")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return ManifestDoc(error=f"{path}: not valid JSON ({' '.join(str(exc).split())[:100]})")
    if not isinstance(doc, dict):
        return ManifestDoc(error=f"{path}: not a JSON object")
    return ManifestDoc(doc=doc)


def gather(store: Store, log_dir: Path, run_id: str | None,
           now: float | None = None) -> ReportInputs:
    """Everything the report of ``run_id`` (exact id, unique prefix; None: the latest run)
    shows."""
    run = store.resolve_run(run_id)
    records = tuple(store.instances(run.run_id))
    events, total = store.run_events(run.run_id, MAX_EVENTS)
    run_dir = log_dir / run.run_id
    samples = {r.instance_id: tuple(read_samples(telemetry_path(log_dir, run.run_id,
                                                                r.instance_id)))
               for r in records}
    rows = build_rows(records, lambda rec: read_metrics_file(run_dir, rec.instance_id))
    return ReportInputs(
        run=run, instances=records, events=tuple(events), events_total=total,
        manifest=read_manifest(run_dir / MANIFEST_FILE),
        samples={k: v for k, v in samples.items() if v}, rows=rows,
        generated_at=time.time() if now is None else now, tool_version=__version__)


def write_atomic(path: Path, text: str, mode: int = 0o644) -> int:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a
    rename (a reader sees the old file or the new one, never half); returns the size."""
    data = text.encode("utf-8")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
            os.fchmod(fh.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return len(data)


@dataclass(frozen=True)
class Written:
    """A report on disk: where, how big, for which run."""

    run_id: str
    path: Path
    size: int


def report_path(log_dir: Path, run_id: str, out: Path | None) -> Path:
    """``--out`` when given (its directory must exist), else ``<log_dir>/<run>/report.html``."""
    if out is None:
        run_dir = log_dir / run_id
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return run_dir / REPORT_FILE
    if out.is_dir():
        raise UsageError(f"--out {out}: is a directory (give a file name)")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: directory {out.parent} does not exist")
    return out


def write_report(store: Store, log_dir: Path, run_id: str | None,
                 out: Path | None = None) -> Written:
    """Gather, build and write one run's report."""
    require_plotly()  # before any work: the one line that says how to install it
    inputs = gather(store, log_dir, run_id)
    path = report_path(log_dir, inputs.run.run_id, out)
    page = build_report(inputs)
    try:
        written = write_atomic(path, page)
    except OSError as exc:
        raise InfraError(f"{path}: cannot write the report: {exc.strerror or exc}") from None
    return Written(inputs.run.run_id, path, written)
