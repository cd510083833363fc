"""Builders shared by the job session tests: an enclave identity, its agreement, a connected
client/enclave pair, and a pump that moves bytes between them (no IO, literal times)."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any

from phala_p2p.crypto.identity import Identity
from phala_p2p.jobs import (
    ClientJobSession,
    DataReceived,
    EnclaveJobSession,
    Event,
    Frame,
    FrameDecoder,
    HandshakeComplete,
    JobConfig,
    JobSession,
    SessionTable,
    decode_frame,
)
from phala_p2p.jobs.messages import JobMessage
from phala_p2p.market.negotiation import AgreementTerms

NOW = 1_700_000_000_000  # ms since the Unix epoch: every test starts here
ENCLAVE = Identity.from_seed(bytes([0x11]) * 32)
OTHER_ENCLAVE = Identity.from_seed(bytes([0x22]) * 32)
AGREEMENT_ID = bytes([0x07]) * 32
OTHER_AGREEMENT_ID = bytes([0x08]) * 32
KIB = 1024
MIB = 1024 * KIB


def make_terms(
    agreement_id: bytes = AGREEMENT_ID,
    *,
    enclave: bytes | None = None,
    deadline_ms: int = NOW + 3_600_000,
) -> AgreementTerms:
    return AgreementTerms(
        agreement_id=agreement_id,
        chain_id="phala-test",
        client=bytes([0x0C]) * 32,
        client_peer="12D3KooWclient",
        miner_peer="12D3KooWminer",
        enclave=ENCLAVE.public_key if enclave is None else enclave,
        operator=bytes([0x0A]) * 32,
        escrow_id=bytes([0x0E]) * 32,
        job_bytes=1 << 30,
        max_fuel=10**8,
        price=1000,
        deadline_ms=deadline_ms,
    )


def make_table(
    config: JobConfig | None = None, *terms: AgreementTerms, **kwargs: int
) -> SessionTable:
    known = {t.agreement_id: t for t in (terms or (make_terms(),))}
    return SessionTable(ENCLAVE, known.get, config, **kwargs)


def frames_of(data: bytes) -> list[Frame]:
    return FrameDecoder().feed(data)


def messages_of(data: bytes) -> list[JobMessage]:
    return [decode_frame(f) for f in frames_of(data)]


def only_frame(data: bytes) -> Frame:
    frames = frames_of(data)
    assert len(frames) == 1, frames
    return frames[0]


def connect(
    config: JobConfig | None = None, table: SessionTable | None = None, now_ms: int = NOW
) -> tuple[ClientJobSession, EnclaveJobSession, SessionTable]:
    """A client and an enclave session with the handshake done."""
    table = make_table(config) if table is None else table
    client = ClientJobSession(AGREEMENT_ID, ENCLAVE.public_key, config)
    enclave = table.open(only_frame(client.data_to_send()), now_ms)
    events = client.receive_data(enclave.data_to_send(), now_ms)
    assert events == [HandshakeComplete(client.session_id)]
    return client, enclave, table


def piece(n: int, size: int) -> bytes:
    """Reproducible pseudo-random plaintext number ``n``."""
    return random.Random(n).randbytes(size)


@dataclass
class Upload:
    """One side's outgoing payload of ``chunks`` pieces of ``size`` bytes, made on demand (the
    test never holds the whole payload), and the hash of what the peer gave back to us."""

    session: JobSession
    chunks: int
    size: int
    seed: int = 0
    next: int = 0
    sent_hash: Any = field(default_factory=lambda: hashlib.blake2b())
    received_hash: Any = field(default_factory=lambda: hashlib.blake2b())
    received: int = 0
    finished: bool = False
    wire_bytes: int = 0
    """Bytes this side handed to its transport (frames included)."""

    def fill(self) -> None:
        """Give the session plaintext while it has window room."""
        while self.next < self.chunks and self.session.send_room >= self.size:
            data = piece(self.seed + self.next, self.size)
            self.sent_hash.update(data)
            self.session.send(data, final=self.next == self.chunks - 1)
            self.next += 1

    def take(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, DataReceived):
                self.received_hash.update(event.data)
                self.received += len(event.data)
                self.finished = event.final

    def outgoing(self) -> bytes:
        data = self.session.data_to_send()
        self.wire_bytes += len(data)
        return data


def pump_once(a: Upload, b: Upload, now_ms: int = NOW) -> None:
    """One round trip: both sides fill their window, then each reads what the other wrote."""
    a.fill()
    b.fill()
    b.take(b.session.receive_data(a.outgoing(), now_ms))
    a.take(a.session.receive_data(b.outgoing(), now_ms))
