"""Outbound stream opening with lazy multistream-select.

py-libp2p's client waits for the multistream header before it proposes a protocol, then for
the answer before it writes: two round trips before the first byte of a request. As
go-libp2p's lazy client does, we send the header and our single proposal at once and return
the stream at once: the caller writes its request straight away and the answer to the
proposal is read (and checked) with the first read, so a request costs one round trip in
all. py-libp2p's responder reads the negotiation lines exactly, so a request sent early
waits in the stream for the handler. The responder side is py-libp2p's own, unchanged.
"""

from __future__ import annotations

from typing import Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID

from phala_p2p.errors import ConnectionLost, PeerUnreachable, ProtocolNotSupported, RequestTimeout

MULTISTREAM = b"/multistream/1.0.0"
MAX_LINE = 1024


def _encode_line(text: bytes) -> bytes:
    body = text + b"\n"
    return _uvarint(len(body)) + body


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class _LineReader:
    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._buf = bytearray()

    async def _fill(self) -> None:
        chunk = await self._stream.read(4096)
        if not chunk:
            raise ConnectionLost("stream closed during protocol negotiation")
        self._buf += chunk

    async def line(self) -> bytes:
        while True:
            length, used = _parse_uvarint(self._buf)
            if length is not None:
                if length > MAX_LINE:
                    raise ProtocolNotSupported("oversized multistream line")
                if len(self._buf) >= used + length:
                    body = bytes(self._buf[used : used + length])
                    del self._buf[: used + length]
                    if not body.endswith(b"\n"):
                        raise ProtocolNotSupported("malformed multistream line")
                    return body[:-1]
            elif len(self._buf) > 10:
                raise ProtocolNotSupported("malformed multistream length")
            await self._fill()

    def leftover(self) -> bytes:
        return bytes(self._buf)


def _parse_uvarint(buf: bytearray) -> tuple[int | None, int]:
    value = 0
    for i, byte in enumerate(buf[:10]):
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, i + 1
    return None, 0


async def open_stream(host: Any, peer_id: str, protocol: str, *, timeout: float) -> Any:
    """Open a stream to a connected (or dialable) peer, proposing ``protocol``.

    Raises PeerUnreachable, RequestTimeout or ConnectionLost. The stream is returned as
    soon as the proposal is written: its first read raises ProtocolNotSupported if the
    peer does not speak ``protocol`` (the stream is then reset), else returns data past
    the negotiation.
    """
    pid = ID.from_base58(peer_id)
    with trio.move_on_after(timeout):
        try:
            stream = await host.get_network().new_stream(pid)
        except BaseLibp2pError as err:
            raise PeerUnreachable(f"cannot open a stream to {peer_id}: {err}") from err
        ok = False
        try:
            await stream.write(_encode_line(MULTISTREAM) + _encode_line(protocol.encode()))
            ok = True
        except BaseLibp2pError as err:
            raise ConnectionLost(f"stream to {peer_id} broke during negotiation") from err
        finally:
            if not ok:
                await _reset_quietly(stream)
        stream.set_protocol(TProtocol(protocol))
        return LazyStream(stream, peer_id, protocol)
    raise RequestTimeout(f"opening {protocol} to {peer_id} took longer than {timeout}s")


class LazyStream:
    """A py-libp2p stream whose multistream answer is read with its first read."""

    def __init__(self, stream: Any, peer_id: str, protocol: str) -> None:
        self._stream = stream
        self._peer_id = peer_id
        self._protocol = protocol
        self._negotiated = False
        self._early = b""  # data the peer sent with its answer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def read(self, n: int | None = None) -> bytes:
        if not self._negotiated:
            await self._negotiate()
        if self._early:
            size = len(self._early) if n is None or n < 0 else n
            early, self._early = self._early[:size], self._early[size:]
            return early
        data: bytes = await self._stream.read(n)
        return data

    async def _negotiate(self) -> None:
        peer, protocol = self._peer_id, self._protocol
        reader = _LineReader(self._stream)
        ok = False
        try:
            if await reader.line() != MULTISTREAM:
                raise ProtocolNotSupported(f"{peer} does not speak multistream-select")
            if await reader.line() != protocol.encode():
                raise ProtocolNotSupported(f"{peer} does not support {protocol}")
            ok = True
        except BaseLibp2pError as err:
            raise ConnectionLost(f"stream to {peer} broke during negotiation") from err
        finally:
            if not ok:
                await _reset_quietly(self._stream)
        self._negotiated = True
        self._early = reader.leftover()


async def _reset_quietly(stream: Any) -> None:
    with trio.CancelScope(shield=True):
        try:
            await stream.reset()
        except BaseLibp2pError:
            pass
