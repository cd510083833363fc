#!/usr/bin/env python3
"""Market benchmarks: real py-libp2p hosts on loopback, every node in one process.

agreement   client start to a co-signed agreement, p50/p99:
            cold: a new client node that knows only the bootstrap address (it syncs the
            chain, pulls adverts, attests the miner, opens a standing escrow and
            negotiates); warm: the same client again, directory and attestation cached,
            its standing escrow reused (no transaction on the way);
            baseline: one finalized transaction (submit -> receipt) in the same devnet,
            which is what a cold agreement waits for
convergence directories after a partition heals, miners re-advertising on both sides
            while cut; baseline: one /phala/market pull of every advert from one peer.
            With --processes (the default in `make bench`, 20 miners): every node but the
            two clients is its own OS process (phala_p2p.procnet), as in a deployment;
            without, every node shares this process's event loop, which on 2 cores gives a
            floor, not a figure for separate processes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from phala_p2p.config import DiscoveryConfig, MarketConfig, NodeConfig, Role
from phala_p2p.crypto.identity import Identity
from phala_p2p.crypto.keyfile import KEY_FILE_NAME, save_identity
from phala_p2p.market.negotiation import Agreement
from phala_p2p.net.health import HealthConfig
from phala_p2p.node import Node, open_node
from phala_p2p.procnet import Member, open_process_devnet
from phala_p2p.testing import Devnet, open_devnet, wait_until

FUEL = 10**6


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))]


def line(name: str, values: list[float], base: float) -> None:
    p50, p99 = pct(values, 0.5), pct(values, 0.99)
    print(
        f"{name:<34} p50 {p50 * 1000:7.1f} ms  p99 {p99 * 1000:7.1f} ms  "
        f"ratio p50/baseline {p50 / base:5.2f}x  (n={len(values)})",
        flush=True,
    )


async def _finalized_tx(node: Node, to: bytes) -> float:
    start = trio.current_time()
    receipt = await node.wallet.transfer(to, 1)
    assert receipt.ok, receipt
    return trio.current_time() - start


async def bench_agreement(trials: int) -> None:
    async with open_devnet(gatekeepers=1, miners=4, clients=1, seed=71) as net:
        assert net.bootstrap is not None
        funder = net.clients[0]
        await wait_until(lambda: len(funder.market.directory) == 4, 120, message="adverts")
        base = [await _finalized_tx(funder, net.gatekeepers[0].account) for _ in range(trials)]
        baseline = statistics.median(base)
        print(f"{'baseline: one finalized transfer':<34} p50 {baseline * 1000:7.1f} ms", flush=True)
        cold: list[float] = []
        warm: list[float] = []
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(trials):
                identity = Identity.generate()
                data_dir = Path(tmp) / f"client-{i}"
                save_identity(data_dir / KEY_FILE_NAME, identity)
                funded = await funder.wallet.transfer(identity.public_key, 10**7)
                assert funded.ok, funded
                config = NodeConfig(
                    role=Role.CLIENT,
                    bootstrap=(net.bootstrap.listen_addrs[0],),
                    genesis=net.root / "genesis.toml",
                    data_dir=data_dir,
                )
                start = trio.current_time()
                async with open_node(config) as client:
                    found = await client.find_miners(wait=30)
                    await client.chain.wait_for_height(funder.chain.head.height, timeout=30)
                    agreement = await client.negotiate(found[0], job_bytes=1024, max_fuel=FUEL)
                    cold.append(trio.current_time() - start)
                    assert agreement.terms.client == identity.public_key
                    _job_done(net, agreement)
                    for _ in range(3):
                        t0 = trio.current_time()
                        found = await client.find_miners()
                        agreement = await client.negotiate(found[0], job_bytes=1024, max_fuel=FUEL)
                        warm.append(trio.current_time() - t0)
                        _job_done(net, agreement)
        line("agreement, cold client", cold, baseline)
        line("agreement, warm directory", warm, baseline)


def _job_done(net: Devnet, agreement: Agreement) -> None:
    """No job runs here: the miner frees the agreement's slot at once."""
    assert net.node(agreement.terms.miner_peer).market.release(agreement.id)


async def _pull_baseline(asker: Node, miners: int, rounds: int) -> float:
    """Median time of one /phala/market pull of every advert from a connected peer (so the
    baseline includes no dial)."""
    source = asker.peers()[0]
    pulls = []
    for _ in range(rounds):
        t0 = trio.current_time()
        await asker.market.pull(source)
        pulls.append(trio.current_time() - t0)
    baseline = statistics.median(pulls)
    name = f"baseline: one pull of {miners} adverts"
    print(f"{name:<34} p50 {baseline * 1000:7.1f} ms", flush=True)
    return baseline


async def bench_convergence(miners: int, rounds: int) -> None:
    def configure(i: int, cfg: NodeConfig) -> NodeConfig:
        cfg = cfg.with_(
            health=HealthConfig(interval=2.0, dead_after=30.0),
            discovery=DiscoveryConfig(target_peers=8, interval=0.5),
        )
        if cfg.role is Role.MINER:
            return cfg.with_(market=MarketConfig(advert_ttl=60.0, advert_interval=0.2))
        return cfg

    async with open_devnet(
        gatekeepers=1,
        miners=miners,
        clients=2,
        seed=72,
        configure=configure,
        full_mesh=False,
        connect_timeout=120,
    ) as net:
        everyone = net.all_nodes
        want = {m.peer_id for m in net.miners}
        await wait_until(
            lambda: all(
                {a.peer_id for a in n.market.directory.adverts()} == want for n in everyone
            ),
            300,
            message="every directory holds every miner",
        )
        baseline = await _pull_baseline(net.clients[0], miners, rounds)
        times = []
        half = len(net.miners) // 2
        for _ in range(rounds):
            left = [n for n in everyone if n not in net.miners[half:] and n is not net.clients[1]]
            right = [*net.miners[half:], net.clients[1]]
            await net.partition(left, right)
            before = net.advert_seqs()
            for m in net.miners:
                m.market.readvertise()
            await wait_until(
                lambda before=before: all(net.advert_seqs()[k] > v for k, v in before.items()),
                60,
                message="re-adverts",
            )
            fresh = net.advert_seqs()
            healing = net.heal()  # redials start now; convergence counts from here
            t0 = trio.current_time()
            await wait_until(
                lambda fresh=fresh: all(n.market.directory.covers(fresh) for n in everyone),
                60,
                message="convergence",
            )
            times.append(trio.current_time() - t0)
            await healing
        line(f"convergence after heal, {miners} miners", times, baseline)


async def bench_convergence_processes(miners: int, rounds: int) -> None:
    def configure(i: int, cfg: NodeConfig) -> NodeConfig:
        cfg = cfg.with_(health=HealthConfig(interval=5.0, dead_after=30.0))
        if cfg.role is Role.MINER:
            return cfg.with_(market=MarketConfig(advert_ttl=60.0, advert_interval=0.2))
        return cfg

    async with (
        open_process_devnet(
            gatekeepers=1,
            miners=miners,
            clients=1,
            seed=73,
            configure=configure,
            chain_params={"block_time_ms": 5_000},  # see tests/net/test_market_processes.py
            start_timeout=300,
        ) as net,
        open_node(net.local_config("client")) as left_client,
    ):
        net.attach(left_client)
        started = trio.current_time()
        await wait_until(
            lambda: net.hold({m.peer_id: 0 for m in net.miners}), 300, message="every advert"
        )
        print(
            f"{'every directory full after start':<34} {trio.current_time() - started:7.1f} s",
            flush=True,
        )
        baseline = await _pull_baseline(left_client, miners, rounds)
        half = miners // 2
        assert net.bootstrap is not None
        left: list[Member] = [net.bootstrap, *net.gatekeepers, *net.miners[:half], left_client]
        right: list[Member] = [*net.miners[half:], *net.clients]
        times: list[float] = []
        redials: list[float] = []
        for i in range(rounds):
            await net.partition(left, right)
            before = {m.peer_id: m.directory[m.peer_id] for m in net.miners}
            async with trio.open_nursery() as nursery:
                for m in net.miners:
                    nursery.start_soon(m.command, "readvertise")
            await wait_until(
                lambda before=before: all(
                    m.directory.get(m.peer_id, 0) > before[m.peer_id] for m in net.miners
                ),
                60,
                message="re-adverts",
            )
            fresh = {m.peer_id: m.directory[m.peer_id] for m in net.miners}
            # Counted from the heal's start: its redials (some 100 cut pairs, each a Noise
            # handshake, on 2 cores) run meanwhile, and the first pulls across the cut
            # converge everyone.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_timed, net.heal, redials)
                took = await net.convergence(fresh, timeout=120)
            slowest = max(took, key=lambda name: took[name])
            times.append(took[slowest])
            spread = sorted(took.values())
            print(
                f"  round {i}: {took[slowest]:.2f} s (last: {slowest}; first {spread[0]:.2f} s, "
                f"median {statistics.median(spread):.2f} s)",
                flush=True,
            )
        net.check()
        print(f"{'heal: every cut pair redialed':<34} p50 {statistics.median(redials):7.1f} s")
        line(f"convergence after heal, {miners} miners (processes)", times, baseline)


async def _timed(fn: Callable[[], Awaitable[None]], out: list[float]) -> None:
    start = trio.current_time()
    await fn()
    out.append(trio.current_time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("agreement", "convergence"))
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--miners", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--processes", action="store_true", help="convergence with every node its own process"
    )
    args = parser.parse_args()
    started = time.time()
    if args.only in (None, "agreement"):
        trio.run(bench_agreement, args.trials)
    if args.only in (None, "convergence"):
        bench = bench_convergence_processes if args.processes else bench_convergence
        trio.run(bench, args.miners, args.rounds)
    print(f"done in {time.time() - started:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
