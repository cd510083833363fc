"""Simulated quotes, report data, the attestation policy and usage receipts (no processes)."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from phala_p2p.crypto.identity import Identity
from phala_p2p.errors import AttestationError, ProtocolViolation, UsageError
from phala_p2p.tee.messages import AttestRequest, AttestResponse, SessionOffer, SessionOpen
from phala_p2p.tee.policy import AttestationPolicy, verify_attestation
from phala_p2p.tee.quote import (
    SIM_QUOTE_LEN,
    SimQuote,
    UsageReceipt,
    make_report_data,
    sign_receipt,
    sign_sim_quote,
    verify_receipt,
    verify_sim_quote,
)
from phala_p2p.wire.codec import decode, encode

ROOT = Identity.from_seed(b"\x01" * 32)
OTHER_ROOT = Identity.from_seed(b"\x02" * 32)
MEASUREMENT = bytes(range(32))
T0 = 1_700_000_000
IDENTITY_PUB = b"\x11" * 32
X25519_PUB = b"\x22" * 32
NONCE = b"verifier-nonce-0123456789"


def _policy(**kw: object) -> AttestationPolicy:
    return AttestationPolicy(allowed_measurements=frozenset({MEASUREMENT}), **kw)  # type: ignore[arg-type]


def _quote(
    *, root: Identity = ROOT, measurement: bytes = MEASUREMENT, ts: int = T0, nonce: bytes = NONCE
) -> bytes:
    return sign_sim_quote(
        root, measurement, make_report_data(IDENTITY_PUB, X25519_PUB, nonce=nonce), ts
    )


def test_good_sim_quote_verifies_and_passes_policy() -> None:
    raw = _quote()
    assert len(raw) == SIM_QUOTE_LEN
    quote = verify_sim_quote(raw, [ROOT.public_key], T0)
    assert quote.measurement == MEASUREMENT
    assert quote.timestamp == T0
    assert quote.root_pubkey == ROOT.public_key
    assert quote.tee == "SIM"
    expected = make_report_data(IDENTITY_PUB, X25519_PUB, nonce=NONCE)
    _policy().check(quote, T0 + 10, expected)


def test_wrong_root_is_refused() -> None:
    raw = _quote(root=OTHER_ROOT)
    with pytest.raises(AttestationError, match="unknown root"):
        verify_sim_quote(raw, [ROOT.public_key], T0)


def test_forged_root_field_is_refused() -> None:
    # Signed by another key but claiming the trusted root: the signature check catches it.
    raw = bytearray(_quote(root=OTHER_ROOT))
    raw[108:140] = ROOT.public_key
    with pytest.raises(AttestationError, match="signature is invalid"):
        verify_sim_quote(bytes(raw), [ROOT.public_key], T0)


@pytest.mark.parametrize("offset", [0, 4, 40, 100, 107, 139, 150, 203])
def test_any_flipped_byte_is_refused(offset: int) -> None:
    raw = bytearray(_quote())
    raw[offset] ^= 0x40
    with pytest.raises(AttestationError):
        verify_sim_quote(bytes(raw), [ROOT.public_key], T0)


@pytest.mark.parametrize("raw", [b"", b"PSQ1", bytes(SIM_QUOTE_LEN), b"x" * (SIM_QUOTE_LEN + 1)])
def test_malformed_sim_quotes(raw: bytes) -> None:
    with pytest.raises(AttestationError):
        verify_sim_quote(raw, [ROOT.public_key], T0)


@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_raise_attestation_error(raw: bytes) -> None:
    with pytest.raises(AttestationError):
        verify_sim_quote(raw, [ROOT.public_key], T0)


def test_wrong_measurement_is_refused_by_policy() -> None:
    quote = verify_sim_quote(_quote(measurement=b"\xee" * 32), [ROOT.public_key], T0)
    expected = make_report_data(IDENTITY_PUB, X25519_PUB, nonce=NONCE)
    with pytest.raises(AttestationError, match="unknown measurement ee"):
        _policy().check(quote, T0, expected)


def test_stale_and_future_quotes() -> None:
    quote = verify_sim_quote(_quote(), [ROOT.public_key], T0)
    expected = make_report_data(IDENTITY_PUB, X25519_PUB, nonce=NONCE)
    policy = _policy(max_quote_age_s=300, max_clock_skew_s=30)
    policy.check(quote, T0 + 300, expected)  # exactly at the limit
    with pytest.raises(AttestationError, match="stale: 301 s old"):
        policy.check(quote, T0 + 301, expected)
    policy.check(quote, T0 - 30, expected)
    with pytest.raises(AttestationError, match="future"):
        policy.check(quote, T0 - 31, expected)


def test_report_data_mismatch() -> None:
    quote = verify_sim_quote(_quote(nonce=b"another-nonce-000000"), [ROOT.public_key], T0)
    expected = make_report_data(IDENTITY_PUB, X25519_PUB, nonce=NONCE)
    with pytest.raises(AttestationError, match="report data does not match"):
        _policy().check(quote, T0, expected)


def test_simulated_platform_can_be_turned_off() -> None:
    quote = verify_sim_quote(_quote(), [ROOT.public_key], T0)
    expected = make_report_data(IDENTITY_PUB, X25519_PUB, nonce=NONCE)
    with pytest.raises(AttestationError, match="platform SIM"):
        _policy(platforms=frozenset({"SGX", "TDX"})).check(quote, T0, expected)


def test_report_data_binds_keys_order_and_nonce() -> None:
    base = make_report_data(IDENTITY_PUB, X25519_PUB, nonce=NONCE)
    assert len(base) == 64
    assert base == make_report_data(IDENTITY_PUB, X25519_PUB, nonce=NONCE)
    assert base != make_report_data(X25519_PUB, IDENTITY_PUB, nonce=NONCE)
    assert base != make_report_data(IDENTITY_PUB, X25519_PUB)
    assert base != make_report_data(IDENTITY_PUB, X25519_PUB, nonce=NONCE + b"!")
    # keys are length-delimited: moving a byte between keys changes the result
    assert make_report_data(b"ab", b"c") != make_report_data(b"a", b"bc")
    with pytest.raises(UsageError):
        make_report_data()
    with pytest.raises(UsageError):
        make_report_data(IDENTITY_PUB, nonce=b"x" * 65)
    with pytest.raises(UsageError):
        make_report_data(b"")


def test_policy_is_validated() -> None:
    with pytest.raises(UsageError):
        AttestationPolicy(allowed_measurements={MEASUREMENT})  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        AttestationPolicy(allowed_measurements=frozenset(), max_quote_age_s=-1)
    with pytest.raises(UsageError):
        AttestationPolicy(allowed_measurements=frozenset(), platforms=frozenset({"SEV"}))


def test_verify_attestation_end_to_end_for_sim() -> None:
    response = AttestResponse(
        platform="SIM",
        quote=_quote(),
        collateral="",
        identity_pub=IDENTITY_PUB,
        x25519_pub=X25519_PUB,
    )
    wire = encode(response)
    received = decode(wire, max_size=1 << 16, expect=AttestResponse)
    report = verify_attestation(
        received, nonce=NONCE, policy=_policy(), sim_roots=[ROOT.public_key], now=T0
    )
    assert isinstance(report, SimQuote)
    swapped = dataclasses.replace(response, x25519_pub=b"\x33" * 32)
    with pytest.raises(AttestationError, match="report data"):
        verify_attestation(
            swapped, nonce=NONCE, policy=_policy(), sim_roots=[ROOT.public_key], now=T0
        )
    with pytest.raises(AttestationError, match="unknown root"):
        verify_attestation(response, nonce=NONCE, policy=_policy(), sim_roots=[], now=T0)


def _receipt(signer: Identity) -> UsageReceipt:
    return UsageReceipt(
        session_id=b"s" * 16,
        job_id=b"j" * 16,
        measurement=MEASUREMENT,
        module_hash=b"m" * 32,
        fuel_limit=1000,
        fuel_used=400,
        bytes_in=10,
        bytes_out=20,
        output_hash=b"o" * 32,
        enclave=signer.public_key,
    )


def test_receipts_sign_verify_and_round_trip() -> None:
    enclave = Identity.generate()
    receipt = sign_receipt(enclave, _receipt(enclave))
    verify_receipt(receipt, enclave.public_key)
    again = decode(encode(receipt), max_size=4096, expect=UsageReceipt)
    assert again == receipt
    verify_receipt(again, enclave.public_key)
    for change in ({"fuel_used": 401}, {"bytes_out": 0}, {"output_hash": b"p" * 32}):
        with pytest.raises(AttestationError, match="signature is invalid"):
            verify_receipt(dataclasses.replace(receipt, **change), enclave.public_key)
    with pytest.raises(AttestationError, match="another enclave"):
        verify_receipt(receipt, Identity.generate().public_key)
    with pytest.raises(UsageError):
        sign_receipt(Identity.generate(), _receipt(enclave))


def test_receipt_fields_are_validated() -> None:
    enclave = Identity.generate()
    with pytest.raises(UsageError, match="exceeds fuel_limit"):
        dataclasses.replace(_receipt(enclave), fuel_used=1001)
    with pytest.raises(UsageError):
        dataclasses.replace(_receipt(enclave), job_id=b"short")
    fields = [
        b"s" * 16,
        b"j" * 16,
        MEASUREMENT,
        b"m" * 32,
        1000,
        2000,
        10,
        20,
        b"o" * 32,
        enclave.public_key,
        b"",
    ]
    wire = msgpack.packb([1, 302, fields], use_bin_type=True)
    with pytest.raises(ProtocolViolation, match="fuel_limit"):
        decode(wire, max_size=4096, expect=UsageReceipt)
    fields[5] = 400
    ok = decode(msgpack.packb([1, 302, fields], use_bin_type=True), max_size=4096)
    assert ok == _receipt(enclave)


@given(st.binary(max_size=200))
def test_tee_messages_decode_only_raises_protocol_violation(data: bytes) -> None:
    for cls in (AttestRequest, AttestResponse, SessionOpen, SessionOffer, UsageReceipt):
        try:
            msg = decode(data, max_size=4096, expect=cls)
        except ProtocolViolation:
            continue
        assert decode(encode(msg), max_size=4096, expect=cls) == msg


def test_tee_messages_round_trip_and_check_lengths() -> None:
    msgs = [
        AttestRequest(nonce=b"n" * 32),
        SessionOpen(client_pub=b"c" * 32),
        SessionOffer(session_id=b"s" * 16, enclave_pub=b"e" * 32, signature=b"g" * 64),
    ]
    for msg in msgs:
        assert decode(encode(msg), max_size=4096, expect=type(msg)) == msg
    with pytest.raises(UsageError):
        AttestRequest(nonce=b"short")
    with pytest.raises(UsageError):
        SessionOpen(client_pub=b"c" * 31)
    with pytest.raises(UsageError, match="platform"):
        AttestResponse(
            platform="SEV",
            quote=b"",
            collateral="",
            identity_pub=IDENTITY_PUB,
            x25519_pub=X25519_PUB,
        )
