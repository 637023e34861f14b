"""The results table of a run: each task's parameters joined with its outcome and metrics.

Behind ``cluster-experiment results RUN --table | --csv | --json --table``. One row per
instance (a sweep's tasks are instances); the metrics are what the experiment wrote to
``$INFRA_RESULTS_DIR/metrics.json``, read from the copy fetched home
(``logs/<run>/<instance>/results/metrics.json``).

Columns, always in this order, so that scripts can rely on them:
``instance_id``, ``template``, ``task_index``, ``param.<name>`` (the sorted union of every
row's parameter names), ``state``, ``exit_code``, ``signal``, ``attempts``, ``node``,
``runtime_seconds``, ``metric.<key>`` (the sorted union of every row's metric keys),
``reason``, ``metrics_error``. The ``param.`` and ``metric.`` prefixes keep a parameter, a
metric and a fixed column apart whatever they are called (a metric named ``state``, a
parameter and a metric both named ``seed``), and the header never depends on which names
happen to collide in one run.

Nested mappings are flattened with dots (``{"val": {"loss": 0.1}}`` is ``metric.val.loss``);
lists and other non-scalars become their JSON text. Everything here is pure except
``read_metrics_file``, which reads one instance's file safely: size cap, no link followed,
never anything but a regular file, and a bad file is a short ``metrics_error``, never a crash.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.cells import cell_len
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from infra.state import InstanceRecord

Scalar = str | int | float | bool | None
Pairs = tuple[tuple[str, Scalar], ...]

METRICS_FILE = "metrics.json"
METRICS_MAX_BYTES = 1 << 20   # a metrics.json larger than this is not read (metrics_error)
METRICS_MAX_VALUES = 1000     # values kept per row; the rest are dropped with a metrics_error
CELL_MAX_CHARS = 32           # terminal table: longer values are cut with an ellipsis
TEXT_MAX_CHARS = 60           # ... except reason and metrics_error, which get this many

HEAD = ("instance_id", "template", "task_index")
MIDDLE = ("state", "exit_code", "signal", "attempts", "node", "runtime_seconds")
TAIL = ("reason", "metrics_error")
PARAM_PREFIX = "param."
METRIC_PREFIX = "metric."
# fixed columns the terminal table leaves out when no row has a value in them
OPTIONAL = frozenset({"template", "task_index", "signal", "reason", "metrics_error"})
LABELS = {"instance_id": "instance", "task_index": "task", "exit_code": "exit",
          "runtime_seconds": "runtime_s"}
_STATE_STYLE = {"running": "green", "exited": "cyan", "failed": "red", "lost": "red",
                "stopped": "yellow", "restarting": "yellow", "skipped": "dim",
                "cancelled": "yellow", "queued": "dim", "dispatched": "dim"}


@dataclass(frozen=True)
class Metrics:
    """What one instance's metrics.json gave: flattened values, or why it could not."""

    values: Pairs = ()
    error: str | None = None


@dataclass(frozen=True)
class ResultRow:
    """One instance (task) of a run: its parameters, its outcome and its metrics."""

    instance_id: str
    template: str | None
    task_index: int | None
    params: Pairs
    state: str
    exit_code: int | None
    signal: str | None
    attempts: int
    node: str | None
    runtime_seconds: float | None
    reason: str
    metrics: Pairs
    metrics_error: str | None = None


# --------------------------------------------------------------------------- values

def flatten(doc: Mapping[Any, Any], limit: int = METRICS_MAX_VALUES) -> tuple[Pairs, str | None]:
    """``doc`` as dotted keys and scalar values (non-scalars as JSON text), at most ``limit``
    of them, in the document's order; plus a note when something had to be left out."""
    out: dict[str, Scalar] = {}
    notes: list[str] = []
    dropped = 0

    def put(key: str, value: Scalar) -> None:
        nonlocal dropped
        if key in out:
            if not notes:
                notes.append(f"key {key!r} given twice (nested and dotted): the first kept")
        elif len(out) >= limit:
            dropped += 1
        else:
            out[key] = value

    def walk(prefix: str, node: Mapping[Any, Any]) -> None:
        for raw_key, value in node.items():
            key = f"{prefix}{raw_key}"
            if isinstance(value, Mapping) and value:
                walk(f"{key}.", value)
            else:
                put(key, scalar(value))

    walk("", doc)
    if dropped:
        notes.insert(0, f"more than {limit} values: {dropped} left out")
    return tuple(out.items()), "; ".join(notes) or None


def scalar(value: Any) -> Scalar:
    """A cell value: scalars as they are, anything else as its JSON text."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    return json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)


def _kind(doc: Any) -> str:
    """A JSON value's kind, as the JSON spec names it."""
    if isinstance(doc, list):
        return "an array"
    if isinstance(doc, str):
        return "a string"
    if isinstance(doc, bool):
        return "a boolean"
    if isinstance(doc, (int, float)):
        return "a number"
    return "null" if doc is None else type(doc).__name__


def parse_metrics(data: bytes) -> Metrics:
    """Decode one metrics.json (a JSON object); a short reason instead when it is not one."""
    if len(data) > METRICS_MAX_BYTES:
        return Metrics(error=f"larger than {METRICS_MAX_BYTES} bytes: not read")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return Metrics(error="not UTF-8 text")
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict):
            return Metrics(error=f"not a JSON object ({_kind(doc)})")
        values, note = flatten(doc)
    except RecursionError:
        return Metrics(error="nested too deeply")
    except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
        return Metrics(error=f"invalid JSON: {' '.join(str(exc).split())[:100]}")
    return Metrics(values, note)


def read_metrics_file(run_dir: Path, instance_id: str) -> Metrics:
    """Read ``<run_dir>/<instance_id>/results/metrics.json`` as fetched home.

    Every component below ``run_dir`` is opened without following links (a link is reported,
    never read through), only a regular file is read, and at most ``METRICS_MAX_BYTES``.
    A file that is not there is no error: the instance wrote no metrics (yet).
    """
    if instance_id in ("", ".", "..") or "/" in instance_id or "\0" in instance_id:
        return Metrics(error="instance id is not a plain name: not read")
    fd = -1
    where = str(run_dir)
    try:
        fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
        for part, label in ((instance_id, instance_id), ("results", f"{instance_id}/results")):
            where = label
            if stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                return Metrics(error=f"{where} is a link: not followed")
            sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = sub
        where = f"{instance_id}/results/{METRICS_FILE}"
        return _read_regular(fd, METRICS_FILE)
    except FileNotFoundError:
        return Metrics()
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # swapped for a link since it was looked at
            return Metrics(error=f"{where} is a link: not followed")
        if exc.errno == errno.ENOTDIR:
            return Metrics(error=f"{where} is not a directory")
        return Metrics(error=f"{where}: {exc.strerror or exc}")
    finally:
        if fd >= 0:
            os.close(fd)


def _read_regular(dir_fd: int, name: str) -> Metrics:
    """Read ``name`` in ``dir_fd`` when it is a regular file of bounded size (else why not)."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        return Metrics(error=f"{name} is a link: not followed")
    if not stat.S_ISREG(st.st_mode):
        return Metrics(error=f"{name} is not a regular file")
    if st.st_size > METRICS_MAX_BYTES:
        return Metrics(error=f"larger than {METRICS_MAX_BYTES} bytes ({st.st_size}): not read")
    ffd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    with os.fdopen(ffd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # swapped since the stat
            return Metrics(error=f"{name} is not a regular file")
        return parse_metrics(f.read(METRICS_MAX_BYTES + 1))


# --------------------------------------------------------------------------- rows

def row_of(rec: InstanceRecord, metrics: Metrics) -> ResultRow:
    """One record's row: attempts count the first start and every restart (0: never ran)."""
    spec = rec.spec
    params, _ = flatten(dict(spec.params), limit=METRICS_MAX_VALUES)
    runtime = rec.runtime_seconds
    return ResultRow(
        instance_id=rec.instance_id,
        template=spec.template_id,
        task_index=getattr(spec, "task_index", None),  # ExperimentSpec gains it with sweeps
        params=params,
        state=rec.state.value,
        exit_code=rec.exit_code,
        signal=rec.signal,
        attempts=rec.restarts + 1 if rec.started_at is not None else 0,
        node=rec.node or None,
        runtime_seconds=None if runtime is None else round(runtime, 3),
        reason=rec.reason,
        metrics=metrics.values,
        metrics_error=metrics.error)


def _order(row: ResultRow) -> tuple[str, int, str]:
    """Tasks of a template together, in task order; everything else by id."""
    group = row.template or row.instance_id
    return (group, -1 if row.task_index is None else row.task_index, row.instance_id)


def build_rows(records: Iterable[InstanceRecord],
               read_metrics: Callable[[InstanceRecord], Metrics]) -> tuple[ResultRow, ...]:
    """Every record's row, with the metrics ``read_metrics`` finds for it, in task order."""
    return tuple(sorted((row_of(rec, read_metrics(rec)) for rec in records), key=_order))


def columns(rows: Sequence[ResultRow]) -> list[str]:
    """The header: fixed columns, then the union of parameter and of metric names, sorted."""
    params = sorted({k for r in rows for k, _ in r.params})
    metrics = sorted({k for r in rows for k, _ in r.metrics})
    return [*HEAD, *(PARAM_PREFIX + p for p in params), *MIDDLE,
            *(METRIC_PREFIX + m for m in metrics), *TAIL]


def row_values(row: ResultRow) -> dict[str, Scalar]:
    """The row by column name (a column it has no value for is absent)."""
    out: dict[str, Scalar] = {
        "instance_id": row.instance_id, "template": row.template,
        "task_index": row.task_index, "state": row.state, "exit_code": row.exit_code,
        "signal": row.signal, "attempts": row.attempts, "node": row.node,
        "runtime_seconds": row.runtime_seconds, "reason": row.reason or None,
        "metrics_error": row.metrics_error}
    out.update((PARAM_PREFIX + k, v) for k, v in row.params)
    out.update((METRIC_PREFIX + k, v) for k, v in row.metrics)
    return out


# --------------------------------------------------------------------------- output

def text_form(value: Scalar) -> str:
    """A value as CSV writes it: empty for none, ``true``/``false``, floats in full."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def csv_field(text: str) -> str:
    """One CSV field (RFC 4180): quoted, with its quotes doubled, when it holds a comma, a
    quote or a line break; ``\r`` too (the csv module leaves it bare with ``\n`` line ends)."""
    if any(ch in text for ch in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


def to_csv(rows: Sequence[ResultRow]) -> str:
    """The table as CSV (RFC 4180 quoting, ``\n`` line ends), the header row first."""
    cols = columns(rows)
    lines = [",".join(csv_field(c) for c in cols)]
    for row in rows:
        values = row_values(row)
        lines.append(",".join(csv_field(text_form(values.get(c))) for c in cols))
    return "\n".join(lines) + "\n"


def json_value(value: Scalar) -> Scalar:
    """A value valid in strict JSON: NaN and the infinities become the strings JSON
    writers commonly use for them (``"NaN"``, ``"Infinity"``, ``"-Infinity"``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def to_json(rows: Sequence[ResultRow]) -> list[dict[str, Any]]:
    """The rows as JSON objects with their types (``params``/``metrics`` as flat objects)."""
    return [{"instance_id": r.instance_id, "template": r.template, "task_index": r.task_index,
             "params": {k: json_value(v) for k, v in r.params},
             "state": r.state, "exit_code": r.exit_code, "signal": r.signal,
             "attempts": r.attempts, "node": r.node,
             "runtime_seconds": json_value(r.runtime_seconds), "reason": r.reason,
             "metrics": {k: json_value(v) for k, v in sorted(r.metrics)},
             "metrics_error": r.metrics_error} for r in rows]


def cell(value: Scalar, limit: int = CELL_MAX_CHARS) -> str:
    """A value for the terminal: floats to 6 significant digits, one line without control
    characters (each becomes a space, then runs of spaces one), cut at ``limit``."""
    if isinstance(value, float):
        text = format(value, ".6g")
    else:
        text = text_form(value) if value is not None else "-"
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def render_table(rows: Sequence[ResultRow], title: str | None = None,
                 width: int | None = None) -> RenderableType:
    """The rows for the terminal: every value on one line and cut when long, fixed columns
    no row has a value in left out (``--csv``/``--json`` have everything in full). Wider
    than ``width``, the columns are split over several tables, each led by the instance."""
    all_values = [row_values(r) for r in rows]
    cols = [c for c in columns(rows)
            if c not in OPTIONAL or any(v.get(c) not in (None, "") for v in all_values)]
    cells = {c: [_cell_text(c, v.get(c)) for v in all_values] for c in cols}
    parts = _split(cols, cells, width)
    tables = [_table(part, cells, len(rows), title if n == 0 else None)
              for n, part in enumerate(parts)]
    return tables[0] if len(tables) == 1 else Group(*tables)


def _cell_text(col: str, value: Scalar) -> Text:
    """One cell, styled: the state by its colour, a metrics error in yellow."""
    if col == "runtime_seconds" and isinstance(value, float):
        return Text(f"{value:.1f}")
    text = Text(cell(value, TEXT_MAX_CHARS if col in TAIL else CELL_MAX_CHARS))
    if col == "state":
        text.stylize(_STATE_STYLE.get(str(value), ""))
    elif col == "metrics_error" and value:
        text.stylize("yellow")
    return text


def _label(col: str) -> str:
    return cell(LABELS.get(col, col), CELL_MAX_CHARS)


def _split(cols: list[str], cells: Mapping[str, list[Text]],
           width: int | None) -> list[list[str]]:
    """Groups of columns that each fit ``width`` (the instance column leads every group)."""
    if width is None or not cols:
        return [cols]
    def need(col: str) -> int:  # content, one space either side, one border
        return max([cell_len(_label(col)), *(t.cell_len for t in cells[col])]) + 3
    lead, rest = cols[0], cols[1:]
    parts: list[list[str]] = []
    current, used = [lead], 1 + need(lead)
    for col in rest:
        if used + need(col) > width and len(current) > 1:
            parts.append(current)
            current, used = [lead], 1 + need(lead)
        current.append(col)
        used += need(col)
    parts.append(current)
    return parts


def _table(cols: list[str], cells: Mapping[str, list[Text]], count: int,
           title: str | None) -> Table:
    table = Table(title=title, title_justify="left")
    for col in cols:
        numeric = col in ("task_index", "exit_code", "attempts", "runtime_seconds")
        style = "cyan" if col.startswith(PARAM_PREFIX) else \
            "green" if col.startswith(METRIC_PREFIX) else "bold"
        table.add_column(_label(col), header_style=style, no_wrap=True, overflow="ellipsis",
                         justify="right" if numeric else "left")
    for i in range(count):
        table.add_row(*(cells[col][i] for col in cols))
    return table
