"""Circuit relay over TCP + TLS (asyncio driver of :mod:`latticaray.mesh.nat.relay`).

Every connection to the relay is a :class:`SecureTunnel` over TCP (relay = TLS server, the peer
authenticates in-band), so the relay knows who asks. The first length-prefixed msgpack frame says
what the connection is for:

* ``reserve`` — the peer's reservation; the connection stays open as its control stream (renewals,
  ``ping``; the relay sends ``incoming {src, cid}`` when someone opens a circuit to the peer);
* ``connect {peer}`` — open a circuit to a reserved peer;
* ``accept {cid}`` — the target's answer to ``incoming``, on a fresh connection.

After OK replies the relay splices the two connections' plaintext, which is the ciphertext of the
end-to-end :class:`SecureTunnel` the two peers run inside: the relay never sees their data. Each
direction is counted against the circuit's byte budget and duration (see ``RelayCore``).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Awaitable, Callable

from ..errors import ConnectionClosed, HandshakeError, MeshError
from ..identity import KeyPair, PeerId
from . import wire
from .errors import (
    CONNECTION_FAILED,
    MALFORMED,
    OK,
    CircuitLimitExceeded,
    MalformedMessage,
    RelayRefused,
)
from .relay import (
    RelayConfig,
    RelayCore,
    check_status,
    connect_refused,
    connect_response,
    reserve_refused,
    reserve_response,
)
from .tunnel import SecureTunnel, StreamPair

log = logging.getLogger(__name__)

MAX_CONTROL_FRAME = 8192
CONTROL_TIMEOUT = 10.0
ACCEPT_TIMEOUT = 10.0
KEEPALIVE_INTERVAL = 15.0


class FramedStream:
    """Length-prefixed control frames on a byte stream, then raw bytes (nothing over-read is lost)."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self._buf = bytearray()
        #: set on a target's stream while the relay splices it; resolved when the circuit ends
        self.done: asyncio.Future | None = None

    async def _fill(self, n: int) -> None:
        while len(self._buf) < n:
            chunk = await self.stream.read(65536)
            if not chunk:
                raise ConnectionClosed("stream closed while reading a control frame")
            self._buf += chunk

    async def read_message(self, timeout: float = CONTROL_TIMEOUT) -> dict:
        async def _read() -> dict:
            await self._fill(4)
            (length,) = struct.unpack(">I", self._buf[:4])
            if length > MAX_CONTROL_FRAME:
                raise MalformedMessage(
                    f"control frame of {length} bytes exceeds {MAX_CONTROL_FRAME}"
                )
            await self._fill(4 + length)
            body = bytes(self._buf[4 : 4 + length])
            del self._buf[: 4 + length]
            return wire.decode(body, MAX_CONTROL_FRAME)

        return await asyncio.wait_for(_read(), timeout)

    async def send_message(self, data: bytes) -> None:
        self.stream.write(struct.pack(">I", len(data)) + data)
        await self.stream.drain()

    # ByteStream for what comes after the control frames
    async def read(self, max_bytes: int) -> bytes:
        if self._buf:
            data = bytes(self._buf[:max_bytes])
            del self._buf[:max_bytes]
            return data
        return await self.stream.read(max_bytes)

    def write(self, data: bytes) -> None:
        self.stream.write(data)

    async def drain(self) -> None:
        await self.stream.drain()

    def close(self) -> None:
        self.stream.close()


async def _open_outer(
    host: str, port: int, key: KeyPair, relay_peer: PeerId, timeout: float
) -> FramedStream:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (TimeoutError, OSError) as exc:
        raise RelayRefused(
            CONNECTION_FAILED, f"cannot reach relay {host}:{port}: {exc!r}"
        ) from None
    try:
        outer = await SecureTunnel.client(
            StreamPair(reader, writer), key, relay_peer, transport="tcp", timeout=timeout
        )
    except BaseException:
        writer.close()
        raise
    return FramedStream(outer)


# ------------------------------------------------------------------------------------ server
class RelayServer:
    """The relay service on a public node: listens on TCP, enforces ``RelayCore`` limits."""

    def __init__(
        self,
        key: KeyPair,
        config: RelayConfig | None = None,
        host: str = "0.0.0.0",
        port: int = 0,
        capture: bool = False,
        max_connections: int = 1024,
    ) -> None:
        self.key = key
        self.max_connections = max_connections
        self.connections_refused = 0
        self.core = RelayCore(config)
        self.host = host
        self.port = port
        self.capture = capture
        self.captured = bytearray()  # what the relay forwarded (tests: must be ciphertext)
        self.log_lines: list[str] = []
        self._server: asyncio.AbstractServer | None = None
        self._control: dict[str, FramedStream] = {}
        self._pending: dict[int, asyncio.Future] = {}
        self._tasks: set[asyncio.Task] = set()
        self.bytes_relayed = 0

    @property
    def peer_id(self) -> PeerId:
        return self.key.peer_id

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_connection, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        for ctl in list(self._control.values()):
            ctl.close()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def _log(self, line: str) -> None:
        self.log_lines.append(line)
        if len(self.log_lines) > 1000:
            del self.log_lines[:500]
        log.debug("relay: %s", line)

    def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._tasks) >= self.max_connections:
            self.connections_refused += 1
            writer.close()
            return
        task = asyncio.get_running_loop().create_task(self._handle(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, reader, writer) -> None:
        peername = writer.get_extra_info("peername") or ("?", 0)
        stream = None
        try:
            outer = await SecureTunnel.server(
                StreamPair(reader, writer), self.key, transport="tcp", timeout=CONTROL_TIMEOUT
            )
            stream = FramedStream(outer)
            peer = str(outer.remote_peer)
            msg = await stream.read_message()
            kind = msg["t"]
            if kind == "reserve":
                await self._serve_reservation(stream, peer, peername[0])
            elif kind == "connect":
                await self._serve_connect(stream, peer, msg)
            elif kind == "accept":
                await self._serve_accept(stream, peer, msg)
            else:
                raise MalformedMessage(f"unknown relay request {kind!r}")
        except (HandshakeError, MalformedMessage) as exc:
            self._log(f"refused {peername[0]}: {exc}")
            if stream is not None and isinstance(exc, MalformedMessage):
                try:
                    await stream.send_message(wire.encode("error", s=MALFORMED, m=str(exc)[:200]))
                except Exception:
                    pass
        except (
            TimeoutError,
            ConnectionClosed,
            ConnectionError,
            OSError,
            asyncio.IncompleteReadError,
        ):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("relay connection from %s failed", peername[0])
        finally:
            if stream is not None:
                stream.close()
            else:
                writer.close()

    async def _serve_reservation(self, stream: FramedStream, peer: str, ip: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            reservation = self.core.reserve(peer, ip, False, loop.time())
        except RelayRefused as exc:
            self._log(f"reservation of {peer} refused: {exc}")
            await stream.send_message(reserve_refused(exc))
            return
        old = self._control.pop(peer, None)
        if old is not None:
            old.close()
        self._control[peer] = stream
        self._log(f"reservation for {peer}")
        await stream.send_message(reserve_response(reservation, self.core.config, loop.time()))
        try:
            while True:
                msg = await stream.read_message(timeout=3 * KEEPALIVE_INTERVAL)
                if msg["t"] == "reserve":
                    try:
                        reservation = self.core.reserve(peer, ip, False, loop.time())
                        await stream.send_message(
                            reserve_response(reservation, self.core.config, loop.time())
                        )
                    except RelayRefused as exc:
                        await stream.send_message(reserve_refused(exc))
                        return
                elif msg["t"] == "ping":
                    await stream.send_message(wire.encode("pong"))
        finally:
            if self._control.get(peer) is stream:
                del self._control[peer]
                self.core.cancel_reservation(peer)

    async def _serve_connect(self, stream: FramedStream, peer: str, msg: dict) -> None:
        loop = asyncio.get_running_loop()
        target = wire.get_str(msg, "peer", 128)
        try:
            circuit = self.core.open_circuit(peer, target, False, loop.time())
        except RelayRefused as exc:
            self._log(f"circuit {peer} -> {target} refused: {exc}")
            await stream.send_message(connect_refused(exc))
            return
        control = self._control.get(target)
        future = loop.create_future()
        self._pending[circuit.circuit_id] = future
        try:
            if control is None:
                raise RelayRefused(CONNECTION_FAILED, f"{target}'s reservation stream is gone")
            await control.send_message(wire.encode("incoming", src=peer, cid=circuit.circuit_id))
            target_stream = await asyncio.wait_for(future, ACCEPT_TIMEOUT)
        except (TimeoutError, RelayRefused, ConnectionClosed, OSError) as exc:
            self.core.close_circuit(circuit.circuit_id)
            err = (
                exc
                if isinstance(exc, RelayRefused)
                else RelayRefused(CONNECTION_FAILED, f"{target} did not accept the circuit in time")
            )
            await stream.send_message(connect_refused(err))
            return
        finally:
            self._pending.pop(circuit.circuit_id, None)
        try:
            await stream.send_message(connect_response(circuit))
            await target_stream.send_message(wire.encode("accept_resp", s=OK, m=""))
            self._log(f"circuit {circuit.circuit_id}: {peer} -> {target}")
            await self._splice(circuit.circuit_id, stream, target_stream)
        finally:  # never leave the target's handler waiting
            self.core.close_circuit(circuit.circuit_id)
            target_stream.close()
            if target_stream.done is not None and not target_stream.done.done():
                target_stream.done.set_result(None)

    async def _serve_accept(self, stream: FramedStream, peer: str, msg: dict) -> None:
        loop = asyncio.get_running_loop()
        cid = wire.get_int(msg, "cid", 1, 2**63)
        future = self._pending.get(cid)
        try:
            if future is None or future.done():
                raise RelayRefused(MALFORMED, f"no pending circuit {cid}")
            self.core.accept_circuit(cid, peer, loop.time())
        except RelayRefused as exc:
            await stream.send_message(wire.encode("accept_resp", s=exc.code, m=exc.message))
            return
        done = loop.create_future()
        stream.done = done  # the connect side resolves it when splicing ends
        future.set_result(stream)
        await done

    async def _splice(self, cid: int, a: FramedStream, b: FramedStream) -> None:
        loop = asyncio.get_running_loop()

        async def pump(src: FramedStream, dst: FramedStream) -> None:
            while True:
                data = await src.read(65536)
                if not data:
                    return
                self.core.account(cid, len(data), loop.time())
                self.bytes_relayed += len(data)
                if self.capture:
                    self.captured += data
                dst.write(data)
                await dst.drain()

        tasks = [loop.create_task(pump(a, b)), loop.create_task(pump(b, a))]
        try:
            circuit = self.core.circuits.get(cid)
            budget = (circuit.deadline - loop.time()) if circuit is not None else 0.0
            done, _pending = await asyncio.wait(
                tasks, timeout=max(0.0, budget), return_when=asyncio.FIRST_COMPLETED
            )
            if not done:  # an idle circuit still ends at its duration limit
                self._log(f"circuit {cid} closed: duration limit reached")
            for task in done:
                exc = task.exception()
                if isinstance(exc, CircuitLimitExceeded):
                    self._log(f"circuit {cid} closed: {exc}")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.core.close_circuit(cid)
            a.close()
            b.close()
            waiter = b.done
            if waiter is not None and not waiter.done():
                waiter.set_result(None)


# ------------------------------------------------------------------------------------ client
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
        self._stream = await _open_outer(
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

    async def connect(
        self,
        relay_peer: PeerId,
        host: str,
        port: int,
        target: PeerId,
        timeout: float = CONTROL_TIMEOUT,
    ) -> SecureTunnel:
        """Open a circuit to ``target`` through the relay; returns the end-to-end secure channel."""
        stream = await _open_outer(host, port, self.key, relay_peer, timeout)
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
            stream = await _open_outer(
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
