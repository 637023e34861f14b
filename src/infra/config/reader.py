"""Strict, typed access to parsed YAML/JSON mappings with key-path error messages.

Every value is read through a ``Section``; ``finish()`` rejects keys nobody read, so
nothing the user wrote is silently ignored.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import yaml

from infra.errors import ConfigError, UsageError
from infra.quoting import pattern_problem

T = TypeVar("T")

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
_MISSING: Any = object()


def check_safe_id(value: str) -> str | None:
    """Return why ``value`` is not safe as a single path component, or None when it is."""
    if not SAFE_ID.match(value):
        return (f"{value!r} is not a safe id (letters, digits, '.', '_', '-', '@'; "
                "must start with a letter or digit; at most 128 characters)")
    if ".." in value:
        return f"{value!r} is not a safe id (must not contain '..')"
    return None


def relative_path_problem(value: str) -> str | None:
    """Why ``value`` is not a relative path inside the working directory, or None."""
    control = pattern_problem(value)  # it becomes an rsync protect rule and a node path
    if control:
        return f"must be on one line: {control}"
    pure = PurePosixPath(value)
    if pure.is_absolute() or any(part.startswith("~") for part in pure.parts):
        return (f"must be relative to the experiment's working directory (no '/' "
                f"or '~' at the start of a part), got {value!r}")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        return f"must not contain control characters, got {value!r}"
    if ".." in pure.parts:
        return f"must stay inside the working directory (no '..'), got {value!r}"
    return None


def display_path(path: Path) -> str:
    """A stored (resolved) spec path as the user likely wrote it: relative to the current
    directory when inside it, else absolute; for messages that name a file."""
    try:
        return str(path.relative_to(Path.cwd()))
    except (ValueError, OSError):
        return str(path)


MAX_DEPTH = 64
"""Deepest nesting of mappings and lists a config or spec document may have."""
SPEC_MAX_BYTES = 1 << 20
"""Largest spec file (1 MiB)."""
TOPOLOGY_MAX_BYTES = 4 << 20
"""Largest topology file (4 MiB)."""
MAX_INT_DIGITS = 18
"""Integers longer than this (beyond 64 bits) are refused before conversion."""
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096
NUMBER_LIMIT = 1e15
"""Magnitude bound on every number read without a narrower bound of its own."""
DAY_SECONDS = 86400.0
"""Upper bound on every timeout, interval and delay key."""
MAX_COUNT = 1000
"""Upper bound on retry and attempt counts."""


@dataclass(frozen=True)
class _Refused:
    """A scalar the loader would not convert (kept in place so the walk can name its key)."""

    reason: str


class _DuplicateKeys(dict[Any, Any]):
    """A JSON object that repeated a key (reported with its key path by the walk)."""

    duplicate: str = ""


def path_text_problem(text: str) -> str | None:
    """Why ``text`` cannot name a file (empty, NUL, over-long name or path), or None."""
    if not text:
        return "an empty path"
    if "\0" in text:
        return f"the path contains a NUL character: {text[:80]!r}"
    try:
        raw = os.fsencode(text)
    except UnicodeError:
        return f"the path is not valid text: {text[:80]!r}"
    if len(raw) > MAX_PATH_BYTES:
        return f"the path is longer than {MAX_PATH_BYTES} bytes"
    longest = max(len(part) for part in raw.split(b"/"))
    if longest > MAX_NAME_BYTES:
        return (f"a file name in the path is longer than {MAX_NAME_BYTES} bytes ({longest}): "
                f"{text[:60]!r}...")
    return None


def check_path_text(what: str, text: str) -> str:
    """Refuse (one line naming ``what``) a path that cannot name a file."""
    why = path_text_problem(text)
    if why:
        raise UsageError(f"{what}: {why}")
    return text


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, aliases, deep nesting, huge or non-finite numbers."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        """Refuse aliases (no alias bombs) and nesting beyond MAX_DEPTH while composing."""
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed; write the value out",
                event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH + 1:  # +1: the top-level node itself
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_DEPTH} levels deep",
                    self.peek_event().start_mark)  # type: ignore[no-untyped-call]
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode,
                       deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, (str, int, float, bool)) and key is not None:
            raise yaml.constructor.ConstructorError(
                None, None, "keys must be plain scalars", key_node.start_mark)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen[key] = loader.construct_object(value_node, deep=deep)
    return seen


def _construct_int(loader: _StrictLoader, node: yaml.ScalarNode) -> Any:
    """Any YAML integer spelling (decimal, 0x, 0o, 1_000, 1:30) within 64 bits."""
    text = str(node.value)
    digits = sum(ch.isdigit() for ch in text)
    if digits > MAX_INT_DIGITS or len(text) > 2 * MAX_INT_DIGITS + 4:
        return _Refused(f"integer of {max(digits, len(text))} digits is out of range "
                        "(at most 64-bit)")
    value = loader.construct_yaml_int(node)
    if abs(value) >= 2**63:
        return _Refused("integer out of range (at most 64-bit)")
    return value


def _construct_float(loader: _StrictLoader, node: yaml.ScalarNode) -> Any:
    value = loader.construct_yaml_float(node)
    if not math.isfinite(value):
        return _Refused(f"{node.value!r} is not a finite number (nan and inf are not allowed)")
    return value


def _construct_text(loader: _StrictLoader, node: yaml.ScalarNode) -> str:
    return str(loader.construct_scalar(node))


def _add_strict_constructors(loader: Any) -> None:
    """The strict loaders' constructors: duplicate keys, number ranges, dates kept as text."""
    loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
    loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
    loader.add_constructor("tag:yaml.org,2002:float", _construct_float)
    # An unquoted date stays the text it was written as (a spec must be JSON-representable).
    loader.add_constructor("tag:yaml.org,2002:timestamp", _construct_text)


_add_strict_constructors(_StrictLoader)

_FastLoader: Any = None
"""libyaml's parser and composer with the same constructors (None: PyYAML without libyaml).
Its composer is C code that ``compose_node`` above cannot hook, so a document goes to it only
after ``_plain_for_libyaml`` saw, in libyaml's own event stream, no alias and no deep nesting;
anything else (and any error) is parsed again by ``_StrictLoader``, whose messages it keeps."""
if getattr(yaml, "__with_libyaml__", False):
    _FastLoader = type("_FastLoader", (yaml.CSafeLoader,), {})
    _add_strict_constructors(_FastLoader)


def _plain_for_libyaml(text: str) -> bool:
    """The document parses in libyaml without aliases, nested well within MAX_DEPTH."""
    events = yaml.CSafeLoader(text)
    depth = 0
    try:
        while events.check_event():
            event = events.get_event()
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth >= MAX_DEPTH:  # near the limit: the exact check decides
                    return False
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
            elif isinstance(event, yaml.AliasEvent):
                return False
    except yaml.YAMLError:
        return False
    finally:
        events.dispose()
    return True


def _load_yaml(text: str) -> Any:
    """Parse YAML strictly: through libyaml when it is there and the document is plain
    (several times faster than the pure-Python parser: the CLI's start-up reads the
    topology), else, or on any error, through ``_StrictLoader`` for its exact message."""
    if _FastLoader is not None and _plain_for_libyaml(text):
        with contextlib.suppress(yaml.YAMLError):
            return yaml.load(text, Loader=_FastLoader)
    return yaml.load(text, Loader=_StrictLoader)


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out and not isinstance(out, _DuplicateKeys):
            out = _DuplicateKeys(out)
            out.duplicate = key
        out[key] = value
    return out


def _json_int(text: str) -> Any:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        return _Refused(f"integer of {len(text.lstrip('-'))} digits is out of range "
                        "(at most 64-bit)")
    return int(text)


def _json_float(text: str) -> Any:
    value = float(text)
    if not math.isfinite(value):
        return _Refused(f"{text[:40]} is not a finite number")
    return value


def _json_constant(text: str) -> Any:
    return _Refused(f"{text} is not allowed (numbers must be finite)")


def _key_path(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _text_problem(text: str) -> str | None:
    if "\0" in text:
        return "contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid unicode (a lone surrogate)"
    return None


def _walk(name: str, data: Any) -> None:
    """Refuse what the loaders kept in place (huge or non-finite numbers, repeated keys, NUL)
    and nesting beyond MAX_DEPTH, naming the key path; iterative, so depth cannot crash it."""
    stack: list[tuple[str, Any, int]] = [("", data, 0)]
    while stack:
        path, value, depth = stack.pop()
        where = path or "(top level)"
        if len(where) > 80:
            where = where[:77] + "..."
        if depth > MAX_DEPTH:
            raise ConfigError(name, where, f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, _Refused):
            raise ConfigError(name, where, value.reason)
        if isinstance(value, str):
            why = _text_problem(value)
            if why:
                raise ConfigError(name, where, f"the value {why}")
        elif isinstance(value, _DuplicateKeys):
            raise ConfigError(name, where, f"duplicate key {value.duplicate!r}")
        elif not isinstance(value, (dict, list, int, float, type(None))):
            raise ConfigError(name, where, f"a {type(value).__name__} value is not allowed "
                              "(only strings, numbers, booleans, null, lists and mappings)")
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise ConfigError(name, where, f"keys must be strings, got {key!r}")
                if _text_problem(key):
                    raise ConfigError(name, where, f"a key {_text_problem(key)}")
                stack.append((_key_path(path, key), item, depth + 1))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item, depth + 1) for i, item in enumerate(value))


def _read_text(path: Path, max_bytes: int) -> str:
    """The file's text, refusing non-files and files over ``max_bytes`` before reading them."""
    name = str(path)
    check_path_text(name, name)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ConfigError(name, "", "file not found") from None
    except OSError as exc:
        raise ConfigError(name, "", f"cannot read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ConfigError(name, "", "is a directory, expected a file")
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(name, "", "is not a regular file")
    too_big = ConfigError(name, "", f"the file is larger than {max_bytes // 1024} KiB "
                          "(the limit for this kind of document)")
    if info.st_size > max_bytes:
        raise too_big
    try:
        with path.open("rb") as fh:
            raw = fh.read(max_bytes + 1)
    except OSError as exc:
        raise ConfigError(name, "", f"cannot read: {exc.strerror or exc}") from None
    if len(raw) > max_bytes:
        raise too_big
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(name, "", f"cannot read: not UTF-8 text (byte {exc.start})") from None


def load_document(path: Path, max_bytes: int = SPEC_MAX_BYTES) -> Any:
    """Parse a YAML or JSON file within the size, depth and number limits.

    A syntax error or a refused construct becomes a ConfigError with the line or key path.
    """
    name = str(path)
    text = _read_text(path, max_bytes)
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text, object_pairs_hook=_json_pairs, parse_int=_json_int,
                              parse_float=_json_float, parse_constant=_json_constant)
        except json.JSONDecodeError as exc:
            raise ConfigError(name, "", f"invalid JSON: {exc.msg} (column {exc.colno})",
                              line=exc.lineno) from None
        except RecursionError:  # deeper than the decoder can go; the walk bounds the rest
            raise ConfigError(name, "", f"nested more than {MAX_DEPTH} levels deep") from None
    else:
        try:
            data = _load_yaml(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            line = mark.line + 1 if mark is not None else None
            raise ConfigError(name, "", f"invalid YAML: {problem}", line=line) from None
        except RecursionError:  # the parser's own recursion (flow collections) outran Python's
            raise ConfigError(name, "", f"nested more than {MAX_DEPTH} levels deep") from None
    _walk(name, data)
    return data


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string",
            list: "list", dict: "mapping"}.get(type(value), type(value).__name__)


def _show(value: float) -> str:
    """A number for a message, without converting a huge integer to float or text."""
    if isinstance(value, int) and abs(value) > 10**18:
        return "a number too large to show"
    return f"{value:g}"


class Section:
    """A mapping being read at key path ``path`` inside ``file``."""

    def __init__(self, file: str, path: str, data: object) -> None:
        self.file = file
        self.path = path
        if not isinstance(data, Mapping):
            raise ConfigError(file, path or "(top level)",
                              f"expected a mapping, got {_type_name(data)}")
        for key in data:
            if not isinstance(key, str):
                raise ConfigError(file, path or "(top level)",
                                  f"keys must be strings, got {key!r}")
        self.data: Mapping[str, Any] = data
        self.used: set[str] = set()

    def key(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self.file, self.key(key), reason)

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        self.used.add(key)
        if key not in self.data:
            if default is _MISSING:
                raise self.error(key, "required key is missing")
            return default
        return self.data[key]

    def string(self, key: str, default: Any = _MISSING, *, allow_empty: bool = False) -> Any:
        value = self.raw(key, default)
        if value is default and key not in self.data:
            return value
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {_type_name(value)}")
        if not allow_empty and not value.strip():
            raise self.error(key, "must not be empty")
        return value

    def boolean(self, key: str, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if key not in self.data:
            return value
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {_type_name(value)}")
        return value

    def integer(self, key: str, default: Any = _MISSING, *, minimum: int | None = None,
                maximum: int | None = None) -> Any:
        value = self.raw(key, default)
        if key not in self.data:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise self.error(key, f"expected an integer, got {_type_name(value)}")
        self._bounds(key, value, minimum, NUMBER_LIMIT if maximum is None else maximum)
        return value

    def number(self, key: str, default: Any = _MISSING, *, minimum: float | None = None,
               maximum: float | None = None, positive: bool = False) -> Any:
        value = self.raw(key, default)
        if key not in self.data:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"expected a number, got {_type_name(value)}")
        if isinstance(value, int) and abs(value) > NUMBER_LIMIT:  # before any float()
            raise self.error(key, f"must be at most {NUMBER_LIMIT:g} in magnitude")
        if not math.isfinite(value):
            raise self.error(key, "must be a finite number")
        if positive and value <= 0:
            raise self.error(key, f"must be greater than 0, got {value:g}")
        self._bounds(key, value, minimum, NUMBER_LIMIT if maximum is None else maximum)
        return float(value)

    def _bounds(self, key: str, value: float, minimum: float | None,
                maximum: float | None) -> None:
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum:g}, got {_show(value)}")
        if maximum is not None and value > maximum:
            raise self.error(key, f"must be at most {maximum:g}, got {_show(value)}")

    def port(self, key: str, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if key not in self.data:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected a port number, got {_type_name(value)}")
        if not 1 <= value <= 65535:
            raise self.error(key, f"port must be in 1..65535, got {value}")
        return value

    def string_list(self, key: str, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if key not in self.data:
            return value
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise self.error(key, f"expected a list of strings, got {_type_name(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                raise ConfigError(self.file, f"{self.key(key)}[{i}]",
                                  f"expected a non-empty string, got {_type_name(item)}")
        return tuple(value)

    def choice(self, key: str, convert: Callable[[str], T], choices: list[str],
               default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if key not in self.data:
            return value
        if not isinstance(value, str) or value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}; got {value!r}")
        return convert(value)

    def section(self, key: str, *, required: bool = False) -> Section:
        value = self.raw(key, _MISSING if required else None)
        if value is None:
            value = {}
        return Section(self.file, self.key(key), value)

    def finish(self, reserved: frozenset[str] = frozenset()) -> None:
        """Reject any key that nothing read (``reserved`` keys are accepted and recorded)."""
        for key in self.data:
            if key not in self.used and key not in reserved:
                known = sorted(self.used | reserved)
                hint = f" (known keys: {', '.join(known)})" if known else ""
                raise self.error(key, f"unknown key{hint}")


def check_local_path(section: Section, key: str, value: str) -> str:
    """Refuse a path this machine cannot open (NUL, over-long name or path) naming the key."""
    why = path_text_problem(value)
    if why:
        raise section.error(key, why)
    return value


def check_abs_path(section: Section, key: str, value: str, *, allow_home: bool = True) -> str:
    """Require an absolute path (``~/...`` allowed when ``allow_home``)."""
    if value.startswith("/") or (allow_home and (value == "~" or value.startswith("~/"))):
        return value
    need = "an absolute path (or one starting with ~/)" if allow_home else "an absolute path"
    raise section.error(key, f"must be {need}, got {value!r}")
