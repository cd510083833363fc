"""The ``phala-p2p`` command.

    phala-p2p node --role bootstrap --listen /ip4/127.0.0.1/tcp/4001 --data-dir ./boot
    phala-p2p node --config miner.toml --dashboard 127.0.0.1:8080
    phala-p2p keys new --data-dir ./mynode
    phala-p2p genesis new --out ./chain --gatekeepers 4   # genesis, keys, node configs
    phala-p2p job run upper.wat --input in.txt --output out.txt --config client.toml
    phala-p2p chain status --config client.toml          # height, head, gatekeepers, account
    phala-p2p stake 5000 --config client.toml             # (and unstake AMOUNT)
    phala-p2p propose param_change --param tx_fee --value 2 --config client.toml
    phala-p2p vote 0 yes --config client.toml
    phala-p2p miners --max-price 2000 --tags cpu --limit 5 --config client.toml
    phala-p2p devnet --peers 4            # the example launcher

``node`` runs a node of any role until Ctrl-C (``--dashboard HOST:PORT`` serves its live
dashboard there). ``keys new`` makes a node identity; ``genesis new`` a chain's genesis, its
gatekeepers' keys and their node configs.

``job run MODULE --input FILE`` runs a WebAssembly job (a .wasm binary or .wat text) in a
miner's enclave: it starts a client node (``--config``, or ``--bootstrap``, ``--genesis``,
``--data-dir``, ``--wallet-key``), waits for the network (``--wait``, default 30 s), picks a
miner (``--miner PEER_ID``, ``--max-price``), streams the input (``-`` for stdin) and writes the
output as it arrives to ``--output FILE`` (renamed into place at the end: a failed job leaves no
file) or to stdout. Progress and a summary go to stderr (``--quiet``: none); ``--json`` puts
the summary on stdout as one JSON object (and so needs ``--output``).

The operator commands (phala_p2p/cli_chain.py) take the same connection options and start a
client node the same way: ``chain status`` (chain id, height, head hash, the last block's age,
gatekeepers and their stake, open proposals, the account's balance, stake and unbonding),
``stake AMOUNT``, ``unstake AMOUNT``, ``propose KIND`` (param_change ``--param NAME --value
V``, gatekeeper_add/remove ``--account``, measurement_allow/revoke ``--measurement HEX``,
treasury_spend ``--account --amount``), ``vote PROPOSAL_ID yes|no`` and ``miners``
(``--min-cores``, ``--max-price``, ``--tags t1,t2``, ``--limit``, ``--sort``: the directory,
best first). Their report goes to stdout (``--json``: one object), progress to stderr
(``--quiet``: none). They sign as ``--wallet-key`` (or the ``--data-dir`` identity); given a
gatekeeper's or a miner's config they sign as that node's account from a client of their own.

User mistakes end with one clear line on stderr and exit status 2; a job or network failure
(the job failed in the enclave, no miner, the miner lost, the chain refused a transaction: the
line gives its reason) with one line and status 1; never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio

from phala_p2p import cli_chain
from phala_p2p.cli_chain import NodeStartFailed, add_connection_options, await_network, fail
from phala_p2p.config import NodeConfig, Role
from phala_p2p.errors import AttestationError, NegotiationFailed, P2PError, UsageError
from phala_p2p.genesis_dir import DEFAULT_BALANCE, DEFAULT_STAKE, GenesisDir
from phala_p2p.net.batching import with_ready

if TYPE_CHECKING:
    from phala_p2p.chain.block import Block
    from phala_p2p.market.directory import Advert
    from phala_p2p.node import Node
    from phala_p2p.progress import ProgressView
    from phala_p2p.services.jobs import JobExecutionFailed, JobProgress, JobResult

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
    node.add_argument(
        "--dashboard", metavar="HOST:PORT", help="serve the live dashboard there (port 0: any)"
    )
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

    job = sub.add_parser("job", help="confidential jobs")
    job_sub = job.add_subparsers(dest="job_command", required=True)
    run = job_sub.add_parser(
        "run",
        help="run a WebAssembly job in a miner's enclave",
        description="Start a client node, find a miner, run MODULE on the input in its "
        "enclave, settle on chain, stop. The output goes to --output (written as it arrives "
        "to a temporary name, renamed at the end) or to stdout; progress and the summary go "
        "to stderr. Exit status: 0 done, 1 the job or the network failed, 2 a usage error.",
    )
    run.add_argument("module", type=Path, metavar="MODULE", help="a .wasm binary or .wat text")
    run.add_argument("--input", required=True, metavar="FILE", help="the job's input; - for stdin")
    run.add_argument("--output", type=Path, metavar="FILE", help="default: stdout")
    run.add_argument(
        "--input-size",
        type=int,
        metavar="BYTES",
        help="for a pipe (stdin, a FIFO): at most this many bytes will come "
        f"(default {DEFAULT_PIPE_LIMIT >> 30} GiB); a file's size is known",
    )
    run.add_argument(
        "--max-fuel", type=int, default=DEFAULT_MAX_FUEL, metavar="N", help="default 10^9"
    )
    run.add_argument(
        "--max-price", type=int, metavar="N", help="per million fuel; default: the miner's price"
    )
    run.add_argument("--miner", metavar="PEER_ID", help="default: the best-ranked miner")
    run.add_argument(
        "--deadline", type=float, default=300.0, metavar="S", help="seconds; default 300"
    )
    add_connection_options(
        run, wait_help="seconds to wait for a bootstrap peer, the chain and a miner"
    )
    run.add_argument("-q", "--quiet", action="store_true", help="no progress, no summary")
    run.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="the summary as one JSON object on stdout (also for a job that failed in the "
        "enclave: its fuel is settled); needs --output",
    )

    cli_chain.add_parsers(sub)

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
    if args.dashboard is not None:
        changes["dashboard"] = args.dashboard
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


WRITE_BATCH = 256  # event lines written at most per worker-thread call


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
            # Whatever else is queued goes out in the same write: one worker thread per
            # batch, not per line (a directory that changes 20 times in a second is 20 events).
            lines = with_ready(line, self._recv, WRITE_BATCH)
            await _write_in_thread("\n".join(lines))
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
            "dashboard": node.dashboard_url,
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
            if node.dashboard_url:
                print(f"  dashboard on {node.dashboard_url}", flush=True)
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


# -- job run ------------------------------------------------------------------------------

PIECE: Final = 256 * 1024  # input is read, and sent, in pieces of this size
DEFAULT_MAX_FUEL: Final = 1_000_000_000
DEFAULT_PIPE_LIMIT: Final = 4 << 30  # bytes a pipe may carry when --input-size is not given
PIPE_GATHER: Final = 0.05  # seconds a pipe's short reads are gathered into one piece
MAX_DEADLINE: Final = 7 * 24 * 3600.0


class _UserFault(UsageError):
    """A user mistake found while the job runs (exit status 2)."""


class _JobFailure(P2PError):
    """The network, the miner or the local input/output failed the job (exit status 1)."""


class _Source:
    """The job's input, an async iterator of pieces of at most PIECE bytes. A regular file
    is read up to the size it had when opened (which the agreement is for); a pipe (stdin, a
    FIFO) until its end, and it may carry at most ``size`` bytes.

    A read is shielded from cancellation until :meth:`abort`: the job service cancels its
    writer when a connection drops, and a cancellation that lands in a read would end the
    generator it wraps our pieces in, so that after the resume the input would look finished
    (the job silently runs on a truncated input). Shielded, the read completes and its piece
    goes into the session, which resends what was not acknowledged."""

    def __init__(self, label: str, fd: int, size: int, size_known: bool) -> None:
        self.label = label
        self.size = size
        self.size_known = size_known
        self._fd: int | None = fd
        self._stream: trio.lowlevel.FdStream | None = None
        self.read = 0
        self._eof = False
        self._aborted = False
        self._reading: trio.CancelScope | None = None

    def __aiter__(self) -> _Source:
        return self

    def abort(self) -> None:
        """Let a read in progress be cancelled (the job is being stopped)."""
        self._aborted = True
        if self._reading is not None:
            self._reading.cancel()

    async def __anext__(self) -> bytes:
        if self._eof:
            raise StopAsyncIteration
        if self._aborted:
            raise _JobFailure(f"reading {self.label} was stopped")
        self._reading = trio.CancelScope(shield=True)
        try:
            with self._reading:
                piece = await (self._read_file() if self.size_known else self._read_pipe())
        except OSError as err:
            raise _JobFailure(f"cannot read {self.label}: {err.strerror or err}") from err
        finally:
            self._reading = None
        if self._aborted:
            raise _JobFailure(f"reading {self.label} was stopped")
        if not piece:
            self._eof = True
            raise StopAsyncIteration
        if self.read + len(piece) > self.size:
            raise _UserFault(
                f"{self.label} carries more than {self.size} bytes: "
                "give an upper bound with --input-size"
            )
        self.read += len(piece)
        return piece

    async def _read_file(self) -> bytes:
        assert self._fd is not None
        want = min(PIECE, self.size - self.read)
        if want <= 0:
            return b""
        data: bytes = await trio.to_thread.run_sync(os.read, self._fd, want)
        return data

    async def _read_pipe(self) -> bytes:
        if self._stream is None:
            assert self._fd is not None
            self._stream, self._fd = trio.lowlevel.FdStream(self._fd), None
        buf = bytearray(await self._stream.receive_some(PIECE))
        if buf:  # gather what follows closely into one piece: fewer, fuller frames
            with trio.move_on_after(PIPE_GATHER):
                while len(buf) < PIECE:
                    more = await self._stream.receive_some(PIECE - len(buf))
                    if not more:
                        self._eof = True  # after this piece
                        break
                    buf += more
        return bytes(buf)

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()  # restores the fd's blocking mode
            self._stream = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close_now(self) -> None:
        """Close without an event loop (the plan was refused before the job started)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _open_input(name: str, input_size: int | None) -> _Source:
    label = "stdin" if name == "-" else name
    try:
        fd = os.dup(0) if name == "-" else os.open(name, os.O_RDONLY)
    except FileNotFoundError as err:
        raise UsageError(f"input file not found: {name}") from err
    except OSError as err:
        raise UsageError(f"cannot open {label}: {err.strerror or err}") from err
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise UsageError(f"input {name} is a directory")
        if input_size is not None and input_size < 0:
            raise UsageError("--input-size must be >= 0")
        if stat.S_ISREG(info.st_mode):
            size = info.st_size - os.lseek(fd, 0, os.SEEK_CUR)
            if input_size is not None and input_size != size:
                raise UsageError(f"--input-size is for pipes: {label} is a file of {size} bytes")
            return _Source(label, fd, max(0, size), size_known=True)
        size = DEFAULT_PIPE_LIMIT if input_size is None else input_size
        return _Source(label, fd, size, size_known=False)
    except BaseException:
        os.close(fd)
        raise


class _Sink:
    """Where the output goes as it arrives: a temporary file next to ``path``, renamed to
    ``path`` by :meth:`commit` (so a failed job leaves no partial file), or stdout."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._tmp: Path | None = None
        self._file: Any = None
        if path is None:
            return
        if path.is_dir():
            raise UsageError(f"--output {path} is a directory")
        parent = path.parent
        if not parent.is_dir():
            raise UsageError(f"--output {path}: directory {parent} does not exist")
        try:
            fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".part")
        except OSError as err:
            raise UsageError(f"cannot write to {parent}: {err.strerror or err}") from err
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # the permissions a plain open() would give
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb")

    @property
    def label(self) -> str:
        return "stdout" if self.path is None else str(self.path)

    async def write(self, data: bytes) -> None:
        try:
            if self._file is not None:
                await trio.to_thread.run_sync(self._file.write, data)
            else:
                # Abandoned on cancel: a reader that stopped reading must not hold up the
                # exit (see _write_in_thread).
                await trio.to_thread.run_sync(  # type: ignore[call-arg]
                    _write_stdout, data, abandon_on_cancel=True
                )
        except OSError as err:
            raise _JobFailure(
                f"cannot write the output to {self.label}: {err.strerror or err}"
            ) from err

    async def commit(self) -> None:
        """Make the output final: flush it to disk and give it its name."""
        if self._file is None or self._tmp is None or self.path is None:
            return
        file, tmp, path = self._file, self._tmp, self.path

        def finish() -> None:
            file.flush()
            os.fsync(file.fileno())
            file.close()
            os.replace(tmp, path)

        try:
            await trio.to_thread.run_sync(finish)
        except OSError as err:
            raise _JobFailure(f"cannot write the output to {path}: {err.strerror or err}") from err
        self._file = self._tmp = None

    def discard(self) -> None:
        """Remove the temporary file of an output that was not committed."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None


def _write_stdout(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _load_module(path: Path) -> bytes:
    """The module's bytes (a .wat file compiled), checked as the executor checks it: it
    compiles and follows the job ABI."""
    from phala_p2p.errors import InvalidModule
    from phala_p2p.jobs.payload import MAX_MODULE
    from phala_p2p.tee.executor import WasmExecutor

    try:
        if path.stat().st_size > MAX_MODULE:
            raise UsageError(f"module {path} is larger than {MAX_MODULE >> 20} MiB")
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise UsageError(f"module not found: {path}") from err
    except OSError as err:
        raise UsageError(f"cannot read module {path}: {err.strerror or err}") from err
    if not data.startswith(b"\0asm"):
        if path.suffix == ".wasm":
            raise UsageError(f"{path} is not a WebAssembly binary (no \\0asm header)")
        data = _wat2wasm(path, data)
    try:
        WasmExecutor().compile(data)
    except InvalidModule as err:
        raise UsageError(f"{path}: {err}") from err
    return data


def _wat2wasm(path: Path, text: bytes) -> bytes:
    import wasmtime

    try:
        return bytes(wasmtime.wat2wasm(text.decode()))
    except UnicodeDecodeError as err:
        raise UsageError(f"{path} is neither WebAssembly text nor a binary") from err
    except wasmtime.WasmtimeError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        where = next((ln for ln in lines if ln.startswith("-->")), "")
        at = where.rsplit(":", 2)[-2:] if where.count(":") >= 2 else []
        loc = f":{at[0]}:{at[1]}" if len(at) == 2 else ""
        first = lines[0] if lines else "not valid WebAssembly text"
        raise UsageError(f"{path}{loc}: {first}") from err


def _check_peer_id(peer_id: str) -> None:
    import base58

    try:
        raw = base58.b58decode(peer_id)
    except ValueError as err:
        raise UsageError(f"--miner {peer_id!r} is not a peer id (base58)") from err
    if len(raw) < 2 or raw[0] not in (0x00, 0x12) or len(raw) != 2 + raw[1]:
        raise UsageError(f"--miner {peer_id!r} is not a peer id")


@dataclass
class _JobPlan:
    """Everything ``job run`` needs, checked before the node starts."""

    config: NodeConfig
    module: bytes
    source: _Source
    sink: _Sink
    max_fuel: int
    max_price: int | None
    miner: str | None
    deadline: float
    wait: float
    as_json: bool
    quiet: bool


def _job_plan(args: argparse.Namespace) -> _JobPlan:
    as_json = bool(getattr(args, "json", False))
    if as_json and args.output is None:
        raise UsageError("--json prints the summary on stdout: give --output FILE for the output")
    if args.max_fuel < 1:
        raise UsageError("--max-fuel must be >= 1")
    if args.max_price is not None and args.max_price < 0:
        raise UsageError("--max-price must be >= 0")
    if not 0 < args.deadline <= MAX_DEADLINE:
        raise UsageError("--deadline must be in (0, 604800] seconds")
    if not args.wait > 0:
        raise UsageError("--wait must be > 0 seconds")
    if args.miner is not None:
        _check_peer_id(args.miner)
    config = cli_chain.client_config(args, "job run", signs="pay for the job")
    # One job per process: a standing escrow would stay locked until it expired with no
    # later job to draw on it, so this job gets an escrow of its own, refunded at settlement.
    config = config.with_(market=dataclasses.replace(config.market, escrow_jobs=1))
    module = _load_module(args.module)
    source = _open_input(args.input, args.input_size)
    try:
        sink = _Sink(args.output)
    except BaseException:
        source.close_now()
        raise
    return _JobPlan(
        config=config,
        module=module,
        source=source,
        sink=sink,
        max_fuel=args.max_fuel,
        max_price=args.max_price,
        miner=args.miner,
        deadline=args.deadline,
        wait=args.wait,
        as_json=as_json,
        quiet=args.quiet,
    )


class _Status:
    """Progress on stderr that never stalls the node: text waits in a small buffer (a bar
    keeps only its newest state) that a task writes out in a thread."""

    MAX_LINES: Final = 64

    def __init__(self, view: ProgressView | None) -> None:
        self.view = view
        self._pending: list[str] = []
        self._wake = trio.Event()
        self._closing = False
        self._done = trio.Event()

    def note(self, text: str) -> None:
        if self.view is not None:
            self._post(self.view.note(text, trio.current_time()))

    def progress(self, p: JobProgress) -> None:
        if self.view is not None:
            text = self.view.update(p, trio.current_time())
            if text is not None:
                self._post(text)

    def _post(self, text: str) -> None:
        assert self.view is not None
        if self.view.tty:
            self._pending = [text]
        else:
            self._pending.append(text)
            del self._pending[: -self.MAX_LINES]
        self._wake.set()

    async def run(self) -> None:
        try:
            while not (self._closing and not self._pending):
                if not self._pending:
                    await self._wake.wait()
                    self._wake = trio.Event()
                    continue
                text, self._pending = "".join(self._pending), []
                await trio.to_thread.run_sync(  # type: ignore[call-arg]
                    _write_stderr, text, abandon_on_cancel=True
                )
        finally:
            self._done.set()

    async def close(self) -> None:
        """Write what is pending and end the bar's line (waits at most a second)."""
        self._closing = True
        self._wake.set()
        with trio.move_on_after(1.0):
            await self._done.wait()
        if self.view is not None:
            _write_stderr(self.view.finish())


def _write_stderr(text: str) -> None:
    if text:
        sys.stderr.write(text)
        sys.stderr.flush()


def _job_bytes(module: bytes, max_fuel: int, input_size: int) -> int:
    """What the agreement counts: the job header, the module, the input."""
    from phala_p2p.jobs.payload import JobSpec, job_header

    header = job_header(JobSpec(module_len=len(module), max_fuel=max_fuel))
    return len(header) + len(module) + input_size


async def _pick_miner(node: Node, plan: _JobPlan, job_bytes: int, status: _Status) -> Advert:
    market = node.market
    status.note("looking for a miner")
    wait = plan.wait
    if plan.miner is not None:
        # A named miner is taken whatever its advert says: negotiation says why not.
        with trio.move_on_after(wait):
            await node.find_miners(timeout=wait)  # the first pull of adverts
            while (advert := market.directory.by_peer(plan.miner)) is None:
                with trio.move_on_after(1.0):
                    await market.wait_for_change()
            return advert
        raise _JobFailure(
            f"no advert of miner {plan.miner} within {wait:g}s "
            f"({len(market.directory)} adverts known)"
        )
    found: list[Advert] = []
    with trio.move_on_after(wait):
        found = await node.find_miners(
            wait=wait,
            timeout=wait,
            min_free_slots=1,
            input_size=job_bytes,
            fuel=plan.max_fuel,
            max_price=plan.max_price,
        )
    if not found:
        price = "" if plan.max_price is None else f" at {plan.max_price} per million fuel or less"
        raise _JobFailure(
            f"no miner with a free slot for {job_bytes} bytes and {plan.max_fuel} fuel{price} "
            f"within {wait:g}s ({len(market.directory)} adverts known)"
        )
    return found[0]


def _check_funds(node: Node, plan: _JobPlan, advert: Advert) -> None:
    from phala_p2p.chain.settlement import cost

    price = advert.price if plan.max_price is None else plan.max_price
    escrow = max(1, cost(plan.max_fuel, price))
    fees = 2 * node.chain.params.tx_fee  # the escrow and the settlement
    balance = node.chain.state.balance(node.account)
    if balance < escrow + fees:
        raise _UserFault(
            f"account {node.account.hex()[:16]}... holds {balance}: the escrow for "
            f"{plan.max_fuel} fuel at {price} per million needs {escrow} and {fees} in fees "
            "(lower --max-fuel or --max-price)"
        )


def _summary(
    node: Node,
    plan: _JobPlan,
    result: JobResult,
    seconds: float,
    failed: JobExecutionFailed | None = None,
) -> dict[str, Any]:
    """The job as ``--json`` prints it (and the text summary says it): who ran it, the
    agreement, the co-signed receipt's counts, and the settlement as this node's chain has it
    (``settled`` False while it is pending)."""
    receipt, agreement = result.receipt, result.agreement
    settled = node.chain.state.settlement(agreement.id)
    out: dict[str, Any] = {
        "event": "job",
        "ok": failed is None,
        "miner": result.miner,
        "agreement_id": agreement.id.hex(),
        "escrow_id": agreement.terms.escrow_id.hex(),
        "price": agreement.terms.price,
        "max_fuel": agreement.terms.max_fuel,
        "fuel_used": receipt.fuel_used,
        "bytes_in": receipt.bytes_in,
        "bytes_out": receipt.bytes_out,
        "output_hash": receipt.output_hash.hex(),
        "output": None if plan.sink.path is None else str(plan.sink.path),
        "settled": settled is not None,
        "settlement_height": None if settled is None else settled.height,
        "paid": None if settled is None else settled.paid,
        "refunded": None if settled is None else settled.refunded,
        "resumes": result.stats.resumes,
        "seconds": round(seconds, 3),
    }
    if settled is None and result.settlement is not None and not result.settlement.ok:
        out["settlement_error"] = result.settlement.error
    if failed is not None:
        out["error"] = failed.error
        out["text"] = failed.text
    return out


def _print_summary(summary: dict[str, Any]) -> None:
    from phala_p2p.progress import format_bytes

    s = summary
    head = "job done" if s["ok"] else f"job failed ({s['error']})"
    if s["settled"]:
        money = f"paid {s['paid']}, refunded {s['refunded']}, settled at height "
        money += str(s["settlement_height"])
    else:
        money = "settlement pending" + (
            f" (refused: {s['settlement_error']})" if "settlement_error" in s else ""
        )
    lines = [
        f"{head} in {s['seconds']:.1f}s on miner {s['miner']}",
        f"  agreement {s['agreement_id']} at {s['price']} per million fuel",
        f"  fuel used {s['fuel_used']} of {s['max_fuel']}",
        f"  bytes in {s['bytes_in']} ({format_bytes(s['bytes_in'])}), "
        f"out {s['bytes_out']} ({format_bytes(s['bytes_out'])})"
        + (f" to {s['output']}" if s["output"] else ""),
        f"  {money}",
    ]
    if s["resumes"]:
        lines.append(f"  resumed {s['resumes']} time{'s' if s['resumes'] > 1 else ''}")
    print("\n".join(lines), file=sys.stderr, flush=True)


async def _abort_after(source: _Source, seconds: float) -> None:
    await trio.sleep(seconds)
    source.abort()  # a read that waits on a stalled pipe must not outlive the deadline


async def _job_on(node: Node, plan: _JobPlan, status: _Status, nursery: trio.Nursery) -> JobResult:
    await await_network(node, plan.config, plan.wait, status.note)
    job_bytes = _job_bytes(plan.module, plan.max_fuel, plan.source.size)
    advert = await _pick_miner(node, plan, job_bytes, status)
    _check_funds(node, plan, advert)
    status.note(f"miner {advert.peer_id} at {advert.price} per million fuel")
    nursery.start_soon(_abort_after, plan.source, plan.deadline + 5.0)
    try:
        return await node.run_job_stream(
            plan.module,
            plan.source,
            input_size=plan.source.size,
            on_output=plan.sink.write,
            max_fuel=plan.max_fuel,
            max_price=plan.max_price,
            miner=advert,
            deadline=plan.deadline,
            progress=status.progress,
        )
    except NegotiationFailed as err:
        raise _JobFailure(f"no agreement with miner {advert.peer_id}: {err}") from err
    except AttestationError as err:
        raise _JobFailure(f"miner {advert.peer_id} failed attestation: {err}") from err


async def _run_job(plan: _JobPlan) -> int:
    """Start the client node, run the job, stop; the exit status. Every expected failure is
    one line on stderr; Ctrl-C (or SIGTERM) stops the job and exits with 130."""
    from phala_p2p.progress import ProgressView
    from phala_p2p.services.jobs import JobExecutionFailed

    view = None
    if not plan.quiet:
        tty = sys.stderr.isatty()
        try:
            width = os.get_terminal_size(sys.stderr.fileno()).columns if tty else 80
        except OSError:
            width = 80
        view = ProgressView(tty=tty, size_known=plan.source.size_known, width=width)
    status = _Status(view)
    started = time.monotonic()
    summary: dict[str, Any] | None = None
    error: str | None = None
    code = 0
    interrupted = trio.Event()
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    cli_chain.cancel_on_signal,
                    signals,
                    nursery.cancel_scope,
                    interrupted,
                    plan.source.abort,
                )
                nursery.start_soon(status.run)

                async def job(node: Node) -> None:
                    nonlocal summary, code, error
                    try:
                        result = await _job_on(node, plan, status, nursery)
                        await plan.sink.commit()
                        summary = _summary(node, plan, result, time.monotonic() - started)
                    except JobExecutionFailed as err:
                        summary = _summary(node, plan, err.result, time.monotonic() - started, err)
                        code, error = 1, f"job failed: {err.error}: {err.text}"
                    except UsageError as err:
                        code, error = (2 if isinstance(err, _UserFault) else 1), str(err)
                    except (P2PError, OSError, TimeoutError) as err:
                        code, error = 1, str(err) or type(err).__name__

                try:
                    await cli_chain.with_client_node(plan.config, job)
                except NodeStartFailed as err:  # the node itself did not start
                    code, error = 2, str(err)
                await status.close()
                nursery.cancel_scope.cancel()
    finally:
        plan.sink.discard()
        plan.source.abort()
        with trio.CancelScope(shield=True):
            await plan.source.aclose()
    if interrupted.is_set():
        _write_stderr(view.finish() if view is not None else "")
        fail("interrupted")
        return 130
    if summary is not None and plan.as_json:
        print(json.dumps(summary), flush=True)
    elif summary is not None and not plan.quiet and summary["ok"]:
        _print_summary(summary)
    if error is not None:
        fail(error)
    return code


def _launch_devnet(rest: list[str]) -> int:
    """``phala-p2p devnet ...``: become the example launcher (examples/launch.py), so that a
    Ctrl-C reaches it alone and it stops its nodes itself. Every argument is the launcher's
    (a leading ``--`` is dropped)."""
    launcher = Path(__file__).resolve().parent.parent / "examples" / "launch.py"
    if not launcher.exists():
        print("phala-p2p: error: examples/launch.py not found (run from a source checkout)",
              file=sys.stderr)  # fmt: skip
        return 2
    if rest[:1] == ["--"]:
        rest = rest[1:]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, str(launcher), *rest])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # ``devnet`` passes everything on: argparse would take the launcher's flags for its own
    command = [a for a in argv if not a.startswith("-")][:1]
    if command == ["devnet"]:
        at = argv.index("devnet")
        return _launch_devnet(argv[at + 1 :])
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
        elif args.command == "job":
            return int(trio.run(_run_job, _job_plan(args)))
        elif args.command in cli_chain.COMMANDS:
            return cli_chain.run(args)
    except (P2PError, OSError) as err:
        print(f"phala-p2p: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
