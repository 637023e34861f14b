"""Typed, immutable model of the cluster topology and experiment specs.

Everything here is a plain value: parsing and validation live in ``topology.py`` and
``specs.py``; nothing in this module does I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

LOCAL_HOSTS = frozenset({"localhost", "local"})


class NodeType(str, enum.Enum):
    """Hardware family of a node; decides defaults such as unified memory."""

    JETSON_ORIN = "jetson_orin"
    RASPBERRY_PI = "raspberry_pi"
    HOST = "host"
    GENERIC = "generic"


class RecoverPolicy(str, enum.Enum):
    """What happens to an experiment whose node is lost or whose restarts are exhausted."""

    CLUSTER = "cluster"
    PAUSE = "pause"
    NONE = "none"


class Strategy(str, enum.Enum):
    """Placement strategy; only the reference points system exists for now."""

    SCORE = "score"


@dataclass(frozen=True)
class NodeConfig:
    """One node of the topology, exactly as the user declared it."""

    name: str
    host: str
    type: NodeType = NodeType.GENERIC
    description: str = ""
    ram_gb: float = 0.0
    gpu: bool = False
    gpu_memory_gb: float = 0.0
    cpu_cores: int = 1
    max_instances: int = 1
    reserved_ram_gb: float = 0.0
    ssh_user: str | None = None
    ssh_port: int = 22
    ssh_key_path: str | None = None
    remote_work_dir: str = "~/lab-orchestrator"
    python_path: str = "python3"
    monitor_port: int | None = None
    enabled: bool = True
    tags: frozenset[str] = frozenset()
    unified_memory: bool = False

    @property
    def is_local(self) -> bool:
        """True when commands run through the local transport instead of SSH."""
        return self.host in LOCAL_HOSTS

    @property
    def available_ram_gb(self) -> float:
        """RAM that experiments may use: declared RAM minus the OS reserve."""
        return self.ram_gb - self.reserved_ram_gb


@dataclass(frozen=True)
class ClusterSection:
    name: str = "lab-cluster"
    coordinator_host: str = "localhost"


@dataclass(frozen=True)
class PortRange:
    start: int
    end: int


@dataclass(frozen=True)
class NetworkSection:
    """Reserved for peer networking between experiments; validated and recorded."""

    subnets: tuple[str, ...] = ()
    peer_port_range: PortRange | None = None


@dataclass(frozen=True)
class DefaultsSection:
    """Resource defaults for specs that omit them."""

    ram_gb: float = 1.0
    gpu_required: bool = False
    gpu_memory_gb: float = 0.0
    cpu_cores: float = 0.0


@dataclass(frozen=True)
class HealthChecks:
    """Thresholds that turn a reachable node DEGRADED."""

    memory_percent: float = 90.0
    disk_free_gb: float = 1.0
    temperature_c: float = 85.0


@dataclass(frozen=True)
class HealthCheckSection:
    enabled: bool = True
    interval_seconds: float = 30.0
    timeout_seconds: float = 10.0
    keepalive_seconds: float = 5.0
    keepalive_count_max: int = 3
    checks: HealthChecks = HealthChecks()
    known_hosts: str | None = None
    accept_new_host_keys: bool = False
    reconnect_attempts: int = 3
    disconnected_grace_seconds: float = 60.0


@dataclass(frozen=True)
class FailoverSection:
    enabled: bool = True
    auto_restart: bool = True
    max_retries: int | None = None
    retry_delay_seconds: float = 5.0


@dataclass(frozen=True)
class LoggingSection:
    log_dir: str = "logs"
    level: str = "INFO"


@dataclass(frozen=True)
class PlacementSection:
    strategy: Strategy = Strategy.SCORE
    preferences: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeploySection:
    """What ``--deploy-all`` copies: the source tree and extra exclude rules."""

    source: str | None = None
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class Cluster:
    """The whole parsed topology. ``path`` is the file it came from."""

    path: Path
    nodes: tuple[NodeConfig, ...]
    cluster: ClusterSection = ClusterSection()
    network: NetworkSection = NetworkSection()
    defaults: DefaultsSection = DefaultsSection()
    health_check: HealthCheckSection = HealthCheckSection()
    failover: FailoverSection = FailoverSection()
    logging: LoggingSection = LoggingSection()
    placement: PlacementSection = PlacementSection()
    deploy: DeploySection = DeploySection()

    def node(self, name: str) -> NodeConfig:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    @property
    def node_names(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.nodes)

    @property
    def root(self) -> Path:
        """Directory holding the config: the project tree that gets deployed."""
        return self.path.parent

    @property
    def deploy_source(self) -> Path:
        if self.deploy.source is None:
            return self.root
        src = Path(self.deploy.source).expanduser()
        return src if src.is_absolute() else (self.root / src)

    @property
    def log_dir(self) -> Path:
        p = Path(self.logging.log_dir).expanduser()
        return p if p.is_absolute() else (self.root / p)


@dataclass(frozen=True)
class ExperimentSpec:
    """One experiment instance to place and run."""

    experiment_id: str
    command: str
    source: Path
    workdir: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    ram_gb: float = 1.0
    gpu_required: bool = False
    gpu_memory_gb: float = 0.0
    cpu_cores: float = 0.0
    preferred_node: str | None = None
    affinity: tuple[str, ...] = ()
    anti_affinity: tuple[str, ...] = ()
    results: tuple[str, ...] = ()
    recover: RecoverPolicy = RecoverPolicy.CLUSTER
    max_retries: int | None = None
    auto_restart: bool | None = None
    description: str = ""
    params: tuple[tuple[str, object], ...] = field(default=(), compare=False)
    extra: tuple[tuple[str, object], ...] = field(default=(), compare=False)

    @property
    def ram_demand_unified(self) -> float:
        """What the instance draws from a unified-memory pool: RAM plus GPU memory."""
        return self.ram_gb + (self.gpu_memory_gb if self.gpu_required else 0.0)
