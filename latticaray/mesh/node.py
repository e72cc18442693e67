"""MeshNode: one peer of the mesh in one asyncio event loop.

It owns the node's identity, its transports (QUIC on one UDP socket, TCP with Noise and yamux,
same-host Unix sockets), the connection manager (one RPC session per latticaray peer, reused by
every protocol), the RPC router where services register, the libp2p stream router
(:attr:`MeshNode.streams`: the protocols foreign libp2p peers open, e.g. ``/ipfs/id/1.0.0``,
``/ipfs/ping/1.0.0``; :meth:`MeshNode.open_stream` opens them), the identify/ping protocols (the
native ones between latticaray peers, libp2p's with foreign peers, both advertised), and the
liveness watch of peers (:attr:`MeshNode.liveness`: keepalives, failure detection, redial).
This is the contract the upper layers use (see docs/architecture.md)::

    node = MeshNode(MeshConfig(listen=["/ip4/127.0.0.1/udp/0/quic-v1", "/ip4/127.0.0.1/tcp/0"]))
    await node.start()
    node.register_unary("/x/echo/1", handler)          # async (ctx, payload) -> bytes
    await node.call(peer_id, "/x/echo/1", b"hi", timeout=5)
    await node.stop()

What the node tells others about itself (identify, DHT peer records) is
:attr:`MeshNode.advertised_addrs`: addresses added with :meth:`MeshNode.add_advertised_addrs`
(relay circuit addresses, AutoNAT-confirmed public addresses) followed by the listen addresses,
never an unspecified one.

:class:`NodeThread` runs a node on an event loop of its own on a daemon thread, for synchronous
code (notebooks, scripts, tests).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..version import __version__
from .adapters import RPC_PROTOCOL, QuicAdapter, TransportAdapter, make_stream_adapter
from .connmgr import ConnectionManager, MeshConnection
from .errors import (
    MultiaddrError,
    PeerIdMismatch,
    PeerUnreachable,
    RpcConnectionLost,
    RpcTimeout,
    RpcUnimplemented,
)
from .identify import IdentifyInfo, IdentifyService
from .identity import KeyPair, PeerId
from .libp2p.identify import IdentifyMessage, decode_multiaddr
from .libp2p.identify import IdentifyService as Libp2pIdentifyService
from .libp2p.keys import PrivateKey
from .libp2p.ping import PingService as Libp2pPingService
from .libp2p.stream import MuxedConnection, MuxedStream, ProtocolRouter, StreamHandler
from .liveness import LivenessChanged, LivenessConfig, LivenessService
from .multiaddr import Multiaddr
from .nat.libp2p_relay import Libp2pCircuits
from .paths import (
    DEFAULT_TRANSPORT_PREFERENCE,
    expand_unspecified,
    interface_addresses,
    is_dialable_addr,
)
from .rpc import RpcLimits, RpcRouter, StreamCall
from .tcpnoise import Libp2pTcpAdapter
from .tls import CertifiedKey, make_certified_key
from .transport.quic import QuicConfig, QuicTransport

__all__ = ["AGENT_VERSION", "MAX_ADVERTISED_EXTRA", "MeshConfig", "MeshNode", "NodeThread"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: identify's agent string (importlib.metadata would scan every installed distribution: 20-60 ms)
AGENT_VERSION = f"latticaray/{__version__}"

DEFAULT_LISTEN = ("/ip4/127.0.0.1/udp/0/quic-v1", "/ip4/127.0.0.1/tcp/0")
#: At most this many addresses may be added with ``add_advertised_addrs``.
MAX_ADVERTISED_EXTRA = 16


@dataclass
class MeshConfig:
    """Configuration of a :class:`MeshNode`."""

    #: Addresses to listen on (port 0 picks a free port). One QUIC address at most.
    listen: list = field(default_factory=lambda: list(DEFAULT_LISTEN))
    #: Multiaddrs (with /p2p/<id>) to connect to at start.
    bootstrap: list = field(default_factory=list)
    #: The host key; if None, ``key_path`` is loaded or created, else a fresh key is made.
    key: KeyPair | None = None
    key_path: str | None = None
    #: Transports to use, in preference order for dialing ("unix", "tcp", "quic").
    transports: tuple[str, ...] = DEFAULT_TRANSPORT_PREFERENCE
    #: Also listen on a same-host Unix socket (when the unix transport is available).
    same_host_fast_path: bool = True
    #: Keyword options for the Unix transport (e.g. ``run_dir`` for its socket).
    unix_options: dict = field(default_factory=dict)
    quic: QuicConfig = field(default_factory=QuicConfig)
    #: How TCP connections are secured and multiplexed: ``"noise"`` (libp2p: multistream,
    #: Noise XX, yamux; what foreign libp2p peers speak) or ``"tls"`` (TLS 1.3 with the in-band
    #: client proof, one RPC channel per connection; latticaray peers only).
    tcp_security: str = "noise"
    #: Keyword options for the TCP+TLS transport (``tcp_security="tls"``), if any.
    tcp_options: dict = field(default_factory=dict)
    rpc_limits: RpcLimits = field(default_factory=RpcLimits)
    max_connections: int = 1024
    dial_timeout: float = 10.0
    happy_eyeballs_delay: float = 0.25
    #: Run identify on every new connection (learns listen addrs and our observed address).
    auto_identify: bool = True
    #: Failure detection of watched peers (``MeshNode.liveness``).
    liveness: LivenessConfig = field(default_factory=LivenessConfig)
    agent_version: str = AGENT_VERSION


class MeshNode:
    """One peer of the mesh (see the module docstring)."""

    def __init__(self, config: MeshConfig | None = None) -> None:
        self.config = config or MeshConfig()
        if self.config.key is not None:
            self.key = self.config.key
        elif self.config.key_path:
            self.key = KeyPair.load_or_create(self.config.key_path)
        else:
            self.key = KeyPair.generate()
        self.peer_id: PeerId = self.key.peer_id
        self.router = RpcRouter()
        #: Handlers of the libp2p streams peers open (``register_stream``).
        self.streams = ProtocolRouter()
        self.connections = ConnectionManager(
            self.peer_id,
            self.router,
            streams=self.streams,
            rpc_limits=self.config.rpc_limits,
            transport_preference=tuple(self.config.transports),
            max_connections=self.config.max_connections,
            dial_timeout=self.config.dial_timeout,
            happy_eyeballs_delay=self.config.happy_eyeballs_delay,
        )
        self.identify_service = IdentifyService(self)
        #: libp2p's identify and ping, for foreign peers (latticaray peers use the native ones).
        self.libp2p_identify = Libp2pIdentifyService(
            PrivateKey.from_keypair(self.key),
            self.streams,
            listen_addrs=self._libp2p_listen_addrs,
            agent_version=self.config.agent_version,
            protocols=self.libp2p_protocols,
            on_identified=self._on_libp2p_identified,
        )
        self.libp2p_ping = Libp2pPingService(self.streams)
        #: circuit relay v2 client: reservations on libp2p relays, circuits both ways (the
        #: ``circuit`` transport); the relay role is :class:`~.nat.libp2p_relay.Libp2pRelayService`
        self.circuits = Libp2pCircuits(self)
        self._push_scheduled = False
        #: peers an identify push is under way to -> whether another must follow it
        self._pushing: dict[MuxedConnection, bool] = {}
        self.streams.on_change(self._libp2p_protocols_changed)
        #: Liveness of the peers the upper layers watch (``liveness.watch(peer)``).
        self.liveness = LivenessService(self, self.config.liveness)
        self.quic: QuicTransport | None = None
        self._listen_addrs: list[Multiaddr] = []
        self._extra_addrs: list[Multiaddr] = []
        self._addrs_changed_cbs: list[Callable[[], None]] = []
        self._certified: CertifiedKey | None = None
        self._started = False
        self._stopped = False
        self._tasks: set[asyncio.Task] = set()
        self._libp2p_identifying: dict[MuxedConnection, asyncio.Future[IdentifyMessage]] = {}
        self.connections.on_peer_connected(self._on_connected)

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> MeshNode:
        if self._started:
            return self
        self._started = True
        self._certified = make_certified_key(self.key)
        wanted = set(self.config.transports)
        listen = [Multiaddr.parse(a) for a in self.config.listen]
        try:
            for addr in listen:
                transport = addr.transport
                if transport not in wanted:
                    continue
                adapter = self._adapter_for(transport)
                if adapter is None:
                    log.warning("no %s transport available; not listening on %s", transport, addr)
                    continue
                bound = await adapter.listen(addr)
                self._listen_addrs.extend(expand_unspecified(bound, interface_addresses()))
            if (
                "unix" in wanted
                and self.config.same_host_fast_path
                and not any(a.transport == "unix" for a in listen)
            ):
                adapter = self._adapter_for("unix")
                if adapter is not None:
                    self._listen_addrs.extend(await adapter.listen(None))
            # transports we did not listen on can still dial out
            for name in self.config.transports:
                self._adapter_for(name)
            self.connections.register_transport(self.circuits.adapter)
        except BaseException:
            await self.stop()
            raise
        self.connections.start()
        self.liveness.start()
        for addr in self.config.bootstrap:
            self._spawn(self._bootstrap_one(Multiaddr.parse(addr)))
        log.info(
            "node %s listening on %s", self.peer_id, ", ".join(str(a) for a in self._listen_addrs)
        )
        return self

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for task in list(self._tasks):
            task.cancel()
        await self.liveness.stop()
        await self.connections.close()

    async def __aenter__(self) -> MeshNode:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def _libp2p_protocols_changed(self) -> None:
        """A service registered or dropped a libp2p protocol: tell the foreign peers connected
        now by identify push (once per burst of changes), as libp2p nodes pick the peers they
        ask for a protocol (Bitswap, kad) by what identify said."""
        if not self._started or self._stopped or self._push_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on the node's loop: peers see it at their next identify
            return
        self._push_scheduled = True
        loop.call_soon(self._push_identify)

    def _push_identify(self) -> None:
        self._push_scheduled = False
        if self._stopped:
            return
        for conn in self.connections.connections():
            muxer = conn.raw.muxer
            if muxer is None or conn.native is not False:
                continue
            if muxer in self._pushing:  # one push at a time per peer: the next one follows
                self._pushing[muxer] = True
            else:
                self._pushing[muxer] = False
                self._spawn(self._push_quietly(muxer))

    async def _push_quietly(self, muxer: MuxedConnection) -> None:
        try:
            while True:
                try:
                    await self.libp2p_identify.push(muxer, timeout=self.config.dial_timeout)
                except Exception as exc:  # a peer that refuses push keeps its older view of us
                    log.debug("identify push to %s failed: %r", muxer.remote_peer_text, exc)
                if not self._pushing.get(muxer) or self._stopped:
                    break
                self._pushing[muxer] = False
        finally:
            self._pushing.pop(muxer, None)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _bootstrap_one(self, addr: Multiaddr) -> None:
        try:
            await self.connect(addr)
        except Exception as exc:
            log.warning("bootstrap peer %s unreachable: %s", addr, exc)

    # -- transports ----------------------------------------------------------------------------------
    def _adapter_for(self, name: str) -> TransportAdapter | None:
        adapter = self.connections.adapters.get(name)
        if adapter is not None:
            return adapter
        if name == "quic":
            self.quic = QuicTransport(self.key, self.config.quic, certified=self._certified)
            adapter = QuicAdapter(self.quic, self.connections.accept_inbound, streams=self.streams)
        elif name == "tcp" and self.config.tcp_security == "noise":
            adapter = Libp2pTcpAdapter(
                self.key, self.connections.accept_inbound, streams=self.streams
            )
        elif name in ("tcp", "unix"):
            options = self.config.tcp_options if name == "tcp" else self.config.unix_options
            adapter = make_stream_adapter(
                name, self.key, self._certified, self.connections.accept_inbound, options
            )
        else:
            raise MultiaddrError(f"unknown transport {name!r}")
        if adapter is not None:
            self.connections.add_adapter(adapter)
        return adapter

    # -- identity and addresses ------------------------------------------------------------------------
    @property
    def listen_addrs(self) -> list[Multiaddr]:
        return [a.with_peer(self.peer_id) for a in self._listen_addrs]

    @property
    def advertised_addrs(self) -> list[Multiaddr]:
        """What identify and the DHT tell peers, each ending in ``/p2p/<our id>``: the added
        addresses (circuit, confirmed public) first, then the listen addresses; no duplicates,
        never an unspecified address or port 0."""
        out: dict[Multiaddr, None] = {}
        for addr in self._extra_addrs + self._listen_addrs:
            if is_dialable_addr(addr):
                out.setdefault(addr.with_peer(self.peer_id), None)
        return list(out)

    def add_advertised_addrs(self, addrs) -> None:
        """Advertise extra addresses, e.g. ``<relay>/p2p/RELAY/p2p-circuit/p2p/ME`` while a relay
        reservation is held, or an AutoNAT-confirmed public address. A circuit address must
        name this node as its target (or none); unspecified addresses or port 0 are refused
        with :class:`MultiaddrError`."""
        parsed = []
        for addr in addrs:
            addr = Multiaddr.parse(addr)
            if addr.peer_id is not None and addr.peer_id != self.peer_id:
                raise PeerIdMismatch(self.peer_id, addr.peer_id)
            if not is_dialable_addr(addr):
                raise MultiaddrError(f"cannot advertise {addr}: unspecified address or port 0")
            parsed.append(addr.without_peer())
        new = [a for a in dict.fromkeys(parsed) if a not in self._extra_addrs]
        if not new:
            return
        if len(self._extra_addrs) + len(new) > MAX_ADVERTISED_EXTRA:
            raise MultiaddrError(
                f"at most {MAX_ADVERTISED_EXTRA} extra addresses can be advertised"
            )
        self._extra_addrs = new + self._extra_addrs
        self._addrs_changed()

    def remove_advertised_addrs(self, addrs) -> None:
        """Stop advertising addresses added with :meth:`add_advertised_addrs` (others are
        ignored)."""
        gone = {Multiaddr.parse(a).without_peer() for a in addrs}
        kept = [a for a in self._extra_addrs if a not in gone]
        if len(kept) != len(self._extra_addrs):
            self._extra_addrs = kept
            self._addrs_changed()

    def on_addrs_changed(self, callback: Callable[[], None]) -> None:
        """``callback()`` runs whenever :attr:`advertised_addrs` changes."""
        self._addrs_changed_cbs.append(callback)

    def _addrs_changed(self) -> None:
        for callback in list(self._addrs_changed_cbs):
            try:
                callback()
            except Exception:
                log.exception("address change callback failed")

    def add_addrs(self, peer_id: PeerId, addrs) -> None:
        """Remember addresses of a peer for dialing (undialable ones are dropped)."""
        self.connections.peerstore.add(peer_id, addrs)

    def addrs_of(self, peer_id: PeerId) -> list[Multiaddr]:
        return self.connections.peerstore.get(peer_id)

    def observed_addrs(self) -> dict[PeerId, Multiaddr]:
        """Our address as each connected peer reported seeing it (identify)."""
        return dict(self.identify_service.observed_by)

    def protocols(self) -> list[str]:
        """What identify advertises: the RPC services and the libp2p stream protocols."""
        return self.router.services() + self.streams.protocols

    def libp2p_protocols(self) -> list[str]:
        """What ``/ipfs/id/1.0.0`` advertises: the libp2p stream protocols and the RPC one."""
        return [*self.streams.protocols, RPC_PROTOCOL]

    def _libp2p_listen_addrs(self) -> list[bytes]:
        return [a.without_peer().to_bytes() for a in self.advertised_addrs if a.transport != "unix"]

    def _on_libp2p_identified(self, conn: MuxedConnection, message: IdentifyMessage) -> None:
        observed = decode_multiaddr(message.observed_addr) if message.observed_addr else None
        info = IdentifyInfo(
            peer_id=conn.mesh_peer_id,
            listen_addrs=message.multiaddrs(),
            observed_addr=observed,
            protocols=list(message.protocols),
            agent_version=message.agent_version,
            protocol_version=message.protocol_version,
        )
        self.identify_service.accept(conn.mesh_peer_id, info)

    # -- connections ------------------------------------------------------------------------------------
    async def connect(self, addr, timeout: float | None = None) -> PeerId:
        """Dial a multiaddr (verifying its /p2p id if present); returns the peer's ID."""
        conn = await self.connections.dial_addr(Multiaddr.parse(addr), timeout)
        return conn.peer_id

    async def disconnect(self, peer_id: PeerId) -> None:
        await self.connections.disconnect(peer_id)

    async def block(self, peer_id: PeerId, reason: str) -> None:
        """Refuse ``peer_id`` from now on: disconnected, never dialed, its connections closed as
        they come (see :meth:`ConnectionManager.block`)."""
        await self.connections.block(peer_id, reason)

    def unblock(self, peer_id: PeerId) -> None:
        self.connections.unblock(peer_id)

    def connected_peers(self) -> list[PeerId]:
        return self.connections.connected_peers()

    def connection_to(self, peer_id: PeerId) -> MeshConnection | None:
        return self.connections.primary(peer_id)

    def on_peer_connected(self, callback: Callable[[PeerId], None]) -> None:
        self.connections.on_peer_connected(callback)

    def on_peer_liveness(self, callback: Callable[[LivenessChanged[PeerId]], None]) -> None:
        """``callback(change)`` when a peer watched with ``liveness.watch(peer)`` becomes
        SUSPECT, DOWN or ALIVE again (see :mod:`latticaray.mesh.liveness`)."""
        self.liveness.on_change(callback)

    def on_peer_disconnected(self, callback: Callable[[PeerId], None]) -> None:
        self.connections.on_peer_disconnected(callback)

    def _on_connected(self, peer: PeerId) -> None:
        if self.config.auto_identify and not self._stopped:
            self._spawn(self._identify_quietly(peer))

    async def _identify_quietly(self, peer: PeerId) -> None:
        try:
            info = await self.identify(peer)
        except Exception as exc:
            log.debug("identify with %s failed: %s", peer, exc)
            return
        await self._maybe_upgrade_to_same_host(peer, info.listen_addrs)

    async def _maybe_upgrade_to_same_host(self, peer: PeerId, addrs: list[Multiaddr]) -> None:
        """Move a peer on this host to the Unix socket path (only the smaller peer ID dials, so
        the pair does not race)."""
        if "unix" not in self.config.transports or not self.config.same_host_fast_path:
            return
        if self.peer_id > peer or "unix" not in self.connections.adapters:
            return
        current = self.connections.primary(peer)
        if current is None or current.transport == "unix":
            return
        for addr in addrs:
            path = addr.unix_path
            if addr.transport == "unix" and path and os.path.exists(path):
                try:
                    await self.connections.upgrade(peer, addr)
                    log.debug("moved %s to the same-host path %s", peer, addr)
                except Exception as exc:
                    log.debug("same-host upgrade to %s failed: %s", peer, exc)
                return

    # -- services ------------------------------------------------------------------------------------
    def register_unary(self, service: str, handler, **options) -> None:
        self.router.register_unary(service, handler, **options)

    def register_server_stream(self, service: str, handler) -> None:
        self.router.register_server_stream(service, handler)

    def register_client_stream(self, service: str, handler) -> None:
        self.router.register_client_stream(service, handler)

    def register_bidi(self, service: str, handler) -> None:
        self.router.register_bidi(service, handler)

    def unregister(self, service: str) -> None:
        self.router.unregister(service)

    def register_stream(self, protocol: str, handler: StreamHandler) -> None:
        """Serve the libp2p protocol ``protocol``: ``await handler(stream)`` for each stream a
        peer opens with it (QUIC and TCP; multistream-select negotiated)."""
        self.streams.add(protocol, handler)

    def unregister_stream(self, protocol: str) -> None:
        self.streams.remove(protocol)

    async def open_stream(
        self,
        peer_id: PeerId,
        protocols,
        *,
        timeout: float | None = None,
        lazy: bool = False,
    ) -> MuxedStream:
        """Open a libp2p stream to ``peer_id`` negotiating one of ``protocols`` (dials the
        peer if needed). Raises :class:`PeerUnreachable` if no multiplexed connection (QUIC,
        TCP+Noise+yamux) to it exists, ``ProtocolNotSupported`` if it refuses them all."""
        muxer = await self.muxer_to(peer_id, timeout)
        return await muxer.open_stream(protocols, lazy=lazy, timeout=timeout)

    async def muxer_to(self, peer_id: PeerId, timeout: float | None = None) -> MuxedConnection:
        """The peer's libp2p connection (its primary one if multiplexed)."""
        conn = await self.connections.get(peer_id, timeout)
        if conn.raw.muxer is None:
            conn = next(
                (c for c in self.connections.connections(peer_id) if c.raw.muxer is not None), conn
            )
        if conn.raw.muxer is None:
            raise PeerUnreachable(f"no libp2p (QUIC or TCP+Noise) connection to {peer_id}")
        return conn.raw.muxer

    # -- calls --------------------------------------------------------------------------------------------
    async def call(
        self,
        peer_id: PeerId,
        service: str,
        payload=b"",
        timeout: float | None = None,
        *,
        idempotent: bool = False,
    ) -> bytes:
        """Unary call; dials the peer if needed. Raises RpcError / RpcTimeout / PeerUnreachable.

        ``idempotent=True``: if the connection is lost before the reply, the call is retried
        once on a fresh connection (within the same overall deadline).
        """
        loop = asyncio.get_running_loop()
        total = timeout if timeout is not None else self.config.rpc_limits.default_timeout
        deadline = loop.time() + total
        attempts = 2 if idempotent else 1
        for attempt in range(attempts):
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise RpcTimeout(f"call {service!r} to {peer_id} exceeded its deadline")
            conn = self.connections.primary(peer_id)
            if conn is None:
                conn = await self.connections.get(peer_id, remaining)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise RpcTimeout(f"call {service!r} to {peer_id} exceeded its deadline")
            if conn.native is False:
                raise RpcUnimplemented(f"{peer_id} is a libp2p peer without {RPC_PROTOCOL}")
            try:
                return await conn.session.call(service, payload, remaining)
            except RpcConnectionLost:
                if conn.raw.channel is not None and getattr(conn.raw.channel, "refused", False):
                    raise RpcUnimplemented(
                        f"{peer_id} is a libp2p peer without {RPC_PROTOCOL}"
                    ) from None
                if attempt + 1 >= attempts:
                    raise
                conn.close("connection lost during a call")
                log.debug("retrying idempotent call %s to %s on a new connection", service, peer_id)
        raise AssertionError("unreachable")

    async def call_stream(
        self,
        peer_id: PeerId,
        service: str,
        payload=b"",
        timeout: float | None = None,
        window: int | None = None,
    ) -> AsyncIterator[bytes]:
        """Server-streaming call: ``async for item in node.call_stream(...)``; ``window`` is the
        call's receive window in bytes (see :meth:`RpcSession.call_stream`)."""
        conn = await self.connections.get(peer_id, timeout)
        stream = conn.session.call_stream(service, payload, timeout, window)
        try:
            async for item in stream:
                yield item
        finally:
            if not stream.done:
                stream.cancel()

    async def open_client_stream(
        self, peer_id: PeerId, service: str, timeout: float | None = None
    ) -> StreamCall:
        """Client-streaming call: ``await c.send(m)`` ..., ``c.end()``, ``await c.result()``."""
        conn = await self.connections.get(peer_id, timeout)
        return conn.session.call_client_stream(service, timeout)

    async def open_bidi(
        self, peer_id: PeerId, service: str, timeout: float | None = None
    ) -> StreamCall:
        """Bidirectional call: ``send``/``end`` while iterating replies."""
        conn = await self.connections.get(peer_id, timeout)
        return conn.session.call_bidi(service, timeout)

    async def identify(self, peer_id: PeerId, timeout: float = 10.0) -> IdentifyInfo:
        """Ask the peer who it is: the native protocol with a latticaray peer, libp2p's
        ``/ipfs/id/1.0.0`` with a foreign one."""
        conn = await self.connections.get(peer_id, timeout)
        if await conn.wait_native(timeout) or conn.raw.muxer is None:
            return await self.identify_service.identify(peer_id, timeout)
        # one identify at a time per connection: libp2p peers take one inbound identify stream
        # at once (js resets a second)
        muxer = conn.raw.muxer
        pending = self._libp2p_identifying.get(muxer)
        if pending is None:
            pending = asyncio.ensure_future(self.libp2p_identify.identify(muxer, timeout=timeout))
            self._libp2p_identifying[muxer] = pending
            pending.add_done_callback(lambda _f: self._libp2p_identifying.pop(muxer, None))
        await asyncio.wait_for(asyncio.shield(pending), timeout)
        return self.identify_service.peer_info[peer_id]

    async def ping(self, peer_id: PeerId, timeout: float = 10.0) -> float:
        """Round trip in seconds (native ping, or ``/ipfs/ping/1.0.0`` with a foreign peer)."""
        conn = await self.connections.get(peer_id, timeout)
        if await conn.wait_native(timeout) or conn.raw.muxer is None:
            return await self.identify_service.ping(peer_id, timeout)
        rtts = await self.libp2p_ping.ping(conn.raw.muxer, timeout=timeout)
        return rtts[0]

    def __repr__(self) -> str:
        return f"<MeshNode {self.peer_id}>"


class NodeThread:
    """A :class:`MeshNode` running in its own event loop on a daemon thread.

    For notebooks and synchronous code::

        with NodeThread(MeshConfig(...)) as nt:
            peer = nt.run(nt.node.connect(addr))
            reply = nt.run(nt.node.call(peer, "/x/1", b"hi"))
    """

    def __init__(self, config: MeshConfig | None = None, *, start_timeout: float = 30.0) -> None:
        self.node = MeshNode(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(
            target=self._main, name=f"mesh-{self.node.peer_id.short()}", daemon=True
        )
        self._start_timeout = start_timeout
        self._error: BaseException | None = None

    def _main(self) -> None:
        loop: asyncio.AbstractEventLoop
        try:
            import uvloop

            loop = uvloop.new_event_loop()
        except ImportError:
            loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self.node.start())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def start(self) -> NodeThread:
        self._thread.start()
        if not self._ready.wait(self._start_timeout):
            raise TimeoutError(f"mesh node did not start within {self._start_timeout} s")
        if self._error is not None:
            raise self._error
        return self

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the node's loop and return its result (blocking)."""
        if self._loop is None or not self._thread.is_alive():
            raise RuntimeError("node thread is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self, timeout: float = 15.0) -> None:
        if self._loop is None or not self._thread.is_alive():
            return
        try:
            self.run(self.node.stop(), timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)

    def __enter__(self) -> NodeThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
