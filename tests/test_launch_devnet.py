"""The example launcher as a devnet (examples/launch.py, run by path: never `import examples`):
real processes on 127.0.0.1. The demo runs a confidential job and names each step with real
figures; a signal stops every process the launcher started (and what those started); a
failure names what is missing."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from phala_p2p.chain.settlement import cost
from phala_p2p.netns import netns_problem
from phala_p2p.testing import wait_until

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = [sys.executable, str(ROOT / "examples" / "launch.py")]
JOBS = ROOT / "examples" / "jobs"
DEMO_MAX_FUEL = 10_000_000  # what the launcher's demo job escrows for


def launch(*argv: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LAUNCHER, *argv], capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT
    )


def sessions_alive(sessions: set[int]) -> list[int]:
    """PIDs of live processes whose session is one of ``sessions`` (each node leads its own
    session, which its children, such as a miner's enclave, share)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != b"Z" and int(fields[3]) in sessions:
            found.append(int(entry))
    return found


def exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def step(output: str, pattern: str) -> re.Match[str]:
    found = re.search(pattern, output, re.MULTILINE)
    assert found is not None, f"no line matching {pattern!r} in:\n{output}"
    return found


def test_demo_runs_a_confidential_job_and_names_each_step(tmp_path: Path) -> None:
    text = "launch test: 42 jobs"
    done = launch(
        "--gatekeepers", "1", "--miners", "1", "--clients", "1", "--demo", "--timeout", "100",
        "--dir", str(tmp_path), "--job-input", text, timeout=130,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "Traceback" not in out + done.stderr
    # the network came up: every process, a first block, the miner registered, the client synced
    step(out, r"^all 4 processes up after [\d.]+s")
    step(out, r"^first block finalized \(height \d+\) after [\d.]+s")
    step(out, r"^1 miners registered on chain and advertising \(seen by every client\)")
    step(out, r"^1 clients synced to the chain")
    # each step with its figures
    price = int(step(out, r"1 discover +client-1 holds 1 verified adverts \(miner-1 at (\d+)")[1])
    agreed = step(out, r"3 negotiate +agreement [0-9a-f]{16}\.\.\. at (\d+) per million fuel.*"
                  r"escrow (\d+) locked on chain")  # fmt: skip
    assert int(agreed[1]) == price
    assert int(agreed[2]) == cost(DEMO_MAX_FUEL, price)
    streamed = step(out, r"4 stream +encrypted both ways.*: (\d+) bytes in .*, (\d+) bytes out")
    assert int(streamed[1]) > len(text)  # the job header and the module count too
    assert int(streamed[2]) == len(text)
    step(out, r"5 result +'LAUNCH TEST: 42 JOBS'$")
    receipt = step(
        out,
        r"6 receipt +fuel used (\d+), bytes in (\d+), out (\d+); enclave signature verified.*"
        r"output hash [0-9a-f]{16}\.\.\. matches the output",
    )
    fuel = int(receipt[1])
    assert fuel > 0
    assert (int(receipt[2]), int(receipt[3])) == (int(streamed[1]), int(streamed[2]))
    settled = step(
        out,
        r"7 settlement +paid (\d+) to miner-1's operator .*refunded (\d+) to client-1, "
        r"final at height (\d+)",
    )
    paid, refunded = int(settled[1]), int(settled[2])
    assert paid == cost(fuel, price) > 0  # fuel x price, rounded up
    assert paid + refunded == cost(DEMO_MAX_FUEL, price)
    assert int(settled[3]) > 0
    step(out, r"^demo done after [\d.]+s: a confidential job ran end to end")
    step(out, r"^stopped 5 processes")  # four nodes and the job's client
    # the devnet folder (kept: --dir): genesis, keys, configs, logs, the job's output
    assert (tmp_path / "demo" / "output.txt").read_text() == text.upper()
    genesis = tomllib.loads((tmp_path / "genesis.toml").read_text())
    assert len(genesis["attestation_roots"]) == len(genesis["allowed_measurements"]) == 1
    assert len(genesis["accounts"]) == 3  # the gatekeeper, the miner, the client
    miner = tomllib.loads((tmp_path / "miner-1.toml").read_text())
    assert miner["node"]["role"] == "miner"
    assert miner["tee"]["register"] is True
    assert miner["market"]["price"] == price
    for name in ("bootstrap", "gatekeeper-1", "miner-1", "client-1"):
        assert (tmp_path / name / "identity.key").exists()
        assert (tmp_path / "logs" / f"{name}.log").exists()
    manifest = json.loads((tmp_path / "devnet.json").read_text())
    assert [n["name"] for n in manifest["nodes"]] == [
        "bootstrap", "gatekeeper-1", "miner-1", "client-1",
    ]  # fmt: skip
    assert not sessions_alive({n["pid"] for n in manifest["nodes"]})


async def read_until(proc: trio.Process, seen: list[str], marker: str, timeout: float) -> None:
    """Read the launcher's stdout into ``seen`` until a line holds ``marker``."""
    assert proc.stdout is not None
    buf = b""
    with trio.fail_after(timeout):
        async for chunk in proc.stdout:
            buf += chunk
            *lines, rest = buf.split(b"\n")
            buf = rest
            seen.extend(line.decode() for line in lines)
            if any(marker in line for line in seen):
                return
    raise AssertionError(f"the launcher ended before {marker!r}:\n" + "\n".join(seen))


async def read_rest(proc: trio.Process, seen: list[str]) -> None:
    assert proc.stdout is not None
    buf = b""
    async for chunk in proc.stdout:
        buf += chunk
    seen.extend(buf.decode().splitlines())


async def start_launcher(*argv: str) -> trio.Process:
    return await trio.lowlevel.open_process([*LAUNCHER, *argv], stdout=subprocess.PIPE, cwd=ROOT)


@asynccontextmanager
async def stopping(proc: trio.Process) -> AsyncIterator[None]:
    """On the way out, however the test ends, the launcher stops its nodes (SIGINT), or is
    killed if it does not within 30 s; its pipe is closed."""
    try:
        yield
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.send_signal(signal.SIGINT)
                with trio.move_on_after(30):
                    await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            assert proc.stdout is not None
            await proc.stdout.aclose()


def node_pids(folder: Path) -> list[int]:
    """The PIDs of the processes the launcher has started (it rewrites devnet.json in one
    step after each)."""
    path = folder / "devnet.json"
    if not path.exists():
        return []
    manifest = json.loads(path.read_text())
    return [int(n["pid"]) for n in manifest["nodes"]]


async def test_sigint_stops_every_process_of_a_running_devnet(tmp_path: Path) -> None:
    proc = await start_launcher(
        "--gatekeepers", "1", "--miners", "1", "--clients", "1", "--dir", str(tmp_path)
    )
    seen: list[str] = []
    async with stopping(proc):
        await read_until(proc, seen, "network running", 100)
        pids = node_pids(tmp_path)
        assert len(pids) == 4
        assert all(map(exists, pids))
        # the miner's enclave runs in the miner's session: it must go too
        assert len(sessions_alive(set(pids))) > len(pids)
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(30):
            await read_rest(proc, seen)
            await proc.wait()
    out = "\n".join(seen)
    assert proc.returncode == 128 + signal.SIGINT, out
    assert "interrupted" in out
    assert "stopped 4 processes" in out
    assert "killed" not in out  # every node stopped on SIGTERM, in time
    assert not any(map(exists, pids))
    assert not sessions_alive(set(pids))


async def test_sigterm_during_start_stops_the_nodes_already_started(tmp_path: Path) -> None:
    proc = await start_launcher(
        "--gatekeepers", "2", "--miners", "1", "--clients", "1", "--dir", str(tmp_path)
    )
    seen: list[str] = []
    async with stopping(proc):
        await read_until(proc, seen, "bootstrap node up", 60)
        await wait_until(lambda: len(node_pids(tmp_path)) == 5, 10, message="5 started")
        pids = node_pids(tmp_path)
        proc.send_signal(signal.SIGTERM)  # the nodes are still starting
        with trio.fail_after(30):
            await read_rest(proc, seen)
            await proc.wait()
    out = "\n".join(seen)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "stopped by SIGTERM" in out
    assert "stopped 5 processes" in out
    assert not sessions_alive(set(pids))


def test_demo_that_times_out_names_what_is_missing(tmp_path: Path) -> None:
    done = launch(
        "--gatekeepers", "1", "--miners", "1", "--clients", "1", "--demo", "--timeout", "1",
        "--dir", str(tmp_path), timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    line = step(done.stdout, r"^devnet not working within 1s: (.*)$")[1]
    # One second is too short for a working devnet (three were not always: on a fast
    # moment the devnet worked after 3.0 s and the deadline found the demo's job instead):
    # what is missing is named, at whichever stage the deadline found it.
    stages = ("not started", "never reported ready", "below height", "not advertising")
    assert any(what in line for what in stages), line
    assert "miner-1" in line
    assert f"logs in {tmp_path / 'logs'}" in done.stdout
    assert not sessions_alive(set(node_pids(tmp_path)))


def test_demo_job_failure_exits_1_with_the_jobs_error(tmp_path: Path) -> None:
    done = launch(
        "--gatekeepers", "1", "--miners", "1", "--clients", "1", "--demo", "--timeout", "100",
        "--dir", str(tmp_path), "--job", str(JOBS / "trap.wat"), "--job-input", "",
        timeout=130,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    step(out, r"^devnet working after")
    failed = step(out, r"^demo failed after [\d.]+s: the job failed \(phala-p2p job run exited "
                  r"with 1\): (.+)$")  # fmt: skip
    assert "trap" in failed[1], failed[1]
    assert "Traceback" not in out + done.stderr


def test_a_reused_folder_must_fund_the_miners(tmp_path: Path) -> None:
    made = subprocess.run(
        [sys.executable, "-m", "phala_p2p.cli", "genesis", "new", "--out", str(tmp_path),
         "--gatekeepers", "1"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    done = launch("--gatekeepers", "1", "--miners", "1", "--dir", str(tmp_path), timeout=30)
    assert done.returncode == 1
    assert "funds no account for miner-1" in done.stderr
    assert "bootstrap node up" not in done.stdout  # nothing was started


def test_devnet_command_passes_its_flags_to_the_launcher() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "phala_p2p.cli", "devnet", "--", "--miners", "2", "--help"],
        capture_output=True, text=True, check=False, cwd=ROOT, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "--miners" in done.stdout
    assert "--clients" in done.stdout


def test_devnet_command_takes_flags_without_a_separator() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "phala_p2p.cli", "devnet", "--miners", "2", "--help"],
        capture_output=True, text=True, check=False, cwd=ROOT, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "--miners" in done.stdout


@pytest.mark.skipif(netns_problem() is not None, reason=f"--netns: {netns_problem()}")
def test_demo_with_each_node_in_its_own_network_namespace(tmp_path: Path) -> None:
    done = launch(
        "--gatekeepers", "1", "--miners", "1", "--clients", "1", "--demo", "--netns",
        "--timeout", "100", "--dir", str(tmp_path), timeout=130,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    step(out, r"^network namespaces: one per node, on a bridge \(10\.199\.0\.0/24\)")
    step(out, r"5 result +'HELLO, CONFIDENTIAL WORLD'$")
    # the nodes listened on the lab's addresses, not on loopback
    manifest = json.loads((tmp_path / "devnet.json").read_text())
    assert manifest  # the launcher reported its processes
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "logs").glob("*.log"))
    assert "/ip4/10.199.0." in out + logs
    assert not sessions_alive(set(node_pids(tmp_path)))
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert "ppn-" not in left.stdout  # every namespace was removed
