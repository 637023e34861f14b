"""One transport per node, chosen and cached in one place (local or asyncssh)."""

from __future__ import annotations

import asyncio
from types import TracebackType

from infra.config.model import Cluster, HealthCheckSection, NodeConfig
from infra.transport.base import Transport
from infra.transport.local import LocalTransport
from infra.transport.ssh import DEFAULT_MAX_CHANNELS, SSHTransport


def connect_node(node: NodeConfig, health: HealthCheckSection | None = None, *,
                 max_channels: int = DEFAULT_MAX_CHANNELS) -> Transport:
    """The transport for ``node``: local for ``localhost``/``local``, asyncssh otherwise.

    Nothing is contacted yet; an SSH connection opens on first use.
    """
    if node.is_local:
        return LocalTransport(node.name)
    return SSHTransport(node, health, max_channels=max_channels)


class ConnectionPool:
    """Hands out one long-lived transport per node and closes them all at the end."""

    def __init__(self, settings: Cluster | HealthCheckSection | None = None, *,
                 max_channels: int = DEFAULT_MAX_CHANNELS) -> None:
        if isinstance(settings, Cluster):
            settings = settings.health_check
        self.health = settings if settings is not None else HealthCheckSection()
        self.max_channels = max_channels
        self._transports: dict[str, tuple[NodeConfig, Transport]] = {}

    async def get(self, node: NodeConfig) -> Transport:
        """The transport for ``node``, created on first request and reused after.

        A node whose configuration changed since (same name) gets a fresh transport.
        """
        held = self._transports.get(node.name)
        if held is not None:
            if held[0] == node:
                return held[1]
            await held[1].close()
        transport = connect_node(node, self.health, max_channels=self.max_channels)
        self._transports[node.name] = (node, transport)
        return transport

    def __contains__(self, name: object) -> bool:
        return name in self._transports

    async def close_all(self) -> None:
        """Close every transport at once; errors on one never keep the others open."""
        held, self._transports = self._transports, {}
        # best effort, side by side: a frozen node's bounded wait does not add up per node
        await asyncio.gather(*(t.close() for _, t in held.values()), return_exceptions=True)

    async def __aenter__(self) -> ConnectionPool:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close_all()
