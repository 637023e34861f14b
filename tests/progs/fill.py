"""Test program: fill the disk, then either die of it or hold on and exit cleanly.

Usage: fill.py TARGET [--until FILE]
TARGET is a file to append to, or ``-`` for stdout (the instance's output log). Writes 64 KiB
chunks until the write fails with ENOSPC/EDQUOT. Without ``--until`` it then re-raises
(a Python traceback, exit code 1). With ``--until`` it waits until FILE exists and exits 0.
Uses os.write, so nothing is left buffered for the interpreter's exit to fail on.
"""

from __future__ import annotations

import argparse
import errno
import os
import time

CHUNK = b"x" * 65535 + b"\n"


def fill(fd: int) -> OSError:
    """Write until the disk refuses; the error it gave."""
    while True:
        try:
            os.write(fd, CHUNK)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return exc
            raise


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("--until")
    args = parser.parse_args()
    if args.target == "-":
        error = fill(1)
    else:
        fd = os.open(args.target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            error = fill(fd)
        finally:
            os.close(fd)
    if args.until is None:
        raise error
    while not os.path.exists(args.until):
        time.sleep(0.05)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
