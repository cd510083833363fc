"""Negotiation machines: the miner's MinerBook and the client's ClientNegotiation."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phala_p2p.crypto.identity import Identity
from phala_p2p.errors import NegotiationFailed, ProtocolViolation, UsageError
from phala_p2p.market.advert import max_payment
from phala_p2p.market.negotiation import (
    MAX_PROPOSAL_TTL_MS,
    MAX_ROUNDS,
    Agreement,
    AgreementTerms,
    Ask,
    ClientNegotiation,
    Counter,
    EscrowFacts,
    MinerBook,
    MinerPolicy,
    Proposal,
    Refusal,
    RefuseReason,
    SignAgreement,
    SignCounter,
    agreement_id,
)
from phala_p2p.tee.statements import statement_bytes
from phala_p2p.wire.codec import decode, encode, kind_of

from .helpers import CHAIN, HEIGHT, NOW, complete, escrow_for

ENCLAVE = Identity.from_seed(b"\xe1" * 32)  # stand-in for the miner's enclave key
OPERATOR = Identity.from_seed(b"\x0b" * 32).public_key
MINER_PEER = "12D3KooWminer"
CLIENT = Identity.from_seed(b"\xc1" * 32)
OTHER = Identity.from_seed(b"\xc2" * 32)
PID = b"proposal-0000001"
ESCROW_ID = b"\xe5" * 32
PRICE = 1_000  # the miner's ask, per million fuel
FUEL = 1_000_000
DEADLINE = NOW + 60_000


def make_book(**policy: int) -> MinerBook:
    values = {"price": PRICE, "slots": 2, "max_fuel": 10**9, "max_input": 1 << 20} | policy
    return MinerBook(
        chain_id=CHAIN,
        enclave=ENCLAVE.public_key,
        operator=OPERATOR,
        peer_id=MINER_PEER,
        policy=MinerPolicy(**values),
    )


def make_ask(client: Identity = CLIENT, **changes: object) -> Ask:
    ask = Ask(
        chain_id=CHAIN,
        client_peer=f"12D3KooWclient{client.public_key[:2].hex()}",
        miner_peer=MINER_PEER,
        enclave=ENCLAVE.public_key,
        operator=OPERATOR,
        escrow_id=ESCROW_ID,
        escrow_height=HEIGHT - 1,
        job_bytes=1_000,
        max_fuel=FUEL,
        max_price=PRICE,
        deadline_ms=DEADLINE,
    )
    return dataclasses.replace(ask, **changes)


def start(
    client: Identity = CLIENT, *, pid: bytes = PID, now: int = NOW, **changes: object
) -> ClientNegotiation:
    return ClientNegotiation(make_ask(client, **changes), client, now, proposal_id=pid)


def escrow(client: Identity = CLIENT, amount: int = max_payment(FUEL, PRICE)) -> EscrowFacts:
    return escrow_for(client, OPERATOR, amount=amount)


ESCROW = escrow()


def propose(
    terms: AgreementTerms,
    *,
    client: Identity = CLIENT,
    pid: bytes = PID,
    rnd: int = 0,
    now: int = NOW,
) -> Proposal:
    """A proposal built by hand (for what the client machine would never send)."""
    sig = client.sign(statement_bytes("agreement", terms.payload()))
    return Proposal(pid, rnd, terms, HEIGHT - 1, now + 10_000, sig)


def refusal_reason(decision: object) -> str:
    assert isinstance(decision, Refusal), decision
    return decision.reason


def agree(book: MinerBook, p: Proposal, pot: EscrowFacts = ESCROW, now: int = NOW) -> Agreement:
    """Decide ``p``, which must be accepted, and sign the agreement."""
    decision = book.decide(p, now, escrow=pot, height=HEIGHT)
    assert decision == SignAgreement(p)
    agreement = complete(book, p, decision, ENCLAVE)
    assert isinstance(agreement, Agreement)
    return agreement


def counter_for(book: MinerBook, p: Proposal, pot: EscrowFacts = ESCROW, now: int = NOW) -> Counter:
    """Decide ``p``, which must be countered, and sign the counter."""
    decision = book.decide(p, now, escrow=pot, height=HEIGHT)
    assert isinstance(decision, SignCounter)
    counter = complete(book, p, decision, ENCLAVE)
    assert isinstance(counter, Counter)
    return counter


def test_kinds() -> None:
    kinds = [kind_of(c) for c in (AgreementTerms, Proposal, Counter, Agreement, Refusal)]
    assert kinds == [410, 411, 412, 413, 414]


# -- agreeing at the ask ---------------------------------------------------------------------


def test_accept_at_ask_price() -> None:
    book = make_book()
    changes: list[int] = []
    book.on_change = lambda: changes.append(book.free_slots)
    nego = start()
    proposal = nego.proposal
    assert (proposal.round, proposal.terms.price, proposal.expires_ms) == (0, PRICE, NOW + 10_000)
    decision = book.decide(proposal, NOW, escrow=ESCROW, height=HEIGHT)
    assert decision == SignAgreement(proposal)
    assert (book.free_slots, book.active, changes) == (1, [], [1])  # reserved, not confirmed
    agreement = complete(book, proposal, decision, ENCLAVE)
    assert isinstance(agreement, Agreement)
    assert book.active == [agreement.id]
    assert book.next_deadline_ms() == DEADLINE
    assert changes == [1]
    assert agreement.id == agreement_id(CHAIN, CLIENT.public_key, PID)
    assert agreement.terms == proposal.terms
    agreement.verify()
    assert nego.on_reply(agreement, NOW) == agreement
    assert decode(encode(agreement), expect=Agreement) == agreement


def test_agreement_id_binds_chain_client_and_proposal() -> None:
    base = agreement_id(CHAIN, CLIENT.public_key, PID)
    assert len(base) == 32
    assert agreement_id("other", CLIENT.public_key, PID) != base
    assert agreement_id(CHAIN, OTHER.public_key, PID) != base
    assert agreement_id(CHAIN, CLIENT.public_key, b"proposal-0000002") != base


def agreed() -> Agreement:
    return agree(make_book(), start().proposal)


def flip(sig: bytes) -> bytes:
    return bytes([sig[0] ^ 1]) + sig[1:]


def test_tampered_agreements_fail_offline() -> None:
    good = agreed()
    good.verify()
    terms = good.terms
    miner_as_counter = ENCLAVE.sign(statement_bytes("counter", terms.payload()))
    tampered = [
        dataclasses.replace(good, terms=dataclasses.replace(terms, price=terms.price - 1)),
        dataclasses.replace(good, terms=dataclasses.replace(terms, max_fuel=terms.max_fuel * 2)),
        dataclasses.replace(good, terms=dataclasses.replace(terms, client=OTHER.public_key)),
        dataclasses.replace(good, client_sig=flip(good.client_sig)),
        dataclasses.replace(good, miner_sig=flip(good.miner_sig)),
        dataclasses.replace(good, miner_sig=good.client_sig),
        dataclasses.replace(good, miner_sig=miner_as_counter),  # another statement's domain
        dataclasses.replace(good, miner_sig=OTHER.sign(statement_bytes("agreement", b"x"))),
    ]
    for bad in tampered:
        with pytest.raises(ProtocolViolation) as info:
            bad.verify()
        assert info.value.reason == "bad_signature"


def test_client_refuses_an_agreement_it_did_not_propose() -> None:
    good = agreed()
    nego = start(pid=b"proposal-0000002")
    with pytest.raises(ProtocolViolation):
        nego.on_reply(good, NOW)
    nego = start()
    with pytest.raises(ProtocolViolation):  # the right terms, a forged miner signature
        nego.on_reply(dataclasses.replace(good, miner_sig=flip(good.miner_sig)), NOW)


# -- counter-offers --------------------------------------------------------------------------


def test_bid_below_ask_is_countered_then_agreed() -> None:
    book = make_book()
    cheap = max_payment(FUEL, 500)
    pot = escrow(amount=cheap)  # the escrow covers the bid, not the ask
    nego = start(bid=500, max_price=PRICE, min_fuel=FUEL // 4)
    first = nego.proposal
    decision = book.decide(first, NOW, escrow=pot, height=HEIGHT)
    assert isinstance(decision, SignCounter)
    assert book.free_slots == 2  # a counter reserves nothing
    counter = complete(book, first, decision, ENCLAVE)
    assert isinstance(counter, Counter)
    assert counter.verify()
    assert decode(encode(counter), expect=Counter) == counter
    assert (counter.proposal_id, counter.round, counter.expires_ms) == (PID, 1, NOW + 10_000)
    assert counter.terms.price == PRICE
    fuel = cheap * 1_000_000 // PRICE
    assert counter.terms.max_fuel == fuel == FUEL // 2  # what the escrow buys at the ask
    assert max_payment(counter.terms.max_fuel, counter.terms.price) <= pot.amount
    assert dataclasses.replace(counter.terms, price=500, max_fuel=FUEL) == first.terms
    # another key's signature of the same counter does not verify
    forged = dataclasses.replace(
        counter, miner_sig=OTHER.sign(statement_bytes("counter", counter.unsigned()))
    )
    assert not forged.verify()
    second = nego.on_reply(counter, NOW + 1_000)
    assert isinstance(second, Proposal)
    assert (second.proposal_id, second.round, second.terms) == (PID, 1, counter.terms)
    assert nego.counters == [counter]
    decision = book.decide(second, NOW + 1_000, escrow=pot, height=HEIGHT)
    assert decision == SignAgreement(second)
    agreement = complete(book, second, decision, ENCLAVE)
    assert isinstance(agreement, Agreement)
    assert nego.on_reply(agreement, NOW + 1_000) == agreement
    agreement.verify()
    assert agreement.terms.price == PRICE
    assert agreement.terms.max_payment <= pot.amount


def test_fuel_above_the_miners_limit_is_cut_in_the_counter() -> None:
    book = make_book(max_fuel=FUEL // 10)
    decision = book.decide(start(min_fuel=1).proposal, NOW, escrow=ESCROW, height=HEIGHT)
    assert isinstance(decision, SignCounter)
    assert (decision.counter.terms.max_fuel, decision.counter.terms.price) == (FUEL // 10, PRICE)


def test_deadline_outside_the_window_is_moved_in_the_counter() -> None:
    book = make_book(min_deadline_ms=5_000, max_deadline_ms=100_000)
    soon = book.decide(start(deadline_ms=NOW + 1_000).proposal, NOW, escrow=ESCROW, height=HEIGHT)
    assert isinstance(soon, SignCounter)
    assert soon.counter.terms.deadline_ms == NOW + 5_000
    late = book.decide(
        start(pid=b"proposal-0000002", deadline_ms=NOW + 200_000).proposal,
        NOW,
        escrow=ESCROW,
        height=HEIGHT,
    )
    assert isinstance(late, SignCounter)
    assert late.counter.terms.deadline_ms == NOW + 100_000


def countered(nego: ClientNegotiation, pot: EscrowFacts = ESCROW, **policy: int) -> Counter:
    return counter_for(make_book(**policy), nego.proposal, pot)


def failed(nego: ClientNegotiation, reply: Counter | Refusal, now: int = NOW) -> NegotiationFailed:
    with pytest.raises(NegotiationFailed) as info:
        nego.on_reply(reply, now)
    return info.value


def test_client_refuses_a_counter_above_max_price() -> None:
    nego = start(max_price=800)  # bids its max_price: 800
    assert nego.proposal.terms.price == 800
    counter = countered(nego)
    assert counter.terms.price == PRICE
    assert failed(nego, counter).reason == "price"


def test_client_refuses_a_counter_that_cuts_fuel_below_min_fuel() -> None:
    nego = start()  # min_fuel defaults to all of max_fuel
    counter = countered(nego, escrow(amount=max_payment(FUEL, PRICE) - 1))
    assert counter.terms.max_fuel < FUEL
    assert failed(nego, counter).reason == "fuel"


def test_client_refuses_a_counter_past_its_deadline() -> None:
    nego = start(deadline_ms=NOW + 500)  # sooner than the miner's 1 s minimum
    counter = countered(nego)
    assert counter.terms.deadline_ms == NOW + 1_000
    assert failed(nego, counter).reason == "deadline"


def test_client_refuses_an_expired_counter() -> None:
    nego = start(bid=500)
    counter = countered(nego)
    assert failed(nego, counter, counter.expires_ms).reason == "counter_expired"


def test_client_gives_up_after_its_rounds() -> None:
    ask = make_ask(bid=500)
    nego = ClientNegotiation(ask, CLIENT, NOW, proposal_id=PID, max_rounds=0)
    counter = countered(nego)
    assert failed(nego, counter).reason == "rounds"


def test_client_refuses_counters_that_are_not_valid_answers() -> None:
    nego = start(bid=500)
    counter = countered(nego)

    def resigned(c: Counter) -> Counter:
        c = dataclasses.replace(c, miner_sig=b"")
        return dataclasses.replace(
            c, miner_sig=ENCLAVE.sign(statement_bytes("counter", c.unsigned()))
        )

    bad = [
        dataclasses.replace(counter, miner_sig=flip(counter.miner_sig)),
        resigned(dataclasses.replace(counter, round=2)),
        resigned(dataclasses.replace(counter, proposal_id=b"proposal-0000009")),
        resigned(
            dataclasses.replace(counter, terms=dataclasses.replace(counter.terms, job_bytes=1))
        ),
        resigned(
            dataclasses.replace(
                counter, terms=dataclasses.replace(counter.terms, escrow_id=b"\x00" * 32)
            )
        ),
        # signed by another key that the counter names as the enclave
        dataclasses.replace(
            counter,
            terms=dataclasses.replace(counter.terms, enclave=OTHER.public_key),
            miner_sig=OTHER.sign(
                statement_bytes(
                    "counter",
                    dataclasses.replace(
                        counter,
                        terms=dataclasses.replace(counter.terms, enclave=OTHER.public_key),
                        miner_sig=b"",
                    ).unsigned(),
                )
            ),
        ),
    ]
    for reply in bad:
        with pytest.raises(ProtocolViolation):
            nego.on_reply(reply, NOW)
    assert nego.counters == []
    assert nego.proposal.round == 0
    assert isinstance(nego.on_reply(counter, NOW), Proposal)  # the real one still works


def test_client_reports_a_refusal() -> None:
    nego = start()
    no = Refusal(PID, 0, "no_slots", "all 2 slots are taken", 2_500)
    error = failed(nego, no)
    assert (error.reason, error.retry_after) == ("no_slots", 2.5)
    final = failed(nego, Refusal(PID, 0, "bad_terms", "no", 0))
    assert final.retry_after is None
    with pytest.raises(ProtocolViolation):
        nego.on_reply(Refusal(b"proposal-0000009", 0, "no_slots", "", 1), NOW)


# -- refusals --------------------------------------------------------------------------------


def test_expired_proposal() -> None:
    proposal = start().proposal
    book = make_book()
    at = proposal.expires_ms
    assert refusal_reason(book.decide(proposal, at, escrow=ESCROW, height=HEIGHT)) == "expired"
    assert isinstance(book.decide(proposal, at - 1, escrow=ESCROW, height=HEIGHT), SignAgreement)


def test_proposal_expiring_too_far_ahead() -> None:
    proposal = dataclasses.replace(start().proposal, expires_ms=NOW + MAX_PROPOSAL_TTL_MS + 1)
    decision = make_book().decide(proposal, NOW, escrow=ESCROW, height=HEIGHT)
    assert refusal_reason(decision) == "bad_terms"


def test_bad_client_signature() -> None:
    proposal = start().proposal
    cases = [
        dataclasses.replace(proposal, client_sig=flip(proposal.client_sig)),
        dataclasses.replace(proposal, terms=dataclasses.replace(proposal.terms, price=PRICE * 2)),
        dataclasses.replace(
            proposal, client_sig=CLIENT.sign(statement_bytes("counter", proposal.terms.payload()))
        ),
    ]
    for bad in cases:
        decision = make_book().decide(bad, NOW, escrow=ESCROW, height=HEIGHT)
        assert refusal_reason(decision) == "bad_signature"


@pytest.mark.parametrize(
    "changes",
    [
        {"enclave": OTHER.public_key},
        {"operator": OTHER.public_key},
        {"miner_peer": "12D3KooWsomeoneelse"},
        {"chain_id": "another-chain"},
    ],
)
def test_terms_for_another_miner(changes: dict[str, object]) -> None:
    proposal = start(**changes).proposal
    decision = make_book().decide(proposal, NOW, escrow=ESCROW, height=HEIGHT)
    assert refusal_reason(decision) == "bad_terms"


def test_agreement_id_must_derive_from_the_proposal() -> None:
    terms = dataclasses.replace(start().proposal.terms, agreement_id=b"\x01" * 32)
    decision = make_book().decide(propose(terms), NOW, escrow=ESCROW, height=HEIGHT)
    assert refusal_reason(decision) == "bad_terms"


@pytest.mark.parametrize(
    ("pot", "reason"),
    [
        (None, "escrow_missing"),
        (escrow(OTHER), "escrow_wrong"),
        (dataclasses.replace(ESCROW, beneficiary=OTHER.public_key), "escrow_wrong"),
        (dataclasses.replace(ESCROW, amount=0), "escrow_insufficient"),
        (dataclasses.replace(ESCROW, expires_height=HEIGHT + 9), "escrow_expiring"),
    ],
)
def test_escrow_problems(pot: EscrowFacts | None, reason: str) -> None:
    book = make_book()
    assert refusal_reason(book.decide(start().proposal, NOW, escrow=pot, height=HEIGHT)) == reason
    assert book.free_slots == 2


def test_escrow_lasting_exactly_the_minimum_is_enough() -> None:
    pot = dataclasses.replace(ESCROW, expires_height=HEIGHT + 10)
    decision = make_book().decide(start().proposal, NOW, escrow=pot, height=HEIGHT)
    assert isinstance(decision, SignAgreement)


def test_free_work_needs_no_escrow_amount() -> None:
    book = make_book(price=0)
    pot = dataclasses.replace(ESCROW, amount=0)
    decision = book.decide(start(max_price=0).proposal, NOW, escrow=pot, height=HEIGHT)
    assert isinstance(decision, SignAgreement)


def test_escrow_backing_another_agreement() -> None:
    book = make_book()
    first = start().proposal
    agree(book, first)
    again = start(pid=b"proposal-0000002").proposal  # same client, same escrow
    decision = book.decide(again, NOW, escrow=ESCROW, height=HEIGHT)
    assert refusal_reason(decision) == "escrow_in_use"
    assert book.free_slots == 1


def test_a_standing_escrow_backs_agreements_while_it_covers_their_max_payments() -> None:
    book = make_book(slots=8)
    pay = max_payment(FUEL, PRICE)
    pot = dataclasses.replace(escrow(amount=2 * pay + pay // 2), standing=True)
    first, second = (start(pid=b"proposal-000000%d" % i).proposal for i in (1, 2))
    agree(book, first, pot)
    agree(book, second, pot)
    assert [aid for aid, _ in book.backing(ESCROW_ID)] == [
        first.terms.agreement_id,
        second.terms.agreement_id,
    ]
    # a third would leave the first two short: the miner offers what is left, which the
    # client (wanting all its fuel) refuses
    third = start(pid=b"proposal-0000003")
    counter = counter_for(book, third.proposal, pot)
    assert counter.terms.max_fuel == (pay // 2) * 1_000_000 // PRICE
    with pytest.raises(NegotiationFailed) as info:
        third.on_reply(counter, NOW)
    assert info.value.reason == "fuel"
    # once the first is settled, what it held counts again (the chain paid it from the pot)
    book.settled(ESCROW_ID, first.terms.agreement_id)
    fourth = start(pid=b"proposal-0000004").proposal
    agree(book, fourth, pot)
    assert book.free_slots == 8 - 3


def test_a_standing_escrow_that_covers_nothing_more_is_refused() -> None:
    book = make_book(slots=8)
    pot = dataclasses.replace(ESCROW, standing=True)  # exactly one max payment
    agree(book, start().proposal, pot)
    late = start(pid=b"proposal-0000002").proposal
    assert refusal_reason(book.decide(late, NOW, escrow=pot, height=HEIGHT)) == (
        "escrow_insufficient"
    )


def test_abandoned_agreements_do_not_draw_on_a_standing_escrow() -> None:
    book = make_book()
    pot = dataclasses.replace(ESCROW, standing=True)
    first = start().proposal
    assert book.decide(first, NOW, escrow=pot, height=HEIGHT) == SignAgreement(first)
    book.abandon(first)  # the enclave could not sign it
    assert book.backing(ESCROW_ID) == []
    agree(book, start(pid=b"proposal-0000002").proposal, pot)


def test_round_without_a_counter() -> None:
    book = make_book()
    terms = start().proposal.terms
    decision = book.decide(propose(terms, rnd=1), NOW, escrow=ESCROW, height=HEIGHT)
    assert refusal_reason(decision) == "unknown_counter"
    nego = start(bid=500)
    counter = counter_for(book, nego.proposal)
    skipped = propose(counter.terms, rnd=2)
    decision = book.decide(skipped, NOW, escrow=ESCROW, height=HEIGHT)
    assert refusal_reason(decision) == "unknown_counter"


def test_counter_expired() -> None:
    book = make_book()
    nego = start(bid=500)
    counter = counter_for(book, nego.proposal)
    accept = nego.on_reply(counter, counter.expires_ms - 1)
    assert isinstance(accept, Proposal)
    late = book.decide(accept, counter.expires_ms, escrow=ESCROW, height=HEIGHT)
    assert refusal_reason(late) == "counter_expired"
    in_time = book.decide(accept, counter.expires_ms - 1, escrow=ESCROW, height=HEIGHT)
    assert isinstance(in_time, SignAgreement)


def test_too_many_rounds() -> None:
    book = make_book(max_rounds=0)
    decision = book.decide(start(bid=500).proposal, NOW, escrow=ESCROW, height=HEIGHT)
    assert refusal_reason(decision) == "too_many_rounds"
    book = make_book(max_rounds=1)
    nego = start(bid=500)
    counter = counter_for(book, nego.proposal)
    still_low = propose(dataclasses.replace(counter.terms, price=600), rnd=1)
    decision = book.decide(still_low, NOW, escrow=ESCROW, height=HEIGHT)
    assert refusal_reason(decision) == "too_many_rounds"


def test_input_too_large() -> None:
    book = make_book(max_input=4_096)
    big = book.decide(start(job_bytes=4_097).proposal, NOW, escrow=ESCROW, height=HEIGHT)
    assert refusal_reason(big) == "too_large"
    fits = start(pid=b"proposal-0000002", job_bytes=4_096).proposal
    assert isinstance(book.decide(fits, NOW, escrow=ESCROW, height=HEIGHT), SignAgreement)


def test_refusals_are_not_remembered() -> None:
    book = make_book()
    proposal = start().proposal
    assert refusal_reason(book.decide(proposal, NOW, escrow=None, height=HEIGHT)) == (
        "escrow_missing"
    )
    # the escrow landed: the same proposal, retried, is decided afresh
    assert isinstance(book.decide(proposal, NOW, escrow=ESCROW, height=HEIGHT), SignAgreement)


# -- idempotency -----------------------------------------------------------------------------


def test_retry_of_an_accepted_proposal_returns_the_same_agreement() -> None:
    book = make_book()
    changes: list[int] = []
    book.on_change = lambda: changes.append(book.free_slots)
    proposal = start().proposal
    first = agree(book, proposal)
    for at in (NOW + 1, NOW + 5_000, proposal.expires_ms + 1):  # even once the proposal expired
        again = book.decide(proposal, at, escrow=ESCROW, height=HEIGHT)
        assert again == first
        assert encode(again) == encode(first)
    assert (book.free_slots, book.active, changes) == (1, [first.id], [1])


def test_retry_of_a_countered_proposal_returns_the_same_counter() -> None:
    book = make_book()
    proposal = start(bid=500).proposal
    counter = counter_for(book, proposal)
    assert book.decide(proposal, NOW + 2_000, escrow=ESCROW, height=HEIGHT) == counter


def test_reusing_a_proposal_id_for_other_terms() -> None:
    book = make_book()
    proposal = start().proposal
    agree(book, proposal)
    other = start(job_bytes=2_000).proposal  # same id, other terms
    decision = book.decide(other, NOW, escrow=ESCROW, height=HEIGHT)
    assert refusal_reason(decision) == "id_reused"
    assert book.free_slots == 1
    # after a counter too
    low = start(OTHER, bid=500, pid=b"proposal-0000002", escrow_id=b"\xe6" * 32).proposal
    pot = escrow(OTHER)
    counter_for(book, low, pot)
    lower = start(OTHER, bid=400, pid=b"proposal-0000002", escrow_id=b"\xe6" * 32).proposal
    assert refusal_reason(book.decide(lower, NOW, escrow=pot, height=HEIGHT)) == "id_reused"


# -- slots -----------------------------------------------------------------------------------

CLIENTS = [Identity.from_seed(bytes([0xC0 + i]) * 32) for i in range(4)]


def client_proposal(i: int, *, deadline: int, now: int = NOW) -> Proposal:
    client = CLIENTS[i]
    nego = start(
        client,
        pid=b"proposal-%07d" % i,
        now=now,
        escrow_id=bytes([i]) * 32,
        deadline_ms=deadline,
    )
    return nego.proposal


def pot_of(proposal: Proposal) -> EscrowFacts:
    payer = next(c for c in CLIENTS if c.public_key == proposal.terms.client)
    return escrow(payer)


def test_slots_bound_concurrent_agreements() -> None:
    book = make_book(slots=2)
    changes: list[int] = []
    book.on_change = lambda: changes.append(book.free_slots)
    a, b, c = (client_proposal(i, deadline=NOW + 5_000 + 3_000 * i) for i in range(3))
    got = []
    for p in (a, b):
        decision = book.decide(p, NOW, escrow=pot_of(p), height=HEIGHT)
        got.append(complete(book, p, decision, ENCLAVE))
    assert all(isinstance(g, Agreement) for g in got)
    assert (book.free_slots, len(book.active), changes) == (0, 2, [1, 0])
    full = book.decide(c, NOW + 1_000, escrow=pot_of(c), height=HEIGHT)
    assert isinstance(full, Refusal)
    assert (full.reason, full.retry_after_ms) == ("no_slots", 4_000)  # a's deadline
    assert RefuseReason(full.reason) is RefuseReason.NO_SLOTS
    assert book.free_slots == 0
    # the earliest agreement reaches its deadline: its slot frees
    assert book.expire(NOW + 4_999) == 0
    assert changes == [1, 0]
    assert book.expire(NOW + 5_000) == 1
    assert (book.free_slots, changes) == (1, [1, 0, 1])
    assert book.active == [got[1].id]
    # the refused client retries the same proposal and gets the slot
    retried = book.decide(c, NOW + 5_000, escrow=pot_of(c), height=HEIGHT)
    assert retried == SignAgreement(c)
    assert book.free_slots == 0
    assert book.decide(a, NOW + 5_000, escrow=pot_of(a), height=HEIGHT) == got[0]  # still agreed
    assert book.free_slots == 0


def test_release_frees_a_slot() -> None:
    book = make_book(slots=1)
    changes: list[int] = []
    a, b = (client_proposal(i, deadline=NOW + 30_000) for i in range(2))
    first = agree(book, a, pot_of(a))
    assert refusal_reason(book.decide(b, NOW, escrow=pot_of(b), height=HEIGHT)) == "no_slots"
    book.on_change = lambda: changes.append(book.free_slots)
    assert book.release(first.id)
    assert (book.free_slots, book.active, changes) == (1, [], [1])
    assert not book.release(first.id)
    assert not book.release(b"\x00" * 32)
    assert changes == [1]
    assert isinstance(book.decide(b, NOW, escrow=pot_of(b), height=HEIGHT), SignAgreement)


def test_decide_expires_slots_itself() -> None:
    book = make_book(slots=1)
    a = client_proposal(0, deadline=NOW + 2_000)
    b = client_proposal(1, deadline=NOW + 30_000, now=NOW + 2_000)
    agree(book, a, pot_of(a))
    assert isinstance(book.decide(b, NOW + 2_000, escrow=pot_of(b), height=HEIGHT), SignAgreement)
    assert book.next_deadline_ms() == NOW + 30_000


def test_abandon_frees_a_reserved_slot_and_its_escrow() -> None:
    book = make_book(slots=1)
    changes: list[int] = []
    book.on_change = lambda: changes.append(book.free_slots)
    proposal = start().proposal
    assert isinstance(book.decide(proposal, NOW, escrow=ESCROW, height=HEIGHT), SignAgreement)
    assert book.free_slots == 0
    book.abandon(proposal)  # the enclave could not sign
    assert (book.free_slots, changes) == (1, [0, 1])
    assert book.next_deadline_ms() is None
    # the escrow no longer backs anything: another proposal may use it
    other = start(pid=b"proposal-0000002").proposal
    decision = book.decide(other, NOW, escrow=ESCROW, height=HEIGHT)
    assert isinstance(decision, SignAgreement)


def test_abandon_after_agreement_keeps_the_slot() -> None:
    book = make_book(slots=1)
    proposal = start().proposal
    agreement = agree(book, proposal)
    book.abandon(proposal)  # a stray report (a retry's signing failed): the agreement stands
    assert (book.free_slots, book.active) == (0, [agreement.id])
    assert book.decide(proposal, NOW, escrow=ESCROW, height=HEIGHT) == agreement
    # its escrow still backs it
    other = start(pid=b"proposal-0000002").proposal
    assert refusal_reason(book.decide(other, NOW, escrow=ESCROW, height=HEIGHT)) == (
        "escrow_in_use"
    )
    assert book.release(agreement.id)
    book.abandon(proposal)  # even once its slot is free
    assert refusal_reason(book.decide(other, NOW, escrow=ESCROW, height=HEIGHT)) == (
        "escrow_in_use"
    )


# -- argument checks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"slots": 0},
        {"max_fuel": 0},
        {"price": -1},
        {"max_rounds": MAX_ROUNDS + 1},
        {"min_deadline_ms": 10, "max_deadline_ms": 5},
        {"offer_ttl_ms": 0},
    ],
)
def test_policy_refuses_bad_values(changes: dict[str, int]) -> None:
    with pytest.raises(UsageError):
        make_book(**changes)


def test_client_refuses_bad_arguments() -> None:
    with pytest.raises(UsageError):
        make_ask(bid=PRICE + 1)
    with pytest.raises(UsageError):
        make_ask(min_fuel=FUEL + 1)
    with pytest.raises(UsageError):
        make_ask(max_fuel=0)
    with pytest.raises(UsageError):
        ClientNegotiation(make_ask(), CLIENT, NOW, proposal_id=b"short")
    with pytest.raises(UsageError):
        ClientNegotiation(
            make_ask(), CLIENT, NOW, proposal_id=PID, proposal_ttl_ms=MAX_PROPOSAL_TTL_MS + 1
        )


def test_short_ids_and_keys_do_not_decode() -> None:
    proposal = start().proposal
    short_id = encode(dataclasses.replace(proposal, proposal_id=b"x" * 15))
    with pytest.raises(ProtocolViolation):
        decode(short_id, expect=Proposal)
    short_key = dataclasses.replace(
        proposal, terms=dataclasses.replace(proposal.terms, client=b"c" * 31)
    )
    with pytest.raises(ProtocolViolation):
        decode(encode(short_key), expect=Proposal)
    assert decode(encode(proposal), expect=Proposal) == proposal


# -- properties ------------------------------------------------------------------------------

NEGOTIATION_TYPES = [AgreementTerms, Proposal, Counter, Agreement, Refusal]


@pytest.mark.parametrize("cls", NEGOTIATION_TYPES)
@given(data=st.binary(max_size=600))
def test_arbitrary_bytes_raise_only_protocol_violation(cls: type, data: bytes) -> None:
    try:
        decode(data, max_size=4096, expect=cls)
    except ProtocolViolation:
        pass


def _samples() -> list[bytes]:
    book = make_book()
    nego = start(bid=500)
    counter = counter_for(book, nego.proposal)
    return [encode(nego.proposal), encode(counter), encode(agreed())]


SAMPLES = _samples()


@given(
    which=st.integers(0, len(SAMPLES) - 1),
    at=st.integers(0, 400),
    value=st.integers(0, 255),
    cut=st.booleans(),
)
def test_mutated_messages_raise_only_protocol_violation(
    which: int, at: int, value: int, cut: bool
) -> None:
    good = SAMPLES[which]
    at %= len(good)
    data = good[:at] if cut else good[:at] + bytes([value]) + good[at + 1 :]
    for cls in (Proposal, Counter, Agreement):
        try:
            decode(data, max_size=4096, expect=cls)
        except ProtocolViolation:
            pass


Step = tuple[object, ...]
STEPS = st.one_of(
    # a client starts a negotiation: at or below the ask, with a deadline, maybe reusing an
    # escrow it already used
    st.tuples(
        st.just("propose"),
        st.integers(0, len(CLIENTS) - 1),
        st.booleans(),
        st.integers(1_000, 8_000),
        st.booleans(),
    ),
    st.tuples(st.just("send"), st.integers(0, 63)),  # (re)send an earlier proposal
    st.tuples(st.just("sign"), st.integers(0, 63), st.booleans()),  # the enclave signs or fails
    st.tuples(st.just("release"), st.integers(0, 63)),
    st.tuples(st.just("tick"), st.integers(0, 4_000)),
)


@settings(max_examples=150)
@given(slots=st.integers(1, 3), steps=st.lists(STEPS, max_size=30))
def test_never_more_agreements_than_slots(slots: int, steps: list[Step]) -> None:
    book = make_book(slots=slots)
    now = NOW
    held: dict[bytes, int] = {}  # agreement id -> deadline: every slot the book should hold
    confirmed: set[bytes] = set()
    to_sign: list[tuple[Proposal, SignAgreement]] = []
    sent: list[Proposal] = []
    answered: dict[bytes, Agreement | Counter] = {}  # proposal bytes -> the book's answer
    talks: dict[bytes, ClientNegotiation] = {}
    serial = 0

    def expire_model() -> None:
        for k in [k for k, d in held.items() if d <= now]:
            del held[k]
            confirmed.discard(k)

    def send(p: Proposal) -> None:
        expire_model()
        d = book.decide(p, now, escrow=pot_of(p), height=HEIGHT)
        if encode(p) in answered:
            assert d == answered[encode(p)]  # a retry gets the same answer
        if isinstance(d, SignAgreement):
            assert len(held) < slots or p.terms.agreement_id in held
            held[p.terms.agreement_id] = p.terms.deadline_ms
            to_sign.append((p, d))
        elif isinstance(d, SignCounter):
            counter = complete(book, p, d, ENCLAVE)
            assert isinstance(counter, Counter)
            answered[encode(p)] = counter
            talk = talks.get(p.proposal_id)
            if talk is not None and talk.proposal == p:
                try:
                    accept = talk.on_reply(counter, now)
                except NegotiationFailed:
                    pass
                else:
                    assert isinstance(accept, Proposal)
                    sent.append(accept)
        sent.append(p)

    for step in steps:
        kind = step[0]
        if kind == "propose":
            _, i, low, deadline, reuse = step
            assert isinstance(i, int)
            assert isinstance(deadline, int)
            serial += 1
            ask = make_ask(
                CLIENTS[i],
                escrow_id=bytes([i]) * 32 if reuse else bytes([i]) * 16 + b"%016d" % serial,
                deadline_ms=now + deadline,
                bid=500 if low else None,
                min_fuel=1,
            )
            talk = ClientNegotiation(ask, CLIENTS[i], now, proposal_id=b"%016d" % serial)
            talks[talk.proposal.proposal_id] = talk
            send(talk.proposal)
        elif kind == "send" and sent:
            assert isinstance(step[1], int)
            send(sent[step[1] % len(sent)])
        elif kind == "sign" and to_sign:
            _, k, ok = step
            assert isinstance(k, int)
            p, d = to_sign.pop(k % len(to_sign))
            aid = p.terms.agreement_id
            if ok:
                agreement = complete(book, p, d, ENCLAVE)
                assert isinstance(agreement, Agreement)
                agreement.verify()
                answered[encode(p)] = agreement
                if aid in held:
                    confirmed.add(aid)
            else:
                book.abandon(p)
                if aid in held and aid not in confirmed:
                    del held[aid]
        elif kind == "release" and held:
            assert isinstance(step[1], int)
            aid = sorted(held)[step[1] % len(held)]
            assert book.release(aid)
            del held[aid]
            confirmed.discard(aid)
        elif kind == "tick":
            assert isinstance(step[1], int)
            now += step[1]
            due = sum(1 for d in held.values() if d <= now)
            assert book.expire(now) == due
            expire_model()
        # the invariant, and that the book counts what the model counts
        assert len(held) <= slots
        assert book.free_slots == slots - len(held)
        assert set(book.active) == confirmed
