"""phala_p2p: a peer-to-peer confidential cloud on py-libp2p."""

from __future__ import annotations

from phala_p2p import errors

__all__ = ["errors"]
__version__ = "0.1.0"
