"""Strict, typed access to parsed YAML/JSON mappings with key-path error messages.

Every value is read through a ``Section``; ``finish()`` rejects keys nobody read, so
nothing the user wrote is silently ignored.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from infra.errors import ConfigError

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


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys instead of keeping the last one."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode,
                       deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen[key] = loader.construct_object(value_node, deep=deep)
    return seen


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_document(path: Path) -> Any:
    """Parse a YAML or JSON file; a syntax error becomes a ConfigError with the line."""
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(name, "", "file not found") from None
    except IsADirectoryError:
        raise ConfigError(name, "", "is a directory, expected a file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(name, "", f"cannot read: {exc}") from None
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(name, "", f"invalid JSON: {exc.msg} (column {exc.colno})",
                              line=exc.lineno) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(name, "", f"invalid YAML: {problem}", line=line) from None


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string",
            list: "list", dict: "mapping"}.get(type(value), type(value).__name__)


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
        self._bounds(key, value, minimum, maximum)
        return value

    def number(self, key: str, default: Any = _MISSING, *, minimum: float | None = None,
               maximum: float | None = None, positive: bool = False) -> Any:
        value = self.raw(key, default)
        if key not in self.data:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"expected a number, got {_type_name(value)}")
        if not math.isfinite(value):
            raise self.error(key, "must be a finite number")
        if positive and value <= 0:
            raise self.error(key, f"must be greater than 0, got {value:g}")
        self._bounds(key, value, minimum, maximum)
        return float(value)

    def _bounds(self, key: str, value: float, minimum: float | None,
                maximum: float | None) -> None:
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum:g}, got {value:g}")
        if maximum is not None and value > maximum:
            raise self.error(key, f"must be at most {maximum:g}, got {value:g}")

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


def check_abs_path(section: Section, key: str, value: str, *, allow_home: bool = True) -> str:
    """Require an absolute path (``~/...`` allowed when ``allow_home``)."""
    if value.startswith("/") or (allow_home and (value == "~" or value.startswith("~/"))):
        return value
    need = "an absolute path (or one starting with ~/)" if allow_home else "an absolute path"
    raise section.error(key, f"must be {need}, got {value!r}")
