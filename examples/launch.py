#!/usr/bin/env python3
"""Start a local phala_p2p network: a bootstrap node and N peers, each its own OS process.

    python examples/launch.py --peers 4          # runs until Ctrl-C
    python examples/launch.py --peers 4 --demo   # exits 0 once every peer heard every other

Each peer knows only the bootstrap node's address, finds the others through it, and gossips
a hello on ``phala/hello/1``; the launcher shows progress while peers start and prints who
heard whom. Ctrl-C (or the end of --demo) stops every process it started, by PID.

This script uses only the public library and the ``phala-p2p`` command. (It is not an
importable module: py-libp2p installs a package named ``examples`` of its own.)
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
from pathlib import Path
from typing import Any

import trio

NODE_CMD = [sys.executable, "-m", "phala_p2p.cli", "--json", "node"]


class Peer:
    def __init__(self, name: str, proc: trio.Process, log: Path) -> None:
        self.name = name
        self.proc = proc
        self.log = log
        self.ready: dict[str, Any] | None = None
        self.heard: set[str] = set()
        self.ready_event = trio.Event()


def progress(label: str, done: int, total: int) -> None:
    width = 24
    filled = width * done // max(total, 1)
    bar = "#" * filled + "-" * (width - filled)
    end = "\n" if done >= total or not sys.stdout.isatty() else ""
    print(f"\r{label:<22} [{bar}] {done}/{total}", end=end, flush=True)


async def start_peer(name: str, args: list[str], base: Path) -> Peer:
    data_dir = base / name
    data_dir.mkdir(parents=True, exist_ok=True)
    log = base / f"{name}.log"
    proc = await trio.lowlevel.open_process(
        [*NODE_CMD, "--name", name, "--data-dir", str(data_dir), *args],
        stdout=subprocess.PIPE,
        stderr=log.open("wb"),
        start_new_session=True,  # Ctrl-C reaches the launcher, which stops the peers itself
    )
    return Peer(name, proc, log)


async def read_events(peer: Peer, on_event: Any) -> None:
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


async def main(args: argparse.Namespace) -> int:
    own_dir = args.dir is None
    base = Path(args.dir or tempfile.mkdtemp(prefix="phala-devnet-"))
    base.mkdir(parents=True, exist_ok=True)
    print(f"devnet folder: {base}")
    peers: list[Peer] = []
    started = time.monotonic()
    everyone_heard = trio.Event()
    code = 0
    try:
        async with trio.open_nursery() as nursery:

            def on_event(peer: Peer, event: dict[str, Any]) -> None:
                if event.get("event") == "heard":
                    peer.heard.add(event["from"])
                    total = sum(len(p.heard) for p in peers[1:])
                    progress("hellos heard", total, args.peers * (args.peers - 1))
                    if total >= args.peers * (args.peers - 1):
                        everyone_heard.set()

            boot = await start_peer(
                "bootstrap", ["--role", "bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0"], base
            )
            peers.append(boot)
            nursery.start_soon(read_events, boot, on_event)
            with trio.fail_after(args.timeout):
                await boot.ready_event.wait()
            assert boot.ready is not None
            boot_addr = boot.ready["listen_addrs"][0]
            print(f"bootstrap node up: {boot_addr}")

            for i in range(1, args.peers + 1):
                peer = await start_peer(
                    f"peer-{i}",
                    [
                        "--role",
                        args.role,
                        "--listen",
                        "/ip4/127.0.0.1/tcp/0",
                        "--bootstrap",
                        boot_addr,
                        "--hello-every",
                        "1",
                    ],
                    base,
                )
                peers.append(peer)
                nursery.start_soon(read_events, peer, on_event)
            ready = 0
            progress("peers started", ready, args.peers)
            with trio.fail_after(args.timeout):
                for peer in peers[1:]:
                    await peer.ready_event.wait()
                    ready += 1
                    progress("peers started", ready, args.peers)
            try:
                with trio.fail_after(args.timeout):
                    await everyone_heard.wait()
            except trio.TooSlowError:
                print(f"\nnot every hello arrived within {args.timeout}s; logs in {base}")
                code = 1
            names = {p.ready["peer_id"]: p.name for p in peers if p.ready}
            print(f"\nwho heard whom ({time.monotonic() - started:.1f}s after start):")
            for p in peers[1:]:
                heard = sorted(names.get(h, h[-8:]) for h in p.heard)
                print(f"  {p.name:<8} heard {len(heard)}: {', '.join(heard)}")
            if not args.demo and code == 0:
                print("network running; Ctrl-C stops every peer")
                await trio.sleep_forever()
            nursery.cancel_scope.cancel()
    except KeyboardInterrupt:
        print("\ninterrupted")
    finally:
        with trio.CancelScope(shield=True):
            await stop_all(peers)
        print(f"stopped {len(peers)} processes")
        if own_dir and args.demo and code == 0:
            shutil.rmtree(base, ignore_errors=True)
    return code


def cli() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=4, help="number of peers (default 4)")
    parser.add_argument("--role", default="client", choices=["client", "miner", "gatekeeper"])
    parser.add_argument("--demo", action="store_true", help="exit once every hello was heard")
    parser.add_argument("--dir", help="devnet folder (default: a new temporary one)")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    if not 1 <= args.peers <= 64:
        parser.error("--peers must be between 1 and 64")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        return trio.run(main, args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(cli())
