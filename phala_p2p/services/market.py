"""The market on the network: capacity adverts on ``phala/capacity/1``, the miner directory
and ``/phala/market/1.0.0``, and negotiation on ``/phala/negotiate/1.0.0``
(``protocols/market.md``).

Every node that keeps the chain keeps a directory. It takes adverts from gossip (validated
against the chain: signature of a registered, staked, unrevoked enclave; newest sequence
number; not expired) and pulls them from a peer over ``/phala/market/1.0.0`` when the peer
connects and every ``sync_interval``: gossip does not backfill, so a new client, or a node
whose partition just healed, learns what it missed by asking. Pages carry each advert in
the gossip envelope its miner published, and a node relays the envelopes it learned that way
unchanged: gossip ids are envelope hashes, so the relay spreads the miner's own message to the
peers that missed it and dies out at those that did not.

A registered miner advertises (signed by its enclave) at start, at half its TTL, and
whenever its free slots change, at most once per ``advert_interval``; it answers proposals
with :class:`~phala_p2p.market.negotiation.MinerBook`. A client finds miners with
:meth:`MarketService.find_miners` and reaches a co-signed agreement with
:meth:`MarketService.negotiate`: it attests the miner itself, opens an escrow on chain for
the miner's operator, and negotiates. Escrows that back no agreement, or outlive it, are
refunded once they expire.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import trio

from phala_p2p.chain.block import Block
from phala_p2p.chain.bodies import EscrowRefund
from phala_p2p.chain.miners import MinerStatus, get_miner, miner_by_enclave
from phala_p2p.config import MarketConfig, Role
from phala_p2p.errors import (
    AttestationError,
    ConnectionLost,
    NegotiationFailed,
    P2PError,
    ProtocolNotSupported,
    ProtocolViolation,
    RequestTimeout,
    UsageError,
)
from phala_p2p.market.advert import (
    PUNISHABLE,
    AdvertReason,
    CapacityAdvert,
    MinerFacts,
    SignedAdvert,
    advert_payload,
    max_payment,
)
from phala_p2p.market.directory import Advert, Constraints, Directory
from phala_p2p.market.negotiation import (
    MAX_NEGOTIATE_MESSAGE,
    PROPOSAL_ID_LEN,
    Agreement,
    Ask,
    ClientNegotiation,
    Counter,
    EscrowFacts,
    MinerBook,
    MinerPolicy,
    Proposal,
    Refusal,
    RefuseReason,
    SignAgreement,
    SignCounter,
    agreement_id,
)
from phala_p2p.net.batching import with_ready
from phala_p2p.net.gossip import ACCEPT, GossipMessage, Validation
from phala_p2p.net.host import peer_id_of
from phala_p2p.net.locks import KeyedLocks
from phala_p2p.wire.codec import decode, encode, message
from phala_p2p.wire.envelope import open_envelope, peek_envelope

if TYPE_CHECKING:
    from phala_p2p.node import Node
    from phala_p2p.services.chain import Receipt
    from phala_p2p.services.tee import VerifiedMiner

logger = logging.getLogger(__name__)

CAPACITY_TOPIC: Final = "phala/capacity/1"
MARKET_PROTOCOL: Final = "/phala/market/1.0.0"
NEGOTIATE_PROTOCOL: Final = "/phala/negotiate/1.0.0"
MAX_SIGNED_ADVERT: Final = 2300
MAX_ADVERT_ENVELOPE: Final = MAX_SIGNED_ADVERT + 128  # a gossip envelope around one advert
PAGE_SIZE: Final = 256
MAX_PAGES: Final = 64  # at most 16,384 adverts per pull
MAX_PAGE_BYTES: Final = PAGE_SIZE * (MAX_ADVERT_ENVELOPE + 3) + 128
RELAY_QUEUE: Final = 256
RELAY_BATCH: Final = 64  # adverts relayed in one go (one wait for room in the send queues)
CONNECT_PULL_BURST: Final = 3  # pulls on new connections: at most this many at once,
CONNECT_PULLS_PER_S: Final = 1.0  # then this many a second
MAX_QUERY: Final = 128
PULL_COOLDOWN: Final = 2.0  # pull from one peer at most this often
PULL_QUEUE: Final = 64
ATTEST_CACHE_S: Final = 60.0
ESCROW_WAIT_S: Final = 5.0  # how long a miner waits for its chain to reach a proposal's escrow
MAX_AGREEMENT_WAITS: Final = 1024  # job sessions waiting for their agreement, at most
SETTLE_MARGIN_BLOCKS: Final = 100


@message(402)
@dataclass(frozen=True)
class MarketQuery:
    """Ask for held adverts of enclaves after ``after`` (in byte order), ``limit`` at most."""

    after: bytes = field(metadata={"max_len": 32})
    limit: int = field(metadata={"min": 1, "max": PAGE_SIZE})


@message(403)
@dataclass(frozen=True)
class MarketPage:
    """Held adverts, each in the gossip envelope its miner published it in."""

    adverts: tuple[bytes, ...] = field(
        metadata={"max_len": PAGE_SIZE, "item_max_len": MAX_ADVERT_ENVELOPE}
    )
    next: bytes = field(metadata={"max_len": 32})  # empty: the last page


DEFAULT_MAX_JOB_INPUT = 1 << 40
"""Bytes a miner takes per job unless ``[market] max_input`` says otherwise (1 TiB)."""


def now_ms() -> int:
    return int(time.time() * 1000)


class _Facts:
    """ChainFacts over a node's finalized state and the revocations gossiped to it."""

    def __init__(self, node: Node) -> None:
        chain = node.chain
        self._state = chain.view.state
        self.chain_id: str = chain.view.chain_id
        self.height: int = chain.view.height
        self.min_stake: int = chain.params.min_miner_stake
        self._revoked = node.keys.revoked if node.keys is not None else {}

    def miner(self, operator: bytes) -> MinerFacts | None:
        record = get_miner(self._state, operator)
        if record is None:
            return None
        return MinerFacts(
            enclave=record.identity_pub,
            registered_height=record.registered_height,
            active=record.status == MinerStatus.ACTIVE,
            reason=record.reason,
            stake=self._state.stake(operator),
        )

    def revoked(self, enclave: bytes) -> str | None:
        return self._revoked.get(enclave)


class MarketService:
    """A node's part in the market. Made by the node when it keeps the chain."""

    def __init__(self, node: Node, config: MarketConfig) -> None:
        self._node = node
        self.config = config
        self.directory = Directory(max_entries=config.max_adverts)
        self.book: MinerBook | None = None  # a miner's, once it is registered
        self.advert: SignedAdvert | None = None  # a miner's latest own advert
        self.agreements: OrderedDict[bytes, Agreement] = OrderedDict()  # recent, both sides
        self._changed = trio.Event()  # the directory took or dropped something
        self._advert_due = trio.Event()  # a miner's slots changed
        self._wake_expiry = trio.Event()
        self._pulled = trio.Event()  # a first pull has been answered
        self._send_pull, self._pulls = trio.open_memory_channel[str](PULL_QUEUE)
        self._send_relay, self._relays = trio.open_memory_channel[bytes](RELAY_QUEUE)
        self._connect_tokens = float(CONNECT_PULL_BURST)
        self._connect_tokens_at = 0.0
        self._last_pull: dict[str, float] = {}
        self._locks = KeyedLocks[bytes]()
        self._attested: OrderedDict[str, tuple[VerifiedMiner, float]] = OrderedDict()
        self._escrows: dict[bytes, int] = {}  # our escrows to refund at expiry -> height
        self._standing = _StandingEscrows()  # ours, reused by later agreements
        self._agreement_waits: dict[bytes, trio.Event] = {}  # a miner's: see wait_agreement
        self._seq = 0

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        node = self._node
        node.set_validator(CAPACITY_TOPIC, self._validate)
        sub = await node.subscribe(CAPACITY_TOPIC)
        node.serve(
            MARKET_PROTOCOL,
            self._serve_market,
            max_request=MAX_QUERY,
            max_response=MAX_PAGE_BYTES,
            max_streams_per_peer=4,
        )
        node.chain.on_block.append(self._on_block)
        node.events.on_connected.append(self._on_connected)
        miner = node.role is Role.MINER and node.tee is not None
        if miner:
            node.serve(
                NEGOTIATE_PROTOCOL,
                self._serve_negotiate,
                max_request=MAX_NEGOTIATE_MESSAGE,
                max_response=MAX_NEGOTIATE_MESSAGE,
                handler_timeout=15.0,
                max_streams_per_peer=8,
            )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._drain, sub)
                nursery.start_soon(self._expirer)
                nursery.start_soon(self._puller)
                nursery.start_soon(self._relayer)
                nursery.start_soon(self._anti_entropy)
                for peer in node.peers():
                    self._on_connected(peer)
                if miner:
                    nursery.start_soon(self._advertise)
                task_status.started()
        finally:
            sub.close()
            node.events.on_connected.remove(self._on_connected)

    async def _drain(self, sub: Any) -> None:
        async for _ in sub:
            pass  # the validator records what it accepts

    def _facts(self) -> _Facts:
        return _Facts(self._node)

    def _count(self, reason: AdvertReason | None, source: str) -> None:
        if reason is None:
            self._node.metrics.count("adverts_accepted", source=source)
            self._notify()
        else:
            self._node.metrics.count("adverts_refused", reason=reason.value)
            if reason is AdvertReason.CHAIN_BEHIND:
                height = self.directory.pending_height()
                if height is not None:
                    self._node.chain.want_sync(height)

    async def wait_for_change(self) -> None:
        """Return once the directory next takes or drops an advert."""
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
        self._wake_expiry.set()

    # -- the directory ---------------------------------------------------------------------

    def _validate(self, msg: GossipMessage) -> Validation:
        try:
            signed = decode(msg.data, max_size=MAX_SIGNED_ADVERT, expect=SignedAdvert)
        except ProtocolViolation as err:
            self._node.metrics.count("adverts_refused", reason=f"decode_{err.reason}")
            return Validation.reject(f"advert_{err.reason}")
        reason = self.directory.offer(
            signed, self._facts(), now_ms(), sender=msg.sender, envelope=msg.envelope
        )
        self._count(reason, "gossip")
        if reason is None:
            return ACCEPT
        if reason in PUNISHABLE:
            return Validation.reject(f"advert_{reason.value}")
        return Validation.ignore(f"advert_{reason.value}")

    def _on_block(self, block: Block) -> None:
        self._refresh(now_ms())
        self._refund_expired(block.height)
        if self.advert is not None and self.book is not None:
            record = miner_by_enclave(self._node.chain.view.state, self.book.enclave)
            if record is None or record.status != MinerStatus.ACTIVE:
                self._advert_due.set()  # the advertiser stops advertising a revoked miner

    async def _expirer(self) -> None:
        while True:
            self._wake_expiry = trio.Event()
            next_ms = self.directory.next_expiry_ms()
            if self.book is not None:
                deadline = self.book.next_deadline_ms()
                if deadline is not None:
                    next_ms = deadline if next_ms is None else min(next_ms, deadline)
            delay = 60.0 if next_ms is None else max(0.0, (next_ms - now_ms()) / 1000) + 0.01
            with trio.move_on_after(delay):
                await self._wake_expiry.wait()
            now = now_ms()
            if self.book is not None:
                self.book.expire(now)
            self._refresh(now)

    def _refresh(self, now: int) -> None:
        """Drop what expired or lost the chain's backing, and count it by reason."""
        dropped = self.directory.refresh(self._facts(), now)
        for reason, n in dropped.items():
            self._node.metrics.count("adverts_dropped", n, reason=reason.value)
        if dropped:
            self._notify()

    async def _serve_market(self, peer: str, payload: bytes) -> bytes:
        query = decode(payload, max_size=MAX_QUERY, expect=MarketQuery)
        entries, cursor = self.directory.entries_page(query.after, query.limit, now_ms())
        self._node.metrics.count("market_pages_served")
        unserved = sum(1 for a in entries if not a.envelope)
        if unserved:  # offered to the directory by hand (tests, tools), not by the network
            self._node.metrics.count("adverts_unserved", unserved, reason="no_envelope")
        return encode(MarketPage(tuple(a.envelope for a in entries if a.envelope), cursor))

    def _on_connected(self, peer: str) -> None:
        # A heal reconnects many peers at once, and one pull across the cut is enough: its
        # adverts are relayed by gossip. Pull from the first few connections, not from
        # every one (each pull is a stream and a page of envelopes on a peer that is busy
        # reconnecting too); anti-entropy still asks a random peer every sync_interval.
        now = trio.current_time()
        self._connect_tokens = min(
            CONNECT_PULL_BURST,
            self._connect_tokens + (now - self._connect_tokens_at) * CONNECT_PULLS_PER_S,
        )
        self._connect_tokens_at = now
        if self._connect_tokens < 1:
            self._node.metrics.count("market_pulls_skipped", reason="connect_rate")
            return
        self._connect_tokens -= 1
        self._queue_pull(peer)

    def _queue_pull(self, peer: str) -> None:
        try:
            self._send_pull.send_nowait(peer)
        except trio.WouldBlock:
            self._node.metrics.count("market_pulls_skipped", reason="queue_full")

    async def _puller(self) -> None:
        async with trio.open_nursery() as nursery:
            limit = trio.CapacityLimiter(4)
            async for peer in self._pulls:
                last = self._last_pull.get(peer)
                if last is not None and trio.current_time() - last < PULL_COOLDOWN:
                    continue
                self._last_pull[peer] = trio.current_time()
                if len(self._last_pull) > 4096:  # bounded: forget peers past their cooldown
                    cutoff = trio.current_time() - PULL_COOLDOWN
                    self._last_pull = {p: t for p, t in self._last_pull.items() if t > cutoff}
                nursery.start_soon(self._pull_quietly, peer, limit)

    async def _pull_quietly(self, peer: str, limit: trio.CapacityLimiter) -> None:
        async with limit:
            try:
                await self.pull(peer)
            except (P2PError, ProtocolViolation) as err:
                logger.debug("market pull from %s failed: %s", peer, err)

    async def _anti_entropy(self) -> None:
        while True:
            await trio.sleep(self.config.sync_interval)  # a period, not a wait for an event
            peers = self._node.peers()
            if peers:
                self._queue_pull(random.choice(peers))

    async def pull(self, peer: str, *, timeout: float = 5.0) -> int:
        """Ask ``peer`` for every advert it holds; returns how many were new to us."""
        after, taken = b"", 0
        for _ in range(MAX_PAGES):
            raw = await self._node.request(
                peer,
                MARKET_PROTOCOL,
                encode(MarketQuery(after, PAGE_SIZE)),
                timeout=timeout,
                max_response=MAX_PAGE_BYTES,
            )
            page = decode(raw, max_size=MAX_PAGE_BYTES, expect=MarketPage)
            facts, now = self._facts(), now_ms()
            for envelope in page.adverts:
                taken += self._take_pulled(envelope, facts, now)
            if not page.next:
                break
            if page.next <= after:
                raise ProtocolViolation("market page cursor did not advance")
            after = page.next
        self._node.metrics.count("market_pulls")
        self._pulled.set()
        return taken

    def _take_pulled(self, envelope: bytes, facts: _Facts, now: int) -> bool:
        """Offer an advert a peer handed us in its miner's envelope; relay it if it was new
        to us (gossip does not backfill: our mesh may have missed it too)."""
        try:
            env = peek_envelope(envelope, max_size=MAX_ADVERT_ENVELOPE)
            signed = decode(env.body, max_size=MAX_SIGNED_ADVERT, expect=SignedAdvert)
            known = self.directory.known(signed)
            if known is not None:  # most of a pull once directories agree: no signature work
                self._count(known, "pull")
                return False
            open_envelope(envelope, domain=CAPACITY_TOPIC, max_size=MAX_ADVERT_ENVELOPE)
        except ProtocolViolation as err:
            self._node.metrics.count("adverts_refused", reason=f"decode_{err.reason}")
            return False
        sender = peer_id_of(env.signer)
        reason = self.directory.offer(signed, facts, now, sender=sender, envelope=envelope)
        self._count(reason, "pull")
        if reason is not None:
            return False
        try:
            self._send_relay.send_nowait(envelope)
        except trio.WouldBlock:
            self._node.metrics.count("relay_skipped", reason="queue_full")
        return True

    async def _relayer(self) -> None:
        async for envelope in self._relays:
            batch = with_ready(envelope, self._relays, RELAY_BATCH)  # a pull's finds together
            try:
                await self._node.gossip.relay_many(CAPACITY_TOPIC, batch)
            except (P2PError, ProtocolViolation) as err:
                logger.debug("advert relay failed: %s", err)

    async def find_miners(
        self, *, wait: float = 0.0, timeout: float = 10.0, **constraints: Any
    ) -> list[Advert]:
        """Verified adverts that meet ``constraints`` (:class:`Constraints`: ``min_cores``,
        ``min_memory``, ``min_fuel_per_s``, ``max_price``, ``min_free_slots``,
        ``input_size``, ``fuel``, ``tags``, ``exclude``, ``limit``, ``sort``), best first.

        A node that has not yet heard from any peer first asks connected peers for their
        adverts (waiting up to ``timeout`` for a connection and for its chain to reach the
        miners' registrations). With ``wait`` > 0, waits up to that long for a first match.
        """
        wanted = Constraints.from_kwargs(**constraints)
        if not self._pulled.is_set():
            with trio.move_on_after(timeout):
                await self._first_pull()
        height = self.directory.pending_height()
        if height is not None:
            with trio.move_on_after(timeout):
                await self._node.chain.wait_for_height(height, timeout=timeout)
            self._refresh(now_ms())
        found = self._select(wanted)
        if found or wait <= 0:
            return found
        with trio.move_on_after(wait):
            while not found:
                await self._changed.wait()
                found = self._select(wanted)
        return found

    def _select(self, wanted: Constraints) -> list[Advert]:
        return self.directory.select(wanted, now_ms(), self._node.health.rtt)

    async def _first_pull(self) -> None:
        while not self._pulled.is_set():
            peers = self._node.peers()
            if peers:
                async with trio.open_nursery() as nursery:
                    for peer in random.sample(peers, min(3, len(peers))):
                        nursery.start_soon(self._pull_quietly, peer, trio.CapacityLimiter(1))
            if not self._pulled.is_set():
                with trio.move_on_after(0.5):  # re-check for peers; the pull may land first
                    await self._changed.wait()

    # -- a miner's adverts -----------------------------------------------------------------

    async def _advertise(self) -> None:
        node, config = self._node, self.config
        tee = node.tee
        assert tee is not None
        await tee.ready.wait()
        enclave, info = tee.enclave, tee.info
        assert enclave is not None
        assert info is not None
        record = await self._wait_registered(info.identity_pub)
        fuel_per_s = int(await enclave.benchmark())
        limits = info.limits
        # Streaming jobs take input of any size with bounded memory; a job that needs its
        # input whole is refused by the enclave above the executor's max_input.
        max_input = config.max_input or DEFAULT_MAX_JOB_INPUT
        self.book = MinerBook(
            chain_id=node.chain.view.chain_id,
            enclave=info.identity_pub,
            operator=record.operator,
            peer_id=node.peer_id,
            policy=MinerPolicy(
                price=config.price,
                slots=config.slots,
                max_fuel=limits.max_fuel,
                max_input=max_input,
                max_rounds=config.max_rounds,
                offer_ttl_ms=int(config.offer_ttl * 1000),
                min_deadline_ms=int(config.min_deadline * 1000),
                max_deadline_ms=int(config.max_deadline * 1000),
                min_escrow_blocks=config.min_escrow_blocks,
            ),
        )
        self.book.on_change = self._slots_changed
        last = -math.inf
        while True:
            record = miner_by_enclave(node.chain.view.state, info.identity_pub)
            if record is None or record.status != MinerStatus.ACTIVE:
                logger.warning("miner no longer registered: adverts stop")
                self.advert = None
                record = await self._wait_registered(info.identity_pub)
            self._advert_due = trio.Event()
            wait = config.advert_interval - (trio.current_time() - last)
            if wait > 0:
                await trio.sleep(wait)  # pacing: at most one advert per advert_interval
            last = trio.current_time()
            await self._publish_advert(record.registered_height, fuel_per_s, max_input)
            with trio.move_on_after(config.advert_ttl / 2):
                await self._advert_due.wait()

    def readvertise(self) -> None:
        """A miner: publish a fresh advert now (still at most one per ``advert_interval``)."""
        if self._node.role is not Role.MINER:
            raise UsageError("only miners advertise")
        self._advert_due.set()

    def _slots_changed(self) -> None:
        self._advert_due.set()
        self._wake_expiry.set()

    async def _wait_registered(self, enclave: bytes) -> Any:
        chain = self._node.chain
        while True:
            record = miner_by_enclave(chain.view.state, enclave)
            if record is not None and record.status == MinerStatus.ACTIVE:
                return record
            await chain.wait_for_height(chain.head.height + 1, timeout=math.inf)

    async def _publish_advert(
        self, registered_height: int, fuel_per_s: int, max_input: int
    ) -> None:
        node, config, book = self._node, self.config, self.book
        tee = node.tee
        assert book is not None
        assert tee is not None
        assert tee.enclave is not None
        assert tee.info is not None
        now = now_ms()
        self._seq = max(self._seq + 1, now)  # grows across restarts without a stored counter
        addrs = tuple(a.rsplit("/p2p/", 1)[0] for a in node.listen_addrs)[:4]
        advert = CapacityAdvert(
            chain_id=book.chain_id,
            peer_id=node.peer_id,
            addrs=addrs,
            operator=book.operator,
            enclave=book.enclave,
            registered_height=registered_height,
            cores=os.cpu_count() or 1,
            memory=tee.info.limits.memory_cap_bytes,
            fuel_per_s=max(1, fuel_per_s),
            price=book.policy.price,
            max_input=max_input,
            max_fuel=book.policy.max_fuel,
            slots=book.policy.slots,
            free_slots=book.free_slots,
            tags=config.tags,
            seq=self._seq,
            issued_ms=now,
            expires_ms=now + int(config.advert_ttl * 1000),
        )
        payload = advert_payload(advert)
        signed = SignedAdvert(payload, await tee.enclave.sign("advert", payload))
        self.advert = signed
        # Our directory holds it, in its envelope, even if no peer hears it now: a pull
        # hands peers that envelope, which they can relay as ours.
        envelope = node.seal(CAPACITY_TOPIC, encode(signed))
        self._count(self.directory.offer(signed, self._facts(), now, envelope=envelope), "own")
        try:
            await node.relay(CAPACITY_TOPIC, envelope)
            node.metrics.count("adverts_published")
        except P2PError as err:
            logger.info("advert not published: %s", err)

    # -- negotiation: the miner's side -----------------------------------------------------

    async def _serve_negotiate(self, peer: str, payload: bytes) -> bytes:
        proposal = decode(payload, max_size=MAX_NEGOTIATE_MESSAGE, expect=Proposal)
        book = self.book
        if book is None:
            refusal = Refusal(
                proposal.proposal_id,
                proposal.round,
                RefuseReason.NOT_SERVING.value,
                "this miner is not advertising yet",
                1000,
            )
            return encode(refusal)
        async with self._locks.hold(proposal.proposal_id):
            reply = await self._answer(book, proposal)
        self._node.metrics.count("proposals_answered", answer=type(reply).__name__.lower())
        return encode(reply)

    async def _answer(self, book: MinerBook, proposal: Proposal) -> Agreement | Counter | Refusal:
        chain = self._node.chain
        tee = self._node.tee
        assert tee is not None
        assert tee.enclave is not None
        if chain.head.height < proposal.escrow_height:
            with trio.move_on_after(ESCROW_WAIT_S):
                chain.want_sync(proposal.escrow_height)
                await chain.wait_for_height(proposal.escrow_height, timeout=ESCROW_WAIT_S)
        found = chain.state.escrow(proposal.terms.escrow_id)
        escrow = None
        if found is not None:
            if found.standing:
                self._unback(book, proposal.terms.escrow_id)
            escrow = EscrowFacts(
                found.payer, found.beneficiary, found.amount, found.expires_height, found.standing
            )
        decision = book.decide(proposal, now_ms(), escrow=escrow, height=chain.head.height)
        if isinstance(decision, SignCounter):
            counter = decision.counter
            sig = await tee.enclave.sign("counter", counter.unsigned())
            return book.countered(proposal, dataclasses.replace(counter, miner_sig=sig))
        if isinstance(decision, SignAgreement):
            agreement: Agreement | None = None
            try:
                terms = proposal.terms
                sig = await tee.enclave.sign("agreement", terms.payload())
                agreement = book.agreed(proposal, Agreement(terms, proposal.client_sig, sig))
            finally:
                if agreement is None:
                    book.abandon(proposal)
            self._keep_agreement(agreement)
            logger.info("agreement %s with %s", agreement.id.hex()[:12], proposal.terms.client_peer)
            return agreement
        return decision

    def _unback(self, book: MinerBook, escrow_id: bytes) -> None:
        """Stop counting, against a standing escrow, our agreements on it that were settled
        (the chain paid them from it) or can no longer be: past their deadline and the
        sessions' grace with no receipt from our enclave."""
        node = self._node
        lapsed = now_ms() - int(node.jobs.config.grace * 1000)
        for aid, deadline_ms in book.backing(escrow_id):
            if node.chain.state.settlement(aid) is not None or (
                deadline_ms < lapsed and aid not in node.jobs.receipts
            ):
                book.settled(escrow_id, aid)

    def _keep_agreement(self, agreement: Agreement) -> None:
        self.agreements[agreement.id] = agreement
        while len(self.agreements) > 4096:
            self.agreements.popitem(last=False)
        waiting = self._agreement_waits.pop(agreement.id, None)
        if waiting is not None:
            waiting.set()

    @property
    def hellos_waiting(self) -> int:
        """A miner: job sessions whose hello waits for its agreement to be made."""
        return len(self._agreement_waits)

    async def wait_agreement(self, agreement_id: bytes, timeout: float) -> Agreement | None:
        """A miner: the agreement ``agreement_id`` once it is made (a client may open its
        job session while it negotiates), or None after ``timeout`` seconds."""
        found = self.agreements.get(agreement_id)
        if found is not None:
            return found
        event = self._agreement_waits.get(agreement_id)
        if event is None:
            if len(self._agreement_waits) >= MAX_AGREEMENT_WAITS:
                return None
            event = self._agreement_waits[agreement_id] = trio.Event()
        try:
            with trio.move_on_after(timeout):
                await event.wait()
        finally:  # timed out, or the waiter went
            if not event.is_set() and self._agreement_waits.get(agreement_id) is event:
                del self._agreement_waits[agreement_id]
        return self.agreements.get(agreement_id)

    def release(self, agreement_id: bytes) -> bool:
        """A miner: free the slot an agreement holds (its job is over)."""
        return self.book is not None and self.book.release(agreement_id)

    # -- negotiation: the client's side ----------------------------------------------------

    async def negotiate(
        self,
        miner: Advert | str,
        *,
        job_bytes: int,
        max_fuel: int,
        max_price: int | None = None,
        bid: int | None = None,
        min_fuel: int | None = None,
        deadline: float = 300.0,
        escrow_id: bytes | None = None,
        timeout: float = 30.0,
        proposal_id: bytes | None = None,
    ) -> Agreement:
        """Reach an agreement with ``miner`` (an advert from :meth:`find_miners`, or its
        peer id) for a job of ``job_bytes`` input bytes and at most ``max_fuel`` fuel, to be
        done within ``deadline`` seconds, at no more than ``max_price`` per million fuel
        (default: the advertised price). Offers ``bid`` first (default ``max_price``).

        Attests the miner (a fresh quote over our nonce), opens an escrow of
        ``max_fuel * max_price`` for its operator (or uses ``escrow_id``), and negotiates.
        Raises NegotiationFailed (with ``reason``), AttestationError, or the network's typed
        errors; RequestTimeout if ``timeout`` passes first. ``proposal_id`` (16 bytes; default
        random) fixes the agreement id in advance (``negotiation.agreement_id``), unless a
        new escrow has to be opened half way, which takes a new proposal.
        """
        if proposal_id is not None and (
            not isinstance(proposal_id, bytes) or len(proposal_id) != PROPOSAL_ID_LEN
        ):
            raise UsageError(f"proposal_id must be {PROPOSAL_ID_LEN} bytes")
        advert = self.advert_of(miner)
        if isinstance(job_bytes, bool) or not isinstance(job_bytes, int) or job_bytes < 0:
            raise UsageError("job_bytes must be an int >= 0")
        if isinstance(max_fuel, bool) or not isinstance(max_fuel, int) or max_fuel < 1:
            raise UsageError("max_fuel must be an int >= 1")
        if not 0 < deadline <= 7 * 24 * 3600:
            raise UsageError("deadline must be in (0, one week] seconds")
        price = advert.price if max_price is None else max_price
        with trio.move_on_after(timeout) as scope:
            return await self._negotiate(
                advert, job_bytes, max_fuel, price, bid, min_fuel, deadline, escrow_id, proposal_id
            )
        assert scope.cancelled_caught
        raise RequestTimeout(f"no agreement with {advert.peer_id} within {timeout}s")

    def advert_of(self, miner: Advert | str) -> Advert:
        """``miner`` as an advert of the directory (it may be one already)."""
        if isinstance(miner, Advert):
            return miner
        if isinstance(miner, str):
            found = self.directory.by_peer(miner)
            if found is None:
                raise UsageError(f"no advert of {miner} is known: call find_miners first")
            return found
        raise UsageError("miner must be an Advert from find_miners or a peer id")

    async def _negotiate(
        self,
        advert: Advert,
        job_bytes: int,
        max_fuel: int,
        max_price: int,
        bid: int | None,
        min_fuel: int | None,
        deadline: float,
        escrow_id: bytes | None,
        first_id: bytes | None,
    ) -> Agreement:
        node = self._node
        chain = node.chain
        fresh = False  # True: do not reuse a standing escrow (the miner found it short)
        while True:
            proposal_id = first_id or os.urandom(16)
            first_id = None
            aid = agreement_id(chain.view.chain_id, chain.signer.public_key, proposal_id)
            held: list[_Backing] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._attest, advert)
                nursery.start_soon(
                    _into,
                    held,
                    self._escrow_for(advert, max_fuel, max_price, deadline, escrow_id, aid, fresh),
                )
            (backing,) = held
            ask = Ask(
                chain_id=chain.view.chain_id,
                client_peer=node.peer_id,
                miner_peer=advert.peer_id,
                enclave=advert.enclave,
                operator=advert.operator,
                escrow_id=backing.escrow_id,
                escrow_height=backing.height,
                job_bytes=job_bytes,
                max_fuel=max_fuel,
                max_price=max_price,
                deadline_ms=now_ms() + int(deadline * 1000),
                bid=bid,
                min_fuel=min_fuel,
            )
            try:
                return await self._agree(advert, ask, proposal_id)
            except NegotiationFailed as err:
                backing.unreserve(aid)
                if not backing.reused or err.reason not in ESCROW_SHORT:
                    raise
                # The miner counts more of our escrow as committed than we do (an agreement
                # it has not seen settled yet, say): leave it and open a new one, once.
                self._standing.retire(backing.escrow_id)
                node.metrics.count("escrows_found_short")
                fresh = True
            except BaseException:
                backing.unreserve(aid)
                raise

    async def _agree(self, advert: Advert, ask: Ask, proposal_id: bytes) -> Agreement:
        node = self._node
        machine = ClientNegotiation(
            ask,
            node.chain.signer,
            now_ms(),
            proposal_id=proposal_id,
            max_rounds=self.config.max_rounds,
        )
        while True:
            reply = await self._send(advert, machine.proposal)
            outcome = machine.on_reply(reply, now_ms())
            if isinstance(outcome, Agreement):
                self._keep_agreement(outcome)
                node.metrics.count("agreements_reached")
                return outcome

    async def _attest(self, advert: Advert) -> None:
        cached = self._attested.get(advert.peer_id)
        if cached is None or trio.current_time() - cached[1] > ATTEST_CACHE_S:
            await self._reach(advert)
            verified = await self._node.verify_miner(advert.peer_id)
            self._attested[advert.peer_id] = (verified, trio.current_time())
            while len(self._attested) > 1024:
                self._attested.popitem(last=False)
            cached = self._attested[advert.peer_id]
        verified = cached[0]
        if verified.identity_pub != advert.enclave or verified.operator != advert.operator:
            raise AttestationError(f"{advert.peer_id} attests an enclave other than its advert's")

    async def _escrow_for(
        self,
        advert: Advert,
        max_fuel: int,
        max_price: int,
        deadline: float,
        escrow_id: bytes | None,
        aid: bytes,
        fresh: bool,
    ) -> _Backing:
        """The escrow to back agreement ``aid``: ``escrow_id`` if given; else one of our
        standing escrows for the operator that still covers the job (reserved for it here),
        or a new one."""
        chain = self._node.chain
        if escrow_id is not None:
            if chain.state.escrow(escrow_id) is None:
                raise UsageError("no such escrow on chain")
            return _Backing(escrow_id, chain.head.height)
        need = max(1, max_payment(max_fuel, max_price))
        blocks = math.ceil(deadline * 1000 / chain.params.block_time_ms) + SETTLE_MARGIN_BLOCKS
        blocks = max(blocks, 2 * self.config.min_escrow_blocks)
        lock = self._standing.lock(advert.operator)
        async with lock:
            if not fresh:
                found = self._standing.take(
                    chain.state, advert.operator, aid, need, chain.head.height + blocks
                )
                if found is not None:
                    self._node.metrics.count("escrows_reused")
                    return found
            jobs = self.config.escrow_jobs
            if jobs == 1:
                receipt = await self._open_escrow(advert.operator, need, blocks, standing=False)
                return _Backing(receipt.tx_id, receipt.height or 0)
            life = math.ceil(self.config.escrow_lifetime * 1000 / chain.params.block_time_ms)
            blocks = max(blocks, life)
            try:
                receipt = await self._open_escrow(advert.operator, need * jobs, blocks)
            except NegotiationFailed as err:
                if err.reason != "insufficient_funds":
                    raise
                # not enough for several jobs: an escrow for this one (its rest may serve
                # a later, smaller one)
                receipt = await self._open_escrow(advert.operator, need, blocks)
            return self._standing.opened(
                advert.operator,
                receipt.tx_id,
                receipt.height or 0,
                chain.head.height + blocks,
                aid,
                need,
            )

    async def _open_escrow(
        self, operator: bytes, amount: int, blocks: int, *, standing: bool = True
    ) -> Receipt:
        expires = self._node.chain.head.height + blocks
        wallet = self._node.wallet
        opening = wallet.open_standing_escrow if standing else wallet.open_escrow
        receipt = await opening(operator, amount, expires)
        if not receipt.ok or receipt.height is None:
            raise NegotiationFailed(
                f"escrow not opened: {receipt.error} {receipt.detail}".strip(),
                reason=receipt.error or "escrow",
            )
        self._escrows[receipt.tx_id] = expires
        self._node.metrics.count("escrows_opened", standing=str(standing).lower())
        return receipt

    async def _reach(self, advert: Advert) -> None:
        node = self._node
        if node.is_connected(advert.peer_id):
            return
        error: P2PError | None = None
        for addr in advert.addrs:
            try:
                await node.connect(f"{addr}/p2p/{advert.peer_id}")
                return
            except P2PError as err:
                error = err
        if error is not None:
            raise error

    async def _send(self, advert: Advert, proposal: Proposal) -> Agreement | Counter | Refusal:
        """Send ``proposal``, retrying the same bytes if the answer is lost (the miner
        answers a retried proposal as it did the first time)."""
        await self._reach(advert)
        data = encode(proposal)
        last: P2PError | None = None
        for _ in range(3):
            try:
                raw = await self._node.request(
                    advert.peer_id,
                    NEGOTIATE_PROTOCOL,
                    data,
                    timeout=10.0,
                    max_response=MAX_NEGOTIATE_MESSAGE,
                )
            except (RequestTimeout, ConnectionLost) as err:
                last = err
                continue
            except ProtocolNotSupported as err:
                raise NegotiationFailed(
                    f"{advert.peer_id} does not negotiate", reason="not_a_miner"
                ) from err
            reply = decode(raw, max_size=MAX_NEGOTIATE_MESSAGE)
            if not isinstance(reply, Agreement | Counter | Refusal):
                raise ProtocolViolation("a negotiation answer is an agreement, counter or refusal")
            return reply
        assert last is not None
        raise last

    # -- escrows -------------------------------------------------------------------------

    def _refund_expired(self, height: int) -> None:
        due = [e for e, h in self._escrows.items() if h <= height]
        for escrow_id in due:
            del self._escrows[escrow_id]
            self._standing.retire(escrow_id)
            if self._node.chain.state.escrow(escrow_id) is not None:
                self._node.start_soon(self._refund, escrow_id)

    async def _refund(self, escrow_id: bytes) -> None:
        try:
            receipt = await self._node.chain.submit(EscrowRefund(escrow_id))
        except P2PError as err:
            logger.warning("escrow %s not refunded: %s", escrow_id.hex()[:12], err)
            return
        self._node.metrics.count("escrows_refunded", ok=str(receipt.ok).lower())


async def _into(out: list[Any], work: Awaitable[Any]) -> None:
    out.append(await work)


# A refusal or counter that may only mean the miner counts more of a reused standing escrow
# as committed than the client does: the client retries once with a new escrow.
ESCROW_SHORT: Final = frozenset(
    {"fuel", "escrow_insufficient", "escrow_in_use", "escrow_expiring", "escrow_missing"}
)
MAX_STANDING: Final = 64  # standing escrows a client reuses per operator


@dataclass
class _Backing:
    """The escrow behind one negotiation; ``entry`` is ours to reuse (a standing escrow)."""

    escrow_id: bytes
    height: int  # on chain from this height
    entry: _Standing | None = None
    reused: bool = False

    def unreserve(self, aid: bytes) -> None:
        if self.entry is not None:
            self.entry.reserved.pop(aid, None)


@dataclass
class _Standing:
    escrow_id: bytes
    height: int
    expires: int
    reserved: dict[bytes, int] = field(default_factory=dict)  # agreement id -> max payment


class _StandingEscrows:
    """A client's standing escrows by operator, with what its agreements reserved of each:
    a reservation holds until the chain shows the agreement settled (the operator may
    settle it late, with the enclave's last receipt), or the escrow is gone."""

    def __init__(self) -> None:
        self._by_operator: dict[bytes, list[_Standing]] = {}
        self._locks: dict[bytes, trio.Lock] = {}

    def lock(self, operator: bytes) -> trio.Lock:
        lock = self._locks.get(operator)
        if lock is None:
            if len(self._locks) >= 1024:  # keep the ones in use (no task waits on a free one)
                self._locks = {o: k for o, k in self._locks.items() if k.locked()}
            lock = self._locks[operator] = trio.Lock()
        return lock

    def take(
        self, state: Any, operator: bytes, aid: bytes, need: int, until: int
    ) -> _Backing | None:
        """Reserve ``need`` for agreement ``aid`` on a standing escrow of ours for
        ``operator`` that lasts until ``until``, if one covers it."""
        entries = self._by_operator.get(operator, [])
        for entry in list(entries):
            escrow = state.escrow(entry.escrow_id)
            if escrow is None:  # emptied, or refunded
                entries.remove(entry)
                continue
            for done in [a for a in entry.reserved if state.settlement(a) is not None]:
                del entry.reserved[done]
            free = escrow.amount - sum(entry.reserved.values())
            if free >= need and escrow.expires_height >= until:
                entry.reserved[aid] = need
                return _Backing(entry.escrow_id, entry.height, entry, reused=True)
        if not entries:
            self._by_operator.pop(operator, None)
        return None

    def opened(
        self, operator: bytes, escrow_id: bytes, height: int, expires: int, aid: bytes, need: int
    ) -> _Backing:
        entry = _Standing(escrow_id, height, expires, {aid: need})
        entries = self._by_operator.setdefault(operator, [])
        entries.append(entry)
        del entries[:-MAX_STANDING]  # the oldest go unused (and are refunded at expiry)
        return _Backing(escrow_id, height, entry)

    def retire(self, escrow_id: bytes) -> None:
        """Reuse ``escrow_id`` no more."""
        for operator, entries in list(self._by_operator.items()):
            entries[:] = [e for e in entries if e.escrow_id != escrow_id]
            if not entries:
                del self._by_operator[operator]


__all__ = [
    "CAPACITY_TOPIC",
    "MARKET_PROTOCOL",
    "NEGOTIATE_PROTOCOL",
    "MarketPage",
    "MarketQuery",
    "MarketService",
]
