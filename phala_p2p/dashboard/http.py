"""The little HTTP/1.1 the dashboard speaks, sans-IO: parse one request head, build one
response. The driver reads at most ``MAX_HEAD`` bytes up to the blank line and hands them
here; every request gets one response and the connection closes (no keep-alive, no body).

Errors are :class:`HttpRefusal` with the status to answer: the client's fault, never ours.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final

MAX_HEAD: Final = 8192  # request line and headers, bytes
MAX_HEADERS: Final = 48
END_OF_HEAD: Final = b"\r\n\r\n"

_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}
_TOKEN: Final = frozenset(
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


class HttpRefusal(Exception):
    """A request the dashboard will not serve; answer with ``status`` and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the query string
    headers: dict[str, str]  # lower-case names; a repeated header's values joined by ", "

    def header(self, name: str) -> str:
        return self.headers.get(name, "")

    @property
    def wants_websocket(self) -> bool:
        return self.header("upgrade").lower() == "websocket"


def head_length(buffer: bytes) -> int | None:
    """The length of the request head in ``buffer`` (through the blank line), None if it is
    not complete yet; HttpRefusal(431) once ``buffer`` holds more than MAX_HEAD without one."""
    end = buffer.find(END_OF_HEAD)
    if end >= 0 and end + len(END_OF_HEAD) <= MAX_HEAD:
        return end + len(END_OF_HEAD)
    if len(buffer) >= MAX_HEAD or end >= 0:
        raise HttpRefusal(431, "request head too large")
    return None


def parse_request(head: bytes) -> Request:
    """Parse a request head (as :func:`head_length` delimits it)."""
    if len(head) > MAX_HEAD or not head.endswith(END_OF_HEAD):
        raise HttpRefusal(400, "incomplete request head")
    try:
        text = head[: -len(END_OF_HEAD)].decode("ascii")
    except UnicodeDecodeError:
        raise HttpRefusal(400, "request head is not ASCII") from None
    line, *header_lines = text.split("\r\n")
    parts = line.split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpRefusal(400, "malformed request line")
    method, target, _version = parts
    if not method or not all(ord(c) in _TOKEN for c in method):
        raise HttpRefusal(400, "malformed method")
    if not target.startswith("/") or any(ord(c) <= 32 or ord(c) >= 127 for c in target):
        raise HttpRefusal(400, "malformed request target")
    if len(header_lines) > MAX_HEADERS:
        raise HttpRefusal(431, "too many headers")
    headers: dict[str, str] = {}
    for raw in header_lines:
        name, sep, value = raw.partition(":")
        if not sep or not name or not all(ord(c) in _TOKEN for c in name):
            raise HttpRefusal(400, "malformed header")
        if any(ord(c) < 32 and c != "\t" for c in value):
            raise HttpRefusal(400, "control character in a header")
        key = name.lower()
        value = value.strip(" \t")
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return Request(method, target.split("?", 1)[0], headers)


def check_host(request: Request) -> None:
    """Refuse (403) a request whose Host is not an IP address or ``localhost``, and a
    browser's request from a page of another origin. A page on some other site can make a
    browser open a WebSocket here (DNS rebinding, cross-site WebSocket); neither can pass
    this check, while every same-origin page and every non-browser client can."""
    host = request.header("host")
    if not host or "," in host:
        raise HttpRefusal(400, "one Host header is required")
    name = host
    if name.startswith("["):
        name = name[1 : name.find("]")] if "]" in name else ""
    else:
        name = name.rsplit(":", 1)[0]
    if name != "localhost":
        try:
            ipaddress.ip_address(name)
        except ValueError:
            raise HttpRefusal(403, "Host must be an IP address or localhost") from None
    origin = request.header("origin")
    if origin and origin != f"http://{host}":
        raise HttpRefusal(403, "cross-origin request")


def check_websocket(request: Request) -> None:
    """The handshake headers RFC 6455 requires, checked before the WebSocket library sees
    the request (it would otherwise wait for a handshake that never completes)."""
    if request.method != "GET":
        raise HttpRefusal(405, "a WebSocket opens with GET")
    if "upgrade" not in {t.strip().lower() for t in request.header("connection").split(",")}:
        raise HttpRefusal(400, "Connection: Upgrade is required")
    key = request.header("sec-websocket-key")
    if not key or len(key) > 64 or "," in key:
        raise HttpRefusal(400, "one Sec-WebSocket-Key is required")
    if request.header("sec-websocket-version") != "13":
        raise HttpRefusal(426, "WebSocket version 13 is required")


def response(
    status: int,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    head_only: bool = False,
) -> bytes:
    """A complete response that closes the connection."""
    reason = _REASONS.get(status, "Error")
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "X-Content-Type-Options: nosniff\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    return head if head_only else head + body


def refusal(err: HttpRefusal) -> bytes:
    return response(err.status, f"{err.status} {err.message}\n".encode("ascii", "replace"))
