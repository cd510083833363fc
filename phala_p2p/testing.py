"""Devnets for tests and experiments: real hosts on 127.0.0.1, real partitions.

    from phala_p2p.testing import open_devnet, wait_until

    async with open_devnet(peers=10, seed=7) as net:
        await net.partition(net.nodes[:5], net.nodes[5:])   # connections cut, dials denied
        await net.heal()
        node = await net.restart(net.nodes[0])               # same identity and data_dir

Every node listens on ``/ip4/127.0.0.1/tcp/0``; a bootstrap node is started first and every
other node knows only its address. ``partition`` denies every pair across groups on both
nodes' gates and closes their connections; a node in no group (the bootstrap node, unless
listed) is cut off from all of them. ``heal`` lifts the denials and redials the pairs that
were connected before.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from phala_p2p.chain.params import ChainParams, Genesis
from phala_p2p.config import ChainConfig, DiscoveryConfig, NodeConfig, Role, TeeConfig
from phala_p2p.crypto.identity import Identity, derive_identity
from phala_p2p.crypto.keyfile import KEY_FILE_NAME, save_identity
from phala_p2p.errors import P2PError, UsageError
from phala_p2p.net.health import HealthConfig
from phala_p2p.node import Node, open_node
from phala_p2p.tee.executor import ExecutorLimits
from phala_p2p.tee.measurement import compute_measurement

logger = logging.getLogger(__name__)


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float = 10.0,
    *,
    message: str = "",
) -> float:
    """Wait until ``predicate()`` is true; returns the seconds it took.

    Raises ``TimeoutError`` naming the condition when ``timeout`` passes first. The
    predicate may be sync or async; it is checked at every scheduler turn at first, then
    with a short backoff (at most 10 ms), so it never busy-waits for long.
    """
    start = trio.current_time()
    delay = 0.0
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return trio.current_time() - start
        if trio.current_time() - start > timeout:
            what = message or getattr(predicate, "__name__", "condition")
            raise TimeoutError(f"{what} not reached within {timeout}s")
        await trio.sleep(delay)
        delay = min(max(delay * 2, 0.0005), 0.01)


class _Awaitable:
    """A step that has already begun; ``await`` it to wait for its completion."""

    def __init__(self, done: trio.Event) -> None:
        self._done = done

    def __await__(self) -> Generator[Any, None, None]:
        return self._done.wait().__await__()


@dataclass
class _Slot:
    config: NodeConfig
    node: Node | None = None
    stop: trio.Event = field(default_factory=trio.Event)
    stopped: trio.Event = field(default_factory=trio.Event)


class Devnet:
    """A set of running nodes. Made by :func:`open_devnet`."""

    def __init__(self, nursery: trio.Nursery, root: Path) -> None:
        self._nursery = nursery
        self.root = root
        self.bootstrap: Node | None = None
        self.nodes: list[Node] = []
        self._slots: dict[str, _Slot] = {}
        self._groups: list[set[str]] | None = None
        self._cut_pairs: set[tuple[str, str]] = set()
        self.genesis: Genesis | None = None

    def by_role(self, role: Role) -> list[Node]:
        return [n for n in self.nodes if n.role is role]

    @property
    def gatekeepers(self) -> list[Node]:
        return self.by_role(Role.GATEKEEPER)

    @property
    def miners(self) -> list[Node]:
        return self.by_role(Role.MINER)

    @property
    def clients(self) -> list[Node]:
        return self.by_role(Role.CLIENT)

    @property
    def running(self) -> list[Node]:
        """Nodes (bootstrap included) that are running now."""
        return [n for n in self.all_nodes if self._slots[n.peer_id].node is n]

    @property
    def all_nodes(self) -> list[Node]:
        """Every running node, the bootstrap node first."""
        return ([self.bootstrap] if self.bootstrap else []) + list(self.nodes)

    def node(self, peer_id: str) -> Node:
        for n in self.all_nodes:
            if n.peer_id == peer_id:
                return n
        raise UsageError(f"no node {peer_id} in this devnet")

    # -- lifecycle -------------------------------------------------------------------------

    async def start_node(self, config: NodeConfig) -> Node:
        slot = _Slot(config)
        node: Node = await self._nursery.start(self._run_slot, slot)
        self._slots[node.peer_id] = slot
        if self._groups is not None:
            self._apply_gates(node)
        return node

    async def _run_slot(self, slot: _Slot, task_status: Any) -> None:
        try:
            async with open_node(slot.config) as node:
                slot.node = node
                task_status.started(node)
                await slot.stop.wait()
        finally:
            slot.stopped.set()

    async def stop(self, node: Node) -> None:
        """Stop ``node`` (its data_dir stays) and wait until it has shut down."""
        slot = self._slots.get(node.peer_id)
        if slot is None or slot.node is not node:
            raise UsageError(f"{node} is not running in this devnet")
        slot.stop.set()
        await slot.stopped.wait()
        slot.node = None

    async def restart(self, node: Node) -> Node:
        """Start a stopped (or running) node again with the same identity and data_dir."""
        slot = self._slots.get(node.peer_id)
        if slot is None:
            raise UsageError(f"{node} does not belong to this devnet")
        if slot.node is not None:
            await self.stop(node)
        fresh = await self.start_node(slot.config)
        for lst in (self.nodes,):
            if node in lst:
                lst[lst.index(node)] = fresh
        if self.bootstrap is node:
            self.bootstrap = fresh
        if self.bootstrap is not None and fresh is not self.bootstrap:
            addr = self.bootstrap.listen_addrs[0]
            if self._allowed(fresh.peer_id, self.bootstrap.peer_id):
                await fresh.connect(addr)
        return fresh

    def advert_seqs(self) -> dict[bytes, int]:
        """Each miner's latest own advert: enclave key -> seq (compare with
        ``node.market.directory.covers``)."""
        out = {}
        for m in self.miners:
            if m.market.advert is None:
                raise UsageError(f"{m} has not advertised yet")
            advert = m.market.advert.decode()
            out[advert.enclave] = advert.seq
        return out

    # -- partitions ------------------------------------------------------------------------

    def _allowed(self, a: str, b: str) -> bool:
        if self._groups is None:
            return True
        return any(a in g and b in g for g in self._groups)

    def _apply_gates(self, node: Node) -> None:
        for other in self.all_nodes:
            if other is not node and not self._allowed(node.peer_id, other.peer_id):
                node.gate.deny(other.peer_id)
                other.gate.deny(node.peer_id)

    def partition(self, *groups: Sequence[Node]) -> _Awaitable:
        """Cut the devnet into ``groups``: deny and disconnect every pair across groups.

        Gates apply at once; ``await`` the result to wait until every connection across
        groups is closed.
        """
        if len(groups) < 2:
            raise UsageError("a partition needs at least two groups")
        sets = [{n.peer_id for n in g} for g in groups]
        seen: set[str] = set()
        for s in sets:
            if s & seen:
                raise UsageError("a node can be in only one group")
            seen |= s
        self._groups = sets
        nodes = self.all_nodes
        for node in nodes:
            self._apply_gates(node)
        done = trio.Event()

        async def cut() -> None:
            async with trio.open_nursery() as n:
                for a in nodes:
                    for peer in a.peers():
                        if not self._allowed(a.peer_id, peer):
                            self._cut_pairs.add((a.peer_id, peer))
                            n.start_soon(a.disconnect, peer)
            done.set()

        self._nursery.start_soon(cut)
        return _Awaitable(done)

    def heal(self) -> _Awaitable:
        """Lift the partition and redial the pairs it cut; ``await`` to wait for the dials."""
        self._groups = None
        nodes = self.all_nodes
        for node in nodes:
            node.gate.allow_all()
            node.host.get_network().clear_dial_failures()
        pairs = {tuple(sorted(p)) for p in self._cut_pairs}
        self._cut_pairs.clear()
        done = trio.Event()

        async def redial() -> None:
            async with trio.open_nursery() as n:
                for a_id, b_id in pairs:
                    try:
                        a, b = self.node(a_id), self.node(b_id)
                    except UsageError:
                        continue  # stopped meanwhile
                    n.start_soon(self._redial, a, b)
            done.set()

        self._nursery.start_soon(redial)
        return _Awaitable(done)

    async def _redial(self, a: Node, b: Node) -> None:
        if a.is_connected(b.peer_id):
            return
        try:
            await a.connect(b.listen_addrs[0])
        except P2PError as err:
            logger.info("redial %s -> %s after heal failed: %s", a, b, err)


DEVNET_BALANCE = 1_000_000_000
DEV_ROOT_KEY = "dev-root.key"


def dev_root_identity(seed: int | bytes) -> Identity:
    """The simulated platform's attestation root of a devnet made with ``seed``."""
    base = seed if isinstance(seed, bytes) else str(seed).encode()
    return derive_identity(base + b"/dev-attestation-root", 0)


DEVNET_STAKE = 100_000


def devnet_genesis(
    seed: int | bytes,
    *,
    gatekeepers: int,
    accounts: int,
    params: ChainParams | dict[str, int] | None = None,
    balance: int = DEVNET_BALANCE,
    stake: int = DEVNET_STAKE,
    stakes: Sequence[int] | None = None,
    chain_id: str | None = None,
    **extra: Any,
) -> Genesis:
    """The genesis of a devnet made with ``seed``: node ``i`` (1..gatekeepers) is a
    gatekeeper with ``stake`` (or ``stakes[i-1]``); nodes 0..accounts-1 are funded."""
    if gatekeepers < 1:
        raise UsageError("a chain needs at least one gatekeeper")
    if stakes is not None and len(stakes) != gatekeepers:
        raise UsageError("stakes must name one stake per gatekeeper")
    if isinstance(params, dict):
        params = ChainParams().with_changes(params)
    base = seed if isinstance(seed, bytes) else str(seed).encode()
    keepers = tuple(
        (derive_identity(seed, i).public_key, stakes[i - 1] if stakes else stake)
        for i in range(1, gatekeepers + 1)
    )
    funded = tuple((derive_identity(seed, i).public_key, balance) for i in range(accounts))
    return Genesis(
        chain_id=chain_id or "devnet-" + hashlib.blake2b(base, digest_size=4).hexdigest(),
        genesis_time=int(time.time()) - 1,
        gatekeepers=keepers,
        accounts=funded,
        params=params or ChainParams(),
        **extra,
    )


@asynccontextmanager
async def open_devnet(
    peers: int | None = None,
    *,
    gatekeepers: int = 0,
    miners: int = 0,
    clients: int = 0,
    seed: int | bytes | None = None,
    role: Role = Role.CLIENT,
    data_root: str | Path | None = None,
    configure: Callable[[int, NodeConfig], NodeConfig] | None = None,
    full_mesh: bool = True,
    connect_timeout: float = 20.0,
    genesis: Genesis | None = None,
    chain_params: ChainParams | dict[str, int] | None = None,
    chain: ChainConfig | None = None,
    genesis_stakes: Sequence[int] | None = None,
    key_custody: bool = False,
) -> AsyncIterator[Devnet]:
    """Start a bootstrap node, then ``gatekeepers``, ``miners`` and ``clients`` (and
    ``peers`` more nodes of ``role``); every node knows only the bootstrap node's address.

    With gatekeepers (or a ``genesis``) every node keeps the chain: the devnet writes a
    genesis where node ``i`` of ``1..gatekeepers`` is a gatekeeper and every node's account
    is funded (``chain_params`` overrides chain parameters, ``genesis_stakes`` sets each
    gatekeeper's stake). With ``key_custody`` gatekeepers run key-manager enclaves.
    ``peers`` defaults to 4 when no role is counted, else 0.

    ``seed`` makes identities reproducible; ``data_root`` keeps data dirs (a temporary
    folder, removed at the end, otherwise). ``configure(i, cfg)`` may adjust each node's
    config. With ``full_mesh`` the devnet returns once every node is connected to every
    other (as discovery makes it); otherwise once each is connected to the bootstrap node.
    """
    if peers is None:
        peers = 4 if gatekeepers + miners + clients == 0 else 0
    if min(peers, gatekeepers, miners, clients) < 0:
        raise UsageError("node counts must be >= 0")
    roles = (
        [Role.GATEKEEPER] * gatekeepers
        + [Role.MINER] * miners
        + [Role.CLIENT] * clients
        + [role] * peers
    )
    own_root = data_root is None
    root = Path(tempfile.mkdtemp(prefix="phala-devnet-")) if data_root is None else Path(data_root)
    root.mkdir(parents=True, exist_ok=True)
    seed_bytes = seed if seed is not None else os.urandom(16)
    genesis_path: Path | None = None
    dev_root_path = root / DEV_ROOT_KEY
    if not dev_root_path.exists():
        save_identity(dev_root_path, dev_root_identity(seed_bytes))
    if genesis is not None or gatekeepers > 0:
        genesis_path = root / "genesis.toml"
        if genesis is None and genesis_path.exists():
            genesis = Genesis.from_toml(genesis_path)
        if genesis is None:
            genesis = devnet_genesis(
                seed_bytes,
                gatekeepers=gatekeepers,
                accounts=len(roles) + 1,
                params=chain_params,
                stakes=genesis_stakes,
                attestation_roots=(dev_root_identity(seed_bytes).public_key,),
                allowed_measurements=(compute_measurement(ExecutorLimits()),),
            )
        genesis.write_toml(genesis_path)
    chain_config = chain or ChainConfig()
    total = len(roles)
    discovery = DiscoveryConfig(target_peers=max(1, total), interval=0.5)
    # Every node of an in-process devnet shares one event loop (and, here, two cores):
    # a heavy test can delay a ping by seconds, so pings here forgive more than the
    # default (one node per process). Pass ``configure`` to test health itself.
    health = HealthConfig(interval=1.0, dead_after=15.0)
    try:
        async with trio.open_nursery() as nursery:
            net = Devnet(nursery, root)
            net.genesis = genesis

            def make_config(i: int, node_role: Role, bootstrap: tuple[str, ...]) -> NodeConfig:
                data_dir = root / f"node-{i}"
                if not (data_dir / KEY_FILE_NAME).exists():
                    save_identity(data_dir / KEY_FILE_NAME, derive_identity(seed_bytes, i))
                cfg = NodeConfig(
                    role=node_role,
                    data_dir=data_dir,
                    bootstrap=bootstrap,
                    name=f"{node_role.value}-{i}",
                    discovery=discovery,
                    health=health,
                    genesis=genesis_path,
                    chain=chain_config,
                    tee=TeeConfig(
                        dev_root_key=dev_root_path,
                        register=genesis_path is not None,
                        key_manager=key_custody,
                    ),
                )
                return configure(i, cfg) if configure else cfg

            net.bootstrap = await net.start_node(make_config(0, Role.BOOTSTRAP, ()))
            boot_addr = (net.bootstrap.listen_addrs[0],)
            async with trio.open_nursery() as starting:

                async def start(i: int) -> None:
                    node = await net.start_node(make_config(i, roles[i - 1], boot_addr))
                    net.nodes.append(node)

                for i in range(1, total + 1):
                    starting.start_soon(start, i)
            net.nodes.sort(key=lambda n: n.config.name.rsplit("-", 1)[-1].zfill(6))
            everyone = net.all_nodes

            def connected() -> bool:
                if full_mesh:
                    return all(len(n.peers()) >= len(everyone) - 1 for n in everyone)
                return all(n.is_connected(net.bootstrap.peer_id) for n in net.nodes)  # type: ignore[union-attr]

            await wait_until(connected, connect_timeout, message="devnet connectivity")
            try:
                yield net
            finally:
                nursery.cancel_scope.cancel()
    finally:
        if own_root:
            shutil.rmtree(root, ignore_errors=True)
