"""Run manifests: what produced a run (code, config, specs, nodes), and how two runs differ.

Pure values and functions only (``model``, ``compare``); reading git and writing files is
``infra.runner.manifest``.
"""

from infra.manifest.model import (
    MANIFEST_VERSION,
    FileRecord,
    GitState,
    GpuRecord,
    Manifest,
    NodeRecord,
    Throttle,
    ToolInfo,
)

__all__ = ["MANIFEST_VERSION", "FileRecord", "GitState", "GpuRecord", "Manifest", "NodeRecord",
           "Throttle", "ToolInfo"]
