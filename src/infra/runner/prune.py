"""``prune``: remove old, finished runs' directories on the nodes and locally.

A run is a candidate when it is not pruned yet, every instance of it is over in the store,
and it ended (its last instance's end, else its creation) before the cutoff. Each node the
run used is asked once, for all its candidates together, with a bounded call; the node's
supervisor refuses a run with any instance still active there (``PruneState.ACTIVE``). A
run is pruned locally (``<log_dir>/<RUN>/`` removed, the store's rows kept and marked
``pruned_at``) only once every node it used is clean, so a rerun finishes what an
unreachable node left. Nothing outside ``.infra/runs/<RUN>`` on a node or ``<log_dir>/<RUN>``
here is ever deleted; run ids are checked with the id rule before they become paths.
"""

from __future__ import annotations

import asyncio
import enum
import os
import shutil
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from infra.errors import InfraError, StateError, TransportError, TransportTimeoutError
from infra.runner.supervisor_client import (
    PrunedRun,
    PruneState,
    SupervisorClient,
    check_id,
)
from infra.state import InstanceRecord, RunRecord, Store

ALL_RUNS = 1 << 62
"""``Store.runs`` limit meaning every run."""
PER_RUN_SECONDS = 2.0
"""Extra time a node's prune call gets per run it removes (big trees take a while)."""


class LocalState(str, enum.Enum):
    """What happened (or would) to a run's local directory and rows."""

    PRUNED = "pruned"
    WOULD_PRUNE = "would_prune"
    KEPT = "kept"          # a node still has it (active there, or not reachable)


@dataclass(frozen=True)
class Candidate:
    """An old run whose instances are all over in the store, and the nodes it used."""

    run_id: str
    ended_at: float
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class Skipped:
    """An old run left alone before any node was asked, and why."""

    run_id: str
    reason: str


@dataclass(frozen=True)
class RunOutcome:
    """One candidate after the nodes answered: per node, then locally."""

    run_id: str
    ended_at: float
    nodes: Mapping[str, PrunedRun | str]  # node -> its answer, or why it was not asked/failed
    local: LocalState
    local_bytes: int
    reason: str = ""


@dataclass
class PruneReport:
    dry_run: bool
    cutoff: float
    runs: list[RunOutcome] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    node_errors: dict[str, str] = field(default_factory=dict)  # node -> one line
    local_errors: dict[str, str] = field(default_factory=dict)  # run -> one line

    @property
    def failed(self) -> bool:
        """True when a node could not be asked, or something could not be removed."""
        return bool(self.node_errors) or bool(self.local_errors) or any(
            isinstance(a, PrunedRun) and a.state is PruneState.ERROR
            for r in self.runs for a in r.nodes.values())


def run_ended(run: RunRecord, records: Iterable[InstanceRecord]) -> float:
    """When the run was last doing something: its last instance's end, else its creation."""
    ends = [r.ended_at or r.started_at or run.created_at for r in records]
    return max([run.created_at, *ends])


def select(store: Store, cutoff: float, known_nodes: Iterable[str]
           ) -> tuple[list[Candidate], list[Skipped]]:
    """The runs to prune (pure over the store): old, not pruned, every instance over."""
    known = set(known_nodes)
    candidates: list[Candidate] = []
    skipped: list[Skipped] = []
    for run in store.runs(ALL_RUNS):
        if run.pruned_at is not None:
            continue
        try:
            records = store.instances(run.run_id)
        except StateError as exc:  # undecodable rows: left alone, said once
            skipped.append(Skipped(run.run_id, exc.one_line()))
            continue
        ended = run_ended(run, records)
        if ended >= cutoff:
            continue
        try:
            check_id(run.run_id, "run id")
        except InfraError as exc:
            skipped.append(Skipped(run.run_id, exc.one_line()))
            continue
        if run.on_slurm:  # its files are in the Slurm target's work dir: not this tool's
            skipped.append(Skipped(run.run_id, "a Slurm run: prune leaves it (its files on "
                                   "the cluster are not removed by this version)"))
            continue
        active = [r.instance_id for r in records if not r.state.finished]
        if active:
            skipped.append(Skipped(run.run_id, f"{', '.join(active)} not over in the store "
                                   f"(`status {run.run_id}` refreshes it)"))
            continue
        used = {r.node for r in records} | {n for r in records for n in r.previous_nodes}
        unknown = sorted(used - known)
        if unknown:
            skipped.append(Skipped(run.run_id, f"used node(s) not in the cluster config: "
                                   f"{', '.join(unknown)}"))
            continue
        candidates.append(Candidate(run.run_id, ended, tuple(sorted(used))))
    return candidates, skipped


def local_dir(log_dir: Path, run_id: str) -> Path | None:
    """``<log_dir>/<RUN>`` when it is a real directory right inside the log dir, else None."""
    path = log_dir / check_id(run_id, "run id")
    if path.is_symlink() or not path.is_dir():
        return None
    if path.resolve().parent != log_dir.resolve():
        return None
    return path


def tree_bytes(path: Path | None) -> int:
    """Bytes of the files under ``path`` (links not followed)."""
    if path is None:
        return 0
    total = 0
    for top, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(top, name)).st_size
            except OSError:
                continue
    return total


ClientFor = Callable[[str], Awaitable[SupervisorClient]]


async def ask_nodes(by_node: Mapping[str, list[str]], client_for: ClientFor, *,
                    dry_run: bool, bound: float
                    ) -> dict[str, list[PrunedRun] | InfraError]:
    """One prune call per node, all at once, each within ``bound`` seconds (+ per run)."""
    async def call(node: str, runs: list[str], limit: float) -> list[PrunedRun]:
        client = await client_for(node)
        return await client.prune(runs, dry_run=dry_run, timeout=limit)

    async def one(node: str, runs: list[str]) -> tuple[str, list[PrunedRun] | InfraError]:
        limit = bound + PER_RUN_SECONDS * len(runs)
        try:  # the call has its own timeout; this bounds connecting too
            return node, await asyncio.wait_for(call(node, runs, limit), limit + 5.0)
        except InfraError as exc:  # its own timeouts included
            return node, exc
        except asyncio.TimeoutError:
            return node, TransportTimeoutError(node, f"no answer within {limit + 5.0:g} s")

    return dict(await asyncio.gather(*(one(n, r) for n, r in by_node.items())))


def _reason(exc: InfraError) -> str:
    return exc.reason if isinstance(exc, TransportError) else exc.one_line()


def settle(store: Store, log_dir: Path, candidates: list[Candidate],
           answers: Mapping[str, list[PrunedRun] | InfraError], *, dry_run: bool,
           report: PruneReport) -> None:
    """Fold the nodes' answers in; prune a run locally once every node of it is clean."""
    for node, answer in answers.items():
        if isinstance(answer, InfraError):
            report.node_errors[node] = _reason(answer)
    for cand in candidates:
        per_node: dict[str, PrunedRun | str] = {}
        for node in cand.nodes:
            got = answers.get(node)
            if isinstance(got, InfraError):
                per_node[node] = f"failed: {_reason(got)}"
                continue
            mine = [a for a in got or [] if a.run_id == cand.run_id]
            per_node[node] = mine[0] if mine else "no answer for this run"
        clean = all(isinstance(a, PrunedRun) and a.state in (
            PruneState.PRUNED, PruneState.ABSENT, PruneState.WOULD_PRUNE)
            for a in per_node.values())
        path = local_dir(log_dir, cand.run_id)
        size = tree_bytes(path)
        if not clean:
            state, why = LocalState.KEPT, _kept_reason(per_node)
        elif dry_run:
            state, why = LocalState.WOULD_PRUNE, ""
        else:
            state, why = _prune_local(store, cand.run_id, path)
            if why:
                report.local_errors[cand.run_id] = why
        report.runs.append(RunOutcome(cand.run_id, cand.ended_at, per_node, state, size, why))


def _prune_local(store: Store, run_id: str, path: Path | None) -> tuple[LocalState, str]:
    """Delete the run's local directory, then mark it pruned; a failed delete keeps both."""
    if path is not None:
        try:
            shutil.rmtree(path)
        except OSError as exc:
            return LocalState.KEPT, f"local: cannot remove {exc.filename or path}: " \
                                    f"{exc.strerror or exc}"
    store.mark_pruned(run_id)
    return LocalState.PRUNED, ""


def _kept_reason(per_node: Mapping[str, PrunedRun | str]) -> str:
    """Why a run stays locally: the first node that still has it, and how."""
    for node, a in per_node.items():
        if isinstance(a, str):
            return f"{node}: {a}"
        if a.state is PruneState.ACTIVE:
            return f"{node}: still active there ({', '.join(a.active)})"
        if a.state is PruneState.ERROR:
            return f"{node}: {a.error}"
    return ""


async def prune_runs(store: Store, log_dir: Path, known_nodes: Iterable[str],
                     client_for: ClientFor, *, cutoff: float, dry_run: bool,
                     bound: float) -> PruneReport:
    """Select, ask every node once, then settle each run locally (see the module doc)."""
    report = PruneReport(dry_run=dry_run, cutoff=cutoff)
    candidates, report.skipped = select(store, cutoff, known_nodes)
    by_node: dict[str, list[str]] = {}
    for cand in candidates:
        for node in cand.nodes:
            by_node.setdefault(node, []).append(cand.run_id)
    answers = await ask_nodes(by_node, client_for, dry_run=dry_run, bound=bound)
    settle(store, log_dir, candidates, answers, dry_run=dry_run, report=report)
    return report
