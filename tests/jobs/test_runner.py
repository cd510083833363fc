"""The enclave's job runner end to end, in memory: a real ClientJobSession talks to a real
EnclaveJobs running real WebAssembly (``WasmExecutor``). The test moves the bytes itself, so it
can cut, delay, modify, reorder and replay them (the relaying miner is untrusted); times are
literal ms."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from phala_p2p.crypto.identity import Identity
from phala_p2p.errors import ProtocolViolation, StreamReordered, StreamTampered, StreamTruncated
from phala_p2p.jobs import (
    CancelCode,
    ClientJobSession,
    DataReceived,
    Event,
    Frame,
    JobCancelled,
    JobConfig,
    Resumed,
    SessionExpired,
    State,
    decode_frame,
    encode_frame,
)
from phala_p2p.jobs.errors import ChunkReplayed
from phala_p2p.jobs.flow import ChunkSender
from phala_p2p.jobs.framing import HEADER_SIZE, FrameType
from phala_p2p.jobs.keys import Direction, stream_associated_data
from phala_p2p.jobs.messages import Cancel, Chunk
from phala_p2p.jobs.payload import (
    FailedRecord,
    JobFailed,
    JobSpec,
    Output,
    ReceiptRecord,
    RecordDecoder,
    job_header,
)
from phala_p2p.jobs.runner import MAX_DEFERRED, EnclaveJobs, Step
from phala_p2p.market.negotiation import Agreement
from phala_p2p.market.receipt import JobReceipt, output_hash, output_hasher
from phala_p2p.tee.executor import ExecutorLimits, WasmExecutor
from phala_p2p.tee.statements import statement_bytes

from .helpers import (
    ENCLAVE,
    KIB,
    MIB,
    NOW,
    OTHER_AGREEMENT_ID,
    OTHER_ENCLAVE,
    frames_of,
    make_terms,
    messages_of,
    piece,
)

JOBS_DIR = Path(__file__).resolve().parents[2] / "examples" / "jobs"
CLIENT = Identity.from_seed(bytes([0x33]) * 32)
GRACE = 10_000
SMALL = JobConfig(chunk_size=4 * KIB, window=4, grace_ms=GRACE)
"""Both sides' sessions in most tests: small chunks make many of them."""
CHUNK_OVERHEAD = 17  # final flag + Poly1305 tag
RECEIPT_RECORD = 5 + 1024  # a RECEIPT record at its largest


@functools.cache
def wasm(name: str) -> bytes:
    return bytes(wasmtime.wat2wasm((JOBS_DIR / f"{name}.wat").read_text()))


@functools.cache
def executor(**limits: Any) -> WasmExecutor:
    return WasmExecutor(ExecutorLimits(**limits))


def make_agreement(
    agreement_id: bytes = bytes([0x07]) * 32,
    *,
    enclave: Identity = ENCLAVE,
    signer: Identity | None = None,
    job_bytes: int = 1 << 30,
    max_fuel: int = 10**8,
    deadline_ms: int = NOW + 3_600_000,
) -> Agreement:
    """Terms naming ``enclave``, signed by CLIENT and by ``signer`` (default: ``enclave``)."""
    terms = dataclasses.replace(
        make_terms(agreement_id, enclave=enclave.public_key, deadline_ms=deadline_ms),
        client=CLIENT.public_key,
        job_bytes=job_bytes,
        max_fuel=max_fuel,
    )
    statement = statement_bytes("agreement", terms.payload())
    return Agreement(
        terms=terms,
        client_sig=CLIENT.sign(statement),
        miner_sig=(signer or enclave).sign(statement),
    )


class Source:
    """The client's plaintext: the job header, the module, then the input pieces, made on
    demand (the test never holds a large input whole)."""

    def __init__(
        self,
        module: bytes,
        pieces: Iterable[bytes],
        *,
        max_fuel: int = 10**7,
        head: bytes | None = None,
    ) -> None:
        if head is None:
            head = job_header(JobSpec(module_len=len(module), max_fuel=max_fuel)) + module
        self.head_len = len(head)
        self._pieces: Iterator[bytes] = _chain(head, pieces)
        self._buf = bytearray()
        self._exhausted = False
        self.done = False

    def take(self, room: int) -> tuple[bytes, bool]:
        """Up to ``room`` bytes, and whether they are the last."""
        while len(self._buf) <= room and not self._exhausted:
            nxt = next(self._pieces, None)
            if nxt is None:
                self._exhausted = True
            else:
                self._buf += nxt
        data = bytes(self._buf[:room])
        del self._buf[:room]
        self.done = self._exhausted and not self._buf
        return data, self.done


def _chain(head: bytes, pieces: Iterable[bytes]) -> Iterator[bytes]:
    yield head
    yield from pieces


def hashed(pieces: Iterable[bytes], into: Any) -> Iterator[bytes]:
    for p in pieces:
        into.update(p)
        yield p


class _PeakBytes(bytearray):
    """A bytearray that remembers the most it ever held."""

    peak = 0

    def __iadd__(self, other: Any) -> _PeakBytes:
        super().__iadd__(other)
        self.peak = max(self.peak, len(self))
        return self


class _PeakFrames(list[Frame]):
    """A list of frames that remembers the most frames and bytes it ever held."""

    peak = 0
    peak_bytes = 0

    def append(self, frame: Frame) -> None:
        super().append(frame)
        self.peak = max(self.peak, len(self))
        self.peak_bytes = max(self.peak_bytes, sum(len(f.body) for f in self))


@dataclasses.dataclass
class Memory:
    """What the runner held for the session at its peak (within calls too): its pending
    records, the client chunks it deferred, and its session's sender."""

    pending: _PeakBytes | None = None
    deferred: _PeakFrames | None = None
    sender: ChunkSender | None = None


class Harness:
    """A client session and the enclave's runner, with the bytes between them in our hands.
    ``up``/``down`` may rewrite what goes client->enclave / enclave->client."""

    def __init__(
        self,
        jobs: EnclaveJobs,
        agreement: Agreement,
        source: Source,
        config: JobConfig = SMALL,
        *,
        keep_output: bool = True,
    ) -> None:
        self.jobs = jobs
        self.agreement = agreement
        self.source = source
        self.client = ClientJobSession.for_agreement(agreement, config, client=CLIENT)
        self.records = RecordDecoder()
        self.keep_output = keep_output
        self.output = bytearray()
        self.output_hash = output_hasher()
        self.received = 0
        self.sent = 0
        self.receipts: list[JobReceipt] = []
        """What the client got and checked."""
        self.host_receipts: list[JobReceipt] = []
        """What the runner handed its host (Step.receipts)."""
        self.failures: list[JobFailed] = []
        self.kinds: list[str] = []
        """The order of the records the client decoded."""
        self.steps: list[Step] = []
        self.session_id = b""
        self.generation = 0
        self.now = NOW
        self.memory = Memory()
        self.up: Callable[[bytes], bytes] | None = None
        self.down: Callable[[bytes], bytes] | None = None

    # -- moving bytes -----------------------------------------------------------------------

    def start(self) -> Step:
        step = self.jobs.open(self.client.data_to_send(), self.agreement, self.now)
        self._seen(step)
        self.to_client(step.out)
        return step

    def upload(self) -> bytes:
        """The client's plaintext as its window allows, then the bytes it writes."""
        while not self.source.done and self.client.state is State.OPEN:
            room = self.client.send_room
            if room == 0:
                break
            data, last = self.source.take(room)
            self.client.send(data, final=last)
            self.sent += len(data)
        return self.client.data_to_send()

    def to_enclave(self, data: bytes) -> Step:
        if self.up is not None:
            data = self.up(data)
        step = self.jobs.data(self.session_id, self.generation, data, self.now)
        self._seen(step)
        return step

    def to_client(self, data: bytes) -> None:
        if self.down is not None:
            data = self.down(data)
        if data:
            self.take(self.client.receive_data(data, self.now))

    def round(self) -> Step | None:
        """One exchange: the client writes, the enclave answers, the client reads. None when
        the client had nothing to write."""
        data = self.upload()
        if not data:
            return None
        step = self.to_enclave(data)
        self.to_client(step.out)
        return step

    def run(self, *, max_rounds: int = 100_000) -> Step:
        """Start (unless started) and exchange until the runner closes the connection."""
        step = self.start() if not self.steps else self.steps[-1]
        for _ in range(max_rounds):
            if step.closed:
                if self.client.done:
                    self.client.close()
                return step
            nxt = self.round()
            assert nxt is not None, "stalled: neither side has anything to write"
            step = nxt
        raise AssertionError("the job did not end")

    def _seen(self, step: Step) -> None:
        self.steps.append(step)
        self.host_receipts += step.receipts
        if step.session_id:
            self.session_id, self.generation = step.session_id, step.generation
        self._measure()

    def _measure(self) -> None:
        # No public accessor exposes what a session's run holds: instrument the runner's own
        # buffers (once, while they are still empty) to record their peaks.
        run = self.jobs._runs.get(self.session_id)
        m = self.memory
        if run is None or m.pending is not None:
            return
        assert not run.pending
        assert not run.deferred
        run.pending = m.pending = _PeakBytes()
        run.deferred = m.deferred = _PeakFrames()
        m.sender = run.session.outbound

    # -- the client's side of the payload (as services/jobs.py's _ClientRun) -----------------

    def take(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, DataReceived):
                self.plaintext(event.data, event.final)

    def plaintext(self, data: bytes, final: bool) -> None:
        for record in self.records.feed(data):
            if isinstance(record, Output):
                self.kinds.append("output")
                self.received += len(record.data)
                self.output_hash.update(record.data)
                if self.keep_output:
                    self.output += record.data
            elif isinstance(record, ReceiptRecord):
                self.kinds.append("receipt")
                receipt = record.receipt
                receipt.verify()
                receipt.check_against(self.agreement.terms, self.last)
                assert receipt.bytes_out <= self.received
                assert receipt.bytes_in <= self.sent
                self.receipts.append(receipt)
            else:
                assert isinstance(record, FailedRecord)
                self.kinds.append("failed")
                self.failures.append(record.failure)
        if final:
            self.records.finish()

    @property
    def last(self) -> JobReceipt | None:
        return self.receipts[-1] if self.receipts else None

    @property
    def final(self) -> JobReceipt:
        assert self.receipts, "no receipt"
        assert self.receipts[-1].final
        return self.receipts[-1]


def enclave_jobs(
    config: JobConfig = SMALL, *, receipt_every: int = 1 << 30, **limits: Any
) -> EnclaveJobs:
    return EnclaveJobs(ENCLAVE, executor(**limits), config, receipt_every=receipt_every)


def check_receipts(h: Harness) -> None:
    """What every finished job's receipts must satisfy."""
    assert h.receipts == h.host_receipts  # the client got every receipt the host kept
    assert [r.seq for r in h.receipts] == list(range(len(h.receipts)))
    assert [r.final for r in h.receipts] == [False] * (len(h.receipts) - 1) + [True]
    final = h.final
    assert final.bytes_out == h.received
    assert final.output_hash == h.output_hash.digest()


def join(frames: Iterable[Frame]) -> bytes:
    return b"".join(bytes([f.type]) + len(f.body).to_bytes(4, "big") + f.body for f in frames)


def chunk_of(frame: Frame) -> Chunk:
    msg = decode_frame(frame)
    assert isinstance(msg, Chunk)
    return msg


def is_chunk(frame: Frame) -> bool:
    return frame.type is FrameType.CHUNK


# -- jobs that complete -------------------------------------------------------------------


def test_a_whole_input_job_returns_its_output_and_exact_receipts() -> None:
    text = b"The quick brown fox jumps over the lazy dog. " * 1200  # 54 000 bytes, 14 chunks
    source = Source(wasm("uppercase"), [text])
    h = Harness(enclave_jobs(receipt_every=16 * KIB), make_agreement(), source)
    step = h.run()
    assert step.done
    assert step.closed
    assert step.error == ""
    assert bytes(h.output) == text.upper()
    assert h.failures == []
    check_receipts(h)
    final = h.final
    assert final.bytes_in == h.sent == source.head_len + len(text)
    assert final.bytes_out == len(text)
    assert final.output_hash == output_hash(text.upper())
    assert 0 < final.fuel_used <= 10**7
    # an intermediate receipt after every 16 KiB of plaintext (4 chunks of 4 KiB)
    assert [r.bytes_in for r in h.receipts[:-1]] == [16 * KIB, 32 * KIB, 48 * KIB]
    assert all(r.bytes_out == 0 for r in h.receipts[:-1])  # the job runs at the end
    assert h.kinds == ["receipt"] * 3 + ["output", "receipt"]
    assert len(h.jobs) == 0
    assert h.client.state is State.CLOSED


def test_a_40_mib_stream_is_echoed_exactly_in_bounded_memory() -> None:
    chunk, window = 256 * KIB, 8
    config = JobConfig(chunk_size=chunk, window=window)
    sent_hash = output_hasher()
    pieces = hashed((piece(n, MIB) for n in range(40)), sent_hash)
    source = Source(wasm("stream_echo"), pieces)
    # the enclave's own window is smaller than the client's: its output backs up
    jobs = enclave_jobs(JobConfig(chunk_size=chunk, window=2), receipt_every=4 * MIB)
    h = Harness(jobs, make_agreement(), source, config, keep_output=False)
    step = h.run()
    assert step.done
    assert h.received == 40 * MIB
    assert h.output_hash.digest() == sent_hash.digest()  # the output is the input, in order
    check_receipts(h)
    final = h.final
    assert final.bytes_in == h.sent == source.head_len + 40 * MIB
    assert final.bytes_out == 40 * MIB
    assert 0 < final.fuel_used <= 10**7
    # intermediate receipts every 4 MiB of plaintext (chunks are 256 KiB, so exactly there)
    intermediate = h.receipts[:-1]
    assert [r.bytes_in for r in intermediate] == [4 * MIB * j for j in range(1, 11)]
    assert [r.bytes_out for r in intermediate] == sorted(r.bytes_out for r in intermediate)
    assert all(r.bytes_out <= r.bytes_in for r in intermediate)
    # Memory: the client's chunks wait unopened while the output of the last one opened
    # waits for window room, and they are never more than the client's window.
    # A chunk is opened only when less than a chunk of output waits, so the records waiting
    # are at most that, one chunk's output (one OUTPUT record: stream_echo returns each
    # piece) and a receipt. The session's sender holds at most a window of sealed chunks.
    mem = h.memory
    assert mem.pending is not None
    assert mem.deferred is not None
    assert mem.sender is not None
    assert 0 < mem.deferred.peak <= window  # backpressure did happen, within the bound
    assert mem.deferred.peak_bytes <= window * (chunk + CHUNK_OVERHEAD + 64)
    assert chunk <= mem.pending.peak <= 2 * chunk + 5 + RECEIPT_RECORD
    assert mem.sender.max_in_flight == 2
    assert mem.sender.max_held_bytes <= 2 * (chunk + CHUNK_OVERHEAD)


def test_a_streaming_job_sees_its_input_in_pieces_and_answers_at_the_end() -> None:
    words = b"alpha beta  gamma\ndelta " * 2000  # 48 000 bytes, words span chunk borders
    h = Harness(enclave_jobs(), make_agreement(), Source(wasm("stream_count"), [words]))
    assert h.run().done
    assert bytes(h.output) == b"%d %d" % (len(words), 8000)
    check_receipts(h)
    assert h.final.bytes_in == h.sent


def test_a_streaming_job_takes_pieces_larger_than_the_executors_max_input() -> None:
    """A chunk is opened whole; the executor takes at most ``max_input`` bytes per piece."""
    config = JobConfig(chunk_size=64 * KIB, window=4)
    data = piece(7, 200 * KIB)
    limits = {"max_input": 16 * KIB, "max_output": 16 * KIB}
    h = Harness(
        enclave_jobs(config, **limits),
        make_agreement(),
        Source(wasm("stream_echo"), [data]),
        config,
    )
    step = h.run()
    assert step.error == ""
    assert step.done
    assert bytes(h.output) == data
    check_receipts(h)


# -- jobs that fail -----------------------------------------------------------------------


def test_a_trapping_job_sends_failed_then_the_final_receipt() -> None:
    h = Harness(enclave_jobs(), make_agreement(), Source(wasm("trap"), []))
    step = h.run()
    assert step.done
    assert step.error == ""
    assert h.kinds == ["failed", "receipt"]
    (failed,) = h.failures
    assert failed.error == "Trap"
    assert "division" in failed.text
    check_receipts(h)
    assert h.final.bytes_in == h.sent == h.source.head_len
    assert h.final.bytes_out == 0
    assert h.final.output_hash == output_hash(b"")


def test_a_job_out_of_fuel_fails_and_is_charged_its_fuel() -> None:
    source = Source(wasm("fuel_hog"), [b"x"], max_fuel=10_000)
    h = Harness(enclave_jobs(), make_agreement(), source)
    assert h.run().done
    assert h.kinds == ["failed", "receipt"]
    assert h.failures[0].error == "FuelExhausted"
    assert h.final.fuel_used == 10_000
    check_receipts(h)


def test_a_streaming_job_that_fails_midway_ignores_the_rest_of_the_input() -> None:
    """stream_count runs out of fuel on some chunk; the session still completes (the
    client's remaining chunks are taken and dropped), and the receipt counts what the job
    was given, not what came after."""
    data = b"word " * 40_000  # 200 000 bytes, 49 chunks
    source = Source(wasm("stream_count"), [data], max_fuel=200_000)
    h = Harness(enclave_jobs(), make_agreement(), source)
    assert h.run().done
    assert h.kinds == ["failed", "receipt"]
    assert h.failures[0].error == "FuelExhausted"
    final = h.final
    assert final.fuel_used == 200_000
    assert 0 < final.bytes_in < h.sent == source.head_len + len(data)
    check_receipts(h)


def test_an_invalid_module_fails_the_job() -> None:
    h = Harness(enclave_jobs(), make_agreement(), Source(b"\0asm not really", [b"input"]))
    assert h.run().done
    assert h.kinds == ["failed", "receipt"]
    assert h.failures[0].error == "InvalidModule"
    check_receipts(h)


def test_a_failure_text_of_any_characters_fits_its_record() -> None:
    """The executor's message can quote the module (its import names): however many bytes
    its characters take, the FAILED record stays within its limit."""
    name = "\U0001f600" * 300
    module = bytes(
        wasmtime.wat2wasm(
            f'(module (import "{name}" "{name}" (func)) (memory (export "memory") 1)'
            ' (func (export "alloc") (param i32) (result i32) (i32.const 0))'
            ' (func (export "run") (param i32 i32) (result i64) (i64.const 0)))'
        )
    )
    h = Harness(enclave_jobs(), make_agreement(), Source(module, [b"input"]))
    step = h.run()
    assert step.error == ""
    assert h.kinds == ["failed", "receipt"]
    assert h.failures[0].error == "InvalidModule"
    assert "\U0001f600" in h.failures[0].text


# -- refusals -----------------------------------------------------------------------------


def _refused(h: Harness) -> tuple[Step, JobCancelled]:
    with pytest.raises(JobCancelled) as info:
        h.run()
    step = h.steps[-1]
    assert step.closed
    assert not step.done
    assert len(h.jobs) == 0
    assert h.client.state is State.CLOSED
    return step, info.value


@pytest.mark.parametrize(
    ("agreement", "code", "reason"),
    [
        (None, CancelCode.UNKNOWN_AGREEMENT, "wrong_agreement"),
        (
            make_agreement(signer=OTHER_ENCLAVE),  # names us, signed by another enclave
            CancelCode.PROTOCOL_ERROR,
            "bad_signature",
        ),
        (
            make_agreement(enclave=OTHER_ENCLAVE),  # valid, but for another enclave
            CancelCode.UNKNOWN_AGREEMENT,
            "wrong_agreement",
        ),
        (make_agreement(deadline_ms=NOW), CancelCode.DEADLINE, "agreement_expired"),
    ],
    ids=["unknown", "signed-by-another", "names-another-enclave", "expired"],
)
def test_a_hello_is_refused(agreement: Agreement | None, code: CancelCode, reason: str) -> None:
    jobs = enclave_jobs()
    client = ClientJobSession(bytes([0x07]) * 32, ENCLAVE.public_key, SMALL, client=CLIENT)
    step = jobs.open(client.data_to_send(), agreement, NOW)
    assert step.closed
    assert step.error.startswith(f"{reason}: ")
    assert step.receipts == []
    assert len(jobs) == 0
    with pytest.raises(JobCancelled) as info:
        client.receive_data(step.out, NOW)
    assert info.value.code == code
    assert not info.value.authenticated
    assert reason in info.value.text


@pytest.mark.parametrize("signer", [None, OTHER_ENCLAVE], ids=["unsigned", "not-the-client"])
def test_only_the_agreements_client_opens_its_session(signer: Identity | None) -> None:
    """The relaying miner knows the agreement, but cannot run a job on the client's escrow."""
    jobs = enclave_jobs()
    agreement = make_agreement()
    client = ClientJobSession(agreement.id, ENCLAVE.public_key, SMALL, client=signer)
    step = jobs.open(client.data_to_send(), agreement, NOW)
    assert step.closed
    assert step.error.startswith("not_the_client: ")
    assert len(jobs) == 0
    with pytest.raises(JobCancelled) as info:
        client.receive_data(step.out, NOW)
    assert info.value.code == CancelCode.PROTOCOL_ERROR
    # the agreement is not spent: its client can still run it
    assert Harness(jobs, agreement, Source(wasm("echo"), [b"x"])).run().done


def test_a_hello_for_another_agreement_than_the_one_given_is_refused() -> None:
    """The host looks the agreement up by the hello's id; the runner checks it did."""
    jobs = enclave_jobs()
    mine, other = make_agreement(), make_agreement(OTHER_AGREEMENT_ID)
    first = Harness(jobs, other, Source(wasm("echo"), [b"x"]))
    assert first.run().done  # ``other`` is known to the runner, and finished
    client = ClientJobSession.for_agreement(other, SMALL, client=CLIENT)
    step = jobs.open(client.data_to_send(), mine, NOW)
    assert step.closed
    assert step.error.startswith("wrong_agreement: ")
    with pytest.raises(JobCancelled) as info:
        client.receive_data(step.out, NOW)
    assert info.value.code == CancelCode.UNKNOWN_AGREEMENT


def test_a_finished_agreement_does_not_run_again() -> None:
    jobs = enclave_jobs()
    agreement = make_agreement()
    assert Harness(jobs, agreement, Source(wasm("echo"), [b"once"])).run().done
    again = Harness(jobs, agreement, Source(wasm("echo"), [b"twice"]))
    step, cancelled = _refused(again)
    assert step.error.startswith("wrong_agreement: ")
    assert "has run" in step.error
    assert cancelled.code == CancelCode.UNKNOWN_AGREEMENT
    assert again.receipts == []


def test_a_second_session_while_the_first_runs_is_refused() -> None:
    jobs = enclave_jobs()
    agreement = make_agreement()
    first = Harness(jobs, agreement, Source(wasm("stream_echo"), [piece(1, 64 * KIB)]))
    first.start()
    assert first.round() is not None
    second = Harness(jobs, agreement, Source(wasm("stream_echo"), [b"x"]))
    step, cancelled = _refused_open(second)
    assert "resume it" in step.error
    assert cancelled.code == CancelCode.UNKNOWN_AGREEMENT
    assert first.run().done  # the first one is untouched


def _refused_open(h: Harness) -> tuple[Step, JobCancelled]:
    step = h.jobs.open(h.client.data_to_send(), h.agreement, h.now)
    assert step.closed
    with pytest.raises(JobCancelled) as info:
        h.client.receive_data(step.out, h.now)
    return step, info.value


def test_a_spec_asking_more_fuel_than_agreed_is_refused() -> None:
    source = Source(wasm("echo"), [b"x"], max_fuel=10**8 + 1)
    step, cancelled = _refused(Harness(enclave_jobs(), make_agreement(max_fuel=10**8), source))
    assert step.error.startswith("bad_spec: ")
    assert cancelled.code == CancelCode.PROTOCOL_ERROR
    assert cancelled.authenticated
    assert "bad_spec" in cancelled.text


def test_more_plaintext_than_the_agreement_allows_is_refused() -> None:
    module = wasm("stream_echo")
    allowed = len(job_header(JobSpec(module_len=len(module), max_fuel=10**7))) + len(module)
    allowed += 10 * KIB
    source = Source(module, [piece(2, 10 * KIB + 1)])
    h = Harness(enclave_jobs(), make_agreement(job_bytes=allowed), source)
    step, cancelled = _refused(h)
    assert step.error.startswith("too_large: ")
    assert cancelled.code == CancelCode.TOO_LARGE
    assert cancelled.authenticated
    assert all(not r.final for r in h.receipts)


def test_exactly_the_agreed_plaintext_is_taken() -> None:
    module = wasm("stream_echo")
    total = len(job_header(JobSpec(module_len=len(module), max_fuel=10**7))) + len(module)
    total += 10 * KIB
    h = Harness(enclave_jobs(), make_agreement(job_bytes=total), Source(module, [bytes(10 * KIB)]))
    assert h.run().done
    assert h.final.bytes_in == total


def test_a_whole_input_above_the_executors_max_input_is_refused() -> None:
    limits = {"max_input": 16 * KIB, "max_output": 16 * KIB}
    source = Source(wasm("uppercase"), [bytes(16 * KIB + 1)])
    step, cancelled = _refused(Harness(enclave_jobs(**limits), make_agreement(), source))
    assert step.error.startswith("too_large: ")
    assert "max_input" in step.error
    assert cancelled.code == CancelCode.TOO_LARGE


def test_a_module_above_the_executors_limit_is_refused() -> None:
    source = Source(bytes(64 * KIB), [b"x"])
    step, cancelled = _refused(
        Harness(enclave_jobs(max_module_bytes=32 * KIB), make_agreement(), source)
    )
    assert step.error.startswith("too_large: ")
    assert cancelled.code == CancelCode.TOO_LARGE


def test_a_stream_that_ends_inside_the_module_is_refused() -> None:
    module = wasm("echo")
    header = job_header(JobSpec(module_len=len(module), max_fuel=10**7))
    source = Source(module, [], head=header + module[:10])  # the module is cut short
    h = Harness(enclave_jobs(), make_agreement(), source)
    step, cancelled = _refused(h)
    assert step.error.startswith("bad_spec: ")
    assert cancelled.code == CancelCode.PROTOCOL_ERROR


def test_a_client_with_the_largest_window_is_served() -> None:
    """The enclave opens no chunk while its output waits for room, and does not acknowledge
    the ones it holds back: a client that respects its window never has more than a window
    of them there, whatever the enclave's own window."""
    client_config = JobConfig(chunk_size=4 * KIB, window=MAX_DEFERRED - 1)
    data = piece(9, 400 * KIB)
    h = Harness(
        enclave_jobs(), make_agreement(), Source(wasm("stream_echo"), [data]), client_config
    )
    step = h.run()
    assert step.error == ""
    assert step.done
    assert bytes(h.output) == data
    assert h.memory.deferred is not None
    assert SMALL.window < h.memory.deferred.peak <= MAX_DEFERRED - 1


def test_a_client_that_sends_past_its_window_is_cut_off() -> None:
    """These hand-sealed chunks ignore any window."""
    jobs = enclave_jobs()
    h = Harness(jobs, make_agreement(), Source(wasm("stream_echo"), []))
    h.start()
    keys = h.client.keys
    assert keys is not None
    c2e = Direction.CLIENT_TO_ENCLAVE
    sid, aid = h.client.session_id, h.agreement.id
    rogue = ChunkSender(
        keys.stream_key(c2e),
        sid,
        stream_associated_data(sid, aid, c2e),
        window=1024,
        chunk_size=SMALL.chunk_size,
    )
    module = wasm("stream_echo")
    head = job_header(JobSpec(module_len=len(module), max_fuel=10**7)) + module
    frames = [encode_frame(rogue.seal(head, final=False))]
    frames += [
        encode_frame(rogue.seal(piece(n, 4 * KIB), final=False)) for n in range(MAX_DEFERRED + 8)
    ]
    step = h.to_enclave(b"".join(frames))
    assert step.closed
    assert step.error.startswith("window_exceeded: ")
    *_, last = messages_of(step.out)  # the enclave's chunks and Ack, then its Cancel
    assert isinstance(last, Cancel)
    assert last.code == CancelCode.PROTOCOL_ERROR
    assert last.text.startswith("window_exceeded: ")
    assert len(jobs) == 0


def test_the_client_may_cancel() -> None:
    jobs = enclave_jobs()
    h = Harness(jobs, make_agreement(), Source(wasm("stream_echo"), [piece(3, 64 * KIB)]))
    h.start()
    h.round()
    h.client.cancel(CancelCode.ABORTED, "changed my mind")
    step = h.to_enclave(h.client.data_to_send())
    assert step.closed
    assert not step.done
    assert "changed my mind" in step.error
    assert len(jobs) == 0


def test_the_host_may_cancel() -> None:
    jobs = enclave_jobs()
    h = Harness(jobs, make_agreement(), Source(wasm("stream_echo"), [piece(3, 64 * KIB)]))
    h.start()
    h.round()
    out = jobs.cancel(h.session_id, CancelCode.ABORTED, "shutting down")
    assert len(jobs) == 0
    with pytest.raises(JobCancelled) as info:
        h.to_client(out)
    assert info.value.code == CancelCode.ABORTED
    assert info.value.authenticated
    assert jobs.cancel(h.session_id, CancelCode.ABORTED, "again") == b""


# -- a relay that attacks the enclave's stream (the client detects it) --------------------


def _streaming(n: int = 12) -> Harness:
    """A stream_echo job of ``n`` chunks, started."""
    h = Harness(
        enclave_jobs(), make_agreement(), Source(wasm("stream_echo"), [piece(4, n * 4 * KIB)])
    )
    h.start()
    return h


def _down_chunks(h: Harness) -> tuple[Step, list[Frame]]:
    """One exchange whose answer (held back from the client) has at least two chunks."""
    step = h.to_enclave(h.upload())
    frames = frames_of(step.out)
    assert sum(is_chunk(f) for f in frames) >= 2
    return step, frames


def _modified(frame: Frame, at: int = 20) -> Frame:
    chunk = chunk_of(frame)
    sealed = bytearray(chunk.sealed)
    sealed[at] ^= 0x01
    return Frame(
        FrameType.CHUNK,
        encode_frame(dataclasses.replace(chunk, sealed=bytes(sealed)))[HEADER_SIZE:],
    )


def test_a_modified_enclave_chunk_is_detected() -> None:
    h = _streaming()
    _, frames = _down_chunks(h)
    i = next(n for n, f in enumerate(frames) if is_chunk(f))
    frames[i] = _modified(frames[i])
    with pytest.raises(StreamTampered) as info:
        h.to_client(join(frames))
    assert info.value.reason == "stream_tampered"
    assert h.client.state is State.CLOSED
    assert h.received == 0


def test_swapped_enclave_chunks_are_detected() -> None:
    h = _streaming()
    _, frames = _down_chunks(h)
    i, j = [n for n, f in enumerate(frames) if is_chunk(f)][:2]
    frames[i], frames[j] = frames[j], frames[i]
    with pytest.raises(StreamReordered) as info:
        h.to_client(join(frames))
    assert info.value.reason == "stream_reordered"


def test_a_replayed_enclave_chunk_is_detected() -> None:
    h = _streaming()
    _, frames = _down_chunks(h)
    first = next(f for f in frames if is_chunk(f))
    h.to_client(join(frames))
    with pytest.raises(ChunkReplayed) as info:
        h.to_client(join([first]))
    assert info.value.reason == "stream_replayed"


def test_an_enclave_stream_cut_before_its_final_chunk_is_truncated() -> None:
    h = _streaming(3)

    def drop_final(data: bytes) -> bytes:
        return join(f for f in frames_of(data) if not (is_chunk(f) and chunk_of(f).sealed[0]))

    h.down = drop_final
    for _ in range(20):
        if h.round() is None:
            break
    assert h.host_receipts[-1].final  # the enclave sent it; the relay dropped it
    assert all(not r.final for r in h.receipts)
    with pytest.raises(StreamTruncated) as info:
        h.client.end_of_stream()
    assert info.value.reason == "stream_truncated"
    with pytest.raises(ProtocolViolation) as decoder:
        h.records.finish()
    assert decoder.value.reason == "no_final_receipt"


# -- a relay that attacks the client's stream (the enclave detects it and cancels) --------


def _up_attack(h: Harness, attack: Callable[[list[Frame]], list[Frame]]) -> tuple[Step, str]:
    """``attack`` rewrites the client's first write of chunks; the job then goes on as usual
    (a chunk the enclave holds back while its output waits is checked when it is opened)."""

    def once(data: bytes) -> bytes:
        h.up = None
        frames = frames_of(data)
        assert sum(is_chunk(f) for f in frames) >= 3
        return join(attack(frames))

    h.up = once
    with pytest.raises(JobCancelled) as info:
        h.run()
    step = h.steps[-1]
    assert step.closed
    assert not step.done
    assert info.value.code == CancelCode.PROTOCOL_ERROR
    assert info.value.authenticated
    assert len(h.jobs) == 0
    return step, info.value.text


def _modify_second(frames: list[Frame]) -> list[Frame]:
    i = [n for n, f in enumerate(frames) if is_chunk(f)][1]
    return [*frames[:i], _modified(frames[i]), *frames[i + 1 :]]


def _swap(frames: list[Frame]) -> list[Frame]:
    i, j = [n for n, f in enumerate(frames) if is_chunk(f)][1:3]
    frames = list(frames)
    frames[i], frames[j] = frames[j], frames[i]
    return frames


def _replay(frames: list[Frame]) -> list[Frame]:
    first = next(f for f in frames if is_chunk(f))
    return [*frames, first]


@pytest.mark.parametrize(
    ("attack", "reason"),
    [
        (_modify_second, "stream_tampered"),
        (_swap, "stream_reordered"),
        (_replay, "stream_replayed"),
    ],
    ids=["modified", "swapped", "replayed"],
)
def test_an_attacked_client_stream_makes_the_enclave_cancel(
    attack: Callable[[list[Frame]], list[Frame]], reason: str
) -> None:
    step, text = _up_attack(_streaming(), attack)
    assert step.error.startswith(f"{reason}: ")
    assert text.startswith(f"{reason}: ")


def test_a_client_chunk_after_the_final_one_makes_the_enclave_cancel() -> None:
    h = _streaming(1)
    keys = h.client.keys
    assert keys is not None
    c2e = Direction.CLIENT_TO_ENCLAVE
    sid = h.client.session_id
    data = h.upload()
    assert h.source.done
    sealed = [chunk_of(f) for f in frames_of(data) if is_chunk(f)]
    assert sealed[-1].sealed[0] == 1  # the final flag
    rogue = ChunkSender(
        keys.stream_key(c2e),
        sid,
        stream_associated_data(sid, h.agreement.id, c2e),
        window=64,
        chunk_size=SMALL.chunk_size,
    )  # a second sealer under the same key: exactly the nonce reuse a sender never does
    for _ in sealed:
        rogue.seal(b"-", final=False)
    extra = encode_frame(rogue.seal(b"more", final=False))
    step = h.to_enclave(data + extra)
    assert step.closed
    assert step.error.startswith("stream_extended: ")


def test_a_client_stream_cut_before_its_final_chunk_never_gets_a_final_receipt() -> None:
    """The enclave cannot tell a cut from a slow client: the session waits to be resumed, and
    is dropped after the grace period, with no final receipt."""
    h = _streaming(3)

    def drop_final(data: bytes) -> bytes:
        return join(f for f in frames_of(data) if not (is_chunk(f) and chunk_of(f).sealed[0]))

    h.up = drop_final
    for _ in range(20):
        if h.round() is None or h.source.done:
            break
    h.round()
    assert h.steps[-1].closed is False
    assert all(not r.final for r in h.host_receipts)
    h.jobs.lost(h.session_id, h.generation, NOW + 1)
    assert h.jobs.expire(NOW + 1 + GRACE - 1) == []
    assert h.jobs.expire(NOW + 1 + GRACE) == [h.session_id]
    assert len(h.jobs) == 0


# -- resumption ---------------------------------------------------------------------------


def test_a_job_resumes_after_a_cut_and_resends_only_what_is_missing() -> None:
    chunk = 64 * KIB
    config = JobConfig(chunk_size=chunk, window=8, grace_ms=GRACE)
    sent_hash = output_hasher()
    pieces = hashed((piece(n, MIB) for n in range(8)), sent_hash)
    source = Source(wasm("stream_echo"), pieces)
    h = Harness(enclave_jobs(config), make_agreement(), source, config, keep_output=False)
    h.start()
    outbound = h.client.outbound
    assert outbound is not None
    while outbound.sealed < 60:
        assert h.round() is not None

    # The cut: part of the client's write arrives (cut mid-frame), part of the answer too.
    up = h.upload()
    step = h.to_enclave(up[: len(up) * 2 // 5])
    h.to_client(step.out[: len(step.out) * 3 // 5])
    acked_before = outbound.acked
    sealed_before = outbound.sealed
    h.client.connection_lost(NOW + 10)
    h.jobs.lost(h.session_id, h.generation, NOW + 10)

    h.now = NOW + 20
    h.client.resume(h.now)
    step = h.jobs.open(h.client.data_to_send(), None, h.now)
    assert not step.closed
    assert step.generation == h.generation + 1
    h._seen(step)
    events = h.client.receive_data(step.out, h.now)
    resumed = [e for e in events if isinstance(e, Resumed)]
    h.take(events)
    assert len(resumed) == 1
    assert resumed[0].resent_from >= acked_before
    assert resumed[0].resent == sealed_before - resumed[0].resent_from
    assert 0 < resumed[0].resent <= 8

    assert h.run().done
    assert h.output_hash.digest() == sent_hash.digest()
    check_receipts(h)
    assert h.final.bytes_in == h.sent == source.head_len + 8 * MIB  # nothing counted twice
    # Every chunk crossed once, plus the ones the enclave lacked at the cut (all full-size).
    chunks = outbound.sealed
    assert outbound.chunks_resent == resumed[0].resent
    once = h.sent + chunks * CHUNK_OVERHEAD
    assert outbound.bytes_sent == once + resumed[0].resent * (chunk + CHUNK_OVERHEAD)


def test_a_resume_after_the_grace_period_is_refused() -> None:
    h = _streaming()
    assert h.round() is not None
    h.client.connection_lost(NOW + 100)
    h.jobs.lost(h.session_id, h.generation, NOW + 100)
    h.client.resume(NOW + 200)  # in time by the client's clock
    step = h.jobs.open(h.client.data_to_send(), None, NOW + 100 + GRACE)
    assert step.closed
    assert "grace period" in step.error
    with pytest.raises(JobCancelled) as info:
        h.client.receive_data(step.out, NOW + 200)
    assert info.value.code == CancelCode.SESSION_EXPIRED
    assert len(h.jobs) == 0


def test_the_client_does_not_resume_after_the_grace_period() -> None:
    h = _streaming()
    assert h.round() is not None
    h.client.connection_lost(NOW + 100)
    with pytest.raises(SessionExpired):
        h.client.resume(NOW + 100 + GRACE)
    assert h.client.state is State.CLOSED


def test_bytes_of_an_older_connection_are_refused_after_a_resume() -> None:
    h = _streaming()
    assert h.round() is not None
    old = h.generation
    h.client.connection_lost(NOW + 1)
    h.client.resume(NOW + 2)
    step = h.jobs.open(h.client.data_to_send(), None, NOW + 2)
    assert step.generation == old + 1
    stale = h.jobs.data(h.session_id, old, b"\x03\x00\x00\x00\x01", NOW + 3)
    assert stale.closed
    assert stale.out == b""
    assert len(h.jobs) == 1  # the session itself goes on
