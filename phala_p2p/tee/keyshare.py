"""Host-side types of key management: recipient evidence and an enclave's key status.

The node relays key material between enclaves but never holds it. To hand a key to another
enclave, it gives its own enclave the recipient's :class:`EnclaveEvidence` (a quote and the
public data needed to check it); the sending enclave verifies it itself before it seals
anything to the recipient's X25519 key (see :mod:`phala_p2p.tee.keys`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from phala_p2p.errors import ProtocolViolation, UsageError
from phala_p2p.tee.channel import get_bytes, get_int, get_str
from phala_p2p.tee.executor import ExecutorLimits
from phala_p2p.tee.keys import MAX_EPOCH, ClusterKey
from phala_p2p.tee.messages import AttestResponse
from phala_p2p.tee.quote import MAX_NONCE_LEN

__all__ = ["EnclaveEvidence", "KeyStatus", "cluster_from_wire", "key_status_from_wire"]

MAX_EVIDENCE_QUOTE = 8192


@dataclass(frozen=True)
class EnclaveEvidence:
    """What a sending enclave checks before it seals key material to another enclave.

    ``quote`` binds ``identity_pub``, ``x25519_pub`` and ``nonce``; ``limits`` are the
    recipient's executor limits, with which the sending enclave recomputes the measurement of
    its own code: the recipient must run the same code (its limits may differ).
    """

    platform: str
    quote: bytes
    identity_pub: bytes
    x25519_pub: bytes
    nonce: bytes
    limits: ExecutorLimits

    def __post_init__(self) -> None:
        if not isinstance(self.platform, str) or not 1 <= len(self.platform) <= 8:
            raise UsageError("EnclaveEvidence.platform must be a platform name")
        if not isinstance(self.quote, bytes) or not 1 <= len(self.quote) <= MAX_EVIDENCE_QUOTE:
            raise UsageError(f"EnclaveEvidence.quote must be 1..{MAX_EVIDENCE_QUOTE} bytes")
        for name in ("identity_pub", "x25519_pub"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != 32:
                raise UsageError(f"EnclaveEvidence.{name} must be 32 bytes")
        if not isinstance(self.nonce, bytes) or len(self.nonce) > MAX_NONCE_LEN:
            raise UsageError(f"EnclaveEvidence.nonce must be at most {MAX_NONCE_LEN} bytes")
        if not isinstance(self.limits, ExecutorLimits):
            raise UsageError("EnclaveEvidence.limits must be an ExecutorLimits")

    @classmethod
    def from_attestation(
        cls, response: AttestResponse, *, nonce: bytes, limits: ExecutorLimits
    ) -> EnclaveEvidence:
        """From a peer's ``/phala/attest`` answer to our ``nonce`` and its published limits."""
        return cls(
            platform=response.platform,
            quote=response.quote,
            identity_pub=response.identity_pub,
            x25519_pub=response.x25519_pub,
            nonce=nonce,
            limits=limits,
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "platform": self.platform,
            "quote": self.quote,
            "identity_pub": self.identity_pub,
            "x25519_pub": self.x25519_pub,
            "nonce": self.nonce,
            "limits": self.limits.canonical(),
        }


@dataclass(frozen=True)
class KeyStatus:
    """Which keys an enclave holds (public data only).

    ``role`` is ``""`` (none yet), ``"key-manager"`` (holds the master key, runs no jobs) or
    ``"worker"`` (holds epoch keys, runs jobs). ``master_floor`` is the oldest epoch the master
    can still derive (None without a master); ``epochs`` are the epoch keys held and
    ``epoch_floor`` the epoch below which keys were erased and are refused.
    """

    role: str
    master_floor: int | None
    epochs: tuple[int, ...]
    epoch_floor: int


def cluster_from_wire(result: dict[str, Any]) -> ClusterKey:
    """Parse ``{"epoch", "public_key"}``; ProtocolViolation if malformed."""
    epoch = get_int(result, "epoch", lo=0, hi=MAX_EPOCH)
    return ClusterKey(epoch, get_bytes(result, "public_key", min_len=32, max_len=32))


def key_status_from_wire(result: dict[str, Any]) -> KeyStatus:
    """Parse a key status answer; ProtocolViolation if malformed."""
    role = get_str(result, "role", max_len=16)
    if role not in ("", "key-manager", "worker"):
        raise ProtocolViolation(f"unknown key role {role!r}")
    floor = result.get("master_floor")
    if floor is not None:
        floor = get_int(result, "master_floor", lo=0, hi=MAX_EPOCH)
    epochs = result.get("epochs")
    if (
        not isinstance(epochs, list)
        or len(epochs) > 4096
        or not all(
            not isinstance(e, bool) and isinstance(e, int) and 0 <= e <= MAX_EPOCH for e in epochs
        )
    ):
        raise ProtocolViolation("field 'epochs' must be a list of epochs")
    return KeyStatus(
        role=role,
        master_floor=floor,
        epochs=tuple(epochs),
        epoch_floor=get_int(result, "epoch_floor", lo=0, hi=MAX_EPOCH),
    )
