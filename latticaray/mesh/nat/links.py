"""Per-peer path state of the NAT service: :class:`PeerLink`, and the :class:`DirectPaths` seam.

A ``PeerLink`` holds what this node has to one peer: the relayed and the direct RPC session,
the direct connection's handle, the path metrics, and the hole punch in progress. The NAT
service keeps one per peer it relays to or punches with.

``DirectPaths`` is what hole punching needs from whoever owns the node's connections: dial a
direct QUIC connection and register it, tell whether one is up, wait for the peer's. A
standalone :class:`~latticaray.mesh.nat.host.NatHost` keeps them in its links; a
:class:`~latticaray.mesh.nat.mesh_service.MeshNatService` hands them to the MeshNode's
connection manager.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..identity import PeerId
from ..rpc import RpcSession
from ..transport.quic import QuicConn, QuicTransport
from .addresses import Endpoint
from .holepunch import HolePunchSession, PathMetrics
from .tunnel import SecureTunnel


class DirectHandle(Protocol):
    """The connection under a direct session: where it goes, and how to close it."""

    def close(self, reason: str = ...) -> None: ...


class StreamHandle:
    """A direct stream connection (TCP simultaneous open): its address and its tunnel."""

    def __init__(self, addr: Endpoint, tunnel: SecureTunnel) -> None:
        self.addr = addr
        self.tunnel = tunnel

    def close(self, reason: str = "closed") -> None:
        self.tunnel.close()


@dataclass
class PeerLink:
    """Everything this node has to one peer: its sessions per path and the path metrics."""

    peer: PeerId
    metrics: PathMetrics
    relayed: RpcSession | None = None
    direct: RpcSession | None = None
    direct_conn: QuicConn | StreamHandle | None = None
    direct_path: str = "direct"
    direct_ready: asyncio.Event = field(default_factory=asyncio.Event)
    upgrade_task: asyncio.Task[bool] | None = None
    dcutr: HolePunchSession | None = None  # the responder's coordination, if any
    pending_path: str | None = None  # label for the direct path a punch will bring

    def best(self) -> RpcSession | None:
        if self.direct is not None and not self.direct.closed:
            return self.direct
        if self.relayed is not None and not self.relayed.closed:
            return self.relayed
        return None

    @property
    def path(self) -> str:
        if self.direct is not None and not self.direct.closed:
            return self.direct_path
        if self.relayed is not None and not self.relayed.closed:
            return "relayed"
        return "none"

    @property
    def direct_addr(self) -> Endpoint | None:
        conn = self.direct_conn
        if isinstance(conn, StreamHandle):
            return conn.addr
        return (conn.addr[0], conn.addr[1]) if conn is not None else None

    def attach_direct(
        self,
        conn: QuicConn | StreamHandle,
        session: RpcSession,
        path: str,
        clock: Callable[[], float],
    ) -> None:
        """Make ``session`` (over ``conn``) this peer's direct path; it replaces an older one."""
        old = self.direct
        self.direct, self.direct_conn, self.direct_path = session, conn, path
        if old is not None and old is not session:
            old.close("replaced by a newer direct connection")
        now = clock()
        self.metrics.record(now, f"direct:{path}")
        self.metrics.path = path
        if self.relayed is not None and self.metrics.upgraded_at is None:
            self.metrics.upgraded_at = now
        self.direct_ready.set()

        def on_close(_session: RpcSession) -> None:
            if self.direct is session:
                self.direct_ready.clear()
                self.metrics.record(clock(), "direct-closed")
                self.metrics.path = (
                    "relayed" if self.relayed and not self.relayed.closed else "none"
                )

        session.on_close(on_close)


class DirectPaths(Protocol):
    """How hole punching reaches the owner of the node's direct connections."""

    def direct_up(self, link: PeerLink) -> bool:
        """Whether a direct connection to ``link.peer`` is up."""
        ...

    async def await_direct(self, link: PeerLink, timeout: float) -> Endpoint | None:
        """Wait up to ``timeout`` s for the peer's direct connection; its address, or None."""
        ...

    async def dial_direct(
        self,
        peer: PeerId,
        addr: Endpoint,
        path: str,
        transport: QuicTransport | None = None,
        timeout: float | None = None,
    ) -> PeerLink:
        """Dial ``peer`` at ``addr`` over QUIC (on ``transport``, default the shared socket) and
        make the connection its direct path, labelled ``path``."""
        ...

    def on_quic(self, conn: QuicConn) -> None:
        """An inbound QUIC connection arrived on a transport the NAT service opened."""
        ...
