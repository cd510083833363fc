"""Ed25519 signing identities (PyNaCl).

An ``Identity`` holds a 32-byte seed from which libsodium derives the signing key; the
public key names the node (its libp2p peer id is derived from it in ``net/``). Signatures are
deterministic (RFC 8032), which is what lets ``protocols/vectors`` pin exact bytes.
"""

from __future__ import annotations

import hashlib

import nacl.exceptions
import nacl.signing

from phala_p2p.errors import UsageError

SEED_SIZE = 32
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64


class Identity:
    """An Ed25519 signing identity. ``repr`` shows the public key only, never the seed."""

    __slots__ = ("_public_key", "_seed", "_signing_key")

    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        if not isinstance(signing_key, nacl.signing.SigningKey):
            raise UsageError("Identity wraps a SigningKey; use generate() or from_seed()")
        self._signing_key = signing_key
        self._seed = bytes(signing_key)
        self._public_key = bytes(signing_key.verify_key)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh identity from the operating system's random source."""
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """The identity derived from a 32-byte seed (UsageError for anything else)."""
        if not isinstance(seed, bytes | bytearray) or len(seed) != SEED_SIZE:
            raise UsageError(f"an Ed25519 seed is exactly {SEED_SIZE} bytes")
        return cls(nacl.signing.SigningKey(bytes(seed)))

    @property
    def seed(self) -> bytes:
        """The 32-byte secret seed. Keep it secret; store it only through ``keyfile``."""
        return self._seed

    @property
    def public_key(self) -> bytes:
        """The 32-byte Ed25519 public key."""
        return self._public_key

    def sign(self, message: bytes) -> bytes:
        """The 64-byte detached signature of ``message``."""
        if not isinstance(message, bytes | bytearray | memoryview):
            raise UsageError("sign takes bytes")
        signature: bytes = self._signing_key.sign(bytes(message)).signature
        return signature

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Identity):
            return NotImplemented
        return self._public_key == other._public_key

    def __hash__(self) -> int:
        return hash(self._public_key)

    def __repr__(self) -> str:
        return f"Identity(public_key={self._public_key.hex()})"


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True if ``signature`` is ``public_key``'s valid Ed25519 signature of ``message``.

    Never raises: wrong types, wrong lengths, small-order keys and non-canonical signatures
    all give False.
    """
    if not (
        isinstance(public_key, bytes)
        and isinstance(message, bytes | bytearray | memoryview)
        and isinstance(signature, bytes)
        and len(public_key) == PUBLIC_KEY_SIZE
        and len(signature) == SIGNATURE_SIZE
    ):
        return False
    try:
        nacl.signing.VerifyKey(public_key).verify(bytes(message), signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError, TypeError):
        return False
    return True


__all__ = ["PUBLIC_KEY_SIZE", "SEED_SIZE", "SIGNATURE_SIZE", "Identity", "verify_signature"]


def derive_identity(seed: int | bytes, index: int) -> Identity:
    """A reproducible identity: node ``index`` of a devnet made with ``seed`` (test and
    development networks only: anyone who knows the seed has the key)."""
    base = seed if isinstance(seed, bytes) else str(seed).encode()
    return Identity.from_seed(hashlib.blake2b(base + b"/%d" % index, digest_size=32).digest())
