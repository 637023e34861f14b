"""A pool task for tests: appends "start ID NS CPUS" / "end ID NS" lines (monotonic ns)."""

import os
import sys
import time


def cpus() -> str:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    return "?"


def note(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (text + "\n").encode())
    finally:
        os.close(fd)


marks, task, pause = sys.argv[1], sys.argv[2], float(sys.argv[3])
note(marks, f"start {task} {time.monotonic_ns()} {cpus()} {os.getpid()}")
time.sleep(pause)
note(marks, f"end {task} {time.monotonic_ns()}")
