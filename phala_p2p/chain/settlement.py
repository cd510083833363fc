"""Job settlement and receipt-equivocation slashing: the chain's side of paying for jobs.

A client and a miner agree on terms off chain (``market.negotiation``: an ``Agreement`` signed
by the client's account and the miner's enclave, backed by an escrow from the client to the
operator). While the job runs, the enclave signs cumulative usage receipts
(``market.receipt.JobReceipt``); the client co-signs the final one. ``JobSettle`` carries the
agreement and the last receipt; the chain pays the operator what the receipt's fuel costs at
the agreed price (never more than the escrow holds, nor than the agreement's maximum),
refunds the rest to the client and closes the escrow; a standing escrow
(``StandingEscrowOpen``) keeps the rest to back the client's next agreements with the same
operator. Each agreement settles once.

Two enclave-signed receipts for the same agreement and sequence number with different
contents prove that the enclave lies about usage: ``SubmitReceiptEvidence`` slashes its
operator by ``slash_fraction_ppm`` and revokes the miner.

The chain room may not import the market room (tests/chain/test_sansio.py), so this module
reads the agreement and receipts from the exact bytes their signers signed: the layouts
below mirror ``AgreementTerms``/``Agreement`` (kinds 410/413) and ``JobReceipt``/
``CoSignedReceipt`` (415/416), field for field, and tests/chain/test_settlement.py checks
that both sides accept and refuse the same bytes. Rules: protocols/settlement.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol

from phala_p2p.chain import miners, payments, staking
from phala_p2p.chain.registry import TxContext, register_tx_kind
from phala_p2p.chain.tables import pack
from phala_p2p.chain.tx import TxRejectReason
from phala_p2p.crypto.identity import verify_signature
from phala_p2p.errors import ProtocolViolation, TxRejected
from phala_p2p.wire.codec import WIRE_VERSION, message, unpack_untrusted

if TYPE_CHECKING:
    from phala_p2p.chain.ledger import LedgerState

# The enclave signs a receipt's encoding (signature left empty) under RECEIPT_DOMAIN; the
# client co-signs the signed receipt's encoding under RECEIPT_ACK_DOMAIN. Neither is a purpose
# that ``tee.statements`` hands to the host: only the enclave itself makes receipts.
RECEIPT_DOMAIN: Final = b"phala/market/job-receipt/v1\x00"
RECEIPT_ACK_DOMAIN: Final = b"phala/market/job-receipt-ack/v1\x00"
# the "agreement" statement domain of tee/statements.py (pinned equal by the tests)
AGREEMENT_DOMAIN: Final = b"phala/market/agreement/v1\x00"

TERMS_KIND: Final = 410
AGREEMENT_KIND: Final = 413
RECEIPT_KIND: Final = 415
COSIGNED_KIND: Final = 416

MAX_U63: Final = (1 << 63) - 1
MAX_FUEL: Final = 1 << 62  # as AgreementTerms.max_fuel
MAX_AGREEMENT_BYTES: Final = 2048
MAX_RECEIPT_BYTES: Final = 1024
PRICE_UNIT: Final = 1_000_000  # prices are per million fuel

SETTLED = "settled_agreements"  # agreement id -> Settlement
RECEIPT_EVIDENCE = "receipt_evidence"  # (enclave, agreement id, seq) -> amount slashed


def _bad(what: str) -> ProtocolViolation:
    return ProtocolViolation(what, reason="malformed")


# -- reading signed bytes ----------------------------------------------------------------------

_Check = Callable[[Any], bool]


def _bin(size: int) -> _Check:
    return lambda v: type(v) is bytes and len(v) == size


def _bin_max(size: int) -> _Check:
    return lambda v: type(v) is bytes and len(v) <= size


def _text(size: int) -> _Check:
    return lambda v: type(v) is str and len(v) <= size


def _int(lo: int, hi: int) -> _Check:
    return lambda v: type(v) is int and lo <= v <= hi


def _flag(v: Any) -> bool:
    return type(v) is bool


_TERMS_FIELDS: Final[tuple[tuple[str, _Check], ...]] = (
    ("agreement_id", _bin(32)),
    ("chain_id", _text(64)),
    ("client", _bin(32)),
    ("client_peer", _text(64)),
    ("miner_peer", _text(64)),
    ("enclave", _bin(32)),
    ("operator", _bin(32)),
    ("escrow_id", _bin(32)),
    ("job_bytes", _int(0, 1 << 44)),
    ("max_fuel", _int(1, MAX_FUEL)),
    ("price", _int(0, 1 << 48)),
    ("deadline_ms", _int(0, MAX_U63)),
)
_RECEIPT_FIELDS: Final[tuple[tuple[str, _Check], ...]] = (
    ("chain_id", _text(64)),
    ("agreement_id", _bin(32)),
    ("seq", _int(0, MAX_U63)),
    ("fuel_used", _int(0, MAX_FUEL)),
    ("bytes_in", _int(0, MAX_U63)),
    ("bytes_out", _int(0, MAX_U63)),
    ("output_hash", _bin(32)),
    ("final", _flag),
    ("enclave", _bin(32)),
    ("signature", _bin(64)),
)


def _check_fields(values: Any, spec: Sequence[tuple[str, _Check]], what: str) -> list[Any]:
    if type(values) is not list or len(values) != len(spec):
        raise _bad(f"{what}: expected an array of {len(spec)} fields")
    for (name, ok), value in zip(spec, values, strict=True):
        if not ok(value):
            raise _bad(f"{what}.{name}: bad value")
    return values


def _open(blob: bytes, kind: int, what: str) -> Any:
    """The field array of a message of ``kind`` (not yet checked, nor canonical-checked)."""
    top = unpack_untrusted(blob, max(1, len(blob)))
    if (
        type(top) is not list
        or len(top) != 3
        or type(top[0]) is not int
        or top[0] != WIRE_VERSION
        or type(top[1]) is not int
        or top[1] != kind
    ):
        raise _bad(f"{what} is not a version {WIRE_VERSION} message of kind {kind}")
    return top[2]


def _canonical(blob: bytes, kind: int, fields: list[Any], what: str) -> None:
    if pack([WIRE_VERSION, kind, fields]) != blob:
        raise _bad(f"{what} is not canonically encoded")


class ParsedTerms(NamedTuple):
    """The fields of ``AgreementTerms`` (kind 410), as the chain reads them."""

    agreement_id: bytes
    chain_id: str
    client: bytes
    client_peer: str
    miner_peer: str
    enclave: bytes
    operator: bytes
    escrow_id: bytes
    job_bytes: int
    max_fuel: int
    price: int
    deadline_ms: int

    @property
    def max_payment(self) -> int:
        return cost(self.max_fuel, self.price)


@dataclass(frozen=True)
class ParsedAgreement:
    """An ``Agreement`` (kind 413): the terms and the bytes both parties signed."""

    terms: ParsedTerms
    payload: bytes  # the terms as a message of their own, [1, 410, [fields]]: what was signed
    client_sig: bytes
    miner_sig: bytes

    def signatures_valid(self) -> bool:
        """Both the client's and the enclave's "agreement" statements verify."""
        statement = AGREEMENT_DOMAIN + self.payload
        t = self.terms
        return verify_signature(t.client, statement, self.client_sig) and verify_signature(
            t.enclave, statement, self.miner_sig
        )


class ParsedReceipt(NamedTuple):
    """The fields of a ``JobReceipt`` (kind 415) and the bytes its enclave signed."""

    chain_id: str
    agreement_id: bytes
    seq: int
    fuel_used: int
    bytes_in: int
    bytes_out: int
    output_hash: bytes
    final: bool
    enclave: bytes
    signature: bytes
    encoded: bytes  # the receipt's own encoding (what a client co-signs)

    @property
    def unsigned(self) -> bytes:
        """The receipt's encoding with an empty signature (what its enclave signs)."""
        fields = [*self[:9], b""]
        return pack([WIRE_VERSION, RECEIPT_KIND, fields])

    def signature_valid(self) -> bool:
        return verify_signature(self.enclave, RECEIPT_DOMAIN + self.unsigned, self.signature)


@dataclass(frozen=True)
class ParsedClaim:
    """A receipt as submitted for settlement: enclave-signed only, or co-signed by a client."""

    receipt: ParsedReceipt
    client: bytes = b""  # empty when only the enclave signed
    client_sig: bytes = b""

    @property
    def cosigned(self) -> bool:
        return bool(self.client)

    def client_signature_valid(self) -> bool:
        return verify_signature(
            self.client, RECEIPT_ACK_DOMAIN + self.receipt.encoded, self.client_sig
        )


def _terms_of(values: Any) -> ParsedTerms:
    return ParsedTerms._make(_check_fields(values, _TERMS_FIELDS, "terms"))


def _receipt_of(values: Any) -> ParsedReceipt:
    fields = _check_fields(values, _RECEIPT_FIELDS, "receipt")
    return ParsedReceipt._make([*fields, pack([WIRE_VERSION, RECEIPT_KIND, fields])])


def parse_agreement(blob: bytes) -> ParsedAgreement:
    """Read an encoded ``Agreement``; ProtocolViolation if it is not one (signatures are not
    checked here: see ``ParsedAgreement.signatures_valid``)."""
    fields = _open(blob, AGREEMENT_KIND, "agreement")
    if type(fields) is not list or len(fields) != 3:
        raise _bad("agreement: expected [terms, client_sig, miner_sig]")
    terms = _terms_of(fields[0])
    for name, sig in (("client_sig", fields[1]), ("miner_sig", fields[2])):
        if not _bin_max(64)(sig):
            raise _bad(f"agreement.{name}: bad value")
    _canonical(blob, AGREEMENT_KIND, fields, "agreement")
    payload = pack([WIRE_VERSION, TERMS_KIND, fields[0]])
    return ParsedAgreement(terms, payload, fields[1], fields[2])


def parse_receipt(blob: bytes) -> ParsedReceipt:
    """Read an encoded ``JobReceipt``; ProtocolViolation if it is not one."""
    receipt = _receipt_of(_open(blob, RECEIPT_KIND, "receipt"))
    if receipt.encoded != blob:
        raise _bad("receipt is not canonically encoded")
    return receipt


def parse_claim(blob: bytes) -> ParsedClaim:
    """Read an encoded ``JobReceipt`` or ``CoSignedReceipt``; ProtocolViolation otherwise."""
    top = unpack_untrusted(blob, max(1, len(blob)))
    kind = top[1] if type(top) is list and len(top) == 3 else None
    if kind == RECEIPT_KIND:
        return ParsedClaim(parse_receipt(blob))
    fields = _open(blob, COSIGNED_KIND, "co-signed receipt")
    if type(fields) is not list or len(fields) != 3:
        raise _bad("co-signed receipt: expected [receipt, client, client_sig]")
    receipt = _receipt_of(fields[0])
    if not _bin(32)(fields[1]) or not _bin(64)(fields[2]):
        raise _bad("co-signed receipt: client must be 32 bytes and client_sig 64")
    if not receipt.final:
        raise _bad("a client co-signs the final receipt only")
    _canonical(blob, COSIGNED_KIND, fields, "co-signed receipt")
    return ParsedClaim(receipt, fields[1], fields[2])


# -- what a receipt must satisfy (shared with market.receipt) ----------------------------------


class ReceiptProblem(StrEnum):
    """Why a receipt is not acceptable (``market.receipt.ReceiptError.reason``)."""

    BAD_SIGNATURE = "bad_signature"
    WRONG_AGREEMENT = "wrong_agreement"  # another agreement (or chain)
    WRONG_ENCLAVE = "wrong_enclave"  # not the agreement's enclave
    WRONG_CLIENT = "wrong_client"  # co-signed by someone other than the agreement's client
    FUEL_OVER_LIMIT = "fuel_over_limit"  # more fuel than the agreement's max_fuel
    SEQUENCE_NOT_INCREASING = "sequence_not_increasing"
    COUNTER_DECREASED = "counter_decreased"  # fuel or bytes below the previous receipt's
    AFTER_FINAL = "after_final"  # a receipt after the final one


class ReceiptLike(Protocol):
    @property
    def chain_id(self) -> str: ...
    @property
    def agreement_id(self) -> bytes: ...
    @property
    def seq(self) -> int: ...
    @property
    def fuel_used(self) -> int: ...
    @property
    def bytes_in(self) -> int: ...
    @property
    def bytes_out(self) -> int: ...
    @property
    def final(self) -> bool: ...
    @property
    def enclave(self) -> bytes: ...


class TermsLike(Protocol):
    @property
    def chain_id(self) -> str: ...
    @property
    def agreement_id(self) -> bytes: ...
    @property
    def enclave(self) -> bytes: ...
    @property
    def max_fuel(self) -> int: ...


def receipt_problem(
    receipt: ReceiptLike, terms: TermsLike, previous: ReceiptLike | None = None
) -> ReceiptProblem | None:
    """What is wrong with ``receipt`` under ``terms`` after ``previous`` (the last receipt
    accepted for the same agreement), or None. Signatures are not checked here."""
    if (receipt.chain_id, receipt.agreement_id) != (terms.chain_id, terms.agreement_id):
        return ReceiptProblem.WRONG_AGREEMENT
    if receipt.enclave != terms.enclave:
        return ReceiptProblem.WRONG_ENCLAVE
    if receipt.fuel_used > terms.max_fuel:
        return ReceiptProblem.FUEL_OVER_LIMIT
    if previous is None:
        return None
    if previous.final:
        return ReceiptProblem.AFTER_FINAL
    if receipt.seq <= previous.seq:
        return ReceiptProblem.SEQUENCE_NOT_INCREASING
    if (
        receipt.fuel_used < previous.fuel_used
        or receipt.bytes_in < previous.bytes_in
        or receipt.bytes_out < previous.bytes_out
    ):
        return ReceiptProblem.COUNTER_DECREASED
    return None


def cost(fuel: int, price: int) -> int:
    """What ``fuel`` costs at ``price`` per million fuel, rounded up (as ``max_payment``)."""
    return -(-fuel * price // PRICE_UNIT)


def settlement_amounts(
    fuel_used: int, price: int, max_fuel: int, escrow_amount: int
) -> tuple[int, int]:
    """(paid to the operator, refunded to the client) of an escrow holding ``escrow_amount``."""
    paid = min(cost(fuel_used, price), escrow_amount, cost(max_fuel, price))
    return paid, escrow_amount - paid


# -- transaction bodies ------------------------------------------------------------------------


@message(124)
@dataclass(frozen=True)
class JobSettle:
    """Settle an agreement: ``agreement`` is an encoded ``Agreement`` (kind 413), ``receipt``
    the last receipt, an encoded ``CoSignedReceipt`` (416) or ``JobReceipt`` (415)."""

    agreement: bytes = field(metadata={"max_len": MAX_AGREEMENT_BYTES})
    receipt: bytes = field(metadata={"max_len": MAX_RECEIPT_BYTES})

    def validate(self) -> None:
        _ = self.parsed_agreement, self.parsed_claim

    @cached_property
    def parsed_agreement(self) -> ParsedAgreement:
        return parse_agreement(self.agreement)

    @cached_property
    def parsed_claim(self) -> ParsedClaim:
        return parse_claim(self.receipt)


@message(125)
@dataclass(frozen=True)
class ReceiptEquivocation:
    """Two encoded ``JobReceipt``s of one enclave for the same agreement and sequence
    number, with different contents. ``of`` puts them in canonical (byte) order."""

    receipt_a: bytes = field(metadata={"max_len": MAX_RECEIPT_BYTES})
    receipt_b: bytes = field(metadata={"max_len": MAX_RECEIPT_BYTES})

    def validate(self) -> None:
        _ = self.parsed_a, self.parsed_b

    @cached_property
    def parsed_a(self) -> ParsedReceipt:
        return parse_receipt(self.receipt_a)

    @cached_property
    def parsed_b(self) -> ParsedReceipt:
        return parse_receipt(self.receipt_b)

    @classmethod
    def of(cls, one: bytes, other: bytes) -> ReceiptEquivocation:
        """Canonical evidence from two conflicting encoded receipts (in any order);
        ProtocolViolation(reason="bad_evidence") if they are not a conflict."""
        ev = cls(*sorted((one, other)))
        ev.validate()
        problem = ev.conflict_problem()
        if problem is not None:
            raise ProtocolViolation(problem, reason="bad_evidence")
        return ev

    def conflict_problem(self) -> str | None:
        """Why the two receipts are not an equivocation (None when they are one)."""
        a, b = self.parsed_a, self.parsed_b
        if (a.chain_id, a.agreement_id, a.seq, a.enclave) != (
            b.chain_id,
            b.agreement_id,
            b.seq,
            b.enclave,
        ):
            return "the receipts are not for the same agreement, sequence number and enclave"
        if a.unsigned == b.unsigned:
            return "the receipts say the same"
        return None

    @property
    def enclave(self) -> bytes:
        return self.parsed_a.enclave

    @property
    def key(self) -> tuple[bytes, bytes, int]:
        """The offence: (enclave, agreement id, sequence number)."""
        a = self.parsed_a
        return (a.enclave, a.agreement_id, a.seq)

    def signatures_valid(self) -> bool:
        return self.parsed_a.signature_valid() and self.parsed_b.signature_valid()


@message(126)
@dataclass(frozen=True)
class SubmitReceiptEvidence:
    """Report an equivocating enclave; ``operator`` is the account that registered it."""

    evidence: ReceiptEquivocation
    operator: bytes = field(metadata={"max_len": 32})

    def validate(self) -> None:
        if len(self.operator) != 32:
            raise ProtocolViolation("operator must be 32 bytes")


# -- state -------------------------------------------------------------------------------------


class Settlement(NamedTuple):
    """How an agreement was settled."""

    height: int
    paid: int  # to the operator
    refunded: int  # to the client
    fuel_used: int
    seq: int  # of the receipt settled on


def get_settlement(state: LedgerState, agreement_id: bytes) -> Settlement | None:
    value = state.table(SETTLED).find(agreement_id)
    return None if value is None else Settlement(*value)


# -- handlers ----------------------------------------------------------------------------------

_TX_REASON: Final = {
    ReceiptProblem.WRONG_AGREEMENT: TxRejectReason.WRONG_AGREEMENT,
    ReceiptProblem.WRONG_ENCLAVE: TxRejectReason.WRONG_ENCLAVE,
    ReceiptProblem.FUEL_OVER_LIMIT: TxRejectReason.FUEL_OVER_LIMIT,
}


def _settle(ctx: TxContext, body: JobSettle) -> None:
    state = ctx.state
    agreement = body.parsed_agreement
    claim = body.parsed_claim
    terms, receipt = agreement.terms, claim.receipt
    if terms.chain_id != state.chain_id:
        raise TxRejected("an agreement of another chain", reason=TxRejectReason.WRONG_CHAIN)
    if ctx.sender not in (terms.client, terms.operator):
        raise TxRejected(
            "only the client or the operator settles", reason=TxRejectReason.NOT_AUTHORIZED
        )
    previous = get_settlement(state, terms.agreement_id)
    if previous is not None:
        raise TxRejected(
            f"settled at height {previous.height}", reason=TxRejectReason.ALREADY_SETTLED
        )
    problem = receipt_problem(receipt, terms)
    if problem is not None:
        raise TxRejected(f"receipt: {problem}", reason=_TX_REASON[problem])
    if ctx.sender == terms.client and not receipt.final:
        raise TxRejected(
            "the client settles with the final receipt only", reason=TxRejectReason.NOT_AUTHORIZED
        )
    escrow = payments.get_escrow(state, terms.escrow_id)
    if escrow is None:
        raise TxRejected("no such escrow", reason=TxRejectReason.UNKNOWN_ESCROW)
    if (escrow.payer, escrow.beneficiary) != (terms.client, terms.operator):
        raise TxRejected(
            "the escrow is not from the client to the operator",
            reason=TxRejectReason.ESCROW_MISMATCH,
        )
    if ctx.height >= escrow.expires_height:
        raise TxRejected(
            f"the escrow expired at {escrow.expires_height}", reason=TxRejectReason.ESCROW_EXPIRED
        )
    record = miners.get_miner(state, terms.operator)
    if record is None or record.identity_pub != terms.enclave:
        raise TxRejected(
            "the enclave is not the operator's registered miner",
            reason=TxRejectReason.NOT_REGISTERED,
        )
    if record.status == miners.MinerStatus.REVOKED:
        raise TxRejected(f"miner revoked: {record.reason}", reason=TxRejectReason.MINER_REVOKED)
    if not agreement.signatures_valid():
        raise TxRejected("agreement signatures invalid", reason=TxRejectReason.BAD_AGREEMENT)
    if not receipt.signature_valid():
        raise TxRejected("receipt not signed by the enclave", reason=TxRejectReason.BAD_RECEIPT)
    if claim.cosigned and (claim.client != terms.client or not claim.client_signature_valid()):
        raise TxRejected("receipt not co-signed by the client", reason=TxRejectReason.BAD_RECEIPT)
    paid, refunded = settlement_amounts(
        receipt.fuel_used, terms.price, terms.max_fuel, escrow.amount
    )
    if escrow.standing:
        refunded = 0  # the rest stays to back the payer's other agreements
    if paid:
        payments.release(state, terms.escrow_id, paid)
    if refunded:
        payments.refund(state, terms.escrow_id)
    settled = Settlement(ctx.height, paid, refunded, receipt.fuel_used, receipt.seq)
    state.table(SETTLED).set(terms.agreement_id, tuple(settled))


def _receipt_evidence(ctx: TxContext, body: SubmitReceiptEvidence) -> None:
    state = ctx.state
    ev = body.evidence
    problem = ev.conflict_problem()
    if problem is not None:
        raise TxRejected(problem, reason=TxRejectReason.BAD_EVIDENCE)
    if ev.parsed_a.chain_id != state.chain_id:
        raise TxRejected("receipts of another chain", reason=TxRejectReason.BAD_EVIDENCE)
    seen = state.table(RECEIPT_EVIDENCE)
    if ev.key in seen:
        raise TxRejected("this equivocation was punished", reason=TxRejectReason.EVIDENCE_USED)
    if not ev.signatures_valid():
        raise TxRejected("receipt signatures invalid", reason=TxRejectReason.BAD_EVIDENCE)
    record = miners.get_miner(state, body.operator)
    if record is None or record.identity_pub != ev.enclave:
        raise TxRejected(
            "the enclave is not this operator's miner", reason=TxRejectReason.NOT_REGISTERED
        )
    fraction = state.params.slash_fraction_ppm
    slashed = staking.slash_stake(
        state, body.operator, fraction, since_height=record.registered_height
    )
    if len(state.gatekeepers()) == 0:
        raise TxRejected(
            "the slash would leave no active gatekeeper", reason=TxRejectReason.LAST_GATEKEEPER
        )
    seen.set(ev.key, slashed)
    miners.note_slashed(state, body.operator, ctx.height)  # revoked at the end of this block


register_tx_kind(124, JobSettle, _settle)
register_tx_kind(126, SubmitReceiptEvidence, _receipt_evidence)
