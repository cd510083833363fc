"""Job receipts, settlement of agreements on chain, and slashing of equivocating enclaves.

``Net`` (a chain with attested miners, blocks certified by four gatekeepers) is shared with
test_liveness.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from phala_p2p.chain.block import Block, Commit
from phala_p2p.chain.bodies import (
    EscrowOpen,
    EscrowRefund,
    EscrowRelease,
    Stake,
    StandingEscrowOpen,
    Unstake,
)
from phala_p2p.chain.ledger import LedgerState
from phala_p2p.chain.miners import (
    MinerRegister,
    MinerStatus,
    get_miner,
    registration_nonce,
)
from phala_p2p.chain.params import PPM, ChainParams
from phala_p2p.chain.payments import ESCROWS, Escrow
from phala_p2p.chain.settlement import (
    AGREEMENT_DOMAIN,
    RECEIPT_ACK_DOMAIN,
    RECEIPT_DOMAIN,
    JobSettle,
    ReceiptEquivocation,
    SubmitReceiptEvidence,
    get_settlement,
    parse_agreement,
    parse_claim,
    parse_receipt,
)
from phala_p2p.chain.staking import UNBONDING
from phala_p2p.chain.tx import TX_DOMAIN, Tx, TxRejectReason
from phala_p2p.chain.view import ChainView
from phala_p2p.crypto.identity import Identity
from phala_p2p.errors import ProtocolViolation, UsageError
from phala_p2p.market.advert import max_payment
from phala_p2p.market.negotiation import Agreement, AgreementTerms, agreement_id
from phala_p2p.market.receipt import (
    CoSignedReceipt,
    JobReceipt,
    ReceiptError,
    ReceiptProblem,
    equivocation,
    output_hash,
    settle_body,
)
from phala_p2p.tee.quote import make_report_data, sign_sim_quote
from phala_p2p.tee.statements import PURPOSES, statement_bytes, verify_statement
from phala_p2p.wire.codec import decode, encode

from .helpers import CHAIN_ID, FAST, extend, genesis, identities, try_txs

# -- a chain with miners (shared with test_liveness.py) --------------------------------------

KEEPERS = identities(4, seed=91)
ROOT = Identity.from_seed(b"\x52" * 32)  # the dev attestation root named in genesis
MEASUREMENT = bytes(range(32))
PARAMS = dataclasses.replace(FAST, min_miner_stake=500)


def key(name: str) -> Identity:
    return Identity.from_seed(hashlib.sha256(name.encode()).digest())


OPERATOR = key("operator")
ENCLAVE = key("enclave")  # stands in for the enclave's identity key
CLIENT = key("client")
OTHER = key("someone else")


class Net:
    """A chain view plus per-account nonces; ``block`` applies the transactions that pass."""

    def __init__(
        self,
        *,
        params: ChainParams = PARAMS,
        accounts: Sequence[Identity] = (OPERATOR, CLIENT, OTHER),
        keepers: Sequence[Identity] = KEEPERS,
        keeper_stakes: Sequence[int] | None = None,
        balance: int = 1_000_000,
    ) -> None:
        gen = genesis(
            keepers,
            stakes=keeper_stakes,
            accounts=[(a, balance) for a in (*accounts, *keepers)],
            params=params,
        )
        gen = dataclasses.replace(
            gen, attestation_roots=(ROOT.public_key,), allowed_measurements=(MEASUREMENT,)
        )
        self.genesis = gen
        self.keepers = list(keepers)
        self.view = ChainView(gen)
        self.nonces: dict[bytes, int] = {}
        self.blocks: list[tuple[Block, Commit]] = []

    @property
    def state(self) -> LedgerState:
        return self.view.state

    @property
    def height(self) -> int:
        return self.view.height

    def tx(self, who: Identity, body: object) -> Tx:
        n = self.nonces.get(who.public_key, self.state.nonce(who.public_key))
        self.nonces[who.public_key] = n + 1
        return Tx.sign(who, chain_id=CHAIN_ID, nonce=n, fee=self.state.params.tx_fee, body=body)

    def block(self, *txs: Tx) -> list[str | None]:
        """Apply a block with ``txs``; returns each one's rejection reason (None: applied)."""
        reasons = try_txs(self.view, txs)
        included = [tx for tx, r in zip(txs, reasons, strict=True) if r is None]
        self.nonces = {}  # refused transactions did not use their nonce
        self.blocks.append(extend(self.view, self.keepers, included))
        return reasons

    def registration(self, operator: Identity, enclave: Identity) -> MinerRegister:
        x25519 = hashlib.sha256(b"x" + enclave.public_key).digest()
        nonce = registration_nonce(CHAIN_ID, operator.public_key)
        quote = sign_sim_quote(
            ROOT,
            MEASUREMENT,
            make_report_data(enclave.public_key, x25519, nonce=nonce),
            (self.view.head_time_ms + 1000) // 1000,
        )
        return MinerRegister("SIM", quote, "", enclave.public_key, x25519)

    def register(self, operator: Identity, enclave: Identity, *, stake: int = 0) -> int:
        """Stake (if ``stake``) and register; returns the registration height."""
        txs = [self.tx(operator, Stake(stake))] if stake else []
        txs.append(self.tx(operator, self.registration(operator, enclave)))
        assert self.block(*txs) == [None] * len(txs)
        return self.height

    def supply(self) -> int:
        """Every token on chain: balances, stakes, unbonding, escrows and the treasury."""
        s = self.state
        total: int = s.treasury()
        total += sum(a.balance for _, a in s.accounts.items())
        total += sum(v for _, v in s.stakes.items())
        total += sum(Escrow(*v).amount for _, v in s.table(ESCROWS).items())
        total += sum(e[1] for _, entries in s.table(UNBONDING).items() for e in entries)
        return total


# -- agreements and receipts -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Deal:
    agreement: Agreement
    escrow_id: bytes
    amount: int

    @property
    def terms(self) -> AgreementTerms:
        return self.agreement.terms


def sign_agreement(terms: AgreementTerms, client: Identity, enclave: Identity) -> Agreement:
    payload = terms.payload()
    return Agreement(
        terms,
        client.sign(statement_bytes("agreement", payload)),
        enclave.sign(statement_bytes("agreement", payload)),
    )


def open_deal(
    net: Net,
    *,
    max_fuel: int = 1_000_000,
    price: int = 1_234,
    extra: int = 0,
    expires_in: int = 20,
    pid: bytes = b"proposal-0000001",
    beneficiary: bytes | None = None,
    enclave: Identity = ENCLAVE,
    standing: bool = False,
    on: Deal | None = None,
) -> Deal:
    """Open an escrow of ``max_payment + extra`` (a standing one if ``standing``; none, if
    the agreement is ``on`` the escrow of another deal) and sign an agreement on it."""
    if on is None:
        amount = max_payment(max_fuel, price) + extra
        expires = net.view.next_height + expires_in
        kind = StandingEscrowOpen if standing else EscrowOpen
        opened = net.tx(CLIENT, kind(beneficiary or OPERATOR.public_key, amount, expires))
        assert net.block(opened) == [None]
        escrow_id = opened.id
    else:
        escrow_id, amount = on.escrow_id, on.amount
    terms = AgreementTerms(
        agreement_id=agreement_id(CHAIN_ID, CLIENT.public_key, pid),
        chain_id=CHAIN_ID,
        client=CLIENT.public_key,
        client_peer="12D3KooWclient",
        miner_peer="12D3KooWminer",
        enclave=enclave.public_key,
        operator=OPERATOR.public_key,
        escrow_id=escrow_id,
        job_bytes=4_096,
        max_fuel=max_fuel,
        price=price,
        deadline_ms=2_000_000_000_000,
    )
    return Deal(sign_agreement(terms, CLIENT, enclave), escrow_id, amount)


def make_receipt(
    terms: AgreementTerms, *, seq: int, fuel: int, final: bool = False, **changes: Any
) -> JobReceipt:
    """An unsigned receipt for ``terms`` (sign it with ``.sign(enclave)``)."""
    receipt = JobReceipt(
        chain_id=terms.chain_id,
        agreement_id=terms.agreement_id,
        seq=seq,
        fuel_used=fuel,
        bytes_in=1_000 + seq,
        bytes_out=10 * seq,
        output_hash=output_hash(b"output up to %d" % seq),
        final=final,
        enclave=terms.enclave,
    )
    return dataclasses.replace(receipt, **changes)


def forge(receipt: JobReceipt, key: Identity) -> JobReceipt:
    """``receipt`` signed by ``key`` whoever it names."""
    return dataclasses.replace(receipt, signature=key.sign(RECEIPT_DOMAIN + receipt.unsigned()))


def registered_net(**kw: Any) -> Net:
    net = Net(**kw)
    net.register(OPERATOR, ENCLAVE, stake=1_000)
    return net


def balances(net: Net, deal: Deal) -> tuple[int, int, int, Escrow | None]:
    s = net.state
    return (
        s.balance(CLIENT.public_key),
        s.balance(OPERATOR.public_key),
        s.treasury(),
        s.escrow(deal.escrow_id),
    )


def ceil_cost(fuel: int, price: int) -> int:
    return math.ceil(Fraction(fuel * price, 1_000_000))


# -- the receipt format ----------------------------------------------------------------------

TERMS = AgreementTerms(
    agreement_id=b"\xa1" * 32,
    chain_id=CHAIN_ID,
    client=CLIENT.public_key,
    client_peer="c",
    miner_peer="m",
    enclave=ENCLAVE.public_key,
    operator=OPERATOR.public_key,
    escrow_id=b"\xe5" * 32,
    job_bytes=10,
    max_fuel=1_000,
    price=7,
    deadline_ms=1,
)


def test_receipt_signature_is_the_enclaves_and_covers_every_field() -> None:
    receipt = make_receipt(TERMS, seq=1, fuel=10).sign(ENCLAVE)
    receipt.verify()
    assert decode(encode(receipt), expect=JobReceipt) == receipt
    for name, value in [
        ("seq", 2),
        ("fuel_used", 11),
        ("bytes_in", 0),
        ("bytes_out", 1),
        ("output_hash", b"\x00" * 32),
        ("final", True),
        ("agreement_id", b"\xa2" * 32),
        ("chain_id", "other"),
    ]:
        with pytest.raises(ReceiptError) as info:
            dataclasses.replace(receipt, **{name: value}).verify()  # type: ignore[arg-type]
        assert info.value.reason == "bad_signature", name
    with pytest.raises(ReceiptError):
        forge(receipt, OTHER).verify()
    with pytest.raises(UsageError):
        make_receipt(TERMS, seq=1, fuel=10).sign(OTHER)  # not the enclave it names


def test_receipt_domains_are_their_own() -> None:
    others = {*PURPOSES.values(), TX_DOMAIN, b"phala/tee/usage-receipt/v1\x00"}
    assert len({RECEIPT_DOMAIN, RECEIPT_ACK_DOMAIN, *others}) == len(others) + 2
    # the chain's copy of the agreement domain is tee.statements'
    assert statement_bytes("agreement", b"x") == AGREEMENT_DOMAIN + b"x"
    # a receipt signature means nothing as any statement the host can get signed
    receipt = make_receipt(TERMS, seq=1, fuel=10).sign(ENCLAVE)
    for purpose in PURPOSES:
        assert not verify_statement(
            ENCLAVE.public_key, purpose, receipt.unsigned(), receipt.signature
        )
    assert parse_receipt(encode(receipt)).signature_valid()


@pytest.mark.parametrize(
    ("changes", "previous", "problem"),
    [
        ({"agreement_id": b"\xa2" * 32}, None, ReceiptProblem.WRONG_AGREEMENT),
        ({"chain_id": "other-chain"}, None, ReceiptProblem.WRONG_AGREEMENT),
        ({"enclave": OTHER.public_key}, None, ReceiptProblem.WRONG_ENCLAVE),
        ({"fuel_used": 1_001}, None, ReceiptProblem.FUEL_OVER_LIMIT),
        ({"seq": 5}, {"seq": 5}, ReceiptProblem.SEQUENCE_NOT_INCREASING),
        ({"seq": 4}, {"seq": 5}, ReceiptProblem.SEQUENCE_NOT_INCREASING),
        ({"fuel_used": 9}, {"fuel_used": 10}, ReceiptProblem.COUNTER_DECREASED),
        ({"bytes_in": 0}, {"bytes_in": 1}, ReceiptProblem.COUNTER_DECREASED),
        ({"bytes_out": 0}, {"bytes_out": 1}, ReceiptProblem.COUNTER_DECREASED),
        ({}, {"final": True}, ReceiptProblem.AFTER_FINAL),
    ],
)
def test_check_against_refuses_inconsistent_receipts(
    changes: dict[str, Any], previous: dict[str, Any] | None, problem: ReceiptProblem
) -> None:
    base = {"seq": 1, "fuel_used": 10, "bytes_in": 0, "bytes_out": 0}
    receipt = make_receipt(TERMS, seq=1, fuel=10)
    receipt = dataclasses.replace(receipt, **{**base, "seq": 6, **changes})
    before = None
    if previous is not None:
        before = dataclasses.replace(make_receipt(TERMS, seq=1, fuel=10), **{**base, **previous})
    with pytest.raises(ReceiptError) as info:
        receipt.check_against(TERMS, before)
    assert info.value.problem is problem
    assert info.value.reason == problem.value


def test_check_against_accepts_a_consistent_sequence() -> None:
    first = make_receipt(TERMS, seq=1, fuel=10)
    first.check_against(TERMS)
    second = make_receipt(TERMS, seq=2, fuel=10)  # no new fuel is fine
    second.check_against(TERMS, first)
    last = make_receipt(TERMS, seq=9, fuel=TERMS.max_fuel, final=True)  # fuel == max is fine
    last.check_against(TERMS, second)
    with pytest.raises(UsageError):
        second.check_against(TERMS, make_receipt(TERMS, seq=1, fuel=1, agreement_id=b"\0" * 32))


def test_co_signed_receipt_is_verifiable_offline() -> None:
    final = make_receipt(TERMS, seq=3, fuel=500, final=True).sign(ENCLAVE)
    cosigned = CoSignedReceipt.sign(final, CLIENT)
    cosigned.verify()
    cosigned.check_against(TERMS)
    assert decode(encode(cosigned), expect=CoSignedReceipt) == cosigned
    with pytest.raises(ReceiptError) as info:
        dataclasses.replace(cosigned, client_sig=OTHER.sign(b"x")).verify()
    assert info.value.problem is ReceiptProblem.BAD_SIGNATURE
    by_other = CoSignedReceipt.sign(final, OTHER)
    by_other.verify()  # a valid signature, but not the agreement's client
    with pytest.raises(ReceiptError) as info:
        by_other.check_against(TERMS)
    assert info.value.problem is ReceiptProblem.WRONG_CLIENT
    with pytest.raises(ReceiptError):  # the enclave's signature is checked too
        CoSignedReceipt.sign(forge(final, OTHER), CLIENT).verify()
    with pytest.raises(UsageError):
        CoSignedReceipt.sign(make_receipt(TERMS, seq=2, fuel=1).sign(ENCLAVE), CLIENT)
    not_final = dataclasses.replace(cosigned, receipt=dataclasses.replace(final, final=False))
    with pytest.raises(ProtocolViolation):
        decode(encode(not_final), expect=CoSignedReceipt)


# -- the chain reads the same bytes as the market --------------------------------------------

RECEIPT_FIELDS: list[Any] = [
    CHAIN_ID,
    b"\xa1" * 32,
    5,
    10,
    20,
    30,
    b"\x0b" * 32,
    True,
    ENCLAVE.public_key,
    b"\x05" * 64,
]
RECEIPT_VARIANTS: list[list[Any]] = [
    ["", "é" * 64, "x" * 65, b"phala", 1, None],
    [b"\xa1" * 31, b"\xa1" * 33, "a" * 32, b""],
    [0, (1 << 63) - 1, 1 << 63, -1, True, 1.0],
    [0, 1 << 62, (1 << 62) + 1, -1, False],
    [0, (1 << 63) - 1, 1 << 63, -1],
    [0, (1 << 63) - 1, 1 << 63, -1],
    [b"", b"\x00" * 33, "h" * 32],
    [False, 0, 1, None],
    [b"\x00" * 31, b"\x00" * 32],
    [b"", b"\x05" * 63, b"\x05" * 65],
]
TERMS_FIELDS: list[Any] = [
    b"\xa1" * 32,
    CHAIN_ID,
    CLIENT.public_key,
    "c",
    "m",
    ENCLAVE.public_key,
    OPERATOR.public_key,
    b"\xe5" * 32,
    10,
    1_000,
    7,
    1,
]
TERMS_VARIANTS: list[list[Any]] = [
    [b"\xa1" * 31, "x"],
    ["", "x" * 65, b"c"],
    [b"\x00" * 33],
    ["p" * 64, "p" * 65],
    ["q" * 65, 0],
    [b"", b"\x00" * 32],
    [b"\x00" * 31],
    [b"\x00" * 32, b"\x00" * 64],
    [0, 1 << 44, (1 << 44) + 1, -1],
    [0, 1, 1 << 62, (1 << 62) + 1],
    [0, 1 << 48, (1 << 48) + 1, True],
    [0, (1 << 63) - 1, 1 << 63, -1],
]


def _variant(base: list[Any], variants: list[list[Any]]) -> st.SearchStrategy[list[Any]]:
    return st.tuples(
        *(st.sampled_from([b, b, *v]) for b, v in zip(base, variants, strict=True))
    ).map(list)


def _wire(kind: int, fields: Any) -> bytes:
    packed: bytes = msgpack.packb([1, kind, fields], use_bin_type=True)
    return packed


def _accepts(parse: Any, blob: bytes) -> bool:
    try:
        parse(blob)
    except ProtocolViolation:
        return False
    return True


@given(fields=_variant(RECEIPT_FIELDS, RECEIPT_VARIANTS))
def test_chain_and_market_accept_the_same_receipts(fields: list[Any]) -> None:
    blob = _wire(415, fields)
    chain_ok = _accepts(parse_receipt, blob)
    assert chain_ok == _accepts(lambda b: decode(b, expect=JobReceipt), blob)
    if chain_ok:
        parsed, receipt = parse_receipt(blob), decode(blob, expect=JobReceipt)
        assert list(parsed[:10]) == [getattr(receipt, f.name) for f in dataclasses.fields(receipt)]
        assert parsed.unsigned == receipt.unsigned()
        assert parsed.encoded == blob
    cosigned = _wire(416, [fields, CLIENT.public_key, b"\x07" * 64])
    chain_ok = _accepts(parse_claim, cosigned)
    assert chain_ok == _accepts(lambda b: decode(b, expect=CoSignedReceipt), cosigned)


@given(
    terms=_variant(TERMS_FIELDS, TERMS_VARIANTS),
    sigs=st.sampled_from([(b"\x01" * 64, b"\x02" * 64), (b"", b"\x02" * 64), (b"\x01" * 65, b"")]),
)
def test_chain_and_market_accept_the_same_agreements(
    terms: list[Any], sigs: tuple[bytes, bytes]
) -> None:
    blob = _wire(413, [terms, *sigs])
    chain_ok = _accepts(parse_agreement, blob)
    assert chain_ok == _accepts(lambda b: decode(b, expect=Agreement), blob)
    if chain_ok:
        parsed, agreement = parse_agreement(blob), decode(blob, expect=Agreement)
        assert parsed.payload == agreement.terms.payload()
        assert tuple(parsed.terms) == dataclasses.astuple(agreement.terms)
        assert parsed.terms.max_payment == agreement.terms.max_payment


def _one_field_changes(base: list[Any], variants: list[list[Any]]) -> list[list[Any]]:
    out = []
    for i, values in enumerate(variants):
        for value in values:
            fields = list(base)
            fields[i] = value
            out.append(fields)
    return out


def test_each_field_bound_is_the_same_on_both_sides() -> None:
    for fields in _one_field_changes(RECEIPT_FIELDS, RECEIPT_VARIANTS):
        for kind, parse, cls, wrapped in [
            (415, parse_receipt, JobReceipt, fields),
            (416, parse_claim, CoSignedReceipt, [fields, CLIENT.public_key, b"\x07" * 64]),
        ]:
            blob = _wire(kind, wrapped)
            market_ok = _accepts(lambda b, c=cls: decode(b, expect=c), blob)
            assert _accepts(parse, blob) == market_ok, (kind, fields)
    for terms in _one_field_changes(TERMS_FIELDS, TERMS_VARIANTS):
        blob = _wire(413, [terms, b"\x01" * 64, b"\x02" * 64])
        assert _accepts(parse_agreement, blob) == _accepts(
            lambda b: decode(b, expect=Agreement), blob
        ), terms
    bad_sigs = [(b"\x01" * 65, b""), (b"", "sig"), (b"", None)]
    for sigs in bad_sigs:
        blob = _wire(413, [TERMS_FIELDS, *sigs])
        assert not _accepts(parse_agreement, blob)
        assert not _accepts(lambda b: decode(b, expect=Agreement), blob)
    for client, sig in [(b"\x00" * 31, b"\x07" * 64), (CLIENT.public_key, b"\x07" * 63)]:
        blob = _wire(416, [RECEIPT_FIELDS, client, sig])
        assert not _accepts(parse_claim, blob)
        assert not _accepts(lambda b: decode(b, expect=CoSignedReceipt), blob)


def _loosely(kind: int, fields: list[Any]) -> bytes:
    """[1, kind, fields] with the message's array header in its 16-bit form (same values,
    not the canonical encoding)."""
    body = b"".join(msgpack.packb(v, use_bin_type=True) for v in fields)
    head: bytes = msgpack.packb(kind)
    return b"\x93\x01" + head + b"\xdc" + len(fields).to_bytes(2, "big") + body


def test_non_canonical_agreements_and_co_signed_receipts_are_refused() -> None:
    agreement = sign_agreement(TERMS, CLIENT, ENCLAVE)
    fields = msgpack.unpackb(encode(agreement))[2]
    assert msgpack.unpackb(_loosely(413, fields)) == msgpack.unpackb(encode(agreement))
    assert not _accepts(parse_agreement, _loosely(413, fields))
    assert not _accepts(lambda b: decode(b, expect=Agreement), _loosely(413, fields))
    final = make_receipt(TERMS, seq=1, fuel=1, final=True).sign(ENCLAVE)
    cosigned = CoSignedReceipt.sign(final, CLIENT)
    fields = msgpack.unpackb(encode(cosigned))[2]
    assert parse_claim(encode(cosigned)).client_signature_valid()
    assert not _accepts(parse_claim, _loosely(416, fields))
    assert not _accepts(lambda b: decode(b, expect=CoSignedReceipt), _loosely(416, fields))


def test_chain_refuses_what_the_codec_refuses_beyond_fields() -> None:
    good = make_receipt(TERMS, seq=5, fuel=10).sign(ENCLAVE)
    blob = encode(good)
    assert parse_receipt(blob).signature_valid()
    fields = msgpack.unpackb(blob)[2]
    # seq written as a uint64 instead of a fixint: same value, not canonical
    parts = [msgpack.packb(v, use_bin_type=True) for v in fields]
    parts[2] = b"\xcf" + (5).to_bytes(8, "big")
    loose = b"\x93\x01\xcd\x01\x9f\x9a" + b"".join(parts)
    assert msgpack.unpackb(loose) == msgpack.unpackb(blob)
    bad = [
        loose,
        _wire(415, [*fields, 0]),  # a field too many
        _wire(415, fields[:-1]),
        _wire(416, fields),  # another kind
        msgpack.packb([2, 415, fields], use_bin_type=True),
        blob + b"\x00",
        blob[:-1],
        b"",
        msgpack.packb({"a": fields}, use_bin_type=True),
        _wire(415, [*fields[:7], {"x": 1}, *fields[8:]]),
    ]
    for data in bad:
        assert not _accepts(parse_receipt, data)
        assert not _accepts(lambda b: decode(b, expect=JobReceipt), data)
        assert not _accepts(parse_claim, data)
    # and signatures mean the same on both sides
    tampered = dataclasses.replace(good, signature=bytes(64))
    assert not parse_receipt(encode(tampered)).signature_valid()
    agreement = sign_agreement(TERMS, CLIENT, ENCLAVE)
    agreement.verify()
    assert parse_agreement(encode(agreement)).signatures_valid()
    forged = dataclasses.replace(agreement, miner_sig=OTHER.sign(b"x"))
    assert not parse_agreement(encode(forged)).signatures_valid()


# -- settlement ------------------------------------------------------------------------------


@pytest.mark.parametrize("submitter", [OPERATOR, CLIENT], ids=["operator", "client"])
def test_settlement_pays_the_fuel_at_the_agreed_price_and_refunds_the_rest(
    submitter: Identity,
) -> None:
    net = registered_net()
    deal = open_deal(net, max_fuel=1_000_000, price=1_234, extra=55)
    fuel = 777_777  # 959.77... at this price: the operator gets it rounded up
    final = make_receipt(deal.terms, seq=7, fuel=fuel, final=True).sign(ENCLAVE)
    body = settle_body(deal.agreement, CoSignedReceipt.sign(final, CLIENT))
    client, operator, treasury, escrow = balances(net, deal)
    assert escrow is not None
    assert escrow.amount == deal.amount
    supply = net.supply()
    fee = net.state.params.tx_fee

    assert net.block(net.tx(submitter, body)) == [None]

    pay = ceil_cost(fuel, deal.terms.price)
    assert 0 < pay < deal.amount
    refund = deal.amount - pay
    client_fee = fee if submitter is CLIENT else 0
    operator_fee = fee if submitter is OPERATOR else 0
    after = balances(net, deal)
    assert after == (
        client + refund - client_fee,
        operator + pay - operator_fee,
        treasury + fee,
        None,
    )
    assert net.supply() == supply
    settled = get_settlement(net.state, deal.terms.agreement_id)
    assert settled is not None
    assert (settled.paid, settled.refunded, settled.fuel_used, settled.seq) == (
        pay,
        refund,
        fuel,
        7,
    )


def test_the_operator_settles_with_the_enclaves_receipt_alone_after_a_partition() -> None:
    net = registered_net()
    deal = open_deal(net, price=3_000, max_fuel=5_000_000)
    # the client went away mid-job: the miner has the enclave's receipt no. 4
    last = make_receipt(deal.terms, seq=4, fuel=2_500_001).sign(ENCLAVE)
    body = settle_body(deal.agreement, last)
    # the client may not settle on a receipt that is not final (it could pick an old one)
    assert net.block(net.tx(CLIENT, body)) == [TxRejectReason.NOT_AUTHORIZED]
    client, operator, _, _ = balances(net, deal)
    assert net.block(net.tx(OPERATOR, body)) == [None]
    pay = ceil_cost(2_500_001, 3_000)
    assert pay == 7_501  # 7500.003 rounded up
    fee = net.state.params.tx_fee
    assert balances(net, deal)[:2] == (client + deal.amount - pay, operator + pay - fee)
    assert net.state.escrow(deal.escrow_id) is None


def test_a_final_enclave_receipt_may_be_settled_by_the_client() -> None:
    net = registered_net()
    deal = open_deal(net, price=1_000)
    final = make_receipt(deal.terms, seq=2, fuel=400_000, final=True).sign(ENCLAVE)
    client = net.state.balance(CLIENT.public_key)
    assert net.block(net.tx(CLIENT, settle_body(deal.agreement, final))) == [None]
    fee = net.state.params.tx_fee
    assert net.state.balance(CLIENT.public_key) == client + deal.amount - 400 - fee


def test_payment_is_capped_by_what_the_escrow_still_holds() -> None:
    net = registered_net()
    deal = open_deal(net, price=1_000, max_fuel=1_000_000)  # escrow of 1000
    # the client paid 700 of it directly, out of band of the agreement
    assert net.block(net.tx(CLIENT, EscrowRelease(deal.escrow_id, 700))) == [None]
    final = make_receipt(deal.terms, seq=2, fuel=900_000, final=True).sign(ENCLAVE)  # costs 900
    _, operator, _, escrow = balances(net, deal)
    assert escrow is not None
    assert escrow.amount == 300
    assert net.block(net.tx(OPERATOR, settle_body(deal.agreement, final))) == [None]
    fee = net.state.params.tx_fee
    assert net.state.balance(OPERATOR.public_key) == operator + 300 - fee
    settled = get_settlement(net.state, deal.terms.agreement_id)
    assert settled is not None
    assert (settled.paid, settled.refunded) == (300, 0)
    assert net.state.escrow(deal.escrow_id) is None


def test_fuel_above_max_fuel_is_refused_and_max_fuel_pays_max_payment() -> None:
    """Choice: a receipt claiming more than max_fuel is inconsistent with the agreement (the
    executor never grants more), so it is refused rather than paid at the cap."""
    net = registered_net()
    deal = open_deal(net, price=999, max_fuel=123_457, extra=10)
    over = make_receipt(deal.terms, seq=1, fuel=123_458, final=True).sign(ENCLAVE)
    root = net.state.state_root()
    assert net.block(net.tx(OPERATOR, settle_body(deal.agreement, over))) == [
        TxRejectReason.FUEL_OVER_LIMIT
    ]
    assert net.state.state_root() == root
    full = make_receipt(deal.terms, seq=1, fuel=123_457, final=True).sign(ENCLAVE)
    operator = net.state.balance(OPERATOR.public_key)
    assert net.block(net.tx(OPERATOR, settle_body(deal.agreement, full))) == [None]
    paid = net.state.balance(OPERATOR.public_key) - operator + net.state.params.tx_fee
    assert paid == deal.terms.max_payment == ceil_cost(123_457, 999)


def test_an_agreement_settles_once() -> None:
    net = registered_net()
    deal = open_deal(net)
    first = make_receipt(deal.terms, seq=1, fuel=10).sign(ENCLAVE)
    final = make_receipt(deal.terms, seq=2, fuel=20, final=True).sign(ENCLAVE)
    assert net.block(net.tx(OPERATOR, settle_body(deal.agreement, first))) == [None]
    root = net.state.state_root()
    attempts: list[tuple[Identity, JobReceipt | CoSignedReceipt]] = [
        (OPERATOR, first),
        (CLIENT, CoSignedReceipt.sign(final, CLIENT)),
    ]
    for who, receipt in attempts:
        assert net.block(net.tx(who, settle_body(deal.agreement, receipt))) == [
            TxRejectReason.ALREADY_SETTLED
        ]
    assert net.state.state_root() == root


def _other_agreement(deal: Deal) -> Agreement:
    terms = dataclasses.replace(deal.terms, agreement_id=b"\x0f" * 32)
    return sign_agreement(terms, CLIENT, ENCLAVE)


REFUSALS: list[tuple[str, Any, str]] = [
    (
        "receipt of another agreement",
        lambda d: settle_body(
            d.agreement, make_receipt(_other_agreement(d).terms, seq=1, fuel=5).sign(ENCLAVE)
        ),
        TxRejectReason.WRONG_AGREEMENT,
    ),
    (
        "receipt of another chain",
        lambda d: settle_body(
            d.agreement, make_receipt(d.terms, seq=1, fuel=5, chain_id="x").sign(ENCLAVE)
        ),
        TxRejectReason.WRONG_AGREEMENT,
    ),
    (
        "receipt from another enclave",
        lambda d: settle_body(
            d.agreement, make_receipt(d.terms, seq=1, fuel=5, enclave=OTHER.public_key).sign(OTHER)
        ),
        TxRejectReason.WRONG_ENCLAVE,
    ),
    (
        "forged enclave signature",
        lambda d: settle_body(d.agreement, forge(make_receipt(d.terms, seq=1, fuel=5), OTHER)),
        TxRejectReason.BAD_RECEIPT,
    ),
    (
        "forged client co-signature",
        lambda d: settle_body(
            d.agreement,
            CoSignedReceipt.sign(
                make_receipt(d.terms, seq=1, fuel=5, final=True).sign(ENCLAVE), OTHER
            ),
        ),
        TxRejectReason.BAD_RECEIPT,
    ),
    (
        "agreement not signed by the enclave",
        lambda d: settle_body(
            dataclasses.replace(d.agreement, miner_sig=OTHER.sign(b"terms")),
            make_receipt(d.terms, seq=1, fuel=5).sign(ENCLAVE),
        ),
        TxRejectReason.BAD_AGREEMENT,
    ),
    (
        "agreement for another escrow",
        lambda d: settle_body(
            sign_agreement(dataclasses.replace(d.terms, escrow_id=b"\x0e" * 32), CLIENT, ENCLAVE),
            make_receipt(d.terms, seq=1, fuel=5).sign(ENCLAVE),
        ),
        TxRejectReason.UNKNOWN_ESCROW,
    ),
    (
        "agreement of another chain",
        lambda d: settle_body(
            sign_agreement(dataclasses.replace(d.terms, chain_id="x"), CLIENT, ENCLAVE),
            make_receipt(dataclasses.replace(d.terms, chain_id="x"), seq=1, fuel=5).sign(ENCLAVE),
        ),
        TxRejectReason.WRONG_CHAIN,
    ),
    ("not a settlement body", lambda d: JobSettle(b"\x00", b"\x00"), TxRejectReason.MALFORMED),
]


@pytest.mark.parametrize(("why", "make", "reason"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_bad_settlements_are_refused_and_move_nothing(why: str, make: Any, reason: str) -> None:
    net = registered_net()
    deal = open_deal(net)
    before = balances(net, deal)
    root = net.state.state_root()
    assert net.block(net.tx(OPERATOR, make(deal))) == [reason], why
    assert balances(net, deal) == before
    assert net.state.state_root() == root
    assert get_settlement(net.state, deal.terms.agreement_id) is None


def test_only_the_parties_settle() -> None:
    net = registered_net()
    deal = open_deal(net)
    body = settle_body(deal.agreement, make_receipt(deal.terms, seq=1, fuel=5).sign(ENCLAVE))
    assert net.block(net.tx(OTHER, body)) == [TxRejectReason.NOT_AUTHORIZED]
    assert net.block(net.tx(OPERATOR, body)) == [None]


def test_escrow_must_be_from_the_client_to_the_operator() -> None:
    net = registered_net()
    deal = open_deal(net, beneficiary=OTHER.public_key)
    body = settle_body(deal.agreement, make_receipt(deal.terms, seq=1, fuel=5).sign(ENCLAVE))
    before = balances(net, deal)
    assert net.block(net.tx(OPERATOR, body)) == [TxRejectReason.ESCROW_MISMATCH]
    assert balances(net, deal) == before


def test_the_enclave_must_be_the_operators_registered_miner() -> None:
    net = Net()  # nobody registered
    net.block(net.tx(OPERATOR, Stake(1_000)))
    deal = open_deal(net)
    body = settle_body(deal.agreement, make_receipt(deal.terms, seq=1, fuel=5).sign(ENCLAVE))
    assert net.block(net.tx(OPERATOR, body)) == [TxRejectReason.NOT_REGISTERED]
    net.register(OPERATOR, OTHER)  # another enclave of the operator
    assert net.block(net.tx(OPERATOR, body)) == [TxRejectReason.NOT_REGISTERED]
    net.register(OPERATOR, ENCLAVE)
    assert net.block(net.tx(OPERATOR, body)) == [None]


def test_settlement_works_until_the_escrow_expires_then_only_the_refund_does() -> None:
    net = registered_net()
    early = open_deal(net, expires_in=3, pid=b"proposal-early01")
    late = open_deal(net, expires_in=3, pid=b"proposal-late001")
    early_escrow = net.state.escrow(early.escrow_id)
    late_escrow = net.state.escrow(late.escrow_id)
    assert early_escrow is not None
    assert late_escrow is not None
    while net.view.next_height < early_escrow.expires_height - 1:
        net.block()
    # the last height before expiry: settles
    receipt = make_receipt(early.terms, seq=1, fuel=5).sign(ENCLAVE)
    assert net.view.next_height == early_escrow.expires_height - 1
    assert net.block(net.tx(OPERATOR, settle_body(early.agreement, receipt))) == [None]
    while net.view.next_height < late_escrow.expires_height:
        net.block()
    receipt = make_receipt(late.terms, seq=1, fuel=5).sign(ENCLAVE)
    before = balances(net, late)
    assert net.block(net.tx(OPERATOR, settle_body(late.agreement, receipt))) == [
        TxRejectReason.ESCROW_EXPIRED
    ]
    assert balances(net, late) == before
    # the existing refund path returns everything to the client
    client = net.state.balance(CLIENT.public_key)
    assert net.block(net.tx(CLIENT, EscrowRefund(late.escrow_id))) == [None]
    fee = net.state.params.tx_fee
    assert net.state.balance(CLIENT.public_key) == client + late.amount - fee


def test_a_standing_escrow_pays_each_agreement_and_keeps_the_rest_until_its_refund() -> None:
    net = registered_net()
    price, max_fuel = 1_000, 1_000_000  # max_payment 1000 per agreement
    first = open_deal(net, price=price, max_fuel=max_fuel, extra=1_500, standing=True)
    second = open_deal(net, price=price, max_fuel=max_fuel, on=first, pid=b"proposal-second1")
    third = open_deal(net, price=price, max_fuel=max_fuel, on=first, pid=b"proposal-third01")
    assert first.amount == 2_500
    supply = net.supply()
    fee = net.state.params.tx_fee
    operator = net.state.balance(OPERATOR.public_key)
    client = net.state.balance(CLIENT.public_key)
    paid: list[int] = []
    for deal, fuel in ((first, 900_000), (second, 1_000_000), (third, 1_000_000)):
        receipt = make_receipt(deal.terms, seq=1, fuel=fuel, final=True).sign(ENCLAVE)
        body = settle_body(deal.agreement, CoSignedReceipt.sign(receipt, CLIENT))
        assert net.block(net.tx(CLIENT, body)) == [None]
        settled = get_settlement(net.state, deal.terms.agreement_id)
        assert settled is not None
        assert settled.refunded == 0  # nothing comes back while the escrow stands
        paid.append(settled.paid)
    # 900 + 1000, then what was left (600) although the receipt was worth 1000
    assert paid == [900, 1_000, 600]
    assert net.state.balance(OPERATOR.public_key) == operator + 2_500
    assert net.state.balance(CLIENT.public_key) == client - 3 * fee
    assert net.state.escrow(first.escrow_id) is None  # emptied, so closed
    assert net.supply() == supply


def test_what_a_standing_escrow_holds_goes_back_to_the_payer_at_expiry() -> None:
    net = registered_net()
    deal = open_deal(net, price=1_000, extra=4_000, expires_in=4, standing=True)
    escrow = net.state.escrow(deal.escrow_id)
    assert escrow is not None
    assert escrow.standing
    assert escrow.amount == 5_000
    receipt = make_receipt(deal.terms, seq=1, fuel=250_000, final=True).sign(ENCLAVE)
    assert net.block(net.tx(OPERATOR, settle_body(deal.agreement, receipt))) == [None]
    left = net.state.escrow(deal.escrow_id)
    assert left is not None
    assert left.amount == 4_750
    # the payer cannot take it back early: agreements on it may still settle
    assert net.block(net.tx(CLIENT, EscrowRefund(deal.escrow_id))) == [
        TxRejectReason.ESCROW_NOT_EXPIRED
    ]
    while net.view.next_height < escrow.expires_height:
        net.block()
    client = net.state.balance(CLIENT.public_key)
    assert net.block(net.tx(CLIENT, EscrowRefund(deal.escrow_id))) == [None]
    assert net.state.balance(CLIENT.public_key) == client + 4_750 - net.state.params.tx_fee
    assert net.state.escrow(deal.escrow_id) is None


def test_a_one_off_escrow_backs_one_agreement() -> None:
    """Its settlement refunds the rest: a second agreement on it finds no escrow."""
    net = registered_net()
    first = open_deal(net, price=1_000, extra=5_000)
    second = open_deal(net, price=1_000, on=first, pid=b"proposal-second1")
    for deal, reason in ((first, None), (second, TxRejectReason.UNKNOWN_ESCROW)):
        receipt = make_receipt(deal.terms, seq=1, fuel=1_000, final=True).sign(ENCLAVE)
        assert net.block(net.tx(OPERATOR, settle_body(deal.agreement, receipt))) == [reason]


# -- equivocation ----------------------------------------------------------------------------


def _conflict(deal: Deal, seq: int = 3) -> tuple[JobReceipt, JobReceipt]:
    one = make_receipt(deal.terms, seq=seq, fuel=100).sign(ENCLAVE)
    other = make_receipt(deal.terms, seq=seq, fuel=90_000).sign(ENCLAVE)
    return one, other


def test_receipt_equivocation_slashes_the_operator_and_revokes_the_miner() -> None:
    net = registered_net()
    registered = get_miner(net.state, OPERATOR.public_key)
    assert registered is not None
    # some stake started unbonding after the registration: it is slashed too
    assert net.block(net.tx(OPERATOR, Unstake(200))) == [None]
    deal = open_deal(net)
    one, other = _conflict(deal)
    evidence = equivocation(one, other)
    assert evidence == equivocation(other, one)  # canonical order
    bonded = net.state.stake(OPERATOR.public_key)
    assert bonded == 800
    treasury = net.state.treasury()
    supply = net.supply()
    fraction = net.state.params.slash_fraction_ppm

    body = SubmitReceiptEvidence(evidence, OPERATOR.public_key)
    assert net.block(net.tx(OTHER, body)) == [None]  # anyone may report it

    cut = bonded * fraction // PPM
    unbonding_cut = 200 * fraction // PPM
    assert cut > 0
    assert unbonding_cut > 0
    assert net.state.stake(OPERATOR.public_key) == bonded - cut
    assert [amount for _, amount in net.state.unbonding(OPERATOR.public_key)] == [
        200 - unbonding_cut
    ]
    fee = net.state.params.tx_fee
    assert net.state.treasury() == treasury + cut + unbonding_cut + fee
    assert net.supply() == supply
    record = get_miner(net.state, OPERATOR.public_key)
    assert record is not None
    assert record.status == MinerStatus.REVOKED
    # the same offence is punished once, whichever order and whoever reports it
    swapped = ReceiptEquivocation(evidence.receipt_b, evidence.receipt_a)
    again = SubmitReceiptEvidence(swapped, OPERATOR.public_key)
    for who, ev in [(OTHER, body), (CLIENT, again)]:
        assert net.block(net.tx(who, ev)) == [TxRejectReason.EVIDENCE_USED]
    assert net.state.stake(OPERATOR.public_key) == bonded - cut
    # and a revoked miner's agreements no longer settle
    final = make_receipt(deal.terms, seq=9, fuel=5, final=True).sign(ENCLAVE)
    assert net.block(net.tx(OPERATOR, settle_body(deal.agreement, final))) == [
        TxRejectReason.MINER_REVOKED
    ]


def test_what_is_not_equivocation_is_refused() -> None:
    net = registered_net()
    deal = open_deal(net)
    one, other = _conflict(deal)
    later = make_receipt(deal.terms, seq=4, fuel=100).sign(ENCLAVE)
    same = ReceiptEquivocation(encode(one), encode(one))
    resigned = ReceiptEquivocation(
        encode(one), encode(dataclasses.replace(one, signature=b"\1" * 64))
    )
    cases = [
        (ReceiptEquivocation(encode(one), encode(later)), TxRejectReason.BAD_EVIDENCE),
        (same, TxRejectReason.BAD_EVIDENCE),
        (resigned, TxRejectReason.BAD_EVIDENCE),  # same contents, another signature
        (
            ReceiptEquivocation(encode(one), encode(forge(other, OTHER))),
            TxRejectReason.BAD_EVIDENCE,
        ),
    ]
    for evidence, reason in cases:
        body = SubmitReceiptEvidence(evidence, OPERATOR.public_key)
        assert net.block(net.tx(OTHER, body)) == [reason]
    wrong_operator = SubmitReceiptEvidence(equivocation(one, other), CLIENT.public_key)
    assert net.block(net.tx(OTHER, wrong_operator)) == [TxRejectReason.NOT_REGISTERED]
    assert net.state.stake(OPERATOR.public_key) == 1_000
    with pytest.raises(ProtocolViolation):
        equivocation(one, later)
    with pytest.raises(ProtocolViolation):
        equivocation(one, one)


def test_evidence_against_the_last_gatekeeper_is_refused() -> None:
    solo = [KEEPERS[0]]
    params = dataclasses.replace(PARAMS, min_miner_stake=100)
    net = Net(keepers=solo, keeper_stakes=[100], params=params)
    net.register(KEEPERS[0], ENCLAVE)  # the only gatekeeper also runs the miner
    terms = dataclasses.replace(TERMS, operator=KEEPERS[0].public_key)
    one, other = _conflict(Deal(sign_agreement(terms, CLIENT, ENCLAVE), b"", 0))
    body = SubmitReceiptEvidence(equivocation(one, other), KEEPERS[0].public_key)
    assert net.block(net.tx(OTHER, body)) == [TxRejectReason.LAST_GATEKEEPER]
    assert net.state.stake(KEEPERS[0].public_key) == 100


# -- vectors in protocols/settlement.md ------------------------------------------------------

PROTOCOLS = Path(__file__).resolve().parents[2] / "protocols"


def test_settlement_vectors() -> None:
    text = (PROTOCOLS / "settlement.md").read_text()
    blocks = re.findall(r"```json\n(.*?)\n```", text, re.S)
    assert len(blocks) == 1
    v = json.loads(blocks[0])
    enclave = Identity.from_seed(bytes.fromhex(v["enclave_seed"]))
    client = Identity.from_seed(bytes.fromhex(v["client_seed"]))
    r = v["receipt"]
    receipt = JobReceipt(
        chain_id=r["chain_id"],
        agreement_id=bytes.fromhex(r["agreement_id"]),
        seq=r["seq"],
        fuel_used=r["fuel_used"],
        bytes_in=r["bytes_in"],
        bytes_out=r["bytes_out"],
        output_hash=output_hash(r["output"].encode()),
        final=r["final"],
        enclave=enclave.public_key,
    ).sign(enclave)
    assert receipt.output_hash.hex() == r["output_hash"]
    assert (RECEIPT_DOMAIN + receipt.unsigned()).hex() == r["statement"]
    assert receipt.signature.hex() == r["signature"]
    assert encode(receipt).hex() == r["wire"]
    cosigned = CoSignedReceipt.sign(receipt, client)
    assert cosigned.client_sig.hex() == v["cosigned"]["client_sig"]
    assert encode(cosigned).hex() == v["cosigned"]["wire"]
    assert parse_claim(bytes.fromhex(v["cosigned"]["wire"])).client_signature_valid()
