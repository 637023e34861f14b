"""The ``telemetry`` topology key: parsed, checked (one line naming file and key), and passed
to every start request the coordinator builds (launch, move, campaign hand-out)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.config.model import TelemetrySection
from infra.placement import plan
from infra.runner.lifecycle import RunSession
from infra.runner.supervisor_client import StartRequest
from infra.state import Store
from infra.transport.pool import ConnectionPool
from tests.builders import assert_one_line_error, cluster, node, run_cli, spec


def test_default_and_values() -> None:
    assert cluster(node("a")).telemetry == TelemetrySection(interval_seconds=1.0)
    assert cluster(node("a"), telemetry={"interval_seconds": 0}).telemetry.interval_seconds == 0
    assert cluster(node("a"), telemetry={"interval_seconds": 2.5}).telemetry.interval_seconds \
        == 2.5
    assert cluster(node("a"), telemetry={"interval_seconds": 0.2}).telemetry.interval_seconds \
        == 0.2


@pytest.mark.parametrize(("doc", "reason"), [
    ({"interval_seconds": 0.1}, "must be 0 (off) or at least 0.2"),
    ({"interval_seconds": -1}, "must be at least 0"),
    ({"interval_seconds": 4000}, "must be at most 3600"),
    ({"interval_seconds": "fast"}, "expected a number"),
    ({"interval": 1}, "unknown key"),
])
def test_bad_values_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                             doc: dict[str, Any], reason: str) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"nodes": [{"name": "n1", "host": "localhost", "ram_gb": 8.0,
                                               "max_instances": 2, "remote_work_dir": "."}],
                                    "telemetry": doc}))
    code, _, err = run_cli(capsys, "--cluster-config", str(path), "--validate-config")
    key = "telemetry." + next(iter(doc))
    assert_one_line_error(code, err, f"{path}: {key}: ", reason)


def test_request_json_carries_the_interval() -> None:
    on = StartRequest(run_id="r", instance_id="i", command="c", telemetry_interval=0.5)
    assert on.to_json("n")["telemetry"] == {"interval": 0.5}
    assert "telemetry" not in StartRequest(run_id="r", instance_id="i", command="c").to_json("n")


@pytest.mark.parametrize("interval", [0.0, 1.0, 7.5])
def test_session_start_request_uses_the_cluster_interval(tmp_path: Path, interval: float) -> None:
    c = cluster(node("a"), telemetry={"interval_seconds": interval},
                logging={"log_dir": str(tmp_path / "logs")})
    specs = [spec(c, "x")]
    result = plan(c, specs, pins={})
    store = Store.for_log_dir(c.log_dir)

    async def request() -> StartRequest:
        async with ConnectionPool(c) as pool:
            session = RunSession(c, store, pool)
            run_id = session.record_run(specs, result, {})
            rec = store.instances(run_id)[0]
            return session.start_request(run_id, rec)

    try:
        req = asyncio.run(request())
    finally:
        store.close()
    assert req.telemetry_interval == interval
    assert ("telemetry" in req.to_json("a")) == (interval > 0)
