"""Results fetched safely, end to end on the real sshd fleet through the real CLI.

The experiment itself plants the traps on its node (as the node's own, non-root user): links
out of the work dir, a results directory swapped for a link, an unreadable file and a FIFO.
The good files must still come home, nothing from outside the work dir may, the fetch must
finish, and what did not come must show in ``status`` and fail ``results``.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests import test_run_e2e as e2e
from tests.sshfleet import SSHFleet

project = e2e.project  # the same project fixture: the fleet, the local node, mind.py


def _run(root: Path, eid: str, script: str, results: list[str]) -> tuple[str, int, str]:
    """Start ``script`` on node1 and watch it to the end; (run id, exit code, stderr)."""
    (root / "workloads" / f"{eid}.sh").write_text(script)
    s = e2e.spec(root, eid, command=f"sh workloads/{eid}.sh", results=results)
    proc = e2e.cli(root, "--config", str(s), "--placement", f"{eid}:node1", timeout=180)
    return e2e.status_json(root)["run_id"], proc.returncode, proc.stderr


def assert_run_error(code: int, err: str, *fragments: str) -> None:
    """The command printed its progress, then failed (exit 1) with one ``error:`` line."""
    assert code == 1, err
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err
    for frag in fragments:
        assert frag in errors[0], (frag, errors[0])


def _instance(root: Path, run_id: str) -> dict[str, object]:
    (inst,) = e2e.status_json(root, run_id)["instances"]
    return inst  # type: ignore[no-any-return]


def test_links_out_of_the_work_dir_are_skipped_and_the_rest_comes_home(
        project: Path, ssh_fleet: SSHFleet) -> None:
    host = ssh_fleet.host("node1")
    script = """set -e
mkdir -p out/sub "$HOME/private-$$"
echo secret > "$HOME/private-$$/secret.txt"
echo good > out/good.txt
echo deep > out/sub/deep.txt
ln -s "$HOME/private-$$/secret.txt" out/leak.txt
ln -s "$HOME/private-$$" out/sub/leakdir
ln -s "$HOME/private-$$" linked
echo note > "$INFRA_RESULTS_DIR/note.txt"
rm -rf "$INFRA_RESULTS_DIR" && ln -s "$HOME/private-$$" "$INFRA_RESULTS_DIR"
"""
    run_id, code, err = _run(project, "linker", script, ["out", "linked", "none/*.csv"])
    assert_run_error(code, err, "results incomplete", "linker: 5 not fetched")
    home = project / "logs" / run_id / "linker"
    assert (home / "out" / "good.txt").read_text() == "good\n"
    assert (home / "out" / "sub" / "deep.txt").read_text() == "deep\n"
    fetched = [p for p in home.rglob("*") if p.is_file()]
    assert all("secret" not in p.read_text() for p in fetched), fetched
    assert not (home / "out" / "leak.txt").exists() and not (home / "linked").exists()
    assert not (home / "results").exists()

    inst = _instance(project, run_id)
    missing = {m["path"]: m["reason"] for m in inst["results_missing"]}  # type: ignore
    assert set(missing) == {"out/leak.txt", "out/sub/leakdir", "linked", "none/*.csv",
                            "results"}, missing
    assert "outside" in missing["out/leak.txt"] and host.home.name in missing["out/leak.txt"]
    assert "outside" in missing["linked"]
    assert "outside the work dir" in missing["results"]
    assert missing["none/*.csv"] == "matched nothing"
    table = e2e.cli(project, "status", run_id)
    assert table.returncode == 0 and "results missing" in table.stdout

    proc = e2e.cli(project, "results", run_id, "--json")
    assert_run_error(proc.returncode, proc.stderr, "results incomplete", "linker: 5 not fetched")
    doc = json.loads(proc.stdout)
    assert sorted(Path(f).name for f in doc["results"]["linker"]) == ["deep.txt", "good.txt"]
    assert {m["path"] for m in doc["missing"]["linker"]} == set(missing)


def test_a_fifo_never_hangs_the_fetch(project: Path) -> None:
    script = """set -e
mkdir -p out "$INFRA_RESULTS_DIR"
mkfifo out/fifo
echo good > out/good.txt
mkfifo "$INFRA_RESULTS_DIR/fifo"
echo note > "$INFRA_RESULTS_DIR/note.txt"
"""
    # Opening a FIFO blocks until a writer comes: a fetch that copies it never returns.
    run_id, code, err = _run(project, "piper", script, ["out"])
    assert_run_error(code, err, "results incomplete", "piper: 2 not fetched")
    home = project / "logs" / run_id / "piper"
    assert (home / "out" / "good.txt").read_text() == "good\n"
    assert (home / "results" / "note.txt").read_text() == "note\n"
    assert not (home / "out" / "fifo").exists() and not (home / "results" / "fifo").exists()
    inst = _instance(project, run_id)
    missing = {m["path"]: m["reason"] for m in inst["results_missing"]}  # type: ignore
    assert set(missing) == {"out/fifo", "results/fifo"}, missing
    assert all("FIFO" in reason for reason in missing.values())

    proc = e2e.cli(project, "results", run_id)  # fetching again finishes too
    assert_run_error(proc.returncode, proc.stderr, "piper: 2 not fetched")
    assert "not fetched: out/fifo" in proc.stdout and "good.txt" in proc.stdout


def test_an_unreadable_file_costs_only_itself(project: Path) -> None:
    script = """set -e
mkdir -p out
echo good > out/good.txt
echo locked > out/locked.txt
chmod 000 out/locked.txt
echo zz > out/zz.txt
"""
    run_id, code, err = _run(project, "locker", script, ["out"])
    assert_run_error(code, err, "results incomplete",
                     "locker: 1 not fetched (out/locked.txt: unreadable: Permission denied)")
    home = project / "logs" / run_id / "locker"
    assert sorted(p.name for p in (home / "out").iterdir()) == ["good.txt", "zz.txt"]
    inst = _instance(project, run_id)
    assert inst["state"] == "exited" and inst["results_fetched"] is True
    assert inst["results_missing"] == [{"path": "out/locked.txt",
                                        "reason": "unreadable: Permission denied"}]


def test_complete_results_still_exit_zero(project: Path) -> None:
    script = "mkdir -p out && echo ok > out/ok.txt\n"
    run_id, code, err = _run(project, "plain", script, ["out"])
    assert code == 0, err
    assert _instance(project, run_id)["results_missing"] == []
    proc = e2e.cli(project, "results", run_id, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["missing"] == {}


def test_fetching_while_running_does_not_stop_the_final_fetch(project: Path,
                                                              ssh_fleet: SSHFleet) -> None:
    (project / "workloads" / "late.sh").write_text(
        "mkdir -p out && echo early > out/early.txt\n"
        "while [ ! -f go ]; do sleep 0.1; done\n"
        "echo late > out/late.txt\n")
    s = e2e.spec(project, "late", command="sh workloads/late.sh", results=["out"])
    proc = e2e.cli(project, "--config", str(s), "--placement", "late:node1",
                   "--monitor-duration", "0")
    assert proc.returncode == 0, proc.stderr
    run_id = e2e.status_json(project)["run_id"]
    proc = e2e.cli(project, "results", run_id)
    assert proc.returncode == 0, proc.stderr
    home = project / "logs" / run_id / "late" / "out"
    assert (home / "early.txt").exists() and not (home / "late.txt").exists()
    work = Path(f"{ssh_fleet.host('node1').home}/work/{project.parent.name}")
    (work / "go").write_text("")  # let the experiment finish
    proc = e2e.cli(project, "watch", run_id, "--json")
    assert proc.returncode == 0, proc.stderr
    assert (home / "late.txt").read_text() == "late\n"
