"""The job session machine shared by both sides once the session keys exist (sans-IO).

A session outlives its connections. Bytes (or frames) come in with ``receive_data`` /
``receive_frames``; what to write comes out of ``data_to_send``; the caller's plaintext goes
in with ``send`` when ``send_room`` says there is room, and arrives at the peer as
``DataReceived`` events. Time is a parameter (``now_ms``); nothing here reads a clock.

When the transport drops, the driver calls ``connection_lost``: the session keeps its keys
and its unacknowledged chunks for ``grace_ms`` (``expired``), and continues on a new
connection after a resume (``ClientJobSession.resume``, ``SessionTable.open``). ``close``
erases the keys; ``cancel`` tells the peer why first.

Any fault of the peer raises a ``ProtocolViolation`` (see ``jobs.errors``) after queueing an
authenticated Cancel for the peer: the driver writes ``data_to_send()`` and drops the
connection. The session is then closed, its keys erased; events decoded earlier in the same
call are lost with it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar, NoReturn

from phala_p2p.errors import ProtocolViolation, UsageError
from phala_p2p.jobs.config import JobConfig
from phala_p2p.jobs.errors import (
    BadMac,
    CancelCode,
    FrameError,
    JobCancelled,
    SessionClosed,
    cancel_code_for,
)
from phala_p2p.jobs.flow import ChunkReceiver, ChunkSender
from phala_p2p.jobs.framing import (
    Frame,
    FrameDecoder,
    FrameType,
    decode_frame,
    encode_frame,
    split_chunk,
)
from phala_p2p.jobs.keys import (
    ACK_LABEL,
    CANCEL_LABEL,
    Direction,
    SessionKeys,
    stream_associated_data,
)
from phala_p2p.jobs.messages import MAX_CANCEL_TEXT, Ack, Cancel, Chunk, JobMessage


class State(enum.Enum):
    HELLO_SENT = "hello_sent"
    """Client: ClientHello sent, waiting for the EnclaveHello."""
    OPEN = "open"
    """Keys derived, connected: chunks flow both ways."""
    SUSPENDED = "suspended"
    """The connection dropped; resumable until ``grace_ms`` after the drop."""
    RESUMING = "resuming"
    """Client: Resume sent on a new connection, waiting for ResumeOk."""
    CLOSED = "closed"
    """Finished, cancelled, failed or expired: keys erased, no more input."""


@dataclass(frozen=True)
class HandshakeComplete:
    """Client: the enclave's hello checked out; the session is open."""

    session_id: bytes


@dataclass(frozen=True)
class DataReceived:
    """Plaintext of the peer's chunk ``index``; ``final`` marks the end of its stream."""

    index: int
    data: bytes
    final: bool

    def __repr__(self) -> str:
        return f"DataReceived(index={self.index}, <{len(self.data)} bytes>, final={self.final})"


@dataclass(frozen=True)
class Acked:
    """The peer acknowledged our chunks below ``next_index``: ``send_room`` may have grown.
    ``complete``: our final chunk is acknowledged."""

    next_index: int
    complete: bool


@dataclass(frozen=True)
class Resumed:
    """The session continues on a new connection (``attempt``); our chunks from
    ``resent_from`` on (``resent`` of them) were queued again."""

    attempt: int
    resent_from: int
    resent: int


Event = HandshakeComplete | DataReceived | Acked | Resumed


class JobSession:
    """One side of a session (see ``ClientJobSession`` and ``EnclaveJobSession``)."""

    outbound_direction: ClassVar[Direction]

    def __init__(self, session_id: bytes, agreement_id: bytes, config: JobConfig) -> None:
        if not isinstance(config, JobConfig):
            raise UsageError("config must be a JobConfig")
        self.config = config
        self.session_id = session_id
        self.agreement_id = agreement_id
        self._state = State.HELLO_SENT
        self._keys: SessionKeys | None = None
        self._sender: ChunkSender | None = None
        self._receiver: ChunkReceiver | None = None
        self._decoder = FrameDecoder()
        self._outbox: list[bytes | bytearray] = []
        self._acked = 0  # the peer's chunks our last Ack covered (or a resume told)
        self._ack_every = 1  # half the peer's window: see _queue_ack
        self._lost_at: int | None = None
        self._generation = 1

    # -- what the caller can see ------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def keys(self) -> SessionKeys | None:
        """The session keys (None before the handshake and after ``close``)."""
        return self._keys

    @property
    def outbound(self) -> ChunkSender | None:
        """Our stream's sender (its counters), None before the handshake and after close."""
        return self._sender

    @property
    def inbound(self) -> ChunkReceiver | None:
        """The peer's stream's receiver, None before the handshake and after close."""
        return self._receiver

    @property
    def generation(self) -> int:
        """Connections this session has used; a resume moves it on, and the driver of an older
        connection must stop feeding that connection's bytes."""
        return self._generation

    @property
    def send_room(self) -> int:
        """Plaintext bytes ``send`` takes now (0 while the window is full or not open)."""
        if self._state is not State.OPEN or self._sender is None:
            return 0
        return self._sender.room * self._sender.chunk_size

    @property
    def done(self) -> bool:
        """Both streams are complete: our final chunk acknowledged, the peer's received."""
        return (
            self._sender is not None
            and self._sender.complete
            and self._receiver is not None
            and self._receiver.finished
        )

    def expired(self, now_ms: int) -> bool:
        """Whether the grace period after the last drop has run out (the session is dead)."""
        deadline = self.next_deadline()
        return deadline is not None and now_ms >= deadline

    def next_deadline(self) -> int | None:
        """When this session expires unless resumed (None while connected)."""
        if self._lost_at is None or self._state not in (State.SUSPENDED, State.RESUMING):
            return None
        return self._lost_at + self.config.grace_ms

    # -- keys ---------------------------------------------------------------------------------

    def _install(self, keys: SessionKeys, *, peer_window: int) -> None:
        out = self.outbound_direction
        self._keys = keys
        self._ack_every = max(1, peer_window // 2)
        self._sender = ChunkSender(
            keys.stream_key(out),
            self.session_id,
            stream_associated_data(self.session_id, self.agreement_id, out),
            window=self.config.window,
            chunk_size=self.config.chunk_size,
        )
        self._receiver = ChunkReceiver(
            keys.stream_key(out.reverse),
            self.session_id,
            stream_associated_data(self.session_id, self.agreement_id, out.reverse),
            max_total=self.config.max_inbound,
        )
        self._state = State.OPEN

    def _live_keys(self) -> SessionKeys:
        if self._keys is None:
            raise SessionClosed("the session has no keys")
        return self._keys

    # -- sending -------------------------------------------------------------------------------

    def send(self, data: bytes | bytearray | memoryview, *, final: bool = False) -> None:
        """Seal ``data`` (at most ``send_room`` bytes) as chunks; ``final`` ends our stream."""
        if self._state is not State.OPEN or self._sender is None:
            raise self._not_open()
        if not isinstance(data, bytes | bytearray | memoryview):
            raise UsageError("send takes bytes")
        view = memoryview(data).cast("B")
        if len(view) > self.send_room:
            raise UsageError(f"send takes at most send_room ({self.send_room}) bytes")
        size = self._sender.chunk_size
        pieces = [view[i : i + size] for i in range(0, len(view), size)] or [view]
        for n, piece in enumerate(pieces):
            last = n == len(pieces) - 1
            if not final and last and not piece:
                return  # nothing to send
            self._outbox.append(self._sender.seal_frame(piece, final=final and last))

    def cancel(self, code: int = CancelCode.ABORTED, text: str = "") -> None:
        """End the session and queue a Cancel telling the peer why, then erase the keys."""
        if self._state is State.CLOSED:
            raise SessionClosed("the session is already closed")
        if not isinstance(code, int) or isinstance(code, bool) or not 0 <= code <= 0xFFFF:
            raise UsageError("a cancel code is an int in 0..65535")
        if not isinstance(text, str):
            raise UsageError("a cancel text is a str")
        self._queue_cancel(int(code), text)
        self.close()

    def _queue_cancel(self, code: int, text: str) -> None:
        """Queue an authenticated Cancel. Without keys (the client before the enclave's
        answer) nothing is sent and nothing queued goes out either: the peer could not believe
        a Cancel, so the driver just drops the connection."""
        if self._keys is None:
            self._outbox.clear()
            return
        text = text[:MAX_CANCEL_TEXT]
        mac = self._keys.mac(self.outbound_direction, CANCEL_LABEL, code, text=text)
        if self._state is not State.SUSPENDED:  # no connection to write it on otherwise
            self._outbox.append(encode_frame(Cancel(code=code, text=text, mac=mac)))

    @property
    def wants_to_send(self) -> bool:
        """Whether ``data_to_send`` has anything (a driver can skip the write otherwise)."""
        return bool(self._outbox) or self._ack_ready()

    def data_to_send(self) -> bytes:
        """The bytes to write on the current connection (and forget them)."""
        self._queue_ack()
        data = b"".join(self._outbox)
        self._outbox.clear()
        return data

    def _ack_ready(self, *, now: bool = False) -> bool:
        """An Ack is due once half the peer's window (as its hello stated) is opened since
        the last one, or the peer's final chunk is (or ``now``, with anything opened): so a
        sender whose window is full always gets one, and a sender gets about one Ack per
        half window, not one per chunk."""
        receiver = self._receiver
        if receiver is None or self._keys is None or receiver.index == self._acked:
            return False  # (nothing opened since)
        return now or receiver.finished or receiver.index - self._acked >= self._ack_every

    def _queue_ack(self, *, now: bool = False) -> None:
        if not self._ack_ready(now=now):
            return
        assert self._receiver is not None
        assert self._keys is not None
        index = self._receiver.index
        mac = self._keys.mac(self.outbound_direction, ACK_LABEL, index)
        self._outbox.append(encode_frame(Ack(next_index=index, mac=mac)))
        self._acked = index

    # -- receiving -----------------------------------------------------------------------------

    def receive_data(self, data: bytes, now_ms: int) -> list[Event]:
        """Feed bytes read from the current connection; the events they complete."""
        self._check_receiving()
        try:
            frames = self._decoder.feed(data)
        except FrameError as err:
            raise self._fail(err) from None
        return self.receive_frames(frames, now_ms)

    def receive_frames(self, frames: Iterable[Frame], now_ms: int) -> list[Event]:
        """Feed frames the driver decoded itself (``FrameDecoder``); the events they make."""
        events: list[Event] = []
        for frame in frames:
            self._check_receiving()
            try:
                # the data path: a chunk's ciphertext is opened where it lies in the frame
                split = split_chunk(frame.body) if frame.type is FrameType.CHUNK else None
                if split is not None and self._state is State.OPEN:
                    events.append(self._on_sealed(*split))
                else:
                    events.extend(self._dispatch(decode_frame(frame), now_ms))
            except ProtocolViolation as err:
                raise self._fail(err) from None
        self._queue_ack()
        return events

    def _check_receiving(self) -> None:
        if self._state is State.CLOSED:
            raise SessionClosed("the session is closed")
        if self._state is State.SUSPENDED:
            raise UsageError("the connection was lost: resume the session first")

    def _dispatch(self, msg: JobMessage, now_ms: int) -> list[Event]:
        if isinstance(msg, Cancel):
            self._on_cancel(msg)
        if self._state is State.OPEN and isinstance(msg, Chunk):
            return [self._on_chunk(msg)]
        if self._state is State.OPEN and isinstance(msg, Ack):
            return self._on_ack(msg)
        return self._on_other(msg, now_ms)

    def _on_other(self, msg: JobMessage, now_ms: int) -> list[Event]:
        """Messages of the handshake and resume phases (per side)."""
        raise ProtocolViolation(
            f"unexpected {type(msg).__name__} in state {self._state.value}",
            reason="unexpected_message",
        )

    def _on_chunk(self, chunk: Chunk) -> DataReceived:
        return self._on_sealed(chunk.index, chunk.sealed)

    def _on_sealed(self, index: int, sealed: bytes | memoryview) -> DataReceived:
        assert self._receiver is not None
        data, final = self._receiver.open_sealed(index, sealed)
        return DataReceived(index=index, data=data, final=final)

    def _on_ack(self, ack: Ack) -> list[Event]:
        assert self._sender is not None
        keys = self._live_keys()
        if not keys.mac_valid(self.outbound_direction.reverse, ack.mac, ACK_LABEL, ack.next_index):
            raise BadMac(f"ack up to {ack.next_index} has a bad MAC")
        if not self._sender.on_ack(ack.next_index):
            return []
        return [Acked(next_index=ack.next_index, complete=self._sender.complete)]

    def _on_cancel(self, msg: Cancel) -> NoReturn:
        if msg.mac:
            peer = self.outbound_direction.reverse
            keys = self._keys
            if keys is None or not keys.mac_valid(
                peer, msg.mac, CANCEL_LABEL, msg.code, text=msg.text
            ):
                raise BadMac("the Cancel has a bad MAC")
        elif not self._accepts_plain_cancel():
            raise BadMac("a Cancel without MAC after the handshake")
        self.close()
        raise JobCancelled(msg.code, msg.text, authenticated=bool(msg.mac))

    def _accepts_plain_cancel(self) -> bool:
        """Whether a Cancel without MAC (a refusal before keys) is believed now."""
        return False

    # -- connections and the end -----------------------------------------------------------------

    def connection_lost(self, now_ms: int) -> None:
        """The transport dropped: keep the session for ``grace_ms``, forget the connection."""
        if self._state is State.CLOSED:
            return
        if self._keys is None:  # before the handshake there is nothing to resume
            self.close()
            return
        if self._state is State.OPEN or self._lost_at is None:
            self._lost_at = now_ms  # a failed resume does not extend the grace period
        self._state = State.SUSPENDED
        self._new_connection()

    def _new_connection(self) -> None:
        self._decoder = FrameDecoder()
        self._outbox.clear()
        if self._receiver is not None:  # the Resume or ResumeOk that follows states it
            self._acked = self._receiver.index

    def end_of_stream(self) -> None:
        """The peer will send nothing more in this session (the driver knows it for sure):
        StreamTruncated unless the peer's final chunk arrived."""
        if self._receiver is None:
            raise SessionClosed("the session has no open stream")
        try:
            self._receiver.finish()
        except ProtocolViolation as err:
            raise self._fail(err) from None

    def close(self) -> None:
        """End the session here: erase the keys and drop held chunks. Queued bytes (a final
        Ack, a Cancel) stay in ``data_to_send``. Idempotent."""
        if self._state is State.CLOSED:
            return
        if self._state is State.OPEN:
            self._queue_ack(now=True)
        for part in (self._sender, self._receiver):
            if part is not None:
                part.close()
        self._sender = self._receiver = None
        if self._keys is not None:
            self._keys.erase()
            self._keys = None
        self._drop_secrets()
        self._state = State.CLOSED

    def _drop_secrets(self) -> None:
        """Per side: forget any other secret (the client's ephemeral key)."""

    def _fail(self, err: ProtocolViolation) -> ProtocolViolation:
        """Tell the peer (authenticated when keys exist), close, and hand back ``err``."""
        if self._state is not State.CLOSED:
            self._queue_cancel(cancel_code_for(err), f"{err.reason}: {err}")
            self.close()
        return err

    def _not_open(self) -> UsageError:
        if self._state is State.CLOSED:
            return SessionClosed("the session is closed")
        return UsageError(f"the session is not open (state {self._state.value})")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(session_id={self.session_id.hex()}, {self._state.value})"


__all__ = [
    "Acked",
    "DataReceived",
    "Event",
    "HandshakeComplete",
    "JobSession",
    "Resumed",
    "State",
]
