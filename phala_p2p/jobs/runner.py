"""The enclave's job sessions, whole: handshake, streams, execution and receipts (sans-IO).

``EnclaveJobs`` runs inside the enclave process. Its driver hands it the bytes of each
connection as they arrive (``open`` for a connection's first bytes, ``data`` for the rest,
``lost`` when it drops) and writes back what each call returns. Between the two it decrypts
the client's stream, feeds the job (``protocols/job.md``, "Job payload") to the executor piece
by piece, and sends the output and cumulative usage receipts back, encrypted.

Memory stays bounded whatever the job's size: a chunk of the client's is opened only when
the output of the previous one has been handed to the session (whose window bounds what it
holds), and unopened chunks are not acknowledged, so a client that respects its window never
has more than ``window`` of them here (more is a protocol violation).

Time is a parameter (``now_ms``); the executor is any object with the interface of
``tee.executor.WasmExecutor`` (:class:`Executor`).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from phala_p2p.chain.tx import Signer
from phala_p2p.errors import ExecutionError, ProtocolViolation, UsageError
from phala_p2p.jobs.config import JobConfig
from phala_p2p.jobs.enclave import EnclaveJobSession, SessionTable, refusal
from phala_p2p.jobs.errors import (
    CancelCode,
    InboundTooLarge,
    JobCancelled,
    NotTheClient,
    SessionClosed,
    SessionExpired,
    WrongAgreement,
)
from phala_p2p.jobs.framing import Frame, FrameDecoder, FrameType, decode_frame
from phala_p2p.jobs.keys import client_hello_valid
from phala_p2p.jobs.messages import ClientHello
from phala_p2p.jobs.payload import (
    JobFailed,
    RecordType,
    SpecReader,
    encode_record,
    output_records,
)
from phala_p2p.jobs.session import DataReceived, State
from phala_p2p.market.negotiation import Agreement, AgreementTerms
from phala_p2p.market.receipt import JobReceipt, output_hasher
from phala_p2p.wire.codec import encode

DEFAULT_RECEIPT_EVERY: Final = 16 << 20
"""Input bytes between two intermediate receipts."""
MAX_AGREEMENTS: Final = 4096
"""Agreements remembered (to refuse a second run of one, and never reuse a receipt seq)."""
MAX_DEFERRED: Final = 33
"""Unopened client chunks the enclave holds while its output waits: a client's window is at
most 32 (``protocols/job.md``), and one more may be in flight behind an acknowledgement."""


class StreamRun(Protocol):
    def feed(self, data: bytes) -> bytes: ...
    def finish(self) -> bytes: ...
    @property
    def fuel_used(self) -> int: ...
    def close(self) -> None: ...


class Executor(Protocol):
    @property
    def limits(self) -> Any: ...
    def is_streaming(self, module_bytes: bytes) -> bool: ...
    def open_stream(
        self, module_bytes: bytes, *, fuel: int, secrets: Sequence[bytes] = ()
    ) -> StreamRun: ...
    def run(
        self, module_bytes: bytes, input: bytes, *, fuel: int, secrets: Sequence[bytes] = ()
    ) -> Any: ...


@dataclass
class _AgreementState:
    terms: AgreementTerms
    seq: int = -1
    finished: bool = False
    session_id: bytes | None = None


@dataclass
class Step:
    """What one call produced: ``out`` to write on the connection; ``receipts`` the enclave
    signed (public: the host keeps them to settle); ``closed`` when the connection must be
    closed after writing ``out`` (the session is over, or this connection was refused);
    ``done`` when the session completed (both streams, the final receipt delivered)."""

    out: bytes = b""
    receipts: list[JobReceipt] = field(default_factory=list)
    closed: bool = False
    done: bool = False
    session_id: bytes = b""
    generation: int = 0
    agreement_id: bytes = b""
    error: str = ""


class _Run:
    """One session's job: the spec and module, the executor, the output and the receipts."""

    def __init__(
        self,
        jobs: EnclaveJobs,
        session: EnclaveJobSession,
        agreement: _AgreementState,
    ) -> None:
        self.jobs = jobs
        self.session = session
        self.agreement = agreement
        limits = jobs.executor.limits
        self.reader = SpecReader(max_module=int(limits.max_module_bytes))
        self.decoder = FrameDecoder()
        self.generation = session.generation
        self.deferred: list[Frame] = []
        self.pending = bytearray()  # records not yet handed to the session
        self.final_queued = False  # the final receipt is in ``pending``
        self.final_sent = False
        self.stream: StreamRun | None = None
        self.whole: bytearray | None = None
        self.fuel = 0
        self.fuel_used = 0
        self.bytes_in = 0  # plaintext the job took (the receipts' bytes_in)
        self.received = 0  # plaintext the client sent
        self.bytes_out = 0
        self.hash = output_hasher()
        self.last_receipt_at = 0
        self.receipts: list[JobReceipt] = []

    # -- input ---------------------------------------------------------------------------

    def on_bytes(self, data: bytes, now_ms: int) -> None:
        self.on_frames(self.decoder.feed(data), now_ms)

    def on_frames(self, frames: list[Frame], now_ms: int) -> None:
        for frame in frames:
            if frame.type is FrameType.CHUNK and (self.deferred or self.blocked):
                self.deferred.append(frame)
                if len(self.deferred) > MAX_DEFERRED:
                    raise ProtocolViolation(
                        "the client sent past its window", reason="window_exceeded"
                    )
                continue
            self._frame(frame, now_ms)
        self.pump(now_ms)

    @property
    def blocked(self) -> bool:
        """A whole chunk of output (or the end) waits for room: open no more of the client's
        chunks. Less than a chunk waits for more output, to fill the chunk."""
        chunk = self.session.outbound.chunk_size if self.session.outbound is not None else 1
        return len(self.pending) >= chunk or (self.final_queued and not self.final_sent)

    def pump(self, now_ms: int) -> None:
        self._flush()
        while self.deferred and not self.blocked and self.session.state is State.OPEN:
            self._frame(self.deferred.pop(0), now_ms)
        # nothing more to open now: what output is left goes out, whole chunk or not
        self._flush(partial=True)

    def _frame(self, frame: Frame, now_ms: int) -> None:
        for event in self.session.receive_frames([frame], now_ms):
            if isinstance(event, DataReceived):
                self._data(event.data, event.final)
        self._flush()

    def _data(self, data: bytes, final: bool) -> None:
        self.received += len(data)  # what the client sent, counted even after a failure
        if self.received > self.agreement.terms.job_bytes:
            raise InboundTooLarge(
                f"the job sent more than the {self.agreement.terms.job_bytes} bytes agreed"
            )
        if self.final_queued:
            return
        self.bytes_in += len(data)
        try:
            rest = self.reader.feed(data)
            if self.reader.complete and self.stream is None and self.whole is None:
                self._start()
            if rest:
                self._input(rest)
            if final:
                if not self.reader.complete:
                    raise ProtocolViolation("the job ended before its module", reason="bad_spec")
                self._finish()
            elif self.bytes_in - self.last_receipt_at >= self.jobs.receipt_every:
                self._receipt(final=False)
        except ExecutionError as err:
            self._failed(err)

    def _start(self) -> None:
        spec = self.reader.spec
        module = self.reader.module
        assert spec is not None
        assert module is not None
        terms = self.agreement.terms
        if spec.max_fuel > terms.max_fuel:
            raise ProtocolViolation(
                f"the job asks for {spec.max_fuel} fuel, the agreement allows {terms.max_fuel}",
                reason="bad_spec",
            )
        self.fuel = min(spec.max_fuel, int(self.jobs.executor.limits.max_fuel))
        executor = self.jobs.executor
        if executor.is_streaming(module):
            self.stream = executor.open_stream(module, fuel=self.fuel)
        else:
            self.whole = bytearray()

    def _input(self, data: bytes) -> None:
        if self.stream is not None:
            step = int(self.jobs.executor.limits.max_input)  # the most one feed takes
            for start in range(0, len(data), step):
                self._output(self.stream.feed(data[start : start + step]))
                self.fuel_used = self.stream.fuel_used
            return
        assert self.whole is not None
        if len(self.whole) + len(data) > int(self.jobs.executor.limits.max_input):
            raise InboundTooLarge(
                "the input is above the executor's max_input for a job that is not streaming"
            )
        self.whole += data

    def _finish(self) -> None:
        if self.stream is not None:
            self._output(self.stream.finish())
            self.fuel_used = self.stream.fuel_used
            self.stream.close()
        else:
            assert self.whole is not None
            assert self.reader.module is not None
            result = self.jobs.executor.run(self.reader.module, bytes(self.whole), fuel=self.fuel)
            self.whole = None
            self.fuel_used = int(result.fuel_used)
            self._output(result.output)
        self._receipt(final=True)

    def _failed(self, err: ExecutionError) -> None:
        if self.stream is not None:
            self.fuel_used = self.stream.fuel_used
            self.stream.close()
        elif type(err).__name__ == "FuelExhausted":
            self.fuel_used = self.fuel
        self.whole = None
        failed = JobFailed(error=type(err).__name__[:64], text=_failure_text(err))
        self.pending += encode_record(RecordType.FAILED, encode(failed))
        self._receipt(final=True)

    def _output(self, data: bytes) -> None:
        if not data:
            return
        self.bytes_out += len(data)
        self.hash.update(data)
        for record in output_records(data):
            self.pending += record

    def _receipt(self, *, final: bool) -> None:
        state = self.agreement
        state.seq += 1
        receipt = JobReceipt(
            chain_id=state.terms.chain_id,
            agreement_id=state.terms.agreement_id,
            seq=state.seq,
            fuel_used=min(self.fuel_used, state.terms.max_fuel),
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            output_hash=self.hash.copy().digest(),
            final=final,
            enclave=self.jobs.signer.public_key,
        ).sign(self.jobs.signer)
        self.last_receipt_at = self.bytes_in
        self.receipts.append(receipt)
        self.pending += encode_record(RecordType.RECEIPT, encode(receipt))
        if final:
            self.final_queued = True
            state.finished = True

    # -- output --------------------------------------------------------------------------

    def _flush(self, *, partial: bool = False) -> None:
        """Hand pending records to the session as far as its window allows: whole chunks
        only, unless ``partial`` or the final receipt is pending (a record's few header bytes
        must not make a chunk of their own)."""
        session = self.session
        while (self.pending or (self.final_queued and not self.final_sent)) and (
            session.state is State.OPEN
        ):
            room = session.send_room
            if room == 0:
                return
            take = min(room, len(self.pending))
            if not partial and not self.final_queued:
                chunk = session.outbound.chunk_size if session.outbound is not None else 1
                take -= take % chunk
                if take == 0:
                    return
            last = self.final_queued and take == len(self.pending)
            session.send(bytes(self.pending[:take]), final=last)
            del self.pending[:take]
            if last:
                self.final_sent = True

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        self.whole = None
        self.pending = bytearray()
        self.deferred.clear()


class EnclaveJobs:
    """Every job session of one enclave (see the module's docstring)."""

    def __init__(
        self,
        signer: Signer,
        executor: Executor,
        config: JobConfig | None = None,
        *,
        max_sessions: int = 64,
        receipt_every: int = DEFAULT_RECEIPT_EVERY,
    ) -> None:
        if type(receipt_every) is not int or receipt_every < 1:
            raise UsageError("receipt_every must be a positive int")
        self.signer = signer
        self.executor = executor
        self.receipt_every = receipt_every
        self._agreements: OrderedDict[bytes, _AgreementState] = OrderedDict()
        self._table = SessionTable(
            signer, self._terms, config or JobConfig(), max_sessions=max_sessions
        )
        self._runs: dict[bytes, _Run] = {}

    def __len__(self) -> int:
        return len(self._runs)

    def _terms(self, agreement_id: bytes) -> AgreementTerms | None:
        state = self._agreements.get(agreement_id)
        return None if state is None else state.terms

    def _admit(self, agreement: Agreement) -> _AgreementState:
        """Check ``agreement`` (both signatures, our own key) and remember it."""
        agreement.verify()
        if agreement.terms.enclave != self.signer.public_key:
            raise WrongAgreement("the agreement names another enclave")
        state = self._agreements.get(agreement.id)
        if state is None:
            state = _AgreementState(agreement.terms)
            self._agreements[agreement.id] = state
            while len(self._agreements) > MAX_AGREEMENTS:
                old_id, old = next(iter(self._agreements.items()))
                if old.session_id is not None and old.session_id in self._runs:
                    break  # never forget an agreement whose job runs
                del self._agreements[old_id]
        if state.finished:
            raise WrongAgreement("the agreement's job has run")
        return state

    def open(
        self, data: bytes, agreement: Agreement | None, now_ms: int, *, grace_ms: int | None = None
    ) -> Step:
        """A connection's first bytes (a ClientHello, or a Resume, and maybe more), with the
        agreement the hello names (the host looks it up; None for a Resume). A refusal comes
        back as a Step with ``closed`` set and the refusal in ``out``. ``grace_ms`` (the host's
        setting; default the table's) is how long a new session is kept after a drop."""
        decoder = FrameDecoder()
        try:
            frames = decoder.feed(data)
            if not frames:
                raise ProtocolViolation(
                    "a connection's first frame must come whole", reason="malformed"
                )
            first, rest = frames[0], frames[1:]
            if first.type is FrameType.CLIENT_HELLO:
                self.expire(now_ms)
                hello = decode_frame(first)
                if (
                    agreement is None
                    or not isinstance(hello, ClientHello)
                    or hello.agreement_id != agreement.id
                ):
                    raise WrongAgreement("this enclave serves no such agreement")
                state = self._admit(agreement)
                if not client_hello_valid(hello, agreement.terms.client):
                    raise NotTheClient("the hello is not signed by the agreement's client")
                if state.session_id is not None and state.session_id in self._runs:
                    old = self._runs[state.session_id]
                    if old.bytes_in or old.session.state is State.OPEN:
                        raise WrongAgreement("a session of this agreement is open: resume it")
                    self._drop(state.session_id)
                config = self._table.config
                if grace_ms is not None:
                    config = dataclasses.replace(config, grace_ms=grace_ms)
                session = self._table.open(first, now_ms, config=config)
                state.session_id = session.session_id
                run = _Run(self, session, state)
                self._runs[session.session_id] = run
            else:
                # before any sweep: a resume that comes too late is told so (session_expired)
                session = self._table.open(first, now_ms)
                found = self._runs.get(session.session_id)
                if found is None:  # the table and the runs always agree; be safe
                    session.close()
                    raise ProtocolViolation("no such session", reason="unknown_session")
                run = found
                run.deferred.clear()
                run.generation = session.generation
        except (ProtocolViolation, SessionExpired) as err:
            self.expire(now_ms)
            return Step(out=refusal(err), closed=True, error=f"{_reason(err)}: {err}")
        run.decoder = decoder  # it may hold the start of the next frame
        return self._step(run, rest, now_ms)

    def data(self, session_id: bytes, generation: int, data: bytes, now_ms: int) -> Step:
        """More bytes of the connection that ``open`` returned ``session_id``/``generation``
        for. A stale generation (the session moved to a newer connection) gets ``closed``."""
        self.expire(now_ms)
        run = self._runs.get(session_id)
        if run is None or run.generation != generation or run.session.state is State.SUSPENDED:
            return Step(closed=True, session_id=session_id, error="the session moved on or ended")
        if now_ms >= run.agreement.terms.deadline_ms:
            text = "the agreement's deadline passed"
            out = self.cancel(session_id, int(CancelCode.DEADLINE), text)
            return Step(out=out, closed=True, session_id=session_id, error=f"deadline: {text}")
        return self._step(run, data, now_ms)

    def _step(self, run: _Run, data: bytes | list[Frame], now_ms: int) -> Step:
        session = run.session
        receipts_before = len(run.receipts)
        error = ""
        try:
            if isinstance(data, list):
                run.on_frames(data, now_ms)
            else:
                run.on_bytes(data, now_ms)
        except ProtocolViolation as err:
            error = f"{_reason(err)}: {err}"
            if session.state is not State.CLOSED:
                session.cancel(_cancel_code(err), error)
        except JobCancelled as err:
            error = f"client_cancelled: {err}"
        except SessionClosed as err:
            error = f"the session is closed: {err}"
        out = session.data_to_send()
        done = session.done
        if done:
            session.close()
        closed = session.state is State.CLOSED
        step = Step(
            out=out,
            receipts=run.receipts[receipts_before:],
            closed=closed,
            done=done,
            session_id=session.session_id,
            generation=run.generation,
            agreement_id=run.agreement.terms.agreement_id,
            error=error,
        )
        if closed:
            self._drop(session.session_id)
        return step

    def lost(self, session_id: bytes, generation: int, now_ms: int) -> None:
        """The connection of ``generation`` dropped: the session waits for a resume."""
        run = self._runs.get(session_id)
        if run is not None and run.generation == generation:
            run.session.connection_lost(now_ms)
            if run.session.state is State.CLOSED:
                self._drop(session_id)

    def cancel(self, session_id: bytes, code: int, text: str) -> bytes:
        """End a session from the host's side (shutting down); the Cancel to write, if any."""
        run = self._runs.get(session_id)
        if run is None:
            return b""
        if run.session.state is not State.CLOSED:
            run.session.cancel(code, text)
        out = run.session.data_to_send()
        self._drop(session_id)
        return out

    def expire(self, now_ms: int) -> list[bytes]:
        """Drop the sessions past their grace period (their jobs are abandoned), and those
        closed since (a resume refused as too late closes its session)."""
        gone = self._table.expire(now_ms)
        gone += [
            sid
            for sid, run in self._runs.items()
            if run.session.state is State.CLOSED and sid not in gone
        ]
        for sid in gone:
            self._drop(sid)
        return gone

    def _drop(self, session_id: bytes) -> None:
        run = self._runs.pop(session_id, None)
        if run is not None:
            run.close()
            if run.session.state is not State.CLOSED:
                run.session.close()
        self._table.expire(0)  # forget closed sessions

    def receipts_of(self, session_id: bytes) -> list[JobReceipt]:
        run = self._runs.get(session_id)
        return list(run.receipts) if run is not None else []


def _failure_text(err: ExecutionError) -> str:
    """The error's message, cut so that its FAILED record fits MAX_FAILED whatever characters
    it holds (it may quote the client's module): 500 characters and 800 UTF-8 bytes at most."""
    return str(err).encode("utf-8", "replace")[:800].decode("utf-8", "ignore")[:500]


def _reason(err: BaseException) -> str:
    return str(getattr(err, "reason", type(err).__name__))


def _cancel_code(err: ProtocolViolation) -> int:
    if isinstance(err, InboundTooLarge):
        return int(CancelCode.TOO_LARGE)
    return int(CancelCode.PROTOCOL_ERROR)


__all__ = ["DEFAULT_RECEIPT_EVERY", "EnclaveJobs", "Executor", "Step", "StreamRun"]
