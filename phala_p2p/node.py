"""The Node: one host, one nursery, services composed by role.

``async with open_node(config) as node:`` is the whole lifecycle. Leaving the block stops
every task the node started, closes every connection and listener, and returns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import multiaddr
import multiaddr.exceptions
import trio
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr

from phala_p2p.chain.params import Genesis
from phala_p2p.config import NodeConfig, Role
from phala_p2p.crypto.identity import Identity
from phala_p2p.crypto.keyfile import load_or_create_identity, read_identity
from phala_p2p.errors import PeerUnreachable, UsageError
from phala_p2p.market.directory import Advert
from phala_p2p.market.negotiation import Agreement
from phala_p2p.net.dht import Dht
from phala_p2p.net.discovery import Discovery, PeerRecord
from phala_p2p.net.gossip import GossipMessage, GossipService, Subscription, Validation
from phala_p2p.net.health import HealthMonitor
from phala_p2p.net.host import (
    ConnectionEvents,
    PeerGate,
    abort_sockets,
    build_host,
    peer_id_of,
)
from phala_p2p.net.logs import tame_libp2p_loggers
from phala_p2p.net.metrics import Metrics, serve_prometheus
from phala_p2p.net.reqresp import Handler, ProtocolLimits, RequestResponse, StreamHandler
from phala_p2p.services.chain import STORE_FILE, ChainService, Wallet
from phala_p2p.services.jobs import JobResult, JobService, JobStream
from phala_p2p.services.keys import KeyService
from phala_p2p.services.market import MarketService
from phala_p2p.services.tee import TeeService, VerifiedMiner, verify_miner

logger = logging.getLogger(__name__)

DISCONNECT_GRACE_S = 2.0
"""How long a polite close may take before the sockets are simply closed."""


class Node:
    """A running peer. Create it with :func:`open_node`."""

    def __init__(self, config: NodeConfig, identity: Identity) -> None:
        self.config = config
        self.identity = identity
        self.role: Role = config.role
        self.peer_id: str = peer_id_of(identity.public_key)
        self.metrics = Metrics()
        self.gate = PeerGate()
        self.host: Any = build_host(
            identity,
            config.listen,
            gate=self.gate,
            limits=config.limits,
            mdns=config.discovery.mdns,
        )
        self._rr = RequestResponse(
            self.host, self.metrics, negotiation_timeout=config.limits.stream_negotiation_timeout
        )
        self.gossip = GossipService(
            self.host,
            identity,
            self.gate,
            self.metrics,
            config.gossip,
            clock_ms=lambda: int(time.time() * 1000),
            disconnect=self.disconnect,
            connected=self.is_connected,
        )
        self.health = HealthMonitor(
            self._rr,
            self.metrics,
            config.health,
            connected_peers=self.peers,
            disconnect=self.disconnect,
        )
        self.gossip.on_activity = self.health.saw
        self.discovery = Discovery(
            self._rr,
            self.metrics,
            self.gate,
            me=self._record,
            bootstrap=config.bootstrap,
            target_peers=config.discovery.target_peers,
            interval=config.discovery.interval,
            connected_peers=self.peers,
            dial=self.connect,
        )
        self.dht = Dht(self.host, server=config.role.dht_server)
        self.events = ConnectionEvents()
        self.host.get_network().register_notifee(self.events)
        self.discovery.on_role = self._on_role
        self.metrics.gauge("peers", lambda: len(self.peers()))
        self.metrics_port: int | None = None
        self.dashboard_url: str | None = None  # "http://HOST:PORT/" while one is served
        self._nursery: trio.Nursery | None = None
        self._chain: ChainService | None = None
        self.tee: TeeService | None = None
        if config.tee.wants_enclave(config.role):
            self.tee = TeeService(self, config.tee)
        elif config.role is Role.MINER:
            logger.warning("miner without an enclave: set [tee] dev_root_key")
        self.keys: KeyService | None = None
        self._market: MarketService | None = None
        self.jobs = JobService(self, config.jobs)
        if config.genesis is not None:
            self._chain = _open_chain(self, config)
            self.keys = KeyService(
                self, key_manager=config.role is Role.GATEKEEPER and config.tee.key_manager
            )
            self._market = MarketService(self, config.market)

    # -- chain -----------------------------------------------------------------------------

    @property
    def chain(self) -> ChainService:
        """This node's copy of the chain (``head``, ``block(h)``, ``state``)."""
        if self._chain is None:
            raise UsageError("this node keeps no chain: set `genesis` in its config")
        return self._chain

    @property
    def has_chain(self) -> bool:
        return self._chain is not None

    @property
    def account(self) -> bytes:
        """The account this node signs transactions with (its identity key by default)."""
        return self.chain.account

    @property
    def wallet(self) -> Wallet:
        return Wallet(self.chain)

    @property
    def market(self) -> MarketService:
        """Capacity adverts, the miner directory and negotiation."""
        if self._market is None:
            raise UsageError("this node keeps no chain, hence no market: set `genesis`")
        return self._market

    async def find_miners(self, *, wait: float = 0.0, **constraints: Any) -> list[Advert]:
        """Verified capacity adverts that meet ``constraints``, best first (see
        :meth:`MarketService.find_miners`)."""
        return await self.market.find_miners(wait=wait, **constraints)

    async def negotiate(self, miner: Advert | str, **terms: Any) -> Agreement:
        """Reach a co-signed agreement with ``miner`` (see :meth:`MarketService.negotiate`)."""
        return await self.market.negotiate(miner, **terms)

    async def run_job(self, module: bytes, input: bytes, **options: Any) -> JobResult:
        """Run a confidential job end to end (see :meth:`JobService.run_job`)."""
        self.market  # noqa: B018 (a UsageError without a chain)
        return await self.jobs.run_job(module, input, **options)

    async def run_job_stream(self, module: bytes, input: Any, **options: Any) -> JobResult:
        """Run a job with streamed input and output (see :meth:`JobService.run_job_stream`)."""
        self.market  # noqa: B018 (a UsageError without a chain)
        return await self.jobs.run_job_stream(module, input, **options)

    def open_job_stream(
        self, module: bytes, input: Any, **options: Any
    ) -> AbstractAsyncContextManager[JobStream]:
        """Run a job with its output as an async iterable (``async with ... as job: async
        for piece in job``; see :meth:`JobService.open_job_stream`)."""
        self.market  # noqa: B018 (a UsageError without a chain)
        return self.jobs.open_job_stream(module, input, **options)

    async def verify_miner(self, peer_id: str, *, timeout: float = 10.0) -> VerifiedMiner:
        """Attest ``peer_id``'s enclave ourselves (fresh quote over our nonce) and check it
        against the chain's policy and registry; AttestationError says what failed."""
        return await verify_miner(self, peer_id, timeout=timeout)

    def __repr__(self) -> str:
        name = f" {self.config.name}" if self.config.name else ""
        return f"<Node{name} {self.role.value} {self.peer_id[-8:]}>"

    # -- identity and addresses ------------------------------------------------------------

    @property
    def public_key(self) -> bytes:
        return self.identity.public_key

    @property
    def listen_addrs(self) -> list[str]:
        """Full multiaddrs others can dial, each ending in ``/p2p/<peer id>``."""
        return [str(a) for a in self.host.get_addrs()]

    def _record(self) -> PeerRecord:
        plain = [a.rsplit("/p2p/", 1)[0] for a in self.listen_addrs]
        return PeerRecord(self.peer_id, self.role.value, tuple(plain[:8]))

    # -- connections -----------------------------------------------------------------------

    def peers(self) -> list[str]:
        """Peer ids with an open connection."""
        return [
            str(p) for p, conns in list(self.host.get_network().connections.items()) if _live(conns)
        ]

    def is_connected(self, peer_id: str) -> bool:
        return _live(self.host.get_network().connections.get(ID.from_base58(peer_id)))

    async def connect(self, addr: str) -> str:
        """Dial a full multiaddr (with ``/p2p/<id>``); returns the peer id."""
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except (ValueError, multiaddr.exceptions.Error) as err:
            raise UsageError(f"not a dialable multiaddr with /p2p/<id>: {addr!r}") from err
        peer = str(info.peer_id)
        if peer == self.peer_id:
            raise UsageError("a node cannot connect to itself")
        if self.gate.is_denied(peer):
            raise PeerUnreachable(f"{peer} is denied by this node's gate")
        try:
            with trio.fail_after(self.config.limits.dial_timeout + 1):
                await self._dial(info)
        except trio.TooSlowError as err:
            raise PeerUnreachable(f"dialing {addr} timed out") from err
        except (BaseLibp2pError, OSError) as err:
            raise PeerUnreachable(f"cannot connect to {addr}: {err}") from err
        return peer

    async def _dial(self, info: Any) -> None:
        self.host.get_network().forget_closed(info.peer_id)  # else connect would not dial
        await self.host.connect(info)

    def _on_role(self, peer_id: str, role: str) -> None:
        if role in ("bootstrap", "gatekeeper") and self._nursery is not None:
            self._nursery.start_soon(self.dht.add_server, peer_id)

    async def find_peer(self, peer_id: str, *, timeout: float = 10.0) -> list[str]:
        """Dialable addresses of ``peer_id``: from what this node knows, else the DHT."""
        known = self.discovery.known.get(peer_id)
        if known is not None and known.addrs:
            return [f"{a}/p2p/{peer_id}" for a in known.addrs]
        return await self.dht.find_peer(peer_id, timeout=timeout)

    async def disconnect(self, peer_id: str) -> None:
        """Close every connection to ``peer_id``: politely for up to 2 s, then by closing its
        sockets (a peer whose network went silent never lets a polite close finish)."""
        peer = ID.from_base58(peer_id)
        # these, not a connection made meanwhile (a job resuming at once, say)
        listed = list(self.host.get_network().connections.get(peer) or [])
        network = self.host.get_network()
        with trio.CancelScope(shield=True):
            with trio.move_on_after(DISCONNECT_GRACE_S):
                for conn in listed:
                    network.cleanup_connection_health(peer, conn)
                    try:
                        await conn.close()
                    except (BaseLibp2pError, OSError) as err:
                        logger.debug("disconnect %s: %s", peer_id, err)
            # a close cut short may leave a connection marked closed on an open socket
            live = [c for c in listed if not getattr(c, "is_closed", False)]
            if abort_sockets(listed) and live:
                self.metrics.count("connections_aborted")
                logger.info("%s did not close in %ss: its sockets were closed", peer_id,
                            DISCONNECT_GRACE_S)  # fmt: skip

    # -- gossip ----------------------------------------------------------------------------

    async def publish(self, topic: str, data: bytes) -> None:
        """Sign and publish ``data`` on ``topic``; PublishError if it could not go out."""
        await self.gossip.publish(topic, data)

    def seal(self, topic: str, data: bytes) -> bytes:
        """The signed envelope :meth:`publish` would send, to keep and :meth:`relay`."""
        return self.gossip.seal(topic, data)

    async def relay(self, topic: str, envelope: bytes) -> bool:
        """Send a signed envelope (ours from :meth:`seal`, or another author's) unchanged;
        see :meth:`GossipService.relay`."""
        return await self.gossip.relay(topic, envelope)

    async def subscribe(self, topic: str, *, buffer: int | None = None) -> Subscription:
        """A bounded async iterator of validated messages on ``topic``."""
        return await self.gossip.subscribe(topic, buffer=buffer)

    def set_validator(self, topic: str, validator: Callable[[GossipMessage], Validation]) -> None:
        self.gossip.set_validator(topic, validator)

    # -- request-response and streams ------------------------------------------------------

    def serve(
        self,
        protocol: str,
        handler: Handler,
        *,
        max_request: int = 1 << 20,
        max_response: int = 1 << 20,
        handler_timeout: float = 30.0,
        max_streams_per_peer: int = 16,
    ) -> None:
        """Answer requests on ``protocol`` with ``async def handler(peer_id, request) -> bytes``."""
        self._rr.serve(
            protocol,
            handler,
            ProtocolLimits(
                max_request=max_request,
                max_response=max_response,
                handler_timeout=handler_timeout,
                max_streams_per_peer=max_streams_per_peer,
            ),
        )

    def serve_stream(
        self,
        protocol: str,
        handler: StreamHandler,
        *,
        max_message: int = 1 << 20,
        max_streams_per_peer: int = 16,
    ) -> None:
        """Hand each inbound stream on ``protocol`` (framed) to ``async def handler(stream)``."""
        self._rr.serve_stream(
            protocol,
            handler,
            ProtocolLimits(
                max_request=max_message,
                max_response=max_message,
                max_streams_per_peer=max_streams_per_peer,
                handler_timeout=1e9,
            ),
        )

    async def request(
        self,
        peer_id: str,
        protocol: str,
        payload: bytes,
        *,
        timeout: float = 10.0,
        max_response: int | None = None,
    ) -> bytes:
        """One request, one response, within ``timeout`` seconds; typed errors otherwise."""
        return await self._rr.request(
            peer_id, protocol, payload, timeout=timeout, max_response=max_response
        )

    def open_stream(self, peer_id: str, protocol: str, *, max_message: int = 1 << 20) -> Any:
        """``async with node.open_stream(peer, proto) as s:`` a framed stream for long exchanges."""
        return self._rr.open_stream(peer_id, protocol, max_message=max_message)

    # -- background work -------------------------------------------------------------------

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run a task in the node's nursery; it is cancelled when the node stops."""
        if self._nursery is None:
            raise UsageError("the node is not running")
        self._nursery.start_soon(fn, *args)

    async def _run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.gossip.run)
            await nursery.start(self.dht.run)
            if self._chain is not None:
                await nursery.start(self._chain.run)
            if self.tee is not None:
                await nursery.start(self.tee.run)
            if self.keys is not None:
                await nursery.start(self.keys.run)
            if self._market is not None:
                await nursery.start(self._market.run)
            await nursery.start(self.jobs.run)
            nursery.start_soon(self.health.run)
            nursery.start_soon(self.discovery.run)
            if self.config.metrics_port is not None:
                self.metrics_port = await nursery.start(
                    serve_prometheus,
                    self.metrics,
                    self.config.metrics_host,
                    self.config.metrics_port,
                )
            if self.config.dashboard is not None:
                # The dashboard sits above the node (it reads the node); imported here so
                # that a node without one does not load it.
                from phala_p2p.dashboard import serve_dashboard

                self.dashboard_url = await nursery.start(serve_dashboard, self)
            task_status.started()


@asynccontextmanager
async def open_node(config: NodeConfig | None = None) -> AsyncIterator[Node]:
    """Start a node, yield it, and stop it cleanly when the block ends."""
    config = config or NodeConfig()
    tame_libp2p_loggers()
    if config.data_dir is not None:
        identity = load_or_create_identity(config.data_dir)
    else:
        identity = Identity.generate()
    node = Node(config, identity)
    try:
        async with node.host.run([multiaddr.Multiaddr(a) for a in config.listen]):
            async with trio.open_nursery() as nursery:
                await nursery.start(node._run)
                logger.info("%s listening on %s", node, ", ".join(node.listen_addrs))
                try:
                    yield node
                finally:
                    nursery.cancel_scope.cancel()
                    node._nursery = None
            # Close connections while the host's background tasks still run, so every
            # transport (WebSocket included) shuts its sockets down properly.
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                async with trio.open_nursery() as closing:
                    for peer in node.peers():
                        closing.start_soon(node.disconnect, peer)
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await node.host.close()
    finally:
        if node._chain is not None:
            node._chain.close()


def _live(conns: Any) -> bool:
    """Whether a swarm's connection list holds an open connection (py-libp2p may keep a
    closed one listed for a while, and then opens no stream and dials nothing)."""
    if not conns:
        return False
    items = conns if isinstance(conns, list | tuple) else [conns]
    return any(not getattr(c, "is_closed", False) for c in items)


def _open_chain(node: Node, config: NodeConfig) -> ChainService:
    assert config.genesis is not None
    genesis = Genesis.from_toml(config.genesis)
    signer = node.identity if config.wallet_key is None else read_identity(config.wallet_key)
    store = ":memory:" if config.data_dir is None else config.data_dir / STORE_FILE
    if config.data_dir is not None:
        config.data_dir.mkdir(parents=True, exist_ok=True)
    return ChainService(node, genesis, config.chain, signer=signer, store_path=store)
