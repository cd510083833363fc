"""The ``phala-p2p`` command.

    phala-p2p node --role bootstrap --listen /ip4/127.0.0.1/tcp/4001 --data-dir ./boot
    phala-p2p node --config miner.toml
    phala-p2p keys new --data-dir ./mynode
    phala-p2p genesis new --out ./chain --gatekeepers 4   # genesis, keys, node configs
    phala-p2p devnet --peers 4            # the example launcher

User mistakes end with one clear line on stderr and exit status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from phala_p2p.config import NodeConfig, Role
from phala_p2p.errors import P2PError, UsageError
from phala_p2p.genesis_dir import DEFAULT_BALANCE, DEFAULT_STAKE, GenesisDir

if TYPE_CHECKING:
    from phala_p2p.chain.block import Block

logger = logging.getLogger("phala_p2p.cli")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="phala-p2p", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-v", "--verbose", action="count", default=0)
    sub = p.add_subparsers(dest="command", required=True)

    node = sub.add_parser("node", help="run a node (any role) until Ctrl-C")
    node.add_argument("--config", type=Path, help="TOML config file")
    node.add_argument("--role", choices=[r.value for r in Role])
    node.add_argument("--listen", action="append", help="multiaddr to listen on (repeatable)")
    node.add_argument("--bootstrap", action="append", help="bootstrap multiaddr with /p2p/")
    node.add_argument("--data-dir", type=Path)
    node.add_argument("--metrics-port", type=int)
    node.add_argument("--name", default="")
    node.add_argument("--genesis", type=Path, help="genesis TOML: keep (follow) that chain")
    node.add_argument(
        "--hello-every",
        type=float,
        default=0.0,
        help="gossip a hello on phala/hello/1 every N seconds and report who "
        "was heard (used by the example launcher)",
    )
    node.add_argument(
        "--control",
        action="store_true",
        help="read JSON commands on stdin (deny, allow_all, dial, peers, readvertise, "
        "directory) and report the market directory (for launchers and test harnesses; "
        "implies --json)",
    )

    keys = sub.add_parser("keys", help="identity keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    new = keys_sub.add_parser("new", help="create a node identity in a data dir")
    new.add_argument("--data-dir", type=Path, required=True)

    genesis = sub.add_parser("genesis", help="chain genesis files")
    genesis_sub = genesis.add_subparsers(dest="genesis_command", required=True)
    gnew = genesis_sub.add_parser(
        "new",
        help="write genesis.toml, gatekeeper keys and their node configs",
        description="Write OUT/genesis.toml; for each gatekeeper i, OUT/gatekeeper-i/ (its "
        "identity key) and OUT/gatekeeper-i.toml (its node config); for each extra account j, "
        "OUT/account-j/. Gatekeepers and accounts are all funded with --balance. An existing "
        "key file is kept, never overwritten.",
    )
    gnew.add_argument("--out", type=Path, required=True, metavar="DIR")
    gnew.add_argument("--gatekeepers", type=int, default=4, metavar="N", help="default 4")
    gnew.add_argument("--accounts", type=int, default=0, metavar="N", help="extra funded accounts")
    gnew.add_argument("--balance", type=int, default=DEFAULT_BALANCE, help="per funded account")
    gnew.add_argument("--stake", type=int, default=DEFAULT_STAKE, help="per gatekeeper")
    gnew.add_argument("--chain-id", help="default devnet-<8 hex digits>")
    gnew.add_argument(
        "--seed",
        help="derive every key from this text (reproducible, and public: dev networks only)",
    )
    gnew.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a chain parameter, e.g. block_time_ms=500 (repeatable)",
    )
    gnew.add_argument("--genesis-time", type=int, metavar="UNIX", help="default: now")
    gnew.add_argument("--force", action="store_true", help="replace an existing genesis.toml")
    gnew.add_argument("--json", action="store_true", default=argparse.SUPPRESS)

    devnet = sub.add_parser("devnet", help="start a local devnet (examples/launch.py)")
    devnet.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def _node_config(args: argparse.Namespace) -> NodeConfig:
    cfg = NodeConfig.from_toml(args.config) if args.config else NodeConfig()
    changes: dict[str, Any] = {}
    if args.role:
        changes["role"] = Role(args.role)
    if args.listen:
        changes["listen"] = tuple(args.listen)
    if args.bootstrap:
        changes["bootstrap"] = tuple(args.bootstrap)
    if args.data_dir:
        changes["data_dir"] = args.data_dir
    if args.metrics_port is not None:
        changes["metrics_port"] = args.metrics_port
    if args.name:
        changes["name"] = args.name
    if args.genesis:
        changes["genesis"] = args.genesis
    return cfg.with_(**changes) if changes else cfg


def _genesis_new(args: argparse.Namespace) -> GenesisDir:
    from phala_p2p.genesis_dir import parse_params, write_genesis_dir

    if args.seed is not None and not args.seed:
        raise UsageError("--seed must not be empty")
    return write_genesis_dir(
        args.out,
        gatekeepers=args.gatekeepers,
        accounts=args.accounts,
        balance=args.balance,
        stake=args.stake,
        chain_id=args.chain_id,
        seed=None if args.seed is None else args.seed.encode(),
        params=parse_params(args.param),
        genesis_time=args.genesis_time,
        force=args.force,
    )


def _print_genesis(made: GenesisDir, as_json: bool) -> None:
    from phala_p2p.net.host import peer_id_of

    members = [
        {
            "name": m.name,
            "public_key": m.public_key.hex(),
            "peer_id": peer_id_of(m.public_key),
            "stake": m.stake,
            "balance": m.balance,
            "key_file": str(m.key_file),
            "config": None if m.config is None else str(m.config),
            "kept_existing_key": m.kept_key,
        }
        for m in made.gatekeepers + made.accounts
    ]
    for store in made.stale_stores:
        print(
            f"phala-p2p: warning: {store} holds blocks of an earlier genesis; "
            "remove it before starting that node",
            file=sys.stderr,
        )
    g = made.genesis
    if as_json:
        out = {
            "event": "genesis",
            "chain_id": g.chain_id,
            "genesis_hash": g.genesis_hash.hex(),
            "genesis_time": g.genesis_time,
            "path": str(made.path),
            "seeded": made.seeded,
            "gatekeepers": members[: len(made.gatekeepers)],
            "accounts": members[len(made.gatekeepers) :],
        }
        print(json.dumps(out), flush=True)
        return
    print(f"chain {g.chain_id}, genesis hash {g.genesis_hash.hex()[:16]}...: {made.path}")
    for m in members:
        kept = " (existing key kept)" if m["kept_existing_key"] else ""
        stake = f"stake {m['stake']}, " if m["config"] else ""
        print(f"  {m['name']:<14} {m['peer_id']}  {stake}balance {m['balance']}{kept}")
    if made.seeded:
        print("  keys derived from --seed: anyone who knows the seed holds them (dev only)")
    first = made.gatekeepers[0].config
    print(f"run a gatekeeper: phala-p2p node --config {first} --bootstrap <multiaddr/p2p/id>")


HELLO_TOPIC = "phala/hello/1"


class _Output:
    """Event lines for stdout, written by a worker thread so that a reader that falls behind
    (or stops reading) never stalls the node. The queue is bounded: a line that does not fit
    is dropped and counted, and the count is reported (``{"event": "dropped", "lines": n}``
    in --json mode) once the queue has room again."""

    def __init__(self, as_json: bool, capacity: int = 1024) -> None:
        self.as_json = as_json
        self._send, self._recv = trio.open_memory_channel[str](capacity)
        self.dropped = 0
        self._reported = 0

    def emit(self, event: dict[str, Any], text: str) -> None:
        line = json.dumps(event) if self.as_json else text
        try:
            self._send.send_nowait(line)
        except trio.WouldBlock:
            self.dropped += 1
            if self.dropped - self._reported == 1:
                logger.warning("stdout is not keeping up: dropping event lines")

    async def run(self) -> None:
        async for line in self._recv:
            await _write_in_thread(line)
            if self.dropped > self._reported and self._recv.statistics().current_buffer_used == 0:
                lost, self._reported = self.dropped - self._reported, self.dropped
                event = {"event": "dropped", "lines": lost}
                text = f"({lost} event lines dropped: stdout was not keeping up)"
                line = json.dumps(event) if self.as_json else text
                await _write_in_thread(line)


async def _write_in_thread(line: str) -> None:
    def write() -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    # Abandoned on cancel: a write that blocks for good must not hold up shutdown. (The
    # trio-typing stubs that py-libp2p pulls in predate `abandon_on_cancel`.)
    await trio.to_thread.run_sync(write, abandon_on_cancel=True)  # type: ignore[call-arg]


async def _hello(node: Any, every: float, out: _Output) -> None:
    """Gossip a hello now and then; report each peer heard for the first time."""
    from phala_p2p.errors import PublishError

    sub = await node.subscribe(HELLO_TOPIC)
    heard: set[str] = set()

    async def listen() -> None:
        async for msg in sub:
            if msg.sender not in heard and msg.sender != node.peer_id:
                heard.add(msg.sender)
                out.emit(
                    {"event": "heard", "from": msg.sender, "data": msg.data.decode()},
                    f"heard {msg.data.decode()!r} from {msg.sender}",
                )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(listen)
        while True:
            try:
                name = node.config.name or node.peer_id[-8:]
                await node.publish(HELLO_TOPIC, f"hello from {name}".encode())
            except PublishError as err:
                logger.info("hello not sent: %s", err)
            await trio.sleep(every)


def _on_block(out: _Output) -> Callable[[Block], None]:
    def hook(block: Block) -> None:
        h = block.hash.hex()
        out.emit({"event": "block", "height": block.height, "hash": h}, f"block {block.height} {h}")

    return hook


async def _run_node(
    cfg: NodeConfig, as_json: bool, hello_every: float = 0.0, control: bool = False
) -> None:
    from phala_p2p.node import open_node

    as_json = as_json or control
    async with open_node(cfg) as node, trio.open_nursery() as nursery:
        from phala_p2p.net.logs import PeerIdFilter

        for handler in logging.getLogger().handlers:  # every log line names this node
            handler.addFilter(PeerIdFilter(node.peer_id))
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s [%(peer)s] %(name)s: %(message)s")
            )
        ready: dict[str, Any] = {
            "event": "ready",
            "peer_id": node.peer_id,
            "role": node.role.value,
            "listen_addrs": node.listen_addrs,
            "metrics_port": node.metrics_port,
        }
        if node.has_chain:
            ready["chain_id"] = node.chain.genesis.chain_id
            ready["height"] = node.chain.head.height
            ready["account"] = node.account.hex()
        if as_json:
            print(json.dumps(ready), flush=True)
        else:
            print(f"{node.role.value} node {node.peer_id}", flush=True)
            for addr in node.listen_addrs:
                print(f"  listening on {addr}", flush=True)
            if node.metrics_port:
                print(f"  metrics on http://{cfg.metrics_host}:{node.metrics_port}/metrics")
            if node.has_chain:
                print(f"  chain {ready['chain_id']}, finalized height {ready['height']}")
        out = _Output(as_json)
        nursery.start_soon(out.run)
        if as_json and node.has_chain:
            # A line for the head now (blocks may have been finalized while the node
            # started), then one per finalized block; no checkpoint in between, none missed.
            head = node.chain.head
            if head.height > 0:
                event = {"event": "block", "height": head.height, "hash": head.hash.hex()}
                out.emit(event, "")
            node.chain.on_block.append(_on_block(out))
        if hello_every > 0:
            nursery.start_soon(_hello, node, hello_every, out)
        if control:
            from phala_p2p.control import report_directory

            def emit(event: dict[str, Any]) -> None:
                out.emit(event, "")

            if node.has_chain:
                nursery.start_soon(report_directory, node, emit)
            nursery.start_soon(_serve_stdin, node, emit)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _sig in signals:
                break
        nursery.cancel_scope.cancel()
        if not as_json:
            print("stopping", flush=True)


async def _serve_stdin(node: Any, emit: Callable[[dict[str, Any]], None]) -> None:
    import os

    from phala_p2p.control import serve_control

    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stdin:
        await serve_control(node, stdin, emit)
    logger.info("control channel closed (stdin ended)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "node":
            trio.run(_run_node, _node_config(args), args.json, args.hello_every, args.control)
        elif args.command == "keys":
            from phala_p2p.crypto.keyfile import load_or_create_identity
            from phala_p2p.net.host import peer_id_of

            identity = load_or_create_identity(args.data_dir)
            out = {
                "peer_id": peer_id_of(identity.public_key),
                "public_key": identity.public_key.hex(),
                "data_dir": str(args.data_dir),
            }
            print(json.dumps(out) if args.json else f"peer id {out['peer_id']}")
        elif args.command == "genesis":
            _print_genesis(_genesis_new(args), args.json)
        elif args.command == "devnet":
            launcher = Path(__file__).resolve().parent.parent / "examples" / "launch.py"
            if not launcher.exists():
                raise UsageError("examples/launch.py not found (run from a source checkout)")
            return subprocess.call([sys.executable, str(launcher), *args.rest])
    except (P2PError, OSError) as err:
        print(f"phala-p2p: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
