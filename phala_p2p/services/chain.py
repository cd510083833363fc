"""The chain on the network: consensus among gatekeepers, block gossip, sync, mempool, wallet.

One ``ChainService`` per node drives the sans-IO machines of ``phala_p2p.chain``:

- a gatekeeper runs a ``Consensus`` machine fed by ``phala/consensus/1``; what it decides is
  stored (durable first), announced on ``phala/blocks/1`` and applied to its view;
- every other role follows: each gossiped block is verified against the gatekeeper set it
  knows (its commit must carry more than 2/3 of that set's power) before it is applied;
- ``/phala/sync/1.0.0`` serves finalized blocks by height range. Gossip never backfills, so a
  node that sees it is behind (a block or vote from ahead, or no new block for
  ``sync_interval``) asks peers for the blocks it misses;
- ``phala/txs/1`` carries signed transactions into gatekeepers' bounded mempools;
- ``Wallet`` signs, submits and waits for finality, returning a ``Receipt``.

Every machine call happens on the trio thread without awaiting in between, so the machines
need no locks. Gossip validators do the real checking (a block or vote is relayed only once
it verified), which keeps invalid data from travelling further than one hop.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import trio

import phala_p2p.chain  # noqa: F401  (registers the core transaction kinds)
from phala_p2p.chain.block import Block, Commit, CommittedBlock, Proposal, Vote
from phala_p2p.chain.bodies import (
    EscrowOpen,
    EscrowRefund,
    EscrowRelease,
    GovPropose,
    GovVote,
    ProposalAction,
    Stake,
    StandingEscrowOpen,
    SubmitEvidence,
    Transfer,
    Unstake,
)
from phala_p2p.chain.consensus import (
    Action,
    Broadcast,
    CommitBlock,
    Consensus,
    ConsensusConfig,
    NeedSync,
    PersistSigned,
    ReportEvidence,
    consensus_message_limit,
)
from phala_p2p.chain.governance import ProposalRecord
from phala_p2p.chain.mempool import Mempool, MempoolConfig
from phala_p2p.chain.params import ChainParams, Genesis
from phala_p2p.chain.payments import Escrow
from phala_p2p.chain.settlement import Settlement, get_settlement
from phala_p2p.chain.store import BlockStore
from phala_p2p.chain.sync import (
    MAX_SYNC_REQUEST_BYTES,
    MAX_SYNC_RESPONSE_BYTES,
    SYNC_PROTOCOL,
    BlockVerdict,
    Follower,
    SyncRequest,
    SyncResponse,
    check_response,
    committed_block_limit,
    serve_sync_bytes,
)
from phala_p2p.chain.tx import MAX_TX_BODY, Signer, Tx, TxRejectReason, TxResult
from phala_p2p.chain.view import ChainView
from phala_p2p.config import ChainConfig
from phala_p2p.errors import ChainError, P2PError, ProtocolViolation, UsageError
from phala_p2p.net.gossip import ACCEPT, GossipMessage, Validation
from phala_p2p.wire.codec import decode, encode

if TYPE_CHECKING:
    from phala_p2p.node import Node

logger = logging.getLogger(__name__)

TOPIC_CONSENSUS = "phala/consensus/1"
TOPIC_BLOCKS = "phala/blocks/1"
TOPIC_TXS = "phala/txs/1"
STORE_FILE = "chain.sqlite"
MAX_PENDING = 4096  # own transactions awaiting finality

# Rejections a peer can cause by honest accident (races, a stale view): ignored, not punished.
_BENIGN_TX = {
    TxRejectReason.BAD_NONCE,
    TxRejectReason.DUPLICATE,
    TxRejectReason.MEMPOOL_FULL,
    TxRejectReason.INSUFFICIENT_FUNDS,
    TxRejectReason.UNKNOWN_ACCOUNT,
}


class TxTimeout(ChainError):
    """A submitted transaction was not finalized (nor found invalid) in time; it may still be."""

    def __init__(self, message: str, *, tx_id: bytes) -> None:
        super().__init__(message)
        self.tx_id = tx_id


class Head(NamedTuple):
    height: int
    hash: bytes
    time_ms: int


@dataclass(frozen=True)
class Receipt:
    """The outcome of a wallet call: finalized at ``height`` (``ok``), or why it was refused."""

    tx_id: bytes
    ok: bool
    height: int | None = None
    error: str | None = None  # a TxRejectReason value when not ok
    detail: str = ""
    proposal_id: int | None = None  # for a passed-in governance proposal

    def __bool__(self) -> bool:
        return self.ok


class ChainState:
    """Read-only view of the ledger at the node's finalized head."""

    def __init__(self, view: ChainView) -> None:
        self._view = view

    @property
    def params(self) -> ChainParams:
        return self._view.params

    def balance(self, account: bytes) -> int:
        return self._view.state.balance(account)

    def stake(self, account: bytes) -> int:
        return self._view.state.stake(account)

    def nonce(self, account: bytes) -> int:
        return self._view.state.nonce(account)

    def unbonding(self, account: bytes) -> list[tuple[int, int]]:
        """(release height, amount) pairs still unbonding."""
        return self._view.state.unbonding(account)

    def treasury(self) -> int:
        return self._view.state.treasury()

    def gatekeepers(self) -> dict[bytes, int]:
        """The gatekeeper set that signs the next block: account -> power."""
        return dict(self._view.validators.powers)

    def proposals(self) -> list[ProposalRecord]:
        return self._view.state.proposals()

    def proposal(self, proposal_id: int) -> ProposalRecord | None:
        return self._view.state.proposal(proposal_id)

    def escrow(self, escrow_id: bytes) -> Escrow | None:
        return self._view.state.escrow(escrow_id)

    def settlement(self, agreement_id: bytes) -> Settlement | None:
        """How a job's agreement was settled (paid, refunded, fuel used), or None."""
        return get_settlement(self._view.state, agreement_id)

    def allowed_measurements(self) -> list[bytes]:
        return self._view.state.allowed_measurements()

    def attestation_roots(self) -> list[bytes]:
        return self._view.state.attestation_roots()


@dataclass
class _Pending:
    tx: Tx
    done: trio.Event
    receipt: Receipt | None = None
    sent_at: float = 0.0


class ChainService:
    """A node's copy of the chain and its part in keeping it. Made by the node."""

    def __init__(
        self,
        node: Node,
        genesis: Genesis,
        config: ChainConfig,
        *,
        signer: Signer,
        store_path: str | Path,
    ) -> None:
        self._node = node
        self.genesis = genesis
        self.config = config
        self.signer = signer
        self.account: bytes = signer.public_key
        self.store = BlockStore(
            store_path, genesis_hash=genesis.genesis_hash, durable=config.durable
        )
        opened = False
        try:
            self.view = self.store.open_view(genesis)
            opened = True
        finally:
            if not opened:
                self.store.close()
        self.state = ChainState(self.view)
        self.mempool = Mempool(
            MempoolConfig(max_txs=config.mempool_max_txs, max_bytes=config.mempool_max_bytes)
        )
        self.is_gatekeeper_node = node.role.value == "gatekeeper"
        self.consensus: Consensus | None = None
        self.follower: Follower | None = None
        if self.is_gatekeeper_node:
            self.consensus = self.store.consensus(
                self.view,
                node.identity,
                mempool=self.mempool,
                config=ConsensusConfig(
                    rebroadcast_interval=config.rebroadcast_interval,
                    byzantine_double_sign=config.byzantine_double_sign,
                ),
            )
        else:
            self.follower = Follower(self.view, batch=config.sync_batch)
        self._metrics = node.metrics
        self._outbox_send, self._outbox_recv = trio.open_memory_channel[tuple[str, bytes]](1024)
        self._kick = trio.Event()
        self._sync_wake = trio.Event()
        self._head_changed = trio.Event()
        self._sync_target = 0
        self._sync_hint: set[str] = set()  # peers that showed us blocks from ahead
        self._last_block_at = time.monotonic()
        self._pending: dict[bytes, _Pending] = {}
        self._nonce_lock = trio.Lock()
        self._announced_height = self.view.height
        self._nursery: trio.Nursery | None = None
        self.on_block: list[Callable[[Block], None]] = []  # hooks for other services
        self._closed = False
        self._metrics.gauge("chain_height", lambda: self.view.height)
        self._metrics.gauge("mempool_txs", lambda: len(self.mempool))

    # -- reading ---------------------------------------------------------------------------

    @property
    def head(self) -> Head:
        return Head(self.view.height, self.view.head_hash, self.view.head_time_ms)

    @property
    def params(self) -> ChainParams:
        return self.view.params

    def block(self, height: int) -> Block:
        """The finalized block at ``height`` (UsageError if this node does not have it)."""
        if not isinstance(height, int) or height < 1:
            raise UsageError("block heights start at 1")
        cb = self.store.get_block(height)
        if cb is None:
            raise UsageError(f"no block {height} here (head is {self.view.height})")
        return cb.block

    def committed_block(self, height: int) -> CommittedBlock | None:
        return self.store.get_block(height)

    async def wait_for_height(self, height: int, timeout: float = 30.0) -> Head:
        """Wait until the head reaches ``height``; TimeoutError otherwise."""
        with trio.move_on_after(timeout):
            while self.view.height < height:
                await self._head_changed.wait()
            return self.head
        raise TimeoutError(f"height {height} not reached within {timeout}s (at {self.view.height})")

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.store.close()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        node = self._node
        params = self.view.params
        node.gossip.set_validator(TOPIC_BLOCKS, self._validate_block)
        node.gossip.set_validator(TOPIC_TXS, self._validate_tx)
        node.serve(
            SYNC_PROTOCOL,
            self._serve_sync,
            max_request=MAX_SYNC_REQUEST_BYTES,
            max_response=MAX_SYNC_RESPONSE_BYTES,
            max_streams_per_peer=4,
        )
        # every node joins the transaction topic at once: a topic joined at the first
        # publish has no mesh until the next heartbeat, and that publish would reach nobody
        subs = [await node.subscribe(TOPIC_BLOCKS), await node.subscribe(TOPIC_TXS)]
        if self.consensus is not None:
            node.gossip.set_validator(TOPIC_CONSENSUS, self._validate_consensus)
            subs.append(await node.subscribe(TOPIC_CONSENSUS))
        limit = consensus_message_limit(params)
        if limit > node.gossip.config.max_message_size:
            logger.warning(
                "max_block_bytes %d does not fit the gossip cap of %d: large proposals fail",
                params.max_block_bytes,
                node.gossip.config.max_message_size,
            )
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for sub in subs:
                    nursery.start_soon(self._drain, sub)
                nursery.start_soon(self._publisher)
                nursery.start_soon(self._syncer)
                nursery.start_soon(self._resender)
                if self.consensus is not None:
                    self._handle(self.consensus.start(time.time()))
                    nursery.start_soon(self._ticker, self.consensus)
                task_status.started()
        finally:
            for sub in subs:
                sub.close()

    async def _drain(self, sub: Any) -> None:
        # Validators did the work; the subscription only keeps the topic joined.
        async for _ in sub:
            pass

    async def _publisher(self) -> None:
        async for topic, data in self._outbox_recv:
            try:
                await self._node.gossip.publish(topic, data)
            except P2PError as err:
                self._metrics.count("chain_publish_failed", topic=topic)
                logger.info("publishing on %s failed: %s", topic, err)

    def _send(self, topic: str, data: bytes) -> None:
        try:
            self._outbox_send.send_nowait((topic, data))
        except trio.WouldBlock:
            self._metrics.count("chain_outbox_full", topic=topic)

    async def _ticker(self, machine: Consensus) -> None:
        while True:
            deadline = machine.next_deadline()
            wait = math.inf if deadline is None else max(0.0, deadline - time.time())
            kick = self._kick
            with trio.move_on_after(wait):
                await kick.wait()
            if kick.is_set():
                self._kick = trio.Event()
            now = time.time()
            deadline = machine.next_deadline()
            if deadline is not None and now >= deadline:
                self._handle(machine.on_timeout(now))

    # -- the driver ------------------------------------------------------------------------

    def _handle(self, actions: list[Action], *, announce: bool = True) -> None:
        """Carry out the machine's actions in order: what it signed is durable before it is
        sent, and blocks are durable before anything follows them."""
        committed: list[tuple[Block, Commit]] = []  # decided, not yet stored
        decided: list[tuple[Block, Commit]] = []
        try:
            for action in actions:
                if isinstance(action, PersistSigned):
                    self._store_blocks(committed)
                    self.store.save_signed(action.state, action.message)
                elif isinstance(action, Broadcast):
                    self._store_blocks(committed)
                    self._send(TOPIC_CONSENSUS, encode(action.msg))
                    self._metrics.count("consensus_sent", kind=type(action.msg).__name__.lower())
                elif isinstance(action, CommitBlock):
                    committed.append((action.block, action.commit))
                    decided.append((action.block, action.commit))
                elif isinstance(action, ReportEvidence):
                    self._report_evidence(action)
                elif isinstance(action, NeedSync):
                    self.want_sync(action.height)
            self._store_blocks(committed)
        finally:
            self._kick.set()
        if decided and len(self.mempool) and self.consensus is not None:
            self.txs_arrived()  # more are waiting: the next proposer need not idle
        if announce:
            for block, commit in decided:
                # the proposer announces; the others only if it did not (see _late_announce)
                if block.header.proposer == self.account:
                    self._announce(block, commit)
                elif self._nursery is not None:
                    self._nursery.start_soon(self._late_announce, block, commit)

    def _store_blocks(self, committed: list[tuple[Block, Commit]]) -> None:
        fresh = [bc for bc in committed if bc[0].height > self.store.head()]
        if not fresh:
            return
        self.store.put_blocks(fresh)
        committed.clear()
        if self.follower is not None:
            self.mempool.update(self.view)
        for block, _ in fresh:
            self._applied(block)
        self._settle_dropped()
        self._head_changed.set()
        self._head_changed = trio.Event()

    def _announce(self, block: Block, commit: Commit) -> None:
        if block.height <= self._announced_height:
            return
        self._announced_height = block.height
        self._send(TOPIC_BLOCKS, encode(CommittedBlock(block, commit)))

    async def _late_announce(self, block: Block, commit: Commit) -> None:
        await trio.sleep(max(0.5, self.view.params.block_time_ms / 1000))
        if block.height > self._announced_height:
            self._metrics.count("blocks_announced_late")
            self._announce(block, commit)

    def _applied(self, block: Block) -> None:
        """A block is finalized here and durable: settle receipts, wake waiters."""
        self._last_block_at = time.monotonic()
        self._metrics.count("blocks_applied")
        height = block.height
        proposal_index: dict[bytes, int] = {}
        for tx in block.txs:
            pending = self._pending.get(tx.id)
            pid = None
            if tx.kind == _GOV_PROPOSE_KIND:
                index = proposal_index.get(tx.sender, 0)
                proposal_index[tx.sender] = index + 1
                pid = self._proposal_id(tx.sender, height, index)
            if pending is not None and pending.receipt is None:
                self._settle(pending, Receipt(tx.id, True, height, proposal_id=pid))
        for hook in self.on_block:
            hook(block)

    def _settle_dropped(self) -> None:
        """Own transactions the mempool dropped after a block can no longer apply."""
        for pending in list(self._pending.values()):
            if pending.receipt is None and pending.tx.id not in self.mempool:
                result = self._check(pending.tx)
                reason = result.reason or TxRejectReason.BAD_NONCE
                detail = result.detail or "dropped: it can no longer apply"
                self._settle(pending, Receipt(pending.tx.id, False, None, reason, detail))

    def _proposal_id(self, sender: bytes, height: int, index: int) -> int | None:
        mine = [
            p
            for p in self.view.state.proposals()
            if p.proposer == sender and p.created_height == height
        ]
        mine.sort(key=lambda p: p.id)
        return mine[index].id if index < len(mine) else None

    def _report_evidence(self, action: ReportEvidence) -> None:
        self._metrics.count("evidence_seen")
        nonce = self.mempool.next_nonce(self.account, self.view)
        tx = Tx.sign(
            self.signer,
            chain_id=self.view.chain_id,
            nonce=nonce,
            fee=self.view.params.tx_fee,
            body=SubmitEvidence(action.evidence),
        )
        result = self.mempool.add(tx, self.view)
        if result.ok:
            logger.warning(
                "double-sign evidence against %s at height %d: submitted",
                action.evidence.vote_a.validator.hex()[:16],
                action.evidence.vote_a.height,
            )
            self._send(TOPIC_TXS, encode(tx))
        else:
            logger.info("evidence not submitted: %s %s", result.reason, result.detail)

    # -- gossip validators (they also apply: a block is relayed only once it verified) -----

    def _validate_consensus(self, msg: GossipMessage) -> Validation:
        machine = self.consensus
        assert machine is not None
        if msg.forwarder == self._node.peer_id:
            return ACCEPT  # our own, already in our machine
        try:
            obj = decode(msg.data, max_size=consensus_message_limit(self.view.params))
        except ProtocolViolation as err:
            return Validation.reject(f"consensus_{err.reason}")
        if not isinstance(obj, Proposal | Vote):
            return Validation.reject("consensus_wrong_kind")
        if obj.height < machine.height:
            return Validation.ignore("consensus_stale")
        if obj.height == machine.height:
            signer = obj.proposer if isinstance(obj, Proposal) else obj.validator
            if signer not in self.view.validators:
                return Validation.reject("consensus_not_a_gatekeeper")
            if not obj.verify(self.view.chain_id):
                return Validation.reject("consensus_bad_signature")
        try:
            actions = machine.on_message(obj, time.time())
        except ProtocolViolation as err:
            return Validation.reject(f"consensus_{err.reason}")
        self._handle(actions)
        self._metrics.count("consensus_received", kind=type(obj).__name__.lower())
        if obj.height > machine.height + 1:
            # beyond the next height the signer cannot be checked: not relayed, but it
            # says we are behind (the machine asks for sync once such messages verify)
            self._sync_hint.add(msg.forwarder)
            return Validation.ignore("consensus_ahead")
        return ACCEPT

    def _validate_block(self, msg: GossipMessage) -> Validation:
        if msg.forwarder == self._node.peer_id:
            return ACCEPT  # our own announcement of a block we hold
        limit = committed_block_limit(self.view.params, len(self.view.validators.powers))
        try:
            cb = decode(msg.data, max_size=limit, expect=CommittedBlock)
        except ProtocolViolation as err:
            return Validation.reject(f"block_{err.reason}")
        height = cb.block.height
        if height <= self.view.height:
            self._announced_height = max(self._announced_height, height)
            return Validation.ignore("block_old")
        if height > self.view.next_height:
            self._sync_hint.add(msg.forwarder)
            self.want_sync(height)
            return Validation.ignore("block_ahead")
        try:
            if self.consensus is not None:
                self._handle(
                    self.consensus.on_block_committed(cb.block, cb.commit, time.time()),
                    announce=False,
                )
            else:
                assert self.follower is not None
                verdict = self.follower.on_block(cb)
                if verdict is BlockVerdict.ACCEPTED:
                    self._handle([CommitBlock(cb.block, cb.commit)], announce=False)
        except ProtocolViolation as err:
            return Validation.reject(f"block_{err.reason}")
        self._announced_height = max(self._announced_height, height)
        return ACCEPT

    def _validate_tx(self, msg: GossipMessage) -> Validation:
        try:
            tx = decode(msg.data, max_size=MAX_TX_BODY + 1024, expect=Tx)
        except ProtocolViolation as err:
            return Validation.reject(f"tx_{err.reason}")
        if tx.chain_id != self.view.chain_id:
            return Validation.reject("tx_wrong_chain")
        if not tx.verify():
            return Validation.reject("tx_bad_signature")
        if msg.forwarder == self._node.peer_id:
            return ACCEPT  # our own: admitted (or not) before it was published
        if self.consensus is None:
            return ACCEPT  # relays check what can be checked without the state
        result = self.mempool.add(tx, self.view)
        if result.ok:
            self._metrics.count("txs_admitted")
            self.txs_arrived()
            return ACCEPT
        self._metrics.count("txs_refused", reason=str(result.reason))
        if result.reason in _BENIGN_TX:
            return Validation.ignore(f"tx_{result.reason}")
        return Validation.reject(f"tx_{result.reason}")

    # -- sync ------------------------------------------------------------------------------

    async def _serve_sync(self, peer: str, payload: bytes) -> bytes:
        request = decode(payload, max_size=MAX_SYNC_REQUEST_BYTES, expect=SyncRequest)
        self._metrics.count("sync_served")
        return serve_sync_bytes(request, self.store)

    def want_sync(self, height: int) -> None:
        """Blocks up to ``height`` exist elsewhere: fetch them now."""
        if height > self._sync_target:
            self._sync_target = height
        self._sync_wake.set()

    async def _syncer(self) -> None:
        """Sync when told to (blocks or votes from ahead) and when no block came for
        :meth:`quiet_after` seconds (a halted chain, or a partition that just healed)."""
        while True:
            wake = self._sync_wake
            quiet = self.quiet_after()
            with trio.move_on_after(quiet):
                await wake.wait()
            if wake.is_set():
                self._sync_wake = trio.Event()
            elif time.monotonic() - self._last_block_at < quiet:
                continue
            await self.sync_once()

    def quiet_after(self) -> float:
        """Seconds without a new block after which this node asks peers for blocks:
        ``sync_interval``, or two block times on a chain whose blocks come slower than
        that (there, every node asked a gatekeeper between every two blocks)."""
        return max(self.config.sync_interval, 2 * self.view.params.block_time_ms / 1000)

    def _sync_peers(self) -> list[str]:
        peers = self._node.peers()
        random.shuffle(peers)
        known = self._node.discovery.known
        hinted = [p for p in peers if p in self._sync_hint]
        keepers = [p for p in peers if p not in self._sync_hint and _role(known, p) == "gatekeeper"]
        rest = [p for p in peers if p not in self._sync_hint and p not in keepers]
        self._sync_hint.clear()
        return hinted + keepers + rest

    async def sync_once(self, *, max_peers: int = 3) -> int:
        """Fetch finalized blocks from peers until none has more; returns how many applied."""
        applied = 0
        tried = 0
        self._metrics.count("sync_attempts")
        for peer in self._sync_peers():
            if tried >= max_peers:
                break
            tried += 1
            try:
                got = await self._sync_from(peer)
            except (P2PError, ProtocolViolation) as err:
                self._metrics.count("sync_failed")
                logger.info("sync from %s failed: %s", peer, err)
                continue
            applied += got
            if self.view.height >= self._sync_target:
                break
        if applied:
            logger.info("synced %d blocks, head now %d", applied, self.view.height)
        return applied

    async def _sync_from(self, peer: str) -> int:
        applied = 0
        while True:
            request = SyncRequest(self.view.next_height, self.config.sync_batch)
            raw = await self._node.request(
                peer,
                SYNC_PROTOCOL,
                encode(request),
                timeout=30.0,
                max_response=MAX_SYNC_RESPONSE_BYTES,
            )
            response = decode(raw, max_size=MAX_SYNC_RESPONSE_BYTES, expect=SyncResponse)
            check_response(request, response)
            got = self._apply_synced(request, response)
            applied += got
            self._metrics.count("blocks_synced", got)
            if got == 0 or self.view.height >= response.head_height:
                return applied

    def _apply_synced(self, request: SyncRequest, response: SyncResponse) -> int:
        """Apply a sync answer's blocks; raises ProtocolViolation at the first bad one (the
        good ones before it stay applied)."""
        before = self.view.height
        if self.consensus is not None:
            actions: list[Action] = []
            try:
                for cb in response.blocks:
                    actions += self.consensus.on_block_committed(cb.block, cb.commit, time.time())
            finally:
                self._handle(actions, announce=False)
        else:
            assert self.follower is not None
            outcome = self.follower.on_response(request, response)
            self._handle(
                [CommitBlock(cb.block, cb.commit) for cb in outcome.applied], announce=False
            )
            if outcome.error is not None:
                raise outcome.error
        return self.view.height - before

    # -- transactions ----------------------------------------------------------------------

    def _check(self, tx: Tx) -> TxResult:
        """What the head state says of ``tx`` if it were next."""
        early = self.view.state.check_tx(tx)
        if early is not None:
            return early
        token = self.view.state.checkpoint()
        try:
            return self.view.state.apply_tx(tx, self.view.next_height)
        finally:
            self.view.state.rollback(token)

    def txs_arrived(self) -> None:
        """Transactions entered the mempool: a waiting proposer may start early."""
        if self.consensus is not None and self.consensus.started:
            self._handle(self.consensus.on_txs_available(time.time()))

    def _settle(self, pending: _Pending, receipt: Receipt) -> None:
        pending.receipt = receipt
        pending.done.set()
        self._metrics.count("receipts", ok=str(receipt.ok).lower())

    async def submit(
        self, body: Any, *, fee: int | None = None, wait: bool = True, timeout: float | None = None
    ) -> Receipt:
        """Sign ``body`` as this node's account, submit it and (``wait``) wait for finality.

        A transaction the head state refuses is not sent: its receipt says why at once.
        ``TxTimeout`` if it is neither finalized nor refused within ``timeout``.
        """
        if len(self._pending) >= MAX_PENDING:
            raise UsageError(f"{MAX_PENDING} transactions of this node are already pending")
        async with self._nonce_lock:
            nonce = self.mempool.next_nonce(self.account, self.view)
            tx = Tx.sign(
                self.signer,
                chain_id=self.view.chain_id,
                nonce=nonce,
                fee=self.view.params.tx_fee if fee is None else fee,
                body=body,
            )
            result = self.mempool.add(tx, self.view)
            if not result.ok:
                return Receipt(tx.id, False, None, result.reason, result.detail)
            # Pending before the machine hears of it: a lone gatekeeper may propose, commit
            # and apply the block within txs_arrived(), and _applied settles pending ones.
            pending = _Pending(tx, trio.Event(), sent_at=time.monotonic())
            self._pending[tx.id] = pending
            self.txs_arrived()
            self._send(TOPIC_TXS, encode(tx))
        if not wait:
            return Receipt(tx.id, True, None, None, "submitted")
        limit = self.config.receipt_timeout if timeout is None else timeout
        try:
            with trio.move_on_after(limit):
                await pending.done.wait()
        finally:
            if pending.receipt is not None or not wait:
                self._pending.pop(tx.id, None)
        if pending.receipt is None:
            raise TxTimeout(
                f"transaction {tx.id.hex()[:16]} not finalized within {limit}s "
                "(it stays pending and may still be)",
                tx_id=tx.id,
            )
        return pending.receipt

    async def submit_tx(self, tx: Tx) -> TxResult:
        """Publish a transaction signed elsewhere (checked against the head state first)."""
        result = (
            self._check(tx) if tx.verify() else TxResult(tx.id, False, TxRejectReason.BAD_SIGNATURE)
        )
        if result.ok:
            result = self.mempool.add(tx, self.view)
        if result.ok:
            self._send(TOPIC_TXS, encode(tx))
        return result

    async def _resender(self) -> None:
        """Publish own pending transactions again: gossip is lossy and gatekeepers restart."""
        interval = self.config.resend_interval
        while True:
            await trio.sleep(interval / 2)
            now = time.monotonic()
            for pending in list(self._pending.values()):
                if pending.receipt is not None:
                    self._pending.pop(pending.tx.id, None)
                elif now - pending.sent_at >= interval and pending.tx.id in self.mempool:
                    pending.sent_at = now
                    self._metrics.count("txs_resent")
                    self._send(TOPIC_TXS, encode(pending.tx))


def _role(known: dict[str, Any], peer: str) -> str:
    record = known.get(peer)
    return "" if record is None else str(record.role)


_GOV_PROPOSE_KIND = 118


class Wallet:
    """Sign, submit, wait for finality. Every call returns a :class:`Receipt`."""

    def __init__(self, chain: ChainService) -> None:
        self._chain = chain

    @property
    def account(self) -> bytes:
        return self._chain.account

    @property
    def balance(self) -> int:
        return self._chain.state.balance(self.account)

    async def transfer(self, to: bytes, amount: int, **kw: Any) -> Receipt:
        return await self._chain.submit(Transfer(_account(to), _amount(amount)), **kw)

    async def stake(self, amount: int, **kw: Any) -> Receipt:
        return await self._chain.submit(Stake(_amount(amount)), **kw)

    async def unstake(self, amount: int, **kw: Any) -> Receipt:
        return await self._chain.submit(Unstake(_amount(amount)), **kw)

    async def propose(
        self,
        action: ProposalAction | str,
        *,
        param: str = "",
        value: int = 0,
        account: bytes = b"",
        measurement: bytes = b"",
        amount: int = 0,
        **kw: Any,
    ) -> Receipt:
        """A governance proposal; the receipt's ``proposal_id`` names it for ``vote``."""
        try:
            body = GovPropose(ProposalAction(action), param, value, account, measurement, amount)
            body.validate()
        except (ValueError, ProtocolViolation) as err:
            raise UsageError(f"bad proposal: {err}") from err
        return await self._chain.submit(body, **kw)

    async def vote(self, proposal_id: int, yes: bool, **kw: Any) -> Receipt:
        return await self._chain.submit(GovVote(int(proposal_id), bool(yes)), **kw)

    async def open_escrow(
        self, beneficiary: bytes, amount: int, expires_height: int, **kw: Any
    ) -> Receipt:
        """Lock ``amount`` for ``beneficiary``; the escrow's id is the receipt's ``tx_id``."""
        body = EscrowOpen(_account(beneficiary), _amount(amount), int(expires_height))
        return await self._chain.submit(body, **kw)

    async def open_standing_escrow(
        self, beneficiary: bytes, amount: int, expires_height: int, **kw: Any
    ) -> Receipt:
        """Lock ``amount`` for ``beneficiary`` to back many job agreements with it (each
        settlement pays from it and leaves the rest); the escrow's id is the receipt's
        ``tx_id``."""
        body = StandingEscrowOpen(_account(beneficiary), _amount(amount), int(expires_height))
        return await self._chain.submit(body, **kw)

    async def release_escrow(self, escrow_id: bytes, amount: int, **kw: Any) -> Receipt:
        return await self._chain.submit(EscrowRelease(_account(escrow_id), _amount(amount)), **kw)

    async def refund_escrow(self, escrow_id: bytes, **kw: Any) -> Receipt:
        return await self._chain.submit(EscrowRefund(_account(escrow_id)), **kw)


def _account(value: bytes) -> bytes:
    if isinstance(value, str):
        try:
            value = bytes.fromhex(value)
        except ValueError as err:
            raise UsageError(f"not a hex account: {value!r}") from err
    if not isinstance(value, bytes) or len(value) != 32:
        raise UsageError("an account (or escrow id) is 32 bytes")
    return value


def _amount(value: int) -> int:
    if type(value) is not int or value <= 0:
        raise UsageError(f"amounts are positive integers, got {value!r}")
    return value
