"""Logging: py-libp2p is chatty at INFO and WARNING for routine events; keep it quiet."""

from __future__ import annotations

import logging

NOISY = (
    "libp2p",
    "multiaddr",
    "async_service",
)


def tame_libp2p_loggers(level: int = logging.ERROR) -> None:
    """Raise py-libp2p's loggers to ``level`` unless the user configured them already."""
    for name in NOISY:
        lg = logging.getLogger(name)
        if lg.level == logging.NOTSET:
            lg.setLevel(level)


class PeerIdFilter(logging.Filter):
    """Adds ``record.peer`` (the short peer id) so formats can show which node logged."""

    def __init__(self, peer_id: str) -> None:
        super().__init__()
        self.short = peer_id[-8:]

    def filter(self, record: logging.LogRecord) -> bool:
        record.peer = self.short
        return True
