"""Blocks, votes, proposals and commit certificates, with their signed bytes.

Byte layouts are specified in protocols/consensus.md; every signed byte string starts with a
domain tag and includes the chain id, so a signature never means anything on another chain or
in another message type.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import IntEnum
from functools import cached_property

from phala_p2p.chain.tables import pack
from phala_p2p.chain.tx import Tx
from phala_p2p.chain.validators import ValidatorSet
from phala_p2p.crypto.identity import verify_signature
from phala_p2p.errors import ProtocolViolation
from phala_p2p.wire.codec import message

HEADER_DOMAIN = b"phala/header/1\x00"
TXS_DOMAIN = b"phala/txs/1\x00"
VOTE_DOMAIN = b"phala/vote/1\x00"
PROPOSAL_DOMAIN = b"phala/proposal/1\x00"
MAX_HEIGHT = (1 << 62) - 1
MAX_ROUND = (1 << 31) - 1
MAX_BLOCK_TXS_WIRE = 100_000
MAX_COMMIT_SIGS = 10_000


class VoteType(IntEnum):
    PREVOTE = 1
    PRECOMMIT = 2


def _check_hash(value: bytes, what: str) -> None:
    if len(value) != 32:
        raise ProtocolViolation(f"{what} must be 32 bytes")


def _check_hr(height: int, round_: int) -> None:
    if not 1 <= height <= MAX_HEIGHT:
        raise ProtocolViolation("height out of range")
    if not 0 <= round_ <= MAX_ROUND:
        raise ProtocolViolation("round out of range")


def txs_root(txs: tuple[Tx, ...] | list[Tx]) -> bytes:
    """SHA-256 over the domain tag and the concatenated transaction ids, in block order."""
    return hashlib.sha256(TXS_DOMAIN + b"".join(tx.id for tx in txs)).digest()


def vote_sign_bytes(
    chain_id: str, vote_type: int, height: int, round_: int, block_hash: bytes | None
) -> bytes:
    return VOTE_DOMAIN + pack([chain_id, int(vote_type), height, round_, block_hash])


def proposal_sign_bytes(
    chain_id: str, height: int, round_: int, pol_round: int, block_hash: bytes
) -> bytes:
    return PROPOSAL_DOMAIN + pack([chain_id, height, round_, pol_round, block_hash])


@message(100)
@dataclass(frozen=True)
class BlockHeader:
    chain_id: str = field(metadata={"max_len": 64})
    height: int
    round: int
    parent_hash: bytes = field(metadata={"max_len": 32})
    time_ms: int
    proposer: bytes = field(metadata={"max_len": 32})
    txs_root: bytes = field(metadata={"max_len": 32})
    state_root: bytes = field(metadata={"max_len": 32})
    validators_hash: bytes = field(metadata={"max_len": 32})

    def validate(self) -> None:
        _check_hr(self.height, self.round)
        for name in ("parent_hash", "proposer", "txs_root", "state_root", "validators_hash"):
            _check_hash(getattr(self, name), name)
        if not 0 <= self.time_ms <= MAX_HEIGHT:
            raise ProtocolViolation("block time out of range")

    @cached_property
    def hash(self) -> bytes:
        fields = [
            self.chain_id,
            self.height,
            self.round,
            self.parent_hash,
            self.time_ms,
            self.proposer,
            self.txs_root,
            self.state_root,
            self.validators_hash,
        ]
        return hashlib.sha256(HEADER_DOMAIN + pack(fields)).digest()


@message(101)
@dataclass(frozen=True)
class Block:
    """A header and its transactions; the block's hash is its header's hash."""

    header: BlockHeader
    txs: tuple[Tx, ...] = field(metadata={"max_len": MAX_BLOCK_TXS_WIRE})

    @property
    def hash(self) -> bytes:
        return self.header.hash

    @property
    def height(self) -> int:
        return self.header.height

    @property
    def transactions(self) -> tuple[Tx, ...]:
        return self.txs

    def txs_match_root(self) -> bool:
        return txs_root(self.txs) == self.header.txs_root


@message(102)
@dataclass(frozen=True)
class Vote:
    """A prevote or precommit for a block hash, or for nil (``block_hash is None``)."""

    vote_type: VoteType
    height: int
    round: int
    block_hash: bytes | None = field(metadata={"max_len": 32})
    validator: bytes = field(metadata={"max_len": 32})
    signature: bytes = field(metadata={"max_len": 64})

    def validate(self) -> None:
        _check_hr(self.height, self.round)
        if self.block_hash is not None:
            _check_hash(self.block_hash, "vote block hash")
        _check_hash(self.validator, "vote validator")
        if len(self.signature) != 64:
            raise ProtocolViolation("vote signature must be 64 bytes")

    def sign_bytes(self, chain_id: str) -> bytes:
        return vote_sign_bytes(chain_id, self.vote_type, self.height, self.round, self.block_hash)

    def verify(self, chain_id: str) -> bool:
        return verify_signature(self.validator, self.sign_bytes(chain_id), self.signature)


@message(103)
@dataclass(frozen=True)
class CommitSig:
    validator: bytes = field(metadata={"max_len": 32})
    signature: bytes = field(metadata={"max_len": 64})

    def validate(self) -> None:
        _check_hash(self.validator, "commit validator")
        if len(self.signature) != 64:
            raise ProtocolViolation("commit signature must be 64 bytes")


@message(104)
@dataclass(frozen=True)
class Commit:
    """Precommits of one round for one block, sorted by validator key, > 2/3 of the power."""

    height: int
    round: int
    block_hash: bytes = field(metadata={"max_len": 32})
    sigs: tuple[CommitSig, ...] = field(metadata={"max_len": MAX_COMMIT_SIGS})

    def validate(self) -> None:
        _check_hr(self.height, self.round)
        _check_hash(self.block_hash, "commit block hash")

    def vote(self, sig: CommitSig) -> Vote:
        return Vote(
            VoteType.PRECOMMIT,
            self.height,
            self.round,
            self.block_hash,
            sig.validator,
            sig.signature,
        )


@message(105)
@dataclass(frozen=True)
class Proposal:
    """The round's proposer proposes ``block``; ``pol_round`` is the paper's validRound (-1)."""

    height: int
    round: int
    pol_round: int
    block: Block
    proposer: bytes = field(metadata={"max_len": 32})
    signature: bytes = field(metadata={"max_len": 64})

    def validate(self) -> None:
        _check_hr(self.height, self.round)
        if not -1 <= self.pol_round < self.round:
            raise ProtocolViolation("pol_round must be in [-1, round)")
        _check_hash(self.proposer, "proposer")
        if len(self.signature) != 64:
            raise ProtocolViolation("proposal signature must be 64 bytes")
        if self.block.header.height != self.height:
            raise ProtocolViolation("proposal height differs from its block's height")

    def sign_bytes(self, chain_id: str) -> bytes:
        return proposal_sign_bytes(
            chain_id, self.height, self.round, self.pol_round, self.block.hash
        )

    def verify(self, chain_id: str) -> bool:
        return verify_signature(self.proposer, self.sign_bytes(chain_id), self.signature)


@message(106)
@dataclass(frozen=True)
class CommittedBlock:
    """A finalized block with its commit certificate (gossip ``phala/blocks/1``, sync)."""

    block: Block
    commit: Commit

    def validate(self) -> None:
        if self.commit.height != self.block.height:
            raise ProtocolViolation("commit height differs from block height")


def verify_commit(
    chain_id: str,
    block: Block,
    commit: Commit,
    valset: ValidatorSet,
    *,
    light: bool = False,
) -> None:
    """Check that ``commit`` certifies ``block`` with > 2/3 of ``valset``'s power.

    Raises ProtocolViolation(reason="bad_commit"). Every included signature is checked,
    unless ``light``: then signatures are checked only until they carry more than 2/3 of
    the power (CometBFT's VerifyCommitLight; the rest must still be sorted gatekeepers).
    """
    if commit.height != block.height or commit.block_hash != block.hash:
        raise ProtocolViolation("commit is for another block", reason="bad_commit")
    if len(commit.sigs) > len(valset):
        raise ProtocolViolation("commit has more signatures than validators", reason="bad_commit")
    power = 0
    previous = b""
    sign_bytes = vote_sign_bytes(
        chain_id, VoteType.PRECOMMIT, commit.height, commit.round, commit.block_hash
    )
    for sig in commit.sigs:
        if sig.validator <= previous:
            raise ProtocolViolation("commit signatures unsorted or repeated", reason="bad_commit")
        previous = sig.validator
        weight = valset.power(sig.validator)
        if weight == 0:
            raise ProtocolViolation("commit signed by a non-validator", reason="bad_commit")
        if light and valset.has_two_thirds(power):
            continue
        if not verify_signature(sig.validator, sign_bytes, sig.signature):
            raise ProtocolViolation("bad commit signature", reason="bad_commit")
        power += weight
    if not valset.has_two_thirds(power):
        raise ProtocolViolation("commit has no 2/3 majority", reason="bad_commit")
