"""Peer health: ping every connected peer, drop the ones that stop answering.

A frozen process (SIGSTOP, a hung event loop) keeps its TCP connection open, and py-libp2p
never notices. Every ``interval`` seconds each connected peer gets a ping on
``/phala/ping/1.0.0``; a peer with no successful ping for ``dead_after`` seconds is
disconnected (it may reconnect once it answers again). Traffic from a peer also proves it
alive (``saw``): a busy peer whose ping reply waits behind a burst of gossip is not dropped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from phala_p2p.errors import ConnectionLost, P2PError, ProtocolViolation, UsageError
from phala_p2p.net.metrics import Metrics
from phala_p2p.net.reqresp import ProtocolLimits, RequestResponse
from phala_p2p.net.streams import FramedStream

logger = logging.getLogger(__name__)

PING_PROTOCOL = "/phala/ping/1.0.0"
PING_SIZE = 32


@dataclass(frozen=True)
class HealthConfig:
    interval: float = 1.0
    dead_after: float = 3.5
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.interval <= 0 or self.dead_after < 2 * self.interval:
            raise UsageError("health: interval > 0 and dead_after >= 2 * interval")


class HealthMonitor:
    def __init__(
        self,
        reqresp: RequestResponse,
        metrics: Metrics,
        config: HealthConfig,
        *,
        connected_peers: Callable[[], list[str]],
        disconnect: Callable[[str], Awaitable[None]],
    ) -> None:
        self._rr = reqresp
        self._metrics = metrics
        self.config = config
        self._connected = connected_peers
        self._disconnect = disconnect
        self._last_ok: dict[str, float] = {}
        self.rtt: dict[str, float] = {}
        reqresp.serve_stream(
            PING_PROTOCOL,
            self._answer,
            ProtocolLimits(max_request=PING_SIZE, max_response=PING_SIZE, max_streams_per_peer=2),
        )

    def saw(self, peer: str) -> None:
        """``peer`` just sent us something: it is alive whatever its pings say."""
        if peer in self._last_ok:
            self._last_ok[peer] = trio.current_time()

    async def _answer(self, stream: FramedStream) -> None:
        # One long-lived stream per peer: a ping costs two small frames, not a new stream.
        while True:
            try:
                nonce = await stream.receive()
            except ConnectionLost:
                return
            await stream.send(nonce)

    async def run(self) -> None:
        if not self.config.enabled:
            return
        tick = min(self.config.interval, 0.25)
        next_ping = 0.0
        async with trio.open_nursery() as nursery:
            pinging: set[str] = set()
            while True:
                now = trio.current_time()
                peers = set(self._connected())
                for gone in set(self._last_ok) - peers:
                    del self._last_ok[gone]
                    self.rtt.pop(gone, None)
                for peer in peers:
                    last = self._last_ok.setdefault(peer, now)
                    if now - last >= self.config.dead_after:
                        logger.warning(
                            "peer %s did not answer pings for %.1fs: dropping it", peer, now - last
                        )
                        self._metrics.count("peers_dropped_unresponsive")
                        del self._last_ok[peer]
                        nursery.start_soon(self._disconnect, peer)
                    elif now >= next_ping and peer not in pinging:
                        pinging.add(peer)
                        nursery.start_soon(self._ping_one, peer, pinging)
                if now >= next_ping:
                    next_ping = now + self.config.interval
                await trio.sleep(tick)

    async def _ping_one(self, peer: str, pinging: set[str]) -> None:
        """Ping ``peer`` every interval on one stream until it fails or the peer leaves."""
        try:
            async with self._rr.open_stream(peer, PING_PROTOCOL, max_message=PING_SIZE) as s:
                while peer in self._last_ok:
                    nonce = os.urandom(PING_SIZE)
                    start = trio.current_time()
                    with trio.move_on_after(self.config.dead_after):
                        await s.send(nonce)
                        reply = await s.receive()
                        if reply != nonce:
                            raise ProtocolViolation("ping echoed the wrong bytes")
                        now = trio.current_time()
                        if peer in self._last_ok:
                            self._last_ok[peer] = now
                            self.rtt[peer] = now - start
                        await trio.sleep(max(0.0, self.config.interval - (now - start)))
                        continue
                    self._metrics.count("ping_failures")
                    return
        except P2PError as err:
            self._metrics.count("ping_failures")
            logger.debug("ping %s failed: %s", peer, err)
        finally:
            pinging.discard(peer)
