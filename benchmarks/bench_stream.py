#!/usr/bin/env python3
"""Stream throughput and connect latency, ours against raw py-libp2p in the same run.

throughput  256 MiB one way: our framed request (DATA frames + END, hash checked by the
            receiver) against a raw py-libp2p Noise+Yamux stream writing the same bytes
            and closing (target: ours >= 0.8x raw).
connect     fresh dial + first response of a tiny request: our node (Noise only, one
            connection per peer, pipelined protocol negotiation) against raw py-libp2p's
            default new_host() dial and new_stream (target: ours <= 20 ms).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path

import trio
from libp2p.custom_types import TProtocol

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _raw import dial, raw_hosts

from phala_p2p import NodeConfig, open_node

PROTO = "/bench/blob/1.0.0"
CHUNK = 256 * 1024


async def raw_throughput(size: int) -> float:
    async with raw_hosts(2, fixed_dial=True) as (a, b):
        done = trio.Event()
        got = [0]

        async def sink(stream) -> None:  # type: ignore[no-untyped-def]
            h = hashlib.sha256()
            while True:
                try:
                    data = await stream.read(CHUNK)
                except Exception:  # py-libp2p signals EOF by raising
                    break
                if not data:
                    break
                h.update(data)
                got[0] += len(data)
            await stream.write(h.digest())
            await stream.close()
            done.set()

        b.set_stream_handler(TProtocol(PROTO), sink)
        await dial(a, b)
        block = b"\x5a" * CHUNK
        start = time.perf_counter()
        stream = await a.new_stream(b.get_id(), [TProtocol(PROTO)])
        for _ in range(size // CHUNK):
            await stream.write(block)
        await stream.close_write()
        await stream.read(32)
        await done.wait()
        elapsed = time.perf_counter() - start
        assert got[0] == size, got[0]
        return size / elapsed


async def our_throughput(size: int) -> float:
    async with open_node(NodeConfig()) as a, open_node(NodeConfig()) as b:

        async def hasher(peer: str, req: bytes) -> bytes:
            return hashlib.sha256(req).digest()

        b.serve(PROTO, hasher, max_request=size)
        await a.connect(b.listen_addrs[0])
        block = b"\x5a" * CHUNK
        payload = block * (size // CHUNK)
        start = time.perf_counter()
        digest = await a.request(b.peer_id, PROTO, payload, timeout=600, max_response=64)
        elapsed = time.perf_counter() - start
        assert digest == hashlib.sha256(payload).digest()
        return size / elapsed


async def raw_connect(rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        async with raw_hosts(2) as (a, b):

            async def echo(stream) -> None:  # type: ignore[no-untyped-def]
                await stream.write(await stream.read(64))
                await stream.close()

            b.set_stream_handler(TProtocol(PROTO), echo)
            start = time.perf_counter()
            await dial(a, b)
            s = await a.new_stream(b.get_id(), [TProtocol(PROTO)])
            await s.write(b"ping")
            await s.read(64)
            times.append(time.perf_counter() - start)
    return times


async def our_connect(rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        cfg = NodeConfig()
        async with open_node(cfg) as a, open_node(cfg) as b:

            async def echo(peer: str, req: bytes) -> bytes:
                return req

            b.serve(PROTO, echo)
            start = time.perf_counter()
            await a.connect(b.listen_addrs[0])
            await a.request(b.peer_id, PROTO, b"ping", timeout=10)
            times.append(time.perf_counter() - start)
    return times


async def main(args: argparse.Namespace) -> None:
    size = args.mib * 1024 * 1024
    raw = await raw_throughput(size)
    ours = await our_throughput(size)
    print(f"stream throughput, {args.mib} MiB one way:")
    print(f"  raw py-libp2p Noise+Yamux  {raw / 2**20:8.1f} MiB/s")
    print(f"  phala_p2p framed request   {ours / 2**20:8.1f} MiB/s")
    print(f"  ratio ours/raw = {ours / raw:.2f}x (target >= 0.8x)")
    raw_c = await raw_connect(args.rounds)
    our_c = await our_connect(args.rounds)
    print(f"connect + first response ({args.rounds} fresh pairs each):")
    for name, ts in (("raw py-libp2p default", raw_c), ("phala_p2p", our_c)):
        print(
            f"  {name:<22} p50 {statistics.median(ts) * 1000:7.1f} ms   "
            f"max {max(ts) * 1000:7.1f} ms"
        )
    print(
        f"  ratio ours/raw (p50) = {statistics.median(our_c) / statistics.median(raw_c):.2f}x "
        f"(target: ours <= 20 ms)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=10)
    trio.run(main, parser.parse_args())
