"""Test program: start a grandchild in the same process group, then sleep.

Usage: grandchild.py PID_FILE [--ignore-term]
With --ignore-term both processes ignore SIGTERM, so only SIGKILL after the grace ends them.
The grandchild writes "CHILD_PID GRANDCHILD_PID" to PID_FILE once its signal setup is done.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

SLEEPER = """
import os, signal, sys, time
if sys.argv[2] == "1":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write("%d %d\\n" % (os.getppid(), os.getpid()))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(120)
"""


def main() -> None:
    ignore = "--ignore-term" in sys.argv[2:]
    if ignore:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", SLEEPER, sys.argv[1], "1" if ignore else "0"])
    print("started grandchild", child.pid, flush=True)
    time.sleep(120)


if __name__ == "__main__":
    main()
