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


class Cancelled(P2PError):
    """The remote peer cancelled the exchange (a CANCEL frame); ``reason`` is its text."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"cancelled by the remote peer: {reason}" if reason else "cancelled")
        self.reason = reason


class StreamTampered(ProtocolViolation):
    """A chunk of an encrypted stream failed authentication (modified, or wrong key/context)."""

    def __init__(self, message: str, *, reason: str = "stream_tampered") -> None:
        super().__init__(message, reason=reason)


class StreamTruncated(ProtocolViolation):
    """An encrypted stream ended without its final chunk, or went on after it."""

    def __init__(self, message: str, *, reason: str = "stream_truncated") -> None:
        super().__init__(message, reason=reason)


class StreamReordered(ProtocolViolation):
    """A chunk of an encrypted stream arrived out of order, or was replayed."""

    def __init__(self, message: str, *, reason: str = "stream_reordered") -> None:
        super().__init__(message, reason=reason)


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


class OutputTooLarge(ExecutionError):
    """The job returned more output than the executor allows."""


class EnclaveError(P2PError):
    """The enclave process failed or refused a request."""


class ChainError(P2PError):
    """A chain operation failed."""


class TxRejected(ChainError):
    """A transaction was refused by the ledger; ``reason`` says why."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class NegotiationFailed(P2PError):
    """No agreement was reached with a miner; ``reason`` names why (a refusal's reason, or
    what the client refused), ``retry_after`` (seconds) is set when trying later may work."""

    def __init__(self, message: str, *, reason: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after
