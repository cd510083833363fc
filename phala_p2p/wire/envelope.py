"""Signed envelopes: every gossip payload travels in one.

Wire form (msgpack array, specified in ``protocols/envelope.md``)::

    [version, kind, body, signer, seqno, time_ms, signature]

The signature is Ed25519 over domain-separated bytes::

    SIGNING_CONTEXT || 0x00 || domain (UTF-8) || 0x00 || msgpack([version, kind, body,
                                                                  signer, seqno, time_ms])

For gossip the domain is the topic name, so an envelope signed for one topic does not verify
on another: a wrong domain is reported as ``bad_signature``, because the domain is part of the
signed bytes and nothing else in the envelope names it.

``ReplayGuard`` keeps per-signer anti-replay state (a sliding bitmap window, as in IPsec's
anti-replay service, RFC 4303 section 3.4.3) and a freshness window on ``time_ms``;
``SeqnoCounter`` hands out sequence numbers that keep increasing across restarts.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass

import msgpack

from phala_p2p.crypto.identity import (
    PUBLIC_KEY_SIZE,
    SIGNATURE_SIZE,
    Identity,
    verify_signature,
)
from phala_p2p.errors import ProtocolViolation, UsageError
from phala_p2p.wire.codec import DEFAULT_MAX_SIZE, unpack_untrusted

ENVELOPE_VERSION = 1
SIGNING_CONTEXT = b"phala-p2p/envelope/v1"
MAX_ENVELOPE_KIND = 0xFFFF
MAX_U64 = (1 << 64) - 1
MAX_DOMAIN = 256
"""Longest domain (topic name) in UTF-8 bytes."""

_FIELDS = 7


class RejectReason(enum.StrEnum):
    """Why an envelope (or the message in it) was refused."""

    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    BAD_VERSION = "bad_version"
    BAD_SIGNATURE = "bad_signature"
    REPLAYED = "replayed"
    FAR_FUTURE = "far_future"
    TOO_OLD = "too_old"
    UNKNOWN_KIND = "unknown_kind"
    INVALID = "invalid"
    RATE_LIMITED = "rate_limited"


@dataclass(frozen=True)
class Envelope:
    """An opened envelope: its signature has been checked against ``signer``."""

    version: int
    kind: int
    body: bytes
    signer: bytes
    seqno: int
    time_ms: int
    signature: bytes


def _domain_bytes(domain: str) -> bytes:
    if not isinstance(domain, str):
        raise UsageError("the envelope domain is a str (the topic name)")
    try:
        raw = domain.encode("utf-8")
    except UnicodeEncodeError as err:
        raise UsageError("the envelope domain is not encodable as UTF-8") from err
    if not raw or len(raw) > MAX_DOMAIN or b"\x00" in raw:
        raise UsageError(f"the envelope domain must be 1..{MAX_DOMAIN} UTF-8 bytes without NUL")
    return raw


def _is_uint(value: object, maximum: int) -> bool:
    return type(value) is int and 0 <= value <= maximum


def signing_bytes(
    domain: str,
    version: int,
    kind: int,
    body: bytes,
    signer: bytes,
    seqno: int,
    time_ms: int,
) -> bytes:
    """The exact bytes an envelope's signature covers."""
    header: bytes = msgpack.packb([version, kind, body, signer, seqno, time_ms], use_bin_type=True)
    return SIGNING_CONTEXT + b"\x00" + _domain_bytes(domain) + b"\x00" + header


def seal(
    identity: Identity, *, domain: str, kind: int, body: bytes, seqno: int, time_ms: int
) -> bytes:
    """Sign ``body`` for ``domain`` and return the envelope's wire bytes."""
    if not isinstance(identity, Identity):
        raise UsageError("seal takes an Identity")
    if not _is_uint(kind, MAX_ENVELOPE_KIND):
        raise UsageError(f"envelope kind must be an int in 0..{MAX_ENVELOPE_KIND}")
    if not isinstance(body, bytes | bytearray | memoryview):
        raise UsageError("envelope body must be bytes")
    if not _is_uint(seqno, MAX_U64):
        raise UsageError("seqno must be an int in 0..2**64-1")
    if not _is_uint(time_ms, MAX_U64):
        raise UsageError("time_ms must be an int in 0..2**64-1")
    body = bytes(body)
    signer = identity.public_key
    signature = identity.sign(
        signing_bytes(domain, ENVELOPE_VERSION, kind, body, signer, seqno, time_ms)
    )
    wire: bytes = msgpack.packb(
        [ENVELOPE_VERSION, kind, body, signer, seqno, time_ms, signature], use_bin_type=True
    )
    return wire


def open_envelope(data: bytes, *, domain: str, max_size: int = DEFAULT_MAX_SIZE) -> Envelope:
    """Decode ``data``, check its structure and its signature for ``domain``.

    Raises ProtocolViolation with reason ``too_large``, ``malformed``, ``bad_version`` or
    ``bad_signature``; freshness and replay are ``ReplayGuard``'s business.
    """
    return _open(data, domain, max_size, verify=True)


def peek_envelope(data: bytes, *, max_size: int = DEFAULT_MAX_SIZE) -> Envelope:
    """Decode ``data`` and check its structure only: the signature is NOT checked. For a
    caller that can tell from the body that it would drop the message anyway; anything it
    keeps must go through :func:`open_envelope` first."""
    return _open(data, "", max_size, verify=False)


def _open(data: bytes, domain: str, max_size: int, *, verify: bool) -> Envelope:
    domain_raw = _domain_bytes(domain) if verify else b""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise UsageError("open_envelope takes bytes")
    if type(max_size) is not int or max_size < 1:
        raise UsageError("max_size must be a positive int")
    data = bytes(data)
    if len(data) > max_size:
        raise ProtocolViolation(
            f"envelope of {len(data)} bytes exceeds the limit of {max_size}", reason="too_large"
        )
    top = unpack_untrusted(data, max_size)
    if type(top) is not list or not top:
        raise ProtocolViolation("an envelope is a msgpack array")
    version = top[0]
    if type(version) is not int or version != ENVELOPE_VERSION:
        raise ProtocolViolation(f"unsupported envelope version {version!r}", reason="bad_version")
    if len(top) != _FIELDS:
        raise ProtocolViolation(f"an envelope has {_FIELDS} fields, got {len(top)}")
    _, kind, body, signer, seqno, time_ms, signature = top
    if not _is_uint(kind, MAX_ENVELOPE_KIND):
        raise ProtocolViolation("envelope kind is not an int in 0..65535")
    if type(body) is not bytes:
        raise ProtocolViolation("envelope body is not bin")
    if type(signer) is not bytes or len(signer) != PUBLIC_KEY_SIZE:
        raise ProtocolViolation("envelope signer is not a 32-byte bin")
    if not _is_uint(seqno, MAX_U64) or not _is_uint(time_ms, MAX_U64):
        raise ProtocolViolation("envelope seqno or time is not an unsigned 64-bit int")
    if type(signature) is not bytes or len(signature) != SIGNATURE_SIZE:
        raise ProtocolViolation("envelope signature is not a 64-byte bin")
    header: bytes = msgpack.packb([version, kind, body, signer, seqno, time_ms], use_bin_type=True)
    wire: bytes = msgpack.packb(top, use_bin_type=True)
    if wire != data:
        raise ProtocolViolation("non-canonical envelope encoding")
    signed = SIGNING_CONTEXT + b"\x00" + domain_raw + b"\x00" + header
    if verify and not verify_signature(signer, signed, signature):
        raise ProtocolViolation(
            "envelope signature does not verify for this signer and domain",
            reason="bad_signature",
        )
    return Envelope(
        version=version,
        kind=kind,
        body=body,
        signer=signer,
        seqno=seqno,
        time_ms=time_ms,
        signature=signature,
    )


# -- replay protection -----------------------------------------------------------------------


class _Window:
    __slots__ = ("bitmap", "top")

    def __init__(self, top: int) -> None:
        self.top = top  # highest seqno accepted so far
        self.bitmap = 1  # bit i set: seqno top - i was accepted


class ReplayGuard:
    """Refuses stale, far-future and replayed envelopes; remembers at most ``max_signers``.

    Per signer it keeps the highest seqno seen and a bitmap of the ``window`` seqnos below it:
    a seqno already seen, or older than the window, is ``REPLAYED``. Out-of-order delivery
    within the window is accepted. A signer not heard from for longest is forgotten first once
    ``max_signers`` are tracked; its state starts afresh if it returns (the time window still
    bounds what can be replayed then).
    """

    def __init__(
        self,
        *,
        window: int = 1024,
        max_future_skew_ms: int = 30_000,
        max_age_ms: int = 120_000,
        max_signers: int = 10_000,
    ) -> None:
        for name, value in (
            ("window", window),
            ("max_future_skew_ms", max_future_skew_ms),
            ("max_age_ms", max_age_ms),
            ("max_signers", max_signers),
        ):
            if type(value) is not int or value < (1 if name in ("window", "max_signers") else 0):
                raise UsageError(f"ReplayGuard {name} must be a non-negative int (window >= 1)")
        self.window = window
        self.max_future_skew_ms = max_future_skew_ms
        self.max_age_ms = max_age_ms
        self.max_signers = max_signers
        self._mask = (1 << window) - 1
        self._signers: OrderedDict[bytes, _Window] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._signers)

    def check(self, env: Envelope, now_ms: int) -> RejectReason | None:
        """None if ``env`` is fresh (and records it), else why it is refused."""
        if env.time_ms > now_ms + self.max_future_skew_ms:
            return RejectReason.FAR_FUTURE
        if env.time_ms < now_ms - self.max_age_ms:
            return RejectReason.TOO_OLD
        state = self._signers.get(env.signer)
        if state is None:
            self._signers[env.signer] = _Window(env.seqno)
            if len(self._signers) > self.max_signers:
                self._signers.popitem(last=False)
                self.evicted += 1
            return None
        seqno = env.seqno
        if seqno > state.top:
            shift = seqno - state.top
            state.bitmap = ((state.bitmap << shift) | 1) & self._mask if shift < self.window else 1
            state.top = seqno
        else:
            behind = state.top - seqno
            if behind >= self.window or (state.bitmap >> behind) & 1:
                return RejectReason.REPLAYED
            state.bitmap |= 1 << behind
        self._signers.move_to_end(env.signer)
        return None


class SeqnoCounter:
    """Sequence numbers for one signer, increasing across restarts.

    Start it at the current time in nanoseconds: a restarted node then begins above every
    seqno it used before, as long as it published fewer than one message per nanosecond on
    average and its clock did not go backwards.
    """

    def __init__(self, now_ns: int) -> None:
        if not _is_uint(now_ns, MAX_U64):
            raise UsageError("SeqnoCounter starts at a non-negative int (nanoseconds)")
        self._next = now_ns

    def next(self) -> int:
        value = self._next
        if value > MAX_U64:
            raise UsageError("seqno space exhausted")
        self._next = value + 1
        return value


__all__ = [
    "ENVELOPE_VERSION",
    "MAX_DOMAIN",
    "SIGNING_CONTEXT",
    "Envelope",
    "RejectReason",
    "ReplayGuard",
    "SeqnoCounter",
    "open_envelope",
    "seal",
    "signing_bytes",
]
