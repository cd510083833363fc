"""Typed errors of phala_p2p.

Two families, as in h11: ``ProtocolViolation`` is the remote peer's fault (malformed,
oversized, badly signed or replayed input); ``UsageError`` is the caller's fault (bad
arguments, wrong state). Everything the library raises on purpose derives from
``P2PError``, so ``except pp.errors.P2PError`` catches every expected failure.
"""

from __future__ import annotations


class P2PError(Exception):
    """Base of every error that phala_p2p raises on purpose."""


class UsageError(P2PError, ValueError):
    """The caller asked for something invalid (bad argument, wrong state, bad config)."""


class ProtocolViolation(P2PError):
    """A peer sent something malformed, oversized, badly signed, replayed or out of order."""

    def __init__(self, message: str, *, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class RequestTimeout(P2PError):
    """A request got no (complete) answer before its deadline; the outcome is unknown."""


class ProtocolNotSupported(P2PError):
    """The remote peer does not speak the requested protocol."""


class ConnectionLost(P2PError):
    """The connection or stream broke before the exchange completed (never a clean EOF)."""


class PeerUnreachable(P2PError):
    """No connection could be established to the peer."""


class RemoteError(P2PError):
    """The remote handler failed and reported an error instead of a response."""

    def __init__(self, message: str, *, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class PublishError(P2PError):
    """A gossip message could not be sent; nothing was sent silently-dropped in its place."""


class AttestationError(P2PError):
    """A quote or attestation report failed verification or policy."""


class ExecutionError(P2PError):
    """A WebAssembly job failed inside the executor."""


class InvalidModule(ExecutionError):
    """The module does not compile, or does not follow the job ABI."""


class Trap(ExecutionError):
    """The module trapped (unreachable, out-of-bounds access, division by zero, ...)."""


class FuelExhausted(ExecutionError):
    """The job used all the fuel it was granted."""


class MemoryExhausted(ExecutionError):
    """The job tried to grow its memory beyond the cap."""


class WallClockExceeded(ExecutionError):
    """The job ran longer than its wall-clock cap."""


class EnclaveError(P2PError):
    """The enclave process failed or refused a request."""


class ChainError(P2PError):
    """A chain operation failed."""


class TxRejected(ChainError):
    """A transaction was refused by the ledger; ``reason`` says why."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
