"""Saved state in the reference's form: ``logs/cluster/cluster_state_<timestamp>.json``
(placements, node states, instance states; rewritten atomically when it changes) and the
orchestrator's own log ``logs/cluster/cluster_<timestamp>.log`` (one line per event)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from infra.monitor.snapshot import RunSnapshot
from infra.state import InstanceRecord


def _stamp() -> str:
    return time.strftime("%Y%m%d_%H%M%S")


class SavedState:
    """One coordinator session's state file and log file under ``<log_dir>/cluster``."""

    def __init__(self, log_dir: Path, stamp: str | None = None) -> None:
        self.dir = log_dir / "cluster"
        self.dir.mkdir(parents=True, exist_ok=True)
        stamp = stamp or _stamp()
        self.state_path = self.dir / f"cluster_state_{stamp}.json"
        self.log_path = self.dir / f"cluster_{stamp}.log"
        self._last: str | None = None
        self.logger = logging.getLogger(f"infra.cluster.{stamp}")
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)
        if not self.logger.handlers:
            handler = logging.FileHandler(self.log_path, encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            self.logger.addHandler(handler)

    def log(self, kind: str, subject: str, message: str) -> None:
        self.logger.info("%s %s: %s", kind, subject, message)

    def write(self, snap: RunSnapshot, records: dict[str, InstanceRecord]) -> bool:
        """Rewrite the state file if anything but the clock changed; True when written."""
        doc: dict[str, Any] = {
            "run_id": snap.run_id,
            "run_state": snap.run_state,
            "placements": {r.instance_id: r.node for r in records.values()},
            "nodes": {n.name: {"state": n.state.value, "reason": n.reason,
                               "instances": n.instances, "max_instances": n.max_instances}
                      for n in snap.nodes},
            "instances": {r.instance_id: {
                "node": r.node, "state": r.state.value, "pid": r.pid,
                "exit_code": r.exit_code, "signal": r.signal, "restarts": r.restarts,
                "moves": r.moves, "previous_nodes": list(r.previous_nodes),
                "reason": r.reason} for r in records.values()},
        }
        body = json.dumps(doc, sort_keys=True)
        if body == self._last:
            return False
        self._last = body
        doc["saved_at"] = time.time()
        tmp = self.state_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True))
        os.replace(tmp, self.state_path)
        return True

    def close(self) -> None:
        for handler in list(self.logger.handlers):
            handler.close()
            self.logger.removeHandler(handler)
