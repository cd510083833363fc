"""Raw py-libp2p baselines, measured in the same process as our figures.

Nothing here is phala_p2p: plain ``new_host()`` hosts with py-libp2p's defaults (or with the
same fixed GossipSub settings, where a benchmark says so), so each ratio compares like with
like on the same noisy machine at the same moment.
"""

from __future__ import annotations

from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import multiaddr
from libp2p import new_host
from libp2p.network.config import ConnectionConfig
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

LISTEN = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")


@asynccontextmanager
async def raw_hosts(n: int, *, fixed_dial: bool = False) -> Any:
    """``n`` default py-libp2p hosts, listening on loopback."""
    async with AsyncExitStack() as stack:
        hosts = []
        for _ in range(n):
            cfg = ConnectionConfig(max_connections_per_peer=1) if fixed_dial else None
            host = new_host(connection_config=cfg, listen_addrs=[LISTEN])
            await stack.enter_async_context(host.run([LISTEN]))
            hosts.append(host)
        yield hosts


async def dial(a: Any, b: Any) -> None:
    await a.connect(info_from_p2p_addr(b.get_addrs()[0]))


@asynccontextmanager
async def raw_gossip(hosts: list[Any], *, fixed: bool) -> Any:
    """A GossipSub per host: py-libp2p defaults, or heartbeat 1 s with the spam cap off."""
    async with AsyncExitStack() as stack:
        pubsubs = []
        for host in hosts:
            if fixed:
                router = GossipSub(
                    protocols=["/meshsub/1.1.0"],  # type: ignore[list-item]
                    degree=6,
                    degree_low=4,
                    degree_high=12,
                    heartbeat_interval=1,
                    spam_protection_enabled=False,
                )
            else:
                router = GossipSub(
                    protocols=["/meshsub/1.1.0"],
                    degree=6,
                    degree_low=4,  # type: ignore[list-item]
                    degree_high=12,
                )
            ps = Pubsub(host, router)
            await stack.enter_async_context(background_trio_service(ps))
            await stack.enter_async_context(background_trio_service(router))
            await ps.wait_until_ready()
            pubsubs.append(ps)
        yield pubsubs
