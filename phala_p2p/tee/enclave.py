"""The enclave boundary, host side: the :class:`Enclave` interface and :class:`SimulatedEnclave`.

The node never holds an enclave secret nor job plaintext. It talks to its enclave over a local
channel (:mod:`phala_p2p.tee.channel`) that carries only public data (keys, measurement, quotes,
receipts) and ciphertext (sealed modules, inputs and outputs). Job errors come back as the same
typed errors (:class:`~phala_p2p.errors.Trap`, :class:`~phala_p2p.errors.FuelExhausted`, ...)
and the enclave keeps serving.

:func:`open_simulated_enclave` starts the simulated enclave in its own OS process::

    async with open_simulated_enclave(EnclaveConfig(dev_root_seed=seed)) as enclave:
        info = await enclave.info()
        raw_quote = await enclave.quote(nonce)
"""

from __future__ import annotations

import abc
import fcntl
import itertools
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio

from phala_p2p.errors import EnclaveError, P2PError, ProtocolViolation, UsageError
from phala_p2p.net.batching import put_soon
from phala_p2p.tee.channel import (
    FrameDecoder,
    error_from_wire,
    get_bytes,
    get_int,
    get_str,
    pack_frame_parts,
)
from phala_p2p.tee.enclave_main import max_frame_for
from phala_p2p.tee.executor import ABI_VERSION, ExecutorLimits
from phala_p2p.tee.keys import (
    BOX_OVERHEAD,
    KEY_LEN,
    MAX_EPOCH,
    MAX_SECRET_LEN,
    MAX_SECRETS,
    ClusterKey,
)
from phala_p2p.tee.keyshare import (
    EnclaveEvidence,
    KeyStatus,
    cluster_from_wire,
    key_status_from_wire,
)
from phala_p2p.tee.messages import AttestRequest, AttestResponse, SessionOffer
from phala_p2p.tee.quote import MAX_NONCE_LEN, SIM_PLATFORM, UsageReceipt
from phala_p2p.tee.sealing import JOB_ID_LEN, SESSION_ID_LEN
from phala_p2p.tee.splice import spliceable, vmsplice_writer
from phala_p2p.tee.statements import heartbeat_bytes, statement_bytes
from phala_p2p.wire.codec import decode

__all__ = [
    "ClusterKey",
    "Enclave",
    "EnclaveConfig",
    "EnclaveEvidence",
    "EnclaveInfo",
    "JobStep",
    "KeyStatus",
    "SealedResult",
    "SessionOffer",
    "SimulatedEnclave",
    "Transcript",
    "answer_attest",
    "enclave_evidence",
    "open_simulated_enclave",
]

log = logging.getLogger(__name__)

# Called with (direction, bytes) for every chunk crossing the boundary; direction is one of
# "to_enclave", "from_enclave", "enclave_stderr".
Transcript = Callable[[str, bytes], None]

_BOOT: Final = Path(__file__).resolve().parent / "enclave_boot.py"
_STDERR_TAIL: Final = 4096
_READ_CHUNK: Final = 1 << 16
# The channel's pipes get 1 MiB buffers (Linux, where allowed) and reads take up to 1 MiB: a
# 64 MiB sealed payload crosses in 64 writes and reads rather than 1024.
_PIPE_BYTES: Final = 1 << 20
_IOV_MAX: Final = 1024  # segments per writev (Linux's limit)


@dataclass(frozen=True)
class EnclaveConfig:
    """How to start a simulated enclave.

    ``dev_root_seed`` is the seed of the dev attestation root named in genesis. The simulated
    enclave signs its quotes with it, so anyone holding it (the miner included) could forge
    quotes: that is what makes the platform a simulation, fit for devnets and tests only.
    """

    dev_root_seed: bytes
    limits: ExecutorLimits = field(default_factory=ExecutorLimits)
    python: str = sys.executable
    start_timeout_s: float = 30.0
    stop_timeout_s: float = 5.0
    max_in_flight: int = 64
    benchmark_fuel: int = 200_000_000

    def __post_init__(self) -> None:
        if not isinstance(self.dev_root_seed, bytes) or len(self.dev_root_seed) != 32:
            raise UsageError("EnclaveConfig.dev_root_seed must be 32 bytes")
        if not isinstance(self.limits, ExecutorLimits):
            raise UsageError("EnclaveConfig.limits must be an ExecutorLimits")
        for name in ("start_timeout_s", "stop_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value <= 0:
                raise UsageError(f"EnclaveConfig.{name} must be positive")
        if not isinstance(self.max_in_flight, int) or not 1 <= self.max_in_flight <= 4096:
            raise UsageError("EnclaveConfig.max_in_flight must be in 1..4096")
        bf = self.benchmark_fuel
        if not isinstance(bf, int) or not 1 <= bf <= self.limits.max_fuel:
            raise UsageError("EnclaveConfig.benchmark_fuel must be in 1..limits.max_fuel")

    def __repr__(self) -> str:  # the seed stays out of logs
        return f"EnclaveConfig(limits={self.limits!r}, python={self.python!r})"


@dataclass(frozen=True)
class EnclaveInfo:
    """The enclave's public data: what a quote binds and what clients encrypt to."""

    platform: str
    identity_pub: bytes
    x25519_pub: bytes
    measurement: bytes
    abi_version: int
    limits: ExecutorLimits
    root_pub: bytes


@dataclass(frozen=True)
class SealedResult:
    """A job's output, sealed to the client, and the enclave-signed usage receipt."""

    sealed_output: bytes
    receipt: UsageReceipt


@dataclass(frozen=True)
class JobStep:
    """What the enclave made of a job connection's bytes: ``out`` to write back, the usage
    receipts it signed (encoded ``JobReceipt``s: public), ``closed`` when the connection must
    be closed after ``out``, ``done`` when the job's session completed."""

    out: bytes
    receipts: list[bytes]
    closed: bool
    done: bool
    session_id: bytes
    generation: int
    agreement_id: bytes
    error: str


class Enclave(abc.ABC):
    """What a node can ask of its enclave. Every method may raise EnclaveError."""

    @abc.abstractmethod
    async def info(self) -> EnclaveInfo:
        """Public keys, measurement and limits."""

    @abc.abstractmethod
    async def quote(self, nonce: bytes = b"") -> bytes:
        """A fresh raw quote whose report data binds the enclave's keys and ``nonce``."""

    @abc.abstractmethod
    async def sign(self, purpose: str, payload: bytes) -> bytes:
        """The identity key's signature of ``payload`` as a statement of ``purpose`` (one of
        :data:`phala_p2p.tee.statements.PURPOSES`: adverts, counter-offers, agreements)."""

    @abc.abstractmethod
    async def heartbeat(self, chain_id: str, height: int, seed: bytes) -> bytes:
        """The identity key's answer to the chain's liveness challenge of block ``height``
        (:func:`phala_p2p.tee.statements.heartbeat_bytes`, built inside for its own key)."""

    @abc.abstractmethod
    async def benchmark(self) -> float:
        """Fuel per second that the enclave's executor sustains."""

    @abc.abstractmethod
    async def open_session(self, client_pub: bytes) -> SessionOffer:
        """Start a job session with a client's ephemeral X25519 key."""

    @abc.abstractmethod
    async def run_sealed(
        self,
        session_id: bytes,
        job_id: bytes,
        sealed_module: bytes,
        sealed_input: bytes,
        max_fuel: int,
        sealed_secrets: Sequence[bytes] = (),
    ) -> SealedResult:
        """Run one sealed job; raises the job's typed ExecutionError if it fails.

        ``sealed_secrets`` are client secrets sealed to a cluster key of an epoch this enclave
        holds, each for this job's module and its position in the list (``keys.seal_secret``);
        the job reads them with ``phala.secret_len``/``phala.secret_read``.
        """

    @abc.abstractmethod
    async def close_session(self, session_id: bytes) -> None:
        """Forget a session's keys."""

    # -- job sessions (protocols/job.md; the session and the job run inside) -------------------

    @abc.abstractmethod
    async def job_open(
        self, data: bytes, agreement: bytes, *, grace_ms: int | None = None
    ) -> JobStep:
        """A job connection's first bytes (a whole ClientHello or Resume frame, maybe more)
        and, for a hello, the encoded agreement it names (b"" for a resume); ``grace_ms``:
        how long the enclave keeps a new session after its connection drops."""

    @abc.abstractmethod
    async def job_data(self, session_id: bytes, generation: int, data: bytes) -> JobStep:
        """More bytes of the connection that ``job_open`` returned ``session_id`` for."""

    @abc.abstractmethod
    async def job_lost(self, session_id: bytes, generation: int) -> None:
        """That connection dropped: the session waits for a resume (its grace period)."""

    @abc.abstractmethod
    async def job_cancel(self, session_id: bytes, code: int, text: str) -> bytes:
        """End a session from the host's side; the Cancel frame to write (b"" if none)."""

    # -- key management (protocols/attest.md, "Key management") -------------------------------

    @abc.abstractmethod
    async def km_generate(self, epoch: int = 0) -> ClusterKey:
        """Create the network's master key inside, starting at ``epoch`` (genesis only).

        Returns that epoch's cluster key; the enclave becomes a key manager (runs no jobs).
        """

    @abc.abstractmethod
    async def km_export(self, recipient: EnclaveEvidence, epoch: int) -> bytes:
        """The master key from ``epoch`` on, sealed to an attested new gatekeeper enclave.

        The enclave checks ``recipient`` itself (AttestationError if it fails).
        """

    @abc.abstractmethod
    async def km_import(self, sealed: bytes) -> ClusterKey:
        """Take a master key sealed to this enclave; returns the cluster key of its floor."""

    @abc.abstractmethod
    async def cluster_public(self, epoch: int) -> ClusterKey:
        """The cluster public key of ``epoch`` (from the master, or a held epoch key)."""

    @abc.abstractmethod
    async def km_share_epoch(self, epoch: int, recipient: EnclaveEvidence) -> bytes:
        """The secret of ``epoch``, sealed to an attested miner enclave (checked inside)."""

    @abc.abstractmethod
    async def accept_epoch(self, sealed: bytes) -> ClusterKey:
        """Hold an epoch secret sealed to this enclave; the enclave becomes a worker."""

    @abc.abstractmethod
    async def erase_before(self, epoch: int) -> KeyStatus:
        """Erase every key of an epoch before ``epoch``; such epochs are refused from then on."""

    @abc.abstractmethod
    async def key_status(self) -> KeyStatus:
        """Which keys the enclave holds (public data)."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop the enclave."""


class _Pending:
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: dict[str, Any] | None = None
        self.error: P2PError | None = None


class SimulatedEnclave(Enclave):
    """Host side of a simulated enclave process. Create it with :func:`open_simulated_enclave`."""

    def __init__(self, config: EnclaveConfig, transcript: Transcript | None = None) -> None:
        self._config = config
        self._transcript = transcript
        self._max_frame = max_frame_for(config.limits)
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._in_flight = trio.Semaphore(config.max_in_flight)
        # a frame is a list of segments (pack_frame_parts): large payloads are not copied
        self._send_frames, self._frames_to_send = trio.open_memory_channel[tuple[int, list[bytes]]](
            config.max_in_flight
        )
        # Blobs put in the pipe by reference (vmsplice) must live, unchanged, until the
        # enclave has read them, which it has once it answers their request: held till then.
        self._splice: Callable[[int, bytes, int], int] | None = None
        self._unanswered: dict[int, list[bytes]] = {}
        self._process: trio.Process | None = None
        self._info: EnclaveInfo | None = None
        self._closed = False
        self._dead: EnclaveError | None = None
        self._stderr_tail = bytearray()
        self._exited = trio.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    async def _start(self, nursery: trio.Nursery) -> None:
        cmd = [self._config.python, "-I", str(_BOOT)]
        try:
            process = await trio.lowlevel.open_process(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        except OSError as err:
            raise EnclaveError(f"cannot start the enclave process: {err}") from err
        self._process = process
        _enlarge_pipe(process.stdin)
        _enlarge_pipe(process.stdout)
        self._splice = vmsplice_writer(_fd_of(process.stdin))
        nursery.start_soon(self._writer)
        nursery.start_soon(self._reader)
        nursery.start_soon(self._stderr_reader)
        limits = self._config.limits
        init = {
            "platform": SIM_PLATFORM,
            "dev_root_seed": self._config.dev_root_seed,
            "limits": limits.canonical(),
        }
        with trio.move_on_after(self._config.start_timeout_s) as scope:
            result = await self._call("init", init)
        if scope.cancelled_caught:
            raise EnclaveError("enclave process did not start in time")
        self._info = _info_from_wire(result, limits)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        return self._process.returncode if self._process is not None else None

    async def aclose(self) -> None:
        """Stop the enclave process: close its stdin (it exits on EOF), or kill it."""
        if self._closed:
            await self._exited.wait()
            return
        self._closed = True
        process = self._process
        with trio.CancelScope(shield=True):
            await self._send_frames.aclose()
            if process is not None:
                with trio.move_on_after(self._config.stop_timeout_s):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            self._fail_all(EnclaveError("enclave is closed"))
            self._exited.set()

    # -- background tasks --------------------------------------------------------------------

    async def _writer(self) -> None:
        assert self._process is not None
        assert self._process.stdin is not None
        stdin = self._process.stdin
        try:
            async with self._frames_to_send:
                async for rid, frame in self._frames_to_send:
                    for part in frame:
                        self._record("to_enclave", part)
                    if self._splice is not None:
                        self._unanswered[rid] = frame  # until answered (see __init__)
                    # the head and its blobs in one system call (or a blob by reference);
                    # the loop's receive is this task's checkpoint, so a write that fits
                    # costs no extra trip through the scheduler (one per part, with send_all)
                    await _write_parts(_fd_of(stdin), frame, self._splice)
                    if self._splice is None:
                        # Let go of a sent payload at once: freeing tens of MiB when the next
                        # frame comes would delay that frame.
                        frame.clear()
                    del frame
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self._mark_dead("enclave process stopped reading its input")
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await stdin.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass

    async def _reader(self) -> None:
        assert self._process is not None
        assert self._process.stdout is not None
        stdout = self._process.stdout
        decoder = FrameDecoder(max_frame=self._max_frame)
        fd = _fd_of(stdout)
        try:
            while True:
                # No more than the decoder wants: a blob then needs no copy but one join.
                # The pipe is read directly (it is non-blocking), so the header, the head
                # and the blob of an answer that has arrived take three system calls and
                # no trip through the scheduler each (as receive_some would).
                try:
                    chunk = os.read(fd, min(decoder.wanted, _PIPE_BYTES))
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(fd)
                    continue
                if not chunk:
                    break
                self._record("from_enclave", chunk)
                full = len(chunk) == _PIPE_BYTES
                responses = decoder.feed(chunk)
                del chunk
                for response in responses:
                    self._deliver(response)
                    del response  # the caller holds the answer; none is kept alive here
                if responses or full:
                    del responses
                    # the callers run; a long blob or a flood of answers cannot hold the loop
                    await trio.lowlevel.checkpoint()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except ProtocolViolation as err:
            self._mark_dead(f"enclave sent a malformed frame: {err}")
            if self._process is not None and self._process.returncode is None:
                self._process.kill()
            return
        if self._process is not None:
            await self._process.wait()
        code = self._process.returncode if self._process is not None else None
        tail = bytes(self._stderr_tail).decode("utf-8", "replace").strip()
        self._mark_dead(
            f"enclave process exited (code {code})" + (f": {tail[-500:]}" if tail else "")
        )

    async def _stderr_reader(self) -> None:
        assert self._process is not None
        assert self._process.stderr is not None
        stderr = self._process.stderr
        try:
            while True:
                chunk = await stderr.receive_some(_READ_CHUNK)
                if not chunk:
                    return
                self._record("enclave_stderr", chunk)
                self._stderr_tail += chunk
                del self._stderr_tail[:-_STDERR_TAIL]
                log.debug("enclave stderr: %r", chunk[:200])
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    def _record(self, direction: str, chunk: bytes) -> None:
        if self._transcript is not None:
            self._transcript(direction, bytes(chunk))

    def _deliver(self, response: Any) -> None:
        if (
            not isinstance(response, list)
            or len(response) != 3
            or isinstance(response[0], bool)
            or not isinstance(response[0], int)
            or response[1] not in (0, 1)
        ):
            raise ProtocolViolation("malformed response frame")
        rid, failed, body = response
        self._unanswered.pop(rid, None)  # the enclave has read the request: its blobs may go
        pending = self._pending.get(rid)
        if pending is None:
            return  # the caller gave up (cancelled); the answer is dropped
        if failed:
            pending.error = error_from_wire(body)
        elif isinstance(body, dict):
            pending.result = body
        else:
            pending.error = ProtocolViolation("malformed result in enclave response")
        pending.done.set()

    def _mark_dead(self, reason: str) -> None:
        if self._dead is None:
            self._dead = EnclaveError(reason)
            if not self._closed:
                log.warning("%s", reason)
        self._fail_all(self._dead)

    def _fail_all(self, err: EnclaveError) -> None:
        self._unanswered.clear()  # no reader is left to read them
        for pending in self._pending.values():
            if not pending.done.is_set():
                pending.error = EnclaveError(str(err))  # one instance per waiting task
                pending.done.set()

    # -- requests ----------------------------------------------------------------------------

    async def _call(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if self._closed:
            raise EnclaveError("enclave is closed")
        if self._dead is not None:
            raise EnclaveError(str(self._dead))
        # A slot and a place in the send queue are taken without a checkpoint when free
        # (the usual case): the wait for the answer below is this call's checkpoint.
        try:
            self._in_flight.acquire_nowait()
        except trio.WouldBlock:
            await self._in_flight.acquire()
        try:
            rid = next(self._ids)
            frame = pack_frame_parts([rid, op, args], max_frame=self._max_frame)
            pending = _Pending()
            self._pending[rid] = pending
            try:
                try:
                    await put_soon(self._send_frames, (rid, frame))
                except (trio.ClosedResourceError, trio.BrokenResourceError) as err:
                    raise EnclaveError("enclave is closed") from err
                await pending.done.wait()
            finally:
                del self._pending[rid]
        finally:
            self._in_flight.release()
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    async def info(self) -> EnclaveInfo:
        if self._info is None:
            raise EnclaveError("enclave is not started")
        return self._info

    async def quote(self, nonce: bytes = b"") -> bytes:
        if not isinstance(nonce, bytes) or len(nonce) > MAX_NONCE_LEN:
            raise UsageError(f"nonce must be at most {MAX_NONCE_LEN} bytes")
        result = await self._call("quote", {"nonce": nonce})
        return _field(get_bytes, result, "quote", max_len=4096)

    async def sign(self, purpose: str, payload: bytes) -> bytes:
        statement_bytes(purpose, payload)  # checks the arguments here, not in the enclave
        result = await self._call("sign", {"purpose": purpose, "payload": payload})
        return _field(get_bytes, result, "signature", min_len=64, max_len=64)

    async def heartbeat(self, chain_id: str, height: int, seed: bytes) -> bytes:
        heartbeat_bytes(chain_id, height, seed, bytes(32))  # checks the arguments here
        result = await self._call(
            "heartbeat", {"chain_id": chain_id, "height": height, "seed": seed}
        )
        return _field(get_bytes, result, "signature", min_len=64, max_len=64)

    async def benchmark(self) -> float:
        result = await self._call("benchmark", {"fuel": self._config.benchmark_fuel})
        value = result.get("fuel_per_s")
        if not isinstance(value, float) or not value > 0:
            raise EnclaveError("enclave returned a malformed benchmark")
        return value

    async def open_session(self, client_pub: bytes) -> SessionOffer:
        if not isinstance(client_pub, bytes) or len(client_pub) != 32:
            raise UsageError("client_pub must be a 32-byte X25519 public key")
        result = await self._call("open_session", {"client_pub": client_pub})
        return SessionOffer(
            session_id=_field(get_bytes, result, "session_id", min_len=16, max_len=16),
            enclave_pub=_field(get_bytes, result, "enclave_pub", min_len=32, max_len=32),
            signature=_field(get_bytes, result, "signature", min_len=64, max_len=64),
        )

    async def run_sealed(
        self,
        session_id: bytes,
        job_id: bytes,
        sealed_module: bytes,
        sealed_input: bytes,
        max_fuel: int,
        sealed_secrets: Sequence[bytes] = (),
    ) -> SealedResult:
        if not isinstance(session_id, bytes) or len(session_id) != SESSION_ID_LEN:
            raise UsageError(f"session_id must be {SESSION_ID_LEN} bytes")
        if not isinstance(job_id, bytes) or len(job_id) != JOB_ID_LEN:
            raise UsageError(f"job_id must be {JOB_ID_LEN} bytes")
        if not isinstance(sealed_module, bytes) or not isinstance(sealed_input, bytes):
            raise UsageError("sealed_module and sealed_input must be bytes")
        limits = self._config.limits
        if isinstance(max_fuel, bool) or not isinstance(max_fuel, int):
            raise UsageError("max_fuel must be an int")
        if not 1 <= max_fuel <= limits.max_fuel:
            raise UsageError(f"max_fuel must be in 1..{limits.max_fuel}")
        secrets = _check_sealed_secrets(sealed_secrets)
        result = await self._call(
            "run_sealed",
            {
                "session_id": session_id,
                "job_id": job_id,
                "sealed_module": sealed_module,
                "sealed_input": sealed_input,
                "max_fuel": max_fuel,
                "sealed_secrets": secrets,
            },
        )
        sealed_output = _field(get_bytes, result, "sealed_output", max_len=self._max_frame)
        raw_receipt = _field(get_bytes, result, "receipt", max_len=4096)
        try:
            receipt = decode(raw_receipt, max_size=4096, expect=UsageReceipt)
        except ProtocolViolation as err:
            raise EnclaveError(f"enclave returned a malformed receipt: {err}") from err
        return SealedResult(sealed_output=sealed_output, receipt=receipt)

    async def close_session(self, session_id: bytes) -> None:
        if not isinstance(session_id, bytes) or len(session_id) != SESSION_ID_LEN:
            raise UsageError(f"session_id must be {SESSION_ID_LEN} bytes")
        await self._call("close_session", {"session_id": session_id})

    # -- job sessions ------------------------------------------------------------------------

    async def job_open(
        self, data: bytes, agreement: bytes, *, grace_ms: int | None = None
    ) -> JobStep:
        if not isinstance(data, bytes) or not isinstance(agreement, bytes):
            raise UsageError("data and agreement are bytes")
        args: dict[str, Any] = {"data": data, "agreement": agreement}
        if grace_ms is not None:
            args["grace_ms"] = grace_ms
        return _job_step(await self._call("job_open", args))

    async def job_data(self, session_id: bytes, generation: int, data: bytes) -> JobStep:
        args = {"session": session_id, "generation": generation, "data": data}
        return _job_step(await self._call("job_data", args))

    async def job_lost(self, session_id: bytes, generation: int) -> None:
        await self._call("job_lost", {"session": session_id, "generation": generation})

    async def job_cancel(self, session_id: bytes, code: int, text: str) -> bytes:
        args = {"session": session_id, "code": code, "text": text[:200]}
        result = await self._call("job_cancel", args)
        return _field(get_bytes, result, "out", max_len=1 << 16)

    # -- key management ----------------------------------------------------------------------

    async def km_generate(self, epoch: int = 0) -> ClusterKey:
        result = await self._call("km_generate", {"epoch": _check_epoch(epoch)})
        return _cluster(result)

    async def km_export(self, recipient: EnclaveEvidence, epoch: int) -> bytes:
        return await self._sealed_to(recipient, "km_export", epoch, KEY_LEN)

    async def km_import(self, sealed: bytes) -> ClusterKey:
        return _cluster(await self._call("km_import", {"sealed": _check_key_box(sealed)}))

    async def cluster_public(self, epoch: int) -> ClusterKey:
        return _cluster(await self._call("cluster_public", {"epoch": _check_epoch(epoch)}))

    async def km_share_epoch(self, epoch: int, recipient: EnclaveEvidence) -> bytes:
        return await self._sealed_to(recipient, "km_share_epoch", epoch, KEY_LEN)

    async def accept_epoch(self, sealed: bytes) -> ClusterKey:
        return _cluster(await self._call("accept_epoch", {"sealed": _check_key_box(sealed)}))

    async def erase_before(self, epoch: int) -> KeyStatus:
        return _key_status(await self._call("erase_before", {"epoch": _check_epoch(epoch)}))

    async def key_status(self) -> KeyStatus:
        return _key_status(await self._call("key_status", {}))

    async def _sealed_to(
        self, recipient: EnclaveEvidence, op: str, epoch: int, plaintext_len: int
    ) -> bytes:
        if not isinstance(recipient, EnclaveEvidence):
            raise UsageError("recipient must be an EnclaveEvidence")
        args = {"epoch": _check_epoch(epoch), "recipient": recipient.to_wire()}
        result = await self._call(op, args)
        size = BOX_OVERHEAD + plaintext_len
        return _field(get_bytes, result, "sealed", min_len=size, max_len=size)


def _job_step(result: dict[str, Any]) -> JobStep:
    receipts = result.get("receipts")
    if not isinstance(receipts, list) or not all(
        isinstance(r, bytes) and len(r) <= 1024 for r in receipts
    ):
        raise EnclaveError("enclave returned malformed receipts")
    closed, done = result.get("closed"), result.get("done")
    if not isinstance(closed, bool) or not isinstance(done, bool):
        raise EnclaveError("enclave returned a malformed job step")
    try:
        return JobStep(
            out=get_bytes(result, "out", max_len=64 << 20),
            receipts=list(receipts),
            closed=closed,
            done=done,
            session_id=get_bytes(result, "session", max_len=16),
            generation=get_int(result, "generation", lo=0, hi=1 << 32),
            agreement_id=get_bytes(result, "agreement_id", max_len=32),
            error=get_str(result, "error", max_len=500),
        )
    except ProtocolViolation as err:
        raise EnclaveError(f"enclave returned a malformed job step: {err}") from err


def _check_epoch(epoch: int) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= MAX_EPOCH:
        raise UsageError(f"epoch must be an int in 0..{MAX_EPOCH}")
    return epoch


def _check_key_box(sealed: bytes) -> bytes:
    if not isinstance(sealed, bytes) or len(sealed) != BOX_OVERHEAD + KEY_LEN:
        raise UsageError(f"a sealed key is {BOX_OVERHEAD + KEY_LEN} bytes")
    return sealed


def _check_sealed_secrets(sealed_secrets: Sequence[bytes]) -> list[bytes]:
    if isinstance(sealed_secrets, bytes | str) or not isinstance(sealed_secrets, Sequence):
        raise UsageError("sealed_secrets must be a sequence of sealed boxes")
    if len(sealed_secrets) > MAX_SECRETS:
        raise UsageError(f"a job gets at most {MAX_SECRETS} sealed secrets")
    cap = BOX_OVERHEAD + MAX_SECRET_LEN
    for box in sealed_secrets:
        if not isinstance(box, bytes) or not BOX_OVERHEAD <= len(box) <= cap:
            raise UsageError(f"each sealed secret must be {BOX_OVERHEAD}..{cap} bytes")
    return list(sealed_secrets)


def _cluster(result: dict[str, Any]) -> ClusterKey:
    try:
        return cluster_from_wire(result)
    except ProtocolViolation as err:
        raise EnclaveError(f"enclave returned a malformed cluster key: {err}") from err


def _key_status(result: dict[str, Any]) -> KeyStatus:
    try:
        return key_status_from_wire(result)
    except ProtocolViolation as err:
        raise EnclaveError(f"enclave returned a malformed key status: {err}") from err


def _fd_of(stream: object) -> int:
    """The descriptor of a pipe of the enclave process (trio gives FdStreams on POSIX, the
    only platform the simulated enclave runs on)."""
    assert isinstance(stream, trio.lowlevel.FdStream), "enclave pipes are FdStreams on POSIX"
    return stream.fileno()


async def _write_parts(
    fd: int, parts: list[bytes], splice: Callable[[int, bytes, int], int] | None = None
) -> None:
    """Write ``parts`` in order to the non-blocking pipe ``fd``: runs of small parts with one
    ``writev`` each, and with ``splice`` (``tee.splice``) each ``spliceable`` blob by
    reference, which the caller then keeps unchanged until the reader has read it. Waits for
    the pipe to drain only when it is full. OSError (BrokenPipeError) if the reader is gone."""
    start = 0
    while start < len(parts):
        part = parts[start]
        if splice is not None and spliceable(part):
            offset = 0
            while offset < len(part):
                try:
                    offset += splice(fd, part, offset)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(fd)
            start += 1
            continue
        end = start + 1
        while end < len(parts) and not (splice is not None and spliceable(parts[end])):
            end += 1
        await _writev_all(fd, parts[start:end])
        start = end


async def _writev_all(fd: int, parts: list[bytes]) -> None:
    views = [memoryview(part) for part in parts if part]
    while views:
        try:
            sent = os.writev(fd, views[:_IOV_MAX])
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)
            continue
        while sent:
            if sent >= len(views[0]):
                sent -= len(views.pop(0))
            else:
                views[0] = views[0][sent:]
                sent = 0


def _enlarge_pipe(stream: object) -> None:
    """Give a pipe of the channel a buffer of ``_PIPE_BYTES`` (Linux; a speed-up only)."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if set_size is None or not isinstance(stream, trio.lowlevel.FdStream):
        return
    try:
        fcntl.fcntl(stream.fileno(), set_size, _PIPE_BYTES)
    except OSError:
        pass  # above /proc/sys/fs/pipe-max-size or the user's pipe quota: default size


def _field(getter: Callable[..., bytes], result: dict[str, Any], name: str, **kw: int) -> bytes:
    try:
        return getter(result, name, **kw)
    except ProtocolViolation as err:
        raise EnclaveError(f"enclave returned a malformed answer: {err}") from err


def _info_from_wire(result: dict[str, Any], limits: ExecutorLimits) -> EnclaveInfo:
    try:
        platform = get_str(result, "platform", max_len=8)
        abi = get_int(result, "abi_version", lo=0, hi=2**31)
        info = EnclaveInfo(
            platform=platform,
            identity_pub=get_bytes(result, "identity_pub", min_len=32, max_len=32),
            x25519_pub=get_bytes(result, "x25519_pub", min_len=32, max_len=32),
            measurement=get_bytes(result, "measurement", min_len=32, max_len=32),
            abi_version=abi,
            limits=limits,
            root_pub=get_bytes(result, "root_pub", min_len=32, max_len=32),
        )
    except ProtocolViolation as err:
        raise EnclaveError(f"enclave returned malformed info: {err}") from err
    if result.get("limits") != limits.canonical():
        raise EnclaveError("enclave runs with other limits than requested")
    if platform != SIM_PLATFORM or abi != ABI_VERSION:
        raise EnclaveError(f"enclave reports platform {platform!r}, ABI {abi}")
    return info


async def answer_attest(
    enclave: Enclave, request: AttestRequest, *, collateral: str = ""
) -> AttestResponse:
    """The miner's answer to ``/phala/attest/1.0.0``: a fresh quote bound to the nonce.

    ``collateral`` is the DCAP collateral JSON for SGX/TDX enclaves (empty for SIM).
    """
    info = await enclave.info()
    raw = await enclave.quote(request.nonce)
    return AttestResponse(
        platform=info.platform,
        quote=raw,
        collateral=collateral,
        identity_pub=info.identity_pub,
        x25519_pub=info.x25519_pub,
    )


async def enclave_evidence(enclave: Enclave, nonce: bytes = b"") -> EnclaveEvidence:
    """Evidence of a local enclave (a fresh quote bound to ``nonce``), for another to check."""
    info = await enclave.info()
    return EnclaveEvidence(
        platform=info.platform,
        quote=await enclave.quote(nonce),
        identity_pub=info.identity_pub,
        x25519_pub=info.x25519_pub,
        nonce=nonce,
        limits=info.limits,
    )


@asynccontextmanager
async def open_simulated_enclave(
    config: EnclaveConfig, *, transcript: Transcript | None = None
) -> AsyncIterator[SimulatedEnclave]:
    """Start a simulated enclave process; stop it (and reap it) on exit.

    ``transcript``, if given, is called with every chunk of bytes crossing the boundary.
    """
    if not isinstance(config, EnclaveConfig):
        raise UsageError("config must be an EnclaveConfig")
    async with trio.open_nursery() as nursery:
        enclave = SimulatedEnclave(config, transcript)
        try:
            await enclave._start(nursery)
            yield enclave
        finally:
            await enclave.aclose()
            nursery.cancel_scope.cancel()
