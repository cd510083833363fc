"""Confidential jobs on the network: ``/phala/job/1.0.0`` (``protocols/job.md``).

Miners relay: each inbound job stream's bytes go to the enclave (``Enclave.job_open`` /
``job_data``), which holds the session keys and runs the job, and what it answers goes back.
The node sees only ciphertext, and the usage receipts the enclave signs (public), which it
keeps to settle the job on chain if the client does not (``[jobs] settle_after``).

Clients run jobs end to end with :meth:`JobService.run_job` (whole input and output in
memory) or :meth:`JobService.run_job_stream` (async iterables in, a callback out, bounded
memory): find a miner, attest it, negotiate (an escrow on chain), stream the job over a
forward-secret session, check every receipt against the agreement, co-sign the final one and
settle. A dropped connection is resumed on a new one within ``[jobs] grace``.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

import trio

from phala_p2p.config import JobsConfig
from phala_p2p.errors import (
    ConnectionLost,
    EnclaveError,
    ExecutionError,
    P2PError,
    PeerUnreachable,
    ProtocolNotSupported,
    ProtocolViolation,
    RequestTimeout,
    UsageError,
)
from phala_p2p.jobs.client import ClientJobSession
from phala_p2p.jobs.config import JobConfig
from phala_p2p.jobs.errors import CancelCode, JobCancelled
from phala_p2p.jobs.framing import FrameDecoder, FrameEnds, FrameType, decode_frame
from phala_p2p.jobs.messages import ClientHello
from phala_p2p.jobs.payload import (
    MAX_MODULE,
    FailedRecord,
    JobFailed,
    JobSpec,
    Output,
    ReceiptRecord,
    RecordDecoder,
    job_header,
)
from phala_p2p.jobs.session import Acked, DataReceived, State
from phala_p2p.market.directory import Advert
from phala_p2p.market.negotiation import Agreement
from phala_p2p.market.negotiation import agreement_id as make_agreement_id
from phala_p2p.market.receipt import CoSignedReceipt, JobReceipt, output_hasher, settle_body
from phala_p2p.net.batching import put_soon
from phala_p2p.net.streams import RawStream
from phala_p2p.services.chain import Receipt
from phala_p2p.tee.channel import ERROR_CODES
from phala_p2p.tee.enclave import Enclave, JobStep
from phala_p2p.wire.codec import decode, encode

if TYPE_CHECKING:
    from phala_p2p.node import Node

logger = logging.getLogger(__name__)

JOB_PROTOCOL: Final = "/phala/job/1.0.0"
READ_SIZE: Final = 1 << 20
RELAY_QUEUE: Final = 4
WRITE_TIMEOUT: Final = 30.0
ENCLAVE_BATCH: Final = 2 << 20
WRITER_WAIT: Final = 0.005  # the relay: longest wait for its answers to be written
FIRST_FRAME_TIMEOUT: Final = 10.0
MAX_KEPT: Final = 4096
OUTPUT_BUFFER: Final = 4  # open_job_stream: output pieces waiting to be read, by default
# the executor's errors by name: the same table the enclave channel uses
_EXECUTION_ERRORS: Final[dict[str, type[ExecutionError]]] = {
    name: cls for name, cls in ERROR_CODES.items() if issubclass(cls, ExecutionError)
}

Progress = Callable[["JobProgress"], None]
Settle = bool | Literal["background"]


class JobLost(ConnectionLost):
    """The miner could not be reached again within the grace period (it crashed, or the
    network stayed cut): the job's outcome is unknown; the escrow is refunded when it
    expires."""


@dataclass(frozen=True)
class JobProgress:
    """Where a job stands: plaintext ``sent`` of ``total`` (None: unknown), output
    ``received``, and ``phase`` (negotiating, streaming, settling, done)."""

    phase: str
    sent: int = 0
    total: int | None = None
    received: int = 0
    resumes: int = 0


@dataclass
class StreamStats:
    """What the transport carried: bytes written and read over all connections, resumes."""

    bytes_sent: int = 0
    bytes_received: int = 0
    connections: int = 0
    resumes: int = 0


@dataclass
class JobResult:
    """A finished job: ``output`` (empty for the streaming form, whose output went to the
    caller), the co-signed final ``receipt`` (``.fuel_used``, ``.bytes_in``,
    ``.bytes_out``, the enclave's and the client's signatures), the ``miner``'s peer id, the
    ``agreement``, and the settlement transaction's chain ``settlement`` receipt (None if it
    was not final within ``[jobs] settle_timeout``: it stays pending and is re-sent; None
    until :meth:`settled` returns, for a job run with ``settle="background"``)."""

    output: bytes
    receipt: CoSignedReceipt
    miner: str
    agreement: Agreement
    settlement: Receipt | None
    stats: StreamStats = field(default_factory=StreamStats)
    _settling: _Settling | None = field(default=None, repr=False, compare=False)

    async def settled(self) -> Receipt | None:
        """The settlement's chain receipt, once final: for ``settle="background"``, waits
        for the node's settlement task (None if it was not final within ``[jobs]
        settle_timeout``, or the client left the settlement to the operator)."""
        if self._settling is not None:
            await self._settling.done.wait()
            self.settlement = self._settling.receipt
        return self.settlement


class JobStream:
    """A job's output as it arrives, from :meth:`JobService.open_job_stream`: iterate it
    (``async for piece in job``) for the output's pieces in order; ``result`` is the
    :class:`JobResult` once the job is done (its output went to the iteration)."""

    def __init__(self, pieces: trio.MemoryReceiveChannel[bytes]) -> None:
        self._pieces = pieces
        self._result: JobResult | None = None
        self.exhausted = False
        """The output was read to its end."""

    def __aiter__(self) -> JobStream:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._pieces.receive()
        except trio.EndOfChannel:
            self.exhausted = True
            raise StopAsyncIteration from None

    @property
    def result(self) -> JobResult:
        """The finished job; UsageError before the ``async with`` block is left (after the
        output was read to its end: leaving it earlier cancels the job)."""
        if self._result is None:
            raise UsageError(
                "the job is not done: read its output to the end, then leave the block"
            )
        return self._result


class _Renegotiated(Exception):
    """The agreement came from another proposal than the one the session was opened for."""


class _Settling:
    """A settlement the node submits in the background."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.receipt: Receipt | None = None


class JobExecutionFailed(ExecutionError):
    """Raised by ``run_job`` when the job itself failed in the enclave (``error`` names the
    executor's error: Trap, FuelExhausted, ...); the fuel it used is settled all the same
    (``result``)."""

    def __init__(self, error: str, text: str, result: JobResult) -> None:
        super().__init__(f"{error}: {text}")
        self.error = error
        self.text = text
        self.result = result
        cls = _EXECUTION_ERRORS.get(error)
        self.kind: type[ExecutionError] = cls if cls is not None else ExecutionError


async def _pull(
    source: AsyncIterator[bytes], into: trio.MemorySendChannel[bytes], total: int
) -> None:
    """Move the caller's input into ``into`` (closed at its end); more than ``total`` bytes
    is the caller's mistake. An error of the iterator is the job's error."""
    count = 0
    async with into:
        async for piece in source:
            if not isinstance(piece, bytes | bytearray | memoryview):
                raise UsageError("the input must yield bytes")
            count += len(piece)
            if count > total:
                raise UsageError(f"the input is larger than input_size ({total} bytes)")
            if piece:
                await into.send(bytes(piece))


async def _chain_source(*parts: bytes | AsyncIterable[bytes]) -> AsyncGenerator[bytes, None]:
    """The parts in order; consecutive byte strings as one piece, up to COALESCE bytes (a
    small job's header, module and input go out as one chunk)."""
    held = bytearray()
    for part in parts:
        if isinstance(part, bytes | bytearray | memoryview):
            if len(held) + len(part) > COALESCE and held:
                yield bytes(held)
                held.clear()
            held += part
            continue
        if held:
            yield bytes(held)
            held.clear()
        async for piece in part:
            yield piece
    if held:
        yield bytes(held)


def _now_ms() -> int:
    return int(time.time() * 1000)


COALESCE: Final = 1 << 20
AGREEMENT_WAIT_S: Final = 10.0  # how long a hello may wait for its agreement to be made
MAX_EARLY: Final = 64 * 1024  # what a client may send with its hello, before the keys


class JobService:
    """Serves ``/phala/job/1.0.0`` on nodes with an enclave; runs jobs for clients."""

    def __init__(self, node: Node, config: JobsConfig) -> None:
        self._node = node
        self.config = config
        self.receipts: OrderedDict[bytes, JobReceipt] = OrderedDict()
        self._settle_due: OrderedDict[bytes, float] = OrderedDict()
        self._settle_wake = trio.Event()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        node = self._node
        if node.tee is not None:
            node._rr.serve_raw(JOB_PROTOCOL, self._serve)
        async with trio.open_nursery() as nursery:
            if node.tee is not None and node.has_chain:
                nursery.start_soon(self._settler)
            task_status.started()

    # -- the miner's side: relay to the enclave ---------------------------------------------

    async def _serve(self, stream: RawStream) -> None:
        try:
            try:
                await self._relay(stream)
            except BaseExceptionGroup as group:
                raise _one_error(group) from None
        except EnclaveError as err:  # the enclave died or is stopping: the client resumes
            logger.warning("job stream from %s: %s", stream.peer_id, err)
            self._node.metrics.count("job_enclave_errors")
            await stream.reset()

    async def _relay(self, stream: RawStream) -> None:
        node = self._node
        tee = node.tee
        if tee is None or tee.enclave is None:
            return
        enclave = tee.enclave
        first, agreement = await self._first_frame(stream)
        if first is None:
            return
        node.metrics.count("job_connections")
        step = await enclave.job_open(first, agreement, grace_ms=int(self.config.grace * 1000))
        self._took(step)
        if step.closed:
            await stream.write(step.out)
            if step.error:
                logger.info("job connection from %s refused: %s", stream.peer_id, step.error)
            return
        # Two tasks: one reads the client's stream and feeds the enclave, one writes the
        # enclave's answers. What arrives while the enclave works and its answer is written
        # waits in the stream's buffer (its flow-control window) and is then taken in one
        # read. The writer may be held up by the client's flow control; the reader waits
        # for it only briefly, so a Cancel from a client that stopped reading still
        # reaches the enclave. The queue between them is short: a slow client slows the
        # reading down.
        send, receive = trio.open_memory_channel[bytes](RELAY_QUEUE)
        out = _Unwritten()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_out, stream, receive, out)
            async with send:
                out.add()
                await send.send(step.out)
                await self._feed_enclave(enclave, stream, first, step, send, out)
            # the writer drains what is queued (the last chunks, a Cancel), then ends

    async def _feed_enclave(
        self,
        enclave: Enclave,
        stream: RawStream,
        opened_with: bytes,
        opened: JobStep,
        send: trio.MemorySendChannel[bytes],
        out: _Unwritten,
    ) -> None:
        session_id, generation = opened.session_id, opened.generation
        ends = FrameEnds()
        ends.feed(opened_with)  # what job_open took: the first frame and any bytes after it
        batch: list[bytes] = []
        held = 0
        complete = False  # the held bytes end at least one frame
        ended = False
        while not ended:
            try:
                piece = await stream.read(READ_SIZE)
            except ConnectionLost:
                piece = b""
            if piece:
                batch.append(piece)
                held += len(piece)
                complete = ends.feed(piece) or complete
            else:
                ended = True
            # Bytes that end no frame (the middle of a chunk) would only be buffered by the
            # enclave: they wait here for the rest of their frame, which saves a round trip
            # (about half the calls of a bulk upload), unless the batch is full or the
            # stream ended.
            if not (complete or ended or held >= ENCLAVE_BATCH):
                continue
            data = b"".join(batch)
            batch, held, complete = [], 0, False
            if data:
                step = await enclave.job_data(session_id, generation, data)
                self._took(step)
                try:
                    if step.out:  # (most steps that only took input have nothing to send)
                        out.add()
                        await put_soon(send, step.out)
                        # The next read waits for this answer to be written (as an echo
                        # would): what comes meanwhile is then taken in one read, not one
                        # read per 64 KiB frame. Not for long: a client that has stopped
                        # reading must not keep its Cancel from us.
                        await out.drained(WRITER_WAIT)
                except trio.BrokenResourceError:
                    break  # the writer found the connection gone
                if step.closed:
                    if step.error:
                        logger.info("job connection from %s ended: %s", stream.peer_id, step.error)
                    return
        await enclave.job_lost(session_id, generation)
        self._node.metrics.count("job_connections_lost")

    async def _write_out(
        self, stream: RawStream, receive: trio.MemoryReceiveChannel[bytes], out: _Unwritten
    ) -> None:
        async with receive:
            async for data in receive:
                try:
                    await stream.write(data)
                    out.written()
                except ConnectionLost:
                    await stream.reset()  # the reader then sees the end and tells the enclave
                    return

    async def _first_frame(self, stream: RawStream) -> tuple[bytes | None, bytes]:
        """The connection's first whole frame (and what came with it), and for a hello the
        agreement it names, encoded (b"" if none is known: the enclave refuses)."""
        decoder = FrameDecoder()
        buf = bytearray()
        frames: list[Any] = []
        with trio.move_on_after(FIRST_FRAME_TIMEOUT):
            while True:
                data = await stream.read(4096)
                if not data:
                    return None, b""
                buf += data
                try:
                    frames = decoder.feed(data)
                except ProtocolViolation:
                    return bytes(buf), b""  # the enclave refuses it with its reason
                if frames:
                    break
        if not buf or not frames:
            return None, b""
        agreement = b""
        if frames[0].type is FrameType.CLIENT_HELLO:
            try:
                hello = decode_frame(frames[0])
            except ProtocolViolation:
                return bytes(buf), b""
            assert isinstance(hello, ClientHello)
            if not self._node.has_chain:
                return bytes(buf), b""
            found, more, gone = await self._agreement_for(stream, hello.agreement_id)
            if gone:
                return None, b""
            buf += more
            if found is not None:
                agreement = encode(found)
        return bytes(buf), agreement

    async def _agreement_for(
        self, stream: RawStream, aid: bytes
    ) -> tuple[Agreement | None, bytes, bool]:
        """The agreement a hello names: a client opens its session while it negotiates, so
        it may not be made yet. Waits for it (AGREEMENT_WAIT_S at most) unless the client
        goes; returns it (None if it never came), what the client sent meanwhile, and
        whether the client went."""
        market = self._node.market
        found = market.agreements.get(aid)
        if found is not None:
            return found, b"", False
        more = bytearray()
        gone = False

        async def watch(scope: trio.CancelScope) -> None:
            nonlocal gone
            try:
                while len(more) <= MAX_EARLY:
                    data = await stream.read(4096)
                    if not data:
                        break
                    more.extend(data)
            except ConnectionLost:
                pass
            gone = True  # ended, broke, or sent more than a client would before its keys
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, nursery.cancel_scope)
            found = await market.wait_agreement(aid, AGREEMENT_WAIT_S)
            nursery.cancel_scope.cancel()
        return found, bytes(more), gone

    def _took(self, step: Any) -> None:
        """Keep the receipts the enclave signed; a final one frees the agreement's slot and
        schedules the operator's own settlement. Sessions that end are counted by why."""
        if step.closed and step.session_id:
            why = "done" if step.done else step.error.split(":", 1)[0] or "closed"
            self._node.metrics.count("job_sessions_ended", reason=why[:40])
        for raw in step.receipts:
            try:
                receipt = decode(raw, max_size=1024, expect=JobReceipt)
            except ProtocolViolation as err:
                raise EnclaveError(f"the enclave signed a malformed receipt: {err}") from err
            self.receipts[receipt.agreement_id] = receipt
            self.receipts.move_to_end(receipt.agreement_id)
            while len(self.receipts) > MAX_KEPT:
                self.receipts.popitem(last=False)
            self._node.metrics.count("job_receipts", final=str(receipt.final).lower())
            if receipt.final:
                self._job_ended(receipt.agreement_id)
        if step.closed and step.agreement_id and not step.done:
            self._job_ended(step.agreement_id)

    def _job_ended(self, agreement_id: bytes) -> None:
        node = self._node
        if not node.has_chain:
            return
        node.market.release(agreement_id)
        if agreement_id in self.receipts and agreement_id not in self._settle_due:
            self._settle_due[agreement_id] = trio.current_time() + self.config.settle_after
            while len(self._settle_due) > MAX_KEPT:
                self._settle_due.popitem(last=False)
            self._settle_wake.set()

    async def _settler(self) -> None:
        """Settle, as the operator, the jobs the client has not settled in time."""
        while True:
            if not self._settle_due:
                await self._settle_wake.wait()
                self._settle_wake = trio.Event()
                continue
            agreement_id, due = next(iter(self._settle_due.items()))
            with trio.move_on_at(due):
                await self._settle_wake.wait()
                self._settle_wake = trio.Event()
                continue
            del self._settle_due[agreement_id]
            await self._settle_as_operator(agreement_id)

    async def _settle_as_operator(self, agreement_id: bytes) -> None:
        node = self._node
        chain = node.chain
        if chain.state.settlement(agreement_id) is not None:
            return
        agreement = node.market.agreements.get(agreement_id)
        receipt = self.receipts.get(agreement_id)
        if agreement is None or receipt is None:
            return
        try:
            result = await chain.submit(settle_body(agreement, receipt))
        except P2PError as err:
            logger.warning("job %s not settled: %s", agreement_id.hex()[:12], err)
            return
        node.metrics.count("jobs_settled_by_operator", ok=str(result.ok).lower())
        if not result.ok and chain.state.settlement(agreement_id) is None:
            logger.warning("settlement of %s refused: %s", agreement_id.hex()[:12], result.error)

    # -- the client's side ---------------------------------------------------------------------

    async def run_job(
        self,
        module: bytes,
        input: bytes,
        *,
        max_fuel: int,
        max_price: int | None = None,
        miner: Advert | str | None = None,
        deadline: float = 300.0,
        progress: Progress | None = None,
        settle: Settle = True,
    ) -> JobResult:
        """Run ``module`` on ``input`` in a miner's enclave and return its output.

        Finds a miner (``miner``: an advert or a peer id; default the best-ranked one that
        takes the job), attests it, negotiates an agreement for at most ``max_fuel`` fuel at
        no more than ``max_price`` per million (default: the advertised price) with an escrow
        on chain, streams the job over an encrypted session, checks the enclave's receipts,
        co-signs the final one and settles (see :meth:`run_job_stream` for ``settle``). Raises
        JobExecutionFailed if the job failed in the enclave (its fuel is settled), JobLost
        if the miner stays unreachable past the grace period, JobCancelled if the enclave
        cancelled, and the market's typed errors.
        """
        _check_bytes("module", module)
        _check_bytes("input", input)
        output = bytearray()

        async def keep(data: bytes) -> None:
            output.extend(data)

        result = await self.run_job_stream(
            module,
            bytes(input),
            input_size=len(input),
            on_output=keep,
            max_fuel=max_fuel,
            max_price=max_price,
            miner=miner,
            deadline=deadline,
            progress=progress,
            settle=settle,
        )
        result.output = bytes(output)
        return result

    @asynccontextmanager
    async def open_job_stream(
        self,
        module: bytes,
        input: bytes | AsyncIterable[bytes],
        *,
        input_size: int,
        max_fuel: int,
        max_price: int | None = None,
        miner: Advert | str | None = None,
        deadline: float = 300.0,
        progress: Progress | None = None,
        settle: Settle = True,
        buffer: int = OUTPUT_BUFFER,
    ) -> AsyncIterator[JobStream]:
        """:meth:`run_job_stream` with its output as an async iterable::

            async with node.open_job_stream(module, pieces(), input_size=n, max_fuel=f) as job:
                async for piece in job:
                    ...
            job.result  # JobResult: receipt, miner, agreement, settlement

        At most ``buffer`` pieces wait to be read; a reader that stops reading holds the
        enclave back (the session's window), so memory stays bounded. Leaving the block
        before the output's end (a ``break``, an error) cancels the job: the enclave ends
        the session and the miner's slot is freed. The job's own errors (JobExecutionFailed,
        JobLost, ...) are raised when the block is left."""
        if isinstance(buffer, bool) or not isinstance(buffer, int) or not 1 <= buffer <= 1024:
            raise UsageError("buffer must be an int in 1..1024 (pieces)")
        send, receive = trio.open_memory_channel[bytes](buffer)
        job = JobStream(receive)

        async def run() -> None:
            async with send:
                job._result = await self.run_job_stream(
                    module,
                    input,
                    input_size=input_size,
                    on_output=send.send,
                    max_fuel=max_fuel,
                    max_price=max_price,
                    miner=miner,
                    deadline=deadline,
                    progress=progress,
                    settle=settle,
                )

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run)
                try:
                    yield job
                finally:
                    if not job.exhausted:  # left before the end (a break, an error): give up
                        nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1 and not isinstance(
                group.exceptions[0], BaseExceptionGroup
            ):
                raise group.exceptions[0] from None  # the job's error, or the caller's
            raise _one_error(group) from None
        finally:
            receive.close()

    async def run_job_stream(
        self,
        module: bytes,
        input: bytes | AsyncIterable[bytes],
        *,
        input_size: int,
        on_output: Callable[[bytes], Awaitable[None]],
        max_fuel: int,
        max_price: int | None = None,
        miner: Advert | str | None = None,
        deadline: float = 300.0,
        progress: Progress | None = None,
        settle: Settle = True,
    ) -> JobResult:
        """The streaming form of :meth:`run_job`: ``input`` yields the input in pieces
        (``input_size`` bytes in all, at most: the agreement is for that many), each piece of
        output is handed to ``await on_output(data)`` as it arrives, and ``progress`` is called
        with a :class:`JobProgress` as the job moves. Memory stays bounded by the session's
        window whatever the sizes (the module is held whole: it is at most a few MiB).

        ``settle``: True waits until the settlement is final (``result.settlement``);
        ``"background"`` returns as soon as the final receipt is checked and co-signed, while
        the node settles (``await result.settled()`` gives the chain receipt); False leaves
        the settlement to the operator (who settles with the enclave's final receipt after
        ``[jobs] settle_after``). ``result.receipt`` is co-signed whatever ``settle`` is, so
        either party can settle it later."""
        if settle not in (True, False, "background"):
            raise UsageError('settle must be True, False or "background"')
        _check_bytes("module", module)
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 0:
            raise UsageError("input_size must be an int >= 0")
        if isinstance(max_fuel, bool) or not isinstance(max_fuel, int) or max_fuel < 1:
            raise UsageError("max_fuel must be an int >= 1")
        if not 0 < len(module) <= MAX_MODULE:
            raise UsageError(f"a module is 1..{MAX_MODULE} bytes")
        header = job_header(JobSpec(module_len=len(module), max_fuel=max_fuel))
        total = len(header) + len(module) + input_size
        report = progress or (lambda _p: None)
        report(JobProgress("negotiating", total=total))
        advert = await self._choose(miner, total, max_fuel, max_price)
        stats = StreamStats()
        source = _chain_source(header, module, input)
        # The input is pulled by a task of its own, which outlives the connections: a drop
        # cancels the tasks of a connection, never a pull from the caller's iterator.
        pieces_in, pieces_out = trio.open_memory_channel[bytes](1)

        def new_run(agreement_id: bytes) -> _ClientRun:
            return _ClientRun(
                self, advert, agreement_id, pieces_out, total, on_output, report, stats
            )

        # The session's stream opens while the agreement is negotiated: its hello names the
        # agreement our proposal will make, and the miner holds it until that agreement
        # exists, so the handshake costs no round trip of its own. The enclave opens the
        # session only under an agreement whose terms we signed, so the job may go out
        # once the keys are there; receipts are checked once the agreement is ours.
        chain = self._node.chain
        proposal_id = os.urandom(16)
        run = new_run(make_agreement_id(chain.view.chain_id, chain.signer.public_key, proposal_id))
        agreed: list[Agreement] = []

        async def negotiate() -> None:
            agreement = await self._node.market.negotiate(
                advert,
                job_bytes=total,
                max_fuel=max_fuel,
                max_price=max_price,
                deadline=deadline,
                proposal_id=proposal_id,
            )
            agreed.append(agreement)
            if agreement.id != run.session.agreement_id:
                raise _Renegotiated  # on another proposal (a new escrow): start afresh
            run.agree(agreement)

        async def pipelined() -> tuple[JobReceipt, JobFailed | None]:
            async with trio.open_nursery() as pipe:
                pipe.start_soon(negotiate)
                outcome = await run.stream()
            return outcome

        try:
            async with aclosing(source), trio.open_nursery() as nursery:
                nursery.start_soon(_pull, source, pieces_in, total)
                with trio.move_on_after(max(1.0, deadline)) as scope:
                    try:
                        final, failure = await pipelined()
                    except BaseExceptionGroup as group:
                        if not agreed or group.subgroup(_Renegotiated) is None:
                            raise
                        run = new_run(agreed[0].id)
                        run.agree(agreed[0])
                        final, failure = await run.stream()
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise _one_error(group) from None
        agreement = run.agreement
        if scope.cancelled_caught or agreement is None:
            raise RequestTimeout(f"the job was not done by its deadline ({deadline}s)")
        # a job that failed took only the input before its failure
        if final.bytes_in > run.sent or (failure is None and final.bytes_in != run.sent):
            raise ProtocolViolation(
                f"the final receipt counts {final.bytes_in} bytes in; we sent {run.sent}",
                reason="bad_receipt",
            )
        if final.bytes_out != run.received or final.output_hash != run.output_hash():
            raise ProtocolViolation(
                "the final receipt does not match the output received", reason="output_mismatch"
            )
        cosigned = CoSignedReceipt.sign(final, self._node.chain.signer)
        report(JobProgress("settling", run.sent, total, run.received, stats.resumes))
        settlement: Receipt | None = None
        settling: _Settling | None = None
        if settle == "background":
            settling = _Settling()
            self._node.start_soon(self._settle_in_background, agreement, cosigned, settling)
        elif settle:
            settlement = await self._settle(agreement, cosigned)
        report(JobProgress("done", run.sent, total, run.received, stats.resumes))
        result = JobResult(b"", cosigned, advert.peer_id, agreement, settlement, stats, settling)
        self._node.metrics.count("jobs_run", failed=str(failure is not None).lower())
        if failure is not None:
            raise JobExecutionFailed(failure.error, failure.text, result)
        return result

    async def _choose(
        self, miner: Advert | str | None, total: int, fuel: int, max_price: int | None
    ) -> Advert:
        market = self._node.market
        if miner is not None:
            return market.advert_of(miner)
        found = await market.find_miners(
            wait=10.0, min_free_slots=1, input_size=total, fuel=fuel, max_price=max_price
        )
        if not found:
            price = f" at {max_price} per million fuel or less" if max_price is not None else ""
            raise UsageError(
                f"no known miner has a free slot for a job of {total} bytes and {fuel} fuel"
                f"{price} ({len(market.directory)} adverts known)"
            )
        return found[0]

    async def _settle_in_background(
        self, agreement: Agreement, cosigned: CoSignedReceipt, settling: _Settling
    ) -> None:
        try:
            settling.receipt = await self._settle(agreement, cosigned)
        finally:
            settling.done.set()

    async def _settle(self, agreement: Agreement, cosigned: CoSignedReceipt) -> Receipt | None:
        chain = self._node.chain
        if chain.state.settlement(agreement.id) is not None:
            return None
        try:
            with trio.move_on_after(self.config.settle_timeout):
                return await chain.submit(
                    settle_body(agreement, cosigned), timeout=self.config.settle_timeout
                )
        except P2PError as err:
            logger.info("settlement of %s pending: %s", agreement.id.hex()[:12], err)
        return None


class _ClientRun:
    """One job's session on the client: connections, resumes, the two streams, receipts."""

    def __init__(
        self,
        service: JobService,
        advert: Advert,
        agreement_id: bytes,
        source: trio.MemoryReceiveChannel[bytes],
        total: int,
        on_output: Callable[[bytes], Awaitable[None]],
        report: Progress,
        stats: StreamStats,
    ) -> None:
        cfg = service.config
        self.node = service._node
        self.config = cfg
        self.advert = advert
        # The stream may open (and the handshake run) while the agreement is negotiated:
        # no job data goes out before it is agreed.
        self.agreement: Agreement | None = None
        self._agreed = trio.Event()
        self.source = source
        self.total = total
        self.on_output = on_output
        self.report = report
        self.stats = stats
        self.session = ClientJobSession(
            agreement_id,
            advert.enclave,
            JobConfig(chunk_size=cfg.chunk_size, window=cfg.window, grace_ms=int(cfg.grace * 1000)),
            client=self.node.chain.signer,
        )

        self.records = RecordDecoder()
        self.last: JobReceipt | None = None
        self.failure: JobFailed | None = None
        self.sent = 0
        self.received = 0
        self._hash = output_hasher()
        self._room = trio.Event()
        self._wlock = trio.Lock()
        self._input_done = False
        self._held = memoryview(b"")  # input taken from the source, not yet sealed
        self._stale = False

    def agree(self, agreement: Agreement) -> None:
        """The agreement the session runs under: job data may go out."""
        if agreement.id != self.session.agreement_id or agreement.terms.enclave != (
            self.advert.enclave
        ):
            raise UsageError("the agreement is not the one this session was opened for")
        self.agreement = agreement
        self._agreed.set()
        self.report(JobProgress("streaming", 0, self.total))

    def output_hash(self) -> bytes:
        return bytes(self._hash.digest())

    async def stream(self) -> tuple[JobReceipt, JobFailed | None]:
        try:
            await self._reach()
        except (P2PError, trio.TooSlowError):
            # the negotiation dials the miner too: it fails with its own error (and cancels
            # us), or reaches the miner after all
            await self._agreed.wait()
        failures = 0
        while True:
            received = self.stats.bytes_received
            try:
                await self._connection()
            except (ConnectionLost, PeerUnreachable, RequestTimeout, ProtocolNotSupported) as err:
                if isinstance(err, JobLost):
                    raise
                # a stream that cannot be opened on a connection we hold: that connection
                # is on its way out (py-libp2p lists it until it is closed): dial afresh
                self._stale = isinstance(err, PeerUnreachable)
                # back off between attempts that got nothing through (never a tight loop)
                failures = 0 if self.stats.bytes_received > received else failures + 1
                await self._lost(err, backoff=min(0.05 * 2**failures, 1.0) if failures else 0.0)
                continue
            except JobCancelled as err:
                if self.stats.resumes and err.code in (
                    CancelCode.UNKNOWN_SESSION,
                    CancelCode.SESSION_EXPIRED,
                ):  # our resume came after the miner's grace period: the session is gone
                    raise JobLost(
                        f"{self.advert.peer_id} no longer holds the session ({err.reason}): "
                        "it was away longer than the miner's grace period"
                    ) from err
                raise
            assert self.last is not None
            return self.last, self.failure

    async def _lost(self, err: P2PError, *, backoff: float = 0.0) -> None:
        """The connection dropped: wait for the miner to be reachable again (within the
        grace period), or give up with JobLost. ``backoff``: seconds to wait first."""
        session = self.session
        if backoff and session.keys is not None:
            left = (session.next_deadline() or _now_ms()) / 1000 - time.time()
            await trio.sleep(max(0.0, min(backoff, left - 0.05)))
        now = _now_ms()
        if session.state is State.HELLO_SENT or session.keys is None:
            session.close()
            raise JobLost(
                f"the connection to {self.advert.peer_id} dropped during the handshake: {err}"
            )
        session.connection_lost(now)
        deadline = session.next_deadline()
        assert deadline is not None
        logger.info("job connection to %s lost (%s); resuming", self.advert.peer_id, err)
        self.node.metrics.count("job_connections_lost")
        delay = 0.05
        while True:
            remaining = (deadline - _now_ms()) / 1000
            if remaining <= 0.05:
                session.close()
                escrow = "" if self.agreement is None else self.agreement.terms.escrow_id.hex()
                raise JobLost(
                    f"{self.advert.peer_id} was not reachable again within the grace period of "
                    f"{self.config.grace}s ({err}); escrow {escrow[:12]} is refunded when it "
                    "expires"
                )
            try:
                with trio.fail_after(min(remaining, 5.0)):
                    await self._reach()
                return
            except (P2PError, trio.TooSlowError):
                await trio.sleep(min(delay, max(0.0, remaining - 0.05)))
                delay = min(delay * 2, 1.0)

    async def _reach(self) -> None:
        node = self.node
        if node.is_connected(self.advert.peer_id):
            if not self._stale:
                return
            await node.disconnect(self.advert.peer_id)
        self._stale = False
        error: P2PError | None = None
        for addr in self.advert.addrs:
            try:
                await node.connect(f"{addr}/p2p/{self.advert.peer_id}")
                return
            except P2PError as err:
                error = err
        raise error or PeerUnreachable(f"{self.advert.peer_id} has no address")

    async def _connection(self) -> None:
        session = self.session
        async with self.node._rr.open_raw(self.advert.peer_id, JOB_PROTOCOL) as stream:
            self.stats.connections += 1
            try:
                if session.state is State.SUSPENDED:
                    session.resume(_now_ms())
                    self.stats.resumes += 1
                await self._write(stream)
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._reader, stream, nursery.cancel_scope)
                        nursery.start_soon(self._writer, stream)
                except BaseExceptionGroup as group:
                    if group.split(trio.Cancelled)[1] is None:  # the caller gave up
                        await self._abort(stream)
                        raise
                    raise _one_error(group) from None
                except trio.Cancelled:
                    await self._abort(stream)
                    raise
            finally:
                self.stats.bytes_sent += stream.bytes_sent
                self.stats.bytes_received += stream.bytes_received

    async def _abort(self, stream: RawStream) -> None:
        """The caller gave up (cancelled us): tell the enclave, so it ends the session and
        frees the miner's slot at once rather than after the grace period."""
        session = self.session
        if session.state is not State.OPEN:
            return
        session.cancel(CancelCode.ABORTED, "the client gave up")
        with trio.CancelScope(shield=True), trio.move_on_after(1.0):
            try:
                await stream.write(session.data_to_send())
            except ConnectionLost:
                return
            await stream.close()  # a clean end: a reset could discard the Cancel unread

    async def _write(self, stream: RawStream) -> None:
        """Write what the session has queued, whole: a write cut short by a cancellation
        would leave half a frame, which would swallow whatever came after it (a Cancel).
        A peer that takes nothing for WRITE_TIMEOUT seconds is a lost connection."""
        if not self.session.wants_to_send:
            return  # (after most reads: no Ack due yet) no lock, no trip through the scheduler
        async with self._wlock:
            data = self.session.data_to_send()
            if not data:
                return
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + WRITE_TIMEOUT
                await stream.write(data)
            if scope.cancelled_caught:
                raise ConnectionLost(f"{stream.peer_id} took nothing for {WRITE_TIMEOUT}s")

    async def _writer(self, stream: RawStream) -> None:
        session = self.session
        while not self._input_done:
            if session.send_room == 0 or session.state is not State.OPEN:
                await self._room.wait()
                self._room = trio.Event()
                continue
            if not self._held:
                try:
                    self._held = memoryview(await self.source.receive())
                except trio.EndOfChannel:  # the input is all sent: end our stream
                    if session.state is State.OPEN:
                        session.send(b"", final=True)
                        self._input_done = True
                        await self._write(stream)
                    continue
                continue  # the session may have changed while we waited: look again
            room = session.send_room
            data, self._held = self._held[:room], self._held[room:]  # views: sealed uncopied
            # the agreed size reached: this chunk ends our stream (no empty final chunk
            # after it, which would cost the enclave one more call)
            last = self.sent + len(data) == self.total
            session.send(data, final=last)
            self.sent += len(data)
            self._input_done = last
            await self._write(stream)
            self.report(
                JobProgress("streaming", self.sent, self.total, self.received, self.stats.resumes)
            )

    async def _reader(self, stream: RawStream, scope: trio.CancelScope) -> None:
        session = self.session
        while True:
            data = await stream.read(READ_SIZE)
            if not data:
                if session.done:
                    scope.cancel()
                    return
                raise ConnectionLost(f"the job stream from {stream.peer_id} ended")
            try:
                events = session.receive_data(data, _now_ms())
            except ProtocolViolation:
                await self._write(stream)  # the Cancel telling the enclave why
                raise
            for event in events:
                if isinstance(event, DataReceived):
                    await self._plaintext(event.data, event.final)
                elif isinstance(event, Acked):
                    self._room.set()
                else:  # HandshakeComplete, Resumed: the window is open again
                    self._room.set()
            await self._write(stream)
            if session.done:
                session.close()
                scope.cancel()
                return

    async def _plaintext(self, data: bytes, final: bool) -> None:
        for record in self.records.feed(data):
            if isinstance(record, Output):
                self.received += len(record.data)
                self._hash.update(record.data)
                await self.on_output(record.data)
            elif isinstance(record, ReceiptRecord):
                receipt = record.receipt
                receipt.verify()
                await self._agreed.wait()  # the enclave had it: its answer is on the way
                assert self.agreement is not None
                receipt.check_against(self.agreement.terms, self.last)
                if receipt.bytes_out > self.received or receipt.bytes_in > self.sent:
                    raise ProtocolViolation(
                        "a receipt counts more bytes than were exchanged", reason="bad_receipt"
                    )
                self.last = receipt
            elif isinstance(record, FailedRecord):
                self.failure = record.failure
        if final:
            self.records.finish()
        self.report(
            JobProgress("streaming", self.sent, self.total, self.received, self.stats.resumes)
        )


class _Unwritten:
    """The relay's answers handed to its writer and not written yet."""

    def __init__(self) -> None:
        self._count = 0
        self._drained = trio.Event()

    def add(self) -> None:
        self._count += 1

    def written(self) -> None:
        self._count -= 1
        if not self._count:
            self._drained.set()

    async def drained(self, at_most: float) -> None:
        """Return once every answer is written, or after ``at_most`` seconds."""
        if self._count:
            self._drained = trio.Event()
            with trio.move_on_after(at_most):
                await self._drained.wait()


def _one_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error a reader/writer pair reports: a peer's fault or a cancellation of the
    session before a plain lost connection (the other task's view of the same drop)."""
    leaves: list[BaseException] = []

    def walk(err: BaseException) -> None:
        if isinstance(err, BaseExceptionGroup):
            for inner in err.exceptions:
                walk(inner)
        else:
            leaves.append(err)

    walk(group)
    if not all(isinstance(err, P2PError) for err in leaves):
        return group  # a bug, or trio's own cancellation: not ours to pick from
    for err in leaves:
        if not isinstance(err, ConnectionLost):
            return err
    return leaves[0]


def _check_bytes(name: str, value: object) -> None:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise UsageError(f"{name} must be bytes")


__all__ = [
    "JOB_PROTOCOL",
    "JobExecutionFailed",
    "JobLost",
    "JobProgress",
    "JobResult",
    "JobService",
    "JobStream",
    "StreamStats",
]
