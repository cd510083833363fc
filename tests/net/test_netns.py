"""Real partitions between network namespaces (phala_p2p.netns).

Every node is its own OS process in its own network namespace, linked by a veth pair to a
bridge in a switch namespace; the machine's own network is never touched. A partition is
made in the kernel (the switch stops forwarding between the groups, or a link goes down), so
nothing at the libp2p level knows about it: connections go silent, as in a real split.

Needs root and iproute2; every test is skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from phala_p2p.config import JobsConfig, NodeConfig, Role
from phala_p2p.errors import P2PError, UsageError
from phala_p2p.netns import Host, NetLab, NetnsError, netns_problem, open_netlab
from phala_p2p.procnet import NodeProcess, open_process_devnet
from phala_p2p.testing import wait_until

JOBS = Path(__file__).resolve().parents[2] / "examples" / "jobs"

# Echoes one line per connection; the client prints what it got, or the error's name.
SERVER = (
    "import socket, sys\n"
    "s = socket.create_server((sys.argv[1], 7000))\n"
    "print('up', flush=True)\n"
    "while True:\n"
    "    c, _ = s.accept()\n"
    "    c.sendall(b'hello')\n"
    "    c.close()\n"
)
CLIENT = (
    "import socket, sys\n"
    "try:\n"
    "    with socket.create_connection((sys.argv[1], 7000), timeout=float(sys.argv[2])) as s:\n"
    "        print(s.recv(16).decode())\n"
    "except OSError as err:\n"
    "    print(type(err).__name__)\n"
)


@pytest.fixture(scope="module")
def netns() -> None:
    problem = netns_problem()
    if problem is not None:
        pytest.skip(f"needs network namespaces: {problem}")


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split(" ", 1)[0] for line in out.stdout.splitlines()}


async def _serve(host: Host) -> trio.Process:
    """A TCP server in ``host``'s namespace; returns once it listens."""
    proc = await trio.lowlevel.open_process(
        host.command([sys.executable, "-c", SERVER, host.address]), stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    with trio.fail_after(20):
        assert (await proc.stdout.receive_some()).startswith(b"up")
    return proc


async def _reach(src: Host, dst: Host, timeout: float = 1.5) -> str:
    """What a TCP connect from ``src`` to ``dst``'s server gets: ``hello`` or an error name."""
    done = await trio.run_process(
        src.command([sys.executable, "-c", CLIENT, dst.address, str(timeout)]),
        capture_stdout=True,
    )
    return str(done.stdout.decode().strip())


async def _stop(proc: trio.Process) -> None:
    if proc.returncode is None:
        proc.kill()
    await proc.wait()
    if proc.stdout is not None:
        await proc.stdout.aclose()


# -- the helper --------------------------------------------------------------------------


async def test_lab_partitions_and_heals_and_leaves_nothing_behind(netns: None) -> None:
    before = _namespaces()
    async with open_netlab() as lab:
        a, b, c = [await lab.add_host(n) for n in ("a", "b", "c")]
        made = {lab.switch, a.netns, b.netns, c.netns}
        assert made <= _namespaces()
        assert len({a.address, b.address, c.address}) == 3
        assert a.address.startswith("10.199.0.")
        assert a.listen_addr() == f"/ip4/{a.address}/tcp/0"
        # nothing of the lab is in the namespace of this process
        mine = await trio.run_process(["ip", "-o", "addr"], capture_stdout=True)
        assert b"10.199.0." not in mine.stdout
        servers = [await _serve(h) for h in (a, b, c)]
        try:
            assert await _reach(a, b) == "hello"
            assert await _reach(c, a) == "hello"

            await lab.partition([a, b], [c])
            assert await _reach(a, b) == "hello"  # within a group: untouched
            assert await _reach(a, c) == "TimeoutError"  # across: silence, no reset
            assert await _reach(c, b) == "TimeoutError"

            await lab.partition([b], [c])  # a, in no group, goes with the first
            assert await _reach(a, b) == "hello"
            assert await _reach(a, c) == "TimeoutError"

            await lab.heal()
            assert await _reach(a, c) == "hello"
            assert await _reach(c, b) == "hello"

            await lab.link_down(b)
            assert await _reach(a, b) != "hello"
            assert await _reach(a, c) == "hello"
            await lab.link_up(b)
            assert await _reach(a, b) == "hello"

            await lab.link_down(a, c)
            await lab.heal()  # heal also brings links up
            assert await _reach(a, c) == "hello"
        finally:
            for proc in servers:
                await _stop(proc)
    assert _namespaces() == before  # each veth and bridge lived in one of them


async def test_lab_is_removed_on_error_with_the_processes_left_in_it(netns: None) -> None:
    before = _namespaces()
    leftover: trio.Process | None = None
    with pytest.raises(RuntimeError, match="boom"):
        async with open_netlab() as lab:
            host = await lab.add_host("x")
            leftover = await trio.lowlevel.open_process(
                host.command(["sh", "-c", "echo in; exec sleep 600"]),
                stdout=subprocess.PIPE,
                start_new_session=True,
            )
            assert leftover.stdout is not None
            with trio.fail_after(10):  # in the namespace now, not on its way there
                assert await leftover.stdout.receive_some() == b"in\n"
            raise RuntimeError("boom")
    assert leftover is not None
    try:
        with trio.fail_after(10):
            await leftover.wait()  # killed by the lab (it was in the lab's namespace)
        assert leftover.returncode == -signal.SIGKILL
        assert _namespaces() == before
    finally:
        await _stop(leftover)


async def test_lab_rejects_misuse(netns: None) -> None:
    async with open_netlab(subnet="10.199.0.0/29") as lab, open_netlab() as other:
        a = await lab.add_host("a")
        b = await other.add_host("b")
        with pytest.raises(UsageError, match="exists"):
            await lab.add_host("a")
        with pytest.raises(UsageError, match="not in this lab"):
            await lab.partition([a], [b])
        with pytest.raises(UsageError, match="two groups"):
            await lab.partition([a], [a])
        with pytest.raises(UsageError, match="at least two"):
            await lab.partition([a])
        for n in range(5):  # a /29 holds 6 hosts
            await lab.add_host(f"h{n}")
        with pytest.raises(UsageError, match="no free address"):
            await lab.add_host("one-too-many")
        with pytest.raises(UsageError, match="host name"):
            await other.add_host("bad name")
    with pytest.raises(UsageError, match="private"):
        async with open_netlab(subnet="8.8.8.0/24"):
            pass


async def test_packet_loss_drops_everything_or_says_netem_is_missing(netns: None) -> None:
    async with open_netlab() as lab:
        a, b = await lab.add_host("a"), await lab.add_host("b")
        server = await _serve(b)
        try:
            if await _has_netem(lab, a):
                await lab.set_loss(a, 100.0)
            else:
                with pytest.raises(NetnsError, match="netem"):
                    await lab.set_loss(a, 100.0)
                return
            assert await _reach(a, b) == "TimeoutError"
            await lab.heal()
            assert await _reach(a, b) == "hello"
        finally:
            await _stop(server)


async def _has_netem(lab: NetLab, host: Host) -> bool:
    """Whether this kernel has tc netem (the module sch_netem), asked with tc directly."""
    tc = [lab.tc_path or "tc", "-n", host.netns, "qdisc"]
    done = await trio.run_process(
        [*tc, "add", "dev", "lo", "root", "netem", "delay", "1ms"], capture_stderr=True, check=False
    )
    if done.returncode != 0:
        return False
    await trio.run_process([*tc, "del", "dev", "lo", "root"])
    return True


# -- gatekeepers, miners and clients in namespaces, cut by the kernel ------------------------

GATEKEEPERS = 4
MINERS = 2
CLIENTS = 2  # `phala-p2p job run` processes, in namespaces of their own
CHAIN = {
    "block_time_ms": 300,
    "timeout_propose_ms": 1_000,
    "timeout_prevote_ms": 500,
    "timeout_precommit_ms": 500,
}
PIECE = bytes(range(256)) * 256  # 64 KiB: inputs are made of these
PACE = 0.05  # seconds between pieces (a rate of ~1.3 MiB/s, not a wait)
ACROSS = 32  # pieces (2 MiB) written once the cut is made: in flight across it
MAX_INPUT = 256 << 20
# The client that resumes may stay cut off this long: longer than the partition can last
# (10 blocks, the other client's grace running out, with room for a slow machine).
LONG_GRACE = 300.0
SHORT_GRACE = 2.0
JOB_LOST = "was not reachable again within the grace period of 2.0s"


class JobRun:
    """A ``phala-p2p job run`` process whose input the test feeds through a pipe."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.argv = argv
        self.proc: trio.Process | None = None
        self.stderr: deque[str] = deque(maxlen=200)
        self.stdout = b""
        self.streaming = trio.Event()  # output came back: the session is established
        self.fed = 0  # pieces written to its input
        self.exited = trio.Event()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.proc = await trio.lowlevel.open_process(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_stderr)
                nursery.start_soon(self._read_stdout)
            await self.proc.wait()
        finally:
            with trio.CancelScope(shield=True):
                if self.proc.returncode is None:  # ours, by pid: it and its client node
                    os.killpg(self.proc.pid, signal.SIGKILL)
                await self.proc.wait()
                for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                    if stream is not None:
                        await stream.aclose()
            self.exited.set()

    async def _read_stderr(self) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        buf = b""
        async for chunk in self.proc.stderr:
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                self._line(raw.decode(errors="replace"))
        if buf:
            self._line(buf.decode(errors="replace"))

    def _line(self, line: str) -> None:
        self.stderr.append(line)
        if re.search(r"streaming, .*received (?!0 B)", line):
            self.streaming.set()

    async def _read_stdout(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        async for chunk in self.proc.stdout:
            self.stdout += chunk

    async def feed(self, cut: trio.Event, across: int | None) -> None:
        """Pieces at a steady pace until ``cut`` is set (progress lines come only while
        data moves), then ``across`` more at once and the end of the input (None: on at
        the same pace until the process stops reading)."""
        assert self.proc is not None
        stdin = self.proc.stdin
        assert stdin is not None
        try:
            while across is None or not cut.is_set():
                await stdin.send_all(PIECE)
                self.fed += 1
                await trio.sleep(PACE)
            for _ in range(across):
                await stdin.send_all(PIECE)
                self.fed += 1
            await stdin.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # it stopped reading: its exit status and stderr say why

    async def outcome(self, timeout: float) -> int:
        """Its exit status, once it exits; AssertionError with its stderr's tail if it
        does not within ``timeout`` seconds."""
        with trio.move_on_after(timeout):
            await self.exited.wait()
        assert self.proc is not None
        assert self.exited.is_set(), f"{self.name} still running after {timeout}s:\n{self.tail()}"
        assert self.proc.returncode is not None
        return self.proc.returncode

    def tail(self) -> str:
        return "\n".join(f"    | {line[:300]}" for line in list(self.stderr)[-12:])


def _lab_configure(hosts: list[Host]) -> Callable[[int, NodeConfig], NodeConfig]:
    def configure(i: int, cfg: NodeConfig) -> NodeConfig:
        cfg = cfg.with_(listen=(hosts[i].listen_addr(),))
        if cfg.role is Role.MINER:
            # Its enclave keeps a cut session for the miner's grace, not the client's: as
            # long as the client with the long grace. The operator settles late: the
            # client does it.
            cfg = cfg.with_(jobs=JobsConfig(grace=LONG_GRACE, settle_after=120.0))
        return cfg

    return configure


def _assert_no_fork(nodes: Sequence[NodeProcess]) -> int:
    """Every node reported the same hash at every height that two of them reported, and
    every height from its first report to its head; returns the lowest head."""
    seen: dict[int, tuple[str, str]] = {}
    for p in nodes:
        assert p.hashes, f"{p.name} reported no block"
        first = min(p.hashes)
        missing = [h for h in range(first, p.height + 1) if h not in p.hashes]
        assert not missing, f"{p.name} did not report heights {missing[:10]}"
        for height, block in p.hashes.items():
            other = seen.setdefault(height, (block, p.name))
            assert other[0] == block, f"fork at {height}: {p.name} {block} vs {other[1]} {other[0]}"
    return min(p.height for p in nodes)


async def _finalizes(nodes: Sequence[NodeProcess], height: int, timeout: float, what: str) -> None:
    """Wait until every node is at ``height``; AssertionError naming their heights and
    their gossip publish failures (a stalled chain's usual story) otherwise."""
    try:
        await wait_until(lambda: min(p.height for p in nodes) >= height, timeout)
    except TimeoutError as err:
        heights = {p.name: p.height for p in nodes}
        failures: dict[str, Any] = {}
        for p in nodes:
            try:
                counters = (await p.command("metrics", timeout=5))["counters"]
            except P2PError as why:
                failures[p.name] = str(why)
                continue
            failures[p.name] = {k: v for k, v in counters.items() if "publish_failed" in k}
        raise AssertionError(
            f"{what}: not at height {height} within {timeout}s: {heights}; "
            f"publish failures: {failures}"
        ) from err


@pytest.mark.slow
async def test_partition_in_the_kernel_majority_finalizes_minority_halts_jobs_resume(
    netns: None, tmp_path: Path
) -> None:
    """4 gatekeepers, 2 miners, a bootstrap node and 2 job clients, each a process in its
    own namespace. The switch splits off {gatekeeper-4, miner-6} while both clients stream
    a job to miner-6: the 3 other gatekeepers (> 2/3) keep finalizing, the minority halts,
    the client with a 2 s grace gets JobLost, and after the heal every node converges on
    one chain (no fork at any height) and the other client's job resumes and completes."""
    start = trio.current_time()
    roles = 1 + GATEKEEPERS + MINERS
    module = JOBS / "stream_echo.wat"
    async with open_netlab() as lab:
        hosts = [await lab.add_host(f"node-{i}") for i in range(roles + CLIENTS)]
        async with (
            open_process_devnet(
                gatekeepers=GATEKEEPERS,
                miners=MINERS,
                local_accounts=CLIENTS,
                seed=71,
                chain_params=CHAIN,
                configure=_lab_configure(hosts),
                command_prefix=lambda i, _cfg: hosts[i].exec_prefix,
                data_root=tmp_path / "net",  # the nodes' logs stay with the test's files
            ) as net,
            trio.open_nursery() as nursery,
        ):
            gks, miners = net.gatekeepers, net.miners
            nodes = [p for p in net.processes if p.role is not Role.CLIENT]
            assert all(p.listen_addrs[0].startswith("/ip4/10.199.0.") for p in net.processes)
            far_miner = miners[1]
            await wait_until(
                lambda: net.hold({m.peer_id: 0 for m in miners}) and gks[0].height >= 3,
                90,
                message="every directory holds both miners, the chain is moving",
            )

            # -- two clients stream a job to the miner that will be on the minority side
            cut = trio.Event()
            jobs: list[JobRun] = []
            for n, grace in enumerate((LONG_GRACE, SHORT_GRACE)):
                cfg = net.local_config(f"client-{n}").with_(jobs=JobsConfig(grace=grace))
                host = hosts[roles + n]  # the local accounts follow the processes
                assert cfg.listen == (host.listen_addr(),)
                cfg_path = tmp_path / f"client-{n}.toml"
                cfg.write_toml(cfg_path)
                argv = host.command([sys.executable, "-m", "phala_p2p.cli", "job", "run"])
                argv += [str(module), "--input", "-", "--input-size", str(MAX_INPUT), "--json"]
                argv += ["--output", str(tmp_path / f"out-{n}"), "--config", str(cfg_path)]
                argv += ["--miner", far_miner.peer_id, "--wait", "60"]
                job = JobRun(f"client-{n}", argv)
                await nursery.start(job.run)
                nursery.start_soon(job.feed, cut, ACROSS if n == 0 else None)
                jobs.append(job)
            resumer, loser = jobs
            with trio.move_on_after(90):
                for job in jobs:
                    await job.streaming.wait()
            for job in jobs:
                assert job.streaming.is_set(), f"{job.name} is not streaming:\n{job.tail()}"

            # -- the cut: {gatekeeper-4, miner-6} alone; the 3 other gatekeepers keep > 2/3
            minority = [gks[3], far_miner]
            minority_hosts = [hosts[int(p.name.rsplit("-", 1)[1])] for p in minority]
            majority_hosts = [h for h in hosts if h not in minority_hosts]
            cut_at = max(p.height for p in gks)
            await lab.partition(majority_hosts, minority_hosts)
            cut.set()
            cut_time = trio.current_time()

            await _finalizes(gks[:3], cut_at + 5, 60, "the majority after the cut")
            halted = [p.height for p in minority]
            assert max(halted) <= cut_at + 1, (cut_at, halted)  # a block in flight at most
            mid = max(p.height for p in gks[:3])
            await _finalizes(gks[:3], mid + 5, 60, "the majority, 5 blocks later")
            assert [p.height for p in minority] == halted, "the minority finalized alone"

            # -- the client with a 2 s grace gives up, with JobLost's message
            code = await loser.outcome(timeout=120)
            assert code == 1, loser.tail()
            assert any(JOB_LOST in line for line in loser.stderr), loser.tail()
            assert resumer.proc is not None
            assert resumer.proc.returncode is None, resumer.tail()

            # -- heal: every node converges on one chain, without help from the test
            healed_at = max(p.height for p in gks)
            await lab.heal()
            heal_time = trio.current_time()
            await _finalizes(nodes, healed_at + 3, 90, "every node after the heal")
            converged = trio.current_time() - heal_time
            net.check()

            # -- the job that was cut resumed and completed, on the whole input
            code = await resumer.outcome(timeout=120)
            assert code == 0, resumer.tail()
            summary = json.loads(resumer.stdout.decode().strip().splitlines()[-1])
            assert summary["ok"]
            assert summary["resumes"] >= 1, summary
            assert summary["miner"] == far_miner.peer_id
            assert resumer.fed > ACROSS
            assert summary["bytes_out"] == resumer.fed * len(PIECE)
            assert (tmp_path / "out-0").read_bytes() == PIECE * resumer.fed

            # -- no fork anywhere, at any height
            assert _assert_no_fork(nodes) >= healed_at + 3
            print(
                f"cut at height {cut_at} for {heal_time - cut_time:.1f}s, minority halted at "
                f"{halted}, healed at {healed_at}, all past it {converged:.1f}s later, "
                f"{trio.current_time() - start:.0f}s in all"
            )
            nursery.cancel_scope.cancel()
