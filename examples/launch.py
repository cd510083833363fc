#!/usr/bin/env python3
"""Start a local phala_p2p devnet: bootstrap, gatekeepers, miners, clients, one OS process each.

    python examples/launch.py --gatekeepers 4 --miners 8 --clients 2   # runs until Ctrl-C
    python examples/launch.py --gatekeepers 4 --miners 2 --clients 1 --demo
    python examples/launch.py --peers 4 --demo          # plain peers gossiping hellos
    python examples/launch.py --gatekeepers 0 --peers 4 # no chain: gossip only

``phala-p2p devnet ...`` runs this script with the same flags.

The launcher writes a devnet folder: ``genesis.toml`` (gatekeepers staked; every miner,
client and peer funded; the simulated attestation root ``dev-root.key`` and the enclave's
measurement allowed, so that miners can register), one key folder per node (also its data
dir), one node config per node (``<name>.toml``), ``logs/<name>.log`` and ``devnet.json``
(names, PIDs, peer ids, the bootstrap address). It starts the bootstrap node, then every
other node with ``phala-p2p node --config <name>.toml``: all know only the bootstrap
address. Miners start their simulated enclave, stake and register it on chain and advertise
capacity; clients follow the chain and the market. The launcher shows progress while nodes
start, blocks are finalized, miners appear in every client's directory and clients catch up.

With ``--demo`` it exits 0 once the network works (every node at finalized height 3 or more
with the same hashes, every miner advertising to every client, every hello heard) and, with
miners and a client, once a confidential job has run end to end: ``phala-p2p job run``
(``--job``, default ``examples/jobs/uppercase.wat`` on a short text), paid from the first
client's account, and the launcher prints each step with its figures (discover, attestation,
negotiation, encrypted stream, result, receipt, settlement). It exits 1 with a message naming
what is missing if something fails or does not happen within ``--timeout``. Ctrl-C (SIGINT),
SIGTERM or the end of ``--demo`` stops every process it started, by PID, and reaps them.

With ``--dir`` the folder is kept; started again with the same ``--dir`` and flags the
launcher reuses its genesis and keys, so the chain continues where it stopped.

This script is run by path, not imported: py-libp2p installs a package named ``examples``.
It starts nodes and jobs with the ``phala-p2p`` command (``python -m phala_p2p.cli``) and
uses the library only to write the genesis (which ``phala-p2p genesis new`` cannot yet give
attestation roots and allowed measurements) and to check the demo's figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from phala_p2p.chain.settlement import cost
from phala_p2p.crypto.identity import Identity
from phala_p2p.crypto.keyfile import (
    KEY_FILE_NAME,
    load_or_create_identity,
    read_identity,
    save_identity,
)
from phala_p2p.errors import UsageError
from phala_p2p.genesis_dir import DEFAULT_BALANCE, GENESIS_FILE, write_genesis_dir
from phala_p2p.market.receipt import output_hash
from phala_p2p.netns import NetLab, netns_problem, open_netlab
from phala_p2p.tee.executor import ExecutorLimits
from phala_p2p.tee.measurement import compute_measurement

CLI = [sys.executable, "-m", "phala_p2p.cli", "--json"]
LOCALHOST = "/ip4/127.0.0.1/tcp/0"
TARGET_HEIGHT = 3  # --demo waits for a finalized block at this height on every node
DEV_ROOT_KEY = "dev-root.key"
HERE = Path(__file__).resolve().parent
DEFAULT_JOB = HERE / "jobs" / "uppercase.wat"
DEFAULT_JOB_INPUT = "hello, confidential world"
DEMO_MAX_FUEL = 10_000_000  # the escrow covers this much fuel
STOP_GRACE = 10.0  # seconds a node has to stop after SIGTERM before it is killed
MAX_JOB_STDOUT = 1 << 20
# Blocks every half second (the default is one a second): registrations, escrows and
# settlements each wait for a finalized block, and the demo has a minute on two cores.
CHAIN_PARAMS = {
    "block_time_ms": 500,
    "timeout_propose_ms": 2_000,
    "timeout_prevote_ms": 1_000,
    "timeout_precommit_ms": 1_000,
}
KINDS = ("bootstrap", "gatekeeper", "miner", "client", "peer")
MINER_PRICE = 40_000  # miner-i asks this plus 10,000 per i after the first (per million fuel)


# -- the devnet folder ----------------------------------------------------------------------


@dataclass(frozen=True)
class NodeSpec:
    """A node the launcher starts: its config is ``<base>/<name>.toml``."""

    name: str  # "miner-3"
    kind: str  # one of KINDS
    config: Path
    hello: bool  # gossips hellos and must hear every other hello node
    control: bool  # runs with --control: reports its miner directory
    price: int | None = None  # a miner's price per million fuel


@dataclass(frozen=True)
class Layout:
    base: Path
    specs: list[NodeSpec]
    genesis: Path | None
    attestation_root: str = ""  # hex public key of the dev attestation root
    measurement: str = ""  # hex of the allowed enclave measurement


def _quote(text: str) -> str:
    return json.dumps(text)  # a TOML basic string for these ASCII names and paths


def node_config_text(spec: NodeSpec, role: str, genesis: bool, dev_root: Path | None) -> str:
    lines = [
        f"# {spec.name} of this devnet, written by examples/launch.py at each start.",
        f"# By hand: phala-p2p node --config {spec.name}.toml --bootstrap <multiaddr/p2p/id>",
        "# Paths are relative to this file.",
        "[node]",
        f"role = {_quote(role)}",
        f"name = {_quote(spec.name)}",
        f"data_dir = {_quote(spec.name)}",
        f"listen = [{_quote(LOCALHOST)}]",
    ]
    if genesis:
        lines.append(f"genesis = {_quote(GENESIS_FILE)}")
    if dev_root is not None:
        # [tee] dev_root_key is read relative to the working directory: an absolute path.
        lines += ["", "[tee]", f"dev_root_key = {_quote(str(dev_root))}", "register = true"]
    if spec.price is not None:
        lines += ["", "[market]", f"price = {spec.price}"]
    return "\n".join(lines) + "\n"


def plan(args: argparse.Namespace, base: Path) -> list[NodeSpec]:
    hello = args.peers > 0  # plain peers (and then the gatekeepers too) gossip hellos
    specs = [NodeSpec("bootstrap", "bootstrap", base / "bootstrap.toml", False, True)]
    for kind, count in (
        ("gatekeeper", args.gatekeepers),
        ("miner", args.miners),
        ("client", args.clients),
        ("peer", args.peers),
    ):
        for i in range(1, count + 1):
            name = f"{kind}-{i}"
            specs.append(
                NodeSpec(
                    name,
                    kind,
                    base / f"{name}.toml",
                    hello=hello and kind in ("gatekeeper", "peer"),
                    control=kind == "client",
                    price=MINER_PRICE + 10_000 * (i - 1) if kind == "miner" else None,
                )
            )
    return specs


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _funded(specs: list[NodeSpec]) -> list[NodeSpec]:
    return [s for s in specs if s.kind in ("miner", "client", "peer")]


def write_genesis(base: Path, args: argparse.Namespace, specs: list[NodeSpec]) -> None:
    """What ``phala-p2p genesis new`` writes (gatekeeper keys and configs), plus a funded
    account per miner, client and peer and the dev attestation root with the enclave's
    measurement, so that miners can register."""
    made = write_genesis_dir(base, gatekeepers=args.gatekeepers, params=CHAIN_PARAMS)
    accounts = [
        (load_or_create_identity(base / s.name).public_key, DEFAULT_BALANCE) for s in _funded(specs)
    ]
    root_path = base / DEV_ROOT_KEY
    if not root_path.exists():
        save_identity(root_path, Identity.generate())
    genesis = dataclasses.replace(
        made.genesis,
        accounts=made.genesis.accounts + tuple(accounts),
        attestation_roots=(read_identity(root_path).public_key,),
        allowed_measurements=(compute_measurement(ExecutorLimits()),),
    )
    header = (
        f"# Genesis of devnet {genesis.chain_id} (hash {genesis.genesis_hash.hex()}),\n"
        "# written by examples/launch.py: gatekeepers, every node's account, and the dev\n"
        f"# attestation root ({DEV_ROOT_KEY}: a test key, dev networks only).\n\n"
    )
    _write_atomically(base / GENESIS_FILE, header + genesis.to_toml())
    print(
        f"genesis of chain {genesis.chain_id}: {args.gatekeepers} gatekeepers, "
        f"{len(accounts)} more funded accounts, dev attestation root "
        f"{genesis.attestation_roots[0].hex()[:16]}..."
    )


def check_reuse(
    base: Path, raw: dict[str, Any], args: argparse.Namespace, specs: list[NodeSpec]
) -> None:
    """SystemExit naming what does not fit when a reused genesis is for another network."""
    genesis = base / GENESIS_FILE
    have = len(raw.get("gatekeepers", []))
    configs = all((base / f"gatekeeper-{i}.toml").exists() for i in range(1, have + 1))
    if have != args.gatekeepers or not configs:
        raise SystemExit(
            f"launch.py: {genesis} is for {have} gatekeepers (use --gatekeepers {have}) "
            "or its gatekeeper configs are missing; or choose another --dir"
        )
    funded = {a.get("pubkey") for a in raw.get("accounts", []) if isinstance(a, dict)}
    for spec in specs:
        if spec.kind not in ("miner", "client"):
            continue  # plain peers need no funds
        key = base / spec.name / KEY_FILE_NAME
        if not key.exists() or read_identity(key).public_key.hex() not in funded:
            raise SystemExit(
                f"launch.py: {genesis} funds no account for {spec.name}: it was written for "
                "fewer miners or clients; use the flags it was made with, or another --dir"
            )
    root = base / DEV_ROOT_KEY
    roots = raw.get("attestation_roots", [])
    if args.miners and (not root.exists() or read_identity(root).public_key.hex() not in roots):
        raise SystemExit(
            f"launch.py: {genesis} does not name the attestation root {root}: "
            "its miners could not register; choose another --dir"
        )


def prepare(base: Path, args: argparse.Namespace) -> Layout:
    """The devnet folder: genesis (reused if there), keys, node configs, logs/."""
    specs = plan(args, base)
    (base / "logs").mkdir(parents=True, exist_ok=True)
    genesis: Path | None = None
    raw: dict[str, Any] = {}
    if args.gatekeepers:
        genesis = base / GENESIS_FILE
        if genesis.exists():
            try:
                with genesis.open("rb") as fh:
                    raw = tomllib.load(fh)
            except (OSError, tomllib.TOMLDecodeError) as err:
                raise SystemExit(f"launch.py: cannot read {genesis}: {err}") from err
            try:
                check_reuse(base, raw, args, specs)
            except UsageError as err:  # a key file that cannot be read
                raise SystemExit(f"launch.py: cannot reuse {base}: {err}") from err
            print(f"reusing genesis {genesis}")
        else:
            try:
                write_genesis(base, args, specs)
            except UsageError as err:
                raise SystemExit(f"launch.py: cannot write the genesis: {err}") from err
            with genesis.open("rb") as fh:
                raw = tomllib.load(fh)
    dev_root = base / DEV_ROOT_KEY
    for spec in specs:
        if spec.kind == "gatekeeper":
            continue  # its config comes with the genesis
        role = {"peer": args.role}.get(spec.kind, spec.kind)
        tee = dev_root if spec.kind == "miner" else None
        _write_atomically(spec.config, node_config_text(spec, role, genesis is not None, tee))
    roots, measurements = raw.get("attestation_roots", []), raw.get("allowed_measurements", [])
    return Layout(
        base,
        specs,
        genesis,
        attestation_root=str(roots[0]) if roots else "",
        measurement=str(measurements[0]) if measurements else "",
    )


# -- processes ------------------------------------------------------------------------------


class Peer:
    """A node process and what it reported."""

    def __init__(self, spec: NodeSpec, proc: trio.Process, log: Path) -> None:
        self.spec = spec
        self.name = spec.name
        self.kind = spec.kind
        self.hello = spec.hello
        self.proc = proc
        self.log = log
        self.ready: dict[str, Any] | None = None
        self.heard: set[str] = set()
        self.directory: set[str] = set()  # peer ids of the miners whose adverts it holds
        self.height = 0  # highest finalized block it reported
        self.start_height = 0  # its finalized height when it started
        self.ready_event = trio.Event()

    @property
    def peer_id(self) -> str:
        return str(self.ready["peer_id"]) if self.ready else ""


def bar(done: int, total: int, width: int = 20) -> str:
    filled = width * min(done, total) // max(total, 1)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


class Screen:
    """Lines for a log, a status line redrawn in place on a terminal."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self._drawn = False

    def line(self, text: str) -> None:
        if self._drawn:
            print("\r\x1b[K", end="")
            self._drawn = False
        print(text, flush=True)

    def status(self, text: str, *, changed: bool = True) -> None:
        """On a terminal: redraw the status line; otherwise print it if ``changed``."""
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns
            print(f"\r\x1b[K{text[: width - 1]}", end="", flush=True)
            self._drawn = True
        elif changed:
            print(text, flush=True)

    def end(self) -> None:
        if self._drawn:
            print(flush=True)
            self._drawn = False


def log_tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()[-lines:]
    except OSError:
        return ""
    return "".join(f"\n    | {line}" for line in text)


async def start_peer(
    spec: NodeSpec, layout: Layout, extra: list[str], lab: NetLab | None = None
) -> Peer:
    log = layout.base / "logs" / f"{spec.name}.log"
    listen, prefix = LOCALHOST, ()
    if lab is not None:  # --netns: its own network namespace, on the lab's bridge
        host = await lab.add_host(spec.name)
        listen, prefix = host.listen_addr(), host.exec_prefix
    cmd = [*prefix, *CLI, "node", "--config", str(spec.config), "--listen", listen, *extra]
    if spec.hello:
        cmd += ["--hello-every", "1"]
    if spec.control and layout.genesis is not None:
        cmd.append("--control")  # it reports its market directory
    with log.open("wb") as stderr:  # the child keeps its own copy of the descriptor
        proc = await trio.lowlevel.open_process(
            cmd,
            # a --control node reads commands on stdin: a pipe we hold open until the end
            stdin=subprocess.PIPE if "--control" in cmd else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            start_new_session=True,  # Ctrl-C reaches the launcher, which stops the nodes itself
        )
    return Peer(spec, proc, log)


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
        if len(buf) > 1 << 24:
            buf = b""  # a line this long is no event of ours


def _sessions_alive(sessions: set[int]) -> list[int]:
    """PIDs of the processes still in these sessions (our nodes' children, such as a miner's
    enclave, left behind by a node that was killed). Linux only; elsewhere none."""
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 3 and fields[0] != b"Z" and int(fields[3]) in sessions:
            found.append(int(entry))
    return found


async def stop_all(procs: list[tuple[str, trio.Process]]) -> int:
    """SIGTERM every process, wait, SIGKILL what is left; reap them all. Then kill what is
    left in their sessions. Returns how many processes were stopped."""
    for _name, proc in procs:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
    with trio.move_on_after(STOP_GRACE):
        for _name, proc in procs:
            await proc.wait()
    for name, proc in procs:
        if proc.returncode is None:
            print(f"{name} (pid {proc.pid}) did not stop within {STOP_GRACE:.0f}s: killed")
            proc.kill()
            await proc.wait()
    sessions = {proc.pid for _name, proc in procs}
    for _ in range(60):  # a node's children (a miner's enclave) end soon after it does
        if not _sessions_alive(sessions):
            break
        await trio.sleep(0.05)  # polled: nothing signals the end of a grandchild
    for pid in _sessions_alive(sessions):
        print(f"killed leftover process {pid} of a node")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(procs)


# -- the network ----------------------------------------------------------------------------


class Network:
    """The launched nodes and what they reported."""

    def __init__(
        self, args: argparse.Namespace, layout: Layout, screen: Screen, started: float
    ) -> None:
        self.args = args
        self.layout = layout
        self.screen = screen
        self.started = started  # time.monotonic() when the launcher began
        self.nodes: list[Peer] = []
        self.job_procs: list[trio.Process] = []
        self.lab: NetLab | None = None  # --netns
        self.boot_addr = ""
        self.total_nodes = len(layout.specs)
        self.hello_nodes = sum(s.hello for s in layout.specs)
        self.hello_total = self.hello_nodes * (self.hello_nodes - 1)
        self.miner_total = sum(s.kind == "miner" for s in layout.specs)
        self.client_total = sum(s.kind == "client" for s in layout.specs)
        self.chain = layout.genesis is not None
        self.hashes: dict[int, tuple[str, str]] = {}  # height -> (hash, first reporter)
        self.failure: str | None = None
        self.stopping = False
        self.goal = trio.Event()  # reached, or failed: see .failure
        self.failed = trio.Event()
        self._shown: tuple[int, ...] | None = None
        self.reached = False
        self.up = False  # start_network is done: status lines from now on
        self.milestones: dict[str, float] = {}
        self.first_block: tuple[float, int] | None = None  # (seconds, height) of the first

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def by_kind(self, kind: str) -> list[Peer]:
        return [p for p in self.nodes if p.kind == kind]

    def name_of(self, peer_id: str) -> str:
        for p in self.nodes:
            if p.ready and p.peer_id == peer_id:
                return p.name
        return peer_id[-8:]

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
        return len(self.nodes) == self.total_nodes and all(p.ready for p in self.nodes)

    def observers(self) -> list[Peer]:
        """Whose market directory shows that miners advertise: every client, else the
        bootstrap node."""
        return self.by_kind("client") or self.by_kind("bootstrap")

    def advertising(self) -> list[Peer]:
        """The miners whose advert every observer holds (so they are registered on chain)."""
        observers = self.observers()
        return [
            m
            for m in self.by_kind("miner")
            if m.ready and observers and all(m.peer_id in o.directory for o in observers)
        ]

    def synced_clients(self) -> int:
        return sum(c.height >= self.target for c in self.by_kind("client"))

    def done(self) -> bool:
        if not self.all_started() or self.heard_count() < self.hello_total:
            return False
        if len(self.advertising()) < self.miner_total:
            return False
        return min(self.heights()) >= self.target

    def show(self) -> None:
        """One status line: on a terminal rewritten in place, else printed when it changes."""
        if not self.up:
            return
        heard, heights = self.heard_count(), self.heights()
        if self.reached:  # running on: a terminal shows the head, a log stays quiet
            if self.screen.tty:
                self.screen.status(f"running: finalized height {min(heights)}..{max(heights)}")
            return
        parts = []
        if self.hello_total:
            parts.append(f"hellos heard {bar(heard, self.hello_total)} {heard}/{self.hello_total}")
        low = min(heights)
        if self.chain:
            parts.append(
                f"finalized height {bar(low, self.target, 6)} {min(low, self.target)}/"
                f"{self.target} (highest {max(heights)})"
            )
        ads = len(self.advertising())
        if self.miner_total:
            parts.append(
                f"miners advertising {bar(ads, self.miner_total, 8)} {ads}/{self.miner_total}"
            )
        synced = self.synced_clients()
        if self.client_total:
            parts.append(f"clients synced {synced}/{self.client_total}")
        key = (heard * 4 // max(self.hello_total, 1), low, ads, synced)
        self.screen.status("   ".join(parts), changed=key != self._shown)
        self._shown = key

    def milestone(self, name: str, text: str, at: float | None = None) -> None:
        """Print ``text`` with the seconds since the start (now, or ``at``), once."""
        if name not in self.milestones:
            self.milestones[name] = self.elapsed() if at is None else at
            self.screen.line(f"{text} after {self.milestones[name]:.1f}s")

    def check_milestones(self) -> None:
        if not self.up:
            return
        if self.first_block is not None:  # perhaps before every node was up: its own time
            at, height = self.first_block
            self.milestone("first_block", f"first block finalized (height {height})", at)
        if self.miner_total and len(self.advertising()) == self.miner_total:
            seen_by = "every client" if self.client_total else "the bootstrap node"
            self.milestone(
                "miners",
                f"{self.miner_total} miners registered on chain and advertising "
                f"(seen by {seen_by})",
            )
        if self.client_total and self.synced_clients() == self.client_total:
            self.milestone("clients", f"{self.client_total} clients synced to the chain")

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
            peer.height = max(peer.height, event["height"])
        elif kind == "heard" and isinstance(event.get("from"), str):
            peer.heard.add(event["from"])
        elif kind == "directory" and isinstance(event.get("adverts"), dict):
            peer.directory = {str(k) for k in event["adverts"]}
        elif kind == "block" and isinstance(event.get("height"), int):
            height, block_hash = event["height"], str(event.get("hash"))
            peer.height = max(peer.height, height)
            if self.first_block is None and height > peer.start_height:
                self.first_block = (self.elapsed(), height)
            first = self.hashes.setdefault(height, (block_hash, peer.name))
            self.hashes.pop(height - 1000, None)  # bounded: forks are compared near the head
            if first[0] != block_hash:
                self.fail(
                    f"fork at height {height}: {first[1]} finalized {first[0][:16]}, "
                    f"{peer.name} finalized {block_hash[:16]}"
                )
        else:
            return
        self.check_milestones()
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
        started = {p.name for p in self.nodes}
        unstarted = [s.name for s in self.layout.specs if s.name not in started]
        if unstarted:
            missing.append(f"not started: {', '.join(unstarted)}")
        silent = [p.name for p in self.nodes if not p.ready]
        if silent:
            missing.append(f"never reported ready: {', '.join(silent)}")
        low = [f"{p.name} at {p.height}" for p in self.nodes if p.height < self.target]
        if low:
            more = f" and {len(low) - 8} more" if len(low) > 8 else ""
            missing.append(f"below height {self.target}: {', '.join(low[:8])}{more}")
        absent = [m for m in self.by_kind("miner") if m not in self.advertising()]
        if absent:
            observers = self.observers()
            seen = ", ".join(
                f"{o.name} holds {len(o.directory & {m.peer_id for m in self.by_kind('miner')})}"
                for o in observers
            )
            names = ", ".join(m.name for m in absent)
            tail = log_tail(absent[0].log, 3)
            missing.append(
                f"miners not advertising to every client (registered on chain): {names} "
                f"({seen} of {self.miner_total})"
                + (f"; {absent[0].name}'s log ({absent[0].log}) ends:{tail}" if tail else "")
            )
        deaf = [p.name for p in self.nodes if p.hello and len(p.heard) < self.hello_nodes - 1]
        if deaf:
            missing.append(f"did not hear every hello: {', '.join(deaf)}")
        return "; ".join(missing) or "nothing (the goal was reached too late)"

    def write_manifest(self) -> Path:
        """``devnet.json``: every process started, with its PID, config and log, and its
        peer id once it is up."""
        nodes = [
            {
                "name": p.name,
                "role": p.kind,
                "pid": p.proc.pid,
                "peer_id": p.peer_id,
                "account": (p.ready or {}).get("account"),
                "listen_addrs": (p.ready or {}).get("listen_addrs", []),
                "config": str(p.spec.config),
                "log": str(p.log),
            }
            for p in self.nodes
        ]
        manifest = {
            "launcher_pid": os.getpid(),
            "bootstrap": self.boot_addr,
            "genesis": str(self.layout.genesis) if self.layout.genesis else None,
            "nodes": nodes,
        }
        path = self.layout.base / "devnet.json"
        _write_atomically(path, json.dumps(manifest, indent=1) + "\n")
        return path


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


async def _show_dashboard(net: Network, name: str) -> None:
    """Say where the dashboard is once its node is ready."""
    peer = next(p for p in net.nodes if p.name == name)
    await peer.ready_event.wait()
    url = (peer.ready or {}).get("dashboard")
    if url:
        net.screen.line(f"dashboard of {name}: {url}")


async def start_network(net: Network, nursery: trio.Nursery) -> None:
    """Start the bootstrap node, then every other node; return once all are ready (or one
    has failed: see ``net.failure``)."""
    layout = net.layout

    async def launch(spec: NodeSpec, extra: list[str]) -> Peer:
        peer = await start_peer(spec, layout, extra, net.lab)
        net.nodes.append(peer)
        net.write_manifest()  # every process started, with its PID, from the first on
        nursery.start_soon(net.watch, peer)
        return peer

    # the dashboard goes to the first gatekeeper, or to the bootstrap node without a chain
    shown = next((s for s in layout.specs if s.kind == "gatekeeper"), layout.specs[0])
    dashboard = ["--dashboard", net.args.dashboard] if net.args.dashboard else []
    boot = await launch(layout.specs[0], dashboard if shown is layout.specs[0] else [])
    await boot.ready_event.wait()
    if boot.ready is None:
        return  # it died: net.failure says how
    net.boot_addr = boot.ready["listen_addrs"][0]
    net.screen.line(f"bootstrap node up: {net.boot_addr}")
    for spec in layout.specs[1:]:
        await launch(spec, ["--bootstrap", net.boot_addr, *(dashboard if spec is shown else [])])
    if dashboard:
        nursery.start_soon(_show_dashboard, net, shown.name)
    for kind in KINDS[1:]:
        group = net.by_kind(kind)
        label = f"{kind}s up"
        for ready, peer in enumerate(group, 1):
            if net.screen.tty:
                net.screen.status(
                    f"{label:<16} {bar(ready - 1, len(group), 24)} {ready - 1}/{len(group)}"
                )
            await peer.ready_event.wait()
            if net.failure is not None:
                return
        if group:
            net.screen.line(
                f"{label:<16} {bar(len(group), len(group), 24)} {len(group)}/{len(group)}"
                f"   ({net.elapsed():.1f}s)"
            )
    manifest = net.write_manifest()
    net.screen.line(
        f"all {len(net.nodes)} processes up after {net.elapsed():.1f}s ({manifest.name}):"
    )
    for p in net.nodes:
        net.screen.line(f"  {p.name:<14} pid {p.proc.pid:<8} {p.peer_id}")
    net.up = True
    net.check_milestones()


# -- the demo job ---------------------------------------------------------------------------


def _printable(data: bytes, limit: int = 200) -> str:
    text = data[:limit].decode("utf-8", errors="replace")
    more = f" ... ({len(data)} bytes)" if len(data) > limit else ""
    return repr(text) + more


async def demo_job(net: Network, args: argparse.Namespace) -> str | None:
    """Run ``phala-p2p job run`` paid by the first client's account and print each step;
    None if every step checks out, else what failed."""
    base = net.layout.base
    client = net.by_kind("client")[0]
    demo = base / "demo"
    demo.mkdir(exist_ok=True)
    infile, outfile = demo / "input.txt", demo / "output.txt"
    infile.write_text(args.job_input)
    outfile.unlink(missing_ok=True)
    known = sorted(
        (m for m in net.by_kind("miner") if m.peer_id in client.directory), key=lambda m: m.name
    )
    prefix = (await net.lab.add_host("job-client")).exec_prefix if net.lab is not None else ()
    cmd = [
        *prefix,
        *CLI, "job", "run", str(args.job), "--input", str(infile), "--output", str(outfile),
        "--config", str(client.spec.config), "--bootstrap", net.boot_addr,
        "--data-dir", str(demo / "job-client"),  # its own node: client-1 keeps running
        "--wallet-key", str(base / client.name / KEY_FILE_NAME),  # client-1's account pays
        "--max-fuel", str(DEMO_MAX_FUEL), "--wait", str(max(5, int(args.timeout))),
    ]  # fmt: skip
    net.screen.line(
        f"demo: a confidential job ({Path(args.job).name} on {len(args.job_input.encode())} "
        "bytes), "
        f"paid from {client.name}'s account; phala-p2p job run says:"
    )
    log = base / "logs" / "demo-job.log"
    proc = await trio.lowlevel.open_process(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    net.job_procs.append(proc)
    out = bytearray()
    last = ["(nothing yet)"]
    names = {m.peer_id: m.name for m in net.by_kind("miner") if m.ready}

    async def read_stdout() -> None:
        assert proc.stdout is not None
        async for chunk in proc.stdout:
            if len(out) < MAX_JOB_STDOUT:
                out.extend(chunk)

    async def read_stderr() -> None:
        assert proc.stderr is not None
        buf = b""
        with log.open("wb") as fh:
            async for chunk in proc.stderr:
                fh.write(chunk)
                buf += chunk
                while b"\n" in buf:
                    raw, buf = buf.split(b"\n", 1)
                    text = raw.decode(errors="replace").strip()
                    text = text.removeprefix("phala-p2p: ")
                    for peer_id, name in names.items():
                        text = text.replace(peer_id, name)
                    if text:
                        last[0] = text
                        net.screen.line(f"  job | {text}")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_stdout)
        nursery.start_soon(read_stderr)
        await proc.wait()
    if proc.returncode != 0:
        return f"the job failed (phala-p2p job run exited with {proc.returncode}): {last[0]}"
    try:
        s = json.loads(bytes(out))
    except ValueError:
        return f"phala-p2p job run printed no JSON summary (its stderr: {log})"
    try:
        output = outfile.read_bytes()
    except OSError as err:
        return f"the job's output {outfile} cannot be read: {err}"
    return report_steps(net, s, output, known, client)


def report_steps(
    net: Network, s: dict[str, Any], output: bytes, known: list[Peer], client: Peer
) -> str | None:
    """Print the steps with their figures, checking each; what failed, or None."""
    problems = []
    if not s.get("ok"):
        problems.append(f"the job failed in the enclave: {s.get('error')}")
    if not (isinstance(s.get("fuel_used"), int) and s["fuel_used"] > 0):
        problems.append(f"fuel used {s.get('fuel_used')} (expected > 0)")
    if not s.get("settled"):
        problems.append(f"no settlement on chain ({s.get('settlement_error', 'pending')})")
    elif s["paid"] != cost(s["fuel_used"], s["price"]):
        problems.append(f"paid {s['paid']}, but the fuel costs {cost(s['fuel_used'], s['price'])}")
    digest = output_hash(output).hex()
    if digest != s.get("output_hash") or len(output) != s.get("bytes_out"):
        problems.append("the output does not match the enclave's receipt")

    miner = net.name_of(str(s["miner"]))
    say = net.screen.line
    offers = ", ".join(f"{m.name} at {m.spec.price}" for m in known) or "none"
    cheapest = min((m.spec.price or 0 for m in known), default=None) == s["price"]
    say(
        f"  1 discover     {client.name} holds {len(known)} verified adverts ({offers} per "
        f"million fuel); the job went to {miner}{', the cheapest' if cheapest else ''}"
    )
    say(
        f"  2 attestation  {miner}'s enclave quoted over the client's fresh nonce: signed by "
        f"the dev root {net.layout.attestation_root[:16]}..., measurement "
        f"{net.layout.measurement[:16]}... allowed by genesis, enclave registered on chain"
    )
    escrow = "?" if s.get("paid") is None else s["paid"] + s["refunded"]
    say(
        f"  3 negotiate    agreement {s['agreement_id'][:16]}... at {s['price']} per million "
        f"fuel for at most {s['max_fuel']} fuel; escrow {escrow} locked on chain"
    )
    say(
        f"  4 stream       encrypted both ways (forward-secret handshake, AEAD chunks): "
        f"{s['bytes_in']} bytes in (job header, module, input), {s['bytes_out']} bytes out"
    )
    say(f"  5 result       {_printable(output)}")
    match = "matches" if digest == s.get("output_hash") else "DOES NOT match"
    say(
        f"  6 receipt      fuel used {s['fuel_used']}, bytes in {s['bytes_in']}, out "
        f"{s['bytes_out']}; enclave signature verified and co-signed by the client; "
        f"output hash {str(s.get('output_hash'))[:16]}... {match} the output"
    )
    if s.get("settled"):
        say(
            f"  7 settlement   paid {s['paid']} to {miner}'s operator ({s['fuel_used']} fuel x "
            f"{s['price']} per million, rounded up), refunded {s['refunded']} to "
            f"{client.name}, final at height {s['settlement_height']}"
        )
    else:
        say(f"  7 settlement   not final: {s.get('settlement_error', 'pending')}")
    return "; ".join(problems) or None


# -- main -----------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> int:
    if not args.netns:
        return await _main(args, None)
    # the namespaces outlive every node: nodes are stopped first, then the lab goes
    async with open_netlab() as lab:
        print(f"network namespaces: one per node, on a bridge ({lab.subnet})")
        return await _main(args, lab)


async def _main(args: argparse.Namespace, lab: NetLab | None) -> int:
    started = time.monotonic()
    own_dir = args.dir is None
    base = Path(args.dir or tempfile.mkdtemp(prefix="phala-devnet-")).resolve()
    base.mkdir(parents=True, exist_ok=True)
    screen = Screen()
    print(f"devnet folder: {base}")
    layout = prepare(base, args)
    net = Network(args, layout, screen, started)
    net.lab = lab
    code = 0
    caught: list[int] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(stop_on_signal, nursery.cancel_scope, caught)
            deadline = trio.current_time() + args.timeout
            with trio.move_on_at(deadline) as scope:
                await start_network(net, nursery)
                net.show()
                net.check_goal()
                await net.goal.wait()
            screen.end()
            if net.failure is not None:
                print(f"devnet failed after {net.elapsed():.1f}s: {net.failure}")
                code = 1
            elif scope.cancelled_caught:
                print(f"devnet not working within {args.timeout:.0f}s: {net.shortfall()}")
                code = 1
            else:
                chain = f", every node at finalized height >= {net.target}" if net.chain else ""
                print(f"devnet working after {net.elapsed():.1f}s{chain}")
            names = {p.peer_id: p.name for p in net.nodes if p.ready}
            if any(p.hello and p.ready for p in net.nodes):
                print("who heard whom:")
            for p in net.nodes:
                if p.hello and p.ready:
                    heard = sorted(names.get(h, h[-8:]) for h in p.heard)
                    print(f"  {p.name:<12} heard {len(heard)}: {', '.join(heard)}")
            if code == 0 and args.demo and net.miner_total and net.client_total:
                code = await run_demo(net, args, deadline)
            elif code == 0 and args.demo and net.miner_total:
                print("no client: no demo job (add --clients 1)")
            if code:
                print(f"logs in {base / 'logs'}")
            elif not args.demo:
                print("network running; Ctrl-C stops every node")
                if net.client_total and net.miner_total:
                    client = net.by_kind("client")[0]
                    print(
                        f"run a job: {Path(sys.executable).parent / 'phala-p2p'} job run "
                        f"{DEFAULT_JOB} --input FILE --config {client.spec.config} "
                        f"--bootstrap {net.boot_addr} --data-dir {base / 'my-job-client'} "
                        f"--wallet-key {base / client.name / KEY_FILE_NAME}"
                    )
                await net.failed.wait()
                screen.end()
                print(f"\n{net.failure}")
                code = 1
            nursery.cancel_scope.cancel()
    except KeyboardInterrupt:
        print("\ninterrupted")
        code = 130
    finally:
        net.stopping = True
        screen.end()
        procs = [(p.name, p.proc) for p in net.nodes] + [("job", p) for p in net.job_procs]
        with trio.CancelScope(shield=True):
            stopped = await stop_all(procs)
        if caught:
            name = signal.Signals(caught[0]).name
            print("\ninterrupted" if name == "SIGINT" else f"\nstopped by {name}")
            code = 128 + caught[0]
        print(f"stopped {stopped} processes")
        if own_dir and args.demo and code == 0:
            shutil.rmtree(base, ignore_errors=True)
    return code


async def run_demo(net: Network, args: argparse.Namespace, deadline: float) -> int:
    """The demo job, within what is left of --timeout, stopped if a node dies."""
    failure: str | None = None
    async with trio.open_nursery() as race:

        async def job() -> None:
            nonlocal failure
            with trio.move_on_at(deadline) as scope:
                failure = await demo_job(net, args)
            if scope.cancelled_caught:
                failure = f"the job did not finish within --timeout {args.timeout:.0f}s"
            race.cancel_scope.cancel()

        async def node_died() -> None:
            await net.failed.wait()
            race.cancel_scope.cancel()

        race.start_soon(job)
        race.start_soon(node_died)
    net.screen.end()
    if net.failure is not None:
        failure = net.failure
    if failure is not None:
        print(f"demo failed after {net.elapsed():.1f}s: {failure}")
        return 1
    print(f"demo done after {net.elapsed():.1f}s: a confidential job ran end to end")
    return 0


def cli() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--gatekeepers", type=int, default=4, help="gatekeepers of the chain (default 4; 0: none)"
    )
    parser.add_argument("--miners", type=int, default=0, help="miners with a simulated enclave")
    parser.add_argument("--clients", type=int, default=0, help="client nodes")
    parser.add_argument(
        "--peers", type=int, help="plain peers that gossip hellos (default 4 without "
        "--miners and --clients, else 0)",
    )  # fmt: skip
    parser.add_argument(
        "--role", default="client", choices=["client", "miner", "gatekeeper"], help="of the peers"
    )
    parser.add_argument("--demo", action="store_true", help="exit once the network works")
    parser.add_argument("--dir", help="devnet folder (default: a new temporary one)")
    parser.add_argument(
        "--timeout", type=float, help="seconds for the network to work and the demo job to "
        "finish (default 60, 120 with miners or clients)",
    )  # fmt: skip
    parser.add_argument(
        "--job", type=Path, default=DEFAULT_JOB, help="the demo's job module (.wat or .wasm)"
    )
    parser.add_argument("--job-input", default=DEFAULT_JOB_INPUT, help="the demo job's input")
    parser.add_argument(
        "--netns", action="store_true", help="each node in its own network namespace, joined "
        "by a bridge (needs root and iproute2)",
    )  # fmt: skip
    parser.add_argument(
        "--dashboard", metavar="HOST:PORT", help="serve the live dashboard of the first "
        "gatekeeper (the bootstrap node without a chain) there, e.g. 127.0.0.1:8080",
    )  # fmt: skip
    argv = sys.argv[1:]
    if argv[:1] == ["--"]:  # `phala-p2p devnet -- --miners 2 ...` passes the separator on
        argv = argv[1:]
    args = parser.parse_args(argv)
    if args.peers is None:
        args.peers = 0 if args.miners or args.clients else 4
    for name in ("peers", "gatekeepers", "miners", "clients"):
        if not 0 <= getattr(args, name) <= 64:
            parser.error(f"--{name} must be between 0 and 64")
    if args.role == "gatekeeper" and args.gatekeepers:
        parser.error("peers join as gatekeepers only without a chain: use --gatekeepers N")
    if (args.miners or args.clients) and not args.gatekeepers:
        parser.error("miners and clients need a chain: use --gatekeepers N (N >= 1)")
    if args.peers + args.gatekeepers + args.miners + args.clients < 1:
        parser.error("start at least one gatekeeper, miner, client or peer")
    if args.netns and (problem := netns_problem()) is not None:
        parser.error(f"--netns: {problem}")
    if args.timeout is None:
        args.timeout = 120.0 if args.miners or args.clients else 60.0
    if not args.job.is_file():
        parser.error(f"--job {args.job}: no such file")
    args.job = args.job.resolve()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        return trio.run(main, args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(cli())
