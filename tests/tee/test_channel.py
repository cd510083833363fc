"""Framing of the local node <-> enclave channel."""

from __future__ import annotations

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
from phala_p2p.tee.channel import FrameDecoder, error_from_wire, error_to_wire, pack_frame


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


def test_oversized_frames_are_refused_on_both_ends() -> None:
    with pytest.raises(UsageError, match="above the channel cap"):
        pack_frame(b"x" * 100, max_frame=50)
    decoder = FrameDecoder(max_frame=50)
    with pytest.raises(ProtocolViolation, match="above the channel cap") as info:
        decoder.feed(struct.pack(">I", 51))
    assert info.value.reason == "too-large"


def test_garbage_is_a_protocol_violation() -> None:
    decoder = FrameDecoder(max_frame=50)
    with pytest.raises(ProtocolViolation, match="msgpack"):
        decoder.feed(struct.pack(">I", 2) + b"\xc1\xc1")


@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_raise_protocol_violation(data: bytes) -> None:
    decoder = FrameDecoder(max_frame=128)
    try:
        decoder.feed(data)
    except ProtocolViolation:
        return
    assert decoder.buffered <= len(data)


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
