"""Wire messages of the tee room (kinds 300-399), for ``/phala/attest/1.0.0`` and job sessions.

| kind | message | direction |
|---|---|---|
| 300 | :class:`AttestRequest` | verifier -> miner: "quote your enclave, bound to my nonce" |
| 301 | :class:`AttestResponse` | miner -> verifier: platform, raw quote, collateral, enclave keys |
| 302 | :class:`~phala_p2p.tee.quote.UsageReceipt` | enclave-signed usage (defined in ``quote``) |
| 303 | :class:`SessionOpen` | client -> enclave: the client's ephemeral X25519 key |
| 304 | :class:`SessionOffer` | enclave -> client: its ephemeral key, signed by its identity |

Layouts follow the codec (``[1, kind, [fields...]]``); see ``protocols/attest.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from phala_p2p.crypto.identity import verify_signature
from phala_p2p.errors import UsageError
from phala_p2p.tee.dcap import MAX_COLLATERAL_CHARS, MAX_QUOTE_BYTES
from phala_p2p.tee.quote import MAX_NONCE_LEN, SIM_PLATFORM
from phala_p2p.tee.sealing import SESSION_ID_LEN, offer_signing_bytes
from phala_p2p.wire.codec import message

__all__ = [
    "ATTEST_MAX_SIZE",
    "PLATFORMS",
    "AttestRequest",
    "AttestResponse",
    "SessionOffer",
    "SessionOpen",
]

PLATFORMS = frozenset({SIM_PLATFORM, "SGX", "TDX"})
ATTEST_MAX_SIZE = MAX_QUOTE_BYTES + 4 * MAX_COLLATERAL_CHARS + 4096
"""A safe ``max_size`` for decoding an :class:`AttestResponse` (collateral is UTF-8 text)."""


def _exact(name: str, value: bytes, length: int) -> None:
    if len(value) != length:
        raise UsageError(f"{name} must be {length} bytes")


@message(300)
@dataclass(frozen=True)
class AttestRequest:
    """Ask a miner for a fresh quote bound to ``nonce`` (16..64 random bytes)."""

    nonce: bytes = field(metadata={"max_len": MAX_NONCE_LEN})

    def __post_init__(self) -> None:
        if len(self.nonce) < 16:
            raise UsageError("attestation nonce must be at least 16 bytes")


@message(301)
@dataclass(frozen=True)
class AttestResponse:
    """A quote of the miner's enclave and what is needed to check it.

    ``collateral`` is the dcap-qvl QuoteCollateralV3 JSON for SGX/TDX quotes, empty for SIM.
    The quote's report data must equal
    ``make_report_data(identity_pub, x25519_pub, nonce=request.nonce)``.
    """

    platform: str = field(metadata={"max_len": 8})
    quote: bytes = field(metadata={"max_len": MAX_QUOTE_BYTES})
    collateral: str = field(metadata={"max_len": MAX_COLLATERAL_CHARS})
    identity_pub: bytes = field(metadata={"max_len": 32})
    x25519_pub: bytes = field(metadata={"max_len": 32})

    def __post_init__(self) -> None:
        if self.platform not in PLATFORMS:
            raise UsageError(f"unknown TEE platform {self.platform!r}")
        _exact("identity_pub", self.identity_pub, 32)
        _exact("x25519_pub", self.x25519_pub, 32)


@message(303)
@dataclass(frozen=True)
class SessionOpen:
    """A client's ephemeral X25519 public key, to start a job session."""

    client_pub: bytes = field(metadata={"max_len": 32})

    def __post_init__(self) -> None:
        _exact("client_pub", self.client_pub, 32)


@message(304)
@dataclass(frozen=True)
class SessionOffer:
    """The enclave's ephemeral key for one session, signed by the enclave identity."""

    session_id: bytes = field(metadata={"max_len": SESSION_ID_LEN})
    enclave_pub: bytes = field(metadata={"max_len": 32})
    signature: bytes = field(metadata={"max_len": 64})

    def __post_init__(self) -> None:
        _exact("session_id", self.session_id, SESSION_ID_LEN)
        _exact("enclave_pub", self.enclave_pub, 32)
        _exact("signature", self.signature, 64)

    def verify(self, identity_pub: bytes, client_pub: bytes, measurement: bytes) -> bool:
        """True if the attested enclave identity signed this offer for ``client_pub``."""
        try:
            signed = offer_signing_bytes(client_pub, self.enclave_pub, measurement)
        except UsageError:
            return False
        return verify_signature(identity_pub, signed, self.signature)
