"""The code reproduces every byte of protocols/vectors/market.json."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

import pytest

from phala_p2p.crypto.identity import Identity, verify_signature
from phala_p2p.errors import ProtocolViolation
from phala_p2p.market.advert import CapacityAdvert, SignedAdvert, advert_payload
from phala_p2p.market.negotiation import (
    Agreement,
    Ask,
    ClientNegotiation,
    Counter,
    EscrowFacts,
    MinerBook,
    MinerPolicy,
    Proposal,
    Refusal,
    SignCounter,
    agreement_id,
)
from phala_p2p.tee.statements import PURPOSES, statement_bytes
from phala_p2p.wire.codec import decode, encode

VECTORS = Path(__file__).resolve().parents[2] / "protocols" / "vectors" / "market.json"
V: dict[str, Any] = json.loads(VECTORS.read_text(encoding="utf-8"))
KEYS = {name: Identity.from_seed(bytes.fromhex(seed)) for name, seed in V["seeds"].items()}


def from_json(cls: type[Any], obj: dict[str, Any]) -> Any:
    """A message from its JSON fields (bytes as hex, nested messages as objects)."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    assert list(obj) == [f.name for f in fields]  # every field, in wire order
    values = {}
    for f in fields:
        hint, value = hints[f.name], obj[f.name]
        if hint is bytes:
            values[f.name] = bytes.fromhex(value)
        elif dataclasses.is_dataclass(hint):
            values[f.name] = from_json(hint, value)  # type: ignore[arg-type]
        elif typing.get_origin(hint) is tuple:
            values[f.name] = tuple(value)
        else:
            values[f.name] = value
    return cls(**values)


def signature(name: str, purpose: str, payload: bytes) -> bytes:
    return KEYS[name].sign(statement_bytes(purpose, payload))


def test_keys_and_domains() -> None:
    assert {n: k.public_key.hex() for n, k in KEYS.items()} == V["public_keys"]
    assert {n: d.hex() for n, d in PURPOSES.items()} == V["domains"]
    assert V["domains"]["advert"] == b"phala/market/advert/v1\x00".hex()


def test_signed_advert() -> None:
    case = V["signed_advert"]
    advert = from_json(CapacityAdvert, case["advert"]["fields"])
    payload = advert_payload(advert)
    assert payload.hex() == case["advert"]["wire"]
    assert statement_bytes("advert", payload).hex() == case["statement"]
    sig = signature("enclave", "advert", payload)
    assert sig.hex() == case["signature"]
    assert encode(SignedAdvert(payload, sig)).hex() == case["wire"]
    signed = decode(bytes.fromhex(case["wire"]), expect=SignedAdvert)
    assert signed.open() == advert
    assert advert.enclave == KEYS["enclave"].public_key
    assert verify_signature(advert.enclave, bytes.fromhex(case["statement"]), sig)


def test_proposal() -> None:
    case = V["proposal"]
    ids = case["agreement_id"]
    derived = agreement_id(
        ids["chain_id"], bytes.fromhex(ids["client"]), bytes.fromhex(ids["proposal_id"])
    )
    assert derived.hex() == ids["agreement_id"]
    proposal = from_json(Proposal, case["fields"])
    assert proposal.terms.agreement_id == derived
    payload = proposal.terms.payload()
    assert payload.hex() == case["terms_wire"]
    assert statement_bytes("agreement", payload).hex() == case["statement"]
    assert signature("client", "agreement", payload) == proposal.client_sig
    assert encode(proposal).hex() == case["wire"]
    assert decode(bytes.fromhex(case["wire"]), expect=Proposal) == proposal


def test_counter() -> None:
    case = V["counter"]
    counter = from_json(Counter, case["fields"])
    unsigned = counter.unsigned()
    assert unsigned.hex() == case["unsigned"]
    assert statement_bytes("counter", unsigned).hex() == case["statement"]
    assert signature("enclave", "counter", unsigned) == counter.miner_sig
    assert counter.verify()
    assert encode(counter).hex() == case["wire"]
    assert decode(bytes.fromhex(case["wire"]), expect=Counter) == counter


def test_agreement() -> None:
    case = V["agreement"]
    agreement = from_json(Agreement, case["fields"])
    payload = agreement.terms.payload()
    assert payload.hex() == case["terms_wire"]
    assert statement_bytes("agreement", payload).hex() == case["statement"]
    assert signature("client", "agreement", payload) == agreement.client_sig
    assert signature("enclave", "agreement", payload) == agreement.miner_sig
    agreement.verify()
    assert encode(agreement).hex() == case["wire"]
    assert decode(bytes.fromhex(case["wire"]), expect=Agreement) == agreement
    counter = from_json(Counter, V["counter"]["fields"])
    assert agreement.terms == counter.terms  # the client took the counter


def test_refusal() -> None:
    refusal = from_json(Refusal, V["refusal"]["fields"])
    assert encode(refusal).hex() == V["refusal"]["wire"]
    assert decode(bytes.fromhex(V["refusal"]["wire"]), expect=Refusal) == refusal


@pytest.mark.parametrize("case", V["invalid"], ids=lambda c: c["name"])
def test_invalid_advert(case: dict[str, Any]) -> None:
    signed = decode(bytes.fromhex(case["signed_advert"]), expect=SignedAdvert)
    with pytest.raises(ProtocolViolation) as info:
        signed.open()
    assert info.value.reason == case["reason"]


def test_the_machines_produce_these_messages() -> None:
    """The vectors are one negotiation: a client bids 800 with an escrow of 1,600; a miner
    asking 1,000 counters with the fuel the escrow buys at its price."""
    proposal = from_json(Proposal, V["proposal"]["fields"])
    terms = proposal.terms
    now = proposal.expires_ms - 10_000
    ask = Ask(
        chain_id=terms.chain_id,
        client_peer=terms.client_peer,
        miner_peer=terms.miner_peer,
        enclave=terms.enclave,
        operator=terms.operator,
        escrow_id=terms.escrow_id,
        escrow_height=proposal.escrow_height,
        job_bytes=terms.job_bytes,
        max_fuel=terms.max_fuel,
        max_price=1_000,
        deadline_ms=terms.deadline_ms,
        bid=terms.price,
        min_fuel=1,
    )
    client = ClientNegotiation(ask, KEYS["client"], now, proposal_id=proposal.proposal_id)
    assert encode(client.proposal).hex() == V["proposal"]["wire"]
    book = MinerBook(
        chain_id=terms.chain_id,
        enclave=terms.enclave,
        operator=terms.operator,
        peer_id=terms.miner_peer,
        policy=MinerPolicy(price=1_000, slots=4, max_fuel=1 << 32, max_input=1 << 20),
    )
    escrow = EscrowFacts(terms.client, terms.operator, 1_600, proposal.escrow_height + 100)
    decision = book.decide(proposal, now, escrow=escrow, height=proposal.escrow_height)
    assert isinstance(decision, SignCounter)
    counter = dataclasses.replace(
        decision.counter,
        miner_sig=signature("enclave", "counter", decision.counter.unsigned()),
    )
    assert encode(counter).hex() == V["counter"]["wire"]
    accept = client.on_reply(counter, now)
    assert isinstance(accept, Proposal)
    assert accept.client_sig.hex() == V["agreement"]["fields"]["client_sig"]
