"""A standalone NAT-traversal peer: :class:`NatHost`, the NAT service without a ``MeshNode``.

A libp2p-style *host* in the smallest form: its own QUIC socket and RPC router, the
:class:`~latticaray.mesh.nat.service.NatService` on them, and its own per-peer links instead of
a connection manager. :meth:`NatHost.connect` reaches a peer directly if one of its addresses
answers, else through a relay (happy eyeballs: the relay joins the race after a head start),
then upgrades the relayed session to a direct one by hole punching; :meth:`NatHost.call` is a
unary call over the best path, falling back to the relay when the direct path drops.

It is what the netlab tests and ``bench/nat_matrix.py`` run to exercise NAT traversal on its own;
a mesh node uses :class:`~latticaray.mesh.nat.mesh_service.MeshNatService` instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from ..errors import MeshError, PeerUnreachable, RpcConnectionLost
from ..identity import KeyPair, PeerId
from ..rpc import RpcRouter, RpcSession, UnaryHandler
from ..transport.quic import QuicConn, QuicTransport
from .addresses import Endpoint
from .config import NatConfig, RelayAddr
from .links import PeerLink
from .service import PING_SERVICE, NatService
from .tunnel import SecureTunnel

log = logging.getLogger(__name__)


def _close_unused_tunnel(task: asyncio.Task[SecureTunnel]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().close()


class NatHost(NatService):
    """A peer that is only NAT traversal plus unary RPC (see the module docstring)."""

    def __init__(self, key: KeyPair | None = None, config: NatConfig | None = None) -> None:
        key = key or KeyPair.generate()
        config = config or NatConfig()
        transport = QuicTransport(key, config.quic, on_connection=self.on_quic)
        super().__init__(key, config, transport=transport, router=RpcRouter())

    @property
    def local_endpoint(self) -> Endpoint:
        return self.reachability.local_endpoint

    async def start(self) -> None:
        await self.transport.listen(self.config.listen_host, self.config.quic_port)
        await super().start()

    async def stop(self) -> None:
        await super().stop()
        await self.transport.close()

    def register_unary(self, service: str, handler: UnaryHandler) -> None:
        self.router.register_unary(service, handler)

    # -- direct and relayed sessions --------------------------------------------------------
    def on_quic(self, conn: QuicConn) -> None:
        if conn.is_client:
            return  # the dialer attaches its own connection
        self.spawn(self._accept_direct(conn, "direct"))

    async def _accept_direct(self, conn: QuicConn, path: str) -> None:
        try:
            channel = await asyncio.wait_for(conn.accept_channel(), 10.0)
        except (TimeoutError, MeshError):
            conn.close("no channel opened")
            return
        if conn.remote_peer is None:
            conn.close("unauthenticated")
            return
        link = self.link(conn.remote_peer)
        session = RpcSession(channel, self.router)
        link.attach_direct(conn, session, link.pending_path or path, self.loop.time)

    async def on_relayed_incoming(self, tunnel: SecureTunnel) -> None:
        link = self.link(tunnel.peer)
        if link.relayed is not None and not link.relayed.closed:
            link.relayed.close("replaced by a newer relayed connection")
        link.relayed = RpcSession(tunnel, self.router)
        link.metrics.record(self.loop.time(), "relayed-inbound")
        if link.metrics.path == "none":
            link.metrics.path = "relayed"

    def addresses_changed(self) -> None:
        return None  # a standalone host advertises nothing

    def direct_up(self, link: PeerLink) -> bool:
        return link.direct_ready.is_set()

    async def await_direct(self, link: PeerLink, timeout: float) -> Endpoint | None:
        try:
            await asyncio.wait_for(link.direct_ready.wait(), timeout)
        except TimeoutError:
            return None
        return link.direct_addr

    async def dial_direct(
        self,
        peer: PeerId,
        addr: Endpoint,
        path: str,
        transport: QuicTransport | None = None,
        timeout: float | None = None,
    ) -> PeerLink:
        transport = transport or self.transport
        conn = await transport.dial(
            addr, expected_peer=peer, timeout=timeout or self.config.direct_dial_timeout
        )
        session = RpcSession(conn.open_channel(), self.router)
        link = self.link(peer)
        link.attach_direct(conn, session, path, self.loop.time)
        await session.call(PING_SERVICE, b"hello", timeout=5.0)  # opens the stream at the peer
        return link

    # -- connecting -------------------------------------------------------------------------
    async def connect(
        self,
        peer: PeerId,
        direct_addrs: Sequence[Endpoint] = (),
        relay: RelayAddr | None = None,
        wait_upgrade: float = 0.0,
    ) -> PeerLink:
        """Reach ``peer``: direct if one of ``direct_addrs`` answers, else through ``relay``
        (then try to upgrade to a direct path in the background, unless punching is off)."""
        link = self.link(peer)
        start = self.loop.time()
        if link.best() is not None:
            return link
        link.metrics.started_at = start

        async def try_direct() -> bool:
            for addr in direct_addrs:
                try:
                    await self.dial_direct(peer, addr, "direct")
                    return True
                except (MeshError, OSError) as exc:
                    log.info("direct dial of %s at %s failed: %s", peer, addr, exc)
            return False

        # happy eyeballs: direct first, the relay joins the race after a short head start
        direct = self.spawn(try_direct()) if direct_addrs else None
        if direct is not None:
            await asyncio.wait({direct}, timeout=self.config.happy_eyeballs_delay)
            if direct.done() and direct.result():
                link.metrics.connected_at = self.loop.time() - start
                return link
        if relay is None:
            if direct is not None and await direct:
                link.metrics.connected_at = self.loop.time() - start
                return link
            raise PeerUnreachable(f"{peer}: no direct address answered and no relay is known")
        relay_peer, host, port = relay
        relayed = self.loop.create_task(self.relay_client.connect(relay_peer, host, port, peer))
        racing: set[asyncio.Task[bool] | asyncio.Task[SecureTunnel]] = {relayed}
        if direct is not None:
            racing.add(direct)
        while True:
            done, _ = await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
            if direct is not None and direct in done and direct.result():
                relayed.add_done_callback(_close_unused_tunnel)
                link.metrics.connected_at = self.loop.time() - start
                return link
            if relayed in done:
                if relayed.exception() is not None and direct is not None and not direct.done():
                    racing = {direct}  # the relay failed: the direct dial may still win
                    continue
                break
            racing = {relayed}
        tunnel = relayed.result()  # raises if the relay failed too
        link.relayed = RpcSession(tunnel, self.router)
        link.metrics.connected_at = self.loop.time() - start
        link.metrics.path = "relayed"
        link.metrics.record(self.loop.time(), "relayed-outbound")
        if self.config.hole_punching:
            link.upgrade_task = self.spawn(self._upgrade_after(link, direct, start))
            if wait_upgrade > 0:
                try:
                    await asyncio.wait_for(asyncio.shield(link.upgrade_task), wait_upgrade)
                except (TimeoutError, Exception):
                    pass
        return link

    async def _upgrade_after(
        self, link: PeerLink, direct: asyncio.Task[bool] | None, start: float
    ) -> bool:
        """Hole punch unless the direct dial of ``connect`` already succeeded."""
        if (
            direct is not None
            and direct.done()
            and not direct.cancelled()
            and direct.exception() is None
            and direct.result()
        ):
            return True
        # a direct dial still in flight may yet win; punching does not wait for its timeout
        return await self.punch.upgrade(link, start)

    async def call(
        self, peer: PeerId, service: str, payload: bytes = b"", timeout: float = 10.0
    ) -> bytes:
        """Unary call over the best path; falls back to the relay if the direct path dropped."""
        link = self.links.get(peer)
        session = link.best() if link else None
        if link is None or session is None:
            raise PeerUnreachable(f"not connected to {peer}")
        try:
            return await session.call(service, payload, timeout=timeout)
        except RpcConnectionLost:
            fallback = link.best()
            if fallback is None or fallback is session:
                raise
            return await fallback.call(service, payload, timeout=timeout)

    async def disconnect(self, peer: PeerId) -> None:
        """Close every path to ``peer`` and forget its link (relay reservation stays)."""
        link = self.links.pop(peer, None)
        if link is None:
            return
        if link.upgrade_task is not None:
            link.upgrade_task.cancel()
            await asyncio.gather(link.upgrade_task, return_exceptions=True)
        for session in (link.direct, link.relayed):
            if session is not None:
                await session.aclose("disconnect")
        if link.direct_conn is not None:
            link.direct_conn.close("disconnect")
