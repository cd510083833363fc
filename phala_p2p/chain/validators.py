"""The gatekeeper (validator) set and stake-weighted proposer rotation.

Proposer selection follows CometBFT's proposer-priority algorithm, with integer arithmetic
specified in protocols/consensus.md so that every node computes the same proposer for every
(height, round).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property

from phala_p2p.chain.tables import pack
from phala_p2p.errors import UsageError

PRIORITY_WINDOW_FACTOR = 2  # rescale when max-min priority exceeds this times total power


@dataclass(frozen=True)
class ValidatorSet:
    """Validators sorted by public key, each with its voting power (its bonded stake)."""

    validators: tuple[tuple[bytes, int], ...]

    def __post_init__(self) -> None:
        previous = b""
        for pubkey, power in self.validators:
            if not isinstance(pubkey, bytes) or len(pubkey) != 32:
                raise UsageError("validator keys are 32 bytes")
            if type(power) is not int or power <= 0:
                raise UsageError("validator power must be a positive int")
            if pubkey <= previous:
                raise UsageError("validators must be sorted by key without duplicates")
            previous = pubkey

    @classmethod
    def from_powers(cls, powers: dict[bytes, int]) -> ValidatorSet:
        return cls(tuple(sorted((k, p) for k, p in powers.items() if p > 0)))

    @cached_property
    def powers(self) -> dict[bytes, int]:
        return dict(self.validators)

    @cached_property
    def total_power(self) -> int:
        return sum(p for _, p in self.validators)

    @cached_property
    def hash(self) -> bytes:
        packed = pack([[k, p] for k, p in self.validators])
        return hashlib.sha256(b"phala/valset/1\x00" + packed).digest()

    def __len__(self) -> int:
        return len(self.validators)

    def __contains__(self, pubkey: object) -> bool:
        return pubkey in self.powers

    def power(self, pubkey: bytes) -> int:
        return self.powers.get(pubkey, 0)

    def has_two_thirds(self, power: int) -> bool:
        """``power`` is more than 2/3 of the total (the paper's 2f+1)."""
        return power * 3 > self.total_power * 2

    def has_one_third(self, power: int) -> bool:
        """``power`` is more than 1/3 of the total (the paper's f+1)."""
        return power * 3 > self.total_power


def _div_trunc(a: int, b: int) -> int:
    """Integer division truncating toward zero (as Go and CometBFT do)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


@dataclass(frozen=True)
class ProposerSchedule:
    """Proposer priorities for one height; ``proposer(round)`` is deterministic."""

    valset: ValidatorSet
    priorities: tuple[int, ...]
    _cache: list[tuple[bytes, tuple[int, ...]]] = field(
        default_factory=list, compare=False, repr=False
    )

    @classmethod
    def initial(cls, valset: ValidatorSet) -> ProposerSchedule:
        return cls(valset, tuple(0 for _ in valset.validators))

    def _step(self, prios: tuple[int, ...]) -> tuple[bytes, tuple[int, ...]]:
        """One increment: rescale, center, add powers, pick the max, subtract the total."""
        vals = self.valset.validators
        total = self.valset.total_power
        p = list(prios)
        diff = max(p) - min(p)
        limit = PRIORITY_WINDOW_FACTOR * total
        if diff > limit:
            ratio = -(-diff // limit)
            p = [_div_trunc(x, ratio) for x in p]
        avg = sum(p) // len(p)
        p = [x - avg for x in p]
        p = [x + power for x, (_, power) in zip(p, vals, strict=True)]
        best = 0
        for i in range(1, len(p)):
            # ties go to the smallest key, which comes first in the sorted set
            if p[i] > p[best]:
                best = i
        p[best] -= total
        return vals[best][0], tuple(p)

    def proposer(self, round_: int) -> bytes:
        """The proposer of ``round_``: the (round+1)-th increment from this height's priorities."""
        if round_ < 0:
            raise UsageError("round must be >= 0")
        if not self.valset.validators:
            raise UsageError("empty validator set has no proposer")
        prios = self._cache[-1][1] if self._cache else self.priorities
        while len(self._cache) <= round_:
            chosen, prios = self._step(prios)
            self._cache.append((chosen, prios))
        return self._cache[round_][0]

    def next_height(self, new_valset: ValidatorSet) -> ProposerSchedule:
        """Priorities for the next height: one increment, then apply set changes.

        Kept validators keep their priority; new ones start at -1.125 x the new total power
        (so that a newcomer does not propose at once); removed ones are dropped. One increment
        per height, whatever the round at which the block was committed.
        """
        if not self.valset.validators:
            return ProposerSchedule.initial(new_valset)
        self.proposer(0)
        after = dict(zip((k for k, _ in self.valset.validators), self._cache[0][1], strict=True))
        newcomer = -(new_valset.total_power + (new_valset.total_power >> 3))
        prios = tuple(after.get(k, newcomer) for k, _ in new_valset.validators)
        if not prios:
            return ProposerSchedule(new_valset, ())
        avg = sum(prios) // len(prios)
        return ProposerSchedule(new_valset, tuple(x - avg for x in prios))
