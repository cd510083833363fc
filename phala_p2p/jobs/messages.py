"""Wire messages of ``/phala/job/1.0.0`` (kinds 420-426), as specified in ``protocols/job.md``.

| kind | message | direction |
|---|---|---|
| 420 | :class:`ClientHello` | client -> enclave: start a session under an agreement |
| 421 | :class:`EnclaveHello` | enclave -> client: its ephemeral key, signed by its identity |
| 422 | :class:`Chunk` | both: one sealed STREAM chunk |
| 423 | :class:`Ack` | both: cumulative acknowledgement of the peer's chunks |
| 424 | :class:`Resume` | client -> enclave: continue a session on a new connection |
| 425 | :class:`ResumeOk` | enclave -> client: the resume is accepted |
| 426 | :class:`Cancel` | both: the session ends early, with a code and a text |

Exact lengths are checked in ``__post_init__`` (a decoded message of the wrong length is refused
as ``bad_field``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from phala_p2p.crypto.stream import CHUNK_OVERHEAD, MAX_CHUNK_INDEX
from phala_p2p.errors import UsageError
from phala_p2p.wire.codec import message

SESSION_ID_LEN: Final = 16
AGREEMENT_ID_LEN: Final = 32
KEY_LEN: Final = 32
SIGNATURE_LEN: Final = 64
MAC_LEN: Final = 32
MAX_CANCEL_TEXT: Final = 200
"""Longest Cancel text, in characters (at most 800 bytes of UTF-8)."""
MAX_RESUMES: Final = (1 << 32) - 1
MAX_FRAME: Final = 1 << 20
"""Largest frame body (a Chunk message) any receiver accepts."""
CHUNK_MESSAGE_OVERHEAD: Final = 64
"""Bytes a Chunk message adds around its plaintext, rounded up (the codec's array headers,
the index, the bin header, then STREAM's flag and tag)."""
MAX_CHUNK: Final = MAX_FRAME - CHUNK_MESSAGE_OVERHEAD
"""Largest plaintext of one chunk."""
MAX_WINDOW: Final = 1024
"""Most unacknowledged chunks any sender holds (a hello states its own)."""


def _exact(name: str, value: bytes, length: int) -> None:
    if len(value) != length:
        raise UsageError(f"{name} must be {length} bytes")


@message(420)
@dataclass(frozen=True)
class ClientHello:
    """Start a session: the agreement it serves, a fresh random session id, the client's
    ephemeral X25519 public key, and the client's window (the enclave acknowledges by it)."""

    agreement_id: bytes = field(metadata={"max_len": AGREEMENT_ID_LEN})
    session_id: bytes = field(metadata={"max_len": SESSION_ID_LEN})
    client_pub: bytes = field(metadata={"max_len": KEY_LEN})
    window: int = field(metadata={"min": 1, "max": MAX_WINDOW})
    """Most unacknowledged chunks the client holds."""
    client_sig: bytes = field(default=b"", metadata={"max_len": SIGNATURE_LEN})
    """The agreement's client account's signature of the client-hello statement: only the
    client that pays may open its agreement's session (empty: unsigned, refused by an
    enclave that runs jobs)."""

    def __post_init__(self) -> None:
        _exact("agreement_id", self.agreement_id, AGREEMENT_ID_LEN)
        _exact("session_id", self.session_id, SESSION_ID_LEN)
        _exact("client_pub", self.client_pub, KEY_LEN)
        if len(self.client_sig) not in (0, SIGNATURE_LEN):
            raise UsageError(f"client_sig must be empty or {SIGNATURE_LEN} bytes")


@message(421)
@dataclass(frozen=True)
class EnclaveHello:
    """The enclave's ephemeral X25519 key for this session, signed by its identity key over
    the ``enclave-hello`` statement (agreement id, session id, both ephemeral keys), and the
    enclave's window (the client acknowledges by it)."""

    agreement_id: bytes = field(metadata={"max_len": AGREEMENT_ID_LEN})
    session_id: bytes = field(metadata={"max_len": SESSION_ID_LEN})
    enclave_pub: bytes = field(metadata={"max_len": KEY_LEN})
    window: int = field(metadata={"min": 1, "max": MAX_WINDOW})
    """Most unacknowledged chunks the enclave holds."""
    signature: bytes = field(metadata={"max_len": SIGNATURE_LEN})

    def __post_init__(self) -> None:
        _exact("agreement_id", self.agreement_id, AGREEMENT_ID_LEN)
        _exact("session_id", self.session_id, SESSION_ID_LEN)
        _exact("enclave_pub", self.enclave_pub, KEY_LEN)
        _exact("signature", self.signature, SIGNATURE_LEN)


@message(422)
@dataclass(frozen=True)
class Chunk:
    """Chunk ``index`` of the sender's stream: ``final flag || ciphertext || tag`` (STREAM)."""

    index: int = field(metadata={"min": 0, "max": MAX_CHUNK_INDEX})
    sealed: bytes = field(metadata={"max_len": MAX_CHUNK + CHUNK_OVERHEAD})

    def __repr__(self) -> str:  # never dump a megabyte into a log line
        return f"Chunk(index={self.index}, sealed=<{len(self.sealed)} bytes>)"


@message(423)
@dataclass(frozen=True)
class Ack:
    """Every chunk below ``next_index`` of the peer's stream has been received."""

    next_index: int = field(metadata={"min": 0, "max": MAX_CHUNK_INDEX + 1})
    mac: bytes = field(metadata={"max_len": MAC_LEN})

    def __post_init__(self) -> None:
        _exact("mac", self.mac, MAC_LEN)


@message(424)
@dataclass(frozen=True)
class Resume:
    """Continue ``session_id`` on this connection: its ``attempt`` (greater than every earlier
    one), the next enclave chunk the client needs, and a MAC proving it holds the keys."""

    session_id: bytes = field(metadata={"max_len": SESSION_ID_LEN})
    attempt: int = field(metadata={"min": 1, "max": MAX_RESUMES})
    next_index: int = field(metadata={"min": 0, "max": MAX_CHUNK_INDEX + 1})
    mac: bytes = field(metadata={"max_len": MAC_LEN})

    def __post_init__(self) -> None:
        _exact("session_id", self.session_id, SESSION_ID_LEN)
        _exact("mac", self.mac, MAC_LEN)


@message(425)
@dataclass(frozen=True)
class ResumeOk:
    """The enclave accepts resume ``attempt`` and needs the client's chunks from ``next_index``."""

    session_id: bytes = field(metadata={"max_len": SESSION_ID_LEN})
    attempt: int = field(metadata={"min": 1, "max": MAX_RESUMES})
    next_index: int = field(metadata={"min": 0, "max": MAX_CHUNK_INDEX + 1})
    mac: bytes = field(metadata={"max_len": MAC_LEN})

    def __post_init__(self) -> None:
        _exact("session_id", self.session_id, SESSION_ID_LEN)
        _exact("mac", self.mac, MAC_LEN)


@message(426)
@dataclass(frozen=True)
class Cancel:
    """The session ends early: a ``CancelCode`` and a text for humans. ``mac`` is empty only
    on a refusal sent before the session keys exist."""

    code: int = field(metadata={"min": 0, "max": 0xFFFF})
    text: str = field(metadata={"max_len": MAX_CANCEL_TEXT})
    mac: bytes = field(metadata={"max_len": MAC_LEN})

    def __post_init__(self) -> None:
        if len(self.mac) not in (0, MAC_LEN):
            raise UsageError(f"mac must be empty or {MAC_LEN} bytes")


JobMessage = ClientHello | EnclaveHello | Chunk | Ack | Resume | ResumeOk | Cancel

__all__ = [
    "AGREEMENT_ID_LEN",
    "CHUNK_MESSAGE_OVERHEAD",
    "KEY_LEN",
    "MAC_LEN",
    "MAX_CANCEL_TEXT",
    "MAX_CHUNK",
    "MAX_FRAME",
    "MAX_RESUMES",
    "SESSION_ID_LEN",
    "SIGNATURE_LEN",
    "Ack",
    "Cancel",
    "Chunk",
    "ClientHello",
    "EnclaveHello",
    "JobMessage",
    "Resume",
    "ResumeOk",
]
