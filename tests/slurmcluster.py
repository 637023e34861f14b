"""A real single-node Slurm cluster for the tests: ``munged``, ``slurmctld`` and ``slurmd``.

``SlurmCluster.start()`` writes a munge key and a minimal ``slurm.conf`` for this machine
into a private directory under /tmp (world-readable: jobs and clients run as the fleet's
Unix users), starts the three daemons in the foreground as children of this process, waits
until the one node is IDLE and, on exit, cancels every job, stops the daemons and removes the
directory.  Client commands find the cluster through ``SLURM_CONF`` (``cluster.env``).

Concurrent pytest sessions never collide: each cluster has its own ClusterName, its own
ports picked free on 127.0.0.1 (re-picked when a daemon cannot bind), its own munged socket
and key, and its own state/spool/log files.  The daemons listen on loopback only
(``CommunicationParameters=NoInAddrAny,NoCtldInAddrAny``).

Memory limits (``--mem``) are enforced as on most real clusters when this machine has the
cgroup v1 memory and freezer controllers mounted (``task/cgroup`` + ``proctrack/cgroup``,
``ConstrainRAMSpace``: the kernel kills the job, Slurm says OUT_OF_MEMORY); otherwise without
cgroups (``jobacct_gather/linux`` samples every second and ``OverMemoryKill`` kills the job:
Slurm 22.05 then says FAILED, ExitCode 0:9).  ``INFRA_SLURM_MEMORY=cgroup|jobacct`` forces
one; see tests/fixtures/slurm/ for what each looks like.  The node is named after the cluster
(``slurmd -N``), so each cluster's cgroups (``slurm_<node>``) are its own.

Needs root and Debian's ``slurm-wlm`` and ``munge`` packages (scripts/test.sh installs them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import psutil

from tests.sshfleet import FleetHost, SSHFleet

DAEMONS = {"munged": "/usr/sbin/munged", "slurmctld": "/usr/sbin/slurmctld",
           "slurmd": "/usr/sbin/slurmd"}
CLIENTS = ("sbatch", "scontrol", "sinfo", "squeue", "scancel", "sacct")
NODE_CPUS = 8
NODE_MEMORY_MB = 4096
DEF_MEM_PER_CPU_MB = 256
"""A job without ``--mem`` gets 256 MB per CPU, so eight one-CPU jobs fit at once (without a
default each job would take the whole node's memory and jobs would run one at a time)."""
PARTITION = "debug"
CGROUP_ROOT = Path("/sys/fs/cgroup")
MEMORY_ENV = "INFRA_SLURM_MEMORY"
CGROUP, JOBACCT = "cgroup", "jobacct"
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
_START_ATTEMPTS = 5
_MARKER = "INFRA_TEST_SLURM_CLUSTER"
"""Set in the daemons' environment: finds what they start (slurmstepd does not inherit it)."""
TERMINAL_STATES = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
    "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT",
})


class SlurmClusterError(RuntimeError):
    """The cluster could not start (the message carries the daemons' log tails)."""


WORKDIR_PREFIX = "infra-slurm-"
OWNER_FILE = "owner"
"""In each cluster's directory: ``pid=N start=T`` of the pytest process that started it."""


def _owner_tag() -> str:
    me = psutil.Process()
    return f"pid={me.pid} start={me.create_time():.2f}\n"


def _owner_alive(tag: str) -> bool:
    match = re.search(r"pid=(\d+) start=([\d.]+)", tag)
    if match is None:
        return False
    try:
        return abs(psutil.Process(int(match.group(1))).create_time()
                   - float(match.group(2))) < 0.05
    except psutil.Error:
        return False


def reap_stale_clusters(tmp: Path = Path("/tmp")) -> list[Path]:
    """Stop and remove the clusters of pytest sessions that died without tearing them down
    (killed by a timeout, say): their daemons run in sessions of their own and survive."""
    stale = []
    for workdir in tmp.glob(f"{WORKDIR_PREFIX}*"):
        try:
            tag = (workdir / OWNER_FILE).read_text()
            conf = (workdir / "slurm.conf").read_text()
        except OSError:
            continue  # being set up or torn down right now, or not ours
        if _owner_alive(tag):
            continue
        names = re.search(r"^ClusterName=(\S+)", conf, re.M)
        nodes = re.search(r"^NodeName=(\S+)", conf, re.M)
        if names is None or nodes is None:
            continue
        cluster = SlurmCluster(workdir=workdir, name=names.group(1), node=nodes.group(1))
        cluster._kill_strays()
        cluster._remove_cgroups()
        shutil.rmtree(workdir, ignore_errors=True)
        stale.append(workdir)
    return stale


def unavailable_reason() -> str | None:
    """Why a Slurm cluster cannot start here, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "the Slurm cluster needs Linux"
    if os.geteuid() != 0:
        return "the Slurm cluster needs root (slurmd runs jobs as other users)"
    missing = [path for path in DAEMONS.values() if not os.access(path, os.X_OK)]
    missing += [tool for tool in CLIENTS if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)} (apt-get install slurm-wlm munge)"
    return None


def memory_enforcement() -> str:
    """``cgroup`` when the cgroup v1 memory and freezer controllers are mounted (and
    INFRA_SLURM_MEMORY does not say ``jobacct``), else ``jobacct`` (OverMemoryKill)."""
    forced = os.environ.get(MEMORY_ENV, "")
    if forced in (CGROUP, JOBACCT):
        return forced
    if forced:
        raise SlurmClusterError(f"{MEMORY_ENV}={forced!r}: expected {CGROUP} or {JOBACCT}")
    usable = all(os.access(CGROUP_ROOT / controller / "cgroup.procs", os.W_OK)
                 for controller in ("memory", "freezer"))
    return CGROUP if usable else JOBACCT


def short_hostname() -> str:
    """This machine's short host name: SlurmctldHost and the node's NodeHostname."""
    return socket.gethostname().split(".", 1)[0]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def parse_show_job(line: str) -> dict[str, str]:
    """``scontrol show job -o`` (one job per line) as a dict of its ``Key=Value`` fields."""
    fields: dict[str, str] = {}
    for token in line.split():
        key, sep, value = token.partition("=")
        if sep:
            fields[key] = value
    return fields


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"({exc})"


@dataclasses.dataclass(eq=False)
class SlurmCluster:
    """One running single-node cluster; the client commands reach it through ``env``."""

    workdir: Path
    name: str
    node: str
    """The NodeName (``slurmd -N``): the cluster's name plus ``n1``, this machine underneath."""
    memory: str = JOBACCT
    """How ``--mem`` is enforced: ``cgroup`` (OUT_OF_MEMORY) or ``jobacct`` (FAILED 0:9)."""
    ctld_port: int = 0
    slurmd_port: int = 0
    _procs: dict[str, subprocess.Popen[bytes]] = dataclasses.field(default_factory=dict,
                                                                    repr=False)

    @property
    def conf(self) -> Path:
        return self.workdir / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.workdir / "munge" / "munge.socket"

    @property
    def env(self) -> dict[str, str]:
        """What a client command needs in its environment to reach this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def log_path(self, daemon: str) -> Path:
        """The log file of ``munged``, ``slurmctld`` or ``slurmd``."""
        return self.workdir / "log" / f"{daemon}.log"

    def log_tails(self, chars: int = 2000) -> str:
        """The end of every daemon's log and stderr, for a failure message."""
        paths = [p for daemon in DAEMONS
                 for p in (self.log_path(daemon), self.log_path(daemon).with_suffix(".stderr"))
                 if p.exists()]
        return "\n".join(f"--- {path}:\n{_tail(path, chars)}" for path in paths)

    def pids(self) -> dict[str, int]:
        """The pid of each daemon that is running now."""
        return {name: proc.pid for name, proc in self._procs.items() if proc.poll() is None}

    # client side -----------------------------------------------------------------------

    def run(self, *argv: str, timeout: float = 60.0,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command here, as root, against this cluster."""
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **self.env}, check=False)
        if check and proc.returncode != 0:
            raise SlurmClusterError(f"{' '.join(argv)} exited {proc.returncode}: "
                                    f"{proc.stderr.strip()}")
        return proc

    def show_job(self, job_id: str) -> list[dict[str, str]]:
        """``scontrol show job -o ID`` parsed: one dict per job (an array gives one per task)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return [parse_show_job(line) for line in out.splitlines() if line.strip()]

    def wait_job(self, job_id: str, states: Sequence[str] | None = None,
                 timeout: float = 180.0) -> list[dict[str, str]]:
        """Wait until every task of the job is in ``states`` (default: any terminal state)."""
        wanted = frozenset(states) if states is not None else TERMINAL_STATES
        deadline = time.monotonic() + timeout
        jobs: list[dict[str, str]] = []
        while time.monotonic() < deadline:
            jobs = self.show_job(job_id)
            if jobs and all(job.get("JobState") in wanted for job in jobs):
                return jobs
            time.sleep(0.5)
        seen = [(job.get("JobId"), job.get("JobState"), job.get("Reason")) for job in jobs]
        raise AssertionError(f"job {job_id} not in {sorted(wanted)} after {timeout:g} s: "
                             f"{seen}")

    def node_state(self) -> str:
        """The node's state as ``scontrol show node`` says it (IDLE, MIXED, DOWN+...)."""
        out = self.run("scontrol", "show", "node", "-o", self.node, timeout=20.0).stdout
        return parse_show_job(out).get("State", "")

    # configuration ---------------------------------------------------------------------

    def config_text(self) -> str:
        """The slurm.conf of this cluster."""
        w = self.workdir
        lines = [
            f"ClusterName={self.name}",
            f"SlurmctldHost={short_hostname()}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "CredType=cred/munge",
            # loopback only: without these slurmctld listens on every interface
            "CommunicationParameters=NoInAddrAny,NoCtldInAddrAny",
            f"StateSaveLocation={w / 'state'}",
            f"SlurmdSpoolDir={w / 'spool'}",
            f"SlurmctldPidFile={w / 'slurmctld.pid'}",
            f"SlurmdPidFile={w / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.log_path('slurmctld')}",
            f"SlurmdLogFile={self.log_path('slurmd')}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            *self._memory_lines(),
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            f"DefMemPerCPU={DEF_MEM_PER_CPU_MB}",
            "JobAcctGatherType=jobacct_gather/linux",
            "JobAcctGatherFrequency=1",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "MinJobAge=3600",  # finished jobs stay visible in `scontrol show job` for an hour
            "KillWait=2",
            "OverTimeLimit=0",
            "InactiveLimit=0",
            "SlurmctldTimeout=300",
            "SlurmdTimeout=300",
            "SlurmdParameters=config_overrides",  # 8 CPUs / 4 GB whatever the box has
            "SchedulerType=sched/backfill",
            f"NodeName={self.node} NodeHostname={short_hostname()} NodeAddr=127.0.0.1 "
            f"CPUs={NODE_CPUS} "
            f"RealMemory={NODE_MEMORY_MB} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]
        return "\n".join(lines) + "\n"

    def _memory_lines(self) -> list[str]:
        """slurm.conf lines that enforce ``--mem`` the chosen way."""
        if self.memory == CGROUP:
            return ["ProctrackType=proctrack/cgroup", "TaskPlugin=task/cgroup"]
        return ["ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
                "JobAcctGatherParams=OverMemoryKill"]

    def cgroup_text(self) -> str:
        """cgroup.conf (read from slurm.conf's directory) for the ``cgroup`` mode."""
        return "\n".join([
            "CgroupPlugin=cgroup/v1",
            f"CgroupMountpoint={CGROUP_ROOT}",
            "CgroupAutomount=no",
            "ConstrainRAMSpace=yes",
            "ConstrainSwapSpace=no",
            "ConstrainCores=no",
            "ConstrainDevices=no",
        ]) + "\n"

    def cgroup_dirs(self) -> list[Path]:
        """This cluster's cgroup directories (``slurm_<node>`` under each controller)."""
        return sorted(CGROUP_ROOT.glob(f"*/slurm_{self.node}"))

    def _remove_cgroups(self) -> None:
        """rmdir our (by then empty) cgroup trees, deepest first; they are this node's own."""
        for top in self.cgroup_dirs():
            inner = sorted((p for p in top.rglob("*") if p.is_dir()),
                           key=lambda p: len(p.parts), reverse=True)
            for folder in [*inner, top]:
                with contextlib.suppress(OSError):
                    folder.rmdir()

    def _prepare(self) -> None:
        """Directories, munge key and an (empty) log per daemon."""
        self.workdir.chmod(0o755)  # clients run as the fleet users: conf and socket readable
        for sub in ("munge", "state", "spool", "log"):
            (self.workdir / sub).mkdir(mode=0o755, exist_ok=True)
        key = self.workdir / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        if self.memory == CGROUP:
            (self.workdir / "cgroup.conf").write_text(self.cgroup_text())

    # daemons ---------------------------------------------------------------------------

    def _launch(self, name: str, argv: Sequence[str]) -> None:
        daemon_env = {**os.environ, **self.env, _MARKER: self.name}
        # munged --foreground logs to stderr; the Slurm daemons to their LogFile (stderr only
        # for what fails before they open it)
        out_path = self.log_path(name)
        if name != "munged":
            out_path = out_path.with_suffix(".stderr")
        with open(out_path, "ab") as out:
            self._procs[name] = subprocess.Popen(
                [DAEMONS[name], *argv], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, env=daemon_env, start_new_session=True)

    def _start_munged(self) -> None:
        m = self.workdir / "munge"
        self._launch("munged", ["--foreground", "--force", f"--socket={self.munge_socket}",
                                f"--key-file={m / 'munge.key'}", f"--pid-file={m / 'munged.pid'}",
                                f"--seed-file={m / 'munged.seed'}", "--num-threads=4"])
        self._wait("munged", self.munge_socket.exists, "its socket")

    def _wait(self, name: str, ready: object, what: str) -> None:
        """Wait until ``ready()`` is true while daemon ``name`` runs; else raise with logs."""
        assert callable(ready)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            proc = self._procs[name]
            if proc.poll() is not None:
                raise SlurmClusterError(f"{name} exited {proc.returncode} before {what}\n"
                                        f"{self.log_tails()}")
            with contextlib.suppress(subprocess.SubprocessError, SlurmClusterError):
                if ready():
                    return
            time.sleep(0.2)
        raise SlurmClusterError(f"{name}: no {what} after {READY_TIMEOUT_S:g} s\n"
                                f"{self.log_tails()}")

    def _listening(self, name: str, port: int) -> bool:
        try:
            conns = psutil.Process(self._procs[name].pid).net_connections(kind="tcp")
        except psutil.Error:
            return False
        return any(c.status == psutil.CONN_LISTEN and c.laddr[1] == port for c in conns)

    def _start_slurm(self) -> None:
        """slurmctld then slurmd on free ports (re-picked when one cannot bind)."""
        why = ""
        for _ in range(_START_ATTEMPTS):
            self.ctld_port, self.slurmd_port = _free_port(), _free_port()
            if self.ctld_port == self.slurmd_port:
                continue
            self.conf.write_text(self.config_text())
            conf = ["-D", "-f", str(self.conf)]
            try:
                self._launch("slurmctld", [*conf, "-i"])
                self._wait("slurmctld", lambda: self._listening("slurmctld", self.ctld_port),
                           f"listener on port {self.ctld_port}")
                self._launch("slurmd", [*conf, "-N", self.node])
                self._wait("slurmd", lambda: self._listening("slurmd", self.slurmd_port),
                           f"listener on port {self.slurmd_port}")
                return
            except SlurmClusterError as exc:
                why = str(exc)
                if "bind" not in why.lower() and "address already in use" not in why.lower():
                    raise
                self._stop_daemons(["slurmd", "slurmctld"])
        raise SlurmClusterError(f"could not start slurmctld/slurmd on free ports: {why}")

    def _wait_idle(self) -> None:
        self._wait("slurmd", lambda: self.node_state() == "IDLE",
                   f"node {self.node} IDLE (state: {self._safe_node_state()})")

    def _safe_node_state(self) -> str:
        with contextlib.suppress(Exception):
            return self.node_state()
        return "?"

    # teardown --------------------------------------------------------------------------

    def _cancel_all_jobs(self) -> None:
        """Cancel every job so that no slurmstepd or job process outlives the cluster."""
        if "slurmctld" not in self.pids():
            return
        with contextlib.suppress(Exception):
            ids = self.run("squeue", "-h", "-o", "%A", timeout=20.0).stdout.split()
            if ids:
                self.run("scancel", *ids, timeout=20.0, check=False)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while time.monotonic() < deadline:
                if not self.run("squeue", "-h", "-t", "R,CG", "-o", "%A",
                                timeout=20.0).stdout.split():
                    return
                time.sleep(0.5)

    def _stop_daemons(self, names: Sequence[str]) -> None:
        for name in names:
            proc = self._procs.pop(name, None)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def strays(self) -> list[psutil.Process]:
        """Live processes of this cluster other than the daemons we hold: slurmstepd (it
        keeps our slurmd log open; slurmd gives it an empty environment) and job processes
        (Slurm gives them SLURM_CLUSTER_NAME)."""
        held = {proc.pid for proc in self._procs.values()} | {os.getpid()}
        ours = str(self.workdir) + os.sep
        found = []
        for proc in psutil.process_iter(["status", "cmdline"]):
            if proc.info.get("status") == psutil.STATUS_ZOMBIE or proc.pid in held:
                continue
            with contextlib.suppress(psutil.Error):
                env = proc.environ()
                if (self.name in (env.get(_MARKER), env.get("SLURM_CLUSTER_NAME"))
                        or any(ours in arg for arg in proc.info.get("cmdline") or [])
                        or any(f.path.startswith(ours) for f in proc.open_files())):
                    found.append(proc)
        return found

    def _kill_strays(self) -> None:
        """SIGKILL every stray until none is left (they may fork meanwhile)."""
        for _ in range(20):
            strays = self.strays()
            if not strays:
                return
            for proc in strays:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            psutil.wait_procs(strays, timeout=2.0)

    def stop(self) -> None:
        """Cancel all jobs, stop slurmd, slurmctld and munged, kill any stray slurmstepd."""
        self._cancel_all_jobs()
        self._stop_daemons(["slurmd", "slurmctld", "munged"])
        self._kill_strays()
        self._remove_cgroups()

    @classmethod
    @contextlib.contextmanager
    def start(cls, memory: str | None = None) -> Iterator[SlurmCluster]:
        """Start a cluster in a fresh directory under /tmp; stop and remove it on exit.

        ``memory``: ``cgroup`` or ``jobacct``; default: ``memory_enforcement()``.
        """
        reason = unavailable_reason()
        if reason is not None:
            raise SlurmClusterError(reason)
        mode = memory or memory_enforcement()
        reap_stale_clusters()
        name = f"t{secrets.token_hex(4)}"
        workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX, dir="/tmp"))
        (workdir / OWNER_FILE).write_text(_owner_tag())
        cluster = cls(workdir=workdir, name=name, node=f"{name}n1", memory=mode)
        # files and daemons readable by the fleet users whatever umask the process has
        # (the CLI's main() sets 077 when a test ran it in-process)
        umask = os.umask(0o022)
        try:
            try:
                cluster._prepare()
                cluster._start_munged()
                cluster._start_slurm()
                cluster._wait_idle()
                os.umask(umask)
            except SlurmClusterError as exc:
                if mode == CGROUP:
                    raise SlurmClusterError(f"{exc}\n(cgroup mode; {MEMORY_ENV}={JOBACCT} "
                                            "runs without cgroups)") from exc
                raise
            yield cluster
        finally:
            os.umask(umask)
            try:
                cluster.stop()
            finally:
                shutil.rmtree(workdir, ignore_errors=True)



@dataclasses.dataclass(frozen=True)
class SlurmLogin:
    """The cluster's login host: a fleet host whose sshd exports ``SLURM_CONF`` to sessions.

    Commands run there as the host's Unix user over the real ssh client; jobs then run as
    that user under slurmd, with their work directory in the user's home (same machine).
    """

    cluster: SlurmCluster
    fleet: SSHFleet
    host: FleetHost

    @property
    def workdir(self) -> Path:
        """A directory in the user's home for job scripts and output files."""
        return self.host.home / "slurm"

    def ssh(self, command: str, stdin: str | None = None, timeout: float = 60.0,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a shell command on the login host as its user."""
        proc = subprocess.run([*self.fleet.ssh_command(self.host), command], input=stdin,
                              capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"ssh {self.host.name} {command!r} exited {proc.returncode}: "
                                 f"{proc.stderr.strip()}")
        return proc

    def sbatch(self, script: str, *options: str) -> str:
        """Submit ``script`` (its text, sent on stdin) from the work directory; the job id."""
        quoted = " ".join(shlex.quote(option) for option in options)
        out = self.ssh(f"mkdir -p {shlex.quote(str(self.workdir))} && "
                       f"cd {shlex.quote(str(self.workdir))} && sbatch --parsable {quoted}",
                       stdin=script).stdout.strip()
        job_id = out.split(";", 1)[0]  # --parsable: "ID" or "ID;cluster"
        if not job_id.isdigit():
            raise AssertionError(f"sbatch printed {out!r}, not a job id")
        return job_id

    def read(self, name: str) -> str:
        """A file of the work directory, read as the user over ssh."""
        return self.ssh(f"cat {shlex.quote(str(self.workdir / name))}").stdout


@contextlib.contextmanager
def login_on(cluster: SlurmCluster, fleet: SSHFleet, host: FleetHost) -> Iterator[SlurmLogin]:
    """Make ``host`` a login host of ``cluster`` (its sshd exports SLURM_CONF) meanwhile."""
    before = dict(host.env)
    host.set_env({**before, **cluster.env})
    try:
        yield SlurmLogin(cluster=cluster, fleet=fleet, host=host)
    finally:
        host.set_env(before)


def max_overlap(spans: list[tuple[float, float]]) -> int:
    """The largest number of (start, end) spans open at one instant."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak
