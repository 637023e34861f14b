"""Parse and validate experiment specs (``experiments/*.json``, YAML accepted too)."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from infra.config.model import Cluster, ExperimentSpec, JobType, RecoverPolicy
from infra.config.reader import MAX_COUNT, Section, check_safe_id, load_document
from infra.config.resources import ParsedResources, parse_constraints, parse_resources
from infra.errors import ConfigError, UsageError
from infra.quoting import pattern_problem

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RECOVER_CHOICES = [r.value for r in RecoverPolicy]
JOB_TYPES = [j.value for j in JobType]
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
    control = pattern_problem(value)  # it becomes an rsync protect rule and a node path
    if control:
        raise s.error(key, f"must be on one line: {control}")
    pure = PurePosixPath(value)
    if pure.is_absolute() or any(part.startswith("~") for part in pure.parts):
        raise s.error(key, f"must be relative to the experiment's working directory (no '/' "
                      f"or '~' at the start of a part), got {value!r}")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise s.error(key, f"must not contain control characters, got {value!r}")
    if ".." in pure.parts:
        raise s.error(key, f"must stay inside the working directory (no '..'), got {value!r}")
    return value


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

    raw_cmd = s.raw("command")
    if isinstance(raw_cmd, list) and raw_cmd and all(isinstance(c, str) for c in raw_cmd):
        for i, part in enumerate(raw_cmd):
            if not part.strip():
                raise s.error(f"command[{i}]", "must not be empty (write an empty argument "
                              "with the string form of command)")
        command = shlex.join(raw_cmd)
    elif isinstance(raw_cmd, str) and raw_cmd.strip():
        command = raw_cmd
    else:
        raise s.error("command", "expected a non-empty string or a list of strings")

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
        job_type=s.choice("job_type", JobType, JOB_TYPES, JobType.BATCH),
    )
    s.finish(reserved=RESERVED_SPEC_KEYS)
    return spec


def check_spec_set(specs: Iterable[ExperimentSpec]) -> tuple[ExperimentSpec, ...]:
    """Cross-file checks: unique ids, affinity lists naming known instances.

    Returns the specs sorted by id so nothing downstream depends on flag order.
    """
    by_id: dict[str, ExperimentSpec] = {}
    for spec in specs:
        other = by_id.get(spec.experiment_id)
        if other is not None:
            raise ConfigError(str(spec.source), "experiment_id",
                              f"duplicate instance id {spec.experiment_id!r} "
                              f"(also in {other.source})")
        by_id[spec.experiment_id] = spec
    for spec in by_id.values():
        for key, ids in (("affinity", spec.affinity), ("anti_affinity", spec.anti_affinity)):
            for i, peer in enumerate(ids):
                if peer not in by_id:
                    raise ConfigError(str(spec.source), f"{key}[{i}]",
                                      f"unknown instance id {peer!r}; instances in this run: "
                                      f"{', '.join(sorted(by_id))}")
    return tuple(sorted(by_id.values(), key=lambda sp: sp.experiment_id))


def parse_pins(text: str | None, cluster: Cluster,
               specs: Iterable[ExperimentSpec]) -> dict[str, str]:
    """Parse ``--placement a:jetson,b:rpi1`` into {instance: node}, checking both names."""
    if not text:
        return {}
    ids = {s.experiment_id for s in specs}
    pins: dict[str, str] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        instance, sep, node = item.partition(":")
        instance, node = instance.strip(), node.strip()
        if not sep or not instance or not node:
            raise UsageError(f"--placement: {item!r} is not of the form INSTANCE:NODE")
        if instance not in ids:
            raise UsageError(f"--placement: unknown instance id {instance!r}; instances: "
                             f"{', '.join(sorted(ids)) or '(none: give --config files)'}")
        if node not in cluster.node_names:
            raise UsageError(f"--placement: unknown node {node!r} for {instance}; nodes: "
                             f"{', '.join(cluster.node_names)}")
        if instance in pins and pins[instance] != node:
            raise UsageError(f"--placement: {instance} is pinned twice "
                             f"({pins[instance]} and {node})")
        pins[instance] = node
    return pins
