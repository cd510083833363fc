"""The market on real hosts: miners advertise attested capacity, every directory converges
(through gossip, and through /phala/market after a partition heals), clients negotiate
co-signed agreements, and bad adverts and proposals are refused with their reasons."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest
import trio

from phala_p2p.config import DiscoveryConfig, MarketConfig, NodeConfig, Role
from phala_p2p.crypto.identity import Identity
from phala_p2p.errors import NegotiationFailed, UsageError
from phala_p2p.market.advert import CapacityAdvert, SignedAdvert, advert_payload
from phala_p2p.market.directory import Advert
from phala_p2p.market.negotiation import Agreement, Ask, ClientNegotiation, Refusal
from phala_p2p.net.health import HealthConfig
from phala_p2p.node import Node, open_node
from phala_p2p.services.market import CAPACITY_TOPIC, NEGOTIATE_PROTOCOL
from phala_p2p.tee.statements import statement_bytes
from phala_p2p.testing import Devnet, open_devnet, wait_until
from phala_p2p.wire.codec import decode, encode

from .test_chain import FAST, _gather


def _market(i: int) -> MarketConfig:
    """Miner ``i``'s offer: prices, slots and tags vary so that filters have work to do."""
    return MarketConfig(
        price=1_000 + 100 * (i % 7),
        slots=1 + i % 4,
        tags=("gpu",) if i % 3 == 0 else ("cpu", "eu") if i % 3 == 1 else ("cpu",),
        advert_ttl=60.0,
        advert_interval=0.2,
        sync_interval=3.0,
    )


def _configure(i: int, cfg: NodeConfig) -> NodeConfig:
    # Dozens of nodes share this event loop: pings forgive slow answers, each node keeps a
    # few connections (gossip relays the rest), and directories compare notes every 3 s.
    cfg = cfg.with_(
        health=HealthConfig(interval=2.0, dead_after=60.0),
        discovery=DiscoveryConfig(target_peers=16, interval=0.5),
        market=dataclasses.replace(cfg.market, sync_interval=3.0),
    )
    return cfg.with_(market=_market(i)) if cfg.role is Role.MINER else cfg


async def check_filters(client: Node, configs: dict[str, MarketConfig]) -> None:
    """``client``'s queries return what the miners' own configs (peer id -> config) say."""
    found = await client.find_miners(max_price=1_300, tags=("cpu",), min_free_slots=2)
    expected = {
        p for p, c in configs.items() if c.price <= 1_300 and "cpu" in c.tags and c.slots >= 2
    }
    assert expected  # the query is not vacuous
    assert {a.peer_id for a in found} == expected
    assert [a.price for a in found] == sorted(a.price for a in found)
    gpu = await client.find_miners(tags="gpu")
    assert {a.peer_id for a in gpu} == {p for p, c in configs.items() if "gpu" in c.tags}
    cheapest = await client.find_miners(limit=3)
    assert len(cheapest) == 3
    assert max(a.price for a in cheapest) == sorted(c.price for c in configs.values())[2]
    for advert in found:
        assert isinstance(advert, Advert)
        assert advert.cores >= 1
        assert advert.memory > 0
        assert advert.fuel_per_s > 0
        assert advert.expires > time.time()
        assert advert.free_slots == configs[advert.peer_id].slots
    assert len(await client.find_miners()) == len(configs)
    assert await client.find_miners(max_price=999) == []
    with pytest.raises(UsageError, match="unknown constraint"):
        await client.find_miners(cheapest=True)


def _miner_index(net: Devnet, node: Node) -> int:
    return int(node.config.name.rsplit("-", 1)[1])


async def _all_advertised(net: Devnet, nodes: list[Node], timeout: float = 300) -> None:
    want = {m.peer_id for m in net.miners}

    def everyone_knows_everyone() -> bool:
        return all({a.peer_id for a in n.market.directory.adverts()} == want for n in nodes)

    await wait_until(everyone_knows_everyone, timeout, message="every directory holds every miner")


# Every node of this devnet shares one event loop: on an otherwise idle machine the heal
# converges well within 3 s (12-17 s for the whole test), under load it can miss, so this
# runs in make test-all. The 20 miners need a process each:
# tests/net/test_market_processes.py.
@pytest.mark.slow
@pytest.mark.parametrize("miners", [8], ids=str)
async def test_miners_filter_and_directories_converge_after_a_partition_heals(
    miners: int,
) -> None:
    async with open_devnet(
        gatekeepers=1,
        miners=miners,
        clients=2,
        seed=51,
        configure=_configure,
        full_mesh=False,
        connect_timeout=60,
    ) as net:
        client = net.clients[0]
        await _all_advertised(net, net.all_nodes)

        configs = {m.peer_id: _market(_miner_index(net, m)) for m in net.miners}
        await check_filters(client, configs)

        # -- partition: each side's miners re-advertise; the other side cannot hear it
        half = miners // 2
        left = [net.bootstrap, *net.gatekeepers, *net.miners[:half], net.clients[0]]
        right = [*net.miners[half:], net.clients[1]]
        assert all(n is not None for n in left)
        await net.partition(left, right)  # type: ignore[arg-type]
        before = net.advert_seqs()
        for m in net.miners:
            m.market.readvertise()
        await wait_until(
            lambda: all(net.advert_seqs()[k] > v for k, v in before.items()),
            20,
            message="every miner re-advertised",
        )
        fresh = net.advert_seqs()
        left_miners = {m.market.book.enclave for m in net.miners[:half] if m.market.book}
        left_fresh = {k: v for k, v in fresh.items() if k in left_miners}
        right_fresh = {k: v for k, v in fresh.items() if k not in left_miners}
        await wait_until(
            lambda: (
                all(n.market.directory.covers(left_fresh) for n in left if n is not None)
                and all(n.market.directory.covers(right_fresh) for n in right)
            ),
            20,
            message="each side hears its own miners",
        )
        # the cut is real: no node on one side has the other side's new adverts
        assert not any(n.market.directory.covers(right_fresh) for n in left if n is not None)
        assert not any(n.market.directory.covers(left_fresh) for n in right)

        # -- heal: gossip does not replay; /phala/market pulls converge both sides
        healing = net.heal()  # lifts the cut and starts the redials; counted from here
        healed_at = trio.current_time()
        await wait_until(
            lambda: all(n.market.directory.covers(fresh) for n in net.all_nodes),
            10,
            message="directories converged after the heal",
        )
        took = trio.current_time() - healed_at
        await healing
        assert took < 3.0, f"directories took {took:.2f}s to converge after the heal"


async def test_a_standing_escrow_the_client_cannot_fund_eight_times_covers_one_job() -> None:
    """The first escrow for an operator covers 8 jobs; a client that cannot fund that gets
    one for this job, and the next agreement, which that escrow no longer covers, one of
    its own."""

    def configure(i: int, cfg: NodeConfig) -> NodeConfig:
        if cfg.role is Role.MINER:
            return cfg.with_(market=MarketConfig(price=1_000_000, slots=4))  # a token a fuel
        return cfg

    async with open_devnet(
        gatekeepers=1, miners=1, clients=1, seed=53, chain_params=FAST, configure=configure
    ) as net:
        client = net.clients[0]
        (advert,) = await client.find_miners(wait=60)
        balance = client.chain.state.balance(client.account)
        fuel = balance // 5  # one job's maximum is a fifth of the balance: 8 would be 1.6x it
        first = await client.negotiate(advert, job_bytes=1_000, max_fuel=fuel)
        escrow = client.chain.state.escrow(first.terms.escrow_id)
        assert escrow is not None
        assert escrow.standing
        assert escrow.amount == first.terms.max_payment == fuel
        second = await client.negotiate(advert, job_bytes=1_000, max_fuel=fuel)
        assert second.terms.escrow_id != first.terms.escrow_id
        assert client.metrics.get("escrows_opened", standing="true") == 2
        assert client.metrics.get("escrows_reused") == 0
        again = client.chain.state.escrow(second.terms.escrow_id)
        assert again is not None
        assert again.amount == fuel


async def test_negotiation_counters_refusals_expiry_and_idempotent_retry() -> None:
    def configure(i: int, cfg: NodeConfig) -> NodeConfig:
        if cfg.role is Role.MINER:
            return cfg.with_(market=MarketConfig(price=2_000, slots=2, max_rounds=2))
        return cfg

    async with open_devnet(
        gatekeepers=1, miners=1, clients=1, seed=52, chain_params=FAST, configure=configure
    ) as net:
        client, miner = net.clients[0], net.miners[0]
        (advert,) = await client.find_miners(wait=60)
        assert advert.peer_id == miner.peer_id
        operator_before = client.chain.state.balance(client.account)

        # a bid below the ask: the miner counters at its price, the client accepts
        agreement = await client.negotiate(
            advert, job_bytes=1_000, max_fuel=10**7, bid=1_000, max_price=3_000
        )
        agreement.verify()
        assert agreement.terms.price == 2_000
        assert agreement.terms.client == client.account
        assert agreement.terms.operator == miner.account
        assert miner.metrics.get("proposals_answered", answer="counter") == 1
        assert miner.market.agreements[agreement.id] == agreement
        escrow = client.chain.state.escrow(agreement.terms.escrow_id)
        assert escrow is not None
        assert escrow.beneficiary == miner.account
        assert escrow.amount >= agreement.terms.max_payment
        assert client.chain.state.balance(client.account) < operator_before

        # a client that will not pay the ask: no agreement, and it says why
        with pytest.raises(NegotiationFailed) as refused:
            await client.negotiate(advert, job_bytes=1_000, max_fuel=10**7, max_price=1_500)
        assert refused.value.reason == "price"

        # input above the miner's limit: a refusal with its reason
        with pytest.raises(NegotiationFailed) as too_big:
            await client.negotiate(advert, job_bytes=advert.max_input + 1, max_fuel=10**7)
        assert too_big.value.reason == "too_large"

        # a proposal sent after its expiry is refused as expired
        escrow_id = agreement.terms.escrow_id
        old = ClientNegotiation(
            _ask(client, advert, escrow_id, client.chain.head.height, price=2_000),
            client.chain.signer,
            int(time.time() * 1000) - 20_000,
            proposal_id=os.urandom(16),
        )
        reply = decode(
            await client.request(miner.peer_id, NEGOTIATE_PROTOCOL, encode(old.proposal))
        )
        assert isinstance(reply, Refusal)
        assert reply.reason == "expired"

        # retrying an accepted proposal returns the very same agreement, one slot held
        opened = await client.wallet.open_escrow(
            miner.account, 10**6, client.chain.head.height + 100
        )
        assert opened.ok
        assert opened.height is not None
        now = int(time.time() * 1000)
        machine = ClientNegotiation(
            _ask(client, advert, opened.tx_id, opened.height, price=2_000),
            client.chain.signer,
            now,
            proposal_id=os.urandom(16),
        )
        sent = encode(machine.proposal)
        first = decode(await client.request(miner.peer_id, NEGOTIATE_PROTOCOL, sent))
        assert isinstance(first, Agreement)
        assert machine.on_reply(first, now) == first
        again = decode(await client.request(miner.peer_id, NEGOTIATE_PROTOCOL, sent))
        assert encode(again) == encode(first)
        assert miner.market.book is not None
        assert sorted(miner.market.book.active) == sorted([agreement.id, first.id])
        assert miner.market.book.free_slots == 0
        # the same proposal id for other terms is refused
        reused = dataclasses.replace(machine.proposal, expires_ms=machine.proposal.expires_ms + 1)
        other = decode(await client.request(miner.peer_id, NEGOTIATE_PROTOCOL, encode(reused)))
        assert isinstance(other, Refusal)
        assert other.reason == "id_reused"


def _ask(client: Node, advert: Advert, escrow_id: bytes, height: int, *, price: int) -> Ask:
    return Ask(
        chain_id=client.chain.view.chain_id,
        client_peer=client.peer_id,
        miner_peer=advert.peer_id,
        enclave=advert.enclave,
        operator=advert.operator,
        escrow_id=escrow_id,
        escrow_height=height,
        job_bytes=10,
        max_fuel=10**6,
        max_price=price,
        deadline_ms=int(time.time() * 1000) + 60_000,
    )


async def test_two_clients_race_for_the_last_slot_and_exactly_one_wins() -> None:
    def configure(i: int, cfg: NodeConfig) -> NodeConfig:
        if cfg.role is Role.MINER:
            return cfg.with_(market=MarketConfig(price=1_000, slots=1))
        return cfg

    async with open_devnet(
        gatekeepers=1, miners=1, clients=2, seed=53, chain_params=FAST, configure=configure
    ) as net:
        adverts = [(await c.find_miners(wait=60))[0] for c in net.clients]

        async def attempt(client: Node, advert: Advert) -> Agreement | NegotiationFailed:
            try:
                return await client.negotiate(advert, job_bytes=100, max_fuel=10**6)
            except NegotiationFailed as err:
                return err

        results = await _gather(*(attempt(c, a) for c, a in zip(net.clients, adverts, strict=True)))
        won = [r for r in results if isinstance(r, Agreement)]
        lost = [r for r in results if isinstance(r, NegotiationFailed)]
        assert len(won) == 1
        assert len(lost) == 1
        assert lost[0].reason == "no_slots"
        assert lost[0].retry_after is not None
        # the directory learns that the miner is full
        miner = net.miners[0]
        await wait_until(
            lambda: all(
                (a := c.market.directory.by_peer(miner.peer_id)) is not None and a.free_slots == 0
                for c in net.clients
            ),
            10,
            message="clients see the miner full",
        )
        assert await net.clients[0].find_miners() == []
        # its slot frees when the agreement ends
        assert miner.market.release(won[0].id)
        found = await net.clients[1].find_miners(wait=10)
        assert [a.peer_id for a in found] == [miner.peer_id]


async def test_bad_adverts_are_refused_with_their_reasons_and_offline_miners_drop_out() -> None:
    def configure(i: int, cfg: NodeConfig) -> NodeConfig:
        if cfg.role is Role.MINER:
            return cfg.with_(market=MarketConfig(advert_ttl=4.0, advert_interval=0.5))
        return cfg

    async with open_devnet(
        gatekeepers=1, miners=2, clients=2, seed=54, chain_params=FAST, configure=configure
    ) as net:
        victim, attacker = net.clients
        await wait_until(lambda: len(victim.market.directory) == 2, 60, message="two adverts")
        honest = net.miners[0]
        assert honest.market.advert is not None
        real = honest.market.advert.decode()
        now = int(time.time() * 1000)

        def refused(reason: str, publisher: Node = attacker) -> int:
            # an invalid advert is not relayed: the peers that hear it first refuse it
            others = [n for n in net.running if n is not publisher]
            return sum(n.metrics.get("adverts_refused", reason=reason) for n in others)

        async def send(node: Node, body: bytes) -> None:
            # past the sender's own validator, which keeps an honest node from sending these
            assert await node.relay(CAPACITY_TOPIC, node.seal(CAPACITY_TOPIC, body))

        async def publish(signed: SignedAdvert) -> None:
            await send(attacker, encode(signed))

        # forged: a real advert with a lower price, its signature kept
        cheaper = advert_payload(dataclasses.replace(real, price=1, seq=real.seq + 10**6))
        await publish(SignedAdvert(cheaper, honest.market.advert.signature))
        await wait_until(lambda: refused("bad_signature") >= 1, 10, message="forged refused")

        # an attacker's own key, claiming a registration the chain does not have
        fake = Identity.generate()
        mine = dataclasses.replace(
            real,
            peer_id=attacker.peer_id,
            enclave=fake.public_key,
            seq=now,
            issued_ms=now,
            expires_ms=now + 4_000,
        )
        await publish(_sign(fake, mine))
        await wait_until(lambda: refused("unregistered") >= 1, 10, message="unregistered refused")

        # expired
        stale = dataclasses.replace(mine, issued_ms=now - 10_000, expires_ms=now - 5_000)
        await publish(_sign(fake, stale))
        await wait_until(lambda: refused("expired") >= 1, 10, message="expired refused")

        # over the limits: more free slots than slots (refused at decoding)
        over = encode(dataclasses.replace(mine, free_slots=5, slots=1))
        await send(attacker, encode(SignedAdvert(over, fake.sign(over))))
        await wait_until(
            lambda: refused("decode_over_limit") + refused("over_limit") >= 1,
            10,
            message="over-limit refused",
        )

        # an advert naming another peer than the one that publishes it
        assert refused("wrong_sender") == 0
        posing = dataclasses.replace(mine, peer_id=honest.peer_id, seq=now + 1)
        await publish(_sign(fake, posing))
        await wait_until(lambda: refused("wrong_sender") >= 1, 10, message="impostor refused")
        # the real miners' adverts are what the victim holds: none of the above displaced
        # them (with a 4 s TTL, a loaded machine may let one lapse before its next re-advert,
        # so this waits for both to be held at once)
        miners = {m.peer_id for m in net.miners}
        await wait_until(
            lambda: {a.peer_id for a in victim.market.directory.adverts()} == miners,
            10,
            message="both real adverts held",
        )
        held = victim.market.directory.adverts()
        assert {a.peer_id for a in held} == miners
        assert all(a.price != 1 for a in held)
        assert all(a.enclave != fake.public_key for a in held)

        # a miner that goes offline drops out within its advert's TTL
        gone = net.miners[1]
        await net.stop(gone)
        stopped_at = trio.current_time()
        await wait_until(
            lambda: victim.market.directory.by_peer(gone.peer_id) is None,
            10,
            message="offline miner dropped",
        )
        assert trio.current_time() - stopped_at <= 4.0 + 1.0

        # a deregistered miner drops out at once and its new adverts are refused
        assert honest.tee is not None
        receipt = await honest.tee.deregister("leaving")
        assert receipt.ok
        await wait_until(
            lambda: victim.market.directory.by_peer(honest.peer_id) is None,
            10,
            message="deregistered miner dropped",
        )
        assert honest.tee.enclave is not None
        now = int(time.time() * 1000)
        late = dataclasses.replace(real, seq=now + 10**7, issued_ms=now, expires_ms=now + 4000)
        payload = advert_payload(late)
        signed = SignedAdvert(payload, await honest.tee.enclave.sign("advert", payload))
        await send(honest, encode(signed))
        await wait_until(lambda: refused("revoked", honest) >= 1, 10, message="revoked refused")
        assert await victim.find_miners() == []


def _sign(identity: Identity, advert: CapacityAdvert) -> SignedAdvert:
    payload = advert_payload(advert)
    return SignedAdvert(payload, identity.sign(statement_bytes("advert", payload)))


async def test_a_client_knowing_only_a_bootstrap_address_reaches_an_agreement(
    tmp_path: Path,
) -> None:
    async with open_devnet(gatekeepers=1, miners=2, seed=55, chain_params=FAST) as net:
        assert net.bootstrap is not None
        await wait_until(lambda: len(net.bootstrap.market.directory) == 2, 60, message="adverts")
        config = NodeConfig(
            role=Role.CLIENT,
            bootstrap=(net.bootstrap.listen_addrs[0],),
            genesis=net.root / "genesis.toml",
            data_dir=tmp_path / "newcomer",
        )
        async with open_node(config) as newcomer:
            # the newcomer's account gets tokens the way any user's would: a transfer
            funder = net.gatekeepers[0]
            funded = await funder.wallet.transfer(newcomer.account, 10**8)
            assert funded.ok, funded
            found = await newcomer.find_miners(wait=30)
            assert {a.peer_id for a in found} == {m.peer_id for m in net.miners}
            await newcomer.chain.wait_for_height(funder.chain.head.height, timeout=30)
            agreement = await newcomer.negotiate(found[0], job_bytes=64, max_fuel=10**6)
            agreement.verify()
            assert agreement.terms.client == newcomer.account
            assert agreement.terms.miner_peer == found[0].peer_id
