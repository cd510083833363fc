"""The node control channel (``phala-p2p node --control``) against real in-process hosts."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import trio

from phala_p2p import NodeConfig, open_node
from phala_p2p.control import MAX_LINE, lines_of, serve_control
from phala_p2p.testing import wait_until


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def _lines(*parts: bytes, max_line: int = MAX_LINE) -> list[bytes | None]:
    return [line async for line in lines_of(_chunks(*parts), max_line=max_line)]


async def test_lines_are_split_across_chunks_and_oversized_lines_skipped_whole() -> None:
    assert await _lines(b'{"a"', b": 1}\n{}\n", b"x") == [b'{"a": 1}', b"{}"]
    long = b"y" * 50
    got = await _lines(b"ok\n", long[:30], long[30:] + b"\nafter\n", max_line=20)
    assert got == [b"ok", None, b"after"]  # one None for the long line, then in step again


class _Driver:
    """Feeds command lines to serve_control and collects what it emits."""

    def __init__(self) -> None:
        self.send, self._recv = trio.open_memory_channel[bytes](16)
        self.events: list[dict[str, Any]] = []

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self._recv:
            yield chunk

    async def ask(self, command: dict[str, Any] | bytes) -> dict[str, Any]:
        before = len(self.events)
        raw = command if isinstance(command, bytes) else json.dumps(command).encode()
        await self.send.send(raw + b"\n")
        await wait_until(lambda: len(self.events) > before, 10, message="an answer")
        return self.events[before]


async def test_deny_cuts_a_real_connection_and_allow_all_and_dial_restore_it() -> None:
    async with open_node(NodeConfig()) as a, open_node(NodeConfig()) as b:
        await a.connect(b.listen_addrs[0])
        d = _Driver()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_control, a, d.chunks(), d.events.append)

            assert await d.ask({"id": 1, "cmd": "peers"}) == {
                "event": "ack",
                "id": 1,
                "ok": True,
                "peers": [b.peer_id],
            }
            assert (await d.ask({"id": 2, "cmd": "deny", "peers": [b.peer_id]}))["ok"]
            assert not a.is_connected(b.peer_id)
            assert not b.is_connected(a.peer_id)
            # refused both ways while denied
            failed = await d.ask({"id": 3, "cmd": "dial", "addrs": [b.listen_addrs[0]]})
            assert failed["ok"]
            assert list(failed["failed"]) == [b.listen_addrs[0]]
            assert not a.is_connected(b.peer_id)

            assert (await d.ask({"id": 4, "cmd": "allow_all"}))["ok"]
            dialed = await d.ask({"id": "five", "cmd": "dial", "addrs": [b.listen_addrs[0]]})
            assert dialed == {"event": "ack", "id": "five", "ok": True, "failed": {}}
            assert a.is_connected(b.peer_id)

            # the node's counters and gauges, as plain JSON
            metrics = await d.ask({"id": 6, "cmd": "metrics"})
            assert metrics["ok"]
            assert metrics["counters"] == a.metrics.snapshot()["counters"]
            assert metrics["gauges"]["peers"] == 1
            nursery.cancel_scope.cancel()


async def test_bad_commands_are_answered_and_the_channel_keeps_serving() -> None:
    async with open_node(NodeConfig()) as node:
        d = _Driver()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_control, node, d.chunks(), d.events.append)
            bad = [
                (b"{not json", "not JSON"),
                (b"[1, 2]", "a command is a JSON object"),
                (b'{"id": 1, "cmd": "reboot"}', "unknown command 'reboot'"),
                (b'{"id": 2, "cmd": "deny", "peers": "all"}', "peers must be a list"),
                (b'{"id": [1], "cmd": "peers"}', "id must be an integer or a string"),
                (b'{"id": 3, "cmd": "directory"}', "keeps no chain"),
                (b'{"id": 4, "cmd": "readvertise"}', "no market"),
                (b'{"id": 5, "cmd": "dial", "addrs": ["/ip4/1.2.3.4"]}', ""),
                (b"z" * (MAX_LINE + 10), "longer than"),
            ]
            for raw, why in bad:
                answer = await d.ask(raw)
                if why:
                    assert answer["ok"] is False, raw
                    assert why in answer["error"], (raw, answer)
                else:  # a malformed address is reported per address, not as a crash
                    assert answer["ok"] is True
                    assert "not a dialable multiaddr" in answer["failed"]["/ip4/1.2.3.4"]
            assert (await d.ask({"id": 9, "cmd": "peers"}))["ok"]  # still serving
            nursery.cancel_scope.cancel()
