"""The frame decoder: any split of valid frames decodes the same, and oversize lengths, unknown
types and garbage are refused with FrameError from the header alone, in bounded memory."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phala_p2p.crypto.stream import CHUNK_OVERHEAD, MAX_CHUNK_INDEX
from phala_p2p.errors import ProtocolViolation, UsageError
from phala_p2p.jobs import Frame, FrameDecoder, FrameType, decode_frame, encode_frame
from phala_p2p.jobs.errors import FrameError
from phala_p2p.jobs.framing import (
    BODY_LIMITS,
    HEADER_SIZE,
    FrameEnds,
    chunk_frame,
    chunk_frame_to_fill,
    split_chunk,
)
from phala_p2p.jobs.messages import (
    MAX_CHUNK,
    MAX_FRAME,
    Ack,
    Cancel,
    Chunk,
    ClientHello,
    EnclaveHello,
    Resume,
    ResumeOk,
)
from phala_p2p.wire.codec import encode

SAMPLES = [
    ClientHello(agreement_id=bytes(32), session_id=bytes(16), client_pub=bytes([9]) * 32, window=8),
    EnclaveHello(
        agreement_id=bytes(32),
        session_id=bytes(16),
        enclave_pub=bytes(32),
        window=8,
        signature=bytes(64),
    ),
    Chunk(index=3, sealed=bytes(range(256)) * 4),
    Ack(next_index=4, mac=bytes(32)),
    Resume(session_id=bytes(16), attempt=1, next_index=0, mac=bytes(32)),
    ResumeOk(session_id=bytes(16), attempt=1, next_index=7, mac=bytes(32)),
    Cancel(code=4, text="why", mac=b""),
]
STREAM = b"".join(encode_frame(m) for m in SAMPLES)


def header(ftype: int, length: int) -> bytes:
    return struct.pack(">BI", ftype, length)


def test_frames_round_trip_to_their_messages() -> None:
    frames = FrameDecoder().feed(STREAM)
    assert [decode_frame(f) for f in frames] == SAMPLES
    assert [f.type for f in frames] == list(FrameType)


def test_byte_by_byte_feeding_gives_the_same_frames() -> None:
    decoder = FrameDecoder()
    frames: list[Frame] = []
    for i in range(len(STREAM)):
        frames += decoder.feed(STREAM[i : i + 1])
        assert decoder.buffered <= decoder.max_buffered
    assert frames == FrameDecoder().feed(STREAM)
    assert decoder.buffered == 0


@settings(max_examples=100)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=20))
def test_any_split_gives_the_same_frames(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(STREAM)]
    decoder = FrameDecoder()
    frames: list[Frame] = []
    for a, b in itertools.pairwise(points):
        frames += decoder.feed(memoryview(STREAM)[a:b])
    assert [decode_frame(f) for f in frames] == SAMPLES


def test_an_oversize_chunk_is_refused_from_its_header() -> None:
    decoder = FrameDecoder()
    with pytest.raises(FrameError) as info:
        decoder.feed(header(FrameType.CHUNK, MAX_FRAME + 1))
    assert info.value.reason == "frame_too_large"
    assert decoder.buffered == 0


def test_a_control_frame_has_its_own_limit() -> None:
    with pytest.raises(FrameError) as info:
        FrameDecoder().feed(header(FrameType.ACK, BODY_LIMITS[FrameType.ACK] + 1))
    assert info.value.reason == "frame_too_large"


def test_the_chunk_limit_can_be_lowered() -> None:
    decoder = FrameDecoder(max_frame=1000)
    assert decoder.feed(header(FrameType.CHUNK, 1000)) == []
    with pytest.raises(FrameError):
        FrameDecoder(max_frame=1000).feed(header(FrameType.CHUNK, 1001))
    with pytest.raises(UsageError):
        FrameDecoder(max_frame=MAX_FRAME + 1)


@pytest.mark.parametrize("ftype", [0, 8, 255])
def test_an_unknown_frame_type_is_refused(ftype: int) -> None:
    with pytest.raises(FrameError) as info:
        FrameDecoder().feed(header(ftype, 10))
    assert info.value.reason == "bad_frame_type"


def test_an_empty_body_is_refused() -> None:
    with pytest.raises(FrameError) as info:
        FrameDecoder().feed(header(FrameType.CANCEL, 0))
    assert info.value.reason == "malformed"


def test_after_an_error_the_decoder_stays_failed() -> None:
    decoder = FrameDecoder()
    with pytest.raises(FrameError):
        decoder.feed(b"garbage!")
    with pytest.raises(FrameError):
        decoder.feed(encode_frame(SAMPLES[3]))


def test_a_body_of_another_message_type_is_refused() -> None:
    body = encode(SAMPLES[4])  # a Resume
    frame = Frame(FrameType.ACK, body)
    with pytest.raises(ProtocolViolation) as info:
        decode_frame(frame)
    assert info.value.reason == "unknown_kind"


def test_a_garbage_body_is_a_protocol_violation() -> None:
    (frame,) = FrameDecoder().feed(header(FrameType.ACK, 5) + b"\xc1\xc1\xc1\xc1\xc1")
    with pytest.raises(ProtocolViolation):
        decode_frame(frame)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_protocol_violations(data: bytes) -> None:
    decoder = FrameDecoder(max_frame=200)
    try:
        for frame in decoder.feed(data):
            decode_frame(frame)
    except ProtocolViolation:
        pass
    assert decoder.buffered <= decoder.max_buffered


def test_the_buffer_never_exceeds_one_frame() -> None:
    decoder = FrameDecoder(max_frame=4096)
    big = Chunk(index=0, sealed=bytes(4000))
    data = encode_frame(big) * 3
    for i in range(0, len(data), 1000):
        decoder.feed(data[i : i + 1000])
        assert decoder.buffered < HEADER_SIZE + 4096
    assert decoder.max_buffered == HEADER_SIZE + 4096 - 1


# the data path's own CHUNK encoder and parser, held to the codec byte for byte
_EDGES = [0, 1, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0xFFFFFFFF, 1 << 32, MAX_CHUNK_INDEX]
_SIZES = [0, 1, 0xFF, 0x100, 0xFFFF, 0x10000, MAX_CHUNK + CHUNK_OVERHEAD]


@pytest.mark.parametrize("index", _EDGES)
@pytest.mark.parametrize("size", _SIZES)
def test_the_fast_chunk_frame_is_the_codecs_frame(index: int, size: int) -> None:
    sealed = bytes([index % 251]) * size
    body = encode(Chunk(index, sealed))
    generic = header(FrameType.CHUNK, len(body)) + body
    assert encode_frame(Chunk(index, sealed)) == chunk_frame(index, sealed) == generic
    to_fill, place = chunk_frame_to_fill(index, size)  # the sender's path: sealed in place
    place[:] = sealed
    assert to_fill == generic
    frame = FrameDecoder().feed(generic)[0]
    got = split_chunk(frame.body)
    assert got is not None
    assert got[0] == index
    assert bytes(got[1]) == sealed
    assert decode_frame(frame) == Chunk(index, sealed)


def test_the_fast_chunk_encoder_keeps_the_messages_bounds() -> None:
    with pytest.raises(UsageError):
        chunk_frame(MAX_CHUNK_INDEX + 1, b"x")
    with pytest.raises(UsageError):
        chunk_frame(-1, b"x")
    with pytest.raises(UsageError):
        chunk_frame(0, bytes(MAX_CHUNK + CHUNK_OVERHEAD + 1))
    for index, size in ((MAX_CHUNK_INDEX + 1, 1), (-1, 1), (0, MAX_CHUNK + CHUNK_OVERHEAD + 1)):
        with pytest.raises(UsageError):
            chunk_frame_to_fill(index, size)


def _body(index_bytes: bytes, bin_bytes: bytes, sealed: bytes) -> bytes:
    head = encode(Chunk(index=0, sealed=b""))[:-3]
    return head + index_bytes + bin_bytes + sealed


@pytest.mark.parametrize(
    "body",
    [
        _body(b"\xcd\x00\x05", b"\xc4\x01", b"x"),  # an index in a longer form than needed
        _body(b"\x05", b"\xc5\x00\x01", b"x"),  # a bin length in a longer form
        _body(b"\xce\x00\x00\x01\x00", b"\xc6\x00\x00\x00\x03", b"xyz"),
        _body(b"\x05", b"\xc4\x02", b"x"),  # a length past the body
        _body(b"\x05", b"\xc4\x01", b"xy"),  # bytes after the sealed part
        _body(b"\xcf" + (MAX_CHUNK_INDEX + 1).to_bytes(8, "big"), b"\xc4\x01", b"x"),
        _body(b"\xd0\x05", b"\xc4\x01", b"x"),  # a signed int
        _body(b"\x05", b"\xd9\x01", b"x"),  # a string, not bytes
        encode(Ack(next_index=4, mac=bytes(32))),  # another message
        b"",
    ],
)
def test_anything_but_the_plain_layout_goes_to_the_codec(body: bytes) -> None:
    """The fast parser takes only the canonical layout, within the message's bounds; the
    rest goes to the generic decoder, which refuses each of these."""
    assert split_chunk(body) is None
    assert split_chunk(bytearray(body)) is None
    with pytest.raises(ProtocolViolation):
        decode_frame(Frame(FrameType.CHUNK, body))


def test_a_chunk_split_across_reads_is_opened_from_the_assembled_body() -> None:
    sealed = bytes(range(256)) * 1024
    frame_bytes = chunk_frame(9, sealed)
    decoder = FrameDecoder()
    frames = []
    for start in range(0, len(frame_bytes), 65536):
        frames += decoder.feed(frame_bytes[start : start + 65536])
    (frame,) = frames
    got = split_chunk(frame.body)
    assert got is not None
    assert got[0] == 9
    assert got[1] == sealed
    assert decode_frame(frame) == Chunk(9, sealed)


@settings(max_examples=500)
@given(st.binary(max_size=40))
def test_the_fast_parser_never_raises_and_agrees_with_the_codec(tail: bytes) -> None:
    body = encode(Chunk(index=0, sealed=b""))[:-3] + tail
    fast = split_chunk(body)
    if fast is None:
        return
    assert decode_frame(Frame(FrameType.CHUNK, body)) == Chunk(fast[0], bytes(fast[1]))


@settings(max_examples=300)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_frame_ends_says_which_pieces_end_a_frame(cuts: list[int]) -> None:
    """A relay's FrameEnds, fed the stream in any pieces, says True exactly for the pieces
    in which some frame ends."""
    bounds = sorted({0, len(STREAM), *cuts})
    frame_ends = set(itertools.accumulate(len(encode_frame(m)) for m in SAMPLES))
    ends = FrameEnds()
    for start, stop in itertools.pairwise(bounds):
        expected = any(start < end <= stop for end in frame_ends)
        assert ends.feed(STREAM[start:stop]) is expected, (start, stop)


def test_frame_ends_counts_a_header_it_does_not_judge() -> None:
    """An unknown type or an empty body is the receiver's to refuse; the relay only counts
    (an empty body ends its frame with the header)."""
    ends = FrameEnds()
    assert ends.feed(header(99, 3)) is False
    assert ends.feed(b"ab") is False
    assert ends.feed(b"c") is True
    assert ends.feed(header(FrameType.ACK, 0)) is True
