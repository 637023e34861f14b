"""Typed, immutable model of the cluster topology and experiment specs.

Everything here is a plain value: parsing and validation live in ``topology.py`` and
``specs.py``; nothing in this module does I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from infra.campaign.model import CampaignSpec, SweepSpec
from infra.config.project import resolve_deploy_source

LOCAL_HOSTS = frozenset({"localhost", "local"})
# What every node runs unless it says otherwise: processes started on the host by the supervisor.
DEFAULT_RUNTIME_DRIVERS = ("host_local",)
DEFAULT_MAX_DELETES = 50
DEFAULT_MAX_TASKS = 10000
"""Largest sweep a spec may expand to unless ``campaigns.max_tasks`` says otherwise."""
"""A ``--delete`` deploy removing more files or directories than this on a node needs --yes."""


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
    """Placement strategy: the reference points system, or Nomad-style bin packing / spreading."""

    SCORE = "score"
    BINPACK = "binpack"
    SPREAD = "spread"


class JobType(str, enum.Enum):
    """Nomad-style job type: system/sysbatch run one copy on every eligible node."""

    SERVICE = "service"
    BATCH = "batch"
    SYSTEM = "system"
    SYSBATCH = "sysbatch"


class PortProtocol(str, enum.Enum):
    """Protocol of an explicitly reserved port (recorded; the port number is what conflicts)."""

    TCP = "tcp"
    UDP = "udp"
    HTTP = "http"
    GRPC = "grpc"


class VolumeMode(str, enum.Enum):
    """Access mode of a host volume (recorded and passed on; nothing is mounted)."""

    RO = "ro"
    RW = "rw"


class Operator(str, enum.Enum):
    """Constraint operators (Nomad's set): compare a node attribute with a value."""

    EQ = "="
    NE = "!="
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="
    REGEXP = "regexp"
    VERSION = "version"
    SET_CONTAINS = "set_contains"
    SET_CONTAINS_ANY = "set_contains_any"
    IS_SET = "is_set"
    IS_NOT_SET = "is_not_set"
    DISTINCT_HOSTS = "distinct_hosts"


# A node attribute value: scalars, or a set of strings (tags, list attributes).
AttrValue = str | int | float | bool | frozenset[str]


@dataclass(frozen=True)
class NodeDevice:
    """One device a node offers (declared in the topology or detected by the probe)."""

    id: str
    kind: str = "gpu"
    vendor: str | None = None
    driver: str | None = None
    memory_mb: float | None = None
    capabilities: frozenset[str] = frozenset()
    index: int | None = None  # CUDA/ROCm device index when known

    def describe(self) -> str:
        """Short human form, e.g. ``gpu0: nvidia cuda 8192 MB``."""
        bits = [b for b in (self.vendor, self.driver) if b]
        if self.memory_mb is not None:
            bits.append(f"{self.memory_mb:g} MB")
        return f"{self.id}: {' '.join(bits)}" if bits else self.id


@dataclass(frozen=True)
class Constraint:
    """A placement constraint: ``attribute operator value`` over node attributes.

    A plain string constraint in a file becomes ``tags set_contains <tag>`` with ``tag`` set,
    so its rejection reads "needs tag cuda".
    """

    attribute: str
    operator: Operator
    value: str | None = None
    tag: str | None = None

    def describe(self) -> str:
        """The constraint as the user would read it."""
        if self.tag is not None:
            return f"tag {self.tag}"
        if self.operator in (Operator.IS_SET, Operator.IS_NOT_SET):
            return f"{self.attribute} {self.operator.value}"
        if self.operator is Operator.DISTINCT_HOSTS:
            return "distinct_hosts" + ("" if self.value in (None, "true") else f" {self.value}")
        return f"{self.attribute} {self.operator.value} {self.value}"

    def to_json(self) -> Any:
        """Plain JSON form (a string for a tag constraint), as a spec file would hold it."""
        if self.tag is not None:
            return self.tag
        doc: dict[str, Any] = {"attribute": self.attribute, "operator": self.operator.value}
        if self.value is not None:
            doc["value"] = self.value
        return doc

    @classmethod
    def from_json(cls, doc: Any) -> Constraint:
        """Inverse of ``to_json`` (trusted input: documents this program wrote)."""
        if isinstance(doc, str):
            return tag_constraint(doc)
        value = doc.get("value")
        return cls(str(doc.get("attribute", "")), Operator(doc["operator"]),
                   None if value is None else str(value))


def tag_constraint(tag: str) -> Constraint:
    """The constraint a plain string stands for: the node must advertise ``tag``."""
    return Constraint("tags", Operator.SET_CONTAINS, tag, tag=tag)


@dataclass(frozen=True)
class DeviceRequest:
    """``count`` devices of ``kind`` matching every given filter, allocated by id."""

    kind: str = "gpu"
    count: int = 1
    vendor: str | None = None
    driver: str | None = None
    min_memory_mb: float = 0.0
    capabilities: frozenset[str] = frozenset()
    ids: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"kind": self.kind, "count": self.count}
        if self.vendor is not None:
            doc["vendor"] = self.vendor
        if self.driver is not None:
            doc["driver"] = self.driver
        if self.min_memory_mb:
            doc["min_memory_mb"] = self.min_memory_mb
        if self.capabilities:
            doc["capabilities"] = sorted(self.capabilities)
        if self.ids:
            doc["ids"] = list(self.ids)
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> DeviceRequest:
        return cls(kind=str(doc.get("kind", "gpu")), count=int(doc.get("count", 1)),
                   vendor=doc.get("vendor"), driver=doc.get("driver"),
                   min_memory_mb=float(doc.get("min_memory_mb") or 0.0),
                   capabilities=frozenset(doc.get("capabilities") or ()),
                   ids=tuple(doc.get("ids") or ()))


@dataclass(frozen=True)
class PortRequest:
    """One explicit port to reserve on the node, under a label (``INFRA_PORT_<LABEL>``)."""

    label: str
    port: int
    protocol: PortProtocol = PortProtocol.TCP


@dataclass(frozen=True)
class VolumeRequest:
    """A host path the instance needs on its node; recorded and passed on, never mounted."""

    name: str
    source: str
    target: str
    mode: VolumeMode = VolumeMode.RO
    type: str = "host"


@dataclass(frozen=True)
class ResourceRequest:
    """The rich part of a spec's ``resources`` (CPU and memory live on the spec itself)."""

    disk_gb: float = 0.0
    devices: tuple[DeviceRequest, ...] = ()
    ports: tuple[PortRequest, ...] = ()
    volumes: tuple[VolumeRequest, ...] = ()
    runtime_driver: str | None = None

    @property
    def empty(self) -> bool:
        return self == ResourceRequest()

    def to_json(self) -> dict[str, Any]:
        """JSON form for the state store (``from_json`` reads it back)."""
        doc: dict[str, Any] = {}
        if self.disk_gb:
            doc["disk_gb"] = self.disk_gb
        if self.devices:
            doc["devices"] = [d.to_json() for d in self.devices]
        if self.ports:
            doc["ports"] = [{"label": p.label, "port": p.port, "protocol": p.protocol.value}
                            for p in self.ports]
        if self.volumes:
            doc["volumes"] = [{"name": v.name, "source": v.source, "target": v.target,
                               "mode": v.mode.value, "type": v.type} for v in self.volumes]
        if self.runtime_driver is not None:
            doc["runtime_driver"] = self.runtime_driver
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any] | None) -> ResourceRequest:
        """Inverse of ``to_json`` (trusted input: documents this program wrote)."""
        if not doc:
            return cls()
        return cls(
            disk_gb=float(doc.get("disk_gb") or 0.0),
            devices=tuple(DeviceRequest.from_json(d) for d in doc.get("devices") or ()),
            ports=tuple(PortRequest(str(p["label"]), int(p["port"]),
                                    PortProtocol(p.get("protocol", "tcp")))
                        for p in doc.get("ports") or ()),
            volumes=tuple(VolumeRequest(str(v["name"]), str(v["source"]), str(v["target"]),
                                        VolumeMode(v.get("mode", "ro")), str(v.get("type", "host")))
                          for v in doc.get("volumes") or ()),
            runtime_driver=doc.get("runtime_driver"),
        )


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
    scheduling_eligible: bool = True
    attributes: tuple[tuple[str, AttrValue], ...] = ()
    devices: tuple[NodeDevice, ...] = ()
    host_paths: tuple[str, ...] = ()
    runtime_drivers: tuple[str, ...] = DEFAULT_RUNTIME_DRIVERS
    disk_gb: float | None = None
    claims_dir: str | None = None  # node path of the claims directory; None: per account

    @property
    def is_local(self) -> bool:
        """True when commands run through the local transport instead of SSH."""
        return self.host in LOCAL_HOSTS

    @property
    def available_ram_gb(self) -> float:
        """RAM that experiments may use: declared RAM minus the OS reserve."""
        return self.ram_gb - self.reserved_ram_gb


@dataclass(frozen=True)
class SlurmOptions:
    """A spec's ``slurm`` section: used only when the spec runs on a Slurm target."""

    time_limit: str | None = None  # Slurm duration text; overrides the target's
    signal: str | None = None  # ``[B:|R:]SIG[@SECONDS]``, given to sbatch as ``--signal``

    def to_json(self) -> dict[str, Any]:
        """JSON form for the state store (only the keys that are set)."""
        doc: dict[str, Any] = {}
        if self.time_limit is not None:
            doc["time_limit"] = self.time_limit
        if self.signal is not None:
            doc["signal"] = self.signal
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> SlurmOptions:
        """Inverse of ``to_json`` (trusted input: documents this program wrote)."""
        time_limit, sig = doc.get("time_limit"), doc.get("signal")
        return cls(time_limit=None if time_limit is None else str(time_limit),
                   signal=None if sig is None else str(sig))


DEFAULT_SLURM_TIME_LIMIT = "01:00:00"


@dataclass(frozen=True)
class SlurmTarget:
    """A Slurm cluster reached through its login host: work goes there only when pinned.

    Not a node: probing, health, placement and deploys of bench nodes never see it (it
    lives in ``Cluster.slurm_targets``, not ``Cluster.nodes``); Slurm owns its resources.
    """

    name: str
    host: str
    ssh_user: str | None = None
    ssh_port: int = 22
    ssh_key_path: str | None = None
    remote_work_dir: str = "~/lab-orchestrator"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_limit: str = DEFAULT_SLURM_TIME_LIMIT
    description: str = ""
    enabled: bool = True

    def login_node(self) -> NodeConfig:
        """The login host as a node, so SSH connections, rsync deploys and results work
        unchanged; never eligible for placement (it is no bench node)."""
        return NodeConfig(name=self.name, host=self.host, description=self.description,
                          ssh_user=self.ssh_user, ssh_port=self.ssh_port,
                          ssh_key_path=self.ssh_key_path, remote_work_dir=self.remote_work_dir,
                          enabled=self.enabled, scheduling_eligible=False)


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
    lease_seconds: float = 30.0  # a watcher's hold on its run without renewal (live loop)


@dataclass(frozen=True)
class FailoverSection:
    enabled: bool = True
    auto_restart: bool = True
    max_retries: int | None = None
    retry_delay_seconds: float = 5.0
    fence_timeout_seconds: float = 60.0  # 0: no fencing


@dataclass(frozen=True)
class LoggingSection:
    log_dir: str = "logs"
    level: str = "INFO"


@dataclass(frozen=True)
class PlacementSection:
    """Scheduler settings: strategy, tie-break node order, constraints for every instance."""

    strategy: Strategy = Strategy.SCORE
    preferences: tuple[str, ...] = ()
    constraints: tuple[Constraint, ...] = ()


@dataclass(frozen=True)
class DeploySection:
    """What deploys copy (source, excludes) and what they must never delete on a node.

    ``protect`` are rsync patterns kept from ``--delete``; a ``--delete`` deploy that would
    remove more than ``max_deletes`` files or directories on a node is refused unless confirmed.
    """

    source: str | None = None
    exclude: tuple[str, ...] = ()
    protect: tuple[str, ...] = ()
    max_deletes: int = DEFAULT_MAX_DELETES


@dataclass(frozen=True)
class CampaignsSection:
    """Limits on campaigns: ``max_tasks`` bounds the tasks one sweep may expand to."""

    max_tasks: int = DEFAULT_MAX_TASKS


@dataclass(frozen=True)
class TelemetrySection:
    """Node-side sampling of each instance: ``interval_seconds`` between samples (0: off)."""

    interval_seconds: float = 1.0


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
    campaigns: CampaignsSection = CampaignsSection()
    telemetry: TelemetrySection = TelemetrySection()
    slurm_targets: tuple[SlurmTarget, ...] = ()  # never in ``nodes``
    entry_names: tuple[str, ...] = field(default=(), compare=False)
    """Names of the ``nodes:`` entries in file order (nodes and targets): ``nodes[i]`` in
    messages."""

    def entry_key(self, name: str) -> str:
        """``nodes[i]``: where the node or target ``name`` is in the file."""
        if name in self.entry_names:
            return f"nodes[{self.entry_names.index(name)}]"
        return f"nodes[{name}]"

    def node(self, name: str) -> NodeConfig:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    @property
    def node_names(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.nodes)

    def slurm_target(self, name: str) -> SlurmTarget | None:
        """The Slurm target called ``name``, or None (a bench node or nothing)."""
        return next((t for t in self.slurm_targets if t.name == name), None)

    @property
    def slurm_target_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.slurm_targets)

    def with_strategy(self, strategy: Strategy) -> Cluster:
        """The same cluster placing with ``strategy`` (the ``--strategy`` flag)."""
        return replace(self, placement=replace(self.placement, strategy=strategy))

    @property
    def root(self) -> Path:
        """Directory holding the config: relative paths in it are relative to this."""
        return self.path.parent

    @property
    def deploy_source(self) -> Path:
        """The project tree deploys copy: ``deploy.source``, else the current directory
        (its git top-level inside a git work tree); raises ``ConfigError`` for a source that
        is missing, too broad (home, root) or, by default, not a project
        (``infra.config.project``)."""
        return resolve_deploy_source(self.path, self.deploy.source, Path.cwd())

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
    resources: ResourceRequest = ResourceRequest()
    constraints: tuple[Constraint, ...] = ()
    job_type: JobType = JobType.BATCH
    template_id: str | None = None  # system/sysbatch copy or sweep task: the spec it came from
    after: tuple[str, ...] = ()  # start only when these ended successfully
    after_any: tuple[str, ...] = ()  # start only when these ended at all
    priority: int = 0  # higher first between runs and campaigns
    campaign: CampaignSpec | None = None  # every sweep task; a spec with suite/queue keys
    task_index: int | None = None  # a sweep task's index (0-based)
    sweep: SweepSpec | None = None  # the template only: expanded before planning
    slurm: SlurmOptions | None = None  # used only on a Slurm target (bench nodes ignore it)

    @property
    def ram_demand_unified(self) -> float:
        """What the instance draws from a unified-memory pool: RAM plus GPU memory."""
        return self.ram_gb + (self.gpu_memory_gb if self.gpu_required else 0.0)
