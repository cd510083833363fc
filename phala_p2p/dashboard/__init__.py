"""A live dashboard on any node: one HTML page and a WebSocket feed of JSON snapshots.

Set ``dashboard = "127.0.0.1:8080"`` in a node's config (port 0: any free port) and open
``node.dashboard_url``. See :mod:`phala_p2p.dashboard.server` for the bounds it keeps.
"""

from phala_p2p.dashboard.server import Dashboard, DashboardLimits, serve_dashboard

__all__ = ["Dashboard", "DashboardLimits", "serve_dashboard"]
