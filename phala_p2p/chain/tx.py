"""Signed transactions: the envelope, its signed bytes, and why a transaction may be refused.

A ``Tx`` carries its typed body as the body message's wire encoding plus the body's kind, so
later features add transaction kinds (``registry.register_tx_kind``) without touching this
envelope. See protocols/ledger.md.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Any, Protocol

from phala_p2p.chain.tables import pack
from phala_p2p.crypto.identity import verify_signature
from phala_p2p.errors import ProtocolViolation
from phala_p2p.wire.codec import encode, kind_of, message

TX_DOMAIN = b"phala/tx/1\x00"
MAX_TX_BODY = 64 * 1024  # wire bound; the chain's max_tx_size is the tighter, governed bound
MAX_U63 = (1 << 63) - 1
VERIFIED_CACHE_SIZE = 65_536

# ids of transactions whose signature verified; an id commits to the signed bytes and the
# signature, so a hit means the very same check succeeded before
_verified: OrderedDict[bytes, None] = OrderedDict()


class Signer(Protocol):
    """What signs transactions and votes (``crypto.identity.Identity`` fits)."""

    @property
    def public_key(self) -> bytes: ...

    def sign(self, msg: bytes) -> bytes: ...


class TxRejectReason(StrEnum):
    BAD_SIGNATURE = "bad_signature"
    BAD_NONCE = "bad_nonce"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    UNKNOWN_ACCOUNT = "unknown_account"
    BELOW_MIN_STAKE = "below_min_stake"
    NOT_A_GATEKEEPER = "not_a_gatekeeper"
    UNKNOWN_PROPOSAL = "unknown_proposal"
    ALREADY_VOTED = "already_voted"
    VOTING_CLOSED = "voting_closed"
    BAD_EVIDENCE = "bad_evidence"
    UNKNOWN_ESCROW = "unknown_escrow"
    ESCROW_NOT_EXPIRED = "escrow_not_expired"
    NOT_AUTHORIZED = "not_authorized"
    MALFORMED = "malformed"
    WRONG_CHAIN = "wrong_chain"
    FEE_TOO_LOW = "fee_too_low"
    TX_TOO_LARGE = "tx_too_large"
    UNKNOWN_KIND = "unknown_kind"
    INVALID_PARAM = "invalid_param"
    LAST_GATEKEEPER = "last_gatekeeper"
    MEMPOOL_FULL = "mempool_full"
    DUPLICATE = "duplicate"
    ATTESTATION_FAILED = "attestation_failed"
    NOT_REGISTERED = "not_registered"
    # settlement, receipt evidence and liveness (chain/settlement.py, chain/liveness.py)
    BAD_AGREEMENT = "bad_agreement"
    BAD_RECEIPT = "bad_receipt"
    WRONG_AGREEMENT = "wrong_agreement"
    WRONG_ENCLAVE = "wrong_enclave"
    FUEL_OVER_LIMIT = "fuel_over_limit"
    ESCROW_MISMATCH = "escrow_mismatch"
    ESCROW_EXPIRED = "escrow_expired"
    ALREADY_SETTLED = "already_settled"
    MINER_REVOKED = "miner_revoked"
    EVIDENCE_USED = "evidence_used"
    NOT_CHALLENGED = "not_challenged"
    CHALLENGE_CLOSED = "challenge_closed"
    ALREADY_ANSWERED = "already_answered"


@dataclass(frozen=True)
class TxResult:
    """Outcome of ``LedgerState.apply_tx``: ``ok`` or a reason; a rejected tx changed nothing."""

    tx_id: bytes
    ok: bool
    reason: str | None = None  # a TxRejectReason for the core kinds
    detail: str = ""


def clear_verified_cache() -> None:
    """Forget which transaction signatures were verified (benchmarks, tests)."""
    _verified.clear()


def tx_sign_bytes(
    chain_id: str, sender: bytes, nonce: int, fee: int, kind: int, body: bytes
) -> bytes:
    return TX_DOMAIN + pack([chain_id, sender, nonce, fee, kind, body])


@message(110)
@dataclass(frozen=True)
class Tx:
    """A transaction signed by its sender's account key."""

    chain_id: str = field(metadata={"max_len": 64})
    sender: bytes = field(metadata={"max_len": 32})
    nonce: int
    fee: int
    kind: int
    body: bytes = field(metadata={"max_len": MAX_TX_BODY})
    signature: bytes = field(metadata={"max_len": 64})

    def validate(self) -> None:
        if len(self.sender) != 32:
            raise ProtocolViolation("tx sender must be 32 bytes")
        if len(self.signature) != 64:
            raise ProtocolViolation("tx signature must be 64 bytes")
        for name in ("nonce", "fee"):
            if not 0 <= getattr(self, name) <= MAX_U63:
                raise ProtocolViolation(f"tx {name} out of range")
        if not 0 <= self.kind <= 0xFFFF:
            raise ProtocolViolation("tx kind out of range")

    @classmethod
    def sign(cls, signer: Signer, *, chain_id: str, nonce: int, fee: int, body: Any) -> Tx:
        """Build and sign a transaction carrying ``body`` (a registered body message)."""
        kind = kind_of(body)
        body_bytes = encode(body)
        sender = signer.public_key
        sig = signer.sign(tx_sign_bytes(chain_id, sender, nonce, fee, kind, body_bytes))
        tx = cls(chain_id, sender, nonce, fee, kind, body_bytes, sig)
        tx.validate()
        return tx

    @cached_property
    def sign_bytes(self) -> bytes:
        return tx_sign_bytes(self.chain_id, self.sender, self.nonce, self.fee, self.kind, self.body)

    @cached_property
    def id(self) -> bytes:
        """SHA-256 of the signed bytes followed by the signature."""
        return hashlib.sha256(self.sign_bytes + self.signature).digest()

    @cached_property
    def size(self) -> int:
        """Bytes this transaction occupies in a block (its wire encoding)."""
        return len(encode(self))

    def verify(self) -> bool:
        """Whether the signature is the sender's over ``sign_bytes`` (results cached)."""
        if self.id in _verified:
            _verified.move_to_end(self.id)
            return True
        if not verify_signature(self.sender, self.sign_bytes, self.signature):
            return False
        _verified[self.id] = None
        if len(_verified) > VERIFIED_CACHE_SIZE:
            _verified.popitem(last=False)
        return True
