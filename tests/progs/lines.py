"""Test program: print N numbered lines, optionally hold, then exit with a given code.

Usage: lines.py N CODE [--sleep S] [--hold S] [--count FILE]
Each run appends one line (its INFRA_ATTEMPT) to the count file first.
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("n", type=int)
    parser.add_argument("code", type=int)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--hold", type=float, default=0.0)
    parser.add_argument("--count")
    args = parser.parse_args()
    if args.count:
        with open(args.count, "a") as f:
            f.write(os.environ.get("INFRA_ATTEMPT", "?") + "\n")
    for i in range(1, args.n + 1):
        print(f"line {i}", flush=True)
        if args.sleep:
            time.sleep(args.sleep)
    if args.hold:
        time.sleep(args.hold)
    return args.code


if __name__ == "__main__":
    raise SystemExit(main())
