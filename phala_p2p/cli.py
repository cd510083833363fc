"""The ``phala-p2p`` command.

    phala-p2p node --role bootstrap --listen /ip4/127.0.0.1/tcp/4001 --data-dir ./boot
    phala-p2p node --config miner.toml
    phala-p2p keys new --data-dir ./mynode
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
from pathlib import Path
from typing import Any

import trio

from phala_p2p.config import NodeConfig, Role
from phala_p2p.errors import P2PError, UsageError

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
    node.add_argument(
        "--hello-every",
        type=float,
        default=0.0,
        help="gossip a hello on phala/hello/1 every N seconds and report who "
        "was heard (used by the example launcher)",
    )

    keys = sub.add_parser("keys", help="identity keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    new = keys_sub.add_parser("new", help="create a node identity in a data dir")
    new.add_argument("--data-dir", type=Path, required=True)

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
    return cfg.with_(**changes) if changes else cfg


HELLO_TOPIC = "phala/hello/1"


def _emit(as_json: bool, event: dict[str, Any], text: str) -> None:
    print(json.dumps(event) if as_json else text, flush=True)


async def _hello(node: Any, every: float, as_json: bool) -> None:
    """Gossip a hello now and then; report each peer heard for the first time."""
    from phala_p2p.errors import PublishError

    sub = await node.subscribe(HELLO_TOPIC)
    heard: set[str] = set()

    async def listen() -> None:
        async for msg in sub:
            if msg.sender not in heard and msg.sender != node.peer_id:
                heard.add(msg.sender)
                _emit(
                    as_json,
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


async def _run_node(cfg: NodeConfig, as_json: bool, hello_every: float = 0.0) -> None:
    from phala_p2p.node import open_node

    async with open_node(cfg) as node:
        from phala_p2p.net.logs import PeerIdFilter

        for handler in logging.getLogger().handlers:  # every log line names this node
            handler.addFilter(PeerIdFilter(node.peer_id))
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s [%(peer)s] %(name)s: %(message)s")
            )
        ready = {
            "event": "ready",
            "peer_id": node.peer_id,
            "role": node.role.value,
            "listen_addrs": node.listen_addrs,
            "metrics_port": node.metrics_port,
        }
        if as_json:
            print(json.dumps(ready), flush=True)
        else:
            print(f"{node.role.value} node {node.peer_id}", flush=True)
            for addr in node.listen_addrs:
                print(f"  listening on {addr}", flush=True)
            if node.metrics_port:
                print(f"  metrics on http://{cfg.metrics_host}:{node.metrics_port}/metrics")
        if hello_every > 0:
            node.start_soon(_hello, node, hello_every, as_json)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _sig in signals:
                break
        if not as_json:
            print("stopping", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "node":
            trio.run(_run_node, _node_config(args), args.json, args.hello_every)
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
