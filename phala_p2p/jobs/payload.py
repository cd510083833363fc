"""What the two encrypted streams of a job session carry (sans-IO; ``protocols/job.md``, "Job
payload").

Client to enclave, one plaintext stream::

    u32 BE length || JobSpec (codec message, kind 427) || module (module_len bytes) || input ...

The input is everything after the module, up to the stream's final chunk: its size need not be
known in advance. Enclave to client, a run of records::

    record = type (1 byte) || length (4 bytes, BE) || payload

| type | payload | rule |
|---|---|---|
| 1 ``OUTPUT`` | output bytes | 1..``MAX_RECORD`` bytes |
| 2 ``RECEIPT`` | a ``JobReceipt`` (codec, kind 415) | cumulative; the last one is final |
| 3 ``FAILED`` | a ``JobFailed`` (codec, kind 428) | the job failed; the final receipt follows |

The enclave's stream ends (its final chunk) right after the final receipt. Both decoders here
are incremental and bounded: a record or header is never buffered beyond its size limit.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Final

from phala_p2p.errors import ProtocolViolation, UsageError
from phala_p2p.jobs.errors import InboundTooLarge
from phala_p2p.market.receipt import JobReceipt
from phala_p2p.wire.codec import decode, encode, message

MAX_SPEC: Final = 256
"""Largest encoded JobSpec."""
MAX_MODULE: Final = 64 << 20
"""Largest module a JobSpec may announce (an executor caps it lower)."""
MAX_RECORD: Final = 1 << 20
"""Largest record payload."""
MAX_RECEIPT: Final = 1024
MAX_FAILED: Final = 1024
_U32: Final = struct.Struct(">I")
_RECORD_HEADER: Final = struct.Struct(">BI")


@message(427)
@dataclass(frozen=True)
class JobSpec:
    """The head of the client's stream: the module's length and the fuel the job may use
    (at most the agreement's ``max_fuel``)."""

    module_len: int = field(metadata={"min": 1, "max": MAX_MODULE})
    max_fuel: int = field(metadata={"min": 1, "max": 1 << 62})


@message(428)
@dataclass(frozen=True)
class JobFailed:
    """The job did not complete: the executor's error class (``Trap``, ``FuelExhausted``,
    ``InvalidModule``, ...) and a message for humans (never job data)."""

    error: str = field(metadata={"max_len": 64})
    text: str = field(metadata={"max_len": 500})


class RecordType(enum.IntEnum):
    OUTPUT = 1
    RECEIPT = 2
    FAILED = 3


_RECORD_LIMITS: Final = {
    RecordType.OUTPUT: MAX_RECORD,
    RecordType.RECEIPT: MAX_RECEIPT,
    RecordType.FAILED: MAX_FAILED,
}


def job_header(spec: JobSpec) -> bytes:
    """The bytes that open the client's stream, before the module."""
    body = encode(spec)
    return _U32.pack(len(body)) + body


def header_size(spec: JobSpec) -> int:
    return len(job_header(spec))


def encode_record(kind: RecordType, payload: bytes) -> bytes:
    """One record; UsageError if ``payload`` is empty or above its type's limit."""
    if not 0 < len(payload) <= _RECORD_LIMITS[kind]:
        raise UsageError(f"a {kind.name} record holds 1..{_RECORD_LIMITS[kind]} bytes")
    return _RECORD_HEADER.pack(int(kind), len(payload)) + bytes(payload)


def output_records(data: bytes) -> list[bytes]:
    """``data`` as OUTPUT records of at most MAX_RECORD bytes (none for empty data)."""
    view = memoryview(data)
    return [
        encode_record(RecordType.OUTPUT, bytes(view[i : i + MAX_RECORD]))
        for i in range(0, len(view), MAX_RECORD)
    ]


@dataclass(frozen=True)
class Output:
    data: bytes

    def __repr__(self) -> str:
        return f"Output(<{len(self.data)} bytes>)"


@dataclass(frozen=True)
class ReceiptRecord:
    receipt: JobReceipt


@dataclass(frozen=True)
class FailedRecord:
    failure: JobFailed


Record = Output | ReceiptRecord | FailedRecord


class RecordDecoder:
    """The client's decoder of the enclave's plaintext stream (incremental, bounded). Each
    record's payload is copied once, out of the pieces it arrived in: nothing is gathered
    into a buffer first (a record usually spans two chunks)."""

    def __init__(self) -> None:
        self._head = bytearray()  # a record header cut between pieces
        self._kind: RecordType | None = None  # the record whose payload is coming
        self._left = 0  # its payload bytes still to come
        self._parts: list[memoryview] = []  # its payload so far, as views of the pieces
        self.final_seen = False
        self.failed = False

    @property
    def buffered(self) -> int:
        """Bytes taken and not yet given back as records (a header and what followed it)."""
        head = _RECORD_HEADER.size if self._kind is not None else len(self._head)
        return head + sum(len(part) for part in self._parts)

    def feed(self, data: bytes) -> list[Record]:
        if self.final_seen and data:
            raise ProtocolViolation("data after the final receipt", reason="after_final")
        out: list[Record] = []
        view = memoryview(data).cast("B")
        pos, size = 0, len(view)
        while pos < size:
            if self.final_seen:
                raise ProtocolViolation("data after the final receipt", reason="after_final")
            if self._kind is None:
                take = min(_RECORD_HEADER.size - len(self._head), size - pos)
                self._head += view[pos : pos + take]
                pos += take
                if len(self._head) < _RECORD_HEADER.size:
                    break
                self._kind, self._left = self._header(bytes(self._head))
                self._head.clear()
                continue
            take = min(self._left, size - pos)
            self._parts.append(view[pos : pos + take])
            self._left -= take
            pos += take
            if not self._left:
                parts, kind = self._parts, self._kind
                self._parts, self._kind = [], None
                payload = parts[0].tobytes() if len(parts) == 1 else b"".join(parts)
                out.append(self._record(kind, payload))
        return out

    @staticmethod
    def _header(head: bytes) -> tuple[RecordType, int]:
        kind_byte, length = _RECORD_HEADER.unpack(head)
        try:
            kind = RecordType(kind_byte)
        except ValueError:
            raise ProtocolViolation(
                f"unknown record type {kind_byte}", reason="bad_record"
            ) from None
        if not 0 < length <= _RECORD_LIMITS[kind]:
            raise ProtocolViolation(f"a {kind.name} record of {length} bytes", reason="bad_record")
        return kind, length

    def _record(self, kind: RecordType, payload: bytes) -> Record:
        if self.failed and kind is not RecordType.RECEIPT:
            raise ProtocolViolation(
                f"a {kind.name} record after FAILED (only the final receipt may follow)",
                reason="bad_record",
            )
        if kind is RecordType.OUTPUT:
            return Output(payload)
        if kind is RecordType.RECEIPT:
            receipt = decode(payload, max_size=MAX_RECEIPT, expect=JobReceipt)
            if self.failed and not receipt.final:
                raise ProtocolViolation("an intermediate receipt after FAILED", reason="bad_record")
            self.final_seen = receipt.final
            return ReceiptRecord(receipt)
        failed = FailedRecord(decode(payload, max_size=MAX_FAILED, expect=JobFailed))
        self.failed = True
        return failed

    def finish(self) -> None:
        """The enclave's stream ended: it must have ended on the final receipt."""
        if self._head or self._kind is not None or not self.final_seen:
            raise ProtocolViolation(
                "the enclave's stream ended without its final receipt", reason="no_final_receipt"
            )


class SpecReader:
    """The enclave's reader of the client's stream head: yields the JobSpec, then the module,
    then hands every later byte over as input."""

    def __init__(self, *, max_module: int) -> None:
        self._buf = bytearray()
        self._max_module = max_module
        self.spec: JobSpec | None = None
        self.module: bytes | None = None

    def feed(self, data: bytes) -> bytes:
        """Take plaintext; returns the part of it that is input (after spec and module)."""
        if self.module is not None:
            return data
        self._buf += data
        if self.spec is None:
            if len(self._buf) < _U32.size:
                return b""
            (size,) = _U32.unpack_from(self._buf)
            if not 0 < size <= MAX_SPEC:
                raise ProtocolViolation(f"a job spec of {size} bytes", reason="bad_spec")
            if len(self._buf) < _U32.size + size:
                return b""
            spec = decode(bytes(self._buf[_U32.size : _U32.size + size]), expect=JobSpec)
            if spec.module_len > self._max_module:
                raise InboundTooLarge(
                    f"a module of {spec.module_len} bytes is above {self._max_module}"
                )
            self.spec = spec
            del self._buf[: _U32.size + size]
        if len(self._buf) < self.spec.module_len:
            return b""
        self.module = bytes(self._buf[: self.spec.module_len])
        rest = bytes(self._buf[self.spec.module_len :])
        self._buf = bytearray()
        return rest

    @property
    def complete(self) -> bool:
        return self.module is not None


__all__ = [
    "MAX_RECORD",
    "FailedRecord",
    "JobFailed",
    "JobSpec",
    "Output",
    "ReceiptRecord",
    "Record",
    "RecordDecoder",
    "RecordType",
    "SpecReader",
    "encode_record",
    "header_size",
    "job_header",
    "output_records",
]
