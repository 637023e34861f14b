"""Fetch an instance's results home, safely: list on the node, then copy each file on its own.

The node-side lister (``infra/remote/results_list.py``) decides what is safe to copy: regular,
readable files whose real path stays inside the results base. Each file then travels
independently with its own timeout, so a stuck or failing copy costs that file only; what was
left out (patterns that matched nothing, skipped entries, failed copies) is recorded on the
instance as ``results_missing`` and reported as bounded events.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import posixpath
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.config.model import Cluster, NodeConfig
from infra.errors import InfraError, TransportError
from infra.quoting import program_command
from infra.state import InstanceRecord, ResultIssue, issues_json
from infra.transport.base import Transport
from infra.transport.marker import extract_json

if TYPE_CHECKING:
    from infra.runner.lifecycle import RunSession

MAX_RESULT_FILES = 10_000
COPY_CONCURRENCY = 4          # files copied at once per instance (the transport bounds channels)
COPY_MIN_SECONDS = 30.0       # every copy may take at least this long ...
COPY_BYTES_PER_SECOND = 1 << 20  # ... plus its size at this slowest rate before it counts stuck
EVENT_LIMIT = 10              # issues named one event each; the rest are summarised in one


@functools.cache
def lister_source() -> str:
    """The node-side lister's source, read once from the installed package."""
    return resources.files("infra.remote").joinpath("results_list.py").read_text(
        encoding="utf-8")


@dataclass(frozen=True)
class ResultFile:
    """One file the lister found safe to copy: ``path`` relative to the base (its name at
    home), ``source`` its resolved path on the node."""

    path: str
    source: str
    size: int


@dataclass(frozen=True)
class ResultListing:
    """What the lister reported for one base directory."""

    base: str
    files: tuple[ResultFile, ...]
    skipped: tuple[ResultIssue, ...]
    missing_patterns: tuple[str, ...]
    truncated: bool = False
    skipped_more: int = 0

    @classmethod
    def from_json(cls, doc: Any) -> ResultListing:
        """Decode the lister's document; ``ValueError`` when it is not one."""
        try:
            return cls(
                base=str(doc["base"]),
                files=tuple(ResultFile(str(f["path"]), str(f["source"]), int(f["size"]))
                            for f in doc["files"]),
                skipped=tuple(ResultIssue(str(s["path"]), str(s["reason"]))
                              for s in doc["skipped"]),
                missing_patterns=tuple(str(p) for p in doc["missing_patterns"]),
                truncated=bool(doc.get("truncated")),
                skipped_more=int(doc.get("skipped_more") or 0))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"malformed results listing ({exc!r})") from None

    def issues(self, prefix: str, *, declared: bool) -> list[ResultIssue]:
        """What this listing left out, with paths as they would lie at home under ``prefix``;
        unmatched patterns count only when the user ``declared`` them."""
        out = [ResultIssue(p, "matched nothing") for p in self.missing_patterns] if declared \
            else []
        out += [ResultIssue(_under(prefix, s.path), s.reason) for s in self.skipped]
        if self.skipped_more:
            out.append(ResultIssue(prefix or ".", f"{self.skipped_more} more entries skipped "
                                   "(not listed)"))
        if self.truncated:
            out.append(ResultIssue(prefix or ".", f"more than {len(self.files)} files: "
                                   "the rest were not fetched"))
        return out


@dataclass(frozen=True)
class ResultsFetch:
    """The outcome of one instance's fetch: files now at home, and what did not come."""

    dest: Path
    files: tuple[Path, ...]
    issues: tuple[ResultIssue, ...]

    @property
    def complete(self) -> bool:
        return not self.issues


def _under(prefix: str, path: str) -> str:
    return posixpath.normpath(posixpath.join(prefix, path)) if prefix else path


def copy_timeout(size: int, floor: float = COPY_MIN_SECONDS) -> float:
    """How long one file's copy may take before it counts as stuck."""
    return max(floor, COPY_MIN_SECONDS) + max(size, 0) / COPY_BYTES_PER_SECOND


def summarise(issues: tuple[ResultIssue, ...] | list[ResultIssue],
              limit: int = EVENT_LIMIT) -> list[str]:
    """Event lines for the issues: one each up to ``limit``, then one line for the rest."""
    lines = [f"not fetched: {i.one_line()}" for i in issues[:limit]]
    if len(issues) > limit:
        lines.append(f"... and {len(issues) - limit} more not fetched "
                     "(all listed by `status --json`)")
    return lines


async def list_results(transport: Transport, node: NodeConfig, base: str,
                       patterns: list[str], timeout: float) -> ResultListing:
    """Run the lister for ``patterns`` under ``base`` on the node; raises ``TransportError``."""
    command = program_command(node.python_path, ["-", node.remote_work_dir, base,
                                                 str(MAX_RESULT_FILES), *patterns])
    result = await transport.run(command, input=lister_source(), timeout=timeout)
    try:
        return ResultListing.from_json(extract_json(result.stdout))
    except ValueError as exc:
        detail = (result.stderr or result.stdout).strip()[-200:] or str(exc)
        raise TransportError(node.name, f"could not list results under {base}: "
                             f"{' '.join(detail.split())}") from None


async def copy_one(transport: Transport, item: ResultFile, dest_root: Path,
                   floor: float) -> Path | ResultIssue:
    """Copy one file home through a temporary name; a failure leaves no partial file."""
    dest = (dest_root / item.path).resolve()
    if not str(dest).startswith(str(dest_root.resolve()) + os.sep):
        return ResultIssue(item.path, "would land outside the local results directory")
    part = dest.with_name(f".{dest.name}.part")
    timeout = copy_timeout(item.size, floor)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.wait_for(transport.get(item.source, str(part)), timeout)
        os.replace(part, dest)
    except asyncio.TimeoutError:
        _discard(part)
        return ResultIssue(item.path, f"copy timed out after {timeout:g} s")
    except InfraError as exc:
        _discard(part)
        return ResultIssue(item.path, f"copy failed: {exc.one_line()}")
    except OSError as exc:
        _discard(part)
        return ResultIssue(item.path, f"copy failed: {exc.strerror or exc}")
    return dest


def _discard(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


async def copy_home(transport: Transport, files: tuple[ResultFile, ...], dest_root: Path,
                    floor: float) -> tuple[list[Path], list[ResultIssue]]:
    """Copy every file independently (a few at a time); one failure never stops the others."""
    gate = asyncio.Semaphore(COPY_CONCURRENCY)

    async def one(item: ResultFile) -> Path | ResultIssue:
        async with gate:
            return await copy_one(transport, item, dest_root, floor)

    outcomes = await asyncio.gather(*(one(f) for f in files))
    fetched = [o for o in outcomes if isinstance(o, Path)]
    failed = [o for o in outcomes if isinstance(o, ResultIssue)]
    return fetched, failed


def local_results_dir(cluster: Cluster, run_id: str, instance_id: str) -> Path:
    """Where an instance's results land at home: logs/<run>/<instance>/."""
    return cluster.log_dir / run_id / instance_id


async def fetch_results(session: RunSession, rec: InstanceRecord, patterns: list[str],
                        cwd: str) -> ResultsFetch:
    """Copy results home into logs/<run>/<id>/: the ``patterns`` (the spec's ``results``
    globs, relative to the instance's ``cwd``) and everything the experiment wrote to
    ``$INFRA_RESULTS_DIR`` (into ``results/``); record and report what did not come.
    Raises ``TransportError`` only when the node could not be asked at all."""
    run_id = rec.run_id
    node = session.cluster.node(rec.node)
    transport = await session.transport(rec.node)
    timeout = session.cluster.health_check.timeout_seconds * 3
    sources: list[tuple[ResultListing, str]] = []
    issues: list[ResultIssue] = []
    if patterns:
        listing = await list_results(transport, node, cwd, patterns, timeout)
        sources.append((listing, ""))
        issues += listing.issues("", declared=True)
    states = await (await session.client(rec.node)).status(run_id, only=[rec.instance_id])
    mine = [s for s in states if s.instance_id == rec.instance_id]
    # only a fetch after the end counts: one taken while it runs must not stop the final one
    final = rec.state.finished or bool(mine and mine[0].is_final)
    if mine and mine[0].results_dir:
        listing = await list_results(transport, node, mine[0].results_dir, ["*"], timeout)
        sources.append((listing, "results"))
        issues += listing.issues("results", declared=False)
    dest_root = local_results_dir(session.cluster, run_id, rec.instance_id)
    fetched: list[Path] = []
    for listing, prefix in sources:
        got, failed = await copy_home(transport, listing.files,
                                      dest_root / prefix if prefix else dest_root, timeout)
        fetched += got
        issues += [ResultIssue(_under(prefix, f.path), f.reason) for f in failed]
    outcome = ResultsFetch(dest_root, tuple(fetched), tuple(issues))
    _record(session, rec, outcome, final=final, declared=bool(patterns))
    return outcome


def record_fetch(session: RunSession, rec: InstanceRecord, outcome: ResultsFetch, *,
                 final: bool, declared: bool) -> None:
    """Record a fetch's outcome on the instance (a Slurm task's fetch too)."""
    _record(session, rec, outcome, final=final, declared=declared)


def _record(session: RunSession, rec: InstanceRecord, outcome: ResultsFetch, *, final: bool,
            declared: bool) -> None:
    """Store what did not come on the instance, and say it: one event each, bounded."""
    session.store.update_instance(rec.run_id, rec.instance_id,
                                  results_fetched=int(final or rec.results_fetched),
                                  results_missing=issues_json(outcome.issues))
    if outcome.files or declared or outcome.issues:
        missing = f"; {len(outcome.issues)} not fetched" if outcome.issues else ""
        session.event(rec.run_id, "results", rec.instance_id,
                      f"fetched {len(outcome.files)} result file(s) into {outcome.dest}"
                      f"{missing}")
    for line in summarise(outcome.issues):
        session.event(rec.run_id, "results", rec.instance_id, line)
