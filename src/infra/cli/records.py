"""``show RUN`` and ``compare RUN_A RUN_B``: a run's manifest, and what differs between two
runs (code, config, specs, nodes, outcomes, metrics). Local only: no node is asked."""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from infra.campaign.table import Scalar, build_rows, read_metrics_file, text_form
from infra.manifest.compare import SECTIONS, Comparison, Outcome, RunSide, compare
from infra.manifest.model import Manifest
from infra.runner.manifest import MANIFEST_FILE
from infra.state import Store
from infra.state.store import RunRecord

if TYPE_CHECKING:
    from infra.cli.main import Ctx

NO_MANIFEST = "no manifest recorded"
CELL_MAX = 80


SHOW_EXPERIMENTS = 20
"""``show`` lists this many experiments (a sweep's tasks); ``--json`` has them all."""


def _open(c: Ctx) -> Store:
    from infra.cli.actions import open_store
    return open_store(c.cluster)


def no_manifest_line(run: RunRecord) -> str:
    """Why a run has no manifest to show: recorded before manifests, or unreadable."""
    if run.manifest_error is not None:
        return f"run {run.run_id}: {NO_MANIFEST} (the stored one is unreadable: " \
               f"{run.manifest_error})"
    return f"run {run.run_id}: {NO_MANIFEST} (it was started before manifests were recorded, " \
           "or its manifest could not be written)"


# --------------------------------------------------------------------------- show

def do_show(c: Ctx, run_id: str | None) -> None:
    """Print a run's manifest, and where its manifest.json and code.patch are."""
    store = _open(c)
    try:
        run = store.resolve_run(run_id)
    finally:
        store.close()
    run_dir = c.cluster.log_dir / run.run_id
    m = run.manifest
    if c.json_out:
        c.emit_json({"run_id": run.run_id, "manifest": None if m is None else m.to_json(),
                     "manifest_file": _where(run_dir / MANIFEST_FILE),
                     "patch_file": None if m is None or m.git is None or not m.git.patch_file
                     else _where(run_dir / m.git.patch_file),
                     "note": None if m is not None else no_manifest_line(run)})
        return
    if m is None:
        c.console.print(no_manifest_line(run), soft_wrap=True)
        return
    c.console.print(manifest_view(m, run_dir))


def _where(path: Path) -> str | None:
    return str(path) if path.exists() else None


def manifest_view(m: Manifest, run_dir: Path) -> RenderableType:
    """The manifest, readably: summary lines, experiments, nodes, files."""
    from infra.cli.views import format_time
    head = Text()
    head.append(f"Run {m.run_id}", style="bold")
    head.append(f"  created {format_time(m.created_at)}")
    if m.finished_at is not None:
        head.append(f", end recorded {format_time(m.finished_at)}")
    head.append("\n")
    lines = [("tags", ", ".join(m.tags) or "-"),
             ("tool", f"{m.tool.name} {m.tool.version}"),
             ("command", shlex.join(m.command_line)),
             ("cwd", m.cwd)]
    if m.git is None:
        lines.append(("code", f"no git state ({m.git_error or 'unknown reason'})"))
    else:
        g = m.git
        lines.append(("code", f"commit {g.commit}" + (f" on {g.branch}" if g.branch
                                                       else " (detached HEAD)")
                      + (", dirty" if g.dirty else ", clean")))
        if g.patch_file:
            lines.append(("patch", f"{run_dir / g.patch_file} (sha256 {g.patch_sha256}); "
                          f"reproduce: git checkout {g.commit[:12]} && git apply "
                          f"{run_dir / g.patch_file}"))
        if g.untracked:
            lines.append(("untracked", ", ".join(g.untracked[:20])
                          + (f" (+{len(g.untracked) - 20} more)" if len(g.untracked) > 20
                             else "") + " (not in the patch)"))
    lines.append(("config", f"{m.config.path} (sha256 {m.config.sha256[:16]})"))
    for spec in m.specs:
        lines.append(("spec", f"{spec.path} (sha256 {spec.sha256[:16]})"))
    lines.append(("manifest", str(run_dir / MANIFEST_FILE)))
    for label, value in lines:
        head.append(f"{label:>10}: ", style="dim")
        head.append(value + "\n")
    parts: list[RenderableType] = [head]
    if m.experiments:
        exps = Table(title="Experiments", title_justify="left")
        for col in ("id", "command", "params"):
            exps.add_column(col)
        shown = list(m.experiments.items())[:SHOW_EXPERIMENTS]
        for eid, doc in shown:
            params = doc.get("params") or {}
            exps.add_row(Text(eid), Text(_cut(str(doc.get("command", "")))),
                         Text(_cut(", ".join(f"{k}={v}" for k, v in params.items())
                                   if isinstance(params, dict) else str(params)) or "-"))
        parts.append(exps)
        if len(m.experiments) > len(shown):
            parts.append(Text(f"... and {len(m.experiments) - len(shown)} more experiments "
                              "(show RUN --json lists them all)", style="dim"))
    if m.nodes:
        parts.append(Text("Nodes", style="italic"))
        parts.append(_nodes_text(m))
    return Group(*parts)


def _nodes_text(m: Manifest) -> Text:
    """One block per node: what it was (a table this wide would not fit a terminal)."""
    out = Text()
    for name, n in m.nodes.items():
        after = n.after_error if n.after_error is not None else (
            "-" if n.throttled_after is None else n.throttled_after.describe())
        rows = [("host", f"{n.hostname} ({n.arch}), python {n.python}"),
                ("system", f"{n.os}, kernel {n.kernel}")]
        if n.l4t or n.jetpack or n.nvpmodel:
            rows.append(("jetson", ", ".join(x for x in (
                f"L4T {n.l4t}" if n.l4t else "", f"JetPack {n.jetpack}" if n.jetpack else "",
                f"nvpmodel {n.nvpmodel}" if n.nvpmodel else "") if x)))
        if n.gpus:
            rows.append(("gpus", ", ".join(g.name + (f" (driver {g.driver})" if g.driver
                                                     else "") for g in n.gpus)))
        rows.append(("throttled", "before: " + ("-" if n.throttled_before is None
                                                 else n.throttled_before.describe())
                     + "; after: " + (after if m.finished_at is not None
                                      else "(run not seen finished)")))
        out.append(f"  {name}\n", style="bold")
        for label, value in rows:
            out.append(f"{label:>12}: ", style="dim")
            out.append(value + "\n")
    return out


def _cut(text: str, limit: int = CELL_MAX) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --------------------------------------------------------------------------- compare

def do_compare(c: Ctx, first: str, second: str) -> None:
    """Show what differs between two runs (exit 0 whether or not anything does)."""
    store = _open(c)
    try:
        a = run_side(c, store, first)
        b = run_side(c, store, second)
    finally:
        store.close()
    result = compare(a, b)
    if c.json_out:
        c.emit_json(result.to_json())
        return
    c.console.print(comparison_view(result))


def run_side(c: Ctx, store: Store, run_id: str) -> RunSide:
    """One run's manifest, outcomes and metrics (metrics.json as fetched home, and the
    telemetry summary of each instance when there is one)."""
    run = store.resolve_run(run_id)
    run_dir = c.cluster.log_dir / run.run_id
    rows = build_rows(store.instances(run.run_id),
                      lambda rec: read_metrics_file(run_dir, rec.instance_id))
    outcomes = {r.instance_id: Outcome(r.state, r.exit_code, r.runtime_seconds, r.node)
                for r in rows}
    metrics: dict[str, dict[str, Scalar]] = {}
    for r in rows:
        values: dict[str, Scalar] = dict(r.metrics)
        values.update(telemetry_metrics(c.cluster.log_dir, run.run_id, r.instance_id))
        if values:
            metrics[r.instance_id] = values
    return RunSide(run.run_id, run.manifest, outcomes, metrics)


def telemetry_metrics(log_dir: Path, run_id: str, instance_id: str) -> dict[str, Scalar]:
    """The instance's telemetry summary as metrics (``telemetry.cpu_percent.mean`` ...);
    nothing when it has no telemetry at home."""
    from infra.telemetry.files import read_samples, telemetry_path
    from infra.telemetry.summary import summarize
    samples = read_samples(telemetry_path(log_dir, run_id, instance_id))
    if not samples:
        return {}
    return {str(k): v for k, v in summarize(samples).as_metrics().items()}


def comparison_view(result: Comparison) -> RenderableType:
    """Each section: "same", or a table of what differs (A's value against B's)."""
    head = Text()
    head.append(f"Compare {result.run_a} (A) with {result.run_b} (B)", style="bold")
    head.append(": no differences\n" if result.same else "\n")
    parts: list[RenderableType] = [head]
    for name in SECTIONS:
        section = result.section(name)
        line = Text(f"{name}: ", style="bold")
        if not section.differences:
            line.append("same" if section.note is None else section.note,
                        style="dim" if section.note is None else "yellow")
            parts.append(line)
            continue
        line.append(f"{len(section.differences)} difference(s)"
                    + (f" ({section.note})" if section.note else ""))
        parts.append(line)
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0))
        for col in ("of", "key", "A", "B"):
            table.add_column(col, overflow="fold")
        for d in section.differences:
            table.add_row(Text(d.subject), Text(d.key), _value(d.a), _value(d.b))
        parts.append(table)
    return Group(*parts)


def _value(value: Any) -> Text:
    """One side's value: numbers to 6 significant digits (a mean is not more exact)."""
    if value is None:
        return Text("(absent)", style="dim")
    if isinstance(value, float) and math.isfinite(value):
        return Text(str(int(value)) if value.is_integer() else format(value, ".6g"))
    return Text(_cut(text_form(value), 120))
