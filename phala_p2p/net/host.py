"""Host factory with safe defaults, and the peer gate used for bans and partitions.

py-libp2p's ``new_host`` accepts plaintext and secio, dials with a 250 ms delay when a peer
may have several connections, and has no way to refuse a peer by id. This module builds
the host itself: Noise only, Yamux only, one connection per peer, and a swarm that asks a
:class:`PeerGate` before every dial and every new connection, in both directions, and
whose inbound connections give back their slot of the inbound limit when they close
(py-libp2p's held it until the swarm stopped).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p.abc import INotifee
from libp2p.crypto.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.basic_host import BasicHost
from libp2p.network.config import ConnectionConfig
from libp2p.network.exceptions import SwarmException
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PeerStore
from libp2p.rcmgr import new_resource_manager
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.transport.manager import TransportManager
from libp2p.transport.tcp.tcp import TCP
from libp2p.transport.upgrader import TransportUpgrader

from phala_p2p.crypto.identity import Identity
from phala_p2p.errors import UsageError

logger = logging.getLogger(__name__)

# py-libp2p's Yamux sends a WINDOW_UPDATE frame after every read by default: one more
# encrypted frame (and a send-lock round) for every frame received, which doubles the work
# of small messages. go-yamux credits the window back once half of it has been consumed;
# this turns py-libp2p to that behaviour (read at call time; an explicit setting wins).
os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")

SECURITY_PROTOCOLS = (NOISE_PROTOCOL_ID,)
MUXER_PROTOCOLS = (YAMUX_PROTOCOL_ID,)


@dataclass(frozen=True)
class HostLimits:
    """Connection limits of a host. Frozen and validated."""

    max_connections: int = 200
    dial_timeout: float = 5.0
    upgrade_timeout: float = 5.0
    stream_negotiation_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise UsageError("max_connections must be at least 1")
        for name in ("dial_timeout", "upgrade_timeout", "stream_negotiation_timeout"):
            if not 0 < getattr(self, name) <= 300:
                raise UsageError(f"{name} must be in (0, 300] seconds")


class PeerGate:
    """Peers this host refuses to talk to, each until a deadline (monotonic seconds).

    Consulted by the swarm before every dial and for every new connection, inbound or
    outbound, so a denied peer can neither be reached nor reach us. Used for partitions
    (denied until healed) and for peers that misbehave (denied for a while).
    """

    FOREVER = float("inf")

    def __init__(self, *, clock: Any = time.monotonic) -> None:
        self._until: dict[str, float] = {}
        self._clock = clock

    def deny(self, peer_id: str, *, seconds: float | None = None) -> None:
        until = self.FOREVER if seconds is None else self._clock() + seconds
        self._until[peer_id] = max(until, self._until.get(peer_id, 0.0))

    def allow(self, peer_id: str) -> None:
        self._until.pop(peer_id, None)

    def allow_all(self) -> None:
        self._until.clear()

    def is_denied(self, peer_id: str) -> bool:
        until = self._until.get(peer_id)
        if until is None:
            return False
        if until <= self._clock():
            del self._until[peer_id]
            return False
        return True

    def denied(self) -> list[str]:
        return [p for p in list(self._until) if self.is_denied(p)]


class GatedSwarm(Swarm):
    """A swarm that refuses denied peers on dial and on connection, both directions."""

    gate: PeerGate

    async def upgrade_inbound_raw_conn(self, raw_conn: Any, maddr: multiaddr.Multiaddr) -> Any:
        muxed = await super().upgrade_inbound_raw_conn(raw_conn, maddr)
        handler = _INBOUND_HANDLER.get(None)
        if handler is not None:  # end the handler when this connection ends
            conn = next(
                (c for c in self.connections.get(muxed.peer_id, []) if c.muxed_conn is muxed),
                None,
            )
            handler.start_soon(_cancel_when_closed, conn, handler.cancel_scope)
        return muxed

    async def _do_handle_inbound_connection(
        self, read_write_closer: Any, maddr: multiaddr.Multiaddr, failure_event: Any
    ) -> None:
        # py-libp2p keeps each inbound connection's handler until the swarm stops, and
        # with it a slot of the inbound limit (max_connections) that the handler holds: after
        # max_connections inbound connections in the node's life, every new one was refused.
        # The handler now ends with its connection.
        async with trio.open_nursery() as handler:
            token = _INBOUND_HANDLER.set(handler)
            try:
                await super()._do_handle_inbound_connection(read_write_closer, maddr, failure_event)
            finally:
                _INBOUND_HANDLER.reset(token)
            handler.cancel_scope.cancel()  # it returned by itself: a failed upgrade

    async def dial_peer(self, peer_id: ID) -> Any:
        if self.gate.is_denied(str(peer_id)):
            raise SwarmException(f"peer {peer_id} is denied by the gate")
        return await super().dial_peer(peer_id)

    async def add_conn(self, muxed_conn: Any, direction: str = "unknown") -> Any:
        peer_id = muxed_conn.peer_id
        if self.gate.is_denied(str(peer_id)):
            logger.debug("closing %s connection from denied peer %s", direction, peer_id)
            await muxed_conn.close()
            raise SwarmException(f"peer {peer_id} is denied by the gate")
        self.forget_closed(peer_id)
        existing = [c for c in self.connections.get(peer_id, []) if c.muxed_conn is not muxed_conn]
        if not existing:
            return await super().add_conn(muxed_conn, direction)
        # Two peers that dial each other at once get two connections, one each way. Both
        # sides keep the one dialed by the smaller peer id and close the other at once, so
        # they agree on one connection (py-libp2p would keep both for a 20 s grace period,
        # and each side may send on a different one). A new connection the same way as an
        # existing one is a redial: the dialer gave the old one up (we may not have noticed
        # yet, a dropped connection reads as silence for a while), so the new one wins.
        we_dialed = _outbound(direction)
        crossing = [c for c in existing if _outbound(getattr(c, "direction", "")) != we_dialed]
        if crossing and not self._preferred(peer_id, we_dialed):
            logger.debug("simultaneous connect with %s: keeping the existing connection", peer_id)
            await muxed_conn.close()
            return crossing[0]
        conn = await super().add_conn(muxed_conn, direction)
        for old in existing:
            logger.debug("%s connected again: closing the older connection", peer_id)
            await old.close()
        return conn

    def forget_closed(self, peer_id: ID) -> None:
        """Drop the closed connections listed for ``peer_id``. py-libp2p lists one until its
        cleanup task runs, which may be seconds under load, and meanwhile ``host.connect``
        takes it for a connection (and dials nothing), a new connection may be closed in its
        favour as the "existing" one, and the per-peer limit may trim the new one."""
        listed = self.connections.get(peer_id, [])
        if any(c.is_closed for c in listed):
            live = [c for c in listed if not c.is_closed]
            if live:
                self.connections[peer_id] = live
            else:
                del self.connections[peer_id]

    def _preferred(self, peer_id: ID, we_dialed: bool) -> bool:
        return we_dialed == (str(self.self_id) < str(peer_id))

    def clear_dial_failures(self) -> None:
        """Forget recent dial failures (the swarm would otherwise refuse to redial for 60 s)."""
        self._negative_peer_cache.clear()


_INBOUND_HANDLER: contextvars.ContextVar[trio.Nursery] = contextvars.ContextVar("inbound_handler")


async def _cancel_when_closed(conn: Any, scope: trio.CancelScope) -> None:
    if conn is not None:
        await conn.event_closed.wait()
    scope.cancel()


def _outbound(direction: Any) -> bool:
    """Whether a py-libp2p direction ("outbound", or its ``Direction`` enum) is ours."""
    name = getattr(direction, "name", direction)
    return str(name).lower().endswith("outbound")


_SOCKET_PATH = ("muxed_conn", "secured_conn", "conn", "read_writer", "raw_conn", "stream")


def abort_sockets(conns: Any) -> int:
    """Close the TCP sockets under py-libp2p connections at once, without a goodbye.

    A graceful close writes first (Yamux GoAway, Noise frames), which blocks forever when the
    peer's network has gone silent (a cut cable, a frozen host): py-libp2p then keeps the
    connection, its sockets and its gossip send queue, and every publish waits on that queue.
    Closing the socket makes every pending read and write fail, so py-libp2p drops the
    connection as lost. Returns how many sockets were closed. (py-libp2p has no public way to
    reach them: this walks its connection objects' attributes, a known chain of them.)
    """
    closed = 0
    for conn in conns if isinstance(conns, list | tuple) else [conns]:
        obj: Any = conn
        for _ in range(12):  # a short, bounded walk down the known wrappers
            if isinstance(obj, trio.SocketStream):
                with contextlib.suppress(OSError):
                    obj.socket.close()
                    closed += 1
                break
            nxt = next((getattr(obj, a) for a in _SOCKET_PATH if getattr(obj, a, None)), None)
            if nxt is None or nxt is obj:
                break
            obj = nxt
    return closed


def libp2p_key_pair(identity: Identity) -> KeyPair:
    private = Ed25519PrivateKey.new(identity.seed)
    return KeyPair(private, private.get_public_key())


def peer_id_of(public_key: bytes) -> str:
    """The libp2p peer id (base58) of a 32-byte Ed25519 public key."""
    if len(public_key) != 32:
        raise UsageError("an Ed25519 public key is 32 bytes")
    return str(ID.from_pubkey(Ed25519PublicKey.from_bytes(public_key)))


def public_key_of(peer_id: str) -> bytes:
    """The 32-byte Ed25519 public key inside a peer id; UsageError if it holds none."""
    try:
        key = ID.from_base58(peer_id).extract_public_key()
    except (ValueError, KeyError) as err:
        raise UsageError(f"not a peer id: {peer_id!r}") from err
    if not isinstance(key, Ed25519PublicKey):
        raise UsageError(f"peer id {peer_id} does not embed an Ed25519 key")
    raw: bytes = key.to_bytes()
    return raw


def build_host(
    identity: Identity,
    listen_addrs: Sequence[str],
    *,
    gate: PeerGate,
    limits: HostLimits,
    mdns: bool = False,
) -> BasicHost:
    """A py-libp2p host speaking Noise + Yamux only, with the gate in its swarm."""
    key_pair = libp2p_key_pair(identity)
    peer_id = ID.from_pubkey(key_pair.public_key)
    addrs = [multiaddr.Multiaddr(a) for a in listen_addrs]
    secure: Any = {
        TProtocol(NOISE_PROTOCOL_ID): NoiseTransport(
            key_pair, noise_privkey=new_x25519_key_pair().private_key
        )
    }
    muxers: Any = {TProtocol(YAMUX_PROTOCOL_ID): Yamux}
    upgrader = TransportUpgrader(
        secure_transports_by_protocol=secure,
        muxer_transports_by_protocol=muxers,
        negotiate_timeout=int(limits.upgrade_timeout),
    )
    transports: list[Any] = []
    if any(_is_ws(a) for a in addrs):
        from libp2p.transport.websocket.transport import WebsocketTransport

        transports.append(WebsocketTransport(upgrader))
    if any(not _is_ws(a) for a in addrs) or not addrs:
        transports.insert(0, TCP())
    config = ConnectionConfig(
        max_connections=limits.max_connections,
        high_watermark=limits.max_connections,
        low_watermark=min(100, limits.max_connections),
        min_connections=0,
        max_connections_per_peer=1,
        dial_timeout=limits.dial_timeout,
        inbound_upgrade_timeout=limits.upgrade_timeout,
        outbound_upgrade_timeout=limits.upgrade_timeout,
        outbound_stream_protocol_negotiation_timeout=limits.stream_negotiation_timeout,
        inbound_stream_protocol_negotiation_timeout=limits.stream_negotiation_timeout,
    )
    peerstore = PeerStore()
    peerstore.add_key_pair(peer_id, key_pair)
    swarm = GatedSwarm(
        peer_id,
        peerstore,
        upgrader,
        transports=transports,
        connection_config=config,
        transport_manager=TransportManager(port_demuxers={}),
    )
    swarm.gate = gate
    resource_manager = new_resource_manager()
    swarm.set_resource_manager(resource_manager)
    # mDNS announces this host on the LAN: off unless asked for.
    return BasicHost(network=swarm, resource_manager=resource_manager, enable_mDNS=mdns)


def _is_ws(addr: multiaddr.Multiaddr) -> bool:
    names = {p.name for p in addr.protocols()}
    return "ws" in names or "wss" in names


class ConnectionEvents(INotifee):
    """Calls ``on_connected(peer_id)`` hooks when a connection to a peer opens.

    Hooks are plain functions run inside the swarm's notification: they must not block
    (start a task, or feed a bounded channel, for real work).
    """

    def __init__(self) -> None:
        self.on_connected: list[Callable[[str], None]] = []

    async def connected(self, network: Any, conn: Any) -> None:
        peer = str(conn.muxed_conn.peer_id)
        for hook in list(self.on_connected):
            hook(peer)

    async def disconnected(self, network: Any, conn: Any) -> None:
        return None

    async def opened_stream(self, network: Any, stream: Any) -> None:
        return None

    async def closed_stream(self, network: Any, stream: Any) -> None:
        return None

    async def listen(self, network: Any, multiaddr: Any) -> None:
        return None

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        return None
