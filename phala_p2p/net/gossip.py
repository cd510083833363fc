"""GossipSub with signed envelopes, verdict validators, per-peer budgets and paced publishing.

What py-libp2p 0.8 gets wrong by default, and what this module does instead:

- heartbeat every 120 s: ours is 1 s, with the spec's mesh degrees (D=6, D_lo=4, D_hi=12);
- a 10 msg/s "spam protection" that also drops our own publishes: off, replaced by a token
  bucket per forwarding peer (messages and bytes) whose drops are counted;
- a 32-slot per-peer send queue that drops silently: publishing waits while any subscribed
  peer's queue is above a high-water mark, and fails with PublishError after a deadline, so
  a publish either goes out or the caller knows; relay drops are counted;
- one RPC written per queued message: what waits in a peer's queue goes out merged in one
  RPC (a receiver reads one RPC per turn of its event loop), and the queue holds 64;
- a 32-slot subscription channel that drops with a log line: subscribers get their own
  bounded buffers, and overflow is counted;
- boolean validators: ours return ACCEPT / REJECT / IGNORE with a reason; REJECT
  penalises the forwarding peer, and repeated offenders are disconnected and denied;
- "adaptive gossip" stretches the heartbeat to 30-60 s whenever it rates the mesh below
  its target degree (under 7 peers, or after a partition): off, so meshes are repaired and
  the message cache shifts every second;
- GossipSub v1.2's IDONTWANT path loses messages under bursts: we speak v1.1 (the
  scoring-era spec our parameters come from) until py-libp2p fixes it.

Every payload is an envelope (``phala_p2p.wire.envelope``) signed by its author for the
topic it is published on, checked for replays and clock skew before any topic validator.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import weakref
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import trio
from google.protobuf.message import DecodeError
from libp2p.exceptions import BaseLibp2pError
from libp2p.network.stream.exceptions import StreamClosed, StreamReset
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.varint import encode_uvarint

from phala_p2p.crypto.identity import Identity
from phala_p2p.errors import ProtocolViolation, PublishError, UsageError
from phala_p2p.net.host import PeerGate, peer_id_of
from phala_p2p.net.locks import KeyedLocks
from phala_p2p.net.metrics import Metrics
from phala_p2p.wire.envelope import Envelope, ReplayGuard, SeqnoCounter, open_envelope, seal

logger = logging.getLogger(__name__)

KIND_RAW = 0  # an application's own bytes, published with node.publish()


class Verdict(enum.Enum):
    ACCEPT = "accept"
    REJECT = "reject"  # invalid: the forwarding peer is penalised
    IGNORE = "ignore"  # not for us or not now: dropped without penalty


@dataclass(frozen=True)
class Validation:
    verdict: Verdict
    reason: str = ""

    @classmethod
    def accept(cls) -> Validation:
        return cls(Verdict.ACCEPT)

    @classmethod
    def reject(cls, reason: str) -> Validation:
        return cls(Verdict.REJECT, reason)

    @classmethod
    def ignore(cls, reason: str) -> Validation:
        return cls(Verdict.IGNORE, reason)


ACCEPT = Validation.accept()


@dataclass(frozen=True)
class GossipMessage:
    """A validated gossip message as subscribers see it."""

    topic: str
    data: bytes  # the bytes the author published
    sender: str  # the author's peer id (the envelope's signer)
    kind: int
    seqno: int
    time_ms: int
    forwarder: str  # the peer that handed it to us
    envelope: bytes = field(default=b"", repr=False)  # the signed bytes, as relay() takes them


Validator = Callable[[GossipMessage], Validation]


@dataclass(frozen=True)
class GossipConfig:
    """GossipSub parameters and our own budgets. Frozen and validated."""

    degree: int = 6
    degree_low: int = 4
    degree_high: int = 12
    heartbeat_interval: int = 1
    max_message_size: int = 1 << 20
    # per forwarding peer: a token bucket in messages and one in bytes
    peer_msgs_per_s: float = 2_000.0
    peer_msgs_burst: float = 5_000.0
    peer_bytes_per_s: float = 64 * 1024 * 1024
    peer_bytes_burst: float = 128 * 1024 * 1024
    # replay protection
    max_future_skew_ms: int = 30_000
    max_age_ms: int = 120_000
    # penalties: this many REJECTs inside the window gets a peer disconnected and denied
    penalty_threshold: int = 5
    penalty_window_s: float = 60.0
    ban_seconds: float = 120.0
    # publishing: wait while a subscribed peer's send queue holds more than this (of 32)
    queue_high_water: int = 16
    publish_timeout: float = 10.0
    subscription_buffer: int = 4096

    def __post_init__(self) -> None:
        if not 1 <= self.degree_low <= self.degree <= self.degree_high:
            raise UsageError("gossip degrees must satisfy 1 <= D_lo <= D <= D_hi")
        if self.heartbeat_interval < 1:
            raise UsageError("heartbeat_interval is whole seconds, at least 1")
        if not 64 <= self.max_message_size <= 1 << 20:
            raise UsageError("max_message_size must be in [64 B, 1 MiB] (GossipSub's RPC cap)")
        if not 1 <= self.queue_high_water <= 28:
            raise UsageError("queue_high_water must be in [1, 28]")
        for name in (
            "peer_msgs_per_s",
            "peer_msgs_burst",
            "peer_bytes_per_s",
            "peer_bytes_burst",
            "publish_timeout",
            "penalty_window_s",
            "ban_seconds",
        ):
            if not getattr(self, name) > 0:
                raise UsageError(f"{name} must be positive")
        if self.penalty_threshold < 1 or self.subscription_buffer < 1:
            raise UsageError("penalty_threshold and subscription_buffer must be at least 1")


class Subscription:
    """A bounded stream of validated messages on one topic; an async iterator."""

    def __init__(self, topic: str, buffer: int, on_close: Callable[[Subscription], None]) -> None:
        self.topic = topic
        self._send, self._recv = trio.open_memory_channel[GossipMessage](buffer)
        self._on_close = on_close
        self.dropped = 0

    def _offer(self, msg: GossipMessage) -> bool:
        try:
            self._send.send_nowait(msg)
            return True
        except trio.WouldBlock:
            self.dropped += 1
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return False

    async def receive(self) -> GossipMessage:
        return await self._recv.receive()

    def receive_nowait(self) -> GossipMessage:
        return self._recv.receive_nowait()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> GossipMessage:
        try:
            return await self._recv.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def close(self) -> None:
        self._send.close()
        self._on_close(self)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class _Bucket:
    __slots__ = ("level", "stamp")

    def __init__(self, level: float, stamp: float) -> None:
        self.level = level
        self.stamp = stamp

    def take(self, amount: float, rate: float, burst: float, now: float) -> bool:
        self.level = min(burst, self.level + (now - self.stamp) * rate)
        self.stamp = now
        if self.level >= amount:
            self.level -= amount
            return True
        return False


class _Pubsub(Pubsub):
    """Pubsub that hands validated messages to our dispatcher instead of 32-slot channels,
    and never lets two tasks write to one peer stream at once.

    py-libp2p writes RPCs to a peer's stream from its send-queue task and, directly, from
    the tasks that replay recent messages to a new subscriber. Yamux splits a write larger
    than the send window into several frames, so two concurrent writers could interleave
    frames and break the reader's varint framing for good. One lock per stream keeps each
    RPC contiguous. And our signed peer record goes only at the start of a stream, not in
    every RPC (see :func:`_without_sender_record`).
    """

    dispatch: Callable[[Any], None]

    on_bad_stream: Callable[[str, str], None]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opening = KeyedLocks[ID]()  # peers whose stream is being opened

    def notify_subscriptions(self, publish_message: Any) -> None:
        self.dispatch(publish_message)

    async def continuously_read_stream(self, stream: Any) -> None:
        # py-libp2p parses each RPC outside any error handling: a peer that writes bytes
        # that are not protobuf would end the task with DecodeError and, with it, the
        # node. Here the peer is penalised and its stream reset; nothing else is touched.
        try:
            await super().continuously_read_stream(stream)
        except RuntimeError as err:
            # py-libp2p 0.8 spawns a task per RPC into the pubsub service's nursery; a peer's
            # RPC that arrives while this node's pubsub shuts down meets a closed nursery.
            # The node is stopping: the stream simply ends. Anything else is a bug.
            if "closed to new arrivals" not in str(err):
                raise
        except DecodeError as err:
            self.on_bad_stream(str(stream.muxed_conn.peer_id), f"undecodable RPC: {err}")
            with trio.CancelScope(shield=True):
                try:
                    await stream.reset()
                except BaseLibp2pError:
                    pass

    async def _handle_new_peer(self, peer_id: ID) -> None:
        # py-libp2p starts one of these per connection event and per retry; two at once
        # for one peer both found it unregistered, both opened a stream and registered it,
        # and the first stream and its send task were left behind. One at a time per peer:
        # the second finds the peer registered and returns.
        async with self.opening.hold(peer_id):
            await super()._handle_new_peer(peer_id)
        queue = self.peer_queues.get(peer_id)
        pending = getattr(queue, "_queue", None)
        if pending is not None:  # room for what merged RPCs make a relay forward at once
            pending.max_size = SEND_QUEUE_RPCS

    async def handle_sending_messages(self, peer_id: ID, stream: Any, queue: Any) -> None:
        """py-libp2p's per-peer send loop, with the RPCs queued meanwhile merged into the one
        it writes (:func:`merge_queued`)."""
        limit = _batch_bytes(self)
        pending = getattr(queue, "_queue", None)  # py-libp2p's PriorityQueue, to peek
        try:
            while True:
                rpc = await queue.pop()
                if rpc is None:
                    return
                if pending is not None and len(pending):
                    rpc = merge_queued(rpc, pending, limit=limit)
                if not await self.write_msg(stream, rpc):
                    return
        except TRANSPORT_ERRORS as err:
            logger.debug("sending loop for %s ended: %r", peer_id, err)
            self._handle_dead_peer(peer_id)

    async def write_msg(self, stream: Any, rpc_msg: Any) -> bool:
        locks: weakref.WeakKeyDictionary[Any, trio.Lock] = self.__dict__.setdefault(
            "_stream_write_locks", weakref.WeakKeyDictionary()
        )
        lock = locks.get(stream)
        if lock is None:
            lock = locks[stream] = trio.Lock()
            data = rpc_msg.SerializeToString()  # the stream's first RPC: with our record
        else:
            data = _without_sender_record(rpc_msg)
        async with lock:
            try:
                await stream.write(encode_uvarint(len(data)) + data)
            except (StreamClosed, StreamReset):
                self._handle_dead_peer(stream.muxed_conn.peer_id)
                return False
            return True


TRANSPORT_ERRORS: Final = (
    BaseLibp2pError,
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
)
"""What a peer's stream can fail with: the peer is gone, the others are bugs to see."""
MERGE_RPC_MESSAGES: Final = 16
"""At most this many messages in one RPC made of queued ones (:func:`merge_queued`)."""
SEND_QUEUE_RPCS: Final = 64
"""RPCs a peer's send queue holds (py-libp2p: 32). A relay forwards a merged RPC's messages
at once, up to ``MERGE_RPC_MESSAGES`` per peer it came from; our own publishing stops at
``queue_high_water`` (16), so 48 slots are left for that, three merged RPCs' worth."""


def _batch_bytes(pubsub: Pubsub) -> int:
    """Bytes of messages we put in one RPC (replays, merged RPCs): REPLAY_RPC_BYTES, or half
    of a peer's RPC cap (peers run our limits), leaving room for the RPC's own framing."""
    return min(REPLAY_RPC_BYTES, pubsub.max_inbound_rpc_size // 2)


def merge_queued(first: Any, pending: Any, *, limit: int) -> Any:
    """``first`` with the RPCs waiting behind it in ``pending`` (py-libp2p's per-peer
    PriorityQueue) merged in, in queue order, while the result stays within ``limit`` bytes
    and ``MERGE_RPC_MESSAGES`` messages; the merged ones leave the queue.

    A receiver reads one RPC per turn of its event loop and spawns a task per message in
    it. With one RPC per message, a node busy with a burst of new connections took one
    message per turn from each peer: after a 20-miner heal, adverts arrived about 200 ms
    apart, hop after hop. Merged, they move together. The message cap bounds what one RPC
    makes the receiver forward at once (``SEND_QUEUE_RPCS``). Queued RPCs
    may be shared with other peers' queues: they are copied, never changed.
    """
    size, messages = first.ByteSize(), len(first.publish)
    merged = None
    while True:
        if pending._priority:
            nxt = pending._priority[0]
        elif pending._non_priority:
            nxt = pending._non_priority[0]
        else:
            break
        extra = nxt.ByteSize()
        if size + extra > limit or messages + len(nxt.publish) > MERGE_RPC_MESSAGES:
            break
        pending.pop()
        if merged is None:
            merged = rpc_pb2.RPC()
            merged.CopyFrom(first)
        merged.MergeFrom(nxt)
        size += extra
        messages += len(nxt.publish)
    return first if merged is None else merged


def _without_sender_record(rpc_msg: Any) -> bytes:
    """``rpc_msg`` serialized without the signed peer record py-libp2p puts in every RPC.

    The receiver verifies that record (an Ed25519 signature and a protobuf envelope) on
    each RPC that carries one; it cannot change within a stream, so it goes in a stream's
    first RPC only (go-libp2p sends none). The message may be shared with other peers'
    queues: it is left as it was.
    """
    if not rpc_msg.HasField("senderRecord"):
        return rpc_msg.SerializeToString()  # type: ignore[no-any-return]
    record = rpc_msg.senderRecord
    rpc_msg.ClearField("senderRecord")
    try:
        return rpc_msg.SerializeToString()  # type: ignore[no-any-return]
    finally:
        rpc_msg.senderRecord = record


REPLAY_RPC_BYTES: Final = 64 * 1024
"""At most this many bytes of messages per RPC when the message cache is replayed to a
new subscriber (less when ``max_message_size`` is small; a larger message goes alone)."""


class _GossipSub(GossipSub):
    """GossipSub whose send-queue drops are counted instead of only logged."""

    on_drop: Callable[[str], None]
    is_connected: Callable[[str], bool] | None = None

    async def send_recent_messages(self, peer_id: ID, topic: str) -> None:
        # py-libp2p replays its message cache to a new subscriber one RPC per message
        # (after a heal: every fresh advert, on each new connection). Here they go in
        # RPCs of up to REPLAY_RPC_BYTES: one frame to write and parse, not one each.
        pubsub = self.pubsub
        if pubsub is None or peer_id not in pubsub.peers:
            return
        stream = pubsub.peers[peer_id]
        limit = _batch_bytes(pubsub)
        batch: list[Any] = []
        size = 0
        for mid in self.mcache.window(topic):
            msg = self.mcache.get(mid)
            if msg is None:
                continue
            if self.scorer is not None and not self.scorer.allow_publish(
                peer_id, list(msg.topicIDs)
            ):
                continue
            msg_size = msg.ByteSize()
            if batch and size + msg_size > limit:
                if not await pubsub.write_msg(stream, rpc_pb2.RPC(publish=batch)):
                    return
                batch, size = [], 0
            batch.append(msg)
            size += msg_size
        if batch:
            await pubsub.write_msg(stream, rpc_pb2.RPC(publish=batch))

    def _handle_dropped_rpc(self, peer_id: ID, rpc: Any, reason: str) -> None:
        if len(rpc.publish):
            gone = self.is_connected is not None and not self.is_connected(str(peer_id))
            # a queue to a peer whose connection is closed is not a publish we lost
            self.on_drop("peer_gone" if gone else reason)
        super()._handle_dropped_rpc(peer_id, rpc, reason)


RELAY_MARGIN_MS: Final = 10_000


def _message_id(msg: Any) -> bytes:
    # Content-addressed: an envelope is unique per (signer, seqno), so its hash is too.
    return hashlib.blake2b(bytes(msg.data), digest_size=20).digest()


REANNOUNCE_EVERY = 5
"""Seconds between the repeats of our subscriptions to every peer, after the first three."""

STREAM_REPAIR_TIMEOUT = 10.0
"""Seconds a repair keeps trying to open a connected peer's pubsub stream."""
STREAM_REPAIR_BACKOFF = 30.0
"""Seconds before a peer whose repair failed (it may not speak pubsub) is tried again."""


class GossipService:
    """Signed-envelope gossip for one node."""

    def __init__(
        self,
        host: Any,
        identity: Identity,
        gate: PeerGate,
        metrics: Metrics,
        config: GossipConfig,
        *,
        clock_ms: Callable[[], int],
        disconnect: Callable[[str], Awaitable[None]],
        connected: Callable[[str], bool] | None = None,
    ) -> None:
        self._host = host
        self._identity = identity
        self._peer_id = peer_id_of(identity.public_key)
        self._gate = gate
        self._metrics = metrics
        self.config = config
        self._clock_ms = clock_ms
        self._disconnect = disconnect
        # whether a peer still has an open connection: py-libp2p keeps a peer whose
        # connection went silent (and its full send queue) until the connection is closed
        self._connected = connected
        self._replay = ReplayGuard(
            max_future_skew_ms=config.max_future_skew_ms, max_age_ms=config.max_age_ms
        )
        self._seqno = SeqnoCounter(clock_ms() * 1_000_000)
        self._validators: dict[str, Validator] = {}
        self._subs: dict[str, list[Subscription]] = {}
        self._joined: set[str] = set()
        self._buckets: OrderedDict[str, tuple[_Bucket, _Bucket]] = OrderedDict()
        self._penalties: dict[str, deque[float]] = {}
        self._validated: OrderedDict[bytes, GossipMessage] = OrderedDict()
        self._publish_lock = trio.Lock()
        self._relays: OrderedDict[bytes, None] = OrderedDict()  # ids relay() is sending
        self._announced: dict[ID, int] = {}
        self._streamless: set[ID] = set()  # connected, no pubsub stream, at the last tick
        self._repairing: set[ID] = set()
        self._repair_after: dict[ID, float] = {}
        self._punish_send, self._punish_recv = trio.open_memory_channel[str](256)
        self.router = _GossipSub(
            # /meshsub/1.1.0 only: py-libp2p 0.8.1's 1.2 (IDONTWANT) path stalls delivery
            # under bursts (measured: a third of a 200-message burst never arrives).
            protocols=[PROTOCOL_ID_V11],
            degree=config.degree,
            degree_low=config.degree_low,
            degree_high=config.degree_high,
            heartbeat_interval=config.heartbeat_interval,
            heartbeat_initial_delay=0.1,
            spam_protection_enabled=False,
            eclipse_protection_enabled=False,
            adaptive_gossip_enabled=False,  # see the module docstring
        )
        self.router.on_drop = self._on_relay_drop
        self.router.is_connected = connected
        self.pubsub = _Pubsub(
            host,
            self.router,
            strict_signing=False,  # the envelope carries the author's signature
            msg_id_constructor=_message_id,
            seen_ttl=600,
            cache_size=4096,
            max_inbound_rpc_size=config.max_message_size + 4096,
        )
        self.pubsub.dispatch = self._dispatch
        self.on_activity: Callable[[str], None] | None = None  # a peer sent us a message
        self.pubsub.on_bad_stream = self._on_bad_stream

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self.pubsub), background_trio_service(self.router):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._punisher)
                nursery.start_soon(self._reannounce)
                await self.pubsub.wait_until_ready()
                task_status.started()
                await trio.sleep_forever()

    async def _reannounce(self) -> None:
        """Every second: open missing pubsub streams (:meth:`_repair_streams`), and repeat
        our subscriptions to each new peer a few times.

        py-libp2p announces a subscription to the peers it has at that moment and sends
        the topic list in its hello to peers added later; a peer whose stream is being set
        up in between hears neither (measured: in a 10-node devnet some pairs never learn
        each other's topics). Three repeats, a second apart, close that window; after that,
        one every REANNOUNCE_EVERY seconds repairs what still slipped through (a few bytes
        per peer). A repeated subscription is idempotent for the receiver.
        """
        ticks = 0
        async with trio.open_nursery() as repairs:
            while True:
                await trio.sleep(1.0)
                ticks += 1
                self._repair_streams(repairs)
                self._announce(ticks)

    def _announce(self, ticks: int) -> None:
        if ticks % REANNOUNCE_EVERY == 0:
            self._announced = {p: min(n, 2) for p, n in self._announced.items()}
        peers = set(self.pubsub.peers)
        for gone in set(self._announced) - peers:
            del self._announced[gone]
        if not self._joined:
            return
        rpc = rpc_pb2.RPC(
            subscriptions=[
                rpc_pb2.RPC.SubOpts(subscribe=True, topicid=t) for t in sorted(self._joined)
            ]
        )
        for peer in peers:
            done = self._announced.get(peer, 0)
            queue = self.pubsub.peer_queues.get(peer)
            if done < 3 and queue is not None and queue.push(rpc, priority=True):
                self._announced[peer] = done + 1

    def _repair_streams(self, nursery: trio.Nursery) -> None:
        """Open the pubsub stream of a connected peer that has none, two ticks running.

        py-libp2p opens a peer's stream when a connection arrives and forgets the peer when
        that stream dies; a connection that replaces another (a redial, a simultaneous
        connect) can leave both sides connected with no stream either way, and nothing
        retries (measured: about 1 devnet in 15 under load, two nodes that never learn each
        other's topics). go-libp2p's pubsub reacts to every connection; this repairs the rest.
        """
        now = trio.current_time()
        network = self._host.get_network()
        opening = self.pubsub.opening
        streamless = {
            peer
            for peer in list(network.connections)
            if peer not in self.pubsub.peers
            and peer not in opening  # py-libp2p is still at it
            and (self._connected is None or self._connected(str(peer)))
        }
        for peer in (streamless & self._streamless) - self._repairing:
            if self._repair_after.get(peer, 0.0) <= now:
                self._repairing.add(peer)
                nursery.start_soon(self._repair_stream, peer)
        self._streamless = streamless
        for peer in [p for p, t in self._repair_after.items() if t <= now]:
            del self._repair_after[peer]

    async def _repair_stream(self, peer: ID) -> None:
        try:
            if peer in self.pubsub.peers or peer in self.pubsub.opening:
                return  # py-libp2p got there after all
            if await self.pubsub.ensure_peer_stream(peer, timeout=STREAM_REPAIR_TIMEOUT):
                self._metrics.count("gossip_streams_repaired")
                logger.debug("opened the missing pubsub stream to %s", peer)
            else:
                self._repair_after[peer] = trio.current_time() + STREAM_REPAIR_BACKOFF
        except TRANSPORT_ERRORS as err:  # a peer that went away mid-repair, say
            logger.debug("pubsub stream repair for %s failed: %r", peer, err)
            self._repair_after[peer] = trio.current_time() + STREAM_REPAIR_BACKOFF
        finally:
            self._repairing.discard(peer)

    # -- topics, validators, subscriptions -------------------------------------------------

    def set_validator(self, topic: str, validator: Validator) -> None:
        """Install the topic's validator (one per topic), run after envelope checks."""
        _check_topic(topic)
        self._validators[topic] = validator
        self.pubsub.set_topic_validator(topic, self._make_libp2p_validator(topic), False)

    async def _join(self, topic: str) -> None:
        if topic not in self._joined:
            self._joined.add(topic)
            if topic not in self.pubsub.topic_validators:
                self.pubsub.set_topic_validator(topic, self._make_libp2p_validator(topic), False)
            await self.pubsub.subscribe(topic)
            self._announced.clear()  # tell every peer again about the new topic

    async def subscribe(self, topic: str, *, buffer: int | None = None) -> Subscription:
        _check_topic(topic)
        sub = Subscription(topic, buffer or self.config.subscription_buffer, self._forget)
        self._subs.setdefault(topic, []).append(sub)
        await self._join(topic)
        return sub

    def _forget(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.topic, [])
        if sub in subs:
            subs.remove(sub)

    def mesh_peers(self, topic: str) -> set[str]:
        return {str(p) for p in self.router.mesh.get(topic, set())}

    def topic_peers(self, topic: str) -> set[str]:
        return {str(p) for p in self.pubsub.peer_topics.get(topic, set())}

    # -- publishing ------------------------------------------------------------------------

    async def publish(self, topic: str, data: bytes, *, kind: int = KIND_RAW) -> None:
        """Sign ``data`` for ``topic`` and send it; PublishError if it cannot go out."""
        await self._send(topic, self.seal(topic, data, kind=kind))
        self._metrics.count("published", topic=topic)

    def seal(self, topic: str, data: bytes, *, kind: int = KIND_RAW) -> bytes:
        """The envelope :meth:`publish` would send: for a caller that keeps it (to serve it
        later, say) and sends it with :meth:`relay`."""
        _check_topic(topic)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise UsageError("publish takes bytes")
        envelope = seal(
            self._identity,
            domain=topic,
            kind=kind,
            body=bytes(data),
            seqno=self._seqno.next(),
            time_ms=self._clock_ms(),
        )
        if len(envelope) > self.config.max_message_size:
            raise UsageError(
                f"message of {len(data)} bytes is over the gossip cap of "
                f"{self.config.max_message_size} bytes: use a request or a stream"
            )
        return envelope

    async def relay(self, topic: str, envelope: bytes) -> bool:
        """Send a signed envelope on, byte for byte: another author's
        (``GossipMessage.envelope``), or our own from :meth:`seal`.

        For what gossip does not backfill: a node that learned a message by request (after a
        partition, say) hands it to the peers that missed it. Message ids are the envelope's
        hash, so a relay is the author's own message everywhere: a peer that has seen it
        drops the copy unvalidated, and it spreads like the original. The caller vouches
        for the content: our own validator does not see it, nor do our own subscribers.
        Returns False, counted as
        ``relay_skipped``, when we have sent or seen it already or it is too old for peers to
        take (``max_age_ms``, less a margin for the trip). ProtocolViolation if it is not an
        envelope for ``topic``; PublishError as for :meth:`publish`.
        """
        return await self.relay_many(topic, [envelope], strict=True) == 1

    async def relay_many(
        self, topic: str, envelopes: Sequence[bytes], *, strict: bool = False
    ) -> int:
        """:meth:`relay` for several envelopes at once: one wait for room in the send
        queues for them all, not one each (a node that learned a dozen adverts from one
        pull sends them on in one go). Returns how many were sent; one that is not an
        envelope for ``topic`` is skipped and counted (``relay_skipped``, its reason), or
        with ``strict`` raises ProtocolViolation before anything is sent."""
        _check_topic(topic)
        fresh: list[bytes] = []
        batch: set[bytes] = set()
        for raw in envelopes:
            envelope = bytes(raw)
            try:
                env = open_envelope(envelope, domain=topic, max_size=self.config.max_message_size)
            except ProtocolViolation as err:
                if strict:
                    raise
                self._metrics.count("relay_skipped", reason=err.reason)
                continue
            if env.time_ms < self._clock_ms() - self.config.max_age_ms + RELAY_MARGIN_MS:
                self._metrics.count("relay_skipped", reason="too_old")
                continue
            msg_id = hashlib.blake2b(envelope, digest_size=20).digest()
            if self.pubsub.seen_messages.has(msg_id) or msg_id in batch:
                self._metrics.count("relay_skipped", reason="seen")
                continue
            self._relays[msg_id] = None
            batch.add(msg_id)
            fresh.append(envelope)
        while len(self._relays) > 1024:
            self._relays.popitem(last=False)
        if fresh:
            await self._send_all(topic, fresh)
            self._metrics.count("relayed", len(fresh), topic=topic)
        return len(fresh)

    async def _send(self, topic: str, envelope: bytes) -> None:
        await self._send_all(topic, [envelope])

    async def _send_all(self, topic: str, envelopes: Sequence[bytes]) -> None:
        await self._join(topic)
        async with self._publish_lock:
            await self._wait_for_room(topic)
            drops_before = self._metrics.get("dropped", reason="queue_full")
            for envelope in envelopes:
                await self.pubsub.publish(topic, envelope)
            if self._metrics.get("dropped", reason="queue_full") != drops_before:
                raise PublishError(f"a send queue overflowed while publishing on {topic}")

    async def _wait_for_room(self, topic: str) -> None:
        deadline = trio.current_time() + self.config.publish_timeout
        delay = 0.0005
        while True:
            full = self._full_peers(topic)
            if not full:
                return
            if trio.current_time() >= deadline:
                self._metrics.count("publish_failed", topic=topic)
                raise PublishError(
                    f"send queue to {len(full)} peer(s) on {topic} stayed full for "
                    f"{self.config.publish_timeout}s: {sorted(full)[:3]}"
                )
            # py-libp2p's queue has no "drained" event to wait on: poll, backing off.
            await trio.sleep(delay)
            delay = min(delay * 2, 0.01)

    def _full_peers(self, topic: str) -> list[str]:
        interested = self.pubsub.peer_topics.get(topic, set())
        full = []
        for peer in interested:
            queue = self.pubsub.peer_queues.get(peer)
            if queue is not None and len(queue) >= self.config.queue_high_water:
                if self._connected is not None and not self._connected(str(peer)):
                    continue  # a connection already closed: nothing will drain that queue
                full.append(str(peer))
        return full

    def _on_relay_drop(self, reason: str) -> None:
        self._metrics.count("dropped", reason=reason)

    # -- validation ------------------------------------------------------------------------

    def _make_libp2p_validator(self, topic: str) -> Callable[[ID, Any], bool]:
        def validate(forwarder: ID, msg: Any) -> bool:
            return self._validate(topic, str(forwarder), msg)

        return validate

    def _validate(self, topic: str, forwarder: str, msg: Any) -> bool:
        own = forwarder == self._peer_id
        if own and self._relays:
            msg_id = _message_id(msg)
            if msg_id in self._relays:
                del self._relays[msg_id]
                return True  # relay(): validated by the caller, delivered to us already
        if not own and self.on_activity is not None:
            self.on_activity(forwarder)
        if len(msg.topicIDs) != 1:
            return self._verdict(topic, forwarder, Validation.reject("multi_topic"), own)
        data = bytes(msg.data)
        try:
            env = open_envelope(data, domain=topic, max_size=self.config.max_message_size)
        except ProtocolViolation as err:
            return self._verdict(topic, forwarder, Validation.reject(err.reason), own)
        if not own and not self._within_budget(forwarder, len(data)):
            self._metrics.count("dropped", reason="rate_limited")
            return False
        replay = self._replay.check(env, self._clock_ms())
        if replay is not None:
            verdict = (
                Validation.ignore(str(replay))
                if replay.value == "too_old"
                else Validation.reject(str(replay))
            )
            return self._verdict(topic, forwarder, verdict, own)
        message = _to_message(topic, env, forwarder, data)
        validator = self._validators.get(topic)
        result = validator(message) if validator is not None else ACCEPT
        if result.verdict is Verdict.ACCEPT:
            self._validated[_message_id(msg)] = message
            while len(self._validated) > 8192:
                self._validated.popitem(last=False)
            return True
        return self._verdict(topic, forwarder, result, own)

    def _verdict(self, topic: str, forwarder: str, result: Validation, own: bool) -> bool:
        reason = result.reason or "unspecified"
        if result.verdict is Verdict.REJECT:
            self._metrics.count("rejected", reason=reason)
            logger.info("rejected gossip on %s from %s: %s", topic, forwarder, reason)
            if not own:
                self._penalise(forwarder)
        else:
            self._metrics.count("ignored", reason=reason)
        return False

    def _within_budget(self, peer: str, size: int) -> bool:
        now = trio.current_time()
        buckets = self._buckets.get(peer)
        if buckets is None:
            cfg = self.config
            buckets = (_Bucket(cfg.peer_msgs_burst, now), _Bucket(cfg.peer_bytes_burst, now))
            self._buckets[peer] = buckets
            while len(self._buckets) > 4096:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(peer)
        cfg = self.config
        msgs_ok = buckets[0].take(1, cfg.peer_msgs_per_s, cfg.peer_msgs_burst, now)
        return msgs_ok and buckets[1].take(size, cfg.peer_bytes_per_s, cfg.peer_bytes_burst, now)

    def _penalise(self, peer: str) -> None:
        now = trio.current_time()
        marks = self._penalties.setdefault(peer, deque())
        marks.append(now)
        while marks and marks[0] < now - self.config.penalty_window_s:
            marks.popleft()
        if len(marks) >= self.config.penalty_threshold:
            self._penalties.pop(peer, None)
            try:
                self._punish_send.send_nowait(peer)
            except trio.WouldBlock:
                self._gate.deny(peer, seconds=self.config.ban_seconds)

    def _on_bad_stream(self, peer: str, why: str) -> None:
        logger.info("gossip stream from %s broken: %s", peer, why)
        self._metrics.count("gossip_stream_errors")
        self._metrics.count("rejected", reason="malformed_rpc")
        # Garbage instead of protobuf is no accident: count it as a full offence.
        for _ in range(self.config.penalty_threshold):
            self._penalise(peer)

    def penalty_count(self, peer: str) -> int:
        return len(self._penalties.get(peer, ()))

    async def _punisher(self) -> None:
        async for peer in self._punish_recv:
            logger.warning("disconnecting and denying %s for repeated invalid gossip", peer)
            self._metrics.count("peers_banned")
            self._gate.deny(peer, seconds=self.config.ban_seconds)
            await self._disconnect(peer)

    # -- delivery --------------------------------------------------------------------------

    def _dispatch(self, msg: Any) -> None:
        message = self._validated.pop(_message_id(msg), None)
        if message is None:
            return
        subs = self._subs.get(message.topic, [])
        for sub in subs:
            if sub._offer(message):
                self._metrics.count("delivered", topic=message.topic)
            else:
                self._metrics.count("dropped", reason="subscriber_full")


def _to_message(topic: str, env: Envelope, forwarder: str, raw: bytes) -> GossipMessage:
    return GossipMessage(
        topic=topic,
        data=env.body,
        sender=peer_id_of(env.signer),
        kind=env.kind,
        seqno=env.seqno,
        time_ms=env.time_ms,
        forwarder=forwarder,
        envelope=raw,
    )


def _check_topic(topic: str) -> None:
    if not topic or len(topic) > 256 or not topic.isprintable():
        raise UsageError(f"not a topic name: {topic!r}")


__all__ = [
    "ACCEPT",
    "GossipConfig",
    "GossipMessage",
    "GossipService",
    "Subscription",
    "Validation",
    "Verdict",
]
