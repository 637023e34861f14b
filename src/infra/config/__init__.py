"""Topology and experiment-spec parsing and validation (pure apart from reading files)."""

from infra.config.model import Cluster, ExperimentSpec, NodeConfig, NodeType, RecoverPolicy
from infra.config.specs import check_spec_set, load_spec, parse_pins
from infra.config.topology import load_cluster

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
