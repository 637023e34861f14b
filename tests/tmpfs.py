"""A small tmpfs mounted for one test, so a disk can really fill up (needs root)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import skip_or_fail

UNMOUNT_BOUND = 30.0  # processes of the test may still hold files for a moment


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "2m", owner: int | None = None) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` at ``path`` (owned by uid ``owner``); unmount it afterwards.

    Skips (or fails, with INFRA_REQUIRE_INTEGRATION=1) where mounting is not permitted.
    """
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size},mode=0755" + (f",uid={owner}" if owner is not None else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        skip_or_fail(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield path
    finally:
        _unmount(path)


def _unmount(path: Path) -> None:
    """Unmount, retrying while the mount is busy; lazily as a last resort."""
    deadline = time.monotonic() + UNMOUNT_BOUND
    while os.path.ismount(path):
        proc = subprocess.run(["umount", str(path)], capture_output=True, check=False)
        if proc.returncode == 0:
            return
        if time.monotonic() > deadline:
            subprocess.run(["umount", "-l", str(path)], check=False)
            return
        time.sleep(0.1)
