"""Capacity adverts: the codec, the validity rules, the enclave's signature, check_advert."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from phala_p2p.crypto.identity import Identity
from phala_p2p.errors import ProtocolViolation
from phala_p2p.market.advert import (
    CLOCK_SKEW_MS,
    MAX_ADVERT_BYTES,
    MAX_TTL_MS,
    PUNISHABLE,
    AdvertReason,
    CapacityAdvert,
    SignedAdvert,
    advert_payload,
    check_advert,
    check_registration,
    max_payment,
)
from phala_p2p.tee.statements import statement_bytes
from phala_p2p.wire.codec import decode, encode, kind_of

from .helpers import NOW, FakeChain, Miner, advert_of, sign_advert

MINER = Miner.make(1)


def test_kinds() -> None:
    assert (kind_of(CapacityAdvert), kind_of(SignedAdvert)) == (400, 401)


def test_advert_round_trips() -> None:
    advert = advert_of(MINER, tags=("wasm", "gpu"), addrs=("/ip4/10.0.0.1/tcp/1", "/dns/m/tcp/2"))
    data = advert_payload(advert)
    assert data == encode(advert)
    assert decode(data, max_size=MAX_ADVERT_BYTES, expect=CapacityAdvert) == advert
    signed = sign_advert(advert, MINER.enclave)
    wire = encode(signed)
    again = decode(wire, expect=SignedAdvert)
    assert again == signed
    assert again.decode() == advert
    assert again.open() == advert


def test_signature_is_the_enclaves_under_the_advert_domain() -> None:
    advert = advert_of(MINER)
    payload = advert_payload(advert)
    good = SignedAdvert(payload, MINER.enclave.sign(statement_bytes("advert", payload)))
    assert good.verify(advert)
    other = Identity.from_seed(b"\x77" * 32)
    forged = [
        SignedAdvert(payload, other.sign(statement_bytes("advert", payload))),  # another key
        SignedAdvert(payload, MINER.enclave.sign(statement_bytes("counter", payload))),
        SignedAdvert(payload, MINER.enclave.sign(payload)),  # no domain at all
        SignedAdvert(payload, bytes([good.signature[0] ^ 1]) + good.signature[1:]),
        SignedAdvert(payload, b""),
    ]
    for signed in forged:
        assert not signed.verify(advert)
        with pytest.raises(ProtocolViolation) as info:
            signed.open()
        assert info.value.reason == "bad_signature"


def test_bytes_changed_after_signing_fail() -> None:
    signed = sign_advert(advert_of(MINER, price=1_000), MINER.enclave)
    cheaper = encode(advert_of(MINER, price=1))
    with pytest.raises(ProtocolViolation) as info:
        SignedAdvert(cheaper, signed.signature).open()
    assert info.value.reason == "bad_signature"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"free_slots": 5, "slots": 4}, "over_limit"),
        ({"expires_ms": NOW + MAX_TTL_MS + 1}, "over_limit"),
        ({"operator": b"\x01" * 31}, "over_limit"),
        ({"enclave": b""}, "over_limit"),
        ({"expires_ms": NOW}, "malformed"),
        ({"expires_ms": NOW - 1}, "malformed"),
        ({"tags": ("wasm", "wasm")}, "malformed"),
        ({"tags": ("",)}, "malformed"),
    ],
)
def test_invalid_adverts_do_not_decode(changes: dict[str, object], reason: str) -> None:
    data = encode(advert_of(MINER, **changes))
    with pytest.raises(ProtocolViolation) as info:
        decode(data, max_size=MAX_ADVERT_BYTES, expect=CapacityAdvert)
    assert info.value.reason == reason


def raw_advert(**values: object) -> bytes:
    """A good advert's wire bytes with some field values replaced as written (so values
    that ``encode`` would refuse can be sent)."""
    version, kind, fields = msgpack.unpackb(encode(advert_of(MINER)))
    names = [f.name for f in dataclasses.fields(CapacityAdvert)]
    for name, value in values.items():
        fields[names.index(name)] = value
    packed: bytes = msgpack.packb([version, kind, fields], use_bin_type=True)
    return packed


@pytest.mark.parametrize(
    "values",
    [
        {"cores": 0},
        {"cores": 4097},
        {"slots": 1025, "free_slots": 0},
        {"price": -1},
        {"tags": [f"t{i}" for i in range(17)]},
        {"addrs": ["/ip4/1.2.3.4/tcp/1"] * 5},
        {"operator": b"\x01" * 33},
        {"peer_id": b"not a str"},
        {"seq": True},
    ],
)
def test_out_of_bounds_fields_do_not_decode(values: dict[str, object]) -> None:
    with pytest.raises(ProtocolViolation) as info:
        decode(raw_advert(**values), max_size=MAX_ADVERT_BYTES, expect=CapacityAdvert)
    assert info.value.reason == "bad_field"


def test_raw_advert_builds_good_bytes_when_unchanged() -> None:
    assert decode(raw_advert(), expect=CapacityAdvert) == advert_of(MINER)


def test_limits_are_inclusive() -> None:
    for advert in (
        advert_of(MINER, expires_ms=NOW + MAX_TTL_MS),
        advert_of(MINER, free_slots=4, slots=4),
        advert_of(MINER, free_slots=0),
        advert_of(MINER, tags=()),
    ):
        assert decode(advert_payload(advert), expect=CapacityAdvert) == advert


def test_an_advert_over_2048_bytes_is_too_large() -> None:
    # Strings are bounded in characters: 4 addresses of 128 four-byte characters pass the
    # field bounds but not the byte bound.
    big = advert_of(MINER, addrs=("\U0001f600" * 128,) * 4)
    with pytest.raises(ProtocolViolation) as info:
        advert_payload(big)
    assert info.value.reason == "too_large"
    with pytest.raises(ProtocolViolation) as info:
        decode(encode(big), max_size=MAX_ADVERT_BYTES, expect=CapacityAdvert)
    assert info.value.reason == "too_large"
    with pytest.raises(ProtocolViolation) as info:
        SignedAdvert(encode(big), bytes(64)).open()
    assert info.value.reason == "too_large"


def test_max_payment_rounds_up() -> None:
    assert max_payment(1_000_000, 5) == 5
    assert max_payment(1_500_000, 1) == 2
    assert max_payment(1, 1) == 1
    assert max_payment(999_999, 1) == 1
    assert max_payment(2_000_000, 1) == 2
    assert max_payment(10**9, 0) == 0


def test_punishable_reasons_are_the_provable_ones() -> None:
    assert {r.value for r in PUNISHABLE} == {
        "malformed",
        "too_large",
        "over_limit",
        "bad_signature",
        "wrong_chain",
        "wrong_sender",
        "future",
        "unregistered",
    }
    timing = set(AdvertReason) - PUNISHABLE
    assert AdvertReason.CHAIN_BEHIND in timing
    assert AdvertReason.EXPIRED in timing
    assert AdvertReason.REVOKED in timing


# -- check_advert / check_registration ------------------------------------------------------


def registered() -> FakeChain:
    chain = FakeChain()
    chain.register(MINER)
    return chain


def test_check_advert_believes_a_current_advert() -> None:
    assert check_advert(advert_of(MINER), registered(), NOW) is None


def test_check_advert_time_bounds() -> None:
    chain = registered()
    advert = advert_of(MINER)
    assert check_advert(advert, chain, advert.expires_ms - 1) is None
    assert check_advert(advert, chain, advert.expires_ms) is AdvertReason.EXPIRED
    early = NOW - CLOCK_SKEW_MS
    assert check_advert(advert, chain, early) is None
    assert check_advert(advert, chain, early - 1) is AdvertReason.FUTURE
    assert check_advert(advert_of(MINER, chain_id="other"), chain, NOW) is AdvertReason.WRONG_CHAIN


def test_check_registration_cases() -> None:
    op, enclave = MINER.operator, MINER.enclave.public_key
    other = Identity.from_seed(b"\x42" * 32).public_key
    chain = FakeChain(height=100)
    assert check_registration(op, enclave, 50, chain) is AdvertReason.UNREGISTERED
    assert check_registration(op, enclave, 101, chain) is AdvertReason.CHAIN_BEHIND
    chain.register(MINER, height=50)
    assert check_registration(op, enclave, 50, chain) is None
    assert check_registration(op, enclave, 40, chain) is AdvertReason.NOT_CURRENT
    assert check_registration(op, enclave, 101, chain) is AdvertReason.CHAIN_BEHIND
    assert check_registration(op, other, 50, chain) is AdvertReason.UNREGISTERED
    assert check_registration(op, other, 40, chain) is AdvertReason.NOT_CURRENT
    assert check_registration(op, other, 101, chain) is AdvertReason.CHAIN_BEHIND
    chain.register(MINER, height=50, active=False)
    assert check_registration(op, enclave, 50, chain) is AdvertReason.REVOKED
    chain.register(MINER, height=50)
    chain.revocations[enclave] = "gossiped revocation"
    assert check_registration(op, enclave, 50, chain) is AdvertReason.REVOKED
    del chain.revocations[enclave]
    chain.register(MINER, height=50, stake=chain.min_stake - 1)
    assert check_registration(op, enclave, 50, chain) is AdvertReason.UNDER_STAKED
    chain.register(MINER, height=50, stake=chain.min_stake)
    assert check_registration(op, enclave, 50, chain) is None


# -- fuzz ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [SignedAdvert, CapacityAdvert])
@given(data=st.binary(max_size=3000))
def test_arbitrary_bytes_raise_only_protocol_violation(cls: type, data: bytes) -> None:
    try:
        decode(data, max_size=MAX_ADVERT_BYTES + 300, expect=cls)
    except ProtocolViolation:
        pass


GOOD = encode(sign_advert(advert_of(MINER), MINER.enclave))


@given(at=st.integers(0, len(GOOD) - 1), value=st.integers(0, 255), cut=st.booleans())
def test_mutated_signed_adverts_raise_only_protocol_violation(
    at: int, value: int, cut: bool
) -> None:
    data = GOOD[:at] if cut else GOOD[:at] + bytes([value]) + GOOD[at + 1 :]
    try:
        signed = decode(data, expect=SignedAdvert)
        signed.open()
    except ProtocolViolation:
        return
    assert data == GOOD  # only the original bytes decode and verify
