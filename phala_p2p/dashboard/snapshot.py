"""What the dashboard shows: one JSON-ready snapshot of a node, built from its public state.

No IO and no clock: the driver passes ``now`` (Unix seconds) in. Every list is capped so a
snapshot stays small however large the network grows; what a cap leaves out is counted
(``..._total`` fields) so the page can say so.

:class:`Timeline` remembers what changed between snapshots (peers connected, lost, denied,
allowed again) so that partitions show as events as they happen.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from phala_p2p.errors import UsageError
from phala_p2p.net.host import peer_id_of

if TYPE_CHECKING:
    from phala_p2p.node import Node

VERSION: Final = 1
MAX_PEERS: Final = 64
MAX_TOPOLOGY: Final = 96
MAX_GATEKEEPERS: Final = 64
MAX_ADVERTS: Final = 50
MAX_RECEIPTS: Final = 20
MAX_COUNTERS: Final = 200
MAX_EVENTS: Final = 64
MAX_NAME: Final = 64

JOB_COUNTERS: Final[tuple[tuple[str, dict[str, str]], ...]] = (
    ("jobs_run", {}),
    ("jobs_failed", {"failed": "true"}),
    ("job_receipts", {}),
    ("final_receipts", {"final": "true"}),
    ("jobs_settled_by_operator", {}),
    ("agreements_reached", {}),
    ("escrows_opened", {}),
    ("escrows_refunded", {}),
    ("job_connections_lost", {}),
)
PARTITION_COUNTERS: Final = (
    "peers_dropped_unresponsive",
    "peers_banned",
    "ping_failures",
    "bootstrap_dial_failures",
    "request_timeouts",
    "sync_attempts",
    "sync_failed",
    "blocks_synced",
)
_COUNTER_SOURCE: Final = {"jobs_failed": "jobs_run", "final_receipts": "job_receipts"}


@dataclass(frozen=True)
class Event:
    time: float
    kind: str  # connected | lost | denied | allowed
    peer: str

    def to_json(self) -> dict[str, Any]:
        return {"time": round(self.time, 3), "kind": self.kind, "peer": self.peer}


class Timeline:
    """Peer changes seen between observations, newest last, at most ``maxlen`` kept."""

    def __init__(self, maxlen: int = MAX_EVENTS) -> None:
        self.events: deque[Event] = deque(maxlen=maxlen)
        self._peers: set[str] | None = None
        self._denied: set[str] = set()

    def connected(self, peer: str, now: float) -> None:
        """A connection opened (between two observations it would go unseen if it closed
        again before the next one)."""
        if self._peers is not None and peer not in self._peers:
            self._peers.add(peer)
            self.events.append(Event(now, "connected", peer))

    def observe(self, peers: set[str], denied: set[str], now: float) -> None:
        if self._peers is not None:  # the first look is the baseline, not news
            for peer in sorted(peers - self._peers):
                self.events.append(Event(now, "connected", peer))
            for peer in sorted(self._peers - peers):
                self.events.append(Event(now, "lost", peer))
        for peer in sorted(denied - self._denied):
            self.events.append(Event(now, "denied", peer))
        for peer in sorted(self._denied - denied):
            self.events.append(Event(now, "allowed", peer))
        self._peers = set(peers)
        self._denied = set(denied)


class Snapshots:
    """Builds snapshots of one node. ``observe`` once per tick, ``build`` as often as needed
    (building changes nothing: a page load between ticks sees the same events)."""

    def __init__(self, node: Node, *, started: float) -> None:
        self._node = node
        self._started = started
        self.timeline = Timeline()
        self._peer_ids: dict[bytes, str] = {}
        self.seq = 0

    def observe(self, now: float) -> None:
        node = self._node
        self.timeline.observe(set(node.peers()), set(node.gate.denied()), now)

    def build(self, now: float, *, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        node = self._node
        self.seq += 1
        peers = node.peers()
        denied = node.gate.denied()
        snap: dict[str, Any] = {
            "v": VERSION,
            "seq": self.seq,
            "time": round(now, 3),
            "node": {
                "peer_id": node.peer_id,
                "role": node.role.value,
                "name": node.config.name[:MAX_NAME],
                "addrs": node.listen_addrs[:4],
                "uptime": round(max(0.0, now - self._started), 1),
            },
            "peers": self._peers(peers),
            "peers_total": len(peers),
            "topology": self._topology(peers, denied),
            "chain": self._chain() if node.has_chain else None,
            "market": self._market() if node.has_chain else None,
            "jobs": self._jobs(),
            "partitions": {
                "denied": denied[:MAX_PEERS],
                "denied_total": len(denied),
                "events": [e.to_json() for e in self.timeline.events],
                "counters": {name: node.metrics.get(name) for name in PARTITION_COUNTERS},
            },
            "metrics": _metrics(node.metrics.snapshot()),
        }
        if extra:
            snap.update(extra)
        return snap

    # -- parts -----------------------------------------------------------------------------

    def _role(self, peer: str) -> str:
        d = self._node.discovery
        record = d.known.get(peer)
        return d.roles.get(peer) or (record.role if record is not None else "") or "unknown"

    def _peers(self, peers: list[str]) -> list[dict[str, Any]]:
        rtt = self._node.health.rtt
        out = []
        for peer in sorted(peers)[:MAX_PEERS]:
            ms = rtt.get(peer)
            out.append(
                {
                    "peer_id": peer,
                    "role": self._role(peer),
                    "rtt_ms": None if ms is None else round(ms * 1000, 1),
                }
            )
        return out

    def _topology(self, peers: list[str], denied: list[str]) -> dict[str, Any]:
        """This node, its peers, and the peers it knows of (discovery, the gatekeeper set),
        each with how this node stands with it: connected, known, denied."""
        node = self._node
        state: dict[str, str] = {}
        for peer in denied:
            state[peer] = "denied"
        for peer in peers:
            state.setdefault(peer, "connected")
        for peer in node.discovery.known:
            state.setdefault(peer, "known")
        if node.has_chain:
            for account in node.chain.state.gatekeepers():
                state.setdefault(self._peer_of(account), "known")
        state.pop(node.peer_id, None)
        order = {"connected": 0, "denied": 1, "known": 2}
        chosen = sorted(state, key=lambda p: (order[state[p]], p))[: MAX_TOPOLOGY - 1]
        nodes = [{"id": node.peer_id, "role": node.role.value, "state": "self"}]
        nodes += [{"id": p, "role": self._role(p), "state": state[p]} for p in chosen]
        return {"nodes": nodes, "total": len(state) + 1}

    def _peer_of(self, account: bytes) -> str:
        peer = self._peer_ids.get(account)
        if peer is None:
            try:
                peer = peer_id_of(account)
            except UsageError:
                peer = account.hex()
            if len(self._peer_ids) < 4 * MAX_GATEKEEPERS:
                self._peer_ids[account] = peer
        return peer

    def _chain(self) -> dict[str, Any]:
        node = self._node
        chain = node.chain
        head = chain.head
        powers = chain.state.gatekeepers()
        committed = chain.committed_block(head.height) if head.height > 0 else None
        signers = {s.validator for s in committed.commit.sigs} if committed is not None else set()
        connected = set(node.peers())
        total = sum(powers.values())
        keepers = []
        for account, power in sorted(powers.items(), key=lambda kv: (-kv[1], kv[0])):
            peer = self._peer_of(account)
            keepers.append(
                {
                    "account": account.hex(),
                    "peer_id": peer,
                    "stake": power,
                    "signed_head": account in signers,
                    "connected": peer in connected,
                    "self": peer == node.peer_id,
                }
            )
        account = chain.account
        return {
            "chain_id": chain.genesis.chain_id,
            "height": head.height,
            "hash": head.hash.hex(),
            "time_ms": head.time_ms,
            "block_time_ms": chain.params.block_time_ms,
            "txs": len(committed.block.txs) if committed is not None else 0,
            "round": committed.commit.round if committed is not None else 0,
            "finality": {
                "signers": len(signers),
                "signed_stake": sum(p for a, p in powers.items() if a in signers),
                "total_stake": total,
            },
            "gatekeepers": keepers[:MAX_GATEKEEPERS],
            "gatekeepers_total": len(keepers),
            "mempool": len(chain.mempool),
            "account": {
                "id": account.hex(),
                "balance": chain.state.balance(account),
                "stake": chain.state.stake(account),
            },
        }

    def _market(self) -> dict[str, Any]:
        market = self._node.market
        rtt = self._node.health.rtt
        adverts = sorted(market.directory.adverts(), key=lambda a: (a.price, a.peer_id))
        return {
            "adverts": [
                {
                    "peer_id": a.peer_id,
                    "cores": a.cores,
                    "memory": a.memory,
                    "fuel_per_s": a.fuel_per_s,
                    "price": a.price,
                    "slots": a.slots,
                    "free_slots": a.free_slots,
                    "tags": list(a.tags),
                    "seq": a.seq,
                    "expires": a.expires,
                    "registered_height": a.registered_height,
                    "rtt_ms": None if a.peer_id not in rtt else round(rtt[a.peer_id] * 1000, 1),
                }
                for a in adverts[:MAX_ADVERTS]
            ],
            "adverts_total": len(adverts),
            "pending": market.directory.pending,
            "agreements": len(market.agreements),
        }

    def _jobs(self) -> dict[str, Any]:
        node = self._node
        metrics = node.metrics
        counters = {
            key: metrics.get(_COUNTER_SOURCE.get(key, key), **labels)
            for key, labels in JOB_COUNTERS
        }
        receipts = list(node.jobs.receipts.items())[-MAX_RECEIPTS:]
        rows = []
        for agreement_id, receipt in reversed(receipts):
            settled = node.chain.state.settlement(agreement_id) if node.has_chain else None
            rows.append(
                {
                    "agreement": agreement_id.hex(),
                    "seq": receipt.seq,
                    "fuel_used": receipt.fuel_used,
                    "bytes_in": receipt.bytes_in,
                    "bytes_out": receipt.bytes_out,
                    "final": receipt.final,
                    "settlement": None
                    if settled is None
                    else {
                        "height": settled.height,
                        "paid": settled.paid,
                        "refunded": settled.refunded,
                        "fuel_used": settled.fuel_used,
                    },
                }
            )
        return {"counters": counters, "receipts": rows, "receipts_total": len(node.jobs.receipts)}


def _metrics(raw: dict[str, Any]) -> dict[str, Any]:
    counters = dict(list(raw["counters"].items())[:MAX_COUNTERS])
    gauges = {k: _finite(v) for k, v in list(raw["gauges"].items())[:MAX_COUNTERS]}
    return {"counters": counters, "gauges": gauges, "counters_total": len(raw["counters"])}


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity (a browser's JSON.parse refuses them): None instead."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
