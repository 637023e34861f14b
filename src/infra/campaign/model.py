"""Typed values of a campaign: the parsed ``sweep``, ``suite`` and queue keys of a spec.

Pure values (no I/O, no imports from the rest of the package, so ``config.model`` can use
them). Each has a JSON form for the state store (``to_json`` / ``from_json``); a sweep keeps
its parameter order in lists, because the store writes JSON objects with sorted keys.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

Scalar = str | int | float | bool
"""A sweep parameter value."""

DEFAULT_PREFETCH = 2
"""Tasks a node holds beyond its running ones (``suite.prefetch``)."""


class CpuBinding(str, enum.Enum):
    """How a suite's workers are bound to the node's cores."""

    ROUND_ROBIN = "round_robin"
    EXCLUSIVE = "exclusive"
    SHARED = "shared"


class DispatchMode(str, enum.Enum):
    """``prefetch``: nodes hold a few tasks ahead; ``all``: every task handed out at submit."""

    PREFETCH = "prefetch"
    ALL = "all"


def str_form(value: Scalar) -> str:
    """A parameter value as text: a string as is, ``true``/``false``, numbers repr-like."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def value_key(value: Scalar) -> str:
    """An identity for a value that tells ``1``, ``1.0``, ``true`` and ``"1"`` apart."""
    return json.dumps(value)


@dataclass(frozen=True)
class SweepSpec:
    """A parsed ``sweep``: the parts compose as a product, cases * zip * grid * repeat.

    ``grid`` and ``zip`` keep the file's key order; an absent part is empty (``repeat`` None).
    """

    grid: tuple[tuple[str, tuple[Scalar, ...]], ...] = ()
    cases: tuple[tuple[tuple[str, Scalar], ...], ...] = ()
    zip: tuple[tuple[str, tuple[Scalar, ...]], ...] = ()
    repeat: int | None = None

    @property
    def size(self) -> int:
        """How many tasks the sweep expands to (computed without expanding)."""
        n = max(len(self.cases), 1)
        if self.zip:
            n *= len(self.zip[0][1])
        n *= math.prod(len(values) for _, values in self.grid)
        return n * (self.repeat or 1)

    @property
    def names(self) -> tuple[str, ...]:
        """Every parameter the sweep sets, in part order (``seed`` last with ``repeat``)."""
        out: list[str] = []
        if self.cases:
            out.extend(name for name, _ in self.cases[0])
        out.extend(name for name, _ in self.zip)
        out.extend(name for name, _ in self.grid)
        if self.repeat is not None:
            out.append("seed")
        return tuple(out)

    def points(self) -> Iterator[tuple[tuple[str, Scalar], ...]]:
        """Each task's parameters in task order (the last part varies fastest)."""
        cases = self.cases or ((),)
        rows = len(self.zip[0][1]) if self.zip else 1
        seeds = range(self.repeat) if self.repeat is not None else (None,)
        for case in cases:
            for row in range(rows):
                zipped = tuple((name, values[row]) for name, values in self.zip)
                for combo in _grid(self.grid):
                    for seed in seeds:
                        tail = () if seed is None else (("seed", seed),)
                        yield (*case, *zipped, *combo, *tail)

    def to_json(self) -> dict[str, Any]:
        """JSON form (parameter order kept in lists)."""
        doc: dict[str, Any] = {}
        if self.grid:
            doc["grid"] = [[name, list(values)] for name, values in self.grid]
        if self.cases:
            doc["cases"] = [[[name, value] for name, value in case] for case in self.cases]
        if self.zip:
            doc["zip"] = [[name, list(values)] for name, values in self.zip]
        if self.repeat is not None:
            doc["repeat"] = self.repeat
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> SweepSpec:
        """Inverse of ``to_json`` (trusted input: documents this program wrote)."""
        repeat = doc.get("repeat")
        return cls(
            grid=tuple((str(n), tuple(v)) for n, v in doc.get("grid") or ()),
            cases=tuple(tuple((str(n), v) for n, v in case) for case in doc.get("cases") or ()),
            zip=tuple((str(n), tuple(v)) for n, v in doc.get("zip") or ()),
            repeat=None if repeat is None else int(repeat))


def _grid(grid: tuple[tuple[str, tuple[Scalar, ...]], ...]
          ) -> Iterator[tuple[tuple[str, Scalar], ...]]:
    """The cartesian product of the grid lists, keys in file order, last key fastest."""
    if not grid:
        yield ()
        return
    (name, values), rest = grid[0], grid[1:]
    tails = list(_grid(rest))
    for value in values:
        for tail in tails:
            yield ((name, value), *tail)


@dataclass(frozen=True)
class SuiteSpec:
    """A ``suite``: hooks run once per node, the node's worker pool and its CPU binding."""

    setup: str | None = None
    cleanup: str | None = None
    workers: int | None = None  # None: as many as fit on the node
    cpu_binding: CpuBinding = CpuBinding.ROUND_ROBIN
    cores: tuple[int, ...] = ()
    prefetch: int = DEFAULT_PREFETCH

    def to_json(self) -> dict[str, Any]:
        return {"setup": self.setup, "cleanup": self.cleanup, "workers": self.workers,
                "cpu_binding": self.cpu_binding.value, "cores": list(self.cores),
                "prefetch": self.prefetch}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> SuiteSpec:
        workers = doc.get("workers")
        return cls(setup=doc.get("setup"), cleanup=doc.get("cleanup"),
                   workers=None if workers is None else int(workers),
                   cpu_binding=CpuBinding(doc.get("cpu_binding") or "round_robin"),
                   cores=tuple(int(c) for c in doc.get("cores") or ()),
                   prefetch=int(doc.get("prefetch", DEFAULT_PREFETCH)))


@dataclass(frozen=True)
class CampaignSpec:
    """What a task knows of its campaign: name (the template's id), size and queue rules."""

    name: str
    size: int = 1
    max_parallel: int | None = None
    priority: int = 0
    dispatch: DispatchMode = DispatchMode.PREFETCH
    fail_fast: bool = False
    suite: SuiteSpec | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "max_parallel": self.max_parallel,
                "priority": self.priority, "dispatch": self.dispatch.value,
                "fail_fast": self.fail_fast,
                "suite": None if self.suite is None else self.suite.to_json()}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> CampaignSpec:
        max_parallel = doc.get("max_parallel")
        suite = doc.get("suite")
        return cls(name=str(doc["name"]), size=int(doc.get("size", 1)),
                   max_parallel=None if max_parallel is None else int(max_parallel),
                   priority=int(doc.get("priority") or 0),
                   dispatch=DispatchMode(doc.get("dispatch") or "prefetch"),
                   fail_fast=bool(doc.get("fail_fast")),
                   suite=None if suite is None else SuiteSpec.from_json(suite))
