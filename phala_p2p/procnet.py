"""A devnet whose nodes are separate OS processes, driven through their control channel.

An in-process devnet (:func:`phala_p2p.testing.open_devnet`) runs every node on one event
loop, which is one core: a few dozen nodes saturate it. Here each node is a
``phala-p2p node --control`` process with its own event loop, as in production::

    async with open_process_devnet(gatekeepers=1, miners=20) as net:
        client = await stack.enter_async_context(open_node(net.local_config("client")))
        net.attach(client)                      # in-process nodes can join
        await net.partition(left, right)        # real connections are closed, both ways
        await net.heal()                        # refusals lifted, cut pairs redialed
        net.miners[0].directory                 # {peer id: advert seq}, kept live

Processes report on stdout (``ready``, ``block``, ``directory``, ``ack`` events; see
:mod:`phala_p2p.control`) and log to ``<root>/<name>.log``. Everything started is stopped
at the end (SIGTERM, then SIGKILL of the process group after ``stop_timeout``), and a node
that dies early fails the devnet's calls with its log's tail.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from phala_p2p.chain.params import ChainParams
from phala_p2p.config import ChainConfig, NodeConfig, Role, TeeConfig
from phala_p2p.control import allow_all, deny_peers, lines_of
from phala_p2p.crypto.identity import derive_identity
from phala_p2p.crypto.keyfile import KEY_FILE_NAME, save_identity
from phala_p2p.errors import P2PError, RemoteError, UsageError
from phala_p2p.node import Node
from phala_p2p.tee.executor import ExecutorLimits
from phala_p2p.tee.measurement import compute_measurement
from phala_p2p.testing import DEV_ROOT_KEY, dev_root_identity, devnet_genesis, wait_until

logger = logging.getLogger(__name__)

NODE_COMMAND = [sys.executable, "-m", "phala_p2p.cli", "node", "--control"]
MAX_HASHES = 100_000  # finalized block hashes a NodeProcess remembers (the newest)


class NodeProcess:
    """One node process: what it reported, and its control channel."""

    def __init__(self, name: str, role: Role, config: NodeConfig, root: Path) -> None:
        self.name = name
        self.role = role
        self.config = config
        self.config_path = root / f"{name}.toml"
        self.log_path = root / f"{name}.log"
        self.proc: trio.Process | None = None
        self.peer_id = ""
        self.listen_addrs: list[str] = []
        self.account = b""
        self.height = 0  # highest finalized block reported
        self.hashes: dict[int, str] = {}  # height -> hash (hex) of each block reported
        self.prefix: tuple[str, ...] = ()  # put before its command (``ip netns exec NS``)
        self.directory: dict[str, int] = {}  # peer id -> advert seq, as last reported
        self.dropped_lines = 0  # event lines the node dropped (it reported how many)
        self.bad_lines = 0  # event lines we could not read
        self.ready = trio.Event()
        self.exited = trio.Event()
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[trio.Event, list[dict[str, Any]]]] = {}

    def __repr__(self) -> str:
        return f"<NodeProcess {self.name} {self.peer_id[-8:]}>"

    @property
    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").rstrip().splitlines()
        except OSError:
            return ""
        return "\n".join(f"    | {line}" for line in text[-lines:])

    async def command(self, cmd: str, *, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
        """Send a control command and return its ``ack``; RemoteError if it failed."""
        proc = self.proc
        if proc is None or proc.stdin is None or not self.running:
            raise RemoteError(f"{self.name} is not running\n{self.log_tail()}")
        ident = next(self._ids)
        done = trio.Event()
        box: list[dict[str, Any]] = []
        self._waiting[ident] = (done, box)
        try:
            line = json.dumps({"id": ident, "cmd": cmd, **args}) + "\n"
            with trio.fail_after(timeout):
                try:
                    await proc.stdin.send_all(line.encode())
                except (trio.BrokenResourceError, trio.ClosedResourceError) as err:
                    raise RemoteError(f"{self.name} closed its control channel") from err
                async with trio.open_nursery() as nursery:

                    async def on_exit() -> None:
                        await self.exited.wait()
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(on_exit)
                    await done.wait()
                    nursery.cancel_scope.cancel()
        except trio.TooSlowError as err:
            raise RemoteError(f"{self.name}: {cmd} not answered within {timeout}s") from err
        finally:
            self._waiting.pop(ident, None)
        if not box:
            raise RemoteError(f"{self.name} exited during {cmd}\n{self.log_tail()}")
        ack = box[0]
        if not ack.get("ok"):
            raise RemoteError(f"{self.name}: {cmd} failed: {ack.get('error')}")
        return ack

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "ready":
            self.peer_id = str(event["peer_id"])
            self.listen_addrs = [str(a) for a in event["listen_addrs"]]
            self.account = bytes.fromhex(event.get("account", ""))
            self.height = int(event.get("height", 0))
            self.ready.set()
        elif kind == "block":
            height = int(event["height"])
            self.height = max(self.height, height)
            if "hash" in event:
                self.hashes[height] = str(event["hash"])
                if len(self.hashes) > MAX_HASHES:
                    del self.hashes[min(self.hashes)]
        elif kind == "directory":
            self.directory = {str(k): int(v) for k, v in event["adverts"].items()}
        elif kind == "dropped":
            self.dropped_lines += int(event["lines"])
        elif kind == "ack" and isinstance(event.get("id"), int):
            waiting = self._waiting.get(event["id"])
            if waiting is not None:
                waiting[1].append(event)
                waiting[0].set()

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        async for line in lines_of(self.proc.stdout, max_line=16 << 20):
            if line:
                self.take_line(line)

    def take_line(self, line: bytes) -> None:
        """One line of the node's stdout: an event is applied, anything else skipped; a
        malformed event is counted in ``bad_lines``, never fatal."""
        try:
            event = json.loads(line)
        except ValueError:
            self.bad_lines += 1
            return
        if not isinstance(event, dict):
            self.bad_lines += 1
            return
        try:
            self._on_event(event)
        except (KeyError, TypeError, ValueError) as err:
            self.bad_lines += 1
            logger.warning("%s: malformed %s event: %s", self.name, event.get("event"), err)


Member = NodeProcess | Node


class ProcessDevnet:
    def __init__(self, nursery: trio.Nursery, root: Path, make_config: Any) -> None:
        self._nursery = nursery
        self.root = root
        self.bootstrap: NodeProcess | None = None
        self.nodes: list[NodeProcess] = []  # every process but the bootstrap node
        self.local: list[Node] = []
        self._make_config = make_config
        self._next_local = 0
        self._cut: set[tuple[str, str]] = set()

    # -- members ---------------------------------------------------------------------------

    def by_role(self, role: Role) -> list[NodeProcess]:
        return [p for p in self.nodes if p.role is role]

    @property
    def gatekeepers(self) -> list[NodeProcess]:
        return self.by_role(Role.GATEKEEPER)

    @property
    def miners(self) -> list[NodeProcess]:
        return self.by_role(Role.MINER)

    @property
    def clients(self) -> list[NodeProcess]:
        return self.by_role(Role.CLIENT)

    @property
    def processes(self) -> list[NodeProcess]:
        return ([self.bootstrap] if self.bootstrap else []) + self.nodes

    def local_config(self, name: str, role: Role = Role.CLIENT) -> NodeConfig:
        """The config of an in-process node joining this devnet, with a funded account."""
        cfg: NodeConfig = self._make_config(None, role, name)
        return cfg

    def attach(self, node: Node) -> None:
        """Count an in-process node as a member (for partitions and heals)."""
        self.local.append(node)

    def directories(self, members: Sequence[Member] | None = None) -> list[dict[str, int]]:
        """Each member's miner directory as peer id -> advert seq (default: every process
        and every attached node that keeps one). Processes report theirs live."""
        chosen: list[Member] = [*self.processes, *self.local] if members is None else [*members]
        out: list[dict[str, int]] = []
        for m in chosen:
            if isinstance(m, NodeProcess):
                out.append(m.directory)
            elif m.has_chain:
                out.append({a.peer_id: a.seq for a in m.market.directory.adverts()})
        return out

    def hold(self, seqs: dict[str, int], members: Sequence[Member] | None = None) -> bool:
        """Whether every directory (of ``members``) holds adverts at least as new as
        ``seqs`` (peer id -> seq)."""
        return all(
            all(view.get(k, -1) >= v for k, v in seqs.items()) for view in self.directories(members)
        )

    async def convergence(self, seqs: dict[str, int], *, timeout: float) -> dict[str, float]:
        """Wait until every member's directory holds ``seqs`` (peer id -> advert seq);
        returns the seconds each took, by member name. TimeoutError names the members
        that did not get there."""
        members: list[Member] = [*self.processes, *self.local]
        names = [m.name if isinstance(m, NodeProcess) else m.config.name for m in members]
        took: dict[str, float] = {}
        start = trio.current_time()

        def done() -> bool:
            for name, member in zip(names, members, strict=True):
                if name not in took and self.hold(seqs, [member]):
                    took[name] = trio.current_time() - start
            return len(took) == len(members)

        try:
            await wait_until(done, timeout)
        except TimeoutError as err:
            missing = sorted(set(names) - set(took))
            raise TimeoutError(f"directories not converged within {timeout}s: {missing}") from err
        return took

    def check(self) -> None:
        """UsageError naming every process that has exited."""
        dead = [p for p in self.processes if p.proc is not None and not p.running]
        if dead:
            tails = "\n".join(f"  {p.name} (exit {p.exit_code}):\n{p.log_tail()}" for p in dead)
            raise UsageError(f"devnet processes exited:\n{tails}")

    # -- partitions ------------------------------------------------------------------------

    async def partition(self, *groups: Sequence[Member]) -> None:
        """Cut the devnet into ``groups``: every member refuses the members of other groups
        and closes its connections to them. Returns once every such connection is closed."""
        if len(groups) < 2:
            raise UsageError("a partition needs at least two groups")
        ids = [{_peer_id(m) for m in g} for g in groups]
        everyone: set[str] = set().union(*ids)
        if sum(len(s) for s in ids) != len(everyone):
            raise UsageError("a member can be in only one group")
        connected = await self._connections([m for g in groups for m in g])
        async with trio.open_nursery() as nursery:
            for group, group_members in zip(ids, groups, strict=True):
                others = everyone - group
                for a in group:
                    for b in connected.get(a, ()):
                        if b in others:
                            self._cut.add((min(a, b), max(a, b)))
                for member in group_members:
                    nursery.start_soon(_deny, member, sorted(others))

    async def heal(self) -> None:
        """Lift every refusal and redial the pairs the partition cut; returns once the dials
        are done."""
        everyone: list[Member] = [*self.processes, *self.local]
        members = {_peer_id(m): m for m in everyone}
        async with trio.open_nursery() as nursery:
            for member in members.values():
                nursery.start_soon(_allow_all, member)
        by_dialer: dict[str, list[str]] = {}
        for a, b in sorted(self._cut):
            if a in members and b in members:
                by_dialer.setdefault(a, []).append(_address(members[b]))
        self._cut.clear()
        async with trio.open_nursery() as nursery:
            for dialer, addrs in by_dialer.items():
                nursery.start_soon(_dial, members[dialer], addrs)

    async def _connections(self, members: Sequence[Member]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}

        async def ask(member: Member) -> None:
            if isinstance(member, Node):
                out[member.peer_id] = member.peers()
            else:
                out[member.peer_id] = (await member.command("peers"))["peers"]

        async with trio.open_nursery() as nursery:
            for m in members:
                nursery.start_soon(ask, m)
        return out


def _peer_id(member: Member) -> str:
    return member.peer_id


def _address(member: Member) -> str:
    addr = member.listen_addrs[0]
    return addr if "/p2p/" in addr else f"{addr}/p2p/{member.peer_id}"


async def _deny(member: Member, peers: list[str]) -> None:
    if isinstance(member, NodeProcess):
        await member.command("deny", peers=peers)
    else:
        await deny_peers(member, peers)


async def _allow_all(member: Member) -> None:
    if isinstance(member, NodeProcess):
        await member.command("allow_all")
    else:
        allow_all(member)


async def _dial(member: Member, addrs: list[str]) -> None:
    if isinstance(member, NodeProcess):
        failed = (await member.command("dial", addrs=addrs))["failed"]
        for addr, err in failed.items():
            logger.info("redial %s -> %s after heal failed: %s", member.name, addr, err)
        return
    for addr in addrs:
        try:
            await member.connect(addr)
        except P2PError as err:
            logger.info("redial -> %s after heal failed: %s", addr, err)


@asynccontextmanager
async def open_process_devnet(
    *,
    gatekeepers: int = 1,
    miners: int = 0,
    clients: int = 0,
    local_accounts: int = 4,
    seed: int | bytes | None = None,
    data_root: str | Path | None = None,
    configure: Callable[[int, NodeConfig], NodeConfig] | None = None,
    chain_params: ChainParams | dict[str, int] | None = None,
    chain: ChainConfig | None = None,
    start_timeout: float = 120.0,
    stop_timeout: float = 10.0,
    command_prefix: Callable[[int, NodeConfig], Sequence[str]] | None = None,
) -> AsyncIterator[ProcessDevnet]:
    """Start a bootstrap node, ``gatekeepers``, ``miners`` and ``clients`` as processes that
    know only the bootstrap node's address, with a genesis where every one of them (and
    ``local_accounts`` in-process nodes, see :meth:`ProcessDevnet.local_config`) is funded
    and node ``i`` of ``1..gatekeepers`` is a gatekeeper. Miners register their simulated
    enclaves on start. Returns once every process is ready (connected to the bootstrap
    node and, if it keeps the chain, at its genesis or beyond).

    ``command_prefix(i, config)`` gives the words put before node ``i``'s command (0 is the
    bootstrap node), e.g. ``ip netns exec NS`` to start it in a network namespace; its
    ``config`` is what ``configure`` returned (set ``listen`` there to an address that the
    other namespaces can reach, see :mod:`phala_p2p.netns`)."""
    if gatekeepers < 1:
        raise UsageError("a process devnet needs at least one gatekeeper")
    if min(miners, clients, local_accounts) < 0:
        raise UsageError("node counts must be >= 0")
    roles = [Role.GATEKEEPER] * gatekeepers + [Role.MINER] * miners + [Role.CLIENT] * clients
    own_root = data_root is None
    root = Path(tempfile.mkdtemp(prefix="phala-procnet-")) if data_root is None else Path(data_root)
    root.mkdir(parents=True, exist_ok=True)
    seed_bytes = seed if seed is not None else os.urandom(16)
    dev_root_path = root / DEV_ROOT_KEY
    save_identity(dev_root_path, dev_root_identity(seed_bytes))
    genesis_path = root / "genesis.toml"
    devnet_genesis(
        seed_bytes,
        gatekeepers=gatekeepers,
        accounts=len(roles) + 1 + local_accounts,
        params=chain_params,
        attestation_roots=(dev_root_identity(seed_bytes).public_key,),
        allowed_measurements=(compute_measurement(ExecutorLimits()),),
    ).write_toml(genesis_path)
    chain_config = chain or ChainConfig()
    bootstrap_addr: list[str] = []
    local_index = itertools.count(len(roles) + 1)

    def make_config(i: int | None, role: Role, name: str = "") -> NodeConfig:
        if i is None:  # an in-process node: the next local account
            i = next(local_index)
            if i > len(roles) + local_accounts:
                raise UsageError(f"only {local_accounts} local accounts (local_accounts=)")
        data_dir = root / f"node-{i}"
        if not (data_dir / KEY_FILE_NAME).exists():
            save_identity(data_dir / KEY_FILE_NAME, derive_identity(seed_bytes, i))
        cfg = NodeConfig(
            role=role,
            data_dir=data_dir,
            bootstrap=tuple(bootstrap_addr),
            name=name or f"{role.value}-{i}",
            genesis=genesis_path,
            chain=chain_config,
            tee=TeeConfig(dev_root_key=dev_root_path, register=True),
        )
        return configure(i, cfg) if configure else cfg

    try:
        async with trio.open_nursery() as nursery:
            net = ProcessDevnet(nursery, root, make_config)
            try:
                await _start_all(
                    nursery, net, make_config, roles, bootstrap_addr, start_timeout, command_prefix
                )
                yield net
            finally:  # also when starting failed: nothing started may outlive the devnet
                with trio.CancelScope(shield=True):
                    await _stop(net.processes, stop_timeout)
                nursery.cancel_scope.cancel()
    finally:
        if own_root:
            shutil.rmtree(root, ignore_errors=True)


async def _start_all(
    nursery: trio.Nursery,
    net: ProcessDevnet,
    make_config: Callable[..., NodeConfig],
    roles: list[Role],
    bootstrap_addr: list[str],
    timeout: float,
    command_prefix: Callable[[int, NodeConfig], Sequence[str]] | None = None,
) -> None:
    def prefixed(p: NodeProcess, i: int) -> NodeProcess:
        if command_prefix is not None:
            p.prefix = tuple(command_prefix(i, p.config))
        return p

    try:
        with trio.fail_after(timeout):
            boot = prefixed(
                NodeProcess(
                    "bootstrap-0", Role.BOOTSTRAP, make_config(0, Role.BOOTSTRAP), net.root
                ),
                0,
            )
            net.bootstrap = boot
            await _start(nursery, boot)
            bootstrap_addr.append(_address(boot))
            net.nodes = [
                prefixed(NodeProcess(f"{r.value}-{i}", r, make_config(i, r), net.root), i)
                for i, r in enumerate(roles, start=1)
            ]
            async with trio.open_nursery() as starting:
                for p in net.nodes:
                    starting.start_soon(_start, nursery, p)
    except trio.TooSlowError as err:
        waiting = [p.name for p in net.processes if not p.ready.is_set()]
        raise UsageError(f"devnet processes not ready within {timeout}s: {waiting}") from err


async def _start(nursery: trio.Nursery, p: NodeProcess) -> None:
    p.config.write_toml(p.config_path)
    with p.log_path.open("ab") as log:
        p.proc = await trio.lowlevel.open_process(
            [*p.prefix, *NODE_COMMAND, "--config", str(p.config_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,  # its enclave joins its process group
        )

    async def watch() -> None:
        assert p.proc is not None
        try:
            await p._read()
            await p.proc.wait()
        finally:
            p.exited.set()

    nursery.start_soon(watch)
    async with trio.open_nursery() as waiting:

        async def died() -> None:
            await p.exited.wait()
            waiting.cancel_scope.cancel()

        waiting.start_soon(died)
        await p.ready.wait()
        waiting.cancel_scope.cancel()
    if not p.ready.is_set():
        raise UsageError(f"{p.name} exited before it was ready:\n{p.log_tail()}")


async def _stop(processes: list[NodeProcess], timeout: float) -> None:
    running = [p for p in processes if p.proc is not None and p.running]
    for p in running:
        assert p.proc is not None
        p.proc.send_signal(signal.SIGTERM)
    with trio.move_on_after(timeout):
        await wait_until(lambda: all(not p.running for p in running), timeout)
    for p in running:
        assert p.proc is not None
        if p.proc.returncode is None:  # not reaped: its pid (and group id) is still ours
            logger.warning("%s did not stop within %ss: killing its process group", p.name, timeout)
            try:  # the node and whatever it started (its enclave)
                os.killpg(p.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        await p.proc.wait()
