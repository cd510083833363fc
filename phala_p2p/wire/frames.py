"""Stream framing for request-response and framed streams (sans-IO).

A frame is ``type (1 byte) || payload length (4 bytes, big-endian) || payload``. A message is
zero or more DATA frames closed by an END frame whose payload repeats the message's total
length (8 bytes, big-endian); ERROR and CANCEL frames end an exchange instead. The layout is
specified in ``protocols/framing.md``.

``FrameDecoder`` turns received bytes into frames, refusing a frame whose header announces
more than ``max_frame`` bytes as soon as the header is complete (before its payload arrives).
``MessageAssembler`` turns frames into whole messages of at most ``max_message`` bytes.
Neither does IO.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from phala_p2p.errors import Cancelled, ProtocolViolation, RemoteError, UsageError

HEADER_SIZE = 5
DEFAULT_MAX_FRAME = 1 << 20
MAX_PAYLOAD = (1 << 32) - 1
MAX_TEXT = 1024
"""Longest ERROR message and CANCEL reason, in UTF-8 bytes."""
END_PAYLOAD_SIZE = 8

_HEADER = struct.Struct(">BI")
_CODE = struct.Struct(">H")
_LENGTH = struct.Struct(">Q")


class FrameType(enum.IntEnum):
    DATA = 1
    END = 2
    ERROR = 3
    CANCEL = 4


_TYPES = {t.value: t for t in FrameType}


@dataclass(frozen=True)
class Frame:
    type: FrameType
    payload: bytes


def encode_frame(ftype: FrameType, payload: bytes) -> bytes:
    """One frame's bytes."""
    if ftype not in _TYPES:
        raise UsageError(f"unknown frame type {ftype!r}")
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise UsageError("frame payload must be bytes")
    n = len(payload)
    if n > MAX_PAYLOAD:
        raise UsageError("frame payload longer than 2**32-1 bytes")
    return _HEADER.pack(int(ftype), n) + payload


def encode_end(total: int) -> bytes:
    """The END frame for a message of ``total`` bytes."""
    if type(total) is not int or not 0 <= total < (1 << 64):
        raise UsageError("message length must be an int in 0..2**64-1")
    return _HEADER.pack(FrameType.END, END_PAYLOAD_SIZE) + _LENGTH.pack(total)


def encode_message(data: bytes, *, chunk_size: int = 256 * 1024) -> list[bytes]:
    """The frames of one message: DATA frames of at most ``chunk_size`` bytes, then END."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise UsageError("message must be bytes")
    if type(chunk_size) is not int or not 1 <= chunk_size <= MAX_PAYLOAD:
        raise UsageError("chunk_size must be a positive int below 2**32")
    view = memoryview(data).cast("B")
    frames = [
        _HEADER.pack(FrameType.DATA, len(piece)) + piece
        for piece in (view[i : i + chunk_size] for i in range(0, len(view), chunk_size))
    ]
    frames.append(encode_end(len(view)))
    return frames


def _truncate_utf8(text: str, limit: int) -> bytes:
    raw = text.encode("utf-8", errors="replace")
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode("utf-8", errors="ignore").encode("utf-8")


def encode_error(code: int, message: str) -> bytes:
    """An ERROR frame: ``code`` (0..65535) and ``message`` (cut to 1 KiB of UTF-8)."""
    if type(code) is not int or not 0 <= code <= 0xFFFF:
        raise UsageError("error code must be an int in 0..65535")
    if not isinstance(message, str):
        raise UsageError("error message must be a str")
    return encode_frame(FrameType.ERROR, _CODE.pack(code) + _truncate_utf8(message, MAX_TEXT))


def encode_cancel(reason: str) -> bytes:
    """A CANCEL frame with ``reason`` (cut to 1 KiB of UTF-8)."""
    if not isinstance(reason, str):
        raise UsageError("cancel reason must be a str")
    return encode_frame(FrameType.CANCEL, _truncate_utf8(reason, MAX_TEXT))


def parse_end(payload: bytes) -> int:
    """The total length an END frame announces."""
    if len(payload) != END_PAYLOAD_SIZE:
        raise ProtocolViolation("END payload is not 8 bytes")
    total: int = _LENGTH.unpack(payload)[0]
    return total


def parse_error(payload: bytes) -> tuple[int, str]:
    """The (code, message) of an ERROR frame; invalid UTF-8 is replaced, not refused."""
    if not 2 <= len(payload) <= 2 + MAX_TEXT:
        raise ProtocolViolation("ERROR payload is not 2..1026 bytes")
    code: int = _CODE.unpack_from(payload)[0]
    return code, payload[2:].decode("utf-8", errors="replace")


def parse_cancel(payload: bytes) -> str:
    """The reason of a CANCEL frame; invalid UTF-8 is replaced, not refused."""
    if len(payload) > MAX_TEXT:
        raise ProtocolViolation("CANCEL payload is over 1 KiB")
    return payload.decode("utf-8", errors="replace")


def _check_payload(ftype: FrameType, length: int) -> None:
    """Payload-length rules per type, checked from the header alone."""
    if ftype is FrameType.DATA:
        if length == 0:
            raise ProtocolViolation("empty DATA frame")
    elif ftype is FrameType.END:
        if length != END_PAYLOAD_SIZE:
            raise ProtocolViolation("END payload is not 8 bytes")
    elif ftype is FrameType.ERROR:
        if not 2 <= length <= 2 + MAX_TEXT:
            raise ProtocolViolation("ERROR payload is not 2..1026 bytes")
    elif length > MAX_TEXT:
        raise ProtocolViolation("CANCEL payload is over 1 KiB")


class FrameDecoder:
    """Bytes in, frames out; the buffer holds at most one frame plus the latest ``feed``.

    ``max_frame`` bounds DATA payloads; END, ERROR and CANCEL payloads have their own fixed
    bounds (8, 2..1026 and 0..1024 bytes) whatever ``max_frame`` is. Call ``next_frame``
    until it returns None before feeding more: feeding while more than the largest valid
    frame is buffered is a UsageError, so ``buffered`` never exceeds that frame's size plus
    the last ``feed``. ``next_frame`` checks a header as soon as its 5 bytes are buffered,
    before any of the payload; after it has raised ProtocolViolation, every call raises it
    again (the stream must be reset).
    """

    def __init__(self, *, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if type(max_frame) is not int or not 1 <= max_frame <= MAX_PAYLOAD:
            raise UsageError("max_frame must be an int in 1..2**32-1")
        self.max_frame = max_frame
        self._largest = max(max_frame, 2 + MAX_TEXT)
        self._buf = bytearray()
        self._header: tuple[FrameType, int] | None = None
        self._error: ProtocolViolation | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        """Append received bytes. Problems in them are reported by ``next_frame``."""
        if self._error is not None:
            raise self._error
        if not isinstance(data, bytes | bytearray | memoryview):
            raise UsageError("feed takes bytes")
        if len(self._buf) >= HEADER_SIZE + self._largest:
            # More than the largest valid frame is buffered: a whole frame (or a bad header)
            # is waiting, and feeding on would let the buffer grow without bound.
            raise UsageError("call next_frame until it returns None before feeding more")
        self._buf += data

    def _fail(self, err: ProtocolViolation) -> ProtocolViolation:
        self._error = err
        self._buf = bytearray()
        return err

    def _parse_header(self) -> tuple[FrameType, int] | None:
        if self._header is None and len(self._buf) >= HEADER_SIZE:
            code, length = _HEADER.unpack_from(self._buf)
            ftype = _TYPES.get(code)
            if ftype is None:
                raise self._fail(
                    ProtocolViolation(f"unknown frame type {code}", reason="bad_frame_type")
                )
            if ftype is FrameType.DATA and length > self.max_frame:
                raise self._fail(
                    ProtocolViolation(
                        f"frame of {length} bytes exceeds the limit of {self.max_frame}",
                        reason="frame_too_large",
                    )
                )
            try:
                _check_payload(ftype, length)
            except ProtocolViolation as err:
                raise self._fail(err) from None
            self._header = (ftype, length)
        return self._header

    def next_frame(self) -> Frame | None:
        if self._error is not None:
            raise self._error
        header = self._parse_header()
        if header is None:
            return None
        ftype, length = header
        end = HEADER_SIZE + length
        if len(self._buf) < end:
            return None
        with memoryview(self._buf) as view:
            payload = bytes(view[HEADER_SIZE:end])
        del self._buf[:end]
        self._header = None
        return Frame(ftype, payload)


class MessageAssembler:
    """Frames in, whole messages out (at most ``max_message`` bytes each).

    ``add`` returns the message when its END arrives, None before; an ERROR frame raises
    RemoteError, a CANCEL frame raises Cancelled. The assembler is ready for the next
    message after returning one.
    """

    def __init__(self, *, max_message: int) -> None:
        if type(max_message) is not int or max_message < 0:
            raise UsageError("max_message must be a non-negative int")
        self.max_message = max_message
        self._chunks: list[bytes] = []
        self._total = 0

    @property
    def pending(self) -> int:
        """Bytes of the current message received so far."""
        return self._total

    def add(self, frame: Frame) -> bytes | None:
        ftype = frame.type
        if ftype is FrameType.DATA:
            self._total += len(frame.payload)
            if self._total > self.max_message:
                self._chunks.clear()
                raise ProtocolViolation(
                    f"message exceeds the limit of {self.max_message} bytes",
                    reason="message_too_large",
                )
            self._chunks.append(frame.payload)
            return None
        if ftype is FrameType.END:
            announced = parse_end(frame.payload)
            total = self._total
            chunks = self._chunks
            self._chunks = []
            self._total = 0
            if announced != total:
                raise ProtocolViolation(
                    f"END announces {announced} bytes, {total} arrived", reason="length_mismatch"
                )
            return b"".join(chunks)
        if ftype is FrameType.ERROR:
            code, text = parse_error(frame.payload)
            raise RemoteError(text, code=code)
        if ftype is FrameType.CANCEL:
            raise Cancelled(parse_cancel(frame.payload))
        raise ProtocolViolation(f"unknown frame type {ftype!r}", reason="bad_frame_type")


__all__ = [
    "DEFAULT_MAX_FRAME",
    "HEADER_SIZE",
    "MAX_TEXT",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "MessageAssembler",
    "encode_cancel",
    "encode_end",
    "encode_error",
    "encode_frame",
    "encode_message",
    "parse_cancel",
    "parse_end",
    "parse_error",
]
