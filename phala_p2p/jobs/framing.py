"""Frames of ``/phala/job/1.0.0`` on a byte stream (sans-IO).

A frame is ``type (1 byte) || length (4 bytes, big-endian) || body (length bytes)``; the body
is one codec message (``[1, kind, fields]``) of the class its type names. Each type has its
own body limit, so ``FrameDecoder`` refuses a frame from its 5-byte header alone, before any
of its body is buffered: a peer can never make a receiver hold more than one frame.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any, Final

from phala_p2p.crypto.stream import CHUNK_OVERHEAD, MAX_CHUNK_INDEX
from phala_p2p.errors import UsageError
from phala_p2p.jobs.errors import FrameError
from phala_p2p.jobs.messages import (
    MAX_CHUNK,
    MAX_FRAME,
    Ack,
    Cancel,
    Chunk,
    ClientHello,
    EnclaveHello,
    JobMessage,
    Resume,
    ResumeOk,
)
from phala_p2p.wire.codec import decode, encode

HEADER_SIZE: Final = 5
_HEADER: Final = struct.Struct(">BI")


class FrameType(enum.IntEnum):
    CLIENT_HELLO = 1
    ENCLAVE_HELLO = 2
    CHUNK = 3
    ACK = 4
    RESUME = 5
    RESUME_OK = 6
    CANCEL = 7


_CLASS: Final[dict[FrameType, type[Any]]] = {
    FrameType.CLIENT_HELLO: ClientHello,
    FrameType.ENCLAVE_HELLO: EnclaveHello,
    FrameType.CHUNK: Chunk,
    FrameType.ACK: Ack,
    FrameType.RESUME: Resume,
    FrameType.RESUME_OK: ResumeOk,
    FrameType.CANCEL: Cancel,
}
_TYPE_OF: Final[dict[type[Any], FrameType]] = {cls: t for t, cls in _CLASS.items()}
BODY_LIMITS: Final[dict[FrameType, int]] = {
    FrameType.CLIENT_HELLO: 256,
    FrameType.ENCLAVE_HELLO: 256,
    FrameType.CHUNK: MAX_FRAME,
    FrameType.ACK: 128,
    FrameType.RESUME: 128,
    FrameType.RESUME_OK: 128,
    FrameType.CANCEL: 1024,
}
"""Largest body per frame type (CHUNK: the decoder's ``max_frame``, at most this)."""


@dataclass(frozen=True)
class Frame:
    """One received frame: its type and its (still undecoded) body."""

    type: FrameType
    body: bytes | bytearray  # a bytearray when it came in pieces (kept as assembled)

    def __repr__(self) -> str:
        return f"Frame({self.type.name}, <{len(self.body)} bytes>)"


def frame_type_of(msg: JobMessage) -> FrameType:
    """The frame type that carries ``msg``."""
    ftype = _TYPE_OF.get(type(msg))
    if ftype is None:
        raise UsageError(f"{type(msg).__qualname__} is not a job message")
    return ftype


def encode_frame(msg: JobMessage) -> bytes:
    """The frame bytes of one message."""
    if type(msg) is Chunk:
        return chunk_frame(msg.index, msg.sealed)
    ftype = frame_type_of(msg)
    body = encode(msg)
    if len(body) > BODY_LIMITS[ftype]:
        raise UsageError(f"{ftype.name} body of {len(body)} bytes is over its limit")
    return _HEADER.pack(int(ftype), len(body)) + body


# A Chunk's body is the codec's ``[version, kind, [index, sealed]]``; what precedes the index
# is the same in every chunk. Taken from the codec itself (an empty chunk 0 ends with the
# index 0x00 and an empty bin, c4 00), so the two paths below cannot drift from it; a test
# holds them byte for byte to ``encode`` and ``decode``.
_CHUNK_HEAD: Final = encode(Chunk(index=0, sealed=b""))[:-3]
_U8: Final = struct.Struct(">B")
_UINTS: Final = {  # msgpack's uint 8/16/32/64, smallest first
    0xCC: struct.Struct(">B"),
    0xCD: struct.Struct(">H"),
    0xCE: struct.Struct(">I"),
    0xCF: struct.Struct(">Q"),
}
_BINS: Final = {0xC4: struct.Struct(">B"), 0xC5: struct.Struct(">H"), 0xC6: struct.Struct(">I")}
_MAX_SEALED: Final = MAX_CHUNK + CHUNK_OVERHEAD


def _uint(value: int) -> bytes:
    """msgpack's shortest form of a non-negative int (what the codec writes)."""
    if value < 0x80:
        return _U8.pack(value)
    for code, fmt in _UINTS.items():
        if value < 1 << (8 * fmt.size):
            return _U8.pack(code) + fmt.pack(value)
    raise UsageError("chunk index out of range")


def chunk_frame(index: int, sealed: bytes | bytearray | memoryview) -> bytes:
    """``encode_frame(Chunk(index, sealed))``, byte for byte, with the sealed bytes copied
    once (into the frame) rather than three times through the generic encoder."""
    return b"".join((_chunk_frame_head(index, len(sealed)), sealed))


def chunk_frame_to_fill(index: int, size: int) -> tuple[bytearray, memoryview]:
    """A CHUNK frame of ``size`` sealed bytes with its sealed part left to write, and that
    part (a view of the frame): the chunk is sealed in place (``seal_chunk_into``)."""
    head = _chunk_frame_head(index, size)
    frame = bytearray(len(head) + size)
    frame[: len(head)] = head
    return frame, memoryview(frame)[len(head) :]


def _chunk_frame_head(index: int, size: int) -> bytes:
    """A CHUNK frame up to its ``size`` sealed bytes: the frame header and the Chunk's body up
    to them; UsageError outside the message's bounds."""
    if type(index) is not int or not 0 <= index <= MAX_CHUNK_INDEX:
        raise UsageError(f"chunk index must be in 0..{MAX_CHUNK_INDEX}")
    if not 0 <= size <= _MAX_SEALED:
        raise UsageError(f"CHUNK of {size} sealed bytes is over its limit")
    body_head = _chunk_head(index, size)
    return _HEADER.pack(FrameType.CHUNK, len(body_head) + size) + body_head


def _chunk_head(index: int, size: int) -> bytes:
    """The body of a Chunk up to its sealed bytes (msgpack's shortest forms, as the codec)."""
    code = 0xC4 if size < 0x100 else 0xC5 if size < 0x10000 else 0xC6
    return _CHUNK_HEAD + _uint(index) + _U8.pack(code) + _BINS[code].pack(size)


def split_chunk(body: bytes | bytearray) -> tuple[int, memoryview] | None:
    """The index and the sealed bytes (a view of ``body``, not a copy) of a CHUNK body laid
    out exactly as ``chunk_frame`` writes it (the codec's canonical form) and within the
    message's bounds; None for anything else, which the caller hands to ``decode_frame`` (the
    codec then accepts it or says why not)."""
    head = len(_CHUNK_HEAD)
    if len(body) < head + 3 or body[:head] != _CHUNK_HEAD:
        return None
    pos = head
    code = body[pos]
    if code < 0x80:
        index, pos = code, pos + 1
    elif code in _UINTS:
        fmt = _UINTS[code]
        if pos + 1 + fmt.size > len(body):
            return None
        (index,) = fmt.unpack_from(body, pos + 1)
        pos += 1 + fmt.size
    else:
        return None
    if pos >= len(body) or body[pos] not in _BINS:
        return None
    fmt = _BINS[body[pos]]
    if pos + 1 + fmt.size > len(body):
        return None
    (size,) = fmt.unpack_from(body, pos + 1)
    pos += 1 + fmt.size
    if index > MAX_CHUNK_INDEX or size > _MAX_SEALED or pos + size != len(body):
        return None
    if body[head:pos] != _chunk_head(index, size)[head:]:
        return None  # a longer form than the shortest: not canonical, the codec refuses it
    return index, memoryview(body)[pos:]


def decode_frame(frame: Frame) -> JobMessage:
    """The message in ``frame``'s body; ProtocolViolation if it is not one of its type."""
    cls = _CLASS[frame.type]
    body = frame.body if type(frame.body) is bytes else bytes(frame.body)
    msg: JobMessage = decode(body, max_size=BODY_LIMITS[frame.type], expect=cls)
    return msg


class FrameDecoder:
    """Bytes in, complete frames out. Holds at most one partial frame (``max_buffered``).

    ``feed`` raises FrameError (``bad_frame_type``, ``frame_too_large``, ``malformed``) on the
    first bad header; frames completed earlier in the same call are dropped with it, and every
    later call raises the same error: the connection must be reset.
    """

    def __init__(self, *, max_frame: int = MAX_FRAME) -> None:
        if type(max_frame) is not int or not 1 <= max_frame <= MAX_FRAME:
            raise UsageError(f"max_frame must be an int in 1..{MAX_FRAME}")
        self.max_frame = max_frame
        self._limits = {**BODY_LIMITS, FrameType.CHUNK: max_frame}
        self._header = bytearray()
        self._type: FrameType | None = None
        self._length = 0
        self._body = bytearray()
        self._error: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes of the partial frame held."""
        return len(self._header) + len(self._body)

    @property
    def max_buffered(self) -> int:
        """The most ``buffered`` can ever be."""
        return HEADER_SIZE + max(self._limits.values()) - 1

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Add received bytes; return the frames they complete, in order."""
        if self._error is not None:
            raise self._error
        if not isinstance(data, bytes | bytearray | memoryview):
            raise UsageError("feed takes bytes")
        frames: list[Frame] = []
        with memoryview(data) as raw, raw.cast("B") as view:
            pos = 0
            while pos < len(view):
                pos = self._take(view, pos, frames)
        return frames

    def _take(self, view: memoryview, pos: int, frames: list[Frame]) -> int:
        """Consume bytes from ``pos`` towards the current frame; returns the new position."""
        if self._type is None:
            take = min(HEADER_SIZE - len(self._header), len(view) - pos)
            self._header += view[pos : pos + take]
            pos += take
            if len(self._header) < HEADER_SIZE:
                return pos
            self._start_frame()
        assert self._type is not None
        need = self._length - len(self._body)
        take = min(need, len(view) - pos)
        body: bytes | bytearray
        if not self._body and take == need:  # the whole body at hand: a single copy
            body = bytes(view[pos : pos + take])
        else:
            self._body += view[pos : pos + take]
            if take < need:
                return pos + take
            body = self._body  # handed over as assembled: a new one is started below
        frames.append(Frame(self._type, body))
        self._type, self._body = None, bytearray()
        return pos + take

    def _start_frame(self) -> None:
        code, length = _HEADER.unpack(self._header)
        self._header = bytearray()
        try:
            ftype = FrameType(code)
        except ValueError:
            raise self._fail(f"unknown frame type {code}", "bad_frame_type") from None
        if length == 0:
            raise self._fail(f"empty {ftype.name} frame", "malformed")
        if length > self._limits[ftype]:
            raise self._fail(
                f"{ftype.name} frame of {length} bytes is over {self._limits[ftype]}",
                "frame_too_large",
            )
        self._type, self._length = ftype, length

    def _fail(self, message: str, reason: str) -> FrameError:
        self._error = FrameError(message, reason=reason)
        self._header, self._body, self._type = bytearray(), bytearray(), None
        return self._error


class FrameEnds:
    """Where frames end in a byte stream, without keeping or checking them: a relay that
    passes the stream on (the miner's node, to its enclave) uses it to tell whether what it
    holds ends at least one frame. Only the headers are looked at; a bad one is the
    receiver's to refuse, this just counts its length."""

    def __init__(self) -> None:
        self._header = bytearray()
        self._left = 0  # body bytes of the current frame still to come

    def feed(self, data: bytes | bytearray | memoryview) -> bool:
        """Take the next bytes of the stream; whether they end a frame."""
        ended = False
        with memoryview(data) as raw, raw.cast("B") as view:
            pos, size = 0, len(view)
            while pos < size:
                if self._left:
                    take = min(self._left, size - pos)
                    self._left -= take
                    pos += take
                    ended = ended or not self._left
                    continue
                take = min(HEADER_SIZE - len(self._header), size - pos)
                self._header += view[pos : pos + take]
                pos += take
                if len(self._header) == HEADER_SIZE:
                    _, self._left = _HEADER.unpack(self._header)
                    self._header = bytearray()
                    ended = ended or not self._left  # (an empty body: refused downstream)
        return ended


__all__ = [
    "BODY_LIMITS",
    "HEADER_SIZE",
    "Frame",
    "FrameDecoder",
    "FrameEnds",
    "FrameType",
    "chunk_frame",
    "chunk_frame_to_fill",
    "decode_frame",
    "encode_frame",
    "frame_type_of",
    "split_chunk",
]
