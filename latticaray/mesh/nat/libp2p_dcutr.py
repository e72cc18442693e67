"""DCUtR (``/libp2p/dcutr``) over a libp2p relayed connection: the asyncio shell of ``DcutrCore``.

A connection opened through a circuit relay v2 relay (:mod:`.libp2p_relay`) is upgraded to a
direct one the libp2p way. The peer that *accepted* the relayed connection (B, the reserved
target; :attr:`DcutrRole.INITIATOR`) opens ``/libp2p/dcutr`` on it and sends CONNECT with its
direct addresses, timing the answer; the peer that dialed through the relay (A,
:attr:`DcutrRole.RESPONDER`) answers CONNECT with its own. B then sends SYNC and dials A's
addresses after RTT/2; A dials B's as soon as SYNC arrives, so both dials meet (a TCP
simultaneous open or QUIC hole punch behind NATs; on an open network either dial simply
succeeds). Every address is dialed at once, so the packets to the one the peer dials from
leave in time whatever else it sent. The first direct connection joins the connection
manager, ranks before the relayed one and becomes the peer's primary path; B retries up to
:data:`MAX_ATTEMPTS` times.

The addresses sent are the node's advertised direct TCP/QUIC addresses (never a circuit or Unix
one); addresses received are bounded by the codec (32, 512 bytes each) and only TCP/QUIC ones
with no ``/p2p-circuit`` are dialed. Every read has a deadline. :attr:`Libp2pDcutr.upgrades`
records each exchange (role, RTT, outcome).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..connmgr import MeshConnection
from ..errors import MeshError, MultiaddrError, ProtocolViolation
from ..identity import PeerId
from ..libp2p.dcutr import (
    DCUTR_PROTOCOL,
    MAX_DCUTR_MESSAGE,
    DcutrCore,
    DcutrRole,
    DialAt,
    HolePunch,
)
from ..libp2p.errors import ProtocolNotSupported
from ..libp2p.stream import MuxedConnection, MuxedStream
from ..multiaddr import Multiaddr
from ..paths import RELAYED_TRANSPORTS

if TYPE_CHECKING:
    from ..node import MeshNode

__all__ = ["DCUTR_TIMEOUT", "MAX_ATTEMPTS", "DcutrUpgrade", "Libp2pDcutr"]

log = logging.getLogger(__name__)

DCUTR_TIMEOUT = 10.0
MAX_ATTEMPTS = 3
_MAX_RECORDS = 64
#: how often a dial round checks for a direct connection the peer's own dial brought in
_POLL = 0.1


@dataclass
class DcutrUpgrade:
    """One DCUtR exchange with ``peer`` as ``role``: ``direct`` once a direct path is up."""

    peer: PeerId
    role: DcutrRole
    attempt: int
    rtt: float | None = None
    direct: bool = False
    error: str = ""


class Libp2pDcutr:
    """Both roles of DCUtR on a node's relayed libp2p connections (see the module docstring)."""

    def __init__(self, node: MeshNode, *, dial_timeout: float = 5.0) -> None:
        self.node = node
        self.dial_timeout = dial_timeout
        #: upgrade relayed connections we accepted (off: answer only)
        self.enabled = True
        self.upgrades: list[DcutrUpgrade] = []
        self._started = False
        self._running: set[PeerId] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """Serve ``/libp2p/dcutr`` and upgrade the relayed connections accepted from now on."""
        if self._started:
            return
        self._started = True
        self.node.register_stream(DCUTR_PROTOCOL, self._serve)
        self.node.connections.on_connection_added(self._on_connection)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def _record(self, upgrade: DcutrUpgrade) -> DcutrUpgrade:
        self.upgrades.append(upgrade)
        del self.upgrades[:-_MAX_RECORDS]
        return upgrade

    def our_addrs(self) -> tuple[bytes, ...]:
        """The direct addresses we tell the peer (TCP/QUIC, no circuit, no Unix socket)."""
        out = []
        for addr in self.node.advertised_addrs:
            if addr.transport in ("tcp", "quic") and addr.relay_peer is None:
                out.append(addr.without_peer().to_bytes())
        return tuple(out)

    def _direct(self, peer: PeerId) -> MeshConnection | None:
        for conn in self.node.connections.connections(peer):
            if conn.transport not in RELAYED_TRANSPORTS and not conn.closed:
                return conn
        return None

    # -- B: we accepted the relayed connection ------------------------------------------------
    def _on_connection(self, conn: MeshConnection) -> None:
        muxer = conn.raw.muxer
        if (
            not self.enabled
            or conn.transport not in RELAYED_TRANSPORTS
            or conn.outbound
            or muxer is None
            or conn.peer_id in self._running
        ):
            return
        self._running.add(conn.peer_id)
        task = asyncio.get_running_loop().create_task(self._initiate(conn.peer_id, muxer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _initiate(self, peer: PeerId, muxer: MuxedConnection) -> None:
        try:
            for attempt in range(1, MAX_ATTEMPTS + 1):
                if self._direct(peer) is not None or muxer.is_closed:
                    return
                upgrade = self._record(DcutrUpgrade(peer, DcutrRole.INITIATOR, attempt))
                try:
                    await self._initiate_once(upgrade, muxer)
                except ProtocolNotSupported as exc:  # the peer does not speak DCUtR
                    upgrade.error = f"{type(exc).__name__}: {exc}"
                    return
                except (MeshError, TimeoutError, OSError) as exc:
                    upgrade.error = f"{type(exc).__name__}: {exc}"
                    log.debug("DCUtR with %s, attempt %d: %s", peer, attempt, upgrade.error)
                if upgrade.direct:
                    return
        finally:
            self._running.discard(peer)

    async def _initiate_once(self, upgrade: DcutrUpgrade, muxer: MuxedConnection) -> None:
        loop = asyncio.get_running_loop()
        core = DcutrCore(DcutrRole.INITIATOR, self.our_addrs())
        stream = await muxer.open_stream(DCUTR_PROTOCOL, timeout=DCUTR_TIMEOUT)
        try:
            await stream.write_message(core.start(loop.time()).encode(), timeout=DCUTR_TIMEOUT)
            answer = await _read(stream)
            dial = core.receive(answer, loop.time())
            upgrade.rtt = core.rtt
            for message in core.data_to_send():  # SYNC
                await stream.write_message(message.encode(), timeout=DCUTR_TIMEOUT)
        finally:
            await stream.close()
        if dial is not None:
            upgrade.direct = await self._dial(upgrade.peer, dial)

    # -- A: we dialed through the relay ----------------------------------------------------------
    async def _serve(self, stream: MuxedStream) -> None:
        conn = stream.connection
        peer = conn.mesh_peer_id
        addr = conn.remote_multiaddr
        if addr is None or addr.relay_peer is None:
            stream.reset()  # DCUtR runs on relayed connections only
            return
        loop = asyncio.get_running_loop()
        upgrade = self._record(DcutrUpgrade(peer, DcutrRole.RESPONDER, 1))
        core = DcutrCore(DcutrRole.RESPONDER, self.our_addrs())
        try:
            core.receive(await _read(stream), loop.time())  # CONNECT
            for message in core.data_to_send():
                await stream.write_message(message.encode(), timeout=DCUTR_TIMEOUT)
            dial = core.receive(await _read(stream), loop.time())  # SYNC
        except (MeshError, TimeoutError) as exc:
            upgrade.error = f"{type(exc).__name__}: {exc}"
            stream.reset()
            return
        await stream.close()
        if dial is not None:
            upgrade.direct = await self._dial(peer, dial)

    # -- both --------------------------------------------------------------------------------------
    async def _dial(self, peer: PeerId, dial: DialAt) -> bool:
        loop = asyncio.get_running_loop()
        delay = dial.when - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        addrs = []
        for raw in dial.addrs:
            try:
                addr = Multiaddr.from_bytes(raw)
            except (MultiaddrError, ValueError):
                continue
            if addr.transport in ("tcp", "quic") and addr.relay_peer is None:
                addrs.append(addr.without_peer().with_peer(peer))
        if not addrs or self._direct(peer) is not None:
            return self._direct(peer) is not None
        # every address at once: a punch only works if our packets to the address the peer
        # dials from leave while its own dials are still retrying, whatever else it sent
        # (LAN addresses of its own, unreachable from here, fail on their own time)
        tasks = {loop.create_task(self._dial_one(addr)) for addr in addrs}
        deadline = loop.time() + self.dial_timeout
        try:
            pending = tasks
            while pending and self._direct(peer) is None and loop.time() < deadline:
                done, pending = await asyncio.wait(
                    pending,
                    timeout=min(_POLL, max(0.0, deadline - loop.time())),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if any(t.result() for t in done):
                    break
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return self._direct(peer) is not None

    async def _dial_one(self, addr: Multiaddr) -> bool:
        try:
            await self.node.connections.dial_addr(addr, self.dial_timeout, force_new=True)
            return True
        except (MeshError, OSError, TimeoutError) as exc:
            log.debug("DCUtR dial of %s failed: %s", addr, exc)
            return False


async def _read(stream: MuxedStream) -> HolePunch:
    data = await stream.read_message(MAX_DCUTR_MESSAGE, timeout=DCUTR_TIMEOUT)
    if data is None:
        raise ProtocolViolation("DCUtR stream ended before its message")
    return HolePunch.decode(data)
