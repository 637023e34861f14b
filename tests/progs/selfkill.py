"""Test program: count this attempt in a file, then kill itself with a given signal.

Usage: selfkill.py SIGNAL COUNT_FILE     (SIGNAL like SIGSEGV, SIGKILL, SIGABRT, SIGTERM)
Core dumps are switched off first so the test leaves no core files behind.
"""

from __future__ import annotations

import os
import resource
import signal
import sys


def main() -> None:
    sig = signal.Signals[sys.argv[1]]
    with open(sys.argv[2], "a") as f:
        f.write(os.environ.get("INFRA_ATTEMPT", "?") + "\n")
    print(f"attempt {os.environ.get('INFRA_ATTEMPT')} dies by {sig.name}", flush=True)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sig != signal.SIGKILL:
        signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)


if __name__ == "__main__":
    main()
