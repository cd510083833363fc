"""Signed envelopes: sealing, opening, forgery, domains, replay and freshness."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phala_p2p.crypto.identity import Identity
from phala_p2p.errors import ProtocolViolation, UsageError
from phala_p2p.wire.envelope import (
    ENVELOPE_VERSION,
    SIGNING_CONTEXT,
    Envelope,
    RejectReason,
    ReplayGuard,
    SeqnoCounter,
    open_envelope,
    peek_envelope,
    seal,
    signing_bytes,
)

ALICE = Identity.from_seed(bytes(range(32)))
BOB = Identity.from_seed(bytes(range(1, 33)))
TOPIC = "phala/txs/1"
NOW = 1_700_000_000_000


def sealed(identity: Identity = ALICE, **kw: Any) -> bytes:
    args: dict[str, Any] = {
        "domain": TOPIC,
        "kind": 3,
        "body": b"body",
        "seqno": 10,
        "time_ms": NOW,
    }
    args.update(kw)
    return seal(identity, **args)


def envelope(signer: bytes = ALICE.public_key, seqno: int = 10, time_ms: int = NOW) -> Envelope:
    return Envelope(1, 3, b"", signer, seqno, time_ms, bytes(64))


def reason_of(data: bytes, domain: str = TOPIC, **kw: Any) -> str:
    with pytest.raises(ProtocolViolation) as info:
        open_envelope(data, domain=domain, **kw)
    return info.value.reason


def test_seal_then_open() -> None:
    data = sealed()
    env = open_envelope(data, domain=TOPIC)
    assert (env.version, env.kind, env.body) == (ENVELOPE_VERSION, 3, b"body")
    assert (env.signer, env.seqno, env.time_ms) == (ALICE.public_key, 10, NOW)
    signed = signing_bytes(TOPIC, 1, 3, b"body", ALICE.public_key, 10, NOW)
    assert signed.startswith(SIGNING_CONTEXT + b"\x00" + TOPIC.encode() + b"\x00")
    assert env.signature == ALICE.sign(signed)
    assert msgpack.unpackb(data) == [1, 3, b"body", ALICE.public_key, 10, NOW, env.signature]


def test_forged_signature_is_rejected() -> None:
    fields = msgpack.unpackb(sealed())
    fields[6] = bytes([fields[6][0] ^ 0x80]) + fields[6][1:]
    assert reason_of(msgpack.packb(fields)) == "bad_signature"


def test_peek_checks_structure_but_not_the_signature() -> None:
    assert peek_envelope(sealed()) == open_envelope(sealed(), domain=TOPIC)
    fields = msgpack.unpackb(sealed())
    fields[6] = bytes(64)  # forged: peek reads it, open refuses it
    forged = msgpack.packb(fields)
    assert peek_envelope(forged).body == b"body"
    assert reason_of(forged) == "bad_signature"
    for bad, reason in [
        (msgpack.packb(fields[:6]), "malformed"),
        (msgpack.packb([2, *fields[1:]]), "bad_version"),
        (sealed(body=b"x" * 100), "too_large"),
    ]:
        with pytest.raises(ProtocolViolation) as info:
            peek_envelope(bad, max_size=120)
        assert info.value.reason == reason


@pytest.mark.parametrize(
    ("index", "value"),
    [(1, 4), (2, b"bodY"), (3, BOB.public_key), (4, 11), (5, NOW + 1)],
)
def test_every_signed_field_is_covered(index: int, value: Any) -> None:
    fields = msgpack.unpackb(sealed())
    fields[index] = value
    assert reason_of(msgpack.packb(fields)) == "bad_signature"


def test_signature_by_another_key_is_rejected() -> None:
    fields = msgpack.unpackb(sealed(BOB))
    fields[3] = ALICE.public_key  # Bob's signature claimed as Alice's
    assert reason_of(msgpack.packb(fields)) == "bad_signature"


def test_wrong_domain_is_a_bad_signature() -> None:
    data = sealed(domain="phala/txs/1")
    assert open_envelope(data, domain="phala/txs/1").body == b"body"
    assert reason_of(data, domain="phala/blocks/1") == "bad_signature"
    assert reason_of(data, domain="phala/txs/1 ") == "bad_signature"


def test_structure_checks() -> None:
    good = msgpack.unpackb(sealed())

    def variant(index: int, value: Any) -> bytes:
        copy = list(good)
        copy[index] = value
        packed: bytes = msgpack.packb(copy, use_bin_type=True)
        return packed

    assert reason_of(variant(0, 2)) == "bad_version"
    assert reason_of(msgpack.packb([2, "anything"])) == "bad_version"
    assert reason_of(variant(0, True)) == "bad_version"
    assert reason_of(variant(1, -1)) == "malformed"
    assert reason_of(variant(1, 65536)) == "malformed"
    assert reason_of(variant(2, "body")) == "malformed"
    assert reason_of(variant(3, ALICE.public_key + b"\x00")) == "malformed"
    assert reason_of(variant(4, -1)) == "malformed"
    assert reason_of(variant(5, 1.5)) == "malformed"
    assert reason_of(variant(6, bytes(63))) == "malformed"
    assert reason_of(msgpack.packb(good[:6])) == "malformed"
    assert reason_of(msgpack.packb([*good, 0])) == "malformed"
    assert reason_of(msgpack.packb({"a": 1})) == "malformed"
    assert reason_of(b"") == "malformed"
    assert reason_of(sealed() + b"\x00") == "malformed"


def test_size_limit_is_checked_first() -> None:
    data = sealed(body=bytes(1000))
    assert reason_of(data, max_size=len(data) - 1) == "too_large"
    assert open_envelope(data, domain=TOPIC, max_size=len(data)).body == bytes(1000)


def test_non_canonical_encoding_is_refused() -> None:
    data = sealed(seqno=1)
    fields = msgpack.unpackb(data)
    long_form = (
        b"\x97"
        + b"".join(msgpack.packb(v) for v in fields[:4])
        + b"\xcf"
        + (1).to_bytes(8, "big")
        + b"".join(msgpack.packb(v) for v in fields[5:])
    )
    assert msgpack.unpackb(long_form) == fields
    assert reason_of(long_form) == "malformed"


def test_caller_mistakes_are_usage_errors() -> None:
    for bad in ("", "a\x00b", "x" * 257, 5):
        with pytest.raises(UsageError):
            sealed(domain=bad)
        with pytest.raises(UsageError):
            open_envelope(sealed(), domain=bad)  # type: ignore[arg-type]
    for kw in (
        {"kind": 65536},
        {"kind": -1},
        {"seqno": -1},
        {"seqno": 1 << 64},
        {"time_ms": -1},
        {"body": "text"},
        {"kind": True},
    ):
        with pytest.raises(UsageError):
            sealed(**kw)
    with pytest.raises(UsageError):
        open_envelope("text", domain=TOPIC)  # type: ignore[arg-type]


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_protocol_violation(data: bytes) -> None:
    try:
        open_envelope(data, domain=TOPIC)
    except ProtocolViolation:
        pass


@settings(max_examples=150)
@given(
    st.binary(max_size=40),
    st.lists(st.tuples(st.integers(0, 500), st.integers(0, 255)), min_size=1, max_size=3),
)
def test_mutated_envelopes_are_refused_unless_unchanged(
    body: bytes, edits: list[tuple[int, int]]
) -> None:
    original = sealed(body=body)
    data = bytearray(original)
    for pos, value in edits:
        data[pos % len(data)] = value
    try:
        env = open_envelope(bytes(data), domain=TOPIC)
    except ProtocolViolation:
        return
    assert bytes(data) == original  # Ed25519 is not malleable, and the encoding is canonical
    assert env.body == body


# -- replay guard --------------------------------------------------------------------------


def test_fresh_then_replayed() -> None:
    guard = ReplayGuard()
    env = envelope(seqno=5)
    assert guard.check(env, NOW) is None
    assert guard.check(env, NOW) is RejectReason.REPLAYED
    assert guard.check(envelope(signer=BOB.public_key, seqno=5), NOW) is None  # per signer


def test_far_future_and_too_old() -> None:
    guard = ReplayGuard(max_future_skew_ms=1000, max_age_ms=5000)
    assert guard.check(envelope(seqno=1, time_ms=NOW + 1001), NOW) is RejectReason.FAR_FUTURE
    assert guard.check(envelope(seqno=2, time_ms=NOW - 5001), NOW) is RejectReason.TOO_OLD
    assert guard.check(envelope(seqno=3, time_ms=NOW + 1000), NOW) is None
    assert guard.check(envelope(seqno=4, time_ms=NOW - 5000), NOW) is None
    # refused envelopes leave no trace: the same seqnos are still fresh later
    assert guard.check(envelope(seqno=1, time_ms=NOW), NOW) is None
    assert guard.check(envelope(seqno=2, time_ms=NOW), NOW) is None


def test_out_of_order_within_the_window() -> None:
    guard = ReplayGuard(window=8)
    for seqno in (100, 97, 99, 93):
        assert guard.check(envelope(seqno=seqno), NOW) is None, seqno
    for seqno in (100, 97, 99, 93):
        assert guard.check(envelope(seqno=seqno), NOW) is RejectReason.REPLAYED, seqno
    assert guard.check(envelope(seqno=92), NOW) is RejectReason.REPLAYED  # below the window
    assert guard.check(envelope(seqno=98), NOW) is None  # inside, never seen


def test_window_slides() -> None:
    guard = ReplayGuard(window=4)
    assert guard.check(envelope(seqno=10), NOW) is None
    assert guard.check(envelope(seqno=9), NOW) is None
    assert guard.check(envelope(seqno=12), NOW) is None  # window now 9..12
    assert guard.check(envelope(seqno=8), NOW) is RejectReason.REPLAYED
    assert guard.check(envelope(seqno=9), NOW) is RejectReason.REPLAYED
    assert guard.check(envelope(seqno=11), NOW) is None
    assert guard.check(envelope(seqno=1000), NOW) is None  # a jump clears the window
    assert guard.check(envelope(seqno=997), NOW) is None
    assert guard.check(envelope(seqno=996), NOW) is RejectReason.REPLAYED
    assert guard.check(envelope(seqno=12), NOW) is RejectReason.REPLAYED


@settings(max_examples=100)
@given(st.lists(st.integers(0, 60), max_size=80), st.integers(1, 16))
def test_guard_matches_a_reference_model(seqnos: list[int], window: int) -> None:
    """Accept exactly the seqnos not seen before and not below highest - window + 1."""
    guard = ReplayGuard(window=window)
    seen: set[int] = set()
    for seqno in seqnos:
        top = max(seen, default=-1)
        expected_fresh = seqno not in seen and seqno > top - window
        result = guard.check(envelope(seqno=seqno), NOW)
        assert (result is None) == expected_fresh, (seqno, sorted(seen))
        if expected_fresh:
            seen.add(seqno)


def test_signers_are_bounded_least_recently_seen_first() -> None:
    guard = ReplayGuard(max_signers=3)
    keys = [bytes([i]) * 32 for i in range(5)]
    for key in keys[:3]:
        assert guard.check(envelope(signer=key, seqno=1), NOW) is None
    assert guard.check(envelope(signer=keys[0], seqno=2), NOW) is None  # keys[0] is recent
    assert guard.check(envelope(signer=keys[3], seqno=1), NOW) is None  # evicts keys[1]
    assert len(guard) == 3
    assert guard.evicted == 1
    assert guard.check(envelope(signer=keys[0], seqno=2), NOW) is RejectReason.REPLAYED
    assert guard.check(envelope(signer=keys[2], seqno=1), NOW) is RejectReason.REPLAYED
    # keys[1] was forgotten: its old seqno is fresh again (the time window still bounds it)
    assert guard.check(envelope(signer=keys[1], seqno=1), NOW) is None
    for i in range(100):
        guard.check(envelope(signer=i.to_bytes(32, "big"), seqno=1), NOW)
    assert len(guard) == 3


def test_guard_arguments() -> None:
    for kw in ({"window": 0}, {"max_signers": 0}, {"max_age_ms": -1}, {"window": 1.5}):
        with pytest.raises(UsageError):
            ReplayGuard(**kw)


def test_reject_reason_values() -> None:
    assert {r.value for r in RejectReason} == {
        "malformed",
        "too_large",
        "bad_version",
        "bad_signature",
        "replayed",
        "far_future",
        "too_old",
        "unknown_kind",
        "invalid",
        "rate_limited",
    }
    assert str(RejectReason.TOO_OLD) == "too_old"


def test_seqno_counter_increases_across_restarts() -> None:
    first = SeqnoCounter(now_ns=1_000_000_000)
    used = [first.next() for _ in range(1000)]
    assert used == sorted(set(used))
    restarted = SeqnoCounter(now_ns=1_000_000_000 + 1_000_000)  # one millisecond later
    assert restarted.next() > used[-1]
    with pytest.raises(UsageError):
        SeqnoCounter(-1)


def test_envelope_is_frozen() -> None:
    env = envelope()
    with pytest.raises(AttributeError):
        env.seqno = 3  # type: ignore[misc]
    assert replace(env, seqno=3).seqno == 3
