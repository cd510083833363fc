"""phala_p2p: a peer-to-peer confidential cloud on py-libp2p.

    import phala_p2p as pp
    async with pp.open_node(pp.NodeConfig.from_toml("node.toml")) as node:
        ...
"""

from __future__ import annotations

from phala_p2p import errors
from phala_p2p.config import DiscoveryConfig, NodeConfig, Role
from phala_p2p.net.gossip import GossipConfig, GossipMessage, Subscription, Validation, Verdict
from phala_p2p.net.health import HealthConfig
from phala_p2p.net.host import HostLimits
from phala_p2p.node import Node, open_node

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
]
__version__ = "0.1.0"
