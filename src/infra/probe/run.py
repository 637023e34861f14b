"""Probe a node over its transport and judge its health.

The probe script travels on stdin (``python3 - WORK_DIR``), so a node needs nothing deployed
first. ``check_health`` never raises for transport trouble: an unreachable or broken node is a
health result (UNAVAILABLE with the reason), not an exception.
"""

from __future__ import annotations

import asyncio
import functools
from importlib import resources

from infra.config.model import HealthChecks, NodeConfig
from infra.errors import (
    CommandFailedError,
    NodeDocumentError,
    TransportError,
    TransportTimeoutError,
)
from infra.probe.facts import NodeFacts
from infra.probe.health import NodeHealth, evaluate, unavailable
from infra.quoting import program_command
from infra.transport.base import CommandResult, Transport
from infra.transport.marker import extract_json


@functools.cache
def probe_source() -> str:
    """The node-side probe script's source, read once from the installed package."""
    return resources.files("infra.remote").joinpath("probe.py").read_text(encoding="utf-8")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _failure(node: NodeConfig, result: CommandResult) -> CommandFailedError:
    """Explain a probe run that did not produce a document."""
    stderr = result.stderr
    detail = _last_line(stderr) or _last_line(result.stdout) or "no output"
    python = node.python_path
    if result.exit_status == 127 or (
            "not found" in stderr and python in stderr and "Traceback" not in stderr):
        reason = f"{python} not found on node"
    elif result.exit_status == 126:
        reason = f"{python} is not executable on node: {detail}"
    elif "SyntaxError" in stderr:
        reason = f"{python} on node is too old to run the probe (needs Python 3.8+): {detail}"
    elif result.signal:
        reason = f"probe killed by {result.signal}"
    elif result.exit_status not in (0, None):
        reason = f"probe failed (exit {result.exit_status}): {detail}"
    else:
        reason = f"probe returned no JSON document: {detail}"
    return CommandFailedError(node.name, reason, exit_status=result.exit_status, stderr=stderr)


async def probe_node(transport: Transport, node: NodeConfig, timeout: float) -> NodeFacts:
    """Run the probe on ``node`` and return what it found; raises ``TransportError``."""
    command = program_command(node.python_path, ["-", node.remote_work_dir])
    result = await transport.run(command, input=probe_source(), timeout=timeout)
    try:
        doc = extract_json(result.stdout)
    except ValueError:
        raise _failure(node, result) from None
    try:
        return NodeFacts.from_json(node.name, doc)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        raise NodeDocumentError(node.name, "probe", "facts", str(exc)) from None


async def check_health(transport: Transport, node: NodeConfig, checks: HealthChecks,
                       timeout: float) -> NodeHealth:
    """Probe and evaluate one node; transport failures become UNAVAILABLE, never exceptions."""
    try:
        facts = await probe_node(transport, node, timeout)
    except TransportError as exc:
        return unavailable(node.name, exc)
    except asyncio.TimeoutError:  # a transport that times out without its own error type
        return unavailable(node.name, TransportTimeoutError(
            node.name, f"probe timed out after {timeout:g} s"))
    return evaluate(node, facts, checks)
