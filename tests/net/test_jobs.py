"""Confidential jobs on real hosts: a client runs a module in a miner's enclave end to end
(discover, attest, negotiate, stream encrypted, receipts, settlement), resumes after a cut
connection, and gets clear errors when the job fails or the miner dies."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import wasmtime

from phala_p2p.chain.miners import MinerRegister, MinerStatus, get_miner, registration_nonce
from phala_p2p.chain.params import PPM
from phala_p2p.chain.settlement import SubmitReceiptEvidence, cost
from phala_p2p.config import JobsConfig, NodeConfig
from phala_p2p.crypto.identity import Identity
from phala_p2p.errors import NegotiationFailed, Trap, UsageError
from phala_p2p.market.receipt import JobReceipt, equivocation
from phala_p2p.node import Node
from phala_p2p.services.jobs import JobExecutionFailed, JobLost, JobProgress
from phala_p2p.tee.executor import ExecutorLimits
from phala_p2p.tee.measurement import compute_measurement
from phala_p2p.tee.quote import make_report_data, sign_sim_quote
from phala_p2p.testing import dev_root_identity, open_devnet, wait_until

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
        # balances move by exactly the settled amount (and the client's fees); the rest of
        # the client's standing escrow waits for its next job
        fee = client.chain.params.tx_fee
        await wait_until(
            lambda: state.balance(operator) == operator_before + paid, 20, message="operator paid"
        )
        escrow = state.escrow(terms.escrow_id)
        assert escrow is not None
        assert escrow.standing
        escrow_fee_and_settle_fee = 2 * fee
        assert state.balance(client.account) + escrow.amount == (
            client_before - paid - escrow_fee_and_settle_fee
        )
        # the miner's slot is free again and its node kept the enclave's receipt
        assert miner.jobs.receipts[result.agreement.id].final

        # A second job draws on the same escrow (no transaction before it starts) and is
        # settled in the background: run_job returns with the co-signed receipt.
        opened = client.metrics.get("escrows_opened", standing="true")
        assert opened == 1
        second = await client.run_job(
            wasm("uppercase.wat"), b"again", max_fuel=10**8, settle="background"
        )
        assert second.output == b"AGAIN"
        assert second.agreement.terms.escrow_id == terms.escrow_id
        assert client.metrics.get("escrows_opened", standing="true") == opened
        assert client.metrics.get("escrows_reused") == 1
        settlement = await second.settled()
        assert settlement is not None
        assert settlement.ok
        assert second.settlement is settlement
        paid_too = cost(second.receipt.fuel_used, second.agreement.terms.price)
        await wait_until(
            lambda: state.settlement(second.agreement.id) is not None, 20, message="settled"
        )
        left = state.escrow(terms.escrow_id)
        assert left is not None
        assert left.amount == escrow.amount - paid_too
        assert state.balance(client.account) + left.amount == (
            client_before - paid - paid_too - 3 * fee
        )


async def test_the_session_opens_while_the_agreement_is_negotiated() -> None:
    """run_job opens its session with the proposal: a counter-offer (here, the miner moves
    the deadline) makes the agreement one round later, under which the session runs; a
    refusal ends the job with the negotiation's error, and the miner drops the hello that
    waited for an agreement that will not come."""

    def configure(i: int, cfg: NodeConfig) -> NodeConfig:
        market = dataclasses.replace(cfg.market, max_deadline=60.0)
        return _fast_jobs(i, cfg).with_(market=market)

    async with open_devnet(
        gatekeepers=1, miners=1, clients=1, seed=66, chain_params=FAST, configure=configure
    ) as net:
        client, miner = net.clients[0], net.miners[0]
        await client.find_miners(wait=60)
        started = time.time()
        result = await client.run_job(wasm("uppercase.wat"), b"later", max_fuel=10**7)
        assert result.output == b"LATER"
        assert miner.metrics.get("proposals_answered", answer="counter") == 1
        assert result.agreement.terms.deadline_ms <= (started + 61) * 1000
        assert result.receipt.receipt.agreement_id == result.agreement.id

        waits = miner.metrics.get("job_connections")
        with trio.fail_after(5):  # not the miner's AGREEMENT_WAIT_S
            with pytest.raises(NegotiationFailed) as refused:
                await client.run_job(
                    wasm("uppercase.wat"), b"x", max_fuel=10**7, max_price=1, miner=miner.peer_id
                )
        assert refused.value.reason == "price"
        # the hello that came with the proposal never reached the enclave
        await wait_until(lambda: miner.market.hellos_waiting == 0, 5, message="hello dropped")
        assert miner.metrics.get("job_connections") == waits


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
        assert result.stats.bytes_sent < 1.1 * len(payload), result.stats
        assert result.receipt.bytes_out == len(payload)


async def test_miner_crash_gives_a_clear_error_and_the_escrow_comes_back() -> None:
    def configure(i: int, cfg: NodeConfig) -> NodeConfig:
        # a standing escrow that lasts no longer than the job's deadline needs
        market = dataclasses.replace(cfg.market, escrow_lifetime=5.0)
        return cfg.with_(jobs=JobsConfig(grace=2.0, settle_timeout=10.0), market=market)

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
                wasm("stream_echo.wat"),
                bytes(4 << 20),
                max_fuel=10**9,
                deadline=5.0,
                progress=on_progress,
            )
        fee = client.chain.params.tx_fee
        # the escrow expires and is refunded: only fees are gone
        await wait_until(
            lambda: client.chain.state.balance(client.account) == before - 2 * fee,
            120,
            message="escrow refunded",
        )


async def test_settlement_lands_after_the_partition_heals() -> None:
    """The client finishes its job cut off from every gatekeeper: its settlement stays
    pending (re-sent), and lands, moving balances by exactly the settled amount, once the
    partition heals."""

    def configure(i: int, cfg: NodeConfig) -> NodeConfig:
        return cfg.with_(jobs=JobsConfig(grace=10.0, settle_timeout=2.0, settle_after=600.0))

    async with open_devnet(
        gatekeepers=1, miners=1, clients=1, seed=65, chain_params=FAST, configure=configure
    ) as net:
        client, miner, keeper = net.clients[0], net.miners[0], net.gatekeepers[0]
        await client.find_miners(wait=60)
        operator_before = keeper.chain.state.balance(miner.account)
        cuts: list[Any] = []
        output = bytearray()

        def on_progress(p: JobProgress) -> None:
            if p.phase == "streaming" and not cuts:  # the escrow is on chain by now
                cuts.append(net.partition([keeper, net.bootstrap], [miner, client]))

        async def on_output(data: bytes) -> None:
            await cuts[0]  # every connection across the cut is closed before the job ends
            output.extend(data)

        data = b"partitioned " * 500
        result = await client.run_job_stream(
            wasm("uppercase.wat"),
            data,
            input_size=len(data),
            on_output=on_output,
            max_fuel=10**8,
            progress=on_progress,
        )
        assert bytes(output) == data.upper()
        assert result.settlement is None  # no gatekeeper to finalize it
        assert keeper.chain.state.settlement(result.agreement.id) is None
        await net.heal()
        settled = await _wait_settled(keeper, result.agreement.id)
        paid = cost(result.receipt.fuel_used, result.agreement.terms.price)
        assert settled.paid == paid
        assert keeper.chain.state.balance(miner.account) == operator_before + paid


async def _wait_settled(node, agreement_id):  # type: ignore[no-untyped-def]
    await wait_until(
        lambda: node.chain.state.settlement(agreement_id) is not None, 60, message="settled"
    )
    return node.chain.state.settlement(agreement_id)


async def test_operator_settles_when_the_client_does_not() -> None:
    """A client that does not settle does not keep the miner from being paid: the operator
    settles with the enclave's final receipt."""

    def configure(i: int, cfg: NodeConfig) -> NodeConfig:
        return cfg.with_(jobs=JobsConfig(grace=10.0, settle_timeout=1.0, settle_after=1.0))

    async with open_devnet(
        gatekeepers=1, miners=1, clients=1, seed=66, chain_params=FAST, configure=configure
    ) as net:
        client, miner, keeper = net.clients[0], net.miners[0], net.gatekeepers[0]
        await client.find_miners(wait=60)
        result = await client.run_job(
            wasm("uppercase.wat"), b"x" * 100, max_fuel=10**8, settle=False
        )
        assert result.settlement is None
        settled = await _wait_settled(keeper, result.agreement.id)
        assert settled.seq == result.receipt.receipt.seq  # the enclave's final receipt
        assert settled.fuel_used == result.receipt.fuel_used
        assert settled.paid == cost(result.receipt.fuel_used, result.agreement.terms.price)
        # the miner's own view of its transaction follows the gatekeeper's by a block
        await wait_until(
            lambda: (
                miner.metrics.snapshot()["counters"].get("jobs_settled_by_operator[ok=true]") == 1
            ),
            20,
            message="the operator's settlement counted",
        )


GIB = 1 << 30


@pytest.mark.parametrize(
    "size",
    [pytest.param(64 << 20, id="64MiB"), pytest.param(GIB, id="1GiB", marks=pytest.mark.slow)],
)
async def test_a_large_job_streams_through_with_bounded_memory(size: int) -> None:
    """1 GiB in and 1 GiB out through the enclave (64 MiB in make test): the client's and
    miner's process (one here) and the enclave's process stay far below the payload in
    memory."""
    psutil = pytest.importorskip("psutil")

    async with open_devnet(
        gatekeepers=1, miners=1, clients=1, seed=67, chain_params=FAST, configure=_fast_jobs
    ) as net:
        client, miner = net.clients[0], net.miners[0]
        await client.find_miners(wait=60)
        assert miner.tee is not None
        assert miner.tee.enclave is not None
        enclave_pid = miner.tee.enclave.pid  # type: ignore[attr-defined]
        here, enclave = psutil.Process(), psutil.Process(enclave_pid)
        base = (here.memory_info().rss, enclave.memory_info().rss)
        peak = list(base)
        piece = bytes(range(256)) * 4096  # 1 MiB, sent 1024 times
        received = 0
        digest_in, digest_out = hashlib.sha256(), hashlib.sha256()

        async def source():  # type: ignore[no-untyped-def]
            for _ in range(size // len(piece)):
                digest_in.update(piece)
                yield piece

        async def sink(data: bytes) -> None:
            nonlocal received
            received += len(data)
            digest_out.update(data)

        def sample(p: JobProgress) -> None:
            peak[0] = max(peak[0], here.memory_info().rss)
            peak[1] = max(peak[1], enclave.memory_info().rss)

        result = await client.run_job_stream(
            wasm("stream_echo.wat"),
            source(),
            input_size=size,
            on_output=sink,
            max_fuel=10**10,
            deadline=1800.0,
            progress=sample,
        )
        assert received == size
        assert digest_out.digest() == digest_in.digest()
        assert result.receipt.bytes_out == size
        growth = [peak[0] - base[0], peak[1] - base[1]]
        print(f"peak RSS growth: nodes {growth[0] >> 20} MiB, enclave {growth[1] >> 20} MiB")
        bound = min(size // 2, 256 << 20)  # well under the payload: 32 MiB, 256 MiB
        assert growth[0] < bound, growth
        assert growth[1] < bound, growth


async def test_an_enclave_that_signs_conflicting_receipts_is_slashed_everywhere() -> None:
    """Two receipts of one enclave for the same agreement and sequence are evidence: anyone
    submits it, and every node's chain slashes the operator and revokes the miner. (An
    honest enclave never equivocates, so this one's key is held by the test: a simulated
    enclave registered with a quote of the devnet's dev attestation root.)"""
    seed = 68
    async with open_devnet(gatekeepers=1, clients=2, seed=seed, chain_params=FAST) as net:
        reporter, rogue = net.clients
        chain = rogue.chain
        enclave, x25519 = Identity.generate(), bytes(range(32))
        assert (await rogue.wallet.stake(chain.params.min_miner_stake)).ok
        quote = sign_sim_quote(
            dev_root_identity(seed),
            compute_measurement(ExecutorLimits()),
            make_report_data(
                enclave.public_key,
                x25519,
                nonce=registration_nonce(chain.view.chain_id, rogue.account),
            ),
            int(time.time()),
        )
        registered = await chain.submit(MinerRegister("SIM", quote, "", enclave.public_key, x25519))
        assert registered.ok, registered.error
        receipt = JobReceipt(
            chain_id=chain.view.chain_id,
            agreement_id=bytes([7]) * 32,
            seq=3,
            fuel_used=100,
            bytes_in=1_000,
            bytes_out=10,
            output_hash=bytes(32),
            final=False,
            enclave=enclave.public_key,
        )
        one = receipt.sign(enclave)
        other = dataclasses.replace(receipt, fuel_used=90_000).sign(enclave)
        bonded = chain.state.stake(rogue.account)
        assert bonded > 0
        cut = bonded * chain.params.slash_fraction_ppm // PPM
        assert cut > 0

        evidence = SubmitReceiptEvidence(equivocation(one, other), rogue.account)
        # the reporter checks the evidence against its own head first: wait until it has
        # the block that registered the miner
        await reporter.chain.wait_for_height(registered.height or 0, timeout=20)
        reported = await reporter.chain.submit(evidence)
        assert reported.ok, reported.error

        def slashed_everywhere() -> bool:
            return all(
                n.chain.state.stake(rogue.account) == bonded - cut
                and get_miner(n.chain.view.state, rogue.account).status == MinerStatus.REVOKED
                for n in net.all_nodes
            )

        await wait_until(slashed_everywhere, 20, message="slashed on every node")
        # the same evidence again is refused
        again = await reporter.chain.submit(evidence)
        assert not again.ok
        assert again.error == "evidence_used"


async def _endless() -> AsyncIterator[bytes]:
    while True:
        yield bytes(64 << 10)


async def _cancelled_session_ends(miner: Node, slots: int) -> None:
    """The miner's enclave ended one session as cancelled by its client, and the slot the
    job held is free again."""

    def ended() -> bool:
        counters = miner.metrics.snapshot()["counters"]
        return counters.get("job_sessions_ended[reason=client_cancelled]") == 1

    await wait_until(ended, 10, message="the enclave ended the session")
    assert miner.market.book is not None
    assert miner.market.book.free_slots == slots


async def test_a_client_that_gives_up_cancels_the_session_and_frees_the_slot() -> None:
    async with open_devnet(
        gatekeepers=1, miners=1, clients=1, seed=69, chain_params=FAST, configure=_fast_jobs
    ) as net:
        client, miner = net.clients[0], net.miners[0]
        (advert,) = await client.find_miners(wait=60)
        slots = advert.free_slots
        streaming = trio.Event()

        source = _endless()

        async def sink(data: bytes) -> None:
            streaming.set()

        async with trio.open_nursery() as nursery:

            async def run() -> None:
                await client.run_job_stream(
                    wasm("stream_echo.wat"),
                    source,
                    input_size=1 << 30,
                    on_output=sink,
                    max_fuel=10**10,
                )

            nursery.start_soon(run)
            await streaming.wait()
            assert miner.market.book is not None
            assert miner.market.book.free_slots == slots - 1
            nursery.cancel_scope.cancel()
        await source.aclose()
        await _cancelled_session_ends(miner, slots)


async def test_output_as_an_async_iterable_reads_in_order_and_leaving_early_cancels() -> None:
    """open_job_stream: the output is iterated in order and the result comes after it; a
    reader that leaves before the end cancels the job (the enclave ends the session, the
    slot comes back); a failed job's error is raised when the block is left."""
    async with open_devnet(
        gatekeepers=1, miners=1, clients=1, seed=70, chain_params=FAST, configure=_fast_jobs
    ) as net:
        client, miner = net.clients[0], net.miners[0]
        (advert,) = await client.find_miners(wait=60)
        slots = advert.free_slots
        data = bytes(range(256)) * 16_384  # 4 MiB
        pieces = [data[i : i + 65_536] for i in range(0, len(data), 65_536)]

        async def source():  # type: ignore[no-untyped-def]
            for piece in pieces:
                yield piece

        got = bytearray()
        reads = 0
        async with client.open_job_stream(
            wasm("stream_echo.wat"), source(), input_size=len(data), max_fuel=10**9, buffer=2
        ) as job:
            with pytest.raises(UsageError):
                job.result  # noqa: B018 (not done yet)
            async for piece in job:
                got += piece
                reads += 1
        assert bytes(got) == data
        assert reads > 1  # streamed, not one piece at the end
        result = job.result
        result.receipt.verify()
        assert result.receipt.bytes_out == len(data)
        assert result.settlement is not None
        assert result.settlement.ok

        endless_source = _endless()
        async with client.open_job_stream(
            wasm("stream_echo.wat"), endless_source, input_size=1 << 30, max_fuel=10**10
        ) as job:
            async for _piece in job:
                assert miner.market.book is not None
                assert miner.market.book.free_slots == slots - 1
                break
        await endless_source.aclose()
        with pytest.raises(UsageError):
            job.result  # noqa: B018 (cancelled: no result)
        await _cancelled_session_ends(miner, slots)

        with pytest.raises(JobExecutionFailed) as caught:
            async with client.open_job_stream(
                wasm("trap.wat"), b"", input_size=0, max_fuel=10**7
            ) as job:
                async for _piece in job:
                    pass
        assert caught.value.kind is Trap
