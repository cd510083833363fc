"""Node lifecycle, identity, config, health checks, metrics."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from libp2p.peer.id import ID

from phala_p2p import NodeConfig, Role, open_node
from phala_p2p.errors import UsageError
from phala_p2p.net.host import HostLimits
from phala_p2p.testing import open_devnet, wait_until


async def test_listen_addrs_are_full_multiaddrs() -> None:
    async with open_node(NodeConfig()) as node:
        assert node.listen_addrs
        for addr in node.listen_addrs:
            assert addr.startswith("/ip4/127.0.0.1/tcp/")
            assert addr.endswith(f"/p2p/{node.peer_id}")


# py-libp2p 0.8.1's WebSocket dialer leaves its TCP socket to the garbage collector after
# the connection closes (the TCP transport does not); collect it here, inside this test.
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_websocket_listener_connects() -> None:
    cfg = NodeConfig(listen=("/ip4/127.0.0.1/tcp/0/ws",))
    async with open_node(cfg) as a, open_node(cfg) as b:
        ws = [x for x in b.listen_addrs if "/ws/" in x]
        assert ws
        await a.connect(ws[0])
        assert a.is_connected(b.peer_id)

        async def echo(peer: str, req: bytes) -> bytes:
            return req

        b.serve("/test/echo/1.0.0", echo)
        assert await a.request(b.peer_id, "/test/echo/1.0.0", b"over ws", timeout=5) == b"over ws"
    gc.collect()


def _task_count() -> int:
    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(count(t) for n in task.child_nurseries for t in n.child_tasks)

    return count(trio.lowlevel.current_root_task())


async def test_shutdown_is_quick_and_leaves_no_tasks() -> None:
    before = _task_count()
    async with open_node(NodeConfig()) as a, open_node(NodeConfig()) as b:
        await a.connect(b.listen_addrs[0])
        assert _task_count() > before + 5
        start = trio.current_time()
    assert trio.current_time() - start < 2.0
    assert _task_count() == before


async def test_restart_keeps_peer_id(tmp_path: Path) -> None:
    cfg = NodeConfig(data_dir=tmp_path / "n")
    async with open_node(cfg) as node:
        first = node.peer_id
    assert (tmp_path / "n" / "identity.key").stat().st_mode & 0o777 == 0o600
    async with open_node(cfg) as node:
        assert node.peer_id == first
    async with open_node(NodeConfig()) as other:
        assert other.peer_id != first


async def test_world_readable_key_is_refused(tmp_path: Path) -> None:
    cfg = NodeConfig(data_dir=tmp_path / "n")
    async with open_node(cfg):
        pass
    os.chmod(tmp_path / "n" / "identity.key", 0o644)
    with pytest.raises(UsageError, match="chmod"):
        async with open_node(cfg):
            pass


async def test_devnet_restart_keeps_identity_and_reconnects() -> None:
    async with open_devnet(peers=3, seed=11) as net:
        node = net.nodes[1]
        pid = node.peer_id
        await net.stop(node)
        fresh = await net.restart(node)
        assert fresh.peer_id == pid
        assert net.nodes[1] is fresh
        await wait_until(lambda: len(fresh.peers()) == 3, 15, message="rejoin")


async def test_connect_dials_past_a_closed_connection_still_listed() -> None:
    """py-libp2p lists a closed connection for a while after it closes, and its
    ``host.connect`` takes the listed one for a connection: ``Node.connect`` must dial."""
    async with open_devnet(peers=2, seed=13) as net:
        a, b = net.nodes[0], net.nodes[1]

        async def echo(peer: str, req: bytes) -> bytes:
            return req

        b.serve("/test/echo/1.0.0", echo)
        await wait_until(lambda: a.is_connected(b.peer_id), 15, message="connected")
        network = a.host.get_network()
        peer = ID.from_base58(b.peer_id)
        closed = list(network.get_connections(peer))
        assert closed
        await a.disconnect(b.peer_id)
        assert all(c.is_closed for c in closed)
        network.connections[peer] = closed  # still listed, as in py-libp2p's window
        assert not a.is_connected(b.peer_id)
        await a.connect(b.listen_addrs[0])
        assert a.is_connected(b.peer_id)
        assert await a.request(b.peer_id, "/test/echo/1.0.0", b"ping", timeout=10) == b"ping"


async def test_a_redial_replaces_a_connection_the_other_side_still_holds() -> None:
    """A peer that dropped a connection it dialed (on its side only: the other has not
    noticed yet) and dials again gets the new connection: a redial is not a simultaneous
    connect, where both sides keep the connection the smaller peer id dialed."""
    async with open_devnet(peers=2, seed=13) as net:
        # the listener has the smaller id: the tie-break of a simultaneous connect would
        # keep its existing connection and close the redial
        listener, dialer = sorted(net.nodes[:2], key=lambda n: n.peer_id)

        async def echo(peer: str, req: bytes) -> bytes:
            return req

        listener.serve("/test/echo/1.0.0", echo)
        addr = listener.listen_addrs[0]
        network = dialer.host.get_network()
        peer = ID.from_base58(listener.peer_id)

        def dialed_by_dialer() -> bool:
            return [c.direction.name for c in network.connections.get(peer, [])] == ["OUTBOUND"]

        # The listener may dial back at the same moment (its auto-connector saw the peer
        # go): that simultaneous connect keeps the listener's connection. Try again then.
        for _ in range(5):
            await dialer.disconnect(listener.peer_id)
            await dialer.connect(addr)
            with contextlib.suppress(TimeoutError):  # judged just below
                await wait_until(lambda: len(network.connections.get(peer, [])) == 1, 10)
            if dialed_by_dialer():
                break
        await wait_until(dialed_by_dialer, 10, message="one connection, dialed by the dialer")
        abandoned = network.connections.pop(peer)  # dropped on this side only, not closed
        with trio.fail_after(10):  # as a job client does: dial until connected
            while not dialer.is_connected(listener.peer_id):
                await dialer.connect(addr)
                await wait_until(lambda: all(c.is_closed for c in abandoned), 5, message="closed")
        assert await dialer.request(listener.peer_id, "/test/echo/1.0.0", b"x", timeout=10) == b"x"


async def test_one_bootstrap_address_is_enough_to_find_everyone() -> None:
    async with open_devnet(peers=5, seed=12, full_mesh=False) as net:
        await wait_until(
            lambda: all(len(n.peers()) == 5 for n in net.nodes),
            20,
            message="discovery of every peer",
        )
        roles = net.nodes[0].discovery.roles
        assert roles.get(net.bootstrap.peer_id) == "bootstrap"


async def test_inbound_connections_past_max_connections_over_a_lifetime_are_accepted() -> None:
    """py-libp2p held a slot of the inbound limit (max_connections) for every inbound
    connection until the swarm stopped: after max_connections of them in the node's life,
    closed or not, every new one was refused."""
    limits = HostLimits(max_connections=3)
    async with open_node(NodeConfig(limits=limits)) as listener, open_node(NodeConfig()) as dialer:
        listener.serve("/test/echo/1.0.0", _echo)
        for i in range(3 * limits.max_connections):
            with trio.fail_after(10):
                await dialer.connect(listener.listen_addrs[0])
                reply = await dialer.request(listener.peer_id, "/test/echo/1.0.0", b"%d" % i)
            assert reply == b"%d" % i
            await dialer.disconnect(listener.peer_id)
            await wait_until(
                lambda: not listener.is_connected(dialer.peer_id), 10, message="disconnected"
            )


async def _echo(peer: str, request: bytes) -> bytes:
    return request


def test_config_validation_and_toml(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown role"):
        NodeConfig(role="wizard")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="/p2p/"):
        NodeConfig(bootstrap=("/ip4/127.0.0.1/tcp/4001",))
    with pytest.raises(UsageError, match="not a multiaddr"):
        NodeConfig(listen=("nonsense",))
    path = tmp_path / "miner.toml"
    path.write_text(
        '[node]\nrole = "miner"\nlisten = ["/ip4/127.0.0.1/tcp/0"]\ndata_dir = "data"\n'
        "[gossip]\ndegree = 8\ndegree_high = 12\n[health]\ndead_after = 3.0\n"
    )
    cfg = NodeConfig.from_toml(path)
    assert cfg.role is Role.MINER
    assert cfg.gossip.degree == 8
    assert cfg.health.dead_after == 3.0
    assert cfg.data_dir == tmp_path / "data"
    path.write_text('[node]\nrole = "miner"\ncolour = "blue"\n')
    with pytest.raises(UsageError, match="colour"):
        NodeConfig.from_toml(path)
    with pytest.raises(UsageError, match="not found"):
        NodeConfig.from_toml(tmp_path / "absent.toml")


async def test_metrics_and_prometheus_endpoint() -> None:
    async with open_node(NodeConfig(metrics_port=0)) as a, open_node(NodeConfig()) as b:
        await a.connect(b.listen_addrs[0])
        await wait_until(lambda: a.metrics.peers == 1, 5)
        assert a.metrics_port
        stream = await trio.open_tcp_stream("127.0.0.1", a.metrics_port)
        async with stream:
            await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            body = b""
            while chunk := await stream.receive_some(65536):
                body += chunk
        assert b"200 OK" in body
        assert b"phala_p2p_peers 1.0" in body


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs POSIX signals")
async def test_frozen_peer_process_is_dropped_within_5s(tmp_path: Path) -> None:
    proc = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "phala_p2p.cli",
            "--json",
            "node",
            "--role",
            "client",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = b""
        with trio.fail_after(30):
            while not line.endswith(b"\n"):
                line += await proc.stdout.receive_some(1)
        ready = json.loads(line)
        async with open_node(NodeConfig()) as node:
            await node.connect(ready["listen_addrs"][0])
            await wait_until(lambda: node.health.rtt.get(ready["peer_id"]) is not None, 10)
            os.kill(proc.pid, signal.SIGSTOP)
            stopped_at = trio.current_time()
            await wait_until(
                lambda: not node.is_connected(ready["peer_id"]), 10, message="frozen peer dropped"
            )
            assert trio.current_time() - stopped_at < 5.0
            assert node.metrics.get("peers_dropped_unresponsive") == 1
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        with trio.move_on_after(5):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
