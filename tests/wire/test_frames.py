"""Stream framing: decoding at any split, early header checks, bounded message assembly."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phala_p2p.errors import Cancelled, ProtocolViolation, RemoteError, UsageError
from phala_p2p.wire.frames import (
    DEFAULT_MAX_FRAME,
    HEADER_SIZE,
    MAX_TEXT,
    Frame,
    FrameDecoder,
    FrameType,
    MessageAssembler,
    encode_cancel,
    encode_end,
    encode_error,
    encode_frame,
    encode_message,
    parse_error,
)


def drain(decoder: FrameDecoder) -> list[Frame]:
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    return frames


def decode_all(pieces: list[bytes], max_frame: int = DEFAULT_MAX_FRAME) -> list[Frame]:
    decoder = FrameDecoder(max_frame=max_frame)
    frames: list[Frame] = []
    for piece in pieces:
        decoder.feed(piece)
        frames.extend(drain(decoder))
    assert decoder.buffered == 0
    return frames


STREAM_FRAMES = [
    *encode_message(b"hello, world", chunk_size=5),
    encode_error(7, "nope"),
    encode_cancel("bye"),
    *encode_message(b""),
]
STREAM = b"".join(STREAM_FRAMES)
EXPECTED = [
    Frame(FrameType.DATA, b"hello"),
    Frame(FrameType.DATA, b", wor"),
    Frame(FrameType.DATA, b"ld"),
    Frame(FrameType.END, (12).to_bytes(8, "big")),
    Frame(FrameType.ERROR, b"\x00\x07nope"),
    Frame(FrameType.CANCEL, b"bye"),
    Frame(FrameType.END, bytes(8)),
]


def test_whole_stream_at_once() -> None:
    assert decode_all([STREAM]) == EXPECTED


def test_split_at_every_byte_boundary_gives_the_same_frames() -> None:
    for cut in range(len(STREAM) + 1):
        assert decode_all([STREAM[:cut], STREAM[cut:]]) == EXPECTED, cut
    for a in range(0, len(STREAM) + 1, 3):
        for b in range(a, len(STREAM) + 1, 5):
            assert decode_all([STREAM[:a], STREAM[a:b], STREAM[b:]]) == EXPECTED, (a, b)


def test_byte_by_byte() -> None:
    assert decode_all([STREAM[i : i + 1] for i in range(len(STREAM))]) == EXPECTED


@settings(max_examples=100)
@given(
    st.lists(st.binary(min_size=0, max_size=300), max_size=5),
    st.integers(1, 64),
    st.lists(st.integers(1, 50), min_size=1, max_size=20),
)
def test_messages_survive_any_chunking(
    messages: list[bytes], chunk_size: int, reads: list[int]
) -> None:
    stream = b"".join(f for m in messages for f in encode_message(m, chunk_size=chunk_size))
    pieces = []
    pos = 0
    i = 0
    while pos < len(stream):
        step = reads[i % len(reads)]
        pieces.append(stream[pos : pos + step])
        pos += step
        i += 1
    assembler = MessageAssembler(max_message=300)
    out = []
    for frame in decode_all(pieces, max_frame=64):
        assert frame.type is FrameType.DATA or frame.type is FrameType.END
        assert len(frame.payload) <= chunk_size or frame.type is FrameType.END
        message = assembler.add(frame)
        if message is not None:
            out.append(message)
    assert out == messages


def test_oversized_header_is_refused_before_its_payload() -> None:
    decoder = FrameDecoder(max_frame=100)
    decoder.feed(bytes([1, 0, 0]))
    assert decoder.next_frame() is None  # header incomplete: no verdict yet
    decoder.feed(bytes([0, 101]))  # header complete, announcing 101 bytes, no payload sent
    with pytest.raises(ProtocolViolation) as info:
        decoder.next_frame()
    assert info.value.reason == "frame_too_large"
    assert decoder.buffered == 0
    with pytest.raises(ProtocolViolation):  # the decoder stays broken
        decoder.next_frame()
    with pytest.raises(ProtocolViolation):
        decoder.feed(b"more")


def test_frame_at_the_limit_is_accepted() -> None:
    payload = bytes(100)
    assert decode_all([encode_frame(FrameType.DATA, payload)], max_frame=100) == [
        Frame(FrameType.DATA, payload)
    ]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (bytes([0, 0, 0, 0, 1]), "bad_frame_type"),
        (bytes([5, 0, 0, 0, 0]), "bad_frame_type"),
        (bytes([255, 0, 0, 0, 0]), "bad_frame_type"),
        (bytes([1, 255, 255, 255, 255]), "frame_too_large"),
        (bytes([1, 0, 0, 0, 0]), "malformed"),  # empty DATA
        (bytes([2, 0, 0, 0, 7]), "malformed"),  # END of 7 bytes
        (bytes([2, 0, 0, 0, 9]), "malformed"),
        (bytes([3, 0, 0, 0, 1]), "malformed"),  # ERROR without a full code
        (bytes([3, 0, 0, 4, 3]), "malformed"),  # ERROR of 1027 bytes
        (bytes([3, 255, 255, 255, 255]), "malformed"),
        (bytes([4, 0, 0, 4, 1]), "malformed"),  # CANCEL of 1025 bytes
    ],
)
def test_bad_headers(raw: bytes, reason: str) -> None:
    decoder = FrameDecoder()
    decoder.feed(raw)
    with pytest.raises(ProtocolViolation) as info:
        decoder.next_frame()
    assert info.value.reason == reason


def test_control_frames_have_their_own_limits_whatever_max_frame() -> None:
    error = encode_error(1, "x" * 2000)
    assert len(error) == HEADER_SIZE + 2 + MAX_TEXT
    assert decode_all([error], max_frame=16) == [Frame(FrameType.ERROR, error[HEADER_SIZE:])]


def test_buffer_stays_bounded() -> None:
    decoder = FrameDecoder(max_frame=2048)
    frame = encode_frame(FrameType.DATA, bytes(2048))
    decoder.feed(frame * 3)  # one feed may hold several frames
    assert decoder.buffered == 3 * len(frame)
    with pytest.raises(UsageError):
        decoder.feed(b"x")  # not drained: feeding on would grow the buffer without bound
    assert len(drain(decoder)) == 3


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=40), max_size=8), st.integers(1, 64))
def test_arbitrary_bytes_raise_only_protocol_violation(pieces: list[bytes], max_frame: int) -> None:
    decoder = FrameDecoder(max_frame=max_frame)
    assembler = MessageAssembler(max_message=100)
    try:
        for piece in pieces:
            decoder.feed(piece)
            for frame in drain(decoder):
                assert decoder.buffered <= max(max_frame, 2 + MAX_TEXT) + HEADER_SIZE
                try:
                    assembler.add(frame)
                except (RemoteError, Cancelled):
                    assembler = MessageAssembler(max_message=100)
            assert decoder.buffered < max(max_frame, 2 + MAX_TEXT) + HEADER_SIZE
    except ProtocolViolation:
        pass


# -- messages ------------------------------------------------------------------------------


def test_encode_message_layout() -> None:
    assert encode_message(b"") == [bytes([2, 0, 0, 0, 8]) + bytes(8)]
    frames = encode_message(b"abcdefg", chunk_size=3)
    assert frames == [
        b"\x01\x00\x00\x00\x03abc",
        b"\x01\x00\x00\x00\x03def",
        b"\x01\x00\x00\x00\x01g",
        encode_end(7),
    ]
    assert encode_message(bytearray(b"ab")) == encode_message(b"ab")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        encode_message(b"x", chunk_size=0)


def test_message_limit_is_enforced_as_data_arrives() -> None:
    assembler = MessageAssembler(max_message=10)
    assert assembler.add(Frame(FrameType.DATA, bytes(6))) is None
    assert assembler.pending == 6
    with pytest.raises(ProtocolViolation) as info:
        assembler.add(Frame(FrameType.DATA, bytes(5)))  # 11 > 10, before any END
    assert info.value.reason == "message_too_large"

    at_limit = MessageAssembler(max_message=10)
    at_limit.add(Frame(FrameType.DATA, bytes(10)))
    assert at_limit.add(Frame(FrameType.END, (10).to_bytes(8, "big"))) == bytes(10)


def test_length_mismatch() -> None:
    assembler = MessageAssembler(max_message=100)
    assembler.add(Frame(FrameType.DATA, b"abc"))
    with pytest.raises(ProtocolViolation) as info:
        assembler.add(Frame(FrameType.END, (4).to_bytes(8, "big")))
    assert info.value.reason == "length_mismatch"


def test_assembler_is_reusable_and_empty_messages_work() -> None:
    assembler = MessageAssembler(max_message=5)
    assert assembler.add(Frame(FrameType.END, bytes(8))) == b""
    for frame in encode_message(b"12345", chunk_size=2):
        result = assembler.add(decode_all([frame])[0])
    assert result == b"12345"
    assert assembler.pending == 0
    assembler.add(Frame(FrameType.DATA, b"12"))
    assert assembler.add(Frame(FrameType.END, (2).to_bytes(8, "big"))) == b"12"


def test_error_and_cancel_frames() -> None:
    assembler = MessageAssembler(max_message=100)
    assembler.add(Frame(FrameType.DATA, b"partial"))
    with pytest.raises(RemoteError) as err:
        assembler.add(decode_all([encode_error(503, "busy")])[0])
    assert err.value.code == 503
    assert str(err.value) == "busy"
    with pytest.raises(Cancelled) as cancelled:
        assembler.add(decode_all([encode_cancel("deadline")])[0])
    assert cancelled.value.reason == "deadline"


def test_error_text_is_cut_at_a_character_boundary() -> None:
    frame = encode_error(1, "é" * 1000)  # 2000 bytes of UTF-8
    code, text = parse_error(frame[HEADER_SIZE:])
    assert code == 1
    assert text == "é" * 512
    assert len(frame) - HEADER_SIZE == 2 + 1024
    # a peer's invalid UTF-8 is replaced, not refused: the text is for humans
    assert parse_error(b"\x00\x02\xff") == (2, "\ufffd")
    with pytest.raises(ProtocolViolation):
        parse_error(b"\x00")


def test_caller_mistakes() -> None:
    with pytest.raises(UsageError):
        encode_frame(9, b"")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        encode_frame(FrameType.DATA, "text")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        encode_error(70000, "x")
    with pytest.raises(UsageError):
        FrameDecoder(max_frame=0)
    with pytest.raises(UsageError):
        MessageAssembler(max_message=-1)


def test_large_message_is_assembled_in_linear_time() -> None:
    """16 MiB through 64 KiB frames: one copy into frames, one join; no quadratic growth."""
    data = bytes(range(256)) * (16 * 4096)
    decoder = FrameDecoder()
    assembler = MessageAssembler(max_message=len(data))
    result = None
    for frame_bytes in encode_message(data, chunk_size=64 * 1024):
        decoder.feed(frame_bytes)
        for frame in drain(decoder):
            result = assembler.add(frame) or result
    assert result == data
