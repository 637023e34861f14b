"""Job types: expand ``system`` / ``sysbatch`` specs into one pinned copy per eligible node.

Pure. A copy is the spec with instance id ``name@node``, ``template_id`` = the original id and
a pin to its node, so ``plan()`` puts it exactly there (and refuses it with a reason if the
node stops fitting). Eligible means the node passes every hard check for the spec on the
cluster as it is (``occupied`` work counted), before this plan's other instances.
``service`` and ``batch`` specs pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from infra.config.model import Cluster, ExperimentSpec, JobType
from infra.placement.checks import DEFAULT_CHECKS, Check, first_rejection
from infra.placement.engine import Occupied, starting_snapshot
from infra.placement.snapshot import NodeCondition
from infra.probe.facts import NodeFacts

SYSTEM_TYPES = (JobType.SYSTEM, JobType.SYSBATCH)


@dataclass(frozen=True)
class SystemExpansion:
    """The specs to plan (copies instead of system specs), their pins, and skipped nodes."""

    specs: tuple[ExperimentSpec, ...]
    pins: Mapping[str, str] = field(default_factory=dict)
    # template id -> ((node, why it gets no copy), ...)
    skipped: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)

    def copies_of(self, template_id: str) -> tuple[str, ...]:
        return tuple(s.experiment_id for s in self.specs if s.template_id == template_id)


def copy_id(template_id: str, node: str) -> str:
    """The instance id of a system job's copy on ``node``: ``name@node``."""
    return f"{template_id}@{node}"


def expand_system_jobs(cluster: Cluster, specs: Iterable[ExperimentSpec],
                       conditions: Mapping[str, NodeCondition] | None = None, *,
                       facts: Mapping[str, NodeFacts] | None = None,
                       occupied: Iterable[Occupied] = (),
                       checks: tuple[tuple[str, Check], ...] = DEFAULT_CHECKS
                       ) -> SystemExpansion:
    """Replace each system/sysbatch spec by one copy per eligible node, pinned there.

    Affinity and anti-affinity lists naming a system spec are rewritten to name its copies.
    """
    spec_list = sorted(specs, key=lambda s: s.experiment_id)
    snap = starting_snapshot(cluster, spec_list, conditions, facts, occupied)
    by_name = {n.name: n for n in snap.nodes}

    out: list[ExperimentSpec] = []
    pins: dict[str, str] = {}
    skipped: dict[str, tuple[tuple[str, str], ...]] = {}
    copies: dict[str, list[str]] = {}
    for spec in spec_list:
        if spec.job_type not in SYSTEM_TYPES:
            out.append(spec)
            continue
        copies[spec.experiment_id] = []
        refused: list[tuple[str, str]] = []
        for node in cluster.nodes:
            why = first_rejection(snap, by_name[node.name], spec, checks)
            if why is not None:
                refused.append((node.name, why))
                continue
            cid = copy_id(spec.experiment_id, node.name)
            copies[spec.experiment_id].append(cid)
            pins[cid] = node.name
            out.append(replace(spec, experiment_id=cid, template_id=spec.experiment_id))
        skipped[spec.experiment_id] = tuple(refused)

    def rewrite(ids: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(x for peer in ids for x in copies.get(peer, [peer])))

    final = tuple(replace(s, affinity=rewrite(s.affinity), anti_affinity=rewrite(s.anti_affinity))
                  if copies and (set(s.affinity) | set(s.anti_affinity)) & copies.keys() else s
                  for s in out)
    return SystemExpansion(specs=tuple(sorted(final, key=lambda s: s.experiment_id)),
                           pins=pins, skipped=skipped)
