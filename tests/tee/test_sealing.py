"""Job session keys and sealed payloads."""

from __future__ import annotations

import pytest

from phala_p2p.crypto.identity import Identity
from phala_p2p.errors import ProtocolViolation, UsageError
from phala_p2p.tee.messages import SessionOffer
from phala_p2p.tee.sealing import (
    SEAL_OVERHEAD,
    ClientSession,
    EnclaveSession,
    derive_session,
    offer_signing_bytes,
    open_sealed,
    seal,
)

JOB = b"J" * 16
OTHER_JOB = b"K" * 16
MEASUREMENT = b"\x07" * 32


def _pair() -> tuple[ClientSession, EnclaveSession]:
    client = ClientSession()
    enclave = EnclaveSession(client.public_key)
    client.accept_offer(enclave.public_key, enclave.session_id)
    return client, enclave


def test_both_sides_derive_the_same_keys() -> None:
    client, enclave = _pair()
    assert client.keys.session_id == enclave.session_id
    assert client.keys.to_enclave == enclave.keys.to_enclave
    assert client.keys.to_client == enclave.keys.to_client
    assert client.keys.to_enclave != client.keys.to_client
    other_client, other_enclave = _pair()
    assert other_client.session_id != client.session_id
    assert other_enclave.keys.to_enclave != enclave.keys.to_enclave


def test_sealed_payloads_round_trip_and_hide_the_plaintext() -> None:
    client, enclave = _pair()
    marker = b"PLAINTEXT-MARKER-1234"
    sealed = client.seal_input(JOB, marker)
    assert marker not in sealed
    assert len(sealed) == len(marker) + SEAL_OVERHEAD
    keys = enclave.keys
    assert open_sealed(keys.to_enclave, keys.session_id, JOB, b"input", sealed) == marker
    out = seal(keys.to_client, keys.session_id, JOB, b"output", marker[::-1])
    assert client.open_output(JOB, out) == marker[::-1]


def test_sealed_payloads_are_bound_to_their_context() -> None:
    client, enclave = _pair()
    keys = enclave.keys
    sealed = client.seal_module(JOB, b"\0asm module")
    with pytest.raises(ProtocolViolation, match="input does not authenticate"):
        open_sealed(keys.to_enclave, keys.session_id, JOB, b"input", sealed)
    with pytest.raises(ProtocolViolation):
        open_sealed(keys.to_enclave, keys.session_id, OTHER_JOB, b"module", sealed)
    with pytest.raises(ProtocolViolation):  # reflected back in the other direction
        open_sealed(keys.to_client, keys.session_id, JOB, b"module", sealed)
    _, other_enclave = _pair()
    ok = other_enclave.keys
    with pytest.raises(ProtocolViolation):
        open_sealed(ok.to_enclave, ok.session_id, JOB, b"module", sealed)
    tampered = bytearray(sealed)
    tampered[-1] ^= 1
    with pytest.raises(ProtocolViolation, match="does not authenticate"):
        open_sealed(keys.to_enclave, keys.session_id, JOB, b"module", bytes(tampered))
    with pytest.raises(ProtocolViolation, match="too short"):
        open_sealed(keys.to_enclave, keys.session_id, JOB, b"module", sealed[: SEAL_OVERHEAD - 1])
    assert open_sealed(keys.to_enclave, keys.session_id, JOB, b"module", sealed) == b"\0asm module"


def test_job_ids_cannot_be_replayed() -> None:
    _, enclave = _pair()
    enclave.claim_job(JOB)
    with pytest.raises(ProtocolViolation, match="already used"):
        enclave.claim_job(JOB)
    enclave.claim_job(OTHER_JOB)
    small = EnclaveSession(ClientSession().public_key, max_jobs=1)
    small.claim_job(JOB)
    with pytest.raises(ProtocolViolation, match="maximum"):
        small.claim_job(OTHER_JOB)


def test_low_order_peer_key_is_refused() -> None:
    with pytest.raises(ProtocolViolation, match="low-order"):
        EnclaveSession(bytes(32))
    client = ClientSession()
    with pytest.raises(ProtocolViolation, match="low-order"):
        client.accept_offer(b"\x01" + bytes(31))


def test_offer_signature_binds_client_key_and_measurement() -> None:
    identity = Identity.generate()
    client, enclave = _pair()
    sig = identity.sign(offer_signing_bytes(client.public_key, enclave.public_key, MEASUREMENT))
    offer = SessionOffer(enclave.session_id, enclave.public_key, sig)
    assert offer.verify(identity.public_key, client.public_key, MEASUREMENT)
    assert not offer.verify(identity.public_key, ClientSession().public_key, MEASUREMENT)
    assert not offer.verify(identity.public_key, client.public_key, b"\x08" * 32)
    assert not offer.verify(Identity.generate().public_key, client.public_key, MEASUREMENT)
    assert not offer.verify(identity.public_key, b"short", MEASUREMENT)


def test_mismatched_session_id_and_misuse() -> None:
    client = ClientSession()
    enclave = EnclaveSession(client.public_key)
    with pytest.raises(ProtocolViolation, match="session id"):
        client.accept_offer(enclave.public_key, b"\0" * 16)
    fresh = ClientSession()
    with pytest.raises(UsageError, match="not established"):
        fresh.seal_input(JOB, b"x")
    with pytest.raises(UsageError):
        derive_session(b"\x05" * 32, client.public_key, enclave.public_key)
    with pytest.raises(UsageError):
        seal(b"k" * 32, b"s" * 16, JOB, b"other", b"x")
    assert enclave.keys.to_enclave.hex() not in repr(enclave.keys)
    assert enclave.keys.to_client.hex() not in repr(enclave)
