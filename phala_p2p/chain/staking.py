"""Staking, unbonding and slashing with double-sign evidence."""

from __future__ import annotations

from typing import TYPE_CHECKING

from phala_p2p.chain import miners
from phala_p2p.chain.bodies import Stake, SubmitEvidence, Unstake
from phala_p2p.chain.params import PPM
from phala_p2p.chain.registry import TxContext, register_end_block, register_tx_kind
from phala_p2p.chain.tx import TxRejectReason
from phala_p2p.errors import TxRejected

if TYPE_CHECKING:
    from phala_p2p.chain.ledger import LedgerState

UNBONDING = "unbonding"  # mature_height -> ((account, amount, created_height), ...)
EVIDENCE = "evidence"  # (validator, height, round, vote_type) -> amount slashed


def would_empty_set(state: LedgerState, acct: bytes) -> bool:
    """Whether losing ``acct`` leaves no active gatekeeper (the chain would halt)."""
    valset = state.gatekeepers()
    return len(valset) == 1 and acct in valset


def _stake(ctx: TxContext, body: Stake) -> None:
    state = ctx.state
    new = state.stake(ctx.sender) + body.amount
    if new < state.params.min_stake:
        raise TxRejected(
            f"stake {new} below minimum {state.params.min_stake}",
            reason=TxRejectReason.BELOW_MIN_STAKE,
        )
    state.debit(ctx.sender, body.amount)
    state.set_stake(ctx.sender, new)


def _unstake(ctx: TxContext, body: Unstake) -> None:
    state = ctx.state
    current = state.stake(ctx.sender)
    if body.amount > current:
        raise TxRejected(
            f"stake {current} < {body.amount}", reason=TxRejectReason.INSUFFICIENT_FUNDS
        )
    remaining = current - body.amount
    min_stake = state.params.min_stake
    if 0 < remaining < min_stake:
        raise TxRejected(
            f"remaining stake {remaining} below minimum {min_stake}",
            reason=TxRejectReason.BELOW_MIN_STAKE,
        )
    if remaining < min_stake and would_empty_set(state, ctx.sender):
        raise TxRejected("the last gatekeeper cannot leave", reason=TxRejectReason.LAST_GATEKEEPER)
    state.set_stake(ctx.sender, remaining)
    mature = ctx.height + state.params.unbonding_blocks
    table = state.table(UNBONDING)
    entries = table.get(mature, ())
    table.set(mature, (*entries, (ctx.sender, body.amount, ctx.height)))


def _mature_unbonding(state: LedgerState, height: int) -> None:
    table = state.table(UNBONDING)
    entries = table.find(height)
    if entries is None:
        return
    for acct, amount, _created in entries:
        state.credit(acct, amount)
    table.delete(height)


def unbonding_of(state: LedgerState, acct: bytes) -> list[tuple[int, int]]:
    out = []
    for mature, entries in state.table(UNBONDING).items():
        out += [(mature, amount) for a, amount, _ in entries if a == acct]
    return out


def slash_stake(state: LedgerState, account: bytes, fraction_ppm: int, *, since_height: int) -> int:
    """Take ``fraction_ppm`` of ``account``'s bonded stake, and of its unbonding entries
    started at or after ``since_height``, into the treasury; returns the amount taken.

    Every slashing rule takes stake this way; the caller decides what else the offence costs
    (revocation through ``miners.note_slashed``, removal as a gatekeeper).
    """
    bonded = state.stake(account)
    slashed = bonded * fraction_ppm // PPM
    if slashed:
        state.set_stake(account, bonded - slashed)
    unbonding = state.table(UNBONDING)
    for mature, entries in list(unbonding.items()):
        changed = []
        for acct, amount, created in entries:
            if acct == account and created >= since_height:
                cut = amount * fraction_ppm // PPM
                slashed += cut
                amount -= cut
            changed.append((acct, amount, created))
        if tuple(changed) != tuple(entries):
            unbonding.set(mature, tuple(changed))
    if slashed:
        state.add_treasury(slashed)
    return slashed


def _slash(ctx: TxContext, body: SubmitEvidence) -> None:
    state = ctx.state
    ev = body.evidence
    params = state.params
    if not ev.verify(state.chain_id):
        raise TxRejected("evidence signatures do not verify", reason=TxRejectReason.BAD_EVIDENCE)
    if ev.height > ctx.height or ctx.height - ev.height > params.evidence_max_age_blocks:
        raise TxRejected("evidence height out of range", reason=TxRejectReason.BAD_EVIDENCE)
    seen = state.table(EVIDENCE)
    if ev.key in seen:
        raise TxRejected("evidence already used", reason=TxRejectReason.BAD_EVIDENCE)
    offender = ev.validator
    if not state.is_registered_gatekeeper(offender):
        raise TxRejected("offender is not a gatekeeper", reason=TxRejectReason.NOT_A_GATEKEEPER)
    if would_empty_set(state, offender):
        raise TxRejected("cannot remove the last gatekeeper", reason=TxRejectReason.LAST_GATEKEEPER)
    slashed = slash_stake(state, offender, params.slash_fraction_ppm, since_height=ev.height)
    state.registered.delete(offender)
    seen.set(ev.key, slashed)
    miners.note_slashed(state, offender, ctx.height)


register_tx_kind(112, Stake, _stake)
register_tx_kind(113, Unstake, _unstake)
register_tx_kind(117, SubmitEvidence, _slash)
register_end_block(10, "unbonding", _mature_unbonding)
