"""Sweeps: parse a spec's ``sweep`` section and expand the spec into one task per point.

Pure. Task ``i`` of template ``name`` is the instance ``name.NNNN`` (``.`` rather than
``[ ]``: brackets are glob characters for shells and rsync). Its parameters are the
template's ``params`` with the point's values on top; ``{name}`` placeholders in ``command``
(shell-quoted), ``env`` values and ``results`` (raw) are filled with them. ``{{`` and ``}}``
are literal braces; ``${NAME}`` and ``$NAME`` are the shell's and are left alone.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from infra.campaign.model import CampaignSpec, Scalar, SweepSpec, str_form, value_key
from infra.config.model import ExperimentSpec
from infra.config.reader import Section, check_safe_id, display_path, relative_path_problem
from infra.errors import ConfigError

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
BUILTINS = ("task_index", "task_id")
"""Placeholders every sweep task has: its index and its instance id."""
SEED = "seed"
"""The parameter ``repeat`` adds (0..N-1, varying fastest)."""
MIN_ID_WIDTH = 4
PARTS = ("grid", "cases", "zip", "repeat")


@dataclass(frozen=True)
class Placeholder:
    """A ``{name}`` in a template string."""

    name: str


Part = str | Placeholder


class TemplateError(ValueError):
    """A template string is malformed (a lone brace); the caller names file and key."""


def template_parts(text: str) -> tuple[Part, ...]:
    """Split ``text`` into literal text and placeholders; raises ``TemplateError``."""
    out: list[Part] = []
    buf: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "$" and text.startswith("{", i + 1) and not text.startswith("{{", i + 1):
            stop = _shell_brace_end(text, i + 2)  # ${NAME...}: the shell's, copied as written
            buf.append(text[i:stop])
            i = stop
        elif ch in "{}" and text.startswith(ch, i + 1):
            buf.append(ch)
            i += 2
        elif ch == "{" and (m := IDENT.match(text, i + 1)) and text.startswith("}", m.end()):
            if buf:
                out.append("".join(buf))
                buf = []
            out.append(Placeholder(m.group()))
            i = m.end() + 1
        elif ch in "{}":
            raise TemplateError(f"a lone {ch!r} at {text[i:i + 24]!r}: write {ch * 2} for a "
                                "literal brace, {name} for a sweep parameter")
        else:
            buf.append(ch)
            i += 1
    if buf:
        out.append("".join(buf))
    return tuple(out)


def _shell_brace_end(text: str, start: int) -> int:
    """Index after the ``}`` closing a ``${`` whose body starts at ``start`` (nested braces
    counted, so ``${A:-{x}}`` is one); the end of the text when it is not closed."""
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def fill(parts: Sequence[Part], values: Mapping[str, Scalar], *, quote: bool) -> str:
    """The template with each placeholder replaced by its value (shell-quoted if ``quote``)."""
    out: list[str] = []
    for part in parts:
        if isinstance(part, Placeholder):
            text = str_form(values[part.name])
            out.append(shlex.quote(text) if quote else text)
        else:
            out.append(part)
    return "".join(out)


def escape_braces(text: str) -> str:
    """``text`` as a template that fills to itself."""
    return text.replace("{", "{{").replace("}", "}}")


def argv_template(file: str, argv: Sequence[str]) -> str:
    """A list ``command`` of a sweep as one template: each element stays one argument
    whatever its placeholders' values are (literal text quoted now, values when filled)."""
    words: list[str] = []
    for i, item in enumerate(argv):
        try:
            parts = template_parts(item)
        except TemplateError as exc:
            raise ConfigError(file, f"command[{i}]", str(exc)) from None
        words.append("".join(f"{{{p.name}}}" if isinstance(p, Placeholder)
                             else escape_braces(shlex.quote(p)) for p in parts))
    return " ".join(words)


def is_scalar(value: object) -> bool:
    """Whether a value may be a sweep parameter (string, number or boolean)."""
    return isinstance(value, (str, int, float))


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _claim(s: Section, key: str, name: str, seen: dict[str, str]) -> None:
    """Check a parameter name and record where it is set (unique across the parts)."""
    if not IDENT.fullmatch(name):
        raise s.error(key, f"{name!r} is not a valid parameter name (letters, digits and _, "
                      "not starting with a digit)")
    if name in BUILTINS:
        raise s.error(key, f"{name!r} is a built-in placeholder; choose another name")
    if name in seen:
        raise s.error(key, f"duplicate parameter {name!r} (also set by {seen[name]})")
    seen[name] = s.key(key)


def _scalar(s: Section, key: str, value: Any) -> Scalar:
    if not is_scalar(value):
        raise s.error(key, f"expected a string, number or boolean, got {_type_name(value)}")
    return value  # type: ignore[no-any-return]


def _value_lists(s: Section, part: str, seen: dict[str, str]
                 ) -> tuple[tuple[str, tuple[Scalar, ...]], ...]:
    """``grid`` or ``zip``: a mapping name -> non-empty list of distinct scalars."""
    if not s.has(part):
        s.used.add(part)
        return ()
    sub = s.section(part)
    if not sub.data:
        raise s.error(part, "must name at least one parameter")
    out: list[tuple[str, tuple[Scalar, ...]]] = []
    for name, raw in sub.data.items():
        sub.used.add(name)
        _claim(sub, name, name, seen)
        if not isinstance(raw, list) or not raw:
            raise sub.error(name, "expected a non-empty list of values, got "
                            + ("an empty list" if raw == [] else _type_name(raw)))
        values = tuple(_scalar(sub, f"{name}[{i}]", v) for i, v in enumerate(raw))
        if part == "grid":
            first: dict[str, int] = {}
            for i, v in enumerate(values):
                j = first.setdefault(value_key(v), i)
                if j != i:
                    raise sub.error(f"{name}[{i}]", f"repeats {name}[{j}] ({value_key(v)}); "
                                    "use repeat for repeated runs")
        out.append((name, values))
    return tuple(out)


def _zip_rows(s: Section, zipped: tuple[tuple[str, tuple[Scalar, ...]], ...]) -> None:
    """All zip lists have one length, and no row repeats an earlier one."""
    name0, values0 = zipped[0]
    for name, values in zipped[1:]:
        if len(values) != len(values0):
            raise s.error(f"zip.{name}", f"has {len(values)} values but zip.{name0} has "
                          f"{len(values0)}; zip lists must all be the same length")
    first: dict[tuple[str, ...], int] = {}
    for row in range(len(values0)):
        j = first.setdefault(tuple(value_key(v[row]) for _, v in zipped), row)
        if j != row:
            raise s.error("zip", f"entry {row} of the lists repeats entry {j}; "
                          "use repeat for repeated runs")


def _cases(s: Section, seen: dict[str, str]) -> tuple[tuple[tuple[str, Scalar], ...], ...]:
    """``cases``: a non-empty list of mappings that all set the same parameters."""
    raw = s.raw("cases", None)
    if raw is None and not s.has("cases"):
        return ()
    if not isinstance(raw, list) or not raw:
        raise s.error("cases", "expected a non-empty list of parameter mappings, got "
                      + ("an empty list" if raw == [] else _type_name(raw)))
    out: list[tuple[tuple[str, Scalar], ...]] = []
    first: dict[tuple[str, ...], int] = {}
    for i, item in enumerate(raw):
        sub = Section(s.file, s.key(f"cases[{i}]"), item)
        if not sub.data:
            raise s.error(f"cases[{i}]", "must set at least one parameter")
        case = tuple((name, _scalar(sub, name, v)) for name, v in sub.data.items())
        names = [name for name, _ in case]
        if i == 0:
            for name in names:
                _claim(sub, name, name, seen)
        elif sorted(names) != sorted(n for n, _ in out[0]):
            raise s.error(f"cases[{i}]", f"sets {', '.join(sorted(names))} but cases[0] sets "
                          f"{', '.join(sorted(n for n, _ in out[0]))}; every case must set "
                          "the same parameters")
        j = first.setdefault(tuple(sorted(f"{n}={value_key(v)}" for n, v in case)), i)
        if j != i:
            raise s.error(f"cases[{i}]", f"repeats cases[{j}]; use repeat for repeated runs")
        out.append(case)
    return tuple(out)


def size_error(file: str, size: int, max_tasks: int) -> ConfigError:
    """The sweep is larger than the topology allows."""
    return ConfigError(file, "sweep", f"expands to {size} tasks, more than the limit of "
                       f"{max_tasks} (campaigns.max_tasks in the cluster config: raise it there "
                       "or split the sweep)")


def parse_sweep(s: Section, max_tasks: int) -> SweepSpec:
    """Validate a ``sweep`` section (``s``) into a ``SweepSpec`` of at most ``max_tasks``."""
    if not any(s.has(p) for p in PARTS):
        s.finish()  # names an unknown key, if any
        raise ConfigError(s.file, s.path, f"needs at least one of {', '.join(PARTS)}")
    seen: dict[str, str] = {}
    cases = _cases(s, seen)
    zipped = _value_lists(s, "zip", seen)
    if zipped:
        _zip_rows(s, zipped)
    grid = _value_lists(s, "grid", seen)
    repeat = s.integer("repeat", None, minimum=1, maximum=max(max_tasks, 1))
    if repeat is not None and SEED in seen:
        raise s.error("repeat", f"adds the parameter {SEED!r}, already set by {seen[SEED]}")
    s.finish()
    sweep = SweepSpec(grid=grid, cases=cases, zip=zipped, repeat=repeat)
    if sweep.size > max_tasks:
        raise size_error(s.file, sweep.size, max_tasks)
    return sweep


def id_width(size: int) -> int:
    """Digits in a task id's index: 4, more only for sweeps beyond 10,000 tasks."""
    return max(MIN_ID_WIDTH, len(str(max(size - 1, 0))))


def task_id(template: str, index: int, size: int) -> str:
    """The instance id of task ``index`` of a sweep of ``size``: ``name.0007``."""
    return f"{template}.{index:0{id_width(size)}d}"


def placeholder_names(spec: ExperimentSpec) -> dict[str, str]:
    """Each name a placeholder of ``spec`` may use -> what it is (for messages)."""
    known = {name: "param" for name, value in spec.params if is_scalar(value)}
    if spec.sweep is not None:
        known.update((name, "sweep") for name in spec.sweep.names)
    known.update((name, "built-in") for name in BUILTINS)
    return known


def template_fields(spec: ExperimentSpec) -> list[tuple[str, str]]:
    """(key, text) of every spec field that takes placeholders."""
    fields = [("command", spec.command)]
    fields += [(f"env.{name}", value) for name, value in spec.env]
    fields += [(f"results[{i}]", value) for i, value in enumerate(spec.results)]
    return fields


def check_templates(file: str, spec: ExperimentSpec) -> dict[str, tuple[Part, ...]]:
    """Parse every template of a sweep spec; each placeholder must name a known parameter."""
    known = placeholder_names(spec)
    params = dict(spec.params)
    out: dict[str, tuple[Part, ...]] = {}
    for key, text in template_fields(spec):
        try:
            parts = template_parts(text)
        except TemplateError as exc:
            raise ConfigError(file, key, str(exc)) from None
        for part in parts:
            if not isinstance(part, Placeholder) or part.name in known:
                continue
            if part.name in params:
                raise ConfigError(file, key, f"placeholder {{{part.name}}} names a parameter "
                                  "that is not a string, number or boolean")
            names = [n for n, what in known.items() if what != "built-in"]
            raise ConfigError(file, key, f"unknown placeholder {{{part.name}}}; sweep "
                              f"parameters: {', '.join(names) or '(none)'} (built-ins: "
                              f"{', '.join(BUILTINS)})")
        out[key] = parts
    return out


def check_task_ids(file: str, name: str, size: int) -> None:
    """The longest task id of the sweep must be a safe id (length, no '..')."""
    why = check_safe_id(task_id(name, max(size - 1, 0), size))
    if why:
        raise ConfigError(file, "experiment_id", f"a sweep's tasks are named "
                          f"{name}.{'N' * id_width(size)}: {why}")


def expand(spec: ExperimentSpec, max_tasks: int) -> tuple[ExperimentSpec, ...]:
    """One spec per sweep point (the spec itself when it has no sweep), in task order."""
    sweep = spec.sweep
    if sweep is None:
        return (spec,)
    file, name, size = display_path(spec.source), spec.experiment_id, sweep.size
    if size > max_tasks:
        raise size_error(file, size, max_tasks)
    check_task_ids(file, name, size)
    templates = check_templates(file, spec)
    command = templates["command"]
    env = [(env_name, templates[f"env.{env_name}"]) for env_name, _ in spec.env]
    results = [templates[f"results[{i}]"] for i in range(len(spec.results))]
    campaign = replace(spec.campaign or CampaignSpec(name=name, priority=spec.priority),
                       name=name, size=size)
    base = dict(spec.params)
    base_values: dict[str, Scalar] = {k: v for k, v in base.items()
                                      if isinstance(v, (str, int, float))}
    out: list[ExperimentSpec] = []
    for index, point in enumerate(sweep.points()):
        tid = task_id(name, index, size)
        values: dict[str, Scalar] = {**base_values, **dict(point),
                                     "task_index": index, "task_id": tid}
        paths: list[str] = []
        for i, parts in enumerate(results):
            path = fill(parts, values, quote=False)
            why = relative_path_problem(path)
            if why:
                raise ConfigError(file, f"results[{i}]", f"for task {tid}: {why}")
            paths.append(path)
        out.append(replace(
            spec, experiment_id=tid, command=fill(command, values, quote=True),
            env=tuple((k, fill(parts, values, quote=False)) for k, parts in env),
            results=tuple(paths), params=tuple(sorted({**base, **dict(point)}.items())),
            template_id=name, task_index=index, campaign=campaign, sweep=None))
    return tuple(out)


def expand_all(specs: Iterable[ExperimentSpec], max_tasks: int) -> list[ExperimentSpec]:
    """Every spec's tasks, in the given order (``check_spec_set`` comes after)."""
    return [task for spec in specs for task in expand(spec, max_tasks)]
