"""The Kademlia DHT finds a peer's addresses through the bootstrap node (a DHT server)."""

from __future__ import annotations

from phala_p2p import DiscoveryConfig, Role
from phala_p2p.testing import open_devnet, wait_until


async def test_find_peer_through_the_dht() -> None:
    # Discovery keeps one peer each, so clients know only the bootstrap node.
    def lonely(i: int, cfg):  # type: ignore[no-untyped-def]
        return cfg.with_(discovery=DiscoveryConfig(target_peers=1, interval=0.5))

    async with open_devnet(peers=3, seed=31, configure=lonely, full_mesh=False) as net:
        a, b, _c = net.nodes
        assert net.bootstrap is not None
        assert net.bootstrap.dht.server
        assert not a.dht.server
        assert net.bootstrap.role is Role.BOOTSTRAP
        await wait_until(lambda: net.bootstrap.peer_id in a.dht._known, 10)
        assert not a.is_connected(b.peer_id)
        addrs = await a.dht.find_peer(b.peer_id, timeout=10)  # the DHT path only
        assert addrs, "the DHT returned no address"
        assert all(x.endswith(f"/p2p/{b.peer_id}") for x in addrs)
        await a.connect(addrs[0])
        assert a.is_connected(b.peer_id)
