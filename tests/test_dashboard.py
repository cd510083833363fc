"""The live dashboard: the page over HTTP, snapshots over a WebSocket, the bounds it keeps,
and (when Chromium is installed) the page in a real headless browser."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket
from net.test_chain import FAST

from phala_p2p.config import NodeConfig, dashboard_address
from phala_p2p.dashboard import DashboardLimits, serve_dashboard
from phala_p2p.dashboard.http import HttpRefusal, check_host, head_length, parse_request
from phala_p2p.dashboard.snapshot import Timeline
from phala_p2p.errors import UsageError
from phala_p2p.node import Node, open_node
from phala_p2p.testing import Devnet, open_devnet, wait_until

WS_HANDSHAKE = (
    "GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
)


# -- helpers -------------------------------------------------------------------------------


def port_of(url: str) -> int:
    return int(url.rstrip("/").rsplit(":", 1)[1])


async def http(
    port: int, raw: bytes, *, timeout: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw`` and read the whole response (the server closes after one)."""
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(raw)
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
                head, sep, body = data.partition(b"\r\n\r\n")
                length = [
                    x for x in head.split(b"\r\n") if x.lower().startswith(b"content-length:")
                ]
                if sep and length and len(body) >= int(length[0].split(b":")[1]):
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
    return int(status_line.split(" ")[1]), headers, body


def get(path: str, port: int, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}\r\n".encode()


def initial_snapshot(page: bytes) -> dict[str, Any]:
    start = page.index(b'<script id="initial-snapshot" type="application/json">')
    body = page[start:].split(b">", 1)[1].split(b"</script>", 1)[0]
    snap: dict[str, Any] = json.loads(body)
    return snap


def ws_url(node: Node) -> str:
    assert node.dashboard_url is not None
    return node.dashboard_url.replace("http://", "ws://") + "ws"


async def next_snapshot(ws: Any, timeout: float = 10.0) -> dict[str, Any]:
    with trio.fail_after(timeout):
        snap: dict[str, Any] = json.loads(await ws.get_message())
    return snap


def clients(node: Node) -> int:
    return int(node.metrics.snapshot()["gauges"]["dashboard_clients"])


def with_dashboard_on(index: int) -> Callable[[int, NodeConfig], NodeConfig]:
    def configure(i: int, cfg: NodeConfig) -> NodeConfig:
        return cfg.with_(dashboard="127.0.0.1:0") if i == index else cfg

    return configure


@asynccontextmanager
async def devnet_with_dashboard(seed: int) -> AsyncIterator[Devnet]:
    """One gatekeeper (node 1, with the dashboard) and one client, on a fast chain."""
    async with open_devnet(
        gatekeepers=1, clients=1, seed=seed, chain_params=FAST, configure=with_dashboard_on(1)
    ) as net:
        yield net


# -- config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("localhost:8080", ("127.0.0.1", 8080)),
        ("[::1]:65535", ("::1", 65535)),
        ("10.1.2.3:9000", ("10.1.2.3", 9000)),
    ],
)
def test_dashboard_address_accepts_loopback_and_explicit_addresses(
    value: str, expected: tuple[str, int]
) -> None:
    assert dashboard_address(value) == expected
    assert NodeConfig(dashboard=value).dashboard == value


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("127.0.0.1", "HOST:PORT"),
        ("127.0.0.1:65536", "port"),
        ("127.0.0.1:-1", "HOST:PORT"),
        ("127.0.0.1:http", "HOST:PORT"),
        (":8080", "localhost or an IP"),
        ("example.com:8080", "localhost or an IP"),
        ("0.0.0.0:8080", "not 0.0.0.0"),
        ("[::]:8080", "not ::"),
        ("::1:8080", "brackets"),
        (8080, "string"),
    ],
)
def test_dashboard_address_refuses_what_it_cannot_bind_safely(value: Any, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        NodeConfig(dashboard=value)


def test_dashboard_setting_round_trips_through_toml(tmp_path: Path) -> None:
    cfg = NodeConfig(dashboard="127.0.0.1:0", metrics_port=0)
    cfg.write_toml(tmp_path / "node.toml")
    assert NodeConfig.from_toml(tmp_path / "node.toml") == cfg
    (tmp_path / "hand.toml").write_text('[node]\ndashboard = "[::1]:7000"\n')
    assert NodeConfig.from_toml(tmp_path / "hand.toml").dashboard == "[::1]:7000"
    assert "dashboard" not in NodeConfig().to_toml()  # off unless asked for


# -- the sans-IO parts: request heads and the timeline --------------------------------------


def test_request_heads_are_parsed_within_bounds() -> None:
    assert head_length(b"GET / HTTP/1.1\r\nHost: a") is None
    raw = b"GET /ws?x=1 HTTP/1.1\r\nHost: 127.0.0.1:80\r\nX-A: 1\r\nx-a: 2\r\n\r\nrest"
    n = head_length(raw)
    assert n == len(raw) - 4
    request = parse_request(raw[:n])
    assert (request.method, request.path) == ("GET", "/ws")
    assert request.headers["x-a"] == "1, 2"
    check_host(request)
    with pytest.raises(HttpRefusal) as err:
        head_length(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 2000)
    assert err.value.status == 431
    for bad in (
        b"GET / HTTP/1.1\r\n\xff: x\r\n\r\n",
        b"GET  / HTTP/1.1\r\n\r\n",
        b"G\x00T / HTTP/1.1\r\n\r\n",
    ):
        with pytest.raises(HttpRefusal) as err:
            parse_request(bad)
        assert err.value.status == 400


@pytest.mark.parametrize(
    ("host", "origin", "status"),
    [
        ("127.0.0.1:8080", "", None),
        ("localhost:8080", "http://localhost:8080", None),
        ("[::1]:8080", "http://[::1]:8080", None),
        ("attacker.example:8080", "", 403),  # DNS rebinding
        ("127.0.0.1:8080", "http://attacker.example", 403),  # cross-site WebSocket
        ("", "", 400),
    ],
)
def test_host_and_origin_checks(host: str, origin: str, status: int | None) -> None:
    headers = f"Host: {host}\r\n" if host else ""
    headers += f"Origin: {origin}\r\n" if origin else ""
    request = parse_request(f"GET / HTTP/1.1\r\n{headers}\r\n".encode())
    if status is None:
        check_host(request)
    else:
        with pytest.raises(HttpRefusal) as err:
            check_host(request)
        assert err.value.status == status


def test_timeline_records_changes_between_observations() -> None:
    timeline = Timeline(maxlen=5)
    timeline.connected("early", 0.5)  # before the baseline: not news
    timeline.observe({"a", "b"}, set(), 1.0)
    assert list(timeline.events) == []
    timeline.connected("c", 1.5)  # connected and gone again before the next look
    timeline.observe({"a"}, {"b"}, 2.0)
    assert [(e.time, e.kind, e.peer) for e in timeline.events] == [
        (1.5, "connected", "c"),
        (2.0, "lost", "b"),
        (2.0, "lost", "c"),
        (2.0, "denied", "b"),
    ]
    timeline.observe({"a", "b"}, set(), 3.0)
    assert [(e.kind, e.peer) for e in timeline.events][-2:] == [
        ("connected", "b"),
        ("allowed", "b"),
    ]
    assert len(timeline.events) == 5  # bounded: the oldest went


# -- the page and the feed -----------------------------------------------------------------


async def test_page_and_live_feed_of_a_gatekeeper() -> None:
    async with devnet_with_dashboard(seed=71) as net:
        keeper, client = net.gatekeepers[0], net.clients[0]
        assert client.dashboard_url is None
        url = keeper.dashboard_url
        assert url is not None
        assert url.startswith("http://127.0.0.1:")
        port = port_of(url)

        status, headers, page = await http(port, get("/", port))
        assert status == 200
        assert headers["content-type"].startswith("text/html")
        assert int(headers["content-length"]) == len(page)
        assert b"connect-src 'self'" in headers["content-security-policy"].encode()
        assert b"<title>" in page
        assert b'id="height"' in page
        assert b"new WebSocket(" in page
        assert re.search(rb"""(src|href)\s*=\s*["']?(https?:)?//""", page) is None  # no CDN
        first = initial_snapshot(page)
        assert first["node"]["peer_id"] == keeper.peer_id
        assert first["node"]["role"] == "gatekeeper"

        status, headers, body = await http(port, get("/snapshot.json", port))
        assert status == 200
        assert headers["content-type"] == "application/json"
        assert json.loads(body)["node"]["name"] == keeper.config.name

        assert net.bootstrap is not None
        reported = {client.peer_id: "client", net.bootstrap.peer_id: "bootstrap"}

        def roles(snap: dict[str, Any]) -> dict[str, str]:
            return {p["peer_id"]: p["role"] for p in snap["peers"]}

        async with trio_websocket.open_websocket_url(ws_url(keeper)) as ws:
            snap = await next_snapshot(ws)
            h0 = snap["chain"]["height"]
            seen = [snap]
            with trio.fail_after(30):
                while seen[-1]["chain"]["height"] <= h0:
                    seen.append(await next_snapshot(ws))
                # each peer's role shows once discovery has heard it from the peer itself
                while roles(seen[-1]) != reported:
                    assert set(roles(seen[-1])) == set(reported)
                    seen.append(await next_snapshot(ws))
        assert [s["seq"] for s in seen] == sorted({s["seq"] for s in seen})
        last = seen[-1]
        chain = last["chain"]
        assert chain["height"] > h0
        assert len(chain["hash"]) == 64
        assert chain["gatekeepers"] == [
            {
                "account": keeper.public_key.hex(),
                "peer_id": keeper.peer_id,
                "stake": keeper.chain.state.gatekeepers()[keeper.public_key],
                "signed_head": True,
                "connected": False,
                "self": True,
            }
        ]
        assert chain["finality"]["signed_stake"] == chain["finality"]["total_stake"] > 0
        # its peers, with the roles they reported, in the picture
        assert roles(last) == reported
        states = {n["id"]: n["state"] for n in last["topology"]["nodes"]}
        assert states[keeper.peer_id] == "self"
        assert states[client.peer_id] == "connected"
        assert last["market"] is not None
        assert last["jobs"]["counters"]["jobs_run"] == 0
        assert keeper.metrics.get("dashboard_feeds_opened") == 1
        assert keeper.metrics.get("dashboard_snapshot_errors") == 0


async def test_snapshots_show_a_partition_as_it_happens() -> None:
    async with devnet_with_dashboard(seed=72) as net:
        keeper, client = net.gatekeepers[0], net.clients[0]
        async with trio_websocket.open_websocket_url(ws_url(keeper)) as ws:
            await next_snapshot(ws)
            assert net.bootstrap is not None
            await net.partition([keeper], [client, net.bootstrap])
            with trio.fail_after(30):
                while True:
                    snap = await next_snapshot(ws)
                    kinds = {(e["kind"], e["peer"]) for e in snap["partitions"]["events"]}
                    if ("denied", client.peer_id) in kinds and ("lost", client.peer_id) in kinds:
                        break
            assert client.peer_id in snap["partitions"]["denied"]
            states = {n["id"]: n["state"] for n in snap["topology"]["nodes"]}
            assert states[client.peer_id] == "denied"
            await net.heal()
            with trio.fail_after(30):
                while ("allowed", client.peer_id) not in {
                    (e["kind"], e["peer"]) for e in snap["partitions"]["events"]
                }:
                    snap = await next_snapshot(ws)


async def test_a_node_without_chain_shows_what_it_has() -> None:
    async with open_node(NodeConfig(dashboard="127.0.0.1:0", name="lonely")) as node:
        assert node.dashboard_url is not None
        async with trio_websocket.open_websocket_url(ws_url(node)) as ws:
            snap = await next_snapshot(ws)
        assert snap["node"] == {**snap["node"], "name": "lonely", "role": "client"}
        assert snap["chain"] is None
        assert snap["market"] is None
        assert snap["peers"] == []
        assert snap["jobs"]["receipts"] == []
        port = port_of(node.dashboard_url)
    with pytest.raises(OSError, match="connect"):  # stopped with the node
        await trio.open_tcp_stream("127.0.0.1", port)


async def test_a_failing_view_is_reported_and_does_not_stop_the_node() -> None:
    async with open_node(NodeConfig(dashboard="127.0.0.1:0")) as node:
        node.metrics.gauge("odd", lambda: float("nan"))
        async with trio_websocket.open_websocket_url(ws_url(node)) as ws:
            snap = await next_snapshot(ws)
            assert snap["metrics"]["gauges"]["odd"] is None  # JSON has no NaN
            node.metrics.gauge("broken", lambda: 1 / 0)
            while "error" not in snap:
                snap = await next_snapshot(ws)
            assert snap["error"].startswith("ZeroDivisionError")
            assert node.metrics.get("dashboard_snapshot_errors") >= 1
            node.metrics.gauge("broken", lambda: 0)  # mended: snapshots come back
            while "error" in snap:
                snap = await next_snapshot(ws)
        assert snap["node"]["peer_id"] == node.peer_id


# -- bounds --------------------------------------------------------------------------------


async def test_malformed_and_over_limit_requests_are_refused_without_harm() -> None:
    async with open_node(NodeConfig(dashboard="127.0.0.1:0")) as node:
        assert node.dashboard_url is not None
        port = port_of(node.dashboard_url)
        host = f"127.0.0.1:{port}"
        cases = [
            (b"\x00\x01\x02 garbage\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: " + host.encode() + b"\r\nX: " + b"a" * 9000, 431),
            (
                b"GET / HTTP/1.1\r\n"
                + b"X-A: b\r\n" * 60
                + b"Host: "
                + host.encode()
                + b"\r\n\r\n",
                431,
            ),
            (b"GET / HTTP/1.1\r\nHost: " + host.encode() + b"\r\nBad Header\r\n\r\n", 400),
            (b"GET / HTTP/2.0\r\nHost: " + host.encode() + b"\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
            (
                b"POST / HTTP/1.1\r\nHost: " + host.encode() + b"\r\nContent-Length: 2\r\n\r\nhi",
                405,
            ),
            (get("/../etc/passwd", port), 404),
            (b"GET / HTTP/1.1\r\nHost: evil.example:80\r\n\r\n", 403),  # DNS rebinding
            (WS_HANDSHAKE.format(host=host, extra="Origin: http://evil.example\r\n").encode(), 403),
            (
                WS_HANDSHAKE.format(host=host, extra="").replace("Sec-WebSocket-Key", "X").encode(),
                400,
            ),
            (WS_HANDSHAKE.format(host=host, extra="").replace(": 13", ": 8").encode(), 426),
        ]
        for raw, expected in cases:
            status, _, _ = await http(port, raw)
            assert status == expected, raw[:60]
        refused = node.metrics.by_label("dashboard_refused", "reason")
        assert sum(refused.values()) == len(cases)

        # at most 16 feeds: the 17th is refused, and takes a slot once one is free
        limit = DashboardLimits().max_clients
        async with trio.open_nursery() as nursery:
            opened: list[Any] = []
            for _ in range(limit):
                opened.append(await trio_websocket.connect_websocket_url(nursery, ws_url(node)))
            await wait_until(lambda: clients(node) == limit, 10)
            with pytest.raises(trio_websocket.ConnectionRejected) as refused_ws:
                async with trio_websocket.open_websocket_url(ws_url(node)):
                    pass
            assert refused_ws.value.status_code == 503
            for ws in opened:
                await next_snapshot(ws)  # every admitted client is served
            await opened.pop().aclose()
            await wait_until(lambda: clients(node) == limit - 1, 10)
            opened.append(await trio_websocket.connect_websocket_url(nursery, ws_url(node)))
            await next_snapshot(opened[-1])
            for ws in opened:
                await ws.aclose()

        # the node and its dashboard are unharmed
        status, _, page = await http(port, get("/", port))
        assert status == 200
        assert initial_snapshot(page)["node"]["peer_id"] == node.peer_id


async def test_slow_requests_and_slow_clients_are_dropped_and_counted() -> None:
    limits = DashboardLimits(
        head_timeout=0.3, interval=0.05, min_gap=0.0, queue=1, send_timeout=0.5, send_buffer=4096
    )
    async with open_node(NodeConfig(name="x" * 60)) as node, trio.open_nursery() as nursery:
        url = await nursery.start(
            lambda task_status: serve_dashboard(
                node, "127.0.0.1:0", limits=limits, task_status=task_status
            )
        )
        port = port_of(url)
        # a request head that never ends: 408 after head_timeout
        status, _, _ = await http(port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert status == 408

        # a feed that never reads, with a tiny receive window, next to one that reads
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        await sock.connect(("127.0.0.1", port))
        slow = trio.SocketStream(sock)
        async with slow, trio_websocket.open_websocket_url(url.replace("http", "ws") + "ws") as ws:
            await slow.send_all(WS_HANDSHAKE.format(host=f"127.0.0.1:{port}", extra="").encode())
            answer = await slow.receive_some(1024)
            assert answer.startswith(b"HTTP/1.1 101 ")
            got = 0
            with trio.fail_after(20):
                while node.metrics.get("dashboard_clients_dropped") == 0:
                    await next_snapshot(ws)
                    got += 1
            assert got > 0
            await next_snapshot(ws)  # the reader is still served
            # the slow socket was closed by the server: reading drains then sees EOF
            with trio.fail_after(10):
                while await slow.receive_some(65536):
                    pass
        dropped = node.metrics.by_label("dashboard_clients_dropped", "reason")
        assert set(dropped) <= {"slow", "send_timeout"}
        assert sum(dropped.values()) == 1
        assert node.metrics.get("dashboard_refused", reason="slow_request") == 1
        nursery.cancel_scope.cancel()


# -- in a real browser ---------------------------------------------------------------------

CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--window-size=1280,1200",
]


class Cdp:
    """A minimal Chrome DevTools Protocol client over one page's WebSocket."""

    def __init__(self, ws: Any) -> None:
        self._ws = ws
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        await self._ws.send_message(json.dumps({"id": call_id, "method": method, "params": params}))
        with trio.fail_after(20):
            while True:
                msg = json.loads(await self._ws.get_message())
                if msg.get("id") == call_id:
                    if "error" in msg:
                        raise AssertionError(f"{method}: {msg['error']}")
                    result: dict[str, Any] = msg["result"]
                    return result

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"the page threw: {result['exceptionDetails']}")
        return result["result"].get("value")


PAGE_STATE = """document.getElementById("footer") === null ? "null" : JSON.stringify({
  height: document.getElementById("height").textContent,
  status: document.getElementById("status-text").textContent,
  peer: document.getElementById("node-peer").textContent,
  circles: document.querySelectorAll("#topology circle").length,
  gatekeeper_rows: document.querySelectorAll("#gatekeepers tbody tr").length,
  footer: document.getElementById("footer").textContent,
  render_errors: renderErrors,
})"""


@asynccontextmanager
async def chromium(tmp_path: Path, *args: str) -> AsyncIterator[trio.Process]:
    assert CHROMIUM is not None
    log = (tmp_path / "chromium.log").open("ab")
    proc = await trio.lowlevel.open_process(
        [CHROMIUM, *CHROMIUM_FLAGS, *args], stdout=log, stderr=log, stdin=subprocess.DEVNULL
    )
    try:
        yield proc
    finally:
        with trio.CancelScope(shield=True):
            proc.terminate()
            with trio.move_on_after(10):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            log.close()


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium: apt-get install chromium chromium-driver"
)
async def test_dashboard_in_headless_chromium(tmp_path: Path) -> None:
    async with devnet_with_dashboard(seed=73) as net:
        keeper = net.gatekeepers[0]
        url = keeper.dashboard_url
        assert url is not None
        profile = tmp_path / "profile"
        async with chromium(
            tmp_path, "--remote-debugging-port=0", f"--user-data-dir={profile}", url
        ):
            active = profile / "DevToolsActivePort"
            await wait_until(lambda: active.exists() and active.read_text().count("\n") >= 1, 60)
            devtools = int(active.read_text().split("\n")[0])
            status, _, body = await http(devtools, get("/json/list", devtools))
            assert status == 200
            pages = [t for t in json.loads(body) if t["type"] == "page" and t["url"] == url]
            assert pages, body
            async with trio_websocket.open_websocket_url(
                pages[0]["webSocketDebuggerUrl"], max_message_size=64 << 20
            ) as ws:
                cdp = Cdp(ws)

                async def state() -> dict[str, Any]:
                    found: dict[str, Any] = json.loads(await cdp.evaluate(PAGE_STATE) or "null")
                    return found

                async def live_height() -> bool:
                    s = await state()  # None while the page is still loading
                    return (
                        bool(s) and s["status"] == "live" and s["height"].replace(",", "").isdigit()
                    )

                await wait_until(live_height, 30, message="the page's feed live")
                first = await state()
                h1 = int(first["height"].replace(",", ""))

                async def risen() -> bool:
                    return int((await state())["height"].replace(",", "")) > h1

                await wait_until(risen, 30, message="the height shown rising")
                second = await state()
                assert int(second["height"].replace(",", "")) > h1
                assert second["peer"] == keeper.peer_id
                assert second["circles"] == 3  # this node, the client and the bootstrap node
                assert second["gatekeeper_rows"] == 1
                assert "live viewer" in second["footer"]
                assert second["render_errors"] == 0
                assert keeper.metrics.get("dashboard_feeds_opened") >= 1

        # a screenshot of the page, taken by Chromium itself
        shot = tmp_path / "dashboard.png"
        async with chromium(
            tmp_path,
            f"--user-data-dir={tmp_path / 'profile2'}",
            f"--screenshot={shot}",
            "--virtual-time-budget=3000",
            url,
        ) as proc:
            with trio.fail_after(60):
                await proc.wait()
        data = shot.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        assert len(data) > 10_000
