"""The job messages: kinds in the protocol's range, exact lengths, codec round trips, and a
session that is fed arbitrary bytes raises only ProtocolViolation (then is closed)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phala_p2p.errors import ProtocolViolation, UsageError
from phala_p2p.jobs import FrameDecoder, FrameType, State, decode_frame
from phala_p2p.jobs.framing import encode_frame
from phala_p2p.jobs.messages import (
    MAX_CANCEL_TEXT,
    MAX_WINDOW,
    Ack,
    Cancel,
    Chunk,
    ClientHello,
    EnclaveHello,
    Resume,
    ResumeOk,
)
from phala_p2p.wire.codec import decode, encode, kind_of

from .helpers import NOW, connect

MESSAGES = [ClientHello, EnclaveHello, Chunk, Ack, Resume, ResumeOk, Cancel]


def test_kinds_are_in_the_job_range_and_distinct() -> None:
    kinds = [kind_of(cls) for cls in MESSAGES]
    assert kinds == list(range(420, 427))


def test_each_message_has_its_frame_type() -> None:
    assert len(FrameType) == len(MESSAGES)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ClientHello(
            agreement_id=bytes(31), session_id=bytes(16), client_pub=bytes(32), window=8
        ),
        lambda: ClientHello(
            agreement_id=bytes(32), session_id=bytes(15), client_pub=bytes(32), window=8
        ),
        lambda: EnclaveHello(
            agreement_id=bytes(32),
            session_id=bytes(16),
            enclave_pub=bytes(32),
            window=8,
            signature=b"s",
        ),
        lambda: Ack(next_index=0, mac=bytes(31)),
        lambda: Resume(session_id=bytes(16), attempt=1, next_index=0, mac=b""),
        lambda: Cancel(code=0, text="", mac=bytes(16)),
    ],
)
def test_wrong_lengths_are_refused(make: Callable[[], object]) -> None:
    with pytest.raises(UsageError):
        make()


def test_a_decoded_message_of_the_wrong_length_is_refused() -> None:
    good = encode(Ack(next_index=1, mac=bytes(32)))
    short = good.replace(b"\xc4\x20" + bytes(32), b"\xc4\x1f" + bytes(31))
    assert short != good
    with pytest.raises(ProtocolViolation) as info:
        decode(short, expect=Ack)
    assert info.value.reason == "bad_field"


b16 = st.binary(min_size=16, max_size=16)
b32 = st.binary(min_size=32, max_size=32)
index = st.integers(min_value=0, max_value=(1 << 56) - 1)
window = st.integers(min_value=1, max_value=MAX_WINDOW)
SAMPLES = st.one_of(
    st.builds(ClientHello, agreement_id=b32, session_id=b16, client_pub=b32, window=window),
    st.builds(
        EnclaveHello,
        agreement_id=b32,
        session_id=b16,
        enclave_pub=b32,
        window=window,
        signature=st.binary(min_size=64, max_size=64),
    ),
    st.builds(Chunk, index=index, sealed=st.binary(max_size=64)),
    st.builds(Ack, next_index=index, mac=b32),
    st.builds(Resume, session_id=b16, attempt=st.integers(1, 2**32 - 1), next_index=index, mac=b32),
    st.builds(
        ResumeOk, session_id=b16, attempt=st.integers(1, 2**32 - 1), next_index=index, mac=b32
    ),
    st.builds(
        Cancel,
        code=st.integers(0, 0xFFFF),
        text=st.text(max_size=MAX_CANCEL_TEXT),
        mac=st.sampled_from([b"", bytes(32)]),
    ),
)


@settings(max_examples=100)
@given(SAMPLES)
def test_every_message_round_trips_through_a_frame(msg: object) -> None:
    (frame,) = FrameDecoder().feed(encode_frame(msg))  # type: ignore[arg-type]
    assert decode_frame(frame) == msg


@settings(max_examples=60)
@given(st.lists(st.one_of(st.binary(max_size=40), SAMPLES.map(encode_frame)), max_size=4))
def test_a_session_fed_anything_raises_only_protocol_violations(parts: list[bytes]) -> None:
    client, _, _ = connect()
    try:
        for part in parts:
            client.receive_data(part, NOW)
    except ProtocolViolation:
        assert client.state is State.CLOSED
        assert client.keys is None
