"""The miner directory: the newest believable advert of every miner, and queries over them.

Sans-IO: time is a parameter (``now_ms``, wall-clock milliseconds) and the chain is reached
through :class:`~phala_p2p.market.advert.ChainFacts`. The driver offers every advert it
receives (gossip or ``/phala/market``), calls :meth:`Directory.refresh` on each new block and
when an advert expires, and answers queries with :meth:`Directory.select`.

Bounds: one entry per registered enclave (``max_entries``), a pending pool for adverts of
miners registered after our head (``max_pending``, oldest evicted first), and a token bucket
per miner so that a registered miner cannot flood re-adverts.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from phala_p2p.errors import ProtocolViolation, UsageError
from phala_p2p.market.advert import (
    AdvertReason,
    CapacityAdvert,
    ChainFacts,
    SignedAdvert,
    check_advert,
    check_registration,
)

SORTS: Final = ("price", "capacity", "latency")
_FROM_DECODE: Final = {
    "too_large": AdvertReason.TOO_LARGE,
    "over_limit": AdvertReason.OVER_LIMIT,
    "bad_signature": AdvertReason.BAD_SIGNATURE,
}


@dataclass(frozen=True)
class Advert:
    """A verified capacity advert, as ``find_miners`` returns it.

    ``price`` is per million fuel; ``memory`` is the bytes of memory a job may use;
    ``expires`` is a Unix time in seconds; ``latency`` is the round trip this node measured to
    the miner, in seconds (None if it has not measured one).
    """

    peer_id: str
    addrs: tuple[str, ...]
    operator: bytes
    enclave: bytes
    cores: int
    memory: int
    fuel_per_s: int
    price: int
    max_input: int
    max_fuel: int
    slots: int
    free_slots: int
    tags: tuple[str, ...]
    seq: int
    expires: float
    registered_height: int
    signed: SignedAdvert
    latency: float | None = None
    # the gossip envelope the advert came in (its author's signature over it), when known
    envelope: bytes = field(default=b"", repr=False)

    @classmethod
    def of(cls, advert: CapacityAdvert, signed: SignedAdvert, envelope: bytes = b"") -> Advert:
        return cls(
            peer_id=advert.peer_id,
            addrs=advert.addrs,
            operator=advert.operator,
            enclave=advert.enclave,
            cores=advert.cores,
            memory=advert.memory,
            fuel_per_s=advert.fuel_per_s,
            price=advert.price,
            max_input=advert.max_input,
            max_fuel=advert.max_fuel,
            slots=advert.slots,
            free_slots=advert.free_slots,
            tags=advert.tags,
            seq=advert.seq,
            expires=advert.expires_ms / 1000,
            registered_height=advert.registered_height,
            signed=signed,
            envelope=envelope,
        )

    @property
    def expires_ms(self) -> int:
        return round(self.expires * 1000)


@dataclass(frozen=True)
class Constraints:
    """What ``find_miners`` filters on. Every field is optional.

    ``input_size`` and ``fuel``: the job's input bytes and fuel, which the miner must accept;
    ``tags``: every one must be advertised; ``sort``: ``"price"`` (cheapest, then most
    capacity, then nearest), ``"capacity"`` or ``"latency"``.
    """

    min_cores: int = 1
    min_memory: int = 0
    min_fuel_per_s: int = 0
    max_price: int | None = None
    min_free_slots: int = 1
    input_size: int = 0
    fuel: int = 0
    tags: tuple[str, ...] = ()
    exclude: frozenset[str] = frozenset()
    limit: int | None = None
    sort: str = "price"

    def __post_init__(self) -> None:
        for name in ("min_cores", "min_memory", "min_fuel_per_s", "min_free_slots"):
            _non_negative_int(getattr(self, name), name)
        _non_negative_int(self.input_size, "input_size")
        _non_negative_int(self.fuel, "fuel")
        if self.max_price is not None:
            _non_negative_int(self.max_price, "max_price")
        if self.limit is not None:
            _non_negative_int(self.limit, "limit")
        object.__setattr__(self, "tags", _strings(self.tags, "tags"))
        object.__setattr__(self, "exclude", frozenset(_strings(self.exclude, "exclude")))
        if self.sort not in SORTS:
            raise UsageError(f"sort must be one of {', '.join(SORTS)}, not {self.sort!r}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> Constraints:
        """Constraints from ``find_miners`` keywords; UsageError naming an unknown one."""
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = set(kwargs) - allowed
        if unknown:
            raise UsageError(
                f"unknown constraint {', '.join(sorted(unknown))} "
                f"(known: {', '.join(sorted(allowed))})"
            )
        return cls(**kwargs)

    def admits(self, advert: Advert) -> bool:
        return (
            advert.cores >= self.min_cores
            and advert.memory >= self.min_memory
            and advert.fuel_per_s >= self.min_fuel_per_s
            and (self.max_price is None or advert.price <= self.max_price)
            and advert.free_slots >= self.min_free_slots
            and advert.max_input >= self.input_size
            and advert.max_fuel >= self.fuel
            and all(t in advert.tags for t in self.tags)
            and advert.peer_id not in self.exclude
        )

    def rank(self, advert: Advert) -> tuple[float, ...]:
        latency = advert.latency if advert.latency is not None else float("inf")
        if self.sort == "latency":
            return (latency, advert.price, -advert.fuel_per_s)
        if self.sort == "capacity":
            return (-advert.free_slots, -advert.fuel_per_s, advert.price, latency)
        return (advert.price, -advert.fuel_per_s, -advert.free_slots, latency)


def _non_negative_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"{name} must be an int >= 0, not {value!r}")


def _strings(value: Any, name: str) -> tuple[str, ...]:
    """One string (a tag, a peer id) or an iterable of them, as a tuple."""
    if isinstance(value, str):
        return (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise UsageError(f"{name} must be a string or strings, not {value!r}") from None
    if not all(isinstance(v, str) for v in items):
        raise UsageError(f"{name} must be strings, not {value!r}")
    return items


@dataclass(frozen=True)
class _Pending:
    advert: CapacityAdvert
    signed: SignedAdvert
    envelope: bytes


@dataclass
class _Bucket:
    tokens: float
    at_ms: int


class Directory:
    """The newest believable advert per enclave. See the module docstring."""

    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        max_pending: int = 1_024,
        burst: int = 5,
        refill_per_s: float = 1.0,
    ) -> None:
        if max_entries < 1 or max_pending < 0 or burst < 1 or refill_per_s <= 0:
            raise UsageError("directory bounds must be positive")
        self.max_entries = max_entries
        self.max_pending = max_pending
        self._burst = burst
        self._refill = refill_per_s
        self._entries: dict[bytes, Advert] = {}
        self._pending: OrderedDict[bytes, _Pending] = OrderedDict()
        self._buckets: dict[bytes, _Bucket] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def pending(self) -> int:
        """Adverts held until our chain reaches their miner's registration."""
        return len(self._pending)

    def pending_height(self) -> int | None:
        """The highest registration height a pending advert waits for (None: none wait)."""
        return max((w.advert.registered_height for w in self._pending.values()), default=None)

    def adverts(self) -> list[Advert]:
        return list(self._entries.values())

    def get(self, enclave: bytes) -> Advert | None:
        return self._entries.get(enclave)

    def by_peer(self, peer_id: str) -> Advert | None:
        for advert in self._entries.values():
            if advert.peer_id == peer_id:
                return advert
        return None

    def seqs(self) -> dict[bytes, int]:
        """Enclave -> the sequence number held (what two directories compare to converge)."""
        return {k: v.seq for k, v in self._entries.items()}

    def covers(self, seqs: Mapping[bytes, int]) -> bool:
        """Whether, for every enclave named, an advert at least as new as ``seqs`` is held."""
        held = self._entries
        return all(k in held and held[k].seq >= v for k, v in seqs.items())

    # -- taking adverts --------------------------------------------------------------------

    def offer(
        self,
        signed: SignedAdvert,
        chain: ChainFacts,
        now_ms: int,
        *,
        sender: str | None = None,
        envelope: bytes = b"",
    ) -> AdvertReason | None:
        """Take ``signed`` if it is believable and newer than what is held; otherwise say
        why not. ``sender``: the gossip author, which must be the advertised peer;
        ``envelope``: the author's signed gossip envelope around it, kept with the advert
        to serve and relay (its signature is the caller's to check)."""
        try:
            advert = signed.decode()
        except ProtocolViolation as err:
            return _FROM_DECODE.get(err.reason, AdvertReason.MALFORMED)
        known = self._known(advert, signed)
        if known is not None:
            return known
        if not signed.verify(advert):
            return AdvertReason.BAD_SIGNATURE
        if sender is not None and sender != advert.peer_id:
            return AdvertReason.WRONG_SENDER
        reason = check_advert(advert, chain, now_ms)
        if reason is AdvertReason.CHAIN_BEHIND:
            self._hold(_Pending(advert, signed, envelope))
            return reason
        if reason is not None:
            return reason
        held = self._entries.get(advert.enclave)
        if held is not None and not self._take_token(advert.enclave, now_ms):
            return AdvertReason.RATE_LIMITED
        if held is None and len(self._entries) >= self.max_entries:
            return AdvertReason.FULL
        self._entries[advert.enclave] = Advert.of(advert, signed, envelope)
        self._pending.pop(advert.enclave, None)
        return None

    def known(self, signed: SignedAdvert) -> AdvertReason | None:
        """DUPLICATE or STALE if this advert, or a newer one of its enclave, is held or
        waiting; None otherwise. No signature is checked: a caller can skip verifying
        what would be refused anyway."""
        try:
            advert = signed.decode()
        except ProtocolViolation:
            return None  # offer() says why
        return self._known(advert, signed)

    def _known(self, advert: CapacityAdvert, signed: SignedAdvert) -> AdvertReason | None:
        # What is held or waiting was verified: the same bytes again, or an older advert,
        # need no signature check.
        held = self._entries.get(advert.enclave)
        if held is not None and advert.seq <= held.seq:
            return AdvertReason.DUPLICATE if signed == held.signed else AdvertReason.STALE
        waiting = self._pending.get(advert.enclave)
        if waiting is not None and advert.seq <= waiting.advert.seq:
            return AdvertReason.DUPLICATE if signed == waiting.signed else AdvertReason.STALE
        return None

    def _hold(self, waiting: _Pending) -> None:
        self._pending.pop(waiting.advert.enclave, None)
        self._pending[waiting.advert.enclave] = waiting
        while len(self._pending) > self.max_pending:
            self._pending.popitem(last=False)

    def _take_token(self, enclave: bytes, now_ms: int) -> bool:
        bucket = self._buckets.get(enclave)
        if bucket is None:
            bucket = self._buckets[enclave] = _Bucket(float(self._burst), now_ms)
        elapsed = max(0, now_ms - bucket.at_ms) / 1000
        bucket.tokens = min(float(self._burst), bucket.tokens + elapsed * self._refill)
        bucket.at_ms = now_ms
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True

    def refresh(self, chain: ChainFacts, now_ms: int) -> dict[AdvertReason, int]:
        """Drop what expired or is no longer believable (revoked, under-staked, registered
        again) and take pending adverts the chain now vouches for. Returns the drops by
        reason."""
        dropped: dict[AdvertReason, int] = {}
        for enclave, entry in list(self._entries.items()):
            reason = self._recheck(entry, chain, now_ms)
            if reason is not None:
                del self._entries[enclave]
                self._buckets.pop(enclave, None)
                dropped[reason] = dropped.get(reason, 0) + 1
        for enclave, waiting in list(self._pending.items()):
            advert = waiting.advert
            reason = check_advert(advert, chain, now_ms)
            if reason is AdvertReason.CHAIN_BEHIND:
                continue
            del self._pending[enclave]
            if reason is None and enclave not in self._entries:
                if len(self._entries) >= self.max_entries:
                    reason = AdvertReason.FULL  # counted like any other drop
            if reason is None:
                held = self._entries.get(enclave)
                if held is None or advert.seq > held.seq:
                    self._entries[enclave] = Advert.of(advert, waiting.signed, waiting.envelope)
            else:
                dropped[reason] = dropped.get(reason, 0) + 1
        return dropped

    @staticmethod
    def _recheck(entry: Advert, chain: ChainFacts, now_ms: int) -> AdvertReason | None:
        if entry.expires_ms <= now_ms:
            return AdvertReason.EXPIRED
        return check_registration(entry.operator, entry.enclave, entry.registered_height, chain)

    def next_expiry_ms(self) -> int | None:
        """When the next held advert expires (the driver's next refresh at the latest)."""
        times = [a.expires_ms for a in self._entries.values()]
        times += [w.advert.expires_ms for w in self._pending.values()]
        return min(times) if times else None

    # -- queries ---------------------------------------------------------------------------

    def select(
        self,
        constraints: Constraints,
        now_ms: int,
        latency: Mapping[str, float] | None = None,
    ) -> list[Advert]:
        """The live adverts that meet ``constraints``, best first."""
        rtt = latency or {}
        found = [
            dataclasses.replace(a, latency=rtt.get(a.peer_id))
            for a in self._entries.values()
            if a.expires_ms > now_ms
        ]
        found = [a for a in found if constraints.admits(a)]
        found.sort(key=constraints.rank)
        return found if constraints.limit is None else found[: constraints.limit]

    def page(self, after: bytes, limit: int, now_ms: int) -> tuple[list[SignedAdvert], bytes]:
        """Live signed adverts in enclave order after ``after``; and the cursor to continue
        from (empty when this was the last page)."""
        if limit < 1:
            raise UsageError("a page holds at least one advert")
        entries, cursor = self.entries_page(after, limit, now_ms)
        return [a.signed for a in entries], cursor

    def entries_page(self, after: bytes, limit: int, now_ms: int) -> tuple[list[Advert], bytes]:
        """As :meth:`page`, the held entries themselves (with their envelopes)."""
        if limit < 1:
            raise UsageError("a page holds at least one advert")
        keys = sorted(k for k, a in self._entries.items() if k > after and a.expires_ms > now_ms)
        chosen = keys[:limit]
        more = len(keys) > limit
        return [self._entries[k] for k in chosen], (chosen[-1] if more else b"")
