"""Record a run's manifest: the project tree's git state and diff, the exact config and
spec texts, the command line, the tool's version and each node's facts; and add the end
record (each node's throttle state) when the run is seen finished.

Files: ``<log_dir>/<run>/manifest.json`` and ``<log_dir>/<run>/code.patch`` (both 0600; the
patch only when the tree differs from HEAD). The store keeps the manifest too
(``runs.manifest_json``). Every git call has a timeout; no git, or no work tree, gives
``git: null`` with the reason, never an error.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from infra.config import Cluster, ExperimentSpec
from infra.errors import InfraError
from infra.manifest.model import (
    FileRecord,
    GitState,
    GpuRecord,
    Manifest,
    NodeRecord,
    Throttle,
    ToolInfo,
)
from infra.probe.facts import NodeFacts
from infra.probe.run import probe_node
from infra.state.codec import spec_document

if TYPE_CHECKING:
    from infra.runner.lifecycle import RunSession

MANIFEST_FILE = "manifest.json"
PATCH_FILE = "code.patch"
GIT_TIMEOUT = 10.0  # seconds for each small git call
GIT_DIFF_TIMEOUT = 60.0  # the diff may be large (binary files)
UNTRACKED_SHOWN = 1000  # untracked paths kept in the manifest
TOOL_NAME = "lab-orchestrator"


class GitUnavailable(Exception):
    """Why the tree's git state cannot be read (git missing, not a repo, a timeout)."""


def tool_info() -> ToolInfo:
    """This orchestrator's name and installed version."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return ToolInfo(TOOL_NAME, version(TOOL_NAME))
    except PackageNotFoundError:
        return ToolInfo(TOOL_NAME, "unknown")


def _git_env() -> dict[str, str]:
    """git that never prompts, never takes the index lock, and answers in English."""
    env = dict(os.environ)
    env.update(GIT_OPTIONAL_LOCKS="0", GIT_TERMINAL_PROMPT="0", LC_ALL="C", LANG="C")
    return env


def _git(root: Path, *args: str, timeout: float = GIT_TIMEOUT, check: bool = True) -> str:
    """Run one git command in ``root``; its stdout, or ``GitUnavailable`` saying why."""
    try:
        proc = subprocess.run(["git", "-C", str(root), *args], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=timeout, env=_git_env())
    except FileNotFoundError:
        raise GitUnavailable("git is not installed") from None
    except subprocess.TimeoutExpired:
        raise GitUnavailable(f"git {args[0]} took more than {timeout:g} s") from None
    except OSError as exc:
        raise GitUnavailable(f"git cannot run: {exc.strerror or exc}") from None
    if check and proc.returncode != 0:
        why = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise GitUnavailable(f"git {args[0]}: {why[-1] if why else f'exit {proc.returncode}'}")
    return proc.stdout.decode("utf-8", "replace")


def git_state(source: Path, run_dir: Path, skip: Path | None = None) -> GitState:
    """The work tree holding ``source``: commit, branch, dirty flag (tracked files differ
    from HEAD, as ``git describe --dirty``), untracked files (not ignored, none under
    ``skip``: the log directory), and the diff against HEAD (staged and unstaged,
    binary-safe) written to ``run_dir/code.patch`` when there is one; ``GitUnavailable``
    when it cannot be read."""
    top = Path(_git(source, "rev-parse", "--show-toplevel").strip())
    commit = _git(top, "rev-parse", "--verify", "-q", "HEAD", check=False).strip()
    if not commit:
        raise GitUnavailable(f"{top}: no commit yet")
    branch = _git(top, "symbolic-ref", "--short", "-q", "HEAD", check=False).strip() or None
    untracked = [p for p in _git(top, "ls-files", "--others", "--exclude-standard",
                                     "--directory", "-z")
                 .split("\0") if p and not _under(top / p, skip)]
    patch = write_patch(top, run_dir / PATCH_FILE)
    return GitState(commit=commit, branch=branch, dirty=patch is not None,
                    patch_file=PATCH_FILE if patch is not None else None, patch_sha256=patch,
                    untracked=tuple(sorted(untracked)[:UNTRACKED_SHOWN]))


def _under(path: Path, parent: Path | None) -> bool:
    if parent is None:
        return False
    try:
        path.resolve().relative_to(parent.resolve())
    except ValueError:
        return False
    return True


def write_patch(top: Path, target: Path) -> str | None:
    """``git diff --binary HEAD`` of the tree into ``target`` (0600); its sha256, or None
    (and no file) when the tracked files equal HEAD."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            proc = subprocess.run(["git", "-C", str(top), "diff", "--binary", "--no-color",
                                   "--no-ext-diff", "HEAD", "--"],
                                  stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.PIPE, timeout=GIT_DIFF_TIMEOUT,
                                  env=_git_env())
    except subprocess.TimeoutExpired:
        target.unlink(missing_ok=True)
        raise GitUnavailable(f"git diff took more than {GIT_DIFF_TIMEOUT:g} s") from None
    except OSError as exc:
        target.unlink(missing_ok=True)
        raise GitUnavailable(f"git diff: {exc.strerror or exc}") from None
    if proc.returncode != 0:
        target.unlink(missing_ok=True)
        why = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise GitUnavailable(f"git diff: {why[-1] if why else f'exit {proc.returncode}'}")
    if target.stat().st_size == 0:
        target.unlink()
        return None
    return file_sha256(target)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path) -> FileRecord:
    """A file's exact text (undecodable bytes replaced) and the sha256 of its bytes."""
    data = path.read_bytes()
    return FileRecord(str(path), hashlib.sha256(data).hexdigest(),
                      data.decode("utf-8", "replace"))


def throttle_of(facts: NodeFacts) -> Throttle | None:
    """The board's throttle state in a probe's facts; None when it reports none."""
    gpus = tuple((str(g.index), g.throttle_reasons) for g in facts.gpus
                 if g.throttle_reasons is not None)
    pi = facts.pi
    if (pi is None or pi.throttled is None) and not gpus:
        return None
    return Throttle(pi=None if pi is None or pi.throttled is None else hex(pi.throttled),
                    pi_flags=() if pi is None else pi.throttled_flags, gpus=gpus)


def node_record(facts: NodeFacts) -> NodeRecord:
    """What the manifest keeps of a node's probe facts."""
    jetson = facts.jetson
    return NodeRecord(
        hostname=facts.hostname, os=facts.os, kernel=facts.kernel, arch=facts.arch,
        python=facts.python, l4t=None if jetson is None else jetson.l4t_release,
        jetpack=None if jetson is None else jetson.jetpack,
        nvpmodel=None if jetson is None else jetson.nvpmodel,
        gpus=tuple(GpuRecord(g.name, g.driver) for g in facts.gpus),
        throttled_before=throttle_of(facts))


def build_manifest(cluster: Cluster, run_id: str, run_dir: Path, *,
                   specs: Iterable[ExperimentSpec], facts: Mapping[str, NodeFacts],
                   tags: Sequence[str], argv: Sequence[str] | None = None,
                   created_at: float | None = None) -> Manifest:
    """The manifest of a run about to launch; writes ``code.patch`` into ``run_dir``."""
    try:
        git: GitState | None = git_state(cluster.deploy_source, run_dir, cluster.log_dir)
        git_error = None
    except GitUnavailable as exc:
        git, git_error = None, str(exc)
    specs = list(specs)
    sources = list(dict.fromkeys(Path(s.source) for s in specs if str(s.source) != "."))
    return Manifest(
        run_id=run_id, created_at=time.time() if created_at is None else created_at,
        tool=tool_info(), command_line=tuple(sys.argv if argv is None else argv),
        cwd=os.getcwd(), tags=tuple(dict.fromkeys(tags)), git=git, git_error=git_error,
        config=file_record(cluster.path),
        specs=tuple(file_record(p) for p in sources if p.is_file()),
        experiments={s.experiment_id: spec_document(s) for s in specs},
        nodes={name: node_record(f) for name, f in sorted(facts.items())})


def write_manifest(run_dir: Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` (0600) atomically: a reader sees the old or the new file."""
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / MANIFEST_FILE
    tmp = run_dir / f".{MANIFEST_FILE}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(manifest.to_json(), f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


async def record_manifest(session: RunSession, run_id: str, *,
                          specs: Iterable[ExperimentSpec], facts: Mapping[str, NodeFacts],
                          tags: Sequence[str]) -> Manifest | None:
    """Record the manifest of a run about to launch, in its directory and in the store.

    git and the file writes run in a thread, so the event loop (SSH keepalives) goes on.
    A file that cannot be written (a full disk) is said as an event and the run goes on
    without a manifest: the record must never cost the experiment."""
    cluster = session.cluster
    run_dir = cluster.log_dir / run_id
    argv = list(sys.argv)

    def build() -> Manifest:
        manifest = build_manifest(cluster, run_id, run_dir, specs=list(specs), facts=facts,
                                  tags=tags, argv=argv)
        write_manifest(run_dir, manifest)
        return manifest

    try:
        manifest = await asyncio.to_thread(build)
    except OSError as exc:
        session.event(run_id, "manifest", run_id,
                      f"manifest not recorded: {exc.strerror or exc}"
                      + (f" ({exc.filename})" if exc.filename else ""))
        return None
    except InfraError as exc:
        session.event(run_id, "manifest", run_id, f"manifest not recorded: {exc.one_line()}")
        return None
    session.store.set_manifest(run_id, manifest)
    if manifest.git is None:
        session.event(run_id, "manifest", run_id, f"no git state recorded: {manifest.git_error}")
    return manifest


END_PROBE_MAX_SECONDS = 20.0


async def record_end(session: RunSession, run_id: str) -> Manifest | None:
    """Add the end record to a finished run's manifest: one probe of each of its nodes
    (all at once, bounded by ``END_PROBE_MAX_SECONDS``), each node's throttle state or why
    it could not be read. Done once; a run without a manifest is left as it is."""
    run = session.store.run(run_id)
    manifest = run.manifest
    if manifest is None or manifest.finished_at is not None:
        return None
    cluster = session.cluster
    names = [n for n in manifest.nodes if n in cluster.node_names]
    timeout = cluster.health_check.timeout_seconds
    bound = min(END_PROBE_MAX_SECONDS, max(5.0, timeout))

    async def one(name: str) -> NodeFacts:
        node = cluster.node(name)
        return await probe_node(await session.pool.get(node), node, timeout)

    after: dict[str, Throttle | str | None] = {
        n: "no longer in the cluster config" for n in manifest.nodes if n not in names}
    found: list[NodeFacts | BaseException | str]
    try:
        found = list(await asyncio.wait_for(
            asyncio.gather(*(one(n) for n in names), return_exceptions=True), bound))
    except asyncio.TimeoutError:
        found = [f"no answer within {bound:g} s" for _ in names]
    for name, result in zip(names, found, strict=True):
        if isinstance(result, NodeFacts):
            after[name] = throttle_of(result)
        elif isinstance(result, InfraError):
            after[name] = result.one_line()
        elif isinstance(result, BaseException):
            after[name] = f"{type(result).__name__}: {result}"
        else:
            after[name] = str(result)
    ended = manifest.with_end(after, time.time())
    session.store.set_manifest(run_id, ended)
    try:
        write_manifest(cluster.log_dir / run_id, ended)
    except OSError as exc:
        session.event(run_id, "manifest", run_id,
                      f"end record kept in the store only: {exc.strerror or exc}")
    return ended
