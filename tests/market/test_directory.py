"""The miner directory: every reason an advert is refused, refresh, select and paging."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phala_p2p.errors import UsageError
from phala_p2p.market.advert import (
    CLOCK_SKEW_MS,
    MAX_TTL_MS,
    AdvertReason,
    SignedAdvert,
)
from phala_p2p.market.directory import Advert, Constraints, Directory
from phala_p2p.wire.codec import encode

from .helpers import NOW, FakeChain, Miner, advert_of, sign_advert, signed_by

A, B, C, D = (Miner.make(n) for n in (1, 2, 3, 4))
POOL = [Miner.make(n) for n in range(10, 34)]  # for properties: keys made once


def chain_with(*miners: Miner, height: int = 100) -> FakeChain:
    chain = FakeChain(height=height)
    for m in miners:
        chain.register(m)
    return chain


def test_a_believable_advert_is_taken() -> None:
    directory, chain = Directory(), chain_with(A)
    signed = signed_by(A)
    assert directory.offer(signed, chain, NOW, sender=A.peer_id) is None
    assert len(directory) == 1
    held = directory.get(A.enclave.public_key)
    assert held is not None
    assert held == directory.by_peer(A.peer_id)
    assert held.signed == signed
    assert (held.peer_id, held.price, held.seq) == (A.peer_id, 1_000, 1)
    assert held.expires_ms == NOW + 60_000
    assert directory.seqs() == {A.enclave.public_key: 1}
    assert directory.next_expiry_ms() == NOW + 60_000
    assert directory.adverts() == [held]
    assert directory.by_peer(B.peer_id) is None


# -- every refusal -------------------------------------------------------------------------


def refused(
    signed: SignedAdvert, chain: FakeChain | None = None, *, sender: str | None = None
) -> AdvertReason | None:
    directory = Directory()
    reason = directory.offer(signed, chain or chain_with(A), NOW, sender=sender)
    assert len(directory) == 0
    return reason


def test_malformed() -> None:
    good = signed_by(A)
    assert refused(SignedAdvert(b"\x00garbage", good.signature)) is AdvertReason.MALFORMED
    assert refused(SignedAdvert(b"", good.signature)) is AdvertReason.MALFORMED
    # valid msgpack of another kind
    assert refused(SignedAdvert(encode(good), good.signature)) is AdvertReason.MALFORMED
    # an advert that expires before it is issued (its own validity rule)
    assert refused(signed_by(A, expires_ms=NOW)) is AdvertReason.MALFORMED


def test_too_large() -> None:
    big = advert_of(A, addrs=("\U0001f600" * 128,) * 4)
    assert refused(sign_advert(big, A.enclave)) is AdvertReason.TOO_LARGE
    assert refused(SignedAdvert(bytes(3000), bytes(64))) is AdvertReason.TOO_LARGE


def test_over_limit() -> None:
    assert refused(signed_by(A, free_slots=5, slots=4)) is AdvertReason.OVER_LIMIT
    ttl = signed_by(A, expires_ms=NOW + MAX_TTL_MS + 1)
    assert refused(ttl) is AdvertReason.OVER_LIMIT


def test_bad_signature() -> None:
    advert = advert_of(A)
    assert refused(sign_advert(advert, B.enclave)) is AdvertReason.BAD_SIGNATURE
    good = signed_by(A)
    flipped = SignedAdvert(good.advert, bytes([good.signature[0] ^ 1]) + good.signature[1:])
    assert refused(flipped) is AdvertReason.BAD_SIGNATURE


def test_wrong_chain() -> None:
    assert refused(signed_by(A, chain_id="another-chain")) is AdvertReason.WRONG_CHAIN


def test_wrong_sender() -> None:
    assert refused(signed_by(A), sender=B.peer_id) is AdvertReason.WRONG_SENDER


def test_expired_and_future() -> None:
    assert refused(signed_by(A, now=NOW - 60_000)) is AdvertReason.EXPIRED
    assert refused(signed_by(A, now=NOW + CLOCK_SKEW_MS + 1)) is AdvertReason.FUTURE
    directory = Directory()
    assert directory.offer(signed_by(A, now=NOW + CLOCK_SKEW_MS), chain_with(A), NOW) is None


def test_unregistered_and_not_current() -> None:
    assert refused(signed_by(A), FakeChain()) is AdvertReason.UNREGISTERED
    # the operator's record names another enclave at the same height: a lie
    chain = FakeChain()
    chain.register(A, enclave=B.enclave.public_key)
    assert refused(signed_by(A), chain) is AdvertReason.UNREGISTERED
    # registered again since: the same enclave at a later height, or another enclave
    chain = FakeChain()
    chain.register(A, height=A.registered_height + 10)
    assert refused(signed_by(A), chain) is AdvertReason.NOT_CURRENT
    chain.register(A, height=A.registered_height + 10, enclave=B.enclave.public_key)
    assert refused(signed_by(A), chain) is AdvertReason.NOT_CURRENT


def test_revoked_by_chain_status_and_by_gossip() -> None:
    chain = FakeChain()
    chain.register(A, active=False)
    assert refused(signed_by(A), chain) is AdvertReason.REVOKED
    chain = chain_with(A)
    chain.revocations[A.enclave.public_key] = "worker revoked"
    assert refused(signed_by(A), chain) is AdvertReason.REVOKED


def test_under_staked() -> None:
    chain = FakeChain()
    chain.register(A, stake=chain.min_stake - 1)
    assert refused(signed_by(A), chain) is AdvertReason.UNDER_STAKED


def test_stale_and_duplicate() -> None:
    directory, chain = Directory(), chain_with(A)
    five = signed_by(A, seq=5)
    assert directory.offer(five, chain, NOW) is None
    assert directory.offer(five, chain, NOW) is AdvertReason.DUPLICATE
    assert directory.offer(signed_by(A, seq=4), chain, NOW) is AdvertReason.STALE
    assert directory.offer(signed_by(A, seq=5, free_slots=1), chain, NOW) is AdvertReason.STALE
    held = directory.get(A.enclave.public_key)
    assert held is not None
    assert held.signed == five
    assert directory.offer(signed_by(A, seq=6, free_slots=1), chain, NOW) is None
    held = directory.get(A.enclave.public_key)
    assert held is not None
    assert (held.seq, held.free_slots) == (6, 1)
    # known(): the same answers, before any signature is checked
    assert directory.known(held.signed) is AdvertReason.DUPLICATE
    assert directory.known(five) is AdvertReason.STALE
    assert directory.known(signed_by(A, seq=7)) is None
    assert directory.known(signed_by(B, seq=1)) is None


def test_chain_behind_is_held_then_promoted() -> None:
    late = Miner.make(9, registered_height=105)
    directory, chain = Directory(), FakeChain(height=100)
    signed = signed_by(late)
    assert directory.offer(signed, chain, NOW) is AdvertReason.CHAIN_BEHIND
    assert (len(directory), directory.pending, directory.pending_height()) == (0, 1, 105)
    assert directory.next_expiry_ms() == NOW + 60_000
    # the same again, or older, is not held twice
    assert directory.offer(signed, chain, NOW) is AdvertReason.DUPLICATE
    assert directory.offer(signed_by(late, seq=0), chain, NOW) is AdvertReason.STALE
    assert directory.pending == 1
    # the chain moves but not yet to the registration: still pending
    chain.height = 104
    assert directory.refresh(chain, NOW + 1_000) == {}
    assert (len(directory), directory.pending) == (0, 1)
    # the chain reaches it
    chain.height = 105
    chain.register(late)
    assert directory.refresh(chain, NOW + 2_000) == {}
    assert (len(directory), directory.pending, directory.pending_height()) == (1, 0, None)
    held = directory.get(late.enclave.public_key)
    assert held is not None
    assert held.signed == signed


def test_pending_advert_that_turns_out_bad_is_dropped_with_its_reason() -> None:
    late = Miner.make(9, registered_height=105)
    directory, chain = Directory(), FakeChain(height=100)
    assert directory.offer(signed_by(late), chain, NOW) is AdvertReason.CHAIN_BEHIND
    chain.height = 110  # ... and the chain never registered it
    assert directory.refresh(chain, NOW) == {AdvertReason.UNREGISTERED: 1}
    assert (len(directory), directory.pending) == (0, 0)
    assert directory.offer(signed_by(late, seq=2), chain_with(height=100), NOW) == (
        AdvertReason.CHAIN_BEHIND
    )
    assert directory.refresh(FakeChain(height=100), NOW + 60_000) == {AdvertReason.EXPIRED: 1}
    assert directory.pending == 0


def test_pending_pool_is_bounded_oldest_first() -> None:
    directory, chain = Directory(max_pending=2), FakeChain(height=10)
    lates = [Miner.make(n, registered_height=20 + n) for n in (1, 2, 3)]
    for m in lates:
        assert directory.offer(signed_by(m), chain, NOW) is AdvertReason.CHAIN_BEHIND
    assert directory.pending == 2
    chain.height = 30
    for m in lates:
        chain.register(m)
    directory.refresh(chain, NOW)
    assert {a.peer_id for a in directory.adverts()} == {lates[1].peer_id, lates[2].peer_id}


def test_pending_newer_advert_replaces_a_held_one() -> None:
    directory, chain = Directory(), chain_with(A)
    assert directory.offer(signed_by(A, seq=1), chain, NOW) is None
    # A registers again (same enclave) at a height our chain has not reached
    again = dataclasses.replace(A, registered_height=120)
    assert directory.offer(signed_by(again, seq=2), chain, NOW) is AdvertReason.CHAIN_BEHIND
    chain.height = 120
    chain.register(again)
    assert directory.refresh(chain, NOW) == {AdvertReason.NOT_CURRENT: 1}
    held = directory.get(A.enclave.public_key)
    assert held is not None
    assert (held.seq, held.registered_height, directory.pending) == (2, 120, 0)


def test_rate_limited() -> None:
    directory, chain = Directory(burst=2, refill_per_s=1.0), chain_with(A)
    assert directory.offer(signed_by(A, seq=1), chain, NOW) is None  # new: no token taken
    assert directory.offer(signed_by(A, seq=2), chain, NOW) is None
    assert directory.offer(signed_by(A, seq=3), chain, NOW) is None
    assert directory.offer(signed_by(A, seq=4), chain, NOW) is AdvertReason.RATE_LIMITED
    assert directory.offer(signed_by(A, seq=4), chain, NOW + 999) is AdvertReason.RATE_LIMITED
    assert directory.offer(signed_by(A, seq=4), chain, NOW + 1_000) is None
    held = directory.get(A.enclave.public_key)
    assert held is not None
    assert held.seq == 4
    # another miner has its own bucket
    chain.register(B)
    for seq in (1, 2, 3):
        assert directory.offer(signed_by(B, seq=seq), chain, NOW + 1_000) is None


def test_full() -> None:
    directory, chain = Directory(max_entries=1), chain_with(A, B)
    assert directory.offer(signed_by(A), chain, NOW) is None
    assert directory.offer(signed_by(B), chain, NOW) is AdvertReason.FULL
    assert directory.offer(signed_by(A, seq=2), chain, NOW) is None  # updates still land
    assert [a.peer_id for a in directory.adverts()] == [A.peer_id]


def test_pending_advert_that_finds_the_directory_full_is_counted() -> None:
    late = Miner.make(9, registered_height=105)
    directory, chain = Directory(max_entries=1), chain_with(A)
    assert directory.offer(signed_by(A), chain, NOW) is None
    assert directory.offer(signed_by(late), chain, NOW) is AdvertReason.CHAIN_BEHIND
    chain.height = 105
    chain.register(late)
    assert directory.refresh(chain, NOW) == {AdvertReason.FULL: 1}
    assert (len(directory), directory.pending) == (1, 0)


@given(
    advert=st.binary(max_size=2100),
    signature=st.binary(max_size=64),
    sender=st.sampled_from([None, A.peer_id, "x"]),
)
def test_offer_never_raises(advert: bytes, signature: bytes, sender: str | None) -> None:
    reason = Directory().offer(SignedAdvert(advert, signature), chain_with(A), NOW, sender=sender)
    assert reason in set(AdvertReason)


# -- refresh ---------------------------------------------------------------------------------


def test_refresh_drops_what_is_no_longer_believable() -> None:
    directory, chain = Directory(), chain_with(A, B, C, D)
    assert directory.offer(signed_by(A), chain, NOW) is None
    assert directory.offer(signed_by(B), chain, NOW) is None
    assert directory.offer(signed_by(C), chain, NOW) is None
    assert directory.offer(signed_by(D, now=NOW - 30_000), chain, NOW) is None
    assert directory.refresh(chain, NOW) == {}
    assert len(directory) == 4
    chain.register(A, active=False)  # revoked on chain
    chain.revocations[B.enclave.public_key] = "revoked (gossip)"  # revocation heard first
    chain.register(C, stake=1)  # its stake fell
    dropped = directory.refresh(chain, NOW + 30_000)  # D expires at this instant
    assert dropped == {
        AdvertReason.REVOKED: 2,
        AdvertReason.UNDER_STAKED: 1,
        AdvertReason.EXPIRED: 1,
    }
    assert len(directory) == 0
    assert directory.refresh(chain, NOW + 30_000) == {}


def test_refresh_keeps_what_is_live() -> None:
    directory, chain = Directory(), chain_with(A)
    assert directory.offer(signed_by(A), chain, NOW) is None
    assert directory.refresh(chain, NOW + 59_999) == {}
    assert len(directory) == 1
    assert directory.refresh(chain, NOW + 60_000) == {AdvertReason.EXPIRED: 1}
    assert directory.next_expiry_ms() is None


# -- select ----------------------------------------------------------------------------------


def market() -> Directory:
    """Four miners that differ in every dimension a client can filter on."""
    directory, chain = Directory(), chain_with(A, B, C, D)
    offers = [
        signed_by(A, price=100, cores=2, memory=1 << 28, fuel_per_s=10, free_slots=1,
                  max_input=1_000, max_fuel=1_000, tags=("wasm",)),
        signed_by(B, price=200, cores=8, memory=1 << 30, fuel_per_s=50, free_slots=3,
                  max_input=10_000, max_fuel=100_000, tags=("wasm", "gpu")),
        signed_by(C, price=300, cores=16, memory=1 << 32, fuel_per_s=40, free_slots=4,
                  max_input=100_000, max_fuel=10_000, tags=("gpu",)),
        signed_by(D, price=50, cores=4, memory=1 << 29, fuel_per_s=5, free_slots=0,
                  max_input=500, max_fuel=500, tags=()),
    ]  # fmt: skip
    for signed in offers:
        assert directory.offer(signed, chain, NOW) is None
    return directory


def peers(found: list[Advert]) -> list[str]:
    return [a.peer_id for a in found]


def pick(directory: Directory, **kw: object) -> set[str]:
    return set(peers(directory.select(Constraints.from_kwargs(**kw), NOW)))


@pytest.mark.parametrize(
    ("constraint", "expected"),
    [
        ({}, {A, B, C}),  # D has no free slot
        ({"min_free_slots": 0}, {A, B, C, D}),
        ({"min_free_slots": 3}, {B, C}),
        ({"min_cores": 8}, {B, C}),
        ({"min_memory": 1 << 30}, {B, C}),
        ({"min_fuel_per_s": 45}, {B}),
        ({"max_price": 200}, {A, B}),
        ({"max_price": 50, "min_free_slots": 0}, {D}),
        ({"input_size": 5_000}, {B, C}),
        ({"fuel": 50_000}, {B}),
        ({"tags": ("gpu",)}, {B, C}),
        ({"tags": "gpu"}, {B, C}),
        ({"tags": ("gpu", "wasm")}, {B}),
        ({"tags": ("tpu",)}, set()),
        ({"exclude": {B.peer_id}}, {A, C}),
        ({"exclude": [A.peer_id, C.peer_id]}, {B}),
        ({"min_cores": 8, "max_price": 250, "tags": ("gpu",)}, {B}),
    ],
)
def test_select_filters(constraint: dict[str, object], expected: set[Miner]) -> None:
    assert pick(market(), **constraint) == {m.peer_id for m in expected}


def test_exclude_accepts_a_single_peer_id() -> None:
    assert pick(market(), exclude=B.peer_id) == {A.peer_id, C.peer_id}


def test_select_ranks() -> None:
    directory = market()
    by = Constraints.from_kwargs
    assert peers(directory.select(by(sort="price"), NOW)) == [A.peer_id, B.peer_id, C.peer_id]
    assert peers(directory.select(by(), NOW)) == [A.peer_id, B.peer_id, C.peer_id]
    assert peers(directory.select(by(sort="capacity"), NOW)) == [
        C.peer_id,
        B.peer_id,
        A.peer_id,
    ]
    rtt = {A.peer_id: 0.2, C.peer_id: 0.01}
    nearest = directory.select(by(sort="latency"), NOW, rtt)
    assert peers(nearest) == [C.peer_id, A.peer_id, B.peer_id]  # unmeasured last
    assert [a.latency for a in nearest] == [0.01, 0.2, None]
    assert peers(directory.select(by(sort="price", limit=2), NOW)) == [A.peer_id, B.peer_id]
    assert directory.select(by(limit=0), NOW) == []


def test_price_ties_break_on_capacity_then_latency() -> None:
    directory, chain = Directory(), chain_with(A, B, C)
    for m, fuel in ((A, 10), (B, 20), (C, 20)):
        assert directory.offer(signed_by(m, price=7, fuel_per_s=fuel), chain, NOW) is None
    rtt = {B.peer_id: 0.5, C.peer_id: 0.1}
    found = directory.select(Constraints(), NOW, rtt)
    assert peers(found) == [C.peer_id, B.peer_id, A.peer_id]


def test_select_skips_expired_adverts_before_refresh() -> None:
    directory = market()
    assert pick(directory) == {A.peer_id, B.peer_id, C.peer_id}
    later = directory.select(Constraints(), NOW + 60_000)
    assert later == []
    assert len(directory) == 4  # held until refresh, never served


def test_constraints_from_kwargs_refuses_unknown_keys() -> None:
    with pytest.raises(UsageError, match="max_cost"):
        Constraints.from_kwargs(max_cost=5)
    with pytest.raises(UsageError, match="colour"):
        Constraints.from_kwargs(min_cores=1, colour="red")
    assert Constraints.from_kwargs(min_cores=4) == Constraints(min_cores=4)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_cores": -1},
        {"min_memory": 1.5},
        {"min_fuel_per_s": True},
        {"max_price": -1},
        {"min_free_slots": "1"},
        {"input_size": -1},
        {"fuel": None},
        {"limit": -1},
        {"sort": "cheapest"},
        {"tags": (1,)},
        {"tags": 5},
        {"exclude": (1,)},
    ],
)
def test_constraints_refuse_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        Constraints.from_kwargs(**kwargs)


# -- paging ----------------------------------------------------------------------------------


def collect(directory: Directory, limit: int, now: int) -> list[SignedAdvert]:
    out: list[SignedAdvert] = []
    after = b""
    for _ in range(len(directory) + 2):
        page, cursor = directory.page(after, limit, now)
        assert len(page) <= limit
        out.extend(page)
        if not cursor:
            return out
        assert cursor > after
        assert cursor == page[-1].decode().enclave
        after = cursor
    raise AssertionError("the cursor never ended")


def test_page_walks_every_live_advert_once() -> None:
    directory, chain = Directory(), FakeChain()
    for i, m in enumerate(POOL[:7]):
        chain.register(m)
        # the fourth expires first
        now = NOW - 30_000 if i == 3 else NOW
        assert directory.offer(signed_by(m, now=now), chain, NOW) is None
    every = collect(directory, 3, NOW)
    assert len(every) == 7
    assert len(set(every)) == 7
    keys = [s.decode().enclave for s in every]
    assert keys == sorted(keys)
    live = collect(directory, 3, NOW + 30_000)
    assert len(live) == 6
    assert POOL[3].enclave.public_key not in {s.decode().enclave for s in live}
    assert directory.page(b"", 10, NOW) == (every, b"")  # one page, no cursor
    assert directory.page(b"\xff" * 32, 10, NOW) == ([], b"")


def test_page_limit_must_be_positive() -> None:
    with pytest.raises(UsageError):
        market().page(b"", 0, NOW)


@given(n=st.integers(0, len(POOL)), limit=st.integers(1, 8), expired=st.sets(st.integers(0, 23)))
def test_paging_covers_every_live_advert_exactly_once(
    n: int, limit: int, expired: set[int]
) -> None:
    directory, chain = Directory(), FakeChain()
    for i, m in enumerate(POOL[:n]):
        chain.register(m)
        issued = NOW - 59_000 if i in expired else NOW
        assert directory.offer(signed_by(m, now=issued), chain, NOW) is None
    at = NOW + 1_000  # the "expired" ones have just expired
    got = collect(directory, limit, at)
    wanted = {m.enclave.public_key for i, m in enumerate(POOL[:n]) if i not in expired}
    keys = [s.decode().enclave for s in got]
    assert len(keys) == len(wanted)
    assert set(keys) == wanted
