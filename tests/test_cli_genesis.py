"""`phala-p2p genesis new`, `node --genesis` block events, bootstrap/devnet.toml, and the
example launcher with a chain."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from phala_p2p import cli
from phala_p2p.chain.params import Genesis
from phala_p2p.config import NodeConfig, Role
from phala_p2p.crypto.keyfile import KEY_FILE_NAME, read_identity
from phala_p2p.testing import derive_identity, wait_until

ROOT = Path(__file__).resolve().parent.parent
DEVNET = ROOT / "bootstrap" / "devnet.toml"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def key_of(directory: Path) -> bytes:
    return read_identity(directory / KEY_FILE_NAME).public_key


def test_genesis_new_writes_a_loadable_genesis_keys_and_configs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "chain"
    code, stdout, err = run(
        capsys, "--json", "genesis", "new", "--out", str(out), "--gatekeepers", "3",
        "--accounts", "2", "--balance", "500", "--stake", "2000",
    )  # fmt: skip
    assert (code, err) == (0, "")
    report = json.loads(stdout)
    genesis = Genesis.from_toml(out / "genesis.toml")
    assert report["chain_id"] == genesis.chain_id
    assert report["genesis_hash"] == genesis.genesis_hash.hex()
    keepers = [key_of(out / f"gatekeeper-{i}") for i in (1, 2, 3)]
    accounts = [key_of(out / f"account-{j}") for j in (1, 2)]
    assert genesis.gatekeepers == tuple((k, 2000) for k in keepers)
    assert genesis.accounts == tuple((k, 500) for k in keepers + accounts)
    assert [m["public_key"] for m in report["gatekeepers"]] == [k.hex() for k in keepers]
    assert [m["public_key"] for m in report["accounts"]] == [k.hex() for k in accounts]
    assert len(set(keepers + accounts)) == 5
    for i in (1, 2, 3):
        mode = stat.S_IMODE((out / f"gatekeeper-{i}" / KEY_FILE_NAME).stat().st_mode)
        assert mode == 0o600
        cfg = NodeConfig.from_toml(out / f"gatekeeper-{i}.toml")
        assert cfg.role is Role.GATEKEEPER
        assert cfg.data_dir == out / f"gatekeeper-{i}"
        assert cfg.genesis == out / "genesis.toml"
        assert Genesis.from_toml(cfg.genesis) == genesis
    assert not (out / "account-1.toml").exists()


def test_genesis_new_text_summary_and_params(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "chain"
    code, stdout, _ = run(
        capsys, "genesis", "new", "--out", str(out), "--gatekeepers", "1", "--chain-id", "mine",
        "--param", "block_time_ms=250", "--param", "tx_fee = 3",
    )  # fmt: skip
    assert code == 0
    genesis = Genesis.from_toml(out / "genesis.toml")
    assert genesis.chain_id == "mine"
    assert (genesis.params.block_time_ms, genesis.params.tx_fee) == (250, 3)
    assert "chain mine" in stdout
    assert "gatekeeper-1" in stdout
    assert f"--config {out / 'gatekeeper-1.toml'}" in stdout


def test_seed_makes_genesis_and_keys_reproducible(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--gatekeepers", "2", "--accounts", "1", "--seed", "s1", "--genesis-time", "1700000000"]
    for name in ("a", "b"):
        assert run(capsys, "genesis", "new", "--out", str(tmp_path / name), *args)[0] == 0
    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / "genesis.toml").read_bytes() == (b / "genesis.toml").read_bytes()
    for sub in ("gatekeeper-1", "gatekeeper-2", "account-1"):
        assert (a / sub / KEY_FILE_NAME).read_bytes() == (b / sub / KEY_FILE_NAME).read_bytes()
    # The keys are phala_p2p.testing's: node i of a devnet made with the same seed.
    assert key_of(a / "gatekeeper-1") == derive_identity(b"s1", 1).public_key
    assert key_of(a / "gatekeeper-2") == derive_identity(b"s1", 2).public_key
    assert key_of(a / "account-1") == derive_identity(b"s1", 3).public_key
    # Another seed, other keys; no seed, fresh keys each time.
    assert run(capsys, "genesis", "new", "--out", str(tmp_path / "c"), "--seed", "s2")[0] == 0
    assert key_of(tmp_path / "c" / "gatekeeper-1") != key_of(a / "gatekeeper-1")
    for name in ("d", "e"):
        assert run(capsys, "genesis", "new", "--out", str(tmp_path / name))[0] == 0
    assert key_of(tmp_path / "d" / "gatekeeper-1") != key_of(tmp_path / "e" / "gatekeeper-1")


def test_refuses_to_replace_a_genesis_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "chain"
    assert run(capsys, "genesis", "new", "--out", str(out), "--gatekeepers", "2")[0] == 0
    before = (out / "genesis.toml").read_bytes()
    key = key_of(out / "gatekeeper-1")

    code, stdout, err = run(capsys, "genesis", "new", "--out", str(out), "--gatekeepers", "2")
    assert code == 2
    assert stdout == ""
    assert err.count("\n") == 1
    assert err.startswith("phala-p2p: error: ")
    assert "--force" in err
    assert (out / "genesis.toml").read_bytes() == before

    # --force replaces the genesis; a key file that exists is kept, never overwritten.
    code, _, _ = run(capsys, "genesis", "new", "--out", str(out), "--gatekeepers", "3", "--force")
    assert code == 0
    genesis = Genesis.from_toml(out / "genesis.toml")
    assert len(genesis.gatekeepers) == 3
    assert genesis.gatekeepers[0][0] == key_of(out / "gatekeeper-1") == key

    # ...so a seed that gives another key is refused before anything is written.
    before = (out / "genesis.toml").read_bytes()
    code, _, err = run(capsys, "genesis", "new", "--out", str(out), "--seed", "x", "--force")
    assert code == 2
    assert err.count("\n") == 1
    assert "another key" in err
    assert (out / "genesis.toml").read_bytes() == before


@pytest.mark.parametrize(
    ("param", "says"),
    [
        ("nosuch=1", "unknown chain parameter 'nosuch'"),
        ("block_time_ms=fast", "not an integer"),
        ("block_time_ms", "expects name=value"),
        ("=5", "expects name=value"),
        ("min_stake=-1", "min_stake must be >= 0"),
        ("min_stake=1000000", "stake below min_stake"),
    ],
)
def test_bad_param_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], param: str, says: str
) -> None:
    out = tmp_path / "chain"
    code, stdout, err = run(capsys, "genesis", "new", "--out", str(out), "--param", param)
    assert code == 2
    assert stdout == ""
    assert err.count("\n") == 1
    assert err.startswith("phala-p2p: error: ")
    assert says in err
    assert not out.exists()  # checked before anything is written


@pytest.mark.parametrize(
    "argv",
    [
        ["--gatekeepers", "0"],
        ["--accounts", "-1"],
        ["--seed", ""],
        ["--chain-id", "x" * 65],
        ["--balance", "-5"],
    ],
)
def test_bad_options_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, _, err = run(capsys, "genesis", "new", "--out", str(tmp_path / "chain"), *argv)
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith("phala-p2p: error: ")


def test_devnet_toml_is_the_seeded_public_devnet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = DEVNET.read_text()
    assert text.startswith("#")
    assert "PUBLIC KNOWLEDGE" in text.split("\n\n")[0]
    genesis = Genesis.from_toml(DEVNET)
    assert genesis.chain_id == "phala-devnet"
    keepers = tuple(derive_identity(b"devnet", i).public_key for i in range(1, 5))
    extra = tuple(derive_identity(b"devnet", i).public_key for i in range(5, 9))
    assert tuple(k for k, _ in genesis.gatekeepers) == keepers
    assert tuple(k for k, _ in genesis.accounts) == keepers + extra
    # The command quoted in its header writes the same keys and the same genesis (but for
    # the chain parameters, which are the defaults of the version that wrote it).
    command = text.split("#   phala-p2p ", 1)[1].split("--out", 1)[0].replace("\\\n#", "")
    out = tmp_path / "devnet"
    code, _, _ = run(capsys, *command.split(), "--out", str(out))
    assert code == 0
    again = Genesis.from_toml(out / "genesis.toml")
    assert again.chain_id == genesis.chain_id
    assert again.genesis_time == genesis.genesis_time
    assert (again.gatekeepers, again.accounts) == (genesis.gatekeepers, genesis.accounts)
    assert key_of(out / "gatekeeper-1") == keepers[0]
    readme = " ".join((ROOT / "bootstrap" / "README.md").read_text().split())
    assert "devnet.toml" in readme
    assert "public knowledge" in readme
    assert f"--genesis-time {genesis.genesis_time}" in readme


async def test_output_queue_is_bounded_and_counts_drops() -> None:
    out = cli._Output(as_json=True, capacity=2)
    for height in range(5):
        out.emit({"event": "block", "height": height}, "")
    assert out.dropped == 3


async def test_output_writes_every_queued_line_in_order(capsys: pytest.CaptureFixture[str]) -> None:
    out = cli._Output(as_json=True, capacity=600)
    for height in range(500):  # more than one batch
        out.emit({"event": "block", "height": height}, "")
    text = ""

    def written() -> int:
        nonlocal text
        text += capsys.readouterr().out
        return text.count("\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(out.run)
        await wait_until(lambda: written() >= 500, 10, message="500 lines written")
        nursery.cancel_scope.cancel()
    assert [json.loads(line)["height"] for line in text.splitlines()] == list(range(500))
    assert out.dropped == 0


async def read_events(proc: trio.Process, until: int) -> list[dict[str, object]]:
    """JSON lines from ``proc`` up to the first block event at height ``until``."""
    assert proc.stdout is not None
    events: list[dict[str, object]] = []
    buf = b""
    async for chunk in proc.stdout:
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            events.append(json.loads(line))
            if events[-1].get("event") == "block" and events[-1]["height"] == until:
                return events
    raise AssertionError(f"node exited before height {until}: {events}")


async def test_node_with_genesis_prints_a_line_per_finalized_block(tmp_path: Path) -> None:
    out = tmp_path / "chain"
    argv = ["genesis", "new", "--out", str(out), "--gatekeepers", "1"]
    assert cli.main([*argv, "--param", "block_time_ms=200"]) == 0
    cmd = [sys.executable, "-m", "phala_p2p.cli", "--json", "node"]
    proc = await trio.lowlevel.open_process(
        [*cmd, "--config", str(out / "gatekeeper-1.toml"), "--genesis", str(out / "genesis.toml")],
        stdout=subprocess.PIPE,
    )
    try:
        with trio.fail_after(30):
            events = await read_events(proc, until=3)
    finally:
        proc.terminate()
        with trio.move_on_after(5):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    ready = events[0]
    genesis = Genesis.from_toml(out / "genesis.toml")
    assert ready["event"] == "ready"
    assert ready["chain_id"] == genesis.chain_id
    assert ready["account"] == genesis.gatekeepers[0][0].hex()
    # The first block line is the head when the node started (block 1 may be finalized
    # while it starts), then one line per finalized block.
    blocks = [e for e in events if e["event"] == "block"]
    heights = [b["height"] for b in blocks]
    assert heights == list(range(int(str(heights[0])), 4))
    assert heights[0] in (1, 2, 3)
    assert all(isinstance(b["hash"], str) and len(b["hash"]) == 64 for b in blocks)


def launch(*argv: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "launch.py"), *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )


def test_launcher_demo_with_a_chain(tmp_path: Path) -> None:
    started = time.monotonic()
    done = launch("--gatekeepers", "2", "--peers", "1", "--demo", "--timeout", "40", timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every node at finalized height >= 3" in done.stdout
    assert "finalized height" in done.stdout
    assert "peer-1       heard 2: gatekeeper-1, gatekeeper-2" in done.stdout
    assert "stopped 4 processes" in done.stdout
    assert time.monotonic() - started < 45


def test_launcher_demo_fails_clearly_when_a_node_dies(tmp_path: Path) -> None:
    assert cli.main(["genesis", "new", "--out", str(tmp_path), "--gatekeepers", "1"]) == 0
    genesis = tmp_path / "genesis.toml"
    genesis.write_text(genesis.read_text().replace("block_time_ms = 1000", 'block_time_ms = "x"'))
    done = launch("--gatekeepers", "1", "--demo", "--dir", str(tmp_path), timeout=60)
    assert done.returncode == 1
    assert "devnet failed" in done.stdout
    assert "bootstrap exited with status 2" in done.stdout
    assert "block_time_ms must be an int" in done.stdout
