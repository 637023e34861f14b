#!/usr/bin/env python3
"""What the node-side claims cost a start, and what they buy, measured side by side.

Runs the real supervisor script through the local transport (exactly as on a node, without
SSH) in temporary directories:

- the cost: N starts of a short command without a claim (the old start: ``mkdir`` only) and
  N starts with a claim (node-wide ``flock``, the live claims read and checked, the claim
  written), interleaved in the same process, with the ratio;
- with K live claims already on the node, the same with-claim start (the check reads them);
- the guarantee: C starts at once from separate clients on a node with S slots: how many
  were accepted (must be exactly S) and how many refused.

    python scripts/bench_claims.py [--starts 20] [--held 50] [--concurrent 12] [--slots 2]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench_common import print_table  # noqa: F401  (puts the repo on sys.path)

from infra.config.model import ExperimentSpec, NodeConfig
from infra.errors import CapacityRefusedError
from infra.runner.claims import claim_request
from infra.runner.supervisor_client import RestartPolicy, StartRequest, SupervisorClient
from infra.transport.local import LocalTransport


def node_at(root: Path, slots: int) -> NodeConfig:
    return NodeConfig(name="bench", host="localhost", remote_work_dir=str(root / "work"),
                      python_path=sys.executable, max_instances=slots, ram_gb=1024.0,
                      claims_dir=str(root / "claims"))


def request(node: NodeConfig, run_id: str, command: str, claim: bool) -> StartRequest:
    spec = ExperimentSpec(experiment_id="x", command=command, source=Path("."), ram_gb=0.25)
    return StartRequest(run_id=run_id, instance_id="x", command=command,
                        restart=RestartPolicy(auto_restart=False),
                        claim=claim_request(node, spec, None) if claim else None,
                        claims_dir=node.claims_dir)


async def timed_starts(client: SupervisorClient, node: NodeConfig, tag: str, n: int,
                       claim: bool, command: str) -> float:
    """Seconds per start, averaged over n sequential starts."""
    began = time.perf_counter()
    for i in range(n):
        await client.start(request(node, f"{tag}-{i:04d}", command, claim))
    return (time.perf_counter() - began) / n


async def cost(starts: int, held: int) -> list[tuple[str, float, float]]:
    root = Path(tempfile.mkdtemp(prefix="bench-claims-"))
    try:
        node = node_at(root, slots=held + 10 * starts + 10)
        client = SupervisorClient(LocalTransport(node.name), node)
        bare = claims = 0.0
        for rnd in range(2):  # interleaved rounds: load drifts hit both sides alike
            bare += await timed_starts(client, node, f"r-bare{rnd}", starts // 2, False, "true")
            claims += await timed_starts(client, node, f"r-claim{rnd}", starts // 2, True,
                                         "true")
        for i in range(held):  # live work on the node: each start now reads these claims
            await client.start(request(node, f"r-held-{i:04d}", "sleep 120", True))
        loaded = await timed_starts(client, node, "r-loaded", starts // 2, True, "true")
        bare_loaded = await timed_starts(client, node, "r-bareload", starts // 2, False, "true")
        for i in range(held):
            await client.stop(f"r-held-{i:04d}", grace=0.1)
        return [("start, no claim (old)", bare / 2, 1.0),
                ("start with claim, 0 live", claims / 2, (claims / 2) / (bare / 2)),
                (f"start, no claim, {held} live", bare_loaded, 1.0),
                (f"start with claim, {held} live", loaded, loaded / bare_loaded)]
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def race(concurrent: int, slots: int) -> tuple[int, int, float]:
    root = Path(tempfile.mkdtemp(prefix="bench-claims-"))
    try:
        node = node_at(root, slots=slots)
        clients = [SupervisorClient(LocalTransport(node.name), node) for _ in range(concurrent)]
        began = time.perf_counter()
        results = await asyncio.gather(
            *(c.start(request(node, f"r-race-{i:03d}", "sleep 60", True))
              for i, c in enumerate(clients)), return_exceptions=True)
        took = time.perf_counter() - began
        accepted = sum(1 for r in results if not isinstance(r, BaseException))
        refused = sum(1 for r in results if isinstance(r, CapacityRefusedError))
        for i in range(concurrent):
            if (root / "work" / ".infra" / "runs" / f"r-race-{i:03d}").exists():
                await clients[0].stop(f"r-race-{i:03d}", grace=0.1)
        return accepted, refused, took
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=20)
    parser.add_argument("--held", type=int, default=50)
    parser.add_argument("--concurrent", type=int, default=12)
    parser.add_argument("--slots", type=int, default=2)
    args = parser.parse_args()
    rows = asyncio.run(cost(max(2, args.starts), args.held))
    print("supervisor start through the local transport (same process, interleaved):")
    for name, seconds, ratio in rows:
        print(f"  {name:32s} {seconds * 1000:8.1f} ms/start   {ratio:5.2f}x")
    accepted, refused, took = asyncio.run(race(args.concurrent, args.slots))
    print(f"{args.concurrent} starts at once on a {args.slots}-slot node: {accepted} accepted, "
          f"{refused} refused, in {took:.2f} s")
    return 0 if accepted == args.slots and refused == args.concurrent - args.slots else 1


if __name__ == "__main__":
    sys.exit(main())
