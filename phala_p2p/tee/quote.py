"""Simulated attestation quotes, report data, session offers and usage receipts (sans-IO).

A quote binds an enclave's measurement to *report data*, a 64-byte hash of the enclave's public
keys (and of a verifier's nonce when one is asked for). On the simulated platform the quote is
signed by a dev attestation root key named in genesis: whoever holds that key can forge quotes,
which is exactly what makes it a simulation. Real platforms use DCAP (:mod:`phala_p2p.tee.dcap`).

Byte layouts and signing domains are specified in ``protocols/attest.md``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Protocol

import msgpack

from phala_p2p.crypto.identity import verify_signature
from phala_p2p.errors import AttestationError, ProtocolViolation, UsageError
from phala_p2p.wire.codec import message

__all__ = [
    "MAX_NONCE_LEN",
    "SIM_PLATFORM",
    "SIM_QUOTE_LEN",
    "Signer",
    "SimQuote",
    "UsageReceipt",
    "make_report_data",
    "sign_receipt",
    "sign_sim_quote",
    "verify_receipt",
    "verify_sim_quote",
]

SIM_PLATFORM: Final = "SIM"
MAX_NONCE_LEN: Final = 64
MAX_PUBKEYS: Final = 8
_MAGIC: Final = b"PSQ1"
_LAYOUT: Final = struct.Struct(">4s32s64sQ32s64s")
SIM_QUOTE_LEN: Final = _LAYOUT.size  # 204
_SIGNED_LEN: Final = SIM_QUOTE_LEN - 64
_QUOTE_DOMAIN: Final = b"phala/tee/sim-quote/v1\x00"
_RECEIPT_DOMAIN: Final = b"phala/tee/usage-receipt/v1\x00"
_REPORT_PERSON: Final = b"phala/tee/rdata1"


class Signer(Protocol):
    """Anything that holds an Ed25519 key: ``phala_p2p.crypto.identity.Identity`` fits."""

    @property
    def public_key(self) -> bytes: ...

    def sign(self, msg: bytes) -> bytes: ...


def make_report_data(*pubkeys: bytes, nonce: bytes = b"") -> bytes:
    """64 bytes binding public keys (in order) and an optional verifier nonce.

    ``BLAKE2b-512(person="phala/tee/rdata1", msgpack([[pubkey, ...], nonce]))``.
    """
    if not 1 <= len(pubkeys) <= MAX_PUBKEYS:
        raise UsageError(f"report data binds 1..{MAX_PUBKEYS} public keys")
    for key in pubkeys:
        if not isinstance(key, bytes) or not 1 <= len(key) <= 64:
            raise UsageError("each public key must be 1..64 bytes")
    if not isinstance(nonce, bytes) or len(nonce) > MAX_NONCE_LEN:
        raise UsageError(f"nonce must be at most {MAX_NONCE_LEN} bytes")
    packed = msgpack.packb([list(pubkeys), nonce], use_bin_type=True)
    return hashlib.blake2b(packed, digest_size=64, person=_REPORT_PERSON).digest()


@dataclass(frozen=True)
class SimQuote:
    """A simulated quote: fixed 204-byte layout, see ``protocols/attest.md``."""

    measurement: bytes
    report_data: bytes
    timestamp: int
    root_pubkey: bytes
    signature: bytes
    platform: str = SIM_PLATFORM

    def __post_init__(self) -> None:
        if self.platform != SIM_PLATFORM:
            raise UsageError(f"SimQuote.platform must be {SIM_PLATFORM!r}")
        for name, length in (
            ("measurement", 32),
            ("report_data", 64),
            ("root_pubkey", 32),
            ("signature", 64),
        ):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != length:
                raise UsageError(f"SimQuote.{name} must be {length} bytes")
        ts = self.timestamp
        if isinstance(ts, bool) or not isinstance(ts, int) or not 0 <= ts < 2**63:
            raise UsageError("SimQuote.timestamp must be a non-negative int")

    @property
    def tee(self) -> str:
        return self.platform

    def signed_part(self) -> bytes:
        return self.to_bytes()[:_SIGNED_LEN]

    def to_bytes(self) -> bytes:
        return _LAYOUT.pack(
            _MAGIC,
            self.measurement,
            self.report_data,
            self.timestamp,
            self.root_pubkey,
            self.signature,
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> SimQuote:
        """Parse (not verify) a raw quote; ProtocolViolation if it is malformed."""
        if not isinstance(raw, bytes) or len(raw) != SIM_QUOTE_LEN:
            raise ProtocolViolation(f"simulated quote must be {SIM_QUOTE_LEN} bytes")
        magic, measurement, report_data, ts, root, sig = _LAYOUT.unpack(raw)
        if magic != _MAGIC:
            raise ProtocolViolation("not a simulated quote (bad magic)")
        if ts >= 2**63:
            raise ProtocolViolation("simulated quote timestamp out of range")
        return cls(measurement, report_data, ts, root, sig)


def sign_sim_quote(root: Signer, measurement: bytes, report_data: bytes, timestamp: int) -> bytes:
    """Make and sign a simulated quote; returns its raw bytes."""
    unsigned = SimQuote(measurement, report_data, timestamp, root.public_key, bytes(64))
    signature = root.sign(_QUOTE_DOMAIN + unsigned.signed_part())
    return SimQuote(measurement, report_data, timestamp, root.public_key, signature).to_bytes()


def verify_sim_quote(raw: bytes, roots: Iterable[bytes], now: int) -> SimQuote:
    """Check a simulated quote's format and its signature by one of ``roots``.

    ``now`` is accepted for symmetry with :func:`phala_p2p.tee.dcap.verify_quote`; age and
    measurement are the policy's to judge. Raises AttestationError.
    """
    if isinstance(now, bool) or not isinstance(now, int):
        raise AttestationError("verification time must be an int")
    try:
        quote = SimQuote.from_bytes(raw)
    except ProtocolViolation as err:
        raise AttestationError(f"malformed simulated quote: {err}") from err
    trusted = {bytes(r) for r in roots}
    if quote.root_pubkey not in trusted:
        raise AttestationError(
            f"simulated quote is signed by an unknown root {quote.root_pubkey.hex()[:16]}…"
        )
    if not verify_signature(
        quote.root_pubkey, _QUOTE_DOMAIN + quote.signed_part(), quote.signature
    ):
        raise AttestationError("simulated quote signature is invalid")
    return quote


@message(302)
@dataclass(frozen=True)
class UsageReceipt:
    """What the enclave signs after a job: who ran what, for how much fuel, with what output.

    ``bytes_in`` counts the plaintext module and input, ``bytes_out`` the plaintext output;
    ``output_hash`` is the plaintext output's hash (``market.receipt.output_hash``).
    ``enclave`` is the enclave identity key that signed it; clients check it against the
    attested identity.
    """

    session_id: bytes = field(metadata={"max_len": 16})
    job_id: bytes = field(metadata={"max_len": 16})
    measurement: bytes = field(metadata={"max_len": 32})
    module_hash: bytes = field(metadata={"max_len": 32})
    fuel_limit: int = field(metadata={"min": 0, "max": 2**63 - 1})
    fuel_used: int = field(metadata={"min": 0, "max": 2**63 - 1})
    bytes_in: int = field(metadata={"min": 0, "max": 2**63 - 1})
    bytes_out: int = field(metadata={"min": 0, "max": 2**63 - 1})
    output_hash: bytes = field(metadata={"max_len": 32})
    enclave: bytes = field(metadata={"max_len": 32})
    signature: bytes = field(default=b"", metadata={"max_len": 64})

    def __post_init__(self) -> None:
        for name, length in (
            ("session_id", 16),
            ("job_id", 16),
            ("measurement", 32),
            ("module_hash", 32),
            ("output_hash", 32),
            ("enclave", 32),
        ):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != length:
                raise UsageError(f"UsageReceipt.{name} must be {length} bytes")
        for name in ("fuel_limit", "fuel_used", "bytes_in", "bytes_out"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
                raise UsageError(f"UsageReceipt.{name} must be a non-negative int")
        if self.fuel_used > self.fuel_limit:
            raise UsageError("UsageReceipt.fuel_used exceeds fuel_limit")
        if not isinstance(self.signature, bytes) or len(self.signature) not in (0, 64):
            raise UsageError("UsageReceipt.signature must be empty or 64 bytes")

    def signing_bytes(self) -> bytes:
        fields = [
            self.session_id,
            self.job_id,
            self.measurement,
            self.module_hash,
            self.fuel_limit,
            self.fuel_used,
            self.bytes_in,
            self.bytes_out,
            self.output_hash,
            self.enclave,
        ]
        packed: bytes = msgpack.packb(fields, use_bin_type=True)
        return _RECEIPT_DOMAIN + packed


def sign_receipt(identity: Signer, receipt: UsageReceipt) -> UsageReceipt:
    """Return ``receipt`` signed by the enclave ``identity`` (its ``enclave`` field must match)."""
    if receipt.enclave != identity.public_key:
        raise UsageError("receipt.enclave must be the signer's public key")
    sig = identity.sign(receipt.signing_bytes())
    return dataclasses.replace(receipt, signature=sig)


def verify_receipt(receipt: UsageReceipt, enclave_pub: bytes) -> None:
    """Check that ``receipt`` was signed by ``enclave_pub``; AttestationError otherwise."""
    if not hmac.compare_digest(receipt.enclave, enclave_pub):
        raise AttestationError("usage receipt is from another enclave")
    if not verify_signature(enclave_pub, receipt.signing_bytes(), receipt.signature):
        raise AttestationError("usage receipt signature is invalid")
