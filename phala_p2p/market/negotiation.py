"""Negotiation: proposal -> counter-offers (bounded rounds) -> a co-signed agreement, or a
refusal. Sans-IO machines for both sides; the wire is ``/phala/negotiate/1.0.0``
(``protocols/market.md``).

The client proposes ``AgreementTerms`` (job size, maximum fuel, price per million fuel,
deadline, and the escrow it opened on chain for the miner's operator) signed with its account
key. The miner answers with

* an ``Agreement``: the same terms signed by its enclave. Signed by both, it is verifiable
  offline by anyone (:meth:`Agreement.verify`) and is what settlement pays against;
* a ``Counter``: terms the miner would accept (its price, the fuel the escrow covers at that
  price, a deadline within its window), signed by its enclave, valid until ``expires_ms``; the
  client accepts by proposing exactly those terms in the counter's round;
* a ``Refusal`` with a reason (``RefuseReason``).

Every proposal has a ``proposal_id``: the miner remembers its answer to each
``(proposal_id, round)``, so a retried proposal gets the same answer (the same agreement once
accepted), and reusing an id for other terms is refused. A miner never agrees to more
concurrent agreements than it has slots: a slot is reserved when the miner decides to accept
and held until the agreement's deadline (or until the driver releases it when the job ends).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from phala_p2p.chain.tx import Signer
from phala_p2p.errors import NegotiationFailed, ProtocolViolation, UsageError
from phala_p2p.market.advert import max_payment
from phala_p2p.tee.statements import statement_bytes, verify_statement
from phala_p2p.wire.codec import encode, message

MAX_ROUNDS: Final = 8
MAX_PROPOSAL_TTL_MS: Final = 60_000
PROPOSAL_ID_LEN: Final = 16
MAX_BACKED: Final = 1024  # unsettled agreements a miner lets one standing escrow back
MAX_NEGOTIATE_MESSAGE: Final = 4096


def agreement_id(chain_id: str, client: bytes, proposal_id: bytes) -> bytes:
    """The id of the agreement a proposal leads to (stable across its rounds)."""
    h = hashlib.blake2b(digest_size=32, person=b"phala/agree1")
    h.update(chain_id.encode())
    h.update(b"\x00")
    h.update(client)
    h.update(proposal_id)
    return h.digest()


@message(410)
@dataclass(frozen=True)
class AgreementTerms:
    agreement_id: bytes = field(metadata={"max_len": 32})
    chain_id: str = field(metadata={"max_len": 64})
    client: bytes = field(metadata={"max_len": 32})  # the paying account
    client_peer: str = field(metadata={"max_len": 64})
    miner_peer: str = field(metadata={"max_len": 64})
    enclave: bytes = field(metadata={"max_len": 32})  # the miner's enclave identity key
    operator: bytes = field(metadata={"max_len": 32})  # the miner's account, paid
    escrow_id: bytes = field(metadata={"max_len": 32})
    job_bytes: int = field(metadata={"min": 0, "max": 1 << 44})
    max_fuel: int = field(metadata={"min": 1, "max": 1 << 62})
    price: int = field(metadata={"min": 0, "max": 1 << 48})  # per million fuel
    deadline_ms: int = field(metadata={"min": 0, "max": (1 << 63) - 1})

    def validate(self) -> None:
        for name in ("agreement_id", "client", "enclave", "operator", "escrow_id"):
            if len(getattr(self, name)) != 32:
                raise ProtocolViolation(f"terms.{name} must be 32 bytes")

    @property
    def max_payment(self) -> int:
        """The most the client can owe under these terms."""
        return max_payment(self.max_fuel, self.price)

    def payload(self) -> bytes:
        return encode(self)


@message(411)
@dataclass(frozen=True)
class Proposal:
    proposal_id: bytes = field(metadata={"max_len": PROPOSAL_ID_LEN})
    round: int = field(metadata={"min": 0, "max": MAX_ROUNDS})
    terms: AgreementTerms
    escrow_height: int = field(metadata={"min": 0})  # the escrow is on chain from this height
    expires_ms: int = field(metadata={"min": 0, "max": (1 << 63) - 1})
    client_sig: bytes = field(metadata={"max_len": 64})  # the client's "agreement" statement

    def validate(self) -> None:
        if len(self.proposal_id) != PROPOSAL_ID_LEN:
            raise ProtocolViolation(f"proposal_id must be {PROPOSAL_ID_LEN} bytes")


@message(412)
@dataclass(frozen=True)
class Counter:
    """Terms the miner offers instead; the client answers with a proposal in ``round``."""

    proposal_id: bytes = field(metadata={"max_len": PROPOSAL_ID_LEN})
    round: int = field(metadata={"min": 1, "max": MAX_ROUNDS})
    terms: AgreementTerms
    expires_ms: int = field(metadata={"min": 0, "max": (1 << 63) - 1})
    miner_sig: bytes = field(metadata={"max_len": 64})  # "counter" statement of unsigned()

    def unsigned(self) -> bytes:
        return encode(dataclasses.replace(self, miner_sig=b""))

    def verify(self) -> bool:
        return verify_statement(self.terms.enclave, "counter", self.unsigned(), self.miner_sig)


@message(413)
@dataclass(frozen=True)
class Agreement:
    """Terms signed by the client's account and by the miner's enclave."""

    terms: AgreementTerms
    client_sig: bytes = field(metadata={"max_len": 64})
    miner_sig: bytes = field(metadata={"max_len": 64})

    @property
    def id(self) -> bytes:
        return self.terms.agreement_id

    def verify(self) -> None:
        """Check both signatures (offline: no chain needed); ProtocolViolation otherwise."""
        payload = self.terms.payload()
        if not verify_statement(self.terms.client, "agreement", payload, self.client_sig):
            raise ProtocolViolation("the client's signature is invalid", reason="bad_signature")
        if not verify_statement(self.terms.enclave, "agreement", payload, self.miner_sig):
            raise ProtocolViolation("the enclave's signature is invalid", reason="bad_signature")


class RefuseReason(StrEnum):
    EXPIRED = "expired"
    NO_SLOTS = "no_slots"
    TOO_LARGE = "too_large"
    BAD_TERMS = "bad_terms"
    BAD_SIGNATURE = "bad_signature"
    ESCROW_MISSING = "escrow_missing"
    ESCROW_WRONG = "escrow_wrong"
    ESCROW_INSUFFICIENT = "escrow_insufficient"
    ESCROW_EXPIRING = "escrow_expiring"
    ESCROW_IN_USE = "escrow_in_use"
    UNKNOWN_COUNTER = "unknown_counter"
    COUNTER_EXPIRED = "counter_expired"
    TOO_MANY_ROUNDS = "too_many_rounds"
    ID_REUSED = "id_reused"
    NOT_SERVING = "not_serving"


@message(414)
@dataclass(frozen=True)
class Refusal:
    proposal_id: bytes = field(metadata={"max_len": PROPOSAL_ID_LEN})
    round: int = field(metadata={"min": 0, "max": MAX_ROUNDS})
    reason: str = field(metadata={"max_len": 32})
    detail: str = field(metadata={"max_len": 256})
    retry_after_ms: int = field(metadata={"min": 0, "max": 1 << 40})  # 0: do not retry


Reply = Agreement | Counter | Refusal


# -- the miner's side ------------------------------------------------------------------------


@dataclass(frozen=True)
class MinerPolicy:
    """What a miner accepts. ``price`` is its ask per million fuel."""

    price: int
    slots: int
    max_fuel: int
    max_input: int
    max_rounds: int = 4
    offer_ttl_ms: int = 10_000
    min_deadline_ms: int = 1_000
    max_deadline_ms: int = 3_600_000
    min_escrow_blocks: int = 10

    def __post_init__(self) -> None:
        for name in ("price", "min_deadline_ms", "min_escrow_blocks"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise UsageError(f"{name} must be an int >= 0")
        for name in ("slots", "max_fuel", "max_input", "offer_ttl_ms", "max_deadline_ms"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UsageError(f"{name} must be an int >= 1")
        if not 0 <= self.max_rounds <= MAX_ROUNDS:
            raise UsageError(f"max_rounds must be in 0..{MAX_ROUNDS}")
        if self.min_deadline_ms > self.max_deadline_ms:
            raise UsageError("min_deadline_ms must not exceed max_deadline_ms")


@dataclass(frozen=True)
class EscrowFacts:
    payer: bytes
    beneficiary: bytes
    amount: int
    expires_height: int
    # A standing escrow backs many agreements (each settlement leaves the rest in it): the
    # book counts the max payments of its unsettled agreements against what it holds.
    standing: bool = False


@dataclass(frozen=True)
class SignCounter:
    """Decision: offer ``counter`` (the driver has the enclave sign ``counter.unsigned()``)."""

    counter: Counter


@dataclass(frozen=True)
class SignAgreement:
    """Decision: accept ``proposal`` (a slot is reserved; the driver has the enclave sign the
    terms, then calls ``agreed`` or, if signing failed, ``abandon``)."""

    proposal: Proposal


Decision = SignCounter | SignAgreement | Agreement | Counter | Refusal


@dataclass
class _Slot:
    agreement_id: bytes
    deadline_ms: int
    escrow_id: bytes
    confirmed: bool = False


class MinerBook:
    """A miner's negotiations and its slots. See the module docstring."""

    def __init__(
        self,
        *,
        chain_id: str,
        enclave: bytes,
        operator: bytes,
        peer_id: str,
        policy: MinerPolicy,
        history: int = 4096,
    ) -> None:
        self.chain_id = chain_id
        self.enclave = enclave
        self.operator = operator
        self.peer_id = peer_id
        self.policy = policy
        self._history_max = history
        self._answers: OrderedDict[tuple[bytes, int], tuple[bytes, Reply]] = OrderedDict()
        self._counters: dict[bytes, Counter] = {}  # proposal_id -> latest counter
        self._slots: dict[bytes, _Slot] = {}  # agreement id -> slot
        self._escrows: OrderedDict[bytes, bytes] = OrderedDict()  # escrow id -> agreement id
        # standing escrow id -> {agreement id: (max payment, deadline_ms)} not yet settled
        self._backing: dict[bytes, dict[bytes, tuple[int, int]]] = {}
        self.on_change: Callable[[], None] | None = None

    # -- slots -----------------------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return max(0, self.policy.slots - len(self._slots))

    @property
    def active(self) -> list[bytes]:
        """Ids of agreements holding a slot."""
        return [k for k, s in self._slots.items() if s.confirmed]

    def expire(self, now_ms: int) -> int:
        """Free the slots of agreements past their deadline; returns how many."""
        gone = [k for k, s in self._slots.items() if s.deadline_ms <= now_ms]
        for k in gone:
            del self._slots[k]
        if gone:
            self._changed()
        return len(gone)

    def release(self, agreement_id: bytes) -> bool:
        """Free an agreement's slot (its job ended). False if it held none."""
        if self._slots.pop(agreement_id, None) is None:
            return False
        self._changed()
        return True

    def next_deadline_ms(self) -> int | None:
        return min((s.deadline_ms for s in self._slots.values()), default=None)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # -- deciding --------------------------------------------------------------------------

    def decide(
        self, proposal: Proposal, now_ms: int, *, escrow: EscrowFacts | None, height: int
    ) -> Decision:
        """What to answer to ``proposal`` (decoded and size-checked by the driver)."""
        self.expire(now_ms)
        key = (proposal.proposal_id, proposal.round)
        digest = hashlib.blake2b(encode(proposal), digest_size=16).digest()
        seen = self._answers.get(key)
        if seen is not None:
            if seen[0] == digest:
                return seen[1]
            return self._refuse(proposal, RefuseReason.ID_REUSED, "proposal id reused")
        terms = proposal.terms
        policy = self.policy
        if proposal.expires_ms <= now_ms:
            return self._refuse(proposal, RefuseReason.EXPIRED, "the proposal has expired")
        if proposal.expires_ms > now_ms + MAX_PROPOSAL_TTL_MS:
            return self._refuse(proposal, RefuseReason.BAD_TERMS, "proposal expiry too far")
        problem = self._check_terms(proposal)
        if problem is not None:
            return problem
        if proposal.round > 0:
            counter = self._counters.get(proposal.proposal_id)
            if counter is None or counter.round != proposal.round:
                return self._refuse(proposal, RefuseReason.UNKNOWN_COUNTER, "no such counter")
            if counter.expires_ms <= now_ms:
                return self._refuse(proposal, RefuseReason.COUNTER_EXPIRED, "counter expired")
        if terms.job_bytes > policy.max_input:
            return self._refuse(
                proposal, RefuseReason.TOO_LARGE, f"input limit is {policy.max_input} bytes"
            )
        problem = self._check_escrow(proposal, escrow, height)
        if problem is not None:
            return problem
        assert escrow is not None
        covers = self._uncommitted(escrow, terms)
        window = (now_ms + policy.min_deadline_ms, now_ms + policy.max_deadline_ms)
        acceptable = (
            terms.price >= policy.price
            and terms.max_fuel <= policy.max_fuel
            and window[0] <= terms.deadline_ms <= window[1]
            and covers >= terms.max_payment
        )
        if self.free_slots == 0:
            retry = (self.next_deadline_ms() or now_ms) - now_ms
            return self._refuse(
                proposal,
                RefuseReason.NO_SLOTS,
                f"all {policy.slots} slots are taken",
                retry_after_ms=max(1, retry),
            )
        if acceptable:
            self._slots[terms.agreement_id] = _Slot(
                terms.agreement_id, terms.deadline_ms, terms.escrow_id
            )
            if escrow.standing:
                backed = self._backing.setdefault(terms.escrow_id, {})
                backed[terms.agreement_id] = (terms.max_payment, terms.deadline_ms)
            else:
                self._escrows[terms.escrow_id] = terms.agreement_id
            self._changed()
            return SignAgreement(proposal)
        return self._counter(proposal, covers, now_ms, window)

    def _check_terms(self, proposal: Proposal) -> Refusal | None:
        terms = proposal.terms
        ours = (
            terms.chain_id == self.chain_id
            and terms.enclave == self.enclave
            and terms.operator == self.operator
            and terms.miner_peer == self.peer_id
            and terms.agreement_id
            == agreement_id(terms.chain_id, terms.client, proposal.proposal_id)
        )
        if not ours:
            return self._refuse(proposal, RefuseReason.BAD_TERMS, "terms name another miner")
        if not verify_statement(terms.client, "agreement", terms.payload(), proposal.client_sig):
            return self._refuse(proposal, RefuseReason.BAD_SIGNATURE, "client signature invalid")
        return None

    def _check_escrow(
        self, proposal: Proposal, escrow: EscrowFacts | None, height: int
    ) -> Refusal | None:
        terms = proposal.terms
        if escrow is None:
            return self._refuse(proposal, RefuseReason.ESCROW_MISSING, "no such escrow on chain")
        if escrow.payer != terms.client or escrow.beneficiary != self.operator:
            return self._refuse(
                proposal, RefuseReason.ESCROW_WRONG, "escrow is not from the client to us"
            )
        if escrow.expires_height < height + self.policy.min_escrow_blocks:
            return self._refuse(
                proposal,
                RefuseReason.ESCROW_EXPIRING,
                f"escrow must last {self.policy.min_escrow_blocks} blocks past {height}",
            )
        if escrow.standing:
            backed = self._backing.get(terms.escrow_id, {})
            if len(backed) >= MAX_BACKED and terms.agreement_id not in backed:
                return self._refuse(
                    proposal,
                    RefuseReason.ESCROW_IN_USE,
                    f"escrow backs {len(backed)} unsettled agreements already",
                )
            return None
        bound = self._escrows.get(terms.escrow_id)
        if bound is not None and bound != terms.agreement_id:
            return self._refuse(proposal, RefuseReason.ESCROW_IN_USE, "escrow backs another")
        return None

    def _uncommitted(self, escrow: EscrowFacts, terms: AgreementTerms) -> int:
        """What ``escrow`` holds beyond the max payments of our other unsettled agreements on
        it (all of it, for a one-off escrow: it backs one agreement)."""
        if not escrow.standing:
            return escrow.amount
        backed = self._backing.get(terms.escrow_id, {})
        committed = sum(pay for aid, (pay, _) in backed.items() if aid != terms.agreement_id)
        return max(0, escrow.amount - committed)

    # -- standing escrows ------------------------------------------------------------------

    def backing(self, escrow_id: bytes) -> list[tuple[bytes, int]]:
        """(agreement id, deadline_ms) of our unsettled agreements on a standing escrow: the
        driver reports those it sees settled, or that can no longer be paid, with
        :meth:`settled`."""
        return [(aid, deadline) for aid, (_, deadline) in self._backing.get(escrow_id, {}).items()]

    def settled(self, escrow_id: bytes, agreement_id: bytes) -> None:
        """An agreement on a standing escrow no longer draws on it (settled, or lapsed)."""
        backed = self._backing.get(escrow_id)
        if backed is not None:
            backed.pop(agreement_id, None)
            if not backed:
                del self._backing[escrow_id]

    def _counter(
        self, proposal: Proposal, covers: int, now_ms: int, window: tuple[int, int]
    ) -> Decision:
        policy = self.policy
        terms = proposal.terms
        if proposal.round >= policy.max_rounds:
            return self._refuse(
                proposal, RefuseReason.TOO_MANY_ROUNDS, f"no agreement in {policy.max_rounds}"
            )
        price = max(terms.price, policy.price)
        fuel = min(terms.max_fuel, policy.max_fuel)
        if price > 0:
            fuel = min(fuel, covers * 1_000_000 // price)
        if fuel < 1:
            return self._refuse(
                proposal, RefuseReason.ESCROW_INSUFFICIENT, "escrow buys no fuel at our price"
            )
        deadline = min(max(terms.deadline_ms, window[0]), window[1])
        offered = dataclasses.replace(terms, price=price, max_fuel=fuel, deadline_ms=deadline)
        counter = Counter(
            proposal.proposal_id,
            proposal.round + 1,
            offered,
            now_ms + policy.offer_ttl_ms,
            b"",
        )
        return SignCounter(counter)

    def _refuse(
        self,
        proposal: Proposal,
        reason: RefuseReason,
        detail: str,
        *,
        retry_after_ms: int = 0,
    ) -> Refusal:
        # Refusals are not remembered: a retry is decided afresh (a slot may have freed).
        return Refusal(proposal.proposal_id, proposal.round, reason.value, detail, retry_after_ms)

    # -- what the driver reports back ------------------------------------------------------

    def countered(self, proposal: Proposal, counter: Counter) -> Counter:
        """The enclave signed ``counter``: remember it as our answer to ``proposal``."""
        self._counters[proposal.proposal_id] = counter
        while len(self._counters) > self._history_max:
            del self._counters[next(iter(self._counters))]
        self._remember(proposal, counter)
        return counter

    def agreed(self, proposal: Proposal, agreement: Agreement) -> Agreement:
        """The enclave signed the terms: the agreement holds its reserved slot."""
        slot = self._slots.get(agreement.id)
        if slot is not None:
            slot.confirmed = True
        self._counters.pop(proposal.proposal_id, None)
        self._remember(proposal, agreement)
        while len(self._escrows) > 4 * self._history_max:
            self._escrows.popitem(last=False)
        return agreement

    def abandon(self, proposal: Proposal) -> None:
        """Signing failed: free the slot and escrow reserved for ``proposal`` (nothing, if its
        agreement was made after all: a stray report must not unbind the escrow it uses)."""
        terms = proposal.terms
        seen = self._answers.get((proposal.proposal_id, proposal.round))
        if seen is not None and isinstance(seen[1], Agreement) and seen[1].id == terms.agreement_id:
            return
        slot = self._slots.get(terms.agreement_id)
        if slot is not None and not slot.confirmed:
            del self._slots[terms.agreement_id]
            self._changed()
        if self._escrows.get(terms.escrow_id) == terms.agreement_id:
            del self._escrows[terms.escrow_id]
        self.settled(terms.escrow_id, terms.agreement_id)

    def _remember(self, proposal: Proposal, reply: Reply) -> None:
        digest = hashlib.blake2b(encode(proposal), digest_size=16).digest()
        self._answers[(proposal.proposal_id, proposal.round)] = (digest, reply)
        while len(self._answers) > self._history_max:
            self._answers.popitem(last=False)


# -- the client's side -----------------------------------------------------------------------


@dataclass(frozen=True)
class Ask:
    """What a client wants: the miner (from its advert), the job and its limits."""

    chain_id: str
    client_peer: str
    miner_peer: str
    enclave: bytes
    operator: bytes
    escrow_id: bytes
    escrow_height: int
    job_bytes: int
    max_fuel: int
    max_price: int  # per million fuel: never agree to more
    deadline_ms: int  # results wanted by then: never agree to later
    bid: int | None = None  # the first price offered (default: max_price)
    min_fuel: int | None = None  # accept a counter that cuts fuel down to this (default: all)

    def __post_init__(self) -> None:
        if self.max_price < 0 or (self.bid is not None and not 0 <= self.bid <= self.max_price):
            raise UsageError("bid must be in 0..max_price")
        if self.max_fuel < 1:
            raise UsageError("max_fuel must be >= 1")
        if self.min_fuel is not None and not 1 <= self.min_fuel <= self.max_fuel:
            raise UsageError("min_fuel must be in 1..max_fuel")


class ClientNegotiation:
    """A client's side of one negotiation: ``proposal`` to send, then ``on_reply``."""

    def __init__(
        self,
        ask: Ask,
        signer: Signer,
        now_ms: int,
        *,
        proposal_id: bytes,
        proposal_ttl_ms: int = 10_000,
        max_rounds: int = 4,
    ) -> None:
        if len(proposal_id) != PROPOSAL_ID_LEN:
            raise UsageError(f"proposal_id must be {PROPOSAL_ID_LEN} bytes")
        if not 1 <= proposal_ttl_ms <= MAX_PROPOSAL_TTL_MS:
            raise UsageError(f"proposal_ttl_ms must be in 1..{MAX_PROPOSAL_TTL_MS}")
        self.ask = ask
        self._signer = signer
        self._ttl = proposal_ttl_ms
        self._max_rounds = min(max_rounds, MAX_ROUNDS)
        terms = AgreementTerms(
            agreement_id=agreement_id(ask.chain_id, signer.public_key, proposal_id),
            chain_id=ask.chain_id,
            client=signer.public_key,
            client_peer=ask.client_peer,
            miner_peer=ask.miner_peer,
            enclave=ask.enclave,
            operator=ask.operator,
            escrow_id=ask.escrow_id,
            job_bytes=ask.job_bytes,
            max_fuel=ask.max_fuel,
            price=ask.max_price if ask.bid is None else ask.bid,
            deadline_ms=ask.deadline_ms,
        )
        self.proposal = self._propose(proposal_id, 0, terms, now_ms)
        self.counters: list[Counter] = []

    def _propose(self, pid: bytes, rnd: int, terms: AgreementTerms, now_ms: int) -> Proposal:
        sig = self._signer.sign(statement_bytes("agreement", terms.payload()))
        return Proposal(pid, rnd, terms, self.ask.escrow_height, now_ms + self._ttl, sig)

    def on_reply(self, reply: Reply, now_ms: int) -> Agreement | Proposal:
        """The agreement, or the next proposal to send; NegotiationFailed otherwise (a
        ProtocolViolation if the miner's answer is not a valid one)."""
        sent = self.proposal
        if isinstance(reply, Refusal):
            if reply.proposal_id != sent.proposal_id:
                raise ProtocolViolation("refusal of another proposal")
            retry = reply.retry_after_ms / 1000 if reply.retry_after_ms else None
            raise NegotiationFailed(
                f"the miner refused: {reply.reason}: {reply.detail}",
                reason=reply.reason,
                retry_after=retry,
            )
        if isinstance(reply, Agreement):
            if reply.terms != sent.terms or reply.client_sig != sent.client_sig:
                raise ProtocolViolation("the agreement is not what we proposed")
            reply.verify()
            return reply
        return self._on_counter(reply, now_ms)

    def _on_counter(self, counter: Counter, now_ms: int) -> Proposal:
        sent = self.proposal
        if counter.proposal_id != sent.proposal_id or counter.round != sent.round + 1:
            raise ProtocolViolation("counter to another proposal or round")
        if not counter.verify():
            raise ProtocolViolation("counter signature is invalid", reason="bad_signature")
        mine, theirs = sent.terms, counter.terms
        fixed = dataclasses.replace(
            theirs, price=mine.price, max_fuel=mine.max_fuel, deadline_ms=mine.deadline_ms
        )
        if fixed != mine:
            raise ProtocolViolation("a counter may change only price, fuel and deadline")
        self.counters.append(counter)
        ask = self.ask
        min_fuel = ask.max_fuel if ask.min_fuel is None else ask.min_fuel
        if theirs.price > ask.max_price:
            raise NegotiationFailed(
                f"the miner asks {theirs.price} per million fuel, above max_price {ask.max_price}",
                reason="price",
            )
        if theirs.max_fuel < min_fuel:
            raise NegotiationFailed(
                f"the miner offers {theirs.max_fuel} fuel, below the {min_fuel} needed",
                reason="fuel",
            )
        if theirs.deadline_ms > ask.deadline_ms:
            raise NegotiationFailed("the miner cannot meet the deadline", reason="deadline")
        if counter.expires_ms <= now_ms:
            raise NegotiationFailed("the counter-offer expired", reason="counter_expired")
        if counter.round > self._max_rounds:
            raise NegotiationFailed("no agreement within the rounds allowed", reason="rounds")
        self.proposal = self._propose(sent.proposal_id, counter.round, theirs, now_ms)
        return self.proposal
