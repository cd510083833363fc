"""Framed message streams over libp2p streams.

Every message is a run of DATA frames closed by an END frame that repeats the total length
(layout in ``protocols/framing.md``). A stream that ends without END is a lost connection,
never a message: py-libp2p reports an abrupt loss as a clean EOF, so only our framing can
tell the two apart. Frame and message sizes are bounded; a violation is reported to the
caller as ProtocolViolation and the stream is reset, leaving the connection's other
streams untouched.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import trio
from libp2p.exceptions import BaseLibp2pError

from phala_p2p.errors import Cancelled, ConnectionLost, ProtocolViolation, RemoteError
from phala_p2p.wire.frames import (
    DEFAULT_MAX_FRAME,
    Frame,
    FrameDecoder,
    FrameType,
    MessageAssembler,
    encode_error,
    encode_frame,
)

READ_SIZE = 256 * 1024
CLOSE_TIMEOUT = 2.0
"""Seconds a close or reset may take: either writes a frame, which a connection whose peer
went silent never takes (the connection itself is then closed by the health checks)."""
DEFAULT_CHUNK = 256 * 1024


class FramedStream:
    """One side of a framed exchange on a libp2p stream.

    ``send``/``receive`` move whole messages; ``send_chunks``/``receive_chunks`` move a
    message piece by piece for payloads too large to hold at once. Byte counters feed the
    node's metrics.
    """

    def __init__(
        self,
        stream: Any,
        *,
        peer_id: str,
        protocol: str,
        max_message: int,
        max_frame: int = DEFAULT_MAX_FRAME,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> None:
        self.peer_id = peer_id
        self.protocol = protocol
        self.max_message = max_message
        self._stream = stream
        self._decoder = FrameDecoder(max_frame=max_frame)
        self._chunk_size = min(chunk_size, max_frame)
        self._send_lock = trio.Lock()
        self.bytes_sent = 0
        self.bytes_received = 0

    # -- sending ---------------------------------------------------------------------------

    async def _write(self, data: bytes) -> None:
        try:
            await self._stream.write(data)
        except BaseLibp2pError as err:
            raise ConnectionLost(f"stream to {self.peer_id} broke while sending") from err
        self.bytes_sent += len(data)

    async def send(self, data: bytes) -> None:
        """Send one whole message."""
        async with self._send_lock:
            view = memoryview(data)
            for start in range(0, len(data), self._chunk_size):
                piece = view[start : start + self._chunk_size]
                await self._write(encode_frame(FrameType.DATA, bytes(piece)))
            await self._write(encode_frame(FrameType.END, len(data).to_bytes(8, "big")))

    async def send_chunks(self, chunks: AsyncIterator[bytes]) -> int:
        """Send one message made of ``chunks`` as they come; returns its length."""
        total = 0
        async with self._send_lock:
            async for chunk in chunks:
                view = memoryview(chunk)
                for start in range(0, len(chunk), self._chunk_size):
                    piece = bytes(view[start : start + self._chunk_size])
                    await self._write(encode_frame(FrameType.DATA, piece))
                total += len(chunk)
            await self._write(encode_frame(FrameType.END, total.to_bytes(8, "big")))
        return total

    async def send_error(self, code: int, message: str) -> None:
        async with self._send_lock:
            await self._write(encode_error(code, message))

    async def send_cancel(self, reason: str) -> None:
        async with self._send_lock:
            await self._write(encode_frame(FrameType.CANCEL, reason.encode()[:1024]))

    # -- receiving -------------------------------------------------------------------------

    async def _next_frame(self) -> Frame:
        while True:
            frame = self._decoder.next_frame()
            if frame is not None:
                return frame
            try:
                chunk = await self._stream.read(READ_SIZE)
            except BaseLibp2pError as err:
                raise ConnectionLost(
                    f"stream from {self.peer_id} ended before the message was complete"
                ) from err
            if not chunk:
                raise ConnectionLost(
                    f"stream from {self.peer_id} ended before the message was complete"
                )
            self.bytes_received += len(chunk)
            self._decoder.feed(chunk)

    async def receive(self) -> bytes:
        """Receive one whole message (at most ``max_message`` bytes)."""
        assembler = MessageAssembler(max_message=self.max_message)
        try:
            while True:
                message = assembler.add(await self._next_frame())
                if message is not None:
                    return message
        except ProtocolViolation:
            await self.reset()
            raise

    async def receive_chunks(self) -> AsyncIterator[bytes]:
        """Yield one message's pieces as they arrive; ends after its END frame."""
        total = 0
        try:
            while True:
                frame = await self._next_frame()
                if frame.type == FrameType.DATA:
                    total += len(frame.payload)
                    if total > self.max_message:
                        raise ProtocolViolation(
                            f"message from {self.peer_id} exceeds {self.max_message} bytes",
                            reason="message_too_large",
                        )
                    yield frame.payload
                elif frame.type == FrameType.END:
                    announced = int.from_bytes(frame.payload, "big")
                    if announced != total:
                        raise ProtocolViolation(
                            f"END announces {announced} bytes, {total} arrived",
                            reason="length_mismatch",
                        )
                    return
                else:
                    MessageAssembler(max_message=0).add(frame)  # raises the remote's error
                    raise ProtocolViolation("unexpected frame", reason="malformed")
        except ProtocolViolation:
            await self.reset()
            raise

    # -- closing ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Close our writing side; the peer reads END-then-EOF."""
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            try:
                await self._stream.close()
            except BaseLibp2pError:
                pass

    async def reset(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            try:
                await self._stream.reset()
            except BaseLibp2pError:
                pass


class RawStream:
    """The bytes of a libp2p stream, for protocols that frame their own messages
    (``/phala/job/1.0.0``). ``read`` returns b"" at the end of the stream, which may be a clean
    close or an abrupt loss (py-libp2p reports both alike): such a protocol must carry its own
    end marker. Errors of the transport are ConnectionLost."""

    def __init__(self, stream: Any, *, peer_id: str, protocol: str) -> None:
        self.peer_id = peer_id
        self.protocol = protocol
        self._stream = stream
        self._closed = False
        self.bytes_sent = 0
        self.bytes_received = 0

    async def read(self, max_bytes: int = READ_SIZE) -> bytes:
        try:
            data: bytes = await self._stream.read(max_bytes)
        except BaseLibp2pError as err:
            raise ConnectionLost(f"stream from {self.peer_id} broke: {err}") from err
        self.bytes_received += len(data)
        return data

    async def write(self, data: bytes) -> None:
        if not data:
            return
        try:
            await self._stream.write(data)
        except BaseLibp2pError as err:
            raise ConnectionLost(f"stream to {self.peer_id} broke while sending") from err
        self.bytes_sent += len(data)

    async def close(self) -> None:
        """Close our writing side: the peer reads what we wrote, then the end."""
        self._closed = True
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            try:
                await self._stream.close()
            except BaseLibp2pError:
                pass

    async def reset(self) -> None:
        """Abort the stream both ways (nothing if we closed it cleanly already)."""
        if self._closed:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            try:
                await self._stream.reset()
            except BaseLibp2pError:
                pass


__all__ = ["Cancelled", "FramedStream", "RawStream", "RemoteError"]
