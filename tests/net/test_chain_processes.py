"""Gatekeepers as separate OS processes, killed with SIGKILL at arbitrary moments.

An in-process follower joins the same network and checks the outcome on the chain itself:
the killed gatekeeper restarts from its SQLite store, catches up, takes part again, and was
never reported for double-signing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from phala_p2p.chain.bodies import SubmitEvidence
from phala_p2p.config import NodeConfig, Role
from phala_p2p.node import open_node
from phala_p2p.testing import wait_until
from phala_p2p.wire.codec import kind_of

FAST = [
    "block_time_ms=200",
    "timeout_propose_ms=1000",
    "timeout_prevote_ms=500",
    "timeout_precommit_ms=500",
]


class Proc:
    def __init__(self, name: str, config: Path, log: Path) -> None:
        self.name = name
        self.config = config
        self.log = log
        self.proc: trio.Process | None = None
        self.ready: dict[str, Any] = {}
        self.height = 0
        self.started = trio.Event()

    async def run(self, extra: list[str], task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        cmd = [
            sys.executable,
            "-m",
            "phala_p2p.cli",
            "--json",
            "node",
            "--config",
            str(self.config),
            *extra,
        ]
        self.started = trio.Event()
        with self.log.open("ab") as err:
            self.proc = await trio.lowlevel.open_process(
                cmd, stdout=subprocess.PIPE, stderr=err, start_new_session=True
            )
        task_status.started()
        try:
            await self._read(self.proc)
        finally:
            with trio.CancelScope(shield=True):
                self.kill()
                await self.proc.wait()
                if self.proc.stdout is not None:
                    await self.proc.stdout.aclose()

    async def _read(self, proc: trio.Process) -> None:
        assert proc.stdout is not None
        buf = b""
        async for chunk in proc.stdout:
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == "ready":
                    self.ready = event
                    self.started.set()
                elif event.get("event") == "block":
                    self.height = max(self.height, int(event["height"]))

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            os.kill(self.proc.pid, signal.SIGKILL)

    async def wait_dead(self) -> None:
        assert self.proc is not None
        await self.proc.wait()


async def test_gatekeeper_killed_at_any_moment_restarts_from_disk_without_double_signing(
    tmp_path: Path,
) -> None:
    out = tmp_path / "net"
    params = [arg for p in FAST for arg in ("--param", p)]
    await trio.run_process(
        [
            sys.executable,
            "-m",
            "phala_p2p.cli",
            "genesis",
            "new",
            "--out",
            str(out),
            "--gatekeepers",
            "4",
            "--seed",
            "kill-test",
            *params,
        ],
        capture_stdout=True,
        capture_stderr=True,
    )
    procs = [
        Proc(f"gk{i}", out / f"gatekeeper-{i}.toml", tmp_path / f"gk{i}.log") for i in range(1, 5)
    ]
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(procs[0].run, ["--listen", "/ip4/127.0.0.1/tcp/0"])
            with trio.fail_after(30):
                await procs[0].started.wait()
            boot = procs[0].ready["listen_addrs"][0]
            for p in procs[1:]:
                await nursery.start(p.run, ["--bootstrap", boot])
            cfg = NodeConfig(role=Role.CLIENT, genesis=out / "genesis.toml", bootstrap=(boot,))
            async with open_node(cfg) as watcher:
                await wait_until(lambda: watcher.chain.head.height >= 3, 90)
                victim = procs[2]
                keys = watcher.chain.state.gatekeepers()
                victim_key = bytes.fromhex(victim.ready["account"])
                assert victim_key in keys
                for delay in (0.05, 0.37):
                    # kill at some moment inside a height (block_time is 200 ms)
                    h = watcher.chain.head.height
                    await wait_until(lambda h=h: watcher.chain.head.height > h, 30)
                    await trio.sleep(delay)  # an arbitrary kill moment, not a wait
                    killed_at = victim.height
                    victim.kill()
                    await victim.wait_dead()
                    # the three others go on without it
                    h = watcher.chain.head.height
                    await wait_until(lambda h=h: watcher.chain.head.height >= h + 3, 60)
                    await nursery.start(victim.run, ["--bootstrap", boot])
                    with trio.fail_after(30):
                        await victim.started.wait()
                    # restarted from its store, not from genesis
                    assert victim.ready["height"] >= killed_at
                    h = watcher.chain.head.height
                    await wait_until(lambda h=h: victim.height >= h, 60)
                # the chain went on, the victim signs blocks again, and nobody ever
                # saw it sign two conflicting votes
                top = watcher.chain.head.height

                def signed_since_restart() -> bool:
                    for height in range(top + 1, watcher.chain.head.height + 1):
                        cb = watcher.chain.committed_block(height)
                        if cb and any(s.validator == victim_key for s in cb.commit.sigs):
                            return True
                    return False

                await wait_until(signed_since_restart, 60, message="victim in a commit")
                evidence = kind_of(SubmitEvidence)
                for height in range(1, watcher.chain.head.height + 1):
                    cb = watcher.chain.committed_block(height)
                    assert cb is not None
                    assert all(tx.kind != evidence for tx in cb.block.txs)
                assert watcher.chain.state.gatekeepers() == keys
            nursery.cancel_scope.cancel()
    finally:
        for p in procs:
            p.kill()
