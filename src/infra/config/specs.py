"""Parse and validate experiment specs (``experiments/*.json``, YAML accepted too)."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from infra.campaign.model import (
    DEFAULT_PREFETCH,
    CampaignSpec,
    CpuBinding,
    DispatchMode,
    SuiteSpec,
    SweepSpec,
)
from infra.campaign.sweep import argv_template, check_task_ids, check_templates, parse_sweep
from infra.config.model import Cluster, ExperimentSpec, JobType, RecoverPolicy, SlurmOptions
from infra.config.reader import (
    MAX_COUNT,
    Section,
    check_safe_id,
    display_path,
    load_document,
    relative_path_problem,
)
from infra.config.resources import ParsedResources, parse_constraints, parse_resources
from infra.config.slurm import duration_problem, signal_problem
from infra.errors import ConfigError, UsageError

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RECOVER_CHOICES = [r.value for r in RecoverPolicy]
JOB_TYPES = [j.value for j in JobType]
CPU_BINDINGS = [b.value for b in CpuBinding]
DISPATCH_MODES = [d.value for d in DispatchMode]
MAX_WORKERS = 4096
"""Upper bound on a suite's workers per node, its core numbers and its prefetch depth."""
MAX_TASKS_LIMIT = 1_000_000
PRIORITY_LIMIT = 1_000_000
"""``priority`` is an integer in -PRIORITY_LIMIT..PRIORITY_LIMIT."""
# Keys accepted and kept for later features (none now: resources, constraints and job_type
# are real).
RESERVED_SPEC_KEYS: frozenset[str] = frozenset()


def _merge_scalar(s: Section, flat_key: str, flat_unit: str, res_value: float | None,
                  res_key: str | None, default: float, *, positive: bool) -> float:
    """A flat key and its ``resources`` spelling: either may be given; both must agree."""
    if positive:
        flat = s.number(flat_key, None, positive=True)
    else:
        flat = s.number(flat_key, None, minimum=0.0)
    if res_value is None:
        return default if flat is None else float(flat)
    if flat is not None and abs(flat - res_value) > 1e-9:
        raise ConfigError(s.file, f"resources.{res_key}",
                          f"conflicts with {flat_key}: resources.{res_key} means "
                          f"{res_value:g} {flat_unit}, {flat_key} is {flat:g}; keep one")
    return res_value


def _gpu_required(s: Section, res: ParsedResources, default: bool) -> bool:
    """``gpu_required``, implied true by a GPU device request in ``resources``."""
    flat = s.boolean("gpu_required", None)
    if res.wants_gpu:
        if flat is False:
            raise s.error("gpu_required", "is false but resources requests a GPU device")
        return True
    return default if flat is None else bool(flat)


def load_spec(path: str | Path, cluster: Cluster) -> ExperimentSpec:
    """Read one spec file; defaults for omitted resources come from the cluster config."""
    p = Path(path)
    return parse_spec(load_document(p), p, cluster)


def _relative_path(s: Section, key: str, value: str) -> str:
    why = relative_path_problem(value)
    if why:
        raise s.error(key, why)
    return value


def _command(s: Section, key: str, *, template: bool = False) -> str:
    """A command: a string, or a list of arguments joined with shell quoting (for a sweep,
    into a template whose placeholders each stay inside their argument)."""
    raw_cmd = s.raw(key)
    if isinstance(raw_cmd, list) and raw_cmd and all(isinstance(c, str) for c in raw_cmd):
        for i, part in enumerate(raw_cmd):
            if not part.strip():
                raise s.error(f"{key}[{i}]", "must not be empty (write an empty argument "
                              f"with the string form of {key})")
        return argv_template(s.file, raw_cmd) if template else shlex.join(raw_cmd)
    if isinstance(raw_cmd, str) and raw_cmd.strip():
        return raw_cmd
    raise s.error(key, "expected a non-empty string or a list of strings")


def _id_list(s: Section, key: str, experiment_id: str) -> tuple[str, ...]:
    """``after`` / ``after_any``: distinct safe ids, not the experiment itself."""
    ids: tuple[str, ...] = s.string_list(key, ())
    for i, peer in enumerate(ids):
        why = check_safe_id(peer)
        if why:
            raise s.error(f"{key}[{i}]", why)
        if peer == experiment_id:
            raise s.error(f"{key}[{i}]", f"lists the experiment itself ({experiment_id!r})")
        if peer in ids[:i]:
            raise s.error(f"{key}[{i}]", f"lists {peer!r} twice")
    return ids


def _suite(s: Section) -> SuiteSpec:
    """The ``suite`` section: hooks, workers per node, CPU binding, prefetch depth."""
    setup = _command(s, "setup") if s.has("setup") else None
    cleanup = _command(s, "cleanup") if s.has("cleanup") else None
    workers = s.integer("workers", None, minimum=1, maximum=MAX_WORKERS)
    binding = s.choice("cpu_binding", CpuBinding, CPU_BINDINGS, CpuBinding.ROUND_ROBIN)
    raw_cores = s.raw("cores", [])
    if not isinstance(raw_cores, list):
        raise s.error("cores", "expected a list of core numbers")
    cores: list[int] = []
    for i, core in enumerate(raw_cores):
        if isinstance(core, bool) or not isinstance(core, int) or not 0 <= core < MAX_WORKERS:
            raise s.error(f"cores[{i}]", f"expected a core number 0..{MAX_WORKERS - 1}, "
                          f"got {core!r}")
        if core in cores:
            raise s.error(f"cores[{i}]", f"lists core {core} twice")
        cores.append(core)
    if binding is CpuBinding.EXCLUSIVE and cores and workers is not None \
            and workers > len(cores):
        raise s.error("workers", f"{workers} workers cannot each have a core of their own: "
                      f"cores lists {len(cores)} (cpu_binding: exclusive)")
    prefetch = s.integer("prefetch", DEFAULT_PREFETCH, minimum=0, maximum=MAX_WORKERS)
    s.finish()
    return SuiteSpec(setup=setup, cleanup=cleanup, workers=workers, cpu_binding=binding,
                     cores=tuple(cores), prefetch=prefetch)


def _campaign(s: Section, experiment_id: str, sweep: SweepSpec | None,
              priority: int) -> CampaignSpec | None:
    """The campaign a spec starts: with a sweep, a suite, max_parallel or dispatch."""
    max_parallel = s.integer("max_parallel", None, minimum=1, maximum=MAX_TASKS_LIMIT)
    dispatch = s.choice("dispatch", DispatchMode, DISPATCH_MODES, DispatchMode.PREFETCH)
    fail_fast = s.boolean("fail_fast", False)
    suite = _suite(s.section("suite")) if s.has("suite") else None
    if sweep is None and suite is None and max_parallel is None and not s.has("dispatch"):
        return None
    return CampaignSpec(name=experiment_id, size=1 if sweep is None else sweep.size,
                        max_parallel=max_parallel, priority=priority, dispatch=dispatch,
                        fail_fast=fail_fast, suite=suite)


def _slurm(s: Section) -> SlurmOptions:
    """The ``slurm`` section: options used only when the spec runs on a Slurm target."""
    time_limit = s.string("time_limit", None)
    if time_limit is not None:
        why = duration_problem(time_limit)
        if why:
            raise s.error("time_limit", why)
    sig = s.string("signal", None)
    if sig is not None:
        why = signal_problem(sig)
        if why:
            raise s.error("signal", why)
    s.finish()
    return SlurmOptions(time_limit=time_limit, signal=sig)


def parse_spec(data: Any, path: Path, cluster: Cluster) -> ExperimentSpec:
    """Validate one parsed spec document (pure)."""
    file = str(path)
    if data is None:
        raise ConfigError(file, "", "the file is empty")
    s = Section(file, "", data)
    experiment_id = s.string("experiment_id", path.stem)
    why = check_safe_id(experiment_id)
    if why:
        raise s.error("experiment_id", why)

    sweep = parse_sweep(s.section("sweep"), cluster.campaigns.max_tasks) \
        if s.has("sweep") else None
    command = _command(s, "command", template=sweep is not None)

    workdir = s.string("workdir", None)
    if workdir is not None:
        _relative_path(s, "workdir", workdir)

    env: list[tuple[str, str]] = []
    env_section = s.section("env")
    for name, value in env_section.data.items():
        env_section.used.add(name)
        if not ENV_NAME.match(name):
            raise env_section.error(name, "not a valid environment variable name")
        if name.startswith("INFRA_"):
            raise env_section.error(name, "the INFRA_ prefix is reserved for the orchestrator")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise env_section.error(name, "expected a string or a number")
        env.append((name, str(value)))

    defaults = cluster.defaults
    res = parse_resources(s.section("resources"))
    gpu_required = _gpu_required(s, res, defaults.gpu_required)
    gpu_memory = s.number("gpu_memory_gb", defaults.gpu_memory_gb if gpu_required else 0.0,
                          minimum=0.0)
    if gpu_memory > 0 and not gpu_required:
        raise s.error("gpu_memory_gb", "is set but gpu_required is false")

    node_names = set(cluster.node_names)
    preferred = s.string("preferred_node", None)
    if preferred is not None and cluster.slurm_target(preferred) is not None:
        raise s.error("preferred_node", f"{preferred!r} is a Slurm target, not a node: pin "
                      f"the experiment there with --placement {experiment_id}:{preferred}")
    if preferred is not None and preferred not in node_names:
        raise s.error("preferred_node",
                      f"unknown node {preferred!r}; nodes: {', '.join(cluster.node_names)}")

    affinity = s.string_list("affinity", ())
    anti = s.string_list("anti_affinity", ())
    for key, ids in (("affinity", affinity), ("anti_affinity", anti)):
        if experiment_id in ids:
            raise s.error(key, f"lists the experiment itself ({experiment_id!r})")

    results = s.string_list("results", ())
    for i, item in enumerate(results):
        _relative_path(s, f"results[{i}]", item)

    params = s.raw("params", None)
    if params is not None and not isinstance(params, Mapping):
        raise s.error("params", "expected a mapping of experiment parameters")

    job_type = s.choice("job_type", JobType, JOB_TYPES, JobType.BATCH)
    if sweep is not None and job_type in (JobType.SYSTEM, JobType.SYSBATCH):
        raise s.error("sweep", f"a {job_type.value} job runs one copy per node and cannot "
                      "have a sweep; use job_type batch or service")
    after = _id_list(s, "after", experiment_id)
    after_any = _id_list(s, "after_any", experiment_id)
    for i, peer in enumerate(after_any):
        if peer in after:
            raise s.error(f"after_any[{i}]", f"{peer!r} is also in after; keep one")
    priority = s.integer("priority", 0, minimum=-PRIORITY_LIMIT, maximum=PRIORITY_LIMIT)
    campaign = _campaign(s, experiment_id, sweep, priority)

    spec = ExperimentSpec(
        experiment_id=experiment_id,
        command=command,
        source=path.resolve(),
        workdir=workdir,
        env=tuple(env),
        ram_gb=_merge_scalar(s, "ram_gb", "GB", res.ram_gb, res.ram_key, defaults.ram_gb,
                             positive=True),
        gpu_required=gpu_required,
        gpu_memory_gb=gpu_memory,
        cpu_cores=_merge_scalar(s, "cpu_cores", "cores", res.cpu_cores, res.cpu_key,
                                defaults.cpu_cores, positive=False),
        preferred_node=preferred,
        affinity=affinity,
        anti_affinity=anti,
        results=results,
        recover=s.choice("recover", RecoverPolicy, RECOVER_CHOICES,
                         RecoverPolicy.CLUSTER if cluster.failover.enabled else RecoverPolicy.NONE),
        max_retries=s.integer("max_retries", cluster.failover.max_retries, minimum=0,
                              maximum=MAX_COUNT),
        auto_restart=s.boolean("auto_restart", cluster.failover.auto_restart),
        description=s.string("description", "", allow_empty=True),
        params=tuple(sorted((params or {}).items())),
        extra=tuple(sorted((k, s.data[k]) for k in RESERVED_SPEC_KEYS if k in s.data)),
        resources=res.request,
        constraints=parse_constraints(s, "constraints"),
        job_type=job_type,
        after=after,
        after_any=after_any,
        priority=priority,
        campaign=campaign,
        sweep=sweep,
        slurm=_slurm(s.section("slurm")) if s.has("slurm") else None,
    )
    s.finish(reserved=RESERVED_SPEC_KEYS)
    if sweep is not None:
        check_task_ids(file, experiment_id, sweep.size)
        check_templates(file, spec)
    return spec


def _known_ids(by_id: Mapping[str, ExperimentSpec],
               sweeps: Mapping[str, list[str]]) -> str:
    """The ids a run knows, for messages: a sweep's tasks as one range."""
    plain = sorted(i for i, sp in by_id.items() if sp.task_index is None)
    ranges = [f"{name} (tasks {ids[0]}..{ids[-1]})" for name, ids in sorted(sweeps.items())]
    return ", ".join(sorted(plain + ranges))


def _sweeps(by_id: Mapping[str, ExperimentSpec]) -> dict[str, list[str]]:
    """Sweep name -> its task ids in task order (tasks carry ``task_index``)."""
    sweeps: dict[str, list[str]] = {}
    for spec in sorted(by_id.values(), key=lambda sp: (sp.task_index or 0, sp.experiment_id)):
        if spec.task_index is not None and spec.template_id is not None:
            sweeps.setdefault(spec.template_id, []).append(spec.experiment_id)
    return sweeps


def _affinities(spec: ExperimentSpec, by_id: Mapping[str, ExperimentSpec],
                sweeps: Mapping[str, list[str]]) -> ExperimentSpec:
    """``affinity``/``anti_affinity`` naming known ids; a sweep's name means all its tasks."""
    lists: dict[str, tuple[str, ...]] = {}
    for key, ids in (("affinity", spec.affinity), ("anti_affinity", spec.anti_affinity)):
        out: list[str] = []
        for i, peer in enumerate(ids):
            if peer not in by_id and peer not in sweeps:
                raise ConfigError(display_path(spec.source), f"{key}[{i}]",
                                  f"unknown instance id {peer!r}; instances in this run: "
                                  f"{_known_ids(by_id, sweeps)}")
            if peer == spec.experiment_id:
                raise ConfigError(display_path(spec.source), f"{key}[{i}]",
                                  f"names {peer!r}, one of this sweep's own tasks")
            out.extend(sweeps.get(peer, [peer]))
        lists[key] = tuple(dict.fromkeys(out))
    if lists["affinity"] == spec.affinity and lists["anti_affinity"] == spec.anti_affinity:
        return spec
    return replace(spec, affinity=lists["affinity"], anti_affinity=lists["anti_affinity"])


def _dependency_cycle(by_id: Mapping[str, ExperimentSpec],
                      sweeps: Mapping[str, list[str]]) -> None:
    """Refuse ``after``/``after_any`` naming unknown ids or going round in a cycle.

    Checked per spec file (a sweep's tasks share their dependencies), which finds exactly the
    cycles between tasks: the message names the ids as written, ``a -> b -> a``.
    """
    def group(instance: str) -> str:
        spec = by_id.get(instance)
        return instance if spec is None or spec.task_index is None or spec.template_id is None \
            else spec.template_id

    edges: dict[str, list[tuple[str, str, str]]] = {}  # group -> (ref, its group, key)
    first: dict[str, ExperimentSpec] = {}
    for spec in by_id.values():
        g = group(spec.experiment_id)
        if g in first:
            continue
        first[g] = spec
        out = edges.setdefault(g, [])
        for key, ids in (("after", spec.after), ("after_any", spec.after_any)):
            for i, peer in enumerate(ids):
                if peer not in by_id and peer not in sweeps:
                    raise ConfigError(display_path(spec.source), f"{key}[{i}]",
                                      f"unknown id {peer!r}; ids in this run: "
                                      f"{_known_ids(by_id, sweeps)}")
                out.append((peer, peer if peer in sweeps else group(peer), key))
    done: set[str] = set()
    for start in sorted(edges):
        if start in done:
            continue
        path: list[tuple[str, str, str]] = [(start, start, "")]  # (group, ref, key)
        on_path = {start: 0}
        todo = [iter(edges[start])]
        while todo:
            step = next(todo[-1], None)
            if step is None:
                todo.pop()
                g, _, _ = path.pop()
                del on_path[g]
                done.add(g)
                continue
            ref, g, key = step
            if g in on_path:
                names = [r for _, r, _ in path[on_path[g]:]] + [ref]
                names[0] = path[on_path[g]][0]
                if ref != g:
                    names[-1] = f"{ref} (a task of {g})"
                spec = first[path[-1][0]]
                raise ConfigError(display_path(spec.source), key,
                                  f"dependency cycle: {' -> '.join(names)}")
            if g in done:
                continue
            on_path[g] = len(path)
            path.append((g, ref, key))
            todo.append(iter(edges[g]))


def check_spec_set(specs: Iterable[ExperimentSpec]) -> tuple[ExperimentSpec, ...]:
    """Cross-file checks over expanded specs (``campaign.sweep.expand_all`` first): unique
    ids, affinity lists and dependencies naming known instances or sweeps, no cycles.

    A sweep's name in ``affinity``/``anti_affinity`` is replaced by its tasks. Returns the
    specs sorted by id so nothing downstream depends on flag order.
    """
    by_id: dict[str, ExperimentSpec] = {}
    for spec in specs:
        if spec.sweep is not None:
            raise ValueError(f"{spec.experiment_id}: sweeps must be expanded before "
                             "check_spec_set")
        other = by_id.get(spec.experiment_id)
        if other is not None:
            raise ConfigError(display_path(spec.source), "experiment_id",
                              f"duplicate instance id {spec.experiment_id!r} "
                              f"(also in {display_path(other.source)})")
        by_id[spec.experiment_id] = spec
    sweeps = _sweeps(by_id)
    for name, tasks in sweeps.items():
        if name in by_id:
            raise ConfigError(display_path(by_id[name].source), "experiment_id",
                              f"duplicate id {name!r}: also the name of the sweep in "
                              f"{display_path(by_id[tasks[0]].source)}")
    checked = [_affinities(spec, by_id, sweeps) for spec in by_id.values()]
    _dependency_cycle(by_id, sweeps)
    return tuple(sorted(checked, key=lambda sp: sp.experiment_id))


def _pin_target(cluster: Cluster, node: str, instance: str) -> None:
    """Refuse a pin to a name that is neither a node nor a Slurm target."""
    if node in cluster.node_names or cluster.slurm_target(node) is not None:
        return
    targets = cluster.slurm_target_names
    known = f"nodes: {', '.join(cluster.node_names) or '(none)'}" + (
        f"; slurm targets: {', '.join(targets)}" if targets else "")
    raise UsageError(f"--placement: unknown node {node!r} for {instance}; {known}")


def parse_pins(text: str | None, cluster: Cluster,
               specs: Iterable[ExperimentSpec]) -> dict[str, str]:
    """Parse ``--placement a:jetson,b:rpi1`` into {instance: node}, checking both names.

    A pin may name a Slurm target (``cluster.slurm_target``): the run's dispatch sends such
    work to Slurm; the planner itself never places on a target (``bench_pins``).
    """
    if not text:
        return {}
    by_id = {s.experiment_id: s for s in specs}
    ids = set(by_id)
    sweeps = _sweeps(by_id)
    pins: dict[str, str] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        instance, sep, node = item.partition(":")
        instance, node = instance.strip(), node.strip()
        if not sep or not instance or not node:
            raise UsageError(f"--placement: {item!r} is not of the form INSTANCE:NODE")
        if instance in sweeps:  # a sweep's name pins every one of its tasks
            _pin_target(cluster, node, instance)
            for task in sweeps[instance]:
                if pins.get(task, node) != node:
                    raise UsageError(f"--placement: {task} is pinned twice "
                                     f"({pins[task]} and {node})")
                pins[task] = node
            continue
        if instance not in ids:
            raise UsageError(f"--placement: unknown instance id {instance!r}; instances: "
                             f"{_known_ids(by_id, sweeps) or '(none: give --config files)'}")
        _pin_target(cluster, node, instance)
        if instance in pins and pins[instance] != node:
            raise UsageError(f"--placement: {instance} is pinned twice "
                             f"({pins[instance]} and {node})")
        pins[instance] = node
    return pins


def target_pins(pins: Mapping[str, str], cluster: Cluster) -> dict[str, str]:
    """The pins (instance -> target name) that name a Slurm target."""
    return {i: n for i, n in pins.items() if cluster.slurm_target(n) is not None}


def bench_pins(pins: Mapping[str, str], cluster: Cluster) -> dict[str, str]:
    """``pins`` for the bench planner; refuses (one line) any pin to a Slurm target, which
    the planner must never see: such work is the Slurm dispatch's, never a bench node's."""
    slurm = target_pins(pins, cluster)
    if slurm:
        ids = sorted(slurm)
        shown = ", ".join(f"{i}:{slurm[i]}" for i in ids[:5]) + (" ..." if len(ids) > 5 else "")
        raise UsageError(f"--placement: {shown} pins work to a Slurm target, which this "
                         "command cannot place on bench nodes (a run is all-bench or all-Slurm)")
    return dict(pins)
