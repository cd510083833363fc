"""Fakes and builders shared by the market room's machine tests (no IO, literal times)."""

from __future__ import annotations

import dataclasses
from typing import Any

from phala_p2p.crypto.identity import Identity
from phala_p2p.market.advert import CapacityAdvert, MinerFacts, SignedAdvert
from phala_p2p.market.negotiation import (
    Agreement,
    Counter,
    Decision,
    EscrowFacts,
    MinerBook,
    Proposal,
    Refusal,
    SignAgreement,
    SignCounter,
)
from phala_p2p.tee.statements import statement_bytes
from phala_p2p.wire.codec import encode

CHAIN = "phala-test"
NOW = 1_700_000_000_000  # ms since the Unix epoch: every test starts here
HEIGHT = 100
MIN_STAKE = 1_000


class FakeChain:
    """What the chain says, set by the test: a plain object that fits ``ChainFacts``."""

    def __init__(
        self, *, chain_id: str = CHAIN, height: int = HEIGHT, min_stake: int = MIN_STAKE
    ) -> None:
        self.chain_id = chain_id
        self.height = height
        self.min_stake = min_stake
        self.miners: dict[bytes, MinerFacts] = {}
        self.revocations: dict[bytes, str] = {}

    def miner(self, operator: bytes) -> MinerFacts | None:
        return self.miners.get(operator)

    def revoked(self, enclave: bytes) -> str | None:
        return self.revocations.get(enclave)

    def register(
        self,
        miner: Miner,
        *,
        height: int | None = None,
        enclave: bytes | None = None,
        stake: int = MIN_STAKE,
        active: bool = True,
    ) -> None:
        self.miners[miner.operator] = MinerFacts(
            enclave=miner.enclave.public_key if enclave is None else enclave,
            registered_height=miner.registered_height if height is None else height,
            active=active,
            reason="" if active else "revoked by the test",
            stake=stake,
        )


@dataclasses.dataclass(frozen=True)
class Miner:
    """A miner as adverts name it: its enclave key (stand-in), operator account and peer."""

    enclave: Identity
    operator: bytes
    peer_id: str
    registered_height: int = 50

    @classmethod
    def make(cls, n: int, *, registered_height: int = 50) -> Miner:
        return cls(
            enclave=Identity.from_seed(bytes([n % 256]) * 31 + b"\xe0"),
            operator=bytes([n % 256]) * 31 + b"\x0a",
            peer_id=f"12D3KooWminer{n}",
            registered_height=registered_height,
        )


def advert_of(miner: Miner, *, seq: int = 1, now: int = NOW, **changes: Any) -> CapacityAdvert:
    """A believable advert of ``miner`` issued at ``now`` (60 s TTL), with ``changes``."""
    advert = CapacityAdvert(
        chain_id=CHAIN,
        peer_id=miner.peer_id,
        addrs=("/ip4/127.0.0.1/tcp/4001",),
        operator=miner.operator,
        enclave=miner.enclave.public_key,
        registered_height=miner.registered_height,
        cores=8,
        memory=1 << 30,
        fuel_per_s=1_000_000,
        price=1_000,
        max_input=1 << 20,
        max_fuel=1 << 32,
        slots=4,
        free_slots=4,
        tags=("wasm",),
        seq=seq,
        issued_ms=now,
        expires_ms=now + 60_000,
    )
    return dataclasses.replace(advert, **changes)


def sign_advert(advert: CapacityAdvert, key: Identity) -> SignedAdvert:
    """``advert``'s bytes signed as an "advert" statement by ``key``, whatever they hold
    (``encode`` does not run ``validate``, so this builds bad adverts too)."""
    payload = encode(advert)
    return SignedAdvert(payload, key.sign(statement_bytes("advert", payload)))


def signed_by(miner: Miner, **changes: Any) -> SignedAdvert:
    return sign_advert(advert_of(miner, **changes), miner.enclave)


# -- negotiation -----------------------------------------------------------------------------


def escrow_for(
    client: Identity, operator: bytes, *, amount: int, expires: int = 1_000
) -> EscrowFacts:
    return EscrowFacts(
        payer=client.public_key, beneficiary=operator, amount=amount, expires_height=expires
    )


def complete(
    book: MinerBook,
    proposal: Proposal,
    decision: Decision,
    enclave: Identity,
) -> Agreement | Counter | Refusal:
    """Play the driver: have ``enclave`` sign what the book decided and report it back."""
    if isinstance(decision, SignCounter):
        counter = decision.counter
        sig = enclave.sign(statement_bytes("counter", counter.unsigned()))
        return book.countered(proposal, dataclasses.replace(counter, miner_sig=sig))
    if isinstance(decision, SignAgreement):
        terms = decision.proposal.terms
        sig = enclave.sign(statement_bytes("agreement", terms.payload()))
        return book.agreed(proposal, Agreement(terms, proposal.client_sig, sig))
    return decision
