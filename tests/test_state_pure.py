"""Fast, pure checks of what the store and the live loop rest on: the node tracker's walk,
the stored spec and allocation round trip, and re-placement after a move (which must obey
every check the first placement did, the run's other instances included)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from infra.config.model import HealthCheckSection, SlurmOptions
from infra.config.specs import check_spec_set, parse_spec
from infra.errors import StateError
from infra.monitor import tracker as trk
from infra.monitor.snapshot import NodeState
from infra.placement import Condition, NodeCondition, plan
from infra.placement.allocation import Allocation, VolumeAllocation
from infra.state.codec import (
    decode_allocation,
    decode_spec,
    encode_allocation,
    encode_spec,
    spec_document,
)
from tests.test_placement_properties import (
    PROPS,
    SPEC_DIR,
    Case,
    cases,
    clusters,
    fits,
    spec_sets,
)

# --------------------------------------------------------------------------- tracker

CFG = HealthCheckSection(interval_seconds=8.0, reconnect_attempts=3,
                         disconnected_grace_seconds=10.0)


def test_tracker_walks_reconnecting_disconnected_offline_and_back() -> None:
    t = trk.Tracker("rpi1")
    t, tr = trk.on_success(t, 0.0, None, CFG)
    assert t.state is NodeState.HEALTHY and tr is not None and tr.old is NodeState.UNKNOWN
    t, tr = trk.on_success(t, 1.0, None, CFG)
    assert tr is None and t.next_probe_at == 9.0  # no transition twice

    delays = []
    now = 10.0
    for attempt in (1, 2, 3):
        t, tr = trk.on_failure(t, now, "connection refused", CFG)
        assert t.state is NodeState.RECONNECTING and t.failures == attempt
        assert (tr is not None) == (attempt == 1)
        delays.append(t.next_probe_at - now)
        now = t.next_probe_at
    assert delays == [1.0, 2.0, 4.0]  # exponential backoff
    t, tr = trk.on_failure(t, now, "connection refused", CFG)
    assert t.state is NodeState.DISCONNECTED and tr is not None and "grace 10 s" in tr.reason
    since = now
    t, tr = trk.on_failure(t, since + 5.0, "connection refused", CFG)
    assert t.state is NodeState.DISCONNECTED and tr is None
    assert t.next_probe_at <= since + CFG.disconnected_grace_seconds + 1e-9
    t, tr = trk.on_failure(t, since + 10.0, "connection refused", CFG)
    assert t.state is NodeState.OFFLINE and tr is not None and "unreachable for 10 s" in tr.reason
    t, tr = trk.on_failure(t, since + 20.0, "no route", CFG)
    assert t.state is NodeState.OFFLINE and tr is None and t.reason == "no route"
    t, tr = trk.on_success(t, since + 30.0, "temperature 91 C", CFG)
    assert t.state is NodeState.DEGRADED and t.failures == 0 and t.disconnected_at is None
    assert tr is not None and tr.old is NodeState.OFFLINE


def test_backoff_is_capped_at_the_interval() -> None:
    assert [trk.backoff(n, CFG) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


# --------------------------------------------------------------------------- codec

SLURM_OPTIONS = st.none() | st.builds(
    SlurmOptions, time_limit=st.none() | st.sampled_from(["5", "00:10:00", "1-12:00"]),
    signal=st.none() | st.sampled_from(["USR1@60", "B:TERM@120", "10"]))


@PROPS
@given(data=st.data())
def test_a_stored_spec_decodes_to_the_same_spec(data: st.DataObject) -> None:
    cluster = data.draw(clusters())
    for spec in data.draw(spec_sets(cluster)):
        spec = replace(spec, slurm=data.draw(SLURM_OPTIONS))  # bench specs may carry it too
        back = decode_spec(encode_spec(spec))
        assert back == spec
        assert dict(back.params) == dict(spec.params)
        assert spec_document(back) == spec_document(spec)


def test_every_spec_field_is_stored() -> None:
    from infra.config.topology import parse_cluster
    cluster = parse_cluster({"nodes": [{"name": "n", "host": "n.lab.invalid", "ram_gb": 8}]},
                            Path("c.yaml"))
    spec = parse_spec({
        "experiment_id": "full", "command": "python3 run.py", "workdir": "sub",
        "env": {"A": "1"}, "ram_gb": 2, "gpu_required": False, "cpu_cores": 1.5,
        "preferred_node": "n", "results": ["out/*"], "recover": "pause", "max_retries": 2,
        "auto_restart": False, "description": "all keys", "params": {"lr": 0.1},
        "job_type": "service", "constraints": [{"operator": "distinct_hosts"}],
        "resources": {"disk_gb": 1, "ports": [{"label": "api", "port": 8080}]},
        "slurm": {"time_limit": "00:30:00", "signal": "B:USR1@60"},
    }, SPEC_DIR / "full.json", cluster)
    back = decode_spec(encode_spec(spec))
    assert back == spec and dict(back.params) == {"lr": 0.1}
    assert back.slurm == SlurmOptions(time_limit="00:30:00", signal="B:USR1@60")
    assert (back.recover.value, back.max_retries, back.auto_restart, back.job_type.value) == \
        ("pause", 2, False, "service")


@pytest.mark.parametrize("text", ["not json", "[]", json.dumps({"experiment_id": "x"}),
                                  json.dumps({"experiment_id": "x", "command": "c",
                                              "ram_gb": "lots", "gpu_required": False,
                                              "gpu_memory_gb": 0, "recover": "none"})])
def test_a_damaged_stored_spec_is_a_state_error(text: str) -> None:
    with pytest.raises(StateError):
        decode_spec(text)


def test_allocations_round_trip_and_old_records_have_none() -> None:
    alloc = Allocation(instance_id="i", node="n", device_ids=("gpu1",), gpu_ids=("1",),
                       ports=(("api", 8080),),
                       volumes=(VolumeAllocation("data", "/srv/d", "/data", "ro"),),
                       runtime_driver="exec", cpu_cores=2.0, memory_mb=1024.0, run_id="r-1")
    assert decode_allocation(encode_allocation(alloc)) == alloc
    assert decode_allocation(encode_allocation(None)) is None
    assert decode_allocation("{}") is None and decode_allocation(None) is None


# --------------------------------------------------------------------------- re-placement

@st.composite
def distinct_cases(draw: st.DrawFn) -> Case:
    """Cases where some instances also ask for distinct_hosts."""
    case: Case = draw(cases())
    specs = []
    for spec in case.specs:
        if draw(st.booleans()):
            doc: dict[str, Any] = {**spec_document(spec), "command": spec.command,
                                   "constraints": [{"operator": "distinct_hosts"}]}
            for key in ("source", "template_id", "resources", "workdir", "max_retries",
                        "auto_restart", "preferred_node"):
                doc.pop(key, None)
            if spec.preferred_node:
                doc["preferred_node"] = spec.preferred_node
            spec = parse_spec(doc, SPEC_DIR / f"{spec.experiment_id}.json", case.cluster)
        specs.append(spec)
    return replace(case, specs=check_spec_set(specs))


def _distinct(spec: Any) -> bool:
    return any(c.operator.value == "distinct_hosts" for c in spec.constraints)


@PROPS
@given(case=distinct_cases())
def test_a_moved_instance_obeys_every_check_the_first_placement_did(case: Case) -> None:
    first = plan(case.cluster, case.specs, conditions=case.conditions)
    by_id = {s.experiment_id: s for s in case.specs}
    where = {p.instance_id: p.node for p in first.placements}
    for moved in first.placements:
        conds = dict(case.conditions)
        conds[moved.node] = NodeCondition(Condition.UNAVAILABLE, "lost")
        peers = [(by_id[i], n, first.allocation_of(i)) for i, n in where.items()
                 if i != moved.instance_id]
        again = plan(case.cluster, [by_id[moved.instance_id]], conditions=conds, peers=peers)
        target = again.node_of(moved.instance_id)
        if target is None:
            continue
        node = case.cluster.node(target)
        here = [by_id[i] for i, n in where.items() if n == target and i != moved.instance_id]
        spec = by_id[moved.instance_id]
        assert target != moved.node
        assert fits(node, spec, here, conds), (moved.instance_id, target)
        if _distinct(spec):
            assert not any(_distinct(s) for s in here), (moved.instance_id, target)
