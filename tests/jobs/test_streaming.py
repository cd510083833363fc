"""Encrypted streaming both ways: a large round trip in bounded memory, and every way of
corrupting the chunk sequence is refused with its own typed error."""

from __future__ import annotations

import dataclasses

import pytest

from phala_p2p.crypto.stream import CHUNK_OVERHEAD, NONCE_PREFIX_SIZE, StreamSealer
from phala_p2p.errors import ProtocolViolation, StreamReordered, StreamTampered, StreamTruncated
from phala_p2p.jobs import (
    CancelCode,
    ClientJobSession,
    DataReceived,
    EnclaveJobSession,
    Event,
    JobCancelled,
    JobConfig,
    JobSession,
    State,
)
from phala_p2p.jobs.errors import ChunkReplayed, InboundTooLarge
from phala_p2p.jobs.flow import ChunkReceiver, ChunkSender
from phala_p2p.jobs.framing import encode_frame
from phala_p2p.jobs.keys import Direction, stream_associated_data
from phala_p2p.jobs.messages import Ack, Chunk, ClientHello

from .helpers import (
    AGREEMENT_ID,
    ENCLAVE,
    KIB,
    MIB,
    NOW,
    OTHER_AGREEMENT_ID,
    Upload,
    connect,
    make_table,
    messages_of,
    only_frame,
    piece,
    pump_once,
)


def test_64_mib_round_trip_in_256_kib_chunks_holds_at_most_the_window() -> None:
    config = JobConfig(chunk_size=256 * KIB, window=8)
    client, enclave, _ = connect(config)
    up = Upload(client, chunks=64 * MIB // (256 * KIB), size=256 * KIB)
    down = Upload(enclave, chunks=0, size=256 * KIB)
    rounds = 0
    while not (client.outbound is not None and client.outbound.complete):
        pump_once(up, down)
        rounds += 1
        assert client.outbound is not None
        assert client.outbound.in_flight <= 8
        assert rounds <= 1000
    sender = client.outbound
    assert down.received == 64 * MIB
    assert down.received_hash.digest() == up.sent_hash.digest()
    assert down.finished
    assert sender.max_in_flight == 8  # the window was used, never exceeded
    assert sender.max_held_bytes <= 8 * (256 * KIB + CHUNK_OVERHEAD)
    assert sender.bytes_sent == 64 * MIB + 256 * CHUNK_OVERHEAD
    assert sender.chunks_resent == 0


def _acks(data: bytes) -> list[int]:
    return [m.next_index for m in messages_of(data) if isinstance(m, Ack)]


def test_acks_come_per_half_of_the_senders_window_and_for_the_final_chunk() -> None:
    """Each side acknowledges by the window the other's hello stated (6 for this client, 8
    for the enclave), not once per chunk; a final chunk is acknowledged at once."""
    client = ClientJobSession(AGREEMENT_ID, ENCLAVE.public_key, JobConfig(chunk_size=64, window=6))
    enclave = make_table(JobConfig(chunk_size=64, window=8)).open(
        only_frame(client.data_to_send()), NOW
    )
    client.receive_data(enclave.data_to_send(), NOW)
    enclave_acks: list[int] = []
    for n in range(10):
        assert client.send_room >= 64  # the Acks came in time: the client never waits
        client.send(piece(n, 64), final=n == 9)
        enclave.receive_data(client.data_to_send(), NOW)
        back = enclave.data_to_send()
        enclave_acks += _acks(back)
        client.receive_data(back, NOW)
    assert enclave_acks == [3, 6, 9, 10]
    client_acks: list[int] = []
    for n in range(9):
        enclave.send(piece(n, 64), final=n == 8)
        client.receive_data(enclave.data_to_send(), NOW)
        back = client.data_to_send()
        client_acks += _acks(back)
        enclave.receive_data(back, NOW)
    assert client_acks == [4, 8, 9]
    assert client.done
    assert enclave.done


@pytest.mark.parametrize(
    ("client_window", "enclave_window"), [(3, 3), (1, 8), (2, 3), (8, 1), (5, 2)]
)
def test_every_pair_of_windows_streams_to_the_end(client_window: int, enclave_window: int) -> None:
    """Both directions stream at once; acks by half the peer's window never leave a sender
    with a full window unanswered."""
    client = ClientJobSession(
        AGREEMENT_ID, ENCLAVE.public_key, JobConfig(chunk_size=KIB, window=client_window)
    )
    enclave = make_table(JobConfig(chunk_size=KIB, window=enclave_window)).open(
        only_frame(client.data_to_send()), NOW
    )
    client.receive_data(enclave.data_to_send(), NOW)
    up = Upload(client, chunks=23, size=KIB, seed=0)
    down = Upload(enclave, chunks=17, size=KIB, seed=500)
    for _ in range(60):
        pump_once(up, down)
        if client.done and enclave.done:
            break
    assert client.done
    assert enclave.done
    assert down.received_hash.digest() == up.sent_hash.digest()
    assert up.received_hash.digest() == down.sent_hash.digest()
    assert up.received == 17 * KIB


def test_a_window_changed_on_the_way_breaks_the_session() -> None:
    """The hellos' windows are bound like every other hello field, by the transcript: a
    relay that rewrites one leaves the two sides with different keys."""
    client = ClientJobSession(AGREEMENT_ID, ENCLAVE.public_key, JobConfig(window=8))
    (hello,) = messages_of(client.data_to_send())
    assert isinstance(hello, ClientHello)
    forged = encode_frame(dataclasses.replace(hello, window=32))
    enclave = make_table().open(only_frame(forged), NOW)
    client.receive_data(enclave.data_to_send(), NOW)  # the signature does not cover it
    client.send(b"job", final=True)
    with pytest.raises(StreamTampered):
        enclave.receive_data(client.data_to_send(), NOW)


def _client_chunks(
    n: int, *, final_at: int | None = None
) -> tuple[ClientJobSession, EnclaveJobSession, list[Chunk]]:
    client, enclave, _ = connect(JobConfig(chunk_size=16, window=8))
    for i in range(n):
        client.send(bytes([i]) * 16, final=i == final_at)
    chunks = [m for m in messages_of(client.data_to_send()) if isinstance(m, Chunk)]
    assert len(chunks) == n
    return client, enclave, chunks


def _feed(session: JobSession, *chunks: Chunk) -> list[Event]:
    """Deliver ``chunks`` to ``session`` in one read."""
    return session.receive_data(b"".join(encode_frame(c) for c in chunks), NOW)


def test_in_order_chunks_open() -> None:
    _, enclave, chunks = _client_chunks(3, final_at=2)
    events = _feed(enclave, *chunks)
    assert [e.index for e in events if isinstance(e, DataReceived)] == [0, 1, 2]


def test_a_tampered_chunk_is_refused() -> None:
    _, enclave, chunks = _client_chunks(2)
    sealed = bytearray(chunks[1].sealed)
    sealed[5] ^= 1
    with pytest.raises(StreamTampered) as info:
        _feed(enclave, chunks[0], dataclasses.replace(chunks[1], sealed=bytes(sealed)))
    assert type(info.value) is StreamTampered
    assert enclave.state is State.CLOSED


def test_a_flipped_final_flag_is_refused_as_tampering() -> None:
    _, enclave, chunks = _client_chunks(2)
    flipped = b"\x01" + chunks[0].sealed[1:]
    with pytest.raises(StreamTampered):
        _feed(enclave, dataclasses.replace(chunks[0], sealed=flipped))


def test_reordered_chunks_are_refused() -> None:
    _, enclave, chunks = _client_chunks(3)
    with pytest.raises(StreamReordered) as info:
        _feed(enclave, chunks[0], chunks[2], chunks[1])
    assert type(info.value) is StreamReordered
    assert info.value.reason == "stream_reordered"


def test_a_replayed_chunk_is_refused() -> None:
    _, enclave, chunks = _client_chunks(2)
    with pytest.raises(ChunkReplayed) as info:
        _feed(enclave, chunks[0], chunks[1], chunks[1])
    assert info.value.reason == "stream_replayed"


def test_a_replayed_chunk_in_a_later_read_is_refused() -> None:
    _, enclave, chunks = _client_chunks(2)
    _feed(enclave, chunks[0], chunks[1])
    with pytest.raises(ChunkReplayed):
        _feed(enclave, chunks[0])


def test_a_stream_that_ends_without_its_final_chunk_is_truncated() -> None:
    _, enclave, chunks = _client_chunks(4, final_at=3)
    _feed(enclave, *chunks[:3])
    with pytest.raises(StreamTruncated) as info:
        enclave.end_of_stream()
    assert type(info.value) is StreamTruncated
    assert info.value.reason == "stream_truncated"


def test_a_complete_stream_ends_cleanly() -> None:
    _, enclave, chunks = _client_chunks(4, final_at=3)
    _feed(enclave, *chunks)
    enclave.end_of_stream()
    assert enclave.inbound is not None
    assert enclave.inbound.finished


def test_a_chunk_from_another_session_is_refused_as_tampering() -> None:
    _, _, chunks_a = _client_chunks(1)
    _, enclave_b, _ = _client_chunks(1)
    with pytest.raises(StreamTampered):
        _feed(enclave_b, chunks_a[0])  # same index, other session's keys and AD


def test_a_chunk_sent_back_the_other_way_is_refused_as_tampering() -> None:
    client, enclave, _ = connect(JobConfig(chunk_size=16, window=4))
    enclave.send(b"result bytes", final=False)
    (reflected,) = [m for m in messages_of(enclave.data_to_send()) if isinstance(m, Chunk)]
    with pytest.raises(StreamTampered):
        _feed(enclave, reflected)  # the enclave's own chunk 0, fed back as the client's
    assert client.state is State.OPEN


KEY = bytes(range(32))
SID = bytes(range(16))


def _sender(ad: bytes) -> ChunkSender:
    return ChunkSender(KEY, SID, ad, window=4, chunk_size=64)


def _receiver(ad: bytes) -> ChunkReceiver:
    return ChunkReceiver(KEY, SID, ad)


@pytest.mark.parametrize(
    "other",
    [
        stream_associated_data(bytes(16), AGREEMENT_ID, Direction.CLIENT_TO_ENCLAVE),
        stream_associated_data(SID, AGREEMENT_ID, Direction.ENCLAVE_TO_CLIENT),
        stream_associated_data(SID, OTHER_AGREEMENT_ID, Direction.CLIENT_TO_ENCLAVE),
    ],
    ids=["other-session", "other-direction", "other-agreement"],
)
def test_the_associated_data_alone_detects_a_splice(other: bytes) -> None:
    """Same key, same index: only the associated data differs, and the tag fails."""
    ad = stream_associated_data(SID, AGREEMENT_ID, Direction.CLIENT_TO_ENCLAVE)
    chunk = _sender(ad).seal(b"payload", final=False)
    assert _receiver(ad).open(chunk) == (b"payload", False)
    with pytest.raises(StreamTampered):
        _receiver(other).open(chunk)


def test_a_chunk_after_the_final_one_is_refused() -> None:
    ad = stream_associated_data(SID, AGREEMENT_ID, Direction.CLIENT_TO_ENCLAVE)
    sealer = StreamSealer(KEY, SID[:NONCE_PREFIX_SIZE], ad)
    receiver = _receiver(ad)
    receiver.open(Chunk(index=0, sealed=sealer.seal_chunk(b"last", final=True)))
    # a second sealer: the nonce reuse STREAM forbids
    rogue = StreamSealer(KEY, SID[:NONCE_PREFIX_SIZE], ad)
    rogue.seal_chunk(b"x", final=False)
    extra = Chunk(index=1, sealed=rogue.seal_chunk(b"more", final=False))
    with pytest.raises(StreamTruncated) as info:
        receiver.open(extra)
    assert info.value.reason == "stream_extended"


def test_an_empty_chunk_that_is_not_final_is_refused() -> None:
    client, enclave, _ = connect(JobConfig(chunk_size=16, window=4))
    assert client.keys is not None
    c2e = Direction.CLIENT_TO_ENCLAVE
    sealer = StreamSealer(
        client.keys.stream_key(c2e),
        client.session_id[:NONCE_PREFIX_SIZE],
        stream_associated_data(client.session_id, AGREEMENT_ID, c2e),
    )
    empty = Chunk(index=0, sealed=sealer.seal_chunk(b"", final=False))
    with pytest.raises(ProtocolViolation) as info:
        _feed(enclave, empty)
    assert info.value.reason == "empty_chunk"


def test_more_than_max_inbound_is_refused() -> None:
    client, enclave, _ = connect(JobConfig(chunk_size=64, window=4, max_inbound=100))
    client.send(bytes(128))
    with pytest.raises(InboundTooLarge):
        enclave.receive_data(client.data_to_send(), NOW)


def test_a_failed_session_tells_the_peer_why() -> None:
    client, enclave, _ = connect(JobConfig(chunk_size=16, window=4))
    client.send(b"0123456789abcdef")
    (chunk,) = messages_of(client.data_to_send())
    assert isinstance(chunk, Chunk)
    forged = dataclasses.replace(chunk, sealed=chunk.sealed[:-1] + b"\x00")
    with pytest.raises(StreamTampered):
        _feed(enclave, forged)
    with pytest.raises(JobCancelled) as info:
        client.receive_data(enclave.data_to_send(), NOW)
    assert info.value.code == CancelCode.PROTOCOL_ERROR
    assert info.value.authenticated
    assert "stream_tampered" in info.value.text
    assert client.state is State.CLOSED
