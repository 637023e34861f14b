"""Ctrl-C ends a command after the work it cancels has cleaned up, and never hangs it.

Each case runs a real interpreter that gets a real SIGINT. ``asyncio.gather`` gives up on
its other children as soon as one ends cancelled, and ``asyncio.run`` then cancels what is
still running a second time; on Python 3.11 that second cancellation, landing on a
subprocess being created, left a wait that never returned (``--deploy-all`` hung for ever
after Ctrl-C, about one run in six on a loaded machine). ``run_async`` lets the cancelled
tasks finish their cleanup first.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

COMMON = """
import asyncio, os, signal, sys
from infra.cli import health
health.CLEANUP_WAIT_S = 3600.0  # a wait for the wrong task would outlast the test's limit

async def idle():
    await asyncio.sleep(3600)
"""

SPAWN_WHILE_INTERRUPTED = COMMON + """
cleaned = []

async def deploy_like():
    # as deploy's _run_rsync: the spawn is shielded, and a cancellation that lands while the
    # process is being created waits for it, to kill it
    await asyncio.sleep(0.2)
    spawn = asyncio.ensure_future(asyncio.create_subprocess_exec(
        "sleep", "300", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True))
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the process is being created
    try:
        proc = await asyncio.shield(spawn)
    except asyncio.CancelledError:
        proc = await spawn
        proc.kill()
        await proc.communicate()
        cleaned.append(proc.pid)
        raise
    await proc.communicate()

async def main():
    await asyncio.gather(idle(), deploy_like())

try:
    health.run_async(main)
except KeyboardInterrupt:
    print("interrupted", cleaned)
"""

BACKGROUND_LEFT_ALONE = COMMON + """
async def main():
    background = asyncio.ensure_future(idle())  # nobody cancels it: not waited for
    loop = asyncio.get_running_loop()
    loop.call_later(0.2, os.kill, os.getpid(), signal.SIGINT)
    await idle()

try:
    health.run_async(main)
except KeyboardInterrupt:
    print("interrupted")
"""


def run_snippet(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)


def test_ctrl_c_while_a_subprocess_is_created_ends_after_its_cleanup() -> None:
    out = run_snippet(SPAWN_WHILE_INTERRUPTED)
    assert out.returncode == 0, out.stderr
    said, pids = out.stdout.split(" ", 1)
    assert said == "interrupted"
    pid = int(pids.strip("[]\n"))  # the cleanup ran to its end: the process was killed
    assert not Path(f"/proc/{pid}").exists() or \
        Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] in "ZX"


def test_ctrl_c_does_not_wait_for_tasks_nobody_cancelled() -> None:
    out = run_snippet(BACKGROUND_LEFT_ALONE)
    assert (out.returncode, out.stdout) == (0, "interrupted\n"), out.stderr
