"""The network's key material: master key, per-epoch cluster keys and sealed boxes (sans-IO).

Everything here runs inside enclaves, except :func:`seal_secret`, which clients call. The
layouts are specified in ``protocols/attest.md`` ("Key management") and pinned by its vectors.

**Master key and epoch keys.** The master key is a 32-byte state ``S`` created inside the first
gatekeeper enclave at genesis epoch ``g`` (``S_g``, random). It is a one-way ratchet:

* ``S_{e+1}   = BLAKE2b-256(key=S_e, person="phala/km/next1",  u64be(e + 1))``
* ``secret_e  = BLAKE2b-256(key=S_e, person="phala/km/epoch1", u64be(e))``
* ``public_e  = X25519(secret_e, base point)`` (the cluster public key of epoch ``e``)

Every enclave holding ``S_f`` for some ``f <= e`` derives the same epoch key pair ``e``.
``secret_e`` is a PRF output keyed by ``S_e``, so knowing one epoch's secret gives nothing
about ``S_e`` nor any other epoch's. A gatekeeper enclave keeps only the state of its *floor*
epoch (the oldest it may still derive); ``erase_before`` ratchets the floor forward and drops
the older state, so a gatekeeper compromised later cannot recompute erased epochs. A new
gatekeeper is handed ``S_f`` (not the genesis state), so it never learns epochs before ``f``.

**Boxes.** Key material and client secrets travel as sealed boxes to an X25519 public key
(an attested enclave's key, or an epoch's cluster key)::

    box    = header(98) || XChaCha20-Poly1305(k, nonce, plaintext, aad)       (tag: 16 bytes)
    header = version(1)=1 || purpose(1) || epoch(u64be) || recipient_pub(32) || eph_pub(32)
             || nonce(24)
    shared = X25519(eph_secret, recipient_pub)           (all-zero: refused, low-order key)
    k      = BLAKE2b-256(key=shared, person="phala/km/kdf1", header[0:74])
    aad    = "phala/km/box1" || header[0:74] || len(context)(1) || context

``purpose`` is ``1`` (master state for a new gatekeeper), ``2`` (an epoch secret for a miner)
or ``3`` (a client secret for a job). The purpose, the epoch and the recipient key are in the
header, in the key derivation and in the AAD: a box for one purpose, epoch or recipient does
not open as another. A client secret's ``context`` is ``module_hash(32) || slot(1)``, so only
the job whose module has that SHA-256, and only in that slot, receives it.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import nacl.bindings
import nacl.exceptions
import nacl.utils

from phala_p2p.errors import AttestationError, ProtocolViolation, UsageError
from phala_p2p.tee.quote import SIM_PLATFORM, make_report_data, verify_sim_quote

__all__ = [
    "BOX_HEADER_LEN",
    "BOX_OVERHEAD",
    "BOX_VERSION",
    "KEY_LEN",
    "MAX_EPOCH",
    "MAX_HELD_EPOCHS",
    "MAX_RATCHET_STEPS",
    "MAX_SECRETS",
    "MAX_SECRET_LEN",
    "BoxHeader",
    "ClusterKey",
    "EpochKeyRing",
    "MasterKey",
    "Purpose",
    "epoch_public",
    "epoch_secret",
    "next_state",
    "open_box",
    "open_secret",
    "parse_box_header",
    "seal_box",
    "seal_secret",
    "secret_context",
    "verify_peer_enclave",
]

KEY_LEN: Final = 32
NONCE_LEN: Final = 24
TAG_LEN: Final = 16
BOX_VERSION: Final = 1
MAX_EPOCH: Final = 2**63 - 1
MAX_CONTEXT: Final = 64
MAX_SECRET_LEN: Final = 4096  # plaintext bytes of one client secret
MAX_SECRETS: Final = 8  # sealed secrets per job
MAX_HELD_EPOCHS: Final = 64  # epoch keys a miner enclave holds at once
MAX_RATCHET_STEPS: Final = 1 << 18  # ratchet steps per derivation (about 0.3 s)
MAX_PEER_QUOTE_AGE_S: Final = 600
MAX_PEER_CLOCK_SKEW_S: Final = 60

_HEADER: Final = struct.Struct(">BBQ32s32s24s")
BOX_HEADER_LEN: Final = _HEADER.size  # 98
_BOUND_LEN: Final = BOX_HEADER_LEN - NONCE_LEN  # header bytes that feed the KDF and the AAD
BOX_OVERHEAD: Final = BOX_HEADER_LEN + TAG_LEN  # 114
_MAX_BOX_PLAINTEXT: Final = MAX_SECRET_LEN

_NEXT_PERSON: Final = b"phala/km/next1"
_EPOCH_PERSON: Final = b"phala/km/epoch1"
_KDF_PERSON: Final = b"phala/km/kdf1"
_AAD_PREFIX: Final = b"phala/km/box1"


class Purpose(enum.IntEnum):
    """What a box carries; part of its header, key derivation and AAD."""

    MASTER = 1  # a master state S_f, to a newly admitted gatekeeper enclave
    EPOCH = 2  # an epoch secret, to an attested miner enclave
    SECRET = 3  # a client secret, to an epoch's cluster key


_PURPOSE_CODES: Final = frozenset(int(p) for p in Purpose)

# Plaintext length bounds per purpose (inclusive).
_PLAINTEXT_LEN: Final[dict[Purpose, tuple[int, int]]] = {
    Purpose.MASTER: (KEY_LEN, KEY_LEN),
    Purpose.EPOCH: (KEY_LEN, KEY_LEN),
    Purpose.SECRET: (0, MAX_SECRET_LEN),
}


def _check_epoch(epoch: object, name: str = "epoch") -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= MAX_EPOCH:
        raise UsageError(f"{name} must be an int in 0..{MAX_EPOCH}")
    return epoch


def _check_key(name: str, value: object) -> bytes:
    if not isinstance(value, bytes) or len(value) != KEY_LEN:
        raise UsageError(f"{name} must be {KEY_LEN} bytes")
    return value


def _u64(value: int) -> bytes:
    return value.to_bytes(8, "big")


# -- the ratchet -----------------------------------------------------------------------------


def next_state(state: bytes, epoch: int) -> bytes:
    """``S_{epoch+1}`` from ``S_epoch``."""
    _check_key("state", state)
    if _check_epoch(epoch) == MAX_EPOCH:
        raise UsageError("the ratchet ends at MAX_EPOCH")
    return hashlib.blake2b(
        _u64(epoch + 1), digest_size=KEY_LEN, key=state, person=_NEXT_PERSON
    ).digest()


def epoch_secret(state: bytes, epoch: int) -> bytes:
    """The X25519 secret key of epoch ``epoch`` from ``S_epoch``."""
    _check_key("state", state)
    return hashlib.blake2b(
        _u64(_check_epoch(epoch)), digest_size=KEY_LEN, key=state, person=_EPOCH_PERSON
    ).digest()


def epoch_public(secret: bytes) -> bytes:
    """The cluster public key (X25519) of an epoch secret."""
    _check_key("secret", secret)
    return bytes(nacl.bindings.crypto_scalarmult_base(secret))


@dataclass(frozen=True)
class ClusterKey:
    """An epoch's cluster public key: what clients seal their secrets to."""

    epoch: int
    public_key: bytes

    def __post_init__(self) -> None:
        _check_epoch(self.epoch)
        _check_key("ClusterKey.public_key", self.public_key)


class MasterKey:
    """A gatekeeper enclave's master state: ``S_floor`` and a cursor further along the ratchet.

    ``repr`` shows the floor only; the state never leaves the enclave except in a box.
    """

    __slots__ = ("_cursor", "_cursor_state", "_floor", "_floor_state")

    def __init__(self, epoch: int, state: bytes) -> None:
        self._floor = _check_epoch(epoch)
        self._floor_state = _check_key("state", state)
        self._cursor = self._floor
        self._cursor_state = self._floor_state

    @classmethod
    def generate(cls, epoch: int) -> MasterKey:
        """A fresh master whose first epoch is ``epoch`` (random, from the OS)."""
        return cls(epoch, nacl.utils.random(KEY_LEN))

    @property
    def floor(self) -> int:
        """The oldest epoch this master can still derive."""
        return self._floor

    def state_at(self, epoch: int) -> bytes:
        """``S_epoch``; UsageError before the floor or too far ahead of what is derived."""
        _check_epoch(epoch)
        if epoch < self._floor:
            raise UsageError(f"epoch {epoch} is before the master's floor {self._floor} (erased)")
        if epoch >= self._cursor:
            at, state = self._cursor, self._cursor_state
        else:
            at, state = self._floor, self._floor_state
        if epoch - at > MAX_RATCHET_STEPS:
            raise UsageError(
                f"epoch {epoch} is more than {MAX_RATCHET_STEPS} epochs ahead of epoch {at}; "
                "advance the floor (erase_before) in smaller steps"
            )
        while at < epoch:
            state = next_state(state, at)
            at += 1
        if epoch > self._cursor:
            self._cursor, self._cursor_state = epoch, state
        return state

    def epoch_secret(self, epoch: int) -> bytes:
        return epoch_secret(self.state_at(epoch), epoch)

    def cluster_key(self, epoch: int) -> ClusterKey:
        return ClusterKey(epoch, epoch_public(self.epoch_secret(epoch)))

    def erase_before(self, epoch: int) -> None:
        """Ratchet the floor forward to ``epoch`` and drop the older state (no-op if behind)."""
        _check_epoch(epoch)
        if epoch <= self._floor:
            return
        state = self.state_at(epoch)
        self._floor, self._floor_state = epoch, state
        if self._cursor < epoch:
            self._cursor, self._cursor_state = epoch, state

    def same_lineage(self, epoch: int, state: bytes) -> bool:
        """True if ``state`` is this master's ``S_epoch`` (compared at the later of both floors)."""
        _check_epoch(epoch)
        _check_key("state", state)
        if epoch >= self._floor:
            return hmac.compare_digest(self.state_at(epoch), state)
        if self._floor - epoch > MAX_RATCHET_STEPS:
            return False
        other = MasterKey(epoch, state)
        return hmac.compare_digest(other.state_at(self._floor), self._floor_state)

    def __repr__(self) -> str:
        return f"MasterKey(floor={self._floor})"


class EpochKeyRing:
    """The epoch secrets a miner enclave was given (bounded; erased below a floor)."""

    __slots__ = ("_capacity", "_floor", "_keys")

    def __init__(self, *, capacity: int = MAX_HELD_EPOCHS) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise UsageError("capacity must be a positive int")
        self._capacity = capacity
        self._floor = 0
        self._keys: dict[int, tuple[bytes, bytes]] = {}

    @property
    def floor(self) -> int:
        """Epochs below the floor were erased and are never accepted again."""
        return self._floor

    @property
    def epochs(self) -> tuple[int, ...]:
        return tuple(sorted(self._keys))

    def add(self, epoch: int, secret: bytes) -> ClusterKey:
        """Hold ``secret`` for ``epoch`` (idempotent for the same secret).

        ProtocolViolation for an erased epoch (reason ``erased``) or a different secret for an
        epoch already held (``conflict``); UsageError when the ring is full.
        """
        _check_epoch(epoch)
        _check_key("secret", secret)
        if epoch < self._floor:
            raise ProtocolViolation(
                f"epoch {epoch} is below the erased floor {self._floor}", reason="erased"
            )
        held = self._keys.get(epoch)
        if held is not None:
            if not hmac.compare_digest(held[0], secret):
                raise ProtocolViolation(
                    f"a different key for epoch {epoch} is already held", reason="conflict"
                )
            return ClusterKey(epoch, held[1])
        if len(self._keys) >= self._capacity:
            raise UsageError(
                f"enclave already holds {self._capacity} epoch keys; erase old epochs first"
            )
        public = epoch_public(secret)
        self._keys[epoch] = (secret, public)
        return ClusterKey(epoch, public)

    def get(self, epoch: int) -> tuple[bytes, bytes] | None:
        """``(secret, public)`` of a held epoch, or None."""
        return self._keys.get(epoch)

    def erase_before(self, epoch: int) -> None:
        _check_epoch(epoch)
        self._floor = max(self._floor, epoch)
        for old in [e for e in self._keys if e < epoch]:
            del self._keys[old]

    def __repr__(self) -> str:
        return f"EpochKeyRing(floor={self._floor}, epochs={list(self.epochs)})"


# -- boxes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BoxHeader:
    """The public header of a box."""

    version: int
    purpose: Purpose
    epoch: int
    recipient_pub: bytes
    eph_pub: bytes
    nonce: bytes

    def bound(self) -> bytes:
        """The header bytes that feed the key derivation and the AAD (all but the nonce)."""
        return _HEADER.pack(
            self.version, self.purpose, self.epoch, self.recipient_pub, self.eph_pub, self.nonce
        )[:_BOUND_LEN]


def _shared(secret: bytes, public: bytes) -> bytes | None:
    """X25519, or None for a low-order peer key (all-zero result)."""
    try:
        shared = bytes(nacl.bindings.crypto_scalarmult(secret, public))
    except nacl.exceptions.RuntimeError:  # libsodium refuses low-order points
        return None
    return None if hmac.compare_digest(shared, bytes(KEY_LEN)) else shared


def _box_key(shared: bytes, header: BoxHeader) -> bytes:
    return hashlib.blake2b(
        header.bound(), digest_size=KEY_LEN, key=shared, person=_KDF_PERSON
    ).digest()


def _aad(header: BoxHeader, context: bytes) -> bytes:
    return _AAD_PREFIX + header.bound() + bytes([len(context)]) + context


def _check_context(context: object) -> bytes:
    if not isinstance(context, bytes) or len(context) > MAX_CONTEXT:
        raise UsageError(f"context must be at most {MAX_CONTEXT} bytes")
    return context


def seal_box(
    recipient_pub: bytes,
    purpose: Purpose,
    epoch: int,
    plaintext: bytes,
    *,
    context: bytes = b"",
    eph_secret: bytes | None = None,
    nonce: bytes | None = None,
) -> bytes:
    """Seal ``plaintext`` to ``recipient_pub`` for ``purpose`` and ``epoch``.

    ``eph_secret`` and ``nonce`` exist for the test vectors only; leave them out (fresh random).
    UsageError for bad arguments, including a low-order recipient key.
    """
    _check_key("recipient_pub", recipient_pub)
    if not isinstance(purpose, Purpose):
        raise UsageError("purpose must be a Purpose")
    _check_epoch(epoch)
    _check_context(context)
    lo, hi = _PLAINTEXT_LEN[purpose]
    if not isinstance(plaintext, bytes) or not lo <= len(plaintext) <= hi:
        raise UsageError(f"a {purpose.name.lower()} box holds {lo}..{hi} bytes")
    if eph_secret is None:
        eph_secret = nacl.utils.random(KEY_LEN)
    _check_key("eph_secret", eph_secret)
    if nonce is None:
        nonce = nacl.utils.random(NONCE_LEN)
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_LEN:
        raise UsageError(f"nonce must be {NONCE_LEN} bytes")
    eph_pub = bytes(nacl.bindings.crypto_scalarmult_base(eph_secret))
    shared = _shared(eph_secret, recipient_pub)
    if shared is None:
        raise UsageError("recipient_pub is a low-order X25519 point")
    header = BoxHeader(BOX_VERSION, purpose, epoch, recipient_pub, eph_pub, nonce)
    ct = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        plaintext, _aad(header, context), nonce, _box_key(shared, header)
    )
    return header.bound() + nonce + bytes(ct)


def parse_box_header(box: bytes) -> BoxHeader:
    """The header of a box (not authenticated yet); ProtocolViolation if malformed."""
    if not isinstance(box, bytes):
        raise ProtocolViolation("a sealed box must be bytes")
    if len(box) < BOX_OVERHEAD:
        raise ProtocolViolation("sealed box is too short", reason="malformed")
    if len(box) > BOX_OVERHEAD + _MAX_BOX_PLAINTEXT:
        raise ProtocolViolation("sealed box is too large", reason="too-large")
    version, purpose, epoch, recipient_pub, eph_pub, nonce = _HEADER.unpack_from(box)
    if version != BOX_VERSION:
        raise ProtocolViolation(f"sealed box version {version} is not supported", reason="version")
    if purpose not in _PURPOSE_CODES:
        raise ProtocolViolation(f"sealed box has unknown purpose {purpose}", reason="malformed")
    if epoch > MAX_EPOCH:
        raise ProtocolViolation("sealed box epoch is out of range", reason="malformed")
    return BoxHeader(version, Purpose(purpose), epoch, recipient_pub, eph_pub, nonce)


def open_box(
    recipient_secret: bytes, box: bytes, *, purpose: Purpose, context: bytes = b""
) -> tuple[BoxHeader, bytes]:
    """Open a box sealed to ``recipient_secret``'s public key; returns its header and plaintext.

    ProtocolViolation with reason ``malformed``/``too-large``/``version``, ``wrong-purpose``,
    ``wrong-recipient``, ``bad-key`` (low-order ephemeral key) or ``bad-seal`` (it does not
    authenticate: altered, or sealed for another context).
    """
    _check_key("recipient_secret", recipient_secret)
    if not isinstance(purpose, Purpose):
        raise UsageError("purpose must be a Purpose")
    _check_context(context)
    header = parse_box_header(box)
    if header.purpose != purpose:
        raise ProtocolViolation(
            f"sealed box is for {header.purpose.name.lower()}, not {purpose.name.lower()}",
            reason="wrong-purpose",
        )
    own_pub = bytes(nacl.bindings.crypto_scalarmult_base(recipient_secret))
    if not hmac.compare_digest(header.recipient_pub, own_pub):
        raise ProtocolViolation("sealed box is for another recipient", reason="wrong-recipient")
    shared = _shared(recipient_secret, header.eph_pub)
    if shared is None:
        raise ProtocolViolation("sealed box has a low-order ephemeral key", reason="bad-key")
    try:
        plaintext = bytes(
            nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
                box[BOX_HEADER_LEN:], _aad(header, context), header.nonce, _box_key(shared, header)
            )
        )
    except nacl.exceptions.CryptoError as err:
        raise ProtocolViolation(
            f"sealed {purpose.name.lower()} box does not authenticate", reason="bad-seal"
        ) from err
    lo, hi = _PLAINTEXT_LEN[purpose]
    if not lo <= len(plaintext) <= hi:
        raise ProtocolViolation(
            f"sealed {purpose.name.lower()} box holds {len(plaintext)} bytes", reason="malformed"
        )
    return header, plaintext


# -- client secrets --------------------------------------------------------------------------


def secret_context(module_hash: bytes, slot: int) -> bytes:
    """``module_hash || slot``: binds a client secret to one job module and one slot."""
    if not isinstance(module_hash, bytes) or len(module_hash) != 32:
        raise UsageError("module_hash must be the 32-byte SHA-256 of the job module")
    if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < MAX_SECRETS:
        raise UsageError(f"slot must be in 0..{MAX_SECRETS - 1}")
    return module_hash + bytes([slot])


def seal_secret(cluster: ClusterKey, module_hash: bytes, slot: int, secret: bytes) -> bytes:
    """Seal a client secret (e.g. an API key) to an epoch's cluster key, for one job module.

    Only an attested enclave holding that epoch's key opens it, and it hands it only to a job
    whose module has SHA-256 ``module_hash``, as secret number ``slot``.
    """
    if not isinstance(cluster, ClusterKey):
        raise UsageError("cluster must be a ClusterKey")
    return seal_box(
        cluster.public_key,
        Purpose.SECRET,
        cluster.epoch,
        secret,
        context=secret_context(module_hash, slot),
    )


def open_secret(ring: EpochKeyRing, box: bytes, module_hash: bytes, slot: int) -> bytes:
    """Open a client secret with the epoch key it names (ProtocolViolation if not held)."""
    header = parse_box_header(box)
    if header.purpose != Purpose.SECRET:
        raise ProtocolViolation(
            f"sealed box is for {header.purpose.name.lower()}, not secret", reason="wrong-purpose"
        )
    held = ring.get(header.epoch)
    if held is None:
        reason = "erased" if header.epoch < ring.floor else "unknown-epoch"
        raise ProtocolViolation(
            f"this enclave holds no key for epoch {header.epoch}", reason=reason
        )
    _, plaintext = open_box(
        held[0], box, purpose=Purpose.SECRET, context=secret_context(module_hash, slot)
    )
    return plaintext


# -- peers -----------------------------------------------------------------------------------


def verify_peer_enclave(
    *,
    platform: str,
    quote: bytes,
    identity_pub: bytes,
    x25519_pub: bytes,
    nonce: bytes,
    roots: Sequence[bytes],
    expected_measurement: bytes,
    now: int,
) -> None:
    """Check, inside the sending enclave, that ``x25519_pub`` belongs to an enclave of our code.

    The quote must be signed by one of ``roots``, carry ``expected_measurement``, be at most
    10 minutes old (and at most 1 minute in the future) and bind ``identity_pub``,
    ``x25519_pub`` and ``nonce``. Only the simulated platform is verified in-enclave so far.
    Raises AttestationError.
    """
    if platform != SIM_PLATFORM:
        raise AttestationError(f"this enclave cannot verify {platform!r} quotes of its peers")
    if not isinstance(identity_pub, bytes) or len(identity_pub) != KEY_LEN:
        raise AttestationError("peer identity_pub must be 32 bytes")
    if not isinstance(x25519_pub, bytes) or len(x25519_pub) != KEY_LEN:
        raise AttestationError("peer x25519_pub must be 32 bytes")
    if not isinstance(nonce, bytes) or len(nonce) > 64:
        raise AttestationError("peer nonce must be at most 64 bytes")
    parsed = verify_sim_quote(quote, roots, now)
    if not hmac.compare_digest(parsed.measurement, expected_measurement):
        raise AttestationError(
            f"peer enclave runs other code (measurement {parsed.measurement.hex()[:16]}…)"
        )
    if parsed.timestamp > now + MAX_PEER_CLOCK_SKEW_S:
        raise AttestationError("peer quote is from the future")
    if now - parsed.timestamp > MAX_PEER_QUOTE_AGE_S:
        raise AttestationError("peer quote is stale")
    expected = make_report_data(identity_pub, x25519_pub, nonce=nonce)
    if not hmac.compare_digest(parsed.report_data, expected):
        raise AttestationError("peer quote's report data does not bind these keys")
