"""Gatekeeper set hashing and stake-weighted proposer rotation."""

from __future__ import annotations

from collections import Counter

import pytest

from phala_p2p.chain.validators import ProposerSchedule, ValidatorSet
from phala_p2p.errors import UsageError


def _keys(n: int) -> list[bytes]:
    return [bytes([i + 1]) * 32 for i in range(n)]


def test_set_is_sorted_and_hashed() -> None:
    a, b = _keys(2)
    vs = ValidatorSet.from_powers({b: 5, a: 3})
    assert vs.validators == ((a, 3), (b, 5))
    assert vs.total_power == 8
    assert vs.hash == ValidatorSet.from_powers({a: 3, b: 5}).hash
    assert vs.hash != ValidatorSet.from_powers({a: 3, b: 6}).hash
    with pytest.raises(UsageError):
        ValidatorSet(((b, 5), (a, 3)))


def test_thresholds_are_strict() -> None:
    vs = ValidatorSet.from_powers(dict.fromkeys(_keys(3), 1))
    assert not vs.has_two_thirds(2)
    assert vs.has_two_thirds(3)
    assert not vs.has_one_third(1)
    assert vs.has_one_third(2)


def _proposers(powers: dict[bytes, int], heights: int) -> Counter[bytes]:
    valset = ValidatorSet.from_powers(powers)
    schedule = ProposerSchedule.initial(valset)
    counts: Counter[bytes] = Counter()
    for _ in range(heights):
        counts[schedule.proposer(0)] += 1
        schedule = schedule.next_height(valset)
    return counts


def test_rotation_is_weighted_by_stake() -> None:
    a, b, c = _keys(3)
    counts = _proposers({a: 1, b: 2, c: 7}, 1000)
    assert counts == {a: 100, b: 200, c: 700}


def test_equal_stake_round_robin() -> None:
    keys = _keys(4)
    counts = _proposers(dict.fromkeys(keys, 10), 8)
    assert set(counts.values()) == {2}


def test_rounds_rotate_within_a_height() -> None:
    keys = _keys(4)
    schedule = ProposerSchedule.initial(ValidatorSet.from_powers(dict.fromkeys(keys, 1)))
    assert {schedule.proposer(r) for r in range(4)} == set(keys)
    assert schedule.proposer(5) == schedule.proposer(5)


def test_newcomer_waits_and_removed_validator_is_gone() -> None:
    a, b, c = _keys(3)
    old = ValidatorSet.from_powers({a: 10, b: 10})
    new = ValidatorSet.from_powers({a: 10, c: 10})
    schedule = ProposerSchedule.initial(old).next_height(new)
    picks = [schedule.proposer(r) for r in range(3)]
    assert b not in picks
    assert picks[0] == a  # the newcomer starts behind


def test_schedule_is_deterministic_across_instances() -> None:
    powers = {k: i + 1 for i, k in enumerate(_keys(5))}
    s1 = ProposerSchedule.initial(ValidatorSet.from_powers(powers))
    s2 = ProposerSchedule.initial(ValidatorSet.from_powers(powers))
    for _ in range(50):
        assert [s1.proposer(r) for r in range(3)] == [s2.proposer(r) for r in range(3)]
        s1 = s1.next_height(s1.valset)
        s2 = s2.next_height(s2.valset)
