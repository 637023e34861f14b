"""Topology and experiment-spec parsing and validation (pure apart from reading files).

The names below load on first use (PEP 562): ``--validate-config`` of a topology alone then
never imports the spec parser and the sweep expander, and importing one submodule (e.g.
``infra.config.reader``) does not drag in the rest.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from infra.config.model import (
        Cluster,
        ExperimentSpec,
        NodeConfig,
        NodeType,
        RecoverPolicy,
    )
    from infra.config.specs import check_spec_set, load_spec, parse_pins
    from infra.config.topology import load_cluster

_WHERE = {
    "Cluster": "model",
    "ExperimentSpec": "model",
    "NodeConfig": "model",
    "NodeType": "model",
    "RecoverPolicy": "model",
    "check_spec_set": "specs",
    "load_spec": "specs",
    "parse_pins": "specs",
    "load_cluster": "topology",
}
"""Each public name and the submodule that defines it."""

__all__ = [
    "Cluster",
    "ExperimentSpec",
    "NodeConfig",
    "NodeType",
    "RecoverPolicy",
    "check_spec_set",
    "load_cluster",
    "load_spec",
    "parse_pins",
]


def __getattr__(name: str) -> Any:
    """Load a public name's submodule when the name is first asked for."""
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'infra.config' has no attribute {name!r}")
    value = getattr(import_module(f"infra.config.{where}"), name)
    globals()[name] = value
    return value
