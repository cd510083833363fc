"""Ed25519 identities: determinism, signatures, and a verify that never raises."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phala_p2p.crypto.identity import Identity, verify_signature
from phala_p2p.errors import UsageError

SEED = bytes(range(32))


def test_from_seed_is_deterministic() -> None:
    a = Identity.from_seed(SEED)
    b = Identity.from_seed(bytearray(SEED))  # type: ignore[arg-type]
    assert a.public_key == b.public_key
    assert a == b
    assert hash(a) == hash(b)
    assert a.seed == SEED
    assert len(a.public_key) == 32
    # RFC 8032 signatures are deterministic
    assert a.sign(b"msg") == b.sign(b"msg")
    assert len(a.sign(b"msg")) == 64


def test_rfc8032_test_vector_1() -> None:
    # RFC 8032, section 7.1, TEST 1 (empty message)
    seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    identity = Identity.from_seed(seed)
    assert identity.public_key.hex() == (
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    )
    assert identity.sign(b"").hex() == (
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    )


def test_generate_gives_distinct_identities() -> None:
    assert Identity.generate().public_key != Identity.generate().public_key


def test_repr_never_shows_the_seed() -> None:
    identity = Identity.from_seed(SEED)
    text = repr(identity) + str(identity)
    assert SEED.hex() not in text
    assert SEED.hex()[:16] not in text
    assert identity.public_key.hex() in text


@pytest.mark.parametrize("seed", [b"", bytes(31), bytes(33), "0" * 32, None, 5])
def test_bad_seed_is_a_usage_error(seed: Any) -> None:
    with pytest.raises(UsageError):
        Identity.from_seed(seed)


def test_sign_needs_bytes() -> None:
    with pytest.raises(UsageError):
        Identity.from_seed(SEED).sign("text")  # type: ignore[arg-type]


def test_verify() -> None:
    identity = Identity.from_seed(SEED)
    sig = identity.sign(b"message")
    assert verify_signature(identity.public_key, b"message", sig)
    assert not verify_signature(identity.public_key, b"messagE", sig)
    assert not verify_signature(Identity.from_seed(bytes(32)).public_key, b"message", sig)
    flipped = bytes([sig[0] ^ 1]) + sig[1:]
    assert not verify_signature(identity.public_key, b"message", flipped)


@pytest.mark.parametrize(
    ("key", "msg", "sig"),
    [
        (b"", b"m", bytes(64)),
        (bytes(31), b"m", bytes(64)),
        (bytes(32), b"m", bytes(63)),
        (bytes(32), b"m", bytes(64)),  # small-order key, all-zero signature
        ("k" * 32, b"m", bytes(64)),
        (bytes(32), "m", bytes(64)),
        (None, None, None),
        (b"\xff" * 32, b"m", b"\xff" * 64),  # not a curve point, non-canonical S
    ],
)
def test_verify_never_raises(key: Any, msg: Any, sig: Any) -> None:
    assert verify_signature(key, msg, sig) is False


@settings(max_examples=200)
@given(st.binary(max_size=40), st.binary(max_size=10), st.binary(max_size=70))
def test_verify_of_arbitrary_input_is_false(key: bytes, msg: bytes, sig: bytes) -> None:
    assert verify_signature(key, msg, sig) is False
