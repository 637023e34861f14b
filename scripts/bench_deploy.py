"""Benchmark ``deploy_all`` against the same rsync commands run in parallel from a shell loop.

Generates a seeded tree (3,000 files by default: small text files in nested directories plus
a few larger binary ones, ~28 MB), starts N loopback sshd hosts (10 by default) and compares,
in the same run:

  ours        infra.runner.deploy.deploy_all (what ``--deploy-all`` calls)
  shell loop  ``bash -c 'rsync ... & rsync ... & wait'`` with the exact argv that
              build_rsync_command produces for each host (shlex.join)
  setsid loop the same loop with each rsync under ``setsid``: deploy_all starts each rsync
              in a new session, and with the kernel's autogroup scheduler a session is a
              CPU-share unit, so on a loaded machine the plain loop (one session for all ten
              rsync) gets less CPU than ten sessions do; this row separates that effect
  ours, all   deploy_all(max_parallel=number of hosts), unchanged and changed cases only
              (its destinations are a copy of ours'); since deploy_all's default is one
              rsync per node (up to 32) this row now matches "ours" for 10 hosts

for a cold deploy (empty destination, fresh directories for each method and round), an
unchanged re-deploy, and a re-deploy after 10 files changed.  The trees are verified on the
first and last host (file count, a changed file's content) and ours' rsync stats are checked.
Run as root:

    python scripts/bench_deploy.py [--hosts 10] [--files 3000] [--repeat 3] [--cold-repeat 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench_common import (
    BenchFailure,
    FleetError,
    Series,
    SSHFleet,
    check_hosts,
    load_note,
    load_scale,
    measure,
    paired_ratio,
    print_table,
    ratio,
    require_fleet,
    scaled_deadline,
)

from infra.config.model import HealthCheckSection, NodeConfig
from infra.errors import InfraError
from infra.runner.deploy import (
    DeployResult,
    build_rsync_command,
    deploy_all,
    local_rsync_version,
    source_fingerprint,
)

SEED = 20240601
LARGE_FILES = 20
METHOD_TIMEOUT_S = 120
BENCH_LIMIT_IDLE_S = 120
"""Time limit on an idle machine at the default sizes (10 hosts, 3,000 files, 2 cold and 3
other rounds); it grows with the sizes asked for and with the load factor measured at start."""
CHANGED = 10

_WORDS = ("experiment", "node", "cluster", "deploy", "rsync", "probe", "memory", "gpu",
          "jetson", "raspberry", "placement", "score", "health", "monitor", "result", "log",
          "restart", "policy", "config", "spec", "import", "def", "return", "class", "self",
          "value", "tensor", "batch", "epoch", "loss", "metric")


# --------------------------------------------------------------------------- the tree

def make_tree(root: Path, files: int, rng: random.Random) -> tuple[list[Path], int]:
    """Write ``files`` files under ``root``; returns the small text files and total bytes."""
    pool = " ".join(rng.choice(_WORDS) for _ in range(200_000)).encode()
    dirs = [Path(".")]
    for top in range(12):
        base = Path(f"pkg{top:02d}")
        dirs.append(base)
        for sub in range(rng.randint(2, 6)):
            mid = base / f"mod{sub}"
            dirs.append(mid)
            for deep in range(rng.randint(0, 3)):
                dirs.append(mid / f"part{deep}" / ("leaf" if deep % 2 else "data"))
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
    small: list[Path] = []
    total = 0
    for i in range(files):
        d = dirs[rng.randrange(len(dirs))]
        if i < LARGE_FILES:
            path = root / d / f"blob{i:03d}.bin"
            data = rng.randbytes(rng.randint(400_000, 1_200_000))
        else:
            path = root / d / f"file{i:04d}.{rng.choice(('py', 'txt', 'json', 'md'))}"
            size = int(rng.lognormvariate(8.0, 0.8)) + 100
            start = rng.randrange(len(pool) - size)
            data = pool[start:start + size]
            small.append(path)
        path.write_bytes(data)
        total += len(data)
    return small, total


def count_files(path: Path) -> int:
    return sum(len(names) for _, _, names in os.walk(path))


def change_files(paths: list[Path], round_no: int) -> list[Path]:
    """Append a line to CHANGED files (a different set each round); returns them."""
    chosen = paths[round_no * CHANGED:(round_no + 1) * CHANGED]
    for path in chosen:
        with path.open("ab") as f:
            f.write(f"# changed in round {round_no}\n".encode())
    return chosen


# --------------------------------------------------------------------------- methods

def nodes_for(fleet: SSHFleet, subdir: str) -> list[NodeConfig]:
    return [fleet.node_config(h, remote_work_dir=str(h.home / subdir)) for h in fleet.hosts]


def run_ours(nodes: list[NodeConfig], health: HealthCheckSection, source: Path,
             max_parallel: int | None = None) -> dict[str, DeployResult | InfraError]:
    """deploy_all as the CLI's --deploy-all calls it (defaults, no excludes).

    ``max_parallel`` overrides deploy_all's default bound on simultaneous rsync processes.
    """
    async def go() -> dict[str, DeployResult | InfraError]:
        if max_parallel is None:
            work = deploy_all(nodes, health, source, excludes=(), delete=True)
        else:
            work = deploy_all(nodes, health, source, excludes=(), delete=True,
                              max_parallel=max_parallel)
        return await asyncio.wait_for(work, METHOD_TIMEOUT_S)
    return asyncio.run(go())


def check_ours(results: dict[str, DeployResult | InfraError], expect_sent: int,
               label: str) -> None:
    """Every node succeeded and rsync reports the number of files we expect it to send."""
    for node, r in results.items():
        if not isinstance(r, DeployResult):
            raise BenchFailure(f"{label}: {node}: {r}")
        sent = r.stats.files_transferred if r.stats is not None else -1
        if sent != expect_sent:
            raise BenchFailure(f"{label}: {node}: rsync sent {sent} files, expected "
                               f"{expect_sent}")


def shell_script(nodes: list[NodeConfig], health: HealthCheckSection, source: Path,
                 version: tuple[int, ...], errdir: Path, setsid: bool = False) -> str:
    """A bash script starting our exact rsync argv for every node at once, then waiting.

    ``setsid`` starts each rsync in its own session, as deploy_all does (start_new_session):
    with the kernel's autogroup scheduling each session gets its own CPU share, which
    changes wall times on a loaded machine where sshd and rsync share the same cores.
    """
    prefix = "setsid " if setsid else ""
    lines = ['pids=""']
    for node in nodes:
        argv = build_rsync_command(node, health, source, excludes=(), delete=True,
                                   rsync_version=version)
        err = shlex.quote(str(errdir / f"{node.name}.err"))
        lines.append(f'{prefix}{shlex.join(argv)} >/dev/null 2>{err} & pids="$pids $!"')
    lines.append('rc=0; for p in $pids; do wait "$p" || rc=1; done; exit $rc')
    return "\n".join(lines) + "\n"


def run_shell(script: str, errdir: Path, label: str) -> None:
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                          timeout=METHOD_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        errs = " | ".join(p.read_text().strip()[-200:] for p in sorted(errdir.iterdir())
                          if p.read_text().strip())
        raise BenchFailure(f"{label}: shell loop exited {proc.returncode}: {errs}")


def verify(fleet: SSHFleet, subdir: str, expect: int, label: str,
           changed: list[Path], source: Path) -> str:
    """File count on the first and last host, and the changed files' content there."""
    counts = []
    for host in (fleet.hosts[0], fleet.hosts[-1]):
        dest = host.home / subdir
        n = count_files(dest)
        if n != expect:
            raise BenchFailure(f"{label}: {host.name}:{dest} has {n} files, expected {expect}")
        for path in changed:
            if (dest / path.relative_to(source)).read_bytes() != path.read_bytes():
                raise BenchFailure(f"{label}: {host.name}: {path.name} differs from the source")
        counts.append(f"{host.name}={n}")
    return ", ".join(counts)


def wipe(fleet: SSHFleet, subdir: str | None = None) -> None:
    """Remove one deployed tree (or every one) on every host, a thread per host."""
    def one(home: Path) -> None:
        for path in [home / subdir] if subdir else [p for p in home.iterdir()
                                                    if p.name[:1] != "."]:
            shutil.rmtree(path, ignore_errors=True)

    with ThreadPoolExecutor(len(fleet.hosts)) as pool:
        list(pool.map(one, [h.home for h in fleet.hosts]))


# --------------------------------------------------------------------------- main

CASES = ("cold", "unchanged", f"{CHANGED} changed")
COLD_WHO = ("ours", "shell", "setsid")
WHO = (*COLD_WHO, "ours-all")
LABELS = {"ours": "ours: deploy_all", "shell": "shell loop: rsync & ... wait",
          "setsid": "shell loop: setsid rsync & ...",
          "ours-all": "deploy_all(max_parallel=hosts)"}


def order(r: int, methods: tuple[str, ...]) -> tuple[str, ...]:
    """The methods' order in round ``r``: rotated each round so none always goes first."""
    k = r % len(methods)
    return methods[k:] + methods[:k]


class Bench:
    """The measurements of one run: series per (case, method), tree checks done."""

    def __init__(self, fleet: SSHFleet, source: Path, files: int, small: list[Path],
                 errdir: Path, version: tuple[int, ...]) -> None:
        self.fleet = fleet
        self.source = source
        self.files = files
        self.small = small
        self.errdir = errdir
        self.version = version
        self.health = fleet.health_section()
        self.series = {(case, who): Series(f"{case}: {who}") for case in CASES for who in WHO}
        self.checks: list[str] = []

    def timed(self, case: str, who: str, r: int, subdir: str, expect_sent: int,
              changed: list[Path], verify_tree: bool) -> None:
        """One timed deploy of the whole fleet by one method, then its checks."""
        nodes = nodes_for(self.fleet, subdir)
        label = f"{case} {who} round {r}"
        script = shell_script(nodes, self.health, self.source, self.version, self.errdir,
                              setsid=who == "setsid")
        if case == "cold":
            os.sync()  # no earlier writeback of a large deploy inside the timing
        series = self.series[(case, who)]
        with measure(series):
            if who == "ours":
                results = run_ours(nodes, self.health, self.source)
            elif who == "ours-all":
                results = run_ours(nodes, self.health, self.source, len(nodes))
            else:
                run_shell(script, self.errdir, label)
        if who.startswith("ours"):
            check_ours(results, expect_sent, label)
        print(f"  {label:<26} {series.samples[-1].wall:7.3f} s", flush=True)
        if verify_tree:
            counts = verify(self.fleet, subdir, self.files, label, changed, self.source)
            self.checks.append(f"{label}: {counts}")

    def run(self, repeat: int, cold_repeat: int) -> None:
        # Cold: fresh empty destinations for each method and round.
        for r in range(cold_repeat):
            for who in order(r, COLD_WHO):
                self.timed("cold", who, r, f"{who}-cold{r}", self.files, [], True)
                if r < cold_repeat - 1:
                    wipe(self.fleet, f"{who}-cold{r}")
        dest = {who: f"{who}-cold{cold_repeat - 1}" for who in COLD_WHO}
        # A hard-linked copy of ours' tree (owner, modes, mtimes kept; rsync replaces a
        # changed file by a new one, so the copies never share a change).
        dest["ours-all"] = "ours-all"
        for host in self.fleet.hosts:
            subprocess.run(["cp", "-al", str(host.home / dest["ours"]),
                            str(host.home / dest["ours-all"])], check=True)
        for r in range(repeat):
            for who in order(r, WHO):
                self.timed("unchanged", who, r, dest[who], 0, [], False)
        for r in range(repeat):
            changed = change_files(self.small, r)
            for who in order(r, WHO):
                self.timed(CASES[2], who, r, dest[who], CHANGED, changed, True)


def report(bench: Bench, hosts: int, files: int, total: int) -> None:
    rows: list[list[Any]] = []
    for case in CASES:
        ours = bench.series[(case, "ours")]
        for who in WHO:
            s = bench.series[(case, who)]
            if not s.samples:
                continue
            rows.append([f"{case:<10} {LABELS[who]}", len(s.samples), f"{s.median():.3f}",
                         f"{s.min():.3f}", f"{s.median('cpu'):.3f}",
                         ratio(ours.median(), s.median()) if s is not ours else ""])
    print_table(f"Deploy of {files} files ({total / 1e6:.1f} MB) to {hosts} loopback sshd "
                f"hosts (wall and client CPU seconds over n rounds)",
                ["case / method", "n", "wall med", "wall min", "cpu med", "ours/this"], rows)
    print()
    for case in CASES:
        ours = bench.series[(case, "ours")]
        for who in ("shell", "setsid"):
            other = bench.series[(case, who)]
            name = "shell loop " if who == "shell" else "setsid loop"
            print(f"ours / {name}, {case:<10}: {ratio(ours.median(), other.median())} wall, "
                  f"{ratio(ours.median('cpu'), other.median('cpu'))} CPU (ratio of medians); "
                  f"{paired_ratio(ours, other)} wall (median of per-round ratios)")
        wide = bench.series[(case, "ours-all")]
        if wide.samples:
            setsid = bench.series[(case, "setsid")]
            print(f"  deploy_all(max_parallel={hosts}) / setsid loop, {case:<10}: "
                  f"{ratio(wide.median(), setsid.median())} wall (ratio of medians); "
                  f"{paired_ratio(wide, setsid)} wall (median of per-round ratios)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--hosts", type=int, default=10, help="loopback sshd hosts")
    parser.add_argument("--files", type=int, default=3000, help="files in the generated tree")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed rounds of the unchanged and changed cases")
    parser.add_argument("--cold-repeat", type=int, default=2, help="timed cold rounds")
    args = parser.parse_args()
    check_hosts(args.hosts)
    require_fleet()
    scale = load_scale()
    if args.repeat < 1 or args.cold_repeat < 1:
        parser.error("--repeat and --cold-repeat must be at least 1")
    if args.files < LARGE_FILES + CHANGED * args.repeat:
        parser.error("--files too small for --repeat")

    started = time.monotonic()
    start_load = load_note()
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        root = Path(tmp)
        os.chmod(root, 0o755)
        source = root / "src"
        source.mkdir()
        source.chmod(0o755)
        t0 = time.monotonic()
        small, total = make_tree(source, args.files, random.Random(SEED))
        print(f"tree: {args.files} files, {total / 1e6:.1f} MB, "
              f"{sum(1 for _ in os.walk(source))} dirs, generated in {time.monotonic() - t0:.1f} s")
        fp_s = []
        for _ in range(3):
            t1 = time.perf_counter()
            source_fingerprint(source, ())
            fp_s.append(time.perf_counter() - t1)
        errdir = root / "errs"
        errdir.mkdir()
        version = asyncio.run(local_rsync_version())
        t0 = time.monotonic()
        with SSHFleet.start(args.hosts, root / "fleet") as fleet:
            print(f"{args.hosts} sshd hosts up in {time.monotonic() - t0:.1f} s; "
                  f"rsync {'.'.join(map(str, version))}; {args.cold_repeat} cold rounds, "
                  f"{args.repeat} unchanged and changed rounds, order rotating", flush=True)
            bench = Bench(fleet, source, args.files, small, errdir, version)
            try:
                size = max(1.0, args.hosts * args.files / 30000) * \
                    max(1.0, (args.repeat + args.cold_repeat) / 5)
                with scaled_deadline(BENCH_LIMIT_IDLE_S * size, scale):  # teardown outside
                    bench.run(args.repeat, args.cold_repeat)
            finally:
                t0 = time.monotonic()
                wipe(fleet)  # faster than userdel -r removing each home in turn
                cleanup_s = time.monotonic() - t0
            t0 = time.monotonic()
        teardown_s = time.monotonic() - t0

    report(bench, args.hosts, args.files, total)
    print(f"source_fingerprint of the tree (part of every deploy_all call): "
          f"{min(fp_s) * 1000:.0f} ms min of 3")
    print(f"{len(bench.checks)} tree checks passed (file count on the first and last host, "
          f"changed files' content), e.g. {bench.checks[-1]}")
    print(f"ours' rsync stats matched on every host and round (files sent = {args.files} cold, "
          f"0 unchanged, {CHANGED} changed)")
    print(f"cleanup: deployed trees removed in {cleanup_s:.1f} s, fleet torn down in "
          f"{teardown_s:.1f} s")
    print(f"{load_note()} at the end ({start_load} at the start)")
    print(f"total {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (BenchFailure, FleetError, asyncio.TimeoutError,
            subprocess.TimeoutExpired) as exc:
        print(f"FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
