"""No injection: every shell-facing config value is refused in one line or reaches the node inert.

Three layers, each against real parts:

* the real CLI refuses each unsafe ``host``/``ssh_user``/path/pattern with one line naming
  file and key, exit 2, before any node is contacted (nor a local path written);
* a hypothesis property over hostile strings for every such field: refused with one line
  naming the key, or accepted and then inert (no shell metacharacter survives; host and user
  reach a real rsync as the ssh destination, never a local path or an ssh option);
* a bounded hypothesis property that deploys hostile work dirs with the real rsync to a real
  sshd node of the fleet: no payload runs and the tree lands exactly in the intended
  directory, which is the directory experiments then run in.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infra.config.model import NodeConfig
from infra.config.topology import parse_cluster
from infra.errors import ConfigError, DeployError
from infra.probe.run import probe_node
from infra.runner.deploy import (
    PROTECT_ARGS,
    build_rsync_command,
    deploy_node,
    parse_rsync_help,
    rsync_failure_reason,
)
from infra.runner.supervisor_client import InstanceStatus, StartRequest, SupervisorClient
from infra.transport.ssh import SSHTransport
from tests.builders import assert_one_line_error, run_cli
from tests.sshfleet import FleetHost, SSHFleet

SHELL_SPECIALS = set("`$;&|<>(){}[]*?!#^'\"\\")
"""What the test's own oracle says must never survive validation in a path, host or user."""


def _remote_node(**kw: Any) -> dict[str, Any]:
    node: dict[str, Any] = {"name": "n1", "host": "node1.lab.invalid", "ram_gb": 8.0,
                            "remote_work_dir": "~/lab"}
    node.update(kw)
    return node


def _write(tmp: Path, doc: dict[str, Any]) -> Path:
    path = tmp / "cluster.json"
    path.write_text(json.dumps(doc))
    return path


# --------------------------------------------------------------------------- CLI refusals

REFUSED = [
    ({"host": "evil/x"}, "nodes[0].host", "'/'"),
    ({"host": "-oProxyCommand=touch /tmp/x"}, "nodes[0].host", "must not start with '-'"),
    ({"host": "h`id`"}, "nodes[0].host", "'`'"),
    ({"host": "h$(id)"}, "nodes[0].host", "'$'"),
    ({"host": "h;id"}, "nodes[0].host", "';'"),
    ({"host": "[::1]"}, "nodes[0].host", "without brackets"),
    ({"host": "fe80::1%`id`"}, "nodes[0].host", "invalid IPv6 zone"),
    ({"host": "lab\u2028x"}, "nodes[0].host", "'\\u2028'"),
    ({"ssh_user": "lab/x"}, "nodes[0].ssh_user", "not a valid user name"),
    ({"ssh_user": "u`id`"}, "nodes[0].ssh_user", "not a valid user name"),
    ({"ssh_user": "u$(id)"}, "nodes[0].ssh_user", "not a valid user name"),
    ({"ssh_user": "root@evil"}, "nodes[0].ssh_user", "not a valid user name"),
    ({"remote_work_dir": "~/w`touch x`"}, "nodes[0].remote_work_dir", "'`'"),
    ({"remote_work_dir": "~/w$(touch x)"}, "nodes[0].remote_work_dir", "'$'"),
    ({"remote_work_dir": "~/w\ntouch x"}, "nodes[0].remote_work_dir", "'\\n'"),
    ({"remote_work_dir": "~/w;touch x"}, "nodes[0].remote_work_dir", "';'"),
    ({"remote_work_dir": "~/w\0x"}, "nodes[0].remote_work_dir", "NUL character"),
    ({"remote_work_dir": "/srv/it's"}, "nodes[0].remote_work_dir", '"\'"'),
    ({"remote_work_dir": "~/a/../b"}, "nodes[0].remote_work_dir", "'..'"),
    ({"remote_work_dir": "~/a/*"}, "nodes[0].remote_work_dir", "'*'"),
    ({"python_path": "python3; touch x"}, "nodes[0].python_path", "not a command name"),
    ({"python_path": "-c"}, "nodes[0].python_path", "not a command name"),
    ({"python_path": "~/venv/bin/py`id`"}, "nodes[0].python_path", "'`'"),
    ({"python_path": "bin/python3"}, "nodes[0].python_path", "absolute path"),
    ({"claims_dir": "/srv/claims$(id)"}, "nodes[0].claims_dir", "'$'"),
    ({"ssh_key_path": "/keys/`id`"}, "nodes[0].ssh_key_path", "'`'"),
    ({"ssh_key_path": "/keys/id\nx"}, "nodes[0].ssh_key_path", "'\\n'"),
]


@pytest.mark.parametrize(("patch", "key", "reason"), REFUSED)
def test_unsafe_node_values_are_one_line_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], patch: dict[str, Any], key: str,
        reason: str) -> None:
    path = _write(tmp_path, {"nodes": [_remote_node(**patch)]})
    code, _, err = run_cli(capsys, "--cluster-config", str(path), "--validate-config")
    assert_one_line_error(code, err, f"{path}: {key}: ", reason)


@pytest.mark.parametrize(("doc", "key", "reason"), [
    ({"health_check": {"known_hosts": "/etc/kh`id`"}}, "health_check.known_hosts", "'`'"),
    ({"deploy": {"exclude": ["data/\n- *"]}}, "deploy.exclude[0]", "on one line"),
    ({"deploy": {"protect": ["out/\tx"]}}, "deploy.protect[0]", "on one line"),
])
def test_unsafe_section_values_are_one_line_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], doc: dict[str, Any], key: str,
        reason: str) -> None:
    path = _write(tmp_path, {"nodes": [_remote_node()], **doc})
    code, _, err = run_cli(capsys, "--cluster-config", str(path), "--validate-config")
    assert_one_line_error(code, err, f"{path}: {key}: ", reason)


@pytest.mark.parametrize("patch", [
    {"host": "evil/x"},
    {"ssh_user": "lab/x", "host": "evil"},
])
def test_deploy_all_refuses_a_slash_in_host_or_user_and_writes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        patch: dict[str, Any]) -> None:
    """A ``/`` made rsync read ``user/x@host:dir`` as a local path: the tree landed here."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "main.py").write_text("print('hi')\n")
    path = _write(proj, {"nodes": [_remote_node(**patch)]})
    monkeypatch.chdir(proj)
    before = sorted(p.name for p in proj.iterdir())
    code, _, err = run_cli(capsys, "--cluster-config", str(path), "--deploy-all")
    assert_one_line_error(code, err, str(path), "not a valid user name" if "ssh_user" in patch
                          else "'/'")
    assert sorted(p.name for p in proj.iterdir()) == before


@pytest.mark.parametrize("patch", [
    {"host": "node-1.lab.example"}, {"host": "node1.lab."}, {"host": "10.0.0.5"},
    {"host": "fe80::1"}, {"host": "fe80::1%eth0"}, {"host": "my_alias"},
    {"ssh_user": "lab.user_2-x"},
    {"remote_work_dir": "~/my lab/run+1,x=y@z%:~ é"},
    {"python_path": "python3.11"}, {"python_path": "/opt/py 3/bin/python3"},
    {"python_path": "~/venv/bin/python"},
    {"claims_dir": "/var/lib/lab claims"},
])
def test_safe_values_are_accepted(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  patch: dict[str, Any]) -> None:
    path = _write(tmp_path, {"nodes": [_remote_node(**patch)]})
    code, _, err = run_cli(capsys, "--cluster-config", str(path), "--validate-config")
    assert code == 0, err


def test_work_dir_is_normalised_once_so_deploy_and_runs_agree() -> None:
    c = parse_cluster({"nodes": [_remote_node(remote_work_dir="~/a//b/ c /")]}, Path("t.yaml"))
    assert c.nodes[0].remote_work_dir == "~/a/b/ c "
    argv = build_rsync_command(c.nodes[0], c.health_check, Path("/src"), excludes=[])
    assert argv[-1] == "node1.lab.invalid:a/b/ c /"  # the trailing space is kept, not stripped


# --------------------------------------------------------------------------- rsync arguments


def test_protect_args_is_always_passed_and_detected_from_help() -> None:
    node = NodeConfig(name="n", host="127.0.0.21", remote_work_dir="~/plain")
    argv = build_rsync_command(node, parse_cluster({"nodes": [_remote_node()]},
                                                   Path("t.yaml")).health_check,
                               Path("/src"), excludes=[])
    assert PROTECT_ARGS in argv
    new = parse_rsync_help("rsync  version 3.5.0  protocol version 32\n"
                           "--secluded-args, -s      use the protocol to safely send the args\n")
    assert new.version == (3, 5, 0) and new.protect_flag == "--secluded-args"
    old = parse_rsync_help("rsync  version 3.1.3  protocol version 31\n"
                           " -s, --protect-args          no space-splitting\n")
    assert old.protect_flag == "--protect-args"
    assert parse_rsync_help("rsync version 2.6.9\n").protect_flag is None


def test_without_protect_args_unsafe_paths_are_refused() -> None:
    health = parse_cluster({"nodes": [_remote_node()]}, Path("t.yaml")).health_check
    plain = NodeConfig(name="n", host="127.0.0.21", remote_work_dir="~/plain-dir_1")
    argv = build_rsync_command(plain, health, Path("/src"), excludes=[], protect_flag=None)
    assert argv[-1] == "127.0.0.21:plain-dir_1/"
    for path in ("~/a b", "~/w`id`", "~/w\nx"):
        with pytest.raises(DeployError, match="--protect-args"):
            build_rsync_command(dataclasses.replace(plain, remote_work_dir=path), health,
                                Path("/src"), excludes=[], protect_flag=None)


def test_builder_refuses_unsafe_destinations_even_without_the_config() -> None:
    health = parse_cluster({"nodes": [_remote_node()]}, Path("t.yaml")).health_check
    base = NodeConfig(name="n", host="127.0.0.21", remote_work_dir="~/w")
    for patch in ({"host": "evil/x"}, {"host": "-oProxyCommand=x"}, {"ssh_user": "a/b"},
                  {"ssh_user": "-l"}, {"remote_work_dir": "~/w\0x"}):
        with pytest.raises(DeployError):
            build_rsync_command(dataclasses.replace(base, **patch), health, Path("/src"),
                                excludes=[])
    with pytest.raises(DeployError, match="exclude"):
        build_rsync_command(base, health, Path("/src"), excludes=["a\nb"])


def test_a_missing_command_is_not_reported_as_missing_rsync() -> None:
    stderr = ("sh: 2: x/: not found\nrsync: connection unexpectedly closed (0 bytes)\n"
              "rsync error: remote command not found (code 127) at io.c(232) [sender=3.5.0]\n")
    assert rsync_failure_reason(stderr, 127) == "command not found on node: sh: 2: x/: not found"


# --------------------------------------------------------------------------- property: config

FRAGMENTS = ["`touch PWN`", "$(touch PWN)", ";touch PWN", "\ntouch PWN\n", "|touch PWN",
             "&&touch PWN", "'", '"', " ", "-", "-oProxyCommand=touch PWN", "/", "..", "~",
             "\\", "*", "?", "[a]", "{a,b}", "é", "日本", "\u2028", "\x00", "\t", "\r", "%h",
             "@", ":", "!", "#", "<x>", "\ud800"]


def hostile() -> st.SearchStrategy[str]:
    """Strings made of shell, rsync and ssh payloads, quotes, separators and odd unicode."""
    piece = st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=3))
    return st.lists(piece, min_size=1, max_size=6).map("".join)


FIELDS: dict[str, tuple[str, str]] = {
    # field -> (where it goes, the key the error must name)
    "host": ("node", "nodes[0].host"),
    "ssh_user": ("node", "nodes[0].ssh_user"),
    "name": ("node", "nodes[0].name"),
    "remote_work_dir": ("node", "nodes[0].remote_work_dir"),
    "python_path": ("node", "nodes[0].python_path"),
    "claims_dir": ("node", "nodes[0].claims_dir"),
    "ssh_key_path": ("node", "nodes[0].ssh_key_path"),
    "known_hosts": ("health_check", "health_check.known_hosts"),
}


def _prefixed(field: str, raw: str, form: int) -> str:
    """Hostile text bare, or behind a valid start, so both refusal paths get exercised."""
    if field in ("host", "ssh_user", "name") or form == 0:
        return raw
    return ("~/" if form == 1 else "/srv/") + raw


def _inert_path(value: str) -> bool:
    return (not any(c in SHELL_SPECIALS or not c.isprintable() for c in value if c != " ")
            and ".." not in value.split("/"))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(sorted(FIELDS)), raw=hostile(), form=st.integers(0, 2))
def test_hostile_values_are_refused_in_one_line_or_inert(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str, raw: str,
        form: int) -> None:
    value = _prefixed(field, raw, form)
    where, key = FIELDS[field]
    doc: dict[str, Any] = {"nodes": [_remote_node(**({field: value} if where == "node"
                                                     else {}))]}
    if where == "health_check":
        doc["health_check"] = {field: value}
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(doc))
    code, _, err = run_cli(capsys, "--cluster-config", str(path), "--validate-config")
    if code != 0:
        assert_one_line_error(code, err, f"{path}: {key}: ")
        return
    # Accepted: then nothing in it can be read by a shell, rsync or ssh.
    assert "\0" not in value and "\n" not in value
    if field in ("host", "ssh_user", "name"):
        assert not value.startswith("-") and "/" not in value
        assert not any(c in SHELL_SPECIALS or c.isspace() for c in value)
    elif field != "python_path" or "/" in value:
        assert value.startswith(("/", "~/")) and _inert_path(value)
    else:
        assert value.replace(".", "").replace("_", "").replace("+", "").replace(
            "-", "").isalnum() and not value.startswith("-")


@pytest.fixture
def fake_ssh(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """A PATH whose ``ssh`` records its argv and fails: rsync's view of the destination."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "ssh-argv.json"
    script = bindir / "ssh"
    script.write_text("#!/usr/bin/env python3\nimport json, sys\n"
                      f"open({str(record)!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
                      "sys.exit(255)\n")
    script.chmod(0o755)
    yield record, {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "LC_ALL": "C"}


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["host", "ssh_user"]), raw=hostile())
def test_accepted_hosts_and_users_reach_rsync_as_the_ssh_destination(
        tmp_path: Path, fake_ssh: tuple[Path, dict[str, str]], field: str, raw: str) -> None:
    """Run the real rsync: an accepted host/user is what ssh gets as destination, and an
    unsafe one is refused by the builder itself, config or not (never a local copy)."""
    record, env = fake_ssh
    record.unlink(missing_ok=True)
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "main.py").write_text("x\n")
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    node = NodeConfig(name="n", host="node1.lab.invalid", ssh_user="lab",
                      remote_work_dir="~/lab")
    node = dataclasses.replace(node, **{field: raw})
    try:
        parse_cluster({"nodes": [_remote_node(**{field: raw})]}, Path("t.yaml"))
        accepted = True
    except ConfigError:
        accepted = False
    health = parse_cluster({"nodes": [_remote_node()]}, Path("t.yaml")).health_check
    try:
        argv = build_rsync_command(node, health, src, excludes=[])
    except DeployError:
        assert not accepted, f"config accepts {raw!r} but the builder refuses it"
        return
    subprocess.run(argv, cwd=work, env=env, capture_output=True, check=False, timeout=60)
    assert list(work.iterdir()) == [], "rsync wrote the tree to a local path"
    ssh_argv = json.loads(record.read_text())
    assert node.host in ssh_argv and not node.host.startswith("-")
    if node.ssh_user:
        assert ssh_argv[ssh_argv.index("-l") + 1] == node.ssh_user


# --------------------------------------------------------------------------- property: fleet


@pytest.fixture(scope="module")
def marker_dir() -> Iterator[Path]:
    """A directory every fleet user may write into: a payload that ran leaves a file here."""
    path = Path(tempfile.mkdtemp(prefix="inj-", dir="/tmp"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _tree(home: Path) -> set[Path]:
    out: set[Path] = set()
    for dirpath, dirnames, filenames in os.walk(home):
        for name in (*dirnames, *filenames):
            out.add(Path(dirpath, name))
    return out


def _landed_only_in(new: set[Path], intended: Path) -> list[Path]:
    """Paths created outside ``intended`` (its own ancestors being created is expected)."""
    return [p for p in new if not (p == intended or intended in p.parents
                                   or p in intended.parents)]


def _deploy_or_refusal(node: NodeConfig, fleet: SSHFleet, src: Path) -> DeployError | None:
    try:
        asyncio.run(deploy_node(node, fleet.health_section(), src, excludes=[]))
    except DeployError as exc:
        return exc
    return None


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=hostile(), absolute=st.booleans())
def test_hostile_work_dirs_run_nothing_and_land_exactly(
        ssh_fleet: SSHFleet, marker_dir: Path, tmp_path: Path, raw: str,
        absolute: bool) -> None:
    host = ssh_fleet.hosts[0]
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "main.py").write_text("print('hello')\n")
    mark = marker_dir / "hit"
    raw = raw.replace("PWN", f"PWN {mark}")  # relative (home) and absolute marker files
    base = f"inj-{uuid.uuid4().hex[:8]}"
    value = (f"{host.home}/{base}/{raw}" if absolute else f"~/{base}/{raw}")
    before = _tree(host.home)
    try:
        parsed: NodeConfig | None = parse_cluster(
            {"nodes": [_remote_node(remote_work_dir=value)]}, Path("t.yaml")).nodes[0]
    except ConfigError as exc:
        assert "\n" not in str(exc) and "remote_work_dir" in str(exc)
        parsed = None
    # Accepted values go through the config; refused ones straight to the builder too:
    # --protect-args must keep even those inert.
    workdir = parsed.remote_work_dir if parsed else value
    node = ssh_fleet.node_config(host, remote_work_dir=workdir)
    refusal = _deploy_or_refusal(node, ssh_fleet, src)
    new = _tree(host.home) - before
    try:
        assert not mark.exists(), f"a payload ran on the node for {value!r}"
        assert not any(p.name.startswith("PWN") and p.parent == host.home for p in new)
        if refusal is not None:
            assert parsed is None, f"accepted {value!r} but the deploy failed: {refusal}"
            assert not new, f"a refused deploy still wrote {sorted(new)}"
            return
        rel = workdir[2:] if workdir.startswith("~/") else os.path.relpath(workdir, host.home)
        intended = host.home / "/".join(p for p in rel.split("/") if p)
        assert (intended / "main.py").is_file(), f"{value!r}: tree not in {intended}"
        assert _landed_only_in(new, intended) == []
    finally:
        shutil.rmtree(host.home / base, ignore_errors=True)
        for p in new:
            if p.parent == host.home:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(
                    missing_ok=True)


# --------------------------------------------------------------------------- deploy = cwd


def _odd_python(host: FleetHost, dirname: str) -> str:
    """A python3 reachable only through a ``~/`` path with spaces and punctuation in it."""
    target = host.home / dirname
    target.mkdir()
    real = Path("/usr/bin/python3")
    (target / "python3").symlink_to(real if real.exists() else Path(shutil.which("python3")
                                                                     or "python3"))
    os.chown(target, host.uid, -1)
    return f"~/{dirname}/python3"


def test_odd_but_safe_work_dir_is_where_the_deploy_lands_and_the_experiment_runs(
        ssh_fleet: SSHFleet, tmp_path: Path) -> None:
    """A work dir with spaces (one trailing), unicode and ``%@+,=:~`` goes through the
    config; rsync puts the tree there and the supervisor runs the experiment there, with a
    python found through a ``~/`` path (the probe used to quote the ``~`` dead)."""
    host = ssh_fleet.hosts[1]
    tag = uuid.uuid4().hex[:6]
    value = f"~/inj-{tag} ünï %h @x+1,a=b:c~ /run "
    python = _odd_python(host, f"py {tag}+1")
    doc = {"nodes": [_remote_node(remote_work_dir=value, python_path=python)]}
    node_cfg = parse_cluster(doc, Path("t.yaml")).nodes[0]
    node = ssh_fleet.node_config(host, remote_work_dir=node_cfg.remote_work_dir,
                                 python_path=node_cfg.python_path)
    src = tmp_path / "src"
    src.mkdir()
    (src / "main.py").write_text("print('hello')\n")
    health = ssh_fleet.health_section()
    asyncio.run(deploy_node(node, health, src, excludes=[]))
    intended = host.home / value[2:]
    assert (intended / "main.py").is_file()

    async def scenario() -> str:
        transport = SSHTransport(node, health)
        try:
            facts = await probe_node(transport, node, 30.0)
            assert facts.node == node.name
            client = SupervisorClient(transport, node)
            run_id = f"inj-{tag}"
            await client.start(StartRequest(run_id=run_id, instance_id="a",
                                            command="test -f main.py && pwd -P > where.txt",
                                            cwd=node.remote_work_dir))
            for _ in range(300):
                (state,) = await client.status(run_id)
                if state.is_final:
                    assert state.status is InstanceStatus.EXITED, state
                    break
                await asyncio.sleep(0.1)
            return (intended / "where.txt").read_text()
        finally:
            await transport.close()

    where = asyncio.run(scenario())
    assert where.rstrip("\n") == str(intended.resolve())
    shutil.rmtree(host.home / f"inj-{tag} ünï %h @x+1,a=b:c~ ", ignore_errors=True)


def test_yaml_and_json_give_the_same_refusal(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    doc = {"nodes": [_remote_node(remote_work_dir="~/w`id`")]}
    y = tmp_path / "c.yaml"
    y.write_text(yaml.safe_dump(doc))
    code, _, err = run_cli(capsys, "--cluster-config", str(y), "--validate-config")
    assert_one_line_error(code, err, "nodes[0].remote_work_dir: ", "'`'")


@pytest.mark.parametrize(("patch", "key"), [
    ({"workdir": "sub\nrm -rf x"}, "workdir"),
    ({"results": ["out/\r*.ckpt"]}, "results[0]"),
])
def test_spec_paths_with_control_characters_are_one_line_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], patch: dict[str, Any],
        key: str) -> None:
    """A spec's ``workdir``/``results`` become rsync protect rules and node paths."""
    cluster = _write(tmp_path, {"nodes": [_remote_node()]})
    spec = tmp_path / "exp.json"
    spec.write_text(json.dumps({"command": "true", "ram_gb": 1.0, **patch}))
    code, _, err = run_cli(capsys, "--cluster-config", str(cluster), "--validate-config",
                           "--config", str(spec))
    assert_one_line_error(code, err, f"{spec}: {key}: ", "must be on one line")
