"""The environment a task's process gets from its spec (shared by direct starts and pools)."""

from __future__ import annotations

import json

from infra.config.model import ExperimentSpec

DEFAULT_ENV: dict[str, str] = {"PYTHONUNBUFFERED": "1"}
"""Given to every instance unless its spec's ``env`` sets the name: Python programs write
their output at once, so ``print()`` lines reach the log (and the live view) as they happen."""


def task_env(spec: ExperimentSpec) -> dict[str, str]:
    """Defaults, the spec's ``env``, ``INFRA_PARAMS`` (JSON, sorted keys; when there are
    params) and ``INFRA_TASK_INDEX`` (sweep tasks); the caller adds allocation hints."""
    env = {**DEFAULT_ENV, **dict(spec.env)}  # the spec's own env overrides the defaults
    if spec.params:
        env["INFRA_PARAMS"] = json.dumps(dict(spec.params), sort_keys=True)
    if spec.task_index is not None:
        env["INFRA_TASK_INDEX"] = str(spec.task_index)
    return env
