"""The market at the issue's scale: 20 miners, a gatekeeper and a bootstrap node, each its
own OS process (one event loop per node, as in a deployment), a client process and a client
in this process. Clients filter the directory; a partition and its heal converge every directory."""

from __future__ import annotations

import pytest
import trio

from phala_p2p import open_node
from phala_p2p.config import NodeConfig, Role
from phala_p2p.net.health import HealthConfig
from phala_p2p.procnet import Member, NodeProcess, ProcessDevnet, open_process_devnet
from phala_p2p.testing import wait_until

from .test_market import _market, check_filters

MINERS = 20
# 23 nodes on 2 cores: empty blocks every second alone keep about a fifth of the machine busy
# (measured: 97 % busy at 1 s, 75 % at 5 s, before any partition). Transactions do not wait
# for the block time, so the market does not notice.
CHAIN = {"block_time_ms": 5_000}


def _configure(i: int, cfg: NodeConfig) -> NodeConfig:
    # 22 node processes and 20 enclave processes share 2 cores while they start: pings
    # forgive a slow answer. Miners are nodes 2..21 (1 is the gatekeeper).
    cfg = cfg.with_(health=HealthConfig(interval=5.0, dead_after=30.0))
    return cfg.with_(market=_market(i - 1)) if cfg.role is Role.MINER else cfg


def _own_seqs(miners: list[NodeProcess]) -> dict[str, int]:
    """Each miner's newest advert, as its own directory holds it."""
    return {m.peer_id: m.directory.get(m.peer_id, -1) for m in miners}


@pytest.mark.slow
async def test_twenty_miner_processes_filter_and_converge_within_3s_of_a_heal() -> None:
    async with (
        open_process_devnet(
            gatekeepers=1,
            miners=MINERS,
            clients=1,
            seed=53,
            configure=_configure,
            chain_params=CHAIN,
            start_timeout=240,
        ) as net,
        open_node(net.local_config("client")) as left_client,
    ):
        net.attach(left_client)
        right_client = net.clients[0]  # a process, like every node but this one
        miners = net.miners
        assert len(miners) == MINERS
        await wait_until(
            lambda: net.hold({m.peer_id: 0 for m in miners}),
            240,
            message="every directory holds all 20 miners",
        )
        net.check()

        # -- filters: each answer is computed from the miners' own configs
        configs = {m.peer_id: _market(int(m.name.rsplit("-", 1)[1]) - 1) for m in miners}
        await check_filters(left_client, configs)

        # -- partition: each side's miners re-advertise; the other side cannot hear it
        half = MINERS // 2
        assert net.bootstrap is not None
        left: list[Member] = [net.bootstrap, *net.gatekeepers, *miners[:half], left_client]
        right: list[Member] = [*miners[half:], right_client]
        await net.partition(left, right)
        before = _own_seqs(miners)
        async with trio.open_nursery() as nursery:
            for m in miners:
                nursery.start_soon(m.command, "readvertise")
        await wait_until(
            lambda: all(_own_seqs(miners)[p] > s for p, s in before.items()),
            30,
            message="every miner re-advertised",
        )
        fresh = _own_seqs(miners)
        left_fresh = {m.peer_id: fresh[m.peer_id] for m in miners[:half]}
        right_fresh = {m.peer_id: fresh[m.peer_id] for m in miners[half:]}
        await wait_until(
            lambda: net.hold(left_fresh, left) and net.hold(right_fresh, right),
            30,
            message="each side hears its own miners",
        )
        # the cut is real: no member of one side holds any of the other side's new adverts
        for view in net.directories(left):
            assert all(view.get(p, -1) < s for p, s in right_fresh.items())
        for view in net.directories(right):
            assert all(view.get(p, -1) < s for p, s in left_fresh.items())

        # -- heal: the first pulls across the cut are relayed by gossip to both sides. The
        # 3 s count from the heal's start, while its redials (some 90 cut pairs, each a
        # Noise handshake and a new peer for every protocol, on 2 cores) still run.
        counters = await _market_counters(net)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(net.heal)
            took = {k: round(v, 2) for k, v in (await net.convergence(fresh, timeout=30)).items()}
        net.check()
        slowest = sorted(took.items(), key=lambda kv: kv[1])[-3:]
        if max(took.values()) < 3.0:
            return
        after = await _market_counters(net)  # what the slow ones did meanwhile
        moved = {
            name: {k: v - counters[name].get(k, 0) for k, v in after[name].items() if v}
            for name, _ in slowest
            if name in after
        }
        # Without the relay of pulled adverts, convergence waits for anti-entropy and the
        # miners' own re-adverts (measured 10-37 s); with one gossip RPC per message, busy
        # nodes passed adverts on one per turn of their event loop (3.9-5.7 s). On 2 cores
        # the last directory now converges 2.0-3.1 s after the heal's start.
        raise AssertionError(f"converged after the heal in {slowest}; counters: {moved}")


async def _market_counters(net: ProcessDevnet) -> dict[str, dict[str, int]]:
    """Each process's market and gossip counters (name -> counter -> value)."""
    words = ("advert", "market", "relay", "dropped", "ignored", "rejected")
    out: dict[str, dict[str, int]] = {}
    for p in net.processes:
        counters = (await p.command("metrics"))["counters"]
        out[p.name] = {k: v for k, v in counters.items() if any(w in k for w in words)}
    return out
