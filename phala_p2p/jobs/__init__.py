"""jobs room: the sans-IO core of the confidential job session protocol ``/phala/job/1.0.0``.

A client and a miner's enclave run a forward-secret handshake bound to an agreement, then
stream chunked STREAM-encrypted data both ways with windowed flow control, survive dropped
connections by resuming, and can cancel with a reason. Nothing here does IO or reads a clock;
a trio driver moves the bytes (``protocols/job.md`` is the wire contract).

Layers, bottom up: ``messages`` (wire messages), ``framing`` (frames on a stream),
``keys`` (signed statement, transcript, key schedule, MACs), ``flow`` (one direction:
windowed sender, acknowledging receiver), ``session`` (the shared machine), ``client`` and
``enclave`` (each side; the enclave's ``SessionTable``).
"""

from phala_p2p.jobs.client import ClientJobSession
from phala_p2p.jobs.config import JobConfig
from phala_p2p.jobs.enclave import EnclaveJobSession, SessionTable, refusal
from phala_p2p.jobs.errors import CancelCode, JobCancelled, SessionExpired
from phala_p2p.jobs.framing import Frame, FrameDecoder, FrameType, decode_frame, encode_frame
from phala_p2p.jobs.session import (
    Acked,
    DataReceived,
    Event,
    HandshakeComplete,
    JobSession,
    Resumed,
    State,
)

__all__ = [
    "Acked",
    "CancelCode",
    "ClientJobSession",
    "DataReceived",
    "EnclaveJobSession",
    "Event",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "HandshakeComplete",
    "JobCancelled",
    "JobConfig",
    "JobSession",
    "Resumed",
    "SessionExpired",
    "SessionTable",
    "State",
    "decode_frame",
    "encode_frame",
    "refusal",
]
