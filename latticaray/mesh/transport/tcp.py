"""TCP + TLS 1.3 transport: mutually authenticated channels for directly reachable peers.

TLS runs in Python's :mod:`ssl` (works under uvloop). The server presents a libp2p certificate
(:mod:`latticaray.mesh.tls`) and the client verifies it, which proves the server's peer ID.
Python's ``ssl`` cannot accept an unknown self-signed client certificate, so the client proves its
identity in-band right after the TLS handshake, over the encrypted session (docs/protocol/mesh.md,
"In-band client authentication")::

    server -> client : nonce (32 B)
    client -> server : auth proof (101 B)   -- signs SHA-256(server cert) || nonce
    server -> client : 0x00                 -- accepted (anything else / EOF: refused)

After that the connection is one :class:`~latticaray.mesh.transport.streamchannel.StreamChannel`
carrying ``/latticaray/rpc/1`` (the RPC session does the multiplexing and per-call flow control).

Sockets set SO_REUSEADDR and SO_REUSEPORT, and ``dial`` can bind its outbound socket to the listen
port (``local_port``), so TCP hole punching and dials share the NAT mapping of the listener.
Every handshake read is size-bounded and the whole handshake has a deadline.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket

from ..errors import HandshakeError, PeerIdMismatch
from ..identity import KeyPair, PeerId
from ..multiaddr import Multiaddr
from ..tls import (
    ALPN_LIBP2P,
    AUTH_NONCE_LEN,
    AUTH_PROOF_LEN,
    client_ssl_context,
    make_auth_proof,
    make_certified_key,
    new_auth_nonce,
    server_ssl_context,
    verify_auth_proof,
    verify_certificate,
)
from .streambase import OnChannel, StreamTransportBase
from .streamchannel import StreamChannel

__all__ = ["TcpTransport"]

log = logging.getLogger(__name__)

ACCEPTED = b"\x00"


def _tcp_multiaddr(host: str, port: int) -> Multiaddr:
    family = "ip6" if ":" in host else "ip4"
    if family == "ip6" and host.startswith("::ffff:") and "." in host:
        family, host = "ip4", host[7:]
    return Multiaddr([(family, host), ("tcp", port)])


def _reusable_socket(host: str) -> socket.socket:
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setblocking(False)
    return sock


class TcpTransport(StreamTransportBase):
    """Listen for and dial TCP+TLS connections; each yields one authenticated channel."""

    name = "tcp"

    def __init__(
        self,
        key: KeyPair,
        *,
        handshake_timeout: float = 10.0,
        write_high_water: int = 1024 * 1024,
        read_high_water: int = 4 * 1024 * 1024,
        max_pending_handshakes: int = 256,
    ) -> None:
        super().__init__(
            key,
            handshake_timeout=handshake_timeout,
            write_high_water=write_high_water,
            read_high_water=read_high_water,
            max_pending_handshakes=max_pending_handshakes,
        )
        self._certified = make_certified_key(key)
        self._own_cert_der = self._certified.certificate_der
        self._server_ctx = server_ssl_context(self._certified)
        self._client_ctx = client_ssl_context(self._certified)

    @property
    def listen_port(self) -> int | None:
        return None if self._listen_addr is None else self._listen_addr.port

    async def listen(
        self, host: str = "127.0.0.1", port: int = 0, on_channel: OnChannel | None = None
    ) -> Multiaddr:
        """Start accepting; ``on_channel(channel)`` gets each authenticated inbound channel.

        Returns the bound ``/ip4|ip6/<host>/tcp/<port>`` address.
        """
        if self._server is not None:
            raise RuntimeError("TcpTransport is already listening")
        loop = asyncio.get_running_loop()
        sock = _reusable_socket(host)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        self._on_channel = on_channel
        self._server = await loop.create_server(
            self._new_inbound,
            sock=sock,
            ssl=self._server_ctx,
            backlog=1024,
            ssl_handshake_timeout=self.handshake_timeout,
        )
        bound = sock.getsockname()
        self._listen_addr = _tcp_multiaddr(bound[0], bound[1])
        return self._listen_addr

    async def _server_handshake(self, channel: StreamChannel) -> None:
        await channel.wait_connected()
        peername = channel.get_extra_info("peername")
        if peername:
            channel.remote_addr = _tcp_multiaddr(peername[0], peername[1])
        ssl_object = channel.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.selected_alpn_protocol() != ALPN_LIBP2P:
            raise HandshakeError("client did not negotiate ALPN 'libp2p'")
        nonce = new_auth_nonce()
        channel.write(nonce)
        proof = await channel.read_exactly(AUTH_PROOF_LEN)
        channel.remote_peer = verify_auth_proof(proof, self._own_cert_der, nonce)
        channel.write(ACCEPTED)

    async def dial(
        self,
        host: str,
        port: int,
        expected_peer: PeerId | None = None,
        *,
        local_port: int | None = None,
        timeout: float | None = None,
    ) -> StreamChannel:
        """Connect and authenticate; returns the channel (``remote_peer`` verified).

        ``expected_peer``: raise :class:`PeerIdMismatch` if someone else answers.
        ``local_port``: bind the outbound socket to this port (e.g. our listen port).
        """
        loop = asyncio.get_running_loop()
        deadline = timeout if timeout is not None else self.handshake_timeout
        channel = self._new_channel()
        channel.remote_addr = _tcp_multiaddr(host, port)
        sock: socket.socket | None = None

        async def connect() -> None:
            nonlocal sock
            if local_port is not None:
                sock = _reusable_socket(host)
                bind_host = "::" if sock.family == socket.AF_INET6 else "0.0.0.0"
                if ipaddress.ip_address(host).is_loopback:
                    bind_host = host if sock.family == socket.AF_INET else "::1"
                sock.bind((bind_host, local_port))
                await loop.sock_connect(sock, (host, port))
                await loop.create_connection(
                    lambda: channel,
                    sock=sock,
                    ssl=self._client_ctx,
                    server_hostname=host,
                    ssl_handshake_timeout=deadline,
                )
            else:
                await loop.create_connection(
                    lambda: channel,
                    host,
                    port,
                    ssl=self._client_ctx,
                    server_hostname=host,
                    ssl_handshake_timeout=deadline,
                )
            sock = None  # owned by the channel's transport from here on
            await self._client_handshake(channel, expected_peer)

        def close_socket() -> None:
            if sock is not None:
                sock.close()

        return await self._establish(channel, connect, f"{host}:{port}", deadline, close_socket)

    async def _client_handshake(self, channel: StreamChannel, expected: PeerId | None) -> None:
        ssl_object = channel.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.selected_alpn_protocol() != ALPN_LIBP2P:
            raise HandshakeError("server did not negotiate ALPN 'libp2p'")
        cert_der = ssl_object.getpeercert(binary_form=True)
        if not cert_der:
            raise HandshakeError("server presented no certificate")
        peer = verify_certificate(cert_der)
        if expected is not None and peer != expected:
            raise PeerIdMismatch(expected, peer)
        nonce = await channel.read_exactly(AUTH_NONCE_LEN)
        channel.write(make_auth_proof(self.key, cert_der, nonce))
        if await channel.read_exactly(1) != ACCEPTED:
            raise HandshakeError(f"peer {peer} refused our authentication")
        channel.remote_peer = peer
