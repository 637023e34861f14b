"""The run manifest as typed immutable values, and its JSON form (``"version": 1``).

``Manifest.from_json`` is the one place that turns a stored manifest document back into
values; it raises ``StateError`` naming the field when the document is not one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from infra.errors import StateError

MANIFEST_VERSION = 1

# NVIDIA clocks_throttle_reasons bits that only say the GPU is idle or the app asked for it.
NVIDIA_BENIGN_REASONS = 0x1 | 0x2  # GpuIdle, ApplicationsClocksSetting


def _fail(what: str) -> StateError:
    return StateError(f"manifest: {what}")


def _str(doc: Mapping[str, Any], key: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str):
        raise _fail(f"a bad {key!r}: {value!r}")
    return value


def _opt_str(doc: Mapping[str, Any], key: str) -> str | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _fail(f"a bad {key!r}: {value!r}")
    return value


def _strings(doc: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = doc.get(key) or []
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise _fail(f"a bad {key!r} list")
    return tuple(value)


def _map(doc: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(doc, Mapping):
        raise _fail(f"a bad {what}: not an object")
    return doc


@dataclass(frozen=True)
class ToolInfo:
    """The orchestrator that recorded the run."""

    name: str
    version: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version}

    @classmethod
    def from_json(cls, doc: Any) -> ToolInfo:
        d = _map(doc, "tool")
        return cls(_str(d, "name"), _str(d, "version"))


@dataclass(frozen=True)
class GitState:
    """The project tree's git state at launch; the uncommitted diff is in ``patch_file``."""

    commit: str
    branch: str | None  # None: a detached HEAD
    dirty: bool  # tracked files differ from HEAD (staged or not), or untracked files exist
    patch_file: str | None = None  # file name next to manifest.json (None: no diff)
    patch_sha256: str | None = None
    untracked: tuple[str, ...] = ()

    @property
    def short(self) -> str:
        """The commit as ``runs`` shows it: 10 hex digits, ``+dirty`` when the tree was."""
        return self.commit[:10] + ("+dirty" if self.dirty else "")

    def to_json(self) -> dict[str, Any]:
        return {"commit": self.commit, "branch": self.branch, "dirty": self.dirty,
                "patch_file": self.patch_file, "patch_sha256": self.patch_sha256,
                "untracked": list(self.untracked)}

    @classmethod
    def from_json(cls, doc: Any) -> GitState | None:
        if doc is None:
            return None
        d = _map(doc, "git")
        return cls(_str(d, "commit"), _opt_str(d, "branch"), bool(d.get("dirty")),
                   _opt_str(d, "patch_file"), _opt_str(d, "patch_sha256"),
                   _strings(d, "untracked"))


@dataclass(frozen=True)
class FileRecord:
    """One input file as it was read at launch: its path, its text and the text's sha256."""

    path: str
    sha256: str
    text: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "text": self.text}

    @classmethod
    def from_json(cls, doc: Any) -> FileRecord:
        d = _map(doc, "file record")
        return cls(_str(d, "path"), _str(d, "sha256"), _str(d, "text"))


@dataclass(frozen=True)
class GpuRecord:
    """One GPU of a node: its model name and driver."""

    name: str
    driver: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "driver": self.driver}

    @classmethod
    def from_json(cls, doc: Any) -> GpuRecord:
        d = _map(doc, "gpu")
        return cls(_str(d, "name"), _opt_str(d, "driver"))


@dataclass(frozen=True)
class Throttle:
    """A board's throttle state at one moment: the Pi's ``get_throttled`` value and flags,
    and each NVIDIA GPU's ``clocks_throttle_reasons.active`` bit mask (hex text)."""

    pi: str | None = None
    pi_flags: tuple[str, ...] = ()
    gpus: tuple[tuple[str, str], ...] = ()  # (GPU index, reasons as "0x...")

    @property
    def throttling(self) -> bool:
        """True when something slows the board now (not merely "since boot", not idle)."""
        active = ("under_voltage", "arm_frequency_capped", "throttled", "soft_temperature_limit")
        if any(f in active for f in self.pi_flags):
            return True
        for _index, reasons in self.gpus:
            try:
                if int(reasons, 16) & ~NVIDIA_BENIGN_REASONS:
                    return True
            except ValueError:
                continue
        return False

    def describe(self) -> str:
        """One short line, e.g. ``pi 0x50000 (under_voltage_occurred); gpu0 0x0``."""
        parts = []
        if self.pi is not None:
            parts.append(f"pi {self.pi}" + (f" ({', '.join(self.pi_flags)})"
                                            if self.pi_flags else ""))
        parts += [f"gpu{i} {r}" for i, r in self.gpus]
        return "; ".join(parts) or "-"

    def to_json(self) -> dict[str, Any]:
        return {"pi": self.pi, "pi_flags": list(self.pi_flags),
                "gpus": {i: r for i, r in self.gpus}, "throttling": self.throttling}

    @classmethod
    def from_json(cls, doc: Any) -> Throttle | None:
        if doc is None:
            return None
        d = _map(doc, "throttle state")
        gpus = _map(d.get("gpus") or {}, "throttle gpus")
        return cls(_opt_str(d, "pi"), _strings(d, "pi_flags"),
                   tuple((str(k), str(v)) for k, v in gpus.items()))


@dataclass(frozen=True)
class NodeRecord:
    """What one node was when the run used it (from the health probe)."""

    hostname: str
    os: str
    kernel: str
    arch: str
    python: str
    l4t: str | None = None
    jetpack: str | None = None
    nvpmodel: str | None = None
    gpus: tuple[GpuRecord, ...] = ()
    throttled_before: Throttle | None = None
    throttled_after: Throttle | None = None
    after_error: str | None = None  # why the end probe found nothing (None: it did, or none yet)

    def facts(self) -> dict[str, Any]:
        """The values ``compare`` looks at, flat, by name (throttle states described)."""
        return {"hostname": self.hostname, "os": self.os, "kernel": self.kernel,
                "arch": self.arch, "python": self.python, "l4t": self.l4t,
                "jetpack": self.jetpack, "nvpmodel": self.nvpmodel,
                "gpus": ", ".join(g.name + (f" ({g.driver})" if g.driver else "")
                                  for g in self.gpus) or None,
                "throttled_before": None if self.throttled_before is None
                else self.throttled_before.describe(),
                "throttled_after": None if self.throttled_after is None
                else self.throttled_after.describe()}

    def to_json(self) -> dict[str, Any]:
        return {"hostname": self.hostname, "os": self.os, "kernel": self.kernel,
                "arch": self.arch, "python": self.python, "l4t": self.l4t,
                "jetpack": self.jetpack, "nvpmodel": self.nvpmodel,
                "gpus": [g.to_json() for g in self.gpus],
                "throttled_before": None if self.throttled_before is None
                else self.throttled_before.to_json(),
                "throttled_after": None if self.throttled_after is None
                else self.throttled_after.to_json(),
                "after_error": self.after_error}

    @classmethod
    def from_json(cls, doc: Any) -> NodeRecord:
        d = _map(doc, "node record")
        gpus = d.get("gpus") or []
        if not isinstance(gpus, list):
            raise _fail("a bad node 'gpus' list")
        return cls(_str(d, "hostname"), _str(d, "os"), _str(d, "kernel"), _str(d, "arch"),
                   _str(d, "python"), _opt_str(d, "l4t"), _opt_str(d, "jetpack"),
                   _opt_str(d, "nvpmodel"), tuple(GpuRecord.from_json(g) for g in gpus),
                   Throttle.from_json(d.get("throttled_before")),
                   Throttle.from_json(d.get("throttled_after")), _opt_str(d, "after_error"))


@dataclass(frozen=True)
class Manifest:
    """Everything needed to reproduce a run, recorded before its launch."""

    run_id: str
    created_at: float
    tool: ToolInfo
    command_line: tuple[str, ...]
    cwd: str
    tags: tuple[str, ...]
    git: GitState | None  # None: git missing, or the deploy source is not a work tree
    config: FileRecord
    specs: tuple[FileRecord, ...]
    experiments: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, hash=False)
    nodes: Mapping[str, NodeRecord] = field(default_factory=dict, hash=False)
    git_error: str | None = None  # why ``git`` is None, when it is
    finished_at: float | None = None  # when the end record (throttled_after) was added

    def with_end(self, after: Mapping[str, Throttle | str | None], at: float) -> Manifest:
        """The manifest with each named node's state at the end: a ``Throttle``, or the
        reason the end probe could not say (a string)."""
        nodes = dict(self.nodes)
        for name, state in after.items():
            if name not in nodes:
                continue
            if isinstance(state, str):
                nodes[name] = dataclasses.replace(nodes[name], after_error=state)
            else:
                nodes[name] = dataclasses.replace(nodes[name], throttled_after=state,
                                                  after_error=None)
        return dataclasses.replace(self, nodes=nodes, finished_at=at)

    def to_json(self) -> dict[str, Any]:
        return {"version": MANIFEST_VERSION, "run_id": self.run_id,
                "created_at": self.created_at, "finished_at": self.finished_at,
                "tool": self.tool.to_json(), "command_line": list(self.command_line),
                "cwd": self.cwd, "tags": list(self.tags),
                "git": None if self.git is None else self.git.to_json(),
                "git_error": self.git_error, "config": self.config.to_json(),
                "specs": [s.to_json() for s in self.specs],
                "experiments": {k: dict(v) for k, v in self.experiments.items()},
                "nodes": {k: v.to_json() for k, v in self.nodes.items()}}

    @classmethod
    def from_json(cls, doc: Any) -> Manifest:
        """Decode a manifest document; ``StateError`` naming the field when it is not one."""
        d = _map(doc, "document")
        if d.get("version") != MANIFEST_VERSION:
            raise _fail(f"version {d.get('version')!r}, expected {MANIFEST_VERSION}")
        created, finished = d.get("created_at"), d.get("finished_at")
        if isinstance(created, bool) or not isinstance(created, (int, float)):
            raise _fail(f"a bad 'created_at': {created!r}")
        if finished is not None and (isinstance(finished, bool)
                                     or not isinstance(finished, (int, float))):
            raise _fail(f"a bad 'finished_at': {finished!r}")
        specs = d.get("specs") or []
        if not isinstance(specs, list):
            raise _fail("a bad 'specs' list")
        experiments = _map(d.get("experiments") or {}, "'experiments'")
        nodes = _map(d.get("nodes") or {}, "'nodes'")
        return cls(
            run_id=_str(d, "run_id"), created_at=float(created),
            tool=ToolInfo.from_json(d.get("tool")), command_line=_strings(d, "command_line"),
            cwd=_str(d, "cwd"), tags=_strings(d, "tags"), git=GitState.from_json(d.get("git")),
            config=FileRecord.from_json(d.get("config")),
            specs=tuple(FileRecord.from_json(s) for s in specs),
            experiments={str(k): dict(_map(v, f"experiment {k!r}"))
                         for k, v in experiments.items()},
            nodes={str(k): NodeRecord.from_json(v) for k, v in nodes.items()},
            git_error=_opt_str(d, "git_error"),
            finished_at=None if finished is None else float(finished))
