"""Typed errors of the job session protocol, and the cancel codes that carry them on the wire.

Every class subclasses an existing family of ``phala_p2p.errors``: a peer's fault is a
``ProtocolViolation`` (stream faults reuse the ``StreamTampered`` / ``StreamReordered`` /
``StreamTruncated`` family), the caller's fault a ``UsageError``. Each peer-fault class names the
``CancelCode`` a driver sends when it gives up because of it (``cancel_code_for``).
"""

from __future__ import annotations

import enum
from typing import ClassVar

from phala_p2p.errors import Cancelled, P2PError, ProtocolViolation, StreamReordered, UsageError


class CancelCode(enum.IntEnum):
    """Why a side ended a session early (``Cancel.code``); unknown codes are kept as ints."""

    UNSPECIFIED = 0
    ABORTED = 1
    """The caller gave up (a user interrupt, its own deadline)."""
    DEADLINE = 2
    """The agreement's deadline passed."""
    TOO_LARGE = 3
    """More data than the side accepts for this job."""
    PROTOCOL_ERROR = 4
    """The peer broke the protocol; the text names the reason."""
    UNKNOWN_AGREEMENT = 5
    """The enclave serves no such agreement (or it names another enclave)."""
    UNKNOWN_SESSION = 6
    """A resume for a session the enclave does not hold."""
    SESSION_EXPIRED = 7
    """A resume after the grace period."""
    BUSY = 8
    """The enclave holds as many sessions as it allows."""
    EXECUTION_FAILED = 9
    """The job ran and failed (the text says how)."""


def code_name(code: int) -> str:
    """The lower_snake name of ``code`` (``code_<n>`` for a code this version does not know)."""
    try:
        return CancelCode(code).name.lower()
    except ValueError:
        return f"code_{code}"


class JobCancelled(Cancelled):
    """The peer cancelled the session; ``code`` is its ``CancelCode`` (an int when unknown),
    ``reason`` that code's name and ``text`` its explanation. ``authenticated`` is False for a
    refusal sent before the session keys existed (a relay could have forged it)."""

    def __init__(self, code: int, text: str, *, authenticated: bool) -> None:
        super().__init__(code_name(code) + (f": {text}" if text else ""))
        self.code = code
        self.reason = code_name(code)
        self.text = text
        self.authenticated = authenticated


class SessionClosed(UsageError):
    """The session was closed, cancelled or failed: it takes no more input."""


class SessionExpired(P2PError):
    """The session was lost for longer than its grace period and cannot be resumed."""

    code: ClassVar[CancelCode] = CancelCode.SESSION_EXPIRED


class HandshakeFailed(ProtocolViolation):
    """The handshake's peer message is unacceptable; ``reason`` says why."""

    code: ClassVar[CancelCode] = CancelCode.PROTOCOL_ERROR
    default_reason: ClassVar[str] = "bad_hello"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message, reason=reason or self.default_reason)


class BadEnclaveSignature(HandshakeFailed):
    """The EnclaveHello is not signed by the agreement's enclave identity for this session."""

    default_reason = "bad_signature"


class NotTheClient(HandshakeFailed):
    """The ClientHello is not signed by the agreement's client account: whoever sent it
    (the relaying miner itself, say) may not spend the client's escrow."""

    default_reason = "not_the_client"


class WrongAgreement(HandshakeFailed):
    """The hello names another agreement, or one this enclave does not serve."""

    code: ClassVar[CancelCode] = CancelCode.UNKNOWN_AGREEMENT
    default_reason = "wrong_agreement"


class ReplayedHello(HandshakeFailed):
    """A hello for a session id already used (or an EnclaveHello for another session)."""

    default_reason = "replayed"


class BadSessionKey(HandshakeFailed):
    """The peer's ephemeral X25519 key is malformed or a low-order point."""

    default_reason = "bad_key"


class SessionsFull(HandshakeFailed):
    """The enclave holds as many sessions as it allows; try later."""

    code: ClassVar[CancelCode] = CancelCode.BUSY
    default_reason = "busy"


class AgreementExpired(HandshakeFailed):
    """The agreement's deadline has passed: no session may start under it."""

    code: ClassVar[CancelCode] = CancelCode.DEADLINE
    default_reason = "agreement_expired"


class ResumeRefused(ProtocolViolation):
    """A Resume was refused: ``unknown_session``, ``bad_proof`` or ``replayed``. The session
    it names (if any) is untouched: a forged resume cannot end someone else's session."""

    code: ClassVar[CancelCode] = CancelCode.UNKNOWN_SESSION

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message, reason=reason)


class BadMac(ProtocolViolation):
    """A control message (Ack, ResumeOk, Cancel) does not carry the session's MAC."""

    code: ClassVar[CancelCode] = CancelCode.PROTOCOL_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="bad_mac")


class ChunkReplayed(StreamReordered):
    """A chunk with an index the receiver already opened (a replay, or a resend below the
    receiver's position)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="stream_replayed")


class FrameError(ProtocolViolation):
    """The byte stream is not a sequence of valid job frames (unknown type, bad length)."""


class InboundTooLarge(ProtocolViolation):
    """The peer sent more plaintext than this side accepts for the job."""

    code: ClassVar[CancelCode] = CancelCode.TOO_LARGE

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="too_large")


def cancel_code_for(err: BaseException) -> int:
    """The code a driver puts in the Cancel it sends after ``err`` ended a session."""
    code = getattr(err, "code", None)
    if isinstance(code, CancelCode):
        return int(code)
    if isinstance(err, ProtocolViolation):
        return int(CancelCode.PROTOCOL_ERROR)
    return int(CancelCode.UNSPECIFIED)


__all__ = [
    "AgreementExpired",
    "BadEnclaveSignature",
    "BadMac",
    "BadSessionKey",
    "CancelCode",
    "ChunkReplayed",
    "FrameError",
    "HandshakeFailed",
    "InboundTooLarge",
    "JobCancelled",
    "NotTheClient",
    "ReplayedHello",
    "ResumeRefused",
    "SessionClosed",
    "SessionExpired",
    "SessionsFull",
    "WrongAgreement",
    "cancel_code_for",
    "code_name",
]
