"""A devnet of OS processes (phala_p2p.procnet): started, partitioned, healed, stopped."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import trio

from phala_p2p import open_node
from phala_p2p.config import MarketConfig, NodeConfig, Role
from phala_p2p.errors import RemoteError, UsageError
from phala_p2p.net.health import HealthConfig
from phala_p2p.procnet import NodeProcess, open_process_devnet
from phala_p2p.testing import wait_until


def _configure(i: int, cfg: NodeConfig) -> NodeConfig:
    cfg = cfg.with_(health=HealthConfig(interval=2.0, dead_after=30.0))
    if cfg.role is Role.MINER:
        return cfg.with_(market=MarketConfig(price=1_000 + i, advert_ttl=60.0, advert_interval=0.2))
    return cfg


async def test_process_devnet_partition_cuts_real_connections_and_heal_converges() -> None:
    async with (
        open_process_devnet(gatekeepers=1, miners=2, seed=61, configure=_configure) as net,
        open_node(net.local_config("client")) as client,
    ):
        net.attach(client)
        assert client.role is Role.CLIENT
        assert net.bootstrap is not None
        miners = net.miners
        want = {m.peer_id for m in miners}

        def everyone_has(seqs: dict[str, int]) -> bool:
            local = {a.peer_id: a.seq for a in client.market.directory.adverts()}
            views = [p.directory for p in net.processes] + [local]
            return all(all(v.get(k, -1) >= s for k, s in seqs.items()) for v in views)

        await wait_until(lambda: everyone_has({p: 0 for p in want}), 120, message="adverts")
        found = await client.find_miners()
        assert {a.peer_id for a in found} == want
        assert sorted(a.price for a in found) == [a.price for a in found]

        left = [net.bootstrap, *net.gatekeepers, miners[0], client]
        right = [miners[1]]
        await net.partition(left, right)
        assert (await miners[1].command("peers"))["peers"] == []
        assert not client.is_connected(miners[1].peer_id)

        old = {m.peer_id: m.directory[m.peer_id] for m in miners}
        for m in miners:
            await m.command("readvertise")
        await wait_until(
            lambda: all(m.directory.get(m.peer_id, 0) > old[m.peer_id] for m in miners),
            30,
            message="both miners re-advertised",
        )
        fresh = {m.peer_id: m.directory[m.peer_id] for m in miners}
        # the left side heard its own miner's new advert, and not the right side's
        left_procs = [net.bootstrap, *net.gatekeepers, miners[0]]  # directories reported live
        await wait_until(
            lambda: all(
                p.directory.get(miners[0].peer_id, 0) >= fresh[miners[0].peer_id]
                for p in left_procs
            ),
            30,
            message="the left side heard its miner",
        )
        assert all(
            p.directory.get(miners[1].peer_id, 0) < fresh[miners[1].peer_id] for p in left_procs
        )

        await net.heal()
        await wait_until(lambda: everyone_has(fresh), 30, message="converged after the heal")
        assert (await miners[1].command("peers"))["peers"]
        net.check()


async def test_a_process_that_dies_is_reported_with_its_log() -> None:
    async with open_process_devnet(gatekeepers=1, seed=62) as net:
        gatekeeper = net.gatekeepers[0]
        assert gatekeeper.proc is not None
        gatekeeper.proc.send_signal(signal.SIGTERM)
        await gatekeeper.exited.wait()
        with pytest.raises(UsageError, match="gatekeeper-1"):
            net.check()
        with pytest.raises(RemoteError, match="not running"):
            await gatekeeper.command("peers")
        assert net.bootstrap is not None
        assert (await net.bootstrap.command("peers"))["ok"]
    assert gatekeeper.exit_code is not None
    with trio.fail_after(1):
        await gatekeeper.exited.wait()


def test_counts_are_checked() -> None:
    async def start() -> None:
        async with open_process_devnet(gatekeepers=0):
            pass

    with pytest.raises(UsageError, match="at least one gatekeeper"):
        trio.run(start)


def test_malformed_event_lines_are_counted_not_fatal(tmp_path: Path) -> None:
    p = NodeProcess("miner-1", Role.MINER, NodeConfig(), tmp_path)
    for line in [b"not json", b"[1]", b'{"event": "block"}', b'{"event": "directory"}']:
        p.take_line(line)
    assert p.bad_lines == 4
    p.take_line(b'{"event": "block", "height": 7}')
    p.take_line(b'{"event": "directory", "adverts": {"12D3KooX": 5}}')
    assert p.height == 7
    assert p.directory == {"12D3KooX": 5}
    assert p.bad_lines == 4
