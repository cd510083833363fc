"""On-chain governance: proposals, stake-weighted votes, tallies and execution.

A proposal passes when its yes weight is more than half of the weight cast when its voting
period ends (exactly half fails); the chain then executes it in the same ``end_block``. Vote
weight is the voter's bonded stake when the proposal was made.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, NamedTuple

from phala_p2p.chain.bodies import GovPropose, GovVote, ProposalAction
from phala_p2p.chain.registry import TxContext, register_end_block, register_tx_kind
from phala_p2p.chain.tx import TxRejectReason
from phala_p2p.errors import TxRejected, UsageError

if TYPE_CHECKING:
    from phala_p2p.chain.ledger import LedgerState

PROPOSALS = "gov_proposals"  # id -> ProposalRecord
ENDING = "gov_ending"  # end height -> (id, ...)
SNAPSHOT = "gov_snapshot"  # (id, account) -> stake at proposal height
VOTES = "gov_votes"  # (id, account) -> approve


class ProposalStatus(StrEnum):
    OPEN = "open"
    PASSED = "passed"  # passed and executed
    REJECTED = "rejected"  # did not reach more than 50% yes of the votes cast
    FAILED = "failed"  # passed, but its execution was impossible (state left unchanged)


class ProposalRecord(NamedTuple):
    id: int
    proposer: bytes
    action: str
    param: str
    value: int
    account: bytes
    measurement: bytes
    amount: int
    created_height: int
    end_height: int
    yes: int
    no: int
    status: str


def get_proposal(state: LedgerState, pid: int) -> ProposalRecord | None:
    value = state.table(PROPOSALS).find(pid)
    return None if value is None else ProposalRecord(*value)


def all_proposals(state: LedgerState) -> list[ProposalRecord]:
    return [ProposalRecord(*v) for _, v in state.table(PROPOSALS).items()]


def _propose(ctx: TxContext, body: GovPropose) -> None:
    state = ctx.state
    if state.stake(ctx.sender) == 0:
        raise TxRejected("only stakers may propose", reason=TxRejectReason.NOT_AUTHORIZED)
    if body.action is ProposalAction.PARAM_CHANGE:
        try:
            state.params.with_change(body.param, body.value)
        except UsageError as err:
            raise TxRejected(str(err), reason=TxRejectReason.INVALID_PARAM) from err
    if body.action is ProposalAction.GATEKEEPER_REMOVE and not state.is_registered_gatekeeper(
        body.account
    ):
        raise TxRejected("not a gatekeeper", reason=TxRejectReason.NOT_A_GATEKEEPER)
    pid: int = state.meta.get("next_proposal_id", 0)
    state.meta.set("next_proposal_id", pid + 1)
    end = ctx.height + state.params.voting_period_blocks
    record = ProposalRecord(
        pid,
        ctx.sender,
        str(body.action),
        body.param,
        body.value,
        body.account,
        body.measurement,
        body.amount,
        ctx.height,
        end,
        0,
        0,
        str(ProposalStatus.OPEN),
    )
    state.table(PROPOSALS).set(pid, record)
    ending = state.table(ENDING)
    ending.set(end, (*ending.get(end, ()), pid))
    snapshot = state.table(SNAPSHOT)
    for acct, stake in state.stakes.items():
        snapshot.set((pid, acct), stake)


def _vote(ctx: TxContext, body: GovVote) -> None:
    state = ctx.state
    record = get_proposal(state, body.proposal_id)
    if record is None:
        raise TxRejected("no such proposal", reason=TxRejectReason.UNKNOWN_PROPOSAL)
    if record.status != ProposalStatus.OPEN or ctx.height > record.end_height:
        raise TxRejected("voting period is over", reason=TxRejectReason.VOTING_CLOSED)
    key = (record.id, ctx.sender)
    weight: int = state.table(SNAPSHOT).get(key, 0)
    if weight == 0:
        raise TxRejected("no stake at the proposal's height", reason=TxRejectReason.NOT_AUTHORIZED)
    votes = state.table(VOTES)
    if key in votes:
        raise TxRejected("already voted", reason=TxRejectReason.ALREADY_VOTED)
    votes.set(key, body.approve)
    if body.approve:
        record = record._replace(yes=record.yes + weight)
    else:
        record = record._replace(no=record.no + weight)
    state.table(PROPOSALS).set(record.id, record)


def _execute(state: LedgerState, record: ProposalRecord) -> bool:
    """Carry out a passed proposal; False (and nothing changed) if it cannot be done."""
    action = ProposalAction(record.action)
    if action is ProposalAction.PARAM_CHANGE:
        try:
            state.params.with_change(record.param, record.value)
        except UsageError:
            return False
        state.params_table.set(record.param, record.value)
    elif action is ProposalAction.GATEKEEPER_ADD:
        state.registered.set(record.account, True)
        if record.account not in state.accounts:
            state.credit(record.account, 0)
    elif action is ProposalAction.GATEKEEPER_REMOVE:
        state.registered.delete(record.account)
    elif action is ProposalAction.MEASUREMENT_ALLOW:
        state.measurements.set(record.measurement, True)
    elif action is ProposalAction.MEASUREMENT_REVOKE:
        state.measurements.delete(record.measurement)
    elif action is ProposalAction.TREASURY_SPEND:
        if record.amount > state.treasury():
            return False
        state.add_treasury(-record.amount)
        state.credit(record.account, record.amount)
    # a change that leaves no active gatekeeper would halt the chain
    return len(state.gatekeepers()) > 0


def _tally(state: LedgerState, height: int) -> None:
    ending = state.table(ENDING)
    pids = ending.find(height)
    if pids is None:
        return
    snapshot = state.table(SNAPSHOT)
    votes = state.table(VOTES)
    for pid in pids:
        record = get_proposal(state, pid)
        if record is None or record.status != ProposalStatus.OPEN:
            continue
        cast = record.yes + record.no
        if record.yes * 2 > cast:
            token = state.checkpoint()
            if _execute(state, record):
                state.release(token)
                status = ProposalStatus.PASSED
            else:
                state.rollback(token)
                status = ProposalStatus.FAILED
        else:
            status = ProposalStatus.REJECTED
        state.table(PROPOSALS).set(pid, record._replace(status=str(status)))
        for key in [k for k in snapshot.keys() if k[0] == pid]:
            snapshot.delete(key)
        for key in [k for k in votes.keys() if k[0] == pid]:
            votes.delete(key)
    ending.delete(height)


register_tx_kind(118, GovPropose, _propose)
register_tx_kind(119, GovVote, _vote)
register_end_block(20, "governance", _tally)
