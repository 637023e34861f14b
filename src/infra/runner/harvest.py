"""Batched harvest: many ended instances' logs and results home in one supervisor call.

A campaign ends many short tasks at once; copying each one's log and results with its own
remote calls (a log read, a status, two listings, one copy per file) costs several Python
starts on the node per task. ``harvest_node`` asks the node's supervisor once for a batch
(``supervisor.py harvest``): per instance its state, its log from where the local copy ends,
and its results listings (the lister's rules: nothing followed out of the base, regular
readable files only) with small files inline. It appends the log chunks exactly as
``RunSession.sync_log`` does, writes the inline files through a temporary name, copies the
larger ones with ``copy_home`` and records the results as ``fetch_results`` does.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.errors import CommandFailedError, InfraError, LeaseLostError, NodeDocumentError
from infra.runner.results import (
    MAX_RESULT_FILES,
    ResultFile,
    ResultListing,
    ResultsFetch,
    _record,
    _under,
    copy_home,
    local_results_dir,
)
from infra.runner.supervisor_client import InstanceState
from infra.state import InstanceRecord, ResultIssue

if TYPE_CHECKING:
    from infra.runner.lifecycle import RunSession

LOG_MAX_BYTES = 1 << 20        # log bytes per instance and call (the rest comes next batch)
LOG_TOTAL_BYTES = 4 << 20      # log bytes per call
INLINE_MAX_BYTES = 64 << 10    # a listed file at most this big comes inline ...
INLINE_TOTAL_BYTES = 4 << 20   # ... while the call's inline bytes stay under this
DOC_BUDGET_BYTES = 6 << 20     # items past this answer size are deferred to a later call
"""Together well under the transport's 16 MiB output cap, base64 included."""


@dataclass(frozen=True)
class HarvestOutcome:
    """What one harvest did for one instance."""

    instance_id: str
    deferred: bool = False                 # the node left it for a later call (answer size)
    log_size: int | None = None            # the local copy's size after the append
    eof: bool = False                      # the node's log was read to its end
    ended: bool = False                    # the instance had ended on the node before reading
    log_error: InfraError | None = None    # the log could not be copied
    results: ResultsFetch | None = None    # results fetched (when asked)
    results_error: InfraError | None = None

    @property
    def drained(self) -> bool:
        """Ended on the node and its whole log is home: nothing more will come."""
        return self.eof and self.ended and self.log_error is None


def _local_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _item(session: RunSession, rec: InstanceRecord, want_results: bool) -> dict[str, Any]:
    """One request item: the log offset as ``sync_log`` computes it, and the result globs."""
    from infra.runner.lifecycle import instance_cwd, local_log_path
    size = _local_size(local_log_path(session.cluster, rec.run_id, rec.instance_id))
    item: dict[str, Any] = {"instance": rec.instance_id, "offset": max(0, size - rec.log_base),
                            "results": want_results}
    if want_results and rec.spec.results:
        item["cwd"] = instance_cwd(session.cluster.node(rec.node), rec.spec)
        item["patterns"] = list(rec.spec.results)
    return item


def _b64(node: str, where: str, value: Any) -> bytes:
    if not isinstance(value, str):
        raise NodeDocumentError(node, "supervisor", where, "expected base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise NodeDocumentError(node, "supervisor", where, "not base64") from None


def append_log(session: RunSession, rec: InstanceRecord, offset: int, data: bytes,
               guard: Callable[[], bool] | None) -> int | None:
    """Append a chunk read from ``offset`` to the local copy, as ``sync_log`` does; None
    when the copy no longer ends there (written meanwhile: the next call reads again)."""
    from infra.runner.lifecycle import local_log_path
    path = local_log_path(session.cluster, rec.run_id, rec.instance_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as fh:
        if max(0, fh.tell() - rec.log_base) != offset:
            return None
        if data:
            if guard is not None and not guard():
                raise LeaseLostError(f"{rec.run_id}: the run's lease was lost; not writing "
                                     f"{rec.instance_id}'s log copy")
            fh.write(data)
            fh.flush()
        size = fh.tell()
    session.store.update_instance(rec.run_id, rec.instance_id, log_offset=size)
    return size


def write_inline(dest_root: Path, path: str, data: bytes) -> Path | ResultIssue:
    """Write one inline file under ``dest_root`` through a temporary name (as ``copy_one``)."""
    dest = (dest_root / path).resolve()
    if not str(dest).startswith(str(dest_root.resolve()) + os.sep):
        return ResultIssue(path, "would land outside the local results directory")
    part = dest.with_name(f".{dest.name}.part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        part.write_bytes(data)
        os.replace(part, dest)
    except OSError as exc:
        with contextlib.suppress(OSError):
            part.unlink()
        return ResultIssue(path, f"copy failed: {exc.strerror or exc}")
    return dest


def _listing(node: str, where: str, doc: Any) -> tuple[ResultListing, dict[str, bytes]]:
    """A listing document and its inline files (relative path -> bytes)."""
    try:
        listing = ResultListing.from_json(doc)
    except ValueError as exc:
        raise NodeDocumentError(node, "supervisor", where, str(exc)) from None
    inline = {}
    for i, entry in enumerate(doc["files"]):
        if isinstance(entry, Mapping) and "inline_b64" in entry:
            inline[str(entry["path"])] = _b64(node, f"{where}.files[{i}].inline_b64",
                                              entry["inline_b64"])
    return listing, inline


async def _bring_home(session: RunSession, rec: InstanceRecord, answer: Mapping[str, Any],
                      state: InstanceState) -> ResultsFetch:
    """Write the answer's inline files, copy the others, record it all as ``fetch_results``."""
    node = rec.node
    transport = await session.transport(node)
    timeout = session.cluster.health_check.timeout_seconds * 3
    sources: list[tuple[ResultListing, dict[str, bytes], str]] = []
    issues: list[ResultIssue] = []
    patterns = list(rec.spec.results)
    if answer.get("declared") is not None:
        listing, inline = _listing(node, f"harvest[{rec.instance_id}].declared",
                                   answer["declared"])
        sources.append((listing, inline, ""))
        issues += listing.issues("", declared=True)
    if answer.get("results_dir") is not None:
        listing, inline = _listing(node, f"harvest[{rec.instance_id}].results_dir",
                                   answer["results_dir"])
        sources.append((listing, inline, "results"))
        issues += listing.issues("results", declared=False)
    dest_root = local_results_dir(session.cluster, rec.run_id, rec.instance_id)
    fetched: list[Path] = []
    for listing, inline, prefix in sources:
        root = dest_root / prefix if prefix else dest_root
        rest: list[ResultFile] = []
        for f in listing.files:
            if f.path not in inline:
                rest.append(f)
                continue
            got = write_inline(root, f.path, inline[f.path])
            if isinstance(got, Path):
                fetched.append(got)
            else:
                issues.append(ResultIssue(_under(prefix, got.path), got.reason))
        copied, failed = await copy_home(transport, tuple(rest), root, timeout)
        fetched += copied
        issues += [ResultIssue(_under(prefix, f.path), f.reason) for f in failed]
    outcome = ResultsFetch(dest_root, tuple(fetched), tuple(issues))
    final = rec.state.finished or state.is_final
    _record(session, rec, outcome, final=final, declared=bool(patterns))
    return outcome


async def _one(session: RunSession, rec: InstanceRecord, item: Mapping[str, Any],
               answer: Mapping[str, Any], guard: Callable[[], bool] | None) -> HarvestOutcome:
    """Apply one item's answer: append its log chunk, then bring its results home."""
    node, iid = rec.node, rec.instance_id
    if answer.get("deferred"):
        return HarvestOutcome(iid, deferred=True)
    if answer.get("error"):
        err = CommandFailedError(node, f"supervisor harvest: {answer['error']}")
        return HarvestOutcome(iid, log_error=err,
                              results_error=err if item["results"] else None)
    try:
        state = InstanceState.from_json(node, answer.get("state"), where=f"harvest[{iid}].state")
        log = answer.get("log")
        if not isinstance(log, Mapping):
            raise NodeDocumentError(node, "supervisor", f"harvest[{iid}].log", "missing")
        data = _b64(node, f"harvest[{iid}].log.data_b64", log.get("data_b64"))
    except NodeDocumentError as exc:
        return HarvestOutcome(iid, log_error=exc,
                              results_error=exc if item["results"] else None)
    size = append_log(session, rec, int(item["offset"]), data, guard)
    outcome = HarvestOutcome(iid, log_size=size, eof=bool(log.get("eof")) and size is not None,
                             ended=bool(log.get("ended")))
    if not item["results"]:
        return outcome
    try:
        fetched = await _bring_home(session, rec, answer, state)
    except InfraError as exc:
        return HarvestOutcome(iid, log_size=outcome.log_size, eof=outcome.eof,
                              ended=outcome.ended, results_error=exc)
    return HarvestOutcome(iid, log_size=outcome.log_size, eof=outcome.eof,
                          ended=outcome.ended, results=fetched)


async def harvest_node(session: RunSession, run_id: str, node: str,
                       records: Sequence[InstanceRecord], *, results_for: frozenset[str],
                       guard: Callable[[], bool] | None = None) -> dict[str, HarvestOutcome]:
    """Copy the logs of ``records`` (all on ``node``) and the results of those in
    ``results_for`` home with one supervisor call; per instance, what was done.

    Raises ``TransportError`` (and subclasses) when the node could not be asked at all, and
    ``LeaseLostError`` when the guard says the run's lease was lost before a write.
    """
    items = [_item(session, rec, rec.instance_id in results_for) for rec in records]
    if not items:
        return {}
    request = {"run_id": run_id, "anchor": session.cluster.node(node).remote_work_dir,
               "log_max": LOG_MAX_BYTES, "log_total": LOG_TOTAL_BYTES,
               "inline_max": INLINE_MAX_BYTES, "inline_total": INLINE_TOTAL_BYTES,
               "list_limit": MAX_RESULT_FILES, "doc_budget": DOC_BUDGET_BYTES,
               "items": items}
    client = await session.client(node)
    timeout = max(client.command_timeout, session.cluster.health_check.timeout_seconds * 3)
    answers = await client.harvest(request, timeout=timeout + len(items))
    by_id = {str(a.get("instance")): a for a in answers}
    out: dict[str, HarvestOutcome] = {}
    for rec, item in zip(records, items, strict=True):
        answer = by_id.get(rec.instance_id)
        if answer is None:
            answer = {"error": f"the harvest answer has no entry for {rec.instance_id}"}
        out[rec.instance_id] = await _one(session, rec, item, answer, guard)
    return out
