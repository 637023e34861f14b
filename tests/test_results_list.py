"""The node-side results lister on a real directory tree (run the way nodes run it: source on
stdin, under the oldest Python at hand), and the coordinator's pure results helpers.

Unreadable files need a non-root user, so they are covered on the sshd fleet
(tests/test_results_e2e.py); everything else about what is listed is covered here.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from infra.cli import views
from infra.remote import results_list
from infra.runner.results import (
    EVENT_LIMIT,
    ResultFile,
    ResultListing,
    ResultsFetch,
    copy_timeout,
    lister_source,
    summarise,
)
from infra.state import ResultIssue, Store
from infra.transport import marker

PY38 = Path(os.path.expanduser("~/.pyenv/versions/3.8.18/bin/python3"))


def _python() -> str:
    """The oldest interpreter here (nodes may run 3.8), else this one."""
    for candidate in (str(PY38), "python3.8"):
        found = shutil.which(candidate)
        if found:
            return found
    return sys.executable


def run_lister(anchor: Path, base: Path, *patterns: str, limit: int = 100) -> dict[str, Any]:
    """Run the lister as the coordinator does; a hang fails the test instead of blocking it."""
    proc = subprocess.run([_python(), "-", str(anchor), str(base), str(limit), *patterns],
                          input=lister_source(), capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = marker.extract_json(proc.stdout)
    return doc


def reasons(doc: dict[str, Any]) -> dict[str, str]:
    return {s["path"]: s["reason"] for s in doc["skipped"]}


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """work/ with good files and every trap; outside/ next to it holds what must not leak."""
    work, outside = tmp_path / "work", tmp_path / "outside"
    (work / "out" / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.txt").write_text("secret\n")
    (work / "out" / "good.txt").write_text("good\n")
    (work / "out" / "sub" / "deep.txt").write_text("deep\n")
    (work / "out" / "leak.txt").symlink_to(outside / "secret.txt")
    (work / "out" / "sub" / "leakdir").symlink_to(outside)
    (work / "out" / "alias.txt").symlink_to("good.txt")  # stays inside: copied
    (work / "out" / "latest").symlink_to("sub")          # inside the same tree: passed over
    (work / "out" / "dangling").symlink_to(work / "gone")
    os.mkfifo(work / "out" / "pipe")
    (work / "linked").symlink_to(outside)
    (work / "top.csv").write_text("1,2\n")
    return work


def test_lister_lists_only_regular_files_inside_the_base(tree: Path) -> None:
    doc = run_lister(tree, tree, "out", "linked", "linked/*", "*.csv", "nothing/*.json")
    files = {f["path"]: f for f in doc["files"]}
    assert set(files) == {"out/good.txt", "out/sub/deep.txt", "out/alias.txt", "top.csv"}
    assert files["out/alias.txt"]["source"] == str(tree / "out" / "good.txt")
    assert files["top.csv"]["size"] == 4
    why = reasons(doc)
    assert "outside" in why["out/leak.txt"] and "secret.txt" in why["out/leak.txt"]
    assert "outside" in why["out/sub/leakdir"]
    assert "directory links to" in why["linked"]
    assert "outside" in why["linked/secret.txt"]
    assert "FIFO" in why["out/pipe"]
    assert "out/dangling" in why
    assert "out/latest" not in why
    assert doc["missing_patterns"] == ["nothing/*.json"]
    assert doc["truncated"] is False
    assert all(not str(f["source"]).startswith(str(tree.parent / "outside"))
               for f in doc["files"])


def test_lister_refuses_a_base_linked_out_of_the_work_dir(tree: Path) -> None:
    doc = run_lister(tree, tree / "linked", "*")
    assert doc["files"] == []
    assert "outside the work dir" in reasons(doc)["."]
    assert doc["missing_patterns"] == []


def test_lister_stops_at_the_limit_and_says_so(tree: Path) -> None:
    many = tree / "many"
    many.mkdir()
    for i in range(7):
        (many / f"f{i}.txt").write_text(str(i))
    doc = run_lister(tree, tree, "many", limit=5)
    assert len(doc["files"]) == 5 and doc["truncated"] is True


def test_lister_markers_match_the_coordinator() -> None:
    assert (results_list.BEGIN, results_list.END) == (marker.BEGIN, marker.END)


def test_listing_issues_name_every_left_out_entry_under_its_home_path() -> None:
    listing = ResultListing.from_json({
        "base": "/w/r", "files": [{"path": "a", "source": "/w/r/a", "size": 3}],
        "skipped": [{"path": "p", "reason": "a named pipe (FIFO)"}], "skipped_more": 2,
        "missing_patterns": ["*"], "truncated": True})
    assert listing.files == (ResultFile("a", "/w/r/a", 3),)
    issues = listing.issues("results", declared=False)
    assert issues[0] == ResultIssue("results/p", "a named pipe (FIFO)")
    assert [i.path for i in issues] == ["results/p", "results", "results"]
    assert "2 more" in issues[1].reason and "not fetched" in issues[2].reason
    declared = listing.issues("", declared=True)
    assert declared[0] == ResultIssue("*", "matched nothing")


@pytest.mark.parametrize("doc", [None, {}, {"base": "/", "files": [{"path": "a"}],
                                            "skipped": [], "missing_patterns": []},
                                 {"base": "/", "files": [], "skipped": "x",
                                  "missing_patterns": []}])
def test_a_malformed_listing_is_a_value_error(doc: Any) -> None:
    with pytest.raises(ValueError, match="malformed results listing"):
        ResultListing.from_json(doc)


def test_issue_events_are_bounded() -> None:
    few = [ResultIssue(f"f{i}", "unreadable: Permission denied") for i in range(3)]
    assert summarise(few) == [f"not fetched: f{i}: unreadable: Permission denied"
                              for i in range(3)]
    many = [ResultIssue(f"f{i}", "x") for i in range(EVENT_LIMIT + 25)]
    lines = summarise(many)
    assert len(lines) == EVENT_LIMIT + 1
    assert "25 more" in lines[-1]


def test_copy_timeout_grows_with_size() -> None:
    assert copy_timeout(0) == copy_timeout(0, floor=1.0) > 0
    assert copy_timeout(1 << 30) > copy_timeout(1 << 20) > copy_timeout(0)
    assert copy_timeout(0, floor=90.0) == 90.0


def test_fetch_problem_is_one_line_with_the_first_reason(tmp_path: Path) -> None:
    done = ResultsFetch(tmp_path, (tmp_path / "a",), ())
    assert views.fetch_problem("exp", done) is None
    short = ResultsFetch(tmp_path, (), (ResultIssue("out/*.csv", "matched nothing"),
                                        ResultIssue("p", "FIFO")))
    assert views.fetch_problem("exp", short) == \
        "exp: 2 not fetched (out/*.csv: matched nothing, ...)"


def test_results_missing_survives_the_store_and_an_old_store_gains_the_column(
        tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    store = Store(db)
    store.db.execute("ALTER TABLE instances DROP COLUMN results_missing")  # as before
    store.close()
    store = Store(db)  # reopening adds it back
    cols = {r[1] for r in sqlite3.connect(db).execute("PRAGMA table_info(instances)")}
    assert "results_missing" in cols
    store.close()
