"""Framing of the local node <-> enclave channel."""

from __future__ import annotations

import io
import struct

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from phala_p2p.errors import (
    EnclaveError,
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
from phala_p2p.tee.channel import (
    BLOB_EXT,
    INLINE_MAX,
    FrameDecoder,
    error_from_wire,
    error_to_wire,
    pack_frame,
    pack_frame_parts,
)


def test_frames_round_trip_across_any_split() -> None:
    messages = [[1, "info", {}], [2, "quote", {"nonce": b"\x00" * 32}], [3, 0, {"x": [1, 2]}]]
    stream = b"".join(pack_frame(m, max_frame=1024) for m in messages)
    for step in (1, 3, 7, len(stream)):
        decoder = FrameDecoder(max_frame=1024)
        got = []
        for i in range(0, len(stream), step):
            got.extend(decoder.feed(stream[i : i + step]))
        assert got == messages
        assert decoder.buffered == 0


def test_large_byte_strings_travel_as_blobs_and_are_not_copied() -> None:
    big, other = bytes(range(256)) * 1024, b"\x07" * (INLINE_MAX + 1)
    message = [7, "run_sealed", {"a": b"small", "big": big, "n": 3, "l": [other, "x"]}]
    parts = pack_frame_parts(message, max_frame=1 << 20)
    assert parts[1] is big  # the caller's objects, in the order of their placeholders
    assert parts[2] is other
    assert len(parts) == 3
    length, head_len = struct.unpack_from(">II", parts[0])
    head = parts[0][8:]
    assert head_len == len(head) < 100
    assert length == 4 + len(head) + len(big) + len(other)
    assert msgpack.unpackb(head) == [
        7,
        "run_sealed",
        {
            "a": b"small",
            "big": msgpack.ExtType(BLOB_EXT, struct.pack(">I", len(big))),
            "n": 3,
            "l": [msgpack.ExtType(BLOB_EXT, struct.pack(">I", len(other))), "x"],
        },
    ]
    wire = pack_frame(message, max_frame=1 << 20)
    assert wire == b"".join(parts)
    with pytest.raises(UsageError, match="above the channel cap"):
        pack_frame_parts(message, max_frame=length - 1)

    # a reader that reads what the decoder wants hands each blob over whole: it is kept as is
    stream = wire + pack_frame([8, 0, {}], max_frame=64)
    reader = io.BufferedReader(io.BytesIO(stream), buffer_size=4096)
    decoder = FrameDecoder(max_frame=length)
    got: list[object] = []
    reads: list[bytes] = []
    while chunk := reader.read(decoder.wanted):
        assert len(chunk) <= decoder.wanted <= length + 8
        reads.append(chunk)
        got.extend(decoder.feed(chunk))
    assert got == [message, [8, 0, {}]]
    first = got[0]
    assert isinstance(first, list)
    assert any(first[2]["big"] is chunk for chunk in reads)
    assert any(first[2]["l"][0] is chunk for chunk in reads)
    assert decoder.buffered == 0


def test_malformed_blob_frames_are_protocol_violations() -> None:
    def frame(head: bytes, blobs: bytes = b"", *, head_len: int | None = None) -> bytes:
        hl = len(head) if head_len is None else head_len
        return struct.pack(">II", 4 + len(head) + len(blobs), hl) + head + blobs

    def placeholder(size: int, code: int = BLOB_EXT) -> bytes:
        return bytes(msgpack.packb(msgpack.ExtType(code, struct.pack(">I", size))))

    blob = b"b" * (INLINE_MAX + 1)
    assert FrameDecoder(max_frame=1 << 20).feed(frame(placeholder(len(blob)), blob)) == [blob]
    cases = {
        "unknown extension": frame(placeholder(len(blob), code=2), blob),
        "should be in the head": frame(placeholder(10), b"b" * 10),
        "do not add up": frame(placeholder(len(blob)), blob + b"x"),
        "frame head of": frame(b"\x90", head_len=0),
    }
    for match, data in cases.items():
        with pytest.raises(ProtocolViolation, match=match):
            FrameDecoder(max_frame=1 << 20).feed(data)
    # a placeholder may not be a map key
    with pytest.raises(ProtocolViolation):
        FrameDecoder(max_frame=1 << 20).feed(
            frame(b"\x81" + placeholder(len(blob)) + b"\x01", blob)
        )


def test_oversized_frames_are_refused_on_both_ends() -> None:
    with pytest.raises(UsageError, match="above the channel cap"):
        pack_frame(b"x" * 100, max_frame=50)
    decoder = FrameDecoder(max_frame=50)
    with pytest.raises(ProtocolViolation, match="above the channel cap") as info:
        decoder.feed(struct.pack(">I", 51))  # refused on its length alone
    assert info.value.reason == "too-large"


def test_garbage_is_a_protocol_violation() -> None:
    decoder = FrameDecoder(max_frame=50)
    with pytest.raises(ProtocolViolation, match="msgpack"):
        decoder.feed(struct.pack(">II", 6, 2) + b"\xc1\xc1")


@given(
    st.lists(st.sampled_from([0, 3, INLINE_MAX, INLINE_MAX + 1, 100_000]), max_size=4),
    st.sampled_from([1000, 4096, INLINE_MAX + 7, 1 << 20]),
)
def test_messages_with_blobs_round_trip_across_any_split(sizes: list[int], step: int) -> None:
    message = [1, 0, {f"f{i}": bytes([i]) * size for i, size in enumerate(sizes)} | {"n": [2]}]
    stream = pack_frame(message, max_frame=1 << 20) * 2
    decoder = FrameDecoder(max_frame=1 << 20)
    got = []
    for i in range(0, len(stream), step):
        got.extend(decoder.feed(stream[i : i + step]))
    assert got == [message, message]
    assert decoder.buffered == 0


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=64))
def test_arbitrary_bytes_only_raise_protocol_violation(data: bytes, step: int) -> None:
    decoder = FrameDecoder(max_frame=128)
    try:
        for i in range(0, len(data), step):
            decoder.feed(data[i : i + step])
    except ProtocolViolation:
        return
    assert decoder.buffered <= len(data)
    assert 0 < decoder.wanted <= 8 + 128


@pytest.mark.parametrize(
    "err",
    [
        InvalidModule("bad module"),
        Trap("job trapped: unreachable"),
        FuelExhausted("out of fuel"),
        MemoryExhausted("memory at cap"),
        WallClockExceeded("too slow"),
        OutputTooLarge("too much"),
        UsageError("bad fuel"),
        EnclaveError("busy"),
        ProtocolViolation("replayed job", reason="replay"),
    ],
)
def test_errors_cross_the_boundary_as_the_same_class(err: P2PError) -> None:
    wire = msgpack.unpackb(msgpack.packb(error_to_wire(err)))
    back = error_from_wire(wire)
    assert type(back) is type(err)
    assert str(back) == str(err)
    if isinstance(err, ProtocolViolation):
        assert isinstance(back, ProtocolViolation)
        assert back.reason == "replay"


def test_subclasses_travel_as_their_known_base() -> None:
    class Custom(Trap):
        pass

    class Strange(P2PError):
        pass

    assert type(error_from_wire(error_to_wire(Custom("c")))) is Trap
    assert type(error_from_wire(error_to_wire(Strange("s")))) is EnclaveError


def test_unknown_or_malformed_errors() -> None:
    assert type(error_from_wire(["KeyboardInterrupt", "x", ""])) is EnclaveError
    assert type(error_from_wire(["SystemExit", "x", ""])) is EnclaveError
    for bad in (None, ["Trap"], ["Trap", 1, ""], "Trap", ["Trap", "m", "r", "x"]):
        with pytest.raises(ProtocolViolation):
            error_from_wire(bad)
    long = error_from_wire(["Trap", "m" * 10_000, ""])
    assert len(str(long)) <= 2000
