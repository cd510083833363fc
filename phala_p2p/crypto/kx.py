"""X25519 ephemeral key exchange and session key derivation.

Both sides of a session make an ``EphemeralKey``, exchange public keys (signed by whatever
long-term identity the protocol uses), compute the same shared secret, hash everything they
exchanged into a transcript hash, and derive one key per direction::

    shared = mine.exchange(their_public)
    c2s, s2c = derive_session_keys(shared, transcript_hash(b"...", client_pub, server_pub))

Forward secrecy comes from throwing the ephemeral keys away after the session. The KDF is
keyed BLAKE2b (a PRF): first ``prk = BLAKE2b-512(key=shared, transcript_hash)``, then one
32-byte key per direction, ``BLAKE2b-256(key=prk, label)`` with distinct labels, each with its
own personalization so the outputs never collide with other uses of BLAKE2b in the system.
"""

from __future__ import annotations

import hashlib
import hmac

import nacl.bindings
import nacl.exceptions
import nacl.public

from phala_p2p.errors import ProtocolViolation, UsageError

X25519_KEY_SIZE = 32
SESSION_KEY_SIZE = 32
TRANSCRIPT_HASH_SIZE = 32

_PERSON_TRANSCRIPT = b"phala-kx-tr-v1"
_PERSON_PRK = b"phala-kx-prk-v1"
_PERSON_KEY = b"phala-kx-key-v1"
_LABEL_C2S = b"client->server"
_LABEL_S2C = b"server->client"


class EphemeralKey:
    """A one-session X25519 key pair (``nacl.public.PrivateKey``); never stored."""

    __slots__ = ("_private", "_public")

    def __init__(self, private: nacl.public.PrivateKey) -> None:
        if not isinstance(private, nacl.public.PrivateKey):
            raise UsageError("EphemeralKey wraps a nacl.public.PrivateKey")
        self._private = private
        self._public = bytes(private.public_key)

    @classmethod
    def generate(cls) -> EphemeralKey:
        return cls(nacl.public.PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, private: bytes) -> EphemeralKey:
        """A key from its 32 private bytes (for test vectors; use ``generate`` otherwise)."""
        if not isinstance(private, bytes) or len(private) != X25519_KEY_SIZE:
            raise UsageError("an X25519 private key is 32 bytes")
        return cls(nacl.public.PrivateKey(private))

    @property
    def public_key(self) -> bytes:
        return self._public

    def exchange(self, peer_public: bytes) -> bytes:
        """The 32-byte shared secret with ``peer_public`` (the peer's input).

        ProtocolViolation (reason ``bad_key``) if the peer's key is not 32 bytes or is a
        low-order point that would make the shared secret all zeros.
        """
        if not isinstance(peer_public, bytes) or len(peer_public) != X25519_KEY_SIZE:
            raise ProtocolViolation("peer X25519 key is not 32 bytes", reason="bad_key")
        try:
            shared: bytes = nacl.bindings.crypto_scalarmult(bytes(self._private), peer_public)
        except nacl.exceptions.CryptoError as err:  # libsodium refuses an all-zero result
            raise ProtocolViolation(
                "peer X25519 key is a low-order point", reason="bad_key"
            ) from err
        if hmac.compare_digest(shared, bytes(X25519_KEY_SIZE)):
            raise ProtocolViolation("peer X25519 key is a low-order point", reason="bad_key")
        return shared

    def __repr__(self) -> str:
        return f"EphemeralKey(public_key={self._public.hex()})"


def transcript_hash(*parts: bytes) -> bytes:
    """BLAKE2b-256 of the parts, each prefixed by its 4-byte big-endian length."""
    h = hashlib.blake2b(digest_size=TRANSCRIPT_HASH_SIZE, person=_PERSON_TRANSCRIPT)
    for part in parts:
        if not isinstance(part, bytes | bytearray | memoryview):
            raise UsageError("transcript parts are bytes")
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()


def derive_session_keys(shared_secret: bytes, transcript_hash: bytes) -> tuple[bytes, bytes]:
    """(client_to_server_key, server_to_client_key), 32 bytes each, distinct."""
    if not isinstance(shared_secret, bytes) or len(shared_secret) != X25519_KEY_SIZE:
        raise UsageError("the shared secret is 32 bytes")
    if not isinstance(transcript_hash, bytes) or not 16 <= len(transcript_hash) <= 64:
        raise UsageError("the transcript hash is 16..64 bytes")
    prk = hashlib.blake2b(
        transcript_hash, digest_size=64, key=shared_secret, person=_PERSON_PRK
    ).digest()
    c2s = hashlib.blake2b(
        _LABEL_C2S, digest_size=SESSION_KEY_SIZE, key=prk, person=_PERSON_KEY
    ).digest()
    s2c = hashlib.blake2b(
        _LABEL_S2C, digest_size=SESSION_KEY_SIZE, key=prk, person=_PERSON_KEY
    ).digest()
    return c2s, s2c


__all__ = [
    "SESSION_KEY_SIZE",
    "TRANSCRIPT_HASH_SIZE",
    "X25519_KEY_SIZE",
    "EphemeralKey",
    "derive_session_keys",
    "transcript_hash",
]
