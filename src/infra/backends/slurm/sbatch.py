"""The sbatch job of one spec, or the job array of a sweep: options and batch script (pure).

``job_script`` turns specs into a ``JobScript``: ``options`` are sbatch argv words (the
driver quotes each one with ``infra.quoting`` before it reaches the login host's shell) and
``text`` is a ``#!/bin/sh`` batch script that picks its task by ``SLURM_ARRAY_TASK_ID``,
exports the same ``INFRA_*`` environment as bench nodes and runs the task's command with
``/bin/sh -c``. Every value in the script is single-quoted by ``infra.quoting.shell_word``.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass

from infra.campaign.env import task_env
from infra.config.model import ExperimentSpec, SlurmTarget
from infra.config.slurm import duration_problem, name_problem, signal_problem
from infra.errors import SlurmMappingError
from infra.quoting import node_path_problem, shell_word

JOB_NAME_PREFIX = "infra"
JOB_NAME_MAX = 200
"""Longest job name this tool gives (a longer one is cut and ends with a digest)."""
COMMENT_PREFIX = "lab-orchestrator"
MB_PER_GB = 1024
_JOB_ID = re.compile(r"^[0-9]{1,12}(?:_[0-9]{1,9})?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FEATURE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,63}$")
_WORD = re.compile(r"^[A-Za-z0-9_.@-]+$")


class DependencyKind(str, enum.Enum):
    """Slurm's dependency types this tool uses: ``after`` is afterok, ``after_any`` afterany."""

    AFTEROK = "afterok"
    AFTERANY = "afterany"


@dataclass(frozen=True)
class Dependency:
    """Wait for ``job``: ``"123"`` (a whole job or array) or ``"123_4"`` (one array task)."""

    kind: DependencyKind
    job: str


@dataclass(frozen=True)
class JobScript:
    """What one ``sbatch`` submits: argv options, the batch script, and index -> instance."""

    key: str  # the instance id, or the sweep's name for an array
    name: str  # --job-name: job_name(run_id, key)
    options: tuple[str, ...]  # sbatch options, one argv word each
    text: str  # the batch script
    instance_ids: tuple[str, ...]  # index i of the array (or the one job) -> instance id

    @property
    def is_array(self) -> bool:
        return any(o.startswith("--array=") for o in self.options)


def _plain(what: str, value: str) -> str:
    """``value`` when it is one safe word (letters, digits, ``._@-``); else a one-line error."""
    if not _WORD.match(value):
        raise SlurmMappingError(f"slurm: {what} {value!r} holds characters that cannot go "
                                "into a job name or comment (letters, digits, '.', '_', '@', '-')")
    return value


def job_name(run_id: str, key: str) -> str:
    """``infra.<run_id>.<key>``: how the driver finds a job again by name (unique per run and
    key; cut to JOB_NAME_MAX characters with a digest of the whole name when longer)."""
    name = f"{JOB_NAME_PREFIX}.{_plain('run id', run_id)}.{_plain('key', key)}"
    if len(name) <= JOB_NAME_MAX:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    return f"{name[:JOB_NAME_MAX - 13]}.{digest}"


def slurm_dir(work_dir: str, run_id: str) -> str:
    """``<work_dir>/.infra/slurm/<run>``: a run's job ids, locks, scripts and output files."""
    return posixpath.join(work_dir, ".infra", "slurm", run_id)


def output_path(work_dir: str, run_id: str, key: str, index: int | None) -> str:
    """Absolute path on the cluster of one task's output file (stdout and stderr):
    ``<slurm_dir>/<key>.out`` for a plain job, ``<slurm_dir>/<key>.<index>.out`` for array
    task ``index``."""
    name = f"{key}.out" if index is None else f"{key}.{index}.out"
    return posixpath.join(slurm_dir(work_dir, run_id), name)


def results_dir(work_dir: str, run_id: str, instance_id: str) -> str:
    """``INFRA_RESULTS_DIR`` on the cluster, laid out as on bench nodes."""
    return posixpath.join(work_dir, ".infra", "runs", run_id, instance_id, "results")


def _output_option(work_dir: str, run_id: str, key: str, array: bool) -> str:
    """``--output``: ``%`` in the path doubled (sbatch reads ``%x`` patterns), ``%a`` for an
    array's task index."""
    base = output_path(work_dir, run_id, key, None).replace("%", "%%")
    return f"--output={base[:-len('.out')]}.%a.out" if array else f"--output={base}"


def dependency_option(dependencies: Sequence[Dependency]) -> str | None:
    """``--dependency=afterok:1:2_3,afterany:4`` (kinds in first-seen order), or None."""
    by_kind: dict[DependencyKind, list[str]] = {}
    for dep in dependencies:
        if not _JOB_ID.match(dep.job):
            raise SlurmMappingError(f"slurm: dependency {dep.job!r} is not a job id "
                                    "(123, or 123_4 for one array task)")
        jobs = by_kind.setdefault(DependencyKind(dep.kind), [])
        if dep.job not in jobs:
            jobs.append(dep.job)
    if not by_kind:
        return None
    return "--dependency=" + ",".join(f"{k.value}:{':'.join(j)}" for k, j in by_kind.items())


def _gpus(spec: ExperimentSpec) -> int:
    """GPUs a spec asks for: its GPU device requests' counts, else 1 when it needs a GPU."""
    count = sum(d.count for d in spec.resources.devices if d.kind == "gpu")
    return count or (1 if spec.gpu_required else 0)


def _constraint(spec: ExperimentSpec) -> str | None:
    """``--constraint=a&b`` from the spec's plain-string constraints (node features)."""
    tags: list[str] = []
    for c in spec.constraints:
        if c.tag is None:
            raise SlurmMappingError(f"{spec.experiment_id}: constraint '{c.describe()}' cannot "
                                    "map to Slurm (only plain-string constraints do: they "
                                    "become --constraint features)")
        if not _FEATURE.match(c.tag):
            raise SlurmMappingError(f"{spec.experiment_id}: constraint {c.tag!r} is not a "
                                    "Slurm feature name (letters, digits, '_', '.', ':', '-')")
        tags.append(c.tag)
    return "&".join(tags) if tags else None


def _checked(spec: ExperimentSpec, key: str, value: str, why: str | None) -> str:
    if why:
        raise SlurmMappingError(f"{spec.experiment_id}: slurm {key} {why}")
    return value


def restart_allowed(spec: ExperimentSpec) -> bool:
    """Whether the spec's restart rules allow another attempt at all (``--requeue``)."""
    return spec.auto_restart is not False and spec.max_retries != 0


def _chdir(work_dir: str, spec: ExperimentSpec) -> str:
    return posixpath.join(work_dir, spec.workdir) if spec.workdir else work_dir


def task_options(target: SlurmTarget, spec: ExperimentSpec, work_dir: str) -> tuple[str, ...]:
    """The resource and policy options one spec maps to (the same for every array task)."""
    others = sorted({d.kind for d in spec.resources.devices if d.kind != "gpu"})
    if others:
        raise SlurmMappingError(f"{spec.experiment_id}: device kind {others[0]!r} cannot map "
                                "to Slurm (only GPUs do, as --gres=gpu:N)")
    opts: list[str] = []
    for key, value in (("partition", target.partition), ("account", target.account),
                       ("qos", target.qos)):
        if value is not None:
            why = name_problem(value, many=key == "partition")
            opts.append(f"--{key}={_checked(spec, key, value, why)}")
    slurm = spec.slurm
    limit = (slurm.time_limit if slurm and slurm.time_limit else None) or target.time_limit
    opts.append(f"--time={_checked(spec, 'time_limit', limit, duration_problem(limit))}")
    opts.append(f"--cpus-per-task={max(1, math.ceil(spec.cpu_cores - 1e-9))}")
    opts.append(f"--mem={max(1, math.ceil(spec.ram_gb * MB_PER_GB - 1e-6))}M")
    gpus = _gpus(spec)
    if gpus:
        opts.append(f"--gres=gpu:{gpus}")
    feature = _constraint(spec)
    if feature:
        opts.append(f"--constraint={feature}")
    if slurm and slurm.signal:
        sig = _checked(spec, "signal", slurm.signal, signal_problem(slurm.signal))
        opts.append(f"--signal={sig}")
    opts.append("--requeue" if restart_allowed(spec) else "--no-requeue")
    chdir = _chdir(work_dir, spec)
    opts.append(f"--chdir={_checked(spec, 'work dir', chdir, node_path_problem(chdir))}")
    return tuple(opts)


def _allocation(target: SlurmTarget, spec: ExperimentSpec) -> str:
    """``INFRA_ALLOCATION``: what is known before Slurm picks a node (JSON)."""
    doc = {"backend": "slurm", "target": target.name, "ram_gb": spec.ram_gb,
           "cpu_cores": spec.cpu_cores, "gpu_required": spec.gpu_required,
           "gpu_memory_gb": spec.gpu_memory_gb, "gpus": _gpus(spec)}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def _branch(target: SlurmTarget, run_id: str, spec: ExperimentSpec, work_dir: str,
            index: int) -> list[str]:
    """One ``case`` branch: the task's environment, its results dir, then its command."""
    env = task_env(spec)
    env["INFRA_INSTANCE_ID"] = spec.experiment_id
    env["INFRA_RESULTS_DIR"] = results_dir(work_dir, run_id, spec.experiment_id)
    env["INFRA_ALLOCATION"] = _allocation(target, spec)
    lines = [f"{index})"]
    for name, value in sorted(env.items()):
        if not _ENV_NAME.match(name):
            raise SlurmMappingError(f"{spec.experiment_id}: env: {name!r} is not an "
                                    "environment variable name")
        lines.append(f"  {name}={shell_word(value)}; export {name}")
    lines.append('  mkdir -p -- "$INFRA_RESULTS_DIR" || exit 1')
    lines.append(f"  exec /bin/sh -c {shell_word(spec.command)}")
    lines.append("  ;;")
    return lines


def _script(target: SlurmTarget, run_id: str, key: str, tasks: Sequence[ExperimentSpec],
            work_dir: str) -> str:
    lines = [
        "#!/bin/sh",
        f"# {COMMENT_PREFIX}: run {run_id}, {key} (generated; the coordinator resubmits "
        "nothing by hand)",
        f"INFRA_RUN_ID={shell_word(run_id)}; export INFRA_RUN_ID",
        'INFRA_NODE="${SLURMD_NODENAME:-$(hostname)}"; export INFRA_NODE',
        'INFRA_ATTEMPT=$(( ${SLURM_RESTART_COUNT:-0} + 1 )); export INFRA_ATTEMPT',
        'case "${SLURM_ARRAY_TASK_ID:-0}" in',
    ]
    for index, spec in enumerate(tasks):
        lines.extend(_branch(target, run_id, spec, work_dir, index))
    lines += [
        "*)",
        f"  echo \"{COMMENT_PREFIX}: no task for array index "
        "${SLURM_ARRAY_TASK_ID:-0}\" >&2",
        "  exit 2",
        "  ;;",
        "esac",
    ]
    return "\n".join(lines) + "\n"


def job_script(target: SlurmTarget, run_id: str, tasks: Sequence[ExperimentSpec], *,
               work_dir: str, dependencies: Sequence[Dependency] = (),
               max_parallel: int | None = None) -> JobScript:
    """One spec -> one job; a sweep's tasks (in task order) -> one array ``0-(N-1)%P``.

    ``work_dir`` is the target's work dir as an absolute path on the cluster. The caller
    creates ``slurm_dir(work_dir, run_id)`` before sbatch: Slurm creates no directory for
    ``--output``, and without it the job fails at launch (FAILED, ``JobLaunchFailure``,
    ``ExitCode=0:53``). Raises ``SlurmMappingError`` (one line) for what cannot map;
    nothing is submitted here.
    """
    if not tasks:
        raise ValueError("job_script needs at least one task")
    if not work_dir.startswith("/"):
        raise SlurmMappingError(f"slurm: the work dir must be an absolute path on the "
                                f"cluster, got {work_dir!r}")
    first = tasks[0]
    array = len(tasks) > 1 or first.task_index is not None
    key = (first.template_id or first.experiment_id) if array else first.experiment_id
    options = task_options(target, first, work_dir)
    for spec in tasks[1:]:
        other = task_options(target, spec, work_dir)
        if other != options:
            diff = sorted(set(other) ^ set(options))
            raise SlurmMappingError(f"{key}: the tasks of one job array must ask for the same "
                                    f"Slurm options; {spec.experiment_id} differs "
                                    f"({', '.join(diff[:4])})")
    if max_parallel is not None and max_parallel < 1:
        raise SlurmMappingError(f"{key}: max_parallel must be at least 1, got {max_parallel}")
    name = job_name(run_id, key)
    head = [f"--job-name={name}", f"--comment={COMMENT_PREFIX} run={run_id} key={key}"]
    if array:
        throttle = f"%{max_parallel}" if max_parallel is not None else ""
        head.append(f"--array=0-{len(tasks) - 1}{throttle}")
    dependency = dependency_option(dependencies)
    tail = [_output_option(work_dir, run_id, key, array), "--open-mode=append"]
    if dependency:
        tail.insert(0, dependency)
    for word in (*head, *options, *tail):
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in word):
            raise SlurmMappingError(f"{key}: sbatch option {word[:60]!r} holds a control "
                                    "character (a newline?)")
    return JobScript(key=key, name=name, options=(*head, *options, *tail),
                     text=_script(target, run_id, key, tasks, work_dir),
                     instance_ids=tuple(s.experiment_id for s in tasks))
