"""A libp2p host: one identity, one protocol router, the TCP transport, identify and ping.

The smallest thing a foreign libp2p peer recognises as a peer: it listens, dials, answers
``/ipfs/id/1.0.0`` (and push) and ``/ipfs/ping/1.0.0``, and identifies every peer it connects
with, as libp2p hosts do. Further protocols register on :attr:`router`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ..errors import MeshError
from ..identity import KeyPair
from ..multiaddr import Multiaddr
from .connection import Libp2pConnection, ProtocolRouter
from .errors import ProtobufError
from .identify import IdentifyMessage, IdentifyService, address_bytes
from .keys import PrivateKey
from .ping import PingService
from .tcp import Libp2pTcpTransport

__all__ = ["Libp2pHost"]

log = logging.getLogger(__name__)


class Libp2pHost:
    def __init__(
        self,
        identity: PrivateKey | KeyPair | None = None,
        *,
        agent_version: str = "latticaray/0.1.0",
        stream_window: int | None = None,
    ) -> None:
        if identity is None:
            identity = PrivateKey.generate()
        elif isinstance(identity, KeyPair):
            identity = PrivateKey.from_keypair(identity)
        self.identity = identity
        self.router = ProtocolRouter()
        self.tcp = Libp2pTcpTransport(
            identity, self.router, stream_window=stream_window, on_connection=self._on_connection
        )
        self.identify = IdentifyService(
            identity, self.router, listen_addrs=self.listen_addrs, agent_version=agent_version
        )
        self.ping = PingService(self.router)
        self._listen: list[tuple[str, int]] = []
        self._identified: dict[Libp2pConnection, asyncio.Future[IdentifyMessage]] = {}

    @property
    def peer_id(self) -> bytes:
        return self.identity.public_key.peer_id_bytes()

    @property
    def peer_id_text(self) -> str:
        return self.identity.public_key.peer_id_text()

    async def listen(self, host: str = "127.0.0.1", port: int = 0) -> Multiaddr:
        addr = await self.tcp.listen(host, port)
        self._listen.append(
            (str(addr.value_of(addr.protocols()[0])), int(str(addr.value_of("tcp"))))
        )
        return addr

    def listen_addrs(self) -> list[bytes]:
        return [address_bytes(h, p) for h, p in self._listen]

    def listen_multiaddrs(self) -> list[str]:
        return [f"{Multiaddr.from_bytes(a)}/p2p/{self.peer_id_text}" for a in self.listen_addrs()]

    @property
    def connections(self) -> set[Libp2pConnection]:
        return self.tcp.connections

    def connection_to(self, peer_id: bytes) -> Libp2pConnection | None:
        for conn in self.tcp.connections:
            if conn.remote_peer_id == peer_id and not conn.is_closed:
                return conn
        return None

    def _on_connection(self, conn: Libp2pConnection) -> None:
        fut = asyncio.ensure_future(self._identify_quietly(conn))
        self._identified[conn] = fut
        fut.add_done_callback(lambda _: self._identified.pop(conn, None))

    async def _identify_quietly(self, conn: Libp2pConnection) -> IdentifyMessage:
        try:
            return await self.identify.identify(conn)
        except (MeshError, ProtobufError, TimeoutError, EOFError) as exc:
            log.debug("identify of %s failed: %s", conn.remote_peer_text, exc)
            raise

    async def dial(
        self, addr: Multiaddr | str, *, timeout: float | None = None
    ) -> Libp2pConnection:
        """Dial a TCP multiaddr; the peer is identified in the background."""
        return await self.tcp.dial_multiaddr(addr, timeout=timeout)

    async def identified(self, conn: Libp2pConnection, timeout: float = 10.0) -> IdentifyMessage:
        """Wait for the background identify of ``conn`` (or run one)."""
        fut = self._identified.get(conn)
        if fut is None:
            return await self.identify.identify(conn, timeout=timeout)
        return await asyncio.wait_for(asyncio.shield(fut), timeout)

    async def close(self) -> None:
        for fut in list(self._identified.values()):
            fut.cancel()
        for fut in list(self._identified.values()):
            with contextlib.suppress(BaseException):
                await fut
        await self.tcp.close()
