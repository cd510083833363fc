"""Ledger rules: every transaction kind, every rejection reason, governance and slashing."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any

import pytest

from phala_p2p.chain.block import Vote, VoteType, vote_sign_bytes
from phala_p2p.chain.bodies import (
    EscrowOpen,
    EscrowRefund,
    EscrowRelease,
    GovPropose,
    GovVote,
    ProposalAction,
    Stake,
    SubmitEvidence,
    Transfer,
    Unstake,
)
from phala_p2p.chain.evidence import DoubleSignEvidence
from phala_p2p.chain.governance import ProposalStatus
from phala_p2p.chain.ledger import LedgerState
from phala_p2p.chain.params import ChainParams
from phala_p2p.chain.registry import TxContext, register_tx_kind
from phala_p2p.chain.tx import Tx, TxRejectReason, TxResult
from phala_p2p.crypto.identity import Identity
from phala_p2p.errors import TxRejected, UsageError
from phala_p2p.wire.codec import message

from .helpers import CHAIN_ID, FAST, genesis, identities


class Chain:
    """A ledger plus per-account nonces, applying one transaction per call."""

    def __init__(self, gks: list[Identity], users: list[Identity], **kw: Any) -> None:
        self.gks = gks
        g = genesis(gks, accounts=[(u, 10_000) for u in users + gks], **kw)
        self.state = LedgerState.from_genesis(g)
        self.height = 1

    def tx(self, who: Identity, body: Any, *, fee: int = 1, nonce: int | None = None) -> Tx:
        n = self.state.nonce(who.public_key) if nonce is None else nonce
        return Tx.sign(who, chain_id=CHAIN_ID, nonce=n, fee=fee, body=body)

    def apply(self, who: Identity, body: Any, **kw: Any) -> TxResult:
        return self.state.apply_tx(self.tx(who, body, **kw), self.height)

    def end_blocks(self, until: int) -> None:
        while self.height < until:
            self.state.end_block(self.height)
            self.height += 1


@pytest.fixture
def chain() -> Chain:
    ids = identities(6, seed=3)
    return Chain(ids[:4], ids[4:])


def test_transfer_moves_funds_and_fee_goes_to_treasury(chain: Chain) -> None:
    a, b = chain.gks[0], chain.gks[1]
    result = chain.apply(a, Transfer(b.public_key, 300), fee=2)
    assert result.ok, result
    assert chain.state.balance(a.public_key) == 10_000 - 302
    assert chain.state.balance(b.public_key) == 10_300
    assert chain.state.treasury() == 2
    assert chain.state.nonce(a.public_key) == 1


def test_transfer_creates_the_recipient_account(chain: Chain) -> None:
    newcomer = Identity.from_seed(b"n" * 32)
    assert chain.state.account(newcomer.public_key) is None
    assert chain.apply(chain.gks[0], Transfer(newcomer.public_key, 5)).ok
    assert chain.state.balance(newcomer.public_key) == 5


def _reject(chain: Chain, tx: Tx, reason: TxRejectReason) -> None:
    before = chain.state.state_root()
    balances = {k: chain.state.balance(k) for k in chain.state.accounts.keys()}
    result = chain.state.apply_tx(tx, chain.height)
    assert not result.ok
    assert result.reason == reason, result
    assert chain.state.state_root() == before
    assert {k: chain.state.balance(k) for k in chain.state.accounts.keys()} == balances


def test_envelope_rejections_change_nothing(chain: Chain) -> None:
    a, b = chain.gks[0], chain.gks[1]
    good = chain.tx(a, Transfer(b.public_key, 1))
    forged = replace(good, signature=bytes(64))
    _reject(chain, forged, TxRejectReason.BAD_SIGNATURE)
    tampered = replace(good, fee=good.fee + 1)  # signature no longer covers the bytes
    _reject(chain, tampered, TxRejectReason.BAD_SIGNATURE)
    other_chain = Tx.sign(a, chain_id="other", nonce=0, fee=1, body=Transfer(b.public_key, 1))
    _reject(chain, other_chain, TxRejectReason.WRONG_CHAIN)
    _reject(chain, chain.tx(a, Transfer(b.public_key, 1), nonce=5), TxRejectReason.BAD_NONCE)
    _reject(chain, chain.tx(a, Transfer(b.public_key, 1), fee=0), TxRejectReason.FEE_TOO_LOW)
    stranger = Identity.from_seed(b"s" * 32)
    _reject(chain, chain.tx(stranger, Transfer(b.public_key, 1)), TxRejectReason.UNKNOWN_ACCOUNT)
    _reject(chain, chain.tx(a, Transfer(b.public_key, 10_000)), TxRejectReason.INSUFFICIENT_FUNDS)
    _reject(
        chain, chain.tx(a, Transfer(b.public_key, 1), fee=10_001), TxRejectReason.INSUFFICIENT_FUNDS
    )
    # replay: the same tx twice
    assert chain.state.apply_tx(good, chain.height).ok
    _reject(chain, good, TxRejectReason.BAD_NONCE)


def test_unknown_kind_malformed_body_and_oversize_are_rejected(chain: Chain) -> None:
    a = chain.gks[0]
    sender = a.public_key
    from phala_p2p.chain.tx import tx_sign_bytes

    def raw(kind: int, body: bytes) -> Tx:
        sig = a.sign(tx_sign_bytes(CHAIN_ID, sender, 0, 1, kind, body))
        return Tx(CHAIN_ID, sender, 0, 1, kind, body, sig)

    _reject(chain, raw(60_000, b"\x90"), TxRejectReason.UNKNOWN_KIND)
    _reject(chain, raw(111, b"\x93\x01\x6f\x90"), TxRejectReason.MALFORMED)  # wrong field count
    big = raw(111, b"\x00" * (FAST.max_tx_size + 1))
    _reject(chain, big, TxRejectReason.TX_TOO_LARGE)


def test_stake_and_unstake_with_unbonding(chain: Chain) -> None:
    u = identities(6, seed=3)[4]
    key = u.public_key
    _reject(chain, chain.tx(u, Stake(50)), TxRejectReason.BELOW_MIN_STAKE)
    assert chain.apply(u, Stake(500)).ok
    assert chain.state.stake(key) == 500
    assert chain.state.balance(key) == 10_000 - 500 - 1
    _reject(chain, chain.tx(u, Unstake(450)), TxRejectReason.BELOW_MIN_STAKE)  # leaves 50
    _reject(chain, chain.tx(u, Unstake(501)), TxRejectReason.INSUFFICIENT_FUNDS)
    assert chain.apply(u, Unstake(200)).ok
    unstaked_at = chain.height
    assert chain.state.stake(key) == 300
    balance = chain.state.balance(key)
    mature = unstaked_at + FAST.unbonding_blocks
    assert chain.state.unbonding(key) == [(mature, 200)]
    chain.end_blocks(mature)  # end_block of every height before maturity
    assert chain.state.balance(key) == balance
    chain.state.end_block(mature)
    assert chain.state.balance(key) == balance + 200
    assert chain.state.unbonding(key) == []


def test_unstaking_the_last_gatekeeper_is_refused() -> None:
    ids = identities(2, seed=9)
    chain = Chain(ids[:1], ids[1:])
    _reject(chain, chain.tx(ids[0], Unstake(1_000)), TxRejectReason.LAST_GATEKEEPER)
    assert chain.apply(ids[0], Unstake(100)).ok  # stays above min_stake


def test_gatekeeper_set_follows_stake(chain: Chain) -> None:
    gk = chain.gks[0]
    assert chain.state.gatekeepers().power(gk.public_key) == 1_000
    assert chain.apply(gk, Stake(500)).ok
    assert chain.state.gatekeepers().power(gk.public_key) == 1_500
    assert chain.apply(gk, Unstake(1_500)).ok
    assert gk.public_key not in chain.state.gatekeepers()
    assert len(chain.state.gatekeepers()) == 3


def test_escrow_open_release_refund(chain: Chain) -> None:
    payer, payee, other = chain.gks[0], chain.gks[1], chain.gks[2]
    tx = chain.tx(payer, EscrowOpen(payee.public_key, 1_000, expires_height=10))
    assert chain.state.apply_tx(tx, chain.height).ok
    eid = tx.id
    assert chain.state.escrow(eid) is not None
    assert chain.state.balance(payer.public_key) == 10_000 - 1_001
    _reject(chain, chain.tx(payee, EscrowRelease(eid, 10)), TxRejectReason.NOT_AUTHORIZED)
    _reject(chain, chain.tx(payer, EscrowRelease(eid, 1_001)), TxRejectReason.INSUFFICIENT_FUNDS)
    _reject(chain, chain.tx(payer, EscrowRelease(b"\x01" * 32, 1)), TxRejectReason.UNKNOWN_ESCROW)
    assert chain.apply(payer, EscrowRelease(eid, 400)).ok
    assert chain.state.balance(payee.public_key) == 10_400
    _reject(chain, chain.tx(payer, EscrowRefund(eid)), TxRejectReason.ESCROW_NOT_EXPIRED)
    _reject(chain, chain.tx(other, EscrowRefund(eid)), TxRejectReason.NOT_AUTHORIZED)
    chain.height = 10
    before = chain.state.balance(payer.public_key)
    assert chain.apply(payer, EscrowRefund(eid)).ok
    assert chain.state.balance(payer.public_key) == before - 1 + 600
    assert chain.state.escrow(eid) is None
    _reject(chain, chain.tx(payer, EscrowRefund(eid)), TxRejectReason.UNKNOWN_ESCROW)


def test_escrow_in_the_past_is_malformed(chain: Chain) -> None:
    chain.height = 5
    body = EscrowOpen(chain.gks[1].public_key, 10, expires_height=5)
    _reject(chain, chain.tx(chain.gks[0], body), TxRejectReason.MALFORMED)


def test_beneficiary_may_refund_at_any_time(chain: Chain) -> None:
    payer, payee = chain.gks[0], chain.gks[1]
    tx = chain.tx(payer, EscrowOpen(payee.public_key, 100, expires_height=50))
    assert chain.state.apply_tx(tx, chain.height).ok
    assert chain.apply(payee, EscrowRefund(tx.id)).ok
    # the payer paid the opening fee and got all 100 back; the payee paid the refund's fee
    assert chain.state.balance(payer.public_key) == 10_000 - 1
    assert chain.state.balance(payee.public_key) == 10_000 - 1


def _double_sign(offender: Identity, height: int, round_: int = 0) -> DoubleSignEvidence:
    votes = []
    for h in (b"\x01" * 32, b"\x02" * 32):
        sb = vote_sign_bytes(CHAIN_ID, VoteType.PREVOTE, height, round_, h)
        votes.append(
            Vote(VoteType.PREVOTE, height, round_, h, offender.public_key, offender.sign(sb))
        )
    return DoubleSignEvidence.of(votes[1], votes[0])


def test_double_sign_evidence_slashes_and_removes(chain: Chain) -> None:
    offender, reporter = chain.gks[3], chain.gks[0]
    chain.height = 3
    ev = _double_sign(offender, height=2)
    treasury = chain.state.treasury()
    assert chain.apply(reporter, SubmitEvidence(ev)).ok
    slashed = 1_000 * FAST.slash_fraction_ppm // 1_000_000
    assert chain.state.stake(offender.public_key) == 1_000 - slashed
    assert offender.public_key not in chain.state.gatekeepers()
    assert not chain.state.is_registered_gatekeeper(offender.public_key)
    assert chain.state.treasury() == treasury + 1 + slashed
    # the same offence twice is refused, and a non-gatekeeper cannot be slashed
    _reject(chain, chain.tx(reporter, SubmitEvidence(ev)), TxRejectReason.BAD_EVIDENCE)
    ev2 = _double_sign(offender, height=2, round_=1)
    _reject(chain, chain.tx(reporter, SubmitEvidence(ev2)), TxRejectReason.NOT_A_GATEKEEPER)


def test_bad_evidence_is_rejected(chain: Chain) -> None:
    offender, reporter = chain.gks[3], chain.gks[0]
    chain.height = 3
    ev = _double_sign(offender, height=2)
    forged = DoubleSignEvidence(ev.vote_a, replace(ev.vote_b, signature=bytes(64)))
    _reject(chain, chain.tx(reporter, SubmitEvidence(forged)), TxRejectReason.BAD_EVIDENCE)
    future = _double_sign(offender, height=4)
    _reject(chain, chain.tx(reporter, SubmitEvidence(future)), TxRejectReason.BAD_EVIDENCE)
    chain.height = 2 + FAST.evidence_max_age_blocks + 1
    _reject(chain, chain.tx(reporter, SubmitEvidence(ev)), TxRejectReason.BAD_EVIDENCE)


def test_slash_reaches_stake_unbonding_after_the_offence(chain: Chain) -> None:
    offender, reporter = chain.gks[3], chain.gks[0]
    chain.height = 3
    assert chain.apply(offender, Unstake(1_000)).ok  # tries to run away after offending at 2
    ev = _double_sign(offender, height=2)
    assert chain.apply(reporter, SubmitEvidence(ev)).ok
    cut = 1_000 * FAST.slash_fraction_ppm // 1_000_000
    assert chain.state.unbonding(offender.public_key) == [(3 + FAST.unbonding_blocks, 1_000 - cut)]


# -- governance ------------------------------------------------------------------------------


def _gov_chain(stakes: list[int]) -> Chain:
    ids = identities(len(stakes) + 1, seed=11)
    return Chain(ids[: len(stakes)], ids[len(stakes) :], stakes=stakes)


def _run_vote(chain: Chain, body: GovPropose, yes: list[int], no: list[int]) -> int:
    assert chain.apply(chain.gks[0], body).ok
    (record,) = [p for p in chain.state.proposals() if p.status == ProposalStatus.OPEN]
    for i in yes:
        assert chain.apply(chain.gks[i], GovVote(record.id, True)).ok
    for i in no:
        assert chain.apply(chain.gks[i], GovVote(record.id, False)).ok
    chain.end_blocks(record.end_height + 1)
    return record.id


def test_governance_passes_above_half_and_takes_effect() -> None:
    chain = _gov_chain([510, 490, 1_000])
    body = GovPropose(ProposalAction.PARAM_CHANGE, param="tx_fee", value=7)
    pid = _run_vote(chain, body, yes=[0], no=[1])  # 510 of 1000 cast; third does not vote
    record = chain.state.proposal(pid)
    assert record is not None
    assert (record.yes, record.no, record.status) == (510, 490, ProposalStatus.PASSED)
    assert chain.state.params.tx_fee == 7
    _reject(
        chain,
        chain.tx(chain.gks[2], Transfer(chain.gks[1].public_key, 1), fee=6),
        TxRejectReason.FEE_TOO_LOW,
    )
    assert chain.apply(chain.gks[2], Transfer(chain.gks[1].public_key, 1), fee=7).ok


def test_governance_fails_at_exactly_half() -> None:
    chain = _gov_chain([500, 500, 1_000])
    body = GovPropose(ProposalAction.PARAM_CHANGE, param="tx_fee", value=7)
    pid = _run_vote(chain, body, yes=[0], no=[1])
    record = chain.state.proposal(pid)
    assert record is not None
    assert record.status == ProposalStatus.REJECTED
    assert chain.state.params.tx_fee == FAST.tx_fee


def test_vote_weight_is_the_stake_at_proposal_height() -> None:
    chain = _gov_chain([600, 400, 1_000])
    assert chain.apply(
        chain.gks[0], GovPropose(ProposalAction.MEASUREMENT_ALLOW, measurement=b"m")
    ).ok
    pid = chain.state.proposals()[0].id
    assert chain.apply(chain.gks[1], Stake(5_000)).ok  # too late to count
    assert chain.apply(chain.gks[1], GovVote(pid, True)).ok
    assert chain.apply(chain.gks[0], GovVote(pid, False)).ok
    record = chain.state.proposal(pid)
    assert record is not None
    assert (record.yes, record.no) == (400, 600)
    chain.end_blocks(record.end_height + 1)
    assert chain.state.proposal(pid).status == ProposalStatus.REJECTED  # type: ignore[union-attr]
    assert chain.state.allowed_measurements() == []


def test_governance_rejections() -> None:
    chain = _gov_chain([600, 400])
    outsider = identities(3, seed=11)[2]
    g0, g1 = chain.gks
    _reject(
        chain,
        chain.tx(outsider, GovPropose(ProposalAction.MEASUREMENT_ALLOW, measurement=b"m")),
        TxRejectReason.NOT_AUTHORIZED,
    )
    _reject(
        chain,
        chain.tx(g0, GovPropose(ProposalAction.PARAM_CHANGE, param="nope", value=1)),
        TxRejectReason.INVALID_PARAM,
    )
    _reject(
        chain,
        chain.tx(g0, GovPropose(ProposalAction.PARAM_CHANGE, param="min_stake", value=0)),
        TxRejectReason.INVALID_PARAM,
    )
    _reject(
        chain,
        chain.tx(g0, GovPropose(ProposalAction.GATEKEEPER_REMOVE, account=outsider.public_key)),
        TxRejectReason.NOT_A_GATEKEEPER,
    )
    _reject(chain, chain.tx(g0, GovVote(99, True)), TxRejectReason.UNKNOWN_PROPOSAL)
    assert chain.apply(g0, GovPropose(ProposalAction.MEASUREMENT_ALLOW, measurement=b"m")).ok
    pid = chain.state.proposals()[0].id
    _reject(chain, chain.tx(outsider, GovVote(pid, True)), TxRejectReason.NOT_AUTHORIZED)
    assert chain.apply(g0, GovVote(pid, True)).ok
    _reject(chain, chain.tx(g0, GovVote(pid, False)), TxRejectReason.ALREADY_VOTED)
    chain.end_blocks(chain.height + FAST.voting_period_blocks + 1)
    _reject(chain, chain.tx(g1, GovVote(pid, True)), TxRejectReason.VOTING_CLOSED)
    assert chain.state.allowed_measurements() == [b"m"]


def test_governance_gatekeeper_add_remove_and_treasury() -> None:
    chain = _gov_chain([600, 400])
    newcomer = identities(3, seed=11)[2]
    pid = _run_vote(
        chain,
        GovPropose(ProposalAction.GATEKEEPER_ADD, account=newcomer.public_key),
        yes=[0],
        no=[],
    )
    assert chain.state.proposal(pid).status == ProposalStatus.PASSED  # type: ignore[union-attr]
    assert newcomer.public_key not in chain.state.gatekeepers()  # registered, no stake yet
    assert chain.apply(newcomer, Stake(200)).ok
    assert chain.state.gatekeepers().power(newcomer.public_key) == 200
    pid = _run_vote(
        chain,
        GovPropose(ProposalAction.GATEKEEPER_REMOVE, account=chain.gks[1].public_key),
        yes=[0],
        no=[1],
    )
    assert chain.gks[1].public_key not in chain.state.gatekeepers()
    treasury = chain.state.treasury()
    spend = GovPropose(
        ProposalAction.TREASURY_SPEND, account=newcomer.public_key, amount=treasury + 1_000
    )
    pid = _run_vote(chain, spend, yes=[0], no=[])
    assert chain.state.proposal(pid).status == ProposalStatus.FAILED  # type: ignore[union-attr]
    balance = chain.state.balance(newcomer.public_key)
    spend = GovPropose(ProposalAction.TREASURY_SPEND, account=newcomer.public_key, amount=3)
    pid = _run_vote(chain, spend, yes=[0], no=[])
    assert chain.state.proposal(pid).status == ProposalStatus.PASSED  # type: ignore[union-attr]
    assert chain.state.balance(newcomer.public_key) == balance + 3


def test_governance_cannot_remove_every_gatekeeper() -> None:
    chain = _gov_chain([1_000])
    body = GovPropose(ProposalAction.GATEKEEPER_REMOVE, account=chain.gks[0].public_key)
    pid = _run_vote(chain, body, yes=[0], no=[])
    assert chain.state.proposal(pid).status == ProposalStatus.FAILED  # type: ignore[union-attr]
    assert chain.gks[0].public_key in chain.state.gatekeepers()


# -- determinism and extension ---------------------------------------------------------------


def test_state_root_is_deterministic_and_sensitive() -> None:
    ids = identities(4, seed=5)
    a = Chain(ids[:3], ids[3:])
    b = Chain(ids[:3], ids[3:])
    assert a.state.state_root() == b.state.state_root()
    assert a.apply(ids[0], Transfer(ids[1].public_key, 5)).ok
    assert a.state.state_root() != b.state.state_root()
    assert b.apply(ids[0], Transfer(ids[1].public_key, 5)).ok
    assert a.state.state_root() == b.state.state_root()
    b.state.table("unused-extension")  # creating an empty table does not change the root
    assert a.state.state_root() == b.state.state_root()


@message(190)
@dataclass(frozen=True)
class _Memo:
    text: str


def _memo(ctx: TxContext, body: _Memo) -> None:
    if body.text == "no":
        ctx.state.credit(ctx.sender, 1_000_000)  # written, then undone by the rejection
        raise TxRejected("refused", reason="memo_refused")
    ctx.state.table("memos").set(ctx.tx.id, body.text)


def test_extension_tx_kind_and_rollback_of_partial_writes(chain: Chain) -> None:
    register_tx_kind(190, _Memo, _memo)
    with pytest.raises(UsageError):
        register_tx_kind(190, Transfer, _memo)
    a = chain.gks[0]
    before = chain.state.state_root()
    result = chain.apply(a, _Memo("no"))
    assert (result.ok, result.reason) == (False, "memo_refused")
    assert chain.state.state_root() == before
    tx = chain.tx(a, _Memo("hello"))
    assert chain.state.apply_tx(tx, 1).ok
    assert chain.state.table("memos").find(tx.id) == "hello"


def test_params_from_state_follow_the_params_table(chain: Chain) -> None:
    assert chain.state.params == FAST
    assert isinstance(chain.state.params, ChainParams)


def test_tx_ids_are_distinct_per_signature(chain: Chain) -> None:
    a, b = chain.gks[0], chain.gks[1]
    t1 = chain.tx(a, Transfer(b.public_key, 1))
    t2 = chain.tx(a, Transfer(b.public_key, 2))
    assert t1.id != t2.id
    assert t1.id == hashlib.sha256(t1.sign_bytes + t1.signature).digest()
    assert t1.verify()
    assert not replace(t1, signature=t2.signature).verify()
