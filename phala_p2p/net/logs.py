"""Logging: py-libp2p is chatty at INFO and WARNING for routine events; keep it quiet."""

from __future__ import annotations

import logging
import os

NOISY = (
    "libp2p",
    "multiaddr",
    "async_service",
)


def tame_libp2p_loggers(level: int = logging.CRITICAL) -> None:
    """Quiet py-libp2p: it logs routine events (a peer closing a stream, a dial racing a
    close) at ERROR with multi-line text. ``LIBP2P_DEBUG`` (py-libp2p's own switch) or
    ``PHALA_P2P_LIBP2P_LOG=DEBUG|INFO|WARNING|ERROR`` turns them back on."""
    if os.environ.get("LIBP2P_DEBUG"):
        return
    wanted = os.environ.get("PHALA_P2P_LIBP2P_LOG", "").upper()
    if wanted in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        level = getattr(logging, wanted)
    for name in NOISY:
        logging.getLogger(name).setLevel(level)


class PeerIdFilter(logging.Filter):
    """Adds ``record.peer`` (the short peer id) so formats can show which node logged."""

    def __init__(self, peer_id: str) -> None:
        super().__init__()
        self.short = peer_id[-8:]

    def filter(self, record: logging.LogRecord) -> bool:
        record.peer = self.short
        return True
