"""Where an instance's telemetry lives at home, and reading it back (bounded, never raising)."""

from __future__ import annotations

from pathlib import Path

from infra.telemetry.sample import Sample, parse_line

MAX_READ_BYTES = 256 << 20
"""A home telemetry file is read up to this size (about a week of 1 s samples)."""


def telemetry_path(log_dir: Path, run_id: str, instance_id: str) -> Path:
    """``<log_dir>/<run>/<instance>.telemetry.jsonl``, next to the instance's log copy."""
    return log_dir / run_id / f"{instance_id}.telemetry.jsonl"


def read_samples(path: Path, limit: int | None = None) -> list[Sample]:
    """The samples of a home telemetry file in file order (malformed lines skipped);
    at most the last ``limit`` when given; ``[]`` when the file is missing or unreadable."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_READ_BYTES)
    except OSError:
        return []
    samples = [s for s in (parse_line(line) for line in data.splitlines() if line.strip())
               if s is not None]
    return samples[-limit:] if limit is not None and limit > 0 else samples
