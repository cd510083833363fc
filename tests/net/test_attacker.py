"""Attacker peers writing hand-built gossip frames, and envelope rejections by reason."""

from __future__ import annotations

import gc
import os
import time

import multiaddr
import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.pb import rpc_pb2

from phala_p2p.crypto.identity import Identity
from phala_p2p.net.host import HostLimits, PeerGate, build_host
from phala_p2p.testing import open_devnet, wait_until
from phala_p2p.wire.envelope import seal

# The attackers here are bare py-libp2p hosts; when the victim refuses or cuts them,
# py-libp2p 0.8.1 leaves the attacker's TCP sockets to the garbage collector. Collect them
# inside each test so the warning stays with the code that caused it.
pytestmark = [
    pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


@pytest.fixture(autouse=True)
def _collect_attacker_sockets():  # type: ignore[no-untyped-def]
    yield
    gc.collect()


TOPIC = "test/attack/1"
MESHSUB = TProtocol("/meshsub/1.1.0")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _rpc(identity: Identity, data: bytes, seqno: int) -> bytes:
    msg = rpc_pb2.Message(
        data=data,
        topicIDs=[TOPIC],
        from_id=ID.from_base58(_peer(identity)).to_bytes(),
        seqno=seqno.to_bytes(8, "big"),
    )
    sub = rpc_pb2.RPC.SubOpts(subscribe=True, topicid=TOPIC)
    rpc = rpc_pb2.RPC(publish=[msg], subscriptions=[sub])
    body = rpc.SerializeToString()
    return _varint(len(body)) + body


def _peer(identity: Identity) -> str:
    from phala_p2p.net.host import peer_id_of

    return peer_id_of(identity.public_key)


async def _attacker_stream(victim_addr: str):  # type: ignore[no-untyped-def]
    identity = Identity.generate()
    host = build_host(identity, ["/ip4/127.0.0.1/tcp/0"], gate=PeerGate(), limits=HostLimits())
    return identity, host


async def test_forged_replayed_and_skewed_envelopes_are_rejected_with_reasons() -> None:
    async with open_devnet(peers=2, seed=21) as net:
        victim, honest = net.nodes
        vsub = await victim.subscribe(TOPIC)
        hsub = await honest.subscribe(TOPIC)
        identity, host = await _attacker_stream(victim.listen_addrs[0])
        now_ms = int(time.time() * 1000)
        other = Identity.generate()
        good = seal(identity, domain=TOPIC, kind=0, body=b"ok", seqno=1, time_ms=now_ms)
        forged = bytearray(
            seal(identity, domain=TOPIC, kind=0, body=b"forged", seqno=2, time_ms=now_ms)
        )
        forged[-1] ^= 1  # flip a signature bit
        wrong_domain = seal(
            identity, domain="other/topic", kind=0, body=b"x", seqno=3, time_ms=now_ms
        )
        future = seal(
            identity, domain=TOPIC, kind=0, body=b"f", seqno=4, time_ms=now_ms + 3_600_000
        )
        replay = seal(identity, domain=TOPIC, kind=0, body=b"again", seqno=1, time_ms=now_ms)
        impostor = seal(other, domain=TOPIC, kind=0, body=b"imp", seqno=5, time_ms=now_ms)
        async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            await host.connect(info_from_p2p_addr(multiaddr.Multiaddr(victim.listen_addrs[0])))
            stream = await host.new_stream(ID.from_base58(victim.peer_id), [MESHSUB])
            for i, data in enumerate([good, bytes(forged), wrong_domain, future, replay]):
                await stream.write(_rpc(identity, data, i + 1))
            with trio.fail_after(10):
                msg = await vsub.receive()
            assert msg.data == b"ok"
            assert msg.sender == _peer(identity)
            await wait_until(lambda: sum(victim.metrics.rejected.values()) >= 4, 10)
            rejected = victim.metrics.rejected
            assert rejected.get("bad_signature") == 2  # forged, and signed for another topic
            assert rejected.get("far_future") == 1
            assert rejected.get("replayed") == 1
            # the honest peer got the good one only (relayed by the victim)
            with trio.fail_after(10):
                assert (await hsub.receive()).data == b"ok"
            # An envelope signed by someone else is fine: the author need not be the forwarder.
            await stream.write(_rpc(identity, impostor, 9))
            with trio.fail_after(10):
                assert (await vsub.receive()).data == b"imp"
            await host.close()


async def test_attacker_writing_malformed_frames_is_dropped_honest_peers_unaffected() -> None:
    async with open_devnet(peers=3, seed=22) as net:
        victim, h1, _h2 = net.nodes
        subs = [await n.subscribe(TOPIC) for n in net.nodes]
        await wait_until(lambda: all(len(n.gossip.topic_peers(TOPIC)) >= 2 for n in net.nodes), 10)
        identity, host = await _attacker_stream(victim.listen_addrs[0])
        attacker = _peer(identity)
        async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            await host.connect(info_from_p2p_addr(multiaddr.Multiaddr(victim.listen_addrs[0])))
            stream = await host.new_stream(ID.from_base58(victim.peer_id), [MESHSUB])
            # valid protobuf carrying garbage envelopes: each one a REJECT
            for i in range(10):
                try:
                    await stream.write(_rpc(identity, os.urandom(50), i + 1))
                except BaseLibp2pError:
                    break  # the victim already cut us off
            await wait_until(lambda: victim.gate.is_denied(attacker), 10, message="attacker denied")
            await wait_until(lambda: not victim.is_connected(attacker), 10)
            assert victim.metrics.get("peers_banned") == 1
            assert victim.metrics.rejected.get("malformed", 0) >= 5
            # a fresh connection from the attacker is refused by the victim's gate
            await host.disconnect(ID.from_base58(victim.peer_id))
            refused = False
            try:
                await host.connect(info_from_p2p_addr(multiaddr.Multiaddr(victim.listen_addrs[0])))
            except BaseLibp2pError:
                refused = True
            if not refused:  # the dial completed on our side before the victim closed it
                await wait_until(
                    lambda: not host.get_network().connections.get(ID.from_base58(victim.peer_id)),
                    5,
                    message="victim closes the banned attacker's new connection",
                )
            assert not victim.is_connected(attacker)
            await host.close()
        # honest gossip still flows everywhere
        await h1.publish(TOPIC, b"still fine")
        for sub in subs:
            with trio.fail_after(10):
                assert (await sub.receive()).data == b"still fine"


async def test_garbage_protobuf_frames_do_not_break_the_victim() -> None:
    async with open_devnet(peers=2, seed=23) as net:
        victim, honest = net.nodes
        subs = [await n.subscribe(TOPIC) for n in net.nodes]
        await wait_until(lambda: all(len(n.gossip.topic_peers(TOPIC)) >= 1 for n in net.nodes), 10)
        identity, host = await _attacker_stream(victim.listen_addrs[0])
        async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            await host.connect(info_from_p2p_addr(multiaddr.Multiaddr(victim.listen_addrs[0])))
            stream = await host.new_stream(ID.from_base58(victim.peer_id), [MESHSUB])
            try:
                await stream.write(_varint(40) + b"\xff" * 40)  # not protobuf
                await stream.write(_varint(1 << 30))  # a length far over the RPC cap
            except BaseLibp2pError:
                pass  # the victim may cut the stream after the first frame
            await wait_until(
                lambda: victim.metrics.get("gossip_stream_errors") >= 1,
                10,
                message="undecodable RPC noticed",
            )
            await wait_until(
                lambda: victim.gate.is_denied(_peer(identity)), 10, message="attacker denied"
            )
            await wait_until(lambda: not victim.is_connected(_peer(identity)), 10)
            assert victim.metrics.rejected.get("malformed_rpc") == 1
            await host.close()
        await honest.publish(TOPIC, b"alive")
        for sub in subs:
            with trio.fail_after(10):
                assert (await sub.receive()).data == b"alive"
