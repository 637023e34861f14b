"""Benchmark the placement engine: speed at scale, and quality against an exact optimum.

Part A plans seeded random workloads (10% GPU nodes, some unified, anti-affinity pairs,
affinity chains) and prints wall time, CPU time, instances/second and placed count.
Part B solves many small capacity-tight cases exactly with ``scipy.optimize.milp``
(maximum number of placeable instances under the same hard constraints) and compares the
greedy pass, the greedy pass + the repair step with moves only, and ``plan()`` (greedy +
repair with moves and trades), with the repair's CPU time per case and a PASS/FAIL line for
the 0.98 target; then the repair's cost on part A's workloads (``--repair-sizes``).

    python scripts/bench_placement.py                  # both parts, default sizes
    python scripts/bench_placement.py --sizes 1000x100 --cases 50
    python scripts/bench_placement.py --profile 2000x200   # cProfile top 10 of one run
    python scripts/bench_placement.py --sizes '' --cases 200   # part B and the repair only

Part A runs a first-fit-decreasing baseline (RAM, GPU, cores, max_instances, anti-affinity)
on the same inputs in the same process and prints plan()'s CPU time, its peak Python heap
(tracemalloc, a second run; ``--no-memory`` skips it) and the ratio to FFD, then PASS/FAIL
lines against the targets (<= 20x FFD at every size; 10,000 x 1,000 under 2 s, 300 MB).
``gc after s`` is one full garbage collection right after plan() (which pauses the cyclic
collector while it runs): at most what the caller pays for it later, once.

Everything is seeded and deterministic; inputs go through the real parsers.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import gc
import io
import itertools
import os
import pstats
import random
import resource
import statistics
import sys
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from infra.config.model import Cluster, ExperimentSpec, NodeConfig
from infra.config.specs import check_spec_set, parse_spec
from infra.config.topology import parse_cluster
from infra.placement import Plan, plan
from infra.placement.checks import DEFAULT_CHECKS
from infra.placement.repair import RepairLimits, RepairStats, repair_plan

CONFIG_PATH = Path("/tmp/bench-placement/cluster_config.yaml")
SPEC_DIR = Path("/tmp/bench-placement/experiments")


# ---- Part A: scale ------------------------------------------------------------------

def big_cluster(rng: random.Random, count: int) -> Cluster:
    """A lab-like mix: 10% GPU nodes (40% of those unified Jetsons), Pis and x86 hosts."""
    nodes: list[dict[str, Any]] = []
    gpu_nodes = set(rng.sample(range(count), max(1, count // 10)))
    for i in range(count):
        doc: dict[str, Any] = {"name": f"node{i:04d}", "host": f"127.0.{i // 250}.{i % 250 + 2}"}
        if i in gpu_nodes and rng.random() < 0.4:
            doc.update(type="jetson_orin", gpu=True, ram_gb=rng.choice([32, 64]),
                       reserved_ram_gb=2.0, cpu_cores=rng.choice([8, 12]),
                       max_instances=rng.choice([4, 6, 8]))
        elif i in gpu_nodes:
            doc.update(type="host", gpu=True, gpu_memory_gb=rng.choice([16, 24, 48, 80]),
                       ram_gb=rng.choice([64, 128, 256]), reserved_ram_gb=4.0,
                       cpu_cores=rng.choice([16, 32, 64]), max_instances=rng.choice([8, 16]))
        elif rng.random() < 0.3:
            doc.update(type="raspberry_pi", ram_gb=rng.choice([4, 8]), reserved_ram_gb=0.5,
                       cpu_cores=4, max_instances=rng.choice([2, 3, 4]))
        else:
            doc.update(type="host", ram_gb=rng.choice([32, 64, 128, 256]),
                       reserved_ram_gb=rng.choice([1.0, 2.0, 4.0]),
                       cpu_cores=rng.choice([16, 32, 64]),
                       max_instances=rng.choice([12, 16, 24, 32]))
        if rng.random() < 0.03:
            doc["enabled"] = False
        nodes.append(doc)
    return parse_cluster({"nodes": nodes}, CONFIG_PATH)


def big_specs(rng: random.Random, cluster: Cluster, count: int) -> tuple[ExperimentSpec, ...]:
    """Mostly small CPU jobs, ~8% GPU jobs, ~10% in anti-affinity pairs, ~12% in affinity chains."""
    ids = [f"exp{i:05d}" for i in range(count)]
    docs: list[dict[str, Any]] = []
    for eid in ids:
        doc: dict[str, Any] = {"experiment_id": eid, "command": ["python3", "run.py"],
                               "ram_gb": rng.choice([0.25, 0.5, 1, 1, 2, 2, 4, 4, 8, 16])}
        if rng.random() < 0.08:
            doc.update(gpu_required=True, gpu_memory_gb=rng.choice([1, 2, 4, 8, 12]))
        if rng.random() < 0.5:
            doc["cpu_cores"] = rng.choice([0.5, 1, 2, 4])
        if rng.random() < 0.05:
            doc["preferred_node"] = rng.choice(cluster.node_names)
        docs.append(doc)
    order = list(range(count))
    rng.shuffle(order)
    pairs = order[: count // 10]
    for a, b in zip(pairs[0::2], pairs[1::2], strict=False):
        docs[a].setdefault("anti_affinity", []).append(ids[b])
    chained = order[count // 10: count // 10 + count // 8]
    pos = 0
    while pos < len(chained):
        length = rng.randint(3, 5)
        chain = chained[pos: pos + length]
        for prev, cur in itertools.pairwise(chain):
            docs[cur].setdefault("affinity", []).append(ids[prev])
        pos += length
    return check_spec_set(parse_spec(d, SPEC_DIR / f"{d['experiment_id']}.json", cluster)
                          for d in docs)


def parse_size(text: str) -> tuple[int, int]:
    instances, _, nodes = text.partition("x")
    return int(instances), int(nodes)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ffd(cluster: Cluster, specs: tuple[ExperimentSpec, ...]) -> dict[str, str]:
    """Baseline: first-fit-decreasing on RAM over enabled nodes in topology order, with the
    GPU, GPU memory, cores, max_instances and (two-way) anti-affinity checks."""
    nodes = [n for n in cluster.nodes if n.enabled]
    ram = {n.name: 0.0 for n in nodes}
    gpu = {n.name: 0.0 for n in nodes}
    cores = {n.name: 0.0 for n in nodes}
    here: dict[str, set[str]] = {n.name: set() for n in nodes}
    anti: dict[str, set[str]] = {}
    for s in specs:
        for peer in s.anti_affinity:
            anti.setdefault(s.experiment_id, set()).add(peer)
            anti.setdefault(peer, set()).add(s.experiment_id)
    where: dict[str, str] = {}
    for s in sorted(specs, key=lambda x: (-x.ram_gb, x.experiment_id)):
        avoid = anti.get(s.experiment_id, set())
        for n in nodes:
            name = n.name
            if len(here[name]) >= n.max_instances or (s.gpu_required and not n.gpu):
                continue
            if ram[name] + ram_on(n, s) > n.available_ram_gb + 1e-9:
                continue
            g = s.gpu_memory_gb if s.gpu_required and not n.unified_memory else 0.0
            if g and gpu[name] + g > n.gpu_memory_gb + 1e-9:
                continue
            if s.cpu_cores > 0 and cores[name] + s.cpu_cores > n.cpu_cores + 1e-9:
                continue
            if avoid & here[name]:
                continue
            ram[name] += ram_on(n, s)
            gpu[name] += g
            cores[name] += s.cpu_cores
            here[name].add(s.experiment_id)
            where[s.experiment_id] = name
            break
    return where


def timed(fn: Any, *args: Any) -> tuple[Any, float, float]:
    """(result, wall s, CPU s) of one call, after a garbage collection."""
    gc.collect()
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - w0, time.process_time() - c0


def timed_collection() -> tuple[int, float, float]:
    """A full garbage collection right after plan(): what the plan left for the collector
    (plan() pauses it while it runs), timed like a call."""
    w0, c0 = time.perf_counter(), time.process_time()
    found = gc.collect()
    return found, time.perf_counter() - w0, time.process_time() - c0


def traced_peak_mb(fn: Any, *args: Any) -> float:
    """Peak Python heap (tracemalloc) of one more call, in MB: what the call itself holds."""
    gc.collect()
    tracemalloc.start()
    try:
        fn(*args)
        return tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


def scale_run(instances: int, nodes: int, seed: int, memory: bool) -> dict[str, float]:
    rng = random.Random(seed)
    t0 = time.perf_counter()
    cluster = big_cluster(rng, nodes)
    specs = big_specs(rng, cluster, instances)
    build_s = time.perf_counter() - t0
    baseline, _ffd_wall, ffd_cpu = timed(ffd, cluster, specs)
    result, wall, cpu = timed(plan, cluster, specs)
    _, _gc_wall, gc_cpu = timed_collection()
    check_hard_constraints(cluster, specs, result)
    return {"instances": instances, "nodes": nodes, "build_s": build_s, "wall_s": wall,
            "cpu_s": cpu, "per_s": instances / wall, "placed": len(result.placements),
            "unplaced": len(result.unplaced), "rss_mb": peak_rss_mb(),
            "ffd_cpu_s": ffd_cpu, "ffd_placed": len(baseline), "gc_cpu_s": gc_cpu,
            "peak_mb": traced_peak_mb(plan, cluster, specs) if memory else float("nan")}


def check_hard_constraints(cluster: Cluster, specs: tuple[ExperimentSpec, ...],
                           result: Plan) -> None:
    """Sanity: a fast plan that breaks a constraint is no result at all."""
    where = result.as_dict()
    by_id = {s.experiment_id: s for s in specs}
    usage: dict[str, list[ExperimentSpec]] = {}
    for eid, node_name in where.items():
        usage.setdefault(node_name, []).append(by_id[eid])
    for name, here in usage.items():
        node = cluster.node(name)
        assert node.enabled and len(here) <= node.max_instances, name
        assert sum(ram_on(node, s) for s in here) <= node.available_ram_gb + 1e-6, name
        if not node.unified_memory:
            assert sum(s.gpu_memory_gb for s in here if s.gpu_required) \
                <= node.gpu_memory_gb + 1e-6, name
        assert sum(s.cpu_cores for s in here) <= node.cpu_cores + 1e-6, name
    for s in specs:
        for peer in s.anti_affinity:
            assert s.experiment_id not in where or peer not in where \
                or where[s.experiment_id] != where[peer], (s.experiment_id, peer)


CPU_TARGET_S = 2.0  # at 10,000 x 1,000
MEMORY_TARGET_MB = 300.0
RATIO_TARGET = 20.0  # plan() CPU / FFD CPU, every size


def part_a(sizes: list[tuple[int, int]], seed: int, memory: bool) -> list[str]:
    """The scale table, plan() against the FFD baseline in the same process; verdict lines."""
    print("Part A: scale (seeded random lab mix; CPU time of plan() alone, FFD baseline "
          "on the same inputs)")
    header = (f"{'instances':>9} {'nodes':>6} {'plan cpu s':>10} {'gc after s':>10} "
              f"{'ffd cpu s':>9} {'ratio':>7} {'placed':>7} {'ffd placed':>10} "
              f"{'peak MB':>8} {'RSS MB':>7}")
    print(header)
    print("-" * len(header))
    verdicts: list[str] = []
    for instances, nodes in sizes:
        r = scale_run(instances, nodes, seed, memory)
        ratio = r["cpu_s"] / max(r["ffd_cpu_s"], 1e-6)
        print(f"{instances:>9} {nodes:>6} {r['cpu_s']:>10.3f} {r['gc_cpu_s']:>10.3f} "
              f"{r['ffd_cpu_s']:>9.3f} "
              f"{ratio:>6.1f}x {int(r['placed']):>7} {int(r['ffd_placed']):>10} "
              f"{r['peak_mb']:>8.1f} {r['rss_mb']:>7.0f}", flush=True)
        size = f"{instances}x{nodes}"
        verdicts.append(verdict(ratio <= RATIO_TARGET,
                                f"{size}: plan() CPU {ratio:.1f}x FFD (target <= "
                                f"{RATIO_TARGET:g}x)"))
        if (instances, nodes) == (10_000, 1_000):
            verdicts.append(verdict(r["cpu_s"] < CPU_TARGET_S,
                                    f"{size}: plan() CPU {r['cpu_s']:.2f} s (target < "
                                    f"{CPU_TARGET_S:g} s)"))
            if memory:
                verdicts.append(verdict(r["peak_mb"] < MEMORY_TARGET_MB,
                                        f"{size}: plan() peak {r['peak_mb']:.0f} MB "
                                        f"(tracemalloc; target < {MEMORY_TARGET_MB:g} MB)"))
    print("\n".join(verdicts))
    print()
    return verdicts


def verdict(ok: bool, text: str) -> str:
    """One PASS/FAIL line."""
    return f"{'PASS' if ok else 'FAIL'} {text}"


def profile(size: tuple[int, int], seed: int) -> None:
    instances, nodes = size
    rng = random.Random(seed)
    cluster = big_cluster(rng, nodes)
    specs = big_specs(rng, cluster, instances)
    prof = cProfile.Profile()
    prof.enable()
    plan(cluster, specs)
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(10)
    stats.sort_stats("cumulative").print_stats(12)
    print(f"cProfile of plan() for {instances} instances x {nodes} nodes, "
          "top 10 by own time, then top 12 by cumulative time:")
    print("\n".join(line for line in out.getvalue().splitlines()
                    if line.strip() and "Ordered by" not in line and "List reduced" not in line))
    print()


# ---- Part B: quality against an exact optimum ---------------------------------------

@dataclass(frozen=True)
class QualityCase:
    seed: int
    cluster: Cluster
    specs: tuple[ExperimentSpec, ...]


def tight_case(seed: int) -> QualityCase:
    """3-5 nodes, 5-10 instances, total RAM demand about 0.7-1.4x the usable capacity."""
    rng = random.Random(seed)
    n_nodes, n_inst = rng.randint(3, 5), rng.randint(5, 10)
    nodes: list[dict[str, Any]] = []
    for i in range(n_nodes):
        node: dict[str, Any] = {"name": f"n{i}", "host": f"127.0.0.{21 + i}",
                                "ram_gb": float(rng.choice([4, 6, 8, 12, 16])),
                                "reserved_ram_gb": rng.choice([0.0, 0.5, 1.0]),
                                "cpu_cores": rng.choice([2, 4, 8]),
                                "max_instances": rng.randint(1, 4)}
        kind = rng.random()
        if kind < 0.25:
            node.update(gpu=True, unified_memory=True)
        elif kind < 0.5:
            node.update(gpu=True, gpu_memory_gb=float(rng.choice([4, 8, 12])))
        if rng.random() < 0.1:
            node["enabled"] = False
        nodes.append(node)
    cluster = parse_cluster({"nodes": nodes}, CONFIG_PATH)
    capacity = sum(n.available_ram_gb for n in cluster.nodes if n.enabled)
    target = capacity * rng.uniform(0.7, 1.4)
    weights = [rng.uniform(0.3, 1.7) for _ in range(n_inst)]
    ids = [f"e{i}" for i in range(n_inst)]
    docs: list[dict[str, Any]] = []
    for eid, w in zip(ids, weights, strict=True):
        ram = max(0.25, round(target * w / sum(weights) * 4) / 4)
        doc: dict[str, Any] = {"experiment_id": eid, "command": "true", "ram_gb": ram}
        if rng.random() < 0.3:
            doc.update(gpu_required=True,
                       gpu_memory_gb=float(rng.choice([0, 1, 2, 4, 6])))
        if rng.random() < 0.5:
            doc["cpu_cores"] = float(rng.choice([1, 2, 3]))
        if rng.random() < 0.2:
            doc["preferred_node"] = rng.choice(cluster.node_names)
        docs.append(doc)
    for _ in range(rng.randint(0, n_inst // 2)):
        a, b = rng.sample(range(n_inst), 2)
        docs[a].setdefault("anti_affinity", [])
        if ids[b] not in docs[a]["anti_affinity"]:
            docs[a]["anti_affinity"].append(ids[b])
    for _ in range(rng.randint(0, 2)):
        a, b = rng.sample(range(n_inst), 2)
        docs[a].setdefault("affinity", [])
        if ids[b] not in docs[a]["affinity"]:
            docs[a]["affinity"].append(ids[b])
    specs = check_spec_set(parse_spec(d, SPEC_DIR / f"{d['experiment_id']}.json", cluster)
                           for d in docs)
    return QualityCase(seed, cluster, specs)


def ram_on(node: NodeConfig, spec: ExperimentSpec) -> float:
    """RAM drawn on this node: a unified pool also pays for the GPU memory."""
    gpu_mem = spec.gpu_memory_gb if spec.gpu_required else 0.0
    return spec.ram_gb + (gpu_mem if node.unified_memory else 0.0)


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Silence file descriptor 1 (C-level prints) for the duration."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def optimum(case: QualityCase, by_ram: bool = False) -> float:
    """Most instances (or, ``by_ram``, most GB of RAM) placeable at once (exact, MILP)."""
    specs, nodes = case.specs, case.cluster.nodes
    ni, nn = len(specs), len(nodes)

    def var(i: int, n: int) -> int:
        return i * nn + n

    upper = np.ones(ni * nn)
    for i, s in enumerate(specs):
        for n, node in enumerate(nodes):
            if not node.enabled or (s.gpu_required and not node.gpu):
                upper[var(i, n)] = 0.0
    rows: list[np.ndarray] = []
    caps: list[float] = []

    def row(coeffs: dict[int, float], cap: float) -> None:
        r = np.zeros(ni * nn)
        for k, v in coeffs.items():
            r[k] = v
        rows.append(r)
        caps.append(cap)

    for i in range(ni):  # each instance at most once
        row({var(i, n): 1.0 for n in range(nn)}, 1.0)
    for n, node in enumerate(nodes):
        row({var(i, n): 1.0 for i in range(ni)}, float(node.max_instances))
        row({var(i, n): ram_on(node, s) for i, s in enumerate(specs)}, node.available_ram_gb)
        if not node.unified_memory:
            row({var(i, n): s.gpu_memory_gb for i, s in enumerate(specs) if s.gpu_required},
                node.gpu_memory_gb)
        # CPU: the engine checks a request against the cores left by earlier requests.
        row({var(i, n): s.cpu_cores for i, s in enumerate(specs)}, float(node.cpu_cores))
    index = {s.experiment_id: i for i, s in enumerate(specs)}
    pairs = {tuple(sorted((index[s.experiment_id], index[p])))
             for s in specs for p in s.anti_affinity}
    for a, b in sorted(pairs):
        for n in range(nn):
            row({var(a, n): 1.0, var(b, n): 1.0}, 1.0)
    weights = np.repeat([s.ram_gb if by_ram else 1.0 for s in specs], nn)
    with quiet_stdout():  # HiGHS may print a diagnostic line straight to fd 1
        res = milp(c=-weights, integrality=np.ones(ni * nn),
                   bounds=Bounds(np.zeros(ni * nn), upper),
                   constraints=LinearConstraint(np.array(rows), -np.inf, np.array(caps)))
    if res.status != 0:
        raise RuntimeError(f"milp failed on case seed {case.seed}: {res.message}")
    return float(-res.fun)


def repair_args(case: QualityCase) -> dict[str, Any]:
    """What ``plan`` passes to the repair for a plain plan of the case."""
    return {"conditions": None, "facts": None, "occupied": (), "peers": (),
            "checks": DEFAULT_CHECKS, "strategy": case.cluster.placement.strategy}


def optimum_keeping(case: QualityCase, keep: set[str]) -> float:
    """Most instances placeable at once while every instance in ``keep`` stays placed (on
    any node): the ceiling of any repair that only moves instances (exact, MILP)."""
    specs, nodes = case.specs, case.cluster.nodes
    ni, nn = len(specs), len(nodes)
    upper = np.ones(ni * nn)
    rows: list[np.ndarray] = []
    low: list[float] = []
    high: list[float] = []

    def row(coeffs: dict[int, float], lo: float, hi: float) -> None:
        r = np.zeros(ni * nn)
        for k, v in coeffs.items():
            r[k] = v
        rows.append(r)
        low.append(lo)
        high.append(hi)

    for i, s in enumerate(specs):
        for n, node in enumerate(nodes):
            if not node.enabled or (s.gpu_required and not node.gpu):
                upper[i * nn + n] = 0.0
        row({i * nn + n: 1.0 for n in range(nn)},
            1.0 if s.experiment_id in keep else 0.0, 1.0)
    for n, node in enumerate(nodes):
        row({i * nn + n: 1.0 for i in range(ni)}, -np.inf, float(node.max_instances))
        row({i * nn + n: ram_on(node, s) for i, s in enumerate(specs)}, -np.inf,
            node.available_ram_gb)
        if not node.unified_memory:
            row({i * nn + n: s.gpu_memory_gb for i, s in enumerate(specs) if s.gpu_required},
                -np.inf, node.gpu_memory_gb)
        row({i * nn + n: s.cpu_cores for i, s in enumerate(specs)}, -np.inf,
            float(node.cpu_cores))
    index = {s.experiment_id: i for i, s in enumerate(specs)}
    for a, b in sorted({tuple(sorted((index[s.experiment_id], index[p])))
                        for s in specs for p in s.anti_affinity}):
        for n in range(nn):
            row({a * nn + n: 1.0, b * nn + n: 1.0}, -np.inf, 1.0)
    with quiet_stdout():
        res = milp(c=-np.ones(ni * nn), integrality=np.ones(ni * nn),
                   bounds=Bounds(np.zeros(ni * nn), upper),
                   constraints=LinearConstraint(np.array(rows), np.array(low), np.array(high)))
    if res.status != 0:
        raise RuntimeError(f"milp failed on case seed {case.seed}: {res.message}")
    return float(-res.fun)


QUALITY_TARGET = 0.98  # repaired mean placed / optimum mean placed


def part_b(count: int, seed: int) -> None:
    print(f"Part B: quality vs exact optimum (scipy milp), {count} tight cases, "
          f"3-5 nodes, 5-10 instances")
    greedy_n: list[int] = []
    moves_n: list[int] = []
    placed: list[int] = []
    best: list[int] = []
    ceiling: list[int] = []
    sizes: list[int] = []
    gaps: list[tuple[int, int]] = []
    ram_got: list[float] = []
    ram_best: list[float] = []
    repair_cpu: list[float] = []
    checks_spent: list[int] = []
    moved = traded = 0
    moves_only = RepairLimits(trades=False)
    t0 = time.perf_counter()
    for k in range(count):
        case = tight_case(seed * 100_000 + k)
        greedy = plan(case.cluster, case.specs, repair=False)
        stats = RepairStats()
        c0 = time.process_time()
        result = repair_plan(greedy, case.cluster, case.specs, stats=stats,
                             **repair_args(case))
        repair_cpu.append(time.process_time() - c0)
        checks_spent.append(stats.checks)
        if plan(case.cluster, case.specs).placements != result.placements:
            raise AssertionError(f"plan() and plan + repair_plan differ (seed {case.seed})")
        by_moves = repair_plan(greedy, case.cluster, case.specs, limits=moves_only,
                               **repair_args(case))
        for r in (greedy, by_moves, result):
            check_hard_constraints(case.cluster, case.specs, r)
        moved += stats.moved
        traded += len(result.left_out)
        got = len(result.placements)
        opt = round(optimum(case))
        by_id = {s.experiment_id: s for s in case.specs}
        gb = sum(by_id[p.instance_id].ram_gb for p in result.placements)
        gb_opt = optimum(case, by_ram=True)
        if got > opt or gb > gb_opt + 1e-6:
            raise AssertionError(f"engine beat the optimum (seed {case.seed}): "
                                 "the engine broke a constraint or the MILP is wrong")
        greedy_n.append(len(greedy.placements))
        moves_n.append(len(by_moves.placements))
        ceiling.append(round(optimum_keeping(case, set(greedy.as_dict()))))
        placed.append(got)
        best.append(opt)
        sizes.append(len(case.specs))
        gaps.append((opt - got, case.seed))
        ram_got.append(gb)
        ram_best.append(gb_opt)
    elapsed = time.perf_counter() - t0
    mean_got, mean_opt = statistics.fmean(placed), statistics.fmean(best)
    matches = sum(1 for g, _ in gaps if g == 0)
    worst_gap, worst_seed = max(gaps)
    ratios = [g / o if o else 1.0 for g, o in zip(placed, best, strict=True)]
    opt_all = sum(1 for o, n in zip(best, sizes, strict=True) if o == n)
    both_all = sum(1 for g, n in zip(placed, sizes, strict=True) if g == n)
    greedy_all = sum(1 for g, n in zip(greedy_n, sizes, strict=True) if g == n)
    repaired = sum(1 for g, r in zip(greedy_n, placed, strict=True) if r > g)

    def vs_opt(values: list[int]) -> str:
        return f"{statistics.fmean(values):.3f} = {statistics.fmean(values) / mean_opt:.4f}"

    ran = [t for t, g, n in zip(repair_cpu, greedy_n, sizes, strict=True) if g < n]
    rows = [
        ("cases", f"{count}"),
        ("mean optimum (max placeable)", f"{mean_opt:.3f}"),
        ("mean placed / optimum: greedy pass", vs_opt(greedy_n)),
        ("  greedy + repair, moves only", vs_opt(moves_n)),
        ("  greedy + repair (plan(), moves and trades)", vs_opt(placed)),
        ("  moves-only ceiling (MILP, greedy's instances kept)", vs_opt(ceiling)),
        ("mean of per-case ratio (repaired)", f"{statistics.fmean(ratios):.4f}"),
        ("cases where engine matches optimum", f"{matches}/{count} = {matches / count:.1%}"),
        ("cases where everything fits (optimum / greedy / repaired)",
         f"{opt_all} / {greedy_all} / {both_all}"),
        ("cases the repair improved; instances moved; left out by trades",
         f"{repaired}; {moved}; {traded}"),
        ("repair CPU per case that had unplaced instances, median / max",
         f"{statistics.median(ran) * 1e3:.2f} / {max(ran) * 1e3:.2f} ms ({len(ran)} cases)"
         if ran else "-"),
        ("repair node checks per case, median / max",
         f"{statistics.median(checks_spent):.0f} / {max(checks_spent)}"),
        ("worst gap (instances)", f"{worst_gap} (case seed {worst_seed})"),
        ("placed RAM: engine / max placeable RAM (sum)",
         f"{sum(ram_got):.1f} / {sum(ram_best):.1f} GB = {sum(ram_got) / sum(ram_best):.4f}"),
        ("total time (engine, repair, 3 milp per case)", f"{elapsed:.1f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    hist: dict[int, int] = {}
    for g, _ in gaps:
        hist[g] = hist.get(g, 0) + 1
    print("  gap histogram (optimum - engine: cases): "
          + ", ".join(f"{g}: {c}" for g, c in sorted(hist.items())))
    if worst_gap > 0:
        describe(tight_case(worst_seed))
    print(verdict(mean_got / mean_opt >= QUALITY_TARGET,
                  f"repaired mean placed / optimum {mean_got / mean_opt:.4f} (target >= "
                  f"{QUALITY_TARGET:g}; greedy alone "
                  f"{statistics.fmean(greedy_n) / mean_opt:.4f})"))
    print()


def repair_at_scale(sizes: list[tuple[int, int]], seed: int) -> None:
    """What the repair costs on part A's workloads: the greedy plan's CPU against the
    repair's (called on the greedy plan, as ``plan`` does), and what it placed."""
    print("Repair at scale (part A's workloads; plan(repair=False) then repair_plan)")
    header = (f"{'instances':>9} {'nodes':>6} {'greedy cpu s':>12} {'repair cpu s':>12} "
              f"{'share':>6} {'unplaced':>8} {'placed':>6} {'moved':>5} {'left out':>8} "
              f"{'checks':>7}")
    print(header)
    print("-" * len(header))
    for instances, nodes in sizes:
        rng = random.Random(seed)
        cluster = big_cluster(rng, nodes)
        specs = big_specs(rng, cluster, instances)
        greedy, _wall, greedy_cpu = timed(functools.partial(plan, repair=False), cluster,
                                          specs)
        stats = RepairStats()
        result, _wall, cpu = timed(functools.partial(
            repair_plan, stats=stats, conditions=None, facts=None, occupied=(), peers=(),
            checks=DEFAULT_CHECKS, strategy=cluster.placement.strategy), greedy, cluster, specs)
        check_hard_constraints(cluster, specs, result)
        print(f"{instances:>9} {nodes:>6} {greedy_cpu:>12.3f} {cpu:>12.3f} "
              f"{cpu / max(greedy_cpu, 1e-9):>5.0%} {len(greedy.unplaced):>8} "
              f"{stats.placed:>6} {stats.moved:>5} {len(result.left_out):>8} "
              f"{stats.checks:>7}{' (cap)' if stats.exhausted else ''}", flush=True)
    print()


def describe(case: QualityCase) -> None:
    """Print the worst case compactly so it can be studied."""
    print(f"  worst case (seed {case.seed}):")
    for n in case.cluster.nodes:
        kind = "unified GPU" if n.gpu and n.unified_memory else \
            (f"GPU {n.gpu_memory_gb:g} GB" if n.gpu else "CPU")
        print(f"    node {n.name}: {n.available_ram_gb:g} GB usable, {n.cpu_cores} cores, "
              f"max {n.max_instances}, {kind}{'' if n.enabled else ', DISABLED'}")
    for s in case.specs:
        extra = f" gpu {s.gpu_memory_gb:g} GB" if s.gpu_required else ""
        anti = f" anti={list(s.anti_affinity)}" if s.anti_affinity else ""
        aff = f" aff={list(s.affinity)}" if s.affinity else ""
        print(f"    {s.experiment_id}: ram {s.ram_gb:g} GB, cpu {s.cpu_cores:g}{extra}{anti}{aff}")
    result = plan(case.cluster, case.specs)
    print(f"    engine: {result.as_dict()} unplaced={list(result.unplaced)}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints tables, returns 0."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sizes", default="1000x100,10000x1000",
                    help="comma list of INSTANCESxNODES for part A ('' to skip)")
    ap.add_argument("--cases", type=int, default=200, help="part B cases (0 to skip)")
    ap.add_argument("--repair-sizes", default="1000x100", metavar="INSTANCESxNODES,...",
                    help="after part B, the repair's cost on part A's workloads ('' to skip)")
    ap.add_argument("--no-memory", action="store_true",
                    help="skip the tracemalloc run of plan() (peak memory) in part A")
    ap.add_argument("--profile", default="", metavar="INSTANCESxNODES",
                    help="also print a cProfile top 10 of one plan() of this size")
    args = ap.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    print(f"python {sys.version.split()[0]}, seed {args.seed}")
    print()
    if sizes:
        part_a(sizes, args.seed, not args.no_memory)
    if args.profile:
        profile(parse_size(args.profile), args.seed)
    if args.cases:
        part_b(args.cases, args.seed)
    repair_sizes = [parse_size(s) for s in args.repair_sizes.split(",") if s.strip()]
    if repair_sizes:
        repair_at_scale(repair_sizes, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
