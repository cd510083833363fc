"""Counters of a node, readable as ``node.metrics`` and as Prometheus text.

Every counter lives in the node (no process-global registry), so several nodes in one
process keep separate figures. The optional HTTP endpoint is a small trio server inside
the node's nursery: it stops with the node and leaves no thread behind.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

logger = logging.getLogger(__name__)

Labels = tuple[tuple[str, str], ...]


class Metrics:
    """Named counters with optional labels, plus gauges read on demand."""

    def __init__(self) -> None:
        self._counters: Counter[tuple[str, Labels]] = Counter()
        self._gauges: dict[str, Callable[[], float]] = {}

    def count(self, name: str, amount: int = 1, **labels: str) -> None:
        self._counters[(name, tuple(sorted(labels.items())))] += amount

    def add_bytes(self, sent: int, received: int) -> None:
        if sent:
            self.count("bytes_sent", sent)
        if received:
            self.count("bytes_received", received)

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        self._gauges[name] = read

    def get(self, name: str, **labels: str) -> int:
        """One counter's value; with no labels given, the sum over all its labels."""
        if labels:
            return self._counters.get((name, tuple(sorted(labels.items()))), 0)
        return sum(v for (n, _), v in self._counters.items() if n == name)

    def by_label(self, name: str, label: str) -> dict[str, int]:
        """A counter split by one label, e.g. ``by_label("rejected", "reason")``."""
        out: Counter[str] = Counter()
        for (n, labels), value in self._counters.items():
            if n == name:
                out[dict(labels).get(label, "")] += value
        return dict(out)

    @property
    def published(self) -> int:
        return self.get("published")

    @property
    def delivered(self) -> int:
        return self.get("delivered")

    @property
    def rejected(self) -> dict[str, int]:
        return self.by_label("rejected", "reason")

    @property
    def dropped(self) -> int:
        return self.get("dropped")

    @property
    def peers(self) -> int:
        read = self._gauges.get("peers")
        return int(read()) if read else 0

    def snapshot(self) -> dict[str, Any]:
        """Every counter and gauge as plain data (for logs, JSON and dashboards)."""
        counters: dict[str, Any] = {}
        for (name, labels), value in sorted(self._counters.items()):
            key = name + "".join(f"[{k}={v}]" for k, v in labels)
            counters[key] = value
        gauges = {name: read() for name, read in sorted(self._gauges.items())}
        return {"counters": counters, "gauges": gauges}

    # -- Prometheus ------------------------------------------------------------------------

    def registry(self, namespace: str = "phala_p2p") -> CollectorRegistry:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self, namespace))
        return registry

    def prometheus_text(self) -> bytes:
        data: bytes = generate_latest(self.registry())
        return data


class _Collector(Collector):
    def __init__(self, metrics: Metrics, namespace: str) -> None:
        self._metrics = metrics
        self._ns = namespace

    def collect(self) -> Iterator[Any]:
        families: dict[str, CounterMetricFamily] = {}
        for (name, labels), value in sorted(self._metrics._counters.items()):
            keys = [k for k, _ in labels]
            fam_key = name + "|" + ",".join(keys)
            fam = families.get(fam_key)
            if fam is None:
                fam = CounterMetricFamily(f"{self._ns}_{name}", name, labels=keys)
                families[fam_key] = fam
            fam.add_metric([v for _, v in labels], value)
        yield from families.values()
        for name, read in sorted(self._metrics._gauges.items()):
            yield GaugeMetricFamily(f"{self._ns}_{name}", name, value=read())


async def serve_prometheus(
    metrics: Metrics,
    host: str,
    port: int,
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` as Prometheus text until cancelled; reports the bound port."""

    async def handle(conn: trio.SocketStream) -> None:
        async with conn:
            with trio.move_on_after(5):
                request = b""
                while b"\r\n\r\n" not in request and len(request) < 8192:
                    chunk = await conn.receive_some(4096)
                    if not chunk:
                        return
                    request += chunk
                path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b""
                if path.split(b"?")[0] in (b"/metrics", b"/"):
                    body = metrics.prometheus_text()
                    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                else:
                    body = b"not found\n"
                    head = b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\n"
                head += b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
                try:
                    await conn.send_all(head + body)
                except trio.BrokenResourceError:
                    return

    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    logger.info("metrics on http://%s:%d/metrics", host, listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)
