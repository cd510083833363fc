"""Vote bookkeeping of one (round, vote type) for the consensus machine."""

from __future__ import annotations

from phala_p2p.chain.block import Vote
from phala_p2p.chain.validators import ValidatorSet

MAX_VALUES_PER_VOTER = 4  # conflicting values counted per validator, beyond proposed blocks


class VoteSet:
    """Votes of one (round, type). Quorums of "any" count each validator once; the quorum of
    a value counts every validator that voted for it, so an equivocator's votes count for
    each of its values, as the paper's "2f+1 messages" do (safety needs > 1/3 equivocating
    power to break). Conflicting values are kept for blocks proposed at this height, and up
    to ``MAX_VALUES_PER_VOTER`` values per validator otherwise."""

    __slots__ = ("by_hash", "extra", "power", "votes")

    def __init__(self) -> None:
        self.votes: dict[bytes, Vote] = {}  # the first vote of each validator
        self.extra: dict[tuple[bytes, bytes | None], Vote] = {}  # its conflicting votes
        self.by_hash: dict[bytes | None, int] = {}
        self.power = 0

    def add(self, vote: Vote, power: int) -> None:
        self.votes[vote.validator] = vote
        self.power += power
        self.by_hash[vote.block_hash] = self.by_hash.get(vote.block_hash, 0) + power

    def add_conflicting(self, vote: Vote, power: int, *, proposed: bool) -> None:
        key = (vote.validator, vote.block_hash)
        if key in self.extra:
            return
        if not proposed and sum(1 for v, _ in self.extra if v == vote.validator) >= (
            MAX_VALUES_PER_VOTER - 1
        ):
            return
        self.extra[key] = vote
        self.by_hash[vote.block_hash] = self.by_hash.get(vote.block_hash, 0) + power

    def has(self, validator: bytes, block_hash: bytes | None) -> bool:
        first = self.votes.get(validator)
        if first is not None and first.block_hash == block_hash:
            return True
        return (validator, block_hash) in self.extra

    def votes_for(self, block_hash: bytes | None) -> list[Vote]:
        """Votes for ``block_hash``, one per validator, sorted by validator key."""
        found = {v.validator: v for v in self.votes.values() if v.block_hash == block_hash}
        for (validator, bh), v in self.extra.items():
            if bh == block_hash:
                found.setdefault(validator, v)
        return [found[k] for k in sorted(found)]


NO_MAJORITY = b"none"  # "no 2/3 majority" marker, distinct from nil (None) and from 32-byte hashes


def majority(vs: VoteSet | None, valset: ValidatorSet) -> bytes | None:
    if vs is None:
        return NO_MAJORITY
    for h, p in vs.by_hash.items():
        if valset.has_two_thirds(p):
            return h
    return NO_MAJORITY
