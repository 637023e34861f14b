"""Pure renderers for the CLI: plan tables, explanations, config summaries, JSON documents.

Each function turns values into rich renderables or plain dicts; printing is the caller's.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from infra.config.model import Cluster, ExperimentSpec
from infra.placement import Plan, why_not


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


def specs_table(specs: tuple[ExperimentSpec, ...]) -> Table:
    table = Table(title="Experiments", title_justify="left")
    for col in ("instance", "RAM GB", "GPU", "cores", "preferred", "affinity", "anti-affinity",
                "recover", "file"):
        table.add_column(col)
    for s in specs:
        gpu = f"yes ({_num(s.gpu_memory_gb)} GB)" if s.gpu_required else "no"
        cores = _num(s.cpu_cores) if s.cpu_cores else "-"
        table.add_row(s.experiment_id, _num(s.ram_gb), gpu, cores,
                      s.preferred_node or "-", ", ".join(s.affinity) or "-",
                      ", ".join(s.anti_affinity) or "-", s.recover.value, s.source.name)
    return table


def plan_table(plan: Plan) -> Table:
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


def explain(plan: Plan) -> RenderableType:
    """Per instance, each node's score parts or its rejection reason."""
    chosen = plan.as_dict()
    blocks: list[RenderableType] = []
    for instance, evals in plan.evaluations.items():
        table = Table(title=f"{instance} -> {chosen.get(instance, 'NOT PLACED')}",
                      title_justify="left")
        table.add_column("node")
        table.add_column("total")
        table.add_column("ram_eff")
        table.add_column("load")
        table.add_column("gpu")
        table.add_column("affinity")
        table.add_column("preferred")
        table.add_column("RAM use / why not")
        for ev in evals:
            mark = "*" if chosen.get(instance) == ev.node else ""
            if not ev.feasible:
                table.add_row(ev.node, "-", "", "", "", "", "", Text(f"rejected: {ev.rejection}",
                                                                     style="red"))
                continue
            pts = {p.name: p for p in ev.parts}
            cells = [_num(round(pts[k].points, 2)) if k in pts else "" for k in
                     ("ram_efficiency", "load_balance", "gpu_match", "affinity", "preferred_node")]
            detail = pts["ram_efficiency"].detail.split(" (")[0] if "ram_efficiency" in pts else ""
            if "affinity" in pts and pts["affinity"].points:
                detail += f"; {pts['affinity'].detail}"
            table.add_row(f"{ev.node}{mark}", _num(round(ev.total, 2)), *cells, detail)
        blocks.append(table)
    return Group(*blocks)


def plan_json(plan: Plan) -> dict[str, Any]:
    """The plan as JSON: ``placements`` maps instance -> node; per-instance node details."""
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
                         forced=list(placed.forced))
        elif instance in plan.pin_errors:
            entry["error"] = f"pin refused: {plan.pin_errors[instance]}"
        else:
            entry["error"] = f"cannot place: {why_not(plan, instance)}"
        instances[instance] = entry
    return {
        "placements": plan.as_dict(),
        "order": [p.instance_id for p in plan.placements],
        "instances": instances,
        "unplaced": list(plan.unplaced) + list(plan.pin_errors),
        "ok": plan.ok,
    }
