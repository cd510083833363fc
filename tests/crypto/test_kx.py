"""X25519 ephemeral exchange and session key derivation."""

from __future__ import annotations

import pytest

from phala_p2p.crypto.kx import EphemeralKey, derive_session_keys, transcript_hash
from phala_p2p.errors import ProtocolViolation, UsageError


def test_both_sides_derive_the_same_keys() -> None:
    client, server = EphemeralKey.generate(), EphemeralKey.generate()
    shared_c = client.exchange(server.public_key)
    shared_s = server.exchange(client.public_key)
    assert shared_c == shared_s
    th = transcript_hash(b"phala/job/1", client.public_key, server.public_key)
    c2s, s2c = derive_session_keys(shared_c, th)
    assert (c2s, s2c) == derive_session_keys(shared_s, th)
    assert c2s != s2c
    assert len(c2s) == len(s2c) == 32


def test_rfc7748_x25519_vector() -> None:
    # RFC 7748, section 6.1
    alice = EphemeralKey.from_private_bytes(
        bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    )
    bob_public = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    assert alice.public_key.hex() == (
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    )
    assert alice.exchange(bob_public).hex() == (
        "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    )


def test_keys_depend_on_secret_and_transcript() -> None:
    th = transcript_hash(b"a")
    base = derive_session_keys(bytes(32), th)
    assert derive_session_keys(b"\x01" + bytes(31), th) != base
    assert derive_session_keys(bytes(32), transcript_hash(b"b")) != base
    assert derive_session_keys(bytes(32), th) == base


def test_transcript_parts_are_unambiguous() -> None:
    assert transcript_hash(b"ab", b"c") != transcript_hash(b"a", b"bc")
    assert transcript_hash(b"") != transcript_hash()
    assert len(transcript_hash(b"x")) == 32


@pytest.mark.parametrize(
    "peer",
    [
        bytes(32),  # the zero point: low order
        (1).to_bytes(32, "little"),  # low order
        bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    ],
)
def test_low_order_peer_keys_are_refused(peer: bytes) -> None:
    with pytest.raises(ProtocolViolation) as info:
        EphemeralKey.generate().exchange(peer)
    assert info.value.reason == "bad_key"


def test_bad_inputs() -> None:
    with pytest.raises(ProtocolViolation):
        EphemeralKey.generate().exchange(bytes(31))
    with pytest.raises(ProtocolViolation):
        EphemeralKey.generate().exchange("k" * 32)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        derive_session_keys(bytes(31), transcript_hash())
    with pytest.raises(UsageError):
        derive_session_keys(bytes(32), b"short")
    with pytest.raises(UsageError):
        EphemeralKey.from_private_bytes(bytes(31))
    assert "public_key" in repr(EphemeralKey.generate())
