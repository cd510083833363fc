#!/usr/bin/env python3
"""Chain benchmarks: 4 gatekeepers on loopback, real py-libp2p hosts, one process.

  latency     transaction submit -> finalized receipt, p50/p99, default chain parameters;
              baseline: one gossip hop between the same nodes, measured in the same devnet
  throughput  finalized transfers per second, blocks of up to 1,000 transfers (transactions
              are put straight into the gatekeepers' mempools: this measures consensus and
              execution, not transaction gossip); baseline: one ChainView executing the same
              blocks in memory
  catch-up    a fresh node 1,000 blocks behind syncs from a peer over /phala/sync/1.0.0;
              baseline: a Follower applying the same blocks from memory

Every node here shares one event loop (one core): the four gatekeepers and the follower
each execute every block, so in-process figures are a floor for separate processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

from phala_p2p.chain.block import (
    Block,
    Commit,
    CommitSig,
    CommittedBlock,
    VoteType,
    vote_sign_bytes,
)
from phala_p2p.chain.bodies import Transfer
from phala_p2p.chain.params import Genesis
from phala_p2p.chain.store import BlockStore
from phala_p2p.chain.sync import Follower, SyncRequest, SyncResponse
from phala_p2p.chain.tx import Tx, clear_verified_cache
from phala_p2p.chain.view import ChainView
from phala_p2p.config import NodeConfig, Role
from phala_p2p.crypto.identity import Identity
from phala_p2p.node import open_node
from phala_p2p.testing import derive_identity, devnet_genesis, open_devnet, wait_until

TARGET_P50 = 0.5


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))]


# -- latency ------------------------------------------------------------------------------


async def bench_latency(count: int) -> None:
    async with open_devnet(gatekeepers=4, clients=1, seed=b"bench-latency") as net:
        client = net.clients[0]
        keeper = net.gatekeepers[0]
        await client.chain.wait_for_height(2, 60)
        # baseline: one gossip hop, client -> gatekeeper, on the same hosts
        sub = await keeper.subscribe("bench/ping/1")
        await client.subscribe("bench/ping/1")
        await wait_until(lambda: client.peer_id in keeper.gossip.topic_peers("bench/ping/1"), 10)
        await wait_until(lambda: keeper.peer_id in client.gossip.topic_peers("bench/ping/1"), 10)
        hops: list[float] = []
        for i in range(count):
            sent = time.perf_counter()
            await client.publish("bench/ping/1", b"%d" % i)
            with trio.move_on_after(5):
                while True:
                    msg = await sub.receive()
                    if msg.data == b"%d" % i:
                        hops.append(time.perf_counter() - sent)
                        break
        # transactions at random moments (a user does not wait for the next block)
        rng = random.Random(7)
        latencies: list[float] = []
        to = keeper.account
        for _ in range(count):
            await trio.sleep(rng.uniform(0.0, 1.2))  # load pacing, not waiting for an event
            start = time.perf_counter()
            receipt = await client.wallet.transfer(to, 1)
            assert receipt.ok, receipt
            latencies.append(time.perf_counter() - start)
    hop = statistics.median(hops)
    p50, p99 = pct(latencies, 0.5), pct(latencies, 0.99)
    print(f"latency: {count} transfers, default parameters (block_time 1 s, min interval 50 ms)")
    print(f"  submit -> finalized  p50 {p50 * 1000:7.1f} ms   p99 {p99 * 1000:7.1f} ms")
    print(f"  one gossip hop       p50 {hop * 1000:7.1f} ms   (baseline, same devnet)")
    print(f"  ratio p50 / hop      {p50 / hop:7.1f}x   (a block needs >= 4 hops)")
    verdict = "met" if p50 <= TARGET_P50 else "MISSED"
    print(f"  p50 / target 0.5 s   {p50 / TARGET_P50:7.2f}x   ({verdict})")


# -- throughput ---------------------------------------------------------------------------


def _senders(n: int) -> list[Identity]:
    return [Identity.from_seed(bytes([7]) * 28 + i.to_bytes(4, "big")) for i in range(n)]


async def bench_throughput(total: int, per_block: int) -> None:
    seed = b"bench-tps"
    senders = _senders(max(16, total // 50))
    base = devnet_genesis(seed, gatekeepers=4, accounts=6, params={"max_block_txs": per_block})
    genesis = dataclasses.replace(
        base, accounts=base.accounts + tuple((s.public_key, 10**12) for s in senders)
    )
    per_sender = -(-total // len(senders))
    sink = derive_identity(seed, 5).public_key
    txs = [
        Tx.sign(s, chain_id=genesis.chain_id, nonce=n, fee=1, body=Transfer(sink, 1))
        for n in range(per_sender)
        for s in senders
    ][:total]
    # baseline: one view executes the same transfers in blocks of per_block
    clear_verified_cache()
    view = ChainView(genesis)
    keys = [derive_identity(seed, i) for i in range(1, 5)]
    t0 = time.perf_counter()
    for i in range(0, len(txs), per_block):
        block = view.build_block(
            txs[i : i + per_block],
            proposer=view.proposer(0),
            round_=0,
            time_ms=view.head_time_ms + 1000,
        )
        view.apply(block, _commit(view, block, keys), verified=True)
    mem_tps = len(txs) / (time.perf_counter() - t0)
    clear_verified_cache()

    async with open_devnet(gatekeepers=4, clients=1, seed=seed, genesis=genesis) as net:
        client = net.clients[0]
        await client.chain.wait_for_height(1, 60)
        start_height = client.chain.head.height
        t0 = time.perf_counter()
        for keeper in net.gatekeepers:
            for tx in txs:
                keeper.chain.mempool.add(tx, keeper.chain.view)
            keeper.chain.txs_arrived()
        inject = time.perf_counter() - t0
        target = client.chain.state.balance(sink) + len(txs)
        await wait_until(lambda: client.chain.state.balance(sink) >= target, 600)
        elapsed = time.perf_counter() - t0
        blocks = client.chain.head.height - start_height
    tps = len(txs) / elapsed
    print(f"throughput: {len(txs)} transfers from {len(senders)} accounts, <= {per_block}/block")
    print(
        f"  finalized on the network  {tps:8.0f} tx/s  ({blocks} blocks, {elapsed:.1f} s,"
        f" of which {inject:.1f} s putting them in 4 mempools)"
    )
    print(f"  one view, in memory       {mem_tps:8.0f} tx/s  (baseline: execution only)")
    print(f"  ratio                     {tps / mem_tps:8.2f}x")


def _commit(view: ChainView, block: Block, keys: list[Identity]) -> Commit:
    sb = vote_sign_bytes(view.chain_id, VoteType.PRECOMMIT, block.height, 0, block.hash)
    sigs = sorted((CommitSig(k.public_key, k.sign(sb)) for k in keys), key=lambda c: c.validator)
    return Commit(block.height, 0, block.hash, tuple(sigs))


# -- catch-up -----------------------------------------------------------------------------


async def bench_catchup(blocks: int) -> None:
    seed = b"bench-catchup"
    genesis: Genesis = devnet_genesis(seed, gatekeepers=4, accounts=3)
    genesis = dataclasses.replace(genesis, genesis_time=genesis.genesis_time - blocks - 10)
    keys = [derive_identity(seed, i) for i in range(1, 5)]
    view = ChainView(genesis)
    payer = derive_identity(seed, 0)
    chain: list[CommittedBlock] = []
    for i in range(blocks):
        tx = Tx.sign(
            payer, chain_id=genesis.chain_id, nonce=i, fee=1, body=Transfer(keys[0].public_key, 1)
        )
        block = view.build_block(
            [tx], proposer=view.proposer(0), round_=0, time_ms=view.head_time_ms + 1000
        )
        commit = _commit(view, block, keys)
        view.apply(block, commit, verified=True)
        chain.append(CommittedBlock(block, commit))
    # baseline: a follower verifying and applying the same blocks from memory
    clear_verified_cache()
    follower = Follower(ChainView(genesis))
    t0 = time.perf_counter()
    for i in range(0, blocks, 64):
        batch = tuple(chain[i : i + 64])
        follower.on_response(SyncRequest(i + 1, 64), SyncResponse(blocks, batch))
    mem_rate = blocks / (time.perf_counter() - t0)
    clear_verified_cache()

    with tempfile.TemporaryDirectory(prefix="phala-bench-") as tmp:
        root = Path(tmp)
        genesis.write_toml(root / "genesis.toml")
        server_dir = root / "server"
        server_dir.mkdir()
        with BlockStore(server_dir / "chain.sqlite", genesis_hash=genesis.genesis_hash) as store:
            store.put_blocks([(cb.block, cb.commit) for cb in chain])

        server_cfg = NodeConfig(
            role=Role.BOOTSTRAP, data_dir=server_dir, genesis=root / "genesis.toml"
        )
        async with open_node(server_cfg) as server:
            assert server.chain.head.height == blocks
            fresh_cfg = NodeConfig(
                role=Role.CLIENT,
                data_dir=root / "fresh",
                genesis=root / "genesis.toml",
                bootstrap=(server.listen_addrs[0],),
            )
            t0 = time.perf_counter()
            async with open_node(fresh_cfg) as fresh:
                await wait_until(lambda: fresh.is_connected(server.peer_id), 10)
                connected = time.perf_counter() - t0
                fresh.chain.want_sync(blocks)
                await fresh.chain.wait_for_height(blocks, 300)
                elapsed = time.perf_counter() - t0 - connected
                assert fresh.chain.head.hash == server.chain.head.hash
    rate = blocks / elapsed
    verdict = "met" if rate >= 1000 else "MISSED"
    print(f"catch-up: {blocks} blocks behind (1 transfer each), over /phala/sync/1.0.0")
    print(f"  synced, verified, stored  {rate:8.0f} blocks/s  ({elapsed:.2f} s after connecting)")
    print(f"  follower from memory      {mem_rate:8.0f} blocks/s  (baseline)")
    print(f"  ratio                     {rate / mem_rate:8.2f}x   target >= 1,000/s: {verdict}")


async def main(args: argparse.Namespace) -> None:
    if "catchup" in args.only:
        await bench_catchup(args.blocks)
    if "throughput" in args.only:
        await bench_throughput(args.txs, 1000)
    if "latency" in args.only:
        await bench_latency(args.count)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--count", type=int, default=40, help="transfers timed for latency")
    ap.add_argument("--txs", type=int, default=5000, help="transfers for throughput")
    ap.add_argument("--blocks", type=int, default=1000, help="blocks behind for catch-up")
    ap.add_argument(
        "--only",
        nargs="+",
        default=["catchup", "throughput", "latency"],
        choices=["catchup", "throughput", "latency"],
    )
    trio.run(main, ap.parse_args())
    sys.exit(0)
