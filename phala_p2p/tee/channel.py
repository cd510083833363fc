"""Framing of the local channel between a node and its enclave process (sans-IO).

A frame is a 4-byte big-endian length followed by that many bytes of msgpack. Requests are
``[request_id, op, args]``; responses are ``[request_id, 0, result]`` on success and
``[request_id, 1, [code, message, reason]]`` on failure, where ``code`` names one of the error
classes in :data:`ERROR_CODES`. Both ends bound the frame size and check every field, so a
broken or hostile peer on either side gets a typed error, never a crash.
"""

from __future__ import annotations

import struct
from typing import Any, Final

import msgpack

from phala_p2p.errors import (
    AttestationError,
    EnclaveError,
    ExecutionError,
    FuelExhausted,
    InvalidModule,
    MemoryExhausted,
    OutputTooLarge,
    P2PError,
    ProtocolViolation,
    Trap,
    UsageError,
    WallClockExceeded,
)

__all__ = [
    "ERROR_CODES",
    "HEADER_LEN",
    "FrameDecoder",
    "error_from_wire",
    "error_to_wire",
    "get_bytes",
    "get_int",
    "get_str",
    "pack_frame",
]

HEADER_LEN: Final = 4
_HEADER: Final = struct.Struct(">I")

# Error classes that may cross the boundary, by name. Anything else becomes EnclaveError.
ERROR_CODES: Final[dict[str, type[P2PError]]] = {
    cls.__name__: cls
    for cls in (
        ExecutionError,
        InvalidModule,
        Trap,
        FuelExhausted,
        MemoryExhausted,
        WallClockExceeded,
        OutputTooLarge,
        ProtocolViolation,
        UsageError,
        AttestationError,
        EnclaveError,
    )
}
_MAX_MESSAGE: Final = 2000


def pack_frame(obj: Any, *, max_frame: int) -> bytes:
    """Encode ``obj`` as one frame; UsageError if it exceeds ``max_frame`` bytes of payload."""
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    if len(body) > max_frame:
        raise UsageError(f"frame of {len(body)} bytes is above the channel cap of {max_frame}")
    return _HEADER.pack(len(body)) + body


class FrameDecoder:
    """Incremental frame parser with a bounded buffer."""

    def __init__(self, *, max_frame: int) -> None:
        if max_frame <= 0:
            raise UsageError("max_frame must be positive")
        self._max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        """Add bytes; return the complete messages. ProtocolViolation on a bad frame."""
        self._buf += data
        out: list[Any] = []
        while len(self._buf) >= HEADER_LEN:
            (length,) = _HEADER.unpack_from(self._buf)
            if length > self._max_frame:
                raise ProtocolViolation(
                    f"frame of {length} bytes is above the channel cap of {self._max_frame}",
                    reason="too-large",
                )
            if len(self._buf) < HEADER_LEN + length:
                break
            body = bytes(self._buf[HEADER_LEN : HEADER_LEN + length])
            del self._buf[: HEADER_LEN + length]
            try:
                out.append(msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True))
            except (ValueError, TypeError, msgpack.UnpackException) as err:
                raise ProtocolViolation(f"frame is not valid msgpack: {err}") from err
        return out

    def set_max_frame(self, max_frame: int) -> None:
        """Change the frame cap (the enclave raises it once its limits are known)."""
        if max_frame <= 0:
            raise UsageError("max_frame must be positive")
        self._max_frame = max_frame

    @property
    def buffered(self) -> int:
        return len(self._buf)


def get_bytes(args: dict[str, Any], name: str, *, min_len: int = 0, max_len: int) -> bytes:
    value = args.get(name)
    if not isinstance(value, bytes) or not min_len <= len(value) <= max_len:
        raise ProtocolViolation(f"field {name!r} must be {min_len}..{max_len} bytes")
    return value


def get_int(args: dict[str, Any], name: str, *, lo: int, hi: int) -> int:
    value = args.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ProtocolViolation(f"field {name!r} must be an int in {lo}..{hi}")
    return value


def get_str(args: dict[str, Any], name: str, *, max_len: int) -> str:
    value = args.get(name)
    if not isinstance(value, str) or len(value) > max_len:
        raise ProtocolViolation(f"field {name!r} must be a string of at most {max_len} chars")
    return value


def error_to_wire(err: P2PError) -> list[str]:
    """``[code, message, reason]`` for an error that crosses the boundary."""
    # the nearest class the other side knows: a subclass travels as its known base class
    code = next(
        (c.__name__ for c in type(err).__mro__ if ERROR_CODES.get(c.__name__) is c),
        "EnclaveError",
    )
    reason = err.reason if isinstance(err, ProtocolViolation) else ""
    return [code, str(err)[:_MAX_MESSAGE], reason[:100]]


def error_from_wire(value: Any) -> P2PError:
    """Rebuild the typed error sent by :func:`error_to_wire` (ProtocolViolation if malformed)."""
    if not isinstance(value, list) or len(value) != 3 or not all(isinstance(v, str) for v in value):
        raise ProtocolViolation("malformed error in enclave response")
    code, message, reason = value
    message = message[:_MAX_MESSAGE]
    cls = ERROR_CODES.get(code, EnclaveError)
    if cls is ProtocolViolation:
        return ProtocolViolation(message, reason=reason[:100] or "malformed")
    return cls(message)
