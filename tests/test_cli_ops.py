"""The operator commands (`chain status`, `stake`, `unstake`, `propose`, `vote`, `miners`):
real CLI processes start client nodes against a devnet that runs in the test's event loop
(real hosts on 127.0.0.1); the devnet's own chain view checks what they report and what they
did. Their mistakes are one line and exit status 2 before any node starts; what the chain
refuses is one line with its reason and exit status 1."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from net.test_chain import FAST  # tests/net is a package on pytest's path

from phala_p2p import cli, cli_chain
from phala_p2p.config import NodeConfig, Role
from phala_p2p.crypto.keyfile import KEY_FILE_NAME, save_identity
from phala_p2p.genesis_dir import write_genesis_dir
from phala_p2p.testing import Devnet, derive_identity, devnet_genesis, open_devnet, wait_until

CLI = [sys.executable, "-m", "phala_p2p.cli"]
PARAMS = FAST | {"voting_period_blocks": 100}  # long enough for two CLI runs to vote in
PRICE, TAGS = 1234, ("cpu", "sgx")


@asynccontextmanager
async def devnet(tmp_path: Path, seed: int) -> AsyncIterator[tuple[Devnet, list[str], Path]]:
    """A chain with one gatekeeper and one advertised miner; connection options for the CLI
    that sign as the bootstrap node's account (funded, and spent by nobody else), and a
    client config that says the same. Neither names a data dir: processes that run at once
    get peer ids of their own."""
    root = tmp_path / "net"

    def configure(i: int, cfg: NodeConfig) -> NodeConfig:
        if cfg.role is not Role.MINER:
            return cfg
        return cfg.with_(market=replace(cfg.market, price=PRICE, tags=TAGS))

    async with open_devnet(
        gatekeepers=1, miners=1, clients=0, seed=seed, chain_params=PARAMS, data_root=root,
        configure=configure,
    ) as net:  # fmt: skip
        assert net.bootstrap is not None
        genesis, key = root / "genesis.toml", root / "node-0" / KEY_FILE_NAME
        addr = net.bootstrap.listen_addrs[0]
        conn = ["--genesis", str(genesis), "--bootstrap", addr, "--wallet-key", str(key)]
        config = tmp_path / "client.toml"
        config.write_text(
            f'[node]\nrole = "client"\ngenesis = "{genesis}"\nbootstrap = ["{addr}"]\n'
            f'wallet_key = "{key}"\n'
            # The devnet's nodes share one event loop (and the machine, the CLI processes):
            # their pings are slow, as open_devnet's own health settings allow for.
            "[health]\ninterval = 1.0\ndead_after = 15.0\n"
        )
        miner = net.miners[0]
        await wait_until(lambda: miner.market.advert is not None, 60, message="miner advert")
        yield net, conn, config


async def together(**calls: tuple[object, ...]) -> dict[str, subprocess.CompletedProcess[bytes]]:
    """Run CLI processes at once (a few: the devnet shares the machine with them)."""
    runs: dict[str, subprocess.CompletedProcess[bytes]] = {}

    async def call(name: str, argv: tuple[object, ...]) -> None:
        runs[name] = await phala(*map(str, argv))

    async with trio.open_nursery() as nursery:
        for name, argv in calls.items():
            nursery.start_soon(call, name, argv)
    return runs


async def phala(*argv: object) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [*CLI, *map(str, argv)], capture_stdout=True, capture_stderr=True, check=False
    )


def report(done: subprocess.CompletedProcess[bytes]) -> dict[str, object]:
    """The one JSON object a successful ``--json`` command prints."""
    assert done.returncode == 0, done.stderr.decode()
    assert b"Traceback" not in done.stderr
    out = done.stdout.decode()
    assert out.count("\n") == 1, out
    obj = json.loads(out)
    assert isinstance(obj, dict)
    return obj


def error_line(done: subprocess.CompletedProcess[bytes]) -> str:
    """The one line a failure ends with: ``--quiet`` leaves nothing else on stderr."""
    err = done.stderr.decode()
    assert err.count("\n") == 1, err
    assert err.startswith("phala-p2p: error: "), err
    return err


async def test_chain_status_and_the_miner_directory(tmp_path: Path) -> None:
    async with devnet(tmp_path, seed=81) as (net, conn, config):
        boot, keeper, miner = net.bootstrap, net.gatekeepers[0], net.miners[0]
        assert boot is not None
        chain = boot.chain
        start = chain.head.height
        cfg = ("--config", config)
        runs = await together(
            status=("chain", "status", "--json", *cfg),
            miners=("miners", "--json", "--tags", "cpu,sgx", *cfg),  # both are advertised
            too_cheap=("miners", "--max-price", PRICE - 1, "-q", *cfg),
        )
        runs |= await together(
            status_text=("chain", "status", *conn),  # the options instead of a config
            miners_text=("miners", "--max-price", PRICE, "--min-cores", 1, *cfg),
        )

        status = report(runs["status"])
        assert status["chain_id"] == chain.genesis.chain_id
        assert status["genesis_hash"] == chain.genesis.genesis_hash.hex()
        height = status["height"]
        assert isinstance(height, int)
        assert height >= start
        await chain.wait_for_height(height, timeout=20)
        assert status["head_hash"] == chain.block(height).hash.hex()  # the devnet's block
        assert isinstance(status["synced"], bool)  # (False if the devnet stalled a while)
        assert status["gatekeepers"] == [
            {
                "account": keeper.account.hex(),
                "peer_id": keeper.peer_id,  # a gatekeeper's account is its identity here
                "stake": chain.state.stake(keeper.account),
                "power": chain.state.stake(keeper.account),
            }
        ]
        balance = chain.state.balance(boot.account)
        assert status["account"] == {
            "account": boot.account.hex(),
            "balance": balance,
            "stake": 0,
            "unbonding": [],
        }
        text = runs["status_text"].stdout.decode()
        assert runs["status_text"].returncode == 0
        assert f"chain {chain.genesis.chain_id} at height " in text
        assert f"{keeper.peer_id}  stake {chain.state.stake(keeper.account)}" in text
        assert f"account {boot.account.hex()}: balance {balance}, stake 0" in text

        listed = report(runs["miners"])
        assert listed["known"] == 1
        rows = listed["miners"]
        assert isinstance(rows, list)
        assert [(m["peer_id"], m["price"], m["tags"]) for m in rows] == [
            (miner.peer_id, PRICE, list(TAGS))
        ]
        advert = boot.market.directory.by_peer(miner.peer_id)  # the devnet's view agrees
        assert advert is not None
        assert (rows[0]["cores"], rows[0]["free_slots"]) == (advert.cores, advert.free_slots)
        table = runs["miners_text"].stdout.decode().splitlines()
        assert runs["miners_text"].returncode == 0
        assert table[0] == "1 of 1 miner adverts, best first (price per million fuel):"
        assert table[1].split()[:3] == ["PEER", "ID", "PRICE"]
        assert table[2].split()[:2] == [miner.peer_id, str(PRICE)]
        assert runs["too_cheap"].returncode == 0
        assert runs["too_cheap"].stdout.decode() == "none of the 1 miner adverts matches\n"
        assert runs["too_cheap"].stderr == b""  # --quiet


async def test_stake_propose_vote_unstake_move_exactly_the_amounts(tmp_path: Path) -> None:
    async with devnet(tmp_path, seed=82) as (net, _conn, config):
        boot = net.bootstrap
        assert boot is not None
        chain, me = boot.chain, boot.account
        state, fee = chain.state, chain.params.tx_fee
        before = state.balance(me)
        with_dir = tmp_path / "with-dir.toml"  # one run keeps its chain in a data dir
        with_dir.write_text(config.read_text().replace("[node]\n", '[node]\ndata_dir = "c"\n'))

        done = await phala("stake", "5000", "--config", with_dir)
        assert done.returncode == 0, done.stderr.decode()
        line = done.stdout.decode().splitlines()[0]
        assert line.startswith("staked 5000 at height ")
        assert line.endswith(f" (fee {fee})")
        height = int(line.split()[4])
        await chain.wait_for_height(height, timeout=20)
        assert (state.balance(me), state.stake(me)) == (before - 5000 - fee, 5000)

        made = report(
            await phala(
                "propose", "param_change", "--param", "max_block_txs", "--value", 400,
                "--json", "--config", config,
            )
        )  # fmt: skip
        assert (made["ok"], made["kind"], made["param"], made["value"]) == (
            True, "param_change", "max_block_txs", 400,
        )  # fmt: skip
        pid = made["proposal_id"]
        assert isinstance(pid, int)
        assert isinstance(made["height"], int)
        await chain.wait_for_height(made["height"], timeout=20)
        record = state.proposal(pid)
        assert record is not None
        assert (record.proposer, record.status, record.end_height) == (
            me, "open", made["end_height"],
        )  # fmt: skip

        voted = report(await phala("vote", pid, "yes", "--json", "--config", config))
        assert (voted["ok"], voted["vote"], voted["yes"], voted["no"]) == (True, "yes", 5000, 0)
        assert isinstance(voted["height"], int)
        assert voted["height"] <= record.end_height  # in time

        # Unbonding does not change a cast vote's weight (its stake at the proposal).
        gone = report(await phala("unstake", "2000", "--json", "--config", config))
        assert isinstance(gone["height"], int)
        await chain.wait_for_height(gone["height"], timeout=20)
        release = gone["height"] + chain.params.unbonding_blocks
        assert gone["releases_at"] == release
        after = before - 5000 - 4 * fee  # stake, propose, vote, unstake: a fee each
        assert (state.balance(me), state.stake(me), state.unbonding(me)) == (
            after, 3000, [(release, 2000)],
        )  # fmt: skip
        assert (gone["balance"], gone["stake"]) == (after, 3000)
        assert gone["unbonding"] == [{"height": release, "amount": 2000}]

        # yes 5000 of 5000 cast: it passes (the gatekeeper's stake did not vote) and the
        # parameter changes on the devnet's chain.
        await chain.wait_for_height(record.end_height, timeout=60)
        passed = state.proposal(pid)
        assert passed is not None
        assert (passed.status, passed.yes, passed.no) == ("passed", 5000, 0)
        assert chain.params.max_block_txs == 400


async def test_refusals_and_an_unreachable_network_are_one_line_with_status_1(
    tmp_path: Path,
) -> None:
    async with devnet(tmp_path, seed=83) as (net, _conn, config):
        boot = net.bootstrap
        assert boot is not None
        state = boot.chain.state
        balance = state.balance(boot.account)
        dead = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
        cfg = ("--config", config)
        runs = await together(
            overspend=("stake", balance + 1, "--json", "-q", *cfg),
            unknown=("vote", "99", "no", "-q", *cfg),
            no_stake=("propose", "param_change", "--param", "tx_fee", "--value", 2, "-q", *cfg),
            unreachable=("chain", "status", "-q", "--wait", 2, *cfg, "--bootstrap", dead),
        )

        done = runs["overspend"]
        assert done.returncode == 1
        line = error_line(done)  # the chain's reason and its detail (the balance less the fee)
        assert line.startswith("phala-p2p: error: stake refused: insufficient_funds: balance ")
        assert line.endswith(f" < {balance + 1}\n")
        refused = json.loads(done.stdout)
        assert (refused["ok"], refused["error"]) == (False, "insufficient_funds")
        assert refused["balance"] == balance

        done = runs["unknown"]
        assert done.returncode == 1
        chain_id = boot.chain.genesis.chain_id
        assert error_line(done) == (
            f"phala-p2p: error: vote refused: no proposal 99 on chain {chain_id} "
            "(there are none yet)\n"
        )
        assert done.stdout == b""

        done = runs["no_stake"]
        assert done.returncode == 1
        assert "proposal refused: not_authorized: only stakers may propose" in error_line(done)

        done = runs["unreachable"]
        assert done.returncode == 1
        assert error_line(done) == (
            f"phala-p2p: error: no bootstrap peer answered within 2s ({dead})\n"
        )
        # nothing was spent
        assert (state.balance(boot.account), state.stake(boot.account)) == (balance, 0)
        assert state.proposals() == []


# -- mistakes, found before a node starts (in process: no network needed) ------------------


@pytest.fixture
def offline(tmp_path: Path) -> list[str]:
    """Connection options whose files all exist (the bootstrap peer does not)."""
    genesis = tmp_path / "genesis.toml"
    devnet_genesis(b"offline", gatekeepers=1, accounts=1).write_toml(genesis)
    save_identity(tmp_path / "wallet.key", derive_identity(b"offline", 0))
    peer = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
    return [
        "--genesis", str(genesis), "--wallet-key", str(tmp_path / "wallet.key"),
        "--bootstrap", f"/ip4/127.0.0.1/tcp/9/p2p/{peer}",
    ]  # fmt: skip


MISTAKES = [
    ("stake 0", "AMOUNT must be a positive integer, not '0'"),
    ("stake -5", "AMOUNT must be an integer in 0..2^63-1, not '-5'"),
    ("unstake 1.5", "AMOUNT must be an integer in 0..2^63-1, not '1.5'"),
    ("stake lots", "not 'lots'"),
    (f"stake {2**63}", "AMOUNT must be an integer in 0..2^63-1"),
    ("vote x yes", "PROPOSAL_ID must be an integer"),
    ("vote 1 maybe", "vote yes or no, not 'maybe'"),
    ("propose coup", "unknown proposal kind 'coup' (one of param_change, "),
    ("propose param_change --param tx_fee", "a param_change proposal needs --value"),
    ("propose param_change --param nope --value 1", "unknown chain parameter 'nope'"),
    ("propose param_change --param tx_fee --value 1 --amount 5", "--amount is not for a "),
    ("propose gatekeeper_add --account zz", "--account 'zz' is neither 64 hex digits"),
    ("propose measurement_allow --measurement xyz", "--measurement 'xyz' is not hex"),
    ("propose treasury_spend --account {acct} --amount 0", "--amount must be a positive"),
    ("miners --limit -1", "--limit must be >= 0"),
    ("stake 5 --wait 0", "--wait must be > 0 seconds"),
    ("stake 5 --genesis {dir}/none.toml", "none.toml"),
    ("stake 5 --wallet-key {dir}/none.key", "none.key does not exist"),
]


@pytest.mark.parametrize(("argv", "says"), MISTAKES, ids=[a for a, _ in MISTAKES])
def test_mistakes_are_one_line_and_exit_2(
    tmp_path: Path,
    offline: list[str],
    capsys: pytest.CaptureFixture[str],
    argv: str,
    says: str,
) -> None:
    acct = derive_identity(b"offline", 1).public_key.hex()
    args = argv.format(dir=tmp_path, acct=acct).split()
    code = cli.main([args[0], *offline, *args[1:]])  # the last of a repeated option wins
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err.count("\n") == 1, err
    assert err.startswith("phala-p2p: error: ")
    assert says in err


def test_a_gatekeepers_config_signs_as_its_account_from_a_client_of_its_own(
    tmp_path: Path,
) -> None:
    made = write_genesis_dir(tmp_path / "chain", gatekeepers=1, seed=b"ops")
    keeper = made.gatekeepers[0]
    assert keeper.config is not None
    peer = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
    args = cli._parser().parse_args(
        ["stake", "7", "--config", str(keeper.config),
         "--bootstrap", f"/ip4/127.0.0.1/tcp/9/p2p/{peer}"]
    )  # fmt: skip
    plan = cli_chain.plan(args)
    assert plan.config.role is Role.CLIENT  # never a second gatekeeper
    assert plan.config.data_dir is None  # a fresh peer id: the gatekeeper may be running
    assert plan.config.wallet_key == keeper.key_file
    assert plan.config.genesis == made.path
    assert plan.options["amount"] == 7


async def test_a_signal_stops_a_waiting_command_with_status_130(offline: list[str]) -> None:
    """SIGINT while the command waits for the network: one line, status 130."""
    proc = await trio.lowlevel.open_process(
        [*CLI, "chain", "status", "--wait", "60", *offline],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    seen = bytearray()
    try:
        with trio.fail_after(30):
            while b"connecting to the network" not in seen:
                chunk = await proc.stderr.receive_some(4096)
                assert chunk, seen.decode()
                seen += chunk
            proc.send_signal(signal.SIGINT)
            async for chunk in proc.stderr:
                seen += chunk
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 130, seen.decode()
    assert seen.decode().splitlines()[-1] == "phala-p2p: error: interrupted"
