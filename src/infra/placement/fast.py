"""The planner's fast path: the same decisions as the reference loop in ``engine.plan``.

After Nomad's scheduler, but incremental:

* **Views per instance shape.** An instance's verdict on a node (first failing check, or
  total points) depends only on its *shape* (demands and requests) and the node's state,
  unless one of its peers sits there or it is its preferred node. Each shape keeps every
  node's verdict, with the feasible nodes bucketed by exact total (a heap of node indices
  per total, a heap of totals), so a decision is a few heap operations. A placement changes
  one node; a view judges again only the nodes changed since it was last asked.
* **Static classes.** Checks that read only fixed facts (flags, condition, inventory,
  constraints) are judged once per class of identical nodes and per static request.
* **Special nodes** (an instance's affinity/anti-affinity peers' nodes, its preferred
  node) are judged one by one with every check and scorer.
* **Lazy explanations.** ``Plan.evaluations`` (every node's reason or score parts, with
  detail text) is rebuilt on demand by replaying the decisions, only for the instances
  asked about. ``Plan.rejections`` keeps counts per check per instance.
* **Incremental bookkeeping.** One snapshot whose maps are updated in place, and per-node
  free RAM, GPU memory, cores, disk and counts kept beside it.

Ties: the reference takes the first node in topology order, replacing it only when beaten
by more than 1e-9; the views hand over the first node of each distinct total near the top
and the same scan runs on those (see ``_scan``).
"""

from __future__ import annotations

import gc
import heapq
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import replace
from types import MappingProxyType

from infra.config.model import Cluster, ExperimentSpec, NodeConfig, Strategy
from infra.placement.allocation import Allocation, Holder
from infra.placement.checks import (
    DEFAULT_CHECKS,
    Check,
    _distinct,
    all_rejections,
    devices_available,
    ports_free,
)
from infra.placement.constraints import attribute_name
from infra.placement.engine import (
    NodeEvaluation,
    Occupied,
    Placement,
    Plan,
    base_key,
    evaluate,
    starting_snapshot,
)
from infra.placement.scoring import (
    POINTS,
    REFERENCE_SCORERS,
    STRATEGIES,
    Points,
    ScorePart,
    Scorer,
    affinity_points,
    preferred_node_points,
)
from infra.placement.snapshot import NodeCondition, NodeLoad, Snapshot, demand_on
from infra.probe.facts import NodeFacts

__all__ = ["LiveSnapshot", "fast_order", "fast_plan", "shape_of", "supports"]

# attributes unique to a node: left out of its class unless some constraint names them
_UNIQUE_ATTRS = frozenset({"name", "host", "hostname"})


def supports(checks: tuple[tuple[str, Check], ...], scorers: tuple[Scorer, ...]) -> bool:
    """The fast path knows what the default checks and the built-in scorers read."""
    return checks == DEFAULT_CHECKS and all(s in POINTS for s in scorers)


class LiveSnapshot:
    """A snapshot whose maps this object updates in place (``with_placement`` copies them)."""

    def __init__(self, snap: Snapshot) -> None:
        self.loads: dict[str, NodeLoad] = dict(snap.loads)
        self.placed: dict[str, str] = dict(snap.placed)
        self.devices: dict[str, Mapping[str, Holder]] = dict(snap.devices_held)
        self.ports: dict[str, Mapping[int, Holder]] = dict(snap.ports_held)
        self.allocations: dict[str, Allocation] = dict(snap.allocations)
        self.snap = replace(snap, loads=self.loads, placed=self.placed,
                            devices_held=self.devices, ports_held=self.ports,
                            allocations=self.allocations)

    def place(self, spec: ExperimentSpec, node: NodeConfig, allocation: Allocation) -> None:
        """Put ``spec`` on ``node`` exactly as ``Snapshot.with_placement`` would."""
        self.loads[node.name] = self.loads[node.name].add(demand_on(node, spec))
        self.placed[spec.experiment_id] = node.name
        holder = allocation.holder
        if allocation.device_ids:
            mine = dict(self.devices.get(node.name, {}))
            mine.update(dict.fromkeys(allocation.device_ids, holder))
            self.devices[node.name] = MappingProxyType(mine)
        if allocation.ports:
            held = dict(self.ports.get(node.name, {}))
            for _label, port in allocation.ports:
                held.setdefault(port, holder)
            self.ports[node.name] = MappingProxyType(held)
        self.allocations[spec.experiment_id] = allocation


def _named_attributes(snap: Snapshot, specs: Iterable[ExperimentSpec]) -> frozenset[str]:
    """Every attribute some constraint of this plan names (short forms)."""
    names = {attribute_name(c.attribute) for c in snap.constraints}
    for s in specs:
        names.update(attribute_name(c.attribute) for c in s.constraints)
    return frozenset(names)


def _static_key(snap: Snapshot, node: NodeConfig, named: frozenset[str]) -> Hashable:
    """What the checks and scorers read of a node that does not change during a plan."""
    inv = snap.inventory(node)
    attrs = tuple(sorted(((k, v) for k, v in inv.attributes.items()
                          if k not in _UNIQUE_ATTRS or k in named), key=lambda kv: kv[0]))
    return (node.enabled, node.scheduling_eligible, node.gpu, node.max_instances,
            node.unified_memory, node.ram_gb, node.reserved_ram_gb, node.gpu_memory_gb,
            node.cpu_cores, node.monitor_port, node.ssh_port, node.is_local,
            snap.conditions[node.name], inv.devices, inv.host_paths, inv.runtime_drivers,
            inv.disk_gb, attrs)


def _judge(snap: Snapshot, node: NodeConfig, spec: ExperimentSpec,
           checks: tuple[tuple[str, Check], ...], points: tuple[Points, ...]
           ) -> tuple[str | None, float]:
    """(name of the first failing check, 0) or (None, total points)."""
    for name, check in checks:
        if check(snap, node, spec) is not None:
            return name, 0.0
    return None, sum(p(snap, node, spec) for p in points)


WINDOW = 1e-6  # totals this close to the maximum are scanned in topology order


def _first_best(feasible: list[tuple[int, float]]) -> int | None:
    """What the reference scan (topology order, replace only when better by > 1e-9) picks.

    Only totals within WINDOW of the maximum can win, provided none lies just below the
    window (within 1e-9 of its edge, where the scan could chain); otherwise scan them all.
    """
    if not feasible:
        return None
    top = max(t for _i, t in feasible)
    if _in_band(feasible, top):
        return _scan(feasible)
    return _scan([c for c in feasible if c[1] >= top - WINDOW])


def _ram_need(spec: ExperimentSpec, *, unified: bool) -> float:
    """``demand_on(node, spec).ram_gb`` for a node with or without unified memory."""
    if unified:
        return spec.ram_gb + (spec.gpu_memory_gb if spec.gpu_required else 0.0)
    return spec.ram_gb


# The default checks that read only what does not change during a plan (node flags,
# condition, inventory, the spec's static requests): judged once per static class.
STATIC_CHECKS = frozenset({"enabled", "eligible", "healthy", "gpu", "constraints",
                           "runtime_driver", "volumes"})
# Checks and scorers that depend on which instances sit on a node: the nodes where they can
# bite (an instance's peers' nodes, its preferred node) are judged one by one.
RELATIONAL_POINTS = frozenset({affinity_points, preferred_node_points})


def fast_order(specs: Iterable[ExperimentSpec]) -> list[ExperimentSpec]:
    """``engine.placement_order`` in O(n log n): base order, but an instance waits for the
    affinity peers it names (the first ready one in base order goes next; when none is
    ready, the first remaining one, which breaks cycles exactly as the reference does)."""
    remaining = sorted(specs, key=base_key)
    ids = {s.experiment_id for s in remaining}
    waiting: dict[str, list[int]] = {}
    need = [0] * len(remaining)
    for pos, spec in enumerate(remaining):
        peers = {p for p in spec.affinity if p in ids}
        need[pos] = len(peers)
        for p in peers:
            waiting.setdefault(p, []).append(pos)
    ready = [pos for pos, n in enumerate(need) if n == 0]  # ascending: already a heap
    taken = [False] * len(remaining)
    done: set[str] = set()
    first = 0  # every position below it is taken
    order: list[ExperimentSpec] = []
    while len(order) < len(remaining):
        while ready and taken[ready[0]]:
            heapq.heappop(ready)
        if ready:
            pos = heapq.heappop(ready)
        else:
            while taken[first]:
                first += 1
            pos = first
        taken[pos] = True
        spec = remaining[pos]
        order.append(spec)
        if spec.experiment_id not in done:
            done.add(spec.experiment_id)
            for w in waiting.get(spec.experiment_id, ()):
                need[w] -= 1
                if need[w] == 0:
                    heapq.heappush(ready, w)
    return order


def shape_of(spec: ExperimentSpec) -> Hashable:
    """What decides an instance's verdict on a node that holds none of its peers and is not
    its preferred node: its demands and requests (its id only when it asks for ports)."""
    res = spec.resources
    return (spec.ram_gb, spec.gpu_required, spec.gpu_memory_gb, spec.cpu_cores, res,
            spec.constraints, spec.experiment_id if res.ports else None)


class _NodeState:
    """Per-node numbers the checks read, by topology index, kept current per placement.

    Each is computed with the same expression the checks use (``snapshot.free_ram_gb`` and
    friends), so comparisons on them give the checks' answers to the last bit.
    """

    def __init__(self, live: LiveSnapshot) -> None:
        nodes = live.snap.nodes
        self.live = live
        self.gpu = [n.gpu for n in nodes]
        self.unified = [n.unified_memory for n in nodes]
        self.maxi = [n.max_instances for n in nodes]
        self.count = [0] * len(nodes)
        self.free_ram = [0.0] * len(nodes)
        self.free_gpu = [0.0] * len(nodes)
        self.free_cpu = [0.0] * len(nodes)
        self.free_disk: list[float | None] = [None] * len(nodes)
        for i in range(len(nodes)):
            self.refresh(i)

    def refresh(self, i: int) -> None:
        """Recompute node ``i``'s numbers from its load."""
        snap = self.live.snap
        node = snap.nodes[i]
        load = self.live.loads[node.name]
        self.count[i] = load.count
        self.free_ram[i] = snap.free_ram_gb(node)
        self.free_gpu[i] = snap.free_gpu_memory_gb(node)
        self.free_cpu[i] = node.cpu_cores - load.cpu_cores
        self.free_disk[i] = snap.free_disk_gb(node)


Judge = Callable[[int], tuple[int, float]]


class _View:
    """One instance shape's verdict on every node, brought up to date lazily.

    ``reason[i]`` is the index of the first failing check on node ``i`` (the last index,
    ``len(counts) - 1``, when none) and ``total[i]`` its points; feasible nodes sit in
    ``buckets`` by exact total, each a heap of node indices, with ``tops`` a heap of the
    negated distinct totals. Stale heap entries (a node whose total changed) are dropped
    when met. ``cursor`` is how much of the planner's change log the view has seen: only
    nodes changed since are judged again.
    """

    __slots__ = ("buckets", "counts", "cursor", "final", "judge", "reason", "static", "tops",
                 "total")

    def __init__(self, judge: Judge, static: list[int], size: int, cursor: int,
                 final: int = -1) -> None:
        self.judge = judge
        self.final = final  # a reason that never changes once given (a full node), or -1
        self.static = static
        self.cursor = cursor
        self.reason = list(static)
        self.total: list[float | None] = [None] * len(static)
        self.counts = [0] * size
        self.buckets: dict[float, list[int]] = {}
        tops: list[float] = []
        feasible = size - 1
        for i, why in enumerate(static):
            if why < 0:
                why, points = judge(i)
                self.reason[i] = why
                if why == feasible:
                    self.total[i] = points
                    bucket = self.buckets.get(points)
                    if bucket is None:
                        self.buckets[points] = [i]  # ascending indices: already a heap
                        tops.append(-points)
                    else:
                        bucket.append(i)
            self.counts[why] += 1
        heapq.heapify(tops)
        self.tops = tops

    def update(self, changed: Iterable[int]) -> None:
        """Judge the ``changed`` nodes again (their loads moved on)."""
        static, reason, total, counts = self.static, self.reason, self.total, self.counts
        buckets, tops, judge, final = self.buckets, self.tops, self.judge, self.final
        feasible = len(counts) - 1
        for i in changed:
            old = reason[i]
            if static[i] >= 0 or old == final:
                continue  # a static refusal, or a full node: loads only grow
            why, points = judge(i)
            if old != why:
                counts[old] -= 1
                counts[why] += 1
                reason[i] = why
            if why != feasible:
                total[i] = None
                continue
            if old == feasible and total[i] == points:
                continue  # its bucket entry still holds
            total[i] = points
            bucket = buckets.get(points)
            if bucket is None:
                buckets[points] = [i]
                heapq.heappush(tops, -points)
            else:
                heapq.heappush(bucket, i)

    def leaders(self, special: set[int], floor: Callable[[float], float]
                ) -> list[tuple[int, float]]:
        """(first node in topology order, total) of each distinct total from the highest
        down to ``floor(highest)``, skipping the ``special`` nodes."""
        tops, buckets, total = self.tops, self.buckets, self.total
        out: list[tuple[int, float]] = []
        kept: list[float] = []
        held: list[tuple[list[int], int]] = []
        limit: float | None = None
        while tops:
            points = -tops[0]
            if limit is not None and points < limit:
                break
            heapq.heappop(tops)
            bucket = buckets[points]
            while bucket:
                j = bucket[0]
                if total[j] != points:
                    heapq.heappop(bucket)  # stale: the node's total moved on
                elif j in special:
                    held.append((bucket, heapq.heappop(bucket)))
                else:
                    break
            if not bucket and not any(b is bucket for b, _ in held):
                del buckets[points]
                continue
            kept.append(-points)
            if bucket:
                out.append((bucket[0], points))
                if limit is None:
                    limit = floor(points)
        for negated in kept:
            heapq.heappush(tops, negated)
        for bucket, j in held:
            heapq.heappush(bucket, j)
        return out

    def everything(self, special: set[int]) -> list[tuple[int, float]]:
        """Every feasible node but the special ones, with its total."""
        return [(i, t) for i, t in enumerate(self.total) if t is not None and i not in special]


def _scan(feasible: list[tuple[int, float]]) -> int | None:
    """The reference scan: topology order, the best replaced only when beaten by > 1e-9."""
    best: tuple[int, float] | None = None
    for i, total in sorted(feasible):
        if best is None or total > best[1] + 1e-9:
            best = (i, total)
    return None if best is None else best[0]


def _in_band(feasible: list[tuple[int, float]], top: float) -> bool:
    """Whether a total lies just below the window (where the scan could chain past it)."""
    edge = top - WINDOW
    low = edge - 1e-9
    return any(low <= t < edge for _i, t in feasible)


def _choose(view: _View, special: set[int], mine: list[tuple[int, float]]) -> int | None:
    """What the reference scan picks among the view's feasible nodes other than the
    ``special`` ones, plus ``mine`` (the special nodes' own feasible totals)."""
    top_mine = max((t for _i, t in mine), default=None)

    def floor(highest: float) -> float:
        top = highest if top_mine is None else max(highest, top_mine)
        return top - WINDOW - 1e-9

    feasible = view.leaders(special, floor) + mine
    if not feasible:
        return None
    top = max(t for _i, t in feasible)
    if _in_band(feasible, top):
        return _scan(view.everything(special) + mine)
    return _scan([c for c in feasible if c[1] >= top - WINDOW])


class _Planner:
    """State of one fast plan: the live snapshot, per-node numbers, one view per shape."""

    def __init__(self, snap: Snapshot, checks: tuple[tuple[str, Check], ...],
                 scorers: tuple[Scorer, ...], specs: list[ExperimentSpec]) -> None:
        self.live = LiveSnapshot(snap)
        self.state = _NodeState(self.live)
        self.checks = checks
        self.names = tuple(name for name, _ in checks)
        self.feasible = len(checks)  # the reason index that means "no check failed"
        self.points = tuple(POINTS[s] for s in scorers)
        self.base_points = tuple(p for p in self.points if p not in RELATIONAL_POINTS)
        self.inline = scorers == REFERENCE_SCORERS
        self.nodes = snap.nodes
        self.index = {n.name: i for i, n in enumerate(snap.nodes)}
        named = _named_attributes(snap, [*specs, *snap.specs.values()])
        statics: dict[Hashable, int] = {}
        self.static = [statics.setdefault(_static_key(snap, n, named), len(statics))
                       for n in snap.nodes]
        self.static_lists: dict[Hashable, list[int]] = {}
        self.log: list[int] = []  # node index per placement, in order
        self.views: dict[Hashable, _View] = {}
        self.left: dict[Hashable, int] = {}  # shape -> instances still to decide
        self.distinct_nodes: set[int] = set()
        # instance id -> every node holding an instance of that id (occupied work of two
        # runs may share one; the checks read each node's ids)
        self.where: dict[str, set[int]] = {}
        for name, load in snap.loads.items():
            for iid in load.instance_ids:
                self.where.setdefault(iid, set()).add(self.index[name])
            for iid in load.instance_ids - snap.occupied_ids:
                peer = snap.specs.get(iid)
                if peer is not None and _distinct(snap, peer):
                    self.distinct_nodes.add(self.index[name])

    def expect(self, shapes: Iterable[Hashable]) -> None:
        """Say which shapes will be asked for (a view is dropped after its last one)."""
        for shape in shapes:
            self.left[shape] = self.left.get(shape, 0) + 1

    def static_reasons(self, spec: ExperimentSpec) -> list[int]:
        """Per node, the first failing static check for ``spec`` (-1: none), judged once
        per static class."""
        res = spec.resources
        part = (spec.gpu_required, spec.constraints, res.runtime_driver, res.volumes)
        found = self.static_lists.get(part)
        if found is not None:
            return found
        snap = self.live.snap
        statics = [(k, check) for k, (name, check) in enumerate(self.checks)
                   if name in STATIC_CHECKS]
        per_class: dict[int, int] = {}
        out: list[int] = []
        for i, node in enumerate(self.nodes):
            why = per_class.get(self.static[i])
            if why is None:
                why = next((k for k, check in statics if check(snap, node, spec) is not None),
                           -1)
                per_class[self.static[i]] = why
            out.append(why)
        self.static_lists[part] = out
        return out

    def judge_for(self, spec: ExperimentSpec) -> Judge:
        """Node index -> (first failing non-static check, points) for ``spec``'s shape, on
        a node where none of its peers sits and that is not its preferred node."""
        k = {name: n for n, name in enumerate(self.names)}
        full, ram, gpu_memory, cpu, disk = (k["max_instances"], k["ram"], k["gpu_memory"],
                                            k["cpu"], k["disk"])
        devices, ports, distinct = k["devices"], k["ports"], k["distinct_hosts"]
        ok = self.feasible
        st = self.state
        count, maxi, gpu, unified = st.count, st.maxi, st.gpu, st.unified
        free_ram, free_gpu, free_cpu, free_disk = (st.free_ram, st.free_gpu, st.free_cpu,
                                                   st.free_disk)
        snap, nodes = self.live.snap, self.nodes
        need_plain = _ram_need(spec, unified=False)
        need_unified = _ram_need(spec, unified=True)
        gpu_required, gpu_gb, cores = spec.gpu_required, spec.gpu_memory_gb, spec.cpu_cores
        disk_gb = spec.resources.disk_gb
        want_devices, want_ports = bool(spec.resources.devices), bool(spec.resources.ports)
        under_distinct = _distinct(snap, spec)
        distinct_nodes = self.distinct_nodes
        inline, base_points = self.inline, self.base_points
        inf = float("inf")

        def judge(i: int) -> tuple[int, float]:
            n = count[i]
            if n >= maxi[i]:
                return full, 0.0
            need = need_unified if unified[i] else need_plain
            free = free_ram[i]
            if not need <= free + 1e-9:
                return ram, 0.0
            if (gpu_required and gpu[i] and not unified[i]
                    and not gpu_gb <= free_gpu[i] + 1e-9):
                return gpu_memory, 0.0
            if cores > 0 and not cores <= free_cpu[i] + 1e-9:
                return cpu, 0.0
            if disk_gb > 0:
                left = free_disk[i]
                if left is not None and not disk_gb <= left + 1e-9:
                    return disk, 0.0
            if want_devices and devices_available(snap, nodes[i], spec) is not None:
                return devices, 0.0
            if want_ports and ports_free(snap, nodes[i], spec) is not None:
                return ports, 0.0
            if under_distinct and i in distinct_nodes:
                return distinct, 0.0
            if not inline:
                node = nodes[i]
                return ok, sum(p(snap, node, spec) for p in base_points)
            # the reference points (scoring.REFERENCE_SCORERS), same arithmetic
            util = need / free if free > 0 else inf
            efficiency = 30.0 if 0.3 <= util <= 0.7 else 20.0 if util < 0.3 else 10.0
            balance = max(0.0, 20.0 * (1.0 - n / maxi[i]))
            match = (15.0 if gpu[i] else 0.0) if gpu_required else (0.0 if gpu[i] else 5.0)
            return ok, efficiency + balance + match

        return judge

    def view(self, shape: Hashable, spec: ExperimentSpec) -> _View:
        """The shape's view, built now or brought up to date with the nodes changed since."""
        view = self.views.get(shape)
        log = self.log
        if view is None:
            view = self.views[shape] = _View(self.judge_for(spec), self.static_reasons(spec),
                                             self.feasible + 1, len(log),
                                             self.names.index("max_instances"))
            return view
        start = view.cursor
        if start < len(log):
            view.cursor = len(log)
            view.update(set(log[start:]) if len(log) - start > 1 else (log[start],))
        return view

    def special(self, spec: ExperimentSpec) -> set[int]:
        """Nodes whose verdict for ``spec`` depends on which instances sit there, or that
        are its preferred node: judged one by one with every check and scorer."""
        where = self.where
        out: set[int] = set()
        for ids in (spec.affinity, spec.anti_affinity,
                    self.live.snap.anti_of.get(spec.experiment_id, ())):
            for iid in ids:
                nodes = where.get(iid)
                if nodes is not None:
                    out |= nodes
        if spec.preferred_node is not None and spec.preferred_node in self.index:
            out.add(self.index[spec.preferred_node])
        return out

    def best(self, spec: ExperimentSpec, shape: Hashable
             ) -> tuple[int | None, dict[str, int]]:
        """The node the reference loop would pick (or None), and rejection counts."""
        view = self.view(shape, spec)
        special = self.special(spec)
        counts = view.counts
        mine: list[tuple[int, float]] = []
        if special:
            counts = list(counts)
            snap = self.live.snap
            for i in special:
                counts[view.reason[i]] -= 1
                why = view.static[i]
                points = 0.0
                if why < 0:
                    name, points = _judge(snap, self.nodes[i], spec, self.checks, self.points)
                    why = self.feasible if name is None else self.names.index(name)
                counts[why] += 1
                if why == self.feasible:
                    mine.append((i, points))
        choice = _choose(view, special, mine)
        left = self.left[shape] - 1
        if left:
            self.left[shape] = left
        else:
            del self.left[shape]
            self.views.pop(shape, None)
        return choice, {self.names[k]: c for k, c in enumerate(counts[:-1]) if c}

    def place(self, spec: ExperimentSpec, node: NodeConfig, alloc: Allocation) -> None:
        """Commit ``spec`` to ``node``: the snapshot, the node's numbers, the change log."""
        self.live.place(spec, node, alloc)
        i = self.index[node.name]
        self.state.refresh(i)
        self.log.append(i)
        self.where.setdefault(spec.experiment_id, set()).add(i)
        if _distinct(self.live.snap, spec):
            self.distinct_nodes.add(i)


class LazyEvaluations(Mapping[str, tuple[NodeEvaluation, ...]]):
    """Every node's verdict per instance, rebuilt on demand by replaying the plan's steps.

    ``steps`` says, per instance in decision order, how many placements preceded its
    decision; replaying that many placements onto the starting snapshot gives exactly the
    snapshot the reference loop judged it on.
    """

    def __init__(self, start: Snapshot, placed: list[tuple[ExperimentSpec, NodeConfig,
                                                            Allocation]],
                 steps: dict[str, tuple[ExperimentSpec, int]],
                 checks: tuple[tuple[str, Check], ...], scorers: tuple[Scorer, ...]) -> None:
        self._start = start
        self._placed = placed
        self._steps = steps
        self._checks = checks
        self._scorers = scorers
        self._cache: dict[str, tuple[NodeEvaluation, ...]] = {}

    def _fill(self, ids: Iterable[str]) -> None:
        """Judge every node for each of ``ids`` on the snapshot of its decision."""
        want = sorted((self._steps[i][1], i) for i in ids if i not in self._cache)
        if not want:
            return
        live = LiveSnapshot(self._start)
        done = 0
        for k, iid in want:
            while done < k:
                spec, node, alloc = self._placed[done]
                live.place(spec, node, alloc)
                done += 1
            spec = self._steps[iid][0]
            self._cache[iid] = tuple(evaluate(live.snap, n, spec, self._checks, self._scorers)
                                     for n in live.snap.nodes)

    @property
    def explained(self) -> frozenset[str]:
        """Instances whose explanations have been built so far."""
        return frozenset(self._cache)

    def __getitem__(self, key: str) -> tuple[NodeEvaluation, ...]:
        if key not in self._steps:
            raise KeyError(key)
        self._fill([key])
        return self._cache[key]

    def __iter__(self) -> Iterator[str]:
        self._fill(self._steps)  # iterating means explaining all: one replay for them all
        return iter(self._steps)

    def __len__(self) -> int:
        return len(self._steps)

    def __contains__(self, key: object) -> bool:
        return key in self._steps


def fast_plan(cluster: Cluster, specs: Iterable[ExperimentSpec], *,
              pins: Mapping[str, str] | None, conditions: Mapping[str, NodeCondition] | None,
              force: bool, strategy: Strategy, occupied: Iterable[Occupied],
              checks: tuple[tuple[str, Check], ...], facts: Mapping[str, NodeFacts] | None,
              peers: Iterable[Occupied]) -> Plan:
    """``engine.plan``'s decisions, with shape views and lazy explanations.

    The cyclic garbage collector is paused meanwhile: a plan makes about fifteen lasting
    objects per placement and no reference cycles, and the collections they set off (each
    a scan of the whole heap) cost about a fifth of the plan's time at 10,000 instances.
    """
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        return _fast_plan(cluster, specs, pins=pins, conditions=conditions, force=force,
                          strategy=strategy, occupied=occupied, checks=checks, facts=facts,
                          peers=peers)
    finally:
        if paused:
            gc.enable()


def _fast_plan(cluster: Cluster, specs: Iterable[ExperimentSpec], *,
               pins: Mapping[str, str] | None, conditions: Mapping[str, NodeCondition] | None,
               force: bool, strategy: Strategy, occupied: Iterable[Occupied],
               checks: tuple[tuple[str, Check], ...], facts: Mapping[str, NodeFacts] | None,
               peers: Iterable[Occupied]) -> Plan:
    """``fast_plan`` with the collector as it is."""
    spec_list = sorted(specs, key=lambda s: s.experiment_id)
    pins = dict(pins or {})
    scorers = STRATEGIES[strategy]
    start = starting_snapshot(cluster, spec_list, conditions, facts, occupied, peers)
    planner = _Planner(start, checks, scorers, spec_list)
    snap = planner.live.snap
    node_by_name = {n.name: n for n in start.nodes}

    placements: list[Placement] = []
    placed: list[tuple[ExperimentSpec, NodeConfig, Allocation]] = []
    steps: dict[str, tuple[ExperimentSpec, int]] = {}
    rejections: dict[str, Mapping[str, int]] = {}
    unplaced: list[str] = []
    pin_errors: dict[str, str] = {}

    def commit(spec: ExperimentSpec, node: NodeConfig, pinned: bool,
               forced: tuple[str, ...]) -> None:
        parts: tuple[ScorePart, ...] = tuple(score(snap, node, spec) for score in scorers)
        alloc, _short = snap.allocate(node, spec)
        placements.append(Placement(spec.experiment_id, node.name,
                                    sum(p.points for p in parts), parts, pinned=pinned,
                                    forced=forced, allocation=alloc))
        placed.append((spec, node, alloc))
        planner.place(spec, node, alloc)

    for spec in (s for s in sorted(spec_list, key=base_key) if s.experiment_id in pins):
        node = node_by_name[pins[spec.experiment_id]]
        steps[spec.experiment_id] = (spec, len(placed))
        violations = all_rejections(snap, node, spec, checks)
        if violations and (not force or not node.enabled
                           or snap.conditions[node.name].condition.unreachable):
            pin_errors[spec.experiment_id] = f"{node.name} {violations[0]}"
            continue
        commit(spec, node, True, violations)

    order = fast_order(s for s in spec_list if s.experiment_id not in pins)
    shapes = [shape_of(s) for s in order]
    planner.expect(shapes)
    for spec, shape in zip(order, shapes, strict=True):
        steps[spec.experiment_id] = (spec, len(placed))
        best, counts = planner.best(spec, shape)
        if counts:
            rejections[spec.experiment_id] = counts
        if best is None:
            unplaced.append(spec.experiment_id)
            continue
        node = planner.nodes[best]
        commit(spec, node, False, ())

    return Plan(placements=tuple(placements),
                evaluations=LazyEvaluations(start, placed, steps, checks, scorers),
                unplaced=tuple(unplaced), pin_errors=pin_errors, strategy=strategy,
                rejections=rejections)
