"""The dashboard's trio driver: one TCP listener serving the page and a live WebSocket feed.

``GET /`` answers the page (one self-contained HTML file, with the current snapshot inlined
so it shows something before its WebSocket opens), ``GET /snapshot.json`` one snapshot, and
``GET /ws`` with an Upgrade opens the feed. The request head is read here (bounded in size
and time) and only a checked WebSocket handshake is handed to trio-websocket, with the bytes
already read replayed to it: one port serves both.

Bounds: ``max_connections`` open sockets, ``max_clients`` feeds, a request head of 8 KiB
read within ``head_timeout``. A feed holds at most ``queue`` snapshots; a client that lets
them pile up, or takes longer than ``send_timeout`` to take one, is dropped and counted
(``dashboard_clients_dropped``), never buffered for.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any, Final

import trio
import trio_websocket

from phala_p2p.config import dashboard_address
from phala_p2p.dashboard.http import (
    MAX_HEAD,
    HttpRefusal,
    check_host,
    check_websocket,
    head_length,
    parse_request,
    refusal,
    response,
)
from phala_p2p.dashboard.snapshot import VERSION, Snapshots
from phala_p2p.errors import UsageError

if TYPE_CHECKING:
    from phala_p2p.node import Node

logger = logging.getLogger(__name__)

FEED_PATH: Final = "/ws"
PAGE_PATHS: Final = ("/", "/index.html")
_PLACEHOLDER: Final = b"__INITIAL_SNAPSHOT__"
_PAGE_HEADERS: Final = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'"
)


@dataclass(frozen=True)
class DashboardLimits:
    """How much the dashboard may cost its node. The defaults suit a person or two watching."""

    max_clients: int = 16  # live feeds
    max_connections: int = 64  # open sockets, feeds included
    head_timeout: float = 5.0  # seconds to send a request head
    handshake_timeout: float = 5.0  # seconds to finish the WebSocket handshake
    interval: float = 1.0  # seconds between snapshots when no block comes
    min_gap: float = 0.2  # seconds between snapshots however fast blocks come
    queue: int = 4  # snapshots waiting for one client before it counts as slow
    send_timeout: float = 10.0  # seconds one snapshot may take to go out
    send_buffer: int = 256 * 1024  # kernel send buffer of a feed's socket, bytes
    max_incoming: int = 4096  # bytes of one message from a client (all are ignored)

    def __post_init__(self) -> None:
        if not 1 <= self.max_clients <= self.max_connections:
            raise UsageError("dashboard: 1 <= max_clients <= max_connections")
        if self.queue < 1 or self.send_buffer < 4096 or self.max_incoming < 125:
            raise UsageError("dashboard: queue >= 1, send_buffer >= 4096, max_incoming >= 125")
        for name in ("head_timeout", "handshake_timeout", "interval", "send_timeout"):
            if not getattr(self, name) > 0:
                raise UsageError(f"dashboard: {name} must be > 0")
        if not 0 <= self.min_gap <= self.interval:
            raise UsageError("dashboard: 0 <= min_gap <= interval")


@dataclass(eq=False)
class _Client:
    send: trio.MemorySendChannel[str]
    scope: trio.CancelScope
    dropped: bool = field(default=False)


class _Replay(trio.abc.Stream):
    """A stream whose first bytes are ``head`` (already read from ``stream``), then the rest."""

    def __init__(self, stream: trio.SocketStream, head: bytes) -> None:
        self._stream = stream
        self._head = head

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._head:
            await trio.lowlevel.checkpoint()
            n = len(self._head) if max_bytes is None else max_bytes
            data, self._head = self._head[:n], self._head[n:]
            return data
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(bytes(data) if isinstance(data, bytearray) else data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()


class Dashboard:
    """One node's dashboard. Run it with :func:`serve_dashboard`."""

    def __init__(self, node: Node, limits: DashboardLimits | None = None) -> None:
        self.node = node
        self.limits = limits or DashboardLimits()
        self.url: str | None = None
        self.snapshots = Snapshots(node, started=time.time())
        self._page = resources.files(__package__).joinpath("page.html").read_bytes()
        self._clients: set[_Client] = set()
        self._feeds = 0  # feeds open or opening
        self._connections = 0
        self._wake = trio.Event()
        self._metrics = node.metrics
        self._metrics.gauge("dashboard_clients", lambda: len(self._clients))

    @property
    def clients(self) -> int:
        return len(self._clients)

    def wake(self, *_: Any) -> None:
        """Push a snapshot soon (a new block, a new connection)."""
        self._wake.set()

    def _on_connected(self, peer: str) -> None:
        self.snapshots.timeline.connected(peer, time.time())
        self._wake.set()

    async def run(
        self, host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        try:
            bound_host, bound_port = listeners[0].socket.getsockname()[:2]
            shown = f"[{bound_host}]" if ":" in bound_host else bound_host
            self.url = f"http://{shown}:{bound_port}/"
            node = self.node
            self.snapshots.observe(time.time())  # the baseline: what changes after is news
            hooks: list[tuple[list[Any], Any]] = [(node.events.on_connected, self._on_connected)]
            if node.has_chain:
                hooks.append((node.chain.on_block, self.wake))
            for hook_list, hook in hooks:
                hook_list.append(hook)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._broadcaster)
                    await nursery.start(trio.serve_listeners, self._handle, listeners)
                    logger.info("%s dashboard on %s", node, self.url)
                    task_status.started(self.url)
            finally:
                for hook_list, hook in hooks:
                    hook_list.remove(hook)
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)

    # -- snapshots -------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        limits = self.limits
        return self.snapshots.build(
            time.time(),
            extra={
                "dashboard": {
                    "clients": len(self._clients),
                    "max_clients": limits.max_clients,
                    "dropped": self._metrics.get("dashboard_clients_dropped"),
                    "interval": limits.interval,
                }
            },
        )

    def _snapshot_text(self) -> str:
        """The current snapshot as JSON. A failure to build one is a bug of the dashboard,
        which must not stop the node it watches: it is logged and counted
        (``dashboard_snapshot_errors``), and viewers get an error snapshot meanwhile."""
        self._metrics.count("dashboard_snapshots")
        try:
            return json.dumps(self.snapshot(), separators=(",", ":"), allow_nan=False)
        except Exception as err:  # a view of the node must not take the node down
            logger.exception("dashboard: building a snapshot failed")
            self._metrics.count("dashboard_snapshot_errors")
            return json.dumps({"v": VERSION, "error": f"{type(err).__name__}: {err}"[:200]})

    async def _broadcaster(self) -> None:
        while True:
            with trio.move_on_after(self.limits.interval):
                await self._wake.wait()
            self._wake = trio.Event()
            self.snapshots.observe(time.time())
            if self._clients:
                text = self._snapshot_text()
                for client in list(self._clients):
                    try:
                        client.send.send_nowait(text)
                    except trio.WouldBlock:
                        self._drop(client, "slow")
            await trio.sleep(self.limits.min_gap)

    def _drop(self, client: _Client, reason: str) -> None:
        if not client.dropped:
            client.dropped = True
            self._metrics.count("dashboard_clients_dropped", reason=reason)
            logger.info("dashboard: dropped a %s client", reason)
        self._clients.discard(client)
        client.scope.cancel()

    # -- connections -----------------------------------------------------------------------

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            if self._connections >= self.limits.max_connections:
                self._refuse("connections")
                await self._reply(stream, refusal(HttpRefusal(503, "too many connections")))
                return
            self._connections += 1
            try:
                await self._serve(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client went away (or we dropped it)
            finally:
                self._connections -= 1

    def _refuse(self, reason: str) -> None:
        self._metrics.count("dashboard_refused", reason=reason)

    async def _serve(self, stream: trio.SocketStream) -> None:
        buffer = b""
        try:
            with trio.fail_after(self.limits.head_timeout):
                while (n := head_length(buffer)) is None:
                    chunk = await stream.receive_some(MAX_HEAD - len(buffer))
                    if not chunk:
                        return  # closed before asking anything
                    buffer += chunk
            request = parse_request(buffer[:n])
            check_host(request)
            if request.path == FEED_PATH:
                check_websocket(request)
                if self._feeds >= self.limits.max_clients:
                    raise HttpRefusal(503, "too many dashboard clients")
                self._feeds += 1
                try:
                    await self._feed(stream, buffer)
                finally:
                    self._feeds -= 1
                return
            if request.method not in ("GET", "HEAD"):
                raise HttpRefusal(405, "only GET")
            head_only = request.method == "HEAD"
            if request.path in PAGE_PATHS:
                self._metrics.count("dashboard_pages_served")
                await self._reply(stream, self._page_response(head_only))
            elif request.path == "/snapshot.json":
                body = self._snapshot_text().encode()
                json_type = "application/json"
                await self._reply(
                    stream, response(200, body, content_type=json_type, head_only=head_only)
                )
            else:
                raise HttpRefusal(404, "not found")
        except trio.TooSlowError:
            self._refuse("slow_request")
            await self._reply(stream, refusal(HttpRefusal(408, "request head too slow")))
        except HttpRefusal as err:
            self._refuse(str(err.status))
            await self._reply(stream, refusal(err))

    def _page_response(self, head_only: bool) -> bytes:
        data = self._snapshot_text()
        # JSON inside <script>: no "</script>" or "<!--" can appear once < > & are escaped
        inline = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
        body = self._page.replace(_PLACEHOLDER, inline.encode("ascii"), 1)
        raw = response(200, body, content_type="text/html; charset=utf-8", head_only=head_only)
        head, sep, rest = raw.partition(b"\r\n\r\n")
        csp = f"\r\nContent-Security-Policy: {_PAGE_HEADERS}".encode("ascii")
        return head + csp + sep + rest

    async def _reply(self, stream: trio.SocketStream, data: bytes) -> None:
        with trio.move_on_after(self.limits.send_timeout):
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    # -- the feed --------------------------------------------------------------------------

    async def _feed(self, stream: trio.SocketStream, head: bytes) -> None:
        limits = self.limits
        send, receive = trio.open_memory_channel[str](limits.queue)
        async with trio.open_nursery() as nursery, send, receive:
            client = _Client(send, nursery.cancel_scope)
            try:
                with trio.fail_after(limits.handshake_timeout):
                    request = await trio_websocket.wrap_server_stream(
                        nursery,
                        _Replay(stream, head),
                        message_queue_size=2,
                        max_message_size=limits.max_incoming,
                    )
                    ws = await request.accept()
            except (trio.TooSlowError, trio_websocket.ConnectionClosed):
                self._refuse("handshake")
                nursery.cancel_scope.cancel()
                return
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, limits.send_buffer)
            self._metrics.count("dashboard_feeds_opened")
            self._clients.add(client)
            try:
                send.send_nowait(self._snapshot_text())
                nursery.start_soon(self._ignore_incoming, ws, nursery.cancel_scope)
                async for text in receive:
                    with trio.move_on_after(limits.send_timeout) as sending:
                        await ws.send_message(text)
                    if sending.cancelled_caught:
                        self._drop(client, "send_timeout")
            except trio_websocket.ConnectionClosed:
                pass  # the client left
            finally:
                self._clients.discard(client)
                nursery.cancel_scope.cancel()

    @staticmethod
    async def _ignore_incoming(ws: Any, scope: trio.CancelScope) -> None:
        """Read (and drop) what the client sends, so its close is noticed at once."""
        try:
            while True:
                await ws.get_message()
        except trio_websocket.ConnectionClosed:
            scope.cancel()


async def serve_dashboard(
    node: Node,
    address: str | None = None,
    *,
    limits: DashboardLimits | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``node``'s dashboard on ``address`` ("HOST:PORT"; default: the node's
    ``dashboard`` setting) until cancelled; reports the page's URL when listening."""
    value = address if address is not None else node.config.dashboard
    if value is None:
        raise UsageError("no dashboard address: set `dashboard` in the node's config")
    host, port = dashboard_address(value)
    dashboard = Dashboard(node, limits)
    await dashboard.run(host, port, task_status=task_status)
