"""Test program: one campaign task (or suite hook) for tests/test_campaign_e2e.py.

Usage: camptask.py MARK [options]

Appends one JSON line per event to ``marks/MARK.log`` (relative to its working directory,
the node's work dir) with a single ``write`` under an exclusive ``flock``, so lines never
interleave: ``{"ev": "start", "id", "t", "pid", "node", "cpus", "index", "params",
"args", "count"}`` when it starts, ``{"ev": "end", "id", "t", "rc"}`` before it exits.
``t`` is CLOCK_MONOTONIC, one clock for every process of the machine (all fleet nodes run
on it), so times written by tasks on different nodes compare.

--hook NAME        write ``{"ev": NAME, "suite", "suite_id", "workers", "t"}`` and exit 0
                   (a suite's setup or cleanup)
--sleep S          seconds to run between the two lines
--counter FILE     a file shared by every node: incremented under flock at start (the value
                   then is the start line's ``count``) and decremented at end, so it always
                   counts the tasks between their two lines
--gate FILE        after the start line, wait until FILE exists (at most 300 s)
--hold-on NODE     on node NODE, after the start line, wait until killed (at most 300 s)
--value V --fail-value W --fail-unless FILE
                   exit 1 when V == W and FILE does not exist
--arg A            recorded in the start line (placeholders filled by the campaign)
--metrics          write {"index": INFRA_TASK_INDEX, "node": INFRA_NODE} to
                   $INFRA_RESULTS_DIR/metrics.json
Standard library only; runs on the node's python3.
"""

import argparse
import fcntl
import json
import os
import sys
import time

LIMIT_S = 300.0


def now():
    """The machine-wide monotonic clock."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def append(mark, doc):
    """One line to marks/MARK.log, whole, under an exclusive lock."""
    os.makedirs("marks", exist_ok=True)
    data = (json.dumps(doc, sort_keys=True) + "\n").encode()
    fd = os.open(os.path.join("marks", mark + ".log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, data)
    finally:
        os.close(fd)


def bump(path, delta):
    """Add delta to the shared counter under its lock; the new value."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        raw = os.read(fd, 64).decode().strip()
        value = int(raw or "0") + delta
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, str(value).encode())
        return value
    finally:
        os.close(fd)


def cpus_allowed():
    """This process's Cpus_allowed_list, as /proc shows it."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    return ""


def wait_until(check):
    """Poll check() until true or LIMIT_S passed."""
    deadline = now() + LIMIT_S
    while not check() and now() < deadline:
        time.sleep(0.05)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mark")
    p.add_argument("--hook")
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--counter")
    p.add_argument("--gate")
    p.add_argument("--hold-on")
    p.add_argument("--value")
    p.add_argument("--fail-value")
    p.add_argument("--fail-unless")
    p.add_argument("--arg", action="append", default=[])
    p.add_argument("--metrics", action="store_true")
    a = p.parse_args()
    env = os.environ
    if a.hook:
        append(a.mark, {"ev": a.hook, "t": now(), "suite": env.get("INFRA_SUITE_NAME"),
                        "suite_id": env.get("INFRA_SUITE_ID"),
                        "workers": env.get("INFRA_WORKER_COUNT"),
                        "node": env.get("INFRA_NODE")})
        return 0
    task = env.get("INFRA_INSTANCE_ID", "?")
    count = bump(a.counter, +1) if a.counter else None
    append(a.mark, {"ev": "start", "id": task, "t": now(), "pid": os.getpid(),
                    "node": env.get("INFRA_NODE"), "cpus": cpus_allowed(),
                    "index": env.get("INFRA_TASK_INDEX"),
                    "params": json.loads(env.get("INFRA_PARAMS") or "null"),
                    "args": a.arg, "count": count})
    if a.gate:
        wait_until(lambda: os.path.exists(a.gate))
    if a.hold_on and env.get("INFRA_NODE") == a.hold_on:
        wait_until(lambda: False)
    time.sleep(a.sleep)
    if a.metrics:
        with open(os.path.join(env["INFRA_RESULTS_DIR"], "metrics.json"), "w") as f:
            json.dump({"index": int(env["INFRA_TASK_INDEX"]), "node": env.get("INFRA_NODE")}, f)
    rc = 0
    if a.fail_value is not None and a.value == a.fail_value and \
            not (a.fail_unless and os.path.exists(a.fail_unless)):
        rc = 1
    if a.counter:
        bump(a.counter, -1)
    append(a.mark, {"ev": "end", "id": task, "t": now(), "rc": rc})
    return rc


if __name__ == "__main__":
    sys.exit(main())
