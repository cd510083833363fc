"""`phala-p2p job run`: a real CLI process starts a client node, runs jobs on a devnet that
runs in the test's event loop (real hosts on 127.0.0.1), settles and stops; its mistakes and
failures are one line on stderr with exit status 2 (the user's) or 1 (the job's, the
network's). The progress display is tested on its own with literal times."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import pytest
import trio
import wasmtime
from net.test_chain import FAST  # tests/net is a package on pytest's path

from phala_p2p import cli
from phala_p2p.chain.settlement import cost
from phala_p2p.crypto.keyfile import KEY_FILE_NAME, save_identity
from phala_p2p.node import Node
from phala_p2p.progress import ProgressView, format_bytes
from phala_p2p.services.jobs import JobProgress
from phala_p2p.testing import Devnet, derive_identity, devnet_genesis, open_devnet, wait_until

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "examples" / "jobs"
CLI = [sys.executable, "-m", "phala_p2p.cli"]
PIECE = cli.PIECE


@asynccontextmanager
async def devnet(tmp_path: Path, seed: int) -> AsyncIterator[tuple[Devnet, Path]]:
    """A chain, a miner that has advertised, and a client config for the CLI that pays from
    the bootstrap node's account (funded, and spent by nobody else)."""
    root = tmp_path / "net"
    async with open_devnet(
        gatekeepers=1, miners=1, clients=0, seed=seed, chain_params=FAST, data_root=root
    ) as net:
        assert net.bootstrap is not None
        config = tmp_path / "client.toml"
        config.write_text(
            "[node]\n"
            'role = "client"\n'
            'data_dir = "client"\n'  # relative to the config file
            f'genesis = "{root / "genesis.toml"}"\n'
            f'bootstrap = ["{net.bootstrap.listen_addrs[0]}"]\n'
            f'wallet_key = "{root / "node-0" / KEY_FILE_NAME}"\n'
            "[jobs]\n"
            "settle_timeout = 20.0\n"
            "grace = 3.0\n"
        )
        miner = net.miners[0]
        await wait_until(lambda: miner.market.advert is not None, 60, message="miner advert")
        yield net, config


async def job_run(*argv: str | Path, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [*CLI, "job", "run", *map(str, argv)],
        stdin=stdin,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


def error_line(done: subprocess.CompletedProcess[bytes]) -> str:
    """The one line a failure ends with: ``--quiet`` leaves nothing else on stderr."""
    err = done.stderr.decode()
    assert err.count("\n") == 1, err
    assert err.startswith("phala-p2p: error: "), err
    return err


async def settled_on(node: Node, summary: dict[str, object]) -> tuple[int, int]:
    """(paid, fuel used) of the summary's agreement as ``node``'s own chain has it."""
    height = summary["settlement_height"]
    assert isinstance(height, int)
    await node.chain.wait_for_height(height, timeout=20)
    settled = node.chain.state.settlement(bytes.fromhex(str(summary["agreement_id"])))
    assert settled is not None
    assert settled.height == height
    return settled.paid, settled.fuel_used


async def test_runs_a_job_from_files_and_from_stdin_and_pays_exactly(tmp_path: Path) -> None:
    async with devnet(tmp_path, seed=71) as (net, config):
        boot, miner = net.bootstrap, net.miners[0]
        assert boot is not None
        state, fee = boot.chain.state, boot.chain.params.tx_fee
        before = state.balance(boot.account)

        # A .wat module on a text file, output to a file, the summary as JSON on stdout.
        text = b"hello, confidential world\n" * 4000
        (tmp_path / "in.txt").write_bytes(text)
        out = tmp_path / "out" / "upper.txt"
        out.parent.mkdir()
        done = await job_run(
            JOBS / "uppercase.wat", "--input", tmp_path / "in.txt", "--output", out,
            "--config", config, "--miner", miner.peer_id, "--max-fuel", 10**8, "--json",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()
        assert out.read_bytes() == text.upper()
        assert os.listdir(out.parent) == ["upper.txt"]  # no temporary file left behind
        assert b"Traceback" not in done.stderr
        summary = json.loads(done.stdout)
        assert summary["ok"] is True
        assert summary["miner"] == miner.peer_id
        assert 0 < summary["fuel_used"] <= summary["max_fuel"] == 10**8
        assert summary["bytes_out"] == len(text)
        assert summary["bytes_in"] > len(text)  # the module and the job header count too
        assert summary["output"] == str(out)
        assert summary["settled"] is True
        paid, fuel = await settled_on(boot, summary)
        assert (paid, fuel) == (summary["paid"], summary["fuel_used"])
        assert paid == cost(fuel, summary["price"]) > 0
        escrow = cost(10**8, summary["price"])
        assert summary["refunded"] == escrow - paid
        # the escrow's and the settlement's fees, and what the job cost: nothing else
        after = before - paid - 2 * fee
        await wait_until(lambda: state.balance(boot.account) == after, 10, message="balance")

        # A compiled .wasm, several MiB of binary input on stdin, the output on stdout, and
        # the human summary and progress lines on stderr.
        wasm = tmp_path / "echo.wasm"
        wasm.write_bytes(wasmtime.wat2wasm((JOBS / "stream_echo.wat").read_text()))
        payload = os.urandom(3 << 20) + bytes(range(256)) * 7
        done = await job_run(wasm, "--input", "-", "--config", config, stdin=payload)
        err = done.stderr.decode()
        assert done.returncode == 0, err
        assert done.stdout == payload
        assert "phala-p2p: streaming" in err  # plain progress lines: stderr is no TTY
        assert "job done in " in err
        assert f"on miner {miner.peer_id}" in err
        assert f"out {len(payload)} " in err
        assert "settled at height" in err
        assert "Traceback" not in err
        paid = int(err.split("  paid ", 1)[1].split(",")[0])
        height = int(err.rsplit("settled at height ", 1)[1].split()[0])
        await boot.chain.wait_for_height(height, timeout=20)
        assert state.balance(boot.account) == after - paid - 2 * fee


async def test_a_cut_connection_resumes_and_loses_no_input(tmp_path: Path) -> None:
    """The miner cuts the connection while the client waits for its (piped) input: the job
    resumes and runs on the whole input. (A read cancelled by the cut must not end the input:
    the job service would then finish the job on what it had, with matching receipts.)"""
    async with devnet(tmp_path, seed=73) as (net, config):
        miner = net.miners[0]
        piece = bytes(range(256)) * 256  # 64 KiB
        read_end, write_end = os.pipe()
        proc = await trio.lowlevel.open_process(
            [*CLI, "job", "run", str(JOBS / "stream_echo.wat"), "--input", "-",
             "--config", str(config)],
            stdin=read_end, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        os.close(read_end)
        assert proc.stdout is not None
        assert proc.stderr is not None
        stdout, stderr = bytearray(), bytearray()
        cut = trio.Event()
        async with trio.lowlevel.FdStream(write_end) as feed, trio.open_nursery() as nursery:

            async def produce() -> None:  # half the input; the rest once the cut is made
                for _ in range(32):
                    await feed.send_all(piece)
                await cut.wait()
                with suppress(trio.BrokenResourceError):  # (if the job ended early)
                    for _ in range(32):
                        await feed.send_all(piece)
                await feed.aclose()

            async def drain_stderr() -> None:
                assert proc.stderr is not None
                async for chunk in proc.stderr:
                    stderr.extend(chunk)

            nursery.start_soon(produce)
            nursery.start_soon(drain_stderr)
            with trio.fail_after(40):
                async for chunk in proc.stdout:
                    stdout.extend(chunk)
                    if len(stdout) >= (2 << 20) - PIECE and not cut.is_set():
                        ours = {n.peer_id for n in net.all_nodes}
                        for peer in miner.peers():
                            if peer not in ours:  # the CLI's client node
                                await miner.disconnect(peer)
                        cut.set()
                await proc.wait()
        err = stderr.decode()
        assert proc.returncode == 0, err
        assert cut.is_set()
        assert "  resumed 1 time" in err
        assert len(stdout) == 64 * len(piece)  # the whole input ran, not what came before
        assert bytes(stdout) == piece * 64


async def test_failures_are_one_line_with_status_1(tmp_path: Path) -> None:
    async with devnet(tmp_path, seed=72) as (net, config):
        boot = net.bootstrap
        assert boot is not None
        empty = tmp_path / "empty"
        empty.write_bytes(b"")
        out = tmp_path / "out.bin"

        # The job traps in the enclave: its fuel is settled all the same; no output file.
        done = await job_run(
            JOBS / "trap.wat", "--input", empty, "--output", out, "--config", config,
            "--json", "--quiet", "--max-fuel", 10**7,
        )  # fmt: skip
        assert done.returncode == 1
        line = error_line(done)
        assert line.startswith("phala-p2p: error: job failed: Trap: ")
        assert not out.exists()
        assert not [p for p in os.listdir(tmp_path) if p.endswith(".part")]
        summary = json.loads(done.stdout)
        assert (summary["ok"], summary["error"]) == (False, "Trap")
        assert summary["settled"] is True
        _, fuel = await settled_on(boot, summary)
        assert fuel == summary["fuel_used"]

        # No miner takes the job (nobody works for free) within --wait.
        done = await job_run(
            JOBS / "echo.wat", "--input", empty, "--config", config, "--quiet",
            "--max-price", 0, "--wait", 2,
        )  # fmt: skip
        assert done.returncode == 1
        assert "no miner with a free slot" in error_line(done)
        assert done.stdout == b""

        # Negotiation refused: the named miner will not work at the price offered.
        done = await job_run(
            JOBS / "echo.wat", "--input", empty, "--config", config, "--quiet",
            "--miner", net.miners[0].peer_id, "--max-price", 1,
        )  # fmt: skip
        assert done.returncode == 1
        line = error_line(done)
        assert f"no agreement with miner {net.miners[0].peer_id}: " in line
        assert "above max_price 1" in line

        # More fuel than the account could ever pay for: the user's mistake, found before
        # anything is spent.
        done = await job_run(
            JOBS / "echo.wat", "--input", empty, "--config", config, "--quiet",
            "--miner", net.miners[0].peer_id, "--max-fuel", 10**18,
        )  # fmt: skip
        assert done.returncode == 2
        assert f"account {boot.account.hex()[:16]}... holds " in error_line(done)

        # The miner dies while the job streams (stdin stays open): once the grace period
        # has passed the client gives up, with one line that names the miner.
        miner = net.miners[0]
        read_end, write_end = os.pipe()
        proc = await trio.lowlevel.open_process(
            [*CLI, "job", "run", str(JOBS / "stream_echo.wat"), "--input", "-",
             "--config", str(config), "--quiet"],
            stdin=read_end, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        os.close(read_end)
        assert proc.stdout is not None
        assert proc.stderr is not None
        stderr = bytearray()
        async with trio.lowlevel.FdStream(write_end) as feed, trio.open_nursery() as nursery:

            async def produce() -> None:  # a producer that never ends its input
                with suppress(trio.BrokenResourceError):
                    while True:
                        await feed.send_all(bytes(64 << 10))

            async def drain_stderr() -> None:
                assert proc.stderr is not None
                async for chunk in proc.stderr:
                    stderr.extend(chunk)

            nursery.start_soon(produce)
            nursery.start_soon(drain_stderr)
            with trio.fail_after(30):
                echoed = await proc.stdout.receive_some()  # the job is streaming
                assert echoed
                await net.stop(miner)
                async for _ in proc.stdout:
                    pass
                await proc.wait()
            nursery.cancel_scope.cancel()
        assert proc.returncode == 1
        line = stderr.decode()
        assert line.count("\n") == 1, line
        assert line.startswith(f"phala-p2p: error: {miner.peer_id} was not reachable again")
        assert "grace period" in line


# -- mistakes, found before a node starts (in process: no network needed) ------------------


@pytest.fixture
def offline_config(tmp_path: Path) -> Path:
    """A client config whose files all exist (its bootstrap peer does not)."""
    genesis = tmp_path / "genesis.toml"
    devnet_genesis(b"offline", gatekeepers=1, accounts=1).write_toml(genesis)
    save_identity(tmp_path / "wallet.key", derive_identity(b"offline", 0))
    peer = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
    config = tmp_path / "client.toml"
    config.write_text(
        f'[node]\ngenesis = "{genesis}"\nwallet_key = "{tmp_path / "wallet.key"}"\n'
        f'bootstrap = ["/ip4/127.0.0.1/tcp/9/p2p/{peer}"]\n'
    )
    (tmp_path / "in.txt").write_bytes(b"input")
    return config


MISTAKES = [
    # (argv, with {dir} the test's folder and {cfg} a client config; what the line says)
    ("echo.wat --input {dir}/nope --config {cfg}", "input file not found: "),
    ("echo.wat --input {dir} --config {cfg}", "is a directory"),
    ("{dir}/no.wat --input {dir}/in.txt --config {cfg}", "module not found: "),
    ("{dir}/bad.wat --input {dir}/in.txt --config {cfg}", "bad.wat:3:1: expected `)`"),
    ("{dir}/types.wat --input {dir}/in.txt --config {cfg}", "module does not compile"),
    ("{dir}/empty.wat --input {dir}/in.txt --config {cfg}", "must export a linear memory"),
    ("{dir}/x.wasm --input {dir}/in.txt --config {cfg}", "not a WebAssembly binary"),
    ("echo.wat --input {dir}/in.txt --config {cfg} --json", "give --output FILE"),
    ("echo.wat --input {dir}/in.txt --config {cfg} --output {dir}/d/o", "does not exist"),
    ("echo.wat --input {dir}/in.txt --config {cfg} --miner hello", "is not a peer id"),
    ("echo.wat --input {dir}/in.txt --config {cfg} --max-fuel 0", "--max-fuel must be"),
    ("echo.wat --input {dir}/in.txt --config {cfg} --input-size 9", "for pipes"),
    ("echo.wat --input {dir}/in.txt", "needs the chain"),
    ("echo.wat --input {dir}/in.txt --config {dir}/none.toml", "config file not found"),
]


@pytest.mark.parametrize(("argv", "says"), MISTAKES, ids=[says for _, says in MISTAKES])
def test_mistakes_are_one_line_and_exit_2(
    tmp_path: Path,
    offline_config: Path,
    capsys: pytest.CaptureFixture[str],
    argv: str,
    says: str,
) -> None:
    (tmp_path / "bad.wat").write_text('(module\n  (func (export "run") (i32.add)\n')
    (tmp_path / "types.wat").write_text("(module (func (result i32) (i64.const 1)))")
    (tmp_path / "empty.wat").write_text("(module)")
    (tmp_path / "x.wasm").write_bytes(b"\x7fELF")
    before = sorted(os.listdir(tmp_path))
    args = argv.format(dir=tmp_path, cfg=offline_config).split()
    if args[0] == "echo.wat":
        args[0] = str(JOBS / "echo.wat")
    code = cli.main(["job", "run", *args])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err.count("\n") == 1
    assert err.startswith("phala-p2p: error: ")
    assert says in err
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, not even a temp file


# -- the progress display ------------------------------------------------------------------


def test_progress_lines_are_throttled_and_name_phase_rate_and_percent() -> None:
    view = ProgressView(tty=False)
    total = 100 << 20
    assert view.update(JobProgress("negotiating", total=total), 0.0) == "phala-p2p: negotiating\n"
    first = view.update(JobProgress("streaming", 0, total), 0.5)
    assert first is not None
    assert first.startswith("phala-p2p: streaming,   0%")
    assert view.update(JobProgress("streaming", 10 << 20, total, 1 << 20), 1.5) is None
    line = view.update(JobProgress("streaming", 50 << 20, total, 40 << 20), 2.5)
    assert line == (
        "phala-p2p: streaming,  50%, sent 50.0 MiB of 100.0 MiB, 25.0 MiB/s, received 40.0 MiB\n"
    )
    assert view.update(JobProgress("settling", total, total, total), 2.6) is not None
    assert view.finish() == ""


def test_progress_bar_redraws_one_line_fits_the_terminal_and_ends_it() -> None:
    view = ProgressView(tty=True, width=100)
    text = view.update(JobProgress("streaming", 25, 100, 5, resumes=1), 0.0)
    assert text == "\r\x1b[Kstreaming [#####---------------]  25% 25 B/100 B out 5 B resumed 1x"
    assert view.update(JobProgress("streaming", 30, 100), 0.05) is None  # too soon to redraw
    assert view.finish() == "\n"
    assert view.finish() == ""
    narrow = ProgressView(tty=True, width=40)
    text = narrow.update(JobProgress("streaming", 25, 100, 5, resumes=1), 0.0)
    # cut one column short of the terminal's width
    assert text == "\r\x1b[K" + "streaming [#####---------------]  25% 25 B/100 B"[:39]


def test_progress_of_a_pipe_shows_no_percentage() -> None:
    view = ProgressView(tty=False, size_known=False)
    line = view.update(JobProgress("streaming", 3 << 20, 1 << 32), 0.0)
    assert line == "phala-p2p: streaming, sent 3.0 MiB, received 0 B\n"
    assert [format_bytes(n) for n in (0, 1023, 1024, 5 << 30)] == [
        "0 B", "1023 B", "1.0 KiB", "5.0 GiB",
    ]  # fmt: skip
