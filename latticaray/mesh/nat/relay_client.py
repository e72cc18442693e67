"""A peer's side of the relay: :class:`RelayClient` and its :class:`RelayReservation` s.

A reservation is a TLS connection to the relay kept open as a control stream: renewed before its
TTL ends (which is also the keepalive that holds NAT mappings), it receives ``incoming`` when
someone opens a circuit to us, which the client accepts on a fresh connection and hands over as
an end-to-end :class:`SecureTunnel`. :meth:`RelayClient.connect` opens a circuit to a reserved
peer. Framing: :mod:`.relay_transport`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from ..errors import HandshakeError, MeshError
from ..identity import KeyPair, PeerId
from . import wire
from .relay import (
    check_status,
)
from .relay_transport import (
    ACCEPT_TIMEOUT,
    CONTROL_TIMEOUT,
    KEEPALIVE_INTERVAL,
    FramedStream,
    open_outer,
)
from .tunnel import SecureTunnel

log = logging.getLogger(__name__)

IncomingHandler = Callable[[SecureTunnel], Awaitable[None]]


class RelayReservation:
    """A live reservation on one relay: its control stream, renewals and incoming circuits."""

    def __init__(self, client: RelayClient, relay_peer: PeerId, host: str, port: int) -> None:
        self.client = client
        self.relay_peer = relay_peer
        self.host = host
        self.port = port
        self.ttl = 0.0
        self.limits: dict = {}
        self._stream: FramedStream | None = None
        self._task: asyncio.Task | None = None
        self._replies: asyncio.Queue = asyncio.Queue(maxsize=8)
        self.closed = asyncio.Event()

    async def open(self, timeout: float = CONTROL_TIMEOUT) -> None:
        self._stream = await open_outer(
            self.host, self.port, self.client.key, self.relay_peer, timeout
        )
        try:
            await self._stream.send_message(wire.encode("reserve"))
            reply = check_status(await self._stream.read_message(timeout), "reserve_resp")
        except BaseException:
            self._stream.close()
            raise
        self.ttl = wire.get_float(reply, "ttl", 0, 10**7)
        self.limits = {"bytes": reply.get("bytes"), "secs": reply.get("secs")}
        self._task = asyncio.get_running_loop().create_task(self._run(self._stream))

    async def _run(self, stream: FramedStream) -> None:
        loop = asyncio.get_running_loop()
        keepalive = min(KEEPALIVE_INTERVAL, max(1.0, self.ttl / 2))
        next_renew = loop.time() + keepalive
        try:
            while True:
                try:
                    msg = await stream.read_message(timeout=max(0.05, next_renew - loop.time()))
                except TimeoutError:
                    await stream.send_message(wire.encode("reserve"))
                    next_renew = loop.time() + keepalive
                    continue
                if msg["t"] == "incoming":
                    src = wire.get_str(msg, "src", 128)
                    cid = wire.get_int(msg, "cid", 1, 2**63)
                    self.client._spawn(self.client._accept(self, src, cid))
                elif msg["t"] == "reserve_resp":
                    check_status(msg, "reserve_resp")
        except asyncio.CancelledError:
            pass
        except (MeshError, OSError, ConnectionError) as exc:
            log.info("reservation on %s ended: %s", self.relay_peer, exc)
        finally:
            stream.close()
            self.closed.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        elif self._stream is not None:
            self._stream.close()


class RelayClient:
    """A peer's side of the relay: keep reservations, open and accept relayed secure channels."""

    def __init__(self, key: KeyPair, on_incoming: IncomingHandler) -> None:
        self.key = key
        self.on_incoming = on_incoming
        self.reservations: dict[str, RelayReservation] = {}
        self._tasks: set[asyncio.Task] = set()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reserve(self, relay_peer: PeerId, host: str, port: int) -> RelayReservation:
        reservation = RelayReservation(self, relay_peer, host, port)
        await reservation.open()
        old = self.reservations.pop(str(relay_peer), None)
        if old is not None:
            await old.close()
        self.reservations[str(relay_peer)] = reservation
        return reservation

    async def release(self, relay_peer: PeerId) -> None:
        """Give up the reservation on ``relay_peer`` (the relay cancels it when the stream ends)."""
        reservation = self.reservations.pop(str(relay_peer), None)
        if reservation is not None:
            await reservation.close()

    async def connect(
        self,
        relay_peer: PeerId,
        host: str,
        port: int,
        target: PeerId,
        timeout: float = CONTROL_TIMEOUT,
    ) -> SecureTunnel:
        """Open a circuit to ``target`` through the relay; returns the end-to-end secure channel."""
        stream = await open_outer(host, port, self.key, relay_peer, timeout)
        try:
            await stream.send_message(wire.encode("connect", peer=str(target)))
            check_status(await stream.read_message(timeout + ACCEPT_TIMEOUT), "connect_resp")
            return await SecureTunnel.client(
                stream, self.key, target, transport="relay", timeout=timeout
            )
        except BaseException:
            stream.close()
            raise

    async def _accept(self, reservation: RelayReservation, src: str, cid: int) -> None:
        stream = None
        try:
            stream = await open_outer(
                reservation.host,
                reservation.port,
                self.key,
                reservation.relay_peer,
                CONTROL_TIMEOUT,
            )
            await stream.send_message(wire.encode("accept", cid=cid))
            check_status(await stream.read_message(), "accept_resp")
            tunnel = await SecureTunnel.server(stream, self.key, transport="relay")
            if str(tunnel.remote_peer) != src:
                tunnel.abort()
                raise HandshakeError(
                    f"relay announced {src} but the tunnel peer is {tunnel.remote_peer}"
                )
        except asyncio.CancelledError:
            if stream is not None:
                stream.close()
            raise
        except Exception as exc:
            log.info("accepting relayed circuit %s from %s failed: %s", cid, src, exc)
            if stream is not None:
                stream.close()
            return
        await self.on_incoming(tunnel)

    async def close(self) -> None:
        for reservation in list(self.reservations.values()):
            await reservation.close()
        self.reservations.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
