"""The handshake: both sides derive the same keys, bound to the agreement and the session,
and every bad hello is refused with its own typed error."""

from __future__ import annotations

import dataclasses

import pytest

from phala_p2p.crypto.kx import EphemeralKey
from phala_p2p.errors import ProtocolViolation
from phala_p2p.jobs import ClientJobSession, SessionTable, State
from phala_p2p.jobs.enclave import EnclaveJobSession
from phala_p2p.jobs.errors import (
    AgreementExpired,
    BadEnclaveSignature,
    BadSessionKey,
    ReplayedHello,
    SessionsFull,
    WrongAgreement,
)
from phala_p2p.jobs.framing import encode_frame
from phala_p2p.jobs.keys import (
    HELLO_CONTEXT,
    Direction,
    hello_statement,
    stream_associated_data,
)
from phala_p2p.jobs.messages import ClientHello, EnclaveHello
from phala_p2p.market.negotiation import Agreement
from phala_p2p.tee.statements import PURPOSES

from .helpers import (
    AGREEMENT_ID,
    ENCLAVE,
    NOW,
    OTHER_AGREEMENT_ID,
    OTHER_ENCLAVE,
    connect,
    make_table,
    make_terms,
    messages_of,
    only_frame,
)

# A point of order 8 on Curve25519: X25519 with it gives an all-zero secret.
LOW_ORDER_POINT = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")


def test_both_sides_derive_the_same_keys_one_per_direction() -> None:
    client, enclave, _ = connect()
    assert client.keys is not None
    assert enclave.keys is not None
    c2e, e2c = Direction.CLIENT_TO_ENCLAVE, Direction.ENCLAVE_TO_CLIENT
    assert client.keys.stream_key(c2e) == enclave.keys.stream_key(c2e)
    assert client.keys.stream_key(e2c) == enclave.keys.stream_key(e2c)
    assert client.keys.stream_key(c2e) != client.keys.stream_key(e2c)
    assert client.keys.mac(c2e, b"x", 1) == enclave.keys.mac(c2e, b"x", 1)
    assert client.keys.mac(c2e, b"x", 1) != client.keys.mac(e2c, b"x", 1)
    assert client.state is State.OPEN
    assert enclave.state is State.OPEN


def test_every_session_has_fresh_keys() -> None:
    first, _, table = connect()
    second, _, _ = connect(table=table)
    assert first.keys is not None
    assert second.keys is not None
    c2e = Direction.CLIENT_TO_ENCLAVE
    assert first.session_id != second.session_id
    assert first.keys.stream_key(c2e) != second.keys.stream_key(c2e)


def test_the_client_drops_its_ephemeral_key_once_keys_exist() -> None:
    client = ClientJobSession(AGREEMENT_ID, ENCLAVE.public_key)
    assert client.holds_ephemeral_key
    enclave = make_table().open(only_frame(client.data_to_send()), NOW)
    client.receive_data(enclave.data_to_send(), NOW)
    assert not client.holds_ephemeral_key


def test_the_enclave_signs_the_domain_separated_statement() -> None:
    _, hello, reply = _exchange()
    statement = hello_statement(AGREEMENT_ID, hello.session_id, hello.client_pub, reply.enclave_pub)
    assert statement.startswith(HELLO_CONTEXT)
    assert ENCLAVE.sign(statement) == reply.signature  # Ed25519 is deterministic


def test_the_hello_context_is_distinct_from_every_other_enclave_statement() -> None:
    others = [*PURPOSES.values(), b"phala/tee/session-offer/v1\x00", b"phala-p2p/stream/v1\x00"]
    for other in others:
        assert not other.startswith(HELLO_CONTEXT)
        assert not HELLO_CONTEXT.startswith(other)


def test_stream_associated_data_differs_by_session_direction_and_agreement() -> None:
    sid = bytes(16)
    base = stream_associated_data(sid, AGREEMENT_ID, Direction.CLIENT_TO_ENCLAVE)
    variants = [
        stream_associated_data(bytes([1]) * 16, AGREEMENT_ID, Direction.CLIENT_TO_ENCLAVE),
        stream_associated_data(sid, AGREEMENT_ID, Direction.ENCLAVE_TO_CLIENT),
        stream_associated_data(sid, OTHER_AGREEMENT_ID, Direction.CLIENT_TO_ENCLAVE),
    ]
    assert len({base, *variants}) == 4


def _hello_and_reply() -> tuple[ClientJobSession, EnclaveHello]:
    client, _, reply = _exchange()
    return client, reply


def _exchange() -> tuple[ClientJobSession, ClientHello, EnclaveHello]:
    """A client waiting for the enclave's answer, its hello, and that answer (not delivered)."""
    client = ClientJobSession(AGREEMENT_ID, ENCLAVE.public_key)
    (hello,) = messages_of(client.data_to_send())
    assert isinstance(hello, ClientHello)
    enclave = make_table().open(only_frame(encode_frame(hello)), NOW)
    (reply,) = messages_of(enclave.data_to_send())
    assert isinstance(reply, EnclaveHello)
    return client, hello, reply


def test_a_bad_enclave_signature_is_refused() -> None:
    client, reply = _hello_and_reply()
    forged = dataclasses.replace(reply, signature=bytes(64))
    with pytest.raises(BadEnclaveSignature) as info:
        client.receive_data(encode_frame(forged), NOW)
    assert info.value.reason == "bad_signature"
    assert client.state is State.CLOSED


def test_a_hello_signed_by_another_enclave_is_refused() -> None:
    """The agreement names ENCLAVE; OTHER_ENCLAVE answers (a miner swapping enclaves)."""
    client = ClientJobSession(AGREEMENT_ID, ENCLAVE.public_key)
    terms = make_terms(enclave=OTHER_ENCLAVE.public_key)
    impostor = SessionTable(OTHER_ENCLAVE, {AGREEMENT_ID: terms}.get)
    enclave = impostor.open(only_frame(client.data_to_send()), NOW)
    with pytest.raises(BadEnclaveSignature):
        client.receive_data(enclave.data_to_send(), NOW)


def test_a_hello_for_another_agreement_is_refused_by_the_client() -> None:
    client, reply = _hello_and_reply()
    with pytest.raises(WrongAgreement) as info:
        client.receive_data(
            encode_frame(dataclasses.replace(reply, agreement_id=OTHER_AGREEMENT_ID)), NOW
        )
    assert info.value.reason == "wrong_agreement"


def test_the_enclave_refuses_an_agreement_it_does_not_serve() -> None:
    client = ClientJobSession(OTHER_AGREEMENT_ID, ENCLAVE.public_key)
    with pytest.raises(WrongAgreement):
        make_table().open(only_frame(client.data_to_send()), NOW)


def test_the_enclave_refuses_an_agreement_naming_another_enclave() -> None:
    table = make_table(None, make_terms(enclave=OTHER_ENCLAVE.public_key))
    client = ClientJobSession(AGREEMENT_ID, ENCLAVE.public_key)
    with pytest.raises(WrongAgreement):
        table.open(only_frame(client.data_to_send()), NOW)


def test_the_enclave_refuses_an_agreement_past_its_deadline() -> None:
    table = make_table(None, make_terms(deadline_ms=NOW))
    client = ClientJobSession(AGREEMENT_ID, ENCLAVE.public_key)
    with pytest.raises(AgreementExpired):
        table.open(only_frame(client.data_to_send()), NOW)


def test_a_replayed_client_hello_is_refused() -> None:
    table = make_table()
    client = ClientJobSession(AGREEMENT_ID, ENCLAVE.public_key)
    hello = only_frame(client.data_to_send())
    table.open(hello, NOW)
    with pytest.raises(ReplayedHello) as info:
        table.open(hello, NOW + 1)
    assert info.value.reason == "replayed"
    assert len(table) == 1


def test_an_enclave_hello_replayed_from_another_session_is_refused() -> None:
    _, old_reply = _hello_and_reply()
    client = ClientJobSession(AGREEMENT_ID, ENCLAVE.public_key)
    with pytest.raises(ReplayedHello):
        client.receive_data(encode_frame(old_reply), NOW)


def test_a_replayed_enclave_hello_relabelled_for_this_session_is_refused() -> None:
    _, old_reply = _hello_and_reply()
    client = ClientJobSession(AGREEMENT_ID, ENCLAVE.public_key)
    relabelled = dataclasses.replace(old_reply, session_id=client.session_id)
    with pytest.raises(BadEnclaveSignature):
        client.receive_data(encode_frame(relabelled), NOW)


def test_a_low_order_client_key_is_refused_by_the_enclave() -> None:
    hello = ClientHello(
        agreement_id=AGREEMENT_ID, session_id=bytes(16), client_pub=LOW_ORDER_POINT, window=8
    )
    with pytest.raises(BadSessionKey) as info:
        make_table().open(only_frame(encode_frame(hello)), NOW)
    assert info.value.reason == "bad_key"


def test_a_low_order_enclave_key_is_refused_by_the_client() -> None:
    client, hello, reply = _exchange()
    statement = hello_statement(AGREEMENT_ID, client.session_id, hello.client_pub, LOW_ORDER_POINT)
    signed = dataclasses.replace(
        reply, enclave_pub=LOW_ORDER_POINT, signature=ENCLAVE.sign(statement)
    )
    with pytest.raises(BadSessionKey):
        client.receive_data(encode_frame(signed), NOW)


def test_the_table_holds_at_most_max_sessions() -> None:
    table = make_table(None, max_sessions=2)
    connect(table=table)
    connect(table=table)
    client = ClientJobSession(AGREEMENT_ID, ENCLAVE.public_key)
    with pytest.raises(SessionsFull):
        table.open(only_frame(client.data_to_send()), NOW)


def test_a_connection_must_start_with_a_hello_or_resume() -> None:
    client, _enclave, table = connect()
    client.send(b"data", final=True)
    with pytest.raises(ProtocolViolation) as info:
        table.open(only_frame(client.data_to_send()), NOW)
    assert info.value.reason == "unexpected_message"


def test_a_second_enclave_hello_is_unexpected() -> None:
    client = ClientJobSession(AGREEMENT_ID, ENCLAVE.public_key)
    enclave = make_table().open(only_frame(client.data_to_send()), NOW)
    reply = enclave.data_to_send()
    client.receive_data(reply, NOW)
    with pytest.raises(ProtocolViolation) as info:
        client.receive_data(reply, NOW)
    assert info.value.reason == "unexpected_message"


def test_fixed_ephemeral_keys_give_reproducible_keys() -> None:
    """With the randomness pinned (as test vectors will), the handshake is deterministic."""

    def run() -> bytes:
        client = ClientJobSession(
            AGREEMENT_ID,
            ENCLAVE.public_key,
            session_id=bytes(range(16)),
            ephemeral=EphemeralKey.from_private_bytes(bytes([1]) * 32),
        )
        (hello,) = messages_of(client.data_to_send())
        assert isinstance(hello, ClientHello)
        enclave = EnclaveJobSession(
            hello, ENCLAVE, ephemeral=EphemeralKey.from_private_bytes(bytes([2]) * 32)
        )
        client.receive_data(enclave.data_to_send(), NOW)
        assert client.keys is not None
        return client.keys.stream_key(Direction.CLIENT_TO_ENCLAVE)

    assert run() == run()


def test_a_session_for_an_agreement_uses_its_id_and_enclave() -> None:
    agreement = Agreement(terms=make_terms(), client_sig=bytes(64), miner_sig=bytes(64))
    client = ClientJobSession.for_agreement(agreement)
    (hello,) = messages_of(client.data_to_send())
    assert isinstance(hello, ClientHello)
    assert hello.agreement_id == AGREEMENT_ID
    enclave = make_table().open(only_frame(encode_frame(hello)), NOW)
    assert client.receive_data(enclave.data_to_send(), NOW)
    assert client.state is State.OPEN
