"""Resumption: after a dropped connection the same session continues on a new one, resending
only what the receiver lacks; forged, replayed and late resumes are refused."""

from __future__ import annotations

import dataclasses

import pytest

from phala_p2p.errors import ProtocolViolation, UsageError
from phala_p2p.jobs import (
    CancelCode,
    ClientJobSession,
    EnclaveJobSession,
    JobCancelled,
    JobConfig,
    Resumed,
    SessionExpired,
    SessionTable,
    State,
    refusal,
)
from phala_p2p.jobs.errors import ResumeRefused, SessionClosed
from phala_p2p.jobs.framing import encode_frame
from phala_p2p.jobs.keys import Direction
from phala_p2p.jobs.messages import Chunk, Resume, ResumeOk

from .helpers import (
    AGREEMENT_ID,
    ENCLAVE,
    KIB,
    MIB,
    NOW,
    Upload,
    connect,
    frames_of,
    messages_of,
    only_frame,
    pump_once,
)

GRACE = 10_000
CONFIG = JobConfig(chunk_size=64 * KIB, window=8, grace_ms=GRACE)


def _chunks(data: bytes) -> dict[int, bytes]:
    return {m.index: m.sealed for m in messages_of(data) if isinstance(m, Chunk)}


def test_resume_after_a_drop_half_way_resends_only_what_is_missing() -> None:
    client, enclave, table = connect(CONFIG)
    up = Upload(client, chunks=8 * MIB // (64 * KIB), size=64 * KIB, seed=0)
    down = Upload(enclave, chunks=8 * MIB // (64 * KIB), size=64 * KIB, seed=10_000)
    assert client.outbound is not None
    assert enclave.outbound is not None
    while client.outbound.sealed < up.chunks // 2:
        pump_once(up, down)

    # The cut: both sides wrote a window of chunks; part of each write arrives, cut mid-frame.
    up.fill()
    down.fill()
    c2e, e2c = up.outgoing(), down.outgoing()
    sent_up, sent_down = _chunks(c2e), _chunks(e2c)
    down.take(enclave.receive_data(c2e[: len(c2e) * 2 // 5], NOW))
    up.take(client.receive_data(e2c[: len(e2c) * 3 // 5], NOW))
    client.connection_lost(NOW + 10)
    enclave.connection_lost(NOW + 10)
    assert client.inbound is not None
    assert enclave.inbound is not None
    enclave_has, client_has = enclave.inbound.index, client.inbound.index
    assert enclave_has > client.outbound.acked  # delivered, but the ack was lost
    assert client_has > enclave.outbound.acked

    # A new connection: Resume, then ResumeOk and the enclave's missing chunks, then ours.
    client.resume(NOW + 20)
    assert table.open(only_frame(up.outgoing()), NOW + 20) is enclave
    reply = down.outgoing()
    assert isinstance(messages_of(reply)[0], ResumeOk)
    resent_down = _chunks(reply)
    events = client.receive_data(reply, NOW + 20)
    up.take(events)
    assert Resumed(attempt=1, resent_from=enclave_has, resent=max(sent_up) + 1 - enclave_has) in (
        events
    )
    again = up.outgoing()
    resent_up = _chunks(again)
    down.take(enclave.receive_data(again, NOW + 20))

    assert min(resent_up) == enclave_has
    assert min(resent_down) == client_has
    assert all(resent_up[i] == sent_up[i] for i in resent_up)  # the very same ciphertext
    assert all(resent_down[i] == sent_down[i] for i in resent_down)

    for _ in range(200):
        if client.done and enclave.done:
            break
        pump_once(up, down, NOW + 30)
    assert client.done
    assert enclave.done
    assert down.received_hash.digest() == up.sent_hash.digest()
    assert up.received_hash.digest() == down.sent_hash.digest()
    payload = up.chunks * 64 * KIB
    assert client.outbound.bytes_sent < 1.1 * payload
    assert up.wire_bytes < 1.1 * payload
    assert enclave.outbound.bytes_sent < 1.1 * payload
    assert client.outbound.chunks_resent == len(resent_up)
    assert client.generation == 2
    assert enclave.generation == 2


def _suspended(
    config: JobConfig = CONFIG,
) -> tuple[ClientJobSession, EnclaveJobSession, SessionTable]:
    client, enclave, table = connect(config)
    client.send(b"some data")
    enclave.receive_data(client.data_to_send(), NOW)
    client.connection_lost(NOW + 100)
    enclave.connection_lost(NOW + 100)
    return client, enclave, table


def _resume_frame(client: ClientJobSession, now_ms: int) -> bytes:
    client.resume(now_ms)
    return client.data_to_send()


def test_a_resume_with_a_wrong_proof_is_refused_and_harms_nothing() -> None:
    client, enclave, table = _suspended()
    (good,) = messages_of(_resume_frame(client, NOW + 200))
    assert isinstance(good, Resume)
    forged = dataclasses.replace(good, mac=bytes(32))
    with pytest.raises(ResumeRefused) as info:
        table.open(only_frame(encode_frame(forged)), NOW + 200)
    assert info.value.reason == "bad_proof"
    assert enclave.state is State.SUSPENDED
    assert table.open(only_frame(encode_frame(good)), NOW + 300) is enclave
    assert enclave.state is State.OPEN


def test_a_resume_for_another_position_needs_its_own_proof() -> None:
    client, _, table = _suspended()
    (good,) = messages_of(_resume_frame(client, NOW + 200))
    assert isinstance(good, Resume)
    moved = dataclasses.replace(good, next_index=good.next_index + 1)
    with pytest.raises(ResumeRefused) as info:
        table.open(only_frame(encode_frame(moved)), NOW + 200)
    assert info.value.reason == "bad_proof"


def test_a_replayed_resume_is_refused() -> None:
    client, enclave, table = _suspended()
    resume = _resume_frame(client, NOW + 200)
    table.open(only_frame(resume), NOW + 200)
    client.receive_data(enclave.data_to_send(), NOW + 200)
    with pytest.raises(ResumeRefused) as info:
        table.open(only_frame(resume), NOW + 300)
    assert info.value.reason == "replayed"
    assert enclave.state is State.OPEN
    client.send(b"still fine", final=True)
    assert enclave.receive_data(client.data_to_send(), NOW + 300)


def test_a_resume_for_an_unknown_session_is_refused_and_the_client_told() -> None:
    client, _, _ = _suspended()
    other_table = SessionTable(ENCLAVE, {}.get)
    with pytest.raises(ResumeRefused) as info:
        other_table.open(only_frame(_resume_frame(client, NOW + 200)), NOW + 200)
    assert info.value.reason == "unknown_session"
    with pytest.raises(JobCancelled) as cancelled:
        client.receive_data(refusal(info.value), NOW + 200)
    assert cancelled.value.code == CancelCode.UNKNOWN_SESSION
    assert not cancelled.value.authenticated


def test_the_client_refuses_to_resume_after_the_grace_period() -> None:
    client, _, _ = _suspended()
    assert not client.expired(NOW + 100 + GRACE - 1)
    assert client.expired(NOW + 100 + GRACE)
    assert client.next_deadline() == NOW + 100 + GRACE
    with pytest.raises(SessionExpired):
        client.resume(NOW + 100 + GRACE)
    assert client.state is State.CLOSED
    assert client.keys is None


def test_the_enclave_refuses_a_resume_after_the_grace_period() -> None:
    client, enclave, table = _suspended()
    resume = only_frame(_resume_frame(client, NOW + 200))  # in time by the client's clock
    with pytest.raises(SessionExpired) as expired:
        table.open(resume, NOW + 100 + GRACE)
    assert enclave.state is State.CLOSED
    with pytest.raises(JobCancelled) as cancelled:
        client.receive_data(refusal(expired.value), NOW + 200)
    assert cancelled.value.code == CancelCode.SESSION_EXPIRED
    assert len(table) == 0
    with pytest.raises(ResumeRefused) as info:
        table.open(resume, NOW + 100 + GRACE)
    assert info.value.reason == "unknown_session"


def test_a_failed_resume_does_not_extend_the_grace_period() -> None:
    client, _, _ = _suspended()
    client.resume(NOW + 200)
    client.connection_lost(NOW + 5_000)
    assert client.next_deadline() == NOW + 100 + GRACE


def test_the_table_drops_expired_sessions() -> None:
    _, enclave, table = _suspended()
    assert table.next_deadline() == NOW + 100 + GRACE
    assert table.expire(NOW + 100 + GRACE - 1) == []
    assert table.expire(NOW + 100 + GRACE) == [enclave.session_id]
    assert enclave.state is State.CLOSED
    assert len(table) == 0


def test_a_resume_before_the_enclave_noticed_the_drop_moves_the_session() -> None:
    client, enclave, table = connect(CONFIG)
    client.connection_lost(NOW + 1)  # the enclave still thinks its connection is up
    assert table.open(only_frame(_resume_frame(client, NOW + 2)), NOW + 2) is enclave
    assert enclave.state is State.OPEN
    assert enclave.generation == 2
    assert isinstance(client.receive_data(enclave.data_to_send(), NOW + 2)[0], Resumed)


def test_a_session_without_keys_cannot_be_resumed() -> None:
    client = ClientJobSession(AGREEMENT_ID, ENCLAVE.public_key)
    client.connection_lost(NOW)
    assert client.state is State.CLOSED
    with pytest.raises(SessionClosed):
        client.resume(NOW)


def test_only_a_suspended_session_resumes() -> None:
    client, _, _ = connect(CONFIG)
    with pytest.raises(UsageError):
        client.resume(NOW)


def test_a_suspended_session_takes_no_bytes() -> None:
    client, _, _ = _suspended()
    with pytest.raises(UsageError):
        client.receive_data(b"\x04", NOW + 200)
    assert client.send_room == 0
    assert frames_of(client.data_to_send()) == []


def test_a_resume_asking_for_chunks_never_sent_ends_the_session() -> None:
    client, enclave, table = _suspended()
    assert client.keys is not None
    mac = client.keys.mac(Direction.CLIENT_TO_ENCLAVE, b"resume", 1, 99)
    bogus = Resume(session_id=client.session_id, attempt=1, next_index=99, mac=mac)
    with pytest.raises(ProtocolViolation) as info:
        table.open(only_frame(encode_frame(bogus)), NOW + 200)
    assert info.value.reason == "bad_ack"
    assert enclave.state is State.CLOSED
