"""Constraint evaluation: does a node's attribute satisfy ``attribute operator value``?

Semantics follow Nomad: numbers compare as numbers, other values as text; ``!=`` holds when
the attribute is missing, every other comparison fails; ``set_contains`` needs every listed
item, ``set_contains_any`` one; ``version`` takes clauses like ``>= 1.2, < 2`` (and ``~>``).
``distinct_hosts`` depends on other placements and is checked in ``checks.py``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from infra.config.model import AttrValue, Constraint, Operator

ALIASES = {"cpu.arch": "arch", "unique.name": "name", "unique.hostname": "hostname",
           "kernel.version": "kernel", "cpu.numcores": "cpu_cores", "class": "type"}
PREFIXES = ("node.", "attr.", "meta.", "attributes.")
_CLAUSE = re.compile(r"^\s*(=|==|!=|<|<=|>|>=|~>)?\s*v?([0-9][0-9A-Za-z.+-]*)\s*$")


def attribute_name(raw: str) -> str:
    """``${attr.cpu.arch}`` -> ``arch``; plain names pass through."""
    name = raw.strip()
    if name.startswith("${") and name.endswith("}"):
        name = name[2:-1].strip()
    name = ALIASES.get(name, name)
    for prefix in PREFIXES:
        if name.startswith(prefix):
            rest = name[len(prefix):]
            return ALIASES.get(rest, rest)
    return name


def lookup(attrs: Mapping[str, AttrValue], raw: str) -> AttrValue | None:
    """The attribute's value, trying the name as written first, then its short form."""
    if raw in attrs:
        return attrs[raw]
    return attrs.get(attribute_name(raw))


def text(value: AttrValue) -> str:
    """How an attribute reads in messages and text comparisons."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, frozenset):
        return ",".join(sorted(value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        return None


def _items(value: str | AttrValue) -> frozenset[str]:
    if isinstance(value, frozenset):
        return value
    return frozenset(x.strip() for x in text(value).split(",") if x.strip())


def version_tuple(raw: str) -> tuple[int, ...]:
    """Leading numeric dotted components: ``5.15.0-1012-tegra`` -> (5, 15, 0)."""
    out: list[int] = []
    for part in raw.strip().lstrip("vV").split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
        if m.end() != len(part):
            break
    return tuple(out)


def _cmp(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = max(len(a), len(b))
    pa, pb = a + (0,) * (n - len(a)), b + (0,) * (n - len(b))
    return (pa > pb) - (pa < pb)


def version_matches(have: str, spec: str) -> bool:
    """Every comma-separated clause of ``spec`` holds for version ``have``."""
    got = version_tuple(have)
    if not got:
        return False
    for clause in spec.split(","):
        m = _CLAUSE.match(clause)
        if m is None:
            return False
        op, want_s = m.group(1) or "=", m.group(2)
        want = version_tuple(want_s)
        c = _cmp(got, want)
        if op == "~>":
            upper = (*want[:-2], want[-2] + 1) if len(want) >= 2 else (want[0] + 1,)
            ok = c >= 0 and _cmp(got, upper) < 0
        else:
            ok = {"=": c == 0, "==": c == 0, "!=": c != 0, "<": c < 0, "<=": c <= 0,
                  ">": c > 0, ">=": c >= 0}[op]
        if not ok:
            return False
    return True


def _ordered(op: Operator, have: AttrValue, want: str) -> bool:
    """<, <=, >, >= as numbers when both sides are numbers, else as text."""
    a, b = _number(have), _number(want)
    if a is not None and b is not None:
        c = (a > b) - (a < b)
    else:
        x, y = text(have), want
        c = (x > y) - (x < y)
    return {Operator.LT: c < 0, Operator.LE: c <= 0, Operator.GT: c > 0, Operator.GE: c >= 0}[op]


def _equal(have: AttrValue, want: str) -> bool:
    if isinstance(have, frozenset):
        return have == _items(want)
    a, b = _number(have), _number(want)
    if a is not None and b is not None:
        return a == b
    if isinstance(have, bool):
        return text(have) == want.strip().lower()
    return text(have) == want


def holds(c: Constraint, attrs: Mapping[str, AttrValue]) -> bool:
    """True when the node (given by its attributes) satisfies the constraint."""
    op = c.operator
    if op is Operator.DISTINCT_HOSTS:
        return True
    have = lookup(attrs, c.attribute)
    if op is Operator.IS_SET:
        return have is not None
    if op is Operator.IS_NOT_SET:
        return have is None
    want = c.value or ""
    if op is Operator.NE:
        return have is None or not _equal(have, want)
    if have is None:
        return False
    if op is Operator.EQ:
        return _equal(have, want)
    if op in (Operator.LT, Operator.LE, Operator.GT, Operator.GE):
        return _ordered(op, have, want)
    if op is Operator.REGEXP:
        return re.search(want, text(have)) is not None
    if op is Operator.VERSION:
        return version_matches(text(have), want)
    if op is Operator.SET_CONTAINS:
        return _items(want) <= _items(have)
    if op is Operator.SET_CONTAINS_ANY:
        return bool(_items(want) & _items(have))
    raise AssertionError(op)


def rejection(c: Constraint, attrs: Mapping[str, AttrValue], *, scope: str = "") -> str | None:
    """None when the constraint holds, else a readable reason ("needs tag cuda (...)")."""
    if holds(c, attrs):
        return None
    have = lookup(attrs, c.attribute)
    if c.tag is not None:
        tags = text(have) if have is not None else ""
        return f"needs tag {c.tag} ({'tags: ' + tags.replace(',', ', ') if tags else 'no tags'})"
    prefix = f"{scope}constraint {c.describe()}"
    name = attribute_name(c.attribute)
    if have is None:
        return f"{prefix}: {name} is not set"
    return f"{prefix} not met ({name} is {text(have)})"
