#!/usr/bin/env python3
"""A small, real, self-contained experiment workload (standard library only).

It "thinks" for a configurable time: every interval it does a bit of CPU work, logs a
numbered progress line, and at the end writes a JSON results file. The shipped experiment
specs run it so the whole pipeline can be exercised on any node with python3.
"""

import argparse
import hashlib
import json
import os
import signal
import sys
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", default=os.environ.get("INFRA_INSTANCE_ID", "mind"))
    parser.add_argument("--role", default="subject")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds to run")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between lines")
    parser.add_argument("--out", default=None, help="results directory (default out/NAME)")
    parser.add_argument("--work", type=int, default=20000, help="hash rounds per step")
    parser.add_argument("--until", default=None, metavar="PATH",
                        help="end early (normally, exit 0) once this file exists")
    args = parser.parse_args(argv)

    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    out_dir = args.out or os.path.join("out", args.name)
    os.makedirs(out_dir, exist_ok=True)

    started = time.time()
    digest = hashlib.sha256(args.name.encode()).digest()
    step = 0
    print(f"[{args.name}] role={args.role} node={os.environ.get('INFRA_NODE', '?')} "
          f"pid={os.getpid()} duration={args.duration:g}s", flush=True)
    while time.time() - started < args.duration and not stopping and \
            not (args.until and os.path.exists(args.until)):
        for _ in range(args.work):
            digest = hashlib.sha256(digest).digest()
        step += 1
        print(f"[{args.name}] step {step} thought={digest.hex()[:12]} "
              f"elapsed={time.time() - started:.1f}s", flush=True)
        time.sleep(args.interval)

    result = {
        "name": args.name,
        "role": args.role,
        "steps": step,
        "final_thought": digest.hex(),
        "seconds": round(time.time() - started, 3),
        "stopped_early": bool(stopping),
        "node": os.environ.get("INFRA_NODE"),
        "run_id": os.environ.get("INFRA_RUN_ID"),
    }
    path = os.path.join(out_dir, "summary.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(result, fh, indent=2)
    os.replace(path + ".tmp", path)
    print(f"[{args.name}] done: {step} steps, results in {path}", flush=True)
    return 143 if stopping else 0


if __name__ == "__main__":
    sys.exit(main())
