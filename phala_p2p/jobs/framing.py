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

from phala_p2p.errors import UsageError
from phala_p2p.jobs.errors import FrameError
from phala_p2p.jobs.messages import (
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
    body: bytes

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
    ftype = frame_type_of(msg)
    body = encode(msg)
    if len(body) > BODY_LIMITS[ftype]:
        raise UsageError(f"{ftype.name} body of {len(body)} bytes is over its limit")
    return _HEADER.pack(int(ftype), len(body)) + body


def decode_frame(frame: Frame) -> JobMessage:
    """The message in ``frame``'s body; ProtocolViolation if it is not one of its type."""
    cls = _CLASS[frame.type]
    msg: JobMessage = decode(frame.body, max_size=BODY_LIMITS[frame.type], expect=cls)
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
        if not self._body and take == need:  # the whole body at hand: a single copy
            body = bytes(view[pos : pos + take])
        else:
            self._body += view[pos : pos + take]
            if take < need:
                return pos + take
            body = bytes(self._body)
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


__all__ = [
    "BODY_LIMITS",
    "HEADER_SIZE",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "decode_frame",
    "encode_frame",
    "frame_type_of",
]
