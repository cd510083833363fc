"""Key management crypto (sans-IO): the master ratchet, epoch keys, boxes and peer checks."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import nacl.bindings
import pytest
from hypothesis import given
from hypothesis import strategies as st

from phala_p2p.crypto.identity import Identity
from phala_p2p.errors import AttestationError, ProtocolViolation, UsageError
from phala_p2p.tee import executor
from phala_p2p.tee.keys import (
    BOX_HEADER_LEN,
    BOX_OVERHEAD,
    MAX_RATCHET_STEPS,
    MAX_SECRET_LEN,
    MAX_SECRETS,
    ClusterKey,
    EpochKeyRing,
    MasterKey,
    Purpose,
    epoch_public,
    epoch_secret,
    next_state,
    open_box,
    open_secret,
    parse_box_header,
    seal_box,
    seal_secret,
    secret_context,
    verify_peer_enclave,
)
from phala_p2p.tee.quote import make_report_data, sign_sim_quote

SPEC = Path(__file__).resolve().parents[2] / "protocols" / "attest.md"
S0 = b"\x01" * 32
MODULE_HASH = b"m" * 32


def _keypair(seed: int) -> tuple[bytes, bytes]:
    secret = bytes([seed]) * 32
    return secret, bytes(nacl.bindings.crypto_scalarmult_base(secret))


@pytest.fixture(scope="module")
def vectors() -> dict[str, bytes]:
    block = re.search(r"```vectors\n(.*?)```", SPEC.read_text(), re.S)
    assert block is not None
    out = {}
    for line in block.group(1).strip().splitlines():
        name, _, value = line.partition(" = ")
        out[name.strip()] = bytes.fromhex(value.strip())
    return out


# -- vectors ---------------------------------------------------------------------------------


def test_ratchet_and_box_vectors(vectors: dict[str, bytes]) -> None:
    s1 = next_state(S0, 0)
    assert s1 == vectors["km_state_1"]
    assert (
        s1
        == hashlib.blake2b(
            (1).to_bytes(8, "big"), digest_size=32, key=S0, person=b"phala/km/next1"
        ).digest()
    )
    e1 = epoch_secret(s1, 1)
    assert e1 == vectors["km_epoch_secret_1"]
    p1 = epoch_public(e1)
    assert p1 == vectors["km_cluster_pub_1"]
    box = seal_box(
        p1,
        Purpose.SECRET,
        1,
        b"api-key-vector",
        context=secret_context(MODULE_HASH, 0),
        eph_secret=b"\x02" * 32,
        nonce=b"\x03" * 24,
    )
    assert box == vectors["km_secret_box"]
    # the same box built from the primitives, as protocols/attest.md describes it
    eph_pub = bytes(nacl.bindings.crypto_scalarmult_base(b"\x02" * 32))
    bound = b"\x01\x03" + (1).to_bytes(8, "big") + p1 + eph_pub
    shared = nacl.bindings.crypto_scalarmult(b"\x02" * 32, p1)
    k = hashlib.blake2b(bound, digest_size=32, key=shared, person=b"phala/km/kdf1").digest()
    context = MODULE_HASH + b"\x00"
    aad = b"phala/km/box1" + bound + bytes([len(context)]) + context
    ct = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        b"api-key-vector", aad, b"\x03" * 24, k
    )
    assert box == bound + b"\x03" * 24 + ct
    ring = EpochKeyRing()
    ring.add(1, e1)
    assert open_secret(ring, box, MODULE_HASH, 0) == b"api-key-vector"


def test_caps_agree_with_the_executor() -> None:
    assert MAX_SECRETS == executor.MAX_JOB_SECRETS
    assert MAX_SECRET_LEN == executor.MAX_JOB_SECRET_LEN
    assert BOX_HEADER_LEN == 98
    assert BOX_OVERHEAD == 114


# -- the master ratchet ----------------------------------------------------------------------


def test_holders_of_the_master_derive_the_same_epoch_keys() -> None:
    genesis = MasterKey(5, S0)
    later = MasterKey(8, genesis.state_at(8))  # a gatekeeper admitted at epoch 8
    for epoch in (8, 9, 20, 8 + 1000):
        assert later.cluster_key(epoch) == genesis.cluster_key(epoch)
        assert later.epoch_secret(epoch) == genesis.epoch_secret(epoch)
    keys = {genesis.cluster_key(e).public_key for e in range(5, 40)}
    assert len(keys) == 35  # every epoch has its own key
    # the cursor does not change results: backwards after forwards, then a fresh master
    assert MasterKey(5, S0).epoch_secret(7) == genesis.epoch_secret(7)


def test_a_new_gatekeeper_cannot_derive_epochs_before_its_floor() -> None:
    later = MasterKey(8, MasterKey(0, S0).state_at(8))
    with pytest.raises(UsageError, match="before the master's floor"):
        later.epoch_secret(7)
    assert repr(later) == "MasterKey(floor=8)"
    assert S0.hex() not in repr(later)


def test_erase_before_ratchets_the_floor_forward() -> None:
    master = MasterKey(0, S0)
    pub_3 = master.cluster_key(3)
    pub_10 = master.cluster_key(10)
    master.erase_before(5)
    assert master.floor == 5
    with pytest.raises(UsageError, match="erased"):
        master.cluster_key(3)
    assert master.cluster_key(10) == pub_10
    master.erase_before(2)  # behind the floor: nothing to do
    assert master.floor == 5
    master.erase_before(12)  # past the cursor
    assert master.floor == 12
    assert master.cluster_key(12) == MasterKey(0, S0).cluster_key(12)
    assert pub_3 == MasterKey(0, S0).cluster_key(3)


def test_ratchet_steps_are_bounded() -> None:
    master = MasterKey(0, S0)
    with pytest.raises(UsageError, match="ahead"):
        master.state_at(MAX_RATCHET_STEPS + 1)
    with pytest.raises(UsageError):
        master.erase_before(2**63)
    with pytest.raises(UsageError):
        MasterKey(-1, S0)
    with pytest.raises(UsageError):
        MasterKey(0, b"short")
    with pytest.raises(UsageError):
        next_state(S0, 2**63 - 1)


def test_same_lineage_in_both_directions() -> None:
    master = MasterKey(4, MasterKey(0, S0).state_at(4))
    assert master.same_lineage(9, MasterKey(0, S0).state_at(9))
    assert master.same_lineage(2, MasterKey(0, S0).state_at(2))
    assert not master.same_lineage(9, b"\x02" * 32)
    assert not master.same_lineage(2, b"\x02" * 32)


def test_generated_masters_differ() -> None:
    a, b = MasterKey.generate(0), MasterKey.generate(0)
    assert a.cluster_key(0) != b.cluster_key(0)


# -- the miner's epoch keys ------------------------------------------------------------------


def test_epoch_key_ring() -> None:
    master = MasterKey(0, S0)
    ring = EpochKeyRing(capacity=3)
    assert ring.add(1, master.epoch_secret(1)) == master.cluster_key(1)
    assert ring.add(1, master.epoch_secret(1)) == master.cluster_key(1)  # idempotent
    with pytest.raises(ProtocolViolation) as conflict:
        ring.add(1, master.epoch_secret(2))
    assert conflict.value.reason == "conflict"
    ring.add(2, master.epoch_secret(2))
    ring.add(3, master.epoch_secret(3))
    with pytest.raises(UsageError, match="erase old epochs"):
        ring.add(4, master.epoch_secret(4))
    ring.erase_before(3)
    assert ring.epochs == (3,)
    assert ring.get(2) is None
    with pytest.raises(ProtocolViolation) as erased:
        ring.add(2, master.epoch_secret(2))  # an old share replayed after erasure
    assert erased.value.reason == "erased"
    ring.erase_before(1)  # the floor never goes back
    assert ring.floor == 3
    assert "floor=3" in repr(ring)
    assert master.epoch_secret(3).hex() not in repr(ring)


# -- boxes -----------------------------------------------------------------------------------


def test_box_round_trip_and_binding() -> None:
    secret, public = _keypair(7)
    other_secret, _ = _keypair(8)
    box = seal_box(public, Purpose.EPOCH, 42, b"k" * 32)
    header, plaintext = open_box(secret, box, purpose=Purpose.EPOCH)
    assert plaintext == b"k" * 32
    assert (header.purpose, header.epoch, header.recipient_pub) == (Purpose.EPOCH, 42, public)
    assert parse_box_header(box) == header
    assert len(box) == BOX_OVERHEAD + 32
    assert seal_box(public, Purpose.EPOCH, 42, b"k" * 32) != box  # fresh ephemeral and nonce

    cases = [
        (lambda: open_box(secret, box, purpose=Purpose.MASTER), "wrong-purpose"),
        (lambda: open_box(other_secret, box, purpose=Purpose.EPOCH), "wrong-recipient"),
        (lambda: open_box(secret, box, purpose=Purpose.EPOCH, context=b"x"), "bad-seal"),
        (lambda: open_box(secret, box[:-1], purpose=Purpose.EPOCH), "bad-seal"),
        (lambda: open_box(secret, box[: BOX_OVERHEAD - 1], purpose=Purpose.EPOCH), "malformed"),
        (lambda: open_box(secret, b"\x02" + box[1:], purpose=Purpose.EPOCH), "version"),
        (lambda: open_box(secret, box[:1] + b"\x09" + box[2:], purpose=Purpose.EPOCH), "malformed"),
    ]
    for attempt, reason in cases:
        with pytest.raises(ProtocolViolation) as info:
            attempt()
        assert info.value.reason == reason
    # a purpose or epoch rewritten in the header does not authenticate
    relabelled = box[:1] + bytes([Purpose.MASTER]) + box[2:]
    with pytest.raises(ProtocolViolation) as info:
        open_box(secret, relabelled, purpose=Purpose.MASTER)
    assert info.value.reason == "bad-seal"
    moved = box[:2] + (43).to_bytes(8, "big") + box[10:]
    with pytest.raises(ProtocolViolation) as info:
        open_box(secret, moved, purpose=Purpose.EPOCH)
    assert info.value.reason == "bad-seal"


def test_every_altered_byte_is_refused() -> None:
    secret, public = _keypair(7)
    box = seal_box(public, Purpose.MASTER, 1, b"s" * 32)
    for i in range(len(box)):
        altered = box[:i] + bytes([box[i] ^ 0x01]) + box[i + 1 :]
        with pytest.raises(ProtocolViolation):
            open_box(secret, altered, purpose=Purpose.MASTER)


def test_low_order_keys_are_refused() -> None:
    secret, public = _keypair(7)
    with pytest.raises(UsageError, match="low-order"):
        seal_box(bytes(32), Purpose.EPOCH, 1, b"k" * 32)
    box = seal_box(public, Purpose.EPOCH, 1, b"k" * 32)
    zero_eph = box[: 10 + 32] + bytes(32) + box[10 + 64 :]
    with pytest.raises(ProtocolViolation) as info:
        open_box(secret, zero_eph, purpose=Purpose.EPOCH)
    assert info.value.reason == "bad-key"


def test_box_inputs_are_validated() -> None:
    _, public = _keypair(7)
    bad_calls = [
        lambda: seal_box(public[:31], Purpose.EPOCH, 1, b"k" * 32),
        lambda: seal_box(public, 2, 1, b"k" * 32),  # type: ignore[arg-type]
        lambda: seal_box(public, Purpose.EPOCH, -1, b"k" * 32),
        lambda: seal_box(public, Purpose.EPOCH, True, b"k" * 32),
        lambda: seal_box(public, Purpose.EPOCH, 1, b"k" * 31),
        lambda: seal_box(public, Purpose.MASTER, 1, b"k" * 33),
        lambda: seal_box(public, Purpose.SECRET, 1, b"k" * (MAX_SECRET_LEN + 1)),
        lambda: seal_box(public, Purpose.SECRET, 1, b"k", context=b"c" * 65),
        lambda: seal_box(public, Purpose.SECRET, 1, b"k", nonce=b"n"),
        lambda: secret_context(b"short", 0),
        lambda: secret_context(MODULE_HASH, MAX_SECRETS),
        lambda: seal_secret(public, MODULE_HASH, 0, b"k"),  # type: ignore[arg-type]
    ]
    for call in bad_calls:
        with pytest.raises(UsageError):
            call()


@given(st.binary(max_size=400))
def test_arbitrary_bytes_only_raise_protocol_violation(data: bytes) -> None:
    secret, _ = _keypair(7)
    for purpose in Purpose:
        with pytest.raises(ProtocolViolation):
            open_box(secret, data, purpose=purpose)


# -- client secrets --------------------------------------------------------------------------


def test_client_secret_is_bound_to_epoch_module_and_slot() -> None:
    master = MasterKey(0, S0)
    cluster = master.cluster_key(5)
    box = seal_secret(cluster, MODULE_HASH, 1, b"api-key")
    ring = EpochKeyRing()
    with pytest.raises(ProtocolViolation) as info:
        open_secret(ring, box, MODULE_HASH, 1)
    assert info.value.reason == "unknown-epoch"
    ring.add(5, master.epoch_secret(5))
    assert open_secret(ring, box, MODULE_HASH, 1) == b"api-key"
    for module_hash, slot in ((b"n" * 32, 1), (MODULE_HASH, 0)):
        with pytest.raises(ProtocolViolation) as info:
            open_secret(ring, box, module_hash, slot)
        assert info.value.reason == "bad-seal"
    # sealed to a key that is not the epoch's cluster key
    forged = seal_secret(ClusterKey(5, _keypair(9)[1]), MODULE_HASH, 1, b"api-key")
    with pytest.raises(ProtocolViolation) as info:
        open_secret(ring, forged, MODULE_HASH, 1)
    assert info.value.reason == "wrong-recipient"
    ring.erase_before(6)
    with pytest.raises(ProtocolViolation) as info:
        open_secret(ring, box, MODULE_HASH, 1)
    assert info.value.reason == "erased"
    with pytest.raises(ProtocolViolation) as info:  # without its context
        open_box(master.epoch_secret(5), box, purpose=Purpose.SECRET)
    assert info.value.reason == "bad-seal"


# -- peer checks -----------------------------------------------------------------------------

ROOT = Identity.from_seed(b"\x05" * 32)
MEASUREMENT = bytes(range(32))
NOW = 1_700_000_000


def _evidence(**change: object) -> dict[str, object]:
    identity_pub, x25519_pub, nonce = b"\x11" * 32, b"\x22" * 32, b"nonce"
    measurement = change.pop("measurement", MEASUREMENT)
    root = change.pop("root", ROOT)
    timestamp = change.pop("timestamp", NOW)
    assert isinstance(measurement, bytes)
    assert isinstance(root, Identity)
    assert isinstance(timestamp, int)
    quote = sign_sim_quote(
        root, measurement, make_report_data(identity_pub, x25519_pub, nonce=nonce), timestamp
    )
    args: dict[str, object] = {
        "platform": "SIM",
        "quote": quote,
        "identity_pub": identity_pub,
        "x25519_pub": x25519_pub,
        "nonce": nonce,
        "roots": [ROOT.public_key],
        "expected_measurement": MEASUREMENT,
        "now": NOW,
    }
    args.update(change)
    return args


def test_peer_enclave_checks() -> None:
    verify_peer_enclave(**_evidence())  # type: ignore[arg-type]
    verify_peer_enclave(**_evidence(timestamp=NOW - 600))  # type: ignore[arg-type]
    refusals: list[tuple[dict[str, object], str]] = [
        (_evidence(platform="SGX"), "cannot verify"),
        (_evidence(root=Identity.from_seed(b"\x06" * 32)), "unknown root"),
        (_evidence(measurement=b"\x00" * 32), "other code"),
        (_evidence(timestamp=NOW - 601), "stale"),
        (_evidence(timestamp=NOW + 61), "future"),
        (_evidence(x25519_pub=b"\x33" * 32), "report data"),
        (_evidence(nonce=b"other"), "report data"),
        (_evidence(quote=b"\x00" * 204), "malformed"),
        (_evidence(x25519_pub=b"short"), "32 bytes"),
    ]
    for args, match in refusals:
        with pytest.raises(AttestationError, match=match):
            verify_peer_enclave(**args)  # type: ignore[arg-type]
