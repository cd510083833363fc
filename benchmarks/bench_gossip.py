#!/usr/bin/env python3
"""Gossip burst: 10 peers, one publishes 1,000 x 1 KiB back to back.

Three runs in one process, same machine, same moment:
  raw-default  py-libp2p GossipSub with its defaults (heartbeat 120 s, 10 msg/s spam cap)
  raw-fixed    py-libp2p GossipSub with our fixed settings (heartbeat 1 s, spam cap off)
  phala_p2p    our node: signed envelopes, validators, paced publishing
Prints the delivery ratio, p50/p99 latency and CPU seconds per delivery, and the ratios of
ours against each baseline. Peers are fully connected before the burst in every run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _raw import dial, raw_gossip, raw_hosts

from phala_p2p.testing import open_devnet, wait_until

TOPIC = "bench/burst/1"


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))]


async def _collect(
    receive, n_expected: int, latencies: list[float], sent_at: dict[bytes, float], settle: float
) -> int:  # type: ignore[no-untyped-def]
    got = 0
    while got < n_expected:
        with trio.move_on_after(settle) as scope:
            data = await receive()
        if scope.cancelled_caught:
            break
        key = data[:4]
        if key in sent_at:
            latencies.append(time.perf_counter() - sent_at[key])
            got += 1
    return got


async def run_raw(peers: int, count: int, fixed: bool) -> dict[str, float]:
    result: dict[str, float] = {}
    try:
        await _run_raw(peers, count, fixed, result)
    except* RuntimeError:
        # py-libp2p's pubsub services can spawn into their closed nursery while they shut
        # down; the figures were taken before that, so only a failure before them counts.
        if not result:
            raise
    return result


async def _run_raw(peers: int, count: int, fixed: bool, result: dict[str, float]) -> None:
    async with raw_hosts(peers, fixed_dial=True) as hosts:
        async with raw_gossip(hosts, fixed=fixed) as pubsubs:
            for i in range(peers):
                for j in range(i + 1, peers):
                    await dial(hosts[i], hosts[j])
            subs = [await ps.subscribe(TOPIC) for ps in pubsubs[1:]]
            await wait_until(
                lambda: all(len(ps.peer_topics.get(TOPIC, ())) >= peers - 2 for ps in pubsubs[1:]),
                30,
            )
            sent_at: dict[bytes, float] = {}
            latencies: list[float] = []
            cpu0 = time.process_time()
            received = [0] * len(subs)

            async def drain(i: int) -> None:
                async def receive() -> bytes:
                    return bytes((await subs[i].get()).data)

                received[i] = await _collect(receive, count, latencies, sent_at, settle=3.0)

            async with trio.open_nursery() as n:
                for i in range(len(subs)):
                    n.start_soon(drain, i)
                for k in range(count):
                    payload = k.to_bytes(4, "big") + bytes(1020)
                    sent_at[payload[:4]] = time.perf_counter()
                    await pubsubs[0].publish(TOPIC, payload)
            cpu = time.process_time() - cpu0
            result.update(_figures(sum(received), count * (peers - 1), latencies, cpu))


async def run_ours(peers: int, count: int) -> dict[str, float]:
    async with open_devnet(peers=peers - 1, seed=99) as net:
        nodes = [net.bootstrap, *net.nodes]
        subs = [await n.subscribe(TOPIC, buffer=count + 10) for n in nodes[1:]]
        await wait_until(
            lambda: all(len(n.gossip.topic_peers(TOPIC)) >= peers - 2 for n in nodes[1:]), 30
        )
        sender = nodes[0]
        await sender.gossip._join(TOPIC)
        await wait_until(lambda: len(sender.gossip.topic_peers(TOPIC)) >= peers - 1, 10)
        sent_at: dict[bytes, float] = {}
        latencies: list[float] = []
        received = [0] * len(subs)
        cpu0 = time.process_time()

        async def drain(i: int) -> None:
            async def receive() -> bytes:
                return (await subs[i].receive()).data

            received[i] = await _collect(receive, count, latencies, sent_at, settle=3.0)

        async with trio.open_nursery() as n:
            for i in range(len(subs)):
                n.start_soon(drain, i)
            for k in range(count):
                payload = k.to_bytes(4, "big") + bytes(1020)
                sent_at[payload[:4]] = time.perf_counter()
                await sender.publish(TOPIC, payload)
        cpu = time.process_time() - cpu0
    return _figures(sum(received), count * (peers - 1), latencies, cpu)


def _figures(delivered: int, expected: int, latencies: list[float], cpu: float) -> dict[str, float]:
    return {
        "delivered": delivered,
        "expected": expected,
        "ratio": delivered / expected,
        "p50_ms": pct(latencies, 0.5) * 1000,
        "p99_ms": pct(latencies, 0.99) * 1000,
        "cpu_s": cpu,
        "cpu_per_delivery_ms": cpu / max(delivered, 1) * 1000,
    }


async def main(args: argparse.Namespace) -> None:
    results = {
        "raw-default": await run_raw(args.peers, args.count, fixed=False),
        "raw-fixed": await run_raw(args.peers, args.count, fixed=True),
        "phala_p2p": await run_ours(args.peers, args.count),
    }
    print(
        f"gossip burst: {args.peers} peers, {args.count} x 1 KiB from one publisher "
        f"(cpu = this process, all peers)"
    )
    for name, r in results.items():
        print(
            f"  {name:<12} delivered {r['delivered']:>6}/{r['expected']:<6} "
            f"({r['ratio']:6.1%})  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
            f"cpu/delivery {r['cpu_per_delivery_ms']:.3f} ms"
        )
    ours, fixed, default = results["phala_p2p"], results["raw-fixed"], results["raw-default"]
    print(f"  delivery ratio: ours {ours['ratio']:.1%} vs raw default {default['ratio']:.1%}")
    print(
        f"  cpu per delivery: ours / raw-fixed = "
        f"{ours['cpu_per_delivery_ms'] / fixed['cpu_per_delivery_ms']:.2f}x (target <= 1.2x)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=10)
    parser.add_argument("--count", type=int, default=1000)
    os.environ.setdefault("PYTHONHASHSEED", "0")
    trio.run(main, parser.parse_args())
