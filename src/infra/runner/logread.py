"""Reading an instance's log without acting on its run: no lease, no writes.

The local copy (``logs/<run>/<instance>.log``) has one writer, the coordinator that holds the
run's lease (``watch`` or a run's own monitor); two writers would append the same bytes
twice. A reader (``logs``, ``logs -f``) prints that copy as it is, then the node's log from
where the copy ends, straight from the node-side supervisor, and never writes the copy or
the store. So reading works the same whether or not another coordinator watches the run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from infra.errors import TransportError
from infra.runner.lifecycle import RunSession, local_log_path
from infra.state import InstancePhase

Output = Callable[[bytes], None]
CHUNK = 1 << 20


def print_local(path: Path, start: int, end: int | None, out: Output) -> int:
    """Print the local copy's bytes from ``start`` to ``end`` (its end when None).

    Returns the position reached; a missing copy prints nothing.
    """
    pos = start
    try:
        with open(path, "rb") as fh:
            fh.seek(start)
            while end is None or pos < end:
                data = fh.read(CHUNK if end is None else min(CHUNK, end - pos))
                if not data:
                    break
                out(data)
                pos += len(data)
    except FileNotFoundError:
        pass
    return pos


async def read_node(session: RunSession, run_id: str, instance_id: str, node: str,
                    offset: int, out: Output) -> int:
    """Print the node's log from ``offset`` to its current end; returns the new offset."""
    client = await session.client(node)
    while True:
        piece = await client.read(run_id, instance_id, offset)
        if piece.data:
            out(piece.data)
            offset += len(piece.data)
        if piece.eof or not piece.data:
            return offset


async def show_log(session: RunSession, run_id: str, instance_id: str, out: Output, *,
                   follow: bool, retry_delay: float = 1.0) -> None:
    """Print the local copy, then the node's log beyond it (until the end with ``follow``).

    The local copy is printed first, so it shows even when the node cannot be reached (the
    error is raised after it).
    """
    path = local_log_path(session.cluster, run_id, instance_id)
    position = print_local(path, 0, None, out)
    rec = session.store.instance(run_id, instance_id)
    # the copy holds earlier nodes' output up to log_base; the current node's log follows
    base, offset = rec.log_base, max(0, position - rec.log_base)
    if not follow:
        await read_node(session, run_id, instance_id, rec.node, offset, out)
        return
    while True:
        rec = session.store.instance(run_id, instance_id)
        if rec.log_base != base:
            # moved meanwhile: the copy has the old node's tail and the move line up to the
            # new base (written by the watcher); the new node's log starts at its byte 0
            print_local(path, base + offset, rec.log_base, out)
            base, offset = rec.log_base, 0
        try:
            client = await session.client(rec.node)
            async for chunk in client.follow(run_id, instance_id, offset):
                out(chunk)
                offset += len(chunk)
            mine = [s for s in await client.status(run_id, only=[instance_id])
                    if s.instance_id == instance_id]
            if not mine or mine[0].is_final:
                offset = await read_node(session, run_id, instance_id, rec.node, offset, out)
                if session.store.instance(run_id, instance_id).log_base == base:
                    return  # ended where we read it, not moved meanwhile
        except TransportError as exc:
            if rec.state in (InstancePhase.LOST, InstancePhase.PAUSED):
                raise  # its node is gone and nothing will run it again
            session.emit("log", instance_id, f"log stream interrupted ({exc.reason}); "
                         "resuming")
        await asyncio.sleep(retry_delay)
