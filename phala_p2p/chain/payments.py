"""Transfers and escrow primitives (open, release, refund).

``release`` and ``refund`` are also plain functions so that later transaction kinds (session
settlement with usage receipts, for example) can move escrowed funds under their own rules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from phala_p2p.chain.bodies import (
    EscrowOpen,
    EscrowRefund,
    EscrowRelease,
    StandingEscrowOpen,
    Transfer,
)
from phala_p2p.chain.registry import TxContext, register_tx_kind
from phala_p2p.chain.tx import TxRejectReason
from phala_p2p.errors import TxRejected

if TYPE_CHECKING:
    from phala_p2p.chain.ledger import LedgerState

ESCROWS = "escrows"  # escrow id -> Escrow


class Escrow(NamedTuple):
    payer: bytes
    beneficiary: bytes
    amount: int
    expires_height: int
    # A standing escrow backs many job agreements: settling one pays from it and leaves the
    # rest in it; a one-off escrow (``EscrowOpen``) refunds the rest at its settlement.
    standing: bool = False


def get_escrow(state: LedgerState, escrow_id: bytes) -> Escrow | None:
    value = state.table(ESCROWS).find(escrow_id)
    return None if value is None else Escrow(*value)


def _require(state: LedgerState, escrow_id: bytes) -> Escrow:
    escrow = get_escrow(state, escrow_id)
    if escrow is None:
        raise TxRejected("no such escrow", reason=TxRejectReason.UNKNOWN_ESCROW)
    return escrow


def release(state: LedgerState, escrow_id: bytes, amount: int) -> None:
    """Pay ``amount`` of the escrow to its beneficiary; the escrow closes when empty."""
    escrow = _require(state, escrow_id)
    if amount > escrow.amount:
        raise TxRejected(
            f"escrow holds {escrow.amount} < {amount}", reason=TxRejectReason.INSUFFICIENT_FUNDS
        )
    state.credit(escrow.beneficiary, amount)
    left = escrow.amount - amount
    if left:
        state.table(ESCROWS).set(escrow_id, escrow._replace(amount=left))
    else:
        state.table(ESCROWS).delete(escrow_id)


def refund(state: LedgerState, escrow_id: bytes) -> None:
    """Return what is left of the escrow to its payer and close it."""
    escrow = _require(state, escrow_id)
    state.credit(escrow.payer, escrow.amount)
    state.table(ESCROWS).delete(escrow_id)


def _transfer(ctx: TxContext, body: Transfer) -> None:
    ctx.state.debit(ctx.sender, body.amount)
    ctx.state.credit(body.to, body.amount)


def _open(ctx: TxContext, body: EscrowOpen | StandingEscrowOpen) -> None:
    if body.expires_height <= ctx.height:
        raise TxRejected("escrow expires in the past", reason=TxRejectReason.MALFORMED)
    ctx.state.debit(ctx.sender, body.amount)
    standing = isinstance(body, StandingEscrowOpen)
    escrow = Escrow(ctx.sender, body.beneficiary, body.amount, body.expires_height, standing)
    ctx.state.table(ESCROWS).set(ctx.tx.id, escrow)


def _release(ctx: TxContext, body: EscrowRelease) -> None:
    escrow = _require(ctx.state, body.escrow_id)
    if ctx.sender != escrow.payer:
        raise TxRejected("only the payer releases", reason=TxRejectReason.NOT_AUTHORIZED)
    release(ctx.state, body.escrow_id, body.amount)


def _refund(ctx: TxContext, body: EscrowRefund) -> None:
    escrow = _require(ctx.state, body.escrow_id)
    if ctx.sender == escrow.beneficiary:
        pass  # the beneficiary may give the money back at any time
    elif ctx.sender == escrow.payer:
        if ctx.height < escrow.expires_height:
            raise TxRejected(
                f"escrow expires at {escrow.expires_height}",
                reason=TxRejectReason.ESCROW_NOT_EXPIRED,
            )
    else:
        raise TxRejected("not a party to the escrow", reason=TxRejectReason.NOT_AUTHORIZED)
    refund(ctx.state, body.escrow_id)


register_tx_kind(111, Transfer, _transfer)
register_tx_kind(114, EscrowOpen, _open)
register_tx_kind(115, EscrowRelease, _release)
register_tx_kind(116, EscrowRefund, _refund)
register_tx_kind(128, StandingEscrowOpen, _open)
