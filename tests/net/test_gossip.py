"""Gossip over a real devnet: delivery, partitions, validators and replay protection."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import libp2p.pubsub.pubsub as pubsub_module
import pytest
import trio
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.rpc_queue import PriorityQueue

from phala_p2p import Validation
from phala_p2p.config import NodeConfig
from phala_p2p.crypto.identity import Identity
from phala_p2p.errors import ProtocolViolation, UsageError
from phala_p2p.net.gossip import MERGE_RPC_MESSAGES, SEND_QUEUE_RPCS, merge_queued
from phala_p2p.testing import open_devnet, wait_until
from phala_p2p.wire.envelope import seal

TOPIC = "test/chat/1"


async def _meshed(net, topic: str, subs) -> None:  # type: ignore[no-untyped-def]
    """Wait until every node has its mesh on ``topic``."""
    nodes = net.nodes

    # Every node in a mesh of its own (D_low), knowing every other subscriber.
    def ready() -> bool:
        return all(len(n.gossip.topic_peers(topic)) == len(nodes) - 1 for n in nodes) and all(
            len(n.gossip.mesh_peers(topic)) >= min(4, len(nodes) - 1) for n in nodes
        )

    try:
        await wait_until(ready, 25, message="gossip mesh")
    except TimeoutError:
        print("topic peers", [len(n.gossip.topic_peers(topic)) for n in nodes])
        print("mesh peers", [len(n.gossip.mesh_peers(topic)) for n in nodes])
        raise


async def _burst(peers: int, count: int, deadline: float) -> None:
    async with open_devnet(peers=peers, seed=1) as net:
        subs = [await n.subscribe(TOPIC, buffer=count + 10) for n in net.nodes]
        await _meshed(net, TOPIC, subs)
        sender = net.nodes[0]
        payloads = [i.to_bytes(4, "big") + bytes(1020) for i in range(count)]
        received: list[set[bytes]] = [set() for _ in subs]

        async def drain(i: int) -> None:
            while len(received[i]) < len(payloads):
                msg = await subs[i].receive()
                assert msg.sender == sender.peer_id
                assert msg.topic == TOPIC
                received[i].add(msg.data)

        with trio.fail_after(deadline):
            async with trio.open_nursery() as n:
                for i in range(len(subs)):
                    n.start_soon(drain, i)
                for p in payloads:  # back to back: pacing is the library's job
                    await sender.publish(TOPIC, p)
        assert all(r == set(payloads) for r in received)
        assert sum(n.metrics.dropped for n in net.all_nodes) == 0
        assert sender.metrics.published == count


async def test_burst_reaches_every_subscriber() -> None:
    await _burst(peers=10, count=100, deadline=120)


@pytest.mark.slow  # ten nodes in one event loop: about 35 s (200 s before merged RPCs)
async def test_burst_of_1000_reaches_every_subscriber() -> None:
    await _burst(peers=10, count=1000, deadline=600)


async def test_partition_keeps_messages_on_their_side_and_heal_reforms_mesh() -> None:
    async with open_devnet(peers=10, seed=2) as net:
        subs = [await n.subscribe(TOPIC) for n in net.nodes]
        await _meshed(net, TOPIC, subs)
        left, right = net.nodes[:5], net.nodes[5:]
        await net.partition(left, right)
        for a in left:
            assert not set(a.peers()) & {b.peer_id for b in right}

        await left[0].publish(TOPIC, b"left side")
        await right[0].publish(TOPIC, b"right side")
        for i, n in enumerate(net.nodes):
            want = b"left side" if n in left else b"right side"
            with trio.fail_after(10):
                msg = await subs[i].receive()
            assert msg.data == want

        # ... and nothing crossed: within a second (many times the delivery time on
        # one side), no subscriber sees the other side's message.
        async def nothing_more(i: int) -> None:
            with trio.move_on_after(1.0):
                msg = await subs[i].receive()
                raise AssertionError(f"node {i} got {msg.data!r} across the partition")

        async with trio.open_nursery() as n:
            for i in range(len(subs)):
                n.start_soon(nothing_more, i)

        await net.heal()  # returns once the cut pairs are dialed again

        def reformed() -> bool:
            # every node knows all 9 others on the topic again and has a full mesh
            return all(
                len(n.gossip.topic_peers(TOPIC)) >= 9 and len(n.gossip.mesh_peers(TOPIC)) >= 4
                for n in net.nodes
            )

        await wait_until(reformed, 15, message="mesh across the healed cut")
        await left[1].publish(TOPIC, b"after heal")
        for sub in subs:
            with trio.fail_after(10):
                msg = await sub.receive()
                # GossipSub's message cache may still hand over the other side's
                # message once the mesh spans the cut again; nothing else may arrive.
                while msg.data != b"after heal":
                    assert msg.data in (b"left side", b"right side")
                    msg = await sub.receive()


async def test_heartbeat_keeps_its_interval_when_the_router_rates_the_network_poorly() -> None:
    """py-libp2p rates the network's health every 30 s and, when the mesh is below its
    target degree (any network under 7 peers, or one that lost peers to a partition),
    stretched the heartbeat to 30-60 s: the mesh was not re-formed and the gossip window
    did not move for a minute. Here the rating is made due at once (its 30 s timer is the
    only thing skipped) and both must still happen within a few heartbeats."""
    async with open_devnet(peers=3, seed=4) as net:
        subs = [await n.subscribe(TOPIC) for n in net.nodes]
        await _meshed(net, TOPIC, subs)
        routers = [n.gossip.router for n in net.nodes]
        for r in routers:
            r.last_health_update = 0  # the 30 s rating is due at the next heartbeat

        # the gossip window moves on: a message leaves it after 3 heartbeats (3 s)
        await net.nodes[0].publish(TOPIC, b"m")
        for sub in subs:
            with trio.fail_after(10):
                assert (await sub.receive()).data == b"m"
        await wait_until(lambda: not any(r.mcache.window(TOPIC) for r in routers), 8)

        # a node cut off from everyone has its mesh back within a few heartbeats of the heal
        lone, rest = net.nodes[:1], net.nodes[1:]
        await net.partition(lone, rest)
        await wait_until(lambda: not net.nodes[0].gossip.mesh_peers(TOPIC), 10)
        await net.heal()
        await wait_until(
            lambda: all(len(n.gossip.mesh_peers(TOPIC)) >= 2 for n in net.nodes),
            8,
            message="mesh after the heal",
        )


async def test_connected_peers_without_a_pubsub_stream_get_one_back() -> None:
    """py-libp2p can leave two connected nodes with no pubsub stream either way (a connection
    that replaced another): each forgot the other and nothing retried, so neither ever
    learned the other's topics. Here that state is made on purpose: each side forgets the
    other as py-libp2p's dead-peer path does, minus its retry (the old streams are left
    open, unused: resetting them would set off that retry). The connection stays up, and
    both nodes must hear each other's subscriptions again within a few seconds."""
    async with open_devnet(peers=3, seed=5) as net:
        a, b = net.nodes[0], net.nodes[1]
        subs = [await n.subscribe(TOPIC) for n in net.nodes]
        await _meshed(net, TOPIC, subs)
        for here, there in ((a, b), (b, a)):
            ps = here.gossip.pubsub
            peer = next(p for p in ps.peers if str(p) == there.peer_id)
            del ps.peers[peer]
            ps.peer_queues.pop(peer).close()
            ps.router.remove_peer(peer)
            ps._forget_all_subscriptions(peer)
        assert b.peer_id in a.peers()
        assert a.peer_id in b.peers()
        assert b.peer_id not in a.gossip.topic_peers(TOPIC)

        await wait_until(
            lambda: (
                b.peer_id in a.gossip.topic_peers(TOPIC)
                and a.peer_id in b.gossip.topic_peers(TOPIC)
            ),
            8,
            message="subscriptions over repaired streams",
        )
        assert a.metrics.get("gossip_streams_repaired") + b.metrics.get("gossip_streams_repaired")
        await a.publish(TOPIC, b"after repair")
        for sub in subs:
            with trio.fail_after(10):
                while (await sub.receive()).data != b"after repair":
                    pass


async def _publish_into_cache(sender, sub, *, count: int, size: int, at_least: int) -> None:  # type: ignore[no-untyped-def]
    """Publish ``count`` messages of ``size`` bytes on TOPIC, wait until ``sub`` has them,
    and until at least ``at_least`` are in the sender's cache window (3 heartbeats: on a
    loaded machine a slow delivery can miss it, and the messages are sent again)."""
    router = sender.gossip.pubsub.router
    for attempt in range(5):
        payloads = [bytes([attempt, i]) * (size // 2) for i in range(count)]
        for p in payloads:
            await sender.publish(TOPIC, p)
        got: set[bytes] = set()
        with trio.fail_after(10):
            while got != set(payloads):
                got.add((await sub.receive()).data)
        if len(router.mcache.window(TOPIC)) >= at_least:
            return
    raise AssertionError(f"fewer than {at_least} messages in the cache window after 5 tries")


async def test_a_cache_replay_goes_in_one_rpc_and_rpcs_carry_no_repeated_peer_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """py-libp2p replays its message cache to a new subscriber one RPC per message, and puts
    its signed peer record (which the receiver verifies) in every RPC. Here the replay is one
    RPC, and a record goes only at the start of a stream. Observed on the receiving side,
    by wrapping (not replacing) py-libp2p's record check, which sees every inbound RPC."""
    seen: list[tuple[str, str, int, bool]] = []  # receiver, sender, messages, with record
    original = pubsub_module.maybe_consume_signed_record

    def counting(msg: Any, host: Any, peer_id: Any) -> bool:
        seen.append(
            (str(host.get_id()), str(peer_id), len(msg.publish), msg.HasField("senderRecord"))
        )
        return bool(original(msg, host, peer_id))

    monkeypatch.setattr(pubsub_module, "maybe_consume_signed_record", counting)
    async with open_devnet(peers=3, seed=8) as net:
        a, d = net.nodes[0], net.nodes[2]
        subs = [await n.subscribe(TOPIC, buffer=64) for n in net.nodes]
        await _meshed(net, TOPIC, subs)
        router = a.gossip.pubsub.router
        await _publish_into_cache(a, subs[2], count=5, size=100, at_least=2)

        def from_a() -> list[tuple[str, str, int, bool]]:
            return [s for s in seen if s[0] == d.peer_id and s[1] == a.peer_id]

        before = len(from_a())
        assert sum(1 for s in from_a() if s[3]) <= 2  # the hello, and the first RPC after it
        assert before > 2  # subscriptions, control and the messages came after those

        peer = next(p for p in a.gossip.pubsub.peers if str(p) == d.peer_id)
        cached = len(router.mcache.window(TOPIC))
        await router.send_recent_messages(peer, TOPIC)
        await wait_until(
            lambda: sum(s[2] for s in from_a()[before:]) >= cached, 5, message="replay"
        )
        replayed = [s for s in from_a()[before:] if s[2]]
        assert len(replayed) == 1, replayed  # every cached message in one RPC
        assert not any(s[3] for s in from_a()[before:])  # and no peer record again


async def test_a_cache_replay_fits_the_receivers_rpc_cap() -> None:
    """With a small ``max_message_size`` a peer takes RPCs of that much plus 4 KiB: a replay
    of eight 900-byte messages (7 KiB in all) must go in several RPCs, or the receiver
    would refuse it and the replayed messages would be lost."""

    def small(i: int, cfg: NodeConfig) -> NodeConfig:
        return cfg.with_(gossip=dataclasses.replace(cfg.gossip, max_message_size=1200))

    async with open_devnet(peers=2, seed=9, configure=small) as net:
        a, b = net.nodes
        subs = [await n.subscribe(TOPIC, buffer=64) for n in net.nodes]
        await _meshed(net, TOPIC, subs)
        router = a.gossip.pubsub.router
        peer = next(p for p in a.gossip.pubsub.peers if str(p) == b.peer_id)
        await _publish_into_cache(a, subs[1], count=8, size=900, at_least=8)
        await router.send_recent_messages(peer, TOPIC)
        await a.publish(TOPIC, b"after the replay")  # same stream, after the replay's RPCs
        with trio.fail_after(10):
            while (await subs[1].receive()).data != b"after the replay":
                pass
        assert b.peer_id in a.gossip.topic_peers(TOPIC)
        assert a.peer_id in b.gossip.topic_peers(TOPIC)


async def test_validator_verdicts_and_penalties() -> None:
    async with open_devnet(peers=3, seed=3) as net:
        a = net.nodes[0]

        def only_even(msg):  # type: ignore[no-untyped-def]
            if msg.data[-1] % 2:
                return Validation.reject("odd")
            return Validation.accept()

        for n in net.nodes:
            n.set_validator(TOPIC, only_even)
        subs = [await n.subscribe(TOPIC) for n in net.nodes]
        await _meshed(net, TOPIC, subs)
        await a.publish(TOPIC, b"\x02")
        with trio.fail_after(10):
            assert (await subs[1].receive()).data == b"\x02"
        # Our own validator refuses an odd message before it leaves.
        await a.publish(TOPIC, b"\x01")
        assert a.metrics.rejected.get("odd") == 1
        await a.publish(TOPIC, b"\x04")
        with trio.fail_after(10):
            assert (await subs[1].receive()).data == b"\x04"


async def test_publish_argument_errors() -> None:
    async with open_devnet(peers=1, seed=4) as net:
        node = net.nodes[0]
        with pytest.raises(UsageError):
            await node.publish("", b"x")
        with pytest.raises(UsageError):
            await node.publish(TOPIC, b"x" * (2 << 20))


# In make test-all only: under the full suite's load on 2 cores, one node of five sometimes
# never learns one peer's subscription (py-libp2p's missed-subscription window, see
# GossipService._reannounce), twice in three clean-clone runs of this session; alone it
# passes. The relay itself is covered in make test by the market's relay path.
@pytest.mark.slow
async def test_relay_sends_the_authors_envelope_once_network_wide() -> None:
    async with open_devnet(peers=4, seed=5) as net:
        author, relayer, *others = net.nodes
        subs = [await n.subscribe(TOPIC) for n in net.nodes]
        await _meshed(net, TOPIC, subs)
        envelope = author.seal(TOPIC, b"learned by request")  # sealed, never published
        assert await relayer.relay(TOPIC, envelope)
        for node, sub in zip(net.nodes, subs, strict=True):
            if node is relayer:
                continue  # a relayer knows the message already: not delivered to itself
            with trio.fail_after(10):
                msg = await sub.receive()
            assert msg.data == b"learned by request"
            assert msg.sender == author.peer_id  # the author's message, not the relayer's
            assert msg.envelope == envelope
        # The message id is the envelope's hash: everyone has seen it, relays stop here.
        assert not await relayer.relay(TOPIC, envelope)
        assert not await others[0].relay(TOPIC, envelope)
        assert not await author.relay(TOPIC, envelope)
        skipped = sum(n.metrics.get("relay_skipped", reason="seen") for n in net.nodes)
        assert skipped == 3
        assert relayer.metrics.get("relayed", topic=TOPIC) == 1

        # what peers would drop as too old is not sent
        now = int(time.time() * 1000)
        max_age = relayer.gossip.config.max_age_ms
        old = seal(
            Identity.generate(), domain=TOPIC, kind=0, body=b"x", seqno=1, time_ms=now - max_age
        )
        assert not await relayer.relay(TOPIC, old)
        assert relayer.metrics.get("relay_skipped", reason="too_old") == 1
        # not an envelope, or one signed for another topic
        with pytest.raises(ProtocolViolation):
            await relayer.relay(TOPIC, b"\x93\x01\x02")
        other = author.seal("test/other/1", b"x")
        with pytest.raises(ProtocolViolation, match="signature"):
            await relayer.relay(TOPIC, other)


def _publish_rpc(i: int, size: int = 100) -> Any:
    return rpc_pb2.RPC(publish=[rpc_pb2.Message(data=bytes([i]) * size, topicIDs=[TOPIC])])


def test_queued_rpcs_merge_in_queue_order_within_their_limits() -> None:
    shared = [_publish_rpc(i) for i in range(20)]
    queue = PriorityQueue(64)
    for rpc in shared[1:]:
        assert queue.push(rpc)
    graft = rpc_pb2.RPC(control=rpc_pb2.ControlMessage(graft=[rpc_pb2.ControlGraft(topicID=TOPIC)]))
    assert queue.push(graft, priority=True)
    before = [r.SerializeToString() for r in shared]

    merged = merge_queued(shared[0], queue, limit=64 * 1024)
    assert [m.data[0] for m in merged.publish] == list(range(MERGE_RPC_MESSAGES))
    assert [g.topicID for g in merged.control.graft] == [TOPIC]  # control went first: in
    assert len(queue) == 20 - MERGE_RPC_MESSAGES  # the rest wait, in order
    assert queue.pop() is shared[MERGE_RPC_MESSAGES]
    assert [r.SerializeToString() for r in shared] == before  # shared RPCs left as they were

    big = [_publish_rpc(i, 1000) for i in range(10)]
    queue = PriorityQueue(64)
    for rpc in big[1:]:
        queue.push(rpc)
    merged = merge_queued(big[0], queue, limit=3500)
    assert len(merged.publish) == 3
    assert len(merged.SerializeToString()) <= 3500
    assert len(queue) == 7
    assert merge_queued(big[0], PriorityQueue(4), limit=10_000) is big[0]  # nothing queued


async def test_messages_queued_together_go_in_one_rpc_and_a_batch_relay_skips_the_bad(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Twelve envelopes relayed at once while the stream to the peer is busy: they wait in
    the send queue and go out merged (one RPC per message before). The batch skips, and
    counts, a repeat and a non-envelope."""
    seen: list[tuple[str, str, int]] = []  # receiver, sender, messages in the RPC
    original = pubsub_module.maybe_consume_signed_record

    def counting(msg: Any, host: Any, peer_id: Any) -> bool:
        seen.append((str(host.get_id()), str(peer_id), len(msg.publish)))
        return bool(original(msg, host, peer_id))

    monkeypatch.setattr(pubsub_module, "maybe_consume_signed_record", counting)
    async with open_devnet(peers=2, seed=31) as net:
        a, b = net.nodes
        subs = [await n.subscribe(TOPIC, buffer=64) for n in net.nodes]
        await _meshed(net, TOPIC, subs)
        pubsub = a.gossip.pubsub
        peer = next(p for p in pubsub.peers if str(p) == b.peer_id)
        stream = pubsub.peers[peer]

        def locks() -> Any:  # one per stream, made by its first write
            return pubsub.__dict__.get("_stream_write_locks", {})

        await wait_until(lambda: stream in locks(), 10, message="a first RPC on the stream")
        write_lock = locks()[stream]
        assert pubsub.peer_queues[peer]._queue.max_size == SEND_QUEUE_RPCS  # room to relay

        def from_a() -> list[int]:
            return [n for to, frm, n in seen if to == b.peer_id and frm == a.peer_id and n]

        before = len(from_a())
        envelopes = [a.gossip.seal(TOPIC, b"batch %d" % i) for i in range(12)]
        async with write_lock:  # the stream is busy: what is sent meanwhile queues up
            sent = await a.gossip.relay_many(TOPIC, [*envelopes, envelopes[0], b"not one"])
        assert sent == 12
        assert a.metrics.get("relay_skipped", reason="seen") == 1
        assert a.metrics.get("relayed", topic=TOPIC) == 12
        got: set[bytes] = set()
        with trio.fail_after(10):
            while len(got) < 12:
                got.add((await subs[1].receive()).data)
        assert got == {b"batch %d" % i for i in range(12)}
        rpcs = from_a()[before:]
        assert sum(rpcs) == 12
        assert len(rpcs) <= 2, rpcs  # the one the send loop held, then the rest together
        # one at a time (relay) or strict, a non-envelope is an error, and nothing goes out
        extra = a.gossip.seal(TOPIC, b"not sent")
        with pytest.raises(ProtocolViolation):
            await a.gossip.relay(TOPIC, b"not one")
        with pytest.raises(ProtocolViolation):
            await a.gossip.relay_many(TOPIC, [extra, b"not one"], strict=True)
        assert a.metrics.get("relayed", topic=TOPIC) == 12
