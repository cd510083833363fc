"""One direction of a job session: a windowed STREAM sender and a receiver that acknowledges.

``ChunkSender`` seals the caller's plaintext into chunks and keeps each chunk's ciphertext
until the receiver acknowledges it, never more than ``window`` of them: its memory is
O(window x chunk size) whatever the payload. Resending after a resume hands out the very
ciphertext kept, so a chunk index is sealed exactly once (the STREAM nonce is the index: it is
never reused, let alone with another plaintext).

``ChunkReceiver`` opens chunks in order (``crypto.stream.StreamOpener``) and reports how far
it got (``index``), which the session sends back as a cumulative Ack.

Both take the session id and use its first bytes as the STREAM nonce prefix: each direction
of a session has its own key, so the prefix only has to be fixed for the stream.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from phala_p2p.crypto.stream import (
    CHUNK_OVERHEAD,
    NONCE_PREFIX_SIZE,
    StreamOpener,
    StreamSealer,
)
from phala_p2p.errors import ProtocolViolation, StreamReordered, StreamTruncated, UsageError
from phala_p2p.jobs.errors import ChunkReplayed, InboundTooLarge, SessionClosed
from phala_p2p.jobs.framing import chunk_frame_to_fill
from phala_p2p.jobs.messages import MAX_CHUNK, Chunk


@dataclass(frozen=True)
class _Held:
    """A sealed chunk kept until acknowledged: its frame, and its sealed part (a view)."""

    index: int
    frame: bytearray
    sealed: memoryview


class ChunkSender:
    """Seals chunks, holds the unacknowledged ones (at most ``window``), resends on demand."""

    def __init__(
        self, key: bytes, session_id: bytes, associated: bytes, *, window: int, chunk_size: int
    ) -> None:
        if type(window) is not int or window < 1:
            raise UsageError("window must be a positive int")
        if type(chunk_size) is not int or not 1 <= chunk_size <= MAX_CHUNK:
            raise UsageError(f"chunk_size must be an int in 1..{MAX_CHUNK}")
        self._sealer: StreamSealer | None = StreamSealer(
            key, session_id[:NONCE_PREFIX_SIZE], associated
        )
        self._next = 0
        self._finished = False
        self.window = window
        self.chunk_size = chunk_size
        self._unacked: deque[_Held] = deque()
        self._held = 0
        self._acked = 0
        self.max_in_flight = 0
        """The most chunks ever held at once (never above ``window``)."""
        self.max_held_bytes = 0
        self.bytes_sent = 0
        """Ciphertext bytes handed out to be sent, resends included."""
        self.chunks_resent = 0
        self.stale_acks = 0

    @property
    def sealed(self) -> int:
        """Chunks sealed so far (= the index of the next one)."""
        return self._next

    @property
    def acked(self) -> int:
        """Every chunk below this index is acknowledged (and forgotten)."""
        return self._acked

    @property
    def in_flight(self) -> int:
        """Chunks held: sealed, not acknowledged yet."""
        return len(self._unacked)

    @property
    def held_bytes(self) -> int:
        return self._held

    @property
    def finished(self) -> bool:
        """The final chunk has been sealed."""
        return self._finished

    @property
    def complete(self) -> bool:
        """The final chunk has been sealed and acknowledged."""
        return self._finished and not self._unacked

    @property
    def closed(self) -> bool:
        return self._sealer is None

    @property
    def room(self) -> int:
        """Chunks the caller may seal now."""
        return 0 if self.finished else self.window - len(self._unacked)

    def seal(self, plaintext: bytes | bytearray | memoryview, *, final: bool) -> Chunk:
        """Seal the next chunk and hold it until acknowledged (UsageError without room)."""
        self.seal_frame(plaintext, final=final)
        held = self._unacked[-1]  # the chunk just sealed
        return Chunk(index=held.index, sealed=bytes(held.sealed))

    def seal_frame(self, plaintext: bytes | bytearray | memoryview, *, final: bool) -> bytearray:
        """``seal``, as the CHUNK frame to send: the chunk is sealed into the frame, which is
        held (as is: do not change it) until acknowledged."""
        if self._sealer is None:
            raise SessionClosed("the sender is closed")
        if self.room <= 0:
            raise UsageError("the window is full (or the stream finished): wait for an ack")
        if not isinstance(plaintext, bytes | bytearray | memoryview):
            raise UsageError("plaintext must be bytes")
        if len(plaintext) > self.chunk_size:
            raise UsageError(f"a chunk holds at most {self.chunk_size} bytes")
        if not final and not plaintext:
            raise UsageError("only the final chunk may be empty")
        frame, sealed = chunk_frame_to_fill(self._next, len(plaintext) + CHUNK_OVERHEAD)
        self._sealer.seal_chunk_into(plaintext, sealed, final=final)
        self._unacked.append(_Held(self._next, frame, sealed))
        self._next += 1
        self._finished = final
        self._held += len(sealed)
        self.max_in_flight = max(self.max_in_flight, len(self._unacked))
        self.max_held_bytes = max(self.max_held_bytes, self._held)
        self.bytes_sent += len(sealed)
        return frame

    def on_ack(self, next_index: int) -> bool:
        """Forget the chunks below ``next_index``; whether that was news."""
        if next_index > self._next:
            raise ProtocolViolation(
                f"ack up to {next_index}, only {self._next} chunks sent", reason="bad_ack"
            )
        if next_index <= self._acked:
            self.stale_acks += 1
            return False
        while self._unacked and self._unacked[0].index < next_index:
            self._held -= len(self._unacked.popleft().sealed)
        self._acked = next_index
        return True

    def resend_from(self, next_index: int) -> list[bytearray]:
        """The frames of the held chunks from ``next_index`` on (the receiver's position after
        a resume), byte for byte as first sent; everything below counts as acknowledged."""
        if next_index < self._acked:
            raise ProtocolViolation(
                f"resume from {next_index}, but {self._acked} was acknowledged",
                reason="resume_behind",
            )
        self.on_ack(next_index)
        held = list(self._unacked)
        self.chunks_resent += len(held)
        self.bytes_sent += sum(len(h.sealed) for h in held)
        return [h.frame for h in held]

    def close(self) -> None:
        """Drop the STREAM sealer (and its key) and every held chunk; counters stay readable."""
        self._sealer = None
        self._unacked.clear()
        self._held = 0

    def __repr__(self) -> str:
        return f"ChunkSender(sealed={self.sealed}, acked={self._acked}, in_flight={self.in_flight})"


class ChunkReceiver:
    """Opens the peer's chunks in order; refuses more than ``max_total`` plaintext bytes."""

    def __init__(
        self,
        key: bytes,
        session_id: bytes,
        associated: bytes,
        *,
        max_chunk: int = MAX_CHUNK,
        max_total: int | None = None,
    ) -> None:
        if max_total is not None and (type(max_total) is not int or max_total < 0):
            raise UsageError("max_total must be a non-negative int or None")
        self._opener: StreamOpener | None = StreamOpener(
            key, session_id[:NONCE_PREFIX_SIZE], associated, max_chunk=max_chunk
        )
        self._index = 0
        self._finished = False
        self.max_total = max_total
        self.bytes_received = 0
        """Plaintext bytes opened so far."""

    @property
    def index(self) -> int:
        """The next chunk expected (= chunks opened so far)."""
        return self._index

    @property
    def finished(self) -> bool:
        """The final chunk has been opened."""
        return self._finished

    @property
    def closed(self) -> bool:
        return self._opener is None

    def open(self, chunk: Chunk) -> tuple[bytes, bool]:
        """The plaintext of ``chunk`` and whether it is the final one.

        StreamTampered (modified, or sealed for another session, direction or agreement),
        StreamReordered (ahead of ``index``), ChunkReplayed (below it), StreamTruncated (after
        the final chunk), InboundTooLarge; after any of them the stream is dead.
        """
        return self.open_sealed(chunk.index, chunk.sealed)

    def open_sealed(self, index: int, sealed: bytes | bytearray | memoryview) -> tuple[bytes, bool]:
        """``open`` of the chunk ``index`` whose sealed bytes are ``sealed`` (a view of the
        received frame: the receiver never copies the ciphertext)."""
        if self._opener is None:
            raise SessionClosed("the receiver is closed")
        try:
            plaintext, final = self._opener.open_chunk(sealed, index)
        except StreamReordered as err:
            if err.reason == "stream_replayed":
                raise ChunkReplayed(str(err)) from err
            raise
        self._index, self._finished = self._opener.index, final
        if not final and not plaintext:
            raise ProtocolViolation(f"chunk {index} is empty and not final", reason="empty_chunk")
        self.bytes_received += len(plaintext)
        if self.max_total is not None and self.bytes_received > self.max_total:
            raise InboundTooLarge(f"more than {self.max_total} bytes received")
        return plaintext, final

    def finish(self) -> None:
        """The peer will send nothing more: StreamTruncated unless the final chunk came."""
        if not self._finished:
            raise StreamTruncated(
                f"the stream ended after {self._index} chunks without its final one"
            )

    def close(self) -> None:
        """Drop the STREAM opener (and its key); ``index`` stays readable."""
        self._opener = None

    def __repr__(self) -> str:
        return f"ChunkReceiver(index={self.index}, finished={self.finished})"


__all__ = ["ChunkReceiver", "ChunkSender"]
