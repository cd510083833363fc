"""The simulated enclave in its own OS process (few tests: each spawns a Python process)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from phala_p2p.chain.liveness import heartbeat_sign_bytes
from phala_p2p.crypto.identity import Identity, verify_signature
from phala_p2p.errors import (
    AttestationError,
    EnclaveError,
    FuelExhausted,
    InvalidModule,
    MemoryExhausted,
    ProtocolViolation,
    Trap,
    UsageError,
    WallClockExceeded,
)
from phala_p2p.market.receipt import output_hash
from phala_p2p.tee.enclave import (
    EnclaveConfig,
    SimulatedEnclave,
    _write_parts,
    answer_attest,
    open_simulated_enclave,
)
from phala_p2p.tee.executor import ExecutorLimits
from phala_p2p.tee.measurement import compute_measurement
from phala_p2p.tee.messages import AttestRequest
from phala_p2p.tee.policy import AttestationPolicy, verify_attestation
from phala_p2p.tee.quote import UsageReceipt, verify_receipt
from phala_p2p.tee.sealing import ClientSession
from phala_p2p.tee.splice import MIN_SPLICE, LentBlobs, unread_bytes, vmsplice_writer
from phala_p2p.tee.statements import MAX_STATEMENT, verify_statement

Job = Callable[[str], bytes]

LIMITS = ExecutorLimits(
    max_fuel=10**10,
    memory_cap_bytes=4 * 1024 * 1024,
    wall_clock_s=0.5,
    max_input=1024 * 1024,
    max_output=1024 * 1024,
    max_module_bytes=256 * 1024,
)
ROOT_SEED = b"\x05" * 32
CONFIG = EnclaveConfig(dev_root_seed=ROOT_SEED, limits=LIMITS, benchmark_fuel=5_000_000)
MARKER = b"plaintext-marker-7f3a9c"
FUEL = 10**8


class _Client:
    """A client talking to the enclave through the node's (ciphertext-only) interface."""

    def __init__(self, enclave: SimulatedEnclave, session_id: bytes, keys: ClientSession):
        self.enclave = enclave
        self.session_id = session_id
        self.keys = keys

    def seal(self, module: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
        job_id = os.urandom(16)
        return job_id, self.keys.seal_module(job_id, module), self.keys.seal_input(job_id, data)

    async def run(self, module: bytes, data: bytes, fuel: int = FUEL) -> tuple[bytes, UsageReceipt]:
        job_id, sealed_module, sealed_input = self.seal(module, data)
        result = await self.enclave.run_sealed(
            self.session_id, job_id, sealed_module, sealed_input, fuel
        )
        assert result.receipt.job_id == job_id
        return self.keys.open_output(job_id, result.sealed_output), result.receipt


async def _client(enclave: SimulatedEnclave) -> _Client:
    info = await enclave.info()
    keys = ClientSession()
    offer = await enclave.open_session(keys.public_key)
    assert offer.verify(info.identity_pub, keys.public_key, info.measurement)
    keys.accept_offer(offer.enclave_pub, offer.session_id)
    return _Client(enclave, offer.session_id, keys)


async def test_enclave_process_serves_jobs_and_keeps_secrets(job: Job) -> None:
    chunks: list[tuple[str, bytes]] = []
    big_frame_sent = trio.Event()

    def transcript(direction: str, chunk: bytes) -> None:
        chunks.append((direction, chunk))
        if direction == "to_enclave" and len(chunk) > 200:
            big_frame_sent.set()

    async with open_simulated_enclave(CONFIG, transcript=transcript) as enclave:
        assert enclave.pid is not None
        assert enclave.pid != os.getpid()
        info = await enclave.info()
        assert info.measurement == compute_measurement(LIMITS)
        assert info.root_pub == Identity.from_seed(ROOT_SEED).public_key
        assert info.limits == LIMITS

        # attestation: a fresh quote bound to the verifier's nonce and the enclave's keys
        request = AttestRequest(nonce=os.urandom(32))
        response = await answer_attest(enclave, request)
        policy = AttestationPolicy(allowed_measurements=frozenset({info.measurement}))
        now = int(time.time())
        report = verify_attestation(
            response, nonce=request.nonce, policy=policy, sim_roots=[info.root_pub], now=now
        )
        assert report.measurement == info.measurement
        with pytest.raises(AttestationError, match="report data"):
            verify_attestation(
                response, nonce=os.urandom(32), policy=policy, sim_roots=[info.root_pub], now=now
            )

        assert await enclave.benchmark() > 0

        # statements signed with the identity key, each under its own domain only
        advert = b"an advert's bytes"
        signature = await enclave.sign("advert", advert)
        assert verify_statement(info.identity_pub, "advert", advert, signature)
        assert not verify_statement(info.identity_pub, "agreement", advert, signature)
        assert not verify_statement(info.identity_pub, "advert", advert + b"!", signature)
        with pytest.raises(UsageError, match="statements of"):
            await enclave.sign("receipt", advert)
        with pytest.raises(UsageError, match="bytes"):
            await enclave.sign("advert", b"x" * (MAX_STATEMENT + 1))

        # a liveness answer: the enclave builds the bytes itself, for its own key only
        seed = bytes(range(32))
        answer = await enclave.heartbeat("phala-test", 7, seed)
        signed = heartbeat_sign_bytes("phala-test", 7, seed, info.identity_pub)
        assert verify_signature(info.identity_pub, signed, answer)
        other = heartbeat_sign_bytes("phala-test", 8, seed, info.identity_pub)
        assert not verify_signature(info.identity_pub, other, answer)
        with pytest.raises(UsageError, match="32-byte seed"):
            await enclave.heartbeat("phala-test", 7, b"short")
        with pytest.raises(UsageError, match="height"):
            await enclave.heartbeat("phala-test", 0, seed)

        client = await _client(enclave)
        output, receipt = await client.run(job("echo"), MARKER)
        assert output == MARKER
        verify_receipt(receipt, info.identity_pub)
        assert receipt.session_id == client.session_id
        assert receipt.measurement == info.measurement
        assert receipt.output_hash == output_hash(MARKER)
        assert receipt.module_hash == hashlib.sha256(job("echo")).digest()
        assert receipt.bytes_out == len(MARKER)
        assert receipt.bytes_in == len(job("echo")) + len(MARKER)
        assert 0 < receipt.fuel_used <= receipt.fuel_limit == FUEL

        # a job at the size caps: its input and output cross the channel as blobs
        big = os.urandom(LIMITS.max_input)
        output, receipt = await client.run(job("echo"), big)
        assert output == big
        assert receipt.bytes_out == len(big)

        # every job failure comes back typed, and the enclave keeps serving
        failures: list[tuple[bytes, int, type[Exception]]] = [
            (job("fuel_hog"), 1_000_000, FuelExhausted),
            (job("infinite_loop"), LIMITS.max_fuel, WallClockExceeded),
            (job("memory_bomb"), LIMITS.max_fuel, MemoryExhausted),
            (job("trap"), FUEL, Trap),
            (b"\0asm\x01\0\0\0garbage", FUEL, InvalidModule),
            (job("imports_host"), FUEL, InvalidModule),
        ]
        for module, fuel, error in failures:
            with pytest.raises(error):
                await client.run(module, b"", fuel)
            words, _ = await client.run(job("word_count"), b"still serving " + MARKER)
            assert words == b"3"

        # the host cannot replay, tamper with or redirect sealed jobs
        job_id, sealed_module, sealed_input = client.seal(job("uppercase"), MARKER)
        first = await enclave.run_sealed(
            client.session_id, job_id, sealed_module, sealed_input, FUEL
        )
        assert client.keys.open_output(job_id, first.sealed_output) == MARKER.upper()
        with pytest.raises(ProtocolViolation, match="already used"):
            await enclave.run_sealed(client.session_id, job_id, sealed_module, sealed_input, FUEL)
        job_id, sealed_module, sealed_input = client.seal(job("uppercase"), MARKER)
        tampered = sealed_input[:-1] + bytes([sealed_input[-1] ^ 1])
        with pytest.raises(ProtocolViolation, match="does not authenticate"):
            await enclave.run_sealed(client.session_id, job_id, sealed_module, tampered, FUEL)
        with pytest.raises(ProtocolViolation, match="does not authenticate"):
            await enclave.run_sealed(client.session_id, job_id, sealed_input, sealed_module, FUEL)
        with pytest.raises(ProtocolViolation, match="unknown or closed session"):
            await enclave.run_sealed(b"\0" * 16, job_id, sealed_module, sealed_input, FUEL)
        with pytest.raises(UsageError):
            await enclave.run_sealed(client.session_id, job_id, sealed_module, b"", 0)

        # quick requests are answered while a job runs; a cancelled caller does not
        # desynchronise the channel
        job_done = trio.Event()
        big_frame_sent = trio.Event()

        async def long_job() -> None:
            with pytest.raises(WallClockExceeded):
                await client.run(job("infinite_loop"), b"", LIMITS.max_fuel)
            job_done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_job)
            await big_frame_sent.wait()
            quote = await enclave.quote(b"during-a-job")
            assert not job_done.is_set()
            assert len(quote) == 204
        with trio.move_on_after(0.05) as scope:
            await client.run(job("infinite_loop"), b"", LIMITS.max_fuel)
        assert scope.cancelled_caught
        output, _ = await client.run(job("uppercase"), b"after cancel")
        assert output == b"AFTER CANCEL"

        await enclave.close_session(client.session_id)
        with pytest.raises(ProtocolViolation, match="unknown or closed session"):
            await client.run(job("echo"), b"x")

    # stopped by closing its stdin: it exited by itself, it was not killed
    assert enclave.returncode == 0
    with pytest.raises(EnclaveError, match="closed"):
        await enclave.quote()
    sent = b"".join(c for d, c in chunks if d == "to_enclave")
    received = b"".join(c for d, c in chunks if d == "from_enclave")
    assert len(sent) > 10_000
    assert len(received) > 1_000
    for text in (MARKER, MARKER.upper(), b"still serving", b"AFTER CANCEL"):
        assert text not in sent
        assert text not in received
    assert not any(MARKER in c for d, c in chunks if d == "enclave_stderr")


async def test_a_killed_enclave_fails_calls_with_enclave_error() -> None:
    async with open_simulated_enclave(CONFIG) as enclave:
        await enclave.quote()
        assert enclave.pid is not None
        os.kill(enclave.pid, signal.SIGKILL)
        with pytest.raises(EnclaveError):
            await enclave.quote()
        with pytest.raises(EnclaveError):
            await enclave.benchmark()
    assert enclave.returncode == -signal.SIGKILL


BOOT = Path(__file__).resolve().parents[2] / "phala_p2p" / "tee" / "enclave_boot.py"


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs Linux pidfd_open")
async def test_enclave_exits_when_its_parent_dies() -> None:
    boot = BOOT
    parent_script = (
        "import subprocess, sys\n"
        f"child = subprocess.Popen([sys.executable, '-I', {str(boot)!r}],\n"
        "                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)\n"
        "print(child.pid, flush=True)\n"
        "sys.stdin.read()\n"
    )
    parent = await trio.lowlevel.open_process(
        [sys.executable, "-I", "-c", parent_script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert parent.stdout is not None
        line = b""
        with trio.fail_after(30):
            while not line.endswith(b"\n"):
                chunk = await parent.stdout.receive_some(64)
                assert chunk, "parent exited before starting the enclave"
                line += chunk
        # a pidfd becomes readable when the process exits, even if it is not our child
        pidfd = os.pidfd_open(int(line))
        try:
            assert not _readable_now(pidfd)
            parent.kill()
            await parent.wait()
            with trio.fail_after(30):
                await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
        if parent.stdin is not None:
            await parent.stdin.aclose()
        if parent.stdout is not None:
            await parent.stdout.aclose()


def _readable_now(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def test_config_is_validated_and_hides_the_seed() -> None:
    with pytest.raises(UsageError):
        EnclaveConfig(dev_root_seed=b"short")
    with pytest.raises(UsageError):
        EnclaveConfig(dev_root_seed=ROOT_SEED, max_in_flight=0)
    with pytest.raises(UsageError):
        EnclaveConfig(dev_root_seed=ROOT_SEED, benchmark_fuel=LIMITS.max_fuel * 10)
    assert ROOT_SEED.hex() not in repr(CONFIG)


@pytest.mark.parametrize("by_reference", [False, True], ids=["writev", "vmsplice"])
async def test_frames_go_out_whole_and_in_order_through_a_small_pipe(by_reference: bool) -> None:
    """The host writes a frame's parts with writev (and, where Linux allows, its large blobs
    by reference with vmsplice), waiting only when the pipe is full: a pipe far smaller than
    the frame still gets every byte, in order; a pipe whose reader is gone is an OSError (the
    channel then marks the enclave dead)."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 4096)
    splice = vmsplice_writer(write_fd) if by_reference else None
    if by_reference and splice is None:
        os.close(read_fd)
        os.close(write_fd)
        pytest.skip("vmsplice is not available here")
    big = os.urandom(MIN_SPLICE + 1)
    parts = [b"head", os.urandom(100_000), b"", os.urandom(30_001), big, b"mid", big, b"tail"]
    got = bytearray()

    async def read_all() -> None:
        while len(got) < sum(map(len, parts)):
            try:
                got.extend(os.read(read_fd, 1000))  # slower than the writer: it must wait
            except BlockingIOError:
                await trio.lowlevel.wait_readable(read_fd)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            await _write_parts(write_fd, parts, splice)
        assert bytes(got) == b"".join(parts)
        os.close(read_fd)
        read_fd = -1
        with pytest.raises(BrokenPipeError):
            await _write_parts(write_fd, [b"x" * 10, big], splice)
    finally:
        os.close(write_fd)
        if read_fd >= 0:
            os.close(read_fd)


def test_blobs_lent_to_a_pipe_are_kept_until_the_reader_has_read_past_them() -> None:
    """The enclave's output blobs go into its pipe by reference: each is let go only once
    the host has read every byte of it (the pipe no longer refers to its pages)."""
    read_fd, write_fd = os.pipe()
    try:
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 1 << 20)
        splice = vmsplice_writer(write_fd, blocking=True)
        if splice is None:
            pytest.skip("vmsplice is not available here")
        lent = LentBlobs(write_fd)
        first, second = os.urandom(MIN_SPLICE + 100), os.urandom(MIN_SPLICE)
        for blob in (first, second):
            os.write(write_fd, b"head")
            lent.wrote(4)
            offset = 0
            while offset < len(blob):
                offset += splice(write_fd, blob, offset)
            lent.lend(blob)
        assert unread_bytes(write_fd) == lent.written
        got = os.read(read_fd, 4 + len(first) - 1)  # all of the first blob but its last byte
        lent.release_read()
        assert len(lent) == 2
        got += os.read(read_fd, 1)
        lent.release_read()
        assert len(lent) == 1  # the first is read: let go; the second is not
        while unread_bytes(read_fd):
            got += os.read(read_fd, 1 << 20)
        lent.release_read()
        assert len(lent) == 0
        assert got == b"head" + first + b"head" + second
    finally:
        os.close(read_fd)
        os.close(write_fd)
