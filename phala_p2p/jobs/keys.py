"""Key schedule of a job session: the enclave's signed statement, the transcript, the per-
direction keys, the STREAM associated data and the MACs of control messages.

Everything here is specified byte for byte in ``protocols/job.md`` so that the enclave side can
be implemented inside the enclave process. Contexts are distinct from every other signed or
hashed structure of the system (``tee/statements.py``, ``tee/sealing.py``, envelopes).

Erasure: ``SessionKeys`` keeps its keys in ``bytearray`` buffers that ``erase`` overwrites
with zeros. Python cannot promise more than that: the immutable copies handed to libsodium
(and the STREAM machines, which take ``bytes``) are dropped with the machines and left to the
garbage collector.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from typing import Final

from phala_p2p.chain.tx import Signer
from phala_p2p.crypto.identity import verify_signature
from phala_p2p.crypto.kx import derive_session_keys, transcript_hash
from phala_p2p.errors import UsageError
from phala_p2p.jobs.errors import SessionClosed
from phala_p2p.jobs.messages import (
    AGREEMENT_ID_LEN,
    KEY_LEN,
    MAC_LEN,
    SESSION_ID_LEN,
    ClientHello,
    EnclaveHello,
)
from phala_p2p.wire.codec import encode

PROTOCOL_ID: Final = "/phala/job/1.0.0"
HELLO_CONTEXT: Final = b"phala/job/enclave-hello/v1\x00"
CLIENT_HELLO_CONTEXT: Final = b"phala/job/client-hello/v1\x00"
TRANSCRIPT_LABEL: Final = b"phala/job/transcript/v1"
STREAM_CONTEXT: Final = b"phala/job/stream/v1\x00"
ACK_LABEL: Final = b"ack"
CANCEL_LABEL: Final = b"cancel"
RESUME_LABEL: Final = b"resume"
RESUME_OK_LABEL: Final = b"resume-ok"
"""The labels of the control messages' MACs (``SessionKeys.mac``)."""
_PERSON_SUBKEY: Final = b"phala-job-sub-v1"
_PERSON_MAC: Final = b"phala-job-mac-v1"


class Direction(enum.IntEnum):
    """Which way a stream flows; the value is the byte bound into its associated data."""

    CLIENT_TO_ENCLAVE = 1
    ENCLAVE_TO_CLIENT = 2

    @property
    def reverse(self) -> Direction:
        if self is Direction.CLIENT_TO_ENCLAVE:
            return Direction.ENCLAVE_TO_CLIENT
        return Direction.CLIENT_TO_ENCLAVE


def _need(name: str, value: object, length: int) -> bytes:
    if not isinstance(value, bytes) or len(value) != length:
        raise UsageError(f"{name} must be {length} bytes")
    return value


def hello_statement(
    agreement_id: bytes, session_id: bytes, client_pub: bytes, enclave_pub: bytes
) -> bytes:
    """What the enclave's identity key signs to vouch for its ephemeral key in one session."""
    return (
        HELLO_CONTEXT
        + _need("agreement_id", agreement_id, AGREEMENT_ID_LEN)
        + _need("session_id", session_id, SESSION_ID_LEN)
        + _need("client_pub", client_pub, KEY_LEN)
        + _need("enclave_pub", enclave_pub, KEY_LEN)
    )


def client_hello_statement(agreement_id: bytes, session_id: bytes, client_pub: bytes) -> bytes:
    """What the agreement's client account signs to open a session of it."""
    return (
        CLIENT_HELLO_CONTEXT
        + _need("agreement_id", agreement_id, AGREEMENT_ID_LEN)
        + _need("session_id", session_id, SESSION_ID_LEN)
        + _need("client_pub", client_pub, KEY_LEN)
    )


def client_hello_valid(hello: ClientHello, client_account: bytes) -> bool:
    """Whether ``client_account`` signed ``hello`` (an empty signature is not valid)."""
    if not hello.client_sig:
        return False
    statement = client_hello_statement(hello.agreement_id, hello.session_id, hello.client_pub)
    return verify_signature(client_account, statement, hello.client_sig)


def sign_enclave_hello(
    signer: Signer, hello: ClientHello, enclave_pub: bytes, window: int
) -> EnclaveHello:
    """The EnclaveHello answering ``hello`` with ``enclave_pub`` and the enclave's ``window``,
    signed by ``signer`` (the window is bound by the transcript, like every hello field)."""
    statement = hello_statement(hello.agreement_id, hello.session_id, hello.client_pub, enclave_pub)
    return EnclaveHello(
        agreement_id=hello.agreement_id,
        session_id=hello.session_id,
        enclave_pub=enclave_pub,
        window=window,
        signature=signer.sign(statement),
    )


def enclave_hello_valid(reply: EnclaveHello, hello: ClientHello, enclave_key: bytes) -> bool:
    """Whether ``enclave_key`` signed ``reply`` for exactly ``hello``'s session."""
    statement = hello_statement(
        hello.agreement_id, hello.session_id, hello.client_pub, reply.enclave_pub
    )
    return verify_signature(enclave_key, statement, reply.signature)


def handshake_transcript(hello: ClientHello, reply: EnclaveHello, enclave_key: bytes) -> bytes:
    """The transcript hash of the handshake: both hellos as sent, and the signing key."""
    return transcript_hash(TRANSCRIPT_LABEL, encode(hello), encode(reply), enclave_key)


def stream_associated_data(session_id: bytes, agreement_id: bytes, direction: Direction) -> bytes:
    """The associated data of every chunk of one direction of one session."""
    return (
        STREAM_CONTEXT
        + _need("session_id", session_id, SESSION_ID_LEN)
        + bytes([int(Direction(direction))])
        + _need("agreement_id", agreement_id, AGREEMENT_ID_LEN)
    )


def _subkey(direction_key: bytes | bytearray, label: bytes) -> bytearray:
    return bytearray(
        hashlib.blake2b(
            label, digest_size=KEY_LEN, key=direction_key, person=_PERSON_SUBKEY
        ).digest()
    )


def _mac_input(label: bytes, session_id: bytes, ints: tuple[int, ...], text: str) -> bytes:
    raw = text.encode("utf-8")
    return (
        label
        + b"\x00"
        + session_id
        + b"".join(i.to_bytes(8, "big") for i in ints)
        + len(raw).to_bytes(2, "big")
        + raw
    )


class SessionKeys:
    """The keys of one session: per direction a STREAM key and a MAC key. ``repr`` shows no key."""

    __slots__ = ("_keys", "agreement_id", "session_id")

    def __init__(
        self,
        session_id: bytes,
        agreement_id: bytes,
        client_to_enclave: bytes,
        enclave_to_client: bytes,
    ) -> None:
        self.session_id = _need("session_id", session_id, SESSION_ID_LEN)
        self.agreement_id = _need("agreement_id", agreement_id, AGREEMENT_ID_LEN)
        self._keys: dict[tuple[Direction, bytes], bytearray] = {}
        for direction, key in (
            (Direction.CLIENT_TO_ENCLAVE, client_to_enclave),
            (Direction.ENCLAVE_TO_CLIENT, enclave_to_client),
        ):
            _need("direction key", key, KEY_LEN)
            self._keys[direction, b"stream"] = _subkey(key, b"stream")
            self._keys[direction, b"mac"] = _subkey(key, b"mac")

    @classmethod
    def derive(cls, shared: bytes, transcript: bytes, hello: ClientHello) -> SessionKeys:
        """The keys both sides derive from the X25519 secret and the handshake transcript."""
        c2e, e2c = derive_session_keys(shared, transcript)
        return cls(hello.session_id, hello.agreement_id, c2e, e2c)

    @property
    def erased(self) -> bool:
        return not self._keys

    def _key(self, direction: Direction, label: bytes) -> bytearray:
        key = self._keys.get((direction, label))
        if key is None:
            raise SessionClosed("the session keys were erased")
        return key

    def stream_key(self, direction: Direction) -> bytes:
        """The STREAM key of ``direction`` (a copy: the STREAM machines take ``bytes``)."""
        return bytes(self._key(direction, b"stream"))

    def mac(self, direction: Direction, label: bytes, *ints: int, text: str = "") -> bytes:
        """The MAC the sender of ``direction`` puts on a control message."""
        data = _mac_input(label, self.session_id, ints, text)
        key = self._key(direction, b"mac")
        return hashlib.blake2b(data, digest_size=MAC_LEN, key=key, person=_PERSON_MAC).digest()

    def mac_valid(
        self, direction: Direction, mac: bytes, label: bytes, *ints: int, text: str = ""
    ) -> bool:
        return hmac.compare_digest(self.mac(direction, label, *ints, text=text), mac)

    def erase(self) -> list[bytearray]:
        """Overwrite every key with zeros and forget them; returns the zeroed buffers (empty
        once erased), so a caller (a test) can check that nothing is left in them."""
        buffers = list(self._keys.values())
        for buf in buffers:
            buf[:] = bytes(len(buf))
        self._keys.clear()
        return buffers

    def __repr__(self) -> str:
        state = "erased" if self.erased else "live"
        return f"SessionKeys(session_id={self.session_id.hex()}, {state})"


__all__ = [
    "ACK_LABEL",
    "CANCEL_LABEL",
    "HELLO_CONTEXT",
    "PROTOCOL_ID",
    "RESUME_LABEL",
    "RESUME_OK_LABEL",
    "STREAM_CONTEXT",
    "TRANSCRIPT_LABEL",
    "Direction",
    "SessionKeys",
    "enclave_hello_valid",
    "handshake_transcript",
    "hello_statement",
    "sign_enclave_hello",
    "stream_associated_data",
]
