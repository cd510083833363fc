"""Request-response and framed streams over libp2p, with per-protocol size caps.

A request is one framed message and its response is one framed message or an ERROR
frame, each on a fresh stream (layout in ``protocols/framing.md``). Each protocol has its
own caps (request size, response size, concurrent streams per peer, handler time), like
rust-libp2p's request-response codecs, and every outbound failure is typed.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError

from phala_p2p.errors import (
    ConnectionLost,
    P2PError,
    ProtocolViolation,
    RemoteError,
    RequestTimeout,
    UsageError,
)
from phala_p2p.net.metrics import Metrics
from phala_p2p.net.negotiate import open_stream
from phala_p2p.net.streams import CLOSE_TIMEOUT, FramedStream, RawStream

logger = logging.getLogger(__name__)

# What a buggy handler raises (anything else is not a handler's bug and propagates).
HANDLER_BUGS = (
    ArithmeticError,
    AssertionError,
    AttributeError,
    LookupError,
    OSError,
    RuntimeError,
    TypeError,
    ValueError,
)

Handler = Callable[[str, bytes], Awaitable[bytes]]
StreamHandler = Callable[[FramedStream], Awaitable[None]]
RawHandler = Callable[[RawStream], Awaitable[None]]

# Error codes carried in ERROR frames (protocols/framing.md).
ERR_INTERNAL = 500
ERR_TOO_BUSY = 503
ERR_TIMEOUT = 504
ERR_BAD_REQUEST = 400


@dataclass(frozen=True)
class ProtocolLimits:
    """Caps of one request-response protocol."""

    max_request: int = 1 << 20
    max_response: int = 1 << 20
    max_streams_per_peer: int = 16
    handler_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.max_request <= 1 << 40 or not 0 < self.max_response <= 1 << 40:
            raise UsageError("message caps must be between 1 byte and 1 TiB")
        if self.max_streams_per_peer < 1:
            raise UsageError("max_streams_per_peer must be at least 1")
        if self.handler_timeout <= 0:
            raise UsageError("handler_timeout must be positive")


def _check_protocol(protocol: str) -> None:
    if not protocol.startswith("/") or len(protocol) > 200 or "\n" in protocol:
        raise UsageError(f"not a protocol id: {protocol!r} (expected like /phala/x/1.0.0)")


class RequestResponse:
    """Serves and makes requests for a host; one per node."""

    def __init__(self, host: Any, metrics: Metrics, *, negotiation_timeout: float) -> None:
        self._host = host
        self._metrics = metrics
        self._negotiation_timeout = negotiation_timeout
        self._limits: dict[str, ProtocolLimits] = {}
        self._open: Counter[tuple[str, str]] = Counter()

    # -- serving ---------------------------------------------------------------------------

    def serve(self, protocol: str, handler: Handler, limits: ProtocolLimits | None = None) -> None:
        """Answer ``protocol`` requests with ``await handler(peer_id, request) -> response``.

        A handler that raises a P2PError answers with an ERROR frame carrying its message;
        any other exception is logged and answered as an internal error.
        """

        async def on_stream(fs: FramedStream) -> None:
            lim = self._limits[protocol]
            request = await fs.receive()
            try:
                with trio.fail_after(lim.handler_timeout):
                    response = await handler(fs.peer_id, request)
            except trio.TooSlowError:
                self._metrics.count("handler_timeouts", protocol=protocol)
                await fs.send_error(ERR_TIMEOUT, "handler timed out")
                return
            except P2PError as err:
                code = err.code if isinstance(err, RemoteError) else ERR_BAD_REQUEST
                await fs.send_error(code, f"{type(err).__name__}: {err}"[:1000])
                return
            except HANDLER_BUGS:  # a handler bug must not take the node down
                logger.exception("handler for %s failed", protocol)
                await fs.send_error(ERR_INTERNAL, "internal error")
                return
            if not isinstance(response, bytes | bytearray):
                logger.error("handler for %s returned %s, not bytes", protocol, type(response))
                await fs.send_error(ERR_INTERNAL, "internal error")
                return
            if len(response) > lim.max_response:
                logger.error("handler for %s returned an oversized response", protocol)
                await fs.send_error(ERR_INTERNAL, "response too large")
                return
            await fs.send(bytes(response))

        self.serve_stream(protocol, on_stream, limits)

    def serve_stream(
        self,
        protocol: str,
        handler: StreamHandler,
        limits: ProtocolLimits | None = None,
    ) -> None:
        """Hand each inbound ``protocol`` stream, framed, to ``await handler(stream)``.

        The stream's receive cap is the protocol's ``max_request``.
        """

        def framed(stream: Any, peer_id: str) -> FramedStream:
            return FramedStream(
                stream, peer_id=peer_id, protocol=protocol, max_message=lim.max_request
            )

        lim = limits or ProtocolLimits()
        self._serve(protocol, handler, lim, framed)

    def serve_raw(
        self, protocol: str, handler: RawHandler, limits: ProtocolLimits | None = None
    ) -> None:
        """Hand each inbound ``protocol`` stream's bytes to ``await handler(stream)``."""

        def raw(stream: Any, peer_id: str) -> RawStream:
            return RawStream(stream, peer_id=peer_id, protocol=protocol)

        self._serve(protocol, handler, limits or ProtocolLimits(), raw)

    def _serve(
        self,
        protocol: str,
        handler: Callable[[Any], Awaitable[None]],
        lim: ProtocolLimits,
        wrap: Callable[[Any, str], FramedStream | RawStream],
    ) -> None:
        _check_protocol(protocol)
        if protocol in self._limits:
            raise UsageError(f"{protocol} is already served")
        self._limits[protocol] = lim

        async def raw_handler(stream: Any) -> None:
            peer_id = str(stream.muxed_conn.peer_id)
            key = (peer_id, protocol)
            if self._open[key] >= lim.max_streams_per_peer:
                self._metrics.count("streams_refused", protocol=protocol)
                await _reset(stream)
                return
            self._open[key] += 1
            fs = wrap(stream, peer_id)
            try:
                await handler(fs)
            except ProtocolViolation as err:
                self._metrics.count("rejected", reason=err.reason)
                logger.info("%s from %s: %s", protocol, peer_id, err)
            except ConnectionLost as err:
                logger.debug("%s from %s: %s", protocol, peer_id, err)
            finally:
                self._open[key] -= 1
                if not self._open[key]:
                    del self._open[key]
                self._metrics.add_bytes(fs.bytes_sent, fs.bytes_received)
                await fs.close()

        self._host.set_stream_handler(TProtocol(protocol), raw_handler)

    def unserve(self, protocol: str) -> None:
        if self._limits.pop(protocol, None) is not None:
            self._host.remove_stream_handler(TProtocol(protocol))

    # -- requesting ------------------------------------------------------------------------

    @asynccontextmanager
    async def open_raw(self, peer_id: str, protocol: str) -> AsyncIterator[RawStream]:
        """A raw stream to ``peer_id``; closed (or reset on error) when the block ends."""
        _check_protocol(protocol)
        stream = await open_stream(self._host, peer_id, protocol, timeout=self._negotiation_timeout)
        rs = RawStream(stream, peer_id=peer_id, protocol=protocol)
        ok = False
        try:
            yield rs
            ok = True
        finally:
            self._metrics.add_bytes(rs.bytes_sent, rs.bytes_received)
            if ok:
                await rs.close()
            else:
                await rs.reset()

    async def request(
        self,
        peer_id: str,
        protocol: str,
        payload: bytes,
        *,
        timeout: float,
        max_response: int | None = None,
    ) -> bytes:
        """Send one request and wait for its response, all within ``timeout`` seconds."""
        _check_protocol(protocol)
        if timeout <= 0:
            raise UsageError("timeout must be positive")
        cap = max_response if max_response is not None else self._default_cap(protocol)
        with trio.move_on_after(timeout) as scope:
            async with self.open_stream(peer_id, protocol, max_message=cap) as fs:
                await fs.send(payload)
                response = await fs.receive()
                self._metrics.count("requests", protocol=protocol)
                return response
        assert scope.cancelled_caught
        self._metrics.count("request_timeouts", protocol=protocol)
        raise RequestTimeout(f"{protocol} request to {peer_id} timed out after {timeout}s")

    def _default_cap(self, protocol: str) -> int:
        lim = self._limits.get(protocol)
        return lim.max_response if lim is not None else ProtocolLimits().max_response

    @asynccontextmanager
    async def open_stream(
        self, peer_id: str, protocol: str, *, max_message: int = 1 << 20
    ) -> AsyncIterator[FramedStream]:
        """A framed stream to ``peer_id``; closed (or reset on error) when the block ends."""
        _check_protocol(protocol)
        stream = await open_stream(self._host, peer_id, protocol, timeout=self._negotiation_timeout)
        fs = FramedStream(stream, peer_id=peer_id, protocol=protocol, max_message=max_message)
        ok = False
        try:
            yield fs
            ok = True
        finally:
            self._metrics.add_bytes(fs.bytes_sent, fs.bytes_received)
            if ok:
                await fs.close()
            else:
                await fs.reset()


async def _reset(stream: Any) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
        try:
            await stream.reset()
        except BaseLibp2pError:
            pass
