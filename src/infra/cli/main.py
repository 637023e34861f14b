"""The ``cluster-experiment`` command line (also ``scripts/cluster_experiment.py``).

Reference-style flags on the root command (``--validate-config``, ``--health-check``,
``--deploy-all``, ``--config ... --auto-place``) plus subcommands for runs (``runs``,
``status``, ``logs``, ``stop``, ``results``, ``report``, ``prune``). Every ``InfraError``
becomes one line on stderr and a non-zero exit code; user mistakes never print a traceback.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NoReturn

import click

from infra import __version__
from infra.cli.params import GRACE_MAX_SECONDS, STRATEGY_CHOICES, WATCH_MAX_SECONDS, Seconds
from infra.errors import InfraError, PlacementError, UsageError

if TYPE_CHECKING:  # the heavy modules load inside the commands that need them (fast --help)
    from pathlib import Path

    from rich.console import Console

    from infra.config import Cluster, ExperimentSpec
    from infra.placement import Plan

DEFAULT_CLUSTER_CONFIG = "cluster_config.yaml"
SPEC_SUFFIXES = (".json", ".yaml", ".yml")


@dataclass
class Ctx:
    """What every command needs: where the topology is and how to print."""

    cluster_config: str
    json_out: bool = False
    accept_new: bool = False  # --accept-new-host-keys: record first-contact host keys
    yes: bool = False  # --yes: deploys may delete more than deploy.max_deletes files
    _cluster: Cluster | None = None
    _out: Console | None = field(default=None, repr=False)
    _err: Console | None = field(default=None, repr=False)

    @property
    def console(self) -> Console:
        """stdout's rich console, made on first print (``--json`` paths never load rich)."""
        if self._out is None:
            self._out = _console()
        return self._out

    @property
    def err(self) -> Console:
        """stderr's rich console, made on first use."""
        if self._err is None:
            self._err = _console(stderr=True)
        return self._err

    @property
    def cluster(self) -> Cluster:
        if self._cluster is None:
            from infra.config import load_cluster
            cluster = load_cluster(self.cluster_config)
            if self.accept_new:
                from infra.cli.health import with_accept_new
                cluster = with_accept_new(cluster, True)
            self._cluster = cluster
        return self._cluster

    def emit_json(self, document: Any) -> None:
        import json
        click.echo(json.dumps(document, indent=2, sort_keys=False, default=str))


def _console(stderr: bool = False) -> Console:
    """A rich console without highlighting (rich loads only when a command prints)."""
    from rich.console import Console
    return Console(stderr=stderr, highlight=False)


def find_cluster_config(explicit: str | None) -> str:
    """The topology file: the flag, else $INFRA_CLUSTER_CONFIG, else ./cluster_config.yaml."""
    from pathlib import Path

    from infra.config.reader import check_path_text
    if explicit is not None:
        return check_path_text("--cluster-config", explicit)
    env = os.environ.get("INFRA_CLUSTER_CONFIG")
    if env:
        return check_path_text("INFRA_CLUSTER_CONFIG", env)
    if not Path(DEFAULT_CLUSTER_CONFIG).exists():
        raise UsageError(f"{DEFAULT_CLUSTER_CONFIG}: not found in {Path.cwd()} "
                         "(run from the project directory or pass --cluster-config PATH)")
    return DEFAULT_CLUSTER_CONFIG


def expand_spec_paths(paths: Sequence[str], skip: Path | None = None) -> list[Path]:
    """``--config`` takes files or directories (every *.json / *.yaml inside, except the
    cluster config itself)."""
    from pathlib import Path

    from infra.config.reader import check_path_text
    out: list[Path] = []
    for raw in paths:
        p = Path(check_path_text("--config", raw))
        try:
            is_dir = p.is_dir()
        except OSError as exc:
            raise UsageError(f"--config {raw[:80]!r}: {exc.strerror or exc}") from None
        if is_dir:
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in SPEC_SUFFIXES
                           and (skip is None or q.resolve() != skip))
            if not found:
                raise UsageError(f"{p}: --config directory holds no .json/.yaml spec files")
            out.extend(found)
        else:
            out.append(p)
    return out


def load_specs(cluster: Cluster, paths: Sequence[str]) -> tuple[ExperimentSpec, ...]:
    """Every spec of ``paths``, sweeps expanded into their tasks, checked as one set."""
    from infra.campaign.sweep import expand_all
    from infra.config import check_spec_set, load_spec
    specs = [load_spec(p, cluster) for p in expand_spec_paths(paths, skip=cluster.path)]
    return check_spec_set(expand_all(specs, cluster.campaigns.max_tasks))


def make_plan(cluster: Cluster, specs: tuple[ExperimentSpec, ...], placement: str | None,
              auto_place: bool, force: bool, conditions: Any = None,
              occupied: Any = (), facts: Any = None) -> tuple[Plan, tuple[ExperimentSpec, ...]]:
    """Check pins and --auto-place, expand system/sysbatch jobs, then run the engine.

    Returns the plan and the specs it placed (system jobs replaced by their copies).
    """
    from infra.config import parse_pins
    from infra.config.model import JobType
    from infra.config.specs import bench_pins
    from infra.placement import plan
    from infra.placement.jobs import expand_system_jobs
    pins = bench_pins(parse_pins(placement, cluster, specs), cluster)
    system = [s.experiment_id for s in specs if s.job_type in (JobType.SYSTEM, JobType.SYSBATCH)]
    pinned_system = sorted(set(system) & set(pins))
    if pinned_system:
        raise UsageError(f"--placement: {', '.join(pinned_system)} is a system/sysbatch job: it "
                         "runs on every eligible node and cannot be pinned")
    unpinned = [s.experiment_id for s in specs
                if s.experiment_id not in pins and s.experiment_id not in system]
    if unpinned and not auto_place:
        raise UsageError(f"no placement for {', '.join(unpinned)}: add --auto-place to let the "
                         "scheduler choose, or pin with --placement INSTANCE:NODE,...")
    busy = list(occupied)
    expansion = expand_system_jobs(cluster, specs, conditions, facts=facts, occupied=busy)
    empty = [t for t in system if not expansion.copies_of(t)]
    if empty:
        why = "; ".join(f"{t}: " + (", ".join(f"{n}: {r}" for n, r in expansion.skipped.get(t, ()))
                                   or "no nodes") for t in empty)
        raise PlacementError(f"no eligible node for system job(s) {', '.join(empty)} ({why})")
    result = plan(cluster, expansion.specs, pins={**pins, **expansion.pins},
                  conditions=conditions, force=force, occupied=busy, facts=facts)
    return result, tuple(expansion.specs)


def stored_context(cluster: Cluster) -> dict[str, Any]:
    """For dry runs: operator states and work other runs hold, if a store exists (read only)."""
    db = cluster.log_dir / "state.db"
    if not db.exists():
        return {}
    from infra.runner.lifecycle import occupied_by
    from infra.runner.nodeops import admin_conditions
    from infra.state import Store
    store = Store(db)
    try:
        return {"conditions": admin_conditions(cluster, store),
                "occupied": occupied_by(store.active_instances())}
    finally:
        store.close()


UNREACHABLE_STATES = ("unavailable", "offline", "disconnected", "reconnecting")
UNREACHABLE_FIX = ("a node that cannot be reached takes no work, not even with --force: check "
                   "its host, ssh_port, ssh_user, ssh_key_path and known_hosts "
                   "(`cluster-experiment --health-check` shows why)")


def plan_failure(result: Plan) -> PlacementError:
    """One line: what could not be placed and why, with the fix that applies."""
    from infra.placement import why_not
    parts = [f"{i} pinned to {r}" for i, r in result.pin_errors.items()]
    parts += [f"cannot place {i} ({why_not(result, i)})" for i in result.unplaced]
    reasons = [r.split(" ", 1)[1] if " " in r else r for r in result.pin_errors.values()]
    unreachable = [r for r in reasons if r.startswith(UNREACHABLE_STATES)]
    forceable = [r for r in reasons if r not in unreachable
                 and "disabled in the cluster config" not in r]
    hints = (["use --force to override a pin"] if forceable else []) + \
        ([UNREACHABLE_FIX] if unreachable else [])
    return PlacementError("; ".join(parts) + (f" ({'; '.join(hints)})" if hints else ""))


CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(invoke_without_command=True, context_settings=CONTEXT_SETTINGS)
@click.option("--cluster-config", "cluster_config", metavar="PATH",
              help="Topology file (default: $INFRA_CLUSTER_CONFIG or ./cluster_config.yaml).")
@click.option("--validate-config", is_flag=True,
              help="Validate the topology and any --config specs, print a summary, exit.")
@click.option("--health-check", is_flag=True, help="Probe every enabled node and report.")
@click.option("--deploy-all", is_flag=True, help="rsync the project tree to every enabled node.")
@click.option("--config", "configs", multiple=True, metavar="SPEC",
              help="Experiment spec file or directory (repeatable).")
@click.option("--placement", metavar="ID:NODE,...", help="Pin instances to nodes.")
@click.option("--auto-place", is_flag=True, help="Let the scheduler place unpinned instances.")
@click.option("--strategy", type=click.Choice(STRATEGY_CHOICES), default=None,
              help="Placement strategy (default: placement.strategy in the config, else score).")
@click.option("--force", is_flag=True, help="Accept pins that break hard constraints.")
@click.option("--dry-run", is_flag=True, help="Show the plan (or deploy changes); change nothing.")
@click.option("--explain", is_flag=True, help="With a plan: every node's score parts or reason.")
@click.option("--json", "json_out", is_flag=True, help="Machine-readable output.")
@click.option("--monitor-duration", type=Seconds(WATCH_MAX_SECONDS), default=None,
              metavar="SECONDS",
              help="Watch the run this long, then detach (experiments keep running).")
@click.option("--delete/--no-delete", default=True, show_default=True,
              help="Deploy: remove files on nodes that are gone locally.")
@click.option("--accept-new-host-keys", is_flag=True,
              help="Trust and record host keys of nodes seen for the first time.")
@click.option("--yes", is_flag=True,
              help="Deploy even when it deletes more than deploy.max_deletes files on a node.")
@click.option("--tag", "tags", multiple=True, metavar="NAME",
              help="Label the run (repeatable); shown by `runs`, `show` and `compare`.")
# the version as a constant (a test checks it against the installed metadata): looking it up
# with importlib.metadata costs --version more than the rest of its start-up
@click.version_option(version=__version__, prog_name="cluster-experiment")
@click.pass_context
def cli(ctx: click.Context, cluster_config: str | None, validate_config: bool,
        health_check: bool, deploy_all: bool, configs: tuple[str, ...], placement: str | None,
        auto_place: bool, force: bool, dry_run: bool, explain: bool, json_out: bool,
        monitor_duration: float | None, delete: bool, accept_new_host_keys: bool,
        yes: bool = False, strategy: str | None = None, tags: tuple[str, ...] = ()) -> None:
    """Place, run and watch lab experiments on a small cluster over SSH."""
    tags = check_tags(tags)
    if ctx.invoked_subcommand is not None:
        ctx.obj = Ctx(find_cluster_config(cluster_config), json_out=json_out,
                      accept_new=accept_new_host_keys, yes=yes)
        return
    if (placement or auto_place) and not configs:
        raise UsageError("--placement/--auto-place need experiment specs: add --config SPEC")
    if not (validate_config or health_check or deploy_all or configs):
        click.echo(ctx.get_help())
        return
    c = Ctx(find_cluster_config(cluster_config), json_out=json_out,
            accept_new=accept_new_host_keys, yes=yes)
    ctx.obj = c
    cluster = c.cluster
    if strategy is not None:  # the cluster object carries it to every plan() of this command
        from infra.config.model import Strategy
        cluster = c._cluster = cluster.with_strategy(Strategy(strategy))
    specs = load_specs(cluster, configs) if configs else ()
    on_slurm: dict[str, str] = {}
    if placement:
        from infra.config import parse_pins  # the spec parser: only with --config/--placement
        from infra.config.specs import target_pins
        on_slurm = target_pins(parse_pins(placement, cluster, specs), cluster)

    if validate_config:
        do_validate(c, cluster, specs)
        if not (health_check or deploy_all):
            return
    if health_check:
        from infra.cli.health import do_health_check
        do_health_check(c, cluster, accept_new_host_keys)
    if deploy_all:
        from infra.cli.actions import do_deploy_all
        do_deploy_all(c, cluster, dry_run=dry_run, delete=delete,
                      accept_new=accept_new_host_keys, specs=specs)
    if specs and not validate_config:
        if dry_run and on_slurm:
            show_slurm_plan(c, cluster, specs, on_slurm, auto_place)
            return
        if dry_run:
            from infra.cli.actions import queued_work
            from infra.runner.campaign import first_wave, never_fits
            queued, rest = queued_work(cluster, specs, placement, auto_place)
            waiting = {s.experiment_id for s in queued}
            context = stored_context(cluster)
            result, placed = make_plan(cluster, tuple(s for s in specs
                                                      if s.experiment_id not in waiting),
                                       rest, auto_place, force, **context)
            by_id = {s.experiment_id: s for s in placed}
            never = never_fits(cluster, queued, context.get("conditions"))
            waves = first_wave(cluster, queued, context.get("conditions"),
                               [*context.get("occupied", ()),
                                *((by_id[p.instance_id], p.node, p.allocation)
                                  for p in result.placements)]) if never is None else {}
            show_plan(c, result, explain=explain, dry_run=True, queued=queued, waves=waves)
            if not result.ok:
                raise plan_failure(result)
            if never is not None:
                raise never
            return
        from infra.cli.actions import do_run
        do_run(c, cluster, specs, placement=placement, auto_place=auto_place, force=force,
               explain=explain, monitor_duration=monitor_duration,
               accept_new=accept_new_host_keys, tags=tags)


def show_slurm_plan(c: Ctx, cluster: Cluster, specs: tuple[ExperimentSpec, ...],
                    pins: dict[str, str], auto_place: bool) -> None:
    """``--dry-run`` of an all-Slurm run: each job's sbatch options (nothing is sent; the
    work dir shows as configured, ``RUN`` stands for the run id)."""
    from infra.backends.slurm.driver import check_all_slurm, check_scripts
    target = check_all_slurm(pins, specs, auto_place, cluster)
    scripts = check_scripts(target, specs)
    if c.json_out:
        c.emit_json({"dry_run": True, "target": target.name,
                     "jobs": [{"key": s.key, "instances": list(s.instance_ids),
                               "options": list(s.options)} for s in scripts]})
        return
    for script in scripts:
        click.echo(f"{script.key} -> {target.name}: sbatch {' '.join(script.options)}")
    click.echo("dry run: nothing was deployed or submitted")


TAG_MAX_CHARS = 64


def check_tags(tags: Sequence[str]) -> tuple[str, ...]:
    """``--tag`` values: printable, no spaces or commas, at most 64 characters; each once."""
    for tag in tags:
        if not tag or len(tag) > TAG_MAX_CHARS or not tag.isprintable() \
                or any(ch.isspace() or ch == "," for ch in tag):
            raise UsageError(f"--tag {tag[:80]!r}: a tag is 1 to {TAG_MAX_CHARS} printable "
                             "characters without spaces or commas")
    return tuple(dict.fromkeys(tags))


def do_validate(c: Ctx, cluster: Cluster, specs: tuple[ExperimentSpec, ...]) -> None:
    from infra.config.keyfiles import check_key_files
    check_key_files(cluster)
    if c.json_out:
        c.emit_json({
            "ok": True,
            "cluster_config": str(cluster.path),
            "nodes": [{"name": n.name, "type": n.type.value, "host": n.host,
                       "enabled": n.enabled, "ram_gb": n.ram_gb,
                       "available_ram_gb": n.available_ram_gb, "gpu": n.gpu,
                       "gpu_memory_gb": n.gpu_memory_gb, "unified_memory": n.unified_memory,
                       "cpu_cores": n.cpu_cores, "max_instances": n.max_instances,
                       "tags": sorted(n.tags)} for n in cluster.nodes],
            "slurm_targets": [{"name": t.name, "host": t.host, "ssh_user": t.ssh_user,
                               "ssh_port": t.ssh_port, "enabled": t.enabled,
                               "partition": t.partition, "account": t.account, "qos": t.qos,
                               "time_limit": t.time_limit, "remote_work_dir": t.remote_work_dir}
                              for t in cluster.slurm_targets],
            "experiments": [s.experiment_id for s in specs],
        })
        return
    from infra.cli import views  # rich tables: not for --json
    if cluster.nodes:
        c.console.print(views.nodes_table(cluster))
    if cluster.slurm_targets:
        c.console.print(views.slurm_targets_table(cluster))
    if specs:
        c.console.print(views.specs_table(specs))
    enabled = sum(1 for n in cluster.nodes if n.enabled)
    files = len({s.template_id if s.task_index is not None else s.experiment_id for s in specs})
    count = f", {files} experiment specs" + \
        (f" ({len(specs)} instances, sweeps expanded)" if files != len(specs) else "")
    targets = f", {len(cluster.slurm_targets)} Slurm targets" if cluster.slurm_targets else ""
    c.console.print(f"[green]OK[/]: {cluster.path.name} is valid: {len(cluster.nodes)} nodes "
                    f"({enabled} enabled){targets}" + (count if specs else ""))


def show_plan(c: Ctx, result: Plan, *, explain: bool, dry_run: bool,
              queued: Sequence[ExperimentSpec] = (),
              waves: Mapping[str, Mapping[str, int]] | None = None) -> None:
    from infra.cli import views
    if c.json_out:
        doc = views.plan_json(result)
        doc["dry_run"] = dry_run
        doc["queued"] = [s.experiment_id for s in queued]
        doc["first_wave"] = {k: dict(v) for k, v in (waves or {}).items()}
        c.emit_json(doc)
        return
    if result.placements or result.unplaced or result.pin_errors or not queued:
        c.console.print(views.plan_table(result))
    if queued:
        c.console.print(views.queued_summary(queued, waves))
    if explain:
        c.console.print(views.explain(result))
    if dry_run:
        c.console.print("[dim]dry run: nodes were not probed (enabled nodes assumed healthy); "
                        "nothing was deployed or started[/]")


@cli.command()
@click.argument("run_id", required=False)
@click.option("--json", "json_out", is_flag=True, help="Machine-readable output.")
@click.option("--no-refresh", is_flag=True, help="Show the stored state without asking nodes.")
@click.pass_obj
def status(c: Ctx, run_id: str | None, json_out: bool, no_refresh: bool) -> None:
    """Show a run's instances (default: the latest run), refreshed from the nodes."""
    from infra.cli.actions import do_status
    c.json_out = c.json_out or json_out
    do_status(c, run_id, refresh=not no_refresh)


@cli.command()
@click.argument("run_id", required=False)
@click.option("--duration", type=Seconds(WATCH_MAX_SECONDS), default=None, metavar="SECONDS",
              help="Detach after this long (default: when every instance has finished).")
@click.option("--json", "json_out", is_flag=True, help="No dashboard; print the final status "
              "as JSON.")
@click.pass_obj
def watch(c: Ctx, run_id: str | None, duration: float | None, json_out: bool) -> None:
    """Attach to a run (default: the latest): live dashboard, logs home, policies applied.

    Ctrl-C detaches and leaves the experiments running; only `stop` stops them.
    """
    from infra.cli.actions import do_watch
    c.json_out = c.json_out or json_out
    do_watch(c, run_id, duration)


@cli.command()
@click.argument("run_id", required=False)
@click.option("--failed", is_flag=True, help="Queue the failed, lost, cancelled and paused "
              "work again (and what was skipped because of it).")
@click.option("--duration", type=Seconds(WATCH_MAX_SECONDS), default=None, metavar="SECONDS",
              help="Watch this long, then detach (default: until the run is over).")
@click.option("--json", "json_out", is_flag=True, help="No dashboard; print the final status "
              "as JSON.")
@click.pass_obj
def rerun(c: Ctx, run_id: str | None, failed: bool, duration: float | None,
          json_out: bool) -> None:
    """Give a run's failed work new attempts under the same ids, then watch it.

    Each instance or task gets a new placement (its earlier copy on the node is kept
    aside); a campaign's pools start afresh, so suite setup runs again on each node.
    """
    from infra.cli.actions import do_rerun
    if not failed:
        raise UsageError("rerun: say what to run again: --failed (the only choice for now)")
    c.json_out = c.json_out or json_out
    do_rerun(c, run_id, duration)


@cli.command()
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True,
              metavar="N", help="Show at most this many runs.")
@click.option("--json", "json_out", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def runs(c: Ctx, limit: int, json_out: bool) -> None:
    """List the recorded runs, newest first (from the local store; no node is asked)."""
    from infra.cli.actions import do_runs
    c.json_out = c.json_out or json_out
    do_runs(c, limit)


@cli.command()
@click.argument("run_id", required=False)
@click.option("--json", "json_out", is_flag=True, help="The manifest document itself.")
@click.pass_obj
def show(c: Ctx, run_id: str | None, json_out: bool) -> None:
    """Print a run's manifest (the latest run's by default): code, config, specs, command
    line, nodes (local only)."""
    from infra.cli.records import do_show
    c.json_out = c.json_out or json_out
    do_show(c, run_id)


@cli.command()
@click.argument("run_a")
@click.argument("run_b")
@click.option("--json", "json_out", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def compare(c: Ctx, run_a: str, run_b: str, json_out: bool) -> None:
    """Show what differs between two runs: code, config, specs, nodes, outcomes, metrics."""
    from infra.cli.records import do_compare
    c.json_out = c.json_out or json_out
    do_compare(c, run_a, run_b)


@cli.command()
@click.argument("run_or_instance", metavar="[RUN_ID] INSTANCE_ID")
@click.argument("instance_id", required=False, metavar="")
@click.option("-f", "--follow", is_flag=True, help="Keep streaming until the instance ends.")
@click.pass_obj
def logs(c: Ctx, run_or_instance: str, instance_id: str | None, follow: bool) -> None:
    """Print an instance's output (default run: the latest), the local copy first."""
    from infra.cli.actions import do_logs
    do_logs(c, run_or_instance, instance_id, follow)


@cli.command()
@click.option("--older-than", "older_than", default="7d", show_default=True,
              metavar="DURATION", help="Prune runs that ended longer ago than this "
              "(90s, 30m, 2h, 7d or seconds).")
@click.option("--dry-run", is_flag=True, help="List what would go, per node and locally, "
              "with sizes; remove nothing.")
@click.option("--json", "json_out", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def prune(c: Ctx, older_than: str, dry_run: bool, json_out: bool) -> None:
    """Remove old finished runs' directories on their nodes and their local logs.

    A run with any instance still active (in the store, or on a node) is never touched.
    """
    from infra.cli.actions import do_prune
    from infra.cli.nodes import parse_duration
    c.json_out = c.json_out or json_out
    do_prune(c, parse_duration(older_than, "--older-than"), dry_run)


@cli.command()
@click.argument("run_id")
@click.argument("instance_id", required=False)
@click.option("--grace", type=Seconds(GRACE_MAX_SECONDS), default=10.0, show_default=True,
              help="Seconds between SIGTERM and SIGKILL.")
@click.option("--json", "json_out", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def stop(c: Ctx, run_id: str, instance_id: str | None, grace: float, json_out: bool) -> None:
    """Stop a run's active instances, or one instance (the whole process group).

    Instances already over are left as they are.
    """
    from infra.cli.actions import do_stop
    c.json_out = c.json_out or json_out
    do_stop(c, run_id, instance_id, grace)


@cli.command()
@click.argument("run_id")
@click.option("--table", "table_out", is_flag=True, help="Show a table instead of the file "
              "list: each instance's parameters, outcome and the metrics it wrote to "
              "$INFRA_RESULTS_DIR/metrics.json.")
@click.option("--csv", "csv_out", is_flag=True, help="The table as CSV on stdout (header "
              "row first, every value in full).")
@click.option("--no-fetch", "no_fetch", is_flag=True, help="Ask no node: build the table "
              "from the results already home (implies --table).")
@click.option("--json", "json_out", is_flag=True, help="Machine-readable output (with "
              "--table or --no-fetch: the table's rows too).")
@click.pass_obj
def results(c: Ctx, run_id: str, table_out: bool, csv_out: bool, no_fetch: bool,
            json_out: bool) -> None:
    """Fetch the results of every instance of a run now; with --table/--csv, show each
    instance's parameters against its outcome and metrics."""
    from infra.cli.actions import do_results
    c.json_out = c.json_out or json_out
    if csv_out and c.json_out:
        raise UsageError("results: --csv and --json are two formats of the same table: "
                         "choose one")
    view: Literal["table", "csv"] | None = \
        "csv" if csv_out else "table" if table_out or no_fetch else None
    do_results(c, run_id, view, fetch=not no_fetch)


MLFLOW_DEFAULT = "\0default"
"""What ``--mlflow`` holds when given without a URI (the default store in ./mlruns)."""


@cli.command()
@click.argument("run_id", required=False)
@click.option("--out", "out", metavar="FILE", default=None,
              help="Write the report here (default: <log_dir>/<run>/report.html).")
@click.option("--mlflow", "mlflow_uri", is_flag=False, flag_value=MLFLOW_DEFAULT, default=None,
              metavar="[URI]", help="Export the run to MLflow instead: one MLflow run per "
              "instance (default store: ./mlruns). Needs the mlflow extra. Put RUN_ID before "
              "it: a word right after --mlflow is its URI. With --out, the HTML is written too.")
@click.option("--json", "json_out", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def report(c: Ctx, run_id: str | None, out: str | None, mlflow_uri: str | None,
           json_out: bool) -> None:
    """Write one self-contained HTML file about a run (the latest by default): summary and
    manifest, placement, events, telemetry charts per instance, and a sweep's parameters
    against its metrics.
    With --mlflow, export the run to MLflow (params, metrics, telemetry, manifest, logs and
    results of every instance).

    The HTML needs the report extra (plotly); the file makes no network request when opened.
    """
    from pathlib import Path

    from infra.config.reader import check_path_text
    c.json_out = c.json_out or json_out
    if mlflow_uri is None or out is not None:
        from infra.cli.actions import do_report_html
        do_report_html(c, run_id, Path(check_path_text("--out", out))
                       if out is not None else None)
    if mlflow_uri is not None:
        from infra.cli.actions import do_report_mlflow
        do_report_mlflow(c, run_id, None if mlflow_uri == MLFLOW_DEFAULT else mlflow_uri)


def _register_node_commands() -> None:
    from infra.cli.nodes import node, resource
    cli.add_command(node)
    cli.add_command(resource)


_register_node_commands()


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry: run the CLI, turning known errors into one line + exit code."""
    os.umask(0o077)  # logs, results and state may hold secrets: private to the user
    try:
        rv = cli.main(args=list(argv) if argv is not None else None,
                      prog_name="cluster-experiment", standalone_mode=False)
    except InfraError as exc:
        click.echo(f"error: {exc.one_line()}", err=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.Abort:  # click's form of Ctrl-C (KeyboardInterrupt inside a command)
        click.echo("interrupted", err=True)
        return 130
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    return rv if isinstance(rv, int) else 0


def entry() -> NoReturn:
    """The installed command: ``main()``, then exit without the final garbage collection.

    Everything the command made stays alive until the process ends, so the collector's last
    pass over it at interpreter exit only costs time (about 60 ms after a health check's
    imports). Freezing the heap skips that pass; atexit handlers still run and stdout and
    stderr are still flushed. Objects left in reference cycles are not finalized, which is
    safe because every file and store is closed by its own ``with`` block. Not done in
    ``main()``: tests call it in-process, where garbage must stay collectable.
    """
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
