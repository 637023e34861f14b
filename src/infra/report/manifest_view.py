"""The manifest's essentials for the report, read defensively: ``manifest.json`` is a
record another version may have written, so any key may be missing or of another type,
and every value shown is plain text (escaped by the table builders)."""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from infra.report.html import Cell, utc

NODE_COLUMNS = ("node", "hostname", "os", "kernel", "arch", "python", "L4T / JetPack",
                "nvpmodel", "GPUs", "throttled before", "throttled after")


def dig(doc: Any, *keys: str) -> Any:
    """``doc[k1][k2]...``; None when a level is missing or not a mapping."""
    for key in keys:
        if not isinstance(doc, Mapping):
            return None
        doc = doc.get(key)
    return doc


def text(value: Any, limit: int = 2000) -> str | None:
    """A scalar as text (None for none; lists joined by commas; long text cut)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        out = ", ".join(t for t in (text(v, limit) for v in value) if t)
    elif isinstance(value, Mapping):
        out = ", ".join(f"{k}={text(v, limit)}" for k, v in value.items())
    else:
        out = str(value)
    return out if len(out) <= limit else out[:limit - 1] + "…"


def _command_line(argv: Any) -> str | None:
    if isinstance(argv, Sequence) and not isinstance(argv, str):
        return shlex.join(str(a) for a in argv)
    return text(argv)


def _commit(git: Any) -> str | None:
    commit = text(dig(git, "commit"))
    if commit is None:
        return None
    dirty = dig(git, "dirty")
    return commit + (" (dirty: uncommitted changes)" if dirty is True else "")


def essentials(doc: Mapping[str, Any]) -> list[tuple[str, Cell]]:
    """Key/value rows: tool, when, command line, tags, git, config, specs (present only)."""
    tool = " ".join(t for t in (text(dig(doc, "tool", "name")),
                                text(dig(doc, "tool", "version"))) if t) or None
    created = dig(doc, "created_at")
    git = dig(doc, "git")
    specs = dig(doc, "specs")
    spec_paths = [text(dig(s, "path")) for s in specs] if isinstance(specs, list) else []
    untracked = dig(git, "untracked")
    rows: list[tuple[str, Cell]] = [
        ("tool", tool),
        ("recorded", utc(float(created)) + " UTC" if isinstance(created, (int, float))
         and not isinstance(created, bool) else text(created)),
        ("command line", _command_line(dig(doc, "command_line"))),
        ("working directory", text(dig(doc, "cwd"))),
        ("tags", text(dig(doc, "tags"))),
        ("git commit", _commit(git)),
        ("git branch", text(dig(git, "branch"))),
        ("uncommitted diff", text(dig(git, "patch_file"))),
        ("untracked files", str(len(untracked)) if isinstance(untracked, list) and untracked
         else None),
        ("cluster config", " ".join(t for t in (text(dig(doc, "config", "path")),
                                                _short(dig(doc, "config", "sha256"))) if t)
         or None),
        ("spec files", ", ".join(p for p in spec_paths if p) or None),
    ]
    if git is None and "git" in doc:
        rows.append(("git", "not a git work tree"))
    return [(k, v) for k, v in rows if v not in (None, "")]


def _short(sha: Any) -> str | None:
    value = text(sha)
    return f"(sha256 {value[:12]})" if value else None


def _gpus(value: Any) -> str | None:
    if not isinstance(value, list):
        return text(value)
    names = [" ".join(t for t in (text(dig(g, "name")), _driver(g)) if t)
             if isinstance(g, Mapping) else text(g) or "" for g in value]
    return ", ".join(n for n in names if n) or None


def _driver(gpu: Mapping[str, Any]) -> str | None:
    driver = text(gpu.get("driver"))
    return f"(driver {driver})" if driver else None


def node_rows(doc: Mapping[str, Any]) -> list[list[Cell]]:
    """One row per node the manifest describes (``NODE_COLUMNS``)."""
    nodes = dig(doc, "nodes")
    if not isinstance(nodes, Mapping):
        return []
    rows: list[list[Cell]] = []
    for name, facts in sorted(nodes.items(), key=lambda kv: str(kv[0])):
        f = facts if isinstance(facts, Mapping) else {}
        release = " / ".join(t for t in (text(f.get("l4t")), text(f.get("jetpack"))) if t)
        rows.append([str(name), text(f.get("hostname")), text(f.get("os")),
                     text(f.get("kernel")), text(f.get("arch")), text(f.get("python")),
                     release or None, text(f.get("nvpmodel")), _gpus(f.get("gpus")),
                     text(f.get("throttled_before")), text(f.get("throttled_after"))])
    return rows
