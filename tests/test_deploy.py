"""Deploy: rsync command building, output parsing, and real deploys to the loopback SSH fleet."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import pwd
import shlex
import subprocess
import time
import uuid
from pathlib import Path

import psutil
import pytest

from infra.config.model import HealthCheckSection, NodeConfig
from infra.errors import DeployError, InfraError
from infra.runner.deploy import (
    BUILTIN_PROTECT,
    DEFAULT_EXCLUDES,
    DeployResult,
    build_rsync_command,
    deploy_all,
    deploy_node,
    parse_rsync_stats,
    remote_dir_for,
    rsync_failure_reason,
    source_fingerprint,
    ssh_command_for,
)
from tests.sshfleet import FleetHost, SSHFleet

NODE = NodeConfig(name="jetson", host="127.0.0.21", ssh_user="lab", ssh_port=2222,
                  ssh_key_path="/keys/my key %h", remote_work_dir="~/lab-orchestrator")
HEALTH = HealthCheckSection(known_hosts="/etc/lab/known hosts", timeout_seconds=7.5,
                            keepalive_seconds=4, keepalive_count_max=2)


def _e_argv(argv: list[str]) -> list[str]:
    """The ssh command rsync will run, split the way rsync splits its ``-e`` string."""
    return shlex.split(argv[argv.index("-e") + 1])


def _options(ssh_argv: list[str]) -> dict[str, str]:
    opts: dict[str, str] = {}
    for flag, value in itertools.pairwise(ssh_argv):
        if flag == "-o":
            key, _, val = value.partition("=")
            opts[key] = val
    return opts


# --------------------------------------------------------------------------- command builder


def test_ssh_command_carries_transport_settings() -> None:
    ssh = ssh_command_for(NODE, HEALTH)
    assert ssh[:3] == ["ssh", "-p", "2222"]
    opts = _options(ssh)
    assert opts["BatchMode"] == "yes"
    assert opts["StrictHostKeyChecking"] == "yes"
    assert opts["IdentitiesOnly"] == "yes"
    assert opts["ConnectTimeout"] == "8"
    assert opts["ServerAliveInterval"] == "4"
    assert opts["ServerAliveCountMax"] == "2"
    assert opts["GlobalKnownHostsFile"] == "/dev/null"


def test_key_and_known_hosts_paths_with_spaces_survive_rsync_e_quoting() -> None:
    argv = build_rsync_command(NODE, HEALTH, Path("/src"), excludes=[])
    opts = _options(_e_argv(argv))
    # ssh's own -o parser sees one quoted value; %-tokens are escaped so ssh keeps them.
    assert opts["IdentityFile"] == '"/keys/my key %%h"'
    assert opts["UserKnownHostsFile"] == '"/etc/lab/known hosts"'


def test_quotes_inside_paths_are_escaped_for_ssh() -> None:
    node = dataclasses.replace(NODE, ssh_key_path="/k/it's \"here\"")
    opts = _options(ssh_command_for(node, HEALTH))
    assert opts["IdentityFile"] == '"/k/it\\\'s \\"here\\""'


def test_default_known_hosts_and_accept_new() -> None:
    health = HealthCheckSection(accept_new_host_keys=True)
    opts = _options(ssh_command_for(NODE, health))
    assert opts["UserKnownHostsFile"] == os.path.expanduser("~/.ssh/known_hosts")
    assert opts["StrictHostKeyChecking"] == "accept-new"
    assert "GlobalKnownHostsFile" not in opts


def test_no_key_means_no_identity_options() -> None:
    node = dataclasses.replace(NODE, ssh_key_path=None)
    opts = _options(ssh_command_for(node, HEALTH))
    assert "IdentityFile" not in opts and "IdentitiesOnly" not in opts


def test_excludes_order_and_flags() -> None:
    argv = build_rsync_command(NODE, HEALTH, Path("/src/tree"), excludes=["data/", "*.ckpt"],
                               delete=True, dry_run=True)
    assert argv[:4] == ["rsync", "-az", "--stats", "--itemize-changes"]
    assert "--delete" in argv and "--dry-run" in argv
    rules = [a for a in argv if a.startswith(("--exclude=", "--filter="))]
    # Protect rules come first: rsync takes the first rule that matches.
    assert rules == [*(f"--filter=P {p}" for p in BUILTIN_PROTECT),
                     *(f"--exclude={p}" for p in DEFAULT_EXCLUDES),
                     "--exclude=data/", "--exclude=*.ckpt", "--filter=:- .gitignore"]
    assert argv[-2:] == ["/src/tree/", "lab@127.0.0.21:lab-orchestrator/"]
    assert "--mkpath" in argv
    no_delete = build_rsync_command(NODE, HEALTH, Path("/src"), excludes=[], delete=False)
    assert "--delete" not in no_delete and "--dry-run" not in no_delete


def test_remote_dir_forms() -> None:
    def rd(path: str) -> str:
        return remote_dir_for(dataclasses.replace(NODE, remote_work_dir=path))

    assert rd("~/lab/run") == "lab/run"
    assert rd("~/lab/run/") == "lab/run"
    assert rd("/opt/lab") == "/opt/lab"
    assert rd("~other/lab") == "~other/lab"
    for bad in ("~", "~/", "/", "", ".", "~/x/..", "../up", "~other"):
        with pytest.raises(DeployError, match="refusing"):
            rd(bad)


def test_old_rsync_creates_dir_with_quoted_mkdir_and_protects_args() -> None:
    node = dataclasses.replace(NODE, remote_work_dir="~/runs/it's here")
    argv = build_rsync_command(node, HEALTH, Path("/src"), excludes=[], rsync_version=(3, 1, 3))
    assert "--mkpath" not in argv
    assert "--rsync-path=mkdir -p 'runs/it'\"'\"'s here' && rsync" in argv
    assert "--protect-args" in argv
    assert argv[-1] == "lab@127.0.0.21:runs/it's here/"
    tilde = dataclasses.replace(NODE, remote_work_dir="~lab/a b")
    argv = build_rsync_command(tilde, HEALTH, Path("/src"), excludes=[], rsync_version=(3, 1, 3))
    assert "--rsync-path=mkdir -p ~lab/'a b' && rsync" in argv


def test_local_node_is_plain_local_rsync(tmp_path: Path) -> None:
    node = dataclasses.replace(NODE, host="localhost", remote_work_dir=str(tmp_path / "w"))
    argv = build_rsync_command(node, HEALTH, Path("/src"), excludes=[])
    assert "-e" not in argv
    assert argv[-2:] == ["/src/", f"{tmp_path / 'w'}/"]


# --------------------------------------------------------------------------- output parsing

# Captured from rsync 3.5.0 (first deploy with --mkpath, then one edit and one deletion).
FIRST_DEPLOY = """\
created 2 directories for work/deep
<f+++++++++ .gitignore
<f+++++++++ a.txt
<f+++++++++ with space.txt
cd+++++++++ pkg/
<f+++++++++ pkg/m.py
cd+++++++++ sub/
cd+++++++++ sub/logs/
<f+++++++++ sub/logs/kept.txt

Number of files: 9 (reg: 5, dir: 4)
Number of created files: 8 (reg: 5, dir: 3)
Number of deleted files: 0
Number of regular files transferred: 5
Total file size: 26 bytes
Total transferred file size: 26 bytes
Literal data: 26 bytes
Matched data: 0 bytes
File list size: 0
File list generation time: 0.001 seconds
File list transfer time: 0.000 seconds
Total bytes sent: 576
Total bytes received: 174

sent 576 bytes  received 174 bytes  1,500.00 bytes/sec
total size is 26  speedup is 0.03
"""

SECOND_DEPLOY = """\
<f.s....... a.txt
*deleting   pkg/m.py

Number of files: 8 (reg: 4, dir: 4)
Number of created files: 0
Number of deleted files: 1 (reg: 1)
Number of regular files transferred: 1
Total file size: 22 bytes
Total transferred file size: 8 bytes
Literal data: 8 bytes
Matched data: 0 bytes
File list size: 0
File list generation time: 0.001 seconds
File list transfer time: 0.000 seconds
Total bytes sent: 356
Total bytes received: 63

sent 356 bytes  received 63 bytes  838.00 bytes/sec
total size is 22  speedup is 0.05
"""

DRY_RUN = """\
.d..t...... ./
<f+++++++++ new.txt

Number of files: 9 (reg: 5, dir: 4)
Number of created files: 1 (reg: 1)
Number of deleted files: 0
Number of regular files transferred: 1
Total file size: 26 bytes
Total transferred file size: 4 bytes
Literal data: 0 bytes
Matched data: 0 bytes
File list size: 0
File list generation time: 0.001 seconds
File list transfer time: 0.000 seconds
Total bytes sent: 324
Total bytes received: 32

sent 324 bytes  received 32 bytes  712.00 bytes/sec
total size is 26  speedup is 0.07 (DRY RUN)
"""

# rsync 3.1 style: thousands separators, a symlink and a permissions-only change.
RSYNC_31 = """\
cL+++++++++ current -> runs/2024
.f...p..... run.sh
*deleting   old dir/
<f.st...... big model.bin

Number of files: 12,345 (reg: 12,000, dir: 344, link: 1)
Number of created files: 1 (link: 1)
Number of deleted files: 1 (dir: 1)
Number of regular files transferred: 1
Total file size: 9,876,543,210 bytes
Total transferred file size: 1,048,576 bytes
Literal data: 2,048 bytes
Matched data: 1,046,528 bytes
File list size: 262,143
File list generation time: 0.012 seconds
File list transfer time: 0.000 seconds
Total bytes sent: 1,234,567
Total bytes received: 8,910

sent 1,234,567 bytes  received 8,910 bytes  2,486,954.00 bytes/sec
total size is 9,876,543,210  speedup is 7,942.67
"""

# rsync 3.0 style: "Number of files transferred", no file-type breakdown.
RSYNC_30 = """\
>f+++++++++ a.py

Number of files: 3
Number of files transferred: 1
Total file size: 120 bytes
Total transferred file size: 120 bytes
Literal data: 120 bytes
Matched data: 0 bytes
File list size: 52
File list generation time: 0.001 seconds
File list transfer time: 0.000 seconds
Total bytes sent: 241
Total bytes received: 34
"""


def test_parse_first_and_incremental_deploy() -> None:
    first = parse_rsync_stats(FIRST_DEPLOY)
    assert (first.files_transferred, first.bytes_sent, first.total_files) == (5, 576, 9)
    assert first.changed == (".gitignore", "a.txt", "with space.txt", "pkg/", "pkg/m.py",
                             "sub/", "sub/logs/", "sub/logs/kept.txt")
    assert first.deleted == ()
    second = parse_rsync_stats(SECOND_DEPLOY)
    assert (second.files_transferred, second.bytes_sent) == (1, 356)
    assert second.changed == ("a.txt",)
    assert second.deleted == ("pkg/m.py",)


def test_parse_dry_run_ignores_directory_timestamp_lines() -> None:
    stats = parse_rsync_stats(DRY_RUN)
    assert stats.changed == ("new.txt",)
    assert stats.files_transferred == 1


def test_parse_rsync_31_and_30_formats() -> None:
    stats = parse_rsync_stats(RSYNC_31)
    assert (stats.files_transferred, stats.bytes_sent, stats.total_files) == (1, 1234567, 12345)
    assert stats.changed == ("current", "run.sh", "big model.bin")
    assert stats.deleted == ("old dir/",)
    old = parse_rsync_stats(RSYNC_30)
    assert (old.files_transferred, old.bytes_sent, old.total_files) == (1, 241, 3)
    assert old.changed == ("a.py",)


def test_parse_empty_output() -> None:
    stats = parse_rsync_stats("")
    assert (stats.files_transferred, stats.bytes_sent, stats.changed) == (0, 0, ())


TAIL = ("rsync: connection unexpectedly closed (0 bytes received so far) [sender]\n"
        "rsync error: unexplained error (code 255) at io.c(285) [sender=3.5.0]\n")


@pytest.mark.parametrize(("stderr", "code", "expected"), [
    ("@@@@\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n"
     "Host key verification failed.\n" + TAIL, 255, "host key does not match"),
    ("No ED25519 host key is known for [127.0.0.61]:22922 and you have requested strict "
     "checking.\nHost key verification failed.\n" + TAIL, 255, "host key is not in known_hosts"),
    ("ssh: connect to host 127.0.0.63 port 22922: Connection refused\n" + TAIL, 255,
     "connection refused"),
    ("dplt2@127.0.0.61: Permission denied (publickey).\n" + TAIL, 255,
     "permission denied: the node refused the ssh key"),
    ("Warning: Identity file /nonexist/key not accessible: No such file or directory.\n"
     "dplt1@127.0.0.61: Permission denied (publickey).\n" + TAIL, 255, "key file not accessible"),
    ("sh: 1: rsync: not found\n" + TAIL.replace("unexplained error (code 255)",
                                                 "remote command not found (code 127)"),
     127, "rsync not found on node"),
    ("sh: 1: nosuchrsync: not found\nrsync: connection unexpectedly closed\n"
     "rsync error: error in rsync protocol data stream (code 12)\n", 12, "rsync failed (exit 12)"),
    ('rsync: [Receiver] mkdir "/root/x/y/" failed: Permission denied (13)\n'
     "rsync error: error in file IO (code 11) at main.c(808) [Receiver=3.5.0]\n", 11,
     'permission denied: mkdir "/root/x/y/" failed'),
    ("Timeout, server 127.0.0.21 not responding.\n" + TAIL, 255, "stopped responding"),
    ("rsync: [sender] Failed to exec ssh: No such file or directory (2)\n", 14,
     "ssh client not found"),
    ("", 5, "rsync failed (exit 5)"),
])
def test_failure_reasons(stderr: str, code: int, expected: str) -> None:
    assert expected in rsync_failure_reason(stderr, code)


# --------------------------------------------------------------------------- fingerprint


def _make_tree(root: Path) -> Path:
    """A project tree with everything the excludes must keep home."""
    files = {
        "main.py": "print('hello')\n",
        "pkg/mod.py": "X = 1\n",
        "pkg/__pycache__/mod.cpython-311.pyc": "bytecode",
        "stray.pyc": "bytecode",
        ".git/HEAD": "ref: refs/heads/main\n",
        "logs/run.log": "old log\n",
        "sub/logs/keep.txt": "not the top-level logs dir\n",
        ".gitignore": "*.secret\nbuild/\n",
        "conf.secret": "token\n",
        "pkg/.gitignore": "local.tmp\n",
        "pkg/local.tmp": "tmp\n",
        "build/out.o": "obj\n",
        "data/big.bin": "0" * 1000,
        ".venv/bin/python": "#!",
        "with space.txt": "spaces\n",
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


EXPECTED_DEPLOYED = {".gitignore", "main.py", "pkg/mod.py", "pkg/.gitignore",
                     "sub/logs/keep.txt", "with space.txt"}


def test_fingerprint_tracks_content_metadata_and_ignores_excluded(tmp_path: Path) -> None:
    src = _make_tree(tmp_path / "src")
    first = source_fingerprint(src, ["data/"])
    assert first == source_fingerprint(src, ["data/"])
    (src / ".git" / "HEAD").write_text("ref: refs/heads/other-branch\n")
    (src / "pkg" / "__pycache__" / "new.pyc").write_text("x")
    (src / "data" / "big.bin").write_text("1")
    assert source_fingerprint(src, ["data/"]) == first
    assert source_fingerprint(src, ["data/", "*.bin"]) != first  # excludes are part of it
    (src / "main.py").write_text("print('changed')\n")
    assert source_fingerprint(src, ["data/"]) != first


# --------------------------------------------------------------------------- local node


def test_local_node_whose_work_dir_is_the_source_is_skipped(tmp_path: Path) -> None:
    src = _make_tree(tmp_path / "src")
    node = NodeConfig(name="host", host="localhost", remote_work_dir=str(src))
    result = asyncio.run(deploy_node(node, HEALTH, src, excludes=[]))
    assert result.skipped and result.reason == "work dir is the source tree"
    assert result.stats is None


def test_local_node_with_another_dir_gets_a_local_rsync(tmp_path: Path) -> None:
    src = _make_tree(tmp_path / "src")
    node = NodeConfig(name="host", host="localhost", remote_work_dir=str(tmp_path / "a b/w"))
    result = asyncio.run(deploy_node(node, HEALTH, src, excludes=["data/"]))
    assert not result.skipped and result.stats is not None
    assert _tree_files(tmp_path / "a b" / "w") == EXPECTED_DEPLOYED
    nested = NodeConfig(name="host", host="localhost", remote_work_dir=str(src / "deploy"))
    with pytest.raises(DeployError, match="inside the source tree"):
        asyncio.run(deploy_node(nested, HEALTH, src, excludes=[]))


def test_missing_source_is_a_deploy_error(tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="not a directory"):
        asyncio.run(deploy_node(NODE, HEALTH, tmp_path / "nope", excludes=[]))


def _tree_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- on the fleet


def _node(fleet: SSHFleet, host: FleetHost, workdir: str, **overrides: object) -> NodeConfig:
    return fleet.node_config(host, remote_work_dir=workdir, **overrides)


def _fresh_dir() -> str:
    return f"deploy-{uuid.uuid4().hex[:8]}"


@pytest.mark.integration
def test_deploy_all_delivers_owned_files_and_honours_excludes(
        ssh_fleet: SSHFleet, tmp_path: Path) -> None:
    src = _make_tree(tmp_path / "src")
    name = _fresh_dir()
    nodes = [_node(ssh_fleet, h, f"~/{name}/code") for h in ssh_fleet.hosts]
    events: list[tuple[str, str]] = []
    results = asyncio.run(deploy_all(nodes, ssh_fleet.health_section(), src, excludes=["data/"],
                                     on_progress=lambda n, s: events.append((n, s))))
    for host in ssh_fleet.hosts:
        result = results[host.name]
        assert isinstance(result, DeployResult), result
        assert result.stats is not None and result.stats.files_transferred == 6
        assert result.fingerprint == source_fingerprint(src, ["data/"])
        target = host.home / name / "code"
        assert _tree_files(target) == EXPECTED_DEPLOYED
        uid = pwd.getpwnam(host.user).pw_uid
        for path in [target, *target.rglob("*")]:
            assert os.stat(path).st_uid == uid, path
        assert (host.name, "started") in events and (host.name, "done") in events


@pytest.mark.integration
def test_incremental_deploy_sends_only_the_changed_file(
        ssh_fleet: SSHFleet, tmp_path: Path) -> None:
    src = _make_tree(tmp_path / "src")
    host = ssh_fleet.hosts[0]
    node = _node(ssh_fleet, host, str(host.home / _fresh_dir()))
    health = ssh_fleet.health_section()
    asyncio.run(deploy_node(node, health, src, excludes=[]))
    again = asyncio.run(deploy_node(node, health, src, excludes=[]))
    assert again.stats is not None and again.stats.files_transferred == 0
    assert again.stats.changed == ()
    (src / "pkg" / "mod.py").write_text("X = 2  # changed\n")
    changed = asyncio.run(deploy_node(node, health, src, excludes=[]))
    assert changed.stats is not None
    assert changed.stats.files_transferred == 1
    assert changed.stats.changed == ("pkg/mod.py",)
    assert (Path(node.remote_work_dir) / "pkg" / "mod.py").read_text() == "X = 2  # changed\n"


@pytest.mark.integration
def test_delete_removes_remote_files_only_when_asked(ssh_fleet: SSHFleet, tmp_path: Path) -> None:
    src = _make_tree(tmp_path / "src")
    host = ssh_fleet.hosts[1]
    node = _node(ssh_fleet, host, str(host.home / _fresh_dir()))
    health = ssh_fleet.health_section()
    remote = Path(node.remote_work_dir)
    asyncio.run(deploy_node(node, health, src, excludes=[]))
    (remote / "logs").mkdir()
    (remote / "logs" / "experiment.log").write_text("written on the node\n")
    (src / "with space.txt").unlink()
    kept = asyncio.run(deploy_node(node, health, src, excludes=[], delete=False))
    assert kept.stats is not None and kept.stats.deleted == ()
    assert (remote / "with space.txt").exists()
    gone = asyncio.run(deploy_node(node, health, src, excludes=[], delete=True))
    assert gone.stats is not None and gone.stats.deleted == ("with space.txt",)
    assert not (remote / "with space.txt").exists()
    assert (remote / "logs" / "experiment.log").exists()  # excluded paths are never deleted


@pytest.mark.integration
def test_dry_run_lists_changes_and_touches_nothing(ssh_fleet: SSHFleet, tmp_path: Path) -> None:
    src = _make_tree(tmp_path / "src")
    host = ssh_fleet.hosts[2]
    name = _fresh_dir()
    node = _node(ssh_fleet, host, f"~/{name}")
    result = asyncio.run(deploy_node(node, ssh_fleet.health_section(), src, excludes=[],
                                     dry_run=True))
    assert result.stats is not None and result.fingerprint is None
    assert "main.py" in result.stats.changed and "pkg/mod.py" in result.stats.changed
    assert not (host.home / name).exists()


@pytest.mark.integration
def test_old_rsync_fallback_creates_dir_with_mkdir(ssh_fleet: SSHFleet, tmp_path: Path) -> None:
    """The ``mkdir -p`` path used when an rsync lacks ``--mkpath``, with a hostile dir name."""
    src = _make_tree(tmp_path / "src")
    host = ssh_fleet.hosts[0]
    name = f"{_fresh_dir()} it's $HOME;x"
    node = _node(ssh_fleet, host, f"~/{name}/deep")
    argv = build_rsync_command(node, ssh_fleet.health_section(), src, excludes=[],
                               rsync_version=(3, 1, 3))
    proc = subprocess.run(argv, capture_output=True, text=True, check=False,
                          env={**os.environ, "LC_ALL": "C"})
    assert proc.returncode == 0, proc.stderr
    assert (host.home / name / "deep" / "main.py").exists()


@pytest.mark.integration
def test_wrong_host_key_is_a_deploy_error(ssh_fleet: SSHFleet, tmp_path: Path) -> None:
    src = _make_tree(tmp_path / "src")
    first, second = ssh_fleet.hosts[:2]
    wrong = tmp_path / "known_hosts"
    # first's address and port, second's key.
    wrong.write_text(f"[{first.address}]:{first.port} "
                     + " ".join(second.host_key_line().split()[1:]) + "\n")
    node = _node(ssh_fleet, first, _fresh_dir())
    with pytest.raises(DeployError, match="host key") as info:
        asyncio.run(deploy_node(node, ssh_fleet.health_section(known_hosts=str(wrong)), src,
                                excludes=[]))
    assert info.value.node == first.name


@pytest.mark.integration
def test_accept_new_records_an_unknown_host_key(ssh_fleet: SSHFleet, tmp_path: Path) -> None:
    src = _make_tree(tmp_path / "src")
    host = ssh_fleet.hosts[0]
    known = tmp_path / "fresh_known_hosts"
    known.write_text("")
    node = _node(ssh_fleet, host, _fresh_dir())
    with pytest.raises(DeployError, match="not in known_hosts"):
        asyncio.run(deploy_node(node, ssh_fleet.health_section(known_hosts=str(known)), src,
                                excludes=[]))
    health = ssh_fleet.health_section(known_hosts=str(known), accept_new_host_keys=True)
    result = asyncio.run(deploy_node(node, health, src, excludes=[]))
    assert not result.skipped
    assert host.host_key_line().split()[2] in known.read_text()  # (the name may be hashed)
    again = asyncio.run(deploy_node(node, ssh_fleet.health_section(known_hosts=str(known)), src,
                                    excludes=[]))
    assert again.stats is not None  # the recorded key is now trusted under strict checking


@pytest.mark.integration
def test_stopped_node_fails_alone(ssh_fleet: SSHFleet, tmp_path: Path) -> None:
    src = _make_tree(tmp_path / "src")
    name = _fresh_dir()
    nodes = [_node(ssh_fleet, h, f"~/{name}") for h in ssh_fleet.hosts]
    down = ssh_fleet.hosts[1]
    events: list[tuple[str, str]] = []
    down.stop()
    try:
        results = asyncio.run(deploy_all(nodes, ssh_fleet.health_section(), src, excludes=[],
                                         on_progress=lambda n, s: events.append((n, s))))
    finally:
        down.start()
    failure = results[down.name]
    assert isinstance(failure, DeployError) and isinstance(failure, InfraError)
    assert "connection refused" in failure.reason
    assert (down.name, "failed") in events
    for host in ssh_fleet.hosts:
        if host is not down:
            assert isinstance(results[host.name], DeployResult)
            assert (host.home / name / "main.py").exists()


@pytest.mark.integration
def test_unchanged_fingerprint_skips_without_contacting_the_node(
        ssh_fleet: SSHFleet, tmp_path: Path) -> None:
    src = _make_tree(tmp_path / "src")
    host = ssh_fleet.hosts[2]
    node = _node(ssh_fleet, host, _fresh_dir())
    health = ssh_fleet.health_section()
    first = asyncio.run(deploy_node(node, health, src, excludes=[]))
    assert first.fingerprint is not None
    host.stop()
    try:  # the node is down, yet nothing fails: the skip never talks to it
        results = asyncio.run(deploy_all([node], health, src, excludes=[],
                                         last_fingerprints={node.name: first.fingerprint}))
    finally:
        host.start()
    result = results[node.name]
    assert isinstance(result, DeployResult) and result.skipped
    assert result.reason == "source unchanged since the last deploy"
    (src / "main.py").write_text("print('new')\n")
    redeploy = asyncio.run(deploy_node(node, health, src, excludes=[],
                                       last_fingerprint=first.fingerprint))
    assert not redeploy.skipped and redeploy.stats is not None
    assert redeploy.stats.changed == ("main.py",)


def _rsync_children() -> list[psutil.Process]:
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.name() in ("rsync", "ssh") and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            pass
    return found


@pytest.mark.integration
def test_frozen_node_times_out_and_cancelling_kills_rsync(
        ssh_fleet: SSHFleet, tmp_path: Path) -> None:
    src = _make_tree(tmp_path / "src")
    host = ssh_fleet.hosts[0]
    node = _node(ssh_fleet, host, _fresh_dir())

    async def cancel_midway() -> None:
        slow = ssh_fleet.health_section(timeout_seconds=60)  # ssh alone would wait 60 s
        task = asyncio.create_task(deploy_node(node, slow, src, excludes=[]))
        while len(_rsync_children()) < 2:  # rsync and its ssh
            await asyncio.sleep(0.02)
        started.extend(_rsync_children())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    def gone(proc: psutil.Process) -> bool:
        try:
            return proc.status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return True

    started: list[psutil.Process] = []

    host.pause()
    try:
        with pytest.raises(DeployError, match="timed out"):
            asyncio.run(deploy_node(node, ssh_fleet.health_section(timeout_seconds=1), src,
                                    excludes=[]))
        asyncio.run(asyncio.wait_for(cancel_midway(), 30))
        deadline = time.monotonic() + 20  # a leaked ssh would linger for its 60 s timeout
        while not all(gone(p) for p in started) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert all(gone(p) for p in started), [p.pid for p in started if not gone(p)]
    finally:
        host.resume()
