"""A node's control channel: JSON commands in, JSON events out (``phala-p2p node --control``).

A launcher or a test harness that runs nodes as separate OS processes drives them through
this channel: one JSON object per line on the node's stdin, answered by an ``ack`` event
on its stdout (with the ``id`` the command carried)::

    {"id": 1, "cmd": "deny", "peers": ["12D3Koo..."]}   refuse these peers, close connections
    {"id": 2, "cmd": "allow_all"}                        lift every refusal
    {"id": 3, "cmd": "dial", "addrs": ["/ip4/.../p2p/..."]}
    {"id": 4, "cmd": "peers"}                            -> "peers": [...]
    {"id": 5, "cmd": "readvertise"}                      a miner advertises now
    {"id": 6, "cmd": "directory"}                        a "directory" event now
    {"id": 7, "cmd": "metrics"}                          -> "counters": {...}, "gauges": {...}

    {"event": "ack", "id": 1, "ok": true}
    {"event": "ack", "id": 9, "ok": false, "error": "unknown command 'x'"}

Nodes with a chain also report their market directory whenever it changes:
``{"event": "directory", "adverts": {"<peer id>": <seq>, ...}}``.

Commands are bounded (a line of at most ``MAX_LINE`` bytes, at most ``MAX_PEERS`` peers or
addresses); a malformed one is answered with ``ok: false`` and never stops the node.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterable, Callable
from typing import TYPE_CHECKING, Any

import trio

from phala_p2p.errors import P2PError, UsageError

if TYPE_CHECKING:
    from phala_p2p.node import Node

logger = logging.getLogger(__name__)

MAX_LINE = 64 * 1024
MAX_PEERS = 1024

Emit = Callable[[dict[str, Any]], None]


async def lines_of(chunks: AsyncIterable[bytes], *, max_line: int = MAX_LINE) -> Any:
    """Split a byte stream into lines; a line longer than ``max_line`` is skipped whole
    (reported as ``None``) instead of growing the buffer without bound."""
    buf = bytearray()
    skipping = False
    async for chunk in chunks:
        buf += chunk
        while True:
            end = buf.find(b"\n")
            if end < 0:
                if len(buf) > max_line:
                    buf.clear()
                    if not skipping:
                        skipping = True
                        yield None
                break
            line = bytes(buf[:end])
            del buf[: end + 1]
            if skipping:
                skipping = False  # the tail of the oversized line
                continue
            yield line if len(line) <= max_line else None


def directory_event(node: Node) -> dict[str, Any]:
    adverts = {a.peer_id: a.seq for a in node.market.directory.adverts()}
    return {"event": "directory", "adverts": adverts}


async def report_directory(node: Node, emit: Emit) -> None:
    """Emit a ``directory`` event now and whenever the directory changes."""
    last: dict[str, Any] | None = None
    while True:
        event = directory_event(node)
        if event != last:
            emit(event)
            last = event
        await node.market.wait_for_change()


async def serve_control(node: Node, chunks: AsyncIterable[bytes], emit: Emit) -> None:
    """Answer the commands read from ``chunks`` until it ends; commands run concurrently."""
    async with trio.open_nursery() as nursery:
        async for line in lines_of(chunks):
            if line is None:
                emit(_nack(None, f"command line longer than {MAX_LINE} bytes"))
                continue
            if not line.strip():
                continue
            try:
                command = json.loads(line)
            except ValueError as err:
                emit(_nack(None, f"not JSON: {err}"))
                continue
            if not isinstance(command, dict):
                emit(_nack(None, "a command is a JSON object"))
                continue
            nursery.start_soon(_run_one, node, command, emit)


async def _run_one(node: Node, command: dict[str, Any], emit: Emit) -> None:
    ident = command.get("id")
    if ident is not None and not isinstance(ident, int | str):
        emit(_nack(None, "id must be an integer or a string"))
        return
    try:
        extra = await _execute(node, command)
    except P2PError as err:  # UsageError for bad arguments; anything else is a bug
        emit(_nack(ident, str(err)))
        return
    emit({"event": "ack", "id": ident, "ok": True, **extra})


async def _execute(node: Node, command: dict[str, Any]) -> dict[str, Any]:
    cmd = command.get("cmd")
    if cmd == "deny":
        await deny_peers(node, _strings(command, "peers"))
        return {}
    if cmd == "allow_all":
        allow_all(node)
        return {}
    if cmd == "dial":
        failed: dict[str, str] = {}

        async def dial(addr: str) -> None:
            try:
                await node.connect(addr)
            except P2PError as err:
                failed[addr] = str(err)

        async with trio.open_nursery() as nursery:
            for addr in _strings(command, "addrs"):
                nursery.start_soon(dial, addr)
        return {"failed": failed}
    if cmd == "peers":
        return {"peers": node.peers()}
    if cmd == "readvertise":
        node.market.readvertise()
        return {}
    if cmd == "metrics":
        return node.metrics.snapshot()
    if cmd == "directory":
        if not node.has_chain:
            raise UsageError("this node keeps no chain, hence no market directory")
        return {"adverts": directory_event(node)["adverts"]}
    raise UsageError(f"unknown command {cmd!r}")


async def deny_peers(node: Node, peers: list[str]) -> None:
    """Refuse ``peers`` both ways and close the connections to them."""
    for peer in peers:
        node.gate.deny(peer)
    async with trio.open_nursery() as nursery:
        for peer in peers:
            if node.is_connected(peer):
                nursery.start_soon(node.disconnect, peer)


def allow_all(node: Node) -> None:
    """Lift every refusal, and forget recent dial failures so that redials go out now."""
    node.gate.allow_all()
    node.host.get_network().clear_dial_failures()


def _strings(command: dict[str, Any], key: str) -> list[str]:
    value = command.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{key} must be a list of strings")
    if len(value) > MAX_PEERS:
        raise UsageError(f"at most {MAX_PEERS} {key} per command")
    return value


def _nack(ident: Any, error: str) -> dict[str, Any]:
    return {"event": "ack", "id": ident, "ok": False, "error": error}
