"""What a report is built from: typed, gathered once by ``files.gather`` (or a test)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from infra.campaign.table import ResultRow
from infra.state import Event, InstanceRecord, RunRecord
from infra.telemetry.sample import Sample

MAX_POINTS = 2000
"""Points in one telemetry chart at most (all its series together); longer runs are
downsampled, keeping each bucket's lowest and highest value so peaks stay visible."""

MAX_INSTANCE_CHARTS = 24
"""Instances that get their own telemetry chart; past this the summary table covers all."""

MAX_EVENTS = 5000
"""Events shown (plot and table); a run with more says how many were left out."""

MAX_SWEEP_TRACES = 60
"""Parameter/metric pairs offered by the sweep plot's menu at most."""


@dataclass(frozen=True)
class ManifestDoc:
    """The run's ``manifest.json`` as read (any JSON object), or why it could not be."""

    doc: Mapping[str, Any] | None = None
    error: str | None = None  # None with doc None: no manifest recorded


@dataclass(frozen=True)
class ReportInputs:
    """Everything one report shows; built from the store and the run directory."""

    run: RunRecord
    instances: tuple[InstanceRecord, ...]
    events: tuple[Event, ...] = ()
    events_total: int | None = None  # how many the run has, when more than ``events``
    manifest: ManifestDoc = ManifestDoc()
    samples: Mapping[str, tuple[Sample, ...]] = field(default_factory=dict)
    rows: tuple[ResultRow, ...] = ()
    generated_at: float = 0.0
    tool_version: str = ""
