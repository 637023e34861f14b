"""Parse the scheduler parts of specs and topology: ``resources``, constraints, node inventory.

Shared by ``specs.py`` (a spec's ``resources`` / ``constraints``) and ``topology.py`` (a node's
``devices`` / ``attributes`` and ``placement.constraints``). Errors name the full key path.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

from infra.config.model import (
    AttrValue,
    Constraint,
    DeviceRequest,
    NodeDevice,
    Operator,
    PortProtocol,
    PortRequest,
    ResourceRequest,
    VolumeMode,
    VolumeRequest,
    tag_constraint,
)
from infra.config.reader import Section, _type_name
from infra.errors import ConfigError

MB_PER_GB = 1024.0
MAX_DEVICES = 1024
"""Upper bound on a device count or index."""
PROTOCOLS = [p.value for p in PortProtocol]
VOLUME_MODES = [m.value for m in VolumeMode]
OPERATORS = [o.value for o in Operator]
# Operators spelled another way in Nomad files.
OPERATOR_ALIASES = {"==": "=", "is": "=", "regex": "regexp", "semver": "version",
                    "distinct_hosts": "distinct_hosts"}
NO_VALUE_OPERATORS = (Operator.IS_SET, Operator.IS_NOT_SET)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
VERSION_CLAUSE = re.compile(r"^\s*(=|==|!=|<|<=|>|>=|~>)?\s*v?([0-9][0-9A-Za-z.+-]*)\s*$")

# Accepted spellings inside ``resources``: key -> factor into the canonical unit.
CPU_KEYS = {"cpu_cores": 1.0, "cores": 1.0, "cpu": 1.0, "cpu_millis": 0.001, "cpu_mcores": 0.001}
MEMORY_KEYS = {"memory_mb": 1.0 / MB_PER_GB, "memory": 1.0 / MB_PER_GB, "memory_gb": 1.0}
DISK_KEYS = {"disk_mb": 1.0 / MB_PER_GB, "disk": 1.0 / MB_PER_GB, "disk_gb": 1.0}
GPU_COUNT_KEYS = ("gpu_count", "gpus", "gpu")

# Attributes every node has, computed from its config (and probe); user attributes may not
# reuse these names. ``arch``, ``os``, ``kernel`` and ``hostname`` come from the probe when it
# ran, so a node may declare them under ``attributes`` for dry runs.
BUILTIN_ATTRIBUTES = frozenset({
    "name", "host", "type", "enabled", "scheduling_eligible", "ram_gb", "available_ram_gb",
    "cpu_cores", "max_instances", "gpu", "gpu_count", "gpu_memory_gb", "unified_memory", "tags",
    "runtime_drivers", "gpu_vendors", "gpu_drivers", "gpu_capabilities", "device_kinds",
    "host_paths", "disk_gb",
})


@dataclass(frozen=True)
class ParsedResources:
    """A spec's ``resources`` section: scalars (with the key they came from) and the rest."""

    cpu_cores: float | None
    cpu_key: str | None
    ram_gb: float | None
    ram_key: str | None
    request: ResourceRequest

    @property
    def wants_gpu(self) -> bool:
        return any(d.kind == "gpu" for d in self.request.devices)


def env_name(text: str) -> str:
    """Upper-case, every non-alphanumeric character as '_' (the env-hint spelling)."""
    return re.sub(r"[^A-Z0-9]", "_", text.upper())


def _items(s: Section, key: str) -> list[Section]:
    """The list at ``key``, each entry as a Section (entries must be mappings)."""
    raw = s.raw(key, None)
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise s.error(key, f"expected a list, got {_type_name(raw)}")
    return [Section(s.file, f"{s.key(key)}[{i}]", item) for i, item in enumerate(raw)]


def _one_of(s: Section, keys: dict[str, float], what: str) -> tuple[float | None, str | None]:
    """Read the one spelling of a scalar that is present, scaled to the canonical unit."""
    given = [k for k in keys if s.has(k)]
    if len(given) > 1:
        raise s.error(given[1], f"{what} is given twice ({given[0]} and {given[1]}); "
                      "keep one")
    if not given:
        return None, None
    key = given[0]
    if keys[key] != 1.0 and key.endswith(("millis", "mcores")):
        value = float(s.integer(key, minimum=0))
    else:
        value = s.number(key, minimum=0.0)
    return value * keys[key], key


def _lower(s: Section, key: str) -> str | None:
    value = s.string(key, None)
    return None if value is None else value.strip().lower()


def _abs_path(s: Section, key: str, value: str) -> str:
    if not value.startswith("/"):
        raise s.error(key, f"must be an absolute path, got {value!r}")
    return posixpath.normpath(value)


def _device_request(d: Section) -> DeviceRequest:
    kind = _lower(d, "kind")
    typ = _lower(d, "type")
    if kind is not None and typ is not None and kind != typ:
        raise d.error("type", f"kind is {kind!r} but type is {typ!r}; give one")
    ids = d.string_list("ids", ())
    if len(set(ids)) != len(ids):
        raise d.error("ids", "lists a device id twice")
    count = d.integer("count", len(ids) or 1, minimum=1, maximum=MAX_DEVICES)
    if ids and count > len(ids):
        raise d.error("count", f"is {count} but only {len(ids)} ids are allowed")
    req = DeviceRequest(
        kind=kind or typ or "gpu",
        count=count,
        vendor=_lower(d, "vendor"),
        driver=_lower(d, "driver"),
        min_memory_mb=d.number("min_memory_mb", 0.0, minimum=0.0),
        capabilities=frozenset(c.lower() for c in d.string_list("capabilities", ())),
        ids=ids,
    )
    d.finish()
    return req


def _ports(s: Section) -> tuple[PortRequest, ...]:
    out: list[PortRequest] = []
    labels: dict[str, int] = {}
    numbers: dict[int, int] = {}
    for i, p in enumerate(_items(s, "ports")):
        label = p.string("label")
        if not NAME.match(label):
            raise p.error("label", f"{label!r} is not a valid label (letters, digits, '_', "
                          "'.', '-')")
        norm = env_name(label)
        if norm in labels:
            raise p.error("label", f"duplicate port label {label!r} (also ports[{labels[norm]}])")
        port = p.raw("port")
        if isinstance(port, bool) or not isinstance(port, int):
            raise p.error("port", f"expected a port number, got {_type_name(port)}")
        if not 1 <= port <= 65535:
            raise p.error("port", f"port must be in 1..65535, got {port}")
        if port in numbers:
            raise p.error("port", f"port {port} is also ports[{numbers[port]}]")
        protocol = p.choice("protocol", PortProtocol, PROTOCOLS, PortProtocol.TCP)
        p.finish()
        labels[norm] = numbers[port] = i
        out.append(PortRequest(label, port, protocol))
    return tuple(out)


def _volumes(s: Section) -> tuple[VolumeRequest, ...]:
    out: list[VolumeRequest] = []
    names: dict[str, int] = {}
    for i, v in enumerate(_items(s, "volumes")):
        name = v.string("name")
        if not NAME.match(name):
            raise v.error("name", f"{name!r} is not a valid volume name (letters, digits, '_', "
                          "'.', '-')")
        norm = env_name(name)
        if norm in names:
            raise v.error("name", f"duplicate volume name {name!r} (also volumes[{names[norm]}])")
        source = _abs_path(v, "source", v.string("source"))
        target = _abs_path(v, "target", v.string("target", source))
        mode = v.choice("mode", VolumeMode, VOLUME_MODES, VolumeMode.RO)
        vtype = v.choice("type", str, ["host"], "host")
        v.finish()
        names[norm] = i
        out.append(VolumeRequest(name, source, target, mode, vtype))
    return tuple(out)


def parse_resources(s: Section) -> ParsedResources:
    """Read a spec's ``resources`` mapping (reference 004's shape, units and aliases)."""
    cpu, cpu_key = _one_of(s, CPU_KEYS, "CPU")
    ram, ram_key = _one_of(s, MEMORY_KEYS, "memory")
    if ram is not None and ram <= 0:
        raise s.error(ram_key or "memory", "must be greater than 0")
    disk, _ = _one_of(s, DISK_KEYS, "disk")
    gpu_keys = [k for k in GPU_COUNT_KEYS if s.has(k)]
    if len(gpu_keys) > 1:
        raise s.error(gpu_keys[1], f"GPU count is given twice ({gpu_keys[0]} and "
                      f"{gpu_keys[1]}); keep one")
    devices = [_device_request(d) for d in _items(s, "devices")]
    if gpu_keys:
        count = s.integer(gpu_keys[0], minimum=0, maximum=MAX_DEVICES)
        if count and any(d.kind == "gpu" for d in devices):
            raise s.error(gpu_keys[0], "a GPU count and GPU entries in devices: keep one")
        if count:
            devices.insert(0, DeviceRequest(kind="gpu", count=count))
    driver = s.raw("runtime_driver", None)
    if driver is not None and (not isinstance(driver, str) or not driver.strip()):
        raise s.error("runtime_driver", f"expected a non-empty string, got {_type_name(driver)}")
    request = ResourceRequest(
        disk_gb=disk or 0.0,
        devices=tuple(devices),
        ports=_ports(s),
        volumes=_volumes(s),
        runtime_driver=driver.strip() if isinstance(driver, str) else None,
    )
    s.finish()
    return ParsedResources(cpu, cpu_key, ram, ram_key, request)


# --------------------------------------------------------------------------- constraints

def _version_ok(text: str) -> bool:
    clauses = [c for c in text.split(",")]
    return bool(clauses) and all(VERSION_CLAUSE.match(c) for c in clauses)


def _scalar_text(c: Section, key: str) -> str | None:
    """A constraint value: a string, number or boolean as text; a list joined by commas."""
    raw = c.raw(key, None)
    if raw is None:
        return None
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, (int, float, str)):
        return str(raw)
    if isinstance(raw, list) and raw and all(
            (isinstance(x, str) and x.strip()) or
            (isinstance(x, (int, float)) and not isinstance(x, bool)) for x in raw):
        return ",".join(str(x) for x in raw)
    raise c.error(key, "expected a string, number or list (non-empty, of non-empty strings or "
                  f"numbers), got {_type_name(raw)}")


def _constraint(c: Section) -> Constraint:
    raw_op = c.string("operator", "=")
    op_text = OPERATOR_ALIASES.get(raw_op.strip(), raw_op.strip())
    if op_text not in OPERATORS:
        raise c.error("operator", f"must be one of {', '.join(OPERATORS)}; got {raw_op!r}")
    op = Operator(op_text)
    attribute = c.string("attribute", None)
    value = _scalar_text(c, "value")
    if op is Operator.DISTINCT_HOSTS:
        if value not in (None, "true", "false"):
            raise c.error("value", f"distinct_hosts takes true or false, got {value!r}")
    elif attribute is None:
        raise c.error("attribute", "required key is missing")
    elif op in NO_VALUE_OPERATORS:
        if value is not None:
            raise c.error("value", f"{op.value} takes no value")
    elif value is None:
        raise c.error("value", f"required for operator {op.value}")
    elif op is Operator.REGEXP:
        try:
            re.compile(value)
        except re.error as exc:
            raise c.error("value", f"not a valid regular expression: {exc}") from None
    elif op is Operator.VERSION and not _version_ok(value):
        raise c.error("value", f"not a version constraint like '>= 1.2, < 2': {value!r}")
    c.finish()
    return Constraint(attribute or "", op, value)


def parse_constraints(s: Section, key: str) -> tuple[Constraint, ...]:
    """A constraint list: strings are required tags, mappings are attribute/operator/value."""
    raw = s.raw(key, None)
    if raw is None:
        return ()
    if isinstance(raw, (str, dict)):
        raw = [raw]
    if not isinstance(raw, list):
        raise s.error(key, f"expected a list of constraints, got {_type_name(raw)}")
    out: list[Constraint] = []
    for i, item in enumerate(raw):
        where = f"{s.key(key)}[{i}]"
        if isinstance(item, str):
            if not item.strip():
                raise ConfigError(s.file, where, "expected a non-empty tag")
            out.append(tag_constraint(item.strip()))
        else:
            out.append(_constraint(Section(s.file, where, item)))
    return tuple(out)


# --------------------------------------------------------------------------- node inventory

def parse_node_devices(s: Section, gpu: bool) -> tuple[NodeDevice, ...]:
    """A node's ``devices`` list; GPU entries need ``gpu: true`` on the node."""
    out: list[NodeDevice] = []
    ids: dict[str, int] = {}
    for i, d in enumerate(_items(s, "devices")):
        dev_id = d.string("id")
        if not NAME.match(dev_id):
            raise d.error("id", f"{dev_id!r} is not a valid device id")
        if dev_id in ids:
            raise d.error("id", f"duplicate device id {dev_id!r} (also devices[{ids[dev_id]}])")
        kind = _lower(d, "kind")
        typ = _lower(d, "type")
        if kind is not None and typ is not None and kind != typ:
            raise d.error("type", f"kind is {kind!r} but type is {typ!r}; give one")
        kind = kind or typ or "gpu"
        if kind == "gpu" and not gpu:
            raise d.error("kind", "a GPU device on a node with gpu: false")
        mem = d.number("memory_mb", None, minimum=0.0)
        dev = NodeDevice(
            id=dev_id, kind=kind, vendor=_lower(d, "vendor"), driver=_lower(d, "driver"),
            memory_mb=mem,
            capabilities=frozenset(c.lower() for c in d.string_list("capabilities", ())),
            index=d.integer("index", None, minimum=0, maximum=MAX_DEVICES),
        )
        d.finish()
        ids[dev_id] = i
        out.append(dev)
    return tuple(out)


def parse_attributes(s: Section) -> tuple[tuple[str, AttrValue], ...]:
    """A node's ``attributes`` mapping: scalar values or lists of strings (sets)."""
    a = s.section("attributes")
    out: list[tuple[str, AttrValue]] = []
    for name, value in a.data.items():
        a.used.add(name)
        if not NAME.match(name):
            raise a.error(name, "not a valid attribute name (letters, digits, '_', '.', '-')")
        if name in BUILTIN_ATTRIBUTES:
            raise a.error(name, "is a built-in attribute (set it with the node key of that name)")
        if isinstance(value, list):
            if not all(isinstance(x, str) and x for x in value):
                raise a.error(name, "a list attribute must hold non-empty strings")
            out.append((name, frozenset(value)))
        elif isinstance(value, (str, int, float, bool)):
            out.append((name, value))
        else:
            raise a.error(name, f"expected a string, number, boolean or list, got "
                          f"{_type_name(value)}")
    return tuple(sorted(out, key=lambda kv: kv[0]))


def parse_host_paths(s: Section) -> tuple[str, ...]:
    paths = s.string_list("host_paths", ())
    return tuple(_abs_path(s, f"host_paths[{i}]", p) for i, p in enumerate(paths))
