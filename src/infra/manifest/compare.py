"""What differs between two runs: a pure diff of their records, section by section.

Sections: code (git), config (the topology file), specs (spec files, each experiment's
stored spec, sweep grids), nodes (probe facts), outcomes (per instance) and metrics (per
instance: metrics.json and telemetry summaries, flattened). Each section is a list of typed
differences; equal values are never listed.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from infra.campaign.table import Scalar, flatten, scalar
from infra.manifest.model import FileRecord, Manifest

FLAT_LIMIT = 10000  # keys compared per document
LINES_SHOWN = 40  # changed lines listed per file when it is not a key/value document
RUNTIME_TOLERANCE = 0.05  # runtimes within 5% (and within RUNTIME_MIN_DELTA s) count as equal
RUNTIME_MIN_DELTA = 1.0
SECTIONS = ("code", "config", "specs", "nodes", "outcomes", "metrics")


@dataclass(frozen=True)
class Difference:
    """One value that differs: ``subject`` (file, experiment, node, instance, or "") and
    ``key`` name it; ``a``/``b`` are the two runs' values (None: absent there)."""

    subject: str
    key: str
    a: Scalar
    b: Scalar

    def to_json(self) -> dict[str, Any]:
        return {"subject": self.subject, "key": self.key, "a": self.a, "b": self.b}


@dataclass(frozen=True)
class Section:
    """One part of the comparison; ``note`` says why it could not be compared fully."""

    name: str
    differences: tuple[Difference, ...] = ()
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"differences": [d.to_json() for d in self.differences], "note": self.note}


@dataclass(frozen=True)
class Outcome:
    """How one instance of a run ended (or where it stands)."""

    state: str
    exit_code: int | None = None
    runtime_s: float | None = None
    node: str | None = None


@dataclass(frozen=True)
class RunSide:
    """One run's records as ``compare`` needs them."""

    run_id: str
    manifest: Manifest | None
    outcomes: Mapping[str, Outcome] = field(default_factory=dict)
    metrics: Mapping[str, Mapping[str, Scalar]] = field(default_factory=dict)


@dataclass(frozen=True)
class Comparison:
    """Two runs' differences, by section (in ``SECTIONS`` order)."""

    run_a: str
    run_b: str
    sections: tuple[Section, ...]

    @property
    def same(self) -> bool:
        return not any(s.differences for s in self.sections)

    def section(self, name: str) -> Section:
        return next(s for s in self.sections if s.name == name)

    def to_json(self) -> dict[str, Any]:
        return {"run_a": self.run_a, "run_b": self.run_b, "same": self.same,
                "sections": {s.name: s.to_json() for s in self.sections}}


def compare(a: RunSide, b: RunSide) -> Comparison:
    """Every difference between two runs' records."""
    missing = [s.run_id for s in (a, b) if s.manifest is None]
    note = f"no manifest recorded for {', '.join(missing)}" if missing else None
    sections: list[Section] = []
    if a.manifest is not None and b.manifest is not None:
        sections += [code_section(a.manifest, b.manifest, (a.run_id, b.run_id)),
                     config_section(a.manifest, b.manifest),
                     specs_section(a.manifest, b.manifest),
                     nodes_section(a.manifest, b.manifest)]
    else:
        sections += [Section(name, note=note) for name in ("code", "config", "specs", "nodes")]
    sections.append(Section("outcomes", tuple(outcome_diffs(a.outcomes, b.outcomes))))
    sections.append(Section("metrics", tuple(metric_diffs(a.metrics, b.metrics))))
    return Comparison(a.run_id, b.run_id, tuple(sections))


# --------------------------------------------------------------------------- values

def same_value(x: Scalar, y: Scalar) -> bool:
    """Equal, with floats compared to 1e-9 relative (a metric written twice alike)."""
    numbers = [v for v in (x, y) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(numbers) == 2 and any(isinstance(v, float) for v in numbers):
        fx, fy = float(numbers[0]), float(numbers[1])
        return math.isclose(fx, fy, rel_tol=1e-9, abs_tol=0.0) or \
            (math.isnan(fx) and math.isnan(fy))
    return x == y and type(x) is type(y)


def diff_flat(subject: str, a: Mapping[str, Scalar],
              b: Mapping[str, Scalar]) -> Iterable[Difference]:
    """The keys whose values differ between two flat documents, in order of first sight."""
    for key in dict.fromkeys([*a, *b]):
        x, y = a.get(key), b.get(key)
        if not same_value(x, y):
            yield Difference(subject, key, x, y)


def flat(doc: Mapping[str, Any]) -> dict[str, Scalar]:
    """A document as dotted keys and scalar values (lists as their JSON text)."""
    pairs, _note = flatten(doc, FLAT_LIMIT)
    return dict(pairs)


def text_diffs(subject: str, a: str, b: str) -> Iterable[Difference]:
    """Two texts' differences: by key when both are YAML/JSON mappings, else by line."""
    da, db = _load(a), _load(b)
    if da is not None and db is not None:
        yield from diff_flat(subject, flat(da), flat(db))
        return
    shown = 0
    lines_a, lines_b = a.splitlines(), b.splitlines()
    matcher = difflib.SequenceMatcher(a=lines_a, b=lines_b, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        old, new = lines_a[i1:i2], lines_b[j1:j2]
        for k in range(max(len(old), len(new))):
            if shown >= LINES_SHOWN:
                yield Difference(subject, "...", "more changed lines not shown", None)
                return
            yield Difference(subject, f"line {i1 + k + 1}" if k < len(old)
                             else f"line {j1 + k + 1} (new)",
                             old[k] if k < len(old) else None, new[k] if k < len(new) else None)
            shown += 1


def _load(text: str) -> Mapping[str, Any] | None:
    try:
        doc = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError, ValueError):
        return None
    return doc if isinstance(doc, Mapping) else None


# --------------------------------------------------------------------------- sections

def code_section(a: Manifest, b: Manifest, names: tuple[str, str] | None = None) -> Section:
    """Commit, branch, dirty flag, the patch's hash and the untracked files."""
    name_a, name_b = names or (a.run_id, b.run_id)
    ga = {} if a.git is None else _git_flat(a)
    gb = {} if b.git is None else _git_flat(b)
    if a.git is None and b.git is None:
        return Section("code", note="no git state recorded for either run")
    return Section("code", tuple(diff_flat("", ga, gb)),
                   note=None if a.git and b.git else
                   f"no git state recorded for {name_a if a.git is None else name_b}")


def _git_flat(m: Manifest) -> dict[str, Scalar]:
    assert m.git is not None
    return {"commit": m.git.commit, "branch": m.git.branch, "dirty": m.git.dirty,
            "patch_sha256": m.git.patch_sha256,
            "untracked": ", ".join(m.git.untracked) or None}


def config_section(a: Manifest, b: Manifest) -> Section:
    """The topology file: its path, then what changed in it (keys, else lines)."""
    out: list[Difference] = []
    if a.config.path != b.config.path:
        out.append(Difference("", "path", a.config.path, b.config.path))
    if a.config.sha256 != b.config.sha256:
        out.extend(text_diffs(b.config.path, a.config.text, b.config.text))
    return Section("config", tuple(out))


def specs_section(a: Manifest, b: Manifest) -> Section:
    """Spec files (matched by path, else by file name), each experiment's stored spec,
    and each sweep's grid (the values each parameter took over its tasks)."""
    out: list[Difference] = []
    for subject, fa, fb in _pair_files(a.specs, b.specs):
        if fa is None or fb is None:
            out.append(Difference(subject, "(file)", None if fa is None else "present",
                                  None if fb is None else "present"))
        elif fa.sha256 != fb.sha256:
            out.extend(text_diffs(subject, fa.text, fb.text))
    ga, gb = sweep_grids(a.experiments), sweep_grids(b.experiments)
    for template in dict.fromkeys([*ga, *gb]):
        if template in ga and template in gb:
            out.extend(diff_flat(f"sweep {template}", ga[template], gb[template]))
    for exp in dict.fromkeys([*a.experiments, *b.experiments]):
        ea, eb = a.experiments.get(exp), b.experiments.get(exp)
        if ea is None or eb is None:
            out.append(Difference(exp, "(experiment)", None if ea is None else "present",
                                  None if eb is None else "present"))
            continue
        out.extend(diff_flat(exp, flat(ea), flat(eb)))
    return Section("specs", tuple(out))


def _pair_files(a: tuple[FileRecord, ...], b: tuple[FileRecord, ...]
                ) -> Iterable[tuple[str, FileRecord | None, FileRecord | None]]:
    """Spec files of two runs side by side: same path first, then same file name."""
    by_path_b = {f.path: f for f in b}
    used: set[str] = set()
    rest_a: list[FileRecord] = []
    for fa in a:
        if fa.path in by_path_b:
            used.add(fa.path)
            yield fa.path, fa, by_path_b[fa.path]
        else:
            rest_a.append(fa)
    rest_b = {_name(f.path): f for f in b if f.path not in used}
    for fa in rest_a:
        fb = rest_b.pop(_name(fa.path), None)
        yield (fa.path if fb is None else f"{fa.path} | {fb.path}"), fa, fb
    for fb in rest_b.values():
        yield fb.path, None, fb


def _name(path: str) -> str:
    return path.replace("\\", "/").rsplit("/", 1)[-1]


def sweep_grids(experiments: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Scalar]]:
    """Per sweep (template id): each parameter's distinct values over its tasks, as sorted
    JSON text (``{"lr": "[0.1, 0.2]"}``)."""
    values: dict[str, dict[str, list[Any]]] = {}
    for doc in experiments.values():
        template = doc.get("template_id")
        params = doc.get("params")
        if doc.get("task_index") is None or not isinstance(template, str) \
                or not isinstance(params, Mapping):
            continue
        grid = values.setdefault(template, {})
        for key, value in params.items():
            seen = grid.setdefault(str(key), [])
            if value not in seen:
                seen.append(value)
    return {t: {k: json.dumps(sorted(v, key=_order), default=str) for k, v in grid.items()}
            for t, grid in values.items()}


def _order(value: Any) -> tuple[int, float, str]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, json.dumps(value, sort_keys=True, default=str))


def nodes_section(a: Manifest, b: Manifest) -> Section:
    """Per node name: the probe facts that differ; a node only one run used."""
    out: list[Difference] = []
    for name in dict.fromkeys([*a.nodes, *b.nodes]):
        na, nb = a.nodes.get(name), b.nodes.get(name)
        if na is None or nb is None:
            out.append(Difference(name, "(node)", None if na is None else "used",
                                  None if nb is None else "used"))
            continue
        fa = {k: scalar(v) for k, v in na.facts().items()}
        fb = {k: scalar(v) for k, v in nb.facts().items()}
        out.extend(diff_flat(name, fa, fb))
    return Section("nodes", tuple(out))


def outcome_diffs(a: Mapping[str, Outcome], b: Mapping[str, Outcome]) -> Iterable[Difference]:
    """Per instance: state, exit code, node, and runtime when it differs by more than
    ``RUNTIME_TOLERANCE`` (and ``RUNTIME_MIN_DELTA`` seconds)."""
    for inst in dict.fromkeys([*a, *b]):
        oa, ob = a.get(inst), b.get(inst)
        if oa is None or ob is None:
            yield Difference(inst, "state", None if oa is None else oa.state,
                             None if ob is None else ob.state)
            continue
        for key in ("state", "exit_code", "node"):
            x, y = getattr(oa, key), getattr(ob, key)
            if x != y:
                yield Difference(inst, key, x, y)
        ra, rb = oa.runtime_s, ob.runtime_s
        if (ra is None) != (rb is None) or (
                ra is not None and rb is not None and abs(ra - rb) > max(
                    RUNTIME_MIN_DELTA, RUNTIME_TOLERANCE * max(ra, rb))):
            yield Difference(inst, "runtime_s", None if ra is None else round(ra, 1),
                             None if rb is None else round(rb, 1))


def metric_diffs(a: Mapping[str, Mapping[str, Scalar]],
                 b: Mapping[str, Mapping[str, Scalar]]) -> Iterable[Difference]:
    """Per instance, every metric whose value differs (or exists in one run only)."""
    for inst in dict.fromkeys([*a, *b]):
        yield from diff_flat(inst, a.get(inst, {}), b.get(inst, {}))
