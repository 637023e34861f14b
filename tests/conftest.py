"""Shared pytest fixtures and hooks: the real-sshd fleet and the integration guard."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.slurmcluster import SlurmCluster, SlurmClusterError, SlurmLogin, login_on
from tests.slurmcluster import unavailable_reason as slurm_unavailable_reason
from tests.sshfleet import SSHFleet, unavailable_reason

REQUIRE_INTEGRATION = "INFRA_REQUIRE_INTEGRATION"


def integration_required() -> bool:
    """True when skipping an integration test must count as a failure (CI sets the env)."""
    return os.environ.get(REQUIRE_INTEGRATION) == "1"


def skip_or_fail(reason: str) -> None:
    """Skip the test, or fail it when integration tests are required."""
    if integration_required():
        pytest.fail(f"{reason} (and {REQUIRE_INTEGRATION}=1)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session", autouse=True)
def own_claims_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """This session's own claims directory for the local node (fleet nodes have their own
    users, so their per-account claims are already private to the session)."""
    before = os.environ.get("INFRA_CLAIMS_DIR")
    os.environ["INFRA_CLAIMS_DIR"] = str(tmp_path_factory.mktemp("claims"))
    yield
    if before is None:
        os.environ.pop("INFRA_CLAIMS_DIR", None)
    else:
        os.environ["INFRA_CLAIMS_DIR"] = before


@pytest.fixture(autouse=True)
def keep_umask() -> Iterator[None]:
    """Each test gets the session's umask back: the CLI's ``main()`` sets 077 for the
    process, and a test that calls it in-process must not make files that a later fixture
    writes (a Slurm config read by the fleet users) private."""
    before = os.umask(0o022)
    os.umask(before)
    yield
    os.umask(before)


@pytest.fixture(scope="session")
def ssh_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHFleet]:
    """Three real sshd hosts on 127.0.0.21-23, one Unix user each, for the whole session.

    Tests that stop or pause a host must restore it (``start()`` / ``resume()``).
    """
    reason = unavailable_reason()
    if reason is not None:
        skip_or_fail(f"SSH fleet unavailable: {reason}")
    with SSHFleet.start(3, tmp_path_factory.mktemp("fleet")) as fleet:
        yield fleet


@pytest.fixture(autouse=True)
def fleet_cleared(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test on the fleet, nothing it started runs on into the next one.

    A detached run outlives its test by design; left alone, its workloads (restarted by
    their supervisors when merely killed) would hold slots, CPU and ports that the next
    test counts as its own.
    """
    fleet = (request.getfixturevalue("ssh_fleet") if "ssh_fleet" in request.fixturenames
             else None)
    yield
    if fleet is not None:
        fleet.clear_work()


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A real single-node Slurm (munged, slurmctld, slurmd) for the whole session.

    Tests using it carry ``@pytest.mark.xdist_group("slurm")`` so that, with ``--dist
    loadgroup``, one xdist worker runs them all against one cluster (pytest 9.2 ignores the
    grouping; each worker then starts its own cluster, in about half a second).  A daemon
    that does not come up fails the test with the daemons' log tails; it is never a skip.
    """
    reason = slurm_unavailable_reason()
    if reason is not None:
        skip_or_fail(f"Slurm cluster unavailable: {reason}")
    try:
        with SlurmCluster.start() as cluster:
            yield cluster
    except SlurmClusterError as exc:
        pytest.fail(f"Slurm cluster did not start: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def slurm_login(slurm_cluster: SlurmCluster, ssh_fleet: SSHFleet) -> Iterator[SlurmLogin]:
    """The fleet's node1 as the cluster's login host: its sessions get ``SLURM_CONF``."""
    with login_on(slurm_cluster, ssh_fleet, ssh_fleet.host("node1")) as login:
        yield login


INTEGRATION_FIXTURES = ("ssh_fleet", "slurm_cluster", "slurm_login")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the fleet or the Slurm cluster as ``integration``."""
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in INTEGRATION_FIXTURES):
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                               call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """With INFRA_REQUIRE_INTEGRATION=1, a skipped integration test is reported as failed."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if (report.skipped and integration_required() and not hasattr(report, "wasxfail")
            and item.get_closest_marker("integration") is not None):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (f"integration test skipped while {REQUIRE_INTEGRATION}=1: {reason}")


@pytest.fixture
def go_flag() -> Iterator[Path]:
    """A file path every node user can see (``mind.py --until``): the test creates it to end
    a workload when the test is ready, instead of racing a fixed duration."""
    folder = Path(tempfile.mkdtemp(prefix="infra-go-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder / "go"
    shutil.rmtree(folder, ignore_errors=True)
