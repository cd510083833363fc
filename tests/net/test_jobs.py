"""Confidential jobs on real hosts: a client runs a module in a miner's enclave end to end
(discover, attest, negotiate, stream encrypted, receipts, settlement), resumes after a cut
connection, and gets clear errors when the job fails or the miner dies."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import wasmtime

from phala_p2p.chain.settlement import cost
from phala_p2p.config import JobsConfig, NodeConfig
from phala_p2p.errors import Trap
from phala_p2p.services.jobs import JobExecutionFailed, JobLost, JobProgress
from phala_p2p.testing import open_devnet, wait_until

from .test_chain import FAST

JOBS = Path(__file__).resolve().parents[2] / "examples" / "jobs"


def wasm(name: str) -> bytes:
    return bytes(wasmtime.wat2wasm((JOBS / name).read_text()))


def _fast_jobs(i: int, cfg: NodeConfig) -> NodeConfig:
    return cfg.with_(jobs=JobsConfig(grace=10.0, settle_timeout=20.0, settle_after=2.0))


async def test_job_runs_end_to_end_and_settles_exactly() -> None:
    async with open_devnet(
        gatekeepers=1, miners=1, clients=1, seed=61, chain_params=FAST, configure=_fast_jobs
    ) as net:
        client, miner = net.clients[0], net.miners[0]
        await client.find_miners(wait=60)
        state = client.chain.state
        operator = miner.account
        client_before = state.balance(client.account)
        operator_before = state.balance(operator)
        phases: list[str] = []
        data = b"hello, confidential world " * 1000
        result = await client.run_job(
            wasm("uppercase.wat"),
            data,
            max_fuel=10**8,
            progress=lambda p: phases.append(p.phase),
        )
        assert result.output == data.upper()
        assert result.miner == miner.peer_id
        receipt = result.receipt
        receipt.verify()
        receipt.check_against(result.agreement.terms)
        assert receipt.receipt.final
        assert 0 < receipt.fuel_used <= 10**8
        assert receipt.bytes_out == len(data)
        assert receipt.bytes_in > len(data)  # the module and its header count too
        assert phases[0] == "negotiating"
        assert phases[-1] == "done"
        assert "streaming" in phases
        assert "settling" in phases
        assert result.settlement is not None
        assert result.settlement.ok
        settled = client.chain.state.settlement(result.agreement.id)
        assert settled is not None
        terms = result.agreement.terms
        paid = cost(receipt.fuel_used, terms.price)
        assert settled.paid == paid
        assert settled.fuel_used == receipt.fuel_used
        # balances move by exactly the settled amount (and the client's fees)
        fee = client.chain.params.tx_fee
        await wait_until(
            lambda: state.balance(operator) == operator_before + paid, 20, message="operator paid"
        )
        escrow_fee_and_settle_fee = 2 * fee
        assert state.balance(client.account) == client_before - paid - escrow_fee_and_settle_fee
        # the miner's slot is free again and its node kept the enclave's receipt
        assert miner.jobs.receipts[result.agreement.id].final


async def test_failed_job_reports_the_error_and_settles_its_fuel() -> None:
    async with open_devnet(
        gatekeepers=1, miners=1, clients=1, seed=62, chain_params=FAST, configure=_fast_jobs
    ) as net:
        client = net.clients[0]
        await client.find_miners(wait=60)
        with pytest.raises(JobExecutionFailed) as caught:
            await client.run_job(wasm("trap.wat"), b"", max_fuel=10**7)
        err = caught.value
        assert err.kind is Trap
        assert err.result.settlement is not None
        assert err.result.settlement.ok
        assert err.result.receipt.receipt.final


async def test_cut_connection_resumes_without_resending(tmp_path: Path) -> None:
    async with open_devnet(
        gatekeepers=1, miners=1, clients=1, seed=63, chain_params=FAST, configure=_fast_jobs
    ) as net:
        client, miner = net.clients[0], net.miners[0]
        await client.find_miners(wait=60)
        payload = bytes(range(256)) * (96 * 1024)  # 24 MiB: 12 times the send window
        cut = trio.Event()

        def on_progress(p: JobProgress) -> None:
            if p.phase == "streaming" and p.sent >= len(payload) // 2 and not cut.is_set():
                cut.set()
                client.start_soon(client.disconnect, miner.peer_id)

        result = await client.run_job(
            wasm("stream_echo.wat"), payload, max_fuel=10**9, progress=on_progress
        )
        assert cut.is_set()
        assert result.output == payload
        assert result.stats.resumes >= 1
        assert result.stats.bytes_sent < 1.1 * len(payload)
        assert result.receipt.bytes_out == len(payload)


async def test_miner_crash_gives_a_clear_error_and_the_escrow_comes_back() -> None:
    def configure(i: int, cfg: NodeConfig) -> NodeConfig:
        return cfg.with_(jobs=JobsConfig(grace=2.0, settle_timeout=10.0))

    async with open_devnet(
        gatekeepers=1, miners=1, clients=1, seed=64, chain_params=FAST, configure=configure
    ) as net:
        client, miner = net.clients[0], net.miners[0]
        await client.find_miners(wait=60)
        before = client.chain.state.balance(client.account)
        stopped = trio.Event()

        def on_progress(p: JobProgress) -> None:
            if p.phase == "streaming" and p.sent > 1 << 20 and not stopped.is_set():
                stopped.set()
                client.start_soon(net.stop, miner)

        with pytest.raises(JobLost, match="grace period"):
            await client.run_job(
                wasm("stream_echo.wat"), bytes(4 << 20), max_fuel=10**9, deadline=5.0,
                progress=on_progress,
            )
        fee = client.chain.params.tx_fee
        # the escrow expires and is refunded: only fees are gone
        await wait_until(
            lambda: client.chain.state.balance(client.account) == before - 2 * fee,
            120,
            message="escrow refunded",
        )
