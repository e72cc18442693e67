"""The relay on a public node: :class:`RelayServer`, the asyncio shell of :class:`RelayCore`.

Listens on TCP; each connection is a TLS :class:`SecureTunnel` whose first control frame says what
it is for (``reserve``, ``connect``, ``accept``; see :mod:`.relay_transport`). It keeps each
reserved peer's control stream, announces circuits to their targets, and splices the two sides of
an accepted circuit, counting every byte against the circuit's limits. It never sees the
end-to-end plaintext.
"""

from __future__ import annotations

import asyncio
import logging

from ..errors import ConnectionClosed, HandshakeError
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
    connect_refused,
    connect_response,
    reserve_refused,
    reserve_response,
)
from .relay_transport import (
    ACCEPT_TIMEOUT,
    CONTROL_TIMEOUT,
    KEEPALIVE_INTERVAL,
    FramedStream,
)
from .tunnel import SecureTunnel, StreamPair

log = logging.getLogger(__name__)


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
                await self._serve_connect(stream, peer, msg, peername[0])
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

    async def _serve_connect(self, stream: FramedStream, peer: str, msg: dict, ip: str) -> None:
        loop = asyncio.get_running_loop()
        target = wire.get_str(msg, "peer", 128)
        try:
            circuit = self.core.open_circuit(peer, target, False, loop.time(), ip)
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
