"""How a spec and an allocation are kept in the store: encoded once, decoded once, here.

The runner, the monitor and the CLI only ever see ``ExperimentSpec`` and ``Allocation``;
nothing outside this module reads a stored spec as a dict, so defaults cannot drift apart.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from infra.campaign.model import CampaignSpec, SweepSpec
from infra.config.model import (
    Constraint,
    ExperimentSpec,
    JobType,
    RecoverPolicy,
    ResourceRequest,
    SlurmOptions,
)
from infra.errors import StateError
from infra.placement.allocation import Allocation


def spec_document(spec: ExperimentSpec) -> dict[str, Any]:
    """What the store keeps of a spec: everything needed to start, re-place and fetch again."""
    doc: dict[str, Any] = {
        "experiment_id": spec.experiment_id,
        "command": spec.command,
        "workdir": spec.workdir,
        "env": dict(spec.env),
        "ram_gb": spec.ram_gb,
        "gpu_required": spec.gpu_required,
        "gpu_memory_gb": spec.gpu_memory_gb,
        "cpu_cores": spec.cpu_cores,
        "results": list(spec.results),
        "recover": spec.recover.value,
        "max_retries": spec.max_retries,
        "auto_restart": spec.auto_restart,
        "description": spec.description,
        "params": dict(spec.params),
        "source": str(spec.source),
        "preferred_node": spec.preferred_node,
        "affinity": list(spec.affinity),
        "anti_affinity": list(spec.anti_affinity),
        "job_type": spec.job_type.value,
        "template_id": spec.template_id,
        "resources": spec.resources.to_json(),
        "constraints": [c.to_json() for c in spec.constraints],
        "after": list(spec.after),
        "after_any": list(spec.after_any),
        "priority": spec.priority,
    }
    # campaign keys only where set: a plain spec's document stays what it was
    if spec.campaign is not None:
        doc["campaign"] = spec.campaign.to_json()
    if spec.task_index is not None:
        doc["task_index"] = spec.task_index
    if spec.sweep is not None:
        doc["sweep"] = spec.sweep.to_json()
    if spec.slurm is not None:
        doc["slurm"] = spec.slurm.to_json()
    return doc


def spec_from_document(doc: dict[str, Any]) -> ExperimentSpec:
    """The spec a run stored; raises ``StateError`` when the document is not one."""
    try:
        max_retries = doc.get("max_retries")
        auto_restart = doc.get("auto_restart")
        campaign, task_index, sweep = doc.get("campaign"), doc.get("task_index"), doc.get("sweep")
        slurm = doc.get("slurm")
        return ExperimentSpec(
            experiment_id=str(doc["experiment_id"]), command=str(doc["command"]),
            source=Path(doc.get("source") or "."), workdir=doc.get("workdir"),
            env=tuple(sorted((str(k), str(v)) for k, v in (doc.get("env") or {}).items())),
            ram_gb=float(doc["ram_gb"]), gpu_required=bool(doc["gpu_required"]),
            gpu_memory_gb=float(doc["gpu_memory_gb"]),
            cpu_cores=float(doc.get("cpu_cores") or 0.0),
            preferred_node=doc.get("preferred_node"),
            affinity=tuple(doc.get("affinity") or ()),
            anti_affinity=tuple(doc.get("anti_affinity") or ()),
            results=tuple(doc.get("results") or ()), recover=RecoverPolicy(doc["recover"]),
            max_retries=None if max_retries is None else int(max_retries),
            auto_restart=None if auto_restart is None else bool(auto_restart),
            description=str(doc.get("description") or ""),
            params=tuple(sorted((doc.get("params") or {}).items())),
            resources=ResourceRequest.from_json(doc.get("resources")),
            constraints=tuple(Constraint.from_json(c) for c in doc.get("constraints") or ()),
            job_type=JobType(doc.get("job_type") or "batch"), template_id=doc.get("template_id"),
            after=tuple(str(x) for x in doc.get("after") or ()),
            after_any=tuple(str(x) for x in doc.get("after_any") or ()),
            priority=int(doc.get("priority") or 0),
            campaign=None if campaign is None else CampaignSpec.from_json(campaign),
            task_index=None if task_index is None else int(task_index),
            sweep=None if sweep is None else SweepSpec.from_json(sweep),
            slurm=None if slurm is None else SlurmOptions.from_json(slurm))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StateError(f"a stored spec cannot be read ({exc!r}): "
                         f"{json.dumps(doc)[:200]}") from None


def encode_spec(spec: ExperimentSpec) -> str:
    return json.dumps(spec_document(spec), sort_keys=True)


@functools.lru_cache(maxsize=16384)
def decode_spec(text: str) -> ExperimentSpec:
    """The spec a store row holds (cached: a campaign's thousands of rows are read every tick,
    and the spec is immutable)."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise StateError(f"a stored spec is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise StateError("a stored spec is not a JSON object")
    return spec_from_document(doc)


def encode_allocation(alloc: Allocation | None) -> str:
    return json.dumps(alloc.to_json() if alloc is not None else {}, sort_keys=True)


def decode_allocation(text: str | None) -> Allocation | None:
    """The recorded allocation, or None for records written before allocations existed."""
    try:
        doc = json.loads(text or "{}")
        return Allocation.from_json(doc) if doc else None
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
