"""One consensus machine driven by hand-made messages: the paper's rules one by one."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pytest

from phala_p2p.chain.block import (
    Block,
    Proposal,
    Vote,
    VoteType,
    proposal_sign_bytes,
    vote_sign_bytes,
)
from phala_p2p.chain.consensus import (
    Action,
    Broadcast,
    CommitBlock,
    Consensus,
    ConsensusConfig,
    NeedSync,
    PersistSigned,
    ReportEvidence,
    ScheduleTimeout,
    SignedState,
    Step,
)
from phala_p2p.chain.view import ChainView
from phala_p2p.crypto.identity import Identity
from phala_p2p.errors import ProtocolViolation, UsageError

from .helpers import CHAIN_ID, FAST, genesis, identities

T0 = 1_000.0
PV, PC = VoteType.PREVOTE, VoteType.PRECOMMIT


class Rig:
    """A machine for one gatekeeper of four, and the other three as message factories."""

    def __init__(self, *, observer: bool = False, config: ConsensusConfig | None = None) -> None:
        self.ids = identities(4, seed=21)
        self.genesis = genesis(self.ids)
        self.by_key = {i.public_key: i for i in self.ids}
        probe = ChainView(self.genesis)
        # the machine's owner proposes in round 3 only, so rounds 0-2 are driven by messages
        self.me = Identity.from_seed(b"o" * 32) if observer else self.by_key[probe.proposer(3)]
        self.others = [i for i in self.ids if i != self.me]
        self.view = ChainView(self.genesis)
        self.m = Consensus(self.view, self.me, config=config)

    def start(self, signed_state: SignedState | None = None) -> list[Action]:
        if signed_state is not None:
            self.m = Consensus(ChainView(self.genesis), self.me, signed_state=signed_state)
            self.view = self.m.view
        return self.m.start(T0)

    def proposer(self, round_: int) -> Identity:
        return self.by_key[self.view.proposer(round_)]

    def block(self, round_: int, time_ms: int = 1_000_500) -> Block:
        builder = ChainView(self.genesis)
        return builder.build_block(
            [], proposer=self.proposer(round_).public_key, round_=round_, time_ms=time_ms
        )

    def proposal(self, round_: int, block: Block | None = None, pol_round: int = -1) -> Proposal:
        block = block or self.block(round_)
        who = self.proposer(round_)
        sb = proposal_sign_bytes(CHAIN_ID, 1, round_, pol_round, block.hash)
        return Proposal(1, round_, pol_round, block, who.public_key, who.sign(sb))

    def vote(
        self, who: Identity, t: VoteType, round_: int, bh: bytes | None, height: int = 1
    ) -> Vote:
        sb = vote_sign_bytes(CHAIN_ID, t, height, round_, bh)
        return Vote(t, height, round_, bh, who.public_key, who.sign(sb))

    def votes(
        self, who: Sequence[Identity], t: VoteType, round_: int, bh: bytes | None, now: float
    ) -> list[Action]:
        out: list[Action] = []
        for w in who:
            out += self.m.on_vote(self.vote(w, t, round_, bh), now)
        return out


def own_votes(actions: Sequence[Action]) -> list[Vote]:
    return [a.msg for a in actions if isinstance(a, Broadcast) and isinstance(a.msg, Vote)]


def test_prevote_then_lock_and_precommit_on_polka() -> None:
    rig = Rig()
    rig.start()
    p = rig.proposal(0)
    acts = rig.m.on_proposal(p, T0 + 0.1)
    assert [(v.vote_type, v.block_hash) for v in own_votes(acts)] == [(PV, p.block.hash)]
    assert rig.m.step == Step.PREVOTE
    acts = rig.votes(rig.others[:1], PV, 0, p.block.hash, T0 + 0.2)
    assert own_votes(acts) == []  # 2 of 4 is not a polka
    acts = rig.votes(rig.others[1:2], PV, 0, p.block.hash, T0 + 0.2)
    assert [(v.vote_type, v.block_hash) for v in own_votes(acts)] == [(PC, p.block.hash)]
    assert (rig.m.locked_round, rig.m.locked_hash) == (0, p.block.hash)
    assert (rig.m.valid_round, rig.m.valid_block) == (0, p.block)


def test_every_signature_is_persisted_before_it_is_broadcast() -> None:
    rig = Rig()
    rig.start()
    p = rig.proposal(0)
    acts = rig.m.on_proposal(p, T0 + 0.1)
    acts += rig.votes(rig.others[:2], PV, 0, p.block.hash, T0 + 0.2)
    own = [i for i, a in enumerate(acts) if isinstance(a, Broadcast)]
    assert len(own) == 2
    for i in own:
        persisted = acts[i - 1]
        assert isinstance(persisted, PersistSigned)
        vote = persisted.message
        assert isinstance(vote, Vote)
        assert acts[i] == Broadcast(vote)
        assert persisted.state.hrs == (vote.height, vote.round, int(vote.vote_type))
        assert persisted.state.sign_hash == hashlib.sha256(vote.sign_bytes(CHAIN_ID)).digest()


def test_decides_with_two_thirds_precommits_and_moves_on() -> None:
    rig = Rig()
    rig.start()
    p = rig.proposal(0)
    rig.m.on_proposal(p, T0 + 0.1)
    acts = rig.votes(rig.others, PC, 0, p.block.hash, T0 + 0.3)
    commits = [a for a in acts if isinstance(a, CommitBlock)]
    assert len(commits) == 1
    assert commits[0].block == p.block
    assert len(commits[0].commit.sigs) == 3
    assert rig.view.height == 1
    assert rig.m.height == 2
    # the next height starts after block_time
    assert rig.m.next_deadline() == pytest.approx(T0 + 0.3 + FAST.block_time_ms / 1000)


def test_no_decision_without_the_block() -> None:
    rig = Rig()
    rig.start()
    block = rig.block(0)
    acts = rig.votes(rig.others, PC, 0, block.hash, T0 + 0.3)
    assert not any(isinstance(a, CommitBlock) for a in acts)
    # ... and after sync_after the machine asks for the finalized block
    acts = rig.m.on_timeout(T0 + 0.3 + rig.m.config.sync_after)
    assert NeedSync(1) in acts


def test_locked_gatekeeper_prevotes_nil_for_another_block() -> None:
    rig = Rig()
    rig.start()
    a = rig.proposal(0)
    rig.m.on_proposal(a, T0 + 0.1)
    rig.votes(rig.others[:2], PV, 0, a.block.hash, T0 + 0.2)  # locks on A
    rig.votes(rig.others, PC, 0, None, T0 + 0.3)  # the others precommit nil
    assert rig.m.round == 0
    rig.m.on_timeout(T0 + 0.3 + FAST.timeout_precommit(0))
    assert rig.m.round == 1
    b = rig.proposal(1, rig.block(1, time_ms=1_000_900))
    assert b.block.hash != a.block.hash
    acts = rig.m.on_proposal(b, T0 + 0.7)
    assert [(v.round, v.block_hash) for v in own_votes(acts)] == [(1, None)]


def test_proposal_with_pol_round_unlocks() -> None:
    rig = Rig()
    rig.start()
    a = rig.proposal(0)
    rig.m.on_proposal(a, T0 + 0.1)
    rig.votes(rig.others[:2], PV, 0, a.block.hash, T0 + 0.2)  # locked on A in round 0
    rig.votes(rig.others, PC, 0, None, T0 + 0.3)
    rig.m.on_timeout(T0 + 0.3 + FAST.timeout_precommit(0))
    b_block = rig.block(1, time_ms=1_000_900)
    rig.votes(rig.others, PV, 1, b_block.hash, T0 + 0.8)  # a polka for B in round 1
    assert rig.m.locked_hash == a.block.hash  # B was never seen as a proposal here
    rig.votes(rig.others, PC, 1, None, T0 + 0.9)
    rig.m.on_timeout(T0 + 5.0)
    assert rig.m.round == 2
    # round 2 re-proposes B with pol_round=1: locked_round 0 <= 1, so B gets the prevote
    acts = rig.m.on_proposal(rig.proposal(2, b_block, pol_round=1), T0 + 5.1)
    assert [(v.round, v.block_hash) for v in own_votes(acts)] == [(2, b_block.hash)]


def test_pol_round_proposal_waits_for_the_polka() -> None:
    rig = Rig()
    rig.start()
    rig.votes(rig.others, PC, 0, None, T0 + 0.1)
    rig.m.on_timeout(T0 + 0.1 + FAST.timeout_precommit(0))
    rig.votes(rig.others, PC, 1, None, T0 + 0.8)
    rig.m.on_timeout(T0 + 5.0)
    assert rig.m.round == 2
    block = rig.block(1)
    acts = rig.m.on_proposal(rig.proposal(2, block, pol_round=1), T0 + 5.1)
    assert own_votes(acts) == []  # no 2f+1 prevotes for it in round 1 yet
    acts = rig.votes(rig.others, PV, 1, block.hash, T0 + 5.2)
    assert [(v.round, v.block_hash) for v in own_votes(acts)] == [(2, block.hash)]


def test_f_plus_one_from_a_higher_round_skips_to_it() -> None:
    rig = Rig()
    rig.start()
    rig.votes(rig.others[:1], PV, 5, None, T0 + 0.1)
    assert rig.m.round == 0  # 1/4 of the power is not more than 1/3
    rig.votes(rig.others[1:2], PC, 5, None, T0 + 0.1)
    assert rig.m.round == 5
    assert rig.m.step == Step.PROPOSE


def test_timeouts_grow_per_round() -> None:
    rig = Rig()
    acts = rig.start()
    assert ScheduleTimeout(T0 + FAST.timeout_propose(0)) in acts
    rig.votes(rig.others[:2], PV, 4, None, T0 + 1.0)
    assert rig.m.round == 4
    assert rig.m.next_deadline() == pytest.approx(
        min(T0 + 1.0 + FAST.timeout_propose(4), T0 + rig.m.config.rebroadcast_interval)
    )
    assert FAST.timeout_propose(4) > FAST.timeout_propose(0)
    assert FAST.timeout_prevote(3) == pytest.approx(
        (FAST.timeout_prevote_ms + 3 * FAST.timeout_prevote_delta_ms) / 1000
    )


def test_timeout_propose_prevotes_nil() -> None:
    rig = Rig()
    rig.start()
    acts = rig.m.on_timeout(T0 + FAST.timeout_propose(0))
    assert [(v.vote_type, v.block_hash) for v in own_votes(acts)] == [(PV, None)]


def test_mixed_prevotes_start_timeout_prevote_then_precommit_nil() -> None:
    rig = Rig()
    rig.start()
    p = rig.proposal(0)
    rig.m.on_proposal(p, T0 + 0.1)  # own prevote for the block
    acts = rig.votes(rig.others[:1], PV, 0, None, T0 + 0.2)
    acts += rig.votes(rig.others[1:2], PV, 0, hashlib.sha256(b"x").digest(), T0 + 0.2)
    assert ScheduleTimeout(T0 + 0.2 + FAST.timeout_prevote(0)) in acts
    assert own_votes(acts) == []
    acts = rig.m.on_timeout(T0 + 0.2 + FAST.timeout_prevote(0))
    assert [(v.vote_type, v.block_hash) for v in own_votes(acts)] == [(PC, None)]


def test_two_thirds_nil_prevotes_precommit_nil_at_once() -> None:
    rig = Rig()
    rig.start()
    rig.m.on_timeout(T0 + FAST.timeout_propose(0))  # own nil prevote
    acts = rig.votes(rig.others[:2], PV, 0, None, T0 + 0.5)
    assert [(v.vote_type, v.block_hash) for v in own_votes(acts)] == [(PC, None)]


def test_any_two_thirds_precommits_start_timeout_precommit_then_next_round() -> None:
    rig = Rig()
    rig.start()
    acts = rig.votes(rig.others[:2], PC, 0, None, T0 + 0.1)
    acts += rig.votes(rig.others[2:], PC, 0, hashlib.sha256(b"y").digest(), T0 + 0.1)
    assert ScheduleTimeout(T0 + 0.1 + FAST.timeout_precommit(0)) in acts
    rig.m.on_timeout(T0 + 0.1 + FAST.timeout_precommit(0))
    assert rig.m.round == 1


def test_conflicting_votes_become_evidence_once() -> None:
    rig = Rig()
    rig.start()
    bad = rig.others[0]
    rig.m.on_vote(rig.vote(bad, PV, 0, None), T0 + 0.1)
    acts = rig.m.on_vote(rig.vote(bad, PV, 0, b"\x05" * 32), T0 + 0.1)
    evidence = [a.evidence for a in acts if isinstance(a, ReportEvidence)]
    assert len(evidence) == 1
    assert evidence[0].validator == bad.public_key
    assert evidence[0].verify(CHAIN_ID)
    again = rig.m.on_vote(rig.vote(bad, PV, 0, b"\x06" * 32), T0 + 0.1)
    assert not any(isinstance(a, ReportEvidence) for a in again)


def test_bad_messages_raise_protocol_violation() -> None:
    rig = Rig()
    rig.start()
    vote = rig.vote(rig.others[0], PV, 0, None)
    forged = Vote(vote.vote_type, 1, 0, b"\x07" * 32, vote.validator, vote.signature)
    with pytest.raises(ProtocolViolation) as err:
        rig.m.on_vote(forged, T0)
    assert err.value.reason == "bad_signature"
    outsider = Identity.from_seed(b"x" * 32)
    with pytest.raises(ProtocolViolation) as err:
        rig.m.on_vote(rig.vote(outsider, PV, 0, None), T0)
    assert err.value.reason == "unknown_validator"
    p = rig.proposal(1)  # round 1's proposer, sent as round 0's
    wrong = Proposal(1, 0, -1, p.block, p.proposer, p.signature)
    with pytest.raises(ProtocolViolation) as err:
        rig.m.on_proposal(wrong, T0)
    assert err.value.reason == "wrong_proposer"


def test_invalid_block_gets_a_nil_prevote() -> None:
    rig = Rig()
    rig.start()
    good = rig.block(0)
    from dataclasses import replace

    bad_block = Block(replace(good.header, state_root=b"\x00" * 32), good.txs)
    acts = rig.m.on_proposal(rig.proposal(0, bad_block), T0 + 0.1)
    assert [(v.vote_type, v.block_hash) for v in own_votes(acts)] == [(PV, None)]


def test_block_from_a_fast_clock_gets_a_nil_prevote() -> None:
    rig = Rig()
    rig.start()
    far = int(T0 * 1000) + FAST.max_clock_drift_ms + 5_000
    acts = rig.m.on_proposal(rig.proposal(0, rig.block(0, time_ms=far)), T0 + 0.1)
    assert [(v.vote_type, v.block_hash) for v in own_votes(acts)] == [(PV, None)]


def test_restart_never_signs_a_conflicting_vote() -> None:
    rig = Rig()
    rig.start()
    a = rig.proposal(0)
    acts = rig.m.on_proposal(a, T0 + 0.1)
    (persist,) = [x for x in acts if isinstance(x, PersistSigned)]
    # crash; restart from the persisted record; a different block B appears in round 0
    rig.start(signed_state=persist.state)
    b = rig.proposal(0, rig.block(0, time_ms=1_000_777))
    assert b.block.hash != a.block.hash
    acts = rig.m.on_proposal(b, T0 + 0.2)
    assert own_votes(acts) == []
    acts = rig.m.on_timeout(T0 + FAST.timeout_propose(0))  # nil prevote would conflict too
    assert own_votes(acts) == []
    # the very same prevote may be sent again (identical bytes are no conflict)
    rig.start(signed_state=persist.state)
    acts = rig.m.on_proposal(a, T0 + 0.3)
    assert [(v.round, v.block_hash) for v in own_votes(acts)] == [(0, a.block.hash)]


def test_restart_keeps_the_lock() -> None:
    rig = Rig()
    rig.start()
    a = rig.proposal(0)
    rig.m.on_proposal(a, T0 + 0.1)
    acts = rig.votes(rig.others[:2], PV, 0, a.block.hash, T0 + 0.2)
    persist = [x for x in acts if isinstance(x, PersistSigned)][-1]
    assert (persist.state.locked_round, persist.state.locked_hash) == (0, a.block.hash)
    rig.start(signed_state=persist.state)
    assert (rig.m.round, rig.m.locked_hash) == (0, a.block.hash)
    rig.votes(rig.others, PC, 0, None, T0 + 0.3)
    rig.m.on_timeout(T0 + 0.3 + FAST.timeout_precommit(0))
    assert rig.m.round == 1
    b = rig.proposal(1, rig.block(1, time_ms=1_000_900))
    acts = rig.m.on_proposal(b, T0 + 0.8)
    assert [(v.round, v.block_hash) for v in own_votes(acts)] == [(1, None)]


def test_proposer_proposes_and_reproposes_its_valid_value() -> None:
    rig = Rig()
    rig.start()
    # round 0: polka for A (valid value), no decision; move to round 3 where we propose
    a = rig.proposal(0)
    rig.m.on_proposal(a, T0 + 0.1)
    rig.votes(rig.others[:2], PV, 0, a.block.hash, T0 + 0.2)
    acts = rig.votes(rig.others[:2], PC, 3, None, T0 + 0.3)  # f+1 in round 3 -> skip
    assert rig.m.round == 3
    proposals = [x.msg for x in acts if isinstance(x, Broadcast) and isinstance(x.msg, Proposal)]
    assert len(proposals) == 1
    assert proposals[0].block == a.block
    assert proposals[0].pol_round == 0
    assert isinstance(acts[acts.index(Broadcast(proposals[0])) - 1], PersistSigned)


def test_messages_for_the_next_height_are_kept_and_far_ones_ask_for_sync() -> None:
    rig = Rig()
    rig.start()
    p = rig.proposal(0)
    rig.m.on_proposal(p, T0 + 0.1)
    # height 2 prevotes arrive before we decide height 1
    early = [rig.vote(o, PV, 0, None, height=2) for o in rig.others]
    for v in early:
        assert own_votes(rig.m.on_vote(v, T0 + 0.25)) == []
    rig.votes(rig.others, PC, 0, p.block.hash, T0 + 0.3)
    assert rig.m.height == 2
    start = T0 + 0.3 + FAST.block_time_ms / 1000
    rig.m.on_timeout(start)
    acts = rig.m.on_timeout(start + FAST.timeout_propose(0))
    # the buffered nil prevotes were counted: with our own prevote there is a nil polka and
    # we precommit nil at once
    assert [(v.height, v.vote_type) for v in own_votes(acts)][-1] == (2, PC)
    far = rig.vote(rig.others[0], PV, 0, None, height=9)
    assert rig.m.on_vote(far, T0 + 1.0) == [NeedSync(8)]
    assert rig.m.on_vote(far, T0 + 1.1) == []  # rate limited


def test_observer_decides_but_never_signs() -> None:
    rig = Rig(observer=True)
    acts = rig.start()
    p = rig.proposal(0)
    acts += rig.m.on_proposal(p, T0 + 0.1)
    acts += rig.votes(rig.others, PV, 0, p.block.hash, T0 + 0.2)
    acts += rig.votes(rig.others, PC, 0, p.block.hash, T0 + 0.3)
    assert not rig.m.is_validator
    assert not any(isinstance(a, Broadcast | PersistSigned) for a in acts)
    assert any(isinstance(a, CommitBlock) for a in acts)


def test_usage_errors() -> None:
    rig = Rig()
    with pytest.raises(UsageError):
        rig.m.on_timeout(T0)
    rig.start()
    with pytest.raises(UsageError):
        rig.m.start(T0)
    with pytest.raises(UsageError):
        ConsensusConfig(rebroadcast_interval=0)


def test_byzantine_hook_signs_twins() -> None:
    rig = Rig(config=ConsensusConfig(byzantine_double_sign=True))
    rig.start()
    acts = rig.m.on_timeout(T0 + FAST.timeout_propose(0))
    votes = own_votes(acts)
    assert len(votes) == 2
    assert votes[0].block_hash is None
    assert votes[1].block_hash is not None
    assert (votes[0].height, votes[0].round) == (votes[1].height, votes[1].round)


def test_restart_restores_own_messages_for_rebroadcast() -> None:
    rig = Rig()
    rig.start()
    a = rig.proposal(0)
    acts = rig.m.on_proposal(a, T0 + 0.1)
    acts += rig.votes(rig.others[:2], PV, 0, a.block.hash, T0 + 0.2)
    persisted = [x for x in acts if isinstance(x, PersistSigned)]
    assert [type(p.message) for p in persisted] == [Vote, Vote]
    assert [p.message for p in persisted] == own_votes(acts)
    rig.m = Consensus(
        ChainView(rig.genesis),
        rig.me,
        signed_state=persisted[-1].state,
        own_messages=[p.message for p in persisted],
    )
    rig.view = rig.m.view
    rig.m.start(T0 + 1.0)
    again = rig.m.on_timeout(T0 + 1.0 + rig.m.config.rebroadcast_interval)
    resent = own_votes(again)
    assert {(v.vote_type, v.block_hash) for v in resent} >= {(PV, a.block.hash), (PC, a.block.hash)}


def _four_after_height_one(block_time_ms: int) -> tuple[list[Consensus], list[Identity], float]:
    """Four machines that all applied block 1 at T0 + 0.3 and wait out block_time."""
    from dataclasses import replace

    from .helpers import extend

    ids = identities(4, seed=23)
    gen = replace(genesis(ids), params=replace(FAST, block_time_ms=block_time_ms))
    block, commit = extend(ChainView(gen), ids)
    machines = []
    for who in ids:
        m = Consensus(ChainView(gen), who)
        m.start(T0)
        acts = m.on_block_committed(block, commit, T0 + 0.3)
        assert [a for a in acts if isinstance(a, CommitBlock)]
        machines.append(m)
    return machines, ids, T0 + 0.3


def test_waiting_transactions_let_the_round_zero_proposer_start_early() -> None:
    machines, _, t = _four_after_height_one(block_time_ms=5_000)
    key = machines[0].view.proposer(0)
    proposer = next(m for m in machines if m.me == key)
    others = [m for m in machines if m.me != key]
    for m in others:  # only the round-0 proposer reacts
        assert m.on_txs_available(t + 0.01) == []
    acts = proposer.on_txs_available(t + 0.01)
    gap = ConsensusConfig().min_block_interval
    assert acts == [ScheduleTimeout(t + gap)]  # not before min_block_interval
    assert proposer.next_deadline() == pytest.approx(t + gap)
    acts = proposer.on_timeout(t + gap)
    proposals = [a.msg for a in acts if isinstance(a, Broadcast) and isinstance(a.msg, Proposal)]
    assert len(proposals) == 1
    assert proposals[0].height == 2
    # a gatekeeper still waiting out block_time starts when that proposal arrives
    q = others[0]
    assert q.step == Step.PROPOSE
    votes = own_votes(q.on_proposal(proposals[0], t + gap + 0.01))
    assert [(v.vote_type, v.height, v.block_hash) for v in votes] == [
        (PV, 2, proposals[0].block.hash)
    ]
    # without that proposal the others would have waited the whole block_time
    assert others[1].next_deadline() is not None
    assert others[1].next_deadline() >= t + 2.0  # type: ignore[operator]


def test_early_start_is_only_for_round_zero_of_a_fresh_height() -> None:
    machines, _, t = _four_after_height_one(block_time_ms=5_000)
    key = machines[0].view.proposer(0)
    proposer = next(m for m in machines if m.me == key)
    proposer.on_txs_available(t + 1.0)
    proposer.on_timeout(t + 1.0)
    assert proposer.round == 0
    # once the round has started, more transactions change nothing
    assert proposer.on_txs_available(t + 1.1) == []
    with pytest.raises(UsageError):
        Consensus(ChainView(machines[0].view.genesis), Identity.generate()).on_txs_available(t)
    with pytest.raises(UsageError):
        ConsensusConfig(min_block_interval=-1)
