"""Parse and validate ``cluster_config.yaml`` into a ``Cluster``.

Every key of the reference format is either used or rejected; keys kept for later
features are accepted, validated and documented as reserved (docs/config.md).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from infra.config.model import (
    DEFAULT_MAX_DELETES,
    DEFAULT_MAX_TASKS,
    DEFAULT_RUNTIME_DRIVERS,
    DEFAULT_SLURM_TIME_LIMIT,
    LOCAL_HOSTS,
    CampaignsSection,
    Cluster,
    ClusterSection,
    DefaultsSection,
    DeploySection,
    FailoverSection,
    HealthChecks,
    HealthCheckSection,
    LoggingSection,
    NetworkSection,
    NodeConfig,
    NodeType,
    PlacementSection,
    PortRange,
    SlurmTarget,
    Strategy,
    TelemetrySection,
)
from infra.config.reader import (
    DAY_SECONDS,
    MAX_COUNT,
    TOPOLOGY_MAX_BYTES,
    Section,
    check_local_path,
    check_safe_id,
    load_document,
)
from infra.config.resources import (
    parse_attributes,
    parse_constraints,
    parse_host_paths,
    parse_node_devices,
)
from infra.config.slurm import duration_problem, name_problem
from infra.errors import ConfigError
from infra.quoting import (
    host_problem,
    node_path_problem,
    normalize_node_path,
    path_char_problem,
    pattern_problem,
    program_problem,
    user_problem,
)

SLURM_TYPE = "slurm"
NODE_TYPES = [*(t.value for t in NodeType), SLURM_TYPE]
SLURM_TARGET_KEYS = ("name", "type", "host", "ssh_user", "ssh_port", "ssh_key_path",
                     "remote_work_dir", "partition", "account", "qos", "time_limit",
                     "description", "enabled")
BENCH_ONLY_KEYS = frozenset({
    "ram_gb", "reserved_ram_gb", "gpu", "gpu_memory_gb", "unified_memory", "cpu_cores",
    "max_instances", "python_path", "monitor_port", "tags", "scheduling_eligible",
    "attributes", "devices", "host_paths", "runtime_drivers", "disk_gb", "claims_dir",
})
"""Keys of a bench node that mean nothing on a Slurm target (Slurm owns the resources)."""
LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]
HEALTH_CHECK_NAMES = ["ssh", "memory", "disk", "temperature", "process"]
MAX_CORES = 4096
MAX_INSTANCES = 10000
MAX_TASKS_LIMIT = 1_000_000
"""Upper bound on ``campaigns.max_tasks`` (every task is a stored instance)."""
TELEMETRY_MIN_SECONDS = 0.2
TELEMETRY_MAX_SECONDS = 3600.0
"""``telemetry.interval_seconds``: 0 (off) or within these bounds."""
LEASE_MIN_SECONDS = 2.0
"""The live loop renews its lease every 1 s tick; a shorter lease would lapse between ticks."""


def load_cluster(path: str | Path) -> Cluster:
    """Read, parse and validate a topology file."""
    p = Path(path)
    return parse_cluster(load_document(p, TOPOLOGY_MAX_BYTES), p)


def parse_cluster(data: Any, path: Path) -> Cluster:
    """Validate an already parsed document (pure; ``path`` only names the file in errors)."""
    file = str(path)
    if data is None:
        raise ConfigError(file, "", "the file is empty")
    top = Section(file, "", data)
    cluster = _cluster_section(top.section("cluster"))
    nodes, targets = _nodes(top, path.resolve().parent)
    network = _network(top.section("network"))
    defaults = _defaults(top.section("defaults"))
    health = _health(top.section("health_check"))
    failover = _failover(top.section("failover"))
    logging = _logging(top.section("logging"))
    placement = _placement(top.section("placement"), nodes)
    deploy = _deploy(top.section("deploy"))
    campaigns = _campaigns(top.section("campaigns"))
    telemetry = _telemetry(top.section("telemetry"))
    top.finish()
    return Cluster(path=path.resolve(), nodes=nodes, cluster=cluster, network=network,
                   defaults=defaults, health_check=health, failover=failover,
                   logging=logging, placement=placement, deploy=deploy, campaigns=campaigns,
                   telemetry=telemetry, slurm_targets=targets,
                   entry_names=_entry_names(top.raw("nodes")))


def _cluster_section(s: Section) -> ClusterSection:
    out = ClusterSection(
        name=s.string("name", "lab-cluster"),
        coordinator_host=s.string("coordinator_host", "localhost"),
    )
    s.finish()
    return out


def _nodes(top: Section, base_dir: Path) -> tuple[tuple[NodeConfig, ...],
                                                  tuple[SlurmTarget, ...]]:
    """The bench nodes and, apart from them, the ``type: slurm`` entries (Slurm targets)."""
    raw = top.raw("nodes")
    if not isinstance(raw, list):
        raise top.error("nodes", "expected a list of nodes")
    if not raw:
        raise top.error("nodes", "at least one node is required")
    nodes: list[NodeConfig] = []
    targets: list[SlurmTarget] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        section = Section(top.file, f"nodes[{i}]", item)
        entry: NodeConfig | SlurmTarget
        if section.data.get("type") == SLURM_TYPE:
            entry = _slurm_target(section, base_dir)
            targets.append(entry)
        else:
            entry = _node(section, base_dir)
            nodes.append(entry)
        if entry.name in seen:
            raise ConfigError(top.file, f"nodes[{i}].name", f"duplicate node name "
                              f"{entry.name!r} (also nodes[{seen[entry.name]}])")
        seen[entry.name] = i
    return tuple(nodes), tuple(targets)


def _entry_names(raw: list[Any]) -> tuple[str, ...]:
    """The ``nodes:`` entries' names in file order (already validated)."""
    return tuple(str(item["name"]) for item in raw)


def _work_dir(s: Section, host: str, base_dir: Path) -> str:
    """``remote_work_dir``: absolute or ``~/`` (a local host may name it relative to the
    config file's directory)."""
    remote_work_dir = s.string("remote_work_dir", "~/lab-orchestrator")
    if host in LOCAL_HOSTS and not remote_work_dir.startswith(("/", "~")):
        # The local node may name its work dir relative to the config file ("." = the tree).
        # Only what the user wrote is checked: the config's own directory is theirs to name.
        _check(s, "remote_work_dir", path_char_problem(remote_work_dir))
        return str((base_dir / remote_work_dir).resolve())
    return _node_path(s, "remote_work_dir", remote_work_dir)


def _ssh_keys(s: Section) -> tuple[str | None, str | None]:
    """``ssh_key_path`` and ``ssh_user``, checked as every SSH destination is."""
    key_path = s.string("ssh_key_path", None)
    if key_path is not None:
        key_path = _node_path(s, "ssh_key_path", check_local_path(s, "ssh_key_path", key_path))
    user = s.string("ssh_user", None)
    if user is not None:
        _check(s, "ssh_user", user_problem(user))
    return key_path, user


def _slurm_name(s: Section, key: str, *, many: bool = False) -> str | None:
    """An optional partition/account/QoS name, in the characters Slurm accepts."""
    value: str | None = s.string(key, None)
    if value is not None:
        _check(s, key, name_problem(value, many=many))
    return value


def _slurm_target(s: Section, base_dir: Path) -> SlurmTarget:
    """A ``type: slurm`` entry: the login host and what every job there is submitted with."""
    for key in s.data:
        if key in BENCH_ONLY_KEYS:
            raise s.error(key, "not a key of a slurm target (Slurm owns the cluster's "
                          "resources; see docs/slurm.md)")
    s.used.add("type")
    name = s.string("name")
    why = check_safe_id(name)
    if why:
        raise s.error("name", why)
    host = s.string("host")
    _check(s, "host", host_problem(host))
    key_path, user = _ssh_keys(s)
    time_limit = s.string("time_limit", DEFAULT_SLURM_TIME_LIMIT)
    _check(s, "time_limit", duration_problem(time_limit))
    target = SlurmTarget(
        name=name,
        host=host,
        ssh_user=user,
        ssh_port=s.port("ssh_port", 22),
        ssh_key_path=key_path,
        remote_work_dir=_work_dir(s, host, base_dir),
        partition=_slurm_name(s, "partition", many=True),
        account=_slurm_name(s, "account"),
        qos=_slurm_name(s, "qos"),
        time_limit=time_limit,
        description=s.string("description", "", allow_empty=True),
        enabled=s.boolean("enabled", True),
    )
    s.finish()
    return target


def _node(s: Section, base_dir: Path) -> NodeConfig:
    name = s.string("name")
    why = check_safe_id(name)
    if why:
        raise s.error("name", why)
    host = s.string("host")
    _check(s, "host", host_problem(host))
    ntype = s.choice("type", NodeType, NODE_TYPES, NodeType.GENERIC)  # "slurm": not here
    ram_gb = s.number("ram_gb", positive=True)
    reserved = s.number("reserved_ram_gb", 0.0, minimum=0.0)
    if reserved >= ram_gb:
        raise s.error("reserved_ram_gb",
                      f"must be less than ram_gb ({ram_gb:g}), got {reserved:g}")
    gpu = s.boolean("gpu", False)
    unified = s.boolean("unified_memory", ntype is NodeType.JETSON_ORIN)
    gpu_mem = s.number("gpu_memory_gb", 0.0, minimum=0.0)
    if gpu and not unified and gpu_mem <= 0:
        raise s.error("gpu_memory_gb",
                      "must be greater than 0 when gpu is true (or set unified_memory: true)")
    if not gpu and gpu_mem > 0:
        raise s.error("gpu_memory_gb", "is set but gpu is false")
    remote_work_dir = _work_dir(s, host, base_dir)
    key_path, user = _ssh_keys(s)
    python_path = s.string("python_path", "python3")
    _check(s, "python_path", program_problem(python_path))
    tags = s.string_list("tags", ())
    drivers = s.string_list("runtime_drivers", DEFAULT_RUNTIME_DRIVERS)
    disk_gb = s.number("disk_gb", None, minimum=0.0)
    claims = s.string("claims_dir", None)
    if claims is not None:
        claims = _node_path(s, "claims_dir", claims)
    node = NodeConfig(
        name=name,
        host=host,
        type=ntype,
        description=s.string("description", "", allow_empty=True),
        ram_gb=ram_gb,
        gpu=gpu,
        gpu_memory_gb=gpu_mem,
        cpu_cores=s.integer("cpu_cores", 1, minimum=1, maximum=MAX_CORES),
        max_instances=s.integer("max_instances", 1, minimum=1, maximum=MAX_INSTANCES),
        reserved_ram_gb=reserved,
        ssh_user=user,
        ssh_port=s.port("ssh_port", 22),
        ssh_key_path=key_path,
        remote_work_dir=remote_work_dir,
        python_path=python_path,
        monitor_port=s.port("monitor_port", None),
        enabled=s.boolean("enabled", True),
        tags=frozenset(tags),
        unified_memory=unified,
        scheduling_eligible=s.boolean("scheduling_eligible", True),
        attributes=parse_attributes(s),
        devices=parse_node_devices(s, gpu),
        host_paths=parse_host_paths(s),
        runtime_drivers=tuple(dict.fromkeys(d.strip() for d in drivers)),
        disk_gb=disk_gb,
        claims_dir=claims,
    )
    s.finish()
    return node


def _check(s: Section, key: str, problem: str | None) -> None:
    """Raise the one-line ``ConfigError`` for ``key`` when a character rule found a problem."""
    if problem:
        raise s.error(key, problem)


def _node_path(s: Section, key: str, value: str) -> str:
    """A path that reaches a shell, ssh or rsync: allow-listed, absolute or ``~/``, normalised.

    (infra.quoting documents the characters; ``a//b/`` becomes ``a/b`` so the deploy target
    and the directory experiments run in are the same string.)
    """
    _check(s, key, node_path_problem(value))
    return normalize_node_path(value)


def _network(s: Section) -> NetworkSection:
    subnets = s.string_list("subnets", ())
    for i, net in enumerate(subnets):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(s.file, f"{s.key('subnets')}[{i}]",
                              f"not a network in CIDR form: {net!r}") from None
    port_range = None
    if s.has("peer_port_range"):
        r = s.section("peer_port_range")
        start, end = r.port("start"), r.port("end")
        if end < start:
            raise r.error("end", f"must not be below start ({start}), got {end}")
        r.finish()
        port_range = PortRange(start, end)
    s.finish()
    return NetworkSection(subnets=subnets, peer_port_range=port_range)


def _defaults(s: Section) -> DefaultsSection:
    out = DefaultsSection(
        ram_gb=s.number("ram_gb", 1.0, positive=True),
        gpu_required=s.boolean("gpu_required", False),
        gpu_memory_gb=s.number("gpu_memory_gb", 0.0, minimum=0.0),
        cpu_cores=s.number("cpu_cores", 0.0, minimum=0.0),
    )
    s.finish()
    return out


def _health_checks(s: Section) -> HealthChecks:
    if not s.has("checks"):
        return HealthChecks()
    raw = s.data["checks"]
    if isinstance(raw, list):
        names = s.string_list("checks")
        for i, name in enumerate(names):
            if name not in HEALTH_CHECK_NAMES:
                raise ConfigError(s.file, f"{s.key('checks')}[{i}]",
                                  f"unknown check {name!r}; known: "
                                  f"{', '.join(HEALTH_CHECK_NAMES)}")
        defaults = HealthChecks()
        # A check left out of the list is disabled by making its threshold unreachable.
        return HealthChecks(
            memory_percent=defaults.memory_percent if "memory" in names else 101.0,
            disk_free_gb=defaults.disk_free_gb if "disk" in names else 0.0,
            temperature_c=defaults.temperature_c if "temperature" in names else 1000.0,
        )
    c = s.section("checks")
    out = HealthChecks(
        memory_percent=c.number("memory_percent", 90.0, minimum=1.0, maximum=101.0),
        disk_free_gb=c.number("disk_free_gb", 1.0, minimum=0.0),
        temperature_c=c.number("temperature_c", 85.0, positive=True),
    )
    c.finish()
    return out


def _health(s: Section) -> HealthCheckSection:
    known_hosts = s.string("known_hosts", None)
    if known_hosts is not None:
        known_hosts = _node_path(s, "known_hosts", check_local_path(s, "known_hosts",
                                                                    known_hosts))
    out = HealthCheckSection(
        enabled=s.boolean("enabled", True),
        interval_seconds=s.number("interval_seconds", 30.0, positive=True, maximum=DAY_SECONDS),
        timeout_seconds=s.number("timeout_seconds", 10.0, positive=True, maximum=DAY_SECONDS),
        keepalive_seconds=s.number("keepalive_seconds", 5.0, positive=True,
                                    maximum=DAY_SECONDS),
        keepalive_count_max=s.integer("keepalive_count_max", 3, minimum=1, maximum=MAX_COUNT),
        checks=_health_checks(s),
        known_hosts=known_hosts,
        accept_new_host_keys=s.boolean("accept_new_host_keys", False),
        reconnect_attempts=s.integer("reconnect_attempts", 3, minimum=0, maximum=MAX_COUNT),
        disconnected_grace_seconds=s.number("disconnected_grace_seconds", 60.0, minimum=0.0,
                                             maximum=DAY_SECONDS),
        lease_seconds=s.number("lease_seconds", 30.0, minimum=LEASE_MIN_SECONDS,
                                maximum=DAY_SECONDS),
    )
    s.used.add("checks")
    s.finish()
    return out


def _failover(s: Section) -> FailoverSection:
    out = FailoverSection(
        enabled=s.boolean("enabled", True),
        auto_restart=s.boolean("auto_restart", True),
        max_retries=s.integer("max_retries", None, minimum=0, maximum=MAX_COUNT),
        retry_delay_seconds=s.number("retry_delay_seconds", 5.0, minimum=0.0,
                                      maximum=DAY_SECONDS),
        fence_timeout_seconds=s.number("fence_timeout_seconds", 60.0, minimum=0.0,
                                        maximum=DAY_SECONDS),
    )
    s.finish()
    return out


def _logging(s: Section) -> LoggingSection:
    out = LoggingSection(
        log_dir=check_local_path(s, "log_dir", s.string("log_dir", "logs")),
        level=s.choice("level", str, LOG_LEVELS, "INFO"),
    )
    s.finish()
    return out


def _placement(s: Section, nodes: tuple[NodeConfig, ...]) -> PlacementSection:
    strategy = s.choice("strategy", Strategy, [x.value for x in Strategy], Strategy.SCORE)
    constraints = parse_constraints(s, "constraints")
    prefs = s.string_list("preferences", ())
    names = {n.name for n in nodes}
    for i, name in enumerate(prefs):
        if name not in names:
            raise ConfigError(s.file, f"{s.key('preferences')}[{i}]",
                              f"unknown node {name!r}; nodes: {', '.join(sorted(names))}")
    s.finish()
    return PlacementSection(strategy=strategy, preferences=prefs, constraints=constraints)


def _deploy(s: Section) -> DeploySection:
    protect = s.string_list("protect", ())
    exclude = s.string_list("exclude", ())
    for key, patterns in (("protect", protect), ("exclude", exclude)):
        for i, pattern in enumerate(patterns):
            why = pattern_problem(pattern)
            if why:
                raise ConfigError(s.file, f"{s.key(key)}[{i}]",
                                  f"an rsync pattern must be on one line of text: {why}")
    source = s.string("source", None)
    if source is not None:
        check_local_path(s, "source", source)
    out = DeploySection(source=source, exclude=exclude,
                        protect=protect,
                        max_deletes=s.integer("max_deletes", DEFAULT_MAX_DELETES, minimum=0,
                                                  maximum=10**9))
    s.finish()
    return out


def _campaigns(s: Section) -> CampaignsSection:
    out = CampaignsSection(
        max_tasks=s.integer("max_tasks", DEFAULT_MAX_TASKS, minimum=1, maximum=MAX_TASKS_LIMIT),
    )
    s.finish()
    return out


def _telemetry(s: Section) -> TelemetrySection:
    """``telemetry.interval_seconds``: 0 turns sampling off, else 0.2 .. 3600 seconds."""
    interval = s.number("interval_seconds", 1.0, minimum=0.0, maximum=TELEMETRY_MAX_SECONDS)
    if 0 < interval < TELEMETRY_MIN_SECONDS:
        raise s.error("interval_seconds", f"must be 0 (off) or at least "
                                          f"{TELEMETRY_MIN_SECONDS:g}, got {interval:g}")
    s.finish()
    return TelemetrySection(interval_seconds=interval)
