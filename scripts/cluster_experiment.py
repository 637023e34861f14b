#!/usr/bin/env python3
"""Thin wrapper: the same entry point as the installed ``cluster-experiment`` command."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from infra.cli.main import entry

if __name__ == "__main__":
    entry()
