"""Real OpenSSH servers on loopback, one Unix user per node: the integration test fleet.

Each ``FleetHost`` is an ``sshd`` listening on its own loopback address (127.0.0.21, .22,
...) and on a port picked free for this session, admitting exactly one Unix user created for
this session, with its own home.  Concurrent pytest sessions on one machine never collide:
user names carry a random tag, ports are probed free and re-picked when ``sshd`` cannot bind,
and a session only ever kills processes it started or that belong to its own users.

Users left behind by a crashed session are recognised by their GECOS field (owner pid and
start time) and removed by the next fleet that starts.

Needs root, ``/usr/sbin/sshd``, ``ssh-keygen``, ``useradd``/``userdel`` and Linux.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil

from infra.config.model import HealthCheckSection, NodeConfig

SSHD = "/usr/sbin/sshd"
FIRST_HOST_OCTET = 21
MAX_HOSTS = 64
"""Hosts 127.0.0.21 .. 127.0.0.84: all of 127.0.0.0/8 reaches loopback on Linux."""
GECOS_TAG = "infra-fleet"
_START_ATTEMPTS = 20
_READY_TIMEOUT_S = 10.0
_TOOLS = ("ssh", "ssh-keygen", "useradd", "userdel")


class FleetError(RuntimeError):
    """The fleet could not be set up or a host could not be (re)started."""


class FleetUnavailable(FleetError):
    """This machine cannot host a fleet at all (not root, no sshd...)."""


def unavailable_reason() -> str | None:
    """Why a fleet cannot start here, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "the SSH fleet needs Linux"
    if os.geteuid() != 0:
        return "the SSH fleet needs root (it creates Unix users and starts sshd)"
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} not found (apt-get install openssh-server)"
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing tools: {', '.join(missing)}"
    return None


def _openssh_version() -> tuple[int, int]:
    out = subprocess.run(["ssh", "-V"], capture_output=True, text=True, check=False)
    match = re.search(r"OpenSSH_(\d+)\.(\d+)", out.stderr + out.stdout)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _node_python() -> str:
    """The interpreter a test user can run: the system one, else the coordinator's."""
    return "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        port: int = sock.getsockname()[1]
        return port


def _retrying(argv: Sequence[str], ok: Sequence[int] = (0,), attempts: int = 60) -> int:
    """Run a shadow-utils command, retrying while another process holds the passwd lock."""
    last = ""
    for _ in range(attempts):
        proc = subprocess.run(list(argv), capture_output=True, text=True, check=False)
        if proc.returncode in ok:
            return proc.returncode
        last = proc.stderr.strip()
        if "lock" not in last and "try again" not in last:
            raise FleetError(f"{' '.join(argv)} exited {proc.returncode}: {last}")
        time.sleep(0.05 + secrets.randbelow(100) / 1000)
    raise FleetError(f"{' '.join(argv)}: {last}")


def _alive(proc: psutil.Process) -> bool:
    """True unless gone or a zombie (PID 1 of some containers never reaps orphans)."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(procs: Sequence[psutil.Process], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.01)


def _processes_of(*uids: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["uids", "status"]):
        ids = proc.info.get("uids")
        if (ids is not None and (ids.real in uids or ids.effective in uids)
                and proc.info.get("status") != psutil.STATUS_ZOMBIE):
            found.append(proc)
    return found


def _signal_all(procs: Sequence[psutil.Process], sig: int) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)


def _kill_user_processes(*uids: int) -> None:
    """SIGKILL every process of these users until none is left (they may fork meanwhile)."""
    for _ in range(50):
        procs = _processes_of(*uids)
        if not procs:
            return
        _signal_all(procs, signal.SIGKILL)
        _wait_gone(procs, timeout=1.0)


def _owner_tag() -> str:
    me = psutil.Process()
    return f"{GECOS_TAG} pid={me.pid} start={me.create_time():.2f}"


def _owner_alive(gecos: str) -> bool:
    match = re.search(r"pid=(\d+) start=([\d.]+)", gecos)
    if match is None:
        return False
    try:
        proc = psutil.Process(int(match.group(1)))
        return abs(proc.create_time() - float(match.group(2))) < 0.05
    except psutil.Error:
        return False


def _remove_user(user: str) -> None:
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        return
    _kill_user_processes(uid)
    # 6: user does not exist (a concurrent cleaner won); 12: mail spool / home already gone.
    _retrying(["userdel", "-r", "-f", user], ok=(0, 6, 12))


def reap_stale_users() -> list[str]:
    """Remove users (and their sshd) left by fleets whose pytest session died."""
    stale = [p.pw_name for p in pwd.getpwall()
             if p.pw_gecos.startswith(GECOS_TAG) and not _owner_alive(p.pw_gecos)]
    if not stale:
        return []
    configs = {f"sshd_config.{user}" for user in stale}
    for proc in psutil.process_iter(["name", "cmdline"]):
        # sshd retitles itself ("sshd: /usr/sbin/sshd -D -f ... [listener]"): match tokens
        tokens = " ".join(proc.info.get("cmdline") or []).split()
        if proc.info.get("name") == "sshd" and any(t.rsplit("/", 1)[-1] in configs
                                                   for t in tokens):
            with contextlib.suppress(psutil.Error):
                for child in proc.children(recursive=True):
                    child.kill()
                proc.kill()
    for user in stale:
        with contextlib.suppress(FleetError):
            _remove_user(user)
    return stale


@dataclasses.dataclass(eq=False)
class FleetHost:
    """One fake node: an sshd on its own loopback address admitting one Unix user."""

    name: str
    user: str
    address: str
    port: int
    home: Path
    uid: int
    hostdir: Path
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    """Exported to every session of this host (sshd ``SetEnv``), e.g. ``SLURM_CONF``."""
    _extra: list[str] = dataclasses.field(default_factory=list, repr=False)
    _proc: subprocess.Popen[bytes] | None = dataclasses.field(default=None, repr=False)
    _paused: list[psutil.Process] = dataclasses.field(default_factory=list, repr=False)

    @property
    def config_path(self) -> Path:
        """The sshd_config of this host (its name carries the user, to find stale sshds)."""
        return self.hostdir / f"sshd_config.{self.user}"

    @property
    def host_key(self) -> Path:
        return self.hostdir / "ssh_host_ed25519_key"

    @property
    def log_path(self) -> Path:
        return self.hostdir / "sshd.log"

    @property
    def paused(self) -> bool:
        return bool(self._paused)

    @property
    def pid(self) -> int | None:
        """The pid of the listening sshd, or None when it is not running."""
        return self._proc.pid if self.is_running() and self._proc is not None else None

    def is_running(self) -> bool:
        """True while the listening sshd process exists (paused or not)."""
        return self._proc is not None and self._proc.poll() is None

    def host_key_line(self) -> str:
        """This host's public key as a known_hosts line: ``[addr]:port type key``."""
        kind, key = (self.host_key.with_suffix(".pub").read_text().split()[:2])
        return f"[{self.address}]:{self.port} {kind} {key}"

    def _write_config(self, extra: Sequence[str]) -> None:
        self._extra = list(extra)
        setenv = ["SetEnv " + " ".join(f"{key}={value}"
                                       for key, value in sorted(self.env.items()))]
        lines = [
            f"ListenAddress {self.address}",
            f"Port {self.port}",
            f"HostKey {self.host_key}",
            f"PidFile {self.hostdir / 'sshd.pid'}",
            "AuthorizedKeysFile .ssh/authorized_keys",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "StrictModes no",
            "PermitRootLogin no",
            "MaxStartups 100:30:200",
            "MaxSessions 10",
            "LoginGraceTime 30",
            "X11Forwarding no",
            "Subsystem sftp internal-sftp",
            f"AllowUsers {self.user}",
            *extra,
            *(setenv if self.env else []),
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def _launch(self) -> None:
        """Start sshd in the foreground of its own session (readiness is checked apart)."""
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            [SSHD, "-D", "-f", str(self.config_path), "-E", str(self.log_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )

    def _wait_ready(self) -> str | None:
        """None once our sshd listens on our port and answers, else why it does not."""
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while time.monotonic() < deadline:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc and proc.stderr else ""
                self._proc = None
                log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
                return f"sshd exited: {err.strip()} {log[-400:].strip()}"
            if self._listening() and self._banner():
                return None
            time.sleep(0.02)
        self._kill_sshd()
        return f"sshd on {self.address}:{self.port} not ready after {_READY_TIMEOUT_S:g} s"

    def _listening(self) -> bool:
        assert self._proc is not None
        try:
            conns = psutil.Process(self._proc.pid).net_connections(kind="tcp")
        except psutil.Error:
            return False
        return any(c.status == psutil.CONN_LISTEN and tuple(c.laddr) == (self.address, self.port)
                   for c in conns)

    def _banner(self) -> bool:
        try:
            with socket.create_connection((self.address, self.port), timeout=2.0) as sock:
                return sock.recv(64).startswith(b"SSH-")
        except OSError:
            return False

    def _sshd_tree(self) -> list[psutil.Process]:
        if self._proc is None:
            return []
        try:
            root = psutil.Process(self._proc.pid)
            return [p for p in [root, *root.children(recursive=True)] if _alive(p)]
        except psutil.Error:
            return []

    def _kill_sshd(self) -> None:
        tree = self._sshd_tree()
        _signal_all(tree, signal.SIGKILL)
        if self._proc is not None:
            self._proc.wait()
            if self._proc.stderr is not None:
                self._proc.stderr.close()
        _wait_gone(tree, timeout=2.0)
        self._proc = None

    def start(self) -> None:
        """(Re)start sshd on the same address and port; no-op when it already runs."""
        if self.is_running():
            return
        self._launch()
        why = self._wait_ready()
        if why is not None:
            raise FleetError(f"{self.name}: {why}")

    def stop(self, kill_user_processes: bool = False) -> None:
        """Kill sshd and every connection it serves (the node's SSH goes down).

        Processes the user detached from the session survive, as they would when only the
        network or sshd dies; ``kill_user_processes=True`` also kills them (a reboot).
        """
        self.resume()
        self._kill_sshd()
        if kill_user_processes:
            _kill_user_processes(self.uid)

    def set_env(self, env: dict[str, str]) -> None:
        """Export ``env`` to every new session: rewrite sshd_config and reload sshd (SIGHUP:
        sshd re-executes itself with the new config; open sessions carry on)."""
        bad = [f"{k}={v}" for k, v in env.items()
               if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k) or re.search(r"[\s\"'\\]", v)]
        if bad:
            raise ValueError(f"cannot export {bad}: names are identifiers, values unquoted")
        self.env = dict(env)
        self._write_config(self._extra)
        if self._proc is None or not self.is_running():
            return
        before = self._listen_count()
        self._proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._listen_count() > before and self._listening() and self._banner():
                return
            time.sleep(0.05)
        raise FleetError(f"{self.name}: sshd not back after SIGHUP: "
                         f"{self.log_path.read_text(errors='replace')[-400:]}")

    def _listen_count(self) -> int:
        """How often sshd has logged that it listens: one more after each (re)load."""
        try:
            return self.log_path.read_text(errors="replace").count("Server listening on")
        except OSError:
            return 0

    def pause(self) -> None:
        """Freeze the node: SIGSTOP sshd, its connection processes and the user's processes."""
        tree = self._sshd_tree()
        victims = {p.pid: p for p in [*tree, *_processes_of(self.uid)]}
        _signal_all(tree[:1], signal.SIGSTOP)  # the listener first: no new children
        _signal_all(list(victims.values()), signal.SIGSTOP)
        self._paused = list(victims.values())

    def resume(self) -> None:
        """Undo ``pause``: SIGCONT everything that was frozen."""
        victims = {p.pid: p for p in [*self._paused, *self._sshd_tree(),
                                      *_processes_of(self.uid)]}
        _signal_all(list(victims.values()), signal.SIGCONT)
        self._paused = []


@dataclasses.dataclass(eq=False)
class SSHFleet:
    """A set of ``FleetHost`` plus the client key and known_hosts that reach them."""

    hosts: list[FleetHost]
    client_key: Path
    known_hosts: Path
    workdir: Path

    def host(self, name: str) -> FleetHost:
        """The host called ``name`` (``node1``...)."""
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)

    def ssh_options(self) -> list[str]:
        """Options for the ssh CLI (add ``-p host.port``): our key, our known_hosts, no prompts."""
        return [
            "-i", str(self.client_key),
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes",
        ]

    def ssh_command(self, host: FleetHost) -> list[str]:
        """``ssh ... user@addr`` for one host, ready for a remote command to be appended."""
        return ["ssh", *self.ssh_options(), "-p", str(host.port), f"{host.user}@{host.address}"]

    def node_config(self, host: FleetHost, **overrides: Any) -> NodeConfig:
        """A NodeConfig that reaches ``host`` with the fleet's key."""
        node = NodeConfig(
            name=host.name,
            host=host.address,
            ssh_user=host.user,
            ssh_port=host.port,
            ssh_key_path=str(self.client_key),
            remote_work_dir=str(host.home / "work"),
            python_path=_node_python(),
            enabled=True,
        )
        return dataclasses.replace(node, **overrides)

    def health_section(self, **overrides: Any) -> HealthCheckSection:
        """A HealthCheckSection that verifies host keys against the fleet's known_hosts."""
        return dataclasses.replace(HealthCheckSection(known_hosts=str(self.known_hosts)),
                                   **overrides)

    def write_known_hosts(self) -> None:
        """(Re)write ``known_hosts`` with every host's current key and port."""
        self.known_hosts.write_text("".join(h.host_key_line() + "\n" for h in self.hosts))

    def leftover_processes(self) -> list[psutil.Process]:
        """What the fleet's users still run outside sshd: supervisors, workloads, samplers."""
        found = []
        for proc in _processes_of(*(host.uid for host in self.hosts)):
            with contextlib.suppress(psutil.Error):
                if not proc.name().startswith("sshd"):
                    found.append(proc)
        return found

    def clear_work(self) -> None:
        """Kill what a test left running on the nodes, until nothing is left.

        A detached run outlives its test by design, and its supervisor restarts a workload
        that is merely killed: so everything of the users goes, supervisors with their
        workloads, again and again until none comes back; sshd and its sessions stay.
        """
        for _ in range(50):
            procs = self.leftover_processes()
            if not procs:
                return
            _signal_all(procs, signal.SIGKILL)
            _wait_gone(procs, timeout=1.0)
        raise FleetError("processes of the fleet users keep coming back: "
                         + ", ".join(str(p.pid) for p in self.leftover_processes()))

    @classmethod
    @contextlib.contextmanager
    def start(cls, n: int = 3, workdir: Path | str | None = None,
              names: Sequence[str] | None = None) -> Iterator[SSHFleet]:
        """Start ``n`` hosts (node1..nodeN) and tear everything down on exit."""
        reason = unavailable_reason()
        if reason is not None:
            raise FleetUnavailable(reason)
        if not 1 <= n <= MAX_HOSTS:
            raise ValueError(f"a fleet has 1..{MAX_HOSTS} hosts, not {n}")
        names = list(names) if names is not None else [f"node{i + 1}" for i in range(n)]
        if len(names) != n:
            raise ValueError("names must have n entries")
        with contextlib.ExitStack() as stack:
            if workdir is None:
                workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="infra-fleet-"))
            fleet = cls(hosts=[], client_key=Path(workdir) / "client_ed25519",
                        known_hosts=Path(workdir) / "known_hosts", workdir=Path(workdir))
            fleet.workdir.mkdir(parents=True, exist_ok=True)
            stack.callback(fleet._teardown)
            fleet._setup(names)
            yield fleet

    def _setup(self, names: Sequence[str]) -> None:
        reap_stale_users()
        _keygen(self.client_key, "infra-fleet-client")
        public = self.client_key.with_suffix(".pub").read_text()
        extra = ["PerSourcePenalties no"] if _openssh_version() >= (9, 8) else []
        tag = secrets.token_hex(2)
        skel = self.workdir / "skel"
        skel.mkdir(exist_ok=True)
        for index, name in enumerate(names, start=1):
            address = f"127.0.0.{FIRST_HOST_OCTET + index - 1}"
            user = self._create_user(tag, index, skel)
            pw = pwd.getpwnam(user)
            host = FleetHost(name=name, user=user, address=address, port=0,
                             home=Path(pw.pw_dir), uid=pw.pw_uid,
                             hostdir=self.workdir / name)
            self.hosts.append(host)
            _prepare_home(host, pw.pw_gid, public)
            host.hostdir.mkdir(exist_ok=True)
            _keygen(host.host_key, f"{name}-hostkey")
        _start_on_free_ports(self.hosts, extra)
        self.write_known_hosts()

    def _create_user(self, tag: str, index: int, skel: Path) -> str:
        for _ in range(20):
            user = f"ln{tag}n{index}"
            # -p '*': no password, yet not locked, so key login works with UsePAM no
            rc = _retrying(["useradd", "-m", "-k", str(skel), "-s", "/bin/sh", "-p", "*",
                            "-c", _owner_tag(), user], ok=(0, 9))
            if rc == 0:
                return user
            tag = secrets.token_hex(2)  # 9: name taken by a concurrent session
        raise FleetError("could not create a unique test user")

    def _teardown(self) -> None:
        """Kill every sshd, then every process of our users, then remove the users."""
        errors = []
        for host in self.hosts:
            try:
                host.stop()
            except Exception as exc:  # keep tearing the others down
                errors.append(f"{host.name}: {exc}")
        _kill_user_processes(*(host.uid for host in self.hosts))
        for host in self.hosts:
            try:
                _remove_user(host.user)
            except Exception as exc:
                errors.append(f"{host.name}: {exc}")
        if errors:
            raise FleetError("teardown: " + "; ".join(errors))


def _keygen(path: Path, comment: str) -> None:
    if path.exists():
        path.unlink()
        path.with_suffix(".pub").unlink(missing_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment,
                    "-f", str(path)], check=True, capture_output=True)


def _prepare_home(host: FleetHost, gid: int, public_key: str) -> None:
    """Empty profile, ~/.ssh/authorized_keys with the client key, owned by the user."""
    profile = host.home / ".profile"
    profile.write_text("")
    ssh_dir = host.home / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    auth = ssh_dir / "authorized_keys"
    auth.write_text(public_key)
    auth.chmod(0o600)
    for path in (host.home, profile, ssh_dir, auth):
        os.chown(path, host.uid, gid)


def _start_on_free_ports(hosts: Sequence[FleetHost], extra: Sequence[str]) -> None:
    """Start every sshd at once on a free port; re-pick the port of any that cannot bind."""
    pending = list(hosts)
    why = ""
    for _ in range(_START_ATTEMPTS):
        for host in pending:
            host.port = _free_port(host.address)
            host._write_config(extra)
            host._launch()
        failed = []
        for host in pending:
            reason = host._wait_ready()
            if reason is not None:
                failed.append(host)
                why = f"{host.name}: {reason}"
        if not failed:
            return
        pending = failed
    raise FleetError(f"could not start sshd: {why}")
