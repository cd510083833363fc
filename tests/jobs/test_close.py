"""Forward secrecy in practice: the ephemeral key goes once the keys exist, and the session
keys are erased when the session ends, however it ends."""

from __future__ import annotations

import pytest

from phala_p2p.jobs import JobConfig, State
from phala_p2p.jobs.errors import FrameError, SessionClosed
from phala_p2p.jobs.keys import Direction, SessionKeys

from .helpers import AGREEMENT_ID, NOW, connect


def test_session_keys_erase_zeroes_every_buffer() -> None:
    keys = SessionKeys(bytes(16), AGREEMENT_ID, bytes([1]) * 32, bytes([2]) * 32)
    assert not keys.erased
    buffers = keys.erase()
    assert len(buffers) == 4
    assert all(len(b) == 32 and not any(b) for b in buffers)
    assert keys.erased
    assert keys.erase() == []
    with pytest.raises(SessionClosed):
        keys.stream_key(Direction.CLIENT_TO_ENCLAVE)
    with pytest.raises(SessionClosed):
        keys.mac(Direction.ENCLAVE_TO_CLIENT, b"ack", 0)


def test_close_erases_the_keys_and_drops_the_stream_machines() -> None:
    client, _, _ = connect(JobConfig(chunk_size=16, window=4))
    client.send(b"held until acked")
    keys, sender, receiver = client.keys, client.outbound, client.inbound
    assert keys is not None
    assert sender is not None
    assert receiver is not None
    assert sender.in_flight == 1
    client.close()
    assert client.state is State.CLOSED
    assert client.keys is None
    assert client.outbound is None
    assert client.inbound is None
    assert keys.erased
    assert sender.closed
    assert sender.in_flight == 0
    assert receiver.closed
    assert not client.holds_ephemeral_key


def test_a_closed_session_takes_nothing() -> None:
    client, _, _ = connect()
    client.close()
    client.close()  # idempotent
    with pytest.raises(SessionClosed):
        client.send(b"x")
    with pytest.raises(SessionClosed):
        client.receive_data(b"", NOW)


def test_both_sides_erase_after_a_complete_job() -> None:
    client, enclave, _ = connect()
    client.send(b"job", final=True)
    enclave.receive_data(client.data_to_send(), NOW)
    enclave.send(b"result", final=True)
    client.receive_data(enclave.data_to_send(), NOW)
    assert client.done
    client.close()
    ack = client.data_to_send()  # the final ack was queued before the keys went
    enclave.receive_data(ack, NOW)
    assert enclave.done
    enclave_keys = enclave.keys
    enclave.close()
    assert enclave_keys is not None
    assert enclave_keys.erased


def test_a_failed_or_expired_session_is_erased_too() -> None:
    client, enclave, table = connect(JobConfig(grace_ms=5))
    enclave_keys = enclave.keys
    with pytest.raises(FrameError):
        client.receive_data(b"\xff" * 5, NOW)
    assert client.keys is None
    enclave.connection_lost(NOW)
    table.expire(NOW + 5)
    assert enclave_keys is not None
    assert enclave_keys.erased
