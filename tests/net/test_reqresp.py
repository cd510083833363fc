"""Request-response over real py-libp2p hosts on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os

import pytest
import trio

from phala_p2p import NodeConfig, open_node
from phala_p2p.errors import (
    ConnectionLost,
    ProtocolNotSupported,
    ProtocolViolation,
    RemoteError,
    RequestTimeout,
    UsageError,
)
from phala_p2p.wire.frames import FrameType, encode_frame

ECHO = "/test/echo/1.0.0"


@pytest.fixture
async def two_nodes():  # type: ignore[no-untyped-def]
    async with open_node(NodeConfig()) as a, open_node(NodeConfig()) as b:
        await a.connect(b.listen_addrs[0])
        yield a, b


async def test_echo_and_stream_reuse_of_connection(two_nodes) -> None:  # type: ignore[no-untyped-def]
    a, b = two_nodes

    async def echo(peer: str, req: bytes) -> bytes:
        assert peer == a.peer_id
        return req[::-1]

    b.serve(ECHO, echo)
    for i in range(5):
        payload = os.urandom(100 + i)
        assert await a.request(b.peer_id, ECHO, payload, timeout=5) == payload[::-1]
    assert len(a.peers()) == 1


async def test_256_mib_payload_with_hash_check(two_nodes) -> None:  # type: ignore[no-untyped-def]
    a, b = two_nodes
    size = 256 * 1024 * 1024
    payload = os.urandom(1 << 20) * 256
    digest = hashlib.sha256(payload).digest()

    async def hasher(peer: str, req: bytes) -> bytes:
        return hashlib.sha256(req).digest() + len(req).to_bytes(8, "big")

    b.serve(ECHO, hasher, max_request=size)
    answer = await a.request(b.peer_id, ECHO, payload, timeout=120)
    assert answer[:32] == digest
    assert int.from_bytes(answer[32:], "big") == size


async def test_unknown_protocol(two_nodes) -> None:  # type: ignore[no-untyped-def]
    a, b = two_nodes
    with pytest.raises(ProtocolNotSupported):
        await a.request(b.peer_id, "/test/nobody/1.0.0", b"x", timeout=5)


async def test_slow_handler_times_out(two_nodes) -> None:  # type: ignore[no-untyped-def]
    a, b = two_nodes
    release = trio.Event()

    async def slow(peer: str, req: bytes) -> bytes:
        await release.wait()
        return req

    b.serve(ECHO, slow)
    start = trio.current_time()
    with pytest.raises(RequestTimeout):
        await a.request(b.peer_id, ECHO, b"x", timeout=0.5)
    assert trio.current_time() - start < 2
    release.set()


async def test_handler_error_reaches_caller_typed(two_nodes) -> None:  # type: ignore[no-untyped-def]
    a, b = two_nodes

    async def refuse(peer: str, req: bytes) -> bytes:
        raise UsageError("no thanks")

    async def crash(peer: str, req: bytes) -> bytes:
        raise RuntimeError("bug")

    b.serve(ECHO, refuse)
    b.serve("/test/crash/1.0.0", crash)
    with pytest.raises(RemoteError, match="no thanks"):
        await a.request(b.peer_id, ECHO, b"x", timeout=5)
    with pytest.raises(RemoteError, match="internal error"):
        await a.request(b.peer_id, "/test/crash/1.0.0", b"x", timeout=5)


async def test_oversized_request_is_refused_and_other_streams_keep_working(two_nodes) -> None:  # type: ignore[no-untyped-def]
    a, b = two_nodes
    got: list[bytes] = []

    async def echo(peer: str, req: bytes) -> bytes:
        got.append(req)
        return req

    b.serve(ECHO, echo, max_request=1024)
    # A long request keeps a stream open while the oversized one is refused.
    async with a.open_stream(b.peer_id, ECHO, max_message=1024) as long_lived:
        with pytest.raises((ConnectionLost, ProtocolViolation)):
            await a.request(b.peer_id, ECHO, b"x" * 4096, timeout=5)
        await long_lived.send(b"still here")
        assert await long_lived.receive() == b"still here"
    assert await a.request(b.peer_id, ECHO, b"after", timeout=5) == b"after"
    assert b.metrics.rejected.get("message_too_large", 0) >= 1
    assert b"x" * 4096 not in got


async def test_oversized_frame_header_is_protocol_violation(two_nodes) -> None:  # type: ignore[no-untyped-def]
    """A raw frame announcing more than the frame cap is refused before its payload."""
    a, b = two_nodes

    async def echo(peer: str, req: bytes) -> bytes:
        return req

    b.serve(ECHO, echo)
    async with a.open_stream(b.peer_id, ECHO) as s:
        # Write a header announcing 64 MiB straight onto the stream.
        await s._stream.write(bytes([FrameType.DATA]) + (64 << 20).to_bytes(4, "big"))
        with pytest.raises(ConnectionLost):
            await s.receive()
    assert b.metrics.rejected.get("frame_too_large", 0) == 1
    assert await a.request(b.peer_id, ECHO, b"ok", timeout=5) == b"ok"


async def test_response_over_caller_cap_is_protocol_violation(two_nodes) -> None:  # type: ignore[no-untyped-def]
    a, b = two_nodes

    async def big(peer: str, req: bytes) -> bytes:
        return b"y" * 10_000

    b.serve(ECHO, big)
    with pytest.raises(ProtocolViolation) as info:
        await a.request(b.peer_id, ECHO, b"x", timeout=5, max_response=1000)
    assert info.value.reason == "message_too_large"


async def test_truncated_message_is_connection_lost_not_eof(two_nodes) -> None:  # type: ignore[no-untyped-def]
    """A peer that stops mid-message (no END) yields ConnectionLost, never a short message."""
    a, b = two_nodes
    seen: list[BaseException] = []
    done = trio.Event()

    async def reader(stream) -> None:  # type: ignore[no-untyped-def]
        try:
            await stream.receive()
        except ConnectionLost as err:
            seen.append(err)
        finally:
            done.set()

    b.serve_stream(ECHO, reader)
    async with a.open_stream(b.peer_id, ECHO) as s:
        await s._stream.write(encode_frame(FrameType.DATA, b"half a message"))
    await done.wait()
    assert len(seen) == 1


async def test_connection_cut_mid_transfer_is_typed_on_both_ends() -> None:
    async with open_node(NodeConfig()) as a, open_node(NodeConfig()) as b:
        await a.connect(b.listen_addrs[0])
        server_errors: list[BaseException] = []
        receiving = trio.Event()
        server_done = trio.Event()

        async def sink(stream) -> None:  # type: ignore[no-untyped-def]
            try:
                async for _chunk in stream.receive_chunks():
                    receiving.set()
            except ConnectionLost as err:
                server_errors.append(err)
            finally:
                server_done.set()

        b.serve_stream(ECHO, sink, max_message=1 << 40)

        async def chunks():  # type: ignore[no-untyped-def]
            for _ in range(100_000):
                yield b"z" * 65536

        client_errors: list[BaseException] = []
        async with trio.open_nursery() as n:

            async def cut() -> None:
                await receiving.wait()
                await b.disconnect(a.peer_id)

            n.start_soon(cut)
            try:
                async with a.open_stream(b.peer_id, ECHO, max_message=1 << 40) as s:
                    await s.send_chunks(chunks())
            except ConnectionLost as err:
                client_errors.append(err)
        assert len(client_errors) == 1
        await server_done.wait()
        assert len(server_errors) == 1


async def test_bad_arguments_are_usage_errors(two_nodes) -> None:  # type: ignore[no-untyped-def]
    a, b = two_nodes
    with pytest.raises(UsageError):
        await a.request(b.peer_id, "no-slash", b"x", timeout=1)
    with pytest.raises(UsageError):
        await a.request(b.peer_id, ECHO, b"x", timeout=0)
    with pytest.raises(UsageError):
        await a.connect("/ip4/127.0.0.1/tcp/1")
    with pytest.raises(UsageError):
        b.serve("/phala/ping/1.0.0", lambda p, r: r)  # type: ignore[arg-type, return-value]
