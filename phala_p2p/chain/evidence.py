"""Double-sign evidence: two conflicting votes signed by one validator."""

from __future__ import annotations

from dataclasses import dataclass

from phala_p2p.chain.block import Vote
from phala_p2p.errors import ProtocolViolation
from phala_p2p.wire.codec import message


def _hash_order(h: bytes | None) -> bytes:
    return b"" if h is None else h


@message(107)
@dataclass(frozen=True)
class DoubleSignEvidence:
    """Two votes of one validator for the same (type, height, round) and different blocks.

    Canonical form: ``vote_a.block_hash < vote_b.block_hash`` with nil ordering first, so the
    same offence always has the same bytes.
    """

    vote_a: Vote
    vote_b: Vote

    def validate(self) -> None:
        a, b = self.vote_a, self.vote_b
        if (a.vote_type, a.height, a.round, a.validator) != (
            b.vote_type,
            b.height,
            b.round,
            b.validator,
        ):
            raise ProtocolViolation(
                "evidence votes are not for the same slot", reason="bad_evidence"
            )
        if not _hash_order(a.block_hash) < _hash_order(b.block_hash):
            raise ProtocolViolation(
                "evidence votes not conflicting or not canonical", reason="bad_evidence"
            )

    @classmethod
    def of(cls, one: Vote, other: Vote) -> DoubleSignEvidence:
        """Canonical evidence from two conflicting votes (in any order)."""
        if _hash_order(one.block_hash) < _hash_order(other.block_hash):
            ev = cls(one, other)
        else:
            ev = cls(other, one)
        ev.validate()
        return ev

    @property
    def validator(self) -> bytes:
        return self.vote_a.validator

    @property
    def height(self) -> int:
        return self.vote_a.height

    @property
    def key(self) -> tuple[bytes, int, int, int]:
        """The offence's slot: (validator, height, round, vote type)."""
        a = self.vote_a
        return (a.validator, a.height, a.round, int(a.vote_type))

    def verify(self, chain_id: str) -> bool:
        """Both signatures are the validator's (structure is checked by ``validate``)."""
        return self.vote_a.verify(chain_id) and self.vote_b.verify(chain_id)
