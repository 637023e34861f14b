"""What the deletion check costs: ``deploy_all`` with ``max_deletes`` (a dry-run check pass,
then the real pass only when something changes) against ``max_deletes=None`` (one pass, what
``--yes`` does), in the same run, on the same loopback sshd fleet.

Cases, each round interleaving the two methods on their own destinations:

  unchanged   nothing changed since the last deploy (the check pass alone suffices)
  changed     10 files changed (check pass + real pass)
  deletes     10 files changed and 5 removed locally (check pass + real pass that deletes)

Run as root:

    python scripts/bench_deploy_check.py [--hosts 3] [--files 3000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
from pathlib import Path

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
from bench_deploy import change_files, make_tree

from infra.config.model import HealthCheckSection, NodeConfig
from infra.errors import InfraError
from infra.runner.deploy import DeployResult, deploy_all

SEED = 20261206
METHODS = {"checked": 50, "one pass": None}


def deploy(nodes: list[NodeConfig], health: HealthCheckSection, source: Path,
           max_deletes: int | None) -> dict[str, DeployResult | InfraError]:
    """deploy_all as --deploy-all calls it, with or without the deletion check."""
    return asyncio.run(deploy_all(nodes, health, source, excludes=(), delete=True,
                                  max_deletes=max_deletes))


def check(results: dict[str, DeployResult | InfraError], label: str) -> None:
    for name, result in results.items():
        if not isinstance(result, DeployResult):
            raise BenchFailure(f"{label}: {name}: {result}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--files", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    check_hosts(args.hosts)
    if args.repeat < 1 or args.files < args.repeat * 5 + 1:
        print("--repeat must be at least 1 and --files above 5 per round", file=sys.stderr)
        return 2
    require_fleet()
    scale = load_scale()
    # 100 s on an idle machine at the defaults (3 hosts, 3,000 files, 5 rounds), then scaled
    size = max(1.0, args.hosts * args.files / 9000) * max(1.0, args.repeat / 5)
    work = Path(tempfile.mkdtemp(prefix="bench-deploy-check-"))
    try:
        source = work / "src"
        small, total = make_tree(source, args.files, random.Random(SEED))
        print(f"tree: {args.files} files, {total / 1e6:.1f} MB; {load_note()}")
        with scaled_deadline(100 * size, scale), SSHFleet.start(args.hosts, work / "fleet") as fleet:
            health = fleet.health_section()
            nodes = {m: [fleet.node_config(h, remote_work_dir=str(h.home / f"bench-{i}"))
                         for h in fleet.hosts] for i, m in enumerate(METHODS)}
            for method, limit in METHODS.items():
                check(deploy(nodes[method], health, source, limit), f"cold {method}")
            series = {(case, m): Series(f"{case} {m}") for case in ("unchanged", "changed",
                                                                   "deletes") for m in METHODS}
            removable = small[-args.repeat * 5:]
            for r in range(args.repeat):
                order = list(METHODS) if r % 2 == 0 else list(reversed(METHODS))
                for case in ("unchanged", "changed", "deletes"):
                    if case != "unchanged":
                        change_files(small, r * 2 + (case == "deletes"))
                    if case == "deletes":
                        for path in removable[r * 5:(r + 1) * 5]:
                            path.unlink()
                    for method in order:
                        with measure(series[(case, method)]):
                            results = deploy(nodes[method], health, source, METHODS[method])
                        check(results, f"{case} {method}")
        rows = []
        for case in ("unchanged", "changed", "deletes"):
            a, b = series[(case, "checked")], series[(case, "one pass")]
            rows.append([case, f"{a.median():.3f}", f"{b.median():.3f}",
                         ratio(a.median(), b.median()), paired_ratio(a, b)])
        print_table(f"deploy_all to {args.hosts} hosts, median wall s of {args.repeat} rounds",
                    ["case", "with check (max_deletes=50)", "one pass (--yes)", "ratio",
                     "paired ratio"], rows)
    except FleetError as exc:
        print(f"cannot run: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
