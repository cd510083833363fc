"""Finding peers with no central server.

- The bootstrap list is dialed at start and re-dialed with backoff while unreachable.
- Every node answers ``/phala/peers/1.0.0`` with its own record (role, listen addresses)
  and the records it has learned, filtered by role namespace ("gatekeeper", "miner", ...),
  like a rendezvous point that every peer runs. A node below its target peer count asks
  its peers for more and dials what it learns, so one bootstrap address is enough.
- A node's record of itself comes from itself over its authenticated channel; records
  relayed by others are only hints (a wrong address fails the Noise handshake).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgpack
import trio

from phala_p2p.errors import P2PError, ProtocolViolation
from phala_p2p.net.host import PeerGate
from phala_p2p.net.metrics import Metrics
from phala_p2p.net.reqresp import ProtocolLimits, RequestResponse

logger = logging.getLogger(__name__)

PEERS_PROTOCOL = "/phala/peers/1.0.0"
MAX_RECORDS = 64
MAX_ADDRS = 8
MAX_KNOWN = 4096
ROLES = ("bootstrap", "gatekeeper", "miner", "client")


@dataclass(frozen=True)
class PeerRecord:
    peer_id: str
    role: str
    addrs: tuple[str, ...]


def encode_records(records: list[PeerRecord]) -> bytes:
    return bytes(msgpack.packb([[r.peer_id, r.role, list(r.addrs)] for r in records]))


def decode_records(data: bytes) -> list[PeerRecord]:
    """Parse a peers answer; ProtocolViolation on anything malformed."""
    try:
        raw = msgpack.unpackb(data, raw=False, max_array_len=MAX_RECORDS * (MAX_ADDRS + 3))
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as err:
        raise ProtocolViolation("peers answer is not msgpack", reason="malformed") from err
    if not isinstance(raw, list) or len(raw) > MAX_RECORDS:
        raise ProtocolViolation("peers answer is not a bounded list", reason="malformed")
    out = []
    for item in raw:
        if (
            not isinstance(item, list)
            or len(item) != 3
            or not isinstance(item[0], str)
            or len(item[0]) > 128
            or item[1] not in ROLES
            or not isinstance(item[2], list)
            or len(item[2]) > MAX_ADDRS
            or not all(isinstance(a, str) and len(a) < 256 for a in item[2])
        ):
            raise ProtocolViolation("malformed peer record", reason="malformed")
        out.append(PeerRecord(item[0], item[1], tuple(item[2])))
    return out


class Discovery:
    def __init__(
        self,
        reqresp: RequestResponse,
        metrics: Metrics,
        gate: PeerGate,
        *,
        me: Callable[[], PeerRecord],
        bootstrap: tuple[str, ...],
        target_peers: int,
        interval: float,
        connected_peers: Callable[[], list[str]],
        dial: Callable[[str], Awaitable[str]],
    ) -> None:
        self._rr = reqresp
        self._metrics = metrics
        self._gate = gate
        self._me = me
        self._bootstrap = bootstrap
        self._target = target_peers
        self._interval = interval
        self._connected = connected_peers
        self._dial = dial
        self.known: dict[str, PeerRecord] = {}
        self.roles: dict[str, str] = {}  # as each peer reported itself
        self.bootstrapped = trio.Event()
        self._asked: set[str] = set()
        self.on_role: Callable[[str, str], None] = lambda peer, role: None
        self._next_ask = 0.0
        self._backoff = interval
        reqresp.serve(
            PEERS_PROTOCOL,
            self._answer,
            ProtocolLimits(max_request=64, max_response=64 * 1024, max_streams_per_peer=4),
        )

    async def _answer(self, peer_id: str, request: bytes) -> bytes:
        wanted = request.decode("ascii", "replace") if request else ""
        records = [self._me()]
        connected = set(self._connected())
        for rec in self.known.values():
            if rec.peer_id in connected and rec.peer_id != peer_id:
                if not wanted or rec.role == wanted:
                    records.append(rec)
        random.shuffle(records[1:])
        return encode_records(records[:MAX_RECORDS])

    def peers_with_role(self, role: str) -> list[str]:
        connected = set(self._connected())
        return [p for p, r in self.roles.items() if r == role and p in connected]

    async def ask(self, peer_id: str, role: str = "") -> list[PeerRecord]:
        """Ask one peer for the peers it knows (optionally of one role)."""
        answer = await self._rr.request(
            peer_id, PEERS_PROTOCOL, role.encode(), timeout=5, max_response=64 * 1024
        )
        records = decode_records(answer)
        if records and records[0].peer_id == peer_id:
            self.roles[peer_id] = records[0].role
            self.on_role(peer_id, records[0].role)
        for rec in records:
            if rec.peer_id != self._me().peer_id:
                if len(self.known) < MAX_KNOWN or rec.peer_id in self.known:
                    self.known[rec.peer_id] = rec
        return records

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for addr in self._bootstrap:
                nursery.start_soon(self._keep_bootstrap, addr)
            if not self._bootstrap:
                self.bootstrapped.set()
            while True:
                await self._round()
                await trio.sleep(self._interval)

    async def _keep_bootstrap(self, addr: str) -> None:
        delay = 0.2
        while True:
            peer = addr.rsplit("/p2p/", 1)[-1]
            if peer not in self._connected() and not self._gate.is_denied(peer):
                try:
                    await self._dial(addr)
                    await self.ask(peer)
                    self.bootstrapped.set()
                    delay = 0.2
                except P2PError as err:
                    self._metrics.count("bootstrap_dial_failures")
                    logger.info("bootstrap %s unreachable: %s (retry in %.1fs)", addr, err, delay)
                    delay = min(delay * 2, 30.0)
            await trio.sleep(delay if peer not in self._connected() else self._interval * 5)

    async def _round(self) -> None:
        connected = self._connected()
        for peer in connected:
            if peer not in self.roles and peer not in self._asked:
                self._asked.add(peer)
                try:
                    await self.ask(peer)
                except P2PError as err:
                    logger.debug("peer exchange with %s failed: %s", peer, err)
        self._asked &= set(connected)
        if len(connected) >= self._target or not connected:
            return
        now = trio.current_time()
        if now < self._next_ask:
            return
        known_before = set(self.known)
        try:
            await self.ask(random.choice(connected))
        except P2PError as err:
            logger.debug("peer exchange failed: %s", err)
        candidates = [
            r
            for r in self.known.values()
            if r.peer_id not in connected and not self._gate.is_denied(r.peer_id) and r.addrs
        ]
        # Back off while asking teaches nothing new and there is nobody left to dial.
        if set(self.known) - known_before or candidates:
            self._backoff = self._interval
        else:
            self._backoff = min(self._backoff * 2, 30.0)
        self._next_ask = now + self._backoff
        random.shuffle(candidates)
        for rec in candidates[: self._target - len(connected)]:
            for addr in rec.addrs:
                try:
                    await self._dial(f"{addr}/p2p/{rec.peer_id}" if "/p2p/" not in addr else addr)
                    self._metrics.count("discovered_dials")
                    break
                except P2PError as err:
                    logger.debug("dial %s at %s failed: %s", rec.peer_id, addr, err)
