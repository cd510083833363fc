#!/usr/bin/env python3
"""Enclave benchmarks, each against a baseline measured in the same run.

quotes  Verifications per second. verify_sim_quote against a bare PyNaCl Ed25519 verification
        of the same signed bytes; verify_quote on the real SGX and TDX DCAP samples
        (tests/data/attestation-samples, at their README's now=1751328000) against the raw
        dcap-qvl calls it wraps, on the same inputs (QuoteCollateralV3.from_json + verify).
jobs    Sealed jobs, MiB/s of input. The module and input are sealed by a ClientSession as a
        real client seals them; timing runs from run_sealed to the sealed output and the
        signed receipt in hand. Three ways, interleaved, best of --reps each:
          executor  WasmExecutor.run on the plaintext, in this process (no AEAD, no receipt);
          in-proc   the enclave's work for run_sealed (open the sealed module and input, run
                    on the same executor, seal the output, hash and sign the receipt), in
                    this process, as a function call (its temporaries are freed within the
                    timing, as in the enclave);
          enclave   the same through the simulated enclave process.
        enclave/in-proc is the cost of the boundary itself (pipes, framing, copies): the
        issue's target is >= 0.8x at 64 MiB. enclave/executor adds what sealing costs (the
        XChaCha20-Poly1305 opening and sealing, the receipt's output hash).
        Jobs: sum.wat reads every 4-byte word of its input (it cannot skip any of it) and
        answers 8 bytes, so it measures the input direction, which the target is about;
        echo.wat answers its whole input, so its output crosses back at full size as well.
fuel    Enclave.benchmark() (fuel/s of the executor in the enclave process) against
        WasmExecutor.benchmark() in this process.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import dcap_qvl
import nacl.signing
import trio
import wasmtime

from phala_p2p.crypto.identity import Identity
from phala_p2p.market.receipt import output_hash
from phala_p2p.tee.dcap import verify_quote
from phala_p2p.tee.enclave import EnclaveConfig, SimulatedEnclave, open_simulated_enclave
from phala_p2p.tee.executor import ExecutorLimits, WasmExecutor
from phala_p2p.tee.quote import (
    UsageReceipt,
    make_report_data,
    sign_receipt,
    sign_sim_quote,
    verify_sim_quote,
)
from phala_p2p.tee.sealing import ClientSession, EnclaveSession, open_sealed, seal
from phala_p2p.wire.codec import encode

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "examples" / "jobs"
SAMPLES = REPO / "tests" / "data" / "attestation-samples"
DCAP_NOW = 1751328000  # inside both samples' collateral windows (see the samples' README)
SIM_DOMAIN = b"phala/tee/sim-quote/v1\x00"  # protocols/attest.md, "Simulated quotes"
MIB = 1024 * 1024
FUEL = 10**10


# -- quotes ----------------------------------------------------------------------------------


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls per second of ``fn`` over about ``seconds``."""
    n = 0
    start = time.perf_counter()
    while True:
        for _ in range(16):
            fn()
        n += 16
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n / elapsed


def best_rates(
    contenders: dict[str, Callable[[], object]], seconds: float, rounds: int
) -> dict[str, float]:
    """Best rate of each function over ``rounds`` interleaved rounds (noise only slows)."""
    best = dict.fromkeys(contenders, 0.0)
    for _ in range(rounds):
        for name, fn in contenders.items():
            best[name] = max(best[name], rate(fn, seconds))
    return best


def bench_quotes(seconds: float, rounds: int) -> None:
    root = Identity.from_seed(b"\x01" * 32)
    report_data = make_report_data(b"\x11" * 32, b"\x22" * 32, nonce=b"n" * 32)
    raw = sign_sim_quote(root, bytes(range(32)), report_data, 1_700_000_000)
    roots = [root.public_key]
    verify_key = nacl.signing.VerifyKey(root.public_key)
    signed, signature = SIM_DOMAIN + raw[:140], raw[140:]
    verify_key.verify(signed, signature)  # the baseline checks the very same bytes
    sim = best_rates(
        {
            "bare": lambda: verify_key.verify(signed, signature),
            "ours": lambda: verify_sim_quote(raw, roots, 1_700_000_000),
        },
        seconds,
        rounds,
    )
    print(f"quote verification, simulated ({len(raw)}-byte quote), best of {rounds}:")
    print(f"  bare Ed25519 verify (PyNaCl)     {sim['bare']:9.0f} /s")
    print(f"  verify_sim_quote                 {sim['ours']:9.0f} /s")
    print(f"  ratio ours/bare = {sim['ours'] / sim['bare']:.2f}x")

    if not (SAMPLES / "sgx_quote").is_file():
        print(f"quote verification, DCAP: skipped (no samples at {SAMPLES})")
        return
    for tee in ("sgx", "tdx"):
        quote = (SAMPLES / f"{tee}_quote").read_bytes()
        collateral = (SAMPLES / f"{tee}_quote_collateral.json").read_text()
        report = verify_quote(quote, collateral, DCAP_NOW)
        assert report.tee == tee.upper(), report.tee

        def raw_qvl(quote: bytes = quote, collateral: str = collateral) -> object:
            parsed = dcap_qvl.QuoteCollateralV3.from_json(collateral)
            return dcap_qvl.verify(quote, parsed, DCAP_NOW)

        def ours(quote: bytes = quote, collateral: str = collateral) -> object:
            return verify_quote(quote, collateral, DCAP_NOW)

        dcap = best_rates({"raw": raw_qvl, "ours": ours}, seconds, rounds)
        print(
            f"quote verification, DCAP {tee.upper()} ({len(quote)}-byte quote, "
            f"{report.tcb_status}), best of {rounds}:"
        )
        print(f"  raw dcap_qvl from_json + verify  {dcap['raw']:9.0f} /s")
        print(f"  verify_quote                     {dcap['ours']:9.0f} /s")
        print(f"  ratio ours/raw = {dcap['ours'] / dcap['raw']:.2f}x")


# -- jobs ------------------------------------------------------------------------------------


class _EnclaveClient:
    """A client of the enclave process, through the node's ciphertext-only interface."""

    def __init__(self, enclave: SimulatedEnclave) -> None:
        self.enclave = enclave
        self.keys = ClientSession()

    async def open(self) -> None:
        info = await self.enclave.info()
        offer = await self.enclave.open_session(self.keys.public_key)
        assert offer.verify(info.identity_pub, self.keys.public_key, info.measurement)
        self.keys.accept_offer(offer.enclave_pub, offer.session_id)

    async def timed_run(self, module: bytes, data: bytes) -> tuple[float, bytes]:
        """Seal as a client does, then time run_sealed; returns (seconds, plaintext output)."""
        job_id = os.urandom(16)
        sealed_module = self.keys.seal_module(job_id, module)
        sealed_input = self.keys.seal_input(job_id, data)
        start = time.perf_counter()
        result = await self.enclave.run_sealed(
            self.keys.session_id, job_id, sealed_module, sealed_input, FUEL
        )
        elapsed = time.perf_counter() - start
        assert result.receipt.bytes_in == len(module) + len(data)
        return elapsed, self.keys.open_output(job_id, result.sealed_output)


class _InProcessSealed:
    """What the enclave does for ``run_sealed`` (EnclaveServer._op_run_sealed), in-process."""

    def __init__(self, executor: WasmExecutor) -> None:
        self.executor = executor
        self.client = ClientSession()
        self.session = EnclaveSession(self.client.public_key)
        self.client.accept_offer(self.session.public_key, self.session.session_id)
        self.identity = Identity.generate()

    def timed_run(self, module: bytes, data: bytes) -> tuple[float, bytes]:
        job_id = os.urandom(16)
        sealed_module = self.client.seal_module(job_id, module)
        sealed_input = self.client.seal_input(job_id, data)
        start = time.perf_counter()
        sealed_output, _ = self.run_sealed(job_id, sealed_module, sealed_input)
        elapsed = time.perf_counter() - start
        return elapsed, self.client.open_output(job_id, sealed_output)

    def run_sealed(
        self, job_id: bytes, sealed_module: bytes, sealed_input: bytes
    ) -> tuple[bytes, bytes]:
        # a function, as in the enclave: its plaintext temporaries are freed when it returns
        keys, sid = self.session.keys, self.session.session_id
        plain_module = open_sealed(keys.to_enclave, sid, job_id, b"module", sealed_module)
        plain_input = open_sealed(keys.to_enclave, sid, job_id, b"input", sealed_input)
        self.session.claim_job(job_id)
        result = self.executor.run(plain_module, plain_input, fuel=FUEL)
        sealed_output = seal(keys.to_client, sid, job_id, b"output", result.output)
        receipt = sign_receipt(
            self.identity,
            UsageReceipt(
                session_id=sid,
                job_id=job_id,
                measurement=bytes(32),
                module_hash=hashlib.sha256(plain_module).digest(),
                fuel_limit=FUEL,
                fuel_used=result.fuel_used,
                bytes_in=len(plain_module) + len(plain_input),
                bytes_out=len(result.output),
                output_hash=output_hash(result.output),
                enclave=self.identity.public_key,
            ),
        )
        return sealed_output, encode(receipt)


def executor_run(executor: WasmExecutor, module: bytes, data: bytes) -> tuple[float, bytes]:
    start = time.perf_counter()
    result = executor.run(module, data, fuel=FUEL)
    return time.perf_counter() - start, result.output


async def bench_jobs(
    enclave: SimulatedEnclave,
    executor: WasmExecutor,
    modules: dict[str, bytes],
    sizes_mib: list[int],
    reps: int,
) -> None:
    local = _InProcessSealed(executor)
    remote = _EnclaveClient(enclave)
    await remote.open()
    for module in modules.values():  # compile once on both sides
        local.timed_run(module, b"warm")
        await remote.timed_run(module, b"warm")
    print(f"sealed jobs, MiB/s of input, best of {reps} interleaved runs:")
    print(
        f"  {'job':<9}{'input':>8} {'executor':>9} {'in-proc':>9} {'enclave':>9}"
        "  enclave/in-proc  enclave/executor"
    )
    for name, module in modules.items():
        for mib in sizes_mib:
            data = os.urandom(mib * MIB)
            best = {"executor": float("inf"), "in-proc": float("inf"), "enclave": float("inf")}
            for _ in range(reps):
                t_plain, out_plain = executor_run(executor, module, data)
                t_local, out_local = local.timed_run(module, data)
                t_enclave, out_enclave = await remote.timed_run(module, data)
                assert out_plain == out_local == out_enclave
                del out_plain, out_local, out_enclave
                for key, t in (("executor", t_plain), ("in-proc", t_local), ("enclave", t_enclave)):
                    best[key] = min(best[key], t)
            speed = {key: mib / t for key, t in best.items()}
            boundary = speed["enclave"] / speed["in-proc"]
            overall = speed["enclave"] / speed["executor"]
            target = "  (target >= 0.8x enclave/in-proc)" if mib == 64 else ""
            print(
                f"  {name + '.wat':<9}{mib:4d} MiB {speed['executor']:9.1f} {speed['in-proc']:9.1f}"
                f" {speed['enclave']:9.1f}  {boundary:14.2f}x  {overall:15.2f}x{target}"
            )
            del data


async def bench_fuel(
    enclave: SimulatedEnclave, executor: WasmExecutor, fuel: int, rounds: int
) -> None:
    local = remote = 0.0
    for _ in range(rounds):
        local = max(local, executor.benchmark(fuel=fuel))
        remote = max(remote, await enclave.benchmark())
    print(f"executor fuel benchmark ({fuel} fuel spin loop), best of {rounds}:")
    print(f"  WasmExecutor.benchmark(), in-process  {local / 1e6:8.1f} Mfuel/s")
    print(f"  Enclave.benchmark()                   {remote / 1e6:8.1f} Mfuel/s")
    print(f"  ratio enclave/in-process = {remote / local:.2f}x")


async def main(args: argparse.Namespace) -> None:
    if args.only in (None, "quotes"):
        bench_quotes(args.seconds, args.rounds)
    if args.only == "quotes":
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    top = max(sizes) * MIB
    limits = ExecutorLimits(
        max_fuel=FUEL, memory_cap_bytes=2 * top, wall_clock_s=120.0, max_input=top, max_output=top
    )
    executor = WasmExecutor(limits)
    config = EnclaveConfig(dev_root_seed=b"\x05" * 32, limits=limits)
    async with open_simulated_enclave(config) as enclave:
        if args.only in (None, "jobs"):
            modules = {
                name: bytes(wasmtime.wat2wasm((JOBS / f"{name}.wat").read_text()))
                for name in args.jobs.split(",")
            }
            await bench_jobs(enclave, executor, modules, sizes, args.reps)
        if args.only in (None, "fuel"):
            await bench_fuel(enclave, executor, config.benchmark_fuel, args.rounds)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["quotes", "jobs", "fuel"])
    parser.add_argument("--seconds", type=float, default=1.0, help="per quote timing round")
    parser.add_argument("--rounds", type=int, default=3, help="quote and fuel rounds")
    parser.add_argument("--sizes", default="1,16,64", help="job input sizes in MiB")
    parser.add_argument("--reps", type=int, default=5, help="runs per job, size and way")
    parser.add_argument("--jobs", default="sum,echo", help="example jobs (examples/jobs/*.wat)")
    trio.run(main, parser.parse_args())
    sys.exit(0)
