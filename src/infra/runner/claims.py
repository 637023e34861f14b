"""Coordinator side of node claims: what a start asks a node to hold, and what nodes hold.

The node is the truth about what runs on it (``infra/remote/supervisor.py`` keeps a claim
file per live instance and checks every start under a node-wide lock). Placement counts
the claims of every node that answered, whoever started the work, and falls back to this
coordinator's store only for nodes it could not ask.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from infra.config.model import Cluster, ExperimentSpec, NodeConfig
from infra.errors import InfraError
from infra.placement.allocation import Allocation
from infra.placement.snapshot import demand_on
from infra.runner.supervisor_client import Claim, SupervisorClient
from infra.state import InstanceRecord
from infra.state.codec import spec_document
from infra.state.store import coordinator_id

OccupiedWork = tuple[ExperimentSpec, str, Allocation | None]


def node_capacity(node: NodeConfig) -> dict[str, float]:
    """The capacity a node's claims are checked against (as placement counts it)."""
    return {"slots": float(node.max_instances), "ram_gb": node.available_ram_gb,
            "gpu_memory_gb": 0.0 if node.unified_memory else node.gpu_memory_gb,
            "cpu_cores": float(node.cpu_cores)}


def claim_request(node: NodeConfig, spec: ExperimentSpec, alloc: Allocation | None, *,
                  force: bool = False) -> dict[str, Any]:
    """The ``claim`` part of a start request: capacity, demand, and who asks."""
    demand = demand_on(node, spec)
    return {
        "capacity": node_capacity(node),
        "demand": {"slots": 1, "ram_gb": demand.ram_gb, "gpu_memory_gb": demand.gpu_memory_gb,
                   "cpu_cores": demand.cpu_cores,
                   "devices": list(alloc.device_ids) if alloc is not None else [],
                   "ports": [port for _label, port in alloc.ports] if alloc is not None else []},
        "coordinator": coordinator_id(),
        "spec": spec_document(spec),
        "force": force,
    }


async def claims_of(names: Iterable[str],
                    client_for: Callable[[str], Awaitable[SupervisorClient]]
                    ) -> dict[str, list[Claim] | InfraError]:
    """Each named node's live claims, all nodes at once; a failing node gives its error."""
    async def one(name: str) -> tuple[str, list[Claim] | InfraError]:
        try:
            return name, await (await client_for(name)).claims()
        except InfraError as exc:
            return name, exc

    return dict(await asyncio.gather(*(one(n) for n in names)))


def occupied_work(cluster: Cluster, claims: dict[str, list[Claim] | InfraError],
                  stored: Iterable[InstanceRecord], *,
                  but: tuple[str, str] | None = None) -> list[OccupiedWork]:
    """Work that holds capacity now: the claims of the nodes that answered, plus this store's
    active instances on nodes that did not (or whose claims could not be read).

    ``but`` (run, instance) leaves one instance out: the one being placed again.
    """
    out: list[OccupiedWork] = []
    answered = {n for n, c in claims.items() if not isinstance(c, InfraError)}
    for node_name, found in sorted(claims.items()):
        if isinstance(found, InfraError) or node_name not in cluster.node_names:
            continue
        for claim in found:
            if but is not None and (claim.run_id, claim.instance_id) == but:
                continue
            if claim.spec is not None:
                out.append((claim.spec, node_name, claim.allocation))
    for rec in stored:
        if rec.node in answered or (but is not None and (rec.run_id, rec.instance_id) == but):
            continue
        out.append((rec.spec, rec.node, rec.allocation))
    return out
