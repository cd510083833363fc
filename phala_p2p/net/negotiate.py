"""Outbound stream opening with pipelined multistream-select.

py-libp2p's client waits for the multistream header before it proposes a protocol: two
round trips per stream. multistream-select allows the initiator to send the header and
its single proposal at once (go-libp2p's "lazy" client does), so a stream costs one round
trip. The responder side is py-libp2p's own, unchanged.
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
    """Open a stream to a connected (or dialable) peer speaking ``protocol``.

    Raises PeerUnreachable, ProtocolNotSupported, RequestTimeout or ConnectionLost.
    The returned stream has no unread negotiation bytes.
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
            reader = _LineReader(stream)
            if await reader.line() != MULTISTREAM:
                raise ProtocolNotSupported(f"{peer_id} does not speak multistream-select")
            answer = await reader.line()
            if answer != protocol.encode():
                raise ProtocolNotSupported(f"{peer_id} does not support {protocol}")
            if reader.leftover():
                raise ProtocolNotSupported(f"{peer_id} sent data before the request")
            ok = True
        except BaseLibp2pError as err:
            raise ConnectionLost(f"stream to {peer_id} broke during negotiation") from err
        finally:
            if not ok:
                await _reset_quietly(stream)
        stream.set_protocol(TProtocol(protocol))
        return stream
    raise RequestTimeout(f"opening {protocol} to {peer_id} took longer than {timeout}s")


async def _reset_quietly(stream: Any) -> None:
    with trio.CancelScope(shield=True):
        try:
            await stream.reset()
        except BaseLibp2pError:
            pass
