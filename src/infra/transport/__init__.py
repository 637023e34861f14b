"""Transports: how the coordinator runs commands and moves files on a node."""

from infra.transport.base import CommandResult, Transport
from infra.transport.local import LocalTransport
from infra.transport.pool import ConnectionPool, connect_node
from infra.transport.ssh import SSHTransport

__all__ = [
    "CommandResult",
    "ConnectionPool",
    "LocalTransport",
    "SSHTransport",
    "Transport",
    "connect_node",
]
