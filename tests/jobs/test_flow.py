"""Flow control: the sender takes plaintext only while its window has room, holds only the
unacknowledged chunks, and believes only acknowledgements that carry the session's MAC."""

from __future__ import annotations

import pytest

from phala_p2p.errors import ProtocolViolation, UsageError
from phala_p2p.jobs import Acked, DataReceived, EnclaveJobSession, JobConfig
from phala_p2p.jobs.errors import BadMac
from phala_p2p.jobs.flow import ChunkSender
from phala_p2p.jobs.framing import encode_frame
from phala_p2p.jobs.keys import Direction
from phala_p2p.jobs.messages import Ack, Chunk

from .helpers import NOW, connect, messages_of

CONFIG = JobConfig(chunk_size=100, window=3)


def test_send_room_is_the_window_and_closes_when_full() -> None:
    client, _, _ = connect(CONFIG)
    assert client.send_room == 300
    client.send(bytes(250))  # three chunks: 100, 100, 50
    assert client.outbound is not None
    assert client.outbound.in_flight == 3
    assert client.send_room == 0
    with pytest.raises(UsageError):
        client.send(b"x")


def test_send_refuses_more_than_the_room_and_seals_nothing() -> None:
    client, _, _ = connect(CONFIG)
    with pytest.raises(UsageError):
        client.send(bytes(301))
    assert client.outbound is not None
    assert client.outbound.sealed == 0
    assert client.data_to_send() == b""


def test_acks_open_the_window_again() -> None:
    client, enclave, _ = connect(CONFIG)
    client.send(bytes(300))
    received = enclave.receive_data(client.data_to_send(), NOW)
    assert [e.index for e in received if isinstance(e, DataReceived)] == [0, 1, 2]
    events = client.receive_data(enclave.data_to_send(), NOW)
    assert events == [Acked(next_index=3, complete=False)]
    assert client.send_room == 300
    assert client.outbound is not None
    assert client.outbound.in_flight == 0
    assert client.outbound.held_bytes == 0


def test_the_receiver_sends_one_cumulative_ack_per_read() -> None:
    client, enclave, _ = connect(CONFIG)
    client.send(bytes(300))
    enclave.receive_data(client.data_to_send(), NOW)
    acks = [m for m in messages_of(enclave.data_to_send()) if isinstance(m, Ack)]
    assert [a.next_index for a in acks] == [3]


def test_the_final_ack_completes_the_stream() -> None:
    client, enclave, _ = connect(CONFIG)
    client.send(b"all of it", final=True)
    enclave.receive_data(client.data_to_send(), NOW)
    assert client.receive_data(enclave.data_to_send(), NOW) == [Acked(1, complete=True)]
    assert client.outbound is not None
    assert client.outbound.complete
    assert client.send_room == 0


def test_an_empty_final_chunk_ends_a_stream_of_whole_chunks() -> None:
    client, enclave, _ = connect(CONFIG)
    client.send(bytes(200))
    client.send(b"", final=True)
    events = enclave.receive_data(client.data_to_send(), NOW)
    assert [(e.index, len(e.data), e.final) for e in events if isinstance(e, DataReceived)] == [
        (0, 100, False),
        (1, 100, False),
        (2, 0, True),
    ]


def _signed_ack(enclave: EnclaveJobSession, next_index: int) -> bytes:
    """An Ack the enclave could have sent (a valid MAC), whatever it received."""
    assert enclave.keys is not None
    mac = enclave.keys.mac(Direction.ENCLAVE_TO_CLIENT, b"ack", next_index)
    return encode_frame(Ack(next_index=next_index, mac=mac))


def test_an_ack_with_a_bad_mac_is_refused() -> None:
    client, _, _ = connect(CONFIG)
    client.send(bytes(100))
    client.data_to_send()
    with pytest.raises(BadMac) as info:
        client.receive_data(encode_frame(Ack(next_index=1, mac=bytes(32))), NOW)
    assert info.value.reason == "bad_mac"


def test_an_ack_signed_for_the_other_direction_is_refused() -> None:
    client, _, _ = connect(CONFIG)
    client.send(bytes(100))
    assert client.keys is not None
    mac = client.keys.mac(Direction.CLIENT_TO_ENCLAVE, b"ack", 1)  # our own key: reflected
    with pytest.raises(BadMac):
        client.receive_data(encode_frame(Ack(next_index=1, mac=mac)), NOW)


def test_an_ack_for_chunks_never_sent_is_refused() -> None:
    client, enclave, _ = connect(CONFIG)
    client.send(bytes(100))
    with pytest.raises(ProtocolViolation) as info:
        client.receive_data(_signed_ack(enclave, 2), NOW)
    assert info.value.reason == "bad_ack"


def test_a_stale_ack_is_counted_and_ignored() -> None:
    client, enclave, _ = connect(CONFIG)
    client.send(bytes(200))
    assert client.receive_data(_signed_ack(enclave, 2), NOW) == [Acked(2, complete=False)]
    assert client.receive_data(_signed_ack(enclave, 1), NOW) == []
    assert client.outbound is not None
    assert client.outbound.stale_acks == 1
    assert client.outbound.acked == 2


def test_the_sender_memory_is_bounded_by_the_window() -> None:
    sender = ChunkSender(bytes(32), bytes(16), b"ad", window=4, chunk_size=1000)
    for i in range(100):
        while sender.room:
            sender.seal(bytes(1000), final=False)
        assert sender.in_flight == 4
        assert sender.held_bytes <= 4 * 1017
        sender.on_ack(sender.sealed - 1 - i % 3)
    assert sender.max_in_flight == 4
    assert sender.max_held_bytes == 4 * 1017
    assert sender.sealed > 100


def test_the_sender_refuses_an_empty_chunk_that_is_not_final() -> None:
    sender = ChunkSender(bytes(32), bytes(16), b"ad", window=4, chunk_size=10)
    with pytest.raises(UsageError):
        sender.seal(b"", final=False)
    with pytest.raises(UsageError):
        sender.seal(bytes(11), final=False)
    assert isinstance(sender.seal(b"", final=True), Chunk)
    with pytest.raises(UsageError):
        sender.seal(b"after", final=True)
