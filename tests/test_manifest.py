"""The manifest's parts without a run: git state of real repositories, the JSON form, the
store column, the probe's nvpmodel and throttle facts, and the pure ``compare``."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest

import infra.remote.probe as probe
from infra.errors import StateError
from infra.manifest.compare import Outcome, RunSide, compare, sweep_grids
from infra.manifest.model import (
    FileRecord,
    GitState,
    GpuRecord,
    Manifest,
    NodeRecord,
    Throttle,
    ToolInfo,
)
from infra.probe.facts import NodeFacts
from infra.runner.manifest import (
    PATCH_FILE,
    GitUnavailable,
    build_manifest,
    git_state,
    throttle_of,
)
from infra.state import Store
from tests.builders import cluster, node
from tests.test_probe_parsers import FIXTURES, _board, _run_probe, _script, _write, fixture


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), "-c", "user.email=t@example.invalid",
                           "-c", "user.name=t", *args], check=True, capture_output=True,
                          text=True, timeout=60).stdout


def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    (root / "a.txt").write_text("one\n")
    git(root, "init", "-q", "-b", "dev")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "first")
    return root


# --------------------------------------------------------------------------- git state

def test_clean_tree_has_no_patch_and_a_detached_head_no_branch(tmp_path: Path) -> None:
    root = repo(tmp_path)
    run_dir = tmp_path / "run"
    state = git_state(root / ".", run_dir)
    assert state.branch == "dev" and not state.dirty and state.patch_file is None
    assert not (run_dir / PATCH_FILE).exists()
    git(root, "checkout", "-q", "--detach")
    (root / "new.txt").write_text("x\n")
    state = git_state(root, run_dir)
    assert state.branch is None and state.untracked == ("new.txt",)
    assert not state.dirty  # untracked files are listed, not "dirty" (as git describe)
    assert state.short == state.commit[:10]


def test_staged_and_unstaged_changes_are_in_the_patch(tmp_path: Path) -> None:
    root = repo(tmp_path)
    (root / "a.txt").write_text("two\n")
    (root / "b.txt").write_text("staged\n")
    git(root, "add", "b.txt")
    state = git_state(root, tmp_path / "run")
    text = (tmp_path / "run" / PATCH_FILE).read_text()
    assert state.dirty and state.short.endswith("+dirty")
    assert "+two" in text and "+staged" in text


@pytest.mark.parametrize("case", ["not-a-repo", "no-git", "no-commit"])
def test_git_unavailable_gives_a_reason_never_a_crash(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      case: str) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    if case == "no-git":
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    if case == "no-commit":
        git(plain, "init", "-q")
    with pytest.raises(GitUnavailable) as err:
        git_state(plain, tmp_path / "run")
    assert {"not-a-repo": "not a git repository", "no-git": "git is not installed",
            "no-commit": "no commit yet"}[case] in str(err.value)
    # the manifest records the reason instead of failing
    (plain / "cluster.yaml").write_text("nodes: []\n")
    c = dataclasses.replace(cluster(node("n1"), deploy={"source": str(plain)}),
                            path=plain / "cluster.yaml")
    m = build_manifest(c, "r1", tmp_path / "run", specs=[], facts={}, tags=("t",),
                       argv=["x"])
    assert m.git is None and m.git_error is not None
    assert Manifest.from_json(json.loads(json.dumps(m.to_json()))) == m


# --------------------------------------------------------------------------- JSON, store

def sample(**kw: object) -> Manifest:
    base = Manifest(
        run_id="r1", created_at=1.5, tool=ToolInfo("lab-orchestrator", "1.0"),
        command_line=("cluster-experiment", "--tag", "x"), cwd="/p", tags=("x",),
        git=GitState("a" * 40, "main", True, PATCH_FILE, "f" * 64, ("u.txt",)),
        config=FileRecord("c.yaml", "0" * 64, "nodes: []\n"),
        specs=(FileRecord("s.yaml", "1" * 64, "experiment_id: s\n"),),
        experiments={"s": {"experiment_id": "s", "params": {"lr": 0.1}}},
        nodes={"n1": NodeRecord("h", "Ubuntu", "6.1", "aarch64", "3.10.12", l4t="36.4.0",
                                nvpmodel="MAXN (0)", gpus=(GpuRecord("Orin", "L4T"),),
                                throttled_before=Throttle(pi="0x50000",
                                                          pi_flags=("under_voltage_occurred",
                                                                    "throttling_occurred")))})
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_manifest_round_trips_and_bad_documents_name_the_field() -> None:
    m = sample().with_end({"n1": Throttle(gpus=(("0", "0x0000000000000004"),))}, 9.0)
    assert m.nodes["n1"].throttled_after is not None
    assert m.nodes["n1"].throttled_after.throttling  # HW slowdown is throttling
    assert not m.nodes["n1"].throttled_before.throttling  # type: ignore[union-attr]
    assert Manifest.from_json(json.loads(json.dumps(m.to_json()))) == m
    doc = m.to_json()
    doc["nodes"]["n1"]["hostname"] = 3
    with pytest.raises(StateError, match="hostname"):
        Manifest.from_json(doc)
    with pytest.raises(StateError, match="version"):
        Manifest.from_json({**m.to_json(), "version": 99})


def test_store_keeps_the_manifest_decoded_and_survives_a_bad_one(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    store.create_run("r1", "c.yaml", {}, [])
    assert store.run("r1").manifest is None
    store.set_manifest("r1", sample())
    assert store.run("r1").manifest == sample()
    store.db.execute("UPDATE runs SET manifest_json='{\"version\": 7}' WHERE run_id='r1'")
    run = store.run("r1")
    assert run.manifest is None and "version 7" in (run.manifest_error or "")
    store.close()


# --------------------------------------------------------------------------- probe facts

def test_nvpmodel_parsers() -> None:
    assert probe.parse_nvpmodel_query(fixture("nvpmodel_q_orin.txt")) == "MODE_30W (2)"
    assert probe.parse_nvpmodel_query("nothing here\n") is None
    assert probe.parse_nvpmodel_status(fixture("nvpmodel_status_orin.txt")) == 2
    assert probe.parse_nvpmodel_conf(fixture("nvpmodel_orin.conf")) == {
        0: "MAXN", 1: "MODE_15W", 2: "MODE_30W"}


def _jetson(tmp_path: Path) -> tuple[Path, Path]:
    root, bin_dir = _board(tmp_path, "meminfo_jetson_orin.txt")
    _write(root, "/etc/nv_tegra_release", fixture("nv_tegra_release_r36.txt"))
    return root, bin_dir


def test_probe_reads_the_jetson_power_mode_from_its_status_file(tmp_path: Path) -> None:
    root, bin_dir = _jetson(tmp_path)
    _write(root, "/var/lib/nvpmodel/status", fixture("nvpmodel_status_orin.txt"))
    _write(root, "/etc/nvpmodel.conf", fixture("nvpmodel_orin.conf"))
    doc = _run_probe(root, bin_dir, tmp_path)
    assert doc["errors"] == [] and doc["jetson"]["nvpmodel"] == "MODE_30W (2)"
    facts = NodeFacts.from_json("j", json.loads(json.dumps(doc)))
    assert facts.jetson is not None and facts.jetson.nvpmodel == "MODE_30W (2)"


def test_probe_asks_nvpmodel_when_there_is_no_status_file(tmp_path: Path) -> None:
    root, bin_dir = _jetson(tmp_path)
    _script(bin_dir / "nvpmodel", f"cat '{FIXTURES / 'nvpmodel_q_orin.txt'}'\n")
    doc = _run_probe(root, bin_dir, tmp_path)
    assert doc["errors"] == [] and doc["jetson"]["nvpmodel"] == "MODE_30W (2)"


def test_probe_reads_nvidia_throttle_reasons(tmp_path: Path) -> None:
    root, bin_dir = _board(tmp_path, "meminfo_pi5.txt")
    _script(bin_dir / "nvidia-smi", f"cat '{FIXTURES / 'nvidia_smi_throttle.csv'}'\n")
    doc = _run_probe(root, bin_dir, tmp_path)
    assert doc["errors"] == []
    assert [g["throttle_reasons"] for g in doc["gpus"]] == ["0x0000000000000004",
                                                            "0x0000000000000001"]
    facts = NodeFacts.from_json("g", json.loads(json.dumps(doc)))
    state = throttle_of(facts)
    assert state is not None and state.gpus == (("0", "0x0000000000000004"),
                                                ("1", "0x0000000000000001"))
    assert state.throttling and "gpu0 0x0000000000000004" in state.describe()


def test_probe_drops_the_throttle_field_when_the_driver_does_not_answer_it(
        tmp_path: Path) -> None:
    root, bin_dir = _board(tmp_path, "meminfo_pi5.txt")
    # a driver that ignores the extra field: ten values per line, as before
    _script(bin_dir / "nvidia-smi", f"cat '{FIXTURES / 'nvidia_smi_two_gpus.csv'}'\n")
    doc = _run_probe(root, bin_dir, tmp_path)
    assert doc["errors"] == [] and len(doc["gpus"]) == 2
    assert all(g["throttle_reasons"] is None for g in doc["gpus"])


def test_pi_throttle_state_from_the_probe_document() -> None:
    facts = NodeFacts.from_json("pi", json.loads(fixture("doc_pi5.json")))
    state = throttle_of(facts)
    assert state is not None and state.pi is not None
    assert state.pi == hex(facts.pi.throttled)  # type: ignore[union-attr, arg-type]


# --------------------------------------------------------------------------- compare

def keys(result: object, section: str) -> dict[tuple[str, str], tuple[object, object]]:
    sec = result.section(section)  # type: ignore[attr-defined]
    return {(d.subject, d.key): (d.a, d.b) for d in sec.differences}


def test_compare_names_changed_spec_keys_and_sweep_grids() -> None:
    a = sample(experiments={
        "t.0": {"template_id": "t", "task_index": 0, "params": {"lr": 0.1, "bs": 8}},
        "t.1": {"template_id": "t", "task_index": 1, "params": {"lr": 0.2, "bs": 8}}})
    b = sample(experiments={
        "t.0": {"template_id": "t", "task_index": 0, "params": {"lr": 0.1, "bs": 16}},
        "t.1": {"template_id": "t", "task_index": 1, "params": {"lr": 0.3, "bs": 16}}},
        specs=(FileRecord("other/s.yaml", "2" * 64, "experiment_id: s\nram_gb: 2\n"),))
    result = compare(RunSide("A", a), RunSide("B", b))
    got = keys(result, "specs")
    assert got[("t.1", "params.lr")] == (0.2, 0.3)
    assert got[("t.0", "params.bs")] == (8, 16)
    assert ("t.0", "params.lr") not in got
    assert got[("sweep t", "lr")] == ("[0.1, 0.2]", "[0.1, 0.3]")
    assert got[("s.yaml | other/s.yaml", "ram_gb")] == (None, 2)  # matched by file name
    assert sweep_grids(a.experiments) == {"t": {"lr": "[0.1, 0.2]", "bs": "[8]"}}
    for section in ("code", "config", "nodes", "outcomes", "metrics"):
        assert not result.section(section).differences, section


def test_compare_code_config_and_nodes() -> None:
    a = sample()
    b = sample(git=GitState("b" * 40, "main", False),
               config=FileRecord("c.yaml", "9" * 64, "nodes: []\nlogging: {log_dir: x}\n"),
               nodes={"n1": dataclasses.replace(a.nodes["n1"], nvpmodel="MODE_15W (1)"),
                      "n2": NodeRecord("h2", "Debian", "6.6", "x86_64", "3.11")})
    result = compare(RunSide("A", a), RunSide("B", b))
    code = keys(result, "code")
    assert code[("", "commit")] == ("a" * 40, "b" * 40)
    assert code[("", "dirty")] == (True, False)
    assert code[("", "patch_sha256")] == ("f" * 64, None)
    assert keys(result, "config") == {("c.yaml", "logging.log_dir"): (None, "x")}
    nodes = keys(result, "nodes")
    assert nodes[("n1", "nvpmodel")] == ("MAXN (0)", "MODE_15W (1)")
    assert nodes[("n2", "(node)")] == (None, "used")
    assert result.to_json()["sections"]["code"]["differences"][0]["key"] == "commit"


def test_compare_text_that_is_not_a_mapping_by_line() -> None:
    a = sample(config=FileRecord("c.yaml", "0" * 64, "- one\n- two\n"))
    b = sample(config=FileRecord("c.yaml", "1" * 64, "- one\n- three\n"))
    assert keys(compare(RunSide("A", a), RunSide("B", b)), "config") == {
        ("c.yaml", "line 2"): ("- two", "- three")}


def test_compare_outcomes_and_metrics() -> None:
    oa = {"i": Outcome("exited", 0, 100.0, "n1"), "j": Outcome("exited", 0, 10.0, "n1"),
          "k": Outcome("exited", 0, 10.0, "n1")}
    ob = {"i": Outcome("failed", 1, 102.0, "n2"), "j": Outcome("exited", 0, 20.0, "n1"),
          "l": Outcome("lost")}
    ma = {"i": {"loss": 0.5, "acc": 0.9, "same": 0.1 + 0.2}}
    mb = {"i": {"loss": 0.25, "acc": 0.9, "same": 0.3, "new": "x"}}
    result = compare(RunSide("A", None, oa, ma), RunSide("B", None, ob, mb))
    out = keys(result, "outcomes")
    assert out[("i", "state")] == ("exited", "failed")
    assert out[("i", "exit_code")] == (0, 1) and out[("i", "node")] == ("n1", "n2")
    assert ("i", "runtime_s") not in out  # within 5%
    assert out[("j", "runtime_s")] == (10.0, 20.0)
    assert out[("k", "state")] == ("exited", None) and out[("l", "state")] == (None, "lost")
    assert keys(result, "metrics") == {("i", "loss"): (0.5, 0.25), ("i", "new"): (None, "x")}
    assert result.section("specs").note == "no manifest recorded for A, B"
    same = compare(RunSide("A", sample(), oa, ma), RunSide("B", sample(), oa, ma))
    assert same.same


def test_git_missing_on_one_side_is_a_note() -> None:
    result = compare(RunSide("A", sample(git=None)), RunSide("B", sample()))
    code = result.section("code")
    assert code.note == "no git state recorded for A"
    assert dict((d.key, d.b) for d in code.differences)["commit"] == "a" * 40

