"""The simulated enclave: a separate OS process that owns the keys and runs the jobs.

It speaks the framed msgpack protocol of :mod:`phala_p2p.tee.channel` on its stdin/stdout (the
real stdout is kept for frames; ``print`` goes to stderr). The first request must be ``init``,
which carries the executor limits and, on the simulated platform, the seed of the dev
attestation root. Then it generates its keys (an Ed25519 identity and an X25519 key) inside,
computes its measurement and serves requests until its stdin reaches EOF, which is also what
happens when its parent dies.

Only public data and ciphertext leave this process: public keys, the measurement, quotes,
session offers, sealed outputs, signed receipts and error messages (which never quote job
data). Job errors are answered as typed error codes and the process keeps serving.

Threads: the main thread reads requests and answers the quick ones; jobs, the benchmark and
the key-management operations run one at a time on a worker thread fed by a bounded queue (a
full queue is answered "busy"), so the key state has a single owner.

Key management (:mod:`phala_p2p.tee.keys`): an enclave becomes a *key manager* (it holds the
master key: ``km_generate``/``km_import``) or a *worker* (it holds epoch keys and runs jobs:
``accept_epoch``/``run_sealed``), never both, so no job ever runs next to the master key. Key
material leaves only sealed to an enclave whose quote this enclave verified itself.
"""

from __future__ import annotations

import hashlib
import io
import os
import queue
import select
import sys
import threading
import time
from collections import OrderedDict
from typing import Any, Final

import nacl.public

from phala_p2p.crypto.identity import Identity
from phala_p2p.errors import EnclaveError, P2PError, ProtocolViolation, UsageError
from phala_p2p.jobs.config import MAX_GRACE_MS
from phala_p2p.jobs.runner import EnclaveJobs, Step
from phala_p2p.market.negotiation import Agreement
from phala_p2p.market.receipt import output_hash
from phala_p2p.tee.channel import (
    FrameDecoder,
    error_to_wire,
    get_bytes,
    get_int,
    get_str,
    pack_frame_parts,
)
from phala_p2p.tee.executor import ABI_VERSION, ExecutorLimits, WasmExecutor
from phala_p2p.tee.keys import (
    BOX_OVERHEAD,
    KEY_LEN,
    MAX_EPOCH,
    MAX_SECRET_LEN,
    MAX_SECRETS,
    ClusterKey,
    EpochKeyRing,
    MasterKey,
    Purpose,
    open_box,
    open_secret,
    seal_box,
    verify_peer_enclave,
)
from phala_p2p.tee.measurement import compute_measurement, source_digests
from phala_p2p.tee.quote import (
    MAX_NONCE_LEN,
    SIM_PLATFORM,
    UsageReceipt,
    make_report_data,
    sign_receipt,
    sign_sim_quote,
)
from phala_p2p.tee.sealing import (
    JOB_ID_LEN,
    SEAL_OVERHEAD,
    SESSION_ID_LEN,
    EnclaveSession,
    offer_signing_bytes,
    open_sealed,
    seal,
)
from phala_p2p.tee.splice import LentBlobs, spliceable, vmsplice_writer
from phala_p2p.tee.statements import MAX_STATEMENT, heartbeat_bytes, statement_bytes
from phala_p2p.wire.codec import decode, encode

__all__ = ["EnclaveServer", "main"]

MAX_SESSIONS: Final = 1024
JOB_QUEUE: Final = 64
MAX_AGREEMENT: Final = 4096
_READ_CHUNK: Final = 1 << 20  # the host gives the channel's pipes 1 MiB buffers
_INIT_MAX_FRAME: Final = 64 * 1024
_QUICK_OPS: Final = frozenset(
    {"info", "quote", "sign", "heartbeat", "open_session", "close_session"}
)
_KEY_OPS: Final = frozenset(
    {
        "km_generate",
        "km_import",
        "km_export",
        "km_share_epoch",
        "cluster_public",
        "accept_epoch",
        "erase_before",
        "key_status",
    }
)
_JOB_SESSION_OPS: Final = frozenset({"job_open", "job_data", "job_lost", "job_cancel"})
_WORKER_OPS: Final = frozenset({"run_sealed", "benchmark"}) | _KEY_OPS | _JOB_SESSION_OPS
ROLE_KEY_MANAGER: Final = "key-manager"
ROLE_WORKER: Final = "worker"
_MAX_PEER_QUOTE: Final = 8192


# What a buggy operation raises (reported by type only: the message may hold secret data).
_OP_BUGS = (
    ArithmeticError,
    AssertionError,
    AttributeError,
    LookupError,
    OSError,
    RuntimeError,
    TypeError,
    ValueError,
)


class EnclaveServer:
    """The request loop of the enclave process (reads ``in_fd``, writes frames to ``out_fd``)."""

    def __init__(self, in_fd: int, out_fd: int) -> None:
        self._in_fd = in_fd
        self._out_fd = out_fd
        self._write_lock = threading.Lock()
        self._splice = vmsplice_writer(out_fd, blocking=True)
        self._lent = LentBlobs(out_fd)  # output blobs the pipe still refers to
        self._sessions: OrderedDict[bytes, EnclaveSession] = OrderedDict()
        self._sessions_lock = threading.Lock()
        self._queue: queue.Queue[tuple[int, str, dict[str, Any]] | None] = queue.Queue(JOB_QUEUE)
        self._max_frame = _INIT_MAX_FRAME
        self._identity = Identity.generate()
        self._x25519 = nacl.public.PrivateKey.generate()
        self._limits = ExecutorLimits()
        self._executor: WasmExecutor | None = None
        self._root: Identity | None = None
        self._measurement = b""
        self._sources: list[tuple[str, bytes]] = []
        # key state: touched only by the worker thread (see _KEY_OPS)
        self._role = ""
        self._master: MasterKey | None = None
        self._ring = EpochKeyRing()
        self._jobs: EnclaveJobs | None = None  # job sessions: worker thread only

    # -- io ----------------------------------------------------------------------------------

    def _send(self, obj: Any) -> None:
        # segments, so that a large sealed output is written from its own bytes, uncopied;
        # where Linux allows, handed to the pipe by reference (vmsplice) and kept until the
        # host has read past it
        parts = pack_frame_parts(obj, max_frame=self._max_frame)
        with self._write_lock:
            lent = self._lent
            for part in parts:
                if self._splice is not None and spliceable(part):
                    offset = 0
                    while offset < len(part):
                        try:
                            offset += self._splice(self._out_fd, part, offset)
                        except BlockingIOError:  # (a non-blocking pipe after all)
                            select.select([], [self._out_fd], [])
                    lent.lend(part)
                    continue
                view = memoryview(part)
                while view:
                    written = os.write(self._out_fd, view)
                    view = view[written:]
                    lent.wrote(written)
            lent.release_read()

    def _reply_ok(self, rid: int, result: dict[str, Any]) -> None:
        self._send([rid, 0, result])

    def _reply_err(self, rid: int, err: P2PError) -> None:
        self._send([rid, 1, error_to_wire(err)])

    def serve(self) -> int:
        """Serve until EOF on the input. Returns the process exit code."""
        decoder = FrameDecoder(max_frame=self._max_frame)
        # Reads of exactly what the decoder wants: a blob (a sealed input of tens of MiB) is
        # read straight into its own bytes object, never copied.
        reader = io.BufferedReader(io.FileIO(self._in_fd, "r", closefd=False), _READ_CHUNK)
        worker = threading.Thread(target=self._worker, name="enclave-jobs", daemon=True)
        started = False
        try:
            while True:
                chunk = reader.read(decoder.wanted)
                if not chunk:
                    return 0
                for request in decoder.feed(chunk):
                    rid, op, args = _parse_request(request)
                    if not started:
                        if op != "init":
                            raise ProtocolViolation("the first request must be init")
                        self._dispatch_quick(rid, op, args)
                        decoder.set_max_frame(self._max_frame)
                        worker.start()
                        started = True
                    elif op in _WORKER_OPS:
                        try:
                            self._queue.put_nowait((rid, op, args))
                        except queue.Full:
                            self._reply_err(rid, EnclaveError("enclave is busy: job queue full"))
                    else:
                        self._dispatch_quick(rid, op, args)
                    # Keep no reference to a dispatched request (nor to the blob read last): the
                    # worker frees a sealed input of tens of MiB once answered, not this loop
                    # when the next request comes in.
                    del request, args
                del chunk
        except ProtocolViolation as err:
            # The host broke the channel: nothing sensible can follow on this stream.
            sys.stderr.write(f"enclave: channel violation: {err}\n")
            return 2
        except (BrokenPipeError, OSError) as err:
            sys.stderr.write(f"enclave: channel closed: {type(err).__name__}\n")
            return 0
        finally:
            if started:
                try:
                    self._queue.put_nowait(None)
                except queue.Full:
                    pass  # the process exits right after; the worker is a daemon

    def _worker(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            rid, op, args = item
            del item
            try:
                self._answer(rid, op, args)
            except OSError:
                return
            # Free the request now, once answered: freeing a sealed input of tens of MiB when
            # the next job comes would delay that job.
            del args

    def _dispatch_quick(self, rid: int, op: str, args: dict[str, Any]) -> None:
        if op != "init" and op not in _QUICK_OPS:
            self._reply_err(rid, ProtocolViolation(f"unknown operation {op!r}", reason="unknown"))
            return
        self._answer(rid, op, args)

    def _answer(self, rid: int, op: str, args: dict[str, Any]) -> None:
        """Run one operation; its typed errors and its bugs become error replies."""
        try:
            handler = getattr(self, f"_op_{op}")
            result = handler(args)
        except P2PError as err:
            self._reply_err(rid, err)
        except _OP_BUGS as err:  # a bug must not take the enclave down, nor leak data
            sys.stderr.write(f"enclave: internal error in {op}: {type(err).__name__}\n")
            self._reply_err(rid, EnclaveError(f"internal error in {op}: {type(err).__name__}"))
        else:
            self._reply_ok(rid, result)

    # -- operations --------------------------------------------------------------------------

    def _op_init(self, args: dict[str, Any]) -> dict[str, Any]:
        if self._executor is not None:
            raise UsageError("enclave is already initialised")
        platform = get_str(args, "platform", max_len=8)
        if platform != SIM_PLATFORM:
            raise UsageError(f"this enclave only simulates the {SIM_PLATFORM} platform")
        self._root = Identity.from_seed(get_bytes(args, "dev_root_seed", min_len=32, max_len=32))
        raw_limits = args.get("limits")
        if not isinstance(raw_limits, dict):
            raise ProtocolViolation("init.limits must be a map")
        self._limits = _limits_from_wire(raw_limits)
        self._executor = WasmExecutor(self._limits)
        self._sources = source_digests()  # the code this enclave runs, measured once
        self._measurement = compute_measurement(self._limits, sources=self._sources)
        self._max_frame = max_frame_for(self._limits)
        return self._info()

    def _info(self) -> dict[str, Any]:
        return {
            "platform": SIM_PLATFORM,
            "identity_pub": self._identity.public_key,
            "x25519_pub": bytes(self._x25519.public_key),
            "measurement": self._measurement,
            "abi_version": ABI_VERSION,
            "limits": self._limits.canonical(),
            "root_pub": self._root.public_key if self._root is not None else b"",
        }

    def _op_info(self, args: dict[str, Any]) -> dict[str, Any]:
        return self._info()

    def _op_quote(self, args: dict[str, Any]) -> dict[str, Any]:
        assert self._root is not None
        nonce = get_bytes(args, "nonce", max_len=MAX_NONCE_LEN)
        report_data = make_report_data(
            self._identity.public_key, bytes(self._x25519.public_key), nonce=nonce
        )
        raw = sign_sim_quote(self._root, self._measurement, report_data, int(time.time()))
        return {"quote": raw}

    def _op_heartbeat(self, args: dict[str, Any]) -> dict[str, Any]:
        chain_id = get_str(args, "chain_id", max_len=64)
        height = get_int(args, "height", lo=1, hi=(1 << 63) - 1)
        seed = get_bytes(args, "seed", min_len=32, max_len=32)
        message = heartbeat_bytes(chain_id, height, seed, self._identity.public_key)
        return {"signature": self._identity.sign(message)}

    def _op_sign(self, args: dict[str, Any]) -> dict[str, Any]:
        purpose = get_str(args, "purpose", max_len=16)
        payload = get_bytes(args, "payload", min_len=1, max_len=MAX_STATEMENT)
        return {"signature": self._identity.sign(statement_bytes(purpose, payload))}

    def _op_open_session(self, args: dict[str, Any]) -> dict[str, Any]:
        client_pub = get_bytes(args, "client_pub", min_len=32, max_len=32)
        session = EnclaveSession(client_pub)
        signature = self._identity.sign(
            offer_signing_bytes(client_pub, session.public_key, self._measurement)
        )
        with self._sessions_lock:
            self._sessions[session.session_id] = session
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return {
            "session_id": session.session_id,
            "enclave_pub": session.public_key,
            "signature": signature,
        }

    def _op_close_session(self, args: dict[str, Any]) -> dict[str, Any]:
        session_id = get_bytes(args, "session_id", min_len=SESSION_ID_LEN, max_len=SESSION_ID_LEN)
        with self._sessions_lock:
            self._sessions.pop(session_id, None)
        return {}

    def _op_benchmark(self, args: dict[str, Any]) -> dict[str, Any]:
        assert self._executor is not None
        fuel = get_int(args, "fuel", lo=1, hi=self._limits.max_fuel)
        return {"fuel_per_s": self._executor.benchmark(fuel=fuel)}

    def _op_run_sealed(self, args: dict[str, Any]) -> dict[str, Any]:
        assert self._executor is not None
        limits = self._limits
        session_id = get_bytes(args, "session_id", min_len=SESSION_ID_LEN, max_len=SESSION_ID_LEN)
        job_id = get_bytes(args, "job_id", min_len=JOB_ID_LEN, max_len=JOB_ID_LEN)
        sealed_module = get_bytes(
            args, "sealed_module", max_len=limits.max_module_bytes + SEAL_OVERHEAD
        )
        sealed_input = get_bytes(args, "sealed_input", max_len=limits.max_input + SEAL_OVERHEAD)
        max_fuel = get_int(args, "max_fuel", lo=1, hi=limits.max_fuel)
        sealed_secrets = _get_sealed_secrets(args)
        self._check_role(ROLE_WORKER)
        with self._sessions_lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise ProtocolViolation("unknown or closed session", reason="unknown-session")
        keys = session.keys
        module = open_sealed(keys.to_enclave, session_id, job_id, b"module", sealed_module)
        data = open_sealed(keys.to_enclave, session_id, job_id, b"input", sealed_input)
        module_hash = hashlib.sha256(module).digest()
        secrets = [
            open_secret(self._ring, box, module_hash, slot)
            for slot, box in enumerate(sealed_secrets)
        ]
        with self._sessions_lock:
            session.claim_job(job_id)
        self._role = ROLE_WORKER
        result = self._executor.run(module, data, fuel=max_fuel, secrets=secrets)
        sealed_output = seal(keys.to_client, session_id, job_id, b"output", result.output)
        receipt = sign_receipt(
            self._identity,
            UsageReceipt(
                session_id=session_id,
                job_id=job_id,
                measurement=self._measurement,
                module_hash=module_hash,
                fuel_limit=max_fuel,
                fuel_used=result.fuel_used,
                bytes_in=len(module) + len(data),
                bytes_out=len(result.output),
                output_hash=output_hash(result.output),
                enclave=self._identity.public_key,
            ),
        )
        return {"sealed_output": sealed_output, "receipt": encode(receipt)}

    # -- job sessions (phala_p2p.jobs.runner; worker thread only) -----------------------------

    def _job_sessions(self) -> EnclaveJobs:
        self._check_role(ROLE_WORKER)
        if self._jobs is None:
            assert self._executor is not None
            self._jobs = EnclaveJobs(self._identity, self._executor)
        self._role = ROLE_WORKER
        return self._jobs

    def _op_job_open(self, args: dict[str, Any]) -> dict[str, Any]:
        data = get_bytes(args, "data", min_len=1, max_len=_MAX_JOB_DATA)
        raw = get_bytes(args, "agreement", max_len=MAX_AGREEMENT)
        agreement = decode(raw, max_size=MAX_AGREEMENT, expect=Agreement) if raw else None
        grace_ms = get_int(args, "grace_ms", lo=0, hi=MAX_GRACE_MS) if "grace_ms" in args else None
        step = self._job_sessions().open(data, agreement, _now_ms(), grace_ms=grace_ms)
        return _step_wire(step)

    def _op_job_data(self, args: dict[str, Any]) -> dict[str, Any]:
        session_id = get_bytes(args, "session", min_len=16, max_len=16)
        generation = get_int(args, "generation", lo=0, hi=(1 << 32))
        data = get_bytes(args, "data", max_len=_MAX_JOB_DATA)
        step = self._job_sessions().data(session_id, generation, data, _now_ms())
        return _step_wire(step)

    def _op_job_lost(self, args: dict[str, Any]) -> dict[str, Any]:
        session_id = get_bytes(args, "session", min_len=16, max_len=16)
        generation = get_int(args, "generation", lo=0, hi=(1 << 32))
        self._job_sessions().lost(session_id, generation, _now_ms())
        return {}

    def _op_job_cancel(self, args: dict[str, Any]) -> dict[str, Any]:
        session_id = get_bytes(args, "session", min_len=16, max_len=16)
        code = get_int(args, "code", lo=0, hi=0xFFFF)
        text = get_str(args, "text", max_len=200)
        return {"out": self._job_sessions().cancel(session_id, code, text)}

    # -- key management (phala_p2p.tee.keys; worker thread only) -------------------------------

    def _check_role(self, role: str) -> None:
        if self._role and self._role != role:
            raise UsageError(f"this enclave is a {self._role}; it cannot act as a {role}")

    def _need_master(self) -> MasterKey:
        if self._master is None:
            raise UsageError("this enclave holds no master key")
        return self._master

    def _attested_recipient(self, args: dict[str, Any]) -> bytes:
        """The X25519 key of the ``recipient`` enclave, once its quote checks out here."""
        raw = args.get("recipient")
        if not isinstance(raw, dict):
            raise ProtocolViolation("field 'recipient' must be a map")
        raw_limits = raw.get("limits")
        if not isinstance(raw_limits, dict):
            raise ProtocolViolation("recipient.limits must be a map")
        peer_limits = _limits_from_wire(raw_limits)
        # the recipient must run this very code; its limits may differ (they are measured too)
        expected = compute_measurement(peer_limits, sources=self._sources)
        x25519_pub = get_bytes(raw, "x25519_pub", min_len=32, max_len=32)
        assert self._root is not None
        verify_peer_enclave(
            platform=get_str(raw, "platform", max_len=8),
            quote=get_bytes(raw, "quote", max_len=_MAX_PEER_QUOTE),
            identity_pub=get_bytes(raw, "identity_pub", min_len=32, max_len=32),
            x25519_pub=x25519_pub,
            nonce=get_bytes(raw, "nonce", max_len=MAX_NONCE_LEN),
            roots=[self._root.public_key],
            expected_measurement=expected,
            now=int(time.time()),
        )
        return x25519_pub

    def _key_status(self) -> dict[str, Any]:
        return {
            "role": self._role,
            "master_floor": self._master.floor if self._master is not None else None,
            "epochs": list(self._ring.epochs),
            "epoch_floor": self._ring.floor,
        }

    def _op_km_generate(self, args: dict[str, Any]) -> dict[str, Any]:
        epoch = get_int(args, "epoch", lo=0, hi=MAX_EPOCH)
        self._check_role(ROLE_KEY_MANAGER)
        if self._master is not None:
            raise UsageError("this enclave already holds a master key")
        self._master = MasterKey.generate(epoch)
        self._role = ROLE_KEY_MANAGER
        return _cluster_wire(self._master.cluster_key(epoch))

    def _op_km_import(self, args: dict[str, Any]) -> dict[str, Any]:
        sealed = get_bytes(
            args, "sealed", min_len=BOX_OVERHEAD + KEY_LEN, max_len=BOX_OVERHEAD + KEY_LEN
        )
        self._check_role(ROLE_KEY_MANAGER)
        header, state = open_box(bytes(self._x25519), sealed, purpose=Purpose.MASTER)
        if self._master is None:
            self._master = MasterKey(header.epoch, state)
        elif not self._master.same_lineage(header.epoch, state):
            raise UsageError("this enclave already holds a different master key")
        self._role = ROLE_KEY_MANAGER
        epoch = max(header.epoch, self._master.floor)
        return _cluster_wire(self._master.cluster_key(epoch))

    def _op_km_export(self, args: dict[str, Any]) -> dict[str, Any]:
        epoch = get_int(args, "epoch", lo=0, hi=MAX_EPOCH)
        master = self._need_master()
        recipient = self._attested_recipient(args)
        return {"sealed": seal_box(recipient, Purpose.MASTER, epoch, master.state_at(epoch))}

    def _op_km_share_epoch(self, args: dict[str, Any]) -> dict[str, Any]:
        epoch = get_int(args, "epoch", lo=0, hi=MAX_EPOCH)
        master = self._need_master()
        recipient = self._attested_recipient(args)
        secret = master.epoch_secret(epoch)
        return {"sealed": seal_box(recipient, Purpose.EPOCH, epoch, secret)}

    def _op_cluster_public(self, args: dict[str, Any]) -> dict[str, Any]:
        epoch = get_int(args, "epoch", lo=0, hi=MAX_EPOCH)
        if self._master is not None:
            return _cluster_wire(self._master.cluster_key(epoch))
        held = self._ring.get(epoch)
        if held is None:
            raise UsageError(f"this enclave holds no key for epoch {epoch}")
        return _cluster_wire(ClusterKey(epoch, held[1]))

    def _op_accept_epoch(self, args: dict[str, Any]) -> dict[str, Any]:
        sealed = get_bytes(
            args, "sealed", min_len=BOX_OVERHEAD + KEY_LEN, max_len=BOX_OVERHEAD + KEY_LEN
        )
        self._check_role(ROLE_WORKER)
        header, secret = open_box(bytes(self._x25519), sealed, purpose=Purpose.EPOCH)
        key = self._ring.add(header.epoch, secret)
        self._role = ROLE_WORKER
        return _cluster_wire(key)

    def _op_erase_before(self, args: dict[str, Any]) -> dict[str, Any]:
        epoch = get_int(args, "epoch", lo=0, hi=MAX_EPOCH)
        if self._master is not None:
            self._master.erase_before(epoch)
        self._ring.erase_before(epoch)
        return self._key_status()

    def _op_key_status(self, args: dict[str, Any]) -> dict[str, Any]:
        return self._key_status()


_MAX_JOB_DATA: Final = 4 << 20


def _now_ms() -> int:
    return int(time.time() * 1000)


def _step_wire(step: Step) -> dict[str, Any]:
    return {
        "out": step.out,
        "receipts": [encode(r) for r in step.receipts],
        "closed": step.closed,
        "done": step.done,
        "session": step.session_id,
        "generation": step.generation,
        "agreement_id": step.agreement_id,
        "error": step.error[:500],
    }


def _cluster_wire(key: ClusterKey) -> dict[str, Any]:
    return {"epoch": key.epoch, "public_key": key.public_key}


def _get_sealed_secrets(args: dict[str, Any]) -> list[bytes]:
    value = args.get("sealed_secrets", [])
    if not isinstance(value, list) or len(value) > MAX_SECRETS:
        raise ProtocolViolation(f"field 'sealed_secrets' must be a list of at most {MAX_SECRETS}")
    for box in value:
        if not isinstance(box, bytes) or len(box) > BOX_OVERHEAD + MAX_SECRET_LEN:
            raise ProtocolViolation(
                f"each sealed secret must be at most {BOX_OVERHEAD + MAX_SECRET_LEN} bytes"
            )
    return value


def max_frame_for(limits: ExecutorLimits) -> int:
    """The channel's frame cap for these limits: the largest request plus headroom."""
    largest = max(limits.max_module_bytes + limits.max_input, limits.max_output)
    secrets = MAX_SECRETS * (BOX_OVERHEAD + MAX_SECRET_LEN + 8)  # run_sealed's sealed_secrets
    return largest + 2 * SEAL_OVERHEAD + secrets + 64 * 1024


def _limits_from_wire(raw: dict[str, Any]) -> ExecutorLimits:
    expected = set(ExecutorLimits().canonical())
    if set(raw) != expected:
        raise ProtocolViolation("init.limits has unexpected or missing fields")
    values: dict[str, int | float] = {}
    for name in expected:
        value = raw[name]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ProtocolViolation(f"init.limits.{name} must be a number")
        values[name] = value
    try:
        return ExecutorLimits(
            max_fuel=_as_int(values["max_fuel"]),
            memory_cap_bytes=_as_int(values["memory_cap_bytes"]),
            wall_clock_s=float(values["wall_clock_s"]),
            max_input=_as_int(values["max_input"]),
            max_output=_as_int(values["max_output"]),
            max_module_bytes=_as_int(values["max_module_bytes"]),
            max_wasm_stack=_as_int(values["max_wasm_stack"]),
            module_cache_size=_as_int(values["module_cache_size"]),
        )
    except UsageError as err:
        raise ProtocolViolation(f"init.limits are invalid: {err}") from err


def _as_int(value: int | float) -> int:
    if not isinstance(value, int):
        raise ProtocolViolation("limit must be an integer")
    return value


def _parse_request(request: Any) -> tuple[int, str, dict[str, Any]]:
    if (
        not isinstance(request, list)
        or len(request) != 3
        or isinstance(request[0], bool)
        or not isinstance(request[0], int)
        or not 0 <= request[0] < 2**63
        or not isinstance(request[1], str)
        or len(request[1]) > 32
        or not isinstance(request[2], dict)
    ):
        raise ProtocolViolation("malformed request frame")
    return request[0], request[1], request[2]


def main() -> int:
    """Run the enclave on stdin/stdout; stdout is reserved for frames."""
    out_fd = os.dup(1)
    os.dup2(2, 1)  # anything printed goes to stderr, never into the channel
    sys.stdout = sys.stderr
    code = EnclaveServer(0, out_fd).serve()
    sys.stderr.flush()
    # Exit now, even if a job is still running on the worker thread: the host has gone.
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())
