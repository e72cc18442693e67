"""Connection manager: one RPC session per peer over the best transport, dial by peer ID.

Transports are wrapped in adapters (:mod:`latticaray.mesh.adapters`) that produce authenticated
:class:`RawConnection` objects: a peer ID, a :class:`~latticaray.mesh.channel.Channel` and a way
to close. The manager wraps each in an :class:`~latticaray.mesh.rpc.RpcSession` and keeps, per
peer, the connections it has; every protocol of the node reuses the peer's *primary* connection.
Addresses come from the :class:`~latticaray.mesh.peerstore.PeerStore`; which to dial first and
which connection is primary is the path policy of :mod:`latticaray.mesh.paths`.

* Dialing by peer ID tries the peer's known addresses in transport-preference order (same-host
  Unix socket first, then TCP, then QUIC by default), happy-eyeballs style: the next attempt
  starts when the previous one has not succeeded after ``happy_eyeballs_delay``; the first
  authenticated connection wins and the others are closed. Concurrent dials to one peer share a
  single attempt. Relay (circuit) addresses come last, except that for a peer offering only
  private-range direct addresses the first relay attempt starts with the first direct one
  (:func:`dial_schedule`).
* The *primary* connection of a peer is chosen by path rank first (:func:`path_rank`: same-host
  Unix socket, then TCP, then QUIC, then any other direct transport, and relayed connections
  last), so a direct connection always wins over a relayed one; among equal paths both ends keep
  the connection *dialed by the smaller peer ID* (both sides compute the same answer). A
  non-primary connection is closed by its dialer once it has no calls in flight.
* Unspecified addresses (``0.0.0.0``, ``::``) and port 0 are never stored nor dialed
  (:func:`is_dialable_addr`).
* Transports beyond the built-in ones (e.g. NAT traversal's ``circuit`` dialer) join with
  :meth:`ConnectionManager.register_transport`; connections authenticated outside the manager
  (a hole-punched QUIC connection) join with :meth:`ConnectionManager.add_connection`.
* ``on_peer_connected`` fires when a peer gets its first connection, ``on_peer_disconnected``
  when its last one closes, ``on_connection_added`` for every connection registered (e.g. a
  direct path joining a relayed one: users of long-lived streams move them to the new primary).
  Inbound connections beyond ``max_connections`` are refused.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .adapters import (
    RPC_PROTOCOL,
    NoRpcChannel,
    QuicAdapter,
    RawConnection,
    TransportAdapter,
)
from .errors import ConnectionClosed, PeerIdMismatch, PeerUnreachable
from .identity import PeerId
from .libp2p.stream import ProtocolRouter
from .multiaddr import Multiaddr
from .paths import (
    DEFAULT_TRANSPORT_PREFERENCE,
    RELAYED_TRANSPORTS,
    dial_schedule,
    is_dialable_addr,
    path_rank,
)
from .peerstore import PeerStore
from .rpc import RpcLimits, RpcRouter, RpcSession

# Path policy, adapters and the peer store live in their own modules; the names other layers
# used to import from here stay importable from here.
__all__ = [
    "DEFAULT_TRANSPORT_PREFERENCE",
    "RELAYED_TRANSPORTS",
    "RPC_PROTOCOL",
    "ConnectionManager",
    "MeshConnection",
    "PeerStore",
    "QuicAdapter",
    "RawConnection",
    "TransportAdapter",
    "dial_schedule",
    "is_dialable_addr",
    "path_rank",
]

log = logging.getLogger(__name__)


@dataclass(eq=False)
class MeshConnection:
    raw: RawConnection
    session: RpcSession
    dialer: PeerId
    opened_at: float = field(default_factory=time.monotonic)
    closed: bool = False
    _gone: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    async def wait_closed(self) -> None:
        """Until the manager has dropped this connection."""
        await self._gone.wait()

    @property
    def peer_id(self) -> PeerId:
        return self.raw.peer_id

    @property
    def transport(self) -> str:
        return self.raw.transport

    @property
    def remote_addr(self) -> Multiaddr | None:
        return self.raw.remote_addr

    @property
    def outbound(self) -> bool:
        return self.raw.outbound

    @property
    def relayed(self) -> bool:
        """True if this connection goes through a relay (a fallback path)."""
        return self.raw.transport in RELAYED_TRANSPORTS

    @property
    def native(self) -> bool | None:
        """True for a latticaray peer (an RPC session), False for a foreign libp2p peer, None
        while a dialed peer has not yet answered the lazy ``/latticaray/rpc/1`` proposal."""
        channel = self.raw.channel
        if channel is None:
            return False
        negotiated = getattr(channel, "negotiated", None)
        if negotiated is None:
            return True  # single-channel transports (TCP+TLS, Unix, relay tunnels)
        return negotiated.result() if negotiated.done() else None

    async def wait_native(self, timeout: float = 10.0) -> bool:
        """Whether the peer speaks latticaray RPC, once its answer is in (False on timeout)."""
        channel = self.raw.channel
        negotiated = getattr(channel, "negotiated", None)
        if negotiated is None:
            return channel is not None
        try:
            return bool(await asyncio.wait_for(asyncio.shield(negotiated), timeout))
        except TimeoutError:
            return False

    @property
    def usable(self) -> bool:
        """Open, and (for a latticaray peer) its RPC session too."""
        return not self.closed and (self.native is False or not self.session.closed)

    def close(self, reason: str = "closed") -> None:
        if self.closed:
            return
        if self.session.closed:  # a foreign peer's connection (no RPC session to close)
            self.raw.close(reason)
        else:
            self.session.close(reason)

    def __repr__(self) -> str:
        way = "out" if self.outbound else "in"
        return f"<MeshConnection {self.transport} {way} {self.peer_id}>"


class ConnectionManager:
    def __init__(
        self,
        local_peer: PeerId,
        router: RpcRouter,
        *,
        rpc_limits: RpcLimits | None = None,
        transport_preference: tuple[str, ...] = DEFAULT_TRANSPORT_PREFERENCE,
        max_connections: int = 1024,
        dial_timeout: float = 10.0,
        happy_eyeballs_delay: float = 0.25,
        streams: ProtocolRouter | None = None,
    ) -> None:
        self.local_peer = local_peer
        self.router = router
        #: Handlers of the libp2p streams peers open on multiplexed connections.
        self.streams = streams if streams is not None else ProtocolRouter()
        self.rpc_limits = rpc_limits or RpcLimits()
        self.transport_preference = tuple(transport_preference)
        self.max_connections = max_connections
        self.dial_timeout = dial_timeout
        self.happy_eyeballs_delay = happy_eyeballs_delay
        self.peerstore = PeerStore()
        self.adapters: dict[str, TransportAdapter] = {}
        self._conns: dict[PeerId, list[MeshConnection]] = {}
        self._dialing: dict[PeerId, asyncio.Future] = {}
        self._connected_cbs: list[Callable[[PeerId], None]] = []
        self._disconnected_cbs: list[Callable[[PeerId], None]] = []
        self._added_cbs: list[Callable[[MeshConnection], None]] = []
        self._closing = False
        self._reaper: asyncio.Task | None = None
        #: Peers this node will not talk to (a revoked member): no dial, and a connection from
        #: one, either way, is closed as it registers (libp2p's connection gater).
        self._blocked: dict[PeerId, str] = {}

    # -- setup -------------------------------------------------------------------------------------
    def add_adapter(self, adapter: TransportAdapter) -> None:
        self.adapters[adapter.name] = adapter

    def register_transport(self, adapter: TransportAdapter) -> None:
        """Add a dial-only or extra transport (e.g. NAT traversal's ``circuit`` adapter): its
        addresses are dialed after those of every transport already known, i.e. as a fallback."""
        self.add_adapter(adapter)
        if adapter.name not in self.transport_preference:
            self.transport_preference = tuple(self.transport_preference) + (adapter.name,)

    def start(self) -> None:
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_loop())

    def on_peer_connected(self, callback: Callable[[PeerId], None]) -> None:
        self._connected_cbs.append(callback)

    def on_peer_disconnected(self, callback: Callable[[PeerId], None]) -> None:
        self._disconnected_cbs.append(callback)

    def on_connection_added(self, callback: Callable[[MeshConnection], None]) -> None:
        """``callback(conn)`` after each connection is registered (it may now be the primary)."""
        self._added_cbs.append(callback)

    # -- queries -------------------------------------------------------------------------------------
    def connected_peers(self) -> list[PeerId]:
        return [peer for peer, conns in self._conns.items() if conns]

    def connections(self, peer: PeerId | None = None) -> list[MeshConnection]:
        if peer is not None:
            return list(self._conns.get(peer, ()))
        return [c for conns in self._conns.values() for c in conns]

    def connection_count(self) -> int:
        return sum(len(c) for c in self._conns.values())

    def primary(self, peer: PeerId) -> MeshConnection | None:
        conns = [c for c in self._conns.get(peer, ()) if c.usable]
        if not conns:
            return None
        # Both ends must pick the same one: best path first (direct before relayed), then the
        # connection dialed by the smaller peer ID; ties (our own duplicate dials) go to the oldest.
        return min(conns, key=lambda c: (path_rank(c.transport), c.dialer.to_bytes(), c.opened_at))

    async def upgrade(
        self, peer: PeerId, addr: Multiaddr, timeout: float | None = None
    ) -> MeshConnection | None:
        """Dial ``addr`` even though ``peer`` is connected; if the new path is better it becomes
        primary (on both ends) and the old connection is closed by its dialer once idle."""
        current = self.primary(peer)
        transport = addr.transport or ""
        if current is not None and path_rank(transport) >= path_rank(current.transport):
            return current
        raw = await self._dial_one(addr.with_peer(peer), peer, timeout or self.dial_timeout)
        self._register(raw)
        return self.primary(peer)

    # -- getting a session -------------------------------------------------------------------------------
    # -- gating --------------------------------------------------------------------------------
    async def block(self, peer: PeerId, reason: str) -> None:
        """Refuse ``peer`` from now on (until :meth:`unblock`): its connections are closed, it is
        never dialed, and a connection it makes is closed as soon as it is authenticated."""
        self._blocked[peer] = reason
        await self.disconnect(peer, f"blocked: {reason}")

    def unblock(self, peer: PeerId) -> None:
        self._blocked.pop(peer, None)

    def blocked(self, peer: PeerId) -> str | None:
        """Why ``peer`` is refused, or None."""
        return self._blocked.get(peer)

    def _refuse_blocked(self, peer: PeerId) -> None:
        reason = self._blocked.get(peer)
        if reason is not None:
            raise PeerUnreachable(f"peer {peer} is blocked: {reason}")

    async def session(self, peer: PeerId, timeout: float | None = None) -> RpcSession:
        return (await self.get(peer, timeout)).session

    async def get(self, peer: PeerId, timeout: float | None = None) -> MeshConnection:
        """The peer's primary connection, dialing its known addresses if there is none."""
        conn = self.primary(peer)
        if conn is not None:
            return conn
        if peer == self.local_peer:
            raise PeerUnreachable("cannot connect to ourselves")
        self._refuse_blocked(peer)
        pending = self._dialing.get(peer)
        if pending is None:
            pending = asyncio.ensure_future(self._dial_peer(peer, timeout or self.dial_timeout))
            self._dialing[peer] = pending
            pending.add_done_callback(functools.partial(self._dial_settled, peer))
        return await asyncio.shield(pending)

    def _dial_settled(self, peer: PeerId, dial: asyncio.Future) -> None:
        self._dialing.pop(peer, None)
        if not dial.cancelled():
            dial.exception()  # retrieved: callers that gave up waiting (shutdown) leave it unread

    async def dial_addr(
        self, addr: Multiaddr, timeout: float | None = None, *, force_new: bool = False
    ) -> MeshConnection:
        """Dial one address (verifying its ``/p2p`` ID if it has one) and register the connection.

        Returns the peer's primary connection afterwards; an existing primary is reused without
        dialing unless ``force_new``, which always dials and returns the new connection itself
        (it becomes primary only if its path ranks better, see :func:`path_rank`)."""
        addr = Multiaddr.parse(addr)
        expected = addr.peer_id
        if expected is not None:
            if expected == self.local_peer:
                raise PeerUnreachable("cannot connect to ourselves")
            self._refuse_blocked(expected)
            existing = self.primary(expected)
            if existing is not None and not force_new:
                return existing
        if not is_dialable_addr(addr):
            raise PeerUnreachable(f"{addr} is not dialable (unspecified address or port 0)")
        raw = await self._dial_one(addr, expected, timeout or self.dial_timeout)
        conn = self._register(raw)
        if expected is None:
            self.peerstore.add(raw.peer_id, [addr])
        if force_new:
            return conn
        return self.primary(conn.peer_id) or conn

    def _ordered_addrs(self, peer: PeerId) -> list[Multiaddr]:
        rank = {name: i for i, name in enumerate(self.transport_preference)}
        candidates = []
        for index, addr in enumerate(self.peerstore.get(peer)):
            transport = addr.transport
            if transport not in rank or transport not in self.adapters:
                continue
            if not self.adapters[transport].can_dial(addr):
                continue
            if transport == "unix" and not os.path.exists(addr.unix_path or ""):
                continue  # not on this host
            if not is_dialable_addr(addr):
                continue
            loopback_first = 0 if addr.is_loopback() else 1
            candidates.append((rank[transport], loopback_first, index, addr))
        candidates.sort(key=lambda c: c[:3])
        return [c[3] for c in candidates]

    async def _dial_peer(self, peer: PeerId, timeout: float) -> MeshConnection:
        addrs, no_wait = dial_schedule(self._ordered_addrs(peer))
        if not addrs:
            raise PeerUnreachable(f"no dialable address known for {peer}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        errors: list[str] = []
        # attempt -> the address it dials, in the order started
        attempts: dict[asyncio.Task[RawConnection], Multiaddr] = {}
        winner: RawConnection | None = None
        mismatch: PeerIdMismatch | None = None
        try:
            for index, addr in enumerate(addrs):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                task = loop.create_task(self._dial_one(addr.with_peer(peer), peer, remaining))
                attempts[task] = addr
                wait = 0.0 if index in no_wait else self.happy_eyeballs_delay
                winner = await self._first_success(attempts, errors, wait)
                if winner is not None:
                    break
            while winner is None and any(not t.done() for t in attempts):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                winner = await self._first_success(attempts, errors, remaining)
        finally:
            for task in attempts:
                if not task.done():
                    task.cancel()
                    task.add_done_callback(_close_late_winner)
                elif (
                    not task.cancelled()
                    and task.exception() is None
                    and task.result() is not winner
                ):
                    task.result().close("happy-eyeballs loser")
                elif not task.cancelled():
                    error = task.exception()
                    if isinstance(error, PeerIdMismatch):
                        mismatch = error
        if winner is None:
            if mismatch is not None:
                raise mismatch
            detail = "; ".join(errors) or f"no answer within {timeout:.1f} s"
            raise PeerUnreachable(f"could not reach {peer}: {detail}")
        return self._register(winner)

    async def _first_success(
        self,
        attempts: dict[asyncio.Task[RawConnection], Multiaddr],
        errors: list[str],
        wait: float,
    ) -> RawConnection | None:
        loop = asyncio.get_running_loop()
        end = loop.time() + wait
        while True:
            pending = [t for t in attempts if not t.done()]
            for task in attempts:
                if task.done() and not task.cancelled() and task.exception() is None:
                    return task.result()
            if not pending:
                return None
            remaining = end - loop.time()
            if remaining <= 0:
                return None
            done, _ = await asyncio.wait(
                pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    errors.append(f"{attempts[task]}: {task.exception()}")

    async def _dial_one(
        self, addr: Multiaddr, expected: PeerId | None, timeout: float
    ) -> RawConnection:
        adapter = self.adapters.get(addr.transport or "")
        if adapter is None or not adapter.can_dial(addr):
            raise PeerUnreachable(f"no transport can dial {addr}")
        try:
            # asyncio.timeout, not wait_for: no inner task whose error (a dial failing as it is
            # cancelled at shutdown) would be left unretrieved
            async with asyncio.timeout(timeout):
                raw = await adapter.dial(addr, expected, timeout)
        except TimeoutError:
            raise PeerUnreachable(f"dial {addr} timed out after {timeout:.1f} s") from None
        except (OSError, ConnectionClosed) as exc:
            raise PeerUnreachable(f"dial {addr} failed: {exc}") from None
        if expected is not None and raw.peer_id != expected:
            raw.close("peer id mismatch")
            raise PeerIdMismatch(expected, raw.peer_id)
        return raw

    # -- registration ----------------------------------------------------------------------------------
    def add_connection(self, raw: RawConnection) -> MeshConnection:
        """Register a connection authenticated outside the manager (e.g. a hole-punched QUIC
        connection, either direction). It becomes the peer's primary if its path ranks best.
        Raises :class:`ConnectionClosed` (and closes ``raw``) if the manager is shutting down."""
        if raw.peer_id == self.local_peer:
            raw.close("connection to ourselves")
            raise PeerUnreachable("cannot connect to ourselves")
        return self._register(raw)

    def accept_inbound(self, raw: RawConnection) -> None:
        """Adapters call this with each authenticated inbound connection."""
        if self._closing or self.connection_count() >= self.max_connections:
            log.info(
                "refusing inbound %s connection from %s: limit of %d connections",
                raw.transport,
                raw.peer_id,
                self.max_connections,
            )
            raw.close("connection limit")
            return
        if raw.peer_id in self._blocked:
            log.info(
                "refusing inbound %s connection of blocked peer %s", raw.transport, raw.peer_id
            )
            raw.close("peer blocked")
            return
        self._register(raw)

    def _register(self, raw: RawConnection) -> MeshConnection:
        if self._closing:
            raw.close("node shutting down")
            raise ConnectionClosed("node is shutting down")
        if raw.peer_id in self._blocked:
            log.info("closing a %s connection of blocked peer %s", raw.transport, raw.peer_id)
            raw.close("peer blocked")
            raise PeerUnreachable(f"peer {raw.peer_id} is blocked: {self._blocked[raw.peer_id]}")
        channel = raw.channel
        if channel is None:  # a foreign libp2p peer: no RPC, libp2p streams only
            channel = NoRpcChannel(self.local_peer, raw.peer_id, raw.remote_addr)
        session = RpcSession(channel, self.router, self.rpc_limits)
        dialer = self.local_peer if raw.outbound else raw.peer_id
        conn = MeshConnection(raw=raw, session=session, dialer=dialer)
        peer = raw.peer_id
        conns = self._conns.setdefault(peer, [])
        first = not conns
        conns.append(conn)
        session.on_close(lambda _session: self._on_session_closed(conn))
        if raw.on_close is not None:
            raw.on_close(lambda: self._on_transport_closed(conn))
        if raw.muxer is not None:
            raw.attach_rpc = functools.partial(self._attach_rpc, conn)
        log.debug(
            "connected to %s over %s (%s)",
            peer,
            raw.transport,
            "outbound" if raw.outbound else "inbound",
        )
        if first:
            for on_connected in list(self._connected_cbs):
                _safe_call(on_connected, peer)
        for on_added in list(self._added_cbs):
            _safe_call(on_added, conn)
        return conn

    def _on_session_closed(self, conn: MeshConnection) -> None:
        """An RPC session ended: the connection goes with it, unless the peer is a foreign
        libp2p peer (no RPC) whose connection serves libp2p streams only."""
        if conn.raw.muxer is not None and conn.native is False:
            log.debug("%s speaks no %s: kept for libp2p streams", conn.peer_id, RPC_PROTOCOL)
            return
        self._on_closed(conn)

    def _on_transport_closed(self, conn: MeshConnection) -> None:
        conn.session.close("transport connection closed")
        self._on_closed(conn)

    def _attach_rpc(self, conn: MeshConnection, channel: object) -> None:
        """An RPC stream arrived on a connection first registered as foreign."""
        if conn.closed or not conn.session.closed:
            return
        conn.session = RpcSession(channel, self.router, self.rpc_limits)
        conn.session.on_close(lambda _session: self._on_session_closed(conn))
        for on_added in list(self._added_cbs):
            _safe_call(on_added, conn)

    def _on_closed(self, conn: MeshConnection) -> None:
        if conn.closed:
            return
        conn.closed = True
        conn._gone.set()
        try:
            conn.raw.close(conn.session.close_reason or "session closed")
        except Exception:
            pass
        conns = self._conns.get(conn.peer_id)
        if conns is None or conn not in conns:
            return
        conns.remove(conn)
        if not conns:
            del self._conns[conn.peer_id]
            for callback in list(self._disconnected_cbs):
                _safe_call(callback, conn.peer_id)

    async def _reap_loop(self) -> None:
        """Close duplicate connections we dialed once they are idle and not primary."""
        while True:
            await asyncio.sleep(1.0)
            # in a function of its own: loop variables left in this coroutine's frame kept the
            # last connection looked at (closed or not, with all its transport state) alive
            self._reap_duplicates(time.monotonic())

    def _reap_duplicates(self, now: float) -> None:
        for peer, conns in list(self._conns.items()):
            if len(conns) < 2:
                continue
            primary = self.primary(peer)
            for conn in list(conns):
                if conn is primary or conn.dialer != self.local_peer:
                    continue
                if now - conn.opened_at > 2.0 and conn.session.active_calls == 0:
                    conn.close("duplicate connection")

    # -- shutdown -------------------------------------------------------------------------------------
    async def disconnect(self, peer: PeerId, reason: str = "disconnect requested") -> None:
        conns = list(self._conns.get(peer, ()))
        for conn in conns:
            conn.close(reason)
        for conn in conns:
            try:
                await asyncio.wait_for(conn.wait_closed(), 5.0)
            except TimeoutError:
                pass

    async def close(self) -> None:
        self._closing = True
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for task in list(self._dialing.values()):
            task.cancel()
        conns = self.connections()
        for conn in conns:
            conn.close("node shutting down")
        if conns:
            await asyncio.wait(
                [asyncio.ensure_future(c.session.wait_closed()) for c in conns], timeout=3.0
            )
        for adapter in list(self.adapters.values()):
            try:
                await adapter.close()
            except Exception:
                log.exception("closing transport %s failed", adapter.name)


def _close_late_winner(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().close("happy-eyeballs loser")


def _safe_call(callback: Callable[..., None], *args: object) -> None:
    try:
        callback(*args)
    except Exception:
        log.exception("connection event callback failed")
