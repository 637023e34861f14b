"""Batched harvest, node side: one ``supervisor.py harvest`` call for many instances, driven
for real through the client over SSH (the node's own non-root user, so an unreadable file is
really unreadable). The experiment plants the traps itself: a link out of the work dir, a
FIFO, an unreadable file; an instance the node never had is asked for too."""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from infra.errors import CommandFailedError
from infra.remote import harvest as node_harvest
from infra.runner.supervisor_client import StartRequest, SupervisorClient
from infra.transport.ssh import SSHTransport
from tests.sshfleet import SSHFleet
from tests.test_supervisor_ssh import arun, wait_final

pytestmark = pytest.mark.integration

BOUND = 60.0  # only so a broken supervisor cannot hang the suite
SEQ = b"".join(f"{i}\n".encode() for i in range(1, 1001))  # `seq 1 1000`: 3893 bytes


TRAPS = """set -e
seq 1 1000
R="$INFRA_RESULTS_DIR"
mkdir -p "$R/sub" "$HOME/outside-$$" out
printf '{"loss": 0.5}' > "$R/metrics.json"
head -c 5000 /dev/zero > "$R/big.bin"
echo deep > "$R/sub/deep.txt"
echo secret > "$HOME/outside-$$/secret.txt"
ln -s "$HOME/outside-$$/secret.txt" "$R/leak.txt"
mkfifo "$R/fifo"
echo locked > "$R/locked.txt"
chmod 000 "$R/locked.txt"
echo declared > out/d.txt
"""


def files_of(listing: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {f["path"]: f for f in listing["files"]}


def skipped_of(listing: Mapping[str, Any]) -> dict[str, str]:
    return {s["path"]: s["reason"] for s in listing["skipped"]}


def log_of(item: Mapping[str, Any]) -> bytes:
    return base64.b64decode(item["log"]["data_b64"])


def test_one_call_brings_log_chunks_and_safe_results(ssh_fleet: SSHFleet) -> None:
    host = ssh_fleet.hosts[0]
    node = ssh_fleet.node_config(host)
    run_id = f"hv-{uuid.uuid4().hex[:8]}"
    work = node.remote_work_dir

    async def scenario() -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
        transport = SSHTransport(node, ssh_fleet.health_section())
        client = SupervisorClient(transport, node)
        try:
            await transport.run(f"mkdir -p {work}", check=True)
            for iid, command in (("a", TRAPS), ("b", "seq 1 1000")):
                await client.start(StartRequest(run_id=run_id, instance_id=iid,
                                                command=command, cwd=work))
                await wait_final(client, run_id, iid, BOUND)
            common = {"run_id": run_id, "anchor": work, "log_max": 1000, "log_total": 1500,
                      "inline_max": 1000, "inline_total": 100_000}
            first = await client.harvest({**common, "items": [
                {"instance": "a", "offset": 0, "results": True, "cwd": work,
                 "patterns": ["out/*.txt", "none/*"]},
                {"instance": "b", "offset": 0, "results": False},
                {"instance": "ghost", "offset": 0, "results": True}]})
            second = await client.harvest({**common, "log_max": 10_000, "log_total": 10_000,
                                           "items": [
                {"instance": "a", "offset": 1000, "results": False},
                {"instance": "b", "offset": 500, "results": False}]})
            return first, second
        finally:
            await transport.close()

    first, second = arun(scenario())
    a, b, ghost = first
    # log chunks: per-item cap for a, what the total cap left for b; ended before reading
    assert log_of(a) == SEQ[:1000] and a["log"]["offset"] == 1000
    assert a["log"]["eof"] is False and a["log"]["ended"] is True
    assert a["state"]["state"] == "exited" and a["state"]["exit_code"] == 0
    assert log_of(b) == SEQ[:500] and b["log"]["eof"] is False
    assert b["results_dir"] is None and b["declared"] is None  # results not asked for
    # the rest of each log, to the end, in a second call
    a2, b2 = second
    assert log_of(a2) == SEQ[1000:] and a2["log"]["eof"] is True
    assert log_of(b2) == SEQ[500:] and b2["log"]["eof"] is True
    # results: small files inline, the big one listed for the ordinary copy, traps skipped
    res = files_of(a["results_dir"])
    assert set(res) == {"metrics.json", "big.bin", "sub/deep.txt"}, res
    assert base64.b64decode(res["metrics.json"]["inline_b64"]) == b'{"loss": 0.5}'
    assert base64.b64decode(res["sub/deep.txt"]["inline_b64"]) == b"deep\n"
    assert "inline_b64" not in res["big.bin"] and res["big.bin"]["size"] == 5000
    skipped = skipped_of(a["results_dir"])
    assert set(skipped) == {"leak.txt", "fifo", "locked.txt"}, skipped
    assert "outside" in skipped["leak.txt"]
    assert "FIFO" in skipped["fifo"] and "never opened" in skipped["fifo"]
    assert "unreadable" in skipped["locked.txt"]
    declared = a["declared"]
    assert base64.b64decode(files_of(declared)["out/d.txt"]["inline_b64"]) == b"declared\n"
    assert declared["missing_patterns"] == ["none/*"]
    # the instance the node never had: one line, the others answered all the same
    assert ghost == {"instance": "ghost", "error": f"no instance {run_id}/ghost on this node"}


def test_bad_request_is_one_clear_line(ssh_fleet: SSHFleet) -> None:
    host = ssh_fleet.hosts[0]
    node = ssh_fleet.node_config(host)

    async def scenario() -> str:
        transport = SSHTransport(node, ssh_fleet.health_section())
        client = SupervisorClient(transport, node)
        try:
            await client.harvest({"run_id": "r-x", "anchor": node.remote_work_dir,
                                  "items": [{"instance": "a", "offset": -3}]})
        except CommandFailedError as exc:
            return str(exc)
        finally:
            await transport.close()
        return ""

    text = arun(scenario())
    assert "items[0].offset must be a non-negative integer" in text, text
    assert "Traceback" not in text


def test_a_file_swapped_after_the_listing_is_not_sent_inline(tmp_path: Path) -> None:
    base = tmp_path / "results"
    base.mkdir()
    (base / "kept.json").write_text("{}")
    (base / "swapped.json").write_text("old!")
    (base / "grown.json").write_text("abc")
    (base / "sub").mkdir()
    (base / "sub" / "x.json").write_text("ab")
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "x.json").write_text("!!")  # same name, same size, outside the base
    doc, ids = node_harvest.list_under(str(tmp_path), str(base), 100, ["*"])
    os.rename(base / "sub", base / "sub.old")
    os.symlink(outside, base / "sub")  # a directory on the path turned into a link out
    other = tmp_path / "other"
    other.write_text("new!")  # same size, another file (inode) moved into its place
    os.replace(other, base / "swapped.json")
    with open(base / "grown.json", "a") as fh:
        fh.write("def")
    budget = node_harvest.Budget({})
    node_harvest.inline_files(doc, ids, budget)
    entries = files_of(doc)
    assert base64.b64decode(entries["kept.json"]["inline_b64"]) == b"{}"
    assert "inline_b64" not in entries["swapped.json"]
    assert "inline_b64" not in entries["grown.json"]
    assert "inline_b64" not in entries["sub/x.json"]


def test_inline_total_budget_leaves_the_rest_to_the_copy(tmp_path: Path) -> None:
    base = tmp_path / "results"
    base.mkdir()
    for name in ("a", "b", "c"):
        (base / name).write_bytes(b"x" * 400)
    doc, ids = node_harvest.list_under(str(tmp_path), str(base), 100, ["*"])
    node_harvest.inline_files(doc, ids, node_harvest.Budget({"inline_total": 1000}))
    inlined = [f["path"] for f in doc["files"] if "inline_b64" in f]
    assert inlined == ["a", "b"]


def test_harvest_script_is_python38_syntax() -> None:
    import ast
    ast.parse(Path(node_harvest.__file__).read_text(), feature_version=(3, 8))


def test_an_inline_file_never_lands_outside_the_local_results_dir(tmp_path: Path) -> None:
    from infra.runner.harvest import write_inline
    from infra.state import ResultIssue
    root = tmp_path / "home" / "results"
    got = write_inline(root, "../../escape.txt", b"no")
    assert isinstance(got, ResultIssue) and "outside the local results directory" in got.reason
    assert not (tmp_path / "escape.txt").exists()
    done = write_inline(root, "sub/m.json", b"{}")
    assert done == (root / "sub" / "m.json").resolve() and done.read_bytes() == b"{}"
    assert sorted(p.name for p in (root / "sub").iterdir()) == ["m.json"]  # no .part left
