"""phala_p2p: a peer-to-peer confidential cloud on py-libp2p.

    import phala_p2p as pp
    async with pp.open_node(pp.NodeConfig.from_toml("node.toml")) as node:
        ...

The names below load on first use, so importing a sans-IO room (``phala_p2p.wire``,
``crypto``, ``chain``, ``market``) pulls in neither trio nor libp2p.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from phala_p2p import errors

if TYPE_CHECKING:
    from phala_p2p import tee
    from phala_p2p.config import DiscoveryConfig, NodeConfig, Role
    from phala_p2p.net.gossip import (
        GossipConfig,
        GossipMessage,
        Subscription,
        Validation,
        Verdict,
    )
    from phala_p2p.net.health import HealthConfig
    from phala_p2p.net.host import HostLimits
    from phala_p2p.node import Node, open_node

_LAZY = {
    "DiscoveryConfig": "phala_p2p.config",
    "NodeConfig": "phala_p2p.config",
    "Role": "phala_p2p.config",
    "GossipConfig": "phala_p2p.net.gossip",
    "GossipMessage": "phala_p2p.net.gossip",
    "Subscription": "phala_p2p.net.gossip",
    "Validation": "phala_p2p.net.gossip",
    "Verdict": "phala_p2p.net.gossip",
    "HealthConfig": "phala_p2p.net.health",
    "HostLimits": "phala_p2p.net.host",
    "Node": "phala_p2p.node",
    "open_node": "phala_p2p.node",
}


def __getattr__(name: str) -> Any:
    if name == "tee":
        return importlib.import_module("phala_p2p.tee")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'phala_p2p' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "DiscoveryConfig",
    "GossipConfig",
    "GossipMessage",
    "HealthConfig",
    "HostLimits",
    "Node",
    "NodeConfig",
    "Role",
    "Subscription",
    "Validation",
    "Verdict",
    "errors",
    "open_node",
    "tee",
]
__version__ = "0.1.0"
