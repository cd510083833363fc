"""Capacity adverts: what a miner sells, signed by its attested enclave.

A ``CapacityAdvert`` is signed by the enclave's identity key (the key its on-chain
registration binds) as an ``"advert"`` statement, and carries what a client needs to choose
and reach the miner: its peer id and addresses, capacity (cores, memory per job, fuel per
second measured by the enclave's own benchmark), price per million fuel, limits, free slots and
tags. ``seq`` orders a miner's adverts (the newest wins) and ``expires_ms`` bounds how long one
may be believed: a miner that goes offline drops out of every directory within its TTL.

Whether an advert is believable depends on the chain (registration, stake, revocation): see
:func:`check_advert` and :class:`ChainFacts`. An advert costs its miner stake: that is the
defence against Sybil floods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final, Protocol

from phala_p2p.errors import ProtocolViolation
from phala_p2p.tee.statements import verify_statement
from phala_p2p.wire.codec import decode, encode, message

MAX_ADVERT_BYTES: Final = 2048
MAX_TTL_MS: Final = 10 * 60 * 1000  # no advert is believed for longer than 10 minutes
CLOCK_SKEW_MS: Final = 30_000  # an advert issued further in the future than this is refused
MAX_SLOTS: Final = 1024
MAX_TAGS: Final = 16
MAX_ADDRS: Final = 4
PRICE_UNIT: Final = 1_000_000  # prices are per million fuel


@message(400)
@dataclass(frozen=True)
class CapacityAdvert:
    chain_id: str = field(metadata={"max_len": 64})
    peer_id: str = field(metadata={"max_len": 64})
    addrs: tuple[str, ...] = field(metadata={"max_len": MAX_ADDRS, "item_max_len": 128})
    operator: bytes = field(metadata={"max_len": 32})  # the account that registered the enclave
    enclave: bytes = field(metadata={"max_len": 32})  # the enclave's identity key
    registered_height: int = field(metadata={"min": 0})
    cores: int = field(metadata={"min": 1, "max": 4096})
    memory: int = field(metadata={"min": 1, "max": 1 << 44})  # bytes of memory a job may use
    fuel_per_s: int = field(metadata={"min": 1, "max": 1 << 48})
    price: int = field(metadata={"min": 0, "max": 1 << 48})  # per million fuel
    max_input: int = field(metadata={"min": 1, "max": 1 << 44})
    max_fuel: int = field(metadata={"min": 1, "max": 1 << 62})
    slots: int = field(metadata={"min": 1, "max": MAX_SLOTS})
    free_slots: int = field(metadata={"min": 0, "max": MAX_SLOTS})
    tags: tuple[str, ...] = field(metadata={"max_len": MAX_TAGS, "item_max_len": 32})
    seq: int = field(metadata={"min": 0, "max": (1 << 63) - 1})
    issued_ms: int = field(metadata={"min": 0, "max": (1 << 63) - 1})
    expires_ms: int = field(metadata={"min": 0, "max": (1 << 63) - 1})

    def validate(self) -> None:
        if len(self.operator) != 32 or len(self.enclave) != 32:
            raise ProtocolViolation("advert keys must be 32 bytes", reason="over_limit")
        if self.free_slots > self.slots:
            raise ProtocolViolation("more free slots than slots", reason="over_limit")
        if self.expires_ms <= self.issued_ms:
            raise ProtocolViolation("an advert must expire after it is issued")
        if self.expires_ms - self.issued_ms > MAX_TTL_MS:
            raise ProtocolViolation(
                f"an advert may live {MAX_TTL_MS // 1000} s at most", reason="over_limit"
            )
        if len(set(self.tags)) != len(self.tags) or any(not t for t in self.tags):
            raise ProtocolViolation("tags must be distinct and non-empty")


@message(401)
@dataclass(frozen=True)
class SignedAdvert:
    """An advert's canonical bytes and the enclave's signature of them."""

    advert: bytes = field(metadata={"max_len": MAX_ADVERT_BYTES})
    signature: bytes = field(metadata={"max_len": 64})

    def decode(self) -> CapacityAdvert:
        """The advert, signature not checked (ProtocolViolation if it does not decode)."""
        return decode(self.advert, max_size=MAX_ADVERT_BYTES, expect=CapacityAdvert)

    def verify(self, advert: CapacityAdvert) -> bool:
        """Whether ``advert`` (decoded from these bytes) is signed by its enclave."""
        return verify_statement(advert.enclave, "advert", self.advert, self.signature)

    def open(self) -> CapacityAdvert:
        """The advert, if its bytes decode and its enclave signed them (ProtocolViolation
        with reason ``bad_signature`` otherwise)."""
        advert = self.decode()
        if not self.verify(advert):
            raise ProtocolViolation("advert signature is invalid", reason="bad_signature")
        return advert


def advert_payload(advert: CapacityAdvert) -> bytes:
    """The bytes the enclave signs (and the size check of what will be gossiped)."""
    data = encode(advert)
    if len(data) > MAX_ADVERT_BYTES:
        raise ProtocolViolation("advert too large", reason="too_large")
    return data


class AdvertReason(StrEnum):
    """Why an advert was not taken (counted as ``adverts_refused{reason}``)."""

    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    OVER_LIMIT = "over_limit"
    BAD_SIGNATURE = "bad_signature"
    WRONG_CHAIN = "wrong_chain"
    WRONG_SENDER = "wrong_sender"  # gossiped by a peer other than the one it advertises
    EXPIRED = "expired"
    FUTURE = "future"
    UNREGISTERED = "unregistered"
    NOT_CURRENT = "not_current"  # the enclave was registered again since
    REVOKED = "revoked"
    UNDER_STAKED = "under_staked"
    STALE = "stale"  # a newer advert of this miner is held
    DUPLICATE = "duplicate"
    CHAIN_BEHIND = "chain_behind"  # registered after our head: kept pending
    RATE_LIMITED = "rate_limited"
    FULL = "full"


# Reasons that prove the advert itself bad (its relayer is penalised); the others depend on
# timing or on what this node holds, and are ignored without blame.
PUNISHABLE: Final = frozenset(
    {
        AdvertReason.MALFORMED,
        AdvertReason.TOO_LARGE,
        AdvertReason.OVER_LIMIT,
        AdvertReason.BAD_SIGNATURE,
        AdvertReason.WRONG_CHAIN,
        AdvertReason.WRONG_SENDER,
        AdvertReason.FUTURE,
        AdvertReason.UNREGISTERED,
    }
)


@dataclass(frozen=True)
class MinerFacts:
    """What the chain says about an operator's miner (see ``chain.miners.MinerRecord``)."""

    enclave: bytes
    registered_height: int
    active: bool
    reason: str
    stake: int


class ChainFacts(Protocol):
    """The chain as seen by a directory: its id, head and miner registry."""

    @property
    def chain_id(self) -> str: ...

    @property
    def height(self) -> int: ...

    @property
    def min_stake(self) -> int: ...

    def miner(self, operator: bytes) -> MinerFacts | None:
        """The operator's latest registration (active or not), or None if it never had one."""

    def revoked(self, enclave: bytes) -> str | None:
        """Why ``enclave`` is known to be revoked (gossip may say so before the chain)."""


def check_advert(advert: CapacityAdvert, chain: ChainFacts, now_ms: int) -> AdvertReason | None:
    """Why ``advert`` (signature already checked) is not believable now, or None if it is."""
    if advert.chain_id != chain.chain_id:
        return AdvertReason.WRONG_CHAIN
    if advert.issued_ms > now_ms + CLOCK_SKEW_MS:
        return AdvertReason.FUTURE
    if advert.expires_ms <= now_ms:
        return AdvertReason.EXPIRED
    return check_registration(advert.operator, advert.enclave, advert.registered_height, chain)


def check_registration(
    operator: bytes, enclave: bytes, registered_height: int, chain: ChainFacts
) -> AdvertReason | None:
    """Whether the chain vouches now for ``enclave`` registered by ``operator`` at
    ``registered_height``."""
    record = chain.miner(operator)
    if record is None or record.enclave != enclave:
        if registered_height > chain.height:
            return AdvertReason.CHAIN_BEHIND  # registered after our head, maybe
        if record is not None and registered_height < record.registered_height:
            return AdvertReason.NOT_CURRENT  # the operator has registered another enclave
        return AdvertReason.UNREGISTERED
    if record.registered_height != registered_height:
        if registered_height > chain.height:
            return AdvertReason.CHAIN_BEHIND
        return AdvertReason.NOT_CURRENT
    if not record.active or chain.revoked(enclave) is not None:
        return AdvertReason.REVOKED
    if record.stake < chain.min_stake:
        return AdvertReason.UNDER_STAKED
    return None


def max_payment(max_fuel: int, price: int) -> int:
    """What ``max_fuel`` costs at ``price`` per million fuel, rounded up."""
    return -(-max_fuel * price // PRICE_UNIT)
