"""Job sessions between a client and an enclave: key agreement and sealed payloads (sans-IO).

A client sends an ephemeral X25519 public key; the enclave answers with its own ephemeral key,
signed by its attested Ed25519 identity (:func:`offer_signing_bytes`). Both sides compute
``shared = X25519(own_secret, peer_public)`` and derive, with keyed BLAKE2b,

* ``session_id = BLAKE2b-128(person="phala/tee/sid1", client_pub || enclave_pub)``
* ``k_c2e = BLAKE2b-256(key=shared, person="phala/tee/kdf1", "c2e" || client_pub || enclave_pub)``
* ``k_e2c`` likewise with ``"e2c"``.

A sealed payload is ``nonce(24) || XChaCha20-Poly1305(key, nonce, plaintext, aad)`` with
``aad = "phala/tee/seal1" || session_id || job_id || purpose``; ``purpose`` is ``module``,
``input`` or ``output``, so a module cannot be passed off as an input, nor one job's payload as
another's, nor a payload sent back to its sender (one key per direction).

The relay between client and enclave (the miner's node) sees only public keys and ciphertext.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Final

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.utils

from phala_p2p.errors import ProtocolViolation, UsageError

__all__ = [
    "JOB_ID_LEN",
    "PURPOSES",
    "SEAL_OVERHEAD",
    "SESSION_ID_LEN",
    "ClientSession",
    "EnclaveSession",
    "SessionKeys",
    "derive_session",
    "offer_signing_bytes",
    "open_sealed",
    "seal",
]

SESSION_ID_LEN: Final = 16
JOB_ID_LEN: Final = 16
KEY_LEN: Final = 32
NONCE_LEN: Final = 24
SEAL_OVERHEAD: Final = NONCE_LEN + 16
PURPOSES: Final = frozenset({b"module", b"input", b"output"})

_SID_PERSON: Final = b"phala/tee/sid1"
_KDF_PERSON: Final = b"phala/tee/kdf1"
_AAD_PREFIX: Final = b"phala/tee/seal1"
_OFFER_DOMAIN: Final = b"phala/tee/session-offer/v1\x00"


def _check_key(name: str, value: object, length: int = KEY_LEN) -> bytes:
    if not isinstance(value, bytes) or len(value) != length:
        raise UsageError(f"{name} must be {length} bytes")
    return value


@dataclass(frozen=True)
class SessionKeys:
    """The keys of one job session (never leave the client or the enclave)."""

    session_id: bytes
    to_enclave: bytes
    to_client: bytes

    def __repr__(self) -> str:  # keys stay out of logs and tracebacks
        return f"SessionKeys(session_id={self.session_id.hex()})"


def _session_id(client_pub: bytes, enclave_pub: bytes) -> bytes:
    return hashlib.blake2b(
        client_pub + enclave_pub, digest_size=SESSION_ID_LEN, person=_SID_PERSON
    ).digest()


def derive_session(own_secret: bytes, client_pub: bytes, enclave_pub: bytes) -> SessionKeys:
    """Derive the session keys; ``own_secret`` is the caller's X25519 secret key.

    Raises ProtocolViolation if the peer's key is a low-order point (all-zero shared secret).
    """
    _check_key("own_secret", own_secret)
    _check_key("client_pub", client_pub)
    _check_key("enclave_pub", enclave_pub)
    own_pub = nacl.bindings.crypto_scalarmult_base(own_secret)
    if own_pub == client_pub:
        peer = enclave_pub
    elif own_pub == enclave_pub:
        peer = client_pub
    else:
        raise UsageError("own_secret belongs to neither side of the session")
    try:
        shared = nacl.bindings.crypto_scalarmult(own_secret, peer)
    except nacl.exceptions.RuntimeError as err:  # libsodium refuses low-order points
        raise ProtocolViolation("peer's X25519 key is a low-order point", reason="bad-key") from err
    if hmac.compare_digest(shared, bytes(32)):
        raise ProtocolViolation("peer's X25519 key is a low-order point", reason="bad-key")
    keys = []
    for label in (b"c2e", b"e2c"):
        keys.append(
            hashlib.blake2b(
                label + client_pub + enclave_pub,
                digest_size=KEY_LEN,
                key=shared,
                person=_KDF_PERSON,
            ).digest()
        )
    return SessionKeys(_session_id(client_pub, enclave_pub), keys[0], keys[1])


def offer_signing_bytes(client_pub: bytes, enclave_pub: bytes, measurement: bytes) -> bytes:
    """What the enclave identity signs to vouch for its ephemeral session key."""
    _check_key("client_pub", client_pub)
    _check_key("enclave_pub", enclave_pub)
    if not isinstance(measurement, bytes) or not 1 <= len(measurement) <= 64:
        raise UsageError("measurement must be 1..64 bytes")
    return _OFFER_DOMAIN + client_pub + enclave_pub + bytes([len(measurement)]) + measurement


def _aad(session_id: bytes, job_id: bytes, purpose: bytes) -> bytes:
    if not isinstance(session_id, bytes) or len(session_id) != SESSION_ID_LEN:
        raise UsageError(f"session_id must be {SESSION_ID_LEN} bytes")
    if not isinstance(job_id, bytes) or len(job_id) != JOB_ID_LEN:
        raise UsageError(f"job_id must be {JOB_ID_LEN} bytes")
    if purpose not in PURPOSES:
        raise UsageError(f"purpose must be one of {sorted(PURPOSES)}")
    return _AAD_PREFIX + session_id + job_id + purpose


def seal(key: bytes, session_id: bytes, job_id: bytes, purpose: bytes, plaintext: bytes) -> bytes:
    """Encrypt ``plaintext`` for the given session, job and purpose (random nonce)."""
    _check_key("key", key)
    if not isinstance(plaintext, bytes):
        raise UsageError("plaintext must be bytes")
    nonce = nacl.utils.random(NONCE_LEN)
    ct = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        plaintext, _aad(session_id, job_id, purpose), nonce, key
    )
    return nonce + ct


def open_sealed(
    key: bytes, session_id: bytes, job_id: bytes, purpose: bytes, sealed: bytes
) -> bytes:
    """Decrypt a sealed payload; ProtocolViolation if it was altered or is for another context."""
    _check_key("key", key)
    aad = _aad(session_id, job_id, purpose)
    if not isinstance(sealed, bytes) or len(sealed) < SEAL_OVERHEAD:
        raise ProtocolViolation("sealed payload is too short", reason="malformed")
    try:
        return bytes(
            nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
                sealed[NONCE_LEN:], aad, sealed[:NONCE_LEN], key
            )
        )
    except nacl.exceptions.CryptoError as err:
        raise ProtocolViolation(
            f"sealed {purpose.decode()} does not authenticate", reason="bad-seal"
        ) from err


class EnclaveSession:
    """The enclave's side of one session: its ephemeral key and the job ids already used."""

    def __init__(self, client_pub: bytes, *, max_jobs: int = 4096) -> None:
        _check_key("client_pub", client_pub)
        self._secret = nacl.public.PrivateKey.generate()
        self.public_key: bytes = bytes(self._secret.public_key)
        self.client_pub = client_pub
        self.keys = derive_session(bytes(self._secret), client_pub, self.public_key)
        self._used_jobs: set[bytes] = set()
        self._max_jobs = max_jobs

    @property
    def session_id(self) -> bytes:
        return self.keys.session_id

    def claim_job(self, job_id: bytes) -> None:
        """Record ``job_id`` as used; ProtocolViolation on a replay or when the budget is spent."""
        if not isinstance(job_id, bytes) or len(job_id) != JOB_ID_LEN:
            raise ProtocolViolation(f"job_id must be {JOB_ID_LEN} bytes", reason="malformed")
        if job_id in self._used_jobs:
            raise ProtocolViolation("job_id was already used in this session", reason="replay")
        if len(self._used_jobs) >= self._max_jobs:
            raise ProtocolViolation("session has run its maximum number of jobs", reason="limit")
        self._used_jobs.add(job_id)

    def __repr__(self) -> str:
        return f"EnclaveSession(session_id={self.session_id.hex()})"


class ClientSession:
    """The client's side: an ephemeral key, then the session keys once the offer checks out."""

    def __init__(self) -> None:
        self._secret = nacl.public.PrivateKey.generate()
        self.public_key: bytes = bytes(self._secret.public_key)
        self._keys: SessionKeys | None = None

    def accept_offer(self, enclave_pub: bytes, session_id: bytes | None = None) -> SessionKeys:
        """Derive the keys from the enclave's ephemeral key (and check the offered session id).

        The caller must first check the offer's signature against the attested enclave identity
        (``SessionOffer.verify`` in :mod:`phala_p2p.tee.messages`).
        """
        if not isinstance(enclave_pub, bytes) or len(enclave_pub) != KEY_LEN:
            raise ProtocolViolation("enclave session key must be 32 bytes", reason="malformed")
        keys = derive_session(bytes(self._secret), self.public_key, enclave_pub)
        if session_id is not None and not hmac.compare_digest(keys.session_id, session_id):
            raise ProtocolViolation("offered session id does not match the keys", reason="bad-key")
        self._keys = keys
        return keys

    @property
    def keys(self) -> SessionKeys:
        if self._keys is None:
            raise UsageError("session is not established; call accept_offer first")
        return self._keys

    @property
    def session_id(self) -> bytes:
        return self.keys.session_id

    def seal_module(self, job_id: bytes, module: bytes) -> bytes:
        return seal(self.keys.to_enclave, self.session_id, job_id, b"module", module)

    def seal_input(self, job_id: bytes, data: bytes) -> bytes:
        return seal(self.keys.to_enclave, self.session_id, job_id, b"input", data)

    def open_output(self, job_id: bytes, sealed: bytes) -> bytes:
        return open_sealed(self.keys.to_client, self.session_id, job_id, b"output", sealed)

    def __repr__(self) -> str:
        return f"ClientSession(public_key={self.public_key.hex()})"
