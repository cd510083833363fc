"""Framing of the local channel between a node and its enclave process (sans-IO).

A frame is ``length(4) || head_length(4) || head || blob_1 || ... || blob_k`` (lengths are
big-endian, ``length`` counts the bytes after it). ``head`` is the message in msgpack, except
that every byte string longer than :data:`INLINE_MAX` is replaced by the extension type
:data:`BLOB_EXT` holding its length (4 bytes, big-endian), and travels after the head as a
raw blob, in the order of the placeholders. Large sealed payloads are thus neither copied
into a frame nor out of one: the receiver can read a blob straight into its own ``bytes``.

Requests are ``[request_id, op, args]``; responses are ``[request_id, 0, result]`` on success
and ``[request_id, 1, [code, message, reason]]`` on failure, where ``code`` names one of the
error classes in :data:`ERROR_CODES`. Both ends bound the frame size and check every field, so
a broken or hostile peer on either side gets a typed error, never a crash.
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
    "BLOB_EXT",
    "ERROR_CODES",
    "HEADER_LEN",
    "INLINE_MAX",
    "FrameDecoder",
    "error_from_wire",
    "error_to_wire",
    "get_bytes",
    "get_int",
    "get_str",
    "pack_frame",
    "pack_frame_parts",
]

HEADER_LEN: Final = 8  # length and head_length
# byte strings longer than this travel as blobs after the head, named by a BLOB_EXT placeholder
INLINE_MAX: Final = 64 * 1024
BLOB_EXT: Final = 1
_U32: Final = struct.Struct(">I")
_HEADER: Final = struct.Struct(">II")

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
    """Encode ``obj`` as one frame; UsageError if it is above ``max_frame`` (after the length)."""
    return b"".join(pack_frame_parts(obj, max_frame=max_frame))


def pack_frame_parts(obj: Any, *, max_frame: int) -> list[bytes]:
    """Encode ``obj`` as one frame, as segments to write in order (UsageError above the cap).

    The first segment is the header and the head; each blob is the caller's ``bytes`` object
    itself, so a large sealed payload is never copied into the frame.
    """
    blobs: list[bytes] = []
    head: bytes = msgpack.packb(_blobs_out(obj, blobs), use_bin_type=True)
    size = _U32.size + len(head) + sum(len(blob) for blob in blobs)
    if size > max_frame:
        raise UsageError(f"frame of {size} bytes is above the channel cap of {max_frame}")
    return [_HEADER.pack(size, len(head)) + head, *blobs]


def _blobs_out(obj: Any, blobs: list[bytes]) -> Any:
    # our own messages only (a handful of levels), so recursion is fine here
    if isinstance(obj, bytes) and len(obj) > INLINE_MAX:
        blobs.append(obj)
        return msgpack.ExtType(BLOB_EXT, _U32.pack(len(obj)))
    if isinstance(obj, list | tuple):
        return [_blobs_out(item, blobs) for item in obj]
    if isinstance(obj, dict):
        return {key: _blobs_out(value, blobs) for key, value in obj.items()}
    return obj


class _Blob:
    """Where a blob goes in the head, until it has arrived."""

    __slots__ = ("index", "size")

    def __init__(self, index: int, size: int) -> None:
        self.index = index
        self.size = size


class FrameDecoder:
    """Incremental frame parser with bounded buffers (sans-IO).

    :meth:`feed` takes bytes as they come. :attr:`wanted` is how many bytes finish the piece
    being received (header, head or blob): a driver that reads exactly that much at a time
    (``BufferedReader.read(decoder.wanted)``) hands each blob over as one ``bytes`` object,
    which the decoder keeps as it is, uncopied.
    """

    def __init__(self, *, max_frame: int) -> None:
        if max_frame <= 0:
            raise UsageError("max_frame must be positive")
        self._max_frame = max_frame
        self._buf = bytearray()  # header, then head
        self._length = -1  # of the frame being received, once its header is in
        self._head_len = 0
        self._message: Any = None
        self._sizes: list[int] = []  # of the blobs still to come, in order
        self._blobs: list[bytes] = []  # the blobs received
        self._pieces: list[bytes] = []  # of the blob being received
        self._piece_bytes = 0

    @property
    def wanted(self) -> int:
        """Bytes still needed to finish the current header, head or blob (always > 0)."""
        if self._length < 0:
            return HEADER_LEN - len(self._buf)
        if self._sizes:
            return self._sizes[0] - self._piece_bytes
        return HEADER_LEN + self._head_len - len(self._buf)

    @property
    def buffered(self) -> int:
        """Bytes of the current frame received and not delivered yet."""
        return len(self._buf) + sum(len(blob) for blob in self._blobs) + self._piece_bytes

    def feed(self, data: bytes | bytearray | memoryview) -> list[Any]:
        """Add bytes; return the complete messages. ProtocolViolation on a bad frame."""
        out: list[Any] = []
        with memoryview(data) as view, view.cast("B") as octets:
            pos = 0
            while pos < len(octets):
                take = min(self.wanted, len(octets) - pos)
                if self._sizes:  # a blob: kept as given when it comes whole
                    if isinstance(data, bytes) and take == len(data):
                        piece = data
                    else:
                        piece = bytes(octets[pos : pos + take])
                    message = self._blob_piece(piece)
                else:
                    self._buf += octets[pos : pos + take]
                    message = self._header_or_head()
                pos += take
                if message is not None:
                    out.append(message[0])
        return out

    def set_max_frame(self, max_frame: int) -> None:
        """Change the frame cap (the enclave raises it once its limits are known)."""
        if max_frame <= 0:
            raise UsageError("max_frame must be positive")
        self._max_frame = max_frame

    def _header_or_head(self) -> tuple[Any] | None:
        if self._length < 0:
            if len(self._buf) < _U32.size:
                return None
            (length,) = _U32.unpack_from(self._buf)
            if length > self._max_frame:  # refused before anything else is read
                raise ProtocolViolation(
                    f"frame of {length} bytes is above the channel cap of {self._max_frame}",
                    reason="too-large",
                )
            if len(self._buf) < HEADER_LEN:
                return None
            (head_len,) = _U32.unpack_from(self._buf, _U32.size)
            if not 0 < head_len <= length - _U32.size:
                raise ProtocolViolation(f"frame head of {head_len} bytes in a {length}-byte frame")
            self._length, self._head_len = length, head_len
            return None
        if len(self._buf) < HEADER_LEN + self._head_len:
            return None
        blobs: list[_Blob] = []
        with memoryview(self._buf) as view, view[HEADER_LEN:] as head:
            message = _unpack(head, blobs)
        self._buf = bytearray()
        sizes = [blob.size for blob in blobs]
        if sum(sizes) != self._length - _U32.size - self._head_len:
            raise ProtocolViolation("frame blobs do not add up to its length")
        if not blobs:
            return self._done(message)
        self._message, self._sizes = message, sizes
        return None

    def _blob_piece(self, piece: bytes) -> tuple[Any] | None:
        self._pieces.append(piece)
        self._piece_bytes += len(piece)
        if self._piece_bytes < self._sizes[0]:
            return None
        pieces, self._pieces, self._piece_bytes = self._pieces, [], 0
        self._blobs.append(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        del pieces
        self._sizes.pop(0)
        if self._sizes:
            return None
        message = _put_blobs(self._message, self._blobs)
        self._message, self._blobs = None, []
        return self._done(message)

    def _done(self, message: Any) -> tuple[Any]:
        self._length, self._head_len = -1, 0
        return (message,)


def _unpack(head: memoryview, blobs: list[_Blob]) -> Any:
    def ext_hook(code: int, data: bytes) -> _Blob:
        if code != BLOB_EXT or len(data) != _U32.size:
            raise ProtocolViolation(f"unknown extension type {code} in frame head")
        (size,) = _U32.unpack(data)
        if size <= INLINE_MAX:
            raise ProtocolViolation(f"blob of {size} bytes should be in the head")
        blobs.append(_Blob(len(blobs), size))
        return blobs[-1]

    try:
        return msgpack.unpackb(
            head, raw=False, strict_map_key=True, use_list=True, ext_hook=ext_hook
        )
    except (ValueError, TypeError, msgpack.UnpackException) as err:
        raise ProtocolViolation(f"frame head is not valid msgpack: {err}") from err


def _put_blobs(message: Any, blobs: list[bytes]) -> Any:
    """Put each blob where its placeholder is (lists and map values; iterative: heads are
    untrusted and may nest deeply)."""
    if isinstance(message, _Blob):
        return blobs[message.index]
    stack = [message] if isinstance(message, list | dict) else []
    while stack:
        node = stack.pop()
        items = enumerate(node) if isinstance(node, list) else node.items()
        for key, value in items:
            if isinstance(value, _Blob):
                node[key] = blobs[value.index]
            elif isinstance(value, list | dict):
                stack.append(value)
    return message


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
