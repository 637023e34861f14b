"""Pure renderers for the CLI: plan tables, explanations, config summaries, JSON documents.

Each function turns values into rich renderables or plain dicts; printing is the caller's.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from infra.errors import DeployRefused, InfraError

if TYPE_CHECKING:  # the renderers' inputs; their modules load with the commands that use them
    from infra.campaign.summary import CampaignSummary
    from infra.config.model import Cluster, ExperimentSpec
    from infra.placement import NodeEvaluation, Plan, ScorePart
    from infra.probe.health import NodeHealth
    from infra.runner.deploy import DeployResult
    from infra.runner.lifecycle import StopReport
    from infra.runner.prune import PruneReport
    from infra.runner.results import ResultsFetch
    from infra.runner.supervisor_client import PrunedRun
    from infra.state import InstanceRecord, PoolRecord, RunRecord


def _num(value: float) -> str:
    return f"{value:g}"


def nodes_table(cluster: Cluster) -> Table:
    """Summary of the topology: capacities and how each node is reached."""
    table = Table(title=f"Cluster {cluster.cluster.name} ({cluster.path})", title_justify="left")
    for col in ("node", "type", "reached as", "on", "RAM GB (free)", "GPU", "cores",
                "slots"):
        table.add_column(col)
    for n in cluster.nodes:
        gpu = "-"
        if n.gpu:
            gpu = "unified" if n.unified_memory else f"{_num(n.gpu_memory_gb)} GB"
        user = f"{n.ssh_user}@" if n.ssh_user else ""
        reach = "local" if n.is_local else f"{user}{n.host}:{n.ssh_port}"
        table.add_row(n.name, n.type.value, reach, "yes" if n.enabled else "[dim]no[/]",
                      f"{_num(n.ram_gb)} ({_num(n.available_ram_gb)})", gpu, str(n.cpu_cores),
                      str(n.max_instances))
    return table


def slurm_targets_table(cluster: Cluster) -> Table:
    """The Slurm targets: login host, what jobs are submitted with, the work dir."""
    table = Table(title="Slurm targets (work goes there only when pinned)",
                  title_justify="left")
    for col in ("target", "login host", "on", "submits with", "work dir"):
        table.add_column(col, overflow="fold")
    for t in cluster.slurm_targets:
        user = f"{t.ssh_user}@" if t.ssh_user else ""
        submit = [f"{k} {v}" for k, v in (("partition", t.partition), ("account", t.account),
                                          ("qos", t.qos)) if v]
        submit.append(f"time {t.time_limit}")
        table.add_row(t.name, f"{user}{t.host}:{t.ssh_port}", "yes" if t.enabled else "[dim]no[/]",
                      ", ".join(submit), t.remote_work_dir)
    return table


def specs_table(specs: tuple[ExperimentSpec, ...]) -> Table:
    table = Table(title="Experiments", title_justify="left")
    for col in ("instance", "RAM GB", "GPU", "cores", "preferred", "affinity", "anti-affinity",
                "recover", "file"):
        table.add_column(col)
    tasks: dict[str, list[str]] = {}  # a sweep's tasks ask alike: one row per sweep
    for s in specs:
        if s.task_index is not None and s.template_id is not None:
            tasks.setdefault(s.template_id, []).append(s.experiment_id)
    for s in specs:
        name = s.experiment_id
        if s.task_index is not None and s.template_id is not None:
            ids = tasks.pop(s.template_id, None)
            if ids is None:
                continue
            name = f"{s.template_id} ({len(ids)} tasks: {ids[0]}..{ids[-1]})"
        gpu = f"yes ({_num(s.gpu_memory_gb)} GB)" if s.gpu_required else "no"
        cores = _num(s.cpu_cores) if s.cpu_cores else "-"
        table.add_row(name, _num(s.ram_gb), gpu, cores,
                      s.preferred_node or "-", _ids(s.affinity), _ids(s.anti_affinity),
                      s.recover.value, s.source.name)
    return table


def _ids(ids: tuple[str, ...], limit: int = 4) -> str:
    """A list of instance ids for a table cell, long ones shortened."""
    if len(ids) <= limit:
        return ", ".join(ids) or "-"
    return f"{', '.join(ids[:limit - 1])}, ... {ids[-1]} ({len(ids)})"


def plan_table(plan: Plan) -> Table:
    from infra.placement import why_not
    table = Table(title="Placement plan", title_justify="left")
    for col in ("instance", "node", "score", "how"):
        table.add_column(col)
    for p in plan.placements:
        how = "pinned" if p.pinned else "auto"
        if p.forced:
            how += " [red](forced: " + "; ".join(p.forced) + ")[/]"
        table.add_row(p.instance_id, p.node, _num(round(p.score, 2)), how)
    for instance in plan.unplaced:
        why = why_not(plan, instance)
        table.add_row(instance, "[red]-[/]", "-", f"[red]cannot place: {why}[/]")
    for instance, reason in plan.pin_errors.items():
        table.add_row(instance, "[red]-[/]", "-", f"[red]pin refused: {reason}[/]")
    return table


def queued_summary(queued: Sequence[ExperimentSpec],
                   waves: Mapping[str, Mapping[str, int]] | None = None) -> str:
    """One line per campaign (and per dependent experiment) that waits in the queue; with
    ``waves``, where each campaign's first worker slots would go now."""
    lines = []
    groups: dict[str, list[ExperimentSpec]] = {}
    for spec in queued:
        key = spec.campaign.name if spec.campaign is not None else spec.experiment_id
        groups.setdefault(key, []).append(spec)
    for key, specs in groups.items():
        first = specs[0]
        camp = first.campaign
        parts = []
        if camp is not None:
            parts.append(f"{len(specs)} task(s)")
            if camp.max_parallel is not None:
                parts.append(f"at most {camp.max_parallel} at once")
            parts.append(f"dispatch {camp.dispatch.value}")
            if camp.suite is not None:
                parts.append("suite" + (f" with {camp.suite.workers} worker(s) per node"
                                        if camp.suite.workers else ""))
        if first.after:
            parts.append(f"after {', '.join(first.after)}")
        if first.after_any:
            parts.append(f"after any end of {', '.join(first.after_any)}")
        lines.append(f"queued: {key}: {'; '.join(parts)}")
        if waves is not None and key in waves:
            slots = waves[key]
            where = ", ".join(f"{n} x{k}" for n, k in sorted(slots.items())) or \
                "no slot free now (the tasks wait)"
            lines.append(f"  first wave: {where}")
    return "\n".join(lines)


# Short column headers for known score parts; any other part shows under its own name.
PART_LABELS = {"ram_efficiency": "ram_eff", "load_balance": "load", "gpu_match": "gpu",
               "preferred_node": "preferred", "binpack_cpu": "cpu fit", "binpack_memory":
               "mem fit", "spread_cpu": "cpu spread", "spread_memory": "mem spread"}


def _part_names(evals: tuple[NodeEvaluation, ...]) -> list[str]:
    """Every score part any feasible node got, in the order the strategy produces them."""
    names: dict[str, None] = {}
    for ev in evals:
        for part in ev.parts:
            names.setdefault(part.name, None)
    return list(names)


def _detail(parts: tuple[ScorePart, ...]) -> str:
    """The headline detail (the first part, and its siblings like binpack_cpu/_memory), plus
    the affinity peers if any."""
    if not parts:
        return ""
    family = parts[0].name.split("_")[0] + "_"
    details = [p.detail.split(" (")[0] for p in parts if p.name.startswith(family) and p.detail]
    details += [p.detail for p in parts if p.name == "affinity" and p.points]
    return "; ".join(details)


def explain(plan: Plan) -> RenderableType:
    """Per instance, each node's score parts (whatever the strategy produces) or its
    rejection reason; the chosen node's allocation under the title when it has one."""
    placed = {p.instance_id: p for p in plan.placements}
    blocks: list[RenderableType] = []
    for instance, evals in plan.evaluations.items():
        p = placed.get(instance)
        title = f"{instance} -> {p.node if p else 'NOT PLACED'}"
        if p is not None and p.allocation is not None and p.allocation.summary():
            title += f" [{p.allocation.summary()}]"
        table = Table(title=Text(title), title_justify="left")
        names = _part_names(evals)
        table.add_column("node")
        table.add_column("total")
        for name in names:
            table.add_column(PART_LABELS.get(name, name))
        table.add_column("detail / why not")
        for ev in evals:
            mark = "*" if p is not None and p.node == ev.node else ""
            if not ev.feasible:
                table.add_row(ev.node, "-", *([""] * len(names)),
                              Text(f"rejected: {ev.rejection}", style="red"))
                continue
            pts = {part.name: part for part in ev.parts}
            cells = [_num(round(pts[k].points, 2)) if k in pts else "" for k in names]
            table.add_row(f"{ev.node}{mark}", _num(round(ev.total, 2)), *cells,
                          _detail(ev.parts))
        blocks.append(table)
    return Group(*blocks)


def plan_json(plan: Plan) -> dict[str, Any]:
    """The plan as JSON: ``placements`` maps instance -> node; per-instance node details."""
    from infra.placement import why_not
    instances: dict[str, Any] = {}
    by_id = {p.instance_id: p for p in plan.placements}
    for instance, evals in plan.evaluations.items():
        placed = by_id.get(instance)
        nodes: dict[str, Any] = {}
        for ev in evals:
            if ev.feasible:
                nodes[ev.node] = {
                    "feasible": True,
                    "score": round(ev.total, 6),
                    "parts": {p.name: {"points": round(p.points, 6), "detail": p.detail}
                              for p in ev.parts},
                }
            else:
                nodes[ev.node] = {"feasible": False, "reason": ev.rejection}
        entry: dict[str, Any] = {"node": placed.node if placed else None, "nodes": nodes}
        if placed:
            entry.update(score=round(placed.score, 6), pinned=placed.pinned,
                         forced=list(placed.forced),
                         allocation=placed.allocation.to_json() if placed.allocation else None)
        elif instance in plan.pin_errors:
            entry["error"] = f"pin refused: {plan.pin_errors[instance]}"
        else:
            entry["error"] = f"cannot place: {why_not(plan, instance)}"
        instances[instance] = entry
    return {
        "placements": plan.as_dict(),
        "strategy": plan.strategy.value,
        "order": [p.instance_id for p in plan.placements],
        "instances": instances,
        "unplaced": list(plan.unplaced) + list(plan.pin_errors),
        "ok": plan.ok,
    }


# --------------------------------------------------------------------------- health

_STATUS_STYLE = {"healthy": "green", "degraded": "yellow", "unavailable": "red",
                 "maintenance": "blue"}


def health_table(cluster: Cluster, health: Mapping[str, NodeHealth]) -> Table:
    """Status, the reason, what was detected, and declared-vs-detected mismatches."""
    table = Table(title="Health check", title_justify="left")
    for col in ("node", "status", "detail", "mem used/total GB", "load 1m", "disk free GB",
                "GPUs", "declared vs detected"):
        table.add_column(col)
    for name, h in health.items():
        style = _STATUS_STYLE.get(h.status.value, "")
        status = f"[{style}]{h.status.value.upper()}[/]"
        detail = h.error or "; ".join(h.reasons) or ""
        f = h.facts
        if f is None:
            table.add_row(name, status, detail, "", "", "", "", "")
            continue
        used = f.mem_total_gb - f.mem_available_gb
        gpus = ", ".join(g.name for g in f.gpus) or "-"
        mism = "; ".join(m.describe() for m in h.mismatches) or "-"
        table.add_row(name, status, detail or f"{f.hostname} {f.arch}",
                      f"{used:.1f}/{f.mem_total_gb:.1f}", f"{f.load[0]:.2f}",
                      "-" if f.disk_free_gb is None else f"{f.disk_free_gb:.1f}", gpus, mism)
    return table


def health_json(h: NodeHealth) -> dict[str, Any]:
    doc: dict[str, Any] = {"status": h.status.value.upper(), "reasons": list(h.reasons),
                           "error": h.error,
                           "mismatches": [{"field": m.field, "declared": m.declared,
                                           "detected": m.detected} for m in h.mismatches]}
    if h.facts is not None:
        doc["facts"] = dataclasses.asdict(h.facts)
    return doc


# --------------------------------------------------------------------------- deploy

def deploy_table(results: Mapping[str, DeployResult | InfraError], *, dry_run: bool,
                 max_deletes: int | None = None) -> Table:
    table = Table(title="Deploy" + (" (dry run: nothing changed)" if dry_run else ""),
                  title_justify="left")
    for col in ("node", "result", "files sent", "bytes sent", "files in tree", "detail"):
        table.add_column(col)
    for node, r in results.items():
        if isinstance(r, DeployRefused):
            table.add_row(node, "[red]refused[/]", "", "", "",
                          f"would delete {r.count} (> deploy.max_deletes {r.limit}); "
                          "nothing changed")
        elif isinstance(r, InfraError):
            table.add_row(node, "[red]failed[/]", "", "", "", r.one_line())
        elif r.skipped or r.stats is None:
            table.add_row(node, "skipped", "", "", "", r.reason)
        else:
            s = r.stats
            changed = ", ".join(list(s.changed[:5]) + ([f"+{len(s.changed) - 5} more"]
                                                      if len(s.changed) > 5 else []))
            deleted = f"; {'would delete' if dry_run else 'deleted'} {len(s.deleted)}" \
                if s.deleted else ""
            if dry_run and over_limit(r, max_deletes):
                deleted += f" (> deploy.max_deletes {max_deletes}: needs --yes)"
            table.add_row(node, "[green]would change[/]" if dry_run else "[green]ok[/]",
                          str(s.files_transferred), str(s.bytes_sent), str(s.total_files),
                          (changed or "no changes") + deleted)
    return table


def over_limit(r: DeployResult, max_deletes: int | None) -> bool:
    """A dry run's deletions that a real deploy would refuse without --yes."""
    return (max_deletes is not None and r.stats is not None
            and len(r.stats.deleted) > max_deletes)


def deletions_text(results: Mapping[str, DeployResult | InfraError],
                   max_deletes: int | None) -> Text:
    """A dry run's full list of what ``--delete`` would remove, per node (plain text)."""
    from infra.runner.deploy import DeployResult
    text = Text()
    for node, r in results.items():
        if isinstance(r, DeployResult) and r.stats is not None and r.stats.deleted:
            note = " (over deploy.max_deletes: a deploy needs --yes)" \
                if over_limit(r, max_deletes) else ""
            text.append(f"{node}: would delete {len(r.stats.deleted)}{note}:\n")
            for path in r.stats.deleted:
                text.append(f"  {path}\n")
    return text


def deploy_json(r: DeployResult | InfraError, max_deletes: int | None = None) -> dict[str, Any]:
    if isinstance(r, DeployRefused):
        return {"ok": False, "error": r.one_line(), "refused": True,
                "would_delete": r.count, "deleted": list(r.paths)}
    if isinstance(r, InfraError):
        return {"ok": False, "error": r.one_line()}
    doc: dict[str, Any] = {"ok": True, "skipped": r.skipped, "reason": r.reason}
    if r.stats is not None:
        doc.update(dataclasses.asdict(r.stats))
        if r.reason == "dry run":
            doc["needs_yes"] = over_limit(r, max_deletes)
    return doc


# --------------------------------------------------------------------------- runs

_PHASE_STYLE = {"running": "green", "exited": "cyan", "failed": "red", "lost": "red",
                "stopped": "yellow", "restarting": "yellow", "unknown": "dim"}


def _ended(rec: InstanceRecord) -> str:
    if rec.signal:
        return rec.signal
    if rec.exit_code is not None:
        return f"exit {rec.exit_code}"
    return "-"


def instances_table(run: RunRecord, records: list[InstanceRecord]) -> Table:
    from infra.campaign.summary import shown_rows
    from infra.dashboard.render import format_duration
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.created_at))
    table = Table(title=f"Run {run.run_id} ({run.state.value}, started {stamp})",
                  title_justify="left")
    for col in ("instance", "node", "state", "pid", "exit", "runtime", "restarts", "detail"):
        table.add_column(col)
    shown, hidden = shown_rows(records)
    if hidden:
        table.caption = (f"{hidden} more campaign task(s) (queued, dispatched, exited, "
                         "cancelled or skipped) are counted in the campaign lines")
    for r in shown:
        style = _PHASE_STYLE.get(r.state.value, "")
        state = f"[{style}]{r.state.value}[/]" if style else r.state.value
        table.add_row(r.instance_id, r.node, state, str(r.pid or "-"), _ended(r),
                      format_duration(r.runtime_seconds), str(r.restarts), _instance_detail(r))
    return table


def _instance_detail(r: InstanceRecord) -> Text:
    """The reason or last line, then what the last results fetch could not bring home."""
    text = Text(r.reason or r.last_line)
    if r.results_missing:
        first = r.results_missing[0].one_line()
        more = f" (+{len(r.results_missing) - 1} more)" if len(r.results_missing) > 1 else ""
        text.append(("\n" if text.plain else "") + f"results missing: {first}{more}",
                    style="yellow")
    return text


def fetch_json(outcome: ResultsFetch | InfraError) -> list[str] | dict[str, str]:
    """One instance's entry in ``results --json``: the files fetched, or the error."""
    if isinstance(outcome, InfraError):
        return {"error": outcome.one_line()}
    return [str(f) for f in outcome.files]


def fetch_lines(instance: str, outcome: ResultsFetch | InfraError,
                log_dir: Path) -> RenderableType:
    """One instance's block in ``results``: its files (relative to the log dir) and what
    did not come home, each with its reason."""
    if isinstance(outcome, InfraError):
        return Text(f"{instance}: {outcome.one_line()}", style="red")
    lines = [Text(f"{instance}: {len(outcome.files)} file(s)")]
    lines += [Text(f"  {_relative(f, log_dir)}") for f in outcome.files]
    lines += [Text(f"  not fetched: {i.one_line()}", style="yellow") for i in outcome.issues]
    return Group(*lines)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root.resolve()))
    except ValueError:
        return str(path)


def fetch_problem(instance: str, outcome: ResultsFetch | InfraError) -> str | None:
    """The one-line summary of what went wrong for one instance, or None."""
    if isinstance(outcome, InfraError):
        return f"{instance}: {outcome.one_line()}"
    if not outcome.issues:
        return None
    more = ", ..." if len(outcome.issues) > 1 else ""
    return (f"{instance}: {len(outcome.issues)} not fetched "
            f"({outcome.issues[0].one_line()}{more})")


FAILED_SHOWN = 20
"""Failed tasks a campaign block lists by name (the JSON has them all)."""


def campaign_block(summaries: Sequence[CampaignSummary]) -> Text:
    """Per campaign: its counts, its pools per node, why work waits, its failed tasks."""
    text = Text()
    for summary in summaries:
        text.append(summary.line() + "\n", style="bold")
        for pool in summary.pools:
            what = "gave up" if pool.abandoned else pool.state
            detail = f"{pool.workers} worker(s), {pool.running} running, {pool.queued} held"
            reason = f": {pool.reason}" if pool.reason else ""
            text.append(f"  pool on {pool.node}: {what} ({detail}){reason}\n",
                        style="yellow" if pool.abandoned else "")
        if summary.queued_reason:
            text.append(f"  {summary.queued_reason}\n", style="yellow")
        for task, reason in summary.failed[:FAILED_SHOWN]:
            text.append(f"  failed: {task}: {reason}\n", style="red")
        if len(summary.failed) > FAILED_SHOWN:
            text.append(f"  ... and {len(summary.failed) - FAILED_SHOWN} more failed "
                        "(status --json lists them all)\n", style="red")
    return text


def telemetry_json(log_dir: Path, rec: InstanceRecord, now: float) -> dict[str, Any] | None:
    """The newest telemetry sample of an instance's home copy for ``status --json``: its
    time, age and main values (None: nothing came home yet). Only a watcher brings it home."""
    from infra.runner.telemetry_home import last_sample
    from infra.telemetry.files import telemetry_path
    sample = last_sample(telemetry_path(log_dir, rec.run_id, rec.instance_id))
    if sample is None:
        return None
    return {"t": sample.t, "age_seconds": round(max(0.0, now - sample.t), 3),
            "cpu_percent": sample.cpu_percent, "rss_bytes": sample.rss_bytes,
            "procs": sample.procs, "gpu_util_percent": sample.gpu_util_percent,
            "gpu_mem_mb": sample.gpu_mem_mb, "power_w": sample.power_w,
            "temp_c": sample.max_temp_c}


def status_json(run: RunRecord, records: list[InstanceRecord],
                pools: Sequence[PoolRecord] = (), log_dir: Path | None = None,
                ) -> dict[str, Any]:
    """The run and its instances as ``--json`` prints them; with ``log_dir`` each instance
    that has telemetry at home gets its newest sample under ``telemetry``."""
    from infra.campaign.summary import summarize
    now = time.time()
    return {
        "campaigns": [c.to_json() for c in summarize(records, pools)],
        "run_id": run.run_id,
        "state": run.state.value,
        "created_at": run.created_at,
        "cluster_config": run.cluster_config,
        "placements": {r.instance_id: r.node for r in records},
        "instances": [{
            "instance_id": r.instance_id, "node": r.node, "state": r.state.value,
            "pid": r.pid, "exit_code": r.exit_code, "signal": r.signal,
            "started_at": r.started_at, "ended_at": r.ended_at,
            "runtime_seconds": r.runtime_seconds, "restarts": r.restarts, "moves": r.moves,
            "failure_class": r.failure_class.value if r.failure_class else None,
            "reason": r.reason, "last_line": r.last_line, "log_bytes": r.log_offset,
            "results_fetched": r.results_fetched,
            "results_missing": [i.to_json() for i in r.results_missing],
            **({"telemetry": telemetry_json(log_dir, r, now)} if log_dir is not None else {}),
        } for r in records],
    }


# --------------------------------------------------------------------------- run list

@dataclasses.dataclass(frozen=True)
class RunSummary:
    """One row of ``runs``: a run and what its instances add up to."""

    run_id: str
    created_at: float
    state: str
    instances: int
    states: dict[str, int]          # instance state -> count
    nodes: tuple[str, ...]          # every node it used (moves included), sorted
    pruned_at: float | None
    commit: str | None = None       # short commit, "+dirty" when the tree was (manifest)
    tags: tuple[str, ...] = ()


def run_summary(run: RunRecord, records: list[InstanceRecord]) -> RunSummary:
    """Fold a run's instances into its row (pure)."""
    states: dict[str, int] = {}
    for r in records:
        states[r.state.value] = states.get(r.state.value, 0) + 1
    nodes = {r.node for r in records} | {n for r in records for n in r.previous_nodes}
    manifest = run.manifest
    git = None if manifest is None else manifest.git
    return RunSummary(run.run_id, run.created_at, run.state.value, len(records), states,
                      tuple(sorted(nodes)), run.pruned_at,
                      commit=None if git is None else git.short,
                      tags=() if manifest is None else manifest.tags)


def format_time(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


_RUN_STYLE = {"running": "green", "finished": "cyan", "failed": "red", "stopped": "yellow",
              "starting": "yellow", "planned": "dim"}


def runs_table(rows: list[RunSummary]) -> Table:
    """The run list, newest first, as given."""
    # no vertical rules: seven columns fit an 80-column terminal
    table = Table(title="Runs (newest first)", title_justify="left", box=box.SIMPLE_HEAD,
                  show_edge=False, padding=(0, 1, 0, 0))
    fixed = {"run": 22, "started": 11, "state": 8, "commit": 10}
    for col in ("run", "started", "state", "instances", "nodes", "commit", "tags"):
        table.add_column(col, no_wrap=col in fixed, min_width=fixed.get(col))
    for r in rows:
        style = _RUN_STYLE.get(r.state, "")
        state = Text(r.state, style=style)
        if r.pruned_at is not None:
            state.append(" (pruned)", style="dim")
        counts = ", ".join(f"{n} {s}" for s, n in sorted(r.states.items()))
        table.add_row(Text(r.run_id), time.strftime("%m-%d %H:%M", time.localtime(r.created_at)),
                      state,
                      Text(f"{r.instances}" + (f" ({counts})" if counts else "")),
                      Text(", ".join(r.nodes) or "-"), Text(r.commit or "-"),
                      Text(", ".join(r.tags) or "-"))
    return table


def runs_json(rows: list[RunSummary]) -> dict[str, Any]:
    return {"runs": [{"run_id": r.run_id, "created_at": r.created_at, "state": r.state,
                      "instances": r.instances, "states": r.states, "nodes": list(r.nodes),
                      "pruned_at": r.pruned_at, "commit": r.commit, "tags": list(r.tags)}
                     for r in rows]}


# --------------------------------------------------------------------------- stop

def stop_lines(report: StopReport) -> Text:
    """What a stop did: what it stopped, and what was already over (left as it was)."""
    text = Text()
    if report.stopped:
        text.append(f"stopped: {some(report.stopped)}\n")
    if report.cancelled:
        text.append(f"cancelled before they started: {some(report.cancelled)}\n")
    if report.already_over:
        text.append("already over (left as they were): " + some(
            [f"{i} {s}" for i, s in sorted(report.already_over.items())]) + "\n")
    if not report.stopped and not report.already_over and not report.errors \
            and not report.cancelled:
        text.append("nothing to stop\n")
    return text


def some(items: Sequence[str], limit: int = 12) -> str:
    """A list for one line: the first ``limit`` items and how many more (campaigns are long)."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def stop_json(report: StopReport) -> dict[str, Any]:
    return {"stopped": list(report.stopped), "cancelled": list(report.cancelled),
            "already_over": dict(report.already_over), "errors": dict(report.errors)}


# --------------------------------------------------------------------------- prune

def format_bytes(n: int) -> str:
    """1.5 KiB, 3.2 MiB, ...; plain bytes under 1 KiB."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _node_cell(node: str, answer: PrunedRun | str) -> str:
    if isinstance(answer, str):
        return f"{node}: {answer}"
    what = answer.state.value.replace("_", " ")
    if answer.state.value == "active":
        what += f" ({', '.join(answer.active)})"
    if answer.error:
        what += f": {answer.error}"
    return f"{node}: {what} {format_bytes(answer.bytes)}"


def prune_table(report: PruneReport) -> Table:
    """Per run: what each node did (or would do) with its directory, then locally."""
    title = "Prune" + (" (dry run: nothing removed)" if report.dry_run else "")
    table = Table(title=title, title_justify="left")
    for col in ("run", "ended", "nodes", "local", "detail"):
        table.add_column(col)
    for r in report.runs:
        nodes = "\n".join(_node_cell(n, a) for n, a in r.nodes.items()) or "-"
        local = f"{r.local.value.replace('_', ' ')} {format_bytes(r.local_bytes)}"
        table.add_row(Text(r.run_id), format_time(r.ended_at), Text(nodes), local, Text(r.reason))
    return table


def prune_lines(report: PruneReport) -> Text:
    """The runs left alone before asking, the nodes that failed, and the totals."""
    text = Text()
    for s in report.skipped:
        text.append(f"skipped {s.run_id}: {s.reason}\n")
    for node, why in sorted(report.node_errors.items()):
        text.append(f"{node}: not reachable ({why}); its runs were skipped\n", style="yellow")
    done = "would free" if report.dry_run else "freed"
    text.append(f"{len([r for r in report.runs if r.local.value != 'kept'])} run(s), "
                f"{done} {format_bytes(_nodes_total(report))} on nodes and "
                f"{format_bytes(_local_total(report))} locally\n")
    return text


def _gone(answer: PrunedRun | str) -> bool:
    from infra.runner.supervisor_client import PrunedRun
    return isinstance(answer, PrunedRun) and answer.state.value in ("pruned", "would_prune")


def _nodes_total(report: PruneReport) -> int:
    from infra.runner.supervisor_client import PrunedRun
    return sum(a.bytes for r in report.runs for a in r.nodes.values()
               if isinstance(a, PrunedRun) and _gone(a))


def _local_total(report: PruneReport) -> int:
    return sum(r.local_bytes for r in report.runs if r.local.value != "kept")


def prune_json(report: PruneReport) -> dict[str, Any]:
    def node_doc(a: PrunedRun | str) -> dict[str, Any]:
        if isinstance(a, str):
            return {"state": "error", "error": a, "bytes": 0, "active": []}
        return {"state": a.state.value, "bytes": a.bytes, "active": list(a.active),
                "error": a.error}
    return {"dry_run": report.dry_run, "cutoff": report.cutoff,
            "runs": [{"run_id": r.run_id, "ended_at": r.ended_at,
                      "nodes": {n: node_doc(a) for n, a in r.nodes.items()},
                      "local": {"state": r.local.value, "bytes": r.local_bytes},
                      "reason": r.reason} for r in report.runs],
            "skipped": [{"run_id": s.run_id, "reason": s.reason} for s in report.skipped],
            "unreachable": dict(report.node_errors),
            "bytes": {"nodes": _nodes_total(report), "local": _local_total(report)},
            "ok": not report.failed}
