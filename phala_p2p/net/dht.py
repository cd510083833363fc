"""Kademlia DHT (py-libp2p's KadDHT): servers on gatekeepers and bootstrap nodes.

Other roles run it in client mode: they query servers but answer nobody. The routing
table is fed with the DHT servers that discovery finds; ``find_peer`` turns a peer id
into dialable addresses without any central directory.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from libp2p.exceptions import BaseLibp2pError
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.tools.anyio_service import background_trio_service

logger = logging.getLogger(__name__)


class Dht:
    def __init__(self, host: Any, *, server: bool) -> None:
        self.server = server
        self.kad = KadDHT(
            host,
            DHTMode.SERVER if server else DHTMode.CLIENT,
            enable_random_walk=False,
        )
        self._known: set[str] = set()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self.kad):
            task_status.started()
            await trio.sleep_forever()

    async def add_server(self, peer_id: str) -> None:
        """Add a peer that reported a DHT-server role to the routing table."""
        if peer_id in self._known:
            return
        try:
            if await self.kad.add_peer(ID.from_base58(peer_id), skip_server_mode_check=True):
                self._known.add(peer_id)
        except BaseLibp2pError as err:
            logger.debug("DHT: cannot add %s: %s", peer_id, err)

    def forget(self, peer_id: str) -> None:
        self._known.discard(peer_id)

    async def find_peer(self, peer_id: str, *, timeout: float) -> list[str]:
        """Addresses of ``peer_id`` found through the DHT (empty if none answered)."""
        with trio.move_on_after(timeout):
            try:
                info = await self.kad.find_peer(ID.from_base58(peer_id))
            except BaseLibp2pError as err:
                logger.debug("DHT lookup of %s failed: %s", peer_id, err)
                return []
            if info is None:
                return []
            return [f"{a}/p2p/{peer_id}" if "/p2p/" not in str(a) else str(a) for a in info.addrs]
        return []
