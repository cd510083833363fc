"""A simulated network for consensus machines: literal time, seeded delays, drops, partitions,
crashes and restarts. It plays the driver's part exactly as the real one must: every action in
order, ``PersistSigned`` stored before the broadcast that follows it, blocks stored on commit,
evidence submitted as a transaction, sync served from peers' stores.

It checks safety as it runs: two different finalized blocks at one height, or two conflicting
votes signed by an honest gatekeeper, raise AssertionError at once.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phala_p2p.chain.block import Proposal, Vote
from phala_p2p.chain.bodies import SubmitEvidence
from phala_p2p.chain.consensus import (
    Action,
    Broadcast,
    CommitBlock,
    Consensus,
    ConsensusConfig,
    NeedSync,
    PersistSigned,
    ReportEvidence,
)
from phala_p2p.chain.mempool import Mempool
from phala_p2p.chain.params import Genesis
from phala_p2p.chain.store import BlockStore
from phala_p2p.chain.sync import (
    MAX_SYNC_RESPONSE_BYTES,
    SyncRequest,
    SyncResponse,
    check_response,
    serve_sync,
)
from phala_p2p.chain.tx import Tx
from phala_p2p.crypto.identity import Identity
from phala_p2p.errors import ProtocolViolation
from phala_p2p.wire.codec import decode, encode

MAX_MSG = 4 * 1024 * 1024


@dataclass
class SimNode:
    index: int
    identity: Identity
    store_path: Path
    byzantine: bool = False
    store: BlockStore | None = None
    consensus: Consensus | None = None
    mempool: Mempool | None = None
    alive: bool = False
    synced_blocks: int = 0
    violations: list[str] = field(default_factory=list)

    @property
    def c(self) -> Consensus:
        assert self.consensus is not None
        return self.consensus

    @property
    def key(self) -> bytes:
        return self.identity.public_key


class SimNet:
    def __init__(
        self,
        genesis: Genesis,
        identities: Sequence[Identity],
        data_dir: Path,
        *,
        seed: int = 0,
        delay: tuple[float, float] = (0.005, 0.03),
        drop: float = 0.0,
        byzantine: Sequence[int] = (),
        durable: bool = False,
        config: ConsensusConfig | None = None,
        start_time: float | None = None,
    ) -> None:
        self.genesis = genesis
        self.rng = random.Random(seed)
        self.delay = delay
        self.drop = drop
        self.durable = durable
        self.config = config or ConsensusConfig(
            rebroadcast_interval=0.5, sync_after=0.6, sync_retry=0.5
        )
        self.now = float(genesis.genesis_time) if start_time is None else start_time
        self._queue: list[tuple[float, int, int, str, Any]] = []
        self._seq = 0
        self.groups: list[set[int]] | None = None
        self.nodes = [
            SimNode(i, ident, data_dir / f"node{i}.sqlite", byzantine=i in byzantine)
            for i, ident in enumerate(identities)
        ]
        self.finalized: dict[int, bytes] = {}
        self.signed_votes: dict[tuple[bytes, int, int, int], bytes | None] = {}
        self.evidence_seen: list[Any] = []
        self.committed_events = 0
        self.delivered = 0
        for node in self.nodes:
            self.start(node.index)

    # -- topology ---------------------------------------------------------------------------

    def partition(self, *groups: Sequence[int]) -> None:
        self.groups = [set(g) for g in groups]

    def heal(self) -> None:
        self.groups = None

    def can_reach(self, a: int, b: int) -> bool:
        if self.groups is None:
            return True
        return any(a in g and b in g for g in self.groups)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, i: int) -> None:
        node = self.nodes[i]
        node.store = BlockStore(
            node.store_path, genesis_hash=self.genesis.genesis_hash, durable=self.durable
        )
        view = node.store.open_view(self.genesis)
        node.mempool = Mempool()
        config = self.config
        if node.byzantine:
            config = ConsensusConfig(
                rebroadcast_interval=config.rebroadcast_interval,
                sync_after=config.sync_after,
                sync_retry=config.sync_retry,
                byzantine_double_sign=True,
            )
        node.consensus = node.store.consensus(
            view, node.identity, mempool=node.mempool, config=config
        )
        node.alive = True
        self._run_actions(node, node.consensus.start(self.now))

    def crash(self, i: int) -> None:
        node = self.nodes[i]
        if not node.alive:
            return
        node.alive = False
        assert node.store is not None
        node.store.close()
        node.store = None
        node.consensus = None
        node.mempool = None

    def close(self) -> None:
        for node in self.nodes:
            self.crash(node.index)

    # -- the driver's part ------------------------------------------------------------------

    def _push(self, at: float, dst: int, kind: str, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (at, self._seq, dst, kind, payload))

    def _send(self, src: int, kind: str, payload: Any) -> None:
        for dst in range(len(self.nodes)):
            if dst == src or not self.can_reach(src, dst):
                continue
            if self.drop and self.rng.random() < self.drop:
                continue
            self._push(self.now + self.rng.uniform(*self.delay), dst, kind, payload)

    def _run_actions(self, node: SimNode, actions: list[Action]) -> None:
        for action in actions:
            if not node.alive:
                return
            if isinstance(action, PersistSigned | CommitBlock):
                assert node.store is not None
                node.store.persist(action)  # durable before anything that follows
                if isinstance(action, CommitBlock):
                    self._check_finalized(action.block.height, action.block.hash)
            elif isinstance(action, Broadcast):
                msg = action.msg
                if isinstance(msg, Vote) and not node.byzantine:
                    self._check_honest_vote(msg)
                self._send(node.index, "consensus", encode(msg))
            elif isinstance(action, ReportEvidence):
                self.evidence_seen.append(action.evidence)
                self.submit_tx(node.index, SubmitEvidence(action.evidence))
            elif isinstance(action, NeedSync):
                self._request_sync(node)

    def _check_honest_vote(self, vote: Vote) -> None:
        key = (vote.validator, vote.height, vote.round, int(vote.vote_type))
        if key in self.signed_votes and self.signed_votes[key] != vote.block_hash:
            raise AssertionError(f"honest gatekeeper double-signed at {key[1:]}")
        self.signed_votes[key] = vote.block_hash

    def _check_finalized(self, height: int, block_hash: bytes) -> None:
        self.committed_events += 1
        known = self.finalized.setdefault(height, block_hash)
        if known != block_hash:
            raise AssertionError(f"fork: two different blocks finalized at height {height}")

    def submit_tx(self, i: int, body: Any, fee: int = 1) -> Tx:
        """Node ``i`` signs a transaction with its own key and gossips it."""
        node = self.nodes[i]
        assert node.mempool is not None
        tx = Tx.sign(
            node.identity,
            chain_id=self.genesis.chain_id,
            nonce=node.mempool.next_nonce(node.key, node.c.view),
            fee=fee,
            body=body,
        )
        self.gossip_tx(i, tx)
        return tx

    def gossip_tx(self, i: int, tx: Tx) -> None:
        node = self.nodes[i]
        if node.alive:
            assert node.mempool is not None
            node.mempool.add(tx, node.c.view)
        self._send(i, "tx", encode(tx))

    def _request_sync(self, node: SimNode) -> None:
        want = node.c.view.next_height
        peers = [
            p
            for p in self.nodes
            if p.alive
            and p is not node
            and self.can_reach(node.index, p.index)
            and p.store is not None
            and p.store.head() >= want
        ]
        if not peers:
            return
        peer = self.rng.choice(peers)
        request = SyncRequest(want, 16)
        assert peer.store is not None
        response = serve_sync(request, peer.store)
        self._push(
            self.now + 2 * self.rng.uniform(*self.delay),
            node.index,
            "sync",
            (encode(request), encode(response)),
        )

    def _deliver(self, dst: int, kind: str, payload: Any) -> None:
        node = self.nodes[dst]
        if not node.alive:
            return
        self.delivered += 1
        actions: list[Action] = []
        try:
            if kind == "consensus":
                msg = decode(payload, max_size=MAX_MSG)
                assert isinstance(msg, Proposal | Vote)
                actions = node.c.on_message(msg, self.now)
            elif kind == "tx":
                assert node.mempool is not None
                node.mempool.add(decode(payload, max_size=MAX_MSG, expect=Tx), node.c.view)
            elif kind == "sync":
                request = decode(payload[0], max_size=64, expect=SyncRequest)
                response = decode(payload[1], max_size=MAX_SYNC_RESPONSE_BYTES, expect=SyncResponse)
                check_response(request, response)
                for cb in response.blocks:
                    before = node.c.view.height
                    acts = node.c.on_block_committed(cb.block, cb.commit, self.now)
                    node.synced_blocks += node.c.view.height - before
                    self._run_actions(node, acts)
        except ProtocolViolation as err:
            node.violations.append(err.reason)
        self._run_actions(node, actions)

    # -- running ----------------------------------------------------------------------------

    def _next_timer(self) -> tuple[float, int] | None:
        best: tuple[float, int] | None = None
        for node in self.nodes:
            if node.alive:
                d = node.c.next_deadline()
                if d is not None and (best is None or d < best[0]):
                    best = (d, node.index)
        return best

    def step(self, until: float) -> bool:
        timer = self._next_timer()
        t_msg = self._queue[0][0] if self._queue else float("inf")
        t_timer = timer[0] if timer is not None else float("inf")
        t = min(t_msg, t_timer)
        if t > until:
            self.now = max(self.now, until)
            return False
        self.now = max(self.now, t)
        if t_timer <= t_msg:
            assert timer is not None
            node = self.nodes[timer[1]]
            self._run_actions(node, node.c.on_timeout(self.now))
        else:
            _, _, dst, kind, payload = heapq.heappop(self._queue)
            self._deliver(dst, kind, payload)
        return True

    def run_for(self, seconds: float) -> None:
        until = self.now + seconds
        while self.step(until):
            pass

    def run_until(self, pred: Callable[[], bool], *, timeout: float) -> bool:
        until = self.now + timeout
        while not pred():
            if not self.step(until):
                return pred()
        return True

    def heights(self) -> list[int]:
        return [n.c.view.height if n.alive else -1 for n in self.nodes]

    def min_height(self, among: Sequence[int] | None = None) -> int:
        idx = range(len(self.nodes)) if among is None else among
        return min(self.nodes[i].c.view.height for i in idx)
