"""Bodies of the core transaction kinds (wire kinds 111-119 and 128; see protocols/ledger.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from phala_p2p.chain.evidence import DoubleSignEvidence
from phala_p2p.errors import ProtocolViolation
from phala_p2p.wire.codec import message

MAX_AMOUNT = (1 << 63) - 1
MAX_PARAM_NAME = 64
MAX_MEASUREMENT = 256


def _amount(value: int, what: str) -> None:
    if not 0 < value <= MAX_AMOUNT:
        raise ProtocolViolation(f"{what} must be in 1..2^63-1")


def _key(value: bytes, what: str) -> None:
    if len(value) != 32:
        raise ProtocolViolation(f"{what} must be 32 bytes")


def _check_escrow_open(beneficiary: bytes, amount: int, expires_height: int) -> None:
    _key(beneficiary, "escrow beneficiary")
    _amount(amount, "escrow amount")
    if not 0 < expires_height <= MAX_AMOUNT:
        raise ProtocolViolation("escrow expiry out of range")


@message(111)
@dataclass(frozen=True)
class Transfer:
    to: bytes = field(metadata={"max_len": 32})
    amount: int

    def validate(self) -> None:
        _key(self.to, "transfer recipient")
        _amount(self.amount, "transfer amount")


@message(112)
@dataclass(frozen=True)
class Stake:
    """Bond ``amount`` from the sender's balance."""

    amount: int

    def validate(self) -> None:
        _amount(self.amount, "stake amount")


@message(113)
@dataclass(frozen=True)
class Unstake:
    """Start unbonding ``amount``; it returns to the balance after ``unbonding_blocks``."""

    amount: int

    def validate(self) -> None:
        _amount(self.amount, "unstake amount")


@message(114)
@dataclass(frozen=True)
class EscrowOpen:
    """Lock ``amount`` for ``beneficiary``; the escrow's id is this transaction's id."""

    beneficiary: bytes = field(metadata={"max_len": 32})
    amount: int
    expires_height: int

    def validate(self) -> None:
        _check_escrow_open(self.beneficiary, self.amount, self.expires_height)


@message(128)
@dataclass(frozen=True)
class StandingEscrowOpen:
    """Lock ``amount`` for ``beneficiary`` to back any number of job agreements with it: each
    settlement pays from it and leaves the rest for the next; what is left goes back to the
    payer by ``EscrowRefund`` (the payer's, from ``expires_height``). Its id is this
    transaction's id."""

    beneficiary: bytes = field(metadata={"max_len": 32})
    amount: int
    expires_height: int

    def validate(self) -> None:
        _check_escrow_open(self.beneficiary, self.amount, self.expires_height)


@message(115)
@dataclass(frozen=True)
class EscrowRelease:
    """The payer pays ``amount`` of the escrow to its beneficiary."""

    escrow_id: bytes = field(metadata={"max_len": 32})
    amount: int

    def validate(self) -> None:
        _key(self.escrow_id, "escrow id")
        _amount(self.amount, "release amount")


@message(116)
@dataclass(frozen=True)
class EscrowRefund:
    """Return the rest of the escrow to its payer (beneficiary any time, payer after expiry)."""

    escrow_id: bytes = field(metadata={"max_len": 32})

    def validate(self) -> None:
        _key(self.escrow_id, "escrow id")


@message(117)
@dataclass(frozen=True)
class SubmitEvidence:
    evidence: DoubleSignEvidence


class ProposalAction(StrEnum):
    PARAM_CHANGE = "param_change"
    GATEKEEPER_ADD = "gatekeeper_add"
    GATEKEEPER_REMOVE = "gatekeeper_remove"
    MEASUREMENT_ALLOW = "measurement_allow"
    MEASUREMENT_REVOKE = "measurement_revoke"
    TREASURY_SPEND = "treasury_spend"


@message(118)
@dataclass(frozen=True)
class GovPropose:
    """A governance proposal. Which fields matter depends on ``action``; the rest are empty.

    param_change: ``param``, ``value``; gatekeeper_add/remove: ``account``;
    measurement_allow/revoke: ``measurement``; treasury_spend: ``account``, ``amount``.
    """

    action: ProposalAction
    param: str = field(default="", metadata={"max_len": MAX_PARAM_NAME})
    value: int = 0
    account: bytes = field(default=b"", metadata={"max_len": 32})
    measurement: bytes = field(default=b"", metadata={"max_len": MAX_MEASUREMENT})
    amount: int = 0

    def validate(self) -> None:
        a = self.action
        uses = {
            ProposalAction.PARAM_CHANGE: {"param", "value"},
            ProposalAction.GATEKEEPER_ADD: {"account"},
            ProposalAction.GATEKEEPER_REMOVE: {"account"},
            ProposalAction.MEASUREMENT_ALLOW: {"measurement"},
            ProposalAction.MEASUREMENT_REVOKE: {"measurement"},
            ProposalAction.TREASURY_SPEND: {"account", "amount"},
        }[a]
        empty = {"param": "", "value": 0, "account": b"", "measurement": b"", "amount": 0}
        for name, blank in empty.items():
            if name not in uses and getattr(self, name) != blank:
                raise ProtocolViolation(f"{a} proposal must leave {name} empty")
        if "param" in uses and not self.param:
            raise ProtocolViolation("param_change needs a parameter name")
        if "value" in uses and not 0 <= self.value <= MAX_AMOUNT:
            raise ProtocolViolation("parameter value out of range")
        if "account" in uses:
            _key(self.account, "proposal account")
        if "measurement" in uses and not self.measurement:
            raise ProtocolViolation("measurement proposal needs a measurement")
        if "amount" in uses:
            _amount(self.amount, "treasury spend amount")


@message(119)
@dataclass(frozen=True)
class GovVote:
    proposal_id: int
    approve: bool

    def validate(self) -> None:
        if not 0 <= self.proposal_id <= MAX_AMOUNT:
            raise ProtocolViolation("proposal id out of range")
