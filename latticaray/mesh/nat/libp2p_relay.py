"""Circuit relay v2 the libp2p way, on a :class:`~latticaray.mesh.node.MeshNode`: both roles.

libp2p peers (js-libp2p, go-libp2p, rust-libp2p, Lattica) relay with
``/libp2p/circuit/relay/0.2.0/hop`` and ``/stop`` (codecs in :mod:`latticaray.mesh.libp2p.relay`)
over their ordinary connections; a relayed connection is a whole libp2p connection
(multistream, Noise, yamux) run over one such stream. This module is that, beside the mesh's own
relay (:mod:`.relay_server`, TLS over TCP between latticaray peers):

* :class:`Libp2pRelayService` (the relay, hop role; opt-in: ``NatConfig(serve_relay=True)``
  starts it with the mesh's own relay, or start it on a node by hand). RESERVE answers with a
  reservation (expiry, the relay's addresses, a voucher signed by the relay) and the limit of
  the circuits the peer will get; CONNECT opens ``/stop`` to the reserved target over the
  connection the reservation came on (or the target's primary one), forwards the target's
  answer and splices the two streams, each direction counted against the limit's ``data`` and
  the whole circuit against its ``duration``: past either, both streams are reset. Slots,
  circuits per peer and per IP, and request rates are :class:`~.relay.RelayCore`'s, the same
  book-keeping as the mesh's own relay. Who may use it: the mesh's members (``is_member``) with
  the relay's full limits (``RelayConfig.circuit_max_bytes`` / ``circuit_max_duration``);
  anyone else only when ``public`` is on, and then with the smaller public limit
  (:class:`Libp2pRelayConfig`, libp2p's defaults: 2 minutes, 128 KiB each way), enough for
  identify, ping and a DCUtR upgrade, not for bulk transfers. Requests over a relayed connection
  are refused (no chained hops).
* :class:`Libp2pCircuits` (the client; every node has one, ``node.circuits``):
  :meth:`~Libp2pCircuits.reserve` holds a reservation on a relay (checks its voucher, serves
  ``/stop`` from then on and advertises ``<relay>/p2p/RELAY/p2p-circuit``); an incoming circuit
  from a relay we hold a reservation on is accepted and upgraded as the responder; and the
  ``circuit`` transport (:class:`Libp2pCircuitAdapter`) dials ``.../p2p/RELAY/p2p-circuit/p2p/PEER``
  with a hop CONNECT and upgrades as the initiator. Relayed connections join the connection
  manager as transport ``relay`` (ranked after every direct path), so ``node.ping``,
  ``node.identify``, ``node.open_stream`` and, with a latticaray peer, ``node.call`` work over
  them. On a node that also runs the mesh's own relay client (``MeshNatService``) the adapter
  dials a circuit through that first when the relay is a latticaray peer (or not connected), and
  falls back to the hop protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

from ..adapters import InboundStreams, RawConnection, TransportAdapter, open_rpc_stream
from ..errors import ConnectionClosed, MeshError, PeerUnreachable, ProtocolViolation
from ..identity import PeerId
from ..libp2p.connection import Libp2pConnection, upgrade
from ..libp2p.errors import ProtobufError
from ..libp2p.keys import PrivateKey
from ..libp2p.peer_record import EnvelopeError
from ..libp2p.pipe import StreamPipe
from ..libp2p.relay import (
    HOP_PROTOCOL,
    MAX_RELAY_MESSAGE,
    STOP_PROTOCOL,
    HopMessage,
    HopType,
    RelayLimit,
    RelayPeer,
    RelayStatus,
    Reservation,
    StopMessage,
    StopType,
    Voucher,
    open_voucher,
)
from ..libp2p.stream import MuxedConnection, MuxedStream
from ..multiaddr import Multiaddr
from .errors import (
    CONNECTION_FAILED,
    MALFORMED,
    NO_RESERVATION,
    PERMISSION_DENIED,
    RATE_LIMITED,
    RESOURCE_LIMIT_EXCEEDED,
    RelayRefused,
)
from .libp2p_dcutr import Libp2pDcutr
from .relay import RelayConfig, RelayCore

if TYPE_CHECKING:
    from ..node import MeshNode

__all__ = [
    "CIRCUIT_TRANSPORT",
    "RELAYED_TRANSPORT",
    "Libp2pCircuitAdapter",
    "Libp2pCircuits",
    "Libp2pRelayConfig",
    "Libp2pRelayService",
    "Libp2pReservation",
]

log = logging.getLogger(__name__)

CIRCUIT_TRANSPORT = "circuit"
RELAYED_TRANSPORT = "relay"
HOP_TIMEOUT = 10.0
KEEP_BACKOFF_MAX = 30.0
_SPLICE_CHUNK = 64 * 1024
_M = TypeVar("_M", covariant=True)

_STATUS_OF_CODE = {
    PERMISSION_DENIED: RelayStatus.PERMISSION_DENIED,
    NO_RESERVATION: RelayStatus.NO_RESERVATION,
    RESOURCE_LIMIT_EXCEEDED: RelayStatus.RESOURCE_LIMIT_EXCEEDED,
    RATE_LIMITED: RelayStatus.RESOURCE_LIMIT_EXCEEDED,
    CONNECTION_FAILED: RelayStatus.CONNECTION_FAILED,
    MALFORMED: RelayStatus.MALFORMED_MESSAGE,
}
_CODE_OF_STATUS = {
    RelayStatus.PERMISSION_DENIED: PERMISSION_DENIED,
    RelayStatus.NO_RESERVATION: NO_RESERVATION,
    RelayStatus.RESOURCE_LIMIT_EXCEEDED: RESOURCE_LIMIT_EXCEEDED,
    RelayStatus.RESERVATION_REFUSED: PERMISSION_DENIED,
    RelayStatus.CONNECTION_FAILED: CONNECTION_FAILED,
    RelayStatus.MALFORMED_MESSAGE: MALFORMED,
    RelayStatus.UNEXPECTED_MESSAGE: MALFORMED,
}


def _is_relayed(conn: MuxedConnection) -> bool:
    addr = conn.remote_multiaddr
    return addr is not None and addr.relay_peer is not None


def _remote_ip(conn: MuxedConnection) -> str:
    addr = conn.remote_multiaddr
    return (addr.host if addr is not None else None) or "?"


class _Decodable(Protocol[_M]):
    def decode(self, data: bytes) -> _M: ...


async def _read_message(stream: MuxedStream, kind: _Decodable[_M], timeout: float) -> _M:
    data = await stream.read_message(MAX_RELAY_MESSAGE, timeout=timeout)
    if data is None:
        raise ConnectionClosed("relay stream ended before its message")
    return kind.decode(data)


# ------------------------------------------------------------------------------ the relay (hop)
@dataclass
class Libp2pRelayConfig:
    """Who may use the libp2p relay of a node, and how much (see the module docstring)."""

    #: slots, circuits, request rates and the members' circuit limits
    relay: RelayConfig = field(default_factory=RelayConfig)
    #: non-members may reserve and connect (with ``public_limit``); off: members only
    public: bool = True
    public_limit: RelayLimit = field(default_factory=lambda: RelayLimit(120, 128 * 1024))

    def __post_init__(self) -> None:
        if self.public_limit.duration <= 0 or self.public_limit.data <= 0:
            raise ValueError("the public relay limit needs a positive duration and data budget")


class Libp2pRelayService:
    """Serves ``/libp2p/circuit/relay/0.2.0/hop`` on a node (see the module docstring)."""

    def __init__(
        self,
        node: MeshNode,
        config: Libp2pRelayConfig | None = None,
        *,
        is_member: Callable[[PeerId], bool] | None = None,
    ) -> None:
        self.node = node
        self.config = config or Libp2pRelayConfig()
        self.core = RelayCore(self.config.relay)
        self.is_member = is_member or (lambda _peer: False)
        self._identity = PrivateKey.from_keypair(node.key)
        #: reserved peer -> the connection its reservation came over (where /stop goes first)
        self._reserved_over: dict[str, MuxedConnection] = {}
        self._circuits: set[asyncio.Task[None]] = set()
        #: what the circuits carried, and why each one ended (the last 64)
        self.bytes_relayed = 0
        self.closed_circuits: list[str] = []

    def start(self) -> None:
        self.node.register_stream(HOP_PROTOCOL, self._serve_hop)

    async def stop(self) -> None:
        self.node.unregister_stream(HOP_PROTOCOL)
        for task in list(self._circuits):
            task.cancel()
        for task in list(self._circuits):
            with contextlib.suppress(BaseException):
                await task

    def limit_for(self, peer: PeerId) -> RelayLimit:
        """The circuit limit a peer gets: the relay's own for members, the public one else."""
        if self.is_member(peer):
            cfg = self.config.relay
            return RelayLimit(int(cfg.circuit_max_duration), int(cfg.circuit_max_bytes))
        return self.config.public_limit

    def _check_allowed(self, peer: PeerId) -> None:
        if not self.config.public and not self.is_member(peer):
            raise RelayRefused(PERMISSION_DENIED, "this relay serves the mesh's members only")

    async def _serve_hop(self, stream: MuxedStream) -> None:
        conn = stream.connection
        try:
            request = await _read_message(stream, HopMessage, HOP_TIMEOUT)
        except (ProtobufError, ProtocolViolation):
            await self._answer(
                stream, HopMessage(HopType.STATUS, status=RelayStatus.MALFORMED_MESSAGE)
            )
            return
        if request.type is HopType.RESERVE:
            await self._reserve(stream, conn)
        elif request.type is HopType.CONNECT:
            await self._connect(stream, conn, request)
        else:
            await self._answer(
                stream, HopMessage(HopType.STATUS, status=RelayStatus.UNEXPECTED_MESSAGE)
            )

    async def _answer(self, stream: MuxedStream, message: HopMessage) -> None:
        await stream.write_message(message.encode(), timeout=HOP_TIMEOUT)
        await stream.close()

    async def _refuse(self, stream: MuxedStream, exc: RelayRefused) -> None:
        status = _STATUS_OF_CODE.get(exc.code, RelayStatus.PERMISSION_DENIED)
        log.debug("libp2p relay refused %s: %s", stream.connection.remote_peer_text, exc)
        await self._answer(stream, HopMessage(HopType.STATUS, status=status))

    def _relay_addrs(self) -> tuple[bytes, ...]:
        out = []
        for addr in self.node.advertised_addrs:
            if addr.transport in ("tcp", "quic") and addr.relay_peer is None:
                out.append(addr.to_bytes())
        return tuple(out)

    async def _reserve(self, stream: MuxedStream, conn: MuxedConnection) -> None:
        peer = conn.mesh_peer_id
        loop = asyncio.get_running_loop()
        try:
            self._check_allowed(peer)
            reserved = self.core.reserve(
                str(peer), _remote_ip(conn), _is_relayed(conn), loop.time()
            )
        except RelayRefused as exc:
            await self._refuse(stream, exc)
            return
        self._reserved_over[str(peer)] = conn
        for gone in [p for p in self._reserved_over if p not in self.core.reservations]:
            del self._reserved_over[gone]  # expired or cancelled: bounded by the slots
        expire = int(time.time() + (reserved.expires - loop.time()))
        voucher = Voucher(self.node.peer_id.to_bytes(), conn.remote_peer_id, expire)
        answer = HopMessage(
            HopType.STATUS,
            reservation=Reservation(expire, self._relay_addrs(), voucher.seal(self._identity)),
            limit=self.limit_for(peer),
            status=RelayStatus.OK,
        )
        await self._answer(stream, answer)

    def _target_connection(self, target: PeerId) -> MuxedConnection | None:
        conn = self._reserved_over.get(str(target))
        if conn is not None and not conn.is_closed:
            return conn
        primary = self.node.connections.primary(target)
        if (
            primary is not None
            and primary.raw.muxer is not None
            and not primary.raw.muxer.is_closed
        ):
            return primary.raw.muxer
        return None

    async def _connect(
        self, stream: MuxedStream, conn: MuxedConnection, request: HopMessage
    ) -> None:
        src = conn.mesh_peer_id
        loop = asyncio.get_running_loop()
        try:
            if request.peer is None:
                raise RelayRefused(MALFORMED, "CONNECT names no peer")
            try:
                target = PeerId.from_bytes(request.peer.peer_id)
            except (ValueError, MeshError):
                raise RelayRefused(MALFORMED, "CONNECT names no valid peer ID") from None
            self._check_allowed(src)
            circuit = self.core.open_circuit(
                str(src), str(target), _is_relayed(conn), loop.time(), _remote_ip(conn)
            )
        except RelayRefused as exc:
            await self._refuse(stream, exc)
            return
        limit = self.limit_for(src)
        if not self.is_member(target):  # a circuit is as limited as its less trusted end
            limit = RelayLimit(
                min(limit.duration, self.config.public_limit.duration),
                min(limit.data, self.config.public_limit.data),
            )
        try:
            stop = await self._open_stop(target, src, limit)
        except RelayRefused as exc:
            self.core.close_circuit(circuit.circuit_id)
            await self._refuse(stream, exc)
            return
        try:
            self.core.accept_circuit(circuit.circuit_id, str(target), loop.time())
            await stream.write_message(
                HopMessage(HopType.STATUS, limit=limit, status=RelayStatus.OK).encode(),
                timeout=HOP_TIMEOUT,
            )
        except BaseException:
            self.core.close_circuit(circuit.circuit_id)
            stop.reset()
            raise
        task = asyncio.current_task()
        if task is not None:
            self._circuits.add(task)
        try:
            reason = await self._splice(stream, stop, limit)
        finally:
            self.core.close_circuit(circuit.circuit_id)
            if task is not None:
                self._circuits.discard(task)
        self.closed_circuits.append(f"{src} -> {target}: {reason}")
        del self.closed_circuits[:-64]
        log.debug("libp2p circuit %s -> %s closed: %s", src, target, reason)

    async def _open_stop(self, target: PeerId, src: PeerId, limit: RelayLimit) -> MuxedStream:
        target_conn = self._target_connection(target)
        if target_conn is None:
            self.core.cancel_reservation(str(target))
            raise RelayRefused(CONNECTION_FAILED, f"no connection to {target}")
        try:
            stop = await target_conn.open_stream(STOP_PROTOCOL, timeout=HOP_TIMEOUT)
            await stop.write_message(
                StopMessage(StopType.CONNECT, peer=RelayPeer(src.to_bytes()), limit=limit).encode(),
                timeout=HOP_TIMEOUT,
            )
            answer = await _read_message(stop, StopMessage, HOP_TIMEOUT)
        except (MeshError, TimeoutError, OSError, ProtobufError) as exc:
            raise RelayRefused(
                CONNECTION_FAILED, f"{target} did not take the circuit: {exc}"
            ) from None
        if answer.type is not StopType.STATUS or answer.status is not RelayStatus.OK:
            stop.reset()
            raise RelayRefused(CONNECTION_FAILED, f"{target} refused the circuit: {answer.status}")
        return stop

    async def _splice(self, a: MuxedStream, b: MuxedStream, limit: RelayLimit) -> str:
        """Copy both ways until both ends close, a direction passes ``limit.data`` or the
        circuit passes ``limit.duration``; returns why it ended."""
        loop = asyncio.get_running_loop()
        a.timeout = b.timeout = None
        over: list[str] = []

        async def pump(src: MuxedStream, dst: MuxedStream) -> None:
            left = limit.data or None
            while True:
                want = _SPLICE_CHUNK if left is None else min(_SPLICE_CHUNK, left + 1)
                data = await src.read(want, timeout=None)
                if not data:
                    await dst.close_write()
                    return
                if left is not None:
                    if len(data) > left:
                        over.append(f"data limit of {limit.data} bytes reached")
                        return
                    left -= len(data)
                self.bytes_relayed += len(data)
                await dst.write(data, timeout=None)

        tasks = [loop.create_task(pump(a, b)), loop.create_task(pump(b, a))]
        reason = "closed by the peers"
        try:
            pending = set(tasks)
            deadline = loop.time() + limit.duration if limit.duration else None
            while pending:
                timeout = None if deadline is None else max(0.0, deadline - loop.time())
                done, pending = await asyncio.wait(
                    pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    reason = f"duration limit of {limit.duration} s reached"
                    break
                if over:
                    reason = over[0]
                    break
                if any(t.exception() is not None for t in done):
                    reason = "a stream broke"
                    break
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if reason != "closed by the peers":
                a.reset()
                b.reset()
            else:
                for s in (a, b):
                    with contextlib.suppress(Exception):
                        await s.close()
        return reason


# ------------------------------------------------------------------------------ the client
@dataclass(frozen=True)
class Libp2pReservation:
    """A reservation held on a libp2p relay."""

    relay: PeerId
    relay_addr: Multiaddr
    expire: int  # Unix seconds
    limit: RelayLimit | None
    circuit_addr: Multiaddr  # <relay addr>/p2p/RELAY/p2p-circuit/p2p/US


class Libp2pCircuits:
    """A node's circuit relay v2 client (see the module docstring)."""

    def __init__(self, node: MeshNode) -> None:
        self.node = node
        self.identity = PrivateKey.from_keypair(node.key)
        self.reservations: dict[PeerId, Libp2pReservation] = {}
        self.adapter = Libp2pCircuitAdapter(self)
        #: DCUtR over our relayed connections (started with the first reservation or circuit)
        self.dcutr = Libp2pDcutr(node)
        self._serving_stop = False
        self._tasks: set[asyncio.Task[None]] = set()
        #: relays whose reservation is renewed (``reserve(keep=True)``) -> the renewing task
        self._keeping: dict[PeerId, asyncio.Task[None]] = {}
        #: the relayed connections open now (closed with the node)
        self._relayed: set[Libp2pConnection] = set()

    async def reserve(
        self, relay_addr: Multiaddr | str, timeout: float = HOP_TIMEOUT, *, keep: bool = False
    ) -> Libp2pReservation:
        """Reserve a slot on the relay at ``relay_addr`` (``.../p2p/RELAY``); from then on this
        node accepts circuits from it and advertises its circuit address. With ``keep`` the
        reservation is renewed when three quarters of its time have passed (and retried, with
        backoff, if a renewal fails) until :meth:`cancel`. Raises :class:`RelayRefused` if the
        relay says no, :class:`EnvelopeError` on a bad voucher."""
        addr = Multiaddr.parse(relay_addr)
        relay = addr.peer_id
        if relay is None or addr.relay_peer is not None:
            raise PeerUnreachable(f"a relay address must end in /p2p/<relay>: {addr}")
        reservation = await self._reserve_once(addr, relay, timeout)
        if keep and relay not in self._keeping:
            task = asyncio.get_running_loop().create_task(self._keep(addr, relay, timeout))
            self._keeping[relay] = task
            task.add_done_callback(lambda _t: self._keeping.pop(relay, None))
        return reservation

    async def _keep(self, addr: Multiaddr, relay: PeerId, timeout: float) -> None:
        backoff = 1.0
        while relay in self.reservations:
            left = self.reservations[relay].expire - time.time()
            await asyncio.sleep(max(0.5, left * 0.75))
            if relay not in self.reservations:
                return
            try:
                await self._reserve_once(addr, relay, timeout)
                backoff = 1.0
            except (MeshError, OSError, TimeoutError) as exc:
                log.info("renewing the reservation on %s failed: %s", relay, exc)
                held = self.reservations.get(relay)
                if held is not None and held.expire <= time.time():  # lapsed: stop advertising
                    self.node.remove_advertised_addrs([held.circuit_addr])
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, KEEP_BACKOFF_MAX)

    async def _reserve_once(
        self, addr: Multiaddr, relay: PeerId, timeout: float
    ) -> Libp2pReservation:
        conn = await self.node.connections.dial_addr(addr, timeout)
        muxer = conn.raw.muxer
        if muxer is None:
            raise PeerUnreachable(f"no libp2p connection to the relay {relay}")
        answer = await _hop(muxer, HopMessage(HopType.RESERVE), timeout)
        _check_ok(answer, "reservation")
        if answer.reservation is None:
            raise RelayRefused(MALFORMED, "the relay's OK carries no reservation")
        voucher = open_voucher(answer.reservation.voucher, relay.to_bytes())
        if voucher.peer != self.node.peer_id.to_bytes():
            raise EnvelopeError("the relay's voucher names another peer")
        relay_part = addr.without_peer()  # the address given (a connection may be inbound)
        circuit = relay_part.with_peer(relay).encapsulate("/p2p-circuit")
        reservation = Libp2pReservation(
            relay,
            relay_part.with_peer(relay),
            answer.reservation.expire,
            answer.limit,
            circuit.encapsulate(f"/p2p/{self.node.peer_id}"),
        )
        self.reservations[relay] = reservation
        if not self._serving_stop:
            self._serving_stop = True
            self.node.register_stream(STOP_PROTOCOL, self._serve_stop)
        self.dcutr.start()
        try:
            self.node.add_advertised_addrs([reservation.circuit_addr])
        except MeshError as exc:
            log.info("cannot advertise %s: %s", reservation.circuit_addr, exc)
        return reservation

    def cancel(self, relay: PeerId) -> None:
        """Forget the reservation on ``relay`` (circuits from it are refused from now on, and
        it is no longer renewed)."""
        keeping = self._keeping.pop(relay, None)
        if keeping is not None:
            keeping.cancel()
        reservation = self.reservations.pop(relay, None)
        if reservation is not None:
            self.node.remove_advertised_addrs([reservation.circuit_addr])

    async def _serve_stop(self, stream: MuxedStream) -> None:
        relay_conn = stream.connection
        relay = relay_conn.mesh_peer_id
        try:
            request = await _read_message(stream, StopMessage, HOP_TIMEOUT)
        except (ProtobufError, ProtocolViolation):
            await _stop_answer(stream, RelayStatus.MALFORMED_MESSAGE)
            return
        if request.type is not StopType.CONNECT or request.peer is None:
            await _stop_answer(stream, RelayStatus.UNEXPECTED_MESSAGE)
            return
        reservation = self.reservations.get(relay)
        if reservation is None or reservation.expire < time.time():
            await _stop_answer(stream, RelayStatus.PERMISSION_DENIED)
            return
        try:
            src = PeerId.from_bytes(request.peer.peer_id)
        except (ValueError, MeshError):
            await _stop_answer(stream, RelayStatus.MALFORMED_MESSAGE)
            return
        if self.node.connections.blocked(src) is not None:
            await _stop_answer(stream, RelayStatus.PERMISSION_DENIED)
            return
        await stream.write_message(
            StopMessage(StopType.STATUS, status=RelayStatus.OK).encode(), timeout=HOP_TIMEOUT
        )
        remote = reservation.relay_addr.encapsulate(f"/p2p-circuit/p2p/{src}")
        pipe = StreamPipe(stream)
        try:
            conn = await upgrade(
                pipe,
                pipe,
                self.identity,
                self.node.streams,
                initiator=False,
                expected_peer_id=src.to_bytes(),
                timeout=HOP_TIMEOUT,
                remote_multiaddr=remote,
            )
        except BaseException:
            pipe.abort()
            raise
        self._track(conn)
        self._adopt_inbound(conn)

    def _adopt_inbound(self, conn: Libp2pConnection) -> None:
        local = self.node.peer_id
        manager = self.node.connections

        def register(channel: object) -> RawConnection | None:
            raw = _relayed_raw(conn, channel, self._close)
            manager.accept_inbound(raw)
            return None if conn.is_closed else raw

        inbound = InboundStreams(conn, self.node.streams, RELAYED_TRANSPORT, local, register)
        conn.router = inbound
        expire = inbound.close_if_silent(
            conn.wait_closed,
            HOP_TIMEOUT,
            lambda: self._close(conn),
            f"relayed connection from {conn.remote_peer_text}",
        )
        task = asyncio.get_running_loop().create_task(expire)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _close(self, conn: Libp2pConnection) -> None:
        if conn.is_closed:
            return
        task = asyncio.get_running_loop().create_task(conn.close())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def dial(self, addr: Multiaddr, expected: PeerId | None, timeout: float) -> RawConnection:
        """Open a circuit through the relay named in ``addr`` and upgrade it (initiator)."""
        target = expected or addr.peer_id
        relay_addr = addr.relay_addr
        if target is None or relay_addr is None or addr.relay_peer is None:
            raise PeerUnreachable(f"circuit address {addr} names no relay or no target peer")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self.dcutr.start()  # the peer we reach may upgrade the circuit to a direct connection
        relay = await self.node.connections.dial_addr(relay_addr, timeout)
        if relay.raw.muxer is None:
            raise PeerUnreachable(f"no libp2p connection to the relay {addr.relay_peer}")
        if _is_relayed(relay.raw.muxer):
            raise PeerUnreachable("relays do not chain: the relay is itself reached over a relay")
        stream = await relay.raw.muxer.open_stream(HOP_PROTOCOL, timeout=timeout)
        try:
            await stream.write_message(
                HopMessage(HopType.CONNECT, peer=RelayPeer(target.to_bytes())).encode(),
                timeout=timeout,
            )
            answer = await _read_message(stream, HopMessage, max(0.001, deadline - loop.time()))
            _check_ok(answer, f"circuit to {target}")
        except BaseException:
            stream.reset()
            raise
        pipe = StreamPipe(stream)
        remote = addr.without_peer().with_peer(target) if addr.peer_id is None else addr
        try:
            conn = await upgrade(
                pipe,
                pipe,
                self.identity,
                self.node.streams,
                initiator=True,
                expected_peer_id=target.to_bytes(),
                timeout=max(0.001, deadline - loop.time()),
                remote_multiaddr=remote,
            )
        except BaseException:
            pipe.abort()
            raise
        self._track(conn)
        channel = open_rpc_stream(conn.new_stream(), RELAYED_TRANSPORT, self.node.peer_id, conn)
        raw = _relayed_raw(conn, channel, self._close)
        conn.router = InboundStreams(
            conn, self.node.streams, RELAYED_TRANSPORT, self.node.peer_id, None, raw=raw
        )
        return raw

    def _track(self, conn: Libp2pConnection) -> None:
        self._relayed.add(conn)
        conn.on_close(self._relayed.discard)

    async def close(self) -> None:
        for task in list(self._keeping.values()):
            task.cancel()
        await self.dcutr.close()
        for conn in list(self._relayed):
            with contextlib.suppress(Exception):
                await conn.close()
        for task in list(self._tasks):
            task.cancel()


def _relayed_raw(
    conn: Libp2pConnection, channel: object, close: Callable[[Libp2pConnection], None]
) -> RawConnection:
    return RawConnection(
        peer_id=conn.mesh_peer_id,
        channel=channel,
        transport=RELAYED_TRANSPORT,
        remote_addr=conn.remote_multiaddr,
        outbound=conn.outbound,
        close=lambda _reason: close(conn),
        on_close=lambda cb: conn.on_close(lambda _c: cb()),
        muxer=conn,
    )


async def _hop(muxer: MuxedConnection, message: HopMessage, timeout: float) -> HopMessage:
    stream = await muxer.open_stream(HOP_PROTOCOL, timeout=timeout)
    try:
        await stream.write_message(message.encode(), timeout=timeout)
        answer = await _read_message(stream, HopMessage, timeout)
    finally:
        await stream.close()
    return answer


def _check_ok(answer: HopMessage, what: str) -> None:
    if answer.type is not HopType.STATUS:
        raise RelayRefused(MALFORMED, f"the relay answered {answer.type.name}, not STATUS")
    if answer.status is not RelayStatus.OK:
        status = answer.status or RelayStatus.UNUSED
        code = _CODE_OF_STATUS.get(status, MALFORMED)
        raise RelayRefused(code, f"the relay refused the {what}: {status.name}")


async def _stop_answer(stream: MuxedStream, status: RelayStatus) -> None:
    await stream.write_message(StopMessage(StopType.STATUS, status=status).encode())
    await stream.close()


class Libp2pCircuitAdapter(TransportAdapter):
    """The ``circuit`` transport: dials ``/p2p-circuit`` addresses (see the module docstring).

    ``native`` is the mesh's own circuit dialer when ``MeshNatService`` runs: tried first when
    the relay is a latticaray peer or not connected, with the hop protocol as the fallback."""

    name = CIRCUIT_TRANSPORT

    def __init__(self, circuits: Libp2pCircuits) -> None:
        self.circuits = circuits
        self.native: TransportAdapter | None = None

    def can_listen(self, addr: Multiaddr) -> bool:
        return False

    def can_dial(self, addr: Multiaddr) -> bool:
        relay = addr.relay_addr
        return (
            addr.transport == CIRCUIT_TRANSPORT
            and relay is not None
            and addr.relay_peer is not None
            and relay.transport in ("tcp", "quic")
        )

    def _try_native_first(self, relay: PeerId) -> bool:
        if self.native is None:
            return False
        conn = self.circuits.node.connections.primary(relay)
        return conn is None or conn.native is not False

    async def dial(
        self, addr: Multiaddr, expected_peer: PeerId | None, timeout: float
    ) -> RawConnection:
        relay = addr.relay_peer
        if relay is not None and self.native is not None and self._try_native_first(relay):
            try:
                return await self.native.dial(addr, expected_peer, timeout)
            except (MeshError, OSError, TimeoutError) as exc:
                log.debug("the mesh relay's circuit to %s failed (%s): trying hop", addr, exc)
        return await self.circuits.dial(addr, expected_peer, timeout)

    async def close(self) -> None:
        await self.circuits.close()
