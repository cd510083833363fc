#!/usr/bin/env python3
"""Start a local phala_p2p network: a bootstrap node, gatekeepers and peers, one OS process each.

    python examples/launch.py --peers 4                 # runs until Ctrl-C
    python examples/launch.py --peers 4 --demo          # exits 0 once the network works
    python examples/launch.py --gatekeepers 0 --peers 4 # no chain: gossip only

The launcher writes a genesis with ``phala-p2p genesis new`` in its folder (4 gatekeepers by
default, each with its key folder and node config; one funded account per peer, used as that
peer's data dir), then starts the bootstrap node, the gatekeepers and the peers, all with
``--genesis``. Every node knows only the bootstrap node's address and finds the others
through it; gatekeepers and peers gossip a hello on ``phala/hello/1``. The launcher shows
progress while nodes start, hellos arrive and blocks are finalized, and prints who heard
whom. With ``--demo`` it exits 0 once every node has finalized a block at height 3 or more
(all with the same hashes) and every gatekeeper and peer heard every other, and 1 with a
message naming what is missing if that takes longer than ``--timeout`` (or a node dies).
Ctrl-C (or the end of --demo) stops every process it started, by PID.

With ``--dir`` the network's folder is kept; started again with the same ``--dir`` the
launcher reuses its genesis and keys, so the chain continues where it stopped.

This script uses only the ``phala-p2p`` command (run as ``python -m phala_p2p.cli``). It is
not an importable module: py-libp2p installs a package named ``examples`` of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

CLI = [sys.executable, "-m", "phala_p2p.cli", "--json"]
NODE_CMD = [*CLI, "node"]
LOCALHOST = "/ip4/127.0.0.1/tcp/0"
TARGET_HEIGHT = 3  # --demo waits for a finalized block at this height on every node


class Peer:
    def __init__(self, name: str, proc: trio.Process, log: Path, *, hello: bool) -> None:
        self.name = name
        self.proc = proc
        self.log = log
        self.hello = hello  # gossips hellos and must hear every other hello node
        self.ready: dict[str, Any] | None = None
        self.heard: set[str] = set()
        self.height = 0  # highest finalized block it reported
        self.start_height = 0  # its finalized height when it started
        self.ready_event = trio.Event()


def bar(done: int, total: int, width: int = 20) -> str:
    filled = width * min(done, total) // max(total, 1)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def progress(label: str, done: int, total: int) -> None:
    end = "\n" if done >= total or not sys.stdout.isatty() else ""
    print(f"\r{label:<22} {bar(done, total, 24)} {done}/{total}", end=end, flush=True)


def log_tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()[-lines:]
    except OSError:
        return ""
    return "".join(f"\n    | {line}" for line in text)


async def start_peer(name: str, args: list[str], base: Path, *, hello: bool = True) -> Peer:
    log = base / f"{name}.log"
    with log.open("wb") as stderr:  # the child keeps its own copy of the descriptor
        proc = await trio.lowlevel.open_process(
            [*NODE_CMD, "--name", name, *args, *(["--hello-every", "1"] if hello else [])],
            stdout=subprocess.PIPE,
            stderr=stderr,
            start_new_session=True,  # Ctrl-C reaches the launcher, which stops the nodes itself
        )
    return Peer(name, proc, log, hello=hello)


async def read_events(peer: Peer, on_event: Callable[[Peer, dict[str, Any]], None]) -> None:
    assert peer.proc.stdout is not None
    buf = b""
    async for chunk in peer.proc.stdout:
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            if event.get("event") == "ready":
                peer.ready = event
                peer.ready_event.set()
            on_event(peer, event)


async def stop_all(peers: list[Peer]) -> None:
    for p in peers:
        if p.proc.returncode is None:
            p.proc.send_signal(signal.SIGTERM)
    with trio.move_on_after(5):
        for p in peers:
            await p.proc.wait()
    for p in peers:
        if p.proc.returncode is None:
            p.proc.kill()
            await p.proc.wait()


def make_genesis(base: Path, gatekeepers: int, accounts: int) -> Path:
    """``base/genesis.toml``: reused if there (it must have ``gatekeepers``), else written by
    ``phala-p2p genesis new`` with gatekeeper keys and configs and ``accounts`` accounts."""
    genesis = base / "genesis.toml"
    if genesis.exists():
        with genesis.open("rb") as fh:
            have = len(tomllib.load(fh).get("gatekeepers", []))
        configs = all((base / f"gatekeeper-{i}.toml").exists() for i in range(1, have + 1))
        if have != gatekeepers or not configs:
            raise SystemExit(
                f"launch.py: {genesis} is for {have} gatekeepers (use --gatekeepers {have}) "
                "or its gatekeeper configs are missing; or choose another --dir"
            )
        print(f"reusing genesis {genesis}")
        return genesis
    cmd = [*CLI, "genesis", "new", "--out", str(base), "--gatekeepers", str(gatekeepers)]
    made = subprocess.run([*cmd, "--accounts", str(accounts)], capture_output=True, text=True)
    if made.returncode != 0:
        raise SystemExit(f"launch.py: phala-p2p genesis new failed: {made.stderr.strip()}")
    info = json.loads(made.stdout)
    print(f"genesis of chain {info['chain_id']}: {gatekeepers} gatekeepers, {accounts} accounts")
    return genesis


class Network:
    """The launched nodes and what they reported."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.nodes: list[Peer] = []
        self.hello_nodes: int = args.gatekeepers + args.peers
        self.hello_total = self.hello_nodes * (self.hello_nodes - 1)
        self.total_nodes: int = 1 + self.hello_nodes
        self.chain: bool = args.gatekeepers > 0
        self.hashes: dict[int, tuple[str, str]] = {}  # height -> (hash, first reporter)
        self.failure: str | None = None
        self.stopping = False
        self.goal = trio.Event()  # reached, or failed: see .failure
        self.failed = trio.Event()
        self._shown: tuple[int, int] | None = None
        self.reached = False

    # -- progress ---------------------------------------------------------------------------

    def heard_count(self) -> int:
        return sum(len(p.heard) for p in self.nodes if p.hello)

    @property
    def target(self) -> int:
        """The finalized height every node must report: 3, or with a reused folder one block
        beyond any node's height at start, so that the chain is seen to go on."""
        if not self.chain:
            return 0
        return max(TARGET_HEIGHT, 1 + max((p.start_height for p in self.nodes), default=0))

    def heights(self) -> list[int]:
        return [p.height for p in self.nodes]

    def all_started(self) -> bool:
        return len(self.nodes) == self.total_nodes

    def done(self) -> bool:
        if not self.all_started() or self.heard_count() < self.hello_total:
            return False
        return min(self.heights()) >= self.target

    def show(self) -> None:
        """One status line: on a terminal rewritten in place, else printed when it changes."""
        if not self.all_started():
            return
        heard, heights = self.heard_count(), self.heights()
        tty = sys.stdout.isatty()
        if self.reached:  # running on: a terminal shows the head, a log stays quiet
            if tty:
                print(f"\rrunning: finalized height {min(heights)}..{max(heights)}   ", end="")
            return
        line = f"hellos heard {bar(heard, self.hello_total)} {heard}/{self.hello_total}"
        if self.chain:
            low = min(heights)
            line += f"   finalized height {bar(low, self.target, 6)} {low}/{self.target}"
            line += f" (highest {max(heights)})"
        key = (heard * 4 // max(self.hello_total, 1), min(heights))
        if tty:
            print(f"\r{line}", end="", flush=True)
        elif key != self._shown:
            print(line, flush=True)
        self._shown = key

    # -- events -----------------------------------------------------------------------------

    def fail(self, message: str) -> None:
        if self.failure is None and not self.stopping:
            self.failure = message
            self.goal.set()
            self.failed.set()

    def on_event(self, peer: Peer, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "ready" and isinstance(event.get("height"), int):
            peer.start_height = event["height"]
        elif kind == "heard" and isinstance(event.get("from"), str):
            peer.heard.add(event["from"])
        elif kind == "block" and isinstance(event.get("height"), int):
            height, block_hash = event["height"], str(event.get("hash"))
            peer.height = max(peer.height, height)
            first = self.hashes.setdefault(height, (block_hash, peer.name))
            self.hashes.pop(height - 1000, None)  # bounded: forks are compared near the head
            if first[0] != block_hash:
                self.fail(
                    f"fork at height {height}: {first[1]} finalized {first[0][:16]}, "
                    f"{peer.name} finalized {block_hash[:16]}"
                )
        else:
            return
        self.show()
        self.check_goal()

    def check_goal(self) -> None:
        if not self.reached and self.done():
            self.reached = True
            self.goal.set()

    async def watch(self, peer: Peer) -> None:
        await read_events(peer, self.on_event)
        await peer.proc.wait()
        peer.ready_event.set()  # wakes a start-up waiting for it; peer.ready stays None
        self.fail(
            f"{peer.name} exited with status {peer.proc.returncode}; "
            f"its log ({peer.log}) ends:{log_tail(peer.log)}"
        )

    def shortfall(self) -> str:
        """What is missing, for the failure message."""
        missing = []
        if len(self.nodes) < self.total_nodes:
            missing.append(f"only {len(self.nodes)} of {self.total_nodes} nodes were started")
        started = [p for p in self.nodes if p.ready]
        if len(started) < len(self.nodes):
            missing.append(f"{len(self.nodes) - len(started)} nodes never reported ready")
        low = [f"{p.name} at {p.height}" for p in self.nodes if p.height < self.target]
        if low:
            missing.append(f"below height {self.target}: {', '.join(low)}")
        deaf = [p.name for p in self.nodes if p.hello and len(p.heard) < self.hello_nodes - 1]
        if deaf:
            missing.append(f"did not hear every hello: {', '.join(deaf)}")
        return "; ".join(missing) or "nothing (the goal was reached too late)"


async def stop_on_signal(
    scope: trio.CancelScope, caught: list[int], *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """Ctrl-C (SIGINT), SIGTERM or SIGHUP stop the network. The nodes run in their own
    sessions, so no signal reaches them but the launcher's, which then stops them by PID."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            caught.append(signum)
            scope.cancel()
            return


async def start_network(
    net: Network, args: argparse.Namespace, base: Path, genesis: Path | None, nursery: trio.Nursery
) -> None:
    """Start the bootstrap node, then the gatekeepers and peers; return once all are ready
    (or one has failed: see ``net.failure``)."""
    chain_args = ["--genesis", str(genesis)] if genesis else []

    async def launch(name: str, node_args: list[str], *, hello: bool = True) -> Peer:
        peer = await start_peer(name, node_args, base, hello=hello)
        net.nodes.append(peer)
        nursery.start_soon(net.watch, peer)
        return peer

    boot_dir = str(base / "bootstrap")
    boot = await launch(
        "bootstrap",
        ["--role", "bootstrap", "--listen", LOCALHOST, "--data-dir", boot_dir, *chain_args],
        hello=False,
    )
    await boot.ready_event.wait()
    if boot.ready is None:
        return  # it died: net.failure says how
    boot_addr = boot.ready["listen_addrs"][0]
    print(f"bootstrap node up: {boot_addr}")

    common = ["--listen", LOCALHOST, "--bootstrap", boot_addr]
    for i in range(1, args.gatekeepers + 1):
        config = str(base / f"gatekeeper-{i}.toml")  # role, data dir and genesis
        await launch(f"gatekeeper-{i}", ["--config", config, *common])
    for j in range(1, args.peers + 1):
        # With a chain, peer j's data dir holds funded account j's key.
        data_dir = base / (f"account-{j}" if genesis else f"peer-{j}")
        await launch(
            f"peer-{j}", ["--role", args.role, "--data-dir", str(data_dir), *common, *chain_args]
        )
    ready = 0
    progress("nodes started", ready, len(net.nodes))
    for peer in net.nodes:
        await peer.ready_event.wait()
        if net.failure is not None:
            return
        ready += 1
        progress("nodes started", ready, len(net.nodes))


async def main(args: argparse.Namespace) -> int:
    own_dir = args.dir is None
    base = Path(args.dir or tempfile.mkdtemp(prefix="phala-devnet-")).resolve()
    base.mkdir(parents=True, exist_ok=True)
    print(f"devnet folder: {base}")
    genesis = make_genesis(base, args.gatekeepers, args.peers) if args.gatekeepers else None
    net = Network(args)
    started = time.monotonic()
    code = 0
    caught: list[int] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(stop_on_signal, nursery.cancel_scope, caught)
            with trio.move_on_after(args.timeout) as deadline:
                await start_network(net, args, base, genesis, nursery)
                net.show()
                net.check_goal()
                await net.goal.wait()
            if sys.stdout.isatty():
                print()
            elapsed = time.monotonic() - started
            if net.failure is not None:
                print(f"devnet failed after {elapsed:.1f}s: {net.failure}")
                code = 1
            elif deadline.cancelled_caught:
                print(f"devnet not working within {args.timeout:.0f}s: {net.shortfall()}")
                code = 1
            else:
                chain = f", every node at finalized height >= {net.target}" if net.chain else ""
                print(f"devnet working after {elapsed:.1f}s{chain}")
            names = {p.ready["peer_id"]: p.name for p in net.nodes if p.ready}
            if any(p.hello and p.ready for p in net.nodes):
                print("who heard whom:")
            for p in net.nodes:
                if p.hello and p.ready:
                    heard = sorted(names.get(h, h[-8:]) for h in p.heard)
                    print(f"  {p.name:<12} heard {len(heard)}: {', '.join(heard)}")
            if code:
                print(f"logs in {base}")
            elif not args.demo:
                print("network running; Ctrl-C stops every node")
                await net.failed.wait()
                print(f"\n{net.failure}")
                code = 1
            nursery.cancel_scope.cancel()
    except KeyboardInterrupt:
        print("\ninterrupted")
        code = 130
    finally:
        net.stopping = True
        with trio.CancelScope(shield=True):
            await stop_all(net.nodes)
        if caught:
            name = signal.Signals(caught[0]).name
            print("\ninterrupted" if name == "SIGINT" else f"\nstopped by {name}")
            code = 128 + caught[0]
        print(f"stopped {len(net.nodes)} processes")
        if own_dir and args.demo and code == 0:
            shutil.rmtree(base, ignore_errors=True)
    return code


def cli() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=4, help="number of peers (default 4)")
    parser.add_argument(
        "--gatekeepers", type=int, default=4, help="gatekeepers of the chain (default 4; 0: none)"
    )
    parser.add_argument(
        "--role", default="client", choices=["client", "miner", "gatekeeper"], help="of the peers"
    )
    parser.add_argument("--demo", action="store_true", help="exit once the network works")
    parser.add_argument("--dir", help="devnet folder (default: a new temporary one)")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds for the network to work (default 60)"
    )
    args = parser.parse_args()
    if not 0 <= args.peers <= 64:
        parser.error("--peers must be between 0 and 64")
    if not 0 <= args.gatekeepers <= 64:
        parser.error("--gatekeepers must be between 0 and 64")
    if args.role == "gatekeeper" and args.gatekeepers:
        parser.error("peers join as gatekeepers only without a chain: use --gatekeepers N")
    if args.peers + args.gatekeepers < 1:
        parser.error("start at least one gatekeeper or peer")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        return trio.run(main, args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(cli())
