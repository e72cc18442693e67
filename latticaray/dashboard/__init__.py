"""The web dashboard a node serves: the mesh it knows, live, from a vendored page (no CDN).

    from latticaray.dashboard import DashboardServer
    server = DashboardServer(source); url = await server.start(); ...; await server.stop()

``latticaray dashboard`` and ``latticaray.init(dashboard=True)`` start one on the node's loop.
"""

from latticaray.dashboard.server import DashboardServer, History

__all__ = ["DashboardServer", "History"]
