"""A run from plan to results: record, deploy, start, sweep status, stream logs, fetch results.

Every step writes the store before acting and after the outcome, so a coordinator killed
anywhere leaves a record that ``status`` and ``watch`` can rebuild from; starts go through
the node's idempotent supervisor, so retrying after a crash never starts a second copy.
"""

from __future__ import annotations

import asyncio
import json
import os
import posixpath
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.config.model import (
    Cluster,
    Constraint,
    ExperimentSpec,
    JobType,
    NodeConfig,
    RecoverPolicy,
    ResourceRequest,
)
from infra.errors import (
    BadAnswerError,
    CommandFailedError,
    InfraError,
    TransportError,
    UsageError,
)
from infra.placement import Condition, NodeCondition, Plan, plan, why_not
from infra.placement.allocation import Allocation, allocation_env
from infra.runner.deploy import DeployResult, deploy_all
from infra.runner.supervisor_client import (
    InstanceState,
    InstanceStatus,
    RestartPolicy,
    StartRequest,
    SupervisorClient,
)
from infra.state import InstancePhase, InstanceRecord, RunState, Store, new_run_id
from infra.transport.base import Transport
from infra.transport.marker import BEGIN as MARK_BEGIN
from infra.transport.marker import END as MARK_END
from infra.transport.marker import extract_json
from infra.transport.pool import ConnectionPool

EventSink = Callable[[str, str, str], None]
"""(kind, subject, message) -> None: where progress lines go (console, dashboard, tests)."""

MAX_RESULT_FILES = 10_000
LOG_SYNC_ATTEMPTS = 3
"""Times in a row a node may refuse an instance's log (no record, broken answer) before the
coordinator stops asking and says so."""

_PHASE_OF_STATUS = {
    InstanceStatus.STARTING: InstancePhase.STARTING,
    InstanceStatus.RUNNING: InstancePhase.RUNNING,
    InstanceStatus.RESTARTING: InstancePhase.RESTARTING,
    InstanceStatus.EXITED: InstancePhase.EXITED,
    InstanceStatus.FAILED: InstancePhase.FAILED,
    InstanceStatus.STOPPED: InstancePhase.STOPPED,
    InstanceStatus.LOST: InstancePhase.LOST,
}

# A small node-side helper: expand result globs under a directory into a file list.
_RESULTS_LISTER = f"""
BEGIN, END = {MARK_BEGIN!r}, {MARK_END!r}
""" + r"""
import glob, json, os, sys
base = os.path.expanduser(sys.argv[1]); out = []; limit = int(sys.argv[2])
for pat in sys.argv[3:]:
    for hit in sorted(glob.glob(os.path.join(base, pat))):
        if os.path.isdir(hit):
            for root, dirs, files in os.walk(hit):
                dirs.sort()
                out.extend(os.path.join(root, f) for f in sorted(files))
        elif os.path.isfile(hit):
            out.append(hit)
seen = []
for p in out:
    r = os.path.relpath(p, base)
    if not r.startswith('..') and r not in seen:
        seen.append(r)
doc = json.dumps({'base': base, 'files': seen[:limit]})
print(BEGIN + doc + END)
"""


def _noop(kind: str, subject: str, message: str) -> None:
    return None


def spec_document(spec: ExperimentSpec) -> dict[str, Any]:
    """What the store keeps of a spec: enough to start, restart and fetch results later."""
    return {
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
        "params": dict(spec.params),
        "source": str(spec.source),
        "preferred_node": spec.preferred_node,
        "affinity": list(spec.affinity),
        "anti_affinity": list(spec.anti_affinity),
        "job_type": spec.job_type.value,
        "template_id": spec.template_id,
        "resources": spec.resources.to_json(),
        "constraints": [c.to_json() for c in spec.constraints],
    }


def spec_from_document(doc: dict[str, Any]) -> ExperimentSpec:
    """Rebuild the spec a run stored (to re-place an instance after its node was lost)."""
    return ExperimentSpec(
        experiment_id=doc["experiment_id"], command=doc["command"],
        source=Path(doc.get("source") or "."), workdir=doc.get("workdir"),
        env=tuple(sorted((doc.get("env") or {}).items())), ram_gb=float(doc["ram_gb"]),
        gpu_required=bool(doc["gpu_required"]), gpu_memory_gb=float(doc["gpu_memory_gb"]),
        cpu_cores=float(doc.get("cpu_cores") or 0.0), preferred_node=doc.get("preferred_node"),
        affinity=tuple(doc.get("affinity") or ()),
        anti_affinity=tuple(doc.get("anti_affinity") or ()),
        results=tuple(doc.get("results") or ()), recover=RecoverPolicy(doc["recover"]),
        max_retries=doc.get("max_retries"), auto_restart=doc.get("auto_restart"),
        params=tuple(sorted((doc.get("params") or {}).items())),
        resources=ResourceRequest.from_json(doc.get("resources")),
        constraints=tuple(Constraint.from_json(c) for c in doc.get("constraints") or ()),
        job_type=JobType(doc.get("job_type") or "batch"), template_id=doc.get("template_id"))


def allocation_of(rec: InstanceRecord) -> Allocation | None:
    """The allocation a run recorded for an instance (None for older records)."""
    if not rec.allocation:
        return None
    try:
        return Allocation.from_json(rec.allocation)
    except (KeyError, ValueError, TypeError):
        return None


def occupied_by(records: Iterable[InstanceRecord]) -> list[tuple[ExperimentSpec, str,
                                                                    Allocation | None]]:
    """Work holding capacity, ports and devices, in the form placement takes."""
    return [(spec_from_document(r.spec), r.node, allocation_of(r)) for r in records]


def instance_cwd(node: NodeConfig, spec_doc: dict[str, Any]) -> str:
    """Where the command runs on the node: the deployed tree, or ``workdir`` inside it."""
    base = node.remote_work_dir.rstrip("/") or "/"
    workdir = spec_doc.get("workdir")
    return posixpath.join(base, workdir) if workdir else base


def local_log_path(cluster: Cluster, run_id: str, instance_id: str) -> Path:
    return cluster.log_dir / run_id / f"{instance_id}.log"


def local_results_dir(cluster: Cluster, run_id: str, instance_id: str) -> Path:
    return cluster.log_dir / run_id / instance_id


@dataclass
class RunSession:
    """Everything one coordinator process holds while it drives runs."""

    cluster: Cluster
    store: Store
    pool: ConnectionPool
    emit: EventSink = _noop
    clients: dict[str, SupervisorClient] = field(default_factory=dict)

    def event(self, run_id: str | None, kind: str, subject: str, message: str) -> None:
        """Record an event durably, then show it."""
        self.store.add_event(run_id, kind, subject, message)
        self.emit(kind, subject, message)

    async def client(self, node_name: str) -> SupervisorClient:
        node = self.cluster.node(node_name)
        transport = await self.pool.get(node)
        held = self.clients.get(node_name)
        if held is None or held.transport is not transport:
            held = SupervisorClient(transport, node,
                                    command_timeout=max(30.0,
                                                        self.cluster.health_check.timeout_seconds))
            self.clients[node_name] = held
        return held

    async def transport(self, node_name: str) -> Transport:
        return await self.pool.get(self.cluster.node(node_name))

    # ------------------------------------------------------------------ start

    def record_run(self, specs: Sequence[ExperimentSpec], plan: Plan,
                   plan_doc: dict[str, Any]) -> str:
        """Write the run and its planned instances before touching any node."""
        run_id = new_run_id()
        by_id = {s.experiment_id: s for s in specs}
        rows = [(p.instance_id, p.node, spec_document(by_id[p.instance_id]))
                for p in plan.placements]
        self.store.create_run(run_id, str(self.cluster.path), plan_doc, rows)
        for p in plan.placements:
            if p.allocation is not None:
                self.store.update_instance(run_id, p.instance_id, allocation_json=json.dumps(
                    p.allocation.with_run(run_id).to_json()))
            self.store.add_event(run_id, "placed", p.instance_id,
                                 f"placed on {p.node} (score {p.score:g})")
        return run_id

    async def deploy_for_run(self, run_id: str, node_names: Iterable[str],
                             only: str | None = None) -> dict[str, str]:
        """Deploy the tree to the nodes of a run; returns the nodes that failed, with why."""
        nodes = [self.cluster.node(n) for n in sorted(set(node_names))]
        for rec in self.store.instances(run_id):
            if only is None and rec.state is InstancePhase.PLANNED:
                self.store.update_instance(run_id, rec.instance_id,
                                           state=InstancePhase.DEPLOYING)
        results = await deploy_all(nodes, self.cluster.health_check, self.cluster.deploy_source,
                                   excludes=self.cluster.deploy.exclude, delete=True)
        failed: dict[str, str] = {}
        for name, res in results.items():
            if isinstance(res, DeployResult):
                if res.skipped:
                    self.event(run_id, "deploy", name, f"deploy skipped: {res.reason}")
                else:
                    stats = res.stats
                    sent = f"{stats.files_transferred} files, {stats.bytes_sent} bytes" \
                        if stats else "done"
                    self.event(run_id, "deploy", name, f"deployed ({sent})")
            else:
                why = res.reason if isinstance(res, TransportError) else res.one_line()
                failed[name] = why
                self.event(run_id, "deploy", name, f"deploy failed: {why}")
        return failed

    async def start_instance(self, run_id: str, rec: InstanceRecord) -> None:
        """Start one instance through the node's supervisor (idempotent on the node)."""
        node = self.cluster.node(rec.node)
        spec = rec.spec
        self.store.update_instance(run_id, rec.instance_id, state=InstancePhase.STARTING)
        env = dict(spec.get("env") or {})
        if spec.get("params"):
            env["INFRA_PARAMS"] = json.dumps(spec["params"], sort_keys=True)
        alloc = allocation_of(rec)
        alloc_doc: dict[str, Any] = {"node": node.name, "ram_gb": spec.get("ram_gb"),
                                     "gpu_required": spec.get("gpu_required"),
                                     "gpu_memory_gb": spec.get("gpu_memory_gb"),
                                     "cpu_cores": spec.get("cpu_cores")}
        if alloc is not None:
            alloc_doc = alloc.to_json()
            hints = allocation_env(alloc)
            hints.pop("INFRA_ALLOCATION", None)  # the supervisor sets it from ``allocation``
            env.update(hints)
        request = StartRequest(
            run_id=run_id,
            instance_id=rec.instance_id,
            command=spec["command"],
            cwd=instance_cwd(node, spec),
            env=tuple(sorted(env.items())),
            allocation=alloc_doc,
            restart=RestartPolicy.from_config(self.cluster.failover,
                                              auto_restart=spec.get("auto_restart"),
                                              max_retries=spec.get("max_retries"),
                                              always=spec.get("job_type") in ("service",
                                                                              "system")),
        )
        try:
            client = await self.client(node.name)
            state = await client.start(request)
        except InfraError as exc:
            self.store.update_instance(run_id, rec.instance_id, state=InstancePhase.FAILED,
                                       reason=f"start failed: {exc.one_line()}")
            self.event(run_id, "start", rec.instance_id, f"start failed on {node.name}: "
                       f"{exc.one_line()}")
            return
        self.apply_state(run_id, rec, state)
        verb = "already started" if state.already else "started"
        self.event(run_id, "start", rec.instance_id, f"{verb} on {node.name} (pid {state.pid})")

    def deploy_failed(self, run_id: str, rec: InstanceRecord, why: str) -> None:
        """The instance cannot start: its node did not take the tree. Failed, with why."""
        self.mark(run_id, rec, InstancePhase.FAILED, f"deploy to {rec.node} failed: {why}")

    async def launch(self, run_id: str) -> None:
        """Deploy to the run's nodes, then start every planned instance."""
        self.store.set_run_state(run_id, RunState.STARTING)
        records = self.store.instances(run_id)
        failed_nodes = await self.deploy_for_run(run_id, (r.node for r in records))
        starts = []
        for rec in records:
            if rec.node in failed_nodes:
                self.deploy_failed(run_id, rec, failed_nodes[rec.node])
                continue
            starts.append(self.start_instance(run_id, rec))
        await asyncio.gather(*starts)
        self.store.set_run_state(run_id, RunState.RUNNING)

    # ------------------------------------------------------------------ status

    def apply_state(self, run_id: str, rec: InstanceRecord, state: InstanceState) -> None:
        """Fold the supervisor's view of an instance into the store; events on changes.

        A paused instance stays paused when its node reports it over (the pause reason is
        the useful one); it becomes running again only if the node says it still runs.
        """
        phase = _PHASE_OF_STATUS[state.status]
        reason = state.final_reason or ""
        if not reason and state.attempts and state.attempts[-1].reason:
            reason = state.attempts[-1].reason or ""
        if rec.state is InstancePhase.PAUSED and state.is_final:
            return
        self.store.update_instance(
            run_id, rec.instance_id, state=phase, pid=state.pid, exit_code=state.exit_code,
            signal=state.signal, started_at=state.created_at or state.started_at,
            ended_at=state.ended_at if state.is_final else None, restarts=state.restarts,
            reason=reason, last_line=state.last_line[:200])
        if state.restarts > rec.restarts:
            ended = [a for a in state.attempts if a.ended_at is not None]
            why = ended[-1].reason if ended and ended[-1].reason else reason
            self.event(run_id, "restart", rec.instance_id,
                       f"restarted on {rec.node} (attempt {state.restarts + 1}) after: {why}")
        if phase != rec.state and rec.state not in (InstancePhase.STARTING,
                                                     InstancePhase.PLANNED,
                                                     InstancePhase.DEPLOYING,
                                                     InstancePhase.MOVING):
            detail = f" ({reason})" if reason else ""
            self.event(run_id, "state", rec.instance_id, f"{rec.state.value} -> "
                       f"{phase.value}{detail}")

    async def sweep(self, run_id: str, skip: Iterable[str] = ()) -> dict[str, InfraError]:
        """One status call per node of the run; returns node -> error for nodes that failed.

        An unreachable node gives a ``TransportError``; a node whose answer is malformed or
        far too long a ``BadAnswerError`` (the node is broken). Either way the other nodes'
        answers are applied.

        Nodes an instance was moved away from are asked too: a copy still running there
        (the node came back) is stopped, so there are never two. ``skip`` names nodes not
        to contact this time (known to be down).
        """
        records = self.store.instances(run_id)
        skipped = set(skip)
        by_node: dict[str, list[InstanceRecord]] = {}
        for rec in records:
            if rec.node not in skipped:
                by_node.setdefault(rec.node, []).append(rec)
            for old in rec.previous_nodes:
                if old not in skipped and old != rec.node:
                    by_node.setdefault(old, [])

        async def one(node_name: str) -> tuple[str, list[InstanceState] | InfraError]:
            try:
                client = await self.client(node_name)
                return node_name, await client.status(run_id)
            except InfraError as exc:
                return node_name, exc

        errors: dict[str, InfraError] = {}
        for node_name, result in await asyncio.gather(*(one(n) for n in by_node)):
            if isinstance(result, InfraError):
                errors[node_name] = result
                continue
            found = {s.instance_id: s for s in result}
            await self._stop_stale_copies(run_id, node_name, records, found)
            for rec in by_node[node_name]:
                state = found.get(rec.instance_id)
                if state is not None:
                    self.apply_state(run_id, rec, state)
                elif rec.state in (InstancePhase.RUNNING, InstancePhase.RESTARTING):
                    self.store.update_instance(run_id, rec.instance_id, state=InstancePhase.LOST,
                                               reason=f"no record of it on {node_name}")
                    self.event(run_id, "state", rec.instance_id,
                               f"lost: no record of it on {node_name}")
        self._settle_run(run_id)
        return errors

    async def _stop_stale_copies(self, run_id: str, node_name: str,
                                 records: list[InstanceRecord],
                                 found: dict[str, InstanceState]) -> None:
        for rec in records:
            state = found.get(rec.instance_id)
            if rec.node == node_name or state is None or state.is_final:
                continue
            if node_name not in rec.previous_nodes:
                continue
            try:
                await (await self.client(node_name)).stop(run_id, rec.instance_id, grace=5.0)
                self.event(run_id, "stale", rec.instance_id,
                           f"stopped a stale copy on {node_name} (pid {state.pid}); the "
                           f"instance runs on {rec.node} now")
            except InfraError as exc:
                self.event(run_id, "stale", rec.instance_id,
                           f"could not stop the stale copy on {node_name}: {exc.one_line()}")

    # ------------------------------------------------------------------ recovery

    def occupied(self, run_id: str,
                 but: str) -> list[tuple[ExperimentSpec, str, Allocation | None]]:
        """Work holding capacity now: this run's other active instances and other runs'."""
        recs = [r for r in self.store.instances(run_id)
                if r.instance_id != but and r.state.active]
        recs += self.store.active_instances(exclude_run=run_id)
        return occupied_by(recs)

    async def move_instance(self, run_id: str, rec: InstanceRecord,
                            conditions: dict[str, NodeCondition], why: str, *,
                            count: bool = True, keep_if_blocked: bool = False,
                            stop_old: bool = False) -> bool:
        """Re-place an instance off its node through the placement engine and start it there.

        Returns False when no node can take it: the instance is paused with the reason, or
        left as it is with ``keep_if_blocked`` (a drain retries later). ``count`` adds to the
        failure-move count (drains don't); ``stop_old`` stops the copy on the old node first
        (a drain: the node is reachable).
        """
        conds = dict(conditions)
        conds[rec.node] = NodeCondition(Condition.UNAVAILABLE, why)
        spec = spec_from_document(rec.spec)
        result = plan(self.cluster, [spec], conditions=conds,
                      occupied=self.occupied(run_id, rec.instance_id))
        target = result.node_of(rec.instance_id)
        if target is None:
            reason = f"{why}; no node can take it: {why_not(result, rec.instance_id)}"
            if keep_if_blocked:
                self.event(run_id, "blocked", rec.instance_id, reason)
                return False
            self.store.update_instance(run_id, rec.instance_id, state=InstancePhase.PAUSED,
                                       reason=reason)
            self.event(run_id, "paused", rec.instance_id, reason)
            return False
        if stop_old:
            await (await self.client(rec.node)).stop(run_id, rec.instance_id, grace=10.0)
            await self.sync_log(run_id, rec, follow=False)  # drain the old copy's last lines
        path = local_log_path(self.cluster, run_id, rec.instance_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as fh:
            fh.write(f"[orchestrator] moved from {rec.node} to {target}: {why}\n".encode())
            base = fh.tell()
        new_alloc = result.allocation_of(rec.instance_id)
        self.store.update_instance(
            run_id, rec.instance_id, state=InstancePhase.MOVING, node=target,
            allocation_json=json.dumps(new_alloc.with_run(run_id).to_json()
                                       if new_alloc is not None else {}),
            previous_nodes=(*rec.previous_nodes, rec.node),
            moves=rec.moves + (1 if count else 0), pid=None,
            exit_code=None, signal=None, ended_at=None, restarts=0, log_base=base,
            log_offset=base, results_fetched=0, reason=f"moving from {rec.node}: {why}")
        self.event(run_id, "move", rec.instance_id, f"moving from {rec.node} to {target}: {why}")
        failed = await self.deploy_for_run(run_id, [target], only=rec.instance_id)
        moved = self.store.instance(run_id, rec.instance_id)
        if target in failed:
            self.store.update_instance(run_id, rec.instance_id, state=InstancePhase.PAUSED,
                                       reason=f"{why}; deploy to {target} failed: "
                                              f"{failed[target]}")
            return False
        await self.start_instance(run_id, moved)
        return True

    def mark(self, run_id: str, rec: InstanceRecord, phase: InstancePhase, reason: str) -> None:
        self.store.update_instance(run_id, rec.instance_id, state=phase, reason=reason)
        self.event(run_id, phase.value, rec.instance_id, reason)

    def _settle_run(self, run_id: str) -> None:
        records = self.store.instances(run_id)
        if records and all(r.state.finished for r in records):
            run = self.store.run(run_id)
            if run.state not in (RunState.FINISHED, RunState.STOPPED, RunState.FAILED):
                bad = [r for r in records if r.state in (InstancePhase.FAILED, InstancePhase.LOST,
                                                         InstancePhase.PAUSED)]
                final = RunState.FAILED if bad else RunState.FINISHED
                if all(r.state is InstancePhase.STOPPED for r in records):
                    final = RunState.STOPPED
                self.store.set_run_state(run_id, final)
                self.event(run_id, "run", run_id, f"run {final.value}")

    # ------------------------------------------------------------------ logs

    async def sync_log(self, run_id: str, rec: InstanceRecord, *, follow: bool,
                       on_bytes: Callable[[bytes], None] | None = None) -> int:
        """Append the node's log bytes to the local copy from where the copy ends.

        The local file's size is the offset, so after any interruption the stream resumes
        with no byte lost and none written twice. Returns the new size.
        """
        path = local_log_path(self.cluster, run_id, rec.instance_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        client = await self.client(rec.node)
        with open(path, "ab") as fh:
            offset = fh.tell() - rec.log_base  # where the current node's log continues
            if offset < 0:
                offset = 0
            if follow:
                async for chunk in client.follow(run_id, rec.instance_id, offset):
                    fh.write(chunk)
                    fh.flush()
                    if on_bytes:
                        on_bytes(chunk)
            else:
                while True:
                    piece = await client.read(run_id, rec.instance_id, offset)
                    if piece.data:
                        fh.write(piece.data)
                        fh.flush()
                        if on_bytes:
                            on_bytes(piece.data)
                    offset = fh.tell() - rec.log_base
                    if piece.eof or not piece.data:
                        break
            size = fh.tell()
        self.store.update_instance(run_id, rec.instance_id, log_offset=size)
        return size

    async def stream_log_until_done(self, run_id: str, instance_id: str, *,
                                    retry_delay: float = 1.0, attempts: int = LOG_SYNC_ATTEMPTS,
                                    on_bytes: Callable[[bytes], None] | None = None) -> None:
        """Follow one instance's log until it ended and is drained, reconnecting on drops.

        A dropped link is retried for as long as it takes (the node tracker decides when a
        node is gone); a node that answers but refuses (no record of the instance, a broken
        supervisor) is retried ``attempts`` times in a row, then its error is raised.
        """
        refused = 0
        while True:
            rec = self.store.instance(run_id, instance_id)
            try:
                await self.sync_log(run_id, rec, follow=True, on_bytes=on_bytes)
                rec = self.store.instance(run_id, instance_id)
                if rec.state.finished:
                    # drained after the end: one last non-following read closes any gap
                    await self.sync_log(run_id, rec, follow=False, on_bytes=on_bytes)
                    return
                # follow ended: the instance ended on the node; the sweep will record it
                state = await (await self.client(rec.node)).status(run_id)
                mine = [s for s in state if s.instance_id == instance_id]
                if not mine or mine[0].is_final:
                    await self.sync_log(run_id, rec, follow=False, on_bytes=on_bytes)
                    return
                refused = 0
            except (CommandFailedError, BadAnswerError) as exc:
                refused += 1
                if refused >= attempts:
                    raise
                self.emit("log", instance_id, f"log sync refused ({exc.reason}); "
                          f"retry {refused}/{attempts - 1}")
            except TransportError as exc:
                self.emit("log", instance_id, f"log stream interrupted ({exc.reason}); "
                          "resuming")
            await asyncio.sleep(retry_delay)

    # ------------------------------------------------------------------ results

    async def _list_results(self, node: NodeConfig, base: str,
                            patterns: list[str]) -> tuple[str, list[str]]:
        transport = await self.transport(node.name)
        result = await transport.run([node.python_path, "-c", _RESULTS_LISTER, base,
                                      str(MAX_RESULT_FILES), *patterns],
                                     timeout=self.cluster.health_check.timeout_seconds * 3)
        try:
            listing = extract_json(result.stdout)
        except ValueError:
            raise TransportError(node.name, "could not list results: "
                                 f"{(result.stderr or result.stdout).strip()[-200:]}") from None
        return str(listing["base"]), list(listing["files"])

    async def fetch_results(self, run_id: str, rec: InstanceRecord) -> list[Path]:
        """Copy results home into logs/<run>/<id>/: the spec's ``results`` globs (relative to
        the instance's cwd) and everything the experiment wrote to ``$INFRA_RESULTS_DIR``
        (into ``results/``)."""
        patterns = list(rec.spec.get("results") or [])
        node = self.cluster.node(rec.node)
        transport = await self.transport(rec.node)
        sources: list[tuple[str, list[str], str]] = []
        if patterns:
            base, files = await self._list_results(node, instance_cwd(node, rec.spec), patterns)
            sources.append((base, files, ""))
        states = await (await self.client(rec.node)).status(run_id)
        mine = [s for s in states if s.instance_id == rec.instance_id and s.results_dir]
        if mine and mine[0].results_dir:
            base, files = await self._list_results(node, mine[0].results_dir, ["*"])
            sources.append((base, files, "results"))
        dest_root = local_results_dir(self.cluster, run_id, rec.instance_id)
        fetched: list[Path] = []
        for base, files, prefix in sources:
            fetched += await self._copy_home(transport, base, files,
                                             dest_root / prefix if prefix else dest_root)
        self.store.update_instance(run_id, rec.instance_id, results_fetched=1)
        if fetched or patterns:
            self.event(run_id, "results", rec.instance_id,
                       f"fetched {len(fetched)} result file(s) into {dest_root}")
        return fetched

    async def _copy_home(self, transport: Transport, base: str, files: list[str],
                         dest_root: Path) -> list[Path]:
        fetched: list[Path] = []
        for rel in files:
            dest = (dest_root / rel).resolve()
            if not str(dest).startswith(str(dest_root.resolve()) + os.sep):
                continue  # never write outside the results directory
            dest.parent.mkdir(parents=True, exist_ok=True)
            await transport.get(posixpath.join(base, rel), str(dest))
            fetched.append(dest)
        return fetched

    # ------------------------------------------------------------------ stop

    async def stop(self, run_id: str, instance_id: str | None = None,
                   grace: float = 10.0) -> dict[str, str]:
        """Stop a run (or one instance): SIGTERM to the process group, SIGKILL after grace."""
        records = self.store.instances(run_id)
        if instance_id is not None:
            records = [r for r in records if r.instance_id == instance_id]
            if not records:
                raise UsageError(f"run {run_id} has no instance {instance_id!r}")
        by_node: dict[str, list[InstanceRecord]] = {}
        for rec in records:
            by_node.setdefault(rec.node, []).append(rec)
        errors: dict[str, str] = {}

        async def one(node_name: str, recs: list[InstanceRecord]) -> None:
            try:
                client = await self.client(node_name)
                states: list[InstanceState] = []
                if instance_id is None:
                    states = await client.stop(run_id, None, grace=grace)
                else:
                    states = await client.stop(run_id, instance_id, grace=grace)
            except InfraError as exc:
                errors[node_name] = exc.one_line()
                return
            found = {s.instance_id: s for s in states}
            for rec in recs:
                if rec.instance_id in found:
                    self.apply_state(run_id, rec, found[rec.instance_id])

        await asyncio.gather(*(one(n, r) for n, r in by_node.items()))
        for rec in records:
            self.store.add_event(run_id, "stop", rec.instance_id, f"stop requested "
                                 f"(grace {grace:g} s)")
        if instance_id is None and not errors:
            self.store.set_run_state(run_id, RunState.STOPPED)
        self._settle_run(run_id)
        return errors

